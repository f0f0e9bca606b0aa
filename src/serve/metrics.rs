//! What `/metrics` shows, in the OpenMetrics text format: one registry
//! (`prometheus-client`) that the fetch side's stats register into when the
//! agent starts, plus a collector that reads the peer table on each scrape
//! (peers by state; bytes and errors by peer, labelled with the peer's name
//! and key fingerprint).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::api::PeerView;
use crate::mesh::node::Mesh;
use crate::mesh::peers::PeerState;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry as text; a metric that cannot be encoded is logged and
/// left out rather than failing the scrape.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "cannot encode the metrics");
    }
    out
}

/// The peer table, read at scrape time.
pub struct PeerCollector {
    mesh: Arc<Mesh>,
}

impl PeerCollector {
    pub fn new(mesh: Arc<Mesh>) -> Box<Self> {
        Box::new(Self { mesh })
    }
}

impl std::fmt::Debug for PeerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerCollector")
    }
}

type PeerLabels = Vec<(&'static str, String)>;
/// A per-peer counter: its name, help, and where its value comes from.
type PeerCounter = (&'static str, &'static str, fn(&PeerView) -> u64);

fn peer_labels(p: &PeerView) -> PeerLabels {
    vec![("peer", p.name.clone()), ("key", p.fingerprint.clone())]
}

impl Collector for PeerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let peers = self.mesh.views();
        let by_state: Family<Vec<(&'static str, &'static str)>, Gauge> = Family::default();
        for (state, name) in [
            (PeerState::Alive, "alive"),
            (PeerState::Suspect, "suspect"),
            (PeerState::Gone, "gone"),
        ] {
            let n = peers.iter().filter(|p| p.state == state).count();
            by_state
                .get_or_create(&vec![("state", name)])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let m = encoder.encode_descriptor(
            "nixmesh_peers",
            "Peers in the table, by state",
            None,
            by_state.metric_type(),
        )?;
        by_state.encode(m)?;

        // Summaries (protocol 4): how many peers' are whole, and the
        // fingerprints they hold together (4 to 9 bytes each in memory).
        let (whole, fingerprints) = self.mesh.summaries(|s| s.totals());
        for (name, help, value) in [
            (
                "nixmesh_summaries_complete",
                "Peers whose whole summary this agent holds",
                whole,
            ),
            (
                "nixmesh_summary_fingerprints",
                "Fingerprints held in peers' summaries, all together",
                fingerprints,
            ),
        ] {
            let gauge: Gauge = Gauge::default();
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
            let m = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(m)?;
        }

        let per_peer: [PeerCounter; 9] = [
            (
                "nixmesh_peer_bytes_fetched",
                "NAR bytes received from each peer",
                |p| p.counters.bytes_fetched,
            ),
            (
                "nixmesh_peer_bytes_served",
                "NAR bytes sent to each peer",
                |p| p.counters.bytes_served,
            ),
            (
                "nixmesh_peer_bytes_served_zstd",
                "Of the NAR bytes sent to each peer, those in chunks packed with zstd",
                |p| p.counters.served_zstd,
            ),
            (
                "nixmesh_peer_bytes_served_lz4",
                "Of the NAR bytes sent to each peer, those in chunks packed with LZ4",
                |p| p.counters.served_lz4,
            ),
            (
                "nixmesh_peer_bulk_fetches",
                "NARs or stripes of them received from each peer over bulk connections (TCP)",
                |p| p.counters.bulk_fetches,
            ),
            (
                "nixmesh_peer_bulk_connections",
                "Bulk connections (TCP) dialed to each peer",
                |p| p.counters.bulk_connections,
            ),
            (
                "nixmesh_peer_bulk_plain_connections",
                "Of the bulk connections dialed to each peer, those without TLS (open mesh)",
                |p| p.counters.bulk_plain,
            ),
            (
                "nixmesh_peer_bulk_moved_to_tls",
                "Times bulk connections to each peer were moved under TLS (for an hour) because bytes from it that came without TLS failed their check",
                |p| p.counters.bulk_moved_to_tls,
            ),
            (
                "nixmesh_peer_errors",
                "Failed or malformed exchanges with each peer",
                |p| p.counters.errors,
            ),
        ];
        for (name, help, value) in per_peer {
            let family: Family<PeerLabels, Counter> = Family::default();
            for p in &peers {
                family.get_or_create(&peer_labels(p)).inc_by(value(p));
            }
            let m = encoder.encode_descriptor(name, help, None, family.metric_type())?;
            family.encode(m)?;
        }
        Ok(())
    }
}
