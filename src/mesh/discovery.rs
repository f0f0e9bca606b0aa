//! mDNS discovery: advertises this agent as `_nixmesh._udp.local.` and
//! browses for the other agents of the same mesh, reporting them as
//! `Found`/`Lost` events. It owns the `mdns-sd` daemon and the TXT record
//! format; it does not connect to peers, check their keys or keep the peer
//! table — the consumer of the events does.
//!
//! Every announcement is hostile input: the TXT record is parsed with a
//! named limit per value (`parse_txt`, pure), and what arrives from the
//! daemon goes through `AnnouncedPeers`, a pure state machine that drops our
//! own echo, other meshes, unsupported versions and malformed records.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use mdns_sd::{DaemonEvent, IfKind, ServiceDaemon, ServiceEvent, ServiceInfo, UnregisterStatus};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::mesh::identity::MAX_NODE_NAME;
use crate::mesh::peers;

pub const SERVICE_TYPE: &str = "_nixmesh._udp.local.";
pub const PROTOCOL_VERSION: u32 = 1;

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One TXT string (`key=value`) is at most 255 bytes on the wire.
pub const MAX_TXT_ENTRY: usize = 255;
pub const MAX_MESH_ID: usize = 64;
/// Base64 of 32 bytes, with padding.
const KEY_B64_LEN: usize = 44;
const MAX_VERSION_DIGITS: usize = 10;
const MAX_PORT_DIGITS: usize = 5;
/// Hex characters of the key that make the instance name: 64 bits, unique
/// per node on any LAN.
const INSTANCE_HEX_CHARS: usize = 16;
/// Addresses kept from one announcement; more is a hostile record.
pub const MAX_ADDRS: usize = 16;
/// Instances remembered as already warned about.
const MAX_WARNED: usize = 4096;

/// How long shutdown waits for the daemon to confirm the goodbye.
const UNREGISTER_TIMEOUT: Duration = Duration::from_secs(1);
/// mdns-sd repeats the goodbye 120 ms after the first; let it go out too.
const GOODBYE_REPEAT_WAIT: Duration = Duration::from_millis(200);
const DAEMON_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

const TXT_VERSION: &str = "v";
const TXT_KEY: &str = "key";
const TXT_PORT: &str = "port";
const TXT_MESH: &str = "mesh";
const TXT_NAME: &str = "name";

/// What this node announces, and what a peer's announcement says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// Protocol version, currently `PROTOCOL_VERSION`.
    pub version: u32,
    /// The node's ed25519 public key.
    pub key: [u8; 32],
    pub quic_port: u16,
    /// Short id of the mesh, derived by the caller from the mesh secret;
    /// printable ASCII, at most `MAX_MESH_ID` bytes.
    pub mesh_id: String,
    /// Human host name, at most `MAX_NODE_NAME` bytes, no control characters.
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// A peer of our mesh announced itself, or announced new addresses.
    /// `addrs` are its resolved IPs with its QUIC port.
    Found {
        key: [u8; 32],
        name: String,
        addrs: Vec<SocketAddr>,
    },
    /// A peer said goodbye, its records expired, or it stopped being a peer
    /// we accept (changed mesh or version, or a malformed re-announcement).
    Lost { key: [u8; 32] },
}

#[derive(Clone, Debug, Default)]
pub struct DiscoveryConfig {
    /// Interface names to use; empty means all of them.
    pub interfaces: Vec<String>,
    /// Also use IPv6.
    pub ipv6: bool,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TxtError {
    #[error("TXT record has no `{0}`")]
    Missing(&'static str),
    #[error("TXT record has `{0}` more than once")]
    Duplicate(&'static str),
    #[error("TXT entry of {len} bytes, more than {MAX_TXT_ENTRY}")]
    EntryTooLong { len: usize },
    #[error("TXT `{key}` is {len} bytes, more than {max}")]
    TooLong {
        key: &'static str,
        len: usize,
        max: usize,
    },
    #[error("TXT `{TXT_VERSION}` is not a version number")]
    BadVersion,
    #[error("TXT `{TXT_KEY}` is not base64")]
    BadKeyBase64,
    #[error("TXT `{TXT_KEY}` has {0} bytes, expected 32")]
    KeyLength(usize),
    #[error("TXT `{TXT_PORT}` is not a port number (1-65535)")]
    BadPort,
    #[error("TXT `{TXT_MESH}` is empty or not printable ASCII")]
    BadMeshId,
    #[error("TXT `{TXT_NAME}` is empty or has control characters")]
    BadName,
    #[error("TXT `{0}` is not UTF-8")]
    NotUtf8(String),
}

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

/// Announcement -> TXT properties: `v`, `key` (standard base64 of the 32
/// bytes), `port`, `mesh`, `name`.
pub fn to_txt(a: &Announcement) -> Vec<(String, String)> {
    vec![
        (TXT_VERSION.to_string(), a.version.to_string()),
        (TXT_KEY.to_string(), BASE64.encode(a.key)),
        (TXT_PORT.to_string(), a.quic_port.to_string()),
        (TXT_MESH.to_string(), a.mesh_id.clone()),
        (TXT_NAME.to_string(), a.name.clone()),
    ]
}

/// TXT properties -> Announcement. Keys match case-insensitively (RFC 6763);
/// unknown keys are ignored; a missing, repeated, oversized or malformed
/// known value is an error. Any version number parses: whether it is
/// supported is the caller's decision.
pub fn parse_txt(props: &[(String, String)]) -> Result<Announcement, TxtError> {
    let mut version = None;
    let mut key = None;
    let mut port = None;
    let mut mesh = None;
    let mut name = None;
    for (k, v) in props {
        let len = k.len() + 1 + v.len();
        if len > MAX_TXT_ENTRY {
            return Err(TxtError::EntryTooLong { len });
        }
        let slot = match k.to_ascii_lowercase().as_str() {
            TXT_VERSION => (&mut version, TXT_VERSION),
            TXT_KEY => (&mut key, TXT_KEY),
            TXT_PORT => (&mut port, TXT_PORT),
            TXT_MESH => (&mut mesh, TXT_MESH),
            TXT_NAME => (&mut name, TXT_NAME),
            _ => continue,
        };
        if slot.0.replace(v.as_str()).is_some() {
            return Err(TxtError::Duplicate(slot.1));
        }
    }
    let version = version.ok_or(TxtError::Missing(TXT_VERSION))?;
    let key = key.ok_or(TxtError::Missing(TXT_KEY))?;
    let port = port.ok_or(TxtError::Missing(TXT_PORT))?;
    let mesh = mesh.ok_or(TxtError::Missing(TXT_MESH))?;
    let name = name.ok_or(TxtError::Missing(TXT_NAME))?;
    Ok(Announcement {
        version: parse_decimal(version, MAX_VERSION_DIGITS).ok_or(TxtError::BadVersion)?,
        key: parse_key(key)?,
        quic_port: parse_decimal(port, MAX_PORT_DIGITS)
            .filter(|&p| p != 0)
            .ok_or(TxtError::BadPort)?,
        mesh_id: parse_mesh_id(mesh)?,
        name: parse_name(name)?,
    })
}

/// Plain decimal digits only: `from_str` alone would take `+80`.
fn parse_decimal<T: std::str::FromStr>(text: &str, max_digits: usize) -> Option<T> {
    if text.is_empty() || text.len() > max_digits || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn parse_key(text: &str) -> Result<[u8; 32], TxtError> {
    if text.len() > KEY_B64_LEN {
        return Err(TxtError::TooLong {
            key: TXT_KEY,
            len: text.len(),
            max: KEY_B64_LEN,
        });
    }
    let bytes = BASE64.decode(text).map_err(|_| TxtError::BadKeyBase64)?;
    let len = bytes.len();
    bytes.try_into().map_err(|_| TxtError::KeyLength(len))
}

fn parse_mesh_id(text: &str) -> Result<String, TxtError> {
    if text.len() > MAX_MESH_ID {
        return Err(TxtError::TooLong {
            key: TXT_MESH,
            len: text.len(),
            max: MAX_MESH_ID,
        });
    }
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TxtError::BadMeshId);
    }
    Ok(text.to_string())
}

/// The name is shown in `nixmesh peers` and logs: no control characters,
/// so a record cannot rewrite the operator's terminal.
fn parse_name(text: &str) -> Result<String, TxtError> {
    if text.len() > MAX_NODE_NAME {
        return Err(TxtError::TooLong {
            key: TXT_NAME,
            len: text.len(),
            max: MAX_NODE_NAME,
        });
    }
    if text.is_empty() || text.chars().any(char::is_control) {
        return Err(TxtError::BadName);
    }
    Ok(text.to_string())
}

/// The mDNS instance name of the node with `key`: unique per node.
pub fn instance_name(key: &[u8; 32]) -> String {
    crate::nix::base16::encode(&key[..INSTANCE_HEX_CHARS / 2])
}

fn instance_fullname(key: &[u8; 32]) -> String {
    format!("{}.{SERVICE_TYPE}", instance_name(key))
}

fn is_supported(version: u32) -> bool {
    version == PROTOCOL_VERSION
}

/// Addresses a peer can be dialled at. Link-local IPv6 is dropped: mdns-sd
/// does not say which interface it came from, and without a scope id it
/// cannot be dialled.
fn dialable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => {
            let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
            !(v6.is_unspecified() || v6.is_multicast() || link_local)
        }
    }
}

/// TXT properties of a received record as strings; a non-UTF-8 value makes
/// the whole record malformed, and a key with no value reads as empty.
fn txt_of(info: &ServiceInfo) -> Result<Vec<(String, String)>, TxtError> {
    info.get_properties()
        .iter()
        .map(|p| {
            let value = std::str::from_utf8(p.val().unwrap_or_default())
                .map_err(|_| TxtError::NotUtf8(p.key().chars().take(32).collect()))?;
            Ok((p.key().to_string(), value.to_string()))
        })
        .collect()
}

/// The peers of our mesh that are announced right now, keyed by mDNS
/// fullname. Pure: it turns the daemon's resolved/removed records into
/// `DiscoveryEvent`s and drops everything else.
#[derive(Debug)]
pub struct AnnouncedPeers {
    own_key: [u8; 32],
    mesh_id: String,
    /// Lower-case fullname -> what we last reported as `Found`.
    peers: HashMap<String, PeerRecord>,
    /// Fullnames already warned about, so a hostile record logs once.
    warned: HashSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerRecord {
    key: [u8; 32],
    name: String,
    addrs: Vec<SocketAddr>,
}

impl AnnouncedPeers {
    pub fn new(own_key: [u8; 32], mesh_id: String) -> Self {
        Self {
            own_key,
            mesh_id,
            peers: HashMap::new(),
            warned: HashSet::new(),
        }
    }

    /// A record resolved (new, or changed). `Found` when it is a peer of our
    /// mesh that is new or has new addresses or name; `Lost` when a peer we
    /// had now announces something we do not accept.
    pub fn on_resolved(
        &mut self,
        fullname: &str,
        txt: Result<Vec<(String, String)>, TxtError>,
        ips: impl IntoIterator<Item = IpAddr>,
    ) -> Option<DiscoveryEvent> {
        let fullname = fullname.to_ascii_lowercase();
        let announcement = match txt.and_then(|props| parse_txt(&props)) {
            Ok(a) => a,
            Err(e) => {
                self.warn_once(&fullname, &e.to_string());
                return self.drop_peer(&fullname);
            }
        };
        if announcement.key == self.own_key {
            return None;
        }
        if announcement.mesh_id != self.mesh_id {
            tracing::debug!(%fullname, mesh = %announcement.mesh_id, "mDNS: node of another mesh");
            return self.drop_peer(&fullname);
        }
        if !is_supported(announcement.version) {
            let why = format!("protocol version {} is not supported", announcement.version);
            self.warn_once(&fullname, &why);
            return self.drop_peer(&fullname);
        }
        // One instance per key: a record whose name does not match its key
        // would let one node claim many names, and Lost could not find it.
        if fullname != instance_fullname(&announcement.key) {
            self.warn_once(&fullname, "instance name does not match its key");
            return self.drop_peer(&fullname);
        }
        let mut addrs: Vec<SocketAddr> = ips
            .into_iter()
            .filter(dialable)
            .map(|ip| SocketAddr::new(ip, announcement.quic_port))
            .collect();
        addrs.sort_unstable();
        addrs.dedup();
        addrs.truncate(MAX_ADDRS);
        if addrs.is_empty() {
            tracing::debug!(%fullname, "mDNS: peer has no dialable address");
            return self.drop_peer(&fullname);
        }
        let record = PeerRecord {
            key: announcement.key,
            name: announcement.name,
            addrs,
        };
        if self.peers.get(&fullname) == Some(&record) {
            return None;
        }
        if !self.peers.contains_key(&fullname) && self.peers.len() >= peers::MAX_PEERS {
            self.warn_once(&fullname, "too many peers announced; ignored");
            return None;
        }
        self.peers.insert(fullname, record.clone());
        Some(DiscoveryEvent::Found {
            key: record.key,
            name: record.name,
            addrs: record.addrs,
        })
    }

    /// A record went away (goodbye or expiry).
    pub fn on_removed(&mut self, fullname: &str) -> Option<DiscoveryEvent> {
        let fullname = fullname.to_ascii_lowercase();
        self.warned.remove(&fullname);
        self.drop_peer(&fullname)
    }

    /// Forgets the peer at `fullname` (lower case), if we had reported it.
    fn drop_peer(&mut self, fullname: &str) -> Option<DiscoveryEvent> {
        self.peers
            .remove(fullname)
            .map(|record| DiscoveryEvent::Lost { key: record.key })
    }

    fn warn_once(&mut self, fullname: &str, why: &str) {
        if self.warned.contains(fullname) {
            return;
        }
        if self.warned.len() >= MAX_WARNED {
            tracing::debug!(%fullname, why, "mDNS: ignored announcement");
            return;
        }
        self.warned.insert(fullname.to_string());
        tracing::warn!(%fullname, why, "mDNS: ignored announcement");
    }
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
        Ok((browse, monitor))
    };
    let (browse, monitor) = match setup() {
        Ok(receivers) => receivers,
        Err(e) => {
            let _ = daemon.shutdown();
            return Err(DiscoveryError::Daemon(e));
        }
    };
    tracing::info!(instance = %own_fullname, port = own.quic_port, mesh = %own.mesh_id, "mDNS: announcing");

    let peers = AnnouncedPeers::new(own.key, own.mesh_id);
    let task = runtime.spawn(run(
        daemon,
        own_fullname,
        browse,
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
    browse: mdns_sd::Receiver<ServiceEvent>,
    monitor: mdns_sd::Receiver<DaemonEvent>,
    mut peers: AnnouncedPeers,
    events: mpsc::Sender<DiscoveryEvent>,
    shutdown: CancellationToken,
) {
    let mut monitor_open = true;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
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
                let ips: Vec<IpAddr> = info.get_addresses().iter().copied().collect();
                peers.on_resolved(info.get_fullname(), txt_of(&info), ips)
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
    use super::*;
    use proptest::prelude::*;

    fn announcement(key_byte: u8) -> Announcement {
        Announcement {
            version: PROTOCOL_VERSION,
            key: [key_byte; 32],
            quic_port: 7443,
            mesh_id: "0123abcd".to_string(),
            name: "build-7".to_string(),
        }
    }

    fn props(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn with(a: &Announcement, key: &str, value: &str) -> Vec<(String, String)> {
        let mut txt = to_txt(a);
        for (k, v) in &mut txt {
            if k == key {
                *v = value.to_string();
            }
        }
        txt
    }

    fn without(a: &Announcement, key: &str) -> Vec<(String, String)> {
        to_txt(a).into_iter().filter(|(k, _)| k != key).collect()
    }

    #[test]
    fn txt_round_trips_and_reads_as_documented() {
        let a = announcement(7);
        let txt = to_txt(&a);
        assert_eq!(
            txt,
            props(&[
                ("v", "1"),
                ("key", "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc="),
                ("port", "7443"),
                ("mesh", "0123abcd"),
                ("name", "build-7"),
            ])
        );
        assert_eq!(parse_txt(&txt), Ok(a));
    }

    #[test]
    fn unknown_keys_are_ignored_and_known_ones_match_any_case() {
        let a = announcement(1);
        let mut txt: Vec<_> = to_txt(&a)
            .into_iter()
            .map(|(k, v)| (k.to_uppercase(), v))
            .collect();
        txt.push(("future".into(), "whatever".into()));
        txt.insert(0, ("x".into(), String::new()));
        assert_eq!(parse_txt(&txt), Ok(a));
    }

    #[test]
    fn every_missing_field_is_named() {
        let a = announcement(1);
        for key in ["v", "key", "port", "mesh", "name"] {
            assert_eq!(
                parse_txt(&without(&a, key)),
                Err(TxtError::Missing(match key {
                    "v" => TXT_VERSION,
                    "key" => TXT_KEY,
                    "port" => TXT_PORT,
                    "mesh" => TXT_MESH,
                    _ => TXT_NAME,
                }))
            );
        }
    }

    #[test]
    fn bad_keys_are_rejected() {
        let a = announcement(1);
        let short = BASE64.encode([1u8; 31]);
        let long = BASE64.encode([1u8; 33]);
        assert_eq!(
            parse_txt(&with(&a, "key", &short)),
            Err(TxtError::KeyLength(31))
        );
        assert_eq!(
            parse_txt(&with(&a, "key", &long)),
            Err(TxtError::KeyLength(33))
        );
        assert!(matches!(
            parse_txt(&with(&a, "key", &BASE64.encode([1u8; 34]))),
            Err(TxtError::TooLong { key: "key", .. })
        ));
        assert_eq!(
            parse_txt(&with(
                &a,
                "key",
                "not base64 at all, not at all!!!!!!!!!!!!!!"
            )),
            Err(TxtError::BadKeyBase64)
        );
        // Unpadded and URL-safe spellings are not what `to_txt` writes.
        let unpadded = BASE64
            .encode([0xfbu8; 32])
            .trim_end_matches('=')
            .to_string();
        assert_eq!(
            parse_txt(&with(&a, "key", &unpadded)),
            Err(TxtError::BadKeyBase64)
        );
        let url_safe = BASE64
            .encode([0xfbu8; 32])
            .replace('+', "-")
            .replace('/', "_");
        assert_eq!(
            parse_txt(&with(&a, "key", &url_safe)),
            Err(TxtError::BadKeyBase64)
        );
        assert_eq!(parse_txt(&with(&a, "key", "")), Err(TxtError::KeyLength(0)));
    }

    #[test]
    fn huge_values_are_rejected() {
        let a = announcement(1);
        let huge = "a".repeat(300);
        for key in ["v", "key", "port", "mesh", "name", "unknown"] {
            let mut txt = to_txt(&a);
            txt.push((key.to_string(), huge.clone()));
            txt.retain(|(k, v)| k != key || v == &huge);
            assert_eq!(
                parse_txt(&txt),
                Err(TxtError::EntryTooLong {
                    len: key.len() + 301
                }),
                "{key}"
            );
        }
        let huge_key = "k".repeat(300);
        let mut txt = to_txt(&a);
        txt.push((huge_key, String::new()));
        assert!(matches!(
            parse_txt(&txt),
            Err(TxtError::EntryTooLong { .. })
        ));
        // Below the TXT limit, each field has its own.
        assert!(matches!(
            parse_txt(&with(&a, "name", &"n".repeat(MAX_NODE_NAME + 1))),
            Err(TxtError::TooLong { key: "name", .. })
        ));
        assert!(matches!(
            parse_txt(&with(&a, "mesh", &"m".repeat(MAX_MESH_ID + 1))),
            Err(TxtError::TooLong { key: "mesh", .. })
        ));
        assert_eq!(
            parse_txt(&with(&a, "v", "12345678901")),
            Err(TxtError::BadVersion)
        );
    }

    #[test]
    fn bad_ports_are_rejected() {
        let a = announcement(1);
        for port in [
            "0",
            "65536",
            "-1",
            "+80",
            " 80",
            "80 ",
            "0x50",
            "",
            "99999999999",
        ] {
            assert_eq!(
                parse_txt(&with(&a, "port", port)),
                Err(TxtError::BadPort),
                "{port:?}"
            );
        }
        assert_eq!(
            parse_txt(&with(&a, "port", "65535")).unwrap().quic_port,
            65535
        );
        assert_eq!(parse_txt(&with(&a, "port", "00080")).unwrap().quic_port, 80);
    }

    #[test]
    fn versions_must_be_numbers() {
        let a = announcement(1);
        for v in ["one", "", "1.0", "-1", "+1", "4294967296"] {
            assert_eq!(
                parse_txt(&with(&a, "v", v)),
                Err(TxtError::BadVersion),
                "{v:?}"
            );
        }
        // Any number parses; support is decided by the caller.
        assert_eq!(parse_txt(&with(&a, "v", "2")).unwrap().version, 2);
    }

    #[test]
    fn mesh_ids_and_names_are_printable() {
        let a = announcement(1);
        for mesh in ["", "open mesh", "tab\t", "é"] {
            assert_eq!(
                parse_txt(&with(&a, "mesh", mesh)),
                Err(TxtError::BadMeshId),
                "{mesh:?}"
            );
        }
        for name in ["", "evil\x1b[2J", "new\nline"] {
            assert_eq!(
                parse_txt(&with(&a, "name", name)),
                Err(TxtError::BadName),
                "{name:?}"
            );
        }
        assert_eq!(
            parse_txt(&with(&a, "mesh", "open")).unwrap().mesh_id,
            "open"
        );
        assert_eq!(
            parse_txt(&with(&a, "name", "Büro PC 3")).unwrap().name,
            "Büro PC 3"
        );
    }

    #[test]
    fn repeated_fields_are_rejected() {
        let a = announcement(1);
        let mut txt = to_txt(&a);
        txt.push(("PORT".into(), "7443".into()));
        assert_eq!(parse_txt(&txt), Err(TxtError::Duplicate(TXT_PORT)));
    }

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

    #[test]
    fn instance_names_come_from_the_key() {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 0xff]);
        assert_eq!(instance_name(&key), "deadbeef000102ff");
        assert_eq!(
            instance_fullname(&key),
            "deadbeef000102ff._nixmesh._udp.local."
        );
    }

    fn valid_announcement() -> impl Strategy<Value = Announcement> {
        (
            any::<u32>(),
            any::<[u8; 32]>(),
            1..=u16::MAX,
            "[!-~]{1,64}",
            "[^\\p{Cc}]{1,15}",
        )
            .prop_map(|(version, key, quic_port, mesh_id, name)| Announcement {
                version,
                key,
                quic_port,
                mesh_id,
                name,
            })
            .prop_filter("name fits", |a| a.name.len() <= MAX_NODE_NAME)
    }

    proptest! {
        #[test]
        fn valid_announcements_round_trip(a in valid_announcement()) {
            prop_assert_eq!(parse_txt(&to_txt(&a)), Ok(a));
        }

        #[test]
        fn parse_txt_never_panics(
            props in proptest::collection::vec(
                (
                    prop_oneof![
                        Just("v".to_string()),
                        Just("key".to_string()),
                        Just("port".to_string()),
                        Just("mesh".to_string()),
                        Just("name".to_string()),
                        ".{0,300}",
                    ],
                    ".{0,300}",
                ),
                0..8,
            )
        ) {
            let _ = parse_txt(&props);
        }

        #[test]
        fn one_field_changed_at_random_never_panics(
            field in 0usize..5,
            value in ".{0,300}",
        ) {
            let a = announcement(3);
            let mut txt = to_txt(&a);
            txt[field].1 = value;
            if let Ok(b) = parse_txt(&txt) {
                prop_assert_eq!(parse_txt(&to_txt(&b)), Ok(b));
            }
        }
    }

    // --- AnnouncedPeers: what the daemon's records turn into ---

    const OWN: u8 = 1;

    fn fullname_of(a: &Announcement) -> String {
        instance_fullname(&a.key)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn view() -> AnnouncedPeers {
        AnnouncedPeers::new([OWN; 32], "0123abcd".to_string())
    }

    #[test]
    fn a_peer_is_found_once_and_again_when_its_addresses_change() {
        let mut peers = view();
        let b = announcement(2);
        let name = fullname_of(&b);
        let found = peers.on_resolved(&name, Ok(to_txt(&b)), [ip("10.9.0.2"), ip("10.9.0.1")]);
        assert_eq!(
            found,
            Some(DiscoveryEvent::Found {
                key: b.key,
                name: "build-7".into(),
                addrs: vec![
                    "10.9.0.1:7443".parse().unwrap(),
                    "10.9.0.2:7443".parse().unwrap()
                ],
            })
        );
        // The same record again (cache refresh): nothing new.
        assert_eq!(
            peers.on_resolved(&name, Ok(to_txt(&b)), [ip("10.9.0.1"), ip("10.9.0.2")]),
            None
        );
        let moved = peers.on_resolved(&name, Ok(to_txt(&b)), [ip("10.9.0.3")]);
        assert_eq!(
            moved,
            Some(DiscoveryEvent::Found {
                key: b.key,
                name: "build-7".into(),
                addrs: vec!["10.9.0.3:7443".parse().unwrap()],
            })
        );
        assert_eq!(
            peers.on_removed(&name.to_uppercase()),
            Some(DiscoveryEvent::Lost { key: b.key })
        );
        assert_eq!(peers.on_removed(&name), None);
    }

    #[test]
    fn own_echo_other_meshes_and_other_versions_are_ignored() {
        let mut peers = view();
        let own = announcement(OWN);
        assert_eq!(
            peers.on_resolved(&fullname_of(&own), Ok(to_txt(&own)), [ip("10.9.0.1")]),
            None
        );
        let mut other_mesh = announcement(2);
        other_mesh.mesh_id = "open".into();
        assert_eq!(
            peers.on_resolved(
                &fullname_of(&other_mesh),
                Ok(to_txt(&other_mesh)),
                [ip("10.9.0.2")]
            ),
            None
        );
        let mut future = announcement(3);
        future.version = PROTOCOL_VERSION + 1;
        assert_eq!(
            peers.on_resolved(&fullname_of(&future), Ok(to_txt(&future)), [ip("10.9.0.3")]),
            None
        );
        assert!(peers.peers.is_empty());
    }

    #[test]
    fn hostile_records_are_ignored_and_drop_a_known_peer() {
        let mut peers = view();
        let b = announcement(2);
        let name = fullname_of(&b);
        assert!(peers
            .on_resolved(&name, Ok(to_txt(&b)), [ip("10.9.0.2")])
            .is_some());
        // Same instance, now garbage: the peer is no longer one we accept.
        assert_eq!(
            peers.on_resolved(&name, Ok(with(&b, "key", "!!")), [ip("10.9.0.2")]),
            Some(DiscoveryEvent::Lost { key: b.key })
        );
        assert_eq!(
            peers.on_resolved(
                &name,
                Err(TxtError::NotUtf8("name".into())),
                [ip("10.9.0.2")]
            ),
            None
        );
        assert!(peers.warned.contains(&name));
        // A record whose instance name is not its key's.
        let c = announcement(3);
        assert_eq!(
            peers.on_resolved(&name, Ok(to_txt(&c)), [ip("10.9.0.3")]),
            None
        );
        // Only undialable addresses.
        assert_eq!(
            peers.on_resolved(
                &fullname_of(&c),
                Ok(to_txt(&c)),
                [
                    ip("0.0.0.0"),
                    ip("224.0.0.251"),
                    ip("255.255.255.255"),
                    ip("fe80::1"),
                    ip("ff02::fb")
                ]
            ),
            None
        );
        assert!(peers.peers.is_empty());
    }

    #[test]
    fn addresses_are_capped() {
        let mut peers = view();
        let b = announcement(2);
        let ips = (0..=255u8).map(|i| IpAddr::from([10, 9, 1, i]));
        let Some(DiscoveryEvent::Found { addrs, .. }) =
            peers.on_resolved(&fullname_of(&b), Ok(to_txt(&b)), ips)
        else {
            panic!("not found");
        };
        assert_eq!(addrs.len(), MAX_ADDRS);
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
        let config = DiscoveryConfig {
            interfaces: vec!["lo".into()],
            ipv6: false,
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
