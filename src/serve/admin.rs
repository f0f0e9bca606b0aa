//! The localhost-only admin API, JSON over HTTP: `/peers` (the peer table)
//! and `/status` (this node). `nixmesh peers` and `nixmesh status` read it.
//! Read-only: nothing here changes the agent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use prometheus_client::registry::Registry;

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
    /// Everything `/metrics` shows.
    pub metrics: Registry,
}

impl Admin {
    /// The agents in the peer table, then the plain caches.
    pub fn peers(&self) -> Vec<PeerView> {
        let Some(mesh) = &self.mesh else {
            return Vec::new();
        };
        let mut views = mesh.views();
        let plain = self.substituter.as_ref().and_then(|s| s.resolver().plain());
        if let Some(plain) = plain {
            views.extend(plain.views());
        }
        views
    }

    pub async fn status(&self) -> StatusView {
        let mut peers = self.peers();
        peers.retain(|p| p.plain_cache.is_none());
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
            "/metrics" => http::text(
                StatusCode::OK,
                metrics::CONTENT_TYPE,
                metrics::render(&self.metrics),
            ),
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

fn json<T: Serialize>(value: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => http::text(StatusCode::OK, "application/json", body),
        Err(_) => http::empty(StatusCode::INTERNAL_SERVER_ERROR),
    }
}
