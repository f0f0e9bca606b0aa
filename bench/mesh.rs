//! Benchmark of the mesh substituter on a real LAN of network-namespace
//! hosts (the integration harness, reused as is). Not a test: it asserts
//! only that every run delivered what it should, and prints figures.
//!
//! Three measurements, each taken side by side in one run (alternating which
//! side goes first), so that the noise of a busy machine hits both alike:
//!
//! 1. **Closure over many peers.** A closure of a few hundred small paths
//!    and a few large ones, spread over the peers. The client's unmodified
//!    Nix realises it through its own agent (`http://127.0.0.1:5181`, one
//!    substituter), against the same Nix with every peer listed as a plain
//!    HTTP substituter (each peer's agent serving its own store with
//!    `[http_cache]`). Both with a fresh narinfo disk cache and an empty
//!    client store each time, and Nix's default negative-narinfo TTL. On
//!    veth a round trip takes microseconds, so the same runs are repeated on
//!    a slow LAN: the harness's user-space switch delays every frame (0.5 ms
//!    and 4 ms round trips by default: a busy wired LAN, Wi-Fi).
//! 2. **NAR throughput between two hosts.** A large NAR peer to peer: QUIC
//!    through the client's agent, against nginx on the serving host sending
//!    the same NAR as a static file (`nix copy --to file://…`), over the
//!    same link, unshaped and then shaped by `tbf`.
//! 3. **Agent memory.** Peak RSS (`VmHWM`) of the serving and the client
//!    agent after Nix substitutes one NAR through them (256 MiB, 1 GiB and
//!    4 GiB, each with freshly started agents): it should not grow with
//!    the NAR.
//!
//! Run (root, Debian's nix-bin and nginx, the Debian roots of
//! `.ci/nix-roots.sh`):
//!
//! ```text
//! CARGO_TARGET_DIR=/tmp/mbench-target cargo bench --bench mesh
//! ```
//!
//! Every host's Nix is the one `NIXMESH_TEST_NIX` selects, as for the tests
//! (`2.34` by default, `2.26`, or `host` for Debian 12's 2.8), with its
//! default settings unless `NIX_EXTRA` adds some.
//!
//! Knobs, from the environment (defaults in brackets): `PEERS` [10],
//! `SMALL_PER_PEER` [30], `LARGE_COUNT` [4], `LARGE_MIB` [64], `ROUNDS` [3],
//! `BIG_MIB` [1024] (the throughput NAR), `SHAPE_MBIT` [1000] (0: no shaped
//! runs), `DELAYS_US` [250,2000] (one-way delays of the slow-LAN closure
//! runs; empty: none), `MEM_MIBS` [256,1024,4096] (empty: no memory check), `NIX_EXTRA`
//! (more nix.conf lines for the closure client, e.g. `max-jobs = 8`),
//! `CLIENT_CONFIG` (the closure client agent's config, TOML),
//! `PARTS` [closure,pair]. A quick look: `PEERS=4 SMALL_PER_PEER=10
//! LARGE_MIB=8 BIG_MIB=64 MEM_MIBS= SHAPE_MBIT=0 ROUNDS=1`.
//!
//! The bench target has `bench = false` so that `cargo test --all-targets`
//! (which runs every target with `bench = true`) leaves it alone; name it
//! with `--bench mesh`.

#[path = "../integration"]
mod integration {
    //! The integration tests' LAN harness; the bench uses part of it.
    #[allow(dead_code, unused_imports)]
    pub mod harness;
}

use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use integration::harness::{AgentHandle, Host, Lan};
use nixmesh::mesh::peers::PeerState;

/// Where every agent's substituter listens, inside its own host.
const SUBSTITUTER: &str = "http://127.0.0.1:5181";
/// The `[http_cache]` port of the peers.
const CACHE_PORT: u16 = 5180;
/// nginx's port on the serving host.
const NGINX_PORT: u16 = 8080;
/// How long a restarted agent may take to see every peer alive.
const CONVERGE: Duration = Duration::from_secs(30);
/// Longest any one command of the bench may run (4 GiB through Nix).
const LONG_LIMIT_SECS: &str = "1200";
/// Nix's own default; the harness sets 0 for its tests. Each run starts
/// with an empty cache dir anyway, so nothing carries over between runs.
const NEGATIVE_TTL: &str = "narinfo-cache-negative-ttl = 3600";

const MIB: u64 = 1024 * 1024;

struct Settings {
    /// Peers holding the closure (plus one client host).
    peers: usize,
    /// Small paths per peer (1–16 KiB each) and one group path referring
    /// to them.
    small_per_peer: usize,
    /// Large paths in the closure, and the size of each.
    large_count: usize,
    large_mib: u64,
    /// Repetitions of every measurement; medians are reported.
    rounds: usize,
    /// The NAR of the throughput comparison.
    big_mib: u64,
    /// The shaped link's rate; 0 skips the shaped comparison.
    shape_mbit: u64,
    /// One-way delays of the slow-LAN closure runs (µs, comma separated;
    /// empty: none), on top of the shaping.
    delays_us: Vec<u64>,
    /// The NAR sizes of the memory check (MiB, comma separated); empty
    /// skips it.
    mem_mibs: Vec<u64>,
    /// More nix.conf lines for the closure client, both sides
    /// (e.g. `max-jobs = 4`).
    nix_extra: String,
    /// The closure client's agent config (TOML), e.g. to turn a feature
    /// off.
    client_config: String,
    /// Which parts run: `closure`, `pair` (throughput and memory), or both
    /// (the default), comma separated.
    parts: String,
}

impl Settings {
    fn from_env() -> Settings {
        let get = |name: &str, default: u64| -> u64 {
            match std::env::var(name) {
                Ok(v) => v
                    .parse()
                    .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")),
                Err(_) => default,
            }
        };
        Settings {
            peers: get("PEERS", 10) as usize,
            small_per_peer: get("SMALL_PER_PEER", 30) as usize,
            large_count: get("LARGE_COUNT", 4) as usize,
            large_mib: get("LARGE_MIB", 64),
            rounds: get("ROUNDS", 3).max(1) as usize,
            big_mib: get("BIG_MIB", 1024),
            shape_mbit: get("SHAPE_MBIT", 1000),
            delays_us: numbers("DELAYS_US", "250,2000"),
            mem_mibs: numbers("MEM_MIBS", "256,1024,4096"),
            nix_extra: std::env::var("NIX_EXTRA").unwrap_or_default(),
            client_config: std::env::var("CLIENT_CONFIG").unwrap_or_default(),
            parts: std::env::var("PARTS").unwrap_or_else(|_| "closure,pair".into()),
        }
    }
}

/// A comma-separated list of numbers from the environment.
fn numbers(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter(|v| !v.trim().is_empty())
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|e| panic!("{name}: {v:?} is not a number: {e}"))
        })
        .collect()
}

/// One line of the summary: a measurement, both sides and their ratio.
struct Row {
    what: String,
    mesh: String,
    other: String,
    ratio: String,
}

fn main() {
    if std::env::var_os("RUST_LOG").is_none() {
        // The harness's default (debug) logs every request; a benchmark
        // should not pay for that. Set before any thread is started.
        std::env::set_var("RUST_LOG", "info");
    }
    let s = Settings::from_env();
    let started = Instant::now();
    let load_before = load_average();
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    let runs = |part: &str| s.parts.split(',').any(|p| p.trim() == part);
    if runs("closure") {
        closure_over_peers(&s, &mut rows, &mut notes);
    }
    if runs("pair") {
        two_hosts(&s, &mut rows, &mut notes);
    }

    println!();
    println!(
        "== nixmesh mesh benchmark (Nix {}, {} peers, {} rounds, medians; took {:.0?}; load average {} -> {})",
        integration::harness::nix_under_test::selected().version,
        s.peers,
        s.rounds,
        started.elapsed(),
        load_before,
        load_average()
    );
    let w0 = rows.iter().map(|r| r.what.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.mesh.len()).max().unwrap_or(0).max(4);
    let w2 = rows.iter().map(|r| r.other.len()).max().unwrap_or(0).max(8);
    println!(
        "{:w0$}  {:>w1$}  {:>w2$}  ratio",
        "measurement", "mesh", "baseline"
    );
    for r in &rows {
        println!(
            "{:w0$}  {:>w1$}  {:>w2$}  {}",
            r.what, r.mesh, r.other, r.ratio
        );
    }
    println!();
    for n in &notes {
        println!("- {n}");
    }
}

// ------------------------------------------------------------------------
// 1. A closure spread over many peers: one mesh substituter against every
//    peer as a plain HTTP substituter.

#[derive(Clone, Copy, PartialEq, Debug)]
enum Side {
    Mesh,
    Plain,
}

fn closure_over_peers(s: &Settings, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    eprintln!("== closure: a LAN of 1 client and {} peers", s.peers);
    let lan = Lan::new(1 + s.peers);
    let client = lan.host(0);
    let peers: Vec<&Host> = lan.hosts()[1..].iter().collect();

    // Each peer: its group of small files, added by one Nix evaluation, and
    // a text file referring to all of them (what makes it a closure: Nix
    // finds the small paths through the group's references).
    let mut wanted = Vec::new();
    let mut closure = BTreeSet::new();
    let mut nar_bytes = 0u64;
    let mut sizes = 0x5EED_u64;
    let mut seed = 1u64;
    for (k, peer) in peers.iter().enumerate() {
        let dir = peer.dir().join("bench").join(format!("group{k}"));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let mut files = Vec::new();
        for i in 0..s.small_per_peer {
            seed += 1;
            let size = 1024 + xorshift(&mut sizes) % (15 * 1024);
            let file = dir.join(format!("small-{k}-{i}"));
            write_noise(&file, size, seed);
            files.push(file);
        }
        let list: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        let expr = format!(
            "builtins.toFile \"bench-group-{k}\" (builtins.concatStringsSep \"\\n\" (map (f: \"${{f}}\") [ {} ]))",
            list.join(" ")
        );
        let top = one_line(&peer.run_ok(&["nix", "eval", "--raw", "--impure", "--expr", &expr]));
        let group = peer.closure(&top);
        assert_eq!(group.len(), s.small_per_peer + 1, "{top}: {group:?}");
        nar_bytes += nar_size_sum(peer, &group);
        closure.extend(group);
        wanted.push(top);
    }
    for i in 0..s.large_count {
        let peer = peers[large_peer(i, s.large_count, peers.len())];
        let file = peer.dir().join("bench").join(format!("large-{i}"));
        write_noise(&file, s.large_mib * MIB, 1000 + i as u64);
        let path = long_ok(peer, &["nix-store", "--add", &file.display().to_string()]);
        let path = one_line(&path);
        fs::remove_file(&file).ok();
        nar_bytes += nar_size_sum(peer, std::slice::from_ref(&path));
        closure.insert(path.clone());
        wanted.push(path);
    }
    let closure: Vec<String> = closure.into_iter().collect();
    eprintln!(
        "closure: {} paths ({} small, {} large of {} MiB), {:.1} MiB of NAR",
        closure.len(),
        closure.len() - s.large_count,
        s.large_count,
        s.large_mib,
        nar_bytes as f64 / MIB as f64
    );

    let peer_config = |h: &Host| {
        format!(
            "[share]\ncontent_addressed = true\n[http_cache]\nenable = true\nlisten = \"{}:{CACHE_PORT}\"\n",
            h.addr()
        )
    };
    let _peer_agents: Vec<AgentHandle> = peers
        .iter()
        .map(|h| h.start_agent(&peer_config(h)))
        .collect();
    let mut client_agent = client.start_agent(&s.client_config);
    let took = wait_sees_peers(&client_agent, &peers);
    eprintln!(
        "closure: the client sees all {} peers after {took:?}",
        peers.len()
    );

    let plain_list: Vec<String> = peers
        .iter()
        .map(|h| format!("http://{}:{CACHE_PORT}", h.addr()))
        .collect();
    let nix_conf = |side: Side| {
        let substituters = match side {
            Side::Mesh => SUBSTITUTER.to_string(),
            Side::Plain => plain_list.join(" "),
        };
        format!(
            "substituters = {substituters}\n{NEGATIVE_TTL}\n{}",
            s.nix_extra
        )
    };

    let groups = &wanted[..peers.len()];
    let larges = &wanted[peers.len()..];
    let what = format!(
        "closure: {} paths, {:.0} MiB, {} peers",
        closure.len(),
        nar_bytes as f64 / MIB as f64,
        peers.len()
    );
    let mut c = Client {
        host: client,
        agent: &mut client_agent,
        peers: &peers,
        closure: &closure,
        config: &s.client_config,
    };

    let unshaped = closure_rounds(s, &mut c, &nix_conf, &wanted, Some((groups, larges)));
    unshaped.rows(rows, &what, closure.len() - larges.len(), larges.len());
    notes.push(format!(
        "closure: mesh = the client's Nix with one substituter, its own agent; baseline = the same Nix \
         with the {n} peers' [http_cache] endpoints as {n} plain substituters, in host order. Group k \
         (its {m} small paths and the text file referring to them) is on peer k, so Nix asks {avg:.1} \
         caches per small path on average; the large paths are on peers {large_at:?}. The client \
         realises the {g} group files and the {l} large paths ({w} arguments; Nix finds the rest \
         through references). Nix settings: Nix {version}'s defaults ({parallel}; \
         narinfo-cache-negative-ttl 3600) and the harness's (require-sigs, no sandbox); \
         {extra}. Seconds per round (mesh / plain): dry {} / {}; \
         realise {} / {}.",
        unshaped.dry.list(Side::Mesh),
        unshaped.dry.list(Side::Plain),
        unshaped.all.list(Side::Mesh),
        unshaped.all.list(Side::Plain),
        n = peers.len(),
        m = s.small_per_peer,
        avg = (peers.len() + 1) as f64 / 2.0,
        large_at = (0..s.large_count)
            .map(|i| format!("h{}", 1 + large_peer(i, s.large_count, peers.len())))
            .collect::<Vec<_>>(),
        g = groups.len(),
        l = larges.len(),
        w = wanted.len(),
        version = integration::harness::nix_under_test::selected().version,
        parallel = if integration::harness::nix_under_test::selected().version == "2.8" {
            "max-jobs 1: one substitution at a time"
        } else {
            "max-substitution-jobs 16: 16 substitutions at once; http-connections 25"
        },
        extra = if s.nix_extra.is_empty() {
            "nothing else".to_string()
        } else {
            format!("plus {:?}", s.nix_extra)
        },
    ));

    if s.shape_mbit > 0 {
        for h in lan.hosts() {
            h.shape(s.shape_mbit * 1_000_000);
        }
        let shaped = closure_rounds(s, &mut c, &nix_conf, &wanted, None);
        rows.push(shaped.all.row(&format!(
            "{what}, every link {} Mbit/s: nix-store -r, s",
            s.shape_mbit
        )));
        notes.push(format!(
            "closure, shaped: every host's link limited to {} Mbit/s each way (tbf); seconds per round \
             (mesh / plain): {} / {}.",
            s.shape_mbit,
            shaped.all.list(Side::Mesh),
            shaped.all.list(Side::Plain),
        ));
    }

    for &one_way in &s.delays_us {
        let _switch = lan.delay(Duration::from_micros(one_way));
        let slow = closure_rounds(s, &mut c, &nix_conf, &wanted, Some((groups, larges)));
        let rtts: Vec<f64> = c.agent.peers().iter().filter_map(|p| p.rtt_ms).collect();
        let connect = tcp_connect_ms(client, &plain_list[0]);
        let slow_what = format!("{what}, {}", slow_label(one_way, s.shape_mbit));
        slow.rows(rows, &slow_what, closure.len() - larges.len(), larges.len());
        notes.push(format!(
            "closure, slow LAN: every frame delayed {one_way} us each way by the harness's \
             user-space switch (this kernel has no netem){}; a TCP connect from the client to \
             a peer took {connect:.2} ms (median of 5), the client agent's pings {:.2} ms. Seconds per round (mesh / plain): dry {} / {}; \
             realise {} / {}.",
            if s.shape_mbit > 0 {
                format!(", links still shaped to {} Mbit/s", s.shape_mbit)
            } else {
                String::new()
            },
            median(&rtts),
            slow.dry.list(Side::Mesh),
            slow.dry.list(Side::Plain),
            slow.all.list(Side::Mesh),
            slow.all.list(Side::Plain),
        ));
    }
}

/// The client host of the closure runs, its agent and what it fetches.
struct Client<'a> {
    host: &'a Host,
    agent: &'a mut AgentHandle,
    peers: &'a [&'a Host],
    closure: &'a [String],
    /// The client agent's config.
    config: &'a str,
}

impl ClosureTimings {
    fn rows(&self, rows: &mut Vec<Row>, what: &str, smalls: usize, larges: usize) {
        rows.push(
            self.dry
                .row(&format!("{what}: narinfo phase (-r --dry-run), s")),
        );
        rows.push(self.all.row(&format!("{what}: nix-store -r, s")));
        rows.push(
            self.small
                .row(&format!("  of which the {smalls} small paths alone, s")),
        );
        rows.push(
            self.large
                .row(&format!("  of which the {larges} large paths alone, s")),
        );
    }
}

impl Client<'_> {
    /// Makes the client as new for the next run: none of the closure in
    /// its store, no narinfo disk cache, `nix_conf`, and a restarted agent
    /// (no memo of earlier look-ups) that sees every peer again.
    fn reset(&mut self, nix_conf: &str) {
        let client = self.host;
        let present: Vec<&str> = self
            .closure
            .iter()
            .map(String::as_str)
            .filter(|p| client.real_path(p).symlink_metadata().is_ok())
            .collect();
        if !present.is_empty() {
            let mut argv = vec!["nix-store", "--delete"];
            argv.extend(&present);
            long_ok(client, &argv);
        }
        let cache = client.dir().join("home/.cache");
        if cache.exists() {
            fs::remove_dir_all(&cache).unwrap_or_else(|e| panic!("rm {}: {e}", cache.display()));
        }
        client.configure_nix(nix_conf);
        self.agent.stop();
        *self.agent = client.start_agent(self.config);
        wait_sees_peers(self.agent, self.peers);
    }
}

#[derive(Default)]
struct ClosureTimings {
    dry: Timings,
    all: Timings,
    small: Timings,
    large: Timings,
}

/// `s.rounds` rounds, alternating which side goes first: each side's
/// realisation of `wanted` from a fresh client; with `parts` (group files,
/// large paths) also the narinfo phase alone and each part alone.
fn closure_rounds(
    s: &Settings,
    c: &mut Client,
    nix_conf: &dyn Fn(Side) -> String,
    wanted: &[String],
    parts: Option<(&[String], &[String])>,
) -> ClosureTimings {
    let realise = |paths: &[String]| {
        let mut argv = vec!["nix-store".to_string(), "--realise".to_string()];
        argv.extend(paths.iter().cloned());
        argv
    };
    let all_argv = realise(wanted);
    let mut dry_argv = all_argv.clone();
    dry_argv.insert(2, "--dry-run".to_string());
    let mut t = ClosureTimings::default();
    for round in 0..s.rounds {
        let order = if round % 2 == 0 {
            [Side::Mesh, Side::Plain]
        } else {
            [Side::Plain, Side::Mesh]
        };
        for side in order {
            let conf = nix_conf(side);
            if parts.is_some() {
                // Only the narinfo look-ups (Nix's queryMissing).
                c.reset(&conf);
                t.dry.push(side, timed_strings(c.host, &dry_argv));
            }
            c.reset(&conf);
            t.all.push(side, timed_strings(c.host, &all_argv));
            let mut check = vec!["nix-store".to_string(), "--check-validity".to_string()];
            check.extend(c.closure.iter().cloned());
            long_ok_strings(c.host, &check);
            if let Some((small, large)) = parts {
                c.reset(&conf);
                t.small.push(side, timed_strings(c.host, &realise(small)));
                if !large.is_empty() {
                    t.large.push(side, timed_strings(c.host, &realise(large)));
                }
            }
            eprintln!(
                "closure round {round}: {side:?} dry {} all {} small {} large {}",
                t.dry.last(side),
                t.all.last(side),
                t.small.last(side),
                t.large.last(side)
            );
        }
    }
    t
}

/// Which peer holds large path `i` of `count`: spread evenly.
fn large_peer(i: usize, count: usize, peers: usize) -> usize {
    ((2 * i + 1) * peers) / (2 * count)
}

#[derive(Default)]
struct Timings {
    mesh: Vec<f64>,
    plain: Vec<f64>,
}

impl Timings {
    fn push(&mut self, side: Side, t: Duration) {
        match side {
            Side::Mesh => self.mesh.push(t.as_secs_f64()),
            Side::Plain => self.plain.push(t.as_secs_f64()),
        }
    }

    fn last(&self, side: Side) -> String {
        let v = match side {
            Side::Mesh => &self.mesh,
            Side::Plain => &self.plain,
        };
        v.last().map_or("-".to_string(), |t| format!("{t:.2}"))
    }

    fn list(&self, side: Side) -> String {
        let v = match side {
            Side::Mesh => &self.mesh,
            Side::Plain => &self.plain,
        };
        let parts: Vec<String> = v.iter().map(|t| format!("{t:.2}")).collect();
        parts.join(" ")
    }

    /// Seconds: the ratio is plain / mesh, how many times faster the mesh is.
    fn row(&self, what: &str) -> Row {
        let (m, p) = (median(&self.mesh), median(&self.plain));
        Row {
            what: what.to_string(),
            mesh: format!("{m:.2}"),
            other: format!("{p:.2} (plain)"),
            ratio: format!("plain/mesh = {:.2}x", p / m),
        }
    }
}

// ------------------------------------------------------------------------
// 2 and 3. Two hosts: NAR throughput over QUIC against nginx, then agent
//    memory while streaming a small and a huge NAR.

fn two_hosts(s: &Settings, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    eprintln!("== two hosts: throughput and memory");
    let lan = Lan::new(2);
    let (client, server) = (lan.host(0), lan.host(1));

    let big_file = server.dir().join("bench/big");
    write_noise(&big_file, s.big_mib * MIB, 7);
    let big = one_line(&long_ok(
        server,
        &["nix-store", "--add", &big_file.display().to_string()],
    ));
    fs::remove_file(&big_file).ok();
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
    let mut nginx = Nginx::start(server, &export);
    let nginx_base = format!("http://{}:{NGINX_PORT}", server.addr());
    let cache_base = format!("http://{}:{CACHE_PORT}", server.addr());

    let server_config = format!(
        "[share]\ncontent_addressed = true\n[http_cache]\nenable = true\nlisten = \"{}:{CACHE_PORT}\"\n",
        server.addr()
    );
    let mut server_agent = server.start_agent(&server_config);
    let mut client_agent = client.start_agent("");
    wait_sees_peers(&client_agent, &[server]);

    let nginx_nar = format!("{nginx_base}/{}", nar_url(client, &nginx_base, &big));
    let cache_nar = format!("{cache_base}/{}", nar_url(client, &cache_base, &big));
    // Warm the page cache of both copies on the server (store and export).
    curl_get(client, &nginx_nar);
    curl_get(client, &cache_nar);

    let label = format!("{} MiB NAR", big_nar / MIB);
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
        nginx: nginx.child.id(),
    };
    throughput(s, &pair, &format!("{label}, unshaped veth"), rows);

    if !s.mem_mibs.is_empty() {
        memory(
            s,
            client,
            server,
            &mut client_agent,
            &mut server_agent,
            &server_config,
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
            &format!("{label}, link shaped to {} Mbit/s", s.shape_mbit),
            rows,
        );
    }
    for &one_way in &s.delays_us {
        let _switch = lan.delay(Duration::from_micros(one_way));
        let what = format!("{label}, {}", slow_label(one_way, s.shape_mbit));
        throughput(s, &pair, &what, rows);
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
struct Pair<'a> {
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
}

fn throughput(s: &Settings, p: &Pair, label: &str, rows: &mut Vec<Row>) {
    let (mut mesh_raw, mut nginx_raw, mut cache_raw) = (Vec::new(), Vec::new(), Vec::new());
    let (mut mesh_nix, mut nginx_nix) = (Vec::new(), Vec::new());
    // CPU seconds per GiB: server agent + client agent, nginx, server agent.
    let (mut mesh_cpu, mut nginx_cpu, mut cache_cpu) = (Vec::new(), Vec::new(), Vec::new());
    // Bytes the server's link sent and received per NAR byte: framing,
    // retransmissions, acknowledgements.
    let (mut mesh_sent, mut nginx_sent) = (Vec::new(), Vec::new());
    let (mut mesh_recv, mut nginx_recv) = (Vec::new(), Vec::new());
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
    for round in 0..s.rounds {
        let mesh_first = round % 2 == 0;
        for mesh_turn in [mesh_first, !mesh_first] {
            if mesh_turn {
                // The narinfo first, as Nix does: it tells the agent where
                // the NAR is.
                let url = nar_url(p.client, SUBSTITUTER, p.big);
                let before = cpu_secs(&[p.server_agent, p.client_agent]);
                let wire = link(p.server);
                let t = curl_get(p.client, &format!("{SUBSTITUTER}/{url}"));
                let (sent, received) = per_nar_byte(wire, link(p.server));
                mesh_cpu.push((cpu_secs(&[p.server_agent, p.client_agent]) - before) / gib);
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
                format!("substituters = {SUBSTITUTER}")
            } else {
                format!("substituters = {}", p.nginx_base)
            };
            forget(p.client, &[p.big.to_string()], &conf);
            let t = timed(p.client, &["nix-store", "--realise", p.big]);
            if mesh_turn {
                mesh_nix.push(mbps(t));
            } else {
                nginx_nix.push(mbps(t));
            }
        }
        eprintln!(
            "throughput round {round} ({label}): raw mesh {:.0} nginx {:.0} http_cache {:.0}; \
             nix-store -r mesh {:.0} nginx {:.0} MB/s; CPU s/GiB mesh {:.2} nginx {:.2} http_cache {:.2}; \
             server sent/received per NAR byte mesh {:.3}/{:.3} nginx {:.3}/{:.3}",
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
        );
    }
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
}

fn memory(
    s: &Settings,
    client: &Host,
    server: &Host,
    client_agent: &mut AgentHandle,
    server_agent: &mut AgentHandle,
    server_config: &str,
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
        *server_agent = server.start_agent(server_config);
        client_agent.stop();
        *client_agent = client.start_agent("");
        wait_sees_peers(client_agent, &[server]);
        let idle = (
            vm_hwm(agent_pid(server_agent)),
            vm_hwm(agent_pid(client_agent)),
        );

        forget(client, &[], &format!("substituters = {SUBSTITUTER}"));
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
fn forget(client: &Host, paths: &[String], nix_conf: &str) {
    for p in paths {
        if client.real_path(p).symlink_metadata().is_ok() {
            long_ok(client, &["nix-store", "--delete", p]);
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

/// nginx inside a host, serving `root` on its LAN address.
struct Nginx {
    child: Child,
}

impl Nginx {
    fn start(host: &Host, root: &Path) -> Nginx {
        let dir = host.dir().join("nginx");
        fs::create_dir_all(dir.join("tmp")).expect("mkdir nginx");
        let d = dir.display();
        let conf = format!(
            "user root;
worker_processes auto;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    types {{
        text/x-nix-narinfo narinfo;
        text/x-nix-cache-info nix-cache-info;
        application/x-nix-nar nar;
    }}
    default_type application/octet-stream;
    server {{
        listen {}:{NGINX_PORT};
        root {};
    }}
}}
",
            host.addr(),
            root.display()
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf).expect("write nginx.conf");
        let log = fs::File::create(dir.join("stderr.log")).expect("nginx log");
        let child = host
            .command(&[
                "nginx",
                "-p",
                &dir.display().to_string(),
                "-c",
                &conf_path.display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx { child };
        let url = format!("http://{}:{NGINX_PORT}/nix-cache-info", host.addr());
        let deadline = Instant::now() + Duration::from_secs(10);
        while host.http_status(&url).0 != 200 {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!(
                    "nginx exited ({status}): {}",
                    fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "nginx does not answer at {url}");
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }

    fn stop(&mut self) {
        // SIGTERM: the master takes its workers with it.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------------
// Helpers on top of the harness.

/// Waits until `agent` lists every one of `peers` as alive.
fn wait_sees_peers(agent: &AgentHandle, peers: &[&Host]) -> Duration {
    let started = Instant::now();
    loop {
        let table = agent.peers();
        let all = peers.iter().all(|h| {
            table
                .iter()
                .any(|p| p.name == h.name() && p.state == PeerState::Alive)
        });
        if all {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < CONVERGE,
            "the agent does not see all peers alive after {CONVERGE:?}: {table:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `argv` on `host` with the bench's long time limit; panics unless
/// it succeeds. Returns stdout.
fn long_ok(host: &Host, argv: &[&str]) -> String {
    let mut full = vec!["timeout", "-k", "5", LONG_LIMIT_SECS];
    full.extend_from_slice(argv);
    let out = host
        .command(&full)
        .output()
        .unwrap_or_else(|e| panic!("{}: cannot run {argv:?}: {e}", host.name()));
    if !out.status.success() {
        let mut shown: Vec<&str> = argv.iter().take(8).copied().collect();
        if argv.len() > 8 {
            shown.push("…");
        }
        panic!(
            "on {}: `{}` failed ({})\n--- stdout ---\n{}--- stderr ---\n{}",
            host.name(),
            shown.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How long `argv` takes on `host` (wall clock, including entering the
/// host, a few milliseconds).
fn timed(host: &Host, argv: &[&str]) -> Duration {
    let started = Instant::now();
    long_ok(host, argv);
    started.elapsed()
}

fn timed_strings(host: &Host, argv: &[String]) -> Duration {
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    timed(host, &argv)
}

fn long_ok_strings(host: &Host, argv: &[String]) -> String {
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    long_ok(host, &argv)
}

/// "0.5 ms round trip, shaped to 1000 Mbit/s": a slow-LAN run's label.
fn slow_label(one_way_us: u64, shape_mbit: u64) -> String {
    let rtt_ms = 2.0 * one_way_us as f64 / 1000.0;
    if shape_mbit > 0 {
        format!("{rtt_ms:.1} ms round trip, shaped to {shape_mbit} Mbit/s")
    } else {
        format!("{rtt_ms:.1} ms round trip")
    }
}

/// The median of five TCP handshakes from `host` to `url`'s server, in ms:
/// one network round trip.
fn tcp_connect_ms(host: &Host, url: &str) -> f64 {
    let times: Vec<f64> = (0..5)
        .map(|_| {
            let out = curl_write_out(host, url, "%{time_connect}");
            let secs: f64 = out
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("curl {url}: {out}: {e}"));
            secs * 1000.0
        })
        .collect();
    median(&times)
}

/// GETs `url` inside `host` into /dev/null; panics unless 200. Returns
/// curl's own transfer time.
fn curl_get(host: &Host, url: &str) -> Duration {
    let out = curl_write_out(host, url, "%{http_code} %{size_download} %{time_total}");
    let f: Vec<&str> = out.split_whitespace().collect();
    assert!(f.len() == 3 && f[0] == "200", "GET {url}: {out}");
    let secs: f64 = f[2].parse().unwrap_or_else(|e| panic!("{out}: {e}"));
    Duration::from_secs_f64(secs)
}

/// GETs `url` inside `host` into /dev/null; what curl's `-w format` says.
fn curl_write_out(host: &Host, url: &str, format: &str) -> String {
    long_ok(host, &["curl", "-s", "-o", "/dev/null", "-w", format, url])
}

/// The `URL:` of `path`'s narinfo at the cache `base`, asked from `host`.
fn nar_url(host: &Host, base: &str, path: &str) -> String {
    let hash = &path["/nix/store/".len().."/nix/store/".len() + 32];
    let text = long_ok(host, &["curl", "-sf", &format!("{base}/{hash}.narinfo")]);
    text.lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap_or_else(|| panic!("no URL in the narinfo from {base}:\n{text}"))
        .to_string()
}

/// Sum of the NAR sizes of `paths` in `host`'s store.
fn nar_size_sum(host: &Host, paths: &[String]) -> u64 {
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    host.nar_size_sum(&paths)
}

/// The process id of `agent`: the process whose command line names its
/// config file (`agent-N.toml` beside its log `agent-N.log`).
fn agent_pid(agent: &AgentHandle) -> u32 {
    let config = agent.log_path().with_extension("toml");
    let config = config.display().to_string();
    let procs = fs::read_dir("/proc").expect("/proc");
    let mut found = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_agent = args.contains(&b"agent".as_slice())
            && args.contains(&config.as_bytes())
            && args.first().is_some_and(|a| a.ends_with(b"nixmesh"));
        if is_agent {
            found.push(pid);
        }
    }
    match found[..] {
        [pid] => pid,
        _ => panic!("expected one agent process with {config}, found {found:?}"),
    }
}

/// `pid` and all its descendants (nginx: the master and its workers).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        let tasks = fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten();
        for task in tasks {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            all.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    all
}

/// User plus system CPU time of `pids` so far, seconds.
fn cpu_secs(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    pids.iter()
        .map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
            // Fields 14 and 15 of proc(5), after `pid (comm) `.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            let field = |n: usize| -> f64 {
                fields
                    .get(n - 3)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("/proc/{pid}/stat: no field {n}: {stat}"))
            };
            (field(14) + field(15)) / ticks
        })
        .sum()
}

/// Peak resident set size of process `pid`, KiB.
fn vm_hwm(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM for {pid}:\n{status}"))
}

/// Writes `size` bytes of fast pseudo-random noise (incompressible, and
/// different for every `seed`) to `path`.
fn write_noise(path: &Path, size: u64, seed: u64) {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    }
    let file = fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = std::io::BufWriter::with_capacity(MIB as usize, file);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut left = size;
    let mut buf = vec![0u8; MIB as usize];
    while left > 0 {
        let n = left.min(MIB) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            let word = xorshift(&mut state).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        out.write_all(&buf[..n])
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        left -= n as u64;
    }
    out.flush()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// The machine's 1-minute load average, to judge the noise of a run.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn one_line(stdout: &str) -> String {
    let mut lines = stdout.lines();
    match (lines.next(), lines.next()) {
        (Some(line), None) => line.to_string(),
        _ => panic!("expected one line of output, got {stdout:?}"),
    }
}
