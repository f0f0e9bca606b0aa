//! Shared helpers for tests against real Nix: chroot stores made by
//! `nix-store --store`, the `nixmesh` binary run as an agent, and a tiny
//! HTTP/1.1 client that can tell a complete body from a cut-off one.
#![allow(dead_code)]

pub mod cut_proxy;
pub mod nix_under_test;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const NIX_FLAGS: [&str; 2] = ["--extra-experimental-features", "nix-command"];
pub const SANDBOX_PATHS: &str = "/bin=/usr/bin /usr /lib=/usr/lib /lib64=/usr/lib64";

/// A Nix program of the Nix under test (`NIXMESH_TEST_NIX`), with the
/// tests' own settings; see `nix_under_test`.
pub fn nix_command(program: &str) -> Command {
    nix_under_test::selected().command(program)
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is Debian's nix-bin installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A chroot Nix store in a temp dir: logical `/nix/store`, real files under
/// `<dir>/nix/store`. Each store has its own client cache dir.
pub struct TestStore {
    pub dir: tempfile::TempDir,
}

impl TestStore {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nixmesh-store-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("cache")).unwrap();
        Self { dir }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn real(&self, store_path: &str) -> PathBuf {
        self.root().join(store_path.trim_start_matches('/'))
    }

    /// A Nix command aimed at this store, with a private client cache.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = nix_command(program);
        c.env("XDG_CACHE_HOME", self.root().join("cache"))
            .arg("--store")
            .arg(self.root());
        c
    }

    pub fn nix(&self, args: &[&str]) -> Output {
        let mut c = self.cmd("nix");
        c.args(NIX_FLAGS).args(args);
        run_ok(&mut c)
    }

    /// `nix-store --add` (a content-addressed path).
    pub fn add(&self, path: &Path) -> String {
        stdout_line(&run_ok(self.cmd("nix-store").arg("--add").arg(path)))
    }

    /// `nix-build` of `expr` (a Nix expression file's text); returns the out path.
    pub fn build(&self, expr: &str) -> String {
        let file = self.root().join(format!("expr-{}.nix", rand_suffix()));
        std::fs::write(&file, expr).unwrap();
        let out = run_ok(
            self.cmd("nix-build")
                .args([
                    "--option",
                    "extra-sandbox-paths",
                    SANDBOX_PATHS,
                    "--no-out-link",
                ])
                .arg(&file),
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string()
    }

    /// `nix path-info --json` of one path, in 2.8's shape whatever the
    /// Nix: 2.8 prints a list, 2.19 on an object keyed by path with the
    /// NarHash in SRI form; `narHash` here is always `sha256:<nix32>`.
    pub fn path_info_json(&self, path: &str) -> serde_json::Value {
        let out = self.nix(&["path-info", "--json", path]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut info = match v {
            serde_json::Value::Array(mut list) if !list.is_empty() => list.swap_remove(0),
            serde_json::Value::Object(mut by_path) => by_path
                .remove(path)
                .unwrap_or_else(|| panic!("no {path} in nix path-info's answer")),
            other => panic!("nix path-info --json printed {other}"),
        };
        if let Some(h) = info["narHash"].as_str() {
            let nix32 = nixmesh::nix::Sha256Hash::parse(h)
                .unwrap_or_else(|e| panic!("narHash {h:?}: {e}"))
                .to_nix32();
            info["narHash"] = nix32.into();
        }
        info
    }

    /// What `nix-store --dump` writes for `path` (read from the real files).
    pub fn dump(&self, path: &str) -> Vec<u8> {
        run_ok(nix_command("nix-store").arg("--dump").arg(self.real(path))).stdout
    }

    pub fn sign(&self, secret_key_file: &Path, path: &str) {
        self.nix(&[
            "store",
            "sign",
            "-k",
            secret_key_file.to_str().unwrap(),
            path,
        ]);
    }

    /// `nix-store -r paths` into this store with only `substituters`
    /// (space-separated URLs) and, when given, `trusted` public keys.
    pub fn substitute(&self, substituters: &str, trusted: Option<&str>, paths: &[&str]) -> Output {
        let mut c = self.cmd("nix-store");
        c.args(["-r", "--option", "substituters", substituters])
            .args(["--option", "narinfo-cache-negative-ttl", "0"]);
        if let Some(keys) = trusted {
            c.args(["--option", "trusted-public-keys", keys]);
        }
        c.args(paths).output().expect("nix-store (Debian nix-bin)")
    }

    /// `nix store verify --sigs-needed 1` trusting only `trusted`: true when
    /// every path carries a valid signature by it (or is content-addressed).
    pub fn signed_by(&self, trusted: &str, paths: &[&str]) -> bool {
        let mut c = self.cmd("nix");
        c.args(NIX_FLAGS)
            .args(["store", "verify", "--sigs-needed", "1"])
            .args(["--option", "trusted-public-keys", trusted])
            .args(paths);
        c.output().map(|o| o.status.success()).unwrap_or(false)
    }

    pub fn is_valid(&self, path: &str) -> bool {
        self.cmd("nix-store")
            .args(["--check-validity", path])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

/// The 32-character hash part of a `/nix/store/...` path.
pub fn hash_part(store_path: &str) -> &str {
    &store_path["/nix/store/".len()..][..32]
}

pub fn rand_suffix() -> String {
    let mut b = [0u8; 6];
    getrandom::getrandom(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A port free for both TCP and UDP. Ports come from a per-process counter
/// below the kernel's ephemeral range, so parallel tests never get the same
/// one and outgoing connections never take it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    if NEXT.load(Ordering::SeqCst) == 0 {
        let mut b = [0u8; 2];
        getrandom::getrandom(&mut b).unwrap();
        let base = 20_000 + u16::from_le_bytes(b) % 10_000;
        let _ = NEXT.compare_exchange(0, base, Ordering::SeqCst, Ordering::SeqCst);
    }
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32_000, "ran out of test ports");
        let tcp = TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
}

/// A Nix signing key pair made by `nix-store --generate-binary-cache-key`.
pub struct NixKey {
    pub secret: PathBuf,
    pub public: String,
    _dir: tempfile::TempDir,
}

pub fn nix_key(name: &str) -> NixKey {
    let dir = tempfile::tempdir().unwrap();
    let (s, p) = (dir.path().join("sk"), dir.path().join("pk"));
    run_ok(
        nix_command("nix-store")
            .arg("--generate-binary-cache-key")
            .arg(name)
            .arg(&s)
            .arg(&p),
    );
    NixKey {
        secret: s,
        public: std::fs::read_to_string(&p).unwrap().trim().to_string(),
        _dir: dir,
    }
}

/// A `nixmesh agent` process; killed on drop, its log printed if the test
/// is failing.
pub struct Agent {
    child: Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts the agent with `config` and waits until `ready` accepts TCP.
    pub fn start(config: &str, ready: SocketAddr) -> Self {
        Self::start_with(config, ready, &[], Path::new(env!("CARGO_BIN_EXE_nixmesh")))
    }

    /// Like `start`, running `binary` behind `wrapper` (e.g. `setpriv …`).
    pub fn start_with(config: &str, ready: SocketAddr, wrapper: &[&str], binary: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("config.toml");
        std::fs::write(&conf, config).unwrap();
        let log = dir.path().join("agent.log");
        let mut argv: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        argv.push(binary.display().to_string());
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .args(["agent", "--config"])
            .arg(&conf)
            .env("RUST_LOG", "nixmesh=debug,info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start nixmesh");
        let mut agent = Self {
            child,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(ready).is_err() {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("agent exited with {status}:\n{}", agent.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "agent not up:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log_text());
        }
    }
}

pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// False when the connection ended before Content-Length bytes came.
    pub complete: bool,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a fresh connection; `raw_target` is sent as is.
pub fn http(addr: SocketAddr, method: &str, raw_target: &str) -> HttpReply {
    http_with(addr, method, raw_target, &[])
}

/// `http` with extra request headers.
pub fn http_with(
    addr: SocketAddr,
    method: &str,
    raw_target: &str,
    headers: &[(&str, &str)],
) -> HttpReply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {raw_target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut reply = HttpReply {
        status,
        headers,
        body: Vec::new(),
        complete: true,
    };
    if method == "HEAD" {
        return reply;
    }
    let _ = r.read_to_end(&mut reply.body);
    if let Some(len) = reply.header("content-length") {
        let len: usize = len.parse().unwrap();
        reply.complete = reply.body.len() == len;
    }
    reply
}

pub fn get(addr: SocketAddr, target: &str) -> HttpReply {
    http(addr, "GET", target)
}

/// Ports and settings of one agent in a loopback mesh.
pub struct MeshNode {
    pub name: String,
    pub quic: u16,
    pub admin: u16,
    pub substituter: u16,
    pub config_path: PathBuf,
    pub key: String,
    pub store: TestStore,
}

/// Extra settings for `MeshNode::new`, one string per TOML section.
#[derive(Default, Clone)]
pub struct NodeSettings {
    pub top: String,
    pub share: String,
    pub mesh: String,
    pub substituter: String,
}

impl MeshNode {
    pub fn new(name: &str, settings: &NodeSettings) -> Self {
        let store = TestStore::new();
        // Every store needs a DB; adding a path makes one.
        let seed = store.root().join("seed");
        std::fs::write(&seed, name).unwrap();
        store.add(&seed);
        let (quic, admin, substituter) = (free_port(), free_port(), free_port());
        let config_path = store.root().join("agent.toml");
        let mut node = Self {
            name: name.to_string(),
            quic,
            admin,
            substituter,
            config_path,
            key: String::new(),
            store,
        };
        node.write_config(settings, &[]);
        let out = run_ok(
            Command::new(env!("CARGO_BIN_EXE_nixmesh"))
                .args(["id", "--config"])
                .arg(&node.config_path),
        );
        node.key = stdout_line(&out);
        node
    }

    /// Rewrites the config with `peers` as static peers.
    pub fn write_config(&self, s: &NodeSettings, peers: &[&MeshNode]) {
        let statics: Vec<String> = peers
            .iter()
            .map(|p| {
                format!(
                    "{{ address = \"127.0.0.1:{}\", key = {:?} }}",
                    p.quic, p.key
                )
            })
            .collect();
        let text = format!(
            "{top}\nstate_dir = {state:?}\n\
             [store]\nroot = {root:?}\nnix_conf = \"/nonexistent/nix.conf\"\n\
             [share]\n{share}\n\
             [mesh]\nlisten = \"127.0.0.1:{quic}\"\nmdns = false\nname = {name:?}\nstatic_peers = [{statics}]\n{mesh}\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [substituter]\nlisten = \"127.0.0.1:{sub}\"\n{substituter}\n",
            top = s.top,
            state = self.store.root().join("state").display().to_string(),
            root = self.store.root().display().to_string(),
            share = s.share,
            quic = self.quic,
            name = self.name,
            statics = statics.join(", "),
            mesh = s.mesh,
            admin = self.admin,
            sub = self.substituter,
            substituter = s.substituter,
        );
        std::fs::write(&self.config_path, text).unwrap();
    }

    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin))
    }

    pub fn substituter_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.substituter))
    }

    pub fn start(&self) -> Agent {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        Agent::start(&text, self.admin_addr())
    }

    /// `nixmesh peers --json` against this node.
    pub fn peers(&self) -> Vec<serde_json::Value> {
        let out = run_ok(
            Command::new(env!("CARGO_BIN_EXE_nixmesh"))
                .args(["peers", "--json", "--admin"])
                .arg(self.admin_addr().to_string()),
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The state of the peer named `name` in this node's table.
    pub fn peer_state(&self, name: &str) -> Option<String> {
        self.peers()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["state"].as_str().unwrap_or("").to_string())
    }
}

/// Polls `check` every 50 ms until it holds or `limit` passes; returns the
/// time it took.
pub fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// Checks how the NAR at `url` (whose bytes are `nar`, at least 2 KiB)
/// answers `Range`: `Accept-Ranges: bytes`; `206` with exactly the asked
/// bytes and a matching `Content-Range` for `bytes=N-`, `bytes=N-M` (also
/// past the end) and `bytes=-N`; `416` for a start past the end; the whole
/// NAR with `200` for a header that does not parse.
pub fn assert_nar_ranges(addr: SocketAddr, url: &str, nar: &[u8]) {
    let size = nar.len();
    assert!(size >= 2048, "a NAR of {size} bytes is too small to cut");
    let whole = get(addr, url);
    assert_eq!(whole.status, 200, "{url}");
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    assert!(
        whole.complete && whole.body == nar,
        "{url}: whole NAR differs"
    );
    let mid = size / 2 + 3;
    for (range, first, last) in [
        (format!("bytes={mid}-"), mid, size - 1),
        ("bytes=0-".to_string(), 0, size - 1),
        ("bytes=10-1009".to_string(), 10, 1009),
        (
            format!("bytes={}-{}", size - 5, size + 100),
            size - 5,
            size - 1,
        ),
        (
            format!("bytes={}-{}", size - 1, size - 1),
            size - 1,
            size - 1,
        ),
        ("bytes=-7".to_string(), size - 7, size - 1),
    ] {
        let r = http_with(addr, "GET", url, &[("Range", &range)]);
        assert_eq!(r.status, 206, "{range}");
        assert!(r.complete, "{range}: cut off");
        assert!(r.body == nar[first..=last], "{range}: wrong bytes");
        let want = format!("bytes {first}-{last}/{size}");
        assert_eq!(r.header("content-range"), Some(want.as_str()), "{range}");
        assert_eq!(r.header("accept-ranges"), Some("bytes"), "{range}");
    }
    let head = http_with(addr, "HEAD", url, &[("Range", &format!("bytes={mid}-"))]);
    assert_eq!(head.status, 206);
    let left = (size - mid).to_string();
    assert_eq!(head.header("content-length"), Some(left.as_str()));
    for past in [
        format!("bytes={size}-"),
        format!("bytes={}-{}", size + 1, size + 9),
    ] {
        let r = http_with(addr, "GET", url, &[("Range", &past)]);
        assert_eq!(r.status, 416, "{past}");
        let want = format!("bytes */{size}");
        assert_eq!(r.header("content-range"), Some(want.as_str()), "{past}");
    }
    for bad in [
        "bytes=9-2",
        "bytes=x-",
        "pages=0-1",
        "bytes=0-1,4-5",
        "bytes",
    ] {
        let r = http_with(addr, "GET", url, &[("Range", bad)]);
        assert_eq!(r.status, 200, "{bad}");
        assert!(r.complete && r.body == nar, "{bad}: whole NAR differs");
    }
}
