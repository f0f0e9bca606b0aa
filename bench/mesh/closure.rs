//! The closure over many peers: one mesh substituter against every peer
//! listed as a plain HTTP substituter, on veth and over slow LANs.

use super::*;

#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Side {
    Mesh,
    Plain,
}

pub(crate) fn closure_over_peers(s: &Settings, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    eprintln!("== closure: a LAN of 1 client and {} peers", s.peers);
    let lan = Lan::new(1 + s.peers);
    if s.lan_mtu != 1500 {
        lan.set_mtu(s.lan_mtu);
    }
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
            write_payload(&file, size, seed, &s.corpus);
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
    // The large paths as `ADDRESSING` says; the small ones are
    // content-addressed (a group's text file refers to its files).
    let addressing = Addressing::from_env(client);
    for i in 0..s.large_count {
        let peer = peers[large_peer(i, s.large_count, peers.len())];
        let file = peer.dir().join("bench").join(format!("large-{i}"));
        write_payload(&file, s.large_mib * MIB, 1000 + i as u64, &s.corpus);
        let added = long_ok(peer, &["nix-store", "--add", &file.display().to_string()]);
        let path = addressing.path(peer, &one_line(&added));
        fs::remove_file(&file).ok();
        nar_bytes += nar_size_sum(peer, std::slice::from_ref(&path));
        closure.insert(path.clone());
        wanted.push(path);
    }
    let closure: Vec<String> = closure.into_iter().collect();
    eprintln!(
        "closure ({}): {} paths ({} small, {} large of {} MiB), {:.1} MiB of NAR",
        s.corpus,
        closure.len(),
        closure.len() - s.large_count,
        s.large_count,
        s.large_mib,
        nar_bytes as f64 / MIB as f64
    );

    let peer_config = |h: &Host| {
        format!(
            "{}{}[http_cache]\nenable = true\nlisten = \"{}:{CACHE_PORT}\"\n",
            addressing.share_lines(),
            s.holder_share,
            h.addr()
        )
    };
    let peer_agents: Vec<AgentHandle> = peers
        .iter()
        .map(|h| h.start_agent(&peer_config(h)))
        .collect();
    let trusted = addressing.trusted();
    // Before the client's agent starts: it reads the keys there.
    client.configure_nix(&nix_conf(SUBSTITUTER, &trusted));
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
    let side_conf = |side: Side| {
        let substituters = match side {
            Side::Mesh => SUBSTITUTER.to_string(),
            Side::Plain => plain_list.join(" "),
        };
        format!(
            "{}\n{NEGATIVE_TTL}\n{}",
            nix_conf(&substituters, &trusted),
            s.nix_extra
        )
    };

    let groups = &wanted[..peers.len()];
    let larges = &wanted[peers.len()..];
    let what = format!(
        "closure ({}, large {}): {} paths, {:.0} MiB, {} peers",
        s.corpus,
        addressing.name(),
        closure.len(),
        nar_bytes as f64 / MIB as f64,
        peers.len()
    );
    let holders: Vec<&AgentHandle> = peer_agents.iter().collect();
    let mut c = Client {
        host: client,
        agent: &mut client_agent,
        peers: &peers,
        holders: &holders,
        closure: &closure,
        config: &s.client_config,
    };

    // One untimed realisation from the plain caches first (as in the
    // pair): the first NARs written to the client's fresh store cost its
    // file system more than any later ones, which would fall on the side
    // that goes first.
    c.reset(&side_conf(Side::Plain));
    long_ok_strings(c.host, &closure_argv(&wanted));

    let mut sent = HoldersKeptFrames::read(&peer_agents);
    let unshaped = closure_rounds(s, &mut c, &side_conf, &wanted, Some((groups, larges)));
    wait_holders_idle(&holders);
    notes.push(sent.since("closure, unshaped", &peer_agents));
    unshaped.rows(rows, &what, closure.len() - larges.len(), larges.len());
    notes.push(format!(
        "closure: mesh = the client's Nix with one substituter, its own agent; baseline = the same Nix \
         with the {n} peers' [http_cache] endpoints as {n} plain substituters, in host order. Group k \
         (its {m} small paths and the text file referring to them) is on peer k, so Nix asks {avg:.1} \
         caches per small path on average; the large paths are on peers {large_at:?}. The client \
         realises the {g} group files and the {l} large paths ({w} arguments; Nix finds the rest \
         through references). Nix settings: Nix {version}'s defaults ({parallel}; \
         narinfo-cache-negative-ttl 3600) and the harness's (require-sigs, no sandbox); \
         {extra}. Before the rounds the client realises the closure once from the plain caches, \
         untimed (its fresh store's first NARs cost more); each timed part starts after `sync`. \
         Seconds per round (mesh / plain): dry {} / {}; \
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
        version = crate::nix_release(),
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
        let shaped = closure_rounds(s, &mut c, &side_conf, &wanted, None);
        wait_holders_idle(&holders);
        notes.push(sent.since("closure, shaped", &peer_agents));
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
        let slow = closure_rounds(s, &mut c, &side_conf, &wanted, Some((groups, larges)));
        wait_holders_idle(&holders);
        notes.push(sent.since(&format!("closure, {one_way} us"), &peer_agents));
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
    // The last realisation's, which no reset copied.
    keep_log(c.agent);
}

/// The peers' agents' kept zstd frames so far (counters summed): sent in
/// place of packing a chunk, kept, and of those kept, packed while idle.
/// (What each peer sent by codec is counted per asker, which the client's
/// restarts start afresh.)
pub(crate) struct HoldersKeptFrames([f64; 3]);

impl HoldersKeptFrames {
    const METRICS: [&'static str; 3] = [
        "nixmesh_packed_chunks_served_total",
        "nixmesh_packed_chunks_kept_total",
        "nixmesh_packed_chunks_filled_total",
    ];

    /// (0 where kept frames are off: the agent shows no such metric.)
    pub(crate) fn read(agents: &[AgentHandle]) -> Self {
        Self(Self::METRICS.map(|m| agents.iter().filter_map(|a| a.metric_opt(m)).sum()))
    }

    /// A note of what changed since the last reading, which it becomes.
    pub(crate) fn since(&mut self, what: &str, agents: &[AgentHandle]) -> String {
        let now = Self::read(agents);
        let [sent, kept, filled] = [0, 1, 2].map(|i| now.0[i] - self.0[i]);
        *self = now;
        format!(
            "{what}: the peers sent {sent:.0} chunks as kept zstd frames and \
             kept {kept:.0} (up to 256 KiB of NAR each), {filled:.0} of them packed while idle."
        )
    }
}

/// With `BENCH_LOGS=<dir>`, the log of the client agent about to be
/// stopped is copied there (`000.log`, `001.log`, ...): what it did since
/// it was started, at the previous reset (the narinfo phase, or the whole
/// closure, or the small then the large paths, or nothing for a plain
/// side's run): each path it substituted, when, from whom and in how many
/// ms.
pub(crate) fn keep_log(agent: &AgentHandle) {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let Some(dir) = std::env::var_os("BENCH_LOGS") else {
        return;
    };
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let to = Path::new(&dir).join(format!("{n:03}.log"));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {dir:?}: {e}"));
    fs::copy(agent.log_path(), &to).unwrap_or_else(|e| panic!("copy to {}: {e}", to.display()));
}

/// The client host of the closure runs, its agent and what it fetches.
pub(crate) struct Client<'a> {
    host: &'a Host,
    agent: &'a mut AgentHandle,
    peers: &'a [&'a Host],
    /// The peers' agents: none may be filling in frames during a timed run.
    holders: &'a [&'a AgentHandle],
    closure: &'a [String],
    /// The client agent's config.
    config: &'a str,
}

impl ClosureTimings {
    pub(crate) fn rows(&self, rows: &mut Vec<Row>, what: &str, smalls: usize, larges: usize) {
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
    /// (no memo of earlier look-ups) that sees every peer again; the peers
    /// done with filling in frames.
    pub(crate) fn reset(&mut self, nix_conf: &str) {
        // First: a holder reading its copy to fill in frames keeps the
        // path alive for the client's collector (one machine).
        wait_holders_idle(self.holders);
        let client = self.host;
        let present: Vec<&str> = self
            .closure
            .iter()
            .map(String::as_str)
            .filter(|p| client.real_path(p).symlink_metadata().is_ok())
            .collect();
        if !present.is_empty() {
            client.delete_paths(&present);
        }
        let cache = client.dir().join("home/.cache");
        if cache.exists() {
            fs::remove_dir_all(&cache).unwrap_or_else(|e| panic!("rm {}: {e}", cache.display()));
        }
        client.configure_nix(nix_conf);
        keep_log(self.agent);
        self.agent.stop();
        *self.agent = client.start_agent(self.config);
        wait_sees_peers(self.agent, self.peers);
    }
}

#[derive(Default)]
pub(crate) struct ClosureTimings {
    dry: Timings,
    all: Timings,
    small: Timings,
    large: Timings,
}

/// `s.rounds` rounds, alternating which side goes first: each side's
/// realisation of `wanted` from a fresh client; with `parts` (group files,
/// large paths) also the narinfo phase alone and each part alone.
pub(crate) fn closure_rounds(
    s: &Settings,
    c: &mut Client,
    nix_conf: &dyn Fn(Side) -> String,
    wanted: &[String],
    parts: Option<(&[String], &[String])>,
) -> ClosureTimings {
    let realise = closure_argv;
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

/// `nix-store --realise` of `paths`.
fn closure_argv(paths: &[String]) -> Vec<String> {
    let mut argv = vec!["nix-store".to_string(), "--realise".to_string()];
    argv.extend(paths.iter().cloned());
    argv
}

/// Which peer holds large path `i` of `count`: spread evenly.
pub(crate) fn large_peer(i: usize, count: usize, peers: usize) -> usize {
    ((2 * i + 1) * peers) / (2 * count)
}

#[derive(Default)]
pub(crate) struct Timings {
    mesh: Vec<f64>,
    plain: Vec<f64>,
}

impl Timings {
    pub(crate) fn push(&mut self, side: Side, t: Duration) {
        match side {
            Side::Mesh => self.mesh.push(t.as_secs_f64()),
            Side::Plain => self.plain.push(t.as_secs_f64()),
        }
    }

    pub(crate) fn last(&self, side: Side) -> String {
        let v = match side {
            Side::Mesh => &self.mesh,
            Side::Plain => &self.plain,
        };
        v.last().map_or("-".to_string(), |t| format!("{t:.2}"))
    }

    pub(crate) fn list(&self, side: Side) -> String {
        let v = match side {
            Side::Mesh => &self.mesh,
            Side::Plain => &self.plain,
        };
        let parts: Vec<String> = v.iter().map(|t| format!("{t:.2}")).collect();
        parts.join(" ")
    }

    /// Seconds: the ratio is plain / mesh, how many times faster the mesh is.
    pub(crate) fn row(&self, what: &str) -> Row {
        let (m, p) = (median(&self.mesh), median(&self.plain));
        Row {
            what: what.to_string(),
            mesh: format!("{m:.2}"),
            other: format!("{p:.2} (plain)"),
            ratio: format!("plain/mesh = {:.2}x", p / m),
        }
    }
}
