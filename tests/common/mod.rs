//! Shared helpers for tests against real Nix, one concern a file: which
//! Nix runs (`nix_under_test`), chroot stores and signing keys (`store`),
//! the `nixmesh` binary run as an agent (`agent_process`, `agent`), a tiny
//! HTTP/1.1 client that can tell a complete body from a cut-off one
//! (`http`), loopback mesh nodes and their config (`mesh_node`), fake peers
//! (`fake_peer`), and a proxy that cuts responses (`cut_proxy`).
#![allow(dead_code)]

pub mod agent;
pub mod agent_process;
pub mod cut_proxy;
pub mod fake_peer;
pub mod http;
pub mod mesh_node;
pub mod nix_under_test;
pub mod store;

use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

// Each test file takes what it needs from one `use common::*`.
#[allow(unused_imports)]
pub use agent::Agent;
#[allow(unused_imports)]
pub use fake_peer::*;
#[allow(unused_imports)]
pub use http::*;
#[allow(unused_imports)]
pub use mesh_node::*;
#[allow(unused_imports)]
pub use store::*;

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
