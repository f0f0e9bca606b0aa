//! Several agents on loopback with static peers: the peer table, admission,
//! the wire protocol's handling of bad frames, and real Nix substituting
//! through the localhost substituter.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use nixmesh::mesh::identity::MeshSecret;
use nixmesh::mesh::protocol::{code, Request, Response};
use nixmesh::mesh::transport::{self, Admission, TlsIdentity};
use nixmesh::nix::SecretKey;

/// Starts `nodes` as a full mesh of static peers.
fn full_mesh(nodes: &[&MeshNode], settings: &[NodeSettings]) -> Vec<Agent> {
    for (i, n) in nodes.iter().enumerate() {
        let others: Vec<&MeshNode> = nodes.iter().copied().filter(|o| o.name != n.name).collect();
        n.write_config(&settings[i], &others);
    }
    nodes.iter().map(|n| n.start()).collect()
}

fn all_alive(node: &MeshNode, names: &[&str]) -> bool {
    names
        .iter()
        .all(|name| node.peer_state(name).as_deref() == Some("alive"))
}

#[test]
fn peers_appear_and_leave_as_they_should() {
    let s = NodeSettings::default();
    let (a, b, c) = (
        MeshNode::new("a", &s),
        MeshNode::new("b", &s),
        MeshNode::new("c", &s),
    );
    let mut agents = full_mesh(&[&a, &b, &c], &[s.clone(), s.clone(), s.clone()]);
    wait_for(Duration::from_secs(10), "all three alive", || {
        all_alive(&a, &["b", "c"]) && all_alive(&b, &["a", "c"]) && all_alive(&c, &["a", "b"])
    });
    let table = run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_nixmesh"))
            .args(["peers", "--admin"])
            .arg(a.admin_addr().to_string()),
    );
    let text = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(text.starts_with("NAME"), "{text}");
    assert_eq!(text.lines().count(), 3, "{text}");
    // One gauge family by state; per-peer counters labelled by name and key.
    let metrics = get(a.admin_addr(), "/metrics").text();
    assert!(
        metrics.contains("nixmesh_peers{state=\"alive\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nixmesh_peers{state=\"gone\"} 0\n"),
        "{metrics}"
    );
    let fp_b = a.peers().iter().find(|p| p["name"] == "b").unwrap()["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    let errors_b = format!("nixmesh_peer_errors_total{{peer=\"b\",key=\"{fp_b}\"}} 0\n");
    assert!(metrics.contains(&errors_b), "{metrics}");

    // A clean stop is noticed at once.
    let stopped = agents.remove(0);
    let pid = stopped.pid();
    run_ok(std::process::Command::new("kill").args(["-TERM", &pid.to_string()]));
    let took = wait_for(Duration::from_secs(3), "a gone after a clean stop", || {
        b.peer_state("a").as_deref() == Some("gone") && c.peer_state("a").as_deref() == Some("gone")
    });
    assert!(
        took < Duration::from_millis(1500),
        "clean stop took {took:?} to notice"
    );
    // And the stopped agent knew every task it had started was over.
    wait_for(Duration::from_secs(12), "a's tasks all ended", || {
        stopped.log_text().contains("every task has ended")
    });
    drop(stopped);

    // A crash is noticed within 5 s.
    let crashed = agents.remove(0);
    run_ok(std::process::Command::new("kill").args(["-KILL", &crashed.pid().to_string()]));
    let start = Instant::now();
    wait_for(Duration::from_secs(6), "b gone after SIGKILL", || {
        c.peer_state("b").as_deref() == Some("gone")
    });
    assert!(
        start.elapsed() <= Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    drop(crashed);
}

#[test]
fn strangers_get_nothing() {
    let secret_dir = tempfile::tempdir().unwrap();
    let (office, other) = (
        secret_dir.path().join("office"),
        secret_dir.path().join("other"),
    );
    std::fs::write(&office, "office secret\n").unwrap();
    std::fs::write(&other, "someone else\n").unwrap();
    let with_secret = |p: &std::path::Path| NodeSettings {
        mesh: format!("secret_file = {:?}", p.display().to_string()),
        share: "all = true".into(),
        ..Default::default()
    };
    let a = MeshNode::new("a", &with_secret(&office));
    let b = MeshNode::new("b", &with_secret(&office));
    let stranger = MeshNode::new("stranger", &with_secret(&other));
    let outsider = MeshNode::new("outsider", &with_secret(&office));
    // a admits only b, by key; the outsider knows the secret but is not listed.
    let mut a_settings = with_secret(&office);
    a_settings
        .mesh
        .push_str(&format!("\nallowed_peers = [{:?}]", b.key));
    let _agents = full_mesh(
        &[&a, &b, &stranger, &outsider],
        &[
            a_settings,
            with_secret(&office),
            with_secret(&other),
            with_secret(&office),
        ],
    );
    wait_for(
        Duration::from_secs(10),
        "a and b alive to each other",
        || all_alive(&a, &["b"]) && all_alive(&b, &["a"]),
    );
    // Give the strangers time for several tries.
    std::thread::sleep(Duration::from_secs(3));
    for (node, refused_by) in [(&stranger, "a"), (&stranger, "b"), (&outsider, "a")] {
        let state = node.peer_state(refused_by);
        assert_ne!(
            state.as_deref(),
            Some("alive"),
            "{} reached {refused_by}",
            node.name
        );
    }
    assert_eq!(
        outsider.peer_state("b").as_deref(),
        Some("alive"),
        "same secret, b has no list"
    );
    let alive: Vec<String> = a
        .peers()
        .iter()
        .filter(|p| p["state"] == "alive")
        .map(|p| p["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(alive, ["b"], "a admits only b");
    let log = _agents[0].log_text();
    assert!(log.contains("refused a peer at the handshake"), "{log}");
}

/// A raw QUIC client with its own identity, for speaking bad protocol.
async fn raw_client(target: &MeshNode) -> quinn::Connection {
    let key = SecretKey::generate("raw").unwrap();
    let id = TlsIdentity::new(&key, &MeshSecret::default()).unwrap();
    let node = nixmesh::mesh::identity::NodeId::parse(&target.key).unwrap();
    let config = transport::client_config(&id, Admission::default(), node).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", target.quic).parse().unwrap();
    endpoint
        .connect_with(config, addr, transport::SERVER_NAME)
        .unwrap()
        .await
        .unwrap()
}

/// Sends `frame` raw on a new stream; returns the reset code, or the
/// decoded answer.
async fn send_raw(conn: &quinn::Connection, frame: &[u8]) -> Result<Response, u32> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(frame).await;
    let _ = send.finish();
    let mut header = [0u8; 4];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code))) => {
            return Err(code.into_inner() as u32)
        }
        Err(e) => panic!("unexpected read error {e}"),
    }
    let len = u32::from_be_bytes(header) as usize;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.unwrap();
    Ok(Response::decode(&body).unwrap())
}

#[test]
fn bad_frames_reset_the_stream_and_nothing_else() {
    let node = MeshNode::new("a", &NodeSettings::default());
    node.write_config(&NodeSettings::default(), &[]);
    let agent = node.start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = raw_client(&node).await;
        let ping = Request::Ping { nonce: 5 }.encode();
        assert!(matches!(
            send_raw(&conn, &ping).await,
            Ok(Response::Pong { nonce: 5, .. })
        ));
        let oversized = (64u32 << 20).to_be_bytes();
        // Under the old shared 2 MiB limit, over the request limit.
        let big_request = (100u32 << 10).to_be_bytes();
        let unknown = [0, 0, 0, 1, 200];
        let truncated = [0, 0, 0, 9, 1, 0, 0];
        let mut bad_hash = vec![0, 0, 0, 33, 2];
        bad_hash.extend_from_slice(&[b'e'; 32]);
        let mut trailing = Request::Ping { nonce: 1 }.encode();
        trailing[3] += 1;
        trailing.push(0);
        let zero = [0, 0, 0, 0];
        let cases: Vec<(&[u8], u32)> = vec![
            (&oversized, code::TOO_LARGE),
            (&big_request, code::TOO_LARGE),
            (&unknown, code::UNKNOWN_KIND),
            (&truncated, code::MALFORMED),
            (&bad_hash, code::MALFORMED),
            (&trailing, code::MALFORMED),
            (&zero, code::MALFORMED),
        ];
        for (frame, want) in &cases {
            assert_eq!(
                send_raw(&conn, frame).await.err(),
                Some(*want),
                "frame {frame:?}"
            );
        }
        // The connection and the agent are still fine.
        assert!(matches!(
            send_raw(&conn, &ping).await,
            Ok(Response::Pong { nonce: 5, .. })
        ));
        assert!(conn.close_reason().is_none());
        // A NAR from an offset past its end is a clear error, not a hang.
        let missing = Request::PathInfo {
            hash: nixmesh::nix::HashPart::parse("00000000000000000000000000000000").unwrap(),
        };
        assert_eq!(
            send_raw(&conn, &missing.encode()).await,
            Ok(Response::NotFound)
        );
    });
    let peers = node.peers();
    let errors: u64 = peers.iter().map(|p| p["errors"].as_u64().unwrap()).sum();
    assert_eq!(errors, 7, "bad frames counted against the peer: {peers:?}");
    drop(agent);
}

/// An office key; settings for holders that sign with it and share what it
/// signed, and for a client whose substituter trusts it.
fn office_settings() -> (NixKey, NodeSettings, NodeSettings) {
    let office = nix_key("office-1");
    let trusted = format!("trusted_keys = [{:?}]", office.public);
    let holder = NodeSettings {
        top: format!(
            "signing_key_file = {:?}",
            office.secret.display().to_string()
        ),
        share: trusted.clone(),
        ..Default::default()
    };
    let client = NodeSettings {
        substituter: trusted,
        ..Default::default()
    };
    (office, holder, client)
}

/// Two agents of one office: `a` holds `files` (name, bytes), each signed
/// with the office key; `b` trusts that key; both run and `b` sees `a`.
struct OfficePair {
    office: NixKey,
    a: MeshNode,
    b: MeshNode,
    agents: Vec<Agent>,
    /// The store paths of `files`, in order.
    paths: Vec<String>,
}

fn office_pair(files: &[(&str, &[u8])]) -> OfficePair {
    let (office, holder_settings, client_settings) = office_settings();
    let a = MeshNode::new("a", &holder_settings);
    let b = MeshNode::new("b", &client_settings);
    let src = tempfile::tempdir().unwrap();
    let paths = files
        .iter()
        .map(|(name, bytes)| {
            let file = src.path().join(name);
            std::fs::write(&file, bytes).unwrap();
            let path = a.store.add(&file);
            a.store.sign(&office.secret, &path);
            path
        })
        .collect();
    let agents = full_mesh(&[&a, &b], &[holder_settings, client_settings]);
    wait_for(Duration::from_secs(10), "b sees a", || {
        all_alive(&b, &["a"])
    });
    OfficePair {
        office,
        a,
        b,
        agents,
        paths,
    }
}

#[test]
fn nix_substitutes_a_closure_spread_over_two_peers() {
    let (office, holder_settings, client_settings) = office_settings();
    let a = MeshNode::new("a", &holder_settings);
    let b = MeshNode::new("b", &client_settings);
    let c = MeshNode::new("c", &holder_settings);
    // a holds a file signed by the office key; c built a closure.
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("doc.txt"), "from a\n").unwrap();
    let doc = a.store.add(&src.path().join("doc.txt"));
    a.store.sign(&office.secret, &doc);
    let top = c.store.build(
        r#"
let
  sh = args: { system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/bin"; args = [ "-c" args ]; };
  dep = derivation (sh "echo dep > $out" // { name = "dep"; });
in derivation (sh "mkdir $out; echo ${dep} > $out/ref" // { name = "top"; })
"#,
    );
    let dep = c.store.path_info_json(&top)["references"][0]
        .as_str()
        .unwrap()
        .to_string();
    let agents = full_mesh(
        &[&a, &b, &c],
        &[
            holder_settings.clone(),
            client_settings.clone(),
            holder_settings.clone(),
        ],
    );
    wait_for(Duration::from_secs(10), "b sees a and c", || {
        all_alive(&b, &["a", "c"])
    });

    let sub = b.substituter_addr();
    let info = get(sub, "/nix-cache-info").text();
    assert!(info.contains("Priority: 30"), "{info}");
    let started = Instant::now();
    let out = b.store.substitute(
        &format!("http://{sub}"),
        Some(&office.public),
        &[&doc, &top],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("substituted in {:?}", started.elapsed());
    for p in [&doc, &top, &dep] {
        assert!(b.store.is_valid(p), "{p} not in b's store");
        run_ok(b.store.cmd("nix-store").args(["--verify-path", p]));
    }
    // The log names who served what.
    let log = agents[1].log_text();
    assert!(
        log.contains(&format!("path={doc}")) && log.contains("substituted"),
        "{log}"
    );
    // `nixmesh why` names the holder.
    let why = run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_nixmesh"))
            .args(["why", "--admin"])
            .arg(b.admin_addr().to_string())
            .arg(&top),
    );
    let why = String::from_utf8_lossy(&why.stdout).to_string();
    assert!(
        why.lines()
            .any(|l| l.starts_with("c ") && l.contains("would win")),
        "{why}"
    );
    assert!(
        why.lines()
            .any(|l| l.starts_with("a ") && l.contains("does not have it")),
        "{why}"
    );
    let metrics = get(b.admin_addr(), "/metrics").text();
    assert!(
        metrics.contains("nixmesh_nar_completed_total 3"),
        "{metrics}"
    );
}

#[test]
fn unknown_paths_are_a_quick_404_and_nix_moves_on() {
    let s = NodeSettings::default();
    let a = MeshNode::new("a", &s);
    let b = MeshNode::new("b", &s);
    let _agents = full_mesh(&[&a, &b], &[s.clone(), s.clone()]);
    wait_for(Duration::from_secs(10), "b sees a", || {
        all_alive(&b, &["a"])
    });
    let started = Instant::now();
    let reply = get(
        b.substituter_addr(),
        "/00000000000000000000000000000000.narinfo",
    );
    assert_eq!(reply.status, 404);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    // A path only a plain cache has: Nix asks the mesh, gets 404, moves on.
    let upstream = TestStore::new();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("up.txt"), "upstream only\n").unwrap();
    let path = upstream.add(&src.path().join("up.txt"));
    let port = free_port();
    let up_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let up_config = format!(
        "state_dir = {:?}\n[store]\nroot = {:?}\n[share]\nall = true\n[mesh]\nenable = false\n\
         [admin]\nlisten = \"127.0.0.1:{}\"\n[http_cache]\nenable = true\nlisten = \"{up_addr}\"\n",
        upstream.root().join("state").display().to_string(),
        upstream.root().display().to_string(),
        free_port(),
    );
    let _up = Agent::start(&up_config, up_addr);
    let out = b.store.substitute(
        &format!("http://{} http://{up_addr}", b.substituter_addr()),
        None,
        &[&path],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(b.store.is_valid(&path));
}

/// The value of the unlabelled metric `name` on `node`'s admin API.
fn metric(node: &MeshNode, name: &str) -> u64 {
    let text = get(node.admin_addr(), "/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[test]
fn small_nars_are_fetched_ahead_and_outlive_their_holder() {
    // One NAR small enough to fetch ahead, one too big for it.
    let big_len = (nixmesh::fetch::prefetch::MAX_NAR + 1) as usize;
    // Every field bound: one left to `..` would be dropped here, and with
    // it an agent or a store.
    let OfficePair {
        office,
        a: _a,
        b,
        mut agents,
        paths,
    } = office_pair(&[
        ("small.txt", b"fetched ahead\n"),
        ("big.bin", &vec![7u8; big_len]),
    ]);
    let (small, big) = (&paths[0], &paths[1]);

    // Nix asks for narinfos first; b fetches the small NAR right away.
    for path in [&small, &big] {
        let reply = get(
            b.substituter_addr(),
            &format!("/{}.narinfo", hash_part(path)),
        );
        assert_eq!(reply.status, 200, "{path}");
    }
    wait_for(
        Duration::from_secs(10),
        "the small NAR in b's memory",
        || metric(&b, "nixmesh_prefetch_held_bytes") > 0,
    );
    assert_eq!(metric(&b, "nixmesh_prefetch_started_total"), 1);

    // The only holder dies. What b fetched ahead still reaches Nix, whole
    // and verified; the big NAR, never fetched, cannot.
    drop(agents.remove(0));
    let out = b.store.substitute(
        &format!("http://{}", b.substituter_addr()),
        Some(&office.public),
        &[small],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run_ok(b.store.cmd("nix-store").args(["--verify-path", small]));
    assert_eq!(metric(&b, "nixmesh_prefetch_served_total"), 1);
    assert_eq!(metric(&b, "nixmesh_prefetch_held_bytes"), 0);
    let log = agents[0].log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("substituted") && l.contains(&format!("path={small}"))),
        "{log}"
    );
    let out = b.store.substitute(
        &format!("http://{}", b.substituter_addr()),
        Some(&office.public),
        &[big],
    );
    assert!(!out.status.success(), "the big NAR came from nowhere");
    assert!(!b.store.is_valid(big));
}

/// Through the substituter, a NAR relayed from a peer and one fetched ahead
/// answer `Range` alike; the relay still checks every byte.
#[test]
fn the_substituter_answers_byte_ranges() {
    let small_bytes: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
    let big_len = (nixmesh::fetch::prefetch::MAX_NAR + 1) as usize;
    let big_bytes: Vec<u8> = (0..big_len as u32).map(|i| (i * 13 % 241) as u8).collect();
    let OfficePair {
        office: _office,
        a,
        b,
        agents: _agents,
        paths,
    } = office_pair(&[("small.bin", &small_bytes), ("big.bin", &big_bytes)]);
    let (small, big) = (&paths[0], &paths[1]);
    for path in [big, small] {
        let reply = get(
            b.substituter_addr(),
            &format!("/{}.narinfo", hash_part(path)),
        );
        assert_eq!(reply.status, 200, "{path}");
        let info = nixmesh::nix::NarInfo::parse("/nix/store", &reply.text()).unwrap();
        let url = format!("/{}", info.url);
        let nar = a.store.dump(path);
        if path == small {
            // Its first request takes the copy fetched ahead.
            wait_for(
                Duration::from_secs(10),
                "the small NAR fetched ahead",
                || metric(&b, "nixmesh_prefetch_held_bytes") > 0,
            );
            let r = http_with(
                b.substituter_addr(),
                "GET",
                &url,
                &[("Range", "bytes=100-")],
            );
            assert_eq!(r.status, 206);
            assert!(r.complete && r.body == nar[100..]);
            assert_eq!(metric(&b, "nixmesh_prefetch_served_total"), 1);
        }
        assert_nar_ranges(b.substituter_addr(), &url, &nar);
    }
    assert_eq!(metric(&b, "nixmesh_nar_verify_failures_total"), 0);
}

/// A NAR download cut off in the middle (a network fault between Nix and
/// its agent): a modern Nix asks again with `Range: bytes=N-`, gets `206`
/// with the rest, and the path it assembles verifies. Nix 2.8 never sends
/// `Range`; there the cut must still leave no invalid or corrupt path.
#[test]
fn a_cut_nar_download_resumes_where_it_stopped() {
    let len = 6 << 20;
    let bytes: Vec<u8> = (0..len as u32).map(|i| (i * 31 % 239) as u8).collect();
    let OfficePair {
        office,
        a: _a,
        b,
        agents: _agents,
        paths,
    } = office_pair(&[("cut.bin", &bytes)]);
    let path = &paths[0];
    let cut_after = 2 << 20;
    let proxy = cut_proxy::CuttingProxy::start(b.substituter_addr(), "/nar/", cut_after);
    let out = b.store.substitute(
        &format!("http://{}", proxy.addr),
        Some(&office.public),
        &[path],
    );
    let nars: Vec<_> = proxy
        .seen()
        .into_iter()
        .filter(|r| r.target.starts_with("/nar/"))
        .collect();
    assert!(nars.first().is_some_and(|r| r.cut), "{nars:?}");
    if nix_under_test::selected().version == "2.8" {
        if b.store.is_valid(path) {
            run_ok(b.store.cmd("nix-store").args(["--verify-path", path]));
        }
        return;
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run_ok(b.store.cmd("nix-store").args(["--verify-path", path]));
    let resumed = nars.iter().find(|r| r.range.is_some());
    let resumed = resumed.unwrap_or_else(|| panic!("Nix never resumed: {nars:?}"));
    // From what Nix had written, which is at most what it was sent.
    let from: u64 = resumed
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not bytes=N-: {resumed:?}"));
    assert!(from > 0 && from <= cut_after, "{resumed:?}");
    assert_eq!(resumed.status, 206, "{nars:?}");
}

/// A NAR fetched ahead and never claimed would be held for two minutes;
/// an agent told to stop lets it go and ends every task at once.
#[test]
fn a_stopping_agent_does_not_wait_for_what_it_fetched_ahead() {
    let OfficePair {
        office: _office,
        a: _a,
        b,
        mut agents,
        paths,
    } = office_pair(&[("kept.txt", b"never claimed\n")]);
    let kept = &paths[0];
    let reply = get(
        b.substituter_addr(),
        &format!("/{}.narinfo", hash_part(kept)),
    );
    assert_eq!(reply.status, 200);
    wait_for(Duration::from_secs(10), "the NAR held ahead", || {
        metric(&b, "nixmesh_prefetch_held_bytes") > 0
    });
    let stopping = agents.remove(1);
    run_ok(std::process::Command::new("kill").args(["-TERM", &stopping.pid().to_string()]));
    let took = wait_for(Duration::from_secs(15), "b's tasks all ended", || {
        stopping.log_text().contains("every task has ended")
    });
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
    assert!(!stopping.log_text().contains("still running"));
}

#[test]
fn fetching_ahead_can_be_turned_off() {
    let holder = NodeSettings {
        share: "all = true".into(),
        ..Default::default()
    };
    let off = NodeSettings {
        substituter: "prefetch_mib = 0\nrequire_sigs = false".into(),
        ..Default::default()
    };
    let a = MeshNode::new("a", &holder);
    let b = MeshNode::new("b", &off);
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("f.txt"), "not ahead\n").unwrap();
    let path = a.store.add(&src.path().join("f.txt"));
    let _agents = full_mesh(&[&a, &b], &[holder, off]);
    wait_for(Duration::from_secs(10), "b sees a", || {
        all_alive(&b, &["a"])
    });
    let hash = hash_part(&path);
    let narinfo = get(b.substituter_addr(), &format!("/{hash}.narinfo"));
    assert_eq!(narinfo.status, 200);
    // The NAR still streams on demand.
    let url = narinfo
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_string))
        .unwrap();
    let nar = get(b.substituter_addr(), &format!("/{url}"));
    assert_eq!(nar.status, 200);
    assert_eq!(nar.body, a.store.dump(&path));
    assert_eq!(metric(&b, "nixmesh_prefetch_started_total"), 0);
    assert_eq!(metric(&b, "nixmesh_prefetch_held_bytes"), 0);
}

#[test]
fn the_agent_raises_its_open_file_limit() {
    // Started with a low soft limit, as a service manager might leave it.
    let a = MeshNode::new("a", &NodeSettings::default());
    let config = std::fs::read_to_string(&a.config_path).unwrap();
    let agent = Agent::start_with(
        &config,
        a.admin_addr(),
        &["prlimit", "--nofile=256:4096", "--"],
        std::path::Path::new(env!("CARGO_BIN_EXE_nixmesh")),
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3..5], ["4096", "4096"], "{line}");
}

#[test]
fn the_mesh_socket_gets_large_buffers() {
    // The kernel's default UDP buffers overflow under a bulk NAR stream.
    let a = MeshNode::new("a", &NodeSettings::default());
    let config = std::fs::read_to_string(&a.config_path).unwrap();
    let agent = Agent::start(&config, a.admin_addr());
    let filter = format!("sport = :{}", a.quic);
    let out = run_ok(
        std::process::Command::new("ss")
            .args(["-u", "-a", "-n", "-m", "-p"])
            .arg(&filter),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let pid = format!("pid={},", agent.pid());
    assert!(text.contains(&pid), "the agent's socket is not in\n{text}");
    let field = |name: &str| -> u64 {
        let at = text.find(&format!(",{name}")).expect(name) + name.len() + 1;
        let digits: String = text[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().unwrap()
    };
    // 8 MiB each way; without the right to force it (not root), as much as
    // the kernel's limits allow. The kernel shows twice what it granted.
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    let limit = |knob: &str| -> u64 {
        let text = std::fs::read_to_string(format!("/proc/sys/net/core/{knob}")).unwrap();
        let limit = text.trim().parse::<u64>().unwrap();
        if root {
            8 << 20
        } else {
            limit.min(8 << 20)
        }
    };
    assert!(field("rb") >= 2 * limit("rmem_max"), "{text}");
    assert!(field("tb") >= 2 * limit("wmem_max"), "{text}");
}

/// A bulk connection (TLS on TCP at the agent's mesh port, protocol
/// version 5) from a client with its own key: the TLS handshake's result,
/// and the answer to `request` (bytes as they go on the wire) if it passed.
async fn bulk_exchange(target: &MeshNode, request: &[u8]) -> Result<Response, String> {
    let key = SecretKey::generate("raw").unwrap();
    let id = TlsIdentity::new(&key, &MeshSecret::default()).unwrap();
    let node = nixmesh::mesh::identity::NodeId::parse(&target.key).unwrap();
    let tls = transport::bulk_client_config(&id, Admission::default(), node).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", target.quic).parse().unwrap();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from(transport::SERVER_NAME).unwrap();
    let io = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    exchange(io, request).await
}

/// Writes `request` on a bulk connection and reads the answer.
async fn exchange(
    mut io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    request: &[u8],
) -> Result<Response, String> {
    use tokio::io::AsyncWriteExt;
    io.write_all(request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    io.flush().await.map_err(|e| format!("flush: {e}"))?;
    let body = transport::read_frame_from(
        &mut io,
        nixmesh::mesh::protocol::MAX_RESPONSE_FRAME,
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| format!("answer: {e}"))?;
    Response::decode(&body).map_err(|e| format!("malformed answer: {e}"))
}

#[test]
fn bulk_connections_admit_as_quic_does_and_answer_bad_requests_with_an_error() {
    let open = MeshNode::new("open", &NodeSettings::default());
    let other = MeshNode::new("other", &NodeSettings::default());
    // `closed` admits only `other`'s key.
    let closed_settings = NodeSettings {
        mesh: format!("allowed_peers = [{:?}]", other.key),
        ..Default::default()
    };
    let closed = MeshNode::new("closed", &closed_settings);
    let sealed_settings = NodeSettings {
        mesh: "bulk_encryption = \"always\"".into(),
        ..Default::default()
    };
    let sealed = MeshNode::new("sealed", &sealed_settings);
    let _agents = full_mesh(
        &[&open, &other, &closed, &sealed],
        &[
            NodeSettings::default(),
            NodeSettings::default(),
            closed_settings,
            sealed_settings,
        ],
    );
    wait_for(Duration::from_secs(10), "the agents are up", || {
        all_alive(&open, &["other"]) && all_alive(&closed, &["other"])
    });
    // `nixmesh status` names the TCP listener: the QUIC port, on TCP.
    let (text, json) = open.status();
    let quic = json["listeners"]["quic"].as_str().unwrap_or_default();
    assert!(quic.ends_with(&format!(":{}", open.quic)), "{json}");
    assert_eq!(json["listeners"]["bulk"].as_str(), Some(quic), "{json}");
    assert!(text.contains(&format!("bulk (tcp)  {quic}")), "{text}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let ping = Request::Ping { nonce: 7 }.encode();

    // A key `closed` does not list gets no further than the handshake.
    let refused = rt.block_on(bulk_exchange(&closed, &ping));
    assert!(refused.is_err(), "a stranger got an answer: {refused:?}");

    // A frame over the limit, and a request a bulk connection does not
    // carry, each get an error answer, not a hang or a silent close.
    let huge = [0xff, 0xff, 0xff, 0xff, 9];
    match rt.block_on(bulk_exchange(&open, &huge)) {
        Ok(Response::Error { code: c, .. }) => assert_eq!(c, code::TOO_LARGE),
        other => panic!("oversized frame: {other:?}"),
    }
    match rt.block_on(bulk_exchange(&open, &ping)) {
        Ok(Response::Error { code: c, .. }) => assert_eq!(c, code::UNKNOWN_KIND),
        other => panic!("a ping on a bulk connection: {other:?}"),
    }
    // A NAR the agent does not have: "not found", as on QUIC.
    let unknown = Request::NarChunks {
        hash: nixmesh::nix::HashPart::parse("00000000000000000000000000000000").unwrap(),
        nar_hash: nixmesh::nix::Sha256Hash([0; 32]),
        offset: 0,
        end: u64::MAX,
        level: 0,
    }
    .encode();
    match rt.block_on(bulk_exchange(&open, &unknown)) {
        Ok(Response::NotFound) => {}
        other => panic!("an unknown NAR: {other:?}"),
    }
    // Version 8: the same over a connection that opens with the plain
    // preamble instead of TLS. `open` answers it; `closed`, and `sealed`
    // (set to `bulk_encryption = "always"`), refuse it with code 9, after
    // reading the request, so the refusal arrives rather than a reset; a
    // connection that opens with neither gets no answer.
    let asker = nixmesh::mesh::identity::NodeId::parse(&other.key).unwrap();
    let preamble = nixmesh::mesh::plain_bulk::preamble(&asker);

    // Open: served in the clear, "not found" as under TLS; a request a
    // bulk connection does not carry gets its error as under TLS.
    match rt.block_on(plain_exchange(&open, &preamble, &unknown)) {
        Ok(Response::NotFound) => {}
        other => panic!("an unknown NAR on a plain connection: {other:?}"),
    }
    match rt.block_on(plain_exchange(&open, &preamble, &ping)) {
        Ok(Response::Error { code: c, .. }) => assert_eq!(c, code::UNKNOWN_KIND),
        other => panic!("a ping on a plain connection: {other:?}"),
    }
    // Closed, and "always": refused with code 9.
    for node in [&closed, &sealed] {
        match rt.block_on(plain_exchange(node, &preamble, &unknown)) {
            Ok(Response::Error { code: c, .. }) => assert_eq!(c, code::PLAIN_REFUSED),
            other => panic!("{}: a plain connection: {other:?}", node.name),
        }
    }
    // The first byte of the preamble, then something else: closed without
    // an answer.
    let mut wrong = preamble;
    wrong[5] ^= 0x20;
    let answer = rt.block_on(plain_exchange(&open, &wrong, &unknown));
    assert!(answer.is_err(), "a wrong preamble got {answer:?}");
    // The agents carry on: their QUIC peers are still alive.
    assert!(all_alive(&open, &["other"]) && all_alive(&closed, &["other"]));
}

/// A plain bulk connection (protocol version 8) to `target`: the
/// preamble `opening` (as `plain_bulk::preamble` makes it, or not), then
/// `request`; the answer, or why there was none.
async fn plain_exchange(
    target: &MeshNode,
    opening: &[u8],
    request: &[u8],
) -> Result<Response, String> {
    use tokio::io::AsyncWriteExt;
    let addr: SocketAddr = format!("127.0.0.1:{}", target.quic).parse().unwrap();
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.write_all(opening)
        .await
        .map_err(|e| format!("write: {e}"))?;
    exchange(tcp, request).await
}

/// Reads one part off a bulk connection answering a request at `level`;
/// the part's NAR bytes, and the connection if the holder ended the part
/// with `DONE` (handed back through an idle pool, as the agent's are).
async fn read_bulk_part(
    io: nixmesh::mesh::nar_reader::BulkStream,
    level: u8,
) -> (Vec<u8>, Option<nixmesh::mesh::nar_reader::BulkStream>) {
    use nixmesh::mesh::bulk::Idle;
    use nixmesh::mesh::nar_reader::{NarReader, Recycle};
    let idle = std::sync::Arc::new(Idle::default());
    let node = nixmesh::mesh::identity::NodeId([9; 32]);
    let recycle = Recycle {
        idle: idle.clone(),
        node,
    };
    let mut reader = NarReader::bulk(
        io,
        level,
        Some(recycle),
        nixmesh::mesh::nar_chunks::chunk_buffers(),
        false,
    );
    let mut bytes = Vec::new();
    // A holder that sent neither `DONE` nor the close fails the test.
    let next = Duration::from_secs(10);
    while let Some(piece) = tokio::time::timeout(next, reader.next())
        .await
        .expect("the holder goes on or ends the part")
        .expect("a well-formed part")
    {
        bytes.extend_from_slice(&piece);
    }
    (bytes, idle.take(&node, Instant::now()))
}

/// Protocol version 7 against a real holder: a bulk connection whose
/// requests set `KEEP` carries part after part, each ended by `DONE`; a
/// request without it is the connection's last; a bad request on a kept
/// connection gets its `Error` and the close.
#[test]
fn a_kept_bulk_connection_carries_part_after_part() {
    use nixmesh::mesh::{bulk, nar_chunks};
    let text: Vec<u8> = b"a kept bulk connection carries part after part\n"
        .iter()
        .copied()
        .cycle()
        .take(3 << 20)
        .collect();
    let pair = office_pair(&[("kept.txt", &text)]);
    let path = &pair.paths[0];
    let nar = pair.a.store.dump(path);
    let info = pair.a.store.path_info_json(path);
    let nar_hash =
        nixmesh::nix::Sha256Hash::parse(info["narHash"].as_str().expect("narHash")).unwrap();
    let hash = nixmesh::nix::HashPart::parse(hash_part(path)).unwrap();
    let len = nar.len() as u64;
    let ask = |part: std::ops::Range<u64>, level: u8| Request::NarChunks {
        hash: hash.clone(),
        nar_hash,
        offset: part.start,
        end: part.end,
        level,
    };
    let keep = nar_chunks::ADAPTIVE | nar_chunks::LZ4 | nar_chunks::KEEP | 1;
    let timeout = Duration::from_secs(10);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let key = SecretKey::generate("raw").unwrap();
        let id = TlsIdentity::new(&key, &MeshSecret::default()).unwrap();
        let node = nixmesh::mesh::identity::NodeId::parse(&pair.a.key).unwrap();
        let tls = transport::bulk_client_config(&id, Admission::default(), node).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", pair.a.quic).parse().unwrap();
        let mut io = bulk::dial(tls.clone(), addr)
            .await
            .expect("a bulk connection");
        // Two kept parts, then one that is the last, all on one connection.
        let parts = [0..len / 3, len / 3..2 * len / 3, 2 * len / 3..len];
        for (i, part) in parts.into_iter().enumerate() {
            let last = i == 2;
            let level = if last { keep & !nar_chunks::KEEP } else { keep };
            let (answer, conn) = bulk::ask(io, &ask(part.clone(), level), timeout)
                .await
                .unwrap_or_else(|e| panic!("part {i} on the same connection: {e}"));
            assert_eq!(answer, Response::NarFollows { nar_size: len });
            let (bytes, kept) = read_bulk_part(conn, level).await;
            assert!(
                bytes == nar[part.start as usize..part.end as usize],
                "part {i}: {} bytes, not the NAR's {part:?}",
                bytes.len()
            );
            match kept {
                Some(conn) if !last => io = conn,
                None if last => break,
                other => panic!("part {i}: kept {}", other.is_some()),
            }
        }
        // A kept connection that gets a bad request answers it and closes.
        let io = bulk::dial(tls, addr).await.expect("a bulk connection");
        let (answer, conn) = bulk::ask(io, &ask(0..len, keep), timeout).await.unwrap();
        assert_eq!(answer, Response::NarFollows { nar_size: len });
        let (bytes, kept) = read_bulk_part(conn, keep).await;
        assert!(bytes == nar);
        let conn = kept.expect("kept after a whole NAR");
        let (answer, mut conn) = bulk::ask(conn, &Request::Ping { nonce: 1 }, timeout)
            .await
            .expect("an answer to a bad request");
        assert!(
            matches!(
                answer,
                Response::Error {
                    code: code::UNKNOWN_KIND,
                    ..
                }
            ),
            "{answer:?}"
        );
        use tokio::io::AsyncReadExt;
        let mut rest = Vec::new();
        let read = tokio::time::timeout(timeout, conn.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the holder closes after the bad request: {read:?} {rest:?}"
        );
    });
    drop(pair.agents);
}
