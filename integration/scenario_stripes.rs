//! A large NAR that several peers hold comes in stripes from all of them at
//! once: Nix on C substitutes a 256 MiB path held by three holders, each
//! behind a 300 Mbit/s link; every holder sends part of it, and one of them
//! SIGKILLed (or SIGSTOPped) half-way leaves its stripes to the others (the first missing
//! stripe is also asked of an idle holder, so the dead one's is usually
//! there before its stream is found dead). Nix sees one download, and the
//! path verifies.

use std::time::{Duration, Instant};

use crate::harness::{wait_until, Lan};
use crate::office::*;
use crate::scenario_failover::{exited, nix_output, spawn_realise, wait_exit};

const SIZE: u64 = 256 << 20;
/// Each holder's link.
const RATE: u64 = 300_000_000;
/// NAR bytes C has (from all holders) when one holder is killed.
const CUT_AT: u64 = 96 << 20;
/// NAR bytes per stripe (`fetch::stripes::STRIPE`).
const STRIPE: u64 = 2 << 20;

#[derive(Clone, Copy, Debug)]
enum Loss {
    /// SIGKILL: its streams end.
    Crash,
    /// SIGSTOP: its streams go silent (stalled after 3 s).
    Freeze,
}

#[test]
fn a_large_nar_comes_in_stripes_from_every_holder_and_survives_losing_one() {
    striped(Loss::Crash);
}

#[test]
fn a_striped_nar_survives_a_holder_that_freezes() {
    striped(Loss::Freeze);
}

fn striped(loss: Loss) {
    let lan = Lan::new(4);
    let client = lan.host(0);
    let holders = [lan.host(1), lan.host(2), lan.host(3)];
    let office = client.generate_key("office-1");
    let source = random_file(&holders[0].dir().join("files"), "striped.bin", SIZE);
    let path = holders[0].add_path(&source);
    for h in &holders[1..] {
        assert_eq!(h.add_path(&source), path);
    }
    std::fs::remove_file(&source).expect("remove the source file");
    for h in holders {
        h.configure_nix(&nix_conf("", &[&office.public]));
        h.sign(&[&path], &office.secret_file);
    }
    client.configure_nix(&nix_conf(SUBSTITUTER, &[&office.public]));
    let mut agents: Vec<_> = holders.iter().map(|h| h.start_agent("")).collect();
    let agent_c = client.start_agent("");
    let mut all: Vec<_> = holders.iter().copied().zip(agents.iter()).collect();
    all.push((client, &agent_c));
    wait_all_alive(&all);
    drop(all);
    for h in holders {
        h.shape(RATE);
    }

    let fetched = |name: &str| agent_c.peer(name).map_or(0, |p| p.counters.bytes_fetched);
    let names = ["h1", "h2", "h3"];
    let started = Instant::now();
    let mut nix = spawn_realise(client, &path);
    wait_until(
        Duration::from_secs(60),
        "C fetching from every holder",
        || {
            let total: u64 = names.iter().map(|n| fetched(n)).sum();
            (total >= CUT_AT && names.iter().all(|n| fetched(n) > 0)) || exited(&mut nix)
        },
    );
    let before: Vec<u64> = names.iter().map(|n| fetched(n)).collect();
    assert!(
        before.iter().all(|&b| b > 0),
        "not every holder sent a stripe: {before:?}; {}",
        nix_output(client)
    );
    match loss {
        Loss::Crash => agents[0].kill(),
        Loss::Freeze => agents[0].signal("STOP"),
    }
    let status = wait_exit(&mut nix, Duration::from_secs(120));
    let took = started.elapsed();
    if let Loss::Freeze = loss {
        agents[0].signal("CONT");
    }
    assert!(
        status.success(),
        "nix-store -r failed:\n{}",
        nix_output(client)
    );
    assert_verified(client, &path);
    let after: Vec<u64> = names.iter().map(|n| fetched(n)).collect();
    eprintln!(
        "striped ({loss:?}): {} MiB in {took:?}; per holder when h1 was lost {before:?}, at the end {after:?}",
        SIZE >> 20
    );
    assert!(after[1] > before[1] && after[2] > before[2], "{after:?}");
    // Protocol version 7: every stripe of the holders that stayed came over
    // TCP, on connections kept from one stripe to the next (two stripes
    // are under way per holder), not one handshake per stripe.
    for name in &names[1..] {
        let c = agent_c.peer(name).map(|p| p.counters).unwrap_or_default();
        let stripes = c.bytes_fetched / STRIPE;
        assert!(
            c.bulk_fetches >= stripes && stripes >= 8,
            "{name}: {stripes} stripes, {} of them over TCP",
            c.bulk_fetches
        );
        assert!(
            c.bulk_connections * 4 <= c.bulk_fetches,
            "{name}: {} bulk connections for {} stripes",
            c.bulk_connections,
            c.bulk_fetches
        );
    }
    let log = agent_c.log();
    assert!(log.contains("striped=true"), "{log}");
    assert_eq!(agent_c.metric("nixmesh_nar_verify_failures_total"), 0.0);
}

/// Version 8, an open mesh: a host on the path of one holder's bulk
/// connections (a proxy on its host) changes one byte of a stripe, which
/// comes without TLS. The striped NAR fails its hash, Nix never gets a
/// corrupt valid path, and Nix's next try (one holder at a time) names the
/// stripe's sender. That holder is not quarantined, since its stripe came
/// in the clear: its bulk connections go under TLS. The path arrives
/// intact.
#[test]
fn a_byte_changed_on_the_path_inside_a_striped_download_moves_that_holder_to_tls() {
    let lan = Lan::new(4);
    let client = lan.host(0);
    let holders = [lan.host(1), lan.host(2), lan.host(3)];
    let office = client.generate_key("office-1");
    let files = holders[0].dir().join("files");
    let source = random_file(&files, "striped.bin", 64 << 20);
    let path = holders[0].add_path(&source);
    for h in &holders[1..] {
        assert_eq!(h.add_path(&source), path);
    }
    for h in holders {
        h.configure_nix(&nix_conf("", &[&office.public]));
        h.sign(&[&path], &office.secret_file);
    }
    let only_h1 = holders[0].add_path(&random_file(&files, "only-h1.bin", 24 << 20));
    holders[0].sign(&[&only_h1], &office.secret_file);
    client.configure_nix(&nix_conf(SUBSTITUTER, &[&office.public]));
    let agents: Vec<_> = holders.iter().map(|h| h.start_agent("")).collect();
    let agent_c = client.start_agent("");
    let mut all: Vec<_> = holders.iter().copied().zip(agents.iter()).collect();
    all.push((client, &agent_c));
    wait_all_alive(&all);
    // Inside the data of h1's first stripe (random bytes go raw), past
    // the answer's header and the first frame's.
    let flipped = tamper_on_the_path(holders[0], (1 << 20) + 4099, 1);

    let mut tries = 0;
    while !client.has_path(&path) && tries < 4 {
        tries += 1;
        let out = client.run(&["nix-store", "--realise", &path]);
        eprintln!(
            "try {tries}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_absent_or_intact(client, &path);
    }
    assert_verified(client, &path);
    assert_eq!(
        flipped.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the proxy changed no byte: {}",
        agent_c.log()
    );
    let log = agent_c.log();
    assert!(log.contains("striped fetch failed"), "{log}");
    let h1 = agent_c.peer("h1").expect("h1 in the table");
    assert!(
        !h1.quarantined && h1.counters.bulk_moved_to_tls == 1,
        "{h1:?}\n{log}"
    );
    assert!(
        log.contains("bulk connections to the peer go under TLS"),
        "{log}"
    );
    assert!(!log.contains("quarantining a peer"), "{log}");
    // A path only h1 holds comes from it, under TLS.
    let before = agent_c.peer("h1").map(|p| p.counters).unwrap_or_default();
    realise(client, &[&only_h1]);
    assert_verified(client, &only_h1);
    let after = agent_c.peer("h1").map(|p| p.counters).unwrap_or_default();
    assert!(
        after.bulk_fetches > before.bulk_fetches && after.bulk_plain == before.bulk_plain,
        "{before:?} -> {after:?}"
    );
}
