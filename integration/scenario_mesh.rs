//! The mesh on a real LAN: agents with default settings find each other by
//! mDNS multicast alone, notice a clean stop at once and a crash within
//! seconds; strangers (wrong mesh secret, key not in `allowed_peers`) get
//! nothing.

use std::time::{Duration, Instant};

use nixmesh::mesh::peers::PeerState;

use crate::harness::{wait_until, AgentHandle, Host, Lan};
use crate::office::*;

/// Whether `agent` no longer uses the peer called `name`: unlisted, or
/// listed as gone.
fn sees_gone(agent: &AgentHandle, name: &str) -> bool {
    agent.peer(name).is_none_or(|p| p.state == PeerState::Gone)
}

#[test]
fn agents_find_each_other_by_mdns_and_notice_stops_and_crashes() {
    let lan = Lan::new(4);
    let hosts: Vec<&Host> = lan.hosts().iter().collect();
    // No config at all: mDNS on, no static peers, names from host names.
    let mut agents: Vec<AgentHandle> = hosts.iter().map(|h| h.start_agent("")).collect();
    let pairs: Vec<(&Host, &AgentHandle)> = hosts.iter().copied().zip(agents.iter()).collect();
    let took = wait_all_alive(&pairs);
    eprintln!("discovery: 4 hosts all alive to each other after {took:?}");
    // A peer whose connection came in before its own announcement did is
    // listed as learned from that connection until mDNS names it too; every
    // host announces, so every peer must end up known through mDNS.
    let by_mdns = wait_until(Duration::from_secs(5), "every peer seen by mDNS", || {
        pairs.iter().all(|(_, agent)| {
            let peers = agent.peers();
            peers.len() == 3
                && peers
                    .iter()
                    .all(|p| p.source == nixmesh::mesh::peers::PeerSource::Mdns)
        })
    });
    eprintln!("discovery: every peer known through mDNS after another {by_mdns:?}");
    for (host, agent) in &pairs {
        let peers = agent.peers();
        assert_eq!(peers.len(), 3, "{}: {peers:#?}", host.name());
        for p in &peers {
            assert_eq!(
                p.source,
                nixmesh::mesh::peers::PeerSource::Mdns,
                "{}: {p:#?}",
                host.name()
            );
            assert!(p.rtt_ms.is_some(), "{}: {p:#?}", host.name());
            let other = hosts.iter().find(|h| h.name() == p.name).expect("a host");
            assert!(
                p.addrs.contains(&format!("{}:5182", other.addr())),
                "{}: {p:#?}",
                host.name()
            );
        }
    }

    // h3 stops cleanly: it says goodbye, and the others drop it at once.
    let mut stopped = agents.pop().expect("h3");
    let sigterm = Instant::now();
    assert!(stopped.stop().success(), "{}", stopped.log());
    let exited = sigterm.elapsed();
    wait_until(Duration::from_secs(5), "h3 gone after a clean stop", || {
        agents[..3].iter().all(|a| sees_gone(a, "h3"))
    });
    let noticed = sigterm.elapsed();
    eprintln!("discovery: clean stop: agent exited {exited:?} after SIGTERM, peers dropped it by {noticed:?}");
    assert!(
        noticed <= Duration::from_millis(1500),
        "a clean stop took {noticed:?} to notice"
    );

    // h2 is killed: gone within 5 s, and the rest stay alive.
    let started = Instant::now();
    agents[2].kill();
    let noticed = wait_until(Duration::from_secs(8), "h2 gone after SIGKILL", || {
        agents[..2].iter().all(|a| sees_gone(a, "h2"))
    });
    eprintln!("discovery: SIGKILL noticed after {noticed:?}");
    assert!(
        started.elapsed() <= Duration::from_secs(5),
        "a crash took {:?} to notice",
        started.elapsed()
    );
    assert!(sees_alive(&agents[0], "h1"));
    assert!(sees_alive(&agents[1], "h0"));
    // And it stays gone: no stale record brings it back.
    std::thread::sleep(Duration::from_secs(2));
    for a in &agents[..2] {
        assert!(sees_gone(a, "h2") && sees_gone(a, "h3"), "{:#?}", a.peers());
    }
}

#[test]
fn strangers_get_nothing_from_the_mesh() {
    let lan = Lan::new(4);
    let (a, b, x, y) = (lan.host(0), lan.host(1), lan.host(2), lan.host(3));
    let secrets = lan.host(0).dir().join("secrets");
    std::fs::create_dir_all(&secrets).expect("mkdir");
    let (office, other) = (secrets.join("office"), secrets.join("other"));
    std::fs::write(&office, "the office mesh secret\n").expect("write");
    std::fs::write(&other, "somebody else's secret\n").expect("write");
    let secret_line = |file: &std::path::Path| {
        format!(
            "secret_file = {}\n",
            toml::Value::String(file.display().to_string())
        )
    };
    let (key_a, key_b) = (a.node_key(), b.node_key());

    // A and B: the office mesh, admitting only each other. A shares
    // everything, and every Nix here would take anything, unsigned: the
    // mesh's admission is all that stands between a stranger and A's store.
    let path = a.build(&closure_expr("secret", 1024));
    for host in [b, x, y] {
        host.configure_nix(&format!(
            "substituters = {SUBSTITUTER}\nrequire-sigs = false"
        ));
    }
    let office_mesh = format!(
        "[mesh]\n{}allowed_peers = [\"{key_a}\", \"{key_b}\"]\n",
        secret_line(&office)
    );
    let agent_a = a.start_agent(&format!("[share]\nall = true\n{office_mesh}"));
    let agent_b = b.start_agent(&office_mesh);
    // X: the wrong secret, but it knows where A and B are and their keys.
    let agent_x = x.start_agent(&format!(
        "[mesh]\n{}static_peers = [{{ address = \"{}:5182\", key = \"{key_a}\" }}, {{ address = \"{}:5182\", key = \"{key_b}\" }}]\n",
        secret_line(&other),
        a.addr(),
        b.addr()
    ));
    // Y: the right secret, found by mDNS, but its key is not on the list.
    let agent_y = y.start_agent(&format!("[mesh]\n{}", secret_line(&office)));
    wait_all_alive(&[(a, &agent_a), (b, &agent_b)]);

    // The mesh works for its members.
    realise(b, &[&path]);
    assert_verified(b, &path);

    // Give the strangers several seconds of tries, watching all along.
    let watch_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < watch_until {
        for (agent, who) in [(&agent_a, "h0"), (&agent_b, "h1")] {
            for stranger in ["h2", "h3"] {
                assert!(
                    !sees_alive(agent, stranger),
                    "{who} admitted {stranger}: {:#?}",
                    agent.peers()
                );
            }
        }
        for (agent, who) in [(&agent_x, "h2"), (&agent_y, "h3")] {
            let alive: Vec<_> = agent
                .peers()
                .into_iter()
                .filter(|p| p.state == PeerState::Alive)
                .collect();
            assert!(alive.is_empty(), "{who} reached {alive:#?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // They did try: A refused them at the handshake.
    assert!(
        agent_a.log().contains("refused a peer at the handshake"),
        "{}",
        agent_a.log()
    );
    assert!(!agent_y.peers().is_empty(), "Y did not even find A and B");

    for stranger in [x, y] {
        let narinfo = format!("{SUBSTITUTER}/{}.narinfo", hash_part(&path));
        assert_eq!(stranger.http_status(&narinfo).0, 404, "{}", stranger.name());
        realise_fails(stranger, &[&path]);
        assert!(
            !stranger.has_path(&path),
            "{path} reached {}",
            stranger.name()
        );
    }
    let served_strangers: u64 = agent_a
        .peers()
        .iter()
        .filter(|p| p.name != "h1")
        .map(|p| p.counters.requests_served)
        .sum();
    assert_eq!(served_strangers, 0, "A answered a stranger");
}
