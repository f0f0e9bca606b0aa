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
//! 3. **The office behind a slow uplink** (`PARTS=uplink`, see `uplink.rs`):
//!    K hosts (`UPLINK_KS` [2,4,6]) realise one closure of real binaries at
//!    once through a `UPLINK_MBIT` [50] uplink, through their agents (one
//!    download per path for the office) against U as a plain substituter.
//! 4. **One NAR from three holders** (`PARTS=stripes`, see `stripes.rs`):
//!    striped against one holder at a time, each holder behind
//!    `STRIPE_HOLDER_MBIT` [300; 0: unshaped], `STRIPE_HOLDER_NICE` [0: the
//!    holders' niceness, a stand-in for holders on machines of their own].
//! 5. **Look-ups at office scale** (`PARTS=catalog`, see `catalog.rs`):
//!    10 and 50 agents (`CATALOG_AGENTS`), narinfo requests per look-up,
//!    miss latency and the narinfo phase with summaries against the
//!    fan-out before them and against plain substituters; time until every
//!    summary is whole; idle CPU and RSS per agent.
//! 6. **Agent memory.** Peak RSS (`VmHWM`) of the serving and the client
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
//! `BIG_MIB` [1024] (the throughput NAR), `CORPUS` [noise] (what the
//! closure's files and the throughput NAR hold: `noise`, random bytes, or
//! `real`, this machine's libraries and binaries; in the stripes part also
//! `tree`, small random files), `SHAPE_MBIT` [1000] (0: no shaped
//! runs), `LAN_MTU` [1500] (every link's MTU; 9000: jumbo frames), `DELAYS_US` [250,2000] (one-way delays of the slow-LAN closure
//! runs; empty: none), `MEM_MIBS` [256,1024,4096] (empty: no memory check), `NIX_EXTRA`
//! (more nix.conf lines for the closure client, e.g. `max-jobs = 8`),
//! `CLIENT_CONFIG` (the client agent's config, TOML, in the closure and
//! pair parts), `PACKED_MIB` (the holders' `share.packed_mib` in the
//! closure, pair and stripes parts; unset: the agent's default; 0: no kept
//! zstd frames), `BENCH_LOGS` (a directory: the closure client agent's
//! log is copied there each time it restarts, `000.log` on, and once at
//! the end; with `RUST_LOG=info` a line per path substituted,
//! `nixmesh::fetch=debug` adds each fetched ahead),
//! `BENCH_FS` [journaled] (where the hosts' stores live: `journaled`, an
//! ext4 with a journal made for each LAN, as a user's store would be;
//! `machine`, the scratch dir's own file system, which on a machine whose
//! ext4 has no journal makes Nix's daemon search long for free inodes after
//! every delete, see the harness's `journaled_fs`),
//! `ADDRESSING` [input] (the large paths: `input`, input-addressed and
//! signed, as a build farm's paths are; `content`, as `nix-store --add`
//! makes them, which Nix hashes a second time after unpacking; see
//! `addressing.rs`),
//! `PARTS` [closure,pair]. A quick look: `PEERS=4 SMALL_PER_PEER=10
//! LARGE_MIB=8 BIG_MIB=64 MEM_MIBS= SHAPE_MBIT=0 ROUNDS=1`.
//!
//! The bench target has `bench = false` so that `cargo test --all-targets`
//! (which runs every target with `bench = true`) leaves it alone; name it
//! with `--bench mesh`.

#[path = "../../integration"]
mod integration {
    //! The integration tests' LAN harness and the scenarios' office
    //! constants; the bench uses part of them.
    #[allow(dead_code, unused_imports)]
    pub mod harness;
    #[allow(dead_code, unused_imports)]
    pub mod office;
}
// `office` names the harness as `crate::harness`, as in the LAN tests.
use integration::harness;

mod addressing;
mod catalog;
mod closure;
mod host_cmds;
mod noise;
mod pair;
mod procfs;
mod stripes;
mod uplink;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use harness::{AgentHandle, Host, Lan, Nginx};
use integration::office::{nix_conf, CACHE_PORT, CONVERGE, SUBSTITUTER};

use addressing::Addressing;
use closure::*;
use host_cmds::*;
use nixmesh::mesh::peers::PeerState;
use noise::*;
use pair::*;
use procfs::*;

/// nginx's port on the serving host.
const NGINX_PORT: u16 = 8080;
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
    /// What that NAR holds: `noise` (random bytes, which do not compress)
    /// or `real` (this machine's shared libraries and binaries, which
    /// compress about 3x, as real closures do).
    corpus: String,
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
    /// The MTU of every link (1500: Ethernet; 9000: jumbo frames).
    lan_mtu: u32,
    /// The client's agent config (TOML) in the closure and pair parts,
    /// e.g. to turn a feature off (`[mesh]` `compression = "off"`).
    client_config: String,
    /// The holders' `[share]` lines beyond `content_addressed` (from
    /// `PACKED_MIB`).
    holder_share: String,
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
            corpus: std::env::var("CORPUS").unwrap_or_else(|_| "noise".into()),
            shape_mbit: get("SHAPE_MBIT", 1000),
            lan_mtu: get("LAN_MTU", 1500) as u32,
            delays_us: numbers("DELAYS_US", "250,2000"),
            mem_mibs: numbers("MEM_MIBS", "256,1024,4096"),
            nix_extra: std::env::var("NIX_EXTRA").unwrap_or_default(),
            client_config: std::env::var("CLIENT_CONFIG").unwrap_or_default(),
            holder_share: match std::env::var("PACKED_MIB") {
                Ok(_) => format!("packed_mib = {}\n", get("PACKED_MIB", 0)),
                Err(_) => String::new(),
            },
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
    let store_fs = match std::env::var("BENCH_FS").as_deref() {
        Ok("machine") => "the scratch dir's own file system",
        Ok("journaled") | Err(_) => {
            // Room for the closure's eleven stores. The image gets what the
            // disk has, up to 64 GiB; the pair part's 4 GiB path, in two
            // stores, needs more than this least.
            integration::harness::Lan::hosts_on_journaled_fs(8 << 30);
            "a journaled ext4 per LAN"
        }
        Ok(other) => panic!("BENCH_FS={other:?}: `journaled` (the default) or `machine`"),
    };
    let started = Instant::now();
    let nix = format!("Nix {}", nix_release());
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
    if runs("uplink") {
        uplink::office_uplink(&mut rows, &mut notes);
    }
    if runs("stripes") {
        stripes::three_holders(&s, &mut rows, &mut notes);
    }
    if runs("catalog") {
        catalog::office_lookups(&s, &mut rows, &mut notes);
    }

    println!();
    println!(
        "== nixmesh mesh benchmark ({nix}, stores on {store_fs}, {} peers, {} rounds, medians; took {:.0?}; load average {} -> {})",
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

/// The Nix release that runs (`2.34.8`), checked against the selection:
/// sid's Nix may be newer than the selection's name. Asked once.
pub(crate) fn nix_release() -> &'static str {
    static RELEASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RELEASE.get_or_init(|| {
        let said = harness::nix_under_test::selected().check_version();
        harness::nix_under_test::release_of(&said).to_string()
    })
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
