//! Two hosts: NAR throughput over QUIC against nginx sending the same NAR,
//! then the agents' memory while a small and a huge NAR stream through.

use super::*;

pub(crate) fn two_hosts(s: &Settings, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    eprintln!("== two hosts: throughput and memory");
    let lan = Lan::new(2);
    if s.lan_mtu != 1500 {
        lan.set_mtu(s.lan_mtu);
    }
    let (client, server) = (lan.host(0), lan.host(1));

    let big_file = server.dir().join("bench/big");
    match s.corpus.as_str() {
        "noise" => write_noise(&big_file, s.big_mib * MIB, 7),
        "real" => copy_real_files(&big_file, s.big_mib * MIB),
        other => panic!("CORPUS={other:?}: noise or real"),
    }
    let added = one_line(&long_ok(
        server,
        &["nix-store", "--add", &big_file.display().to_string()],
    ));
    let addressing = Addressing::from_env(client);
    let big = addressing.path(server, &added);
    let trusted = addressing.trusted();
    if big_file.is_dir() {
        fs::remove_dir_all(&big_file).ok();
    } else {
        fs::remove_file(&big_file).ok();
    }
    let big_nar = nar_size_sum(server, std::slice::from_ref(&big));

    // nginx on the server, serving what `nix copy --to file://` writes.
    let export = server.dir().join("bench/export");
    long_ok(
        server,
        &[
            "nix",
            "copy",
            "--to",
            &format!("file://{}?compression=none", export.display()),
            &big,
        ],
    );
    let mut nginx = Nginx::start(server, &export, NGINX_PORT);
    let nginx_base = format!("http://{}:{NGINX_PORT}", server.addr());
    let cache_base = format!("http://{}:{CACHE_PORT}", server.addr());

    let server_config = format!(
        "{}{}[http_cache]\nenable = true\nlisten = \"{}:{CACHE_PORT}\"\n",
        addressing.share_lines(),
        s.holder_share,
        server.addr()
    );
    let mut server_agent = server.start_agent(&server_config);
    // Before the client's agent starts: it reads the keys there.
    client.configure_nix(&nix_conf(SUBSTITUTER, &trusted));
    let mut client_agent = client.start_agent(&s.client_config);
    wait_sees_peers(&client_agent, &[server]);

    let nginx_nar = format!("{nginx_base}/{}", nar_url(client, &nginx_base, &big));
    let cache_nar = format!("{cache_base}/{}", nar_url(client, &cache_base, &big));
    // Warm the page cache of both copies on the server (store and export).
    curl_get(client, &nginx_nar);
    curl_get(client, &cache_nar);

    // One untimed substitution from nginx first: the first NAR written to
    // the client's fresh store costs its file system (and the sparse file
    // under it) more than any later one, which would fall on the side that
    // goes first.
    forget(
        client,
        std::slice::from_ref(&big),
        &nix_conf(&nginx_base, &trusted),
    );
    timed(client, &["nix-store", "--realise", &big]);
    forget(client, std::slice::from_ref(&big), "");

    let label = format!(
        "{} MiB NAR ({}, {})",
        big_nar / MIB,
        s.corpus,
        addressing.name()
    );
    let pair = Pair {
        client,
        server,
        big: &big,
        nar: big_nar,
        nginx_base: &nginx_base,
        nginx_nar: &nginx_nar,
        cache_nar: &cache_nar,
        server_agent: agent_pid(&server_agent),
        client_agent: agent_pid(&client_agent),
        nginx: nginx.pid(),
        trusted: &trusted,
    };
    throughput(
        s,
        &pair,
        &server_agent,
        &format!("{label}, unshaped veth"),
        rows,
    );
    // The serving agent so far: serves, and its filling in of the NAR's
    // kept frames while idle.
    rows.push(Row {
        what: format!("peak RSS, serving agent after the unshaped rounds ({label}), MiB"),
        mesh: format!("{:.1}", vm_hwm(agent_pid(&server_agent)) as f64 / 1024.0),
        other: "-".to_string(),
        ratio: "serves and filling".to_string(),
    });

    if !s.mem_mibs.is_empty() {
        memory(
            s,
            client,
            server,
            &mut client_agent,
            &mut server_agent,
            &MemoryConfigs {
                server_agent: &server_config,
                client_nix: &nix_conf(SUBSTITUTER, &trusted),
            },
            rows,
        );
    }

    // The memory check started new agents.
    let pair = Pair {
        server_agent: agent_pid(&server_agent),
        client_agent: agent_pid(&client_agent),
        ..pair
    };
    if s.shape_mbit > 0 {
        server.shape(s.shape_mbit * 1_000_000);
        throughput(
            s,
            &pair,
            &server_agent,
            &format!("{label}, link shaped to {} Mbit/s", s.shape_mbit),
            rows,
        );
    }
    for &one_way in &s.delays_us {
        let _switch = lan.delay(Duration::from_micros(one_way));
        let what = format!("{label}, {}", slow_label(one_way, s.shape_mbit));
        throughput(s, &pair, &server_agent, &what, rows);
    }
    nginx.stop();
    notes.push(
        "throughput: 'raw NAR' is curl -o /dev/null inside the client: mesh = the client agent's \
         substituter (narinfo race, then the NAR over QUIC from the server's agent, hashed and relayed), \
         nginx = the same NAR bytes as a static file on the server (sendfile); nixmesh [http_cache] = \
         the server agent's plain HTTP endpoint (TCP, no QUIC) for reference. 'nix-store -r' is the \
         client's Nix substituting the path through its agent vs from nginx as a plain binary cache."
            .to_string(),
    );
    notes.push(
        "memory: VmHWM of freshly started agents (server = the one reading the store and sending over \
         QUIC, client = the one relaying to Nix), before and after Nix substitutes one NAR of the \
         given size through them."
            .to_string(),
    );
}

/// What the throughput comparison needs to know about the two hosts.
pub(crate) struct Pair<'a> {
    client: &'a Host,
    server: &'a Host,
    /// The path on the server and its NAR size.
    big: &'a str,
    nar: u64,
    nginx_base: &'a str,
    nginx_nar: &'a str,
    cache_nar: &'a str,
    /// Processes whose CPU time is counted: the server's and the client's
    /// agent, nginx's master.
    server_agent: u32,
    client_agent: u32,
    nginx: u32,
    /// The keys the client's Nix trusts (`ADDRESSING`).
    trusted: &'a [&'a str],
}

/// The server's agent (`holder`) may fill in kept frames while idle after a
/// serve: each measurement waits until it has, and the CPU that took is
/// shown apart (`fill`).
pub(crate) fn throughput(
    s: &Settings,
    p: &Pair,
    holder: &AgentHandle,
    label: &str,
    rows: &mut Vec<Row>,
) {
    let (mut mesh_raw, mut nginx_raw, mut cache_raw) = (Vec::new(), Vec::new(), Vec::new());
    let (mut mesh_nix, mut nginx_nix) = (Vec::new(), Vec::new());
    // CPU seconds per GiB while `nix-store -r` ran: the whole machine,
    // and of that the two agents (mesh) or nginx.
    let (mut mesh_nix_cpu, mut nginx_nix_cpu) = (Vec::new(), Vec::new());
    let (mut mesh_nix_agents, mut nginx_nix_server) = (Vec::new(), Vec::new());
    // CPU seconds per GiB: server agent + client agent, nginx, server agent.
    let (mut mesh_cpu, mut nginx_cpu, mut cache_cpu) = (Vec::new(), Vec::new(), Vec::new());
    // Bytes the server's link sent and received per NAR byte: framing,
    // retransmissions, acknowledgements.
    let (mut mesh_sent, mut nginx_sent) = (Vec::new(), Vec::new());
    let (mut mesh_recv, mut nginx_recv) = (Vec::new(), Vec::new());
    // Of the NAR bytes the holder served to curl through the mesh, the
    // shares it packed with LZ4 and with zstd.
    let mut packed_shares = Vec::new();
    let served = || {
        let c = holder
            .peer(p.client.name())
            .map(|peer| peer.counters)
            .expect("the holder knows the client");
        [c.bytes_served, c.served_lz4, c.served_zstd].map(|b| b as f64)
    };
    let link = |h: &Host| {
        let b = h.link_bytes();
        (b.sent, b.received)
    };
    let per_nar_byte = |before: (u64, u64), after: (u64, u64)| {
        (
            (after.0 - before.0) as f64 / p.nar as f64,
            (after.1 - before.1) as f64 / p.nar as f64,
        )
    };
    let gib = p.nar as f64 / (1024.0 * MIB as f64);
    let mbps = |t: Duration| p.nar as f64 / 1e6 / t.as_secs_f64();
    // CPU seconds the server's agent spent while the bench waited for it
    // to finish filling in frames.
    let mut fill = Vec::new();
    let idle = |fill: &mut Vec<f64>| {
        let before = cpu_secs(&[p.server_agent]);
        wait_holders_idle(&[holder]);
        *fill.last_mut().expect("a round's entry") += cpu_secs(&[p.server_agent]) - before;
    };
    for round in 0..s.rounds {
        let mesh_first = round % 2 == 0;
        fill.push(0.0);
        for mesh_turn in [mesh_first, !mesh_first] {
            idle(&mut fill);
            if mesh_turn {
                // The narinfo first, as Nix does: it tells the agent where
                // the NAR is.
                let url = nar_url(p.client, SUBSTITUTER, p.big);
                let served_before = served();
                let before = cpu_secs(&[p.server_agent, p.client_agent]);
                let wire = link(p.server);
                let t = curl_get(p.client, &format!("{SUBSTITUTER}/{url}"));
                let (sent, received) = per_nar_byte(wire, link(p.server));
                mesh_cpu.push((cpu_secs(&[p.server_agent, p.client_agent]) - before) / gib);
                let after = served();
                let all = (after[0] - served_before[0]).max(1.0);
                packed_shares.push((
                    (after[1] - served_before[1]) / all,
                    (after[2] - served_before[2]) / all,
                ));
                mesh_raw.push(mbps(t));
                mesh_sent.push(sent);
                mesh_recv.push(received);
            } else {
                let before = cpu_secs(&process_tree(p.nginx));
                let wire = link(p.server);
                nginx_raw.push(mbps(curl_get(p.client, p.nginx_nar)));
                let (sent, received) = per_nar_byte(wire, link(p.server));
                nginx_cpu.push((cpu_secs(&process_tree(p.nginx)) - before) / gib);
                nginx_sent.push(sent);
                nginx_recv.push(received);
                let before = cpu_secs(&[p.server_agent]);
                cache_raw.push(mbps(curl_get(p.client, p.cache_nar)));
                cache_cpu.push((cpu_secs(&[p.server_agent]) - before) / gib);
            }
        }
        for mesh_turn in [mesh_first, !mesh_first] {
            let conf = if mesh_turn {
                nix_conf(SUBSTITUTER, p.trusted)
            } else {
                nix_conf(p.nginx_base, p.trusted)
            };
            // Idle first: a holder reading its copy to fill in frames
            // keeps the path alive for the client's collector (one machine).
            idle(&mut fill);
            forget(p.client, &[p.big.to_string()], &conf);
            let servers = if mesh_turn {
                vec![p.server_agent, p.client_agent]
            } else {
                process_tree(p.nginx)
            };
            // Settled before the counters are read: `sync`'s own work
            // would count as the machine's.
            settle_writes();
            let (machine, serving) = (machine_busy_secs(), cpu_secs(&servers));
            let t = timed(p.client, &["nix-store", "--realise", p.big]);
            let machine = (machine_busy_secs() - machine) / gib;
            let serving = (cpu_secs(&servers) - serving) / gib;
            if mesh_turn {
                mesh_nix.push(mbps(t));
                mesh_nix_cpu.push(machine);
                mesh_nix_agents.push(serving);
            } else {
                nginx_nix.push(mbps(t));
                nginx_nix_cpu.push(machine);
                nginx_nix_server.push(serving);
            }
        }
        eprintln!(
            "throughput round {round} ({label}): raw mesh {:.0} nginx {:.0} http_cache {:.0}; \
             nix-store -r mesh {:.0} nginx {:.0} MB/s; CPU s/GiB mesh {:.2} nginx {:.2} http_cache {:.2}; \
             server sent/received per NAR byte mesh {:.3}/{:.3} nginx {:.3}/{:.3} \
             (the mesh's NAR packed with LZ4 {:.0} %, zstd {:.0} %); \
             the server's agent filling in frames between measurements {:.2} CPU-s; \
             while nix-store -r ran, the machine's CPU s/GiB mesh {:.2} (agents {:.2}) nginx {:.2} (nginx {:.2})",
            mesh_raw[round],
            nginx_raw[round],
            cache_raw[round],
            mesh_nix[round],
            nginx_nix[round],
            mesh_cpu[round],
            nginx_cpu[round],
            cache_cpu[round],
            mesh_sent[round],
            mesh_recv[round],
            nginx_sent[round],
            nginx_recv[round],
            packed_shares[round].0 * 100.0,
            packed_shares[round].1 * 100.0,
            fill[round],
            mesh_nix_cpu[round],
            mesh_nix_agents[round],
            nginx_nix_cpu[round],
            nginx_nix_server[round],
        );
    }
    idle(&mut fill);
    forget(p.client, &[p.big.to_string()], "");
    let row = |what: &str, mesh: &[f64], other: &[f64], other_name: &str, unit: &str| {
        let (m, o) = (median(mesh), median(other));
        let digits = if unit == "B/B" { 3 } else { 2 };
        Row {
            what: format!("{what} ({label}), {unit}"),
            mesh: format!("{m:.digits$}"),
            other: format!("{o:.digits$} ({other_name})"),
            ratio: format!("mesh/{other_name} = {:.2}", m / o),
        }
    };
    rows.push(row("raw NAR", &mesh_raw, &nginx_raw, "nginx", "MB/s"));
    rows.push(row("raw NAR", &mesh_raw, &cache_raw, "http_cache", "MB/s"));
    rows.push(row("nix-store -r", &mesh_nix, &nginx_nix, "nginx", "MB/s"));
    rows.push(row(
        "  the machine's CPU while nix-store -r ran",
        &mesh_nix_cpu,
        &nginx_nix_cpu,
        "nginx",
        "s/GiB",
    ));
    rows.push(row(
        "  of that, both agents vs nginx",
        &mesh_nix_agents,
        &nginx_nix_server,
        "nginx",
        "s/GiB",
    ));
    rows.push(row(
        "  CPU of both agents vs server",
        &mesh_cpu,
        &nginx_cpu,
        "nginx",
        "s/GiB",
    ));
    rows.push(row(
        "  CPU of both agents vs server",
        &mesh_cpu,
        &cache_cpu,
        "http_cache",
        "s/GiB",
    ));
    rows.push(row(
        "  server link, bytes sent per NAR byte",
        &mesh_sent,
        &nginx_sent,
        "nginx",
        "B/B",
    ));
    rows.push(row(
        "  server link, bytes received per NAR byte",
        &mesh_recv,
        &nginx_recv,
        "nginx",
        "B/B",
    ));
    // Not in the rows above: done once per NAR, while the holder is idle.
    rows.push(Row {
        what: format!("  the server's agent filling in kept frames while idle ({label}), CPU-s"),
        mesh: format!("{:.2}", fill.iter().sum::<f64>()),
        other: "-".to_string(),
        ratio: "once per NAR".to_string(),
    });
}

/// The memory check's server agent config and client nix.conf (whose keys
/// the client agents started after it read).
pub(crate) struct MemoryConfigs<'a> {
    server_agent: &'a str,
    client_nix: &'a str,
}

pub(crate) fn memory(
    s: &Settings,
    client: &Host,
    server: &Host,
    client_agent: &mut AgentHandle,
    server_agent: &mut AgentHandle,
    configs: &MemoryConfigs,
    rows: &mut Vec<Row>,
) {
    let mut results = Vec::new();
    for (i, &mib) in s.mem_mibs.iter().enumerate() {
        eprintln!("memory: making a {mib} MiB path on the server");
        let file = server.dir().join(format!("bench/mem-{i}"));
        write_noise(&file, mib * MIB, 100 + i as u64);
        let path = one_line(&long_ok(
            server,
            &["nix-store", "--add", &file.display().to_string()],
        ));
        fs::remove_file(&file).ok();

        // Fresh agents: VmHWM counts from the start of the process.
        server_agent.stop();
        *server_agent = server.start_agent(configs.server_agent);
        client_agent.stop();
        *client_agent = client.start_agent("");
        wait_sees_peers(client_agent, &[server]);
        let idle = (
            vm_hwm(agent_pid(server_agent)),
            vm_hwm(agent_pid(client_agent)),
        );

        // The keys stay: the agents started after this read them.
        forget(client, &[], configs.client_nix);
        let t = timed(client, &["nix-store", "--realise", &path]);
        let after = (
            vm_hwm(agent_pid(server_agent)),
            vm_hwm(agent_pid(client_agent)),
        );
        eprintln!(
            "memory: {mib} MiB through Nix in {t:.1?}: VmHWM server {} -> {} KiB, client {} -> {} KiB",
            idle.0, after.0, idle.1, after.1
        );
        results.push((mib, idle, after, t));

        // The big copies go at once: the disk is shared.
        forget(client, std::slice::from_ref(&path), "");
        long_ok(server, &["nix-store", "--delete", &path]);
    }
    for (mib, idle, after, t) in results {
        let mib_s = mib as f64 * MIB as f64 / 1e6 / t.as_secs_f64();
        rows.push(Row {
            what: format!("peak RSS, serving agent, {mib} MiB NAR ({mib_s:.0} MB/s), MiB"),
            mesh: format!("{:.1}", after.0 as f64 / 1024.0),
            other: format!("{:.1} (idle)", idle.0 as f64 / 1024.0),
            ratio: format!("+{:.1} MiB", (after.0 - idle.0) as f64 / 1024.0),
        });
        rows.push(Row {
            what: format!("peak RSS, client agent, {mib} MiB NAR, MiB"),
            mesh: format!("{:.1}", after.1 as f64 / 1024.0),
            other: format!("{:.1} (idle)", idle.1 as f64 / 1024.0),
            ratio: format!("+{:.1} MiB", (after.1 - idle.1) as f64 / 1024.0),
        });
    }
}

/// Deletes `paths` from the client's store if there, drops its narinfo
/// disk cache, and (unless `nix_conf` is empty) sets its nix.conf.
pub(crate) fn forget(client: &Host, paths: &[String], nix_conf: &str) {
    for p in paths {
        if client.real_path(p).symlink_metadata().is_ok() {
            client.delete_path(p);
        }
    }
    let cache = client.dir().join("home/.cache");
    if cache.exists() {
        fs::remove_dir_all(&cache).unwrap_or_else(|e| panic!("rm {}: {e}", cache.display()));
    }
    if !nix_conf.is_empty() {
        client.configure_nix(nix_conf);
    }
}

/// Regular files of this machine's /usr/lib/x86_64-linux-gnu, /usr/bin and
/// /usr/libexec (shared libraries and binaries, as a closure holds them),
/// copied into the directory `dir` until about `budget` bytes.
pub(crate) fn copy_real_files(dir: &Path, budget: u64) {
    fs::create_dir_all(dir).expect("mkdir");
    let mut total = 0u64;
    let mut n = 0usize;
    for path in real_files() {
        if total >= budget {
            break;
        }
        n += 1;
        if let Ok(len) = fs::copy(&path, dir.join(format!("f{n}"))) {
            total += len;
        }
    }
    eprintln!("real corpus: {n} files, {} MiB", total / MIB);
}
