//! The mesh at office scale: 50 agents with default settings on one LAN
//! find each other by mDNS alone, find each other again after five of
//! them crash and come back, and do both on a LAN that loses frames.
//! Prints the figures (convergence time, idle CPU and memory per agent).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use nixmesh::mesh::peers::PeerState;

use crate::harness::{AgentHandle, Host, Lan};

/// Agents on the LAN; `NIXMESH_OFFICE_AGENTS` runs another size by hand.
fn office_size() -> usize {
    std::env::var("NIXMESH_OFFICE_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// Frames lost in the lossy part, per mille; `NIXMESH_OFFICE_LOSS` sets
/// another share by hand (the 20 s promise is for the default, 2 %).
fn loss_per_mille() -> u32 {
    std::env::var("NIXMESH_OFFICE_LOSS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// The promise on a clean LAN: every agent sees every other alive within
/// this long of the last start.
const CONVERGE_CLEAN: Duration = Duration::from_secs(10);
/// The same with 2 % of frames lost.
const CONVERGE_LOSSY: Duration = Duration::from_secs(20);

#[test]
fn fifty_agents_converge_and_reconverge_after_crashes_and_with_loss() {
    let n = office_size();
    let lan = Lan::agents_only(n);
    let hosts: Vec<&Host> = lan.hosts().iter().collect();

    let (mut agents, last_start) = start_all(&hosts);
    let took = converge(
        &hosts,
        &agents,
        last_start,
        CONVERGE_CLEAN,
        "a fresh office",
        false,
    );
    eprintln!("office scale: {n} agents all alive to each other {took:?} after the last start");
    // From the last start, so this includes the wait above and its 2 s
    // check; the bench (`PARTS=catalog`) gives the figure itself. A feed
    // that never completes (a race between a cancelled feed and its
    // replacement once left 1 to 3 of the 2,450 stuck) fails either way.
    let took = summaries_whole(&hosts, &agents, last_start, CONVERGE_LOSSY);
    eprintln!(
        "office scale: every agent holds every other's whole summary {took:?} after the last start"
    );
    idle_figures(&agents);

    // Five crash and come back; everyone must see them alive again.
    let crashed: Vec<usize> = (0..5).map(|i| i * n / 5).collect();
    for &i in &crashed {
        agents[i].kill();
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut restarted = Instant::now();
    for &i in &crashed {
        agents[i] = hosts[i].spawn_agent("");
        restarted = Instant::now();
    }
    for &i in &crashed {
        agents[i].wait_ready();
    }
    let took = converge(
        &hosts,
        &agents,
        restarted,
        CONVERGE_CLEAN,
        "five agents restarted after SIGKILL",
        false,
    );
    eprintln!("office scale: after 5 SIGKILLs and restarts, all alive again {took:?} after the last restart");

    // A lossy LAN (2 % of frames to each host lost on their own): stop
    // everyone cleanly, impair the LAN, start everyone again.
    for a in &mut agents {
        a.stop();
    }
    let loss = loss_per_mille();
    lan.lose_frames(loss);
    let lossy = format!("{n} agents with {:.1} % frame loss", f64::from(loss) / 10.0);
    let (agents, last_start) = start_all(&hosts);
    let took = converge(&hosts, &agents, last_start, CONVERGE_LOSSY, &lossy, true);
    eprintln!(
        "office scale: {lossy} all alive or suspect to each other {took:?} after the last start"
    );
    idle_figures(&agents);
}

/// Spawns an agent with an empty config on every host, then waits until
/// each listens. Returns them and when the last one was spawned.
fn start_all(hosts: &[&Host]) -> (Vec<AgentHandle>, Instant) {
    let mut agents: Vec<AgentHandle> = Vec::with_capacity(hosts.len());
    let mut last = Instant::now();
    for h in hosts {
        agents.push(h.spawn_agent(""));
        last = Instant::now();
    }
    for a in &mut agents {
        a.wait_ready();
    }
    (agents, last)
}

/// How many of the other hosts each agent sees in one of `states`, asked of
/// all agents at once (a few at a time; each answer is a process in the
/// host).
fn counts_in(hosts: &[&Host], agents: &[AgentHandle], states: &[PeerState]) -> Vec<usize> {
    counts_where(hosts, agents, |p| states.contains(&p.state))
}

/// How many of the other hosts each agent lists with `check` true.
fn counts_where(
    hosts: &[&Host],
    agents: &[AgentHandle],
    check: impl Fn(&nixmesh::api::PeerView) -> bool + Sync,
) -> Vec<usize> {
    let check = &check;
    std::thread::scope(|s| {
        let handles: Vec<_> = agents
            .chunks(agents.len().div_ceil(8).max(1))
            .zip(hosts.chunks(agents.len().div_ceil(8).max(1)))
            .map(|(agents, hosts)| {
                s.spawn(move || {
                    agents
                        .iter()
                        .zip(hosts)
                        .map(|(agent, me)| {
                            let alive: HashSet<String> = agent
                                .peers()
                                .into_iter()
                                .filter(|p| check(p) && p.name != me.name())
                                .map(|p| p.name)
                                .collect();
                            alive.len()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a polling thread"))
            .collect()
    })
}

/// Waits until every agent sees every other alive, counting from `since`;
/// then checks, 2 s later, that none has dropped a peer since. (Alive or
/// suspect then: fifty agents share two cores here, and one starved of CPU
/// for two seconds is suspect to its peers for a moment; still used, and
/// nothing like the gone or unlisted peers this test is about.) On a
/// `lossy` LAN that holds for the first wait too: there, in most rounds of
/// polling (each takes about 2 s) one pair or another of the 2,450 is
/// suspect for a moment, so waiting for a round with none at all measured
/// luck (10 to 18 s here, past 20 s once in CI) rather than the mesh. And
/// a pair that drops out then must find each other again within `limit`.
/// Returns the time of the complete round that held.
fn converge(
    hosts: &[&Host],
    agents: &[AgentHandle],
    since: Instant,
    limit: Duration,
    what: &str,
    lossy: bool,
) -> Duration {
    let want = hosts.len() - 1;
    let usable = [PeerState::Alive, PeerState::Suspect];
    let first: &[PeerState] = if lossy { &usable } else { &[PeerState::Alive] };
    loop {
        let counts = counts_in(hosts, agents, first);
        let took = since.elapsed();
        if counts.iter().all(|&c| c == want) {
            std::thread::sleep(Duration::from_secs(2));
            let again = counts_in(hosts, agents, &usable);
            if again.iter().all(|&c| c == want) {
                return took;
            }
            // With frames lost, three keep-alives in a row may go missing
            // between two of 2,450 pairs while their agents are starved of
            // CPU: that pair must find each other again within the limit.
            let pairs = missing_pairs(hosts, agents, &usable);
            assert!(
                lossy && since.elapsed() <= limit,
                "{what}: converged after {took:?}, but 2 s later the agents use {again:?} of {want}:\n{pairs}"
            );
            eprintln!(
                "{what}: converged after {took:?}, 2 s later {again:?} of {want}; waiting again:\n{pairs}"
            );
            continue;
        }
        let complete = counts.iter().filter(|&&c| c == want).count();
        if took > limit {
            panic!(
                "{what}: after {took:?} only {complete} of {} agents see all {want} others {first:?}; counts {counts:?}:\n{}",
                hosts.len(),
                missing_pairs(hosts, agents, first)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Each agent's view of the others it does not see in one of `states`:
/// their state and when it last heard from them, or that it lists them
/// not at all. One line per pair, for a failure's message.
fn missing_pairs(hosts: &[&Host], agents: &[AgentHandle], states: &[PeerState]) -> String {
    let mut lines = String::new();
    for (agent, me) in agents.iter().zip(hosts) {
        let peers = agent.peers();
        for other in hosts.iter().filter(|h| h.name() != me.name()) {
            match peers.iter().find(|p| p.name == other.name()) {
                Some(p) if states.contains(&p.state) => {}
                Some(p) => {
                    lines += &format!(
                        "  {} sees {} {:?}, last heard {:?} ms ago\n",
                        me.name(),
                        other.name(),
                        p.state,
                        p.last_seen_ms_ago
                    );
                }
                None => lines += &format!("  {} does not list {}\n", me.name(), other.name()),
            }
        }
    }
    lines
}

/// Waits until every agent holds every other's summary, whole (protocol
/// 4: which paths each shares); the time since `since`.
fn summaries_whole(
    hosts: &[&Host],
    agents: &[AgentHandle],
    since: Instant,
    limit: Duration,
) -> Duration {
    let want = hosts.len() - 1;
    loop {
        let counts = counts_where(hosts, agents, |p| {
            p.summary.as_ref().is_some_and(|s| s.complete)
        });
        let took = since.elapsed();
        if counts.iter().all(|&c| c == want) {
            return took;
        }
        if took > limit {
            let mut missing = String::new();
            for ((agent, me), &count) in agents.iter().zip(hosts).zip(&counts) {
                if count == want {
                    continue;
                }
                for p in agent.peers() {
                    if !p.summary.as_ref().is_some_and(|s| s.complete) {
                        missing += &format!(
                            "{} lacks {}'s summary ({:?}, state {:?})\n",
                            me.name(),
                            p.name,
                            p.summary,
                            p.state
                        );
                    }
                }
            }
            // What each end of a missing summary said about the other.
            let mut prints: std::collections::HashMap<String, String> = Default::default();
            let mut pairs = Vec::new();
            for (agent, me) in agents.iter().zip(hosts) {
                for p in agent.peers() {
                    prints.insert(p.name.clone(), p.fingerprint.clone());
                    if !p.summary.as_ref().is_some_and(|s| s.complete) {
                        pairs.push((me.name().to_string(), p.name.clone()));
                    }
                }
            }
            let log_of = |name: &str| {
                agents
                    .iter()
                    .zip(hosts)
                    .find(|(_, h)| h.name() == name)
                    .map(|(a, _)| a.log())
                    .unwrap_or_default()
            };
            for (me, peer) in pairs {
                for (from, about) in [(&me, &peer), (&peer, &me)] {
                    let Some(print) = prints.get(about.as_str()) else {
                        continue;
                    };
                    for line in log_of(from).lines().filter(|l| l.contains(print.as_str())) {
                        missing += &format!("  {from} about {about}: {line}\n");
                    }
                }
            }
            panic!(
                "after {took:?} not every agent holds every summary; counts {counts:?}\n{missing}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Prints CPU used over 10 idle seconds and the resident memory of each
/// agent: min, median and max.
fn idle_figures(agents: &[AgentHandle]) {
    let window = Duration::from_secs(10);
    let before: Vec<u64> = agents.iter().map(|a| cpu_ticks(a.pid())).collect();
    std::thread::sleep(window);
    let after: Vec<u64> = agents.iter().map(|a| cpu_ticks(a.pid())).collect();
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let mut cpu: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 / ticks_per_sec / window.as_secs_f64() * 100.0)
        .collect();
    let mut rss: Vec<u64> = agents.iter().map(|a| rss_kib(a.pid())).collect();
    cpu.sort_by(f64::total_cmp);
    rss.sort_unstable();
    let mid = agents.len() / 2;
    eprintln!(
        "office scale: idle CPU per agent (% of a core) min {:.2} median {:.2} max {:.2}; RSS MiB min {:.1} median {:.1} max {:.1}",
        cpu[0],
        cpu[mid],
        cpu[cpu.len() - 1],
        rss[0] as f64 / 1024.0,
        rss[mid] as f64 / 1024.0,
        rss[rss.len() - 1] as f64 / 1024.0
    );
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // Fields after the command name, which ends at the last ')'.
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    field(11) + field(12)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
