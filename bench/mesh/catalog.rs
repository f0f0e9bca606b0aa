//! Look-ups at office scale (`PARTS=catalog`): an office of
//! `CATALOG_AGENTS` [10,50] hosts, each but the client holding a group of
//! `CATALOG_PATHS` [20] small paths, every host running an agent with
//! default settings (found by mDNS). Measured side by side on the client:
//! its agent with summaries (protocol 4, the default) against the same
//! agent asking every peer about every path (`max_protocol = 3`, the
//! fan-out before summaries), and Nix's narinfo phase against the peers as
//! plain substituters. Also: how long after the last agent starts every
//! agent sees every other alive with its summary whole, and each agent's
//! idle CPU and memory at that size. `CATALOG_DRY_GROUPS` [all] sets how
//! many groups the narinfo phase looks up.

use super::*;

/// Misses asked per side (random hash parts).
const MISSES: usize = 200;

pub(crate) fn office_lookups(s: &Settings, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    let per_peer = std::env::var("CATALOG_PATHS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20usize);
    for n in numbers("CATALOG_AGENTS", "10,50") {
        one_office(s, n as usize, per_peer, rows, notes);
    }
}

/// Which look-ups the client's agent makes.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Lookups {
    Summaries,
    FanOut,
}

impl Lookups {
    fn config(self) -> &'static str {
        match self {
            Lookups::Summaries => "",
            Lookups::FanOut => "[mesh]\nmax_protocol = 3\n",
        }
    }
}

/// What one side's look-ups cost.
#[derive(Default)]
struct Costs {
    requests_per_hit: Vec<f64>,
    requests_per_miss: Vec<f64>,
    miss_ms: Vec<f64>,
    hit_ms: Vec<f64>,
    dry_s: Vec<f64>,
}

fn one_office(
    s: &Settings,
    n: usize,
    per_peer: usize,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) {
    eprintln!("== catalog: an office of {n} agents");
    let lan = Lan::new(n);
    let client = lan.host(0);
    let peers: Vec<&Host> = lan.hosts()[1..].iter().collect();
    let mut tops = Vec::new();
    let mut held = Vec::new();
    for (k, peer) in peers.iter().enumerate() {
        let dir = peer.dir().join("bench").join(format!("catalog{k}"));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let files: Vec<String> = (0..per_peer)
            .map(|i| {
                let file = dir.join(format!("small-{k}-{i}"));
                write_noise(&file, 2048, (k * 1000 + i) as u64 + 7);
                file.display().to_string()
            })
            .collect();
        let expr = format!(
            "builtins.toFile \"catalog-group-{k}\" (builtins.concatStringsSep \"\\n\" (map (f: \"${{f}}\") [ {} ]))",
            files.join(" ")
        );
        let top = one_line(&peer.run_ok(&["nix", "eval", "--raw", "--impure", "--expr", &expr]));
        held.extend(peer.closure(&top));
        tops.push(top);
    }
    let peer_config = |h: &Host| {
        format!(
            "[share]\ncontent_addressed = true\n[http_cache]\nenable = true\nlisten = \"{}:{CACHE_PORT}\"\n",
            h.addr()
        )
    };
    let mut agents: Vec<AgentHandle> = peers
        .iter()
        .map(|h| h.spawn_agent(&peer_config(h)))
        .collect();
    agents.push(client.spawn_agent(""));
    let last_start = Instant::now();
    for a in &mut agents {
        a.wait_ready();
    }
    let took = wait_whole(&agents, n - 1, last_start);
    eprintln!(
        "catalog: {n} agents see each other with whole summaries {took:?} after the last start"
    );
    rows.push(Row {
        what: format!(
            "{n} agents: every agent sees every other alive, summary whole, s after last start"
        ),
        mesh: format!("{:.1}", took.as_secs_f64()),
        other: String::new(),
        ratio: String::new(),
    });
    let (cpu, rss) = idle_figures(&agents);
    rows.push(Row {
        what: format!("{n} agents, idle: CPU % of a core per agent (min/median/max)"),
        mesh: format!("{:.2}/{:.2}/{:.2}", cpu[0], cpu[1], cpu[2]),
        other: String::new(),
        ratio: String::new(),
    });
    rows.push(Row {
        what: format!("{n} agents, idle: RSS MiB per agent (min/median/max)"),
        mesh: format!("{:.1}/{:.1}/{:.1}", rss[0], rss[1], rss[2]),
        other: String::new(),
        ratio: String::new(),
    });
    let mut client_agent = agents.pop().expect("the client's agent");

    let plain: Vec<String> = peers
        .iter()
        .map(|h| format!("http://{}:{CACHE_PORT}", h.addr()))
        .collect();
    // Groups whose narinfo phase (`nix-store -r --dry-run`) is timed:
    // `CATALOG_DRY_GROUPS`, all by default.
    let dry_groups = std::env::var("CATALOG_DRY_GROUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(tops.len())
        .min(tops.len());
    let dry_tops = &tops[..dry_groups];
    let mut costs = [Costs::default(), Costs::default()];
    let mut plain_dry = Vec::new();
    for round in 0..s.rounds {
        let order = if round % 2 == 0 {
            [Lookups::Summaries, Lookups::FanOut]
        } else {
            [Lookups::FanOut, Lookups::Summaries]
        };
        for side in order {
            // A fresh agent (no memo of earlier look-ups) with every peer
            // and, for summaries, every summary.
            let fresh = |agent: &mut AgentHandle| {
                agent.stop();
                *agent = client.start_agent(side.config());
                wait_sees_peers(agent, &peers);
                if side == Lookups::Summaries {
                    wait_whole(std::slice::from_ref(agent), n - 1, Instant::now());
                }
            };
            fresh(&mut client_agent);
            let c = &mut costs[side as usize];
            let (per_hit, hit_ms) = lookups(client, &client_agent, &held, true);
            c.requests_per_hit.push(per_hit);
            c.hit_ms.push(hit_ms);
            let misses: Vec<String> = (0..MISSES).map(|i| fake_hash(round, i)).collect();
            let (per_miss, miss_ms) = lookups(client, &client_agent, &misses, false);
            c.requests_per_miss.push(per_miss);
            c.miss_ms.push(miss_ms);
            fresh(&mut client_agent);
            c.dry_s.push(dry_run(client, SUBSTITUTER, dry_tops));
            eprintln!(
                "catalog {n} round {round} {side:?}: {per_hit:.2} requests per hit, {per_miss:.2} per miss, miss {miss_ms:.2} ms, dry {:.2} s",
                c.dry_s.last().copied().unwrap_or(f64::NAN)
            );
        }
        plain_dry.push(dry_run(client, &plain.join(" "), dry_tops));
    }
    let [summ, fan] = &costs;
    let med = |v: &[f64]| median(v);
    rows.push(Row {
        what: format!("{n} agents: narinfo requests to peers per hit look-up"),
        mesh: format!("{:.2}", med(&summ.requests_per_hit)),
        other: format!("{:.2} (fan-out)", med(&fan.requests_per_hit)),
        ratio: String::new(),
    });
    rows.push(Row {
        what: format!("{n} agents: narinfo requests to peers per miss"),
        mesh: format!("{:.2}", med(&summ.requests_per_miss)),
        other: format!("{:.2} (fan-out)", med(&fan.requests_per_miss)),
        ratio: String::new(),
    });
    rows.push(Row {
        what: format!("{n} agents: miss, median ms per narinfo (curl, HTTP included)"),
        mesh: format!("{:.3}", med(&summ.miss_ms)),
        other: format!("{:.3} (fan-out)", med(&fan.miss_ms)),
        ratio: format!(
            "fan-out/summaries = {:.1}",
            med(&fan.miss_ms) / med(&summ.miss_ms)
        ),
    });
    rows.push(Row {
        what: format!("{n} agents: hit, median ms per narinfo (curl, HTTP included)"),
        mesh: format!("{:.3}", med(&summ.hit_ms)),
        other: format!("{:.3} (fan-out)", med(&fan.hit_ms)),
        ratio: format!(
            "fan-out/summaries = {:.2}",
            med(&fan.hit_ms) / med(&summ.hit_ms)
        ),
    });
    let groups = dry_tops.len();
    rows.push(Row {
        what: format!(
            "{n} agents: narinfo phase of {} paths (-r --dry-run), s",
            groups * (per_peer + 1)
        ),
        mesh: format!("{:.2}", med(&summ.dry_s)),
        other: format!("{:.2} (fan-out)", med(&fan.dry_s)),
        ratio: format!(
            "fan-out/summaries = {:.2}",
            med(&fan.dry_s) / med(&summ.dry_s)
        ),
    });
    rows.push(Row {
        what: format!(
            "{n} agents: narinfo phase of {} paths (-r --dry-run), s",
            groups * (per_peer + 1)
        ),
        mesh: format!("{:.2}", med(&summ.dry_s)),
        other: format!("{:.2} (plain)", med(&plain_dry)),
        ratio: format!("plain/mesh = {:.2}", med(&plain_dry) / med(&summ.dry_s)),
    });
    notes.push(format!(
        "catalog, {n} agents: {} peers each holding a group of {per_peer} small content-addressed paths \
         and the text file referring to them; every agent with default settings, found by mDNS. \
         Hits: the client's agent is asked (curl, one connection) for the narinfo of each of the {} \
         held paths; misses: {MISSES} random hash parts; requests counted by the agent \
         (nixmesh_narinfo_requests_total over its races), a fresh client agent for the hits and misses and another for the narinfo phase. \
         Summaries = protocol 4 (the default); fan-out = the same agent with max_protocol = 3. \
         Narinfo phase: Nix {} `nix-store -r --dry-run` of {groups} group files (Nix finds the rest \
         through references) with an empty narinfo cache, through the agent, or with the {} peers' \
         [http_cache] endpoints as plain substituters in host order (group k is on peer k, the \
         first {groups}). Seconds per round, summaries / fan-out / plain: {:?} / {:?} / {:?}.",
        n - 1,
        held.len(),
        crate::nix_release(),
        n - 1,
        summ.dry_s,
        fan.dry_s,
        plain_dry,
    ));
}

/// A hash part no store has: nix32 text from a counter.
fn fake_hash(round: usize, i: usize) -> String {
    const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ ((round as u64) << 32 | i as u64);
    (0..32)
        .map(|_| {
            let v = xorshift(&mut x);
            NIX32[(v % 32) as usize] as char
        })
        .collect()
}

/// Asks the client's agent for the narinfo of each of `items` (store
/// paths or hash parts) over one curl connection. Returns narinfo
/// requests sent to peers per look-up and the median time per look-up in
/// ms; checks each answer is 200 (`hits`) or 404.
fn lookups(client: &Host, agent: &AgentHandle, items: &[String], hits: bool) -> (f64, f64) {
    let races = |a: &AgentHandle| {
        a.metric("nixmesh_narinfo_hits_total") + a.metric("nixmesh_narinfo_misses_total")
    };
    let (asks0, races0) = (agent.metric("nixmesh_narinfo_requests_total"), races(agent));
    let mut argv = vec![
        "curl".to_string(),
        "-s".into(),
        "-w".into(),
        "%{http_code} %{time_total}\\n".into(),
    ];
    for item in items {
        let hash = item.strip_prefix("/nix/store/").unwrap_or(item);
        argv.push("-o".into());
        argv.push("/dev/null".into());
        argv.push(format!("{SUBSTITUTER}/{}.narinfo", &hash[..32]));
    }
    let out = long_ok_strings(client, &argv);
    let want = if hits { "200" } else { "404" };
    let mut times = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(
            f.len() == 2 && f[0] == want,
            "narinfo look-up: {line} (wanted {want})"
        );
        times.push(f[1].parse::<f64>().unwrap_or(f64::NAN) * 1000.0);
    }
    assert_eq!(times.len(), items.len(), "{out}");
    let asks = agent.metric("nixmesh_narinfo_requests_total") - asks0;
    let raced = races(agent) - races0;
    assert!(
        raced >= items.len() as f64,
        "{raced} races for {} look-ups",
        items.len()
    );
    (asks / items.len() as f64, median(&times))
}

/// Seconds of `nix-store -r --dry-run tops` with `substituters`, from an
/// empty narinfo cache.
fn dry_run(client: &Host, substituters: &str, tops: &[String]) -> f64 {
    let cache = client.dir().join("home/.cache");
    if cache.exists() {
        fs::remove_dir_all(&cache).unwrap_or_else(|e| panic!("rm {}: {e}", cache.display()));
    }
    client.configure_nix(&format!("substituters = {substituters}\n{NEGATIVE_TTL}\n"));
    let mut argv = vec!["nix-store", "--realise", "--dry-run"];
    argv.extend(tops.iter().map(String::as_str));
    timed(client, &argv).as_secs_f64()
}

/// Waits until each of `agents` lists `others` peers alive with a whole
/// summary; how long that took from `since`.
fn wait_whole(agents: &[AgentHandle], others: usize, since: Instant) -> Duration {
    loop {
        let whole = agents.iter().all(|a| {
            let peers = a.peers();
            let done = peers
                .iter()
                .filter(|p| {
                    p.state == PeerState::Alive && p.summary.as_ref().is_some_and(|s| s.complete)
                })
                .count();
            done >= others
        });
        if whole {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(120),
            "after {:?} not every agent has every summary",
            since.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// CPU (% of a core) and RSS (MiB) per agent over 10 idle seconds: min,
/// median and max of each.
fn idle_figures(agents: &[AgentHandle]) -> ([f64; 3], [f64; 3]) {
    let pids: Vec<u32> = agents.iter().map(agent_pid).collect();
    let window = Duration::from_secs(10);
    let before: Vec<f64> = pids.iter().map(|p| cpu_secs(&[*p])).collect();
    std::thread::sleep(window);
    let mut cpu: Vec<f64> = pids
        .iter()
        .zip(&before)
        .map(|(p, b)| (cpu_secs(&[*p]) - b) / window.as_secs_f64() * 100.0)
        .collect();
    let mut rss: Vec<f64> = pids.iter().map(|p| rss_kib(*p) as f64 / 1024.0).collect();
    let spread = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        [v[0], v[v.len() / 2], v[v.len() - 1]]
    };
    (spread(&mut cpu), spread(&mut rss))
}

/// Resident set size of `pid` now, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
