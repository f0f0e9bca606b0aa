//! The live peer table: who is out there, how to reach them, how healthy and
//! how fast they are, and what has passed between us. A pure state machine:
//! callers pass the time in, so health transitions are tested without
//! sleeping. Discovery and the health checker write to it; the substituter
//! and the admin API read it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::mesh::identity::NodeId;

/// No successful ping for this long: still used, but last.
pub const SUSPECT_AFTER: Duration = Duration::from_millis(2000);
/// No successful ping for this long: not used at all.
pub const GONE_AFTER: Duration = Duration::from_millis(3500);
/// Discovered peers gone this long are dropped from the table.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Most peers the table holds; discovery beyond this is ignored.
pub const MAX_PEERS: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Known but not yet reached.
    New,
    Alive,
    Suspect,
    Gone,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerSource {
    Mdns,
    Static,
    /// It connected to us first.
    Inbound,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCounters {
    /// Requests this node answered for the peer, and NAR bytes sent to it.
    pub requests_served: u64,
    pub bytes_served: u64,
    /// Requests this node made of the peer, and NAR bytes received from it.
    pub requests_made: u64,
    pub bytes_fetched: u64,
    /// Failed or malformed exchanges, either way.
    pub errors: u64,
    /// NARs (or stripes of them) received over bulk connections (TCP).
    #[serde(default)]
    pub bulk_fetches: u64,
    /// Bulk connections dialed to the peer (from version 7 kept for the
    /// next part, so fewer than `bulk_fetches`).
    #[serde(default)]
    pub bulk_connections: u64,
    /// Of `bulk_connections`, those without TLS (version 8, in an open
    /// mesh; a plain one the peer refused is not counted).
    #[serde(default)]
    pub bulk_plain: u64,
    /// Times its bulk connections were moved under TLS (for
    /// `plain_bulk::DISTRUST`) because bytes that came from it in the
    /// clear failed their check (rather than quarantining the peer).
    #[serde(default)]
    pub bulk_moved_to_tls: u64,
    /// Of `bytes_served`, those sent in chunks packed with zstd, and with
    /// LZ4 (protocol version 6).
    #[serde(default)]
    pub served_zstd: u64,
    #[serde(default)]
    pub served_lz4: u64,
    /// What NARs from the peer achieved, for choosing how to ask for the
    /// next (`fetch::compression`).
    #[serde(default)]
    pub link: LinkStats,
}

/// Moving averages over NAR transfers of 1 MiB or more from a peer, in
/// bytes per second (0: none measured yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Bytes on the wire.
    pub wire: u64,
    /// NAR bytes, of transfers in compressed chunk frames.
    pub packed: u64,
    /// NAR bytes, of raw transfers.
    pub raw: u64,
    /// Such transfers so far.
    pub transfers: u64,
}

#[derive(Clone, Debug)]
pub struct Peer {
    pub node: NodeId,
    pub name: String,
    pub addrs: Vec<SocketAddr>,
    pub source: PeerSource,
    pub state: PeerState,
    pub srtt: Option<Duration>,
    pub last_seen: Option<Instant>,
    pub added: Instant,
    pub quarantined_until: Option<Instant>,
    pub counters: PeerCounters,
}

impl Peer {
    /// Usable for requests now.
    pub fn is_usable(&self, now: Instant) -> bool {
        matches!(self.state, PeerState::Alive | PeerState::Suspect)
            && self.quarantined_until.is_none_or(|t| now >= t)
    }
}

/// What the admin API shows of a peer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerView {
    pub name: String,
    pub key: String,
    pub fingerprint: String,
    pub addrs: Vec<String>,
    pub source: PeerSource,
    pub state: PeerState,
    pub rtt_ms: Option<f64>,
    /// The largest UDP payload the open connection to it sends (what MTU
    /// discovery found), if one is open.
    #[serde(default)]
    pub udp_payload: Option<u16>,
    /// The average size of the UDP payloads received from it on that
    /// connection: what its MTU discovery found, if it sent much.
    #[serde(default)]
    pub udp_payload_received: Option<u16>,
    /// A bulk connection (TCP at its mesh port) to it failed lately, so
    /// large NARs from it come over QUIC for now.
    #[serde(default)]
    pub bulk_refused: bool,
    pub last_seen_ms_ago: Option<u64>,
    pub quarantined: bool,
    #[serde(flatten)]
    pub counters: PeerCounters,
    /// Its summary of what it shares (protocol 4), as this node holds it.
    #[serde(default)]
    pub summary: Option<crate::mesh::summaries::SummaryView>,
    /// Set for a plain HTTP cache (no agent): why it is not used, or empty.
    #[serde(default)]
    pub plain_cache: Option<String>,
}

#[cfg(test)]
impl PeerView {
    /// An alive agent found by mDNS, for tests of what is shown of peers.
    pub(crate) fn example(name: &str) -> Self {
        PeerView {
            name: name.into(),
            key: "k".into(),
            fingerprint: "0123456789abcdef".into(),
            addrs: vec!["10.0.0.2:5182".into()],
            source: PeerSource::Mdns,
            state: PeerState::Alive,
            rtt_ms: Some(0.42),
            udp_payload: None,
            udp_payload_received: None,
            bulk_refused: false,
            last_seen_ms_ago: Some(10),
            quarantined: false,
            counters: PeerCounters::default(),
            summary: None,
            plain_cache: None,
        }
    }
}

#[derive(Default)]
pub struct PeerTable {
    peers: BTreeMap<NodeId, Peer>,
    /// What NAR transfers from all peers achieved.
    link: LinkStats,
}

impl PeerTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or refreshes a peer; returns true when it is new.
    pub fn upsert(
        &mut self,
        node: NodeId,
        name: &str,
        addrs: Vec<SocketAddr>,
        source: PeerSource,
        now: Instant,
    ) -> bool {
        if let Some(p) = self.peers.get_mut(&node) {
            if !name.is_empty() {
                p.name = name.to_string();
            }
            // Where a connection came from is a guess; what the peer
            // announced, or the config says, stands.
            let guess = source == PeerSource::Inbound && p.source != PeerSource::Inbound;
            if !addrs.is_empty() && !guess {
                p.addrs = addrs;
            }
            // A fresh announcement outranks an inbound guess.
            if p.source == PeerSource::Inbound {
                p.source = source;
            }
            if p.state == PeerState::Gone {
                p.state = PeerState::New;
            }
            return false;
        }
        if self.peers.len() >= MAX_PEERS {
            return false;
        }
        self.peers.insert(
            node,
            Peer {
                node,
                name: name.to_string(),
                addrs,
                source,
                state: PeerState::New,
                srtt: None,
                last_seen: None,
                added: now,
                quarantined_until: None,
                counters: PeerCounters::default(),
            },
        );
        true
    }

    /// The peer said goodbye: gone at once. Static peers stay listed.
    pub fn remove(&mut self, node: &NodeId) {
        match self.peers.get_mut(node) {
            Some(p) if p.source == PeerSource::Static => p.state = PeerState::Gone,
            Some(_) => {
                self.peers.remove(node);
            }
            None => {}
        }
    }

    /// A ping came back; `name` is what the peer calls itself.
    pub fn record_pong(&mut self, node: &NodeId, rtt: Duration, name: &str, now: Instant) {
        if let Some(p) = self.peers.get_mut(node) {
            if p.name.is_empty() && !name.is_empty() && !name.chars().any(char::is_control) {
                p.name = name.to_string();
            }
            p.srtt = Some(match p.srtt {
                // RFC 6298 smoothing.
                Some(s) => s.mul_f64(0.875) + rtt.mul_f64(0.125),
                None => rtt,
            });
            p.last_seen = Some(now);
            p.state = PeerState::Alive;
        }
    }

    /// Traffic came from the peer's connection: it is alive. `rtt` is the
    /// connection's own estimate of the round trip.
    pub fn record_heard(&mut self, node: &NodeId, rtt: Duration, now: Instant) {
        if let Some(p) = self.peers.get_mut(node) {
            p.srtt = Some(rtt);
            p.last_seen = Some(now);
            p.state = PeerState::Alive;
        }
    }

    pub fn contains(&self, node: &NodeId) -> bool {
        self.peers.contains_key(node)
    }

    /// Moves peers along Alive → Suspect → Gone by silence; forgets long-gone
    /// discovered peers.
    pub fn tick(&mut self, now: Instant) {
        for p in self.peers.values_mut() {
            let since = now.saturating_duration_since(p.last_seen.unwrap_or(p.added));
            p.state = match p.state {
                PeerState::Alive | PeerState::Suspect if since >= GONE_AFTER => PeerState::Gone,
                PeerState::Alive if since >= SUSPECT_AFTER => PeerState::Suspect,
                PeerState::New if since >= GONE_AFTER => PeerState::Gone,
                s => s,
            };
        }
        self.peers.retain(|_, p| {
            p.source == PeerSource::Static
                || p.state != PeerState::Gone
                || now.saturating_duration_since(p.last_seen.unwrap_or(p.added)) < FORGET_AFTER
        });
    }

    /// Stop using `node` for `duration` (it sent bytes that did not verify).
    pub fn quarantine(&mut self, node: &NodeId, duration: Duration, now: Instant) {
        if let Some(p) = self.peers.get_mut(node) {
            p.quarantined_until = Some(now + duration);
            p.counters.errors += 1;
        }
    }

    pub fn counters_mut(&mut self, node: &NodeId) -> Option<&mut PeerCounters> {
        self.peers.get_mut(node).map(|p| &mut p.counters)
    }

    /// Applies `f` to what transfers from `node` achieved and to what
    /// transfers from all peers achieved.
    pub fn record_link(&mut self, node: &NodeId, f: impl Fn(&mut LinkStats)) {
        if let Some(c) = self.counters_mut(node) {
            f(&mut c.link);
        }
        f(&mut self.link);
    }

    /// What transfers from `node` achieved, and from all peers.
    pub fn links(&self, node: &NodeId) -> (LinkStats, LinkStats) {
        let peer = self.peers.get(node).map(|p| p.counters.link);
        (peer.unwrap_or_default(), self.link)
    }

    pub fn get(&self, node: &NodeId) -> Option<&Peer> {
        self.peers.get(node)
    }

    /// Peers to send requests to, fastest first.
    pub fn usable(&self, now: Instant) -> Vec<Peer> {
        let mut out: Vec<Peer> = self
            .peers
            .values()
            .filter(|p| p.is_usable(now))
            .cloned()
            .collect();
        out.sort_by_key(|p| (p.state != PeerState::Alive, p.srtt.unwrap_or(Duration::MAX)));
        out
    }

    /// Every peer that should be dialled and pinged.
    pub fn all(&self) -> Vec<Peer> {
        self.peers.values().cloned().collect()
    }

    /// `summary`: what this node holds of each peer's summary.
    pub fn views(
        &self,
        now: Instant,
        summary: impl Fn(&NodeId) -> Option<crate::mesh::summaries::SummaryView>,
    ) -> Vec<PeerView> {
        self.peers
            .values()
            .map(|p| PeerView {
                name: p.name.clone(),
                key: p.node.to_base64(),
                fingerprint: p.node.fingerprint(),
                addrs: p.addrs.iter().map(ToString::to_string).collect(),
                source: p.source,
                state: p.state,
                rtt_ms: p.srtt.map(|d| (d.as_secs_f64() * 1e5).round() / 100.0),
                udp_payload: None,
                udp_payload_received: None,
                bulk_refused: false,
                last_seen_ms_ago: p
                    .last_seen
                    .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                quarantined: p.quarantined_until.is_some_and(|t| now < t),
                counters: p.counters.clone(),
                summary: summary(&p.node),
                plain_cache: None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> Vec<SocketAddr> {
        vec!["10.0.0.1:5182".parse().unwrap()]
    }

    #[test]
    fn silence_makes_a_peer_suspect_then_gone() {
        let t0 = Instant::now();
        let mut t = PeerTable::new();
        let n = NodeId([1; 32]);
        assert!(t.upsert(n, "a", addr(), PeerSource::Mdns, t0));
        assert!(t.usable(t0).is_empty(), "not usable before the first pong");
        t.record_pong(&n, Duration::from_millis(2), "", t0);
        assert_eq!(t.usable(t0).len(), 1);
        t.tick(t0 + Duration::from_secs(3));
        assert_eq!(t.get(&n).unwrap().state, PeerState::Suspect);
        assert_eq!(t.usable(t0 + Duration::from_secs(3)).len(), 1);
        t.tick(t0 + Duration::from_millis(3600));
        assert_eq!(t.get(&n).unwrap().state, PeerState::Gone);
        assert!(t.usable(t0 + Duration::from_secs(5)).is_empty());
        t.record_pong(
            &n,
            Duration::from_millis(2),
            "",
            t0 + Duration::from_secs(6),
        );
        assert_eq!(t.get(&n).unwrap().state, PeerState::Alive);
        t.tick(t0 + Duration::from_secs(6) + FORGET_AFTER + GONE_AFTER);
        assert!(
            t.get(&n).is_none(),
            "long-gone discovered peer is forgotten"
        );
    }

    #[test]
    fn an_inbound_connection_does_not_replace_announced_addresses() {
        let t0 = Instant::now();
        let mut t = PeerTable::new();
        let n = NodeId([1; 32]);
        let inbound: Vec<SocketAddr> = vec!["10.0.0.1:40000".parse().unwrap()];
        t.upsert(n, "a", addr(), PeerSource::Mdns, t0);
        t.upsert(n, "", inbound.clone(), PeerSource::Inbound, t0);
        assert_eq!(t.get(&n).unwrap().addrs, addr());
        assert_eq!(t.get(&n).unwrap().source, PeerSource::Mdns);
        // A peer known only from its connection is reached where it came
        // from, until it announces itself.
        let m = NodeId([2; 32]);
        t.upsert(m, "", inbound.clone(), PeerSource::Inbound, t0);
        assert_eq!(t.get(&m).unwrap().addrs, inbound);
        t.upsert(m, "b", addr(), PeerSource::Mdns, t0);
        assert_eq!(t.get(&m).unwrap().addrs, addr());
        assert_eq!(t.get(&m).unwrap().source, PeerSource::Mdns);
    }

    #[test]
    fn goodbye_removes_discovered_but_keeps_static() {
        let t0 = Instant::now();
        let mut t = PeerTable::new();
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        t.upsert(a, "a", addr(), PeerSource::Mdns, t0);
        t.upsert(b, "b", addr(), PeerSource::Static, t0);
        t.remove(&a);
        t.remove(&b);
        assert!(t.get(&a).is_none());
        assert_eq!(t.get(&b).unwrap().state, PeerState::Gone);
    }

    #[test]
    fn usable_is_fastest_first_and_skips_quarantined() {
        let t0 = Instant::now();
        let mut t = PeerTable::new();
        let (a, b, c) = (NodeId([1; 32]), NodeId([2; 32]), NodeId([3; 32]));
        for n in [a, b, c] {
            t.upsert(n, "", addr(), PeerSource::Mdns, t0);
        }
        t.record_pong(&a, Duration::from_millis(9), "", t0);
        t.record_pong(&b, Duration::from_millis(1), "", t0);
        t.record_pong(&c, Duration::from_millis(5), "", t0);
        let order: Vec<NodeId> = t.usable(t0).iter().map(|p| p.node).collect();
        assert_eq!(order, [b, c, a]);
        t.quarantine(&b, Duration::from_secs(30), t0);
        let order: Vec<NodeId> = t.usable(t0).iter().map(|p| p.node).collect();
        assert_eq!(order, [c, a]);
        assert_eq!(t.usable(t0 + Duration::from_secs(31)).len(), 3);
        assert_eq!(t.get(&b).unwrap().counters.errors, 1);
    }

    #[test]
    fn table_is_bounded() {
        let t0 = Instant::now();
        let mut t = PeerTable::new();
        for i in 0..(MAX_PEERS + 10) {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&(i as u64).to_be_bytes());
            t.upsert(NodeId(k), "", addr(), PeerSource::Mdns, t0);
        }
        assert_eq!(t.all().len(), MAX_PEERS);
    }
}
