//! Summaries (protocol 4): each agent tells its peers which paths it
//! shares, and a look-up goes only to peers whose summary lists the path.
//! Real agents over loopback with real Nix stores: a path added on A is
//! known to B within 2 s and then found with one request; a collected path
//! leaves the summary; a miss sends no request to anyone; and peers whose
//! summaries lie, are malformed or come too fast are handled.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nixmesh::mesh::protocol::{Request, Response};
use nixmesh::mesh::transport;
use nixmesh::nix::HashPart;

fn share_all() -> NodeSettings {
    NodeSettings {
        share: "all = true".into(),
        ..NodeSettings::default()
    }
}

fn peer<'a>(peers: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    peers
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no peer {name} in {peers:?}"))
}

/// Paths in `node`'s copy of `name`'s summary, once it is complete.
fn summary_paths(node: &MeshNode, name: &str) -> Option<u64> {
    let peers = node.peers();
    let s = &peer(&peers, name)["summary"];
    (s["complete"] == true).then(|| s["paths"].as_u64().unwrap_or(0))
}

/// Requests `node` answered for its peers (pings aside).
fn served_by(node: &MeshNode) -> u64 {
    node.peers()
        .iter()
        .map(|p| p["requests_served"].as_u64().unwrap())
        .sum()
}

fn metric(node: &MeshNode, name: &str) -> u64 {
    let text = get(node.admin_addr(), "/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or_else(|| panic!("no {name} in {text}"), |v| v as u64)
}

fn random_hash() -> String {
    // Letters nix32 has, from the suffix generator.
    let mut h = String::new();
    while h.len() < 32 {
        h.extend(
            rand_suffix()
                .chars()
                .filter(|c| "0123456789abcdfghijklmnpqrsvwxyz".contains(*c)),
        );
    }
    h.truncate(32);
    h
}

#[test]
fn a_path_added_on_one_agent_is_known_to_the_other_and_a_miss_asks_no_one() {
    let (a, b) = (
        MeshNode::new("a", &share_all()),
        MeshNode::new("b", &share_all()),
    );
    a.write_config(&share_all(), &[&b]);
    b.write_config(&share_all(), &[&a]);
    let (_agent_a, _agent_b) = (a.start(), b.start());
    wait_for(Duration::from_secs(10), "b has a's whole summary", || {
        summary_paths(&b, "a").is_some()
    });
    let before = summary_paths(&b, "a").unwrap();
    assert!(before >= 1, "a's seed path is shared");
    assert_eq!(metric(&b, "nixmesh_summaries_complete"), 1);
    assert_eq!(metric(&b, "nixmesh_summary_fingerprints"), before);

    // A path added on a: b's copy of a's summary has it within 2 s.
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("new.txt"), rand_suffix().repeat(100)).unwrap();
    let added = Instant::now();
    let path = a.store.add(&src.path().join("new.txt"));
    let took = wait_for(
        Duration::from_secs(2),
        "b's summary of a lists the new path",
        || summary_paths(&b, "a") == Some(before + 1),
    );
    eprintln!(
        "a path added on a was in b's summary of a {took:?} after the add returned ({:?} after it began)",
        added.elapsed()
    );
    // b learned it without asking a about the path: a has answered only
    // b's summary request so far.
    let hash = hash_part(&path);
    let why = get(b.admin_addr(), &format!("/why/{hash}"));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&why.text()).unwrap();
    assert_eq!(rows[0]["summary"], true, "{rows:?}");

    // A hit costs one narinfo request (and the NAR's), and Nix gets it.
    let served = served_by(&a);
    let asks = metric(&b, "nixmesh_narinfo_requests_total");
    let out = b
        .store
        .substitute(&format!("http://{}", b.substituter_addr()), None, &[&path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(metric(&b, "nixmesh_narinfo_requests_total"), asks + 1);
    assert!(served_by(&a) > served);

    // A miss asks no one, and comes at once.
    let served = served_by(&a);
    let summary_misses = metric(&b, "nixmesh_narinfo_summary_misses_total");
    let asks = metric(&b, "nixmesh_narinfo_requests_total");
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let start = Instant::now();
        let miss = get(b.substituter_addr(), &format!("/{}.narinfo", random_hash()));
        slowest = slowest.max(start.elapsed());
        assert_eq!(miss.status, 404);
    }
    eprintln!(
        "20 misses through b's substituter, the slowest answered in {slowest:?} (HTTP included)"
    );
    assert_eq!(served_by(&a), served, "a was asked about a miss");
    assert_eq!(metric(&b, "nixmesh_narinfo_requests_total"), asks);
    assert_eq!(
        metric(&b, "nixmesh_narinfo_summary_misses_total"),
        summary_misses + 20
    );

    // Collected on a: it leaves b's summary of a within 2 s.
    run_ok(a.store.cmd("nix-store").arg("--delete").arg(&path));
    wait_for(
        Duration::from_secs(2),
        "the collected path leaves the summary",
        || summary_paths(&b, "a") == Some(before),
    );
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&get(b.admin_addr(), &format!("/why/{hash}")).text()).unwrap();
    assert_eq!(rows[0]["summary"], false, "{rows:?}");
    assert_eq!(rows[0]["answer"]["kind"], "not_found", "{rows:?}");
}

/// How the fake peer's summary misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Summary {
    /// Lists these fingerprints; has none of the paths.
    Lists(&'static [u32]),
    /// A part that says it holds more fingerprints than any may.
    Oversized,
    /// A complete summary, then changes as fast as it can send them.
    Flood,
}

#[derive(Default)]
struct Seen {
    summaries: AtomicU64,
    path_infos: AtomicU64,
}

/// A peer that answers pings, has no path at all, and sends `summary`.
async fn run_fake(endpoint: quinn::Endpoint, summary: Summary, seen: Arc<Seen>) {
    while let Some(incoming) = endpoint.accept().await {
        let seen = seen.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(body) = transport::read_frame(
                        &mut recv,
                        nixmesh::mesh::protocol::MAX_REQUEST_FRAME,
                        Duration::from_secs(5),
                    )
                    .await
                    else {
                        return;
                    };
                    let frames: Vec<Vec<u8>> = match Request::decode(&body) {
                        Ok(Request::Ping { nonce }) => vec![Response::Pong {
                            nonce,
                            name: "fake".into(),
                        }
                        .encode()],
                        Ok(Request::PathInfo { .. }) => {
                            seen.path_infos.fetch_add(1, Ordering::SeqCst);
                            vec![Response::NotFound.encode()]
                        }
                        Ok(Request::Summary) => {
                            seen.summaries.fetch_add(1, Ordering::SeqCst);
                            summary_frames(summary)
                        }
                        Ok(_) => vec![Response::NotFound.encode()],
                        Err(_) => return,
                    };
                    for f in frames {
                        if send.write_all(&f).await.is_err() {
                            return;
                        }
                    }
                    // Summaries stay open, as an agent's do.
                    if matches!(summary, Summary::Lists(_)) && body[0] == 9 {
                        let _ = send.stopped().await;
                    }
                    let _ = send.finish();
                });
            }
        });
    }
}

fn summary_frames(summary: Summary) -> Vec<Vec<u8>> {
    match summary {
        Summary::Lists(fps) => vec![Response::SummaryPart {
            added: fps.to_vec(),
            removed: vec![],
            complete: true,
        }
        .encode()],
        Summary::Oversized => {
            // kind 75, not complete, u32::MAX fingerprints announced.
            let mut body = vec![75u8, 0];
            body.extend_from_slice(&u32::MAX.to_be_bytes());
            body.extend_from_slice(&[0; 64]);
            let mut frame = (body.len() as u32).to_be_bytes().to_vec();
            frame.extend(body);
            vec![frame]
        }
        Summary::Flood => (0..2000u32)
            .map(|i| {
                Response::SummaryPart {
                    added: vec![i],
                    removed: vec![],
                    complete: true,
                }
                .encode()
            })
            .collect(),
    }
}

/// Starts a fake peer and an agent `b` that lists it as its only peer.
fn with_fake(summary: Summary, check: impl FnOnce(&MeshNode, &Seen)) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (endpoint, node, addr) = fake_peer_endpoint(&rt, "fake");
    let seen = Arc::new(Seen::default());
    rt.spawn(run_fake(endpoint, summary, seen.clone()));
    let b = MeshNode::new("b", &NodeSettings::default());
    add_static_peer(&b, &node, addr);
    let agent = b.start();
    wait_for(Duration::from_secs(10), "b sees the fake peer", || {
        b.peer_state("fake").as_deref() == Some("alive")
    });
    check(&b, &seen);
    assert!(
        !agent.log_text().contains("panicked"),
        "{}",
        agent.log_text()
    );
    drop(rt);
}

/// Hash parts (as text) whose fingerprints the lying summary lists.
const LISTED: [&str; 6] = [
    "00000000000000000000000000000000",
    "11111111111111111111111111111111",
    "22222222222222222222222222222222",
    "33333333333333333333333333333333",
    "44444444444444444444444444444444",
    "55555555555555555555555555555555",
];

fn listed_fingerprints() -> &'static [u32] {
    static FPS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    FPS.get_or_init(|| {
        LISTED
            .iter()
            .map(|h| HashPart::parse(h).unwrap().fingerprint())
            .collect()
    })
}

#[test]
fn a_summary_that_lists_paths_the_peer_lacks_costs_a_request_each_and_is_fetched_again() {
    with_fake(Summary::Lists(listed_fingerprints()), |b, seen| {
        wait_for(Duration::from_secs(10), "b has the fake summary", || {
            summary_paths(b, "fake") == Some(6)
        });
        assert_eq!(seen.summaries.load(Ordering::SeqCst), 1);
        for h in LISTED {
            assert_eq!(
                get(b.substituter_addr(), &format!("/{h}.narinfo")).status,
                404
            );
        }
        // Each listed path was asked about (no path came of it), and after
        // four wrong answers in a row the summary was fetched again.
        assert_eq!(seen.path_infos.load(Ordering::SeqCst), 6);
        wait_for(
            Duration::from_secs(5),
            "the summary is fetched again",
            || seen.summaries.load(Ordering::SeqCst) >= 2,
        );
        // Four or more were counted wrong (the last ones may have been
        // asked while the summary was being fetched again, as a peer
        // without one is).
        let peers = b.peers();
        let wrong = peer(&peers, "fake")["summary"]["wrong"].as_u64();
        assert!(wrong >= Some(4), "{peers:?}");
        // A path it does not list is not asked about.
        assert_eq!(
            get(b.substituter_addr(), &format!("/{}.narinfo", random_hash())).status,
            404
        );
        assert_eq!(seen.path_infos.load(Ordering::SeqCst), 6);
    });
}

#[test]
fn a_malformed_summary_resets_its_stream_and_the_peer_is_asked_as_before() {
    with_fake(Summary::Oversized, |b, seen| {
        wait_for(
            Duration::from_secs(10),
            "the bad summary is counted",
            || peer(&b.peers(), "fake")["errors"].as_u64() >= Some(1),
        );
        assert!(summary_paths(b, "fake").is_none());
        // Without a summary, it is asked about every path.
        let before = seen.path_infos.load(Ordering::SeqCst);
        assert_eq!(
            get(b.substituter_addr(), &format!("/{}.narinfo", random_hash())).status,
            404
        );
        assert_eq!(seen.path_infos.load(Ordering::SeqCst), before + 1);
    });
}

#[test]
fn a_flood_of_summary_changes_is_cut_off() {
    with_fake(Summary::Flood, |b, seen| {
        wait_for(Duration::from_secs(10), "the flood is counted", || {
            peer(&b.peers(), "fake")["errors"].as_u64() >= Some(1)
        });
        // The subscription starts over later; in between, the peer is
        // asked about every path.
        assert!(summary_paths(b, "fake").is_none());
        assert!(seen.summaries.load(Ordering::SeqCst) >= 1);
    });
}
