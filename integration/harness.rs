//! A real office LAN on this machine, for scenarios: N hosts, each a network
//! namespace on one bridge with its own `/nix`, `/etc/nix` and `nix-daemon`,
//! where real Nix clients and real `nixmesh` agents run.
//!
//! ```text
//!              bridge nmtNNNbr (no address: the machine takes no part)
//!        ┌──────────────┬──────────────┐
//!    nmtNNNv0       nmtNNNv1       nmtNNNv2      machine ends of the veths
//!        │              │              │
//!   h0 eth0 .10    h1 eth0 .11    h2 eth0 .12    10.233.NNN.0/24
//!   each with its own hostname, /nix, /etc/nix, nix-daemon and agents
//! ```
//!
//! Addresses come from `10.233.0.0/16`, one `/24` per Lan, and hosts have no
//! route out of it. Names, subnet and cleanup are in `run`; wires in
//! `network`; a switch that delays every frame, for a LAN with a real round
//! trip, in `switch`; a host's namespaces, daemon and Nix commands in
//! `host`; agents in `agent`.
//!
//! Cleanup is one mechanism: a watchdog process started with each Lan reads
//! a pipe from the test process, and when the pipe closes (the Lan is
//! dropped, or the test process dies of a panic, Ctrl-C or SIGKILL) it kills
//! every process in the Lan's namespaces and deletes the namespaces, links
//! and scratch dir. What a dead run's watchdog could not remove is swept by
//! the next `Lan::new`. A failed test prints every agent's log first.
//!
//! Needs root, iproute2 (`ip`, `tc`, `ss`), util-linux (`nsenter`,
//! `unshare`, `flock`) and Debian's `nix-bin`; for a journaled ext4 under
//! the hosts, also `mount` (`losetup`) and e2fsprogs (`mkfs.ext4`).

mod agent;
#[path = "../tests/common/agent_process.rs"]
mod agent_process;
mod exec;
mod host;
mod journaled_fs;
mod network;
mod nginx;
#[path = "../tests/common/nix_under_test.rs"]
pub mod nix_under_test;
mod run;
mod switch;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use agent::AgentHandle;
pub use host::{Host, SigningKey};
pub use nginx::Nginx;
pub use switch::DelaySwitch;

use run::Run;

pub struct Lan {
    run: Run,
    hosts: Vec<Host>,
}

impl Lan {
    /// Every Lan this thread builds from now on keeps its hosts' dirs
    /// (their stores) on a journaled ext4 of its own, of at least
    /// `smallest` bytes, as a Nix user's store would be, whatever file
    /// system the scratch dir is on (see `journaled_fs`). For the
    /// benchmarks.
    pub fn hosts_on_journaled_fs(smallest: u64) {
        journaled_fs::want(smallest);
    }

    /// Builds a LAN of `n_hosts` hosts, `h0` … `h{n-1}`, each with an empty
    /// store and a running nix-daemon that knows no substituter.
    pub fn new(n_hosts: usize) -> Lan {
        let lan = Lan::build(n_hosts, true);
        if let Some(h0) = lan.hosts.first() {
            // A wrong NIXMESH_TEST_NIX (or a root that holds another
            // version) must not pass silently.
            let out = h0.run(&["nix", "--version"]);
            nix_under_test::selected().assert_version(
                String::from_utf8_lossy(&out.stdout).trim(),
                &String::from_utf8_lossy(&out.stderr),
            );
        }
        lan
    }

    /// A LAN of `n_hosts` hosts for agents alone: no nix-daemon runs, each
    /// store is empty and stays so. For scenarios about the mesh itself at
    /// office scale, where 50 daemons would only cost time and memory.
    pub fn agents_only(n_hosts: usize) -> Lan {
        Lan::build(n_hosts, false)
    }

    fn build(n_hosts: usize, with_daemons: bool) -> Lan {
        preflight();
        keep_failures();
        let run = Run::claim();
        // From here on, dropping `lan` (also while panicking) cleans up.
        let mut lan = Lan {
            run,
            hosts: Vec::with_capacity(n_hosts),
        };
        network::make_room_for_neighbours(n_hosts);
        network::create_bridge(&lan.run.bridge());
        for i in 0..n_hosts {
            let host = Host::start(&lan.run, i, with_daemons);
            lan.hosts.push(host);
        }
        lan
    }

    /// Gives every link of the LAN an MTU of `mtu` (jumbo frames: 9000).
    /// Agents started afterwards size their QUIC packets to it.
    pub fn set_mtu(&self, mtu: u32) {
        for h in &self.hosts {
            h.set_mtu(mtu);
        }
        network::set_bridge_mtu(&self.run.bridge(), mtu);
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Gives every link `one_way` of delay each way (a round trip of twice
    /// that between any two hosts) until the returned switch is dropped.
    pub fn delay(&self, one_way: Duration) -> DelaySwitch<'_> {
        let veths: Vec<String> = (0..self.hosts.len()).map(|i| self.run.veth(i)).collect();
        DelaySwitch::start(&self.run.bridge(), &veths, one_way)
    }

    /// Makes every host lose `per_mille` of the frames that reach it, each
    /// on its own (so a multicast frame may reach some hosts and not
    /// others), as on a lossy medium such as Wi-Fi. 0 ends the loss.
    pub fn lose_frames(&self, per_mille: u32) {
        for host in &self.hosts {
            host.lose_frames(per_mille);
        }
    }

    /// `nmtNNN`: the prefix of every name this Lan made on the machine.
    pub fn name(&self) -> &str {
        &self.run.name
    }

    fn print_logs(&self) {
        for host in &self.hosts {
            for log in host.agent_logs() {
                eprintln!(
                    "===== {} {} ({}) =====\n{}",
                    self.run.name,
                    host.name(),
                    log.display(),
                    host::read_lossy(&log)
                );
            }
            if !host.daemon_log().exists() {
                continue;
            }
            let daemon = host::read_lossy(&host.daemon_log());
            let tail: Vec<&str> = daemon
                .lines()
                .filter(|l| !l.starts_with("accepted connection from"))
                .rev()
                .take(20)
                .collect();
            if !tail.is_empty() {
                eprintln!(
                    "===== {} {} nix-daemon (last lines) =====",
                    self.run.name,
                    host.name()
                );
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
            // After many agents' logs, what failed would be far above the
            // end of the output, where CI's excerpt of it starts.
            if let Some(failure) = last_failure() {
                eprintln!(
                    "===== {} failed (the agents' logs are above) =====\n{failure}",
                    self.run.name
                );
            }
        }
        if let Some(problem) = self.run.finish() {
            eprintln!("nixmesh-lan: cleanup of {}: {problem}", self.run.name);
        }
        for host in &mut self.hosts {
            host.reap();
        }
    }
}

/// Polls `check` every 50 ms until it holds; returns how long that took.
/// Panics, saying `what` was awaited, after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if check() {
            return started.elapsed();
        }
        if started.elapsed() > limit {
            panic!("waited {limit:?} for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The message and place of each thread's last panic in this test process.
static LAST_FAILURE: std::sync::Mutex<Vec<(std::thread::ThreadId, String)>> =
    std::sync::Mutex::new(Vec::new());

/// Keeps each panic's message (for `Lan`'s drop to repeat after the logs)
/// and then reports it as before.
fn keep_failures() {
    static HOOKED: OnceLock<()> = OnceLock::new();
    HOOKED.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let message = format!("thread '{}' {info}", thread.name().unwrap_or("<unnamed>"));
            if let Ok(mut last) = LAST_FAILURE.lock() {
                last.retain(|(id, _)| *id != thread.id());
                last.push((thread.id(), message));
            }
            previous(info);
        }));
    });
}

/// This thread's last panic, if it had one.
fn last_failure() -> Option<String> {
    let me = std::thread::current().id();
    let mut last = LAST_FAILURE.lock().ok()?;
    let at = last.iter().position(|(id, _)| *id == me)?;
    Some(last.swap_remove(at).1)
}

/// Fails at once, saying what is missing, where the LAN cannot be built.
fn preflight() {
    static PROBLEMS: OnceLock<Vec<String>> = OnceLock::new();
    let problems = PROBLEMS.get_or_init(|| {
        let mut problems = Vec::new();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let root = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0");
        if !root {
            problems.push("the LAN tests must run as root".to_string());
        }
        // Machine tools run with the test's PATH, host tools with the hosts'.
        let machine_path = std::env::var("PATH").unwrap_or_default();
        for (tool, package, path) in [
            ("ip", "iproute2", machine_path.as_str()),
            ("tc", "iproute2", &machine_path),
            ("ss", "iproute2", &machine_path),
            ("kill", "procps", &machine_path),
            ("curl", "curl", host::PATH),
            ("nsenter", "util-linux", &machine_path),
            ("unshare", "util-linux", &machine_path),
            ("flock", "util-linux", &machine_path),
            ("nft", "nftables", "/usr/sbin:/sbin"),
            ("timeout", "coreutils", host::PATH),
            ("nix-daemon", "nix-bin", host::PATH),
            ("nix-store", "nix-bin", host::PATH),
            ("nix-build", "nix-bin", host::PATH),
            ("nix", "nix-bin", host::PATH),
        ] {
            let found = std::env::split_paths(path).any(|d| d.join(tool).is_file());
            if !found {
                problems.push(format!(
                    "`{tool}` is not on PATH (Debian package {package})"
                ));
            }
        }
        // Mount points for each host's own; empty on a machine without Nix
        // of its own, and never written to from here.
        for dir in ["/nix", "/etc/nix"] {
            if let Err(e) = std::fs::create_dir_all(dir) {
                problems.push(format!(
                    "cannot create {dir} to mount each host's own on it: {e}"
                ));
            }
        }
        problems
    });
    assert!(
        problems.is_empty(),
        "cannot build the LAN:\n  {}",
        problems.join("\n  ")
    );
}
