//! What the mesh scenarios share: agent configs of an office, test closures
//! that need no nixpkgs, random payloads, and waiting on peer tables.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nixmesh::mesh::peers::PeerState;

use crate::harness::{wait_until, AgentHandle, Host};

/// Where every agent's substituter listens, inside its own host.
pub const SUBSTITUTER: &str = "http://127.0.0.1:5181";
/// The `[http_cache]` port of upstream hosts.
pub const CACHE_PORT: u16 = 5180;
/// The agents' default mesh port, UDP for QUIC and TCP for bulk.
pub const MESH_PORT: u16 = 5182;
/// Where `tamper_on_the_path`'s proxy listens.
const TAMPER_PORT: u16 = 5190;
/// How long a fresh mesh may take until every agent sees every other.
pub const CONVERGE: Duration = Duration::from_secs(20);

/// A two-derivation closure without nixpkgs, distinct per `tag`: `top`
/// refers to `dep` and holds a directory, an executable and a symlink;
/// `dep` holds `dep_bytes` bytes made by the builder.
pub fn closure_expr(tag: &str, dep_bytes: u64) -> String {
    format!(
        r#"
let
  sh = name: script: derivation {{
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/bin";
  }};
  dep = sh "{tag}-dep" "head -c {dep_bytes} /dev/zero | tr '\\000' 'd' > $out";
in
sh "{tag}-top" ''
  mkdir -p $out/bin
  echo ${{dep}} > $out/dep-path
  printf '#!/bin/sh\necho {tag}\n' > $out/bin/top
  chmod +x $out/bin/top
  ln -s ${{dep}} $out/dep
''
"#
    )
}

/// A file of `size` random bytes (incompressible, different every time)
/// at `dir/name`, for adding to stores.
pub fn random_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let path = dir.join(name);
    let file = std::fs::File::create(&path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    let urandom = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    let copied = std::io::copy(&mut std::io::Read::take(urandom, size), &mut { file })
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    assert_eq!(copied, size, "{}", path.display());
    path
}

/// nix.conf lines for a host whose Nix substitutes from `substituters`
/// (space separated) and trusts `keys`.
pub fn nix_conf(substituters: &str, keys: &[&str]) -> String {
    format!(
        "substituters = {substituters}\ntrusted-public-keys = {}",
        keys.join(" ")
    )
}

/// `signing_key_file = "…"` for an agent config.
pub fn signing(secret_file: &Path) -> String {
    format!(
        "signing_key_file = {}\n",
        toml::Value::String(secret_file.display().to_string())
    )
}

/// An upstream cache host: no mesh, `[http_cache]` on its LAN address,
/// sharing (and signing with `secret_file`) everything.
pub fn upstream_config(host: &Host, secret_file: &Path) -> String {
    format!(
        "{}[share]\nall = true\n[mesh]\nenable = false\n[http_cache]\nenable = true\nlisten = \"{}:{CACHE_PORT}\"\n",
        signing(secret_file),
        host.addr()
    )
}

pub fn cache_url(host: &Host) -> String {
    format!("http://{}:{CACHE_PORT}", host.addr())
}

/// The 32-character hash part of a store path.
pub fn hash_part(store_path: &str) -> &str {
    let base = store_path
        .strip_prefix("/nix/store/")
        .unwrap_or_else(|| panic!("{store_path} is not under /nix/store"));
    &base[..32]
}

/// The NAR bytes of `path`'s closure on `host` (`nix path-info -r`).
pub fn closure_nar_size(host: &Host, path: &str) -> u64 {
    host.nar_size_sum(&["--recursive", path])
}

/// Whether `agent` lists a peer called `name` as alive.
pub fn sees_alive(agent: &AgentHandle, name: &str) -> bool {
    agent
        .peer(name)
        .is_some_and(|p| p.state == PeerState::Alive)
}

/// Waits until each agent lists every other host as alive; returns how
/// long that took.
pub fn wait_all_alive(agents: &[(&Host, &AgentHandle)]) -> Duration {
    wait_until(CONVERGE, "every agent to see every other alive", || {
        agents.iter().all(|(me, agent)| {
            agents
                .iter()
                .filter(|(other, _)| other.name() != me.name())
                .all(|(other, _)| sees_alive(agent, other.name()))
        })
    })
}

/// `nix-store --realise` on `host`; panics unless it succeeds.
pub fn realise(host: &Host, paths: &[&str]) {
    let mut argv = vec!["nix-store", "--realise"];
    argv.extend_from_slice(paths);
    host.run_ok(&argv);
}

/// `nix-store --realise` on `host` that must fail: returns its stderr.
pub fn realise_fails(host: &Host, paths: &[&str]) -> String {
    let mut argv = vec!["nix-store", "--realise"];
    argv.extend_from_slice(paths);
    let out = host.run(&argv);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "on {}: {paths:?} was substituted:\n{stderr}",
        host.name()
    );
    stderr
}

/// Asserts `path` is valid on `host` and its contents match its hash.
pub fn assert_verified(host: &Host, path: &str) {
    assert!(host.has_path(path), "{path} is not on {}", host.name());
    host.run_ok(&["nix-store", "--verify-path", path]);
}

/// Asserts `path` is either absent from `host` or intact: a corrupt valid
/// path must never appear.
pub fn assert_absent_or_intact(host: &Host, path: &str) {
    if host.has_path(path) {
        assert_verified(host, path);
    }
}

/// Adds `files` to `host`'s store in one `nix-store --add`.
pub fn add_paths(host: &Host, files: &[std::path::PathBuf]) -> Vec<String> {
    let mut argv = vec!["nix-store".to_string(), "--add".to_string()];
    argv.extend(files.iter().map(|f| f.display().to_string()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let paths: Vec<String> = host.run_ok(&argv).lines().map(str::to_string).collect();
    assert_eq!(paths.len(), files.len(), "one store path per file");
    paths
}

/// Every one of `paths` is valid on `host` and matches its NarHash.
pub fn assert_all_verified(host: &Host, paths: &[String]) {
    let mut argv = vec!["nix-store", "--check-validity"];
    argv.extend(paths.iter().map(String::as_str));
    host.run_ok(&argv);
    argv[1] = "--verify-path";
    host.run_ok(&argv);
}

/// A host on the path of `host`'s bulk connections: a TCP proxy on it
/// (both IP versions), through which nftables sends TCP to its agent's
/// mesh port, that changes the byte at offset `at` of what a connection
/// carries from the agent to the asker, on the first `times` connections
/// that carry that far. How many bytes it changed.
pub fn tamper_on_the_path(
    host: &Host,
    at: u64,
    times: u64,
) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
    let flipped = flipping_proxy(host, TAMPER_PORT, at, times);
    host.run_ok(&["nft", "add", "table", "inet", "nixmesh_mitm"]);
    host.run_ok(&[
        "nft",
        "add chain inet nixmesh_mitm pre { type nat hook prerouting priority -100 ; }",
    ]);
    host.run_ok(&[
        "nft",
        &format!("add rule inet nixmesh_mitm pre tcp dport {MESH_PORT} redirect to :{TAMPER_PORT}"),
    ]);
    flipped
}

fn flipping_proxy(
    host: &Host,
    port: u16,
    at: u64,
    times: u64,
) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let flipped = Arc::new(AtomicU64::new(0));
    let count = flipped.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let to = format!("127.0.0.1:{MESH_PORT}");
    // The thread lives as long as the test process: the test's namespace
    // goes with the LAN.
    let _proxy = host.in_netns(move || {
        let listener = TcpListener::bind(("::", port)).expect("bind the proxy");
        ready_tx.send(()).expect("ready");
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { continue };
            let Ok(outbound) = TcpStream::connect(&to) else {
                continue;
            };
            let (mut c_in, mut c_out) = (inbound.try_clone().expect("clone"), inbound);
            let (mut h_in, mut h_out) = (outbound.try_clone().expect("clone"), outbound);
            std::thread::spawn(move || std::io::copy(&mut c_in, &mut h_out));
            let count = count.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                let mut seen = 0u64;
                loop {
                    let n = match h_in.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let take_one = |c: u64| (c < times).then_some(c + 1);
                    if (seen..seen + n as u64).contains(&at)
                        && count
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, take_one)
                            .is_ok()
                    {
                        buf[(at - seen) as usize] ^= 0x40;
                    }
                    seen += n as u64;
                    if c_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = c_out.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the proxy listens");
    flipped
}
