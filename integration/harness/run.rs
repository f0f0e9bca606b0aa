//! One Lan's claim on the machine: its name, its subnet, its scratch dir, and
//! the watchdog that removes all of it when the Lan ends, however the test
//! process ends. Also sweeps what dead runs left behind.
//!
//! Names: a run is `nmtNNN`, NNN being the third octet of its subnet
//! `10.233.NNN.0/24`. Its bridge is `nmtNNNbr`, host i's network namespace
//! `nmtNNN-hI` and the machine end of its veth `nmtNNNvI` (interface names
//! stay under 15 bytes). The claim is the directory `/tmp/nixmesh-lan/nmtNNN`,
//! made atomically and holding an `owner` file with the test process and the
//! watchdog; a claim whose owner and watchdog are both dead is stale.
//! Claims and sweeps happen under one machine-wide `flock`, so concurrent
//! test threads and concurrent `cargo test` runs never pick the same name.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use super::exec::ProcessId;
use super::journaled_fs;

const PREFIX: &str = "nmt";
/// The harness's address range, used for nothing else: `10.233.0.0/16`.
const NET: [u8; 2] = [10, 233];
const OWNER_FILE: &str = "owner";
const CLEANUP_SCRIPT: &str = include_str!("cleanup.sh");

pub struct Run {
    pub name: String,
    subnet: u8,
    pub dir: PathBuf,
    /// Where the hosts' dirs go: `dir`, or the journaled ext4 mounted in it
    /// (`journaled_fs`).
    pub hosts_dir: PathBuf,
    watchdog: Child,
    /// Closing this starts the cleanup.
    watchdog_stdin: Option<ChildStdin>,
}

impl Run {
    /// Sweeps dead runs, then claims a free name and subnet.
    pub fn claim() -> Run {
        let base = std::env::temp_dir().join("nixmesh-lan");
        std::fs::create_dir_all(&base)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", base.display()));
        let _lock = MachineLock::acquire(&base.join(".lock"));
        sweep(&base);

        static CLAIMS: AtomicU32 = AtomicU32::new(0);
        let n = CLAIMS.fetch_add(1, Ordering::Relaxed);
        let first = (std::process::id().wrapping_mul(31).wrapping_add(n * 17)) % 256;
        for k in 0..256 {
            let subnet = ((first + k) % 256) as u8;
            let name = format!("{PREFIX}{subnet:03}");
            let dir = base.join(&name);
            match std::fs::create_dir(&dir) {
                Ok(()) => return Self::start(name, subnet, dir),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create {}: {e}", dir.display()),
            }
        }
        panic!(
            "all 256 harness subnets are claimed under {}",
            base.display()
        );
    }

    fn start(name: String, subnet: u8, dir: PathBuf) -> Run {
        let mut watchdog = cleanup_command(&name, &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the terminal must end the
            // test, not the cleanup after it.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the cleanup watchdog: {e}"));
        let watchdog_stdin = watchdog.stdin.take();
        let mut run = Run {
            name,
            subnet,
            hosts_dir: dir.clone(),
            dir,
            watchdog,
            watchdog_stdin,
        };
        let me = ProcessId::of(std::process::id()).expect("this process is in /proc");
        let mut owners = vec![me.to_line()];
        // The watchdog can only have exited if it failed at once; the
        // owner line for the test process still keeps the claim alive.
        if let Some(w) = ProcessId::of(run.watchdog.id()) {
            owners.push(w.to_line());
        }
        let owner = run.dir.join(OWNER_FILE);
        std::fs::write(&owner, owners.join("\n") + "\n")
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", owner.display()));
        // Mounted only now that the watchdog would unmount it.
        run.hosts_dir = journaled_fs::hosts_dir(&run.dir);
        run
    }

    pub fn bridge(&self) -> String {
        format!("{}br", self.name)
    }

    pub fn netns(&self, host: usize) -> String {
        format!("{}-h{host}", self.name)
    }

    pub fn veth(&self, host: usize) -> String {
        format!("{}v{host}", self.name)
    }

    /// Host i is `10.233.NNN.(10 + i)`.
    pub fn addr(&self, host: usize) -> Ipv4Addr {
        let last = u8::try_from(10 + host)
            .ok()
            .filter(|&b| b < 255)
            .unwrap_or_else(|| panic!("host {host}: a Lan has at most 245 hosts"));
        Ipv4Addr::new(NET[0], NET[1], self.subnet, last)
    }

    pub fn prefix_len(&self) -> u8 {
        24
    }

    /// Runs the cleanup now and waits for it. Returns what it complained
    /// about, if anything.
    pub fn finish(&mut self) -> Option<String> {
        drop(self.watchdog_stdin.take());
        let mut stderr = String::new();
        if let Some(mut e) = self.watchdog.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        match self.watchdog.wait() {
            Ok(s) if s.success() && stderr.trim().is_empty() => None,
            Ok(s) => Some(format!("{s}: {stderr}")),
            Err(e) => Some(format!("cannot wait for the watchdog: {e}")),
        }
    }
}

fn cleanup_command(name: &str, dir: &Path) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(CLEANUP_SCRIPT)
        .arg("nixmesh-lan-cleanup")
        .arg(name)
        .arg(dir);
    cmd
}

/// Removes what runs whose test process and watchdog are both dead left
/// behind: claims, and namespaces or links with no claim at all.
fn sweep(base: &Path) {
    let mut stale = Vec::new();
    if let Ok(entries) = std::fs::read_dir(base) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_run_name(&name) {
                continue;
            }
            let owners = std::fs::read_to_string(entry.path().join(OWNER_FILE)).unwrap_or_default();
            // Under the lock nobody is between creating a claim and writing
            // its owner, so a claim without owners is stale too.
            let alive = owners
                .lines()
                .filter_map(ProcessId::parse_line)
                .any(|p| p.is_alive());
            if !alive {
                stale.push(name);
            }
        }
    }
    for name in machine_names() {
        if let Some(run) = run_of(&name) {
            if !base.join(run).exists() && !stale.iter().any(|s| s == run) {
                stale.push(run.to_string());
            }
        }
    }
    for run in stale {
        eprintln!("nixmesh-lan: removing what dead run {run} left behind");
        let out = cleanup_command(&run, &base.join(&run))
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "nixmesh-lan: cleanup of {run}: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("nixmesh-lan: cannot run the cleanup of {run}: {e}"),
        }
    }
}

/// Network namespaces and links on the machine.
fn machine_names() -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(o) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            names.extend(line.split_whitespace().next().map(str::to_string));
        }
    }
    if let Ok(o) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            // `12: nmt042v0@if11: <…>`
            if let Some(name) = line.split(": ").nth(1) {
                names.push(name.split('@').next().unwrap_or(name).to_string());
            }
        }
    }
    names
}

fn is_run_name(s: &str) -> bool {
    s.len() == PREFIX.len() + 3
        && s.starts_with(PREFIX)
        && s[PREFIX.len()..].bytes().all(|b| b.is_ascii_digit())
}

/// The run a namespace or link name belongs to: `nmt042-h3`, `nmt042br` and
/// `nmt042v3` belong to `nmt042`; anything else to none.
fn run_of(name: &str) -> Option<&str> {
    let run = name.get(..PREFIX.len() + 3)?;
    if !is_run_name(run) {
        return None;
    }
    let rest = &name[run.len()..];
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let ours = rest == "br"
        || rest.strip_prefix("-h").is_some_and(digits)
        || rest.strip_prefix('v').is_some_and(digits);
    ours.then_some(run)
}

/// A machine-wide lock held by a `flock` child process: the kernel drops it
/// when that child exits, which it does when we release it or die.
struct MachineLock(Child);

impl MachineLock {
    fn acquire(path: &Path) -> Self {
        let mut child = Command::new("flock")
            .arg(path)
            .args(["sh", "-c", "echo locked && exec cat >/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run flock (util-linux): {e}"));
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        if line.trim() != "locked" {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cannot lock {}", path.display());
        }
        Self(child)
    }
}

impl Drop for MachineLock {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_belong_to_their_run_only() {
        assert_eq!(run_of("nmt042-h3"), Some("nmt042"));
        assert_eq!(run_of("nmt042br"), Some("nmt042"));
        assert_eq!(run_of("nmt042v12"), Some("nmt042"));
        for other in [
            "nmt042",
            "nmt42-h1",
            "nmt042-h",
            "nmt042v",
            "nmt042brx",
            "eth0",
            "nmtabc-h1",
            "nmt",
        ] {
            assert_eq!(run_of(other), None, "{other}");
        }
    }
}
