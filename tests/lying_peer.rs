//! A peer that lies: it speaks the protocol correctly but sends NAR bytes
//! that do not match the narinfo it gave, raw or in compressed chunk frames
//! (protocol version 3, what agents ask for by default), or chunk frames
//! that are not what they say (a compression bomb, a frame longer than its
//! NAR bytes). Real Nix must never end up with the path, and the liar must
//! be quarantined.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use nixmesh::mesh::nar_chunks::{self, Packer};
use nixmesh::mesh::protocol::{code, Request, Response};
use nixmesh::mesh::transport;
use nixmesh::nix::NarInfo;

/// How the liar lies about the NAR.
#[derive(Clone, Copy)]
enum Lie {
    /// Bytes that are not a NAR at all.
    Garbage,
    /// The real NAR with one byte changed: same length, parses fine.
    FlippedByte,
    /// The real NAR, then more.
    Overlong,
    /// Asked for chunks: a first frame that says 4 KiB of NAR and inflates
    /// to 1 MiB. (Asked for raw bytes: the truth, so that only an agent
    /// that asked for chunks and refused the bomb passes.)
    Bomb,
    /// Asked for chunks: a frame whose wire length exceeds its NAR bytes
    /// (asked for raw bytes: the truth).
    Inflated,
    /// The first half of the truth, then "my own copy is corrupt" (a QUIC
    /// stream reset, a stop header on a bulk connection).
    DisownsMidway,
}

impl Lie {
    /// Why the asker must quarantine the liar, where one reason is right.
    /// (A QUIC reset may overtake the bytes before it, so over QUIC the
    /// holder may seem to disown its copy before sending any.)
    fn reason(self, bulk: bool) -> Option<&'static str> {
        match self {
            Lie::DisownsMidway if bulk => Some("said its own store copy is corrupt"),
            Lie::DisownsMidway => Some("store copy is corrupt"),
            _ => None,
        }
    }
}

/// What the liar sends after `NarFollows`: `nar`'s bytes in `part`, raw
/// or, with a `level`, in chunk frames; lied about as `lie` says.
fn lie_about(nar: &[u8], part: std::ops::Range<usize>, level: Option<u8>, lie: Lie) -> Vec<u8> {
    let mut bytes = nar.to_vec();
    match lie {
        Lie::Garbage => bytes.fill(0x5a),
        Lie::FlippedByte => {
            let mid = bytes.len() / 2;
            bytes[mid] ^= 1;
        }
        Lie::Overlong => bytes.extend_from_slice(&[0; 4096]),
        Lie::DisownsMidway => bytes.truncate(bytes.len() / 2),
        Lie::Bomb | Lie::Inflated => {}
    }
    let end = part.end.min(bytes.len());
    let offset = part.start.min(end);
    let Some(level) = level else {
        return bytes[offset..end].to_vec();
    };
    let mut out = Vec::new();
    match lie {
        Lie::Bomb => {
            let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 19).unwrap();
            out.extend_from_slice(&4096u32.to_be_bytes());
            out.extend_from_slice(&(bomb.len() as u32).to_be_bytes());
            out.extend_from_slice(&bomb);
        }
        Lie::Inflated => {
            out.extend_from_slice(&100u32.to_be_bytes());
            out.extend_from_slice(&101u32.to_be_bytes());
            out.extend_from_slice(&[0; 101]);
        }
        _ => {
            let mut packer = Packer::new(level);
            for chunk in bytes[offset..end].chunks(nar_chunks::CHUNK) {
                out.extend_from_slice(&packer.pack(chunk));
            }
        }
    }
    out
}

/// What the liar writes back for the request in `body`: the answer's
/// frame, and for a NAR the bytes it lies with; and whether it then says
/// its copy is corrupt. `None`: it says nothing.
fn liar_answer(body: &[u8], narinfo: &str, nar: &[u8], lie: Lie) -> Option<(Vec<u8>, bool)> {
    let resp = match Request::decode(body) {
        Ok(Request::Ping { nonce }) => Response::Pong {
            nonce,
            name: "liar".into(),
        },
        Ok(Request::PathInfo { .. }) => Response::PathInfo {
            narinfo: narinfo.to_string(),
        },
        Ok(Request::Have { hashes }) => Response::Have {
            present: vec![true; hashes.len()],
        },
        Ok(Request::UpstreamFile { .. }) => Response::NotFound,
        Ok(Request::BadNar { .. }) => Response::Noted,
        // It keeps no summary: asked about every path.
        Ok(Request::Summary) => Response::NotFound,
        Ok(Request::UpstreamNarinfo { .. }) => Response::UpstreamMiss { asked: Vec::new() },
        Ok(Request::Nar { offset, .. } | Request::NarChunks { offset, .. })
            if offset as usize > nar.len() =>
        {
            Response::NotFound
        }
        Ok(req @ (Request::Nar { offset, .. } | Request::NarChunks { offset, .. })) => {
            // Overlong lies reach past the end asked for.
            let (level, end) = match req {
                Request::NarChunks { level, end, .. } => (Some(level), end),
                _ => (None, u64::MAX),
            };
            let end = match lie {
                Lie::Overlong => usize::MAX,
                _ => usize::try_from(end).unwrap_or(usize::MAX),
            };
            let nar_size = nar.len() as u64;
            let mut out = Response::NarFollows { nar_size }.encode();
            out.extend(lie_about(nar, offset as usize..end, level, lie));
            return Some((out, matches!(lie, Lie::DisownsMidway)));
        }
        Err(_) => return None,
    };
    Some((resp.encode(), false))
}

/// Serves `narinfo` for its path and a NAR that is `lie`d about.
async fn run_liar(endpoint: quinn::Endpoint, narinfo: String, nar: Arc<Vec<u8>>, lie: Lie) {
    while let Some(incoming) = endpoint.accept().await {
        let narinfo = narinfo.clone();
        let nar = nar.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let narinfo = narinfo.clone();
                let nar = nar.clone();
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
                    match liar_answer(&body, &narinfo, &nar, lie) {
                        Some((out, true)) => {
                            let _ = send.write_all(&out).await;
                            let _ = send.reset(code::CORRUPT.into());
                        }
                        Some((out, false)) => {
                            let _ = send.write_all(&out).await;
                            let _ = send.finish();
                        }
                        None => {
                            let _ = send.finish();
                        }
                    }
                });
            }
        });
    }
}

/// The liar's bulk connections (protocol version 5): the same lies over
/// TLS on TCP, or (version 8) on a plain connection.
async fn run_bulk_liar(bulk: FakeBulk, narinfo: String, nar: Arc<Vec<u8>>, lie: Lie) {
    use nixmesh::mesh::nar_reader::BulkStream;
    use nixmesh::mesh::plain_bulk;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((mut tcp, _)) = bulk.listener.accept().await {
        let (acceptor, narinfo, nar) = (bulk.acceptor.clone(), narinfo.clone(), nar.clone());
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            if tcp.peek(&mut first).await.ok() != Some(1) {
                return;
            }
            let mut io: BulkStream = if plain_bulk::opens_plain(first[0]) {
                let mut preamble = [0u8; plain_bulk::PREAMBLE_LEN];
                if tcp.read_exact(&mut preamble).await.is_err() {
                    return;
                }
                Box::new(tcp)
            } else {
                match acceptor.accept(tcp).await {
                    Ok(io) => Box::new(io),
                    Err(_) => return,
                }
            };
            let Ok(body) = transport::read_frame_from(
                &mut io,
                nixmesh::mesh::protocol::MAX_REQUEST_FRAME,
                Duration::from_secs(5),
            )
            .await
            else {
                return;
            };
            if let Some((out, disown)) = liar_answer(&body, &narinfo, &nar, lie) {
                let _ = io.write_all(&out).await;
                if disown {
                    let _ = io.write_all(&nar_chunks::stop_header(code::CORRUPT)).await;
                }
            }
            let _ = io.shutdown().await;
        });
    }
}

/// `len` bytes that do not compress, the same for the same `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// How the liar's NAR goes to B.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    Quic,
    /// A bulk connection (protocol version 5, TLS on TCP, for a NAR of
    /// 4 MiB and more), B set to `bulk_encryption = "always"`.
    Tls,
    /// A plain bulk connection (version 8, B's default in an open mesh).
    Plain,
}

/// A liar holds a path B wants, and sends it `via` QUIC or a bulk
/// connection. Nix on B never gets the path, and the liar is quarantined
/// (over a plain connection, once it lied again under TLS).
fn liar_scenario(lie: Lie, via: Via) {
    let bulk = via != Via::Quic;
    // The truth: a real content-addressed path (no signature needed).
    let honest = TestStore::new();
    let src = tempfile::tempdir().unwrap();
    let content = if bulk {
        noise(6 << 20, 0x9e3779b97f4a7c15)
    } else {
        vec![b't'; 300_000]
    };
    std::fs::write(src.path().join("truth.bin"), content).unwrap();
    let path = honest.add(&src.path().join("truth.bin"));
    let json = honest.path_info_json(&path);
    let narinfo = format!(
        "StorePath: {path}\nURL: nar/x.nar\nCompression: none\nNarHash: {}\nNarSize: {}\nReferences: \nCA: {}\n",
        json["narHash"].as_str().unwrap(),
        json["narSize"],
        json["ca"].as_str().unwrap(),
    );
    let nar = Arc::new(honest.dump(&path));
    assert_eq!(nar.len() as u64, json["narSize"].as_u64().unwrap());
    assert!(NarInfo::parse("/nix/store", &narinfo).is_ok());

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (node, addr) = if bulk {
        let (endpoint, bulk, node, addr) = fake_peer_with_bulk(&rt, "liar");
        rt.spawn(run_liar(endpoint, narinfo.clone(), nar.clone(), lie));
        rt.spawn(run_bulk_liar(bulk, narinfo, nar, lie));
        (node, addr)
    } else {
        let (endpoint, node, addr) = fake_peer_endpoint(&rt, "liar");
        rt.spawn(run_liar(endpoint, narinfo, nar, lie));
        (node, addr)
    };

    let settings = NodeSettings {
        mesh: if via == Via::Tls {
            "bulk_encryption = \"always\"".into()
        } else {
            String::new()
        },
        ..Default::default()
    };
    let b = MeshNode::new("b", &settings);
    add_static_peer(&b, &node, addr);
    let agent = b.start();
    wait_for(Duration::from_secs(10), "b sees the liar", || {
        b.peer_state("liar").as_deref() == Some("alive")
    });
    let substitute = || {
        let out = b
            .store
            .substitute(&format!("http://{}", b.substituter_addr()), None, &[&path]);
        assert!(!out.status.success(), "Nix took bytes from a liar");
        assert!(!b.store.is_valid(&path), "the lie became a valid path");
    };
    let liar = || {
        let peers = b.peers();
        peers.into_iter().find(|p| p["name"] == "liar").unwrap()
    };
    substitute();
    // Bytes that came in the clear may have been changed on the way: the
    // liar's bulk connections go under TLS first, where it lies again (on
    // Nix's own retry, or the next substitution).
    if via == Via::Plain && liar()["quarantined"] == false {
        assert_eq!(liar()["bulk_moved_to_tls"], 1, "{}", liar());
        substitute();
    }
    let liar = liar();
    assert_eq!(liar["quarantined"], true, "{liar}");
    let over_tcp = liar["bulk_fetches"].as_u64().unwrap_or(0);
    if bulk {
        assert!(over_tcp >= 1, "the NAR did not come over TCP: {liar}");
        let plain = (
            liar["bulk_plain"].as_u64(),
            liar["bulk_moved_to_tls"].as_u64(),
        );
        let connections = liar["bulk_connections"].as_u64().unwrap_or(0);
        if via == Via::Plain {
            assert_eq!(plain, (Some(1), Some(1)), "{liar}");
            assert!(connections >= 2, "no TLS connection after: {liar}");
        } else {
            assert_eq!(plain, (Some(0), Some(0)), "{liar}");
        }
    } else {
        assert_eq!(over_tcp, 0, "a small NAR came over TCP: {liar}");
    }
    let failures = if via == Via::Plain { 2 } else { 1 };
    let metrics = get(b.admin_addr(), "/metrics").text();
    assert!(
        metrics.contains(&format!("nixmesh_nar_verify_failures_total {failures}")),
        "{metrics}"
    );
    assert!(
        agent.log_text().contains("quarantining a peer"),
        "{}",
        agent.log_text()
    );
    if let Some(why) = lie.reason(bulk) {
        assert!(agent.log_text().contains(why), "{}", agent.log_text());
    }
    // Quarantined: the next ask finds no one rather than the liar again.
    let hash = hash_part(&path);
    assert_eq!(
        get(b.substituter_addr(), &format!("/{hash}.narinfo")).status,
        404
    );
    drop(rt);
}

#[test]
fn garbage_over_a_plain_bulk_connection_never_reaches_the_store() {
    liar_scenario(Lie::Garbage, Via::Plain);
}

#[test]
fn a_compression_bomb_over_a_tls_bulk_connection_never_reaches_the_store() {
    liar_scenario(Lie::Bomb, Via::Tls);
}

#[test]
fn a_holder_that_disowns_its_copy_midway_over_a_plain_bulk_connection_is_quarantined() {
    liar_scenario(Lie::DisownsMidway, Via::Plain);
}

#[test]
fn a_holder_that_disowns_its_copy_midway_is_quarantined() {
    liar_scenario(Lie::DisownsMidway, Via::Quic);
}

#[test]
fn bytes_that_are_not_a_nar_never_reach_the_store() {
    liar_scenario(Lie::Garbage, Via::Quic);
}

#[test]
fn a_nar_with_one_byte_changed_never_reaches_the_store() {
    liar_scenario(Lie::FlippedByte, Via::Quic);
}

#[test]
fn too_many_bytes_never_reach_the_store() {
    liar_scenario(Lie::Overlong, Via::Quic);
}

#[test]
fn a_compression_bomb_never_reaches_the_store() {
    liar_scenario(Lie::Bomb, Via::Quic);
}

#[test]
fn a_chunk_frame_longer_than_its_bytes_never_reaches_the_store() {
    liar_scenario(Lie::Inflated, Via::Quic);
}

/// A liar among the holders of a striped download: A holds a 12 MiB
/// content-addressed path (six 2 MiB stripes) and the liar answers with
/// its narinfo and garbage for every stripe it is asked for; B stripes from
/// 1 MiB. The path never becomes valid with wrong bytes; within a few of
/// Nix's tries it arrives intact (from A), and the liar is quarantined.
#[test]
fn a_liar_inside_a_striped_download_is_found_and_never_gets_a_path_in() {
    let honest = NodeSettings {
        share: "content_addressed = true".into(),
        ..NodeSettings::default()
    };
    let a = MeshNode::new("a", &honest);
    let src = tempfile::tempdir().unwrap();
    let data = noise(12 << 20, 0x2545f4914f6cdd1d);
    std::fs::write(src.path().join("striped.bin"), &data).unwrap();
    let path = a.store.add(&src.path().join("striped.bin"));
    let json = a.store.path_info_json(&path);
    let narinfo = format!(
        "StorePath: {path}\nURL: nar/x.nar\nCompression: none\nNarHash: {}\nNarSize: {}\nReferences: \nCA: {}\n",
        json["narHash"].as_str().unwrap(),
        json["narSize"],
        json["ca"].as_str().unwrap(),
    );
    let nar = Arc::new(a.store.dump(&path));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (endpoint, node, addr) = fake_peer_endpoint(&rt, "liar");
    rt.spawn(run_liar(endpoint, narinfo, nar, Lie::Garbage));

    let client = NodeSettings {
        mesh: "stripe_from_mib = 1".into(),
        ..NodeSettings::default()
    };
    let b = MeshNode::new("b", &client);
    b.write_config(&client, &[&a]);
    add_static_peer(&b, &node, addr);
    let _agent_a = a.start();
    let agent_b = b.start();
    wait_for(Duration::from_secs(10), "b sees a and the liar", || {
        b.peer_state("liar").as_deref() == Some("alive")
            && b.peer_state("a").as_deref() == Some("alive")
    });
    let sub = format!("http://{}", b.substituter_addr());
    let mut tries = 0;
    while !b.store.is_valid(&path) && tries < 4 {
        tries += 1;
        let out = b.store.substitute(&sub, None, &[&path]);
        eprintln!(
            "striped liar, try {tries}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(b.store.is_valid(&path), "the path never arrived");
    assert_eq!(
        b.store.dump(&path),
        a.store.dump(&path),
        "B's copy is not A's"
    );
    let peers = b.peers();
    let liar = peers.iter().find(|p| p["name"] == "liar").unwrap();
    assert_eq!(liar["quarantined"], true, "{liar}");
    let log = agent_b.log_text();
    assert!(log.contains("striped"), "{log}");
    drop(rt);
}

#[test]
fn garbage_over_a_tls_bulk_connection_never_reaches_the_store() {
    liar_scenario(Lie::Garbage, Via::Tls);
}

#[test]
fn a_compression_bomb_over_a_plain_bulk_connection_never_reaches_the_store() {
    liar_scenario(Lie::Bomb, Via::Plain);
}

#[test]
fn a_holder_that_disowns_its_copy_midway_over_a_tls_bulk_connection_is_quarantined() {
    liar_scenario(Lie::DisownsMidway, Via::Tls);
}
