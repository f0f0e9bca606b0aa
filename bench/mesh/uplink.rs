//! The office behind a slow uplink: K hosts realise the same closure at
//! once through a shaped uplink from an upstream cache U (nginx serving
//! what `nix copy --to 'file://…?compression=zstd'` wrote). Through the
//! mesh each host's Nix lists its agent and then U (the agents pull from U
//! once for the office); the baseline is the same hosts with U as their
//! plain substituter. Reported: the bytes the uplink carried and the time
//! until the last host is done, as ratios. Every side starts from fresh
//! hosts (a new LAN), and which side goes first alternates with K.
//!
//! The closure is made of real binaries (this machine's `/usr/bin`, which
//! compress about 3x like real closures), in `UPLINK_PATHS` [20] store
//! paths, and one of 4 MiB of random bytes.

use super::*;
use integration::office::{nix_conf, random_file, SUBSTITUTER};

/// Upstream's port.
const PORT: u16 = 8080;

pub(crate) struct UplinkSettings {
    /// Office sizes, e.g. 2,4,6.
    ks: Vec<u64>,
    /// The uplink's rate.
    mbit: u64,
    /// Store paths in the closure (files from /usr/bin, largest first).
    paths: usize,
}

impl UplinkSettings {
    pub(crate) fn from_env() -> UplinkSettings {
        UplinkSettings {
            ks: numbers("UPLINK_KS", "2,4,6"),
            mbit: numbers("UPLINK_MBIT", "50").first().copied().unwrap_or(50),
            paths: numbers("UPLINK_PATHS", "20").first().copied().unwrap_or(20) as usize,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Mesh,
    Plain,
}

/// The largest files of /usr/bin of at most 4 MiB, up to `n`, copied to
/// `dir`. Each once: /usr/bin holds the same binary under several names
/// (links, copies), and two store paths with the same contents share one
/// file in a binary cache, which a real closure seldom does.
fn real_binaries(dir: &Path, n: usize) -> Vec<std::path::PathBuf> {
    fs::create_dir_all(dir).expect("mkdir");
    let mut found: Vec<(u64, std::path::PathBuf)> = fs::read_dir("/usr/bin")
        .expect("/usr/bin")
        .flatten()
        .filter_map(|e| {
            let m = fs::symlink_metadata(e.path()).ok()?;
            let size = m.len();
            (m.is_file() && size > 64 * 1024 && size <= 4 * MIB).then(|| (size, e.path()))
        })
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    let mut distinct: Vec<(u64, std::path::PathBuf)> = Vec::new();
    for (size, path) in found {
        let same = |(s, p): &(u64, std::path::PathBuf)| {
            *s == size && fs::read(p).ok() == fs::read(&path).ok()
        };
        if distinct.len() < n && !distinct.iter().any(same) {
            distinct.push((size, path));
        }
    }
    distinct
        .into_iter()
        .map(|(_, p)| {
            let name = p.file_name().expect("a name").to_string_lossy().to_string();
            let to = dir.join(name.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"));
            fs::copy(&p, &to).expect("copy a binary");
            to
        })
        .collect()
}

/// One run of one side: (uplink bytes sent, time until the last host is
/// done, closure file bytes, upstream downloads by all agents).
fn run_side(u_set: &UplinkSettings, k: usize, side: Side) -> (u64, Duration, u64, u64) {
    let lan = Lan::new(k + 1);
    let u = lan.host(k);
    let office: Vec<&Host> = (0..k).map(|i| lan.host(i)).collect();
    let key = u.generate_key("upstream-1");
    let files = real_binaries(&u.dir().join("files"), u_set.paths);
    // One file of random bytes as well: a path that does not compress.
    let mut sources = files;
    sources.push(random_file(&u.dir().join("files"), "random", 4 * MIB));
    let paths: Vec<String> = sources.iter().map(|f| u.add_path(f)).collect();
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    u.sign(&refs, &key.secret_file);
    let export = u.dir().join("export");
    let to = format!("file://{}?compression=zstd", export.display());
    let mut argv = vec!["nix", "copy", "--to", &to];
    argv.extend_from_slice(&refs);
    long_ok(u, &argv);
    // U stands for cache.nixos.org, which says Priority 40 (behind the
    // agent's 30). `nix copy` writes none, and Nix would then put U (0)
    // ahead of the agent and never ask it (`nixmesh doctor` warns of that).
    let info = export.join("nix-cache-info");
    let text = fs::read_to_string(&info).expect("nix-cache-info");
    fs::write(&info, format!("{text}Priority: 40\n")).expect("write nix-cache-info");
    let file_bytes: u64 = paths
        .iter()
        .map(|p| {
            let narinfo = fs::read_to_string(export.join(format!("{}.narinfo", &p[11..43])))
                .expect("narinfo");
            narinfo
                .lines()
                .find_map(|l| l.strip_prefix("FileSize: "))
                .and_then(|v| v.parse::<u64>().ok())
                .expect("FileSize")
        })
        .sum();
    let _nginx = Nginx::start(u, &export, PORT);
    let upstream = format!("http://{}:{PORT}", u.addr());
    let mut agents = Vec::new();
    for h in &office {
        match side {
            Side::Mesh => {
                h.configure_nix(&format!(
                    "{}\n{NEGATIVE_TTL}",
                    nix_conf(&format!("{SUBSTITUTER} {upstream}"), &[&key.public])
                ));
                agents.push(h.start_agent(""));
            }
            Side::Plain => {
                h.configure_nix(&format!(
                    "{}\n{NEGATIVE_TTL}",
                    nix_conf(&upstream, &[&key.public])
                ));
            }
        }
    }
    for (i, a) in agents.iter().enumerate() {
        let others: Vec<&Host> = office
            .iter()
            .copied()
            .filter(|h| h.name() != office[i].name())
            .collect();
        wait_sees_peers(a, &others);
    }
    u.shape(u_set.mbit * 1_000_000);
    let before = u.link_bytes();
    let started = Instant::now();
    std::thread::scope(|s| {
        for h in &office {
            let refs = refs.clone();
            s.spawn(move || {
                let mut argv = vec!["nix-store", "--realise"];
                argv.extend_from_slice(&refs);
                long_ok(h, &argv);
            });
        }
    });
    let took = started.elapsed();
    let sent = u.link_bytes().sent - before.sent;
    for h in &office {
        for p in &paths {
            assert!(h.has_path(p), "{p} missing on {}", h.name());
        }
    }
    let mut downloads = 0;
    for (h, a) in office.iter().zip(&agents) {
        let m = |name: &str| a.metric(name);
        downloads += m("nixmesh_upstream_downloads_total") as u64;
        eprintln!(
            "uplink {k} hosts, {}: narinfo hits {} misses {} skipped {}; files {} downloads {} for peers {} from owner {} joins {} failures {} errors {}",
            h.name(),
            m("nixmesh_upstream_narinfo_hits_total"),
            m("nixmesh_upstream_narinfo_misses_total"),
            m("nixmesh_upstream_skipped"),
            m("nixmesh_upstream_files_total"),
            m("nixmesh_upstream_downloads_total"),
            m("nixmesh_upstream_for_peers_total"),
            m("nixmesh_upstream_from_owner_total"),
            m("nixmesh_upstream_joins_total"),
            m("nixmesh_upstream_file_failures_total"),
            m("nixmesh_upstream_errors_total"),
        );
    }
    (sent, took, file_bytes, downloads)
}

pub(crate) fn office_uplink(rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    let u_set = UplinkSettings::from_env();
    for (n, &k) in u_set.ks.iter().enumerate() {
        let k = k as usize;
        let order = if n % 2 == 0 {
            [Side::Mesh, Side::Plain]
        } else {
            [Side::Plain, Side::Mesh]
        };
        let mut results = Vec::new();
        for side in order {
            results.push((side, run_side(&u_set, k, side)));
        }
        let get = |want: Side| {
            results
                .iter()
                .find(|(s, _)| *s == want)
                .map(|(_, r)| *r)
                .expect("both sides")
        };
        let (mesh_sent, mesh_took, file_bytes, downloads) = get(Side::Mesh);
        let (plain_sent, plain_took, _, _) = get(Side::Plain);
        rows.push(Row {
            what: format!("uplink bytes, {k} hosts at once ({} Mbit/s)", u_set.mbit),
            mesh: format!("{:.2}x", mesh_sent as f64 / file_bytes as f64),
            other: format!("{:.2}x", plain_sent as f64 / file_bytes as f64),
            ratio: format!("{:.2}", plain_sent as f64 / mesh_sent as f64),
        });
        rows.push(Row {
            what: format!("office done, {k} hosts at once ({} Mbit/s)", u_set.mbit),
            mesh: format!("{:.1}s", mesh_took.as_secs_f64()),
            other: format!("{:.1}s", plain_took.as_secs_f64()),
            ratio: format!("{:.2}", plain_took.as_secs_f64() / mesh_took.as_secs_f64()),
        });
        notes.push(format!(
            "uplink, {k} hosts: closure of {} paths, {file_bytes} bytes of zstd files, {downloads} upstream downloads by the agents; bytes as multiples of one closure (aim: mesh 1.0x, plain {k}x); ratio = plain / mesh (aim: >= {:.1} for the time)",
            u_set.paths + 1,
            0.8 * k as f64
        ));
    }
}
