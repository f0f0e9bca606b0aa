//! One machine of the office LAN: a network namespace, a UTS namespace (its
//! hostname is its name, `h0`, …) and a mount namespace in which a per-host
//! directory is bind-mounted on `/nix` and another on `/etc/nix`; a real
//! `nix-daemon` owning that store; and the commands a scenario runs there as
//! real Nix clients.
//!
//! A long-lived "host shell" (`sleep infinity`) holds the namespaces; every
//! command enters them with `nsenter`. Commands get a clean environment with
//! a per-host `HOME`, cache and temp dir, so nothing (the narinfo disk cache
//! above all) leaks between hosts or runs.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::agent::AgentHandle;
use super::network;
use super::nix_under_test;
use super::run::Run;

/// Longest a command on a host may run before it is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a nix-daemon may take to answer after it starts.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);
/// How long `delete_path` waits for another host's process to close its
/// copy of the same store path.
const DELETE_WITHIN: Duration = Duration::from_secs(10);

pub(super) const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Every host's nix.conf before a scenario adds to it.
const BASE_NIX_CONF: &str = "\
# Written by the nixmesh LAN harness.
# Builds run as root: the machine's nixbld users are shared by every host,
# and Nix kills all processes of a build user before a build.
build-users-group =
# Builders use the machine's /bin/sh.
sandbox = false
# No cache and no trusted key until the scenario names them.
substituters =
trusted-public-keys =
require-sigs = true
narinfo-cache-negative-ttl = 0
experimental-features = nix-command
";

/// Names the host, drops its copies of other runs' journaled file systems
/// (see `journaled_fs`: a copy would keep one alive after its run ends),
/// mounts its `/nix` and `/etc/nix` (and, for a modern Nix, the same inside
/// its Debian root: `{root_mounts}`), says `ready`, then only holds the
/// namespaces.
const HOST_SHELL: &str = "echo \"$1\" > /proc/sys/kernel/hostname \
    && for m in $(sed -n 's|^[^ ]* \\([^ ]*/nixmesh-lan/nmt[0-9]*/hosts\\) .*|\\1|p' /proc/self/mounts); do \
    case \"$2\" in \"$m\"/*) ;; *) umount -l \"$m\" || true ;; esac; done \
    && mount --bind \"$2\" /nix && mount --bind \"$3\" /etc/nix \
    && {root_mounts} echo ready && exec sleep infinity";

/// A Nix signing key pair made on a host; the files are readable from the
/// machine and from every host.
#[derive(Clone, Debug)]
pub struct SigningKey {
    pub secret_file: PathBuf,
    /// `name:base64`, as `trusted-public-keys` takes it.
    pub public: String,
}

/// Byte counters of a host's link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkBytes {
    pub sent: u64,
    pub received: u64,
}

pub struct Host {
    name: String,
    netns: String,
    veth: String,
    addr: Ipv4Addr,
    dir: PathBuf,
    shell: Child,
    daemon: Mutex<Option<Child>>,
    agent_logs: Mutex<Vec<PathBuf>>,
    files_made: AtomicUsize,
}

impl Host {
    /// Wires host `index` of `run`, mounts its `/nix`, and starts its
    /// daemon if `with_daemon`.
    pub(super) fn start(run: &Run, index: usize, with_daemon: bool) -> Host {
        let name = format!("h{index}");
        let dir = run.hosts_dir.join(&name);
        for sub in ["nix", "etc-nix", "home", "tmp", "files", "keys", "nixmesh"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        }
        write(&dir.join("etc-nix/nix.conf"), BASE_NIX_CONF);
        let (netns, veth, addr) = (run.netns(index), run.veth(index), run.addr(index));
        network::attach_host(&run.bridge(), &netns, &veth, addr, run.prefix_len());
        let shell = start_host_shell(&name, &netns, &dir);
        let host = Host {
            name,
            netns,
            veth,
            addr,
            dir,
            shell,
            daemon: Mutex::new(None),
            agent_logs: Mutex::new(Vec::new()),
            files_made: AtomicUsize::new(0),
        };
        if with_daemon {
            host.start_daemon();
        }
        host
    }

    /// `h0`, `h1`, …
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// This host's scratch dir on the machine, also its working directory.
    /// Paths under it mean the same inside every host and on the machine.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host's `/etc/nix/nix.conf`, as seen from the machine.
    pub fn nix_conf_path(&self) -> PathBuf {
        self.dir.join("etc-nix/nix.conf")
    }

    /// A command that runs inside this host, with its environment
    /// (`NIX_REMOTE=daemon`, own `HOME` and caches) and no time limit.
    /// Nix programs (also behind `timeout …`) run from the Nix under test
    /// (`NIXMESH_TEST_NIX`); everything else is the machine's.
    pub fn command(&self, argv: &[&str]) -> Command {
        let argv = nix_under_test::selected().host_argv(&self.dir, argv);
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.shell.id().to_string())
            .args(["-m", "-n", "-u"])
            .arg(format!("--wd={}", self.dir.display()))
            .arg("--")
            .args(&argv)
            .env_clear()
            .envs(self.env())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `argv` on this host and returns its output, killing it after
    /// two minutes.
    pub fn run(&self, argv: &[&str]) -> Output {
        let limit = COMMAND_TIMEOUT.as_secs().to_string();
        let mut full = vec!["timeout", "-k", "5", &limit];
        full.extend_from_slice(argv);
        self.command(&full)
            .output()
            .unwrap_or_else(|e| panic!("{}: cannot run {argv:?}: {e}", self.name))
    }

    /// Runs `argv` on this host; panics unless it succeeds. Returns stdout.
    pub fn run_ok(&self, argv: &[&str]) -> String {
        let out = self.run(argv);
        if !out.status.success() {
            panic!(
                "on {}: `{}` failed ({})\n--- stdout ---\n{}--- stderr ---\n{}",
                self.name,
                argv.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Deletes `path` from this host's store (see `delete_paths`).
    pub fn delete_path(&self, path: &str) {
        self.delete_paths(&[path]);
    }

    /// Deletes `paths` from this host's store; panics unless they go
    /// within `DELETE_WITHIN`. Nix's garbage collector keeps a path that
    /// any process on the machine has open under that name, and every test
    /// host's store is at `/nix/store` in its own mount namespace: another
    /// host's agent or daemon still reading its own copy of the same path
    /// (a NAR it just served, or fills in kept frames from) keeps this one
    /// alive for a moment.
    pub fn delete_paths(&self, paths: &[&str]) {
        let mut argv = vec!["nix-store", "--delete"];
        argv.extend_from_slice(paths);
        let started = std::time::Instant::now();
        loop {
            let out = self.run(&argv);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                return;
            }
            if !stderr.contains("since it is still alive") || started.elapsed() > DELETE_WITHIN {
                panic!(
                    "on {}: `{}` failed ({}):\n{stderr}",
                    self.name,
                    argv.join(" "),
                    out.status
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sets this host's nix.conf to the harness defaults followed by
    /// `extra` (later lines win), and restarts its nix-daemon to read it.
    pub fn configure_nix(&self, extra: &str) {
        write(
            &self.nix_conf_path(),
            &format!("{BASE_NIX_CONF}\n# The scenario's settings.\n{extra}\n"),
        );
        self.stop_daemon();
        self.start_daemon();
    }

    /// Adds a file named `name` holding `contents` to this host's store
    /// (`nix-store --add`) and returns its store path.
    pub fn add_file(&self, name: &str, contents: &[u8]) -> String {
        let n = self.files_made.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join("files").join(n.to_string());
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let file = dir.join(name);
        fs::write(&file, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
        one_line(self.run_ok(&["nix-store", "--add", &path_str(&file)]))
    }

    /// Adds the file or directory at `path` (anywhere under the Lan's dir,
    /// which every host sees) to this host's store and returns its store
    /// path. Adding the same file on two hosts gives the same store path.
    pub fn add_path(&self, path: &Path) -> String {
        one_line(self.run_ok(&["nix-store", "--add", &path_str(path)]))
    }

    /// Where the file of `store_path` (or a file under it) really is, on
    /// the machine: under this host's `nix/store`.
    pub fn real_path(&self, store_path: &str) -> PathBuf {
        let rel = store_path
            .strip_prefix("/nix/store/")
            .unwrap_or_else(|| panic!("{store_path} is not under /nix/store"));
        self.dir.join("nix/store").join(rel)
    }

    /// The node key (`nixmesh id`) of the agents this host runs with the
    /// harness's default `state_dir`, made now if there is none yet.
    pub fn node_key(&self) -> String {
        let config = self.dir.join("id.toml");
        let state_dir = self.dir.join("nixmesh");
        write(
            &config,
            &format!(
                "state_dir = {}\n",
                toml::Value::String(path_str(&state_dir))
            ),
        );
        one_line(self.run_ok(&[
            env!("CARGO_BIN_EXE_nixmesh"),
            "id",
            "--config",
            &path_str(&config),
        ]))
    }

    /// Bytes this host has sent and received on its LAN link (`eth0`).
    pub fn link_bytes(&self) -> LinkBytes {
        let out = self.run_ok(&["ip", "-s", "-j", "link", "show", "dev", network::HOST_IF]);
        let json: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{}: `ip -s -j link` printed {out:?}: {e}", self.name));
        let stat = |dir: &str| {
            json[0]["stats64"][dir]["bytes"]
                .as_u64()
                .unwrap_or_else(|| panic!("{}: no {dir} bytes in {out}", self.name))
        };
        LinkBytes {
            sent: stat("tx"),
            received: stat("rx"),
        }
    }

    /// Asks `url` from inside this host with curl: the HTTP status (0 when
    /// there was no answer) and how long it took.
    pub fn http_status(&self, url: &str) -> (u16, Duration) {
        let started = Instant::now();
        let out = self.run(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "30",
            url,
        ]);
        let took = started.elapsed();
        let code = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        (code, took)
    }

    /// Builds the Nix expression `expr` (one derivation, no nixpkgs: use
    /// `builder = "/bin/sh"`) on this host and returns its output path.
    pub fn build(&self, expr: &str) -> String {
        let n = self.files_made.fetch_add(1, Ordering::Relaxed);
        let file = self.dir.join("files").join(format!("expr-{n}.nix"));
        write(&file, expr);
        one_line(self.run_ok(&["nix-build", "--no-out-link", &path_str(&file)]))
    }

    /// The closure of `path` in this host's store, `path` included.
    pub fn closure(&self, path: &str) -> Vec<String> {
        self.run_ok(&["nix-store", "--query", "--requisites", path])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The sum of the NAR sizes `nix path-info --json ARGS` lists. 2.8
    /// prints a list of objects, 2.19 on an object keyed by store path.
    pub fn nar_size_sum(&self, args: &[&str]) -> u64 {
        let mut argv = vec!["nix", "path-info", "--json"];
        argv.extend_from_slice(args);
        let out = self.run_ok(&argv);
        let json: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("`nix path-info --json` printed {out:?}: {e}"));
        let infos: Vec<&serde_json::Value> = match &json {
            serde_json::Value::Array(list) => list.iter().collect(),
            serde_json::Value::Object(by_path) => by_path.values().collect(),
            other => panic!("`nix path-info --json` printed {other}"),
        };
        infos
            .iter()
            .map(|i| {
                i["narSize"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no narSize in {i}"))
            })
            .sum()
    }

    /// Whether `path` is valid in this host's store.
    pub fn has_path(&self, path: &str) -> bool {
        self.run(&["nix-store", "--check-validity", path])
            .status
            .success()
    }

    /// Makes a signing key pair like `nix-store --generate-binary-cache-key`.
    pub fn generate_key(&self, name: &str) -> SigningKey {
        let secret_file = self.dir.join("keys").join(format!("{name}.secret"));
        let public_file = self.dir.join("keys").join(format!("{name}.public"));
        self.run_ok(&[
            "nix-store",
            "--generate-binary-cache-key",
            name,
            &path_str(&secret_file),
            &path_str(&public_file),
        ]);
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&secret_file, fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", secret_file.display()));
        let public = fs::read_to_string(&public_file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", public_file.display()))
            .trim()
            .to_string();
        SigningKey {
            secret_file,
            public,
        }
    }

    /// Adds a signature by `secret_key_file` to each of `paths` in this
    /// host's store (`nix store sign`).
    pub fn sign(&self, paths: &[&str], secret_key_file: &Path) {
        let key = path_str(secret_key_file);
        let mut argv = vec![
            "nix",
            "--extra-experimental-features",
            "nix-command",
            "store",
            "sign",
            "--key-file",
            &key,
        ];
        argv.extend_from_slice(paths);
        self.run_ok(&argv);
    }

    /// Limits this host's link to `bits_per_sec` in each direction.
    pub fn shape(&self, bits_per_sec: u64) {
        network::shape(&self.netns, &self.veth, bits_per_sec);
    }

    /// The MTU of this host's link, both ends.
    pub fn set_mtu(&self, mtu: u32) {
        network::set_host_mtu(&self.netns, &self.veth, mtu);
    }

    /// Loses `per_mille` of the frames that reach this host (0: none).
    pub fn lose_frames(&self, per_mille: u32) {
        network::lose_frames(&self.netns, per_mille);
    }

    /// Starts `nixmesh agent` here with `config_toml` and returns once it
    /// listens where the config says (see `AgentHandle::spawn`).
    pub fn start_agent(&self, config_toml: &str) -> AgentHandle {
        let mut agent = self.spawn_agent(config_toml);
        agent.wait_ready();
        agent
    }

    /// Starts `nixmesh agent` here with `config_toml`, without waiting.
    pub fn spawn_agent(&self, config_toml: &str) -> AgentHandle {
        let mut logs = self.agent_logs.lock().unwrap_or_else(|e| e.into_inner());
        let n = logs.len();
        let agent = AgentHandle::spawn(self, n, config_toml);
        logs.push(agent.log_path().to_path_buf());
        agent
    }

    /// Every agent log of this host, for a failed test's report.
    pub(super) fn agent_logs(&self) -> Vec<PathBuf> {
        self.agent_logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn daemon_log(&self) -> PathBuf {
        self.dir.join("nix-daemon.log")
    }

    /// Runs `work` on a thread of this process that has entered this
    /// host's network namespace: the sockets it opens (a tokio runtime
    /// made inside it included) are this host's. For traffic generators
    /// that are not programs of their own (a flood of QUIC handshakes).
    pub fn in_netns<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let ns = format!("/proc/{}/ns/net", self.shell_pid());
        let name = self.name.clone();
        std::thread::spawn(move || {
            use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
            use std::os::fd::AsFd;
            let file = fs::File::open(&ns).unwrap_or_else(|e| panic!("{ns}: {e}"));
            // setns changes only this thread's network namespace.
            move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
                .unwrap_or_else(|e| panic!("entering {name}'s network namespace: {e}"));
            work()
        })
    }

    /// The host shell's pid: `nsenter -t` it to enter this host.
    pub(super) fn shell_pid(&self) -> u32 {
        self.shell.id()
    }

    /// Reaps this host's processes once the cleanup has killed them.
    pub(super) fn reap(&mut self) {
        let _ = self.shell.kill();
        let _ = self.shell.wait();
        self.stop_daemon();
    }

    fn env(&self) -> Vec<(String, String)> {
        let home = self.dir.join("home");
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), PATH.into()),
            ("HOME".into(), path_str(&home)),
            ("XDG_CACHE_HOME".into(), path_str(&home.join(".cache"))),
            ("XDG_CONFIG_HOME".into(), path_str(&home.join(".config"))),
            ("XDG_DATA_HOME".into(), path_str(&home.join(".local/share"))),
            (
                "XDG_STATE_HOME".into(),
                path_str(&home.join(".local/state")),
            ),
            ("TMPDIR".into(), path_str(&self.dir.join("tmp"))),
            ("NIX_REMOTE".into(), "daemon".into()),
        ];
        if let Ok(v) = std::env::var("RUST_BACKTRACE") {
            env.push(("RUST_BACKTRACE".into(), v));
        }
        env
    }

    fn start_daemon(&self) {
        let log_path = self.daemon_log();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log_path.display()));
        let mut cmd = self.command(&["nix-daemon"]);
        // With NIX_REMOTE=daemon it would serve each client by connecting
        // to itself, forking without end.
        cmd.env_remove("NIX_REMOTE")
            .stdout(log.try_clone().expect("log file handle"))
            .stderr(log);
        let mut daemon = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot start nix-daemon: {e}", self.name));
        let socket = self.dir.join("nix/var/nix/daemon-socket/socket");
        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = daemon.try_wait() {
                panic!(
                    "{}: nix-daemon exited ({status}):\n{}",
                    self.name,
                    read_lossy(&log_path)
                );
            }
            let pinged = socket.exists()
                && self
                    .run(&[
                        "nix",
                        "--extra-experimental-features",
                        "nix-command",
                        "store",
                        "ping",
                    ])
                    .status
                    .success();
            if pinged {
                break;
            }
            if Instant::now() > deadline {
                let _ = daemon.kill();
                let _ = daemon.wait();
                panic!(
                    "{}: nix-daemon does not answer after {DAEMON_START_TIMEOUT:?}:\n{}",
                    self.name,
                    read_lossy(&log_path)
                );
            }
            std::thread::sleep(POLL);
        }
        *self.daemon.lock().unwrap_or_else(|e| e.into_inner()) = Some(daemon);
    }

    fn stop_daemon(&self) {
        let old = self.daemon.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut daemon) = old {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}

/// Starts the process that holds the host's mount and UTS namespaces (in
/// `netns`), with its own hostname, `/nix` and `/etc/nix`, and waits until
/// they are set up.
fn start_host_shell(hostname: &str, netns: &str, dir: &Path) -> Child {
    let log_path = dir.join("host-shell.log");
    let log = fs::File::create(&log_path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
    let mut shell = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(["unshare", "--mount", "--uts", "--propagation", "private"])
        .args(["sh", "-c"])
        .arg(HOST_SHELL.replace("{root_mounts}", &nix_under_test::selected().host_mounts()))
        .args(["host-shell", hostname])
        .arg(dir.join("nix"))
        .arg(dir.join("etc-nix"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{netns}: cannot start the host shell: {e}"));
    let mut line = String::new();
    if let Some(out) = shell.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    if line.trim() != "ready" {
        let _ = shell.kill();
        let _ = shell.wait();
        panic!(
            "{netns}: the host shell did not start (are /nix and /etc/nix on this machine?):\n{}",
            read_lossy(&log_path)
        );
    }
    // `ip netns exec`, `unshare` and `sh` each exec the next, so the pid is
    // that of `sleep`, which holds both namespaces.
    shell
}

pub(super) fn read_lossy(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn path_str(p: &Path) -> String {
    p.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", p.display()))
        .to_string()
}

fn one_line(stdout: String) -> String {
    let mut lines = stdout.lines();
    match (lines.next(), lines.next()) {
        (Some(line), None) => line.to_string(),
        _ => panic!("expected one line of output, got {stdout:?}"),
    }
}
