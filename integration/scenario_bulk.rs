//! Bulk connections (protocol version 5): between two hosts of a LAN, a
//! large NAR goes over TLS on TCP at the mesh port and a small one (under
//! `KEPT_FROM`, which a kept connection of version 7 would take) stays on
//! QUIC; when the holder's firewall drops TCP at that port, the large NAR
//! still arrives (over QUIC, after one failed attempt), and the next one
//! goes over QUIC at once, without trying TCP again. A holder packs
//! chunks by what the link takes (behind a slow link, what compresses),
//! with LZ4 for an asker of version 6 and zstd only for one of version 5.
//! A kept connection the holder's side dropped (its socket reset) costs
//! the next NAR nothing but a new connection.
//! From version 8, in an open mesh, bulk connections go without TLS; a
//! holder that keeps TLS refuses them once and gets TLS from then on, a
//! closed mesh never tries them, and a byte changed on the wire of one is
//! caught like a lying holder's, but moves the holder's bulk connections
//! under TLS rather than quarantining it.

use std::time::Duration;

use nixmesh::mesh::bulk::KEEP_IDLE;

use crate::harness::{wait_until, AgentHandle, Host, Lan};
use crate::office::*;

const LARGE: u64 = 24 << 20;
const SMALL: u64 = 512 << 10;
const NO_BULK: &str = "no bulk connection to peer";

#[test]
fn large_nars_go_over_tcp_and_over_quic_when_tcp_is_blocked() {
    let lan = Lan::new(2);
    let (client, holder) = (lan.host(0), lan.host(1));
    let (paths, agent_c, agent_h) = client_and_holder_of(
        &lan,
        &[
            ("large-1.bin", LARGE),
            ("small.bin", SMALL),
            ("large-2.bin", LARGE),
            ("large-3.bin", LARGE),
        ],
    );
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let bulk_fetches = || agent_c.peer("h1").map_or(0, |p| p.counters.bulk_fetches);

    // The large NAR over TCP, the small one on QUIC.
    realise(client, &[refs[0], refs[1]]);
    assert_verified(client, refs[0]);
    assert_verified(client, refs[1]);
    assert_eq!(bulk_fetches(), 1, "one NAR (the large one) over TCP");
    assert!(agent_c.peer("h1").is_some_and(|p| !p.bulk_refused));
    // An open mesh (version 8): that connection went without TLS.
    let dialled = agent_c
        .peer("h1")
        .map(|p| (p.counters.bulk_connections, p.counters.bulk_plain));
    assert_eq!(dialled, Some((1, 1)), "one plain bulk connection");
    let served = agent_h.peer("h0").map_or(0, |p| p.counters.bytes_served);
    assert!(served >= LARGE + SMALL, "H served {served} bytes to C");

    // The holder's firewall drops TCP at the mesh port: one attempt fails
    // after its handshake timeout, the NAR comes over QUIC.
    holder.run_ok(&["nft", "add", "table", "inet", "nixmesh_bulk"]);
    holder.run_ok(&[
        "nft",
        "add chain inet nixmesh_bulk in { type filter hook input priority 0 ; policy accept ; }",
    ]);
    holder.run_ok(&[
        "nft",
        &format!("add rule inet nixmesh_bulk in tcp dport {MESH_PORT} drop"),
    ]);
    realise(client, &[refs[2]]);
    assert_verified(client, refs[2]);
    assert_eq!(bulk_fetches(), 1, "no NAR over TCP while it is blocked");
    assert!(
        agent_c.peer("h1").is_some_and(|p| p.bulk_refused),
        "nixmesh peers --json shows the failed bulk connection"
    );
    assert_eq!(
        agent_c.log().matches(NO_BULK).count(),
        1,
        "{}",
        agent_c.log()
    );

    // The next large NAR from that holder goes over QUIC without trying.
    realise(client, &[refs[3]]);
    assert_verified(client, refs[3]);
    assert_eq!(bulk_fetches(), 1);
    assert_eq!(
        agent_c.log().matches(NO_BULK).count(),
        1,
        "TCP was tried again: {}",
        agent_c.log()
    );
}

/// Version 8 where TLS is kept: a holder set to `bulk_encryption =
/// "always"` refuses the client's plain connection, the client dials it
/// under TLS at once and keeps to TLS with it; in a closed mesh (both
/// agents with the office's mesh secret) no plain connection is tried.
/// Every NAR arrives and verifies.
#[test]
fn bulk_connections_stay_under_tls_where_a_holder_or_the_mesh_keeps_it() {
    const REFUSED: &str = "peer takes bulk connections under TLS only";
    let lan = Lan::new(2);
    let (client, holder) = (lan.host(0), lan.host(1));
    let (paths, mut agent_c, mut agent_h) = client_and_holder_with(
        &lan,
        &[
            ("large-1.bin", LARGE),
            ("large-2.bin", LARGE),
            ("large-3.bin", LARGE),
        ],
        "",
        "[mesh]\nbulk_encryption = \"always\"\n",
    );
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let counters = |agent: &AgentHandle| {
        agent.peer("h1").map(|p| {
            (
                p.counters.bulk_fetches,
                p.counters.bulk_connections,
                p.counters.bulk_plain,
            )
        })
    };

    realise(client, &[refs[0]]);
    assert_verified(client, refs[0]);
    assert_eq!(
        counters(&agent_c),
        Some((1, 1, 0)),
        "one plain connection refused, then one under TLS: {}",
        agent_c.log()
    );
    assert_eq!(agent_c.log().matches(REFUSED).count(), 1);
    assert!(!agent_c.log().contains(NO_BULK), "{}", agent_c.log());
    // Once the kept connection has idled out, the next NAR gets a new
    // one, under TLS without trying plain again.
    std::thread::sleep(KEEP_IDLE + Duration::from_secs(1));
    realise(client, &[refs[1]]);
    assert_verified(client, refs[1]);
    assert_eq!(counters(&agent_c), Some((2, 2, 0)), "{}", agent_c.log());
    assert_eq!(agent_c.log().matches(REFUSED).count(), 1);
    agent_c.stop();

    // Both agents in a closed mesh: TLS only, nothing plain tried.
    let secret = client.dir().join("mesh-secret");
    std::fs::write(&secret, b"the office's mesh secret").expect("write the secret");
    let mesh = format!(
        "[mesh]\nsecret_file = {}\n",
        toml::Value::String(secret.display().to_string())
    );
    agent_h.stop();
    let agent_h = holder.start_agent(&mesh);
    let agent_c = client.start_agent(&mesh);
    wait_all_alive(&[(client, &agent_c), (holder, &agent_h)]);
    realise(client, &[refs[2]]);
    assert_verified(client, refs[2]);
    assert_eq!(counters(&agent_c), Some((1, 1, 0)), "{}", agent_c.log());
    assert!(!agent_c.log().contains(REFUSED), "{}", agent_c.log());
}

/// Version 8, an open mesh: a host on the path changes one byte of the
/// holder's answer on a plain bulk connection (a proxy on the holder's
/// host, through which nftables sends TCP to the mesh port). The client
/// finds that the NAR does not match its NarHash: Nix never gets a corrupt
/// valid path. The holder is not quarantined, since the bytes came in the
/// clear: they come again under TLS, and intact.
#[test]
fn a_byte_changed_on_a_plain_bulk_connection_never_makes_a_valid_path_and_moves_to_tls() {
    let lan = Lan::new(2);
    let (client, holder) = (lan.host(0), lan.host(1));
    let (paths, agent_c, _agent_h) = client_and_holder_of(&lan, &[("large-1.bin", LARGE)]);
    let flipped = tamper_on_the_path(holder, 8 << 20, 1);

    let out = client.run(&["nix-store", "--realise", &paths[0]]);
    assert_eq!(
        flipped.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the proxy changed no byte: {}",
        agent_c.log()
    );
    assert_absent_or_intact(client, &paths[0]);
    // The holder is not blamed for what the path did: its bulk
    // connections go under TLS (through the same proxy, which changes
    // nothing more), and the path arrives from it, on Nix's own retry or
    // the next `nix-store`.
    if !client.has_path(&paths[0]) {
        realise(client, &[&paths[0]]);
    }
    assert_verified(client, &paths[0]);
    let view = agent_c.peer("h1").expect("the holder in the table");
    let c = &view.counters;
    assert!(
        !view.quarantined
            && (c.bulk_plain, c.bulk_moved_to_tls) == (1, 1)
            && c.bulk_connections >= 2,
        "{view:?} (nix-store: {}):\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent_c.log()
    );
    let log = agent_c.log();
    assert!(
        log.contains("bulk connections to the peer go under TLS"),
        "{log}"
    );
    assert!(!log.contains("quarantining a peer"), "{log}");
}

/// Version 8, an open mesh: a host on the path changes a byte of every
/// bulk connection to the holder, and the client's Nix asks for two of its
/// paths at once, so two plain connections are under way when the first
/// NAR fails its check. Neither failure quarantines the holder (the bytes
/// came in the clear): its bulk connections move under TLS once, where
/// the changed byte breaks the TLS record (a failed holder, not a lie).
/// Nix never gets a corrupt valid path.
#[test]
fn a_host_on_the_path_that_changes_every_connection_gets_no_holder_quarantined() {
    let lan = Lan::new(2);
    let (client, holder) = (lan.host(0), lan.host(1));
    let (paths, agent_c, _agent_h) =
        client_and_holder_of(&lan, &[("large-1.bin", LARGE), ("large-2.bin", LARGE)]);
    let flipped = tamper_on_the_path(holder, 8 << 20, u64::MAX);

    let out = client.run(&["nix-store", "--realise", &paths[0], &paths[1]]);
    for path in &paths {
        assert_absent_or_intact(client, path);
    }
    let view = agent_c.peer("h1").expect("the holder in the table");
    let c = &view.counters;
    let log = agent_c.log();
    let nix = String::from_utf8_lossy(&out.stderr);
    assert!(
        flipped.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "{nix}\n{log}"
    );
    // Both NARs went out on plain connections, dialled before either
    // failed; after that, only TLS ones.
    assert_eq!(c.bulk_plain, 2, "{view:?}\n{nix}\n{log}");
    assert!(c.bulk_connections > c.bulk_plain, "{view:?}\n{log}");
    assert!(
        !view.quarantined && c.bulk_moved_to_tls == 1,
        "{view:?}\n{nix}\n{log}"
    );
    assert!(!log.contains("quarantining a peer"), "{log}");
    assert!(
        agent_c.metric("nixmesh_nar_verify_failures_total") >= 2.0,
        "{log}"
    );
}

#[test]
fn a_kept_connection_that_was_reset_is_dialled_anew() {
    let lan = Lan::new(2);
    let (client, holder) = (lan.host(0), lan.host(1));
    let (paths, agent_c, _agent_h) =
        client_and_holder_of(&lan, &[("large-1.bin", LARGE), ("large-2.bin", LARGE)]);
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let counters = || {
        agent_c.peer("h1").map_or((0, 0), |p| {
            (p.counters.bulk_fetches, p.counters.bulk_connections)
        })
    };

    realise(client, &[refs[0]]);
    assert_verified(client, refs[0]);
    assert_eq!(counters(), (1, 1), "one NAR over one bulk connection");
    // The holder's kernel resets the connection the client keeps for the
    // next part (`ss -K`: as if the holder had crashed or been rebooted
    // behind the same address), well within the client's keep time.
    let killed = holder.run_ok(&[
        "ss",
        "-K",
        "-t",
        "-n",
        "state",
        "established",
        "(",
        "sport",
        "=",
        &format!(":{MESH_PORT}"),
        ")",
    ]);
    assert!(
        killed.contains(&MESH_PORT.to_string()),
        "no connection reset: {killed}"
    );

    realise(client, &[refs[1]]);
    assert_verified(client, refs[1]);
    assert_eq!(
        counters(),
        (2, 2),
        "the second NAR over a new bulk connection: {}",
        agent_c.log()
    );
    let log = agent_c.log();
    assert!(log.contains("a kept bulk connection failed"), "{log}");
    assert!(!log.contains(NO_BULK), "the holder was rested: {log}");
}

/// Host 1 holds a path for each of `files` (random bytes of that size),
/// signed by a key host 0's Nix trusts; both run agents that see each
/// other. The paths, then the client's agent and the holder's.
fn client_and_holder_of(
    lan: &Lan,
    files: &[(&str, u64)],
) -> (Vec<String>, AgentHandle, AgentHandle) {
    client_and_holder_with(lan, files, "", "")
}

/// As `client_and_holder_of`, the agents started with these configs.
fn client_and_holder_with(
    lan: &Lan,
    files: &[(&str, u64)],
    client_config: &str,
    holder_config: &str,
) -> (Vec<String>, AgentHandle, AgentHandle) {
    let (client, holder) = (lan.host(0), lan.host(1));
    let office = client.generate_key("office-1");
    let dir = holder.dir().join("files");
    let made: Vec<_> = files
        .iter()
        .map(|(name, size)| random_file(&dir, name, *size))
        .collect();
    let paths = add_paths(holder, &made);
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    holder.configure_nix(&nix_conf("", &[&office.public]));
    holder.sign(&refs, &office.secret_file);
    client.configure_nix(&nix_conf(SUBSTITUTER, &[&office.public]));
    let agent_h = holder.start_agent(holder_config);
    let agent_c = client.start_agent(client_config);
    wait_all_alive(&[(client, &agent_c), (holder, &agent_h)]);
    (paths, agent_c, agent_h)
}

/// Behind a 50 Mbit/s link a holder packs what compresses: its TCP
/// connection delivers far slower than zstd packs, so the NAR of a text
/// file crosses the link in a fraction of its bytes (`mesh::pace`).
#[test]
fn a_holder_behind_a_slow_link_packs_what_compresses() {
    let lan = Lan::new(2);
    let (client, holder) = (lan.host(0), lan.host(1));
    let office = client.generate_key("office-1");
    let files = holder.dir().join("files");
    std::fs::create_dir_all(&files).expect("files dir");
    let text = files.join("log.txt");
    let mut body = String::new();
    let mut i: u64 = 0;
    while body.len() < LARGE as usize {
        body.push_str(&format!(
            "{i:08} a line of a log that compresses well, {}\n",
            i * 7919 % 1000
        ));
        i += 1;
    }
    std::fs::write(&text, &body).expect("write the text file");
    let paths = add_paths(holder, &[text]);
    holder.configure_nix(&nix_conf("", &[&office.public]));
    holder.sign(&[&paths[0]], &office.secret_file);
    client.configure_nix(&nix_conf(SUBSTITUTER, &[&office.public]));
    let agent_h = holder.start_agent("");
    let agent_c = client.start_agent("");
    wait_all_alive(&[(client, &agent_c), (holder, &agent_h)]);
    holder.shape(50_000_000);

    let before = holder.link_bytes().sent;
    realise(client, &[&paths[0]]);
    assert_verified(client, &paths[0]);
    let sent = holder.link_bytes().sent - before;
    assert_eq!(
        agent_c.peer("h1").map_or(0, |p| p.counters.bulk_fetches),
        1,
        "the NAR came over TCP"
    );
    let nar = body.len() as u64;
    assert!(
        sent < nar / 3,
        "H sent {sent} bytes for a NAR of {nar} that compresses"
    );
}

/// The regular files of `dir`, concatenated in name order, up to `len`
/// bytes.
fn files_in(dir: &str, len: usize) -> Vec<u8> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    names.sort();
    let mut out = Vec::with_capacity(len);
    for name in names {
        if out.len() >= len {
            break;
        }
        if let Ok(bytes) = std::fs::read(&name) {
            out.extend_from_slice(&bytes);
        }
    }
    assert!(out.len() >= len, "only {} bytes in {dir}", out.len());
    out.truncate(len);
    out
}

/// This machine's shared libraries, concatenated in name order up to
/// `len` bytes: real binaries, which compress about 2.7x.
fn binaries(len: usize) -> Vec<u8> {
    files_in("/usr/lib/x86_64-linux-gnu", len)
}

/// `len` bytes of text that every chunk of a NAR compresses many times
/// over, with LZ4 as with zstd: the first 16 KiB of the machine's licence
/// texts, again and again (well inside LZ4's 64 KiB window).
fn texts(len: usize) -> Vec<u8> {
    let unit = files_in("/usr/share/common-licenses", 16 << 10);
    unit.iter().copied().cycle().take(len).collect()
}

/// A path of `LARGE` bytes of the machine's binaries on `holder`, signed
/// by a key the `askers`' Nix trusts, whose substituter is their agent.
fn binaries_on(holder: &Host, askers: &[&Host]) -> String {
    file_on(holder, askers, &binaries(LARGE as usize))
}

/// A path holding `content` on `holder`, signed by a key the `askers`' Nix
/// trusts, whose substituter is their agent.
fn file_on(holder: &Host, askers: &[&Host], content: &[u8]) -> String {
    let office = askers[0].generate_key("office-1");
    let files = holder.dir().join("files");
    std::fs::create_dir_all(&files).expect("files dir");
    let lib = files.join("libraries.bin");
    std::fs::write(&lib, content).expect("write the file");
    let path = add_paths(holder, &[lib]).remove(0);
    holder.configure_nix(&nix_conf("", &[&office.public]));
    holder.sign(&[&path], &office.secret_file);
    for asker in askers {
        asker.configure_nix(&nix_conf(SUBSTITUTER, &[&office.public]));
    }
    path
}

/// On a fast link a holder's pace sends most chunks raw or as LZ4, and only
/// the zstd frames it packed are kept. Once no peer is being served, the
/// holder packs the rest (`agent::frame_filler`), and the next asker gets
/// every chunk that compresses as a kept frame, packed from the right
/// bytes.
#[test]
fn a_holder_fills_in_the_frames_a_serve_did_not_pack() {
    let lan = Lan::new(3);
    let (first, holder, second) = (lan.host(0), lan.host(1), lan.host(2));
    let path = binaries_on(holder, &[first, second]);
    let agent_h = holder.start_agent("");
    // The askers share nothing, so each gets the path from H: the first
    // with the default `auto`, the second asking zstd for every chunk.
    let adaptive = "[share]\ntrusted_keys = []\n";
    let every_chunk = "[share]\ntrusted_keys = []\n[mesh]\ncompression = 1\n";
    let agent_1 = first.start_agent(adaptive);
    let agent_2 = second.start_agent(every_chunk);
    wait_all_alive(&[(first, &agent_1), (holder, &agent_h), (second, &agent_2)]);
    let metric = |name: &str| agent_h.metric(name);
    let chunks = LARGE.div_ceil(256 << 10) as f64;

    realise(first, &[&path]);
    assert_verified(first, &path);
    let zstd = agent_h.peer("h0").map_or(0, |p| p.counters.served_zstd);
    assert!(
        zstd < LARGE * 9 / 10,
        "unshaped, H sent h0 {zstd} of {LARGE} NAR bytes as zstd: no chunk left to fill"
    );
    wait_until(Duration::from_secs(60), "H fills in its frames", || {
        metric("nixmesh_packed_chunks_filled_total") > 0.0
            && metric("nixmesh_packed_fill_pending") == 0.0
    });
    let kept = metric("nixmesh_packed_chunks_kept_total");
    assert!(
        kept > chunks / 2.0,
        "H keeps {kept} frames of {chunks} chunks"
    );

    let served = metric("nixmesh_packed_chunks_served_total");
    realise(second, &[&path]);
    assert_verified(second, &path);
    let sent_kept = metric("nixmesh_packed_chunks_served_total") - served;
    assert!(
        sent_kept >= kept,
        "H sent {sent_kept} kept frames of the {kept} it keeps"
    );
    assert_eq!(agent_2.metric("nixmesh_nar_verify_failures_total"), 0.0);
}

/// Version 6: where LZ4 carries the most NAR per second, a holder packs
/// chunks for an asker of version 6 with LZ4, and an asker held at version
/// 5 gets zstd only; both get the path intact. Which codec wins on which
/// link is `mesh::pace`'s unit tests' business; here the data and the link
/// leave no doubt on any machine: text that both codecs shrink many times
/// over, so each carries as much NAR as it packs, and LZ4 packs it about
/// twice as fast as zstd and far faster than a gigabit link (machine
/// binaries at 1 Gbit/s left LZ4 short of raw on a busy machine). The
/// NAR is long enough for a second, warm measurement of the codecs.
#[test]
fn an_asker_of_version_6_gets_lz4_chunks_and_one_of_version_5_zstd_only() {
    let lan = Lan::new(3);
    let (new, holder, old) = (lan.host(0), lan.host(1), lan.host(2));
    holder.shape(1_000_000_000);
    // 256 chunks: the pace measures its codecs on the first chunk, cold
    // (a codec's first use, a busy machine) and slow enough that raw may
    // win, and again on chunk 129, warm.
    let path = file_on(holder, &[new, old], &texts(64 << 20));
    let agent_h = holder.start_agent("");
    // The askers share nothing, so each gets the path from H.
    let asker = "[share]\ntrusted_keys = []\n";
    let agent_new = new.start_agent(asker);
    let agent_old = old.start_agent(&format!("{asker}[mesh]\nmax_protocol = 5\n"));
    wait_all_alive(&[(new, &agent_new), (holder, &agent_h), (old, &agent_old)]);

    for (client, agent, name) in [(new, &agent_new, "h0"), (old, &agent_old, "h2")] {
        realise(client, &[&path]);
        assert_verified(client, &path);
        assert_eq!(
            agent.peer("h1").map_or(0, |p| p.counters.bulk_fetches),
            1,
            "{name}: the NAR came over TCP"
        );
    }
    let served = |name: &str| {
        let c = agent_h.peer(name).map(|p| p.counters).unwrap_or_default();
        (c.served_lz4, c.served_zstd)
    };
    let (lz4, _) = served("h0");
    assert!(
        lz4 > 0,
        "H packed nothing with LZ4 for h0: {:?}",
        served("h0")
    );
    let (lz4, zstd) = served("h2");
    assert_eq!(lz4, 0, "H packed LZ4 for an asker of version 5");
    assert!(zstd > 0, "H packed nothing for h2: {:?}", served("h2"));
}

/// A holder keeps the zstd frames it packed (`store::packed_frames`): the
/// next asker of the same NAR gets them without the holder packing again.
/// `host` as new for its next fetch of `path`: the path gone from its
/// store (if there) and its agent restarted with `config` (no memo, no
/// quarantine), seeing `holder` again.
fn afresh(
    host: &Host,
    agent: AgentHandle,
    config: &str,
    path: &str,
    holder: (&Host, &AgentHandle),
) -> AgentHandle {
    if host.has_path(path) {
        host.delete_path(path);
    }
    drop(agent);
    let agent = host.start_agent(config);
    wait_all_alive(&[(host, &agent), holder]);
    agent
}

/// A kept frame that rots fails its CRC and is packed afresh, costing the
/// asker nothing; one that was kept wrong (its CRC holds) fails the asker's
/// NarHash, and the holder, told, drops its frames.
#[test]
fn a_holder_keeps_its_zstd_frames_for_the_next_asker() {
    let lan = Lan::new(3);
    let (first, holder, second) = (lan.host(0), lan.host(1), lan.host(2));
    let path = binaries_on(holder, &[first, second]);
    let agent_h = holder.start_agent("");
    // The askers share nothing, so each gets the path from H, every chunk
    // packed with zstd at level 1.
    let asker = "[share]\ntrusted_keys = []\n[mesh]\ncompression = 1\n";
    let mut agent_1 = first.start_agent(asker);
    let mut agent_2 = second.start_agent(asker);
    wait_all_alive(&[(first, &agent_1), (holder, &agent_h), (second, &agent_2)]);
    let kept = || agent_h.metric("nixmesh_packed_chunks_kept_total");
    let served = || agent_h.metric("nixmesh_packed_chunks_served_total");
    let chunks = LARGE.div_ceil(256 << 10) as f64;

    realise(first, &[&path]);
    assert_verified(first, &path);
    let kept_first = kept();
    assert!(
        kept_first > chunks / 2.0,
        "H kept {kept_first} of {chunks} chunks"
    );
    assert_eq!(served(), 0.0);

    realise(second, &[&path]);
    assert_verified(second, &path);
    assert!(
        served() >= kept_first,
        "H served {} kept frames of {kept_first}",
        served()
    );
    let zstd = agent_h.peer("h2").map_or(0, |p| p.counters.served_zstd);
    assert!(zstd >= LARGE / 2, "H sent h2 {zstd} bytes of NAR as zstd");

    let frames_dir = holder.dir().join("nixmesh/packed");
    let frames_file = || -> Option<std::path::PathBuf> {
        std::fs::read_dir(&frames_dir)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "frames"))
    };
    let file = frames_file().expect("H's frames file");

    // A byte of slot 0's payload rots: H finds it and packs the chunk anew.
    let mut bytes = std::fs::read(&file).expect("read the frames");
    bytes[16 + 100] ^= 0x20;
    std::fs::write(&file, &bytes).expect("write the frames");
    agent_1 = afresh(first, agent_1, asker, &path, (holder, &agent_h));
    realise(first, &[&path]);
    assert_verified(first, &path);
    assert!(agent_h.log().contains("kept zstd frames are unreadable"));
    assert_eq!(agent_1.metric("nixmesh_nar_verify_failures_total"), 0.0);

    // Slot 2 (file contents, past the NAR's header) replaced by a frame
    // packed from other bytes (as if from a store copy mended since): H
    // finds it from the chunk's CRC and packs the chunk anew.
    const CHUNK: usize = 256 << 10;
    let other = vec![7u8; CHUNK];
    let nar = holder.run(&["nix-store", "--dump", &path]).stdout;
    let chunk_2 = &nar[2 * CHUNK..3 * CHUNK];
    // Slots are 256 KiB and one 4 KiB block apart.
    let slot_2_at = 2 * (CHUNK + 4096);
    let wrong_slot_2 = |packed_from: &[u8]| {
        let wrong = zstd::bulk::compress(&other, 1).expect("zstd");
        let mut slot = Vec::new();
        slot.extend_from_slice(b"NMZ1");
        slot.extend_from_slice(&(CHUNK as u32).to_be_bytes());
        slot.extend_from_slice(&(wrong.len() as u32).to_be_bytes());
        slot.extend_from_slice(&crc32fast::hash(&wrong).to_be_bytes());
        slot.extend_from_slice(&crc32fast::hash(packed_from).to_be_bytes());
        slot.extend_from_slice(&wrong);
        slot
    };
    let put_slot_2 = |packed_from: &[u8]| {
        let file = frames_file().expect("H keeps frames");
        let slot = wrong_slot_2(packed_from);
        let mut bytes = std::fs::read(&file).expect("read the frames");
        bytes[slot_2_at..slot_2_at + slot.len()].copy_from_slice(&slot);
        std::fs::write(&file, &bytes).expect("write the frames");
    };
    put_slot_2(&other);
    agent_1 = afresh(first, agent_1, asker, &path, (holder, &agent_h));
    realise(first, &[&path]);
    assert_verified(first, &path);
    assert!(agent_h
        .log()
        .contains("a frame was packed from other NAR bytes"));
    assert_eq!(agent_1.metric("nixmesh_nar_verify_failures_total"), 0.0);

    // The same frame claiming to be packed from the chunk's own bytes:
    // nothing on H can tell; the asker's NarHash can, and H, told, drops
    // its frames.
    put_slot_2(chunk_2);
    agent_2 = afresh(second, agent_2, asker, &path, (holder, &agent_h));
    let stderr = realise_fails(second, &[&path]);
    eprintln!("a wrong kept frame:\n{stderr}");
    assert!(!second.has_path(&path), "a wrong {path} is valid on h2");
    assert!(agent_2.metric("nixmesh_nar_verify_failures_total") >= 1.0);
    wait_until(Duration::from_secs(10), "H checks its store copy", || {
        agent_h.log().contains("the store copy is intact")
    });
    // Gone with its file (H may have packed the NAR's frames again from
    // its intact copy since, while idle: `agent::frame_filler`).
    let slot = wrong_slot_2(chunk_2);
    let kept_wrong = frames_file()
        .and_then(|f| std::fs::read(f).ok())
        .is_some_and(|b| b.get(slot_2_at..slot_2_at + slot.len()) == Some(&slot[..]));
    assert!(!kept_wrong, "H keeps the wrong frame");

    // h2 afresh (its quarantine gone): packed from H's store again.
    let _agent_2 = afresh(second, agent_2, asker, &path, (holder, &agent_h));
    realise(second, &[&path]);
    assert_verified(second, &path);

    // An asker with the default `auto` behind a slow link: H's pace packs
    // (zstd or LZ4), and sends the kept frames instead but for the chunks
    // it packs to measure.
    holder.shape(50_000_000);
    let adaptive = "[share]\ntrusted_keys = []\n";
    let _agent_1 = afresh(first, agent_1, adaptive, &path, (holder, &agent_h));
    let before = served();
    realise(first, &[&path]);
    assert_verified(first, &path);
    let reused = served() - before;
    assert!(
        reused > chunks / 2.0,
        "H sent {reused} kept frames of {chunks} chunks to an adaptive asker"
    );
}
