//! Commands the bench runs on the LAN's hosts, timed or checked.

use super::*;

/// Waits until `agent` lists every one of `peers` as alive.
pub(crate) fn wait_sees_peers(agent: &AgentHandle, peers: &[&Host]) -> Duration {
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

/// Waits until no agent of `holders` has NARs waiting for their zstd
/// frames to be packed while idle (`nixmesh_packed_fill_pending`), so that
/// no filling runs during a timed part: it is done once per NAR, when the
/// holder is idle. Returns how long it waited.
pub(crate) fn wait_holders_idle(holders: &[&AgentHandle]) -> Duration {
    let started = Instant::now();
    let limit = Duration::from_secs(300);
    while holders
        .iter()
        .any(|a| a.metric_opt("nixmesh_packed_fill_pending").unwrap_or(0.0) > 0.0)
    {
        assert!(
            started.elapsed() < limit,
            "the holders still fill in frames after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

/// Runs `argv` on `host` with the bench's long time limit; panics unless
/// it succeeds. Returns stdout.
pub(crate) fn long_ok(host: &Host, argv: &[&str]) -> String {
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

/// Writes this machine's dirty pages back and waits for them (`sync`), so
/// that a timed part does not pay for the writes of what ran before it:
/// building the hosts' stores leaves about 2 GiB dirty, and each
/// substitution half a GiB, which the kernel otherwise writes back in the
/// middle of the next measurement. Both sides of a comparison start
/// settled alike; the writes of the timed part itself still count as they
/// happen.
pub(crate) fn settle_writes() {
    let status = std::process::Command::new("sync")
        .status()
        .unwrap_or_else(|e| panic!("cannot run sync: {e}"));
    assert!(status.success(), "sync failed: {status}");
}

/// How long `argv` takes on `host` (wall clock, including entering the
/// host, a few milliseconds), from settled writes (`settle_writes`).
pub(crate) fn timed(host: &Host, argv: &[&str]) -> Duration {
    settle_writes();
    let started = Instant::now();
    long_ok(host, argv);
    started.elapsed()
}

pub(crate) fn timed_strings(host: &Host, argv: &[String]) -> Duration {
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    timed(host, &argv)
}

pub(crate) fn long_ok_strings(host: &Host, argv: &[String]) -> String {
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    long_ok(host, &argv)
}

/// "0.5 ms round trip, shaped to 1000 Mbit/s": a slow-LAN run's label.
pub(crate) fn slow_label(one_way_us: u64, shape_mbit: u64) -> String {
    let rtt_ms = 2.0 * one_way_us as f64 / 1000.0;
    if shape_mbit > 0 {
        format!("{rtt_ms:.1} ms round trip, shaped to {shape_mbit} Mbit/s")
    } else {
        format!("{rtt_ms:.1} ms round trip")
    }
}

/// The median of five TCP handshakes from `host` to `url`'s server, in ms:
/// one network round trip.
pub(crate) fn tcp_connect_ms(host: &Host, url: &str) -> f64 {
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

/// GETs `url` inside `host` into /dev/null, from settled writes
/// (`settle_writes`); panics unless 200. Returns curl's own transfer time.
pub(crate) fn curl_get(host: &Host, url: &str) -> Duration {
    settle_writes();
    let out = curl_write_out(host, url, "%{http_code} %{size_download} %{time_total}");
    let f: Vec<&str> = out.split_whitespace().collect();
    assert!(f.len() == 3 && f[0] == "200", "GET {url}: {out}");
    let secs: f64 = f[2].parse().unwrap_or_else(|e| panic!("{out}: {e}"));
    Duration::from_secs_f64(secs)
}

/// GETs `url` inside `host` into /dev/null; what curl's `-w format` says.
pub(crate) fn curl_write_out(host: &Host, url: &str, format: &str) -> String {
    long_ok(host, &["curl", "-s", "-o", "/dev/null", "-w", format, url])
}

/// The `URL:` of `path`'s narinfo at the cache `base`, asked from `host`.
pub(crate) fn nar_url(host: &Host, base: &str, path: &str) -> String {
    let hash = &path["/nix/store/".len().."/nix/store/".len() + 32];
    let text = long_ok(host, &["curl", "-sf", &format!("{base}/{hash}.narinfo")]);
    text.lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap_or_else(|| panic!("no URL in the narinfo from {base}:\n{text}"))
        .to_string()
}

/// Sum of the NAR sizes of `paths` in `host`'s store.
pub(crate) fn nar_size_sum(host: &Host, paths: &[String]) -> u64 {
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    host.nar_size_sum(&paths)
}

/// The process id of `agent`: the process whose command line names its
/// config file (`agent-N.toml` beside its log `agent-N.log`).
/// `pid` and all its descendants (nginx: the master and its workers).
/// User plus system CPU time of `pids` so far, seconds.
/// Peak resident set size of process `pid`, KiB.
/// Writes `size` bytes of fast pseudo-random noise (incompressible, and
/// different for every `seed`) to `path`.
/// The machine's 1-minute load average, to judge the noise of a run.
pub(crate) fn one_line(stdout: &str) -> String {
    let mut lines = stdout.lines();
    match (lines.next(), lines.next()) {
        (Some(line), None) => line.to_string(),
        _ => panic!("expected one line of output, got {stdout:?}"),
    }
}
