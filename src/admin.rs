//! The localhost-only admin API, JSON over HTTP: `/peers` (the peer table)
//! and `/status` (this node). `nixmesh peers` and `nixmesh status` read it.
//! Read-only: nothing here changes the agent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::http::{self, Body};
use crate::mesh::Mesh;
use crate::peers::{PeerState, PeerView};
use crate::store::Store;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Listeners {
    pub quic: Option<String>,
    pub substituter: Option<String>,
    pub http_cache: Option<String>,
    pub admin: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatusView {
    pub name: String,
    pub node_key: String,
    pub fingerprint: String,
    pub mesh_id: String,
    pub version: String,
    pub listeners: Listeners,
    pub store_dir: String,
    pub store_db: String,
    pub store_paths: Option<u64>,
    pub peers_alive: usize,
    pub peers_suspect: usize,
    pub peers_gone: usize,
    pub uptime_s: u64,
}

pub struct Admin {
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
        mesh.table()
            .lock()
            .map(|t| t.views(Instant::now()))
            .unwrap_or_default()
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
