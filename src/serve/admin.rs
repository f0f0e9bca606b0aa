//! The localhost-only admin API, JSON over HTTP: `/peers` (the peer table)
//! and `/status` (this node). `nixmesh peers` and `nixmesh status` read it.
//! Read-only: nothing here changes the agent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::api::{Listeners, PeerView, StatusView};
use crate::mesh::node::Mesh;
use crate::mesh::peers::PeerState;
use crate::nix::HashPart;
use crate::serve::http::{self, Body};
use crate::serve::metrics;
use crate::serve::substituter::Substituter;
use crate::store::db::Store;

pub struct Admin {
    pub substituter: Option<Arc<Substituter>>,
    pub name: String,
    pub mesh_id: String,
    pub mesh: Option<Arc<Mesh>>,
    pub store: Arc<Store>,
    pub listeners: Listeners,
    pub node_key: String,
    pub fingerprint: String,
    pub started: Instant,
}

impl Admin {
    pub fn peers(&self) -> Vec<PeerView> {
        let Some(mesh) = &self.mesh else {
            return Vec::new();
        };
        mesh.views()
    }

    pub async fn status(&self) -> StatusView {
        let peers = self.peers();
        let count = |s: PeerState| peers.iter().filter(|p| p.state == s).count();
        let store = self.store.clone();
        let paths = tokio::task::spawn_blocking(move || store.path_count().ok())
            .await
            .ok()
            .flatten();
        StatusView {
            name: self.name.clone(),
            node_key: self.node_key.clone(),
            fingerprint: self.fingerprint.clone(),
            mesh_id: self.mesh_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            listeners: self.listeners.clone(),
            store_dir: self.store.store_dir().to_string(),
            store_db: self.store.location().db.display().to_string(),
            store_paths: paths,
            peers_alive: count(PeerState::Alive),
            peers_suspect: count(PeerState::Suspect),
            peers_gone: count(PeerState::Gone),
            uptime_s: self.started.elapsed().as_secs(),
        }
    }

    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        if !peer.ip().is_loopback() {
            return http::empty(StatusCode::FORBIDDEN);
        }
        if req.method() != Method::GET {
            return http::empty(StatusCode::METHOD_NOT_ALLOWED);
        }
        match req.uri().path() {
            "/peers" => json(&self.peers()),
            "/status" => json(&self.status().await),
            "/metrics" => http::text(StatusCode::OK, "text/plain; version=0.0.4", self.metrics()),
            path if path.starts_with("/why/") => {
                let Ok(hash) = HashPart::parse(&path["/why/".len()..]) else {
                    return http::empty(StatusCode::BAD_REQUEST);
                };
                match &self.substituter {
                    Some(s) => json(&s.resolver().survey(&hash).await),
                    None => http::empty(StatusCode::NOT_FOUND),
                }
            }
            _ => http::empty(StatusCode::NOT_FOUND),
        }
    }
}

impl Admin {
    fn metrics(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let mut out = String::new();
        let peers = self.peers();
        let rows = |f: fn(&PeerView) -> u64| -> Vec<(String, u64)> {
            peers
                .iter()
                .map(|p| {
                    (
                        format!("{} {}", p.name, p.fingerprint).trim().to_string(),
                        f(p),
                    )
                })
                .collect()
        };
        metrics::labelled(
            &mut out,
            "nixmesh_peer_bytes_fetched_total",
            "NAR bytes received from each peer",
            "counter",
            "peer",
            &rows(|p| p.counters.bytes_fetched),
        );
        metrics::labelled(
            &mut out,
            "nixmesh_peer_bytes_served_total",
            "NAR bytes sent to each peer",
            "counter",
            "peer",
            &rows(|p| p.counters.bytes_served),
        );
        metrics::labelled(
            &mut out,
            "nixmesh_peer_errors_total",
            "Failed or malformed exchanges with each peer",
            "counter",
            "peer",
            &rows(|p| p.counters.errors),
        );
        for (state, name) in [
            (PeerState::Alive, "alive"),
            (PeerState::Suspect, "suspect"),
            (PeerState::Gone, "gone"),
        ] {
            let n = peers.iter().filter(|p| p.state == state).count() as u64;
            metrics::gauge(
                &mut out,
                &format!("nixmesh_peers_{name}"),
                &format!("Peers now {name}"),
                n,
            );
        }
        if let Some(sub) = &self.substituter {
            let stats = &sub.resolver().stats;
            metrics::counter(
                &mut out,
                "nixmesh_narinfo_hits_total",
                "Narinfo races won by a peer",
                stats.hits.load(Relaxed),
            );
            metrics::counter(
                &mut out,
                "nixmesh_narinfo_misses_total",
                "Narinfo races no peer won",
                stats.misses.load(Relaxed),
            );
            metrics::counter(
                &mut out,
                "nixmesh_narinfo_rejected_total",
                "Peer narinfos rejected by the trust checks",
                stats.rejected.load(Relaxed),
            );
            stats.latency.render(
                "nixmesh_race_seconds",
                "Time to decide a narinfo race",
                &mut out,
            );
            let f = &sub.fetch_stats;
            metrics::counter(
                &mut out,
                "nixmesh_nar_completed_total",
                "NARs relayed to Nix and verified",
                f.completed.load(Relaxed),
            );
            metrics::counter(
                &mut out,
                "nixmesh_nar_failovers_total",
                "Times a NAR stream moved to another holder",
                f.failovers.load(Relaxed),
            );
            metrics::counter(
                &mut out,
                "nixmesh_nar_verify_failures_total",
                "NARs from the mesh that did not verify",
                f.verify_failures.load(Relaxed),
            );
            metrics::gauge(
                &mut out,
                "nixmesh_nar_streams_in_flight",
                "NAR streams being relayed now",
                f.in_flight.load(Relaxed),
            );
            let p = &sub.prefetch.stats;
            metrics::counter(
                &mut out,
                "nixmesh_prefetch_started_total",
                "Small NARs fetched ahead of Nix",
                p.started.load(Relaxed),
            );
            metrics::counter(
                &mut out,
                "nixmesh_prefetch_served_total",
                "NARs Nix got from memory, fetched ahead",
                p.served.load(Relaxed),
            );
            metrics::counter(
                &mut out,
                "nixmesh_prefetch_failed_total",
                "Fetches ahead that did not deliver a verified NAR",
                p.failed.load(Relaxed),
            );
            metrics::counter(
                &mut out,
                "nixmesh_prefetch_unused_total",
                "NARs fetched ahead that Nix never asked for in time",
                p.unused.load(Relaxed),
            );
            metrics::gauge(
                &mut out,
                "nixmesh_prefetch_held_bytes",
                "Bytes of NARs fetched ahead held in memory now",
                p.held_bytes.load(Relaxed),
            );
        }
        out
    }
}

fn json<T: Serialize>(value: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => http::text(StatusCode::OK, "application/json", body),
        Err(_) => http::empty(StatusCode::INTERNAL_SERVER_ERROR),
    }
}
