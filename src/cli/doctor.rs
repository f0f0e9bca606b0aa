//! `nixmesh doctor`: checks this host's setup and says what to fix, in
//! plain words. Each check gathers facts (config, nix.conf, the store DB,
//! the running agent's admin API and substituter) and judges them; the
//! judging and the report are pure.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use crate::api::PeerView;
use crate::api::StatusView;
use crate::cli::admin_client;
use crate::config::Config;
use crate::mesh::peers::{PeerSource, PeerState};
use crate::nix::conf::NixConf;
use crate::nix::store_url::{self, StoreUrl};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub verdict: Verdict,
    pub what: String,
    /// What to do about it; empty when nothing.
    pub fix: String,
}

fn ok(what: impl Into<String>) -> Finding {
    Finding {
        verdict: Verdict::Ok,
        what: what.into(),
        fix: String::new(),
    }
}

fn warn(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        verdict: Verdict::Warn,
        what: what.into(),
        fix: fix.into(),
    }
}

fn fail(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        verdict: Verdict::Fail,
        what: what.into(),
        fix: fix.into(),
    }
}

pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        let tag = match f.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        let _ = writeln!(out, "{tag}  {}", f.what);
        if !f.fix.is_empty() {
            let _ = writeln!(out, "      fix: {}", f.fix);
        }
    }
    let fails = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Fail)
        .count();
    let warns = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Warn)
        .count();
    let _ = writeln!(out, "{fails} problem(s), {warns} warning(s)");
    out
}

/// Is the localhost substituter in nix.conf's substituters, and first?
pub fn judge_substituters(nix_conf: &NixConf, listen: SocketAddr) -> Finding {
    let subs = nix_conf.list("substituters");
    let port = listen.port();
    let ours = |s: &String| {
        let s = StoreUrl::split(s).base;
        s == format!("http://127.0.0.1:{port}") || s == format!("http://localhost:{port}")
    };
    match subs.iter().position(ours) {
        None => fail(
            format!("Nix does not use the mesh: http://127.0.0.1:{port} is not in nix.conf's substituters ({})", show(&subs)),
            format!("add it first: substituters = http://127.0.0.1:{port} {}", subs.join(" ")),
        ),
        Some(0) => ok(format!("Nix asks the mesh first (substituters = {})", subs.join(" "))),
        Some(_) => warn(
            format!("http://127.0.0.1:{port} is in nix.conf's substituters but not first ({})", subs.join(" ")),
            "put it first; its Priority 30 already puts it ahead of cache.nixos.org (40), but not of caches with a lower priority",
        ),
    }
}

/// One of nix.conf's substituters, as Nix will order it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranked {
    pub url: String,
    /// Its place in nix.conf's list.
    pub position: usize,
    /// The URL's `?priority=`, else its `/nix-cache-info` Priority, else 0.
    pub priority: i64,
}

/// Does Nix ask the mesh before every upstream it pulls through? Nix sorts
/// its substituters by priority, keeping nix.conf's order among equals,
/// and stops at the first that has a path: an upstream ahead of the mesh
/// gets every path itself, past the peers and the office's single
/// download.
pub fn judge_priorities(mesh: &Ranked, upstreams: &[Ranked]) -> Finding {
    let ahead: Vec<&Ranked> = upstreams
        .iter()
        .filter(|u| (u.priority, u.position) < (mesh.priority, mesh.position))
        .collect();
    let Some(lowest) = ahead.iter().map(|u| u.priority).min() else {
        return ok(format!(
            "Nix asks the mesh (priority {}) before its upstreams",
            mesh.priority
        ));
    };
    let names: Vec<String> = ahead
        .iter()
        .map(|u| format!("{} (priority {})", u.url, u.priority))
        .collect();
    warn(
        format!(
            "Nix asks {} before the mesh (priority {}): what it fetches there skips the peers and the office's single download",
            names.join(", "),
            mesh.priority
        ),
        format!(
            "give the mesh a lower priority in nix.conf: substituters = {}?priority={} ...",
            StoreUrl::split(&mesh.url).base,
            lowest - 1
        ),
    )
}

fn show(list: &[String]) -> String {
    if list.is_empty() {
        "none".into()
    } else {
        list.join(" ")
    }
}

/// Will Nix accept what this host signs, and does it trust anything but
/// cache.nixos.org?
pub fn judge_keys(
    nix_conf: &NixConf,
    signing_public: Option<&str>,
    shared_trusted: &[String],
) -> Vec<Finding> {
    let trusted = nix_conf.trusted_public_keys();
    let mut out = Vec::new();
    if let Some(pk) = signing_public {
        if trusted.iter().any(|k| k == pk) {
            out.push(ok(format!(
                "this host's signing key {} is trusted by its Nix",
                key_name(pk)
            )));
        } else {
            out.push(fail(
                format!("this host signs with {} but its Nix does not trust that key", key_name(pk)),
                format!("add {pk} to trusted-public-keys in nix.conf, here and on every host of the mesh"),
            ));
        }
    }
    let untrusted: Vec<&String> = shared_trusted
        .iter()
        .filter(|k| !trusted.contains(k))
        .collect();
    if !untrusted.is_empty() {
        out.push(warn(
            format!("share.trusted_keys lists keys this host's Nix does not trust: {}", untrusted.iter().map(|k| key_name(k)).collect::<Vec<_>>().join(", ")),
            "paths signed only by those keys are shared but no Nix that trusts what this one trusts will take them",
        ));
    }
    if out.is_empty() {
        out.push(ok(format!(
            "Nix trusts {}",
            trusted
                .iter()
                .map(|k| key_name(k))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    out
}

fn key_name(k: &str) -> &str {
    k.split(':').next().unwrap_or(k)
}

/// Peers: reachable ones, unreachable ones, and whether mDNS found anyone.
pub fn judge_peers(peers: &[PeerView], mdns: bool, static_peers: usize) -> Vec<Finding> {
    let alive = peers.iter().filter(|p| p.state == PeerState::Alive).count();
    let mut out = Vec::new();
    let unreachable: Vec<String> = peers
        .iter()
        .filter(|p| matches!(p.state, PeerState::Gone | PeerState::New))
        .map(|p| {
            format!(
                "{} ({})",
                if p.name.is_empty() {
                    &p.fingerprint
                } else {
                    &p.name
                },
                p.addrs.join(" ")
            )
        })
        .collect();
    if !unreachable.is_empty() {
        out.push(fail(
            format!("peers not reachable over QUIC: {}", unreachable.join(", ")),
            "check UDP 5182 passes the firewall both ways, and that both sides use the same mesh secret and allow each other's keys",
        ));
    }
    if alive > 0 {
        out.push(ok(format!("{alive} peer(s) reachable over QUIC")));
    }
    let no_bulk: Vec<&str> = peers
        .iter()
        .filter(|p| p.bulk_refused)
        .map(|p| {
            if p.name.is_empty() {
                p.fingerprint.as_str()
            } else {
                p.name.as_str()
            }
        })
        .collect();
    if !no_bulk.is_empty() {
        out.push(warn(
            format!(
                "bulk connections (TCP at the mesh port) to {} failed: large NARs from them come over QUIC, at more CPU per GiB",
                no_bulk.join(", ")
            ),
            "let TCP 5182 in on those hosts as well as UDP (the NixOS module's openFirewall does), or set mesh.max_protocol = 4 on all agents to keep to QUIC",
        ));
    }
    let from_mdns = peers
        .iter()
        .filter(|p| p.source == PeerSource::Mdns)
        .count();
    if mdns && from_mdns == 0 {
        out.push(warn(
            "no mDNS announcements seen from other nodes",
            "is this the only node? Otherwise let UDP 5353 multicast through the firewall on the mesh interfaces, or list peers in mesh.static_peers",
        ));
    } else if mdns {
        out.push(ok(format!("mDNS works: {from_mdns} peer(s) found by it")));
    }
    if !mdns && static_peers == 0 {
        out.push(fail(
            "mDNS is off and no static peers are configured: this node can find no one",
            "set mesh.mdns = true or add mesh.static_peers",
        ));
    }
    out
}

/// The socket buffer the agent asks for each way, which the kernel grants
/// without CAP_NET_ADMIN only up to `net.core.{r,w}mem_max`.
const UDP_BUFFER_WANTED: u64 = crate::mesh::node::UDP_BUFFER as u64;

/// Are the kernel's socket buffer limits (`None`: unreadable) high enough
/// for the agent's QUIC socket?
pub fn judge_udp_buffers(rmem_max: Option<u64>, wmem_max: Option<u64>) -> Finding {
    let low: Vec<String> = [("rmem_max", rmem_max), ("wmem_max", wmem_max)]
        .into_iter()
        .filter_map(|(name, v)| match v {
            Some(v) if v >= UDP_BUFFER_WANTED => None,
            Some(v) => Some(format!("net.core.{name} is {} KiB", v / 1024)),
            None => Some(format!("net.core.{name} cannot be read")),
        })
        .collect();
    let mib = UDP_BUFFER_WANTED >> 20;
    if low.is_empty() {
        return ok(format!(
            "the kernel allows the mesh socket {mib} MiB buffers"
        ));
    }
    warn(
        format!(
            "{}: unless the agent has CAP_NET_ADMIN, its QUIC socket gets less than the \
             {mib} MiB buffers it asks for, loses datagrams under load and slows down",
            low.join(", ")
        ),
        format!(
            "sysctl -w net.core.rmem_max={UDP_BUFFER_WANTED} \
             net.core.wmem_max={UDP_BUFFER_WANTED} (and keep it in /etc/sysctl.d; \
             the NixOS module sets it)"
        ),
    )
}

/// What reading the store DB at `db` (its count of paths) says.
fn judge_store_db(db: &Path, read: Result<u64, crate::store::db::StoreError>) -> Finding {
    match read {
        Ok(n) => ok(format!("store DB {} is readable ({n} paths)", db.display())),
        // Nix holds a write lock: not a fault of the setup, and the agent
        // reads again on its own.
        Err(e) if e.is_busy() => warn(
            format!("the store DB {} is locked just now: {e}", db.display()),
            "a nix-daemon holds it (recovering its journal, or in a long write with \
             use-sqlite-wal = false); the agent reads it again on its own: run \
             `nixmesh doctor` again in a while",
        ),
        Err(e) => fail(
            format!("the store DB cannot be read: {e}"),
            "run the agent as root, or fix the permissions of the DB",
        ),
    }
}

fn sysctl(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Runs every check against this host and the agent its config describes.
pub async fn run(config: &Config, config_source: &str) -> Vec<Finding> {
    let mut out = vec![ok(format!("config {config_source} loads"))];
    let nix_conf = NixConf::load(&config.store.nix_conf);

    // The store DB.
    let location = crate::config::settings::store_location(config);
    if !location.db.exists() {
        out.push(fail(
            format!("the store DB {} does not exist", location.db.display()),
            "check store.root / store.db, or run any Nix command once so Nix creates it",
        ));
    } else {
        let db = location.db.clone();
        let opened = tokio::task::spawn_blocking(move || {
            crate::store::db::Store::open(location).and_then(|s| s.path_count())
        })
        .await;
        match opened {
            Ok(read) => out.push(judge_store_db(&db, read)),
            Err(e) => out.push(fail(format!("reading the store DB failed: {e}"), "")),
        }
    }

    // Nix's side.
    if config.substituter.enable {
        out.push(judge_substituters(&nix_conf, config.substituter.listen));
    }
    let signing_public = match crate::config::settings::signing_key(config) {
        Ok(k) => k.map(|k| k.public().to_nix_string()),
        Err(e) => {
            out.push(fail(format!("{e}"), "point signing_key_file at a key from `nixmesh keygen` or `nix-store --generate-binary-cache-key`"));
            None
        }
    };
    let shared_trusted = config.share.trusted_keys.clone().unwrap_or_default();
    out.extend(judge_keys(
        &nix_conf,
        signing_public.as_deref(),
        &shared_trusted,
    ));

    if config.mesh.enable {
        out.push(judge_udp_buffers(
            sysctl("/proc/sys/net/core/rmem_max"),
            sysctl("/proc/sys/net/core/wmem_max"),
        ));
    }

    for iface in &config.mesh.interfaces {
        if !Path::new("/sys/class/net").join(iface).exists() {
            out.push(fail(
                format!("mesh.interfaces names {iface:?}, which does not exist"),
                "use a name from `ip link`",
            ));
        }
    }

    if config.substituter.enable {
        out.extend(check_upstreams(config, &nix_conf).await);
    }

    // The running agent.
    let status = admin_client::admin_get(config.admin.listen, "/status").await;
    let Ok(body) = status else {
        out.push(fail(
            format!(
                "the agent is not running (no admin API at {})",
                config.admin.listen
            ),
            "start it: `nixmesh agent` (or `systemctl start nixmesh`)",
        ));
        return out;
    };
    match serde_json::from_slice::<StatusView>(&body) {
        Ok(s) => out.push(ok(format!(
            "agent {} ({}) is up, mesh {}",
            s.name, s.fingerprint, s.mesh_id
        ))),
        Err(e) => out.push(fail(
            format!("the admin API answered something unexpected: {e}"),
            "",
        )),
    }
    if config.substituter.enable {
        match admin_client::admin_get(config.substituter.listen, "/nix-cache-info").await {
            Ok(body) if String::from_utf8_lossy(&body).contains("StoreDir:") => out.push(ok(
                format!("the substituter answers on {}", config.substituter.listen),
            )),
            _ => out.push(fail(
                format!(
                    "the substituter does not answer on {}",
                    config.substituter.listen
                ),
                "check substituter.enable, and that nothing else holds that port",
            )),
        }
    }
    if config.mesh.enable {
        match admin_client::admin_get(config.admin.listen, "/peers")
            .await
            .map(|b| serde_json::from_slice::<Vec<PeerView>>(&b))
        {
            Ok(Ok(peers)) => out.extend(judge_peers(
                &peers,
                config.mesh.mdns,
                config.mesh.static_peers.len(),
            )),
            _ => out.push(fail("cannot read the peer table", "")),
        }
    }
    out
}

/// Whether each upstream cache answers `/nix-cache-info` for our store dir.
/// Also judges the order Nix asks them and the mesh in.
async fn check_upstreams(config: &Config, nix_conf: &NixConf) -> Vec<Finding> {
    use crate::fetch::upstream::UpstreamClient;
    let caches = crate::config::settings::upstream_caches(config);
    if caches.is_empty() {
        return vec![ok("no upstream caches: the agent pulls only from peers")];
    }
    let client = match UpstreamClient::new(config.upstream.ca_file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            return vec![fail(
                e.to_string(),
                "point upstream.ca_file at a PEM file of CA certificates",
            )]
        }
    };
    let timeout = std::time::Duration::from_millis(config.upstream.timeout_ms);
    let want = format!("StoreDir: {}", config.store.store_dir);
    let substituters = nix_conf.list("substituters");
    let listed = |base: &str| {
        substituters
            .iter()
            .enumerate()
            .find(|(_, s)| StoreUrl::split(s).base == base)
            .map(|(i, s)| (i, StoreUrl::split(s).priority()))
    };
    let port = config.substituter.listen.port();
    let mesh = [
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
    ]
    .iter()
    .find_map(|u| Some((u, listed(u)?)))
    .map(|(u, (position, priority))| Ranked {
        url: u.clone(),
        position,
        priority: priority.unwrap_or(i64::from(config.substituter.priority)),
    });
    let mut ranked = Vec::new();
    let mut out = Vec::new();
    for cache in caches {
        let url = format!("{cache}/nix-cache-info");
        match client.get_text(&url, 64 * 1024, timeout).await {
            Ok(Some(text)) if text.lines().any(|l| l.trim() == want) => {
                out.push(ok(format!("upstream {cache} answers")));
                if let Some((position, priority)) = listed(cache.as_str()) {
                    ranked.push(Ranked {
                        url: cache.to_string(),
                        position,
                        priority: priority.unwrap_or_else(|| store_url::cache_info_priority(&text)),
                    });
                }
            }
            Ok(Some(_)) => out.push(fail(
                format!("upstream {cache} is not a cache for {}", config.store.store_dir),
                "remove it from upstream.caches (or nix.conf's substituters)",
            )),
            Ok(None) => out.push(fail(
                format!("upstream {cache} has no /nix-cache-info"),
                "check the URL in upstream.caches (or nix.conf's substituters)",
            )),
            Err(e) => out.push(warn(
                format!("upstream {cache} does not answer: {e}"),
                "fine for an offline office (the agent skips it after one try); otherwise check the URL and the network",
            )),
        }
    }
    if let Some(mesh) = mesh {
        out.push(judge_priorities(&mesh, &ranked));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> NixConf {
        NixConf::parse(text, &mut |_, _, _| {})
    }

    #[test]
    fn a_peer_without_bulk_connections_is_a_warning_naming_it() {
        let peer = |name: &str, bulk_refused: bool| PeerView {
            bulk_refused,
            ..PeerView::example(name)
        };
        let all_fine = judge_peers(&[peer("h1", false), peer("h2", false)], true, 0);
        assert!(
            all_fine.iter().all(|f| !f.what.contains("bulk")),
            "{all_fine:?}"
        );
        let findings = judge_peers(&[peer("h1", false), peer("h2", true)], true, 0);
        let bulk: Vec<&Finding> = findings
            .iter()
            .filter(|f| f.what.contains("bulk"))
            .collect();
        assert_eq!(bulk.len(), 1, "{findings:?}");
        assert_eq!(bulk[0].verdict, Verdict::Warn);
        assert!(bulk[0].what.contains("h2") && !bulk[0].what.contains("h1"));
        assert!(bulk[0].fix.contains("TCP 5182"), "{}", bulk[0].fix);
    }

    #[test]
    fn udp_buffer_limits() {
        let big = Some(UDP_BUFFER_WANTED);
        assert_eq!(judge_udp_buffers(big, big).verdict, Verdict::Ok);
        let f = judge_udp_buffers(Some(212_992), big);
        assert_eq!(f.verdict, Verdict::Warn);
        assert!(
            f.what.contains("net.core.rmem_max is 208 KiB"),
            "{}",
            f.what
        );
        assert!(f.fix.contains("net.core.rmem_max=8388608"), "{}", f.fix);
        let f = judge_udp_buffers(big, None);
        assert!(
            f.what.contains("net.core.wmem_max cannot be read"),
            "{}",
            f.what
        );
    }

    #[test]
    fn substituter_order() {
        let addr: SocketAddr = "127.0.0.1:5181".parse().unwrap();
        assert_eq!(
            judge_substituters(&conf("substituters = https://cache.nixos.org\n"), addr).verdict,
            Verdict::Fail
        );
        assert_eq!(
            judge_substituters(
                &conf("substituters = http://127.0.0.1:5181 https://x\n"),
                addr
            )
            .verdict,
            Verdict::Ok
        );
        assert_eq!(
            judge_substituters(
                &conf("substituters = https://x http://localhost:5181/\n"),
                addr
            )
            .verdict,
            Verdict::Warn
        );
    }

    #[test]
    fn upstreams_nix_asks_before_the_mesh() {
        let at = |url: &str, position, priority| Ranked {
            url: url.into(),
            position,
            priority,
        };
        let mesh = at("http://127.0.0.1:5181", 0, 30);
        let nixos = at("https://cache.nixos.org", 1, 40);
        assert_eq!(
            judge_priorities(&mesh, std::slice::from_ref(&nixos)).verdict,
            Verdict::Ok
        );
        // Equal priorities keep nix.conf's order.
        let equal_after = at("http://nas:5000", 1, 30);
        assert_eq!(judge_priorities(&mesh, &[equal_after]).verdict, Verdict::Ok);
        let mesh_second = at("http://127.0.0.1:5181", 1, 30);
        let equal_before = at("http://nas:5000", 0, 30);
        let f = judge_priorities(&mesh_second, &[equal_before]);
        assert_eq!(f.verdict, Verdict::Warn);
        assert!(
            f.fix.contains("http://127.0.0.1:5181?priority=29"),
            "{}",
            f.fix
        );
        // A cache without a Priority in its /nix-cache-info has 0.
        let file_share = at("http://nas:8080", 2, 0);
        let f = judge_priorities(&mesh, &[nixos, file_share]);
        assert_eq!(f.verdict, Verdict::Warn);
        assert!(
            f.what.contains("http://nas:8080 (priority 0)"),
            "{}",
            f.what
        );
        assert!(!f.what.contains("cache.nixos.org"), "{}", f.what);
        assert!(f.fix.contains("?priority=-1"), "{}", f.fix);
    }

    #[test]
    fn untrusted_signing_key_is_a_fault() {
        let f = judge_keys(&conf(""), Some("office-1:AAAA"), &[]);
        assert_eq!(f[0].verdict, Verdict::Fail);
        assert!(f[0].fix.contains("office-1:AAAA"));
        let f = judge_keys(
            &conf("trusted-public-keys = office-1:AAAA\n"),
            Some("office-1:AAAA"),
            &[],
        );
        assert_eq!(f[0].verdict, Verdict::Ok);
    }

    #[test]
    fn report_counts_problems() {
        let text = render(&[ok("a"), fail("b", "do c")]);
        assert!(text.contains("FAIL  b\n      fix: do c\n"));
        assert!(text.ends_with("1 problem(s), 0 warning(s)\n"));
    }
}
