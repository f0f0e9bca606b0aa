//! mDNS discovery: advertises this agent as `_nixmesh._udp.local.` and
//! browses for the other agents of the same mesh, reporting them as
//! `Found`/`Lost` events. It owns the `mdns-sd` daemon and the TXT record
//! format; it does not connect to peers, check their keys or keep the peer
//! table — the consumer of the events does.
//!
//! Every announcement is hostile input: the TXT record is parsed with a
//! named limit per value (`txt`, pure), and what arrives from the daemon
//! goes through `AnnouncedPeers` (`announced`), a pure state machine that
//! drops our own echo, other meshes, unsupported versions and malformed
//! records. `daemon` drives `mdns-sd` and is the only part with I/O.

pub mod announced;
pub mod daemon;
pub mod txt;

use std::net::SocketAddr;

pub use daemon::{start, DiscoveryError, DiscoveryHandle};

pub const SERVICE_TYPE: &str = "_nixmesh._udp.local.";
/// What nix-serve set-ups announce (with avahi): plain HTTP binary caches.
pub const NIX_SERVE_TYPE: &str = "_nix-serve._tcp.local.";

/// A plain HTTP binary cache announced on the LAN (`NIX_SERVE_TYPE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheEvent {
    /// Announced (again): its instance name and where it listens.
    Found {
        name: String,
        addrs: Vec<SocketAddr>,
    },
    /// Said goodbye, or its record expired.
    Lost { name: String },
}
pub const PROTOCOL_VERSION: u32 = 1;

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

#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    /// Interface names to use; empty means all of them.
    pub interfaces: Vec<String>,
    /// Also use IPv6.
    pub ipv6: bool,
    /// How often the browse starts again (`daemon::REBROWSE_INTERVAL`).
    pub rebrowse: std::time::Duration,
    /// Where plain caches announced as `NIX_SERVE_TYPE` go (none: not
    /// browsed for).
    pub caches: Option<tokio::sync::mpsc::Sender<CacheEvent>>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            ipv6: false,
            rebrowse: daemon::REBROWSE_INTERVAL,
            caches: None,
        }
    }
}
