//! `nixmesh doctor` names each fault of a broken setup, and passes a good one.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn doctor(config: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nixmesh"))
        .args(["doctor", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

/// A cache URL on loopback where nothing listens.
fn closed_upstream() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

#[test]
fn a_broken_setup_gets_each_fault_named() {
    let dir = tempfile::tempdir().unwrap();
    let nix_conf = dir.path().join("nix.conf");
    // An upstream that refuses connections, on loopback: the tests send
    // nothing off this machine.
    std::fs::write(&nix_conf, format!("substituters = {}\n", closed_upstream())).unwrap();
    let office = nix_key("office-1");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "signing_key_file = {:?}\nstate_dir = {:?}\n[store]\nroot = {:?}\nnix_conf = {:?}\n\
             [mesh]\nmdns = false\ninterfaces = [\"nosuch0\"]\n[admin]\nlisten = \"127.0.0.1:{}\"\n",
            office.secret.display().to_string(),
            dir.path().join("state").display().to_string(),
            dir.path().join("empty-root").display().to_string(),
            nix_conf.display().to_string(),
            free_port(),
        ),
    )
    .unwrap();
    let (passed, report) = doctor(&config);
    assert!(!passed, "{report}");
    for fault in [
        "store DB",
        "does not exist",
        "Nix does not use the mesh",
        "http://127.0.0.1:5181 is not in nix.conf's substituters",
        "this host signs with office-1 but its Nix does not trust that key",
        "\"nosuch0\", which does not exist",
        "the agent is not running",
    ] {
        assert!(report.contains(fault), "missing {fault:?} in:\n{report}");
    }
    assert!(report.contains("fix: "), "{report}");
}

#[test]
fn a_store_db_nix_holds_locked_is_a_warning_not_a_permission_fault() {
    let dir = tempfile::tempdir().unwrap();
    let db_dir = dir.path().join("root/nix/var/nix/db");
    std::fs::create_dir_all(&db_dir).unwrap();
    let writer = rusqlite::Connection::open(db_dir.join("db.sqlite")).unwrap();
    writer
        .execute_batch("create table ValidPaths (id integer primary key, path text)")
        .unwrap();
    let nix_conf = dir.path().join("nix.conf");
    std::fs::write(&nix_conf, format!("substituters = {}\n", closed_upstream())).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[store]\nroot = {:?}\nnix_conf = {:?}\n[mesh]\nmdns = false\n\
             [admin]\nlisten = \"127.0.0.1:{}\"\n",
            dir.path().join("state").display().to_string(),
            dir.path().join("root").display().to_string(),
            nix_conf.display().to_string(),
            free_port(),
        ),
    )
    .unwrap();
    let db_line = |report: &str| {
        report
            .lines()
            .find(|l| l.contains("store DB"))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no store DB line in:\n{report}"))
    };
    // A nix-daemon in a long write holds the DB.
    writer.execute_batch("begin exclusive").unwrap();
    let (_, report) = doctor(&config);
    let line = db_line(&report);
    assert!(
        line.starts_with("warn") && line.contains("is locked just now"),
        "{report}"
    );
    assert!(!report.contains("run the agent as root"), "{report}");
    writer.execute_batch("commit").unwrap();
    let (_, report) = doctor(&config);
    assert!(db_line(&report).starts_with("ok"), "{report}");
}

#[test]
fn a_good_setup_passes_and_a_dead_peer_is_named() {
    let office = nix_key("office-1");
    let settings = NodeSettings {
        top: format!(
            "signing_key_file = {:?}",
            office.secret.display().to_string()
        ),
        ..Default::default()
    };
    let a = MeshNode::new("a", &settings);
    let b = MeshNode::new("b", &NodeSettings::default());
    let nix_conf = a.store.root().join("nix.conf");
    std::fs::write(
        &nix_conf,
        format!(
            "substituters = http://127.0.0.1:{} {}\ntrusted-public-keys = {}\n",
            a.substituter,
            closed_upstream(),
            office.public
        ),
    )
    .unwrap();
    let with_conf = |s: &NodeSettings| NodeSettings {
        top: format!("{}\n", s.top),
        ..s.clone()
    };
    a.write_config(&with_conf(&settings), &[&b]);
    // nix_conf is set in [store] by write_config; point it at ours.
    let text = std::fs::read_to_string(&a.config_path).unwrap().replace(
        "nix_conf = \"/nonexistent/nix.conf\"",
        &format!("nix_conf = {:?}", nix_conf.display().to_string()),
    );
    std::fs::write(&a.config_path, text).unwrap();
    b.write_config(&NodeSettings::default(), &[&a]);
    let _a = a.start();
    let mut b_agent = Some(b.start());
    wait_for(Duration::from_secs(10), "a sees b", || {
        a.peer_state("b").as_deref() == Some("alive")
    });
    let (passed, report) = doctor(&a.config_path);
    assert!(passed, "{report}");
    assert!(report.contains("0 problem(s)"), "{report}");
    assert!(report.contains("Nix asks the mesh first"), "{report}");
    assert!(report.contains("1 peer(s) reachable over QUIC"), "{report}");
    // The UDP buffer limits are judged (ok or warn, as this kernel has them).
    assert!(report.contains("8 MiB buffers"), "{report}");

    // b dies without a word: doctor names it.
    let pid = b_agent.as_ref().unwrap().pid();
    run_ok(Command::new("kill").args(["-KILL", &pid.to_string()]));
    drop(b_agent.take());
    wait_for(Duration::from_secs(8), "b gone", || {
        a.peer_state("b").as_deref() == Some("gone")
    });
    let (passed, report) = doctor(&a.config_path);
    assert!(!passed, "{report}");
    assert!(
        report.contains("peers not reachable over QUIC: b (127.0.0.1:"),
        "{report}"
    );
}
