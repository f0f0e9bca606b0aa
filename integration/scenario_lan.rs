//! The harness keeps its promises: hosts share one subnet and reach nothing
//! else, each has its own name and store, links can be shaped, agents stop
//! and die on request, and a Lan leaves nothing behind, even when the test
//! process is killed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{AgentHandle, Host, Lan};

const PORT: u16 = 5180;

/// An agent on `host` serving its store to the LAN, sharing everything.
fn cache_agent(host: &Host) -> AgentHandle {
    host.start_agent(&format!(
        "[share]\nall = true\n[http_cache]\nenable = true\nlisten = \"{}:{PORT}\"\n",
        host.addr()
    ))
}

fn machine_names(lan_name: &str) -> Vec<String> {
    let mut names = Vec::new();
    for args in [&["netns", "list"][..], &["-o", "link", "show"][..]] {
        let out = Command::new("ip").args(args).output().expect("ip runs");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.contains(lan_name) {
                names.push(line.to_string());
            }
        }
    }
    names
}

fn run_dir(lan_name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join("nixmesh-lan").join(lan_name)
}

#[test]
fn hosts_share_one_subnet_and_reach_nothing_else() {
    let lan = Lan::new(2);
    let (a, b) = (lan.host(0), lan.host(1));
    assert_ne!(a.addr(), b.addr());
    for host in lan.hosts() {
        let hostname = host.run_ok(&["cat", "/proc/sys/kernel/hostname"]);
        assert_eq!(hostname.trim(), host.name());
        let addrs = host.run_ok(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        assert!(addrs.contains(&format!("{}/24", host.addr())), "{addrs}");
        let mdns = host.run_ok(&["ip", "route", "get", "224.0.0.251"]);
        assert!(mdns.contains("dev eth0"), "{mdns}");
        // A route lookup only: no packet leaves.
        let out = host.run(&["ip", "route", "get", "198.51.100.1"]);
        assert!(!out.status.success(), "{} has a route out", host.name());
    }

    // A real client on b reaches a real agent on a, across the bridge.
    let mut agent = cache_agent(a);
    b.run_ok(&[
        "nix",
        "store",
        "ping",
        "--store",
        &format!("http://{}:{PORT}", a.addr()),
    ]);
    assert!(agent.stop().success(), "{}", agent.log());
    let mut again = cache_agent(a);
    again.kill();
    assert!(!again.is_running());
}

#[test]
fn each_host_has_its_own_store() {
    let lan = Lan::new(2);
    let (a, b) = (lan.host(0), lan.host(1));
    let path = a.add_file("mine.txt", lan.name().as_bytes());
    assert!(a.has_path(&path));
    assert!(!b.has_path(&path));
    assert!(
        !std::path::Path::new(&path).exists(),
        "{path} is in the machine's /nix"
    );
    assert!(a
        .dir()
        .join("nix/store")
        .join(&path["/nix/store/".len()..])
        .exists());
}

#[test]
fn a_shaped_link_is_slow() {
    let lan = Lan::new(2);
    let (a, b) = (lan.host(0), lan.host(1));
    // 1 MiB over 8 Mbit/s: about a second.
    let path = a.add_file("big.bin", &vec![7u8; 1 << 20]);
    let _agent = cache_agent(a);
    b.configure_nix(&format!("substituters = http://{}:{PORT}", a.addr()));
    a.shape(8_000_000);
    let started = Instant::now();
    b.run_ok(&["nix-store", "--realise", &path]);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "took only {took:?}");
}

/// Dropping a Lan removes its processes, namespaces, links and files.
#[test]
fn a_dropped_lan_leaves_nothing_behind() {
    let lan = Lan::new(1);
    let name = lan.name().to_string();
    let _agent = lan.host(0).start_agent("");
    assert!(!machine_names(&name).is_empty());
    drop(lan);
    assert_eq!(machine_names(&name), Vec::<String>::new());
    assert!(!run_dir(&name).exists());
}

/// The child half of the next test: holds a Lan until it is killed.
#[test]
#[ignore = "run by a_killed_test_process_leaves_nothing_behind"]
fn holds_a_lan_until_killed() {
    if std::env::var_os("NIXMESH_LAN_HOLD").is_none() {
        return;
    }
    let lan = Lan::new(1);
    println!("lan {}", lan.name());
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[test]
fn a_killed_test_process_leaves_nothing_behind() {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "scenario_lan::holds_a_lan_until_killed",
            "--ignored",
            "--nocapture",
        ])
        .env("NIXMESH_LAN_HOLD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("test binary runs");
    let mut name = None;
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line.expect("child stdout");
        if let Some(n) = line.strip_prefix("lan ") {
            name = Some(n.to_string());
            break;
        }
    }
    let name = name.expect("the child made a Lan");
    assert!(!machine_names(&name).is_empty());
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");

    let deadline = Instant::now() + Duration::from_secs(20);
    while !machine_names(&name).is_empty() || run_dir(&name).exists() {
        assert!(
            Instant::now() < deadline,
            "{name} is still here: {:?}",
            machine_names(&name)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
