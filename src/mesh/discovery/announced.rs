//! The peers of our mesh that are announced right now: the daemon's
//! resolved and removed records in, `Found`/`Lost` events out. Pure.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use super::txt::{instance_fullname, is_supported, parse_txt, TxtError};
use super::DiscoveryEvent;
use crate::mesh::peers;

/// Addresses kept from one announcement; more is a hostile record.
pub const MAX_ADDRS: usize = 16;
/// Instances remembered as already warned about.
const MAX_WARNED: usize = 4096;

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
            // An answer that came without the host's A record (it travels
            // in another packet, or was lost): the daemon asks for it
            // again. A peer already known keeps the addresses it had.
            tracing::debug!(%fullname, "mDNS: peer has no dialable address (yet)");
            return None;
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

#[cfg(test)]
mod tests {
    use super::super::txt::tests::{announcement, with};
    use super::super::txt::to_txt;
    use super::super::{Announcement, PROTOCOL_VERSION};
    use super::*;

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
    fn an_answer_without_an_address_keeps_a_known_peer() {
        let mut peers = view();
        let b = announcement(2);
        let name = fullname_of(&b);
        assert!(peers
            .on_resolved(&name, Ok(to_txt(&b)), [ip("10.9.0.2")])
            .is_some());
        assert_eq!(
            peers.on_resolved(&name, Ok(to_txt(&b)), [ip("fe80::2")]),
            None
        );
        assert_eq!(
            peers.on_removed(&name),
            Some(DiscoveryEvent::Lost { key: b.key })
        );
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
