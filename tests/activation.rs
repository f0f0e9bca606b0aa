//! Socket activation: the substituter's listening socket outlives the agent,
//! as under systemd, so Nix clients that arrive while the agent restarts
//! wait in the socket's queue instead of meeting a refused connection.

mod common;

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// Starts the agent with `listener` passed as fd 3 under the LISTEN_FDS
/// protocol, like systemd does for a socket unit.
fn start_activated(node: &MeshNode, listener: &TcpListener, log: &std::path::Path) -> Child {
    let fd = listener.as_raw_fd();
    // Let the fd survive exec; the shell then moves it to 3.
    // SAFETY: fcntl on an fd this process owns.
    #[allow(unsafe_code)]
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
    }
    let move_fd = if fd == 3 {
        String::new()
    } else {
        format!("exec 3<&{fd} {fd}<&-; ")
    };
    let script = format!(
        "{move_fd}LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=substituter exec \"$0\" agent --config \"$1\""
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_nixmesh"))
        .arg(&node.config_path)
        .env("RUST_LOG", "nixmesh=debug,info")
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .unwrap()
}

#[test]
fn nix_never_fails_while_the_agent_restarts() {
    let holder_settings = NodeSettings {
        share: "all = true".into(),
        ..Default::default()
    };
    let a = MeshNode::new("a", &holder_settings);
    let b = MeshNode::new("b", &NodeSettings::default());
    a.write_config(&holder_settings, &[&b]);
    b.write_config(&NodeSettings::default(), &[&a]);
    let src = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for i in 0..40 {
        let f = src.path().join(format!("f{i}"));
        std::fs::write(&f, format!("file {i}\n")).unwrap();
        paths.push(a.store.add(&f));
    }
    let _a = a.start();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let sub = listener.local_addr().unwrap();
    let log = b.store.root().join("b.log");
    let mut agent = start_activated(&b, &listener, &log);

    let done = Arc::new(AtomicBool::new(false));
    let client = {
        let done = done.clone();
        let paths = paths.clone();
        let log = log.clone();
        std::thread::spawn(move || {
            let mut runs = 0;
            for p in &paths {
                // A fresh client store each time: every run substitutes.
                let store = TestStore::new();
                let out = store.substitute(&format!("http://{sub}"), None, &[p]);
                assert!(
                    out.status.success(),
                    "run {runs} for {p} failed: {}\nagent log:\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                runs += 1;
            }
            done.store(true, Ordering::SeqCst);
            runs
        })
    };
    let mut restarts = 0;
    while !done.load(Ordering::SeqCst) && restarts < 4 {
        std::thread::sleep(Duration::from_millis(700));
        run_ok(Command::new("kill").args(["-TERM", &agent.id().to_string()]));
        agent.wait().unwrap();
        agent = start_activated(&b, &listener, &log);
        restarts += 1;
    }
    let runs = client.join().unwrap_or_else(|_| {
        panic!(
            "a client run failed; agent log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(runs, paths.len());
    assert!(
        restarts >= 2,
        "only {restarts} restarts happened during the runs"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("using a socket passed by the service manager"),
        "{text}"
    );
}
