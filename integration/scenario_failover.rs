//! A big NAR keeps flowing when the peer sending it dies or freezes: Nix on
//! B substitutes a 512 MiB path held by A and C over shaped links; midway
//! the holder that is sending is SIGKILLed (or SIGSTOPped), and B's agent
//! carries on from the same byte offset with the other holder. Nix sees one
//! slow download, never an error.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{wait_until, AgentHandle, Host, Lan};
use crate::office::*;

/// Size of the path: big enough that the transfer is well under way when
/// the holder goes.
const SIZE: u64 = 512 << 20;
/// Each holder's link: 512 MiB takes about 14 s at this rate.
const RATE: u64 = 300_000_000;
/// Bytes B has from the first holder when it is taken away.
const CUT_AT: u64 = 96 << 20;
/// Longest the whole substitution may take.
const SUBSTITUTION_LIMIT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug)]
enum Loss {
    /// SIGKILL: the holder's connection goes silent.
    Crash,
    /// SIGSTOP: the holder is there but sends nothing.
    Freeze,
}

#[test]
fn a_holder_that_dies_mid_nar_is_replaced_from_the_same_offset() {
    failover(Loss::Crash);
}

#[test]
fn a_holder_that_freezes_mid_nar_is_replaced_from_the_same_offset() {
    failover(Loss::Freeze);
}

fn failover(loss: Loss) {
    let lan = Lan::new(3);
    let (a, b, c) = (lan.host(0), lan.host(1), lan.host(2));
    let office = a.generate_key("office-1");
    let source = random_file(&lan.host(0).dir().join("files"), "big.bin", SIZE);
    let path = a.add_path(&source);
    assert_eq!(c.add_path(&source), path);
    std::fs::remove_file(&source).expect("remove the source file");
    for holder in [a, c] {
        holder.configure_nix(&nix_conf("", &[&office.public]));
        holder.sign(&[&path], &office.secret_file);
    }
    b.configure_nix(&nix_conf(SUBSTITUTER, &[&office.public]));
    let mut agents = [a.start_agent(""), c.start_agent("")];
    // One holder at a time: this is the failover of a single stream (striping
    // has its own scenario, scenario_stripes).
    let agent_b = b.start_agent("[mesh]\nstripe_from_mib = 0\n");
    wait_all_alive(&[(a, &agents[0]), (b, &agent_b), (c, &agents[1])]);
    a.shape(RATE);
    c.shape(RATE);

    let started = Instant::now();
    let mut nix = spawn_realise(b, &path);
    // Who is sending? Wait until B has a good part of the NAR from one.
    let mut first = None;
    wait_until(Duration::from_secs(60), "B fetching from a holder", || {
        first = ["h0", "h2"].into_iter().find(|name| {
            agent_b
                .peer(name)
                .is_some_and(|p| p.counters.bytes_fetched >= CUT_AT)
        });
        first.is_some() || exited(&mut nix)
    });
    let first = first.unwrap_or_else(|| panic!("Nix ended early: {}", nix_output(b)));
    let other = if first == "h0" { "h2" } else { "h0" };
    let holder: &mut AgentHandle = &mut agents[if first == "h0" { 0 } else { 1 }];
    let cut = agent_b.peer(first).expect("first").counters.bytes_fetched;
    match loss {
        Loss::Crash => holder.kill(),
        Loss::Freeze => holder.signal("STOP"),
    }
    let resumed = wait_until(
        Duration::from_secs(30),
        "B fetching from the other holder",
        || {
            agent_b
                .peer(other)
                .is_some_and(|p| p.counters.bytes_fetched > 0)
                || exited(&mut nix)
        },
    );
    let status = wait_exit(
        &mut nix,
        SUBSTITUTION_LIMIT.saturating_sub(started.elapsed()),
    );
    let total = started.elapsed();
    if let Loss::Freeze = loss {
        holder.signal("CONT");
    }
    assert!(
        status.success(),
        "nix-store -r on B failed:\n{}",
        nix_output(b)
    );
    eprintln!(
        "failover ({loss:?}): {first} lost after {} MiB; {other} took over {resumed:?} later; \
         whole substitution {total:?}",
        cut >> 20
    );

    assert_verified(b, &path);
    let holder_host = if first == "h0" { a } else { c };
    assert_eq!(
        b.run_ok(&["nix-store", "--query", "--hash", &path]),
        holder_host.run_ok(&["nix-store", "--query", "--hash", &path]),
    );
    assert!(agent_b.metric("nixmesh_nar_failovers_total") >= 1.0);
    assert_eq!(agent_b.metric("nixmesh_nar_verify_failures_total"), 0.0);
    // The two holders together sent the NAR once, not once and a bit.
    let fetched: u64 = ["h0", "h2"]
        .iter()
        .filter_map(|n| agent_b.peer(n))
        .map(|p| p.counters.bytes_fetched)
        .sum();
    let nar_size = closure_nar_size(b, &path);
    assert_eq!(fetched, nar_size, "bytes from both holders");
    let log = agent_b.log();
    assert!(log.contains("failing over to another holder"), "{log}");
    if let Loss::Freeze = loss {
        // Thawed, the frozen holder is back in the mesh.
        wait_until(CONVERGE, "the thawed holder alive again", || {
            sees_alive(&agent_b, first)
        });
    }
}

/// `nix-store --realise path` on `host`, in the background; its output goes
/// to `nix-realise.log` in the host's dir.
pub(crate) fn spawn_realise(host: &Host, path: &str) -> Child {
    let log = std::fs::File::create(host.dir().join("nix-realise.log")).expect("log file");
    host.command(&["nix-store", "--realise", path])
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("nix-store runs")
}

pub(crate) fn nix_output(host: &Host) -> String {
    std::fs::read_to_string(host.dir().join("nix-realise.log")).unwrap_or_default()
}

pub(crate) fn exited(child: &mut Child) -> bool {
    matches!(child.try_wait(), Ok(Some(_)))
}

pub(crate) fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nix-store -r did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
