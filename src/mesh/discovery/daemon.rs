//! The `mdns-sd` daemon: advertises this node, browses for the others,
//! feeds what it hears through `AnnouncedPeers`, and says goodbye on
//! shutdown. The only part of discovery with I/O.
//!
//! The daemon's browse queries back off (1 s, 2 s, 4 s, … up to an hour),
//! and an instance it has found without an address it keeps asking about
//! only on those queries. So the browse is started again every
//! `REBROWSE_INTERVAL`: a fresh cycle of queries makes good an
//! announcement or answer lost on a lossy LAN within that time. Each query
//! lists the answers already known, and peers we know stay silent, so on a
//! converged LAN a re-browse costs one query packet or so.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use mdns_sd::{
    DaemonEvent, IfKind, ResolvedService, ServiceDaemon, ServiceEvent, ServiceInfo,
    UnregisterStatus,
};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::announced::AnnouncedPeers;
use super::txt::{instance_name, parse_txt, to_txt, TxtError};
#[cfg(test)]
use super::PROTOCOL_VERSION;
use super::{
    Announcement, CacheEvent, DiscoveryConfig, DiscoveryEvent, NIX_SERVE_TYPE, SERVICE_TYPE,
};
#[cfg(test)]
use std::net::SocketAddr;

/// How long shutdown waits for the daemon to confirm the goodbye.
const UNREGISTER_TIMEOUT: Duration = Duration::from_secs(1);
/// mdns-sd repeats the goodbye 120 ms after the first; let it go out too.
const GOODBYE_REPEAT_WAIT: Duration = Duration::from_millis(200);
const DAEMON_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the browse starts again with a fresh cycle of queries.
pub const REBROWSE_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum DiscoveryError {
    #[error("own announcement would be rejected by peers: {0}")]
    InvalidOwn(TxtError),
    #[error("discovery needs a Tokio runtime")]
    NoRuntime,
    #[error("mDNS daemon: {0}")]
    Daemon(mdns_sd::Error),
    #[error("mDNS service record: {0}")]
    Service(mdns_sd::Error),
}

/// TXT properties of a received record as strings; a non-UTF-8 value makes
/// the whole record malformed, and a key with no value reads as empty.
fn txt_of(info: &ResolvedService) -> Result<Vec<(String, String)>, TxtError> {
    info.txt_properties
        .iter()
        .map(|p| {
            let value = std::str::from_utf8(p.val().unwrap_or_default())
                .map_err(|_| TxtError::NotUtf8(p.key().chars().take(32).collect()))?;
            Ok((p.key().to_string(), value.to_string()))
        })
        .collect()
}

/// The running discovery task.
pub struct DiscoveryHandle {
    task: JoinHandle<()>,
}

impl DiscoveryHandle {
    /// Waits until the goodbye went out and the mDNS daemon stopped (after
    /// `shutdown` was cancelled), or the daemon died on its own.
    pub async fn stopped(self) {
        if let Err(e) = self.task.await {
            tracing::error!("mDNS discovery task failed: {e}");
        }
    }
}

/// Starts advertising `own` and browsing for `SERVICE_TYPE`. `Found`/`Lost`
/// for other nodes of the same mesh and a supported version go to `events`.
/// When `shutdown` is cancelled it says goodbye and stops the daemon. Must
/// be called from inside a Tokio runtime.
pub fn start(
    own: Announcement,
    config: DiscoveryConfig,
    events: mpsc::Sender<DiscoveryEvent>,
    shutdown: CancellationToken,
) -> Result<DiscoveryHandle, DiscoveryError> {
    let txt = to_txt(&own);
    parse_txt(&txt).map_err(DiscoveryError::InvalidOwn)?;
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| DiscoveryError::NoRuntime)?;

    let instance = instance_name(&own.key);
    let host = format!("{instance}.local.");
    let info = ServiceInfo::new(SERVICE_TYPE, &instance, &host, (), own.quic_port, &txt[..])
        .map_err(DiscoveryError::Service)?
        .enable_addr_auto();
    let own_fullname = info.get_fullname().to_string();

    let daemon = ServiceDaemon::new().map_err(DiscoveryError::Daemon)?;
    // The daemon runs commands in order, so the interface choice applies
    // before the service is announced.
    let setup = || -> Result<_, mdns_sd::Error> {
        if !config.interfaces.is_empty() {
            for name in &config.interfaces {
                // mdns-sd skips a missing interface silently (and picks it
                // up if it appears later); say so, it is likely a typo.
                if name.contains('/') || !Path::new("/sys/class/net").join(name).exists() {
                    tracing::warn!(interface = %name, "mDNS: no such network interface (yet)");
                }
            }
            daemon.disable_interface(IfKind::All)?;
            let names: Vec<IfKind> = config.interfaces.iter().map(IfKind::from).collect();
            daemon.enable_interface(names)?;
        }
        if !config.ipv6 {
            daemon.disable_interface(IfKind::IPv6)?;
        }
        let monitor = daemon.monitor()?;
        daemon.register(info)?;
        let browse = daemon.browse(SERVICE_TYPE)?;
        let caches = match &config.caches {
            Some(tx) => Some((daemon.browse(NIX_SERVE_TYPE)?, tx.clone())),
            None => None,
        };
        Ok((browse, monitor, caches))
    };
    let (browse, monitor, caches) = match setup() {
        Ok(receivers) => receivers,
        Err(e) => {
            let _ = daemon.shutdown();
            return Err(DiscoveryError::Daemon(e));
        }
    };
    tracing::info!(instance = %own_fullname, port = own.quic_port, mesh = %own.mesh_id, "mDNS: announcing");

    let peers = AnnouncedPeers::new(own.key, own.mesh_id);
    if let Some((caches, tx)) = caches {
        runtime.spawn(browse_caches(caches, tx, shutdown.clone()));
    }
    let task = runtime.spawn(run(
        daemon,
        own_fullname,
        (browse, config.rebrowse),
        monitor,
        peers,
        events,
        shutdown,
    ));
    Ok(DiscoveryHandle { task })
}

async fn run(
    daemon: ServiceDaemon,
    own_fullname: String,
    (mut browse, rebrowse_every): (mdns_sd::Receiver<ServiceEvent>, Duration),
    monitor: mdns_sd::Receiver<DaemonEvent>,
    mut peers: AnnouncedPeers,
    events: mpsc::Sender<DiscoveryEvent>,
    shutdown: CancellationToken,
) {
    let mut monitor_open = true;
    let mut rebrowse = tokio::time::interval(rebrowse_every);
    rebrowse.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    rebrowse.tick().await;
    // After a re-browse, the receiver it replaced, until the daemon has
    // closed it: what it still holds is read, not lost.
    let mut replaced: Option<mdns_sd::Receiver<ServiceEvent>> = None;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = rebrowse.tick() => {
                match daemon.browse(SERVICE_TYPE) {
                    Ok(fresh) => replaced = Some(std::mem::replace(&mut browse, fresh)),
                    Err(e) => tracing::warn!("mDNS: cannot browse again: {e}"),
                }
                continue;
            }
            event = async { replaced.as_ref()?.recv_async().await.ok() }, if replaced.is_some() => {
                match event {
                    Some(event) => event,
                    None => {
                        replaced = None;
                        continue;
                    }
                }
            }
            event = browse.recv_async() => match event {
                Ok(event) => event,
                Err(_) => {
                    tracing::error!("mDNS daemon stopped on its own; discovery is off");
                    return;
                }
            },
            event = monitor.recv_async(), if monitor_open => {
                match event {
                    Ok(DaemonEvent::NameChange(change)) => tracing::warn!(
                        "mDNS: another host announces our name {} (same node key?); now {}",
                        change.original, change.new_name
                    ),
                    Ok(DaemonEvent::Error(e)) => tracing::warn!("mDNS daemon: {e}"),
                    Ok(_) => {}
                    Err(_) => monitor_open = false,
                }
                continue;
            }
        };
        let out = match event {
            ServiceEvent::ServiceResolved(info) => {
                let ips: Vec<IpAddr> = info.addresses.iter().map(|a| a.to_ip_addr()).collect();
                peers.on_resolved(&info.fullname, txt_of(&info), ips)
            }
            ServiceEvent::ServiceRemoved(_, fullname) => peers.on_removed(&fullname),
            _ => None,
        };
        if let Some(out) = out {
            tracing::debug!(?out, "mDNS");
            tokio::select! {
                _ = shutdown.cancelled() => break,
                // A closed receiver means nobody listens; keep announcing.
                _ = events.send(out) => {}
            }
        }
    }
    say_goodbye(&daemon, &own_fullname).await;
}

/// Reports plain caches announced as `NIX_SERVE_TYPE` until shutdown or
/// until the daemon stops. Their addresses are checked by the receiver.
async fn browse_caches(
    browse: mdns_sd::Receiver<ServiceEvent>,
    tx: mpsc::Sender<CacheEvent>,
    shutdown: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = browse.recv_async() => match event {
                Ok(event) => event,
                Err(_) => return,
            },
        };
        let out = match event {
            ServiceEvent::ServiceResolved(info) => {
                let port = info.port;
                let addrs = info
                    .addresses
                    .iter()
                    .map(|a| std::net::SocketAddr::new(a.to_ip_addr(), port))
                    .collect();
                CacheEvent::Found {
                    name: info.fullname.chars().take(255).collect(),
                    addrs,
                }
            }
            ServiceEvent::ServiceRemoved(_, fullname) => CacheEvent::Lost { name: fullname },
            _ => continue,
        };
        tracing::debug!(?out, "mDNS: nix-serve");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.send(out) => {}
        }
    }
}

async fn say_goodbye(daemon: &ServiceDaemon, own_fullname: &str) {
    match daemon.unregister(own_fullname) {
        Ok(status) => match tokio::time::timeout(UNREGISTER_TIMEOUT, status.recv_async()).await {
            Ok(Ok(UnregisterStatus::OK)) => tokio::time::sleep(GOODBYE_REPEAT_WAIT).await,
            Ok(Ok(UnregisterStatus::NotFound)) => {
                tracing::warn!(instance = own_fullname, "mDNS: nothing to unregister")
            }
            Ok(Err(_)) | Err(_) => tracing::warn!("mDNS: goodbye not confirmed"),
        },
        Err(e) => tracing::warn!("mDNS: cannot send goodbye: {e}"),
    }
    match daemon.shutdown() {
        Ok(status) => {
            if tokio::time::timeout(DAEMON_SHUTDOWN_TIMEOUT, status.recv_async())
                .await
                .is_err()
            {
                tracing::warn!("mDNS daemon did not confirm shutdown");
            }
        }
        Err(e) => tracing::warn!("mDNS daemon shutdown: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::txt::tests::announcement;
    use super::*;

    #[test]
    fn own_announcement_must_be_valid() {
        let mut a = announcement(1);
        a.name = String::new();
        let (tx, _rx) = mpsc::channel(1);
        assert!(matches!(
            start(a, DiscoveryConfig::default(), tx, CancellationToken::new()),
            Err(DiscoveryError::InvalidOwn(TxtError::BadName))
        ));
    }
}

/// Two real daemons talking mDNS over loopback, in a network namespace of
/// the test's own so that nothing leaves it (mdns-sd sends a probe packet
/// on every interface it starts with). Needs root, like the rest of the suite.
#[cfg(test)]
mod live_tests {
    use super::*;

    const CLONE_NEWNET: i32 = 0x4000_0000;
    extern "C" {
        fn unshare(flags: i32) -> i32;
    }

    /// Moves the calling thread (and the threads it starts) into a new,
    /// empty network namespace whose loopback is up. (Linux loops multicast
    /// back on `lo` even without its MULTICAST flag.)
    #[allow(unsafe_code)] // unshare(2): no safe wrapper in the dependencies.
    fn private_loopback() -> Result<(), String> {
        // SAFETY: unshare(2) takes a flag word and touches no memory of ours.
        if unsafe { unshare(CLONE_NEWNET) } != 0 {
            return Err(format!("unshare: {}", std::io::Error::last_os_error()));
        }
        let status = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .map_err(|e| format!("ip: {e}"))?;
        if !status.success() {
            return Err(format!("ip link set lo: {status}"));
        }
        Ok(())
    }

    fn node(key: u8, name: &str) -> Announcement {
        Announcement {
            version: PROTOCOL_VERSION,
            key: [key; 32],
            quic_port: 7000 + u16::from(key),
            mesh_id: "cafe".into(),
            name: name.into(),
        }
    }

    async fn next(rx: &mut mpsc::Receiver<DiscoveryEvent>, within: Duration) -> DiscoveryEvent {
        tokio::time::timeout(within, rx.recv())
            .await
            .expect("no discovery event in time")
            .expect("discovery channel closed")
    }

    #[test]
    fn two_nodes_on_loopback_find_and_lose_each_other() {
        std::thread::spawn(|| {
            // The test suite runs as root (see README); without a private
            // namespace this test cannot run safely, so it fails.
            private_loopback().expect("a private network namespace (run the tests as root)");
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(find_and_lose())
        })
        .join()
        .unwrap();
    }

    async fn find_and_lose() {
        // Browsing again every second: no event may be lost or repeated.
        let config = DiscoveryConfig {
            interfaces: vec!["lo".into()],
            ipv6: false,
            rebrowse: Duration::from_secs(1),
            caches: None,
        };
        let (a_tx, mut a_rx) = mpsc::channel(16);
        let (b_tx, mut b_rx) = mpsc::channel(16);
        let (a_stop, b_stop) = (CancellationToken::new(), CancellationToken::new());
        let a = start(node(0xa1, "alpha"), config.clone(), a_tx, a_stop.clone()).unwrap();
        let b = start(node(0xb2, "beta"), config.clone(), b_tx, b_stop.clone()).unwrap();

        let started = std::time::Instant::now();
        let at = |port| vec![SocketAddr::from(([127, 0, 0, 1], port))];
        assert_eq!(
            next(&mut a_rx, Duration::from_secs(10)).await,
            DiscoveryEvent::Found {
                key: [0xb2; 32],
                name: "beta".into(),
                addrs: at(7000 + 0xb2),
            }
        );
        assert_eq!(
            next(&mut b_rx, Duration::from_secs(10)).await,
            DiscoveryEvent::Found {
                key: [0xa1; 32],
                name: "alpha".into(),
                addrs: at(7000 + 0xa1),
            }
        );
        eprintln!("both Found within {:?}", started.elapsed());
        // Three re-browses later: nothing new to say.
        let quiet = tokio::time::timeout(Duration::from_millis(3500), a_rx.recv()).await;
        assert!(quiet.is_err(), "a re-browse repeated an event: {quiet:?}");

        let stopping = std::time::Instant::now();
        b_stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), b.stopped())
            .await
            .expect("b did not stop");
        // Not record expiry (120 s): the goodbye, about a second after.
        assert_eq!(
            next(&mut a_rx, Duration::from_secs(5)).await,
            DiscoveryEvent::Lost { key: [0xb2; 32] }
        );
        eprintln!("Lost arrived {:?} after shutdown", stopping.elapsed());

        a_stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), a.stopped())
            .await
            .expect("a did not stop");
    }
}
