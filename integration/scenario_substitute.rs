//! Real Nix on one host substitutes through its agent from the others: a
//! signed file from one neighbour and a closure built and signed on
//! another; what the share and trust policies keep out stays out; a
//! corrupt copy never becomes a valid path; with no peer left the
//! substituter answers 404 at once and Nix falls back to the next cache.

use std::time::{Duration, Instant};

use nixmesh::api::SurveyAnswer;
use nixmesh::fetch::resolver::NEGATIVE_MEMO;
use nixmesh::mesh::node::WARMUP;

use crate::harness::{wait_until, Lan};
use crate::office::*;

#[test]
fn a_nix_client_substitutes_from_two_neighbours_through_its_agent() {
    let lan = Lan::new(3);
    let (a, b, c) = (lan.host(0), lan.host(1), lan.host(2));
    let office = a.generate_key("office-1");

    // A holds a file signed with the office key, which its Nix trusts.
    a.configure_nix(&nix_conf("", &[&office.public]));
    let file = a.add_file("report.txt", format!("{} report\n", lan.name()).as_bytes());
    let copied = a.add_file("copied.txt", b"fetched with nix copy\n");
    a.sign(&[&file, &copied], &office.secret_file);
    // C builds a closure and signs it with the office key as it shares it.
    let top = c.build(&closure_expr("subst", 64 * 1024));
    let built = c.closure(&top);
    assert_eq!(built.len(), 2, "{built:?}");
    // B's Nix knows only its agent, and trusts the office key.
    b.configure_nix(&nix_conf(SUBSTITUTER, &[&office.public]));

    let agent_a = a.start_agent("");
    let agent_b = b.start_agent("");
    let agent_c = c.start_agent(&signing(&office.secret_file));
    wait_all_alive(&[(a, &agent_a), (b, &agent_b), (c, &agent_c)]);

    realise(b, &[&file, &top]);
    for path in built.iter().chain([&file]) {
        assert_verified(b, path);
        assert_eq!(
            b.run_ok(&["nix-store", "--query", "--hash", path]),
            if path == &file { a } else { c }.run_ok(&["nix-store", "--query", "--hash", path]),
            "{path}"
        );
    }
    // Every path came with a signature B's Nix checked and keeps.
    let mut verify = vec!["nix", "store", "verify", "--sigs-needed", "1"];
    verify.extend(built.iter().map(String::as_str));
    verify.push(&file);
    b.run_ok(&verify);
    let sigs = b.run_ok(&["nix", "path-info", "--sigs", &top]);
    assert!(sigs.contains("office-1:"), "{sigs}");

    // `nix copy` from the substituter works too.
    b.run_ok(&["nix", "copy", "--from", SUBSTITUTER, &copied]);
    assert_verified(b, &copied);

    // B's agent says who served what: its log, its peer table, and why.
    let fingerprint = |name: &str| agent_b.peer(name).expect(name).fingerprint;
    let (fp_a, fp_c) = (fingerprint("h0"), fingerprint("h2"));
    let log = agent_b.log();
    for (path, fp) in [(&file, &fp_a), (&top, &fp_c), (&built[0], &fp_c)] {
        let line = format!("path={path} peer={fp}");
        assert!(
            log.lines()
                .any(|l| l.contains("substituted") && l.contains(&line)),
            "no `substituted {line}` in B's log:\n{log}"
        );
    }
    let fetched = |name: &str| agent_b.peer(name).expect(name).counters.bytes_fetched;
    assert!(fetched("h0") > 0 && fetched("h2") > 64 * 1024);
    assert!(agent_c.peer("h1").expect("h1").counters.bytes_served >= fetched("h2"));
    for (path, holder, other) in [(&file, "h0", "h2"), (&top, "h2", "h0")] {
        let rows = agent_b.why(path);
        let answer = |name: &str| {
            rows.iter()
                .find(|r| r.name == name)
                .unwrap_or_else(|| panic!("{name} not in {rows:#?}"))
        };
        assert_eq!(answer(holder).answer, SurveyAnswer::Has, "{rows:#?}");
        assert!(answer(holder).would_win, "{rows:#?}");
        assert_eq!(answer(other).answer, SurveyAnswer::NotFound, "{rows:#?}");
    }
    assert!(agent_b.metric("nixmesh_nar_completed_total") >= 4.0);
}

#[test]
fn unsigned_builds_stay_home_until_the_office_key_signs_them() {
    let lan = Lan::new(2);
    let (a, b) = (lan.host(0), lan.host(1));
    let office = a.generate_key("office-1");
    let top = a.build(&closure_expr("unsigned", 1024));
    let built = a.closure(&top);
    b.configure_nix(&nix_conf(SUBSTITUTER, &[&office.public]));

    // No signing key on A: its local builds are nobody's business.
    let mut agent_a = a.start_agent("");
    let agent_b = b.start_agent("");
    wait_all_alive(&[(a, &agent_a), (b, &agent_b)]);
    realise_fails(b, &[&top]);
    let refused = Instant::now();
    for path in &built {
        assert!(!b.has_path(path), "{path} reached B");
    }
    let rows = agent_b.why(&top);
    assert!(
        rows.iter()
            .any(|r| r.name == "h0" && r.answer == SurveyAnswer::NotFound),
        "{rows:#?}"
    );

    // With the office key, A signs and shares what it built.
    assert!(agent_a.stop().success(), "{}", agent_a.log());
    let agent_a = a.start_agent(&signing(&office.secret_file));
    wait_all_alive(&[(a, &agent_a), (b, &agent_b)]);
    // B's agent remembers "nobody has it" that long.
    std::thread::sleep(NEGATIVE_MEMO.saturating_sub(refused.elapsed()));
    realise(b, &[&top]);
    for path in &built {
        assert_verified(b, path);
    }
    b.run_ok(&["nix", "store", "verify", "--sigs-needed", "1", &top]);
}

#[test]
fn a_peer_signing_with_an_untrusted_key_gets_nothing_in() {
    let lan = Lan::new(2);
    let (d, b) = (lan.host(0), lan.host(1));
    let office = b.generate_key("office-1");
    let rogue = d.generate_key("rogue-1");
    // D shares everything and signs it with its own key, which B does not
    // trust.
    let top = d.build(&closure_expr("rogue", 1024));
    b.configure_nix(&nix_conf(SUBSTITUTER, &[&office.public]));
    let agent_d = d.start_agent(&format!(
        "{}[share]\nall = true\n",
        signing(&rogue.secret_file)
    ));
    let agent_b = b.start_agent("");
    wait_all_alive(&[(d, &agent_d), (b, &agent_b)]);

    realise_fails(b, &[&top]);
    for path in d.closure(&top) {
        assert!(!b.has_path(&path), "{path} reached B");
    }
    let rows = agent_b.why(&top);
    let row = rows.iter().find(|r| r.name == "h0").expect("h0 asked");
    assert!(matches!(row.answer, SurveyAnswer::Rejected(_)), "{rows:#?}");
    assert!(!row.would_win, "{rows:#?}");
    assert!(agent_b.metric("nixmesh_narinfo_rejected_total") >= 1.0);
    assert_eq!(agent_b.metric("nixmesh_narinfo_hits_total"), 0.0);
}

/// A holder keeps the NAR of a tree of small files encoded after serving
/// it twice. When that kept copy rots on disk, the asker's check catches
/// it, the holder is told, drops the kept copy (its store copy is intact)
/// and serves the path from the store again.
#[test]
fn a_rotten_kept_copy_is_dropped_when_a_peer_reports_it() {
    let lan = Lan::new(2);
    let (a, b) = (lan.host(0), lan.host(1));
    let office = a.generate_key("office-1");
    let tree = a.dir().join("files/many");
    for i in 0..40u32 {
        let dir = tree.join(format!("d{}", i % 4));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let bytes: Vec<u8> = (0..2000 + i * 53)
            .map(|j| (j * (i + 5) % 251) as u8)
            .collect();
        std::fs::write(dir.join(format!("f{i}")), bytes).expect("write");
    }
    let path = a.add_path(&tree);
    a.configure_nix(&nix_conf("", &[&office.public]));
    a.sign(&[&path], &office.secret_file);
    b.configure_nix(&nix_conf(SUBSTITUTER, &[&office.public]));
    let agent_a = a.start_agent("");
    let mut agent_b = b.start_agent("");
    wait_all_alive(&[(a, &agent_a), (b, &agent_b)]);
    let kept_dir = a.dir().join("nixmesh/nar-cache");
    let kept = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&kept_dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default()
    };

    // B takes the path twice: A serves it whole twice and keeps it.
    realise(b, &[&path]);
    assert!(kept().is_empty(), "kept after one serve: {:?}", kept());
    b.delete_path(&path);
    realise(b, &[&path]);
    wait_until(Duration::from_secs(5), "A keeps the NAR", || {
        kept()
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "nar"))
    });
    let entry = kept().into_iter().next().expect("an entry");

    // It rots: one byte flipped, size unchanged.
    let mut bytes = std::fs::read(&entry).expect("read the kept copy");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&entry, &bytes).expect("write the kept copy");
    b.delete_path(&path);
    drop(agent_b);
    agent_b = b.start_agent("");
    wait_all_alive(&[(a, &agent_a), (b, &agent_b)]);
    let stderr = realise_fails(b, &[&path]);
    eprintln!("rotten kept copy:\n{stderr}");
    assert!(!b.has_path(&path), "a rotten {path} is valid on B");
    assert!(agent_b.metric("nixmesh_nar_verify_failures_total") >= 1.0);
    wait_until(Duration::from_secs(10), "A checks its store copy", || {
        agent_a.log().contains("the store copy is intact")
    });
    assert!(kept().is_empty(), "the rotten copy is kept: {:?}", kept());

    // B afresh (its quarantine gone): the path comes from A's store.
    drop(agent_b);
    let agent_b = b.start_agent("");
    wait_all_alive(&[(a, &agent_a), (b, &agent_b)]);
    realise(b, &[&path]);
    assert_verified(b, &path);
}

#[test]
fn a_corrupt_copy_never_becomes_a_valid_path() {
    let lan = Lan::new(3);
    let (a, b, c) = (lan.host(0), lan.host(1), lan.host(2));
    let office = a.generate_key("office-1");
    // A and C hold the same 2 MiB file, signed with the office key.
    let source = random_file(&lan.host(0).dir().join("files"), "data.bin", 2 << 20);
    let path = a.add_path(&source);
    assert_eq!(c.add_path(&source), path);
    for holder in [a, c] {
        holder.configure_nix(&nix_conf("", &[&office.public]));
        holder.sign(&[&path], &office.secret_file);
    }
    b.configure_nix(&nix_conf(SUBSTITUTER, &[&office.public]));

    // A's copy rots: one byte flipped in the middle, size unchanged.
    let real = a.real_path(&path);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut bytes = std::fs::read(&real).expect("read A's copy");
    bytes[1 << 20] ^= 0x55;
    std::fs::write(&real, &bytes).expect("write A's copy");

    // Only A's agent is up: B's Nix must fail, and have nothing.
    let agent_a = a.start_agent("");
    let agent_b = b.start_agent("");
    wait_all_alive(&[(a, &agent_a), (b, &agent_b)]);
    let stderr = realise_fails(b, &[&path]);
    eprintln!("corrupt copy, A alone:\n{stderr}");
    assert!(!b.has_path(&path), "a corrupt {path} is valid on B");
    assert_eq!(agent_b.metric("nixmesh_nar_completed_total"), 0.0);
    assert!(agent_b.metric("nixmesh_nar_verify_failures_total") >= 1.0);
    let a_row = agent_b.peer("h0").expect("h0");
    assert!(a_row.quarantined, "A is not quarantined: {a_row:#?}");
    // A sent its copy unhashed (B hashes it); B told A, A hashed its copy
    // and shares it no more: B afresh (no quarantine) finds no one.
    wait_until(Duration::from_secs(10), "A finds its copy corrupt", || {
        agent_a
            .log()
            .contains("the store copy is corrupt; no longer sharing it")
    });
    assert!(agent_a
        .log()
        .contains("a peer says a NAR from here did not match its hash"));
    drop(agent_b);
    let agent_b = b.start_agent("");
    wait_all_alive(&[(a, &agent_a), (b, &agent_b)]);
    let narinfo = format!("{SUBSTITUTER}/{}.narinfo", hash_part(&path));
    assert_eq!(
        b.http_status(&narinfo).0,
        404,
        "A still offers its corrupt copy"
    );

    // A restarts (it remembers corrupt copies only while it runs) and
    // offers the copy again. An honest holder C joins, and B starts afresh.
    // A wins the narinfo race (C is paused for it), so the NAR comes from A
    // first: B must end with the intact path from C, or fail cleanly and
    // then get it from C; A is left out, C is not blamed.
    drop(agent_b);
    drop(agent_a);
    let agent_a = a.start_agent("");
    let agent_b = b.start_agent("");
    let agent_c = c.start_agent("");
    wait_all_alive(&[(a, &agent_a), (b, &agent_b), (c, &agent_c)]);
    agent_c.signal("STOP");
    let (status, _) = b.http_status(&narinfo);
    agent_c.signal("CONT");
    assert_eq!(status, 200);
    let first = b.run(&["nix-store", "--realise", &path]);
    eprintln!(
        "corrupt copy, A and C: first try {}:\n{}",
        first.status,
        String::from_utf8_lossy(&first.stderr)
    );
    assert_absent_or_intact(b, &path);
    assert!(agent_b.peer("h0").expect("h0").quarantined);
    assert!(!agent_b.peer("h2").expect("h2").quarantined);
    if !first.status.success() {
        realise(b, &[&path]);
    }
    assert_verified(b, &path);
    assert_eq!(
        b.run_ok(&["nix-store", "--query", "--hash", &path]),
        c.run_ok(&["nix-store", "--query", "--hash", &path]),
    );
    let c_row = agent_b.peer("h2").expect("h2");
    assert!(c_row.counters.bytes_fetched > 0, "{c_row:#?}");
    assert!(!c_row.quarantined, "{c_row:#?}");
}

#[test]
fn with_no_peer_left_nix_falls_back_to_the_next_cache_at_once() {
    let lan = Lan::new(3);
    let (a, b, u) = (lan.host(0), lan.host(1), lan.host(2));
    // U: an upstream cache outside the mesh, signing what it serves.
    let upstream = u.generate_key("upstream-1");
    let top = u.build(&closure_expr("fallback", 1024));
    let _agent_u = u.start_agent(&upstream_config(u, &upstream.secret_file));
    b.configure_nix(&nix_conf(
        &format!("{SUBSTITUTER} {}", cache_url(u)),
        &[&upstream.public],
    ));

    let mut agent_a = a.start_agent("");
    // Not pulling from U itself (which it would, U being in its nix.conf):
    // this is about Nix's own fallback when the agent cannot help.
    let agent_b = b.start_agent("[upstream]\ncaches = []\n");
    let b_started = Instant::now();
    wait_all_alive(&[(a, &agent_a), (b, &agent_b)]);
    assert!(agent_b.peer("h2").is_none(), "U is not in the mesh");
    // Right after start a race waits a little for the first peer; past
    // that, no peer means an answer at once.
    std::thread::sleep(WARMUP.saturating_sub(b_started.elapsed()));
    let narinfo = format!(
        "{SUBSTITUTER}/{}.narinfo",
        &top["/nix/store/".len()..][..32]
    );

    // A dies: while it is still suspect, and once it is gone, B's
    // substituter says 404 quickly.
    agent_a.kill();
    let (status, took) = b.http_status(&narinfo);
    eprintln!("no peers: narinfo answered {status} in {took:?} with h0 just killed");
    assert_eq!(status, 404);
    assert!(took < Duration::from_secs(2), "took {took:?}");
    wait_until(Duration::from_secs(8), "A gone", || {
        agent_b
            .peer("h0")
            .is_none_or(|p| p.state == nixmesh::mesh::peers::PeerState::Gone)
    });
    let (status, took) = b.http_status(&narinfo);
    eprintln!("no peers: narinfo answered {status} in {took:?} with h0 gone");
    assert_eq!(status, 404);
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // Nix asks the mesh first, hears 404, and gets the closure from U.
    let started = Instant::now();
    realise(b, &[&top]);
    let took = started.elapsed();
    eprintln!("no peers: nix-store -r via the upstream took {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    for path in u.closure(&top) {
        assert_verified(b, &path);
    }
    let sigs = b.run_ok(&["nix", "path-info", "--sigs", &top]);
    assert!(sigs.contains("upstream-1:"), "{sigs}");
}
