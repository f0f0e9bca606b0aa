//! Turns a `Config` into running services and runs them until shutdown. The
//! only place that knows every part; each part knows only what it is given.

pub mod activation;
mod frame_filler;
mod served;

use std::sync::{Arc, Mutex};

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use prometheus_client::registry::Registry;

use crate::api::Listeners;
use crate::config::keys;
use crate::config::settings::{
    allowed_peers, mesh_secret, node_name, share_policy, store_location, trust_policy,
    upstream_caches, SettingsError,
};
use crate::config::Config;
use crate::fetch::plain::lan::host_networks;
use crate::fetch::plain::{Origin, PlainCaches};
use crate::fetch::resolver::{Resolver, Transfer};
use crate::fetch::upstream::office::ForPeers;
use crate::fetch::upstream::{Spool, UpstreamClient, Upstreams};
use crate::mesh::discovery::{self, Announcement, CacheEvent, DiscoveryConfig, DiscoveryError};
use crate::mesh::identity::NodeId;
use crate::mesh::node::{Mesh, MeshError, MeshSetup};
use crate::mesh::peers::PeerTable;
use crate::mesh::server::PeerServer;
use crate::mesh::transport::{Admission, TlsIdentity, TransportError};
use crate::serve::admin::Admin;
use crate::serve::http;
use crate::serve::http_cache::HttpCache;
use crate::serve::metrics::PeerCollector;
use crate::serve::substituter::Substituter;
use crate::store::catalog_watch::SharedCatalog;
use crate::store::db::{Store, StoreError};
use crate::store::nar_cache::NarCache;
use crate::store::packed_frames::PackedFrames;
use crate::store::shared::SharedStore;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("mesh: {0}")]
    Mesh(#[from] MeshError),
    #[error("mesh: {0}")]
    Transport(#[from] TransportError),
    #[error("mesh.mdns: {0}")]
    Discovery(#[from] DiscoveryError),
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: String,
        source: std::io::Error,
    },
}

/// The listener for `key`: inherited from the service manager when it
/// passed one under `name`, else bound to `addr`.
async fn listen(
    inherited: &mut std::collections::HashMap<String, std::os::fd::OwnedFd>,
    name: &str,
    key: &'static str,
    addr: std::net::SocketAddr,
) -> Result<TcpListener, AgentError> {
    if let Some(fd) = inherited.remove(name) {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let listener = activation::tcp_listener(fd).map_err(|source| AgentError::Bind {
            key,
            addr: format!("inherited fd {raw}"),
            source,
        })?;
        tracing::info!(%name, fd = raw, "using a socket passed by the service manager");
        return Ok(listener);
    }
    bind(key, addr).await
}

async fn bind(key: &'static str, addr: std::net::SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Bind {
            key,
            addr: addr.to_string(),
            source,
        })
}

/// What a directory of `mib` MiB (`key` in the config) under the state dir
/// holds, opened by `open`: none for 0, and none (with a warning) if the
/// directory cannot be used, since these are only there to save work.
fn disk_budget<T>(
    key: &str,
    mib: u64,
    dir: std::path::PathBuf,
    open: impl FnOnce(std::path::PathBuf, u64) -> std::io::Result<T>,
) -> Option<T> {
    if mib == 0 {
        return None;
    }
    match open(dir.clone(), mib << 20) {
        Ok(opened) => Some(opened),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "{key}: cannot use the directory; going without");
            None
        }
    }
}

/// Raises the soft limit on open files to the hard one. Connections (up to
/// 1024 per HTTP listener), QUIC streams and NAR encodes (each holding up to
/// 9 directory descriptors) all need descriptors, and the usual soft limit
/// of 1024 is below what they may add up to.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::debug!(limit = ?limit.maximum, "raised the open file limit"),
        Err(e) => {
            tracing::warn!(error = %e, soft = ?limit.current, "could not raise the open file limit")
        }
    }
}

/// Runs the agent until `shutdown` fires. `inherited` holds listening
/// sockets passed by the service manager (see `activation`).
pub async fn run(
    config: Config,
    mut inherited: std::collections::HashMap<String, std::os::fd::OwnedFd>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    raise_open_file_limit();
    let store = Store::open(store_location(&config))?;
    let policy = Arc::new(share_policy(&config)?);
    tracing::info!(
        store = %config.store.store_dir,
        db = %store.location().db.display(),
        trusted_keys = policy.trusted_keys.len(),
        signing = policy.signing_key.is_some(),
        "store opened"
    );
    // Not fatal: every NAR is then encoded from the store.
    let nar_cache = disk_budget(
        "share.nar_cache_mib",
        config.share.nar_cache_mib,
        config.state_dir.join("nar-cache"),
        NarCache::open,
    );
    let packed = disk_budget(
        "share.packed_mib",
        config.share.packed_mib,
        config.state_dir.join("packed"),
        PackedFrames::open,
    );
    let shared = SharedStore::new(
        store.clone(),
        policy.clone(),
        nar_cache.clone(),
        packed.clone(),
    );
    // Kept frames a serve to a peer did not pack, packed while idle. Not
    // fatal.
    let frames_for_peers = packed.clone().filter(|_| config.mesh.enable);
    let filler = frames_for_peers.and_then(|frames| {
        frame_filler::FrameFiller::start(shared.clone(), frames, shutdown.clone())
            .map_err(|e| tracing::warn!(error = %e, "cannot start the frame filler; serves keep only the frames they pack"))
            .ok()
            .map(Arc::new)
    });
    // The listeners, drained first at shutdown; then everything else.
    let mut tasks = tokio::task::JoinSet::new();
    let detached = TaskTracker::new();
    let node_key =
        keys::load_or_create_node_key(&config.state_dir).map_err(|source| SettingsError::Key {
            key: "state_dir",
            source,
        })?;
    let node = NodeId(node_key.public().bytes());
    let name = node_name(&config);
    let secret = mesh_secret(&config)?;
    let mesh_id = secret.mesh_id();
    let mut discovery = None;
    // Plain caches announced by mDNS, until the substituter takes them.
    let mut announced_caches = None;
    let mesh = if config.mesh.enable {
        let identity = TlsIdentity::new(&node_key, &secret)?;
        let admission = Admission {
            mesh: secret.clone(),
            allowed: allowed_peers(&config),
            max_protocol: config.mesh.max_protocol,
        };
        let table = Arc::new(Mutex::new(PeerTable::new()));
        // Peers of protocol 4 subscribe to what this host shares.
        let catalog = (config.mesh.max_protocol >= 4).then(|| {
            SharedCatalog::start(store.clone(), policy.clone(), &detached, shutdown.clone())
        });
        let server = PeerServer::new(
            name.clone(),
            Arc::new(served::Served {
                shared: shared.clone(),
                catalog,
                filler: filler.clone(),
            }),
            table.clone(),
            detached.clone(),
        );
        let setup = MeshSetup {
            listen: config.mesh.listen,
            identity,
            admission,
            store_dir: config.store.store_dir.clone(),
            bulk_encryption: config.mesh.bulk_encryption,
        };
        let mesh = Mesh::start(setup, table, server, detached.clone(), shutdown.clone())?;
        for p in &config.mesh.static_peers {
            mesh.add_static_peer(p.key.node(), p.address);
        }
        let port = mesh
            .local_addr()
            .map_or(config.mesh.listen.port(), |a| a.port());
        tracing::info!(node = %node, %name, mesh = %mesh_id, port, "mesh listening (QUIC)");
        if config.mesh.mdns {
            let (tx, rx) = tokio::sync::mpsc::channel(256);
            let own = Announcement {
                version: discovery::PROTOCOL_VERSION,
                key: node.0,
                quic_port: port,
                mesh_id: mesh_id.clone(),
                name: name.clone(),
            };
            let caches = if config.mesh.browse_nix_serve && config.substituter.enable {
                let (tx, rx) = tokio::sync::mpsc::channel(64);
                announced_caches = Some(rx);
                Some(tx)
            } else {
                None
            };
            let disc_config = DiscoveryConfig {
                interfaces: config.mesh.interfaces.clone(),
                ipv6: config.mesh.ipv6,
                caches,
                ..DiscoveryConfig::default()
            };
            discovery = Some(discovery::start(own, disc_config, tx, shutdown.clone())?);
            detached.spawn(mesh.clone().intake(rx));
        }
        Some(mesh)
    } else {
        None
    };
    if config.http_cache.enable {
        let listener = listen(
            &mut inherited,
            "http_cache",
            "http_cache.listen",
            config.http_cache.listen,
        )
        .await?;
        tracing::info!(addr = %config.http_cache.listen, "serving this store as an HTTP binary cache");
        let cache = HttpCache::new(shared.clone(), config.http_cache.priority);
        let token = shutdown.clone();
        tasks.spawn(http::serve(
            listener,
            move |req, _peer| cache.clone().handle(req),
            token,
        ));
    }
    let mut substituter = None;
    if let (true, Some(mesh)) = (config.substituter.enable, &mesh) {
        let policy = trust_policy(&config)?;
        let deadline = std::time::Duration::from_millis(config.substituter.race_timeout_ms);
        let caches = upstream_caches(&config);
        let upstreams = if caches.is_empty() {
            None
        } else {
            let client = UpstreamClient::new(config.upstream.ca_file.as_deref())
                .map_err(SettingsError::from)?;
            // Not fatal: files then stream past the spool.
            let spool = disk_budget(
                "upstream.spool_mib",
                config.upstream.spool_mib,
                config.state_dir.join("spool"),
                Spool::new,
            );
            tracing::info!(caches = ?caches.iter().map(|c| c.to_string()).collect::<Vec<_>>(), "pulling what no peer has from upstream");
            Some(Arc::new(Upstreams::new(
                caches,
                client,
                spool,
                detached.clone(),
                upstream_timing(&config),
                config.store.store_dir.clone(),
                policy.clone(),
            )))
        };
        let pulls = upstreams.is_some();
        let plain = if config.mesh.plain_caches.is_empty() && announced_caches.is_none() {
            None
        } else {
            let client = UpstreamClient::new(config.upstream.ca_file.as_deref())
                .map_err(SettingsError::from)?;
            let plain = PlainCaches::new(
                client,
                detached.clone(),
                upstream_timing(&config),
                config.store.store_dir.clone(),
                policy.clone(),
            );
            for url in &config.mesh.plain_caches {
                // Checked when the config was parsed.
                if let Ok(cache) = crate::fetch::upstream::CacheUrl::parse(url) {
                    plain.add(url, cache, Origin::Config, None);
                }
            }
            if let Some(rx) = announced_caches.take() {
                detached.spawn(follow_announced_caches(plain.clone(), rx, shutdown.clone()));
            }
            Some(plain)
        };
        let resolver = Resolver::new(
            mesh.clone(),
            upstreams,
            plain,
            policy,
            deadline,
            Transfer {
                compression: config.mesh.compression,
                stripe_from: (config.mesh.stripe_from_mib > 0)
                    .then_some(config.mesh.stripe_from_mib << 20),
            },
        );
        if pulls {
            // Peers may ask this agent for the upstream files it owns.
            mesh.server().serve_upstream(ForPeers::new(&resolver));
        }
        let sub = Substituter::new(
            resolver,
            config.store.store_dir.clone(),
            config.substituter.priority,
            config.substituter.prefetch_mib << 20,
            detached.clone(),
            shutdown.clone(),
        );
        let listener = listen(
            &mut inherited,
            "substituter",
            "substituter.listen",
            config.substituter.listen,
        )
        .await?;
        tracing::info!(addr = %config.substituter.listen, "substituter for Nix listening");
        let handler = sub.clone();
        tasks.spawn(http::serve(
            listener,
            move |req, _peer| handler.clone().handle(req),
            shutdown.clone(),
        ));
        substituter = Some(sub);
    }
    let listeners = Listeners {
        quic: mesh
            .as_ref()
            .and_then(|m| m.local_addr())
            .map(|a| a.to_string()),
        bulk: mesh
            .as_ref()
            .and_then(|m| m.bulk_addr())
            .map(|a| a.to_string()),
        substituter: substituter
            .is_some()
            .then(|| config.substituter.listen.to_string()),
        http_cache: config
            .http_cache
            .enable
            .then(|| config.http_cache.listen.to_string()),
        admin: config.admin.listen.to_string(),
    };
    let mut metrics = Registry::default();
    if let Some(cache) = &nar_cache {
        cache
            .stats
            .register(&mut metrics, crate::store::nar_cache::METRICS);
    }
    if let Some(frames) = &packed {
        frames
            .stats
            .register(&mut metrics, crate::store::packed_frames::METRICS);
    }
    if let Some(filler) = &filler {
        filler.stats().register(&mut metrics);
    }
    if let Some(sub) = &substituter {
        sub.resolver().stats.register(&mut metrics);
        sub.fetch_stats.register(&mut metrics);
        sub.prefetch.stats.register(&mut metrics);
        if let Some(up) = sub.resolver().upstreams() {
            up.stats.register(&mut metrics);
        }
        if let Some(plain) = sub.resolver().plain() {
            plain.stats.register(&mut metrics);
        }
    }
    if let Some(mesh) = &mesh {
        metrics.register_collector(PeerCollector::new(mesh.clone()));
    }
    let admin = Arc::new(Admin {
        substituter: substituter.clone(),
        name,
        mesh_id,
        mesh: mesh.clone(),
        store: store.clone(),
        listeners,
        node_key: node_key.public().to_nix_string(),
        fingerprint: node.fingerprint(),
        started: std::time::Instant::now(),
        metrics,
    });
    let listener = listen(&mut inherited, "admin", "admin.listen", config.admin.listen).await?;
    tasks.spawn(http::serve(
        listener,
        move |req, peer| admin.clone().handle(req, peer),
        shutdown.clone(),
    ));

    shutdown.cancelled().await;
    // Listeners stop accepting at once (new clients wait in the socket's
    // queue for the next agent); requests in flight finish while the mesh
    // is still up, then peers are told goodbye.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!("requests still running after {DRAIN_TIMEOUT:?}; stopping anyway");
    }
    if let Some(d) = discovery {
        d.stopped().await;
    }
    if let Some(m) = &mesh {
        m.close().await;
    }
    if let Some(filler) = &filler {
        if !filler.stopped(DRAIN_TIMEOUT).await {
            tracing::warn!("the frame filler still runs after {DRAIN_TIMEOUT:?}; stopping anyway");
        }
    }
    // Relays, fetches ahead, peer streams and health checks end once the
    // mesh is closed; say so if some do not.
    detached.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, detached.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = detached.len(),
            "tasks still running after {DRAIN_TIMEOUT:?}; stopping anyway"
        );
    } else {
        tracing::info!("every task has ended");
    }
    Ok(())
}

fn upstream_timing(config: &Config) -> crate::fetch::upstream::Timing {
    crate::fetch::upstream::Timing {
        answer: std::time::Duration::from_millis(config.upstream.timeout_ms),
        skip: std::time::Duration::from_millis(config.upstream.skip_ms),
        stall: std::time::Duration::from_millis(config.upstream.stall_ms),
    }
}

/// Adds the plain caches mDNS announces (at an address on this host's
/// networks; others are listed as refused) and drops those that leave.
async fn follow_announced_caches(
    plain: Arc<PlainCaches>,
    mut events: tokio::sync::mpsc::Receiver<CacheEvent>,
    shutdown: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        match event {
            CacheEvent::Found { name, addrs } => {
                match crate::fetch::plain::lan::cache_url(&addrs, &host_networks()) {
                    Ok(url) => plain.add(&name, url, Origin::Mdns, None),
                    Err(why) => {
                        // Listed, never used: visible in `nixmesh peers`,
                        // with where the record pointed.
                        let pointed = addrs
                            .first()
                            .map_or("http://unannounced.invalid".to_string(), |a| {
                                format!("http://{a}")
                            });
                        if let Ok(url) = crate::fetch::upstream::CacheUrl::parse(&pointed) {
                            plain.add(&name, url, Origin::Mdns, Some(why));
                        }
                    }
                }
            }
            CacheEvent::Lost { name } => plain.remove(&name),
        }
    }
}

/// How long a stopping agent lets requests in flight finish.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
