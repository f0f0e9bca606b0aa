//! One large NAR from three holders at once (`PARTS=stripes`): the
//! client's Nix substitutes a `BIG_MIB` path held by three hosts, each
//! behind a `STRIPE_HOLDER_MBIT` [300; 0: unshaped] link, through its agent
//! with striping (the default) against the same agent taking it from one holder
//! at a time (`stripe_from_mib = 0`), alternating which goes first, after
//! the NAR's first serve (striped into curl, the holders packing: shown
//! apart) and one untimed realisation from one holder (the client's fresh
//! store's first); then the client agent's peak RSS after a striped run. `STRIPE_HOLDER_NICE`
//! [0] runs the holders' agents at that niceness, a stand-in for holders on
//! machines of their own: the client's agent and Nix get this machine's
//! cores first (both ways alike).

use super::*;

pub(crate) fn three_holders(s: &Settings, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    eprintln!("== stripes: one NAR from three holders at once");
    let mbit: u64 = std::env::var("STRIPE_HOLDER_MBIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let nice: u32 = std::env::var("STRIPE_HOLDER_NICE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let lan = Lan::new(4);
    let client = lan.host(0);
    let holders = [lan.host(1), lan.host(2), lan.host(3)];
    let file = holders[0].dir().join("bench/striped");
    match s.corpus.as_str() {
        "real" => copy_real_files(&file, s.big_mib * MIB),
        "tree" => write_small_tree(&file, s.big_mib * MIB, 11),
        _ => write_noise(&file, s.big_mib * MIB, 11),
    }
    let add = ["nix-store", "--add", &file.display().to_string()].map(String::from);
    let added = one_line(&long_ok_strings(holders[0], &add));
    for h in &holders[1..] {
        assert_eq!(one_line(&long_ok_strings(h, &add)), added);
    }
    let addressing = Addressing::from_env(client);
    let big = addressing.path(holders[0], &added);
    for h in &holders[1..] {
        assert_eq!(addressing.path(h, &added), big);
    }
    if file.is_dir() {
        fs::remove_dir_all(&file).ok();
    } else {
        fs::remove_file(&file).ok();
    }
    let nar = nar_size_sum(holders[0], std::slice::from_ref(&big));
    let holder_config = format!("{}{}", addressing.share_lines(), s.holder_share);
    let agents: Vec<AgentHandle> = holders
        .iter()
        .map(|h| h.start_agent(&holder_config))
        .collect();
    // 0: unshaped, where the client's side (its agent and Nix, on the
    // cores the holders share) sets the pace rather than the links.
    if mbit > 0 {
        for h in holders {
            h.shape(mbit * 1_000_000);
        }
    }
    let conf = nix_conf(SUBSTITUTER, &addressing.trusted());
    // Before the client's first agent starts: it reads the keys there.
    client.configure_nix(&conf);
    let holder_pids: Vec<u32> = agents.iter().map(agent_pid).collect();
    if nice > 0 {
        for &pid in &holder_pids {
            renice_threads(pid, nice);
        }
    }
    let gib = nar as f64 / (1u64 << 30) as f64;
    let (mut striped, mut single) = (Vec::new(), Vec::new());
    let (mut striped_cpu, mut single_cpu) = (Vec::new(), Vec::new());
    // The holders' agents alone: what serving the NAR costs the hosts
    // that have it (colleagues' machines, in an office).
    let (mut striped_holders, mut single_holders) = (Vec::new(), Vec::new());
    // How many of the machine's cores were busy: whether the transfer was
    // bound by the links or by the CPU that every host here shares.
    let (mut striped_busy, mut single_busy) = (Vec::new(), Vec::new());
    let mut peak_kib = 0;
    // NAR bytes the holders served the client, of those packed, and of
    // those packed with LZ4.
    let served = || {
        agents
            .iter()
            .fold([0.0, 0.0, 0.0], |[all, packed, lz4], a| {
                let c = a
                    .peer(client.name())
                    .map(|p| p.counters)
                    .unwrap_or_default();
                [
                    all + c.bytes_served as f64,
                    packed + (c.served_zstd + c.served_lz4) as f64,
                    lz4 + c.served_lz4 as f64,
                ]
            })
    };
    // Whose CPU a run counts: the holders' agents and the client's `agent`.
    let agents_with = |agent: &AgentHandle| -> Vec<u32> {
        holder_pids
            .iter()
            .copied()
            .chain([agent_pid(agent)])
            .collect()
    };
    // The NAR's first serve, striped into curl, before the comparison: the
    // holders pack its chunks for it and keep the frames, and fill in the
    // rest while idle. Without it round 0's striped run would pack for
    // both sides, as the one-holder run after it gets the frames it kept.
    let first_serve = {
        let agent = client.start_agent(&s.client_config);
        wait_sees_peers(&agent, &holders);
        let pids = agents_with(&agent);
        let cpu_before = cpu_secs(&pids);
        let mbps = curl_mbps(client, &big, nar);
        let cpu = (cpu_secs(&pids) - cpu_before) / gib;
        eprintln!("stripes: first serve into curl, striped, {mbps:.0} MB/s, all agents {cpu:.2} CPU-s/GiB");
        (mbps, cpu)
    };
    // One untimed realisation from one holder first (as in the pair): the
    // first NAR written to the client's fresh store costs its file system
    // more than any later one, which would fall on the side that goes
    // first (round 0's striped run: 200–216 MB/s in four runs without it,
    // against 211–228 in round 1).
    {
        let agent = client.start_agent(&with_mesh_key(&s.client_config, "stripe_from_mib = 0"));
        wait_sees_peers(&agent, &holders);
        wait_holders_idle(&agents.iter().collect::<Vec<_>>());
        forget(client, std::slice::from_ref(&big), &conf);
        long_ok(client, &["nix-store", "--realise", &big]);
    }
    let mut striped_packed = Vec::new();
    let (mut striped_curl, mut single_curl) = (Vec::new(), Vec::new());
    for round in 0..s.rounds {
        let striped_first = round % 2 == 0;
        for striping in [striped_first, !striped_first] {
            let config = if striping {
                s.client_config.clone()
            } else {
                with_mesh_key(&s.client_config, "stripe_from_mib = 0")
            };
            let agent = client.start_agent(&config);
            wait_sees_peers(&agent, &holders);
            // Idle first: a holder reading its copy to fill in frames
            // keeps the path alive for the client's collector (one machine).
            wait_holders_idle(&agents.iter().collect::<Vec<_>>());
            forget(client, std::slice::from_ref(&big), &conf);
            let pids = agents_with(&agent);
            // Settled before the counters are read: `sync`'s own work
            // would count as the machine's.
            settle_writes();
            let (cpu_before, busy_before) = (cpu_secs(&pids), machine_busy_secs());
            let holders_before = cpu_secs(&holder_pids);
            let served_before = served();
            let t = timed(client, &["nix-store", "--realise", &big]);
            let cpu = (cpu_secs(&pids) - cpu_before) / gib;
            let holders_cpu = (cpu_secs(&holder_pids) - holders_before) / gib;
            let busy = (machine_busy_secs() - busy_before) / t.as_secs_f64();
            let mbps = nar as f64 / 1e6 / t.as_secs_f64();
            let [all, packed, lz4] = served();
            let sent = (all - served_before[0]).max(1.0);
            let packed = 100.0 * (packed - served_before[1]) / sent;
            let lz4 = 100.0 * (lz4 - served_before[2]) / sent;
            // The same NAR again through the agent into curl: the mesh's
            // byte path without Nix's unpacking (the holders, idle again,
            // now send the frames they kept or filled in).
            wait_holders_idle(&agents.iter().collect::<Vec<_>>());
            forget(client, std::slice::from_ref(&big), "");
            let raw = curl_mbps(client, &big, nar);
            eprintln!(
                "stripes round {round}: {} {mbps:.0} MB/s, all agents {cpu:.2} CPU-s/GiB \
                 (holders {holders_cpu:.2}), machine {busy:.2} cores busy, {packed:.0} % sent \
                 packed ({lz4:.0} % with LZ4); curl {raw:.0} MB/s",
                if striping { "striped" } else { "one holder" }
            );
            if striping {
                striped_curl.push(raw);
                striped.push(mbps);
                striped_cpu.push(cpu);
                striped_holders.push(holders_cpu);
                striped_busy.push(busy);
                striped_packed.push(packed);
                peak_kib = peak_kib.max(vm_hwm(agent_pid(&agent)));
            } else {
                single_curl.push(raw);
                single.push(mbps);
                single_cpu.push(cpu);
                single_holders.push(holders_cpu);
                single_busy.push(busy);
            }
        }
    }
    let (m, o) = (median(&striped), median(&single));
    rows.push(Row {
        what: format!(
            "nix-store -r, {} MiB NAR ({}, {}) from 3 holders {}, MB/s",
            nar / MIB,
            s.corpus,
            addressing.name(),
            match mbit {
                0 => "unshaped".to_string(),
                _ => format!("at {mbit} Mbit/s each"),
            } + &match nice {
                0 => String::new(),
                _ => format!(", holders at nice {nice}"),
            }
        ),
        mesh: format!("{m:.1}"),
        other: format!("{o:.1} (one holder)"),
        ratio: format!("striped/one = {:.2}", m / o),
    });
    let (m, o) = (median(&striped_curl), median(&single_curl));
    rows.push(Row {
        what: "the same NAR into curl through the client's agent (no Nix), MB/s".to_string(),
        mesh: format!("{m:.1}"),
        other: format!("{o:.1} (one holder)"),
        ratio: format!("striped/one = {:.2}", m / o),
    });
    rows.push(Row {
        what: "its first serve, before the rounds: striped into curl, the holders packing, MB/s"
            .to_string(),
        mesh: format!("{:.1}", first_serve.0),
        other: String::new(),
        ratio: format!("all agents {:.2} CPU-s/GiB", first_serve.1),
    });
    rows.push(Row {
        what: "CPU-s per GiB, the client's and all holders' agents together".to_string(),
        mesh: format!("{:.2}", median(&striped_cpu)),
        other: format!("{:.2} (one holder)", median(&single_cpu)),
        ratio: String::new(),
    });
    rows.push(Row {
        what: "CPU-s per GiB, the holders' agents alone (serving from kept frames)".to_string(),
        mesh: format!("{:.2}", median(&striped_holders)),
        other: format!("{:.2} (one holder)", median(&single_holders)),
        ratio: String::new(),
    });
    rows.push(Row {
        what: "cores of this machine busy during nix-store -r (all hosts share them)".to_string(),
        mesh: format!("{:.2}", median(&striped_busy)),
        other: format!("{:.2} (one holder)", median(&single_busy)),
        ratio: String::new(),
    });
    rows.push(Row {
        what: "share of the NAR the holders sent packed (zstd or LZ4), striped, %".to_string(),
        mesh: format!("{:.0}", median(&striped_packed)),
        other: String::new(),
        ratio: String::new(),
    });
    rows.push(Row {
        what: format!("peak RSS, client agent, striped {} MiB NAR, MiB", nar / MIB),
        mesh: format!("{:.1}", peak_kib as f64 / 1024.0),
        other: String::new(),
        ratio: String::new(),
    });
    notes.push(
        "stripes: the client's Nix substitutes one path held by three hosts through its agent, \
         striped from all three (mesh) against one holder at a time (stripe_from_mib = 0); a fresh \
         client agent and an empty client store for every run; then curl takes the same NAR \
         through the same agent, the path deleted from the client's store first. The rounds come \
         after the NAR's first serve (striped, into curl), so both sides find the holders' kept \
         frames, and after one untimed realisation from one holder, so neither pays for the first \
         NAR written to the client's fresh store; each timed part starts after `sync`."
            .to_string(),
    );
}

/// `config` with `line` in its `[mesh]` table (added if it has none).
fn with_mesh_key(config: &str, line: &str) -> String {
    match config.find("[mesh]\n") {
        Some(at) => {
            let end = at + "[mesh]\n".len();
            format!("{}{line}\n{}", &config[..end], &config[end..])
        }
        None => format!("{config}\n[mesh]\n{line}\n"),
    }
}

/// `path`'s NAR (`nar` bytes) through the client's agent into curl, MB/s,
/// from settled writes.
fn curl_mbps(client: &Host, path: &str, nar: u64) -> f64 {
    settle_writes();
    let url = nar_url(client, SUBSTITUTER, path);
    let got = curl_write_out(
        client,
        &format!("{SUBSTITUTER}/{url}"),
        "%{http_code} %{size_download} %{time_total}",
    );
    match got.split_whitespace().collect::<Vec<_>>()[..] {
        ["200", size, secs] if size.parse() == Ok(nar) => {
            nar as f64 / 1e6 / secs.parse::<f64>().unwrap_or_else(|e| panic!("{got}: {e}"))
        }
        _ => panic!("curl of the striped NAR: {got} (want 200 and {nar} bytes)"),
    }
}
