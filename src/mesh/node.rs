//! The mesh as this node sees it: one QUIC endpoint (serving and dialling on
//! the same UDP port), one cached connection per peer, the health checker
//! that ages the peer table and dials the peers that have no connection
//! (as `dial_plan` says), and the intake of discovery events and static
//! peers. The substituter asks it for connections to usable peers; the
//! admin API reads its table.
//!
//! A peer is alive while its connection carries traffic: QUIC's own
//! keep-alives (`transport::KEEP_ALIVE`) make every connection hear from
//! the other side about once a second, and the health checker reads the
//! connection's receive counter each `AGE_INTERVAL`, so liveness costs no
//! request of ours. A request-level ping goes over each connection once
//! when it opens (it tells the peer's name) and then every
//! `APP_PING_INTERVAL`, to find an agent whose QUIC answers but whose
//! server does not.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chunk_buffers::ChunkBuffers;
use crate::lock::lock;
use crate::mesh::bulk;
use crate::mesh::client::{self, PeerError};
use crate::mesh::dial_plan::DialPlan;
use crate::mesh::discovery::DiscoveryEvent;
use crate::mesh::identity::NodeId;
use crate::mesh::inbound::InboundGate;
use crate::mesh::nar_chunks;
use crate::mesh::nar_reader::{BulkStream, NarReader, Recycle};
use crate::mesh::peers::{LinkStats, Peer, PeerCounters, PeerSource, PeerTable, PeerView};
use crate::mesh::plain_bulk::{self, BulkEncryption};
use crate::mesh::protocol::{self, Request, Response};
use crate::mesh::server::PeerServer;
use crate::mesh::summaries::{Summaries, Verdict};
use crate::mesh::transport::{self, Admission, TlsIdentity, TransportError};
use crate::nix::{HashPart, Sha256Hash};

/// How often each connected peer is asked to answer a request.
pub const APP_PING_INTERVAL: Duration = Duration::from_secs(15);
/// How often peer states are re-evaluated and connections looked at.
pub const AGE_INTERVAL: Duration = Duration::from_millis(500);
pub const PING_TIMEOUT: Duration = Duration::from_millis(1500);
pub const DIAL_TIMEOUT: Duration = Duration::from_millis(2000);
/// Handshakes this node runs as a client at once. When a whole office
/// starts together, each agent learns of every other within a second; all
/// those handshakes at once starve each other past `DIAL_TIMEOUT`.
pub const MAX_DIALS_IN_FLIGHT: usize = 8;
/// A connection not heard from for this long (one and a half keep-alive
/// periods) gives way to a new one from the same peer.
pub const QUIET_AFTER: Duration = Duration::from_millis(1500);
/// A ping that failed is tried again this soon.
pub const APP_PING_RETRY: Duration = Duration::from_secs(2);
/// Pings in a row without an answer before the connection is given up. One
/// is not enough: a peer busy for a moment (a whole office starting at once
/// on small machines) answers late, and its connection is fine.
pub const APP_PING_TRIES: u32 = 3;
/// QUIC application close code for a connection whose peer did not answer
/// `APP_PING_TRIES` pings: the next dial starts afresh.
pub const CLOSE_UNRESPONSIVE: u32 = 0x11;

/// The request-level pings of one peer.
#[derive(Clone, Copy, Debug)]
struct AppPings {
    last: Instant,
    /// Failed in a row.
    failures: u32,
}

impl AppPings {
    fn due(&self, now: Instant) -> bool {
        let wait = if self.failures > 0 {
            APP_PING_RETRY
        } else {
            APP_PING_INTERVAL
        };
        now.saturating_duration_since(self.last) >= wait
    }
}
/// Addresses remembered as refused before the list starts over.
const MAX_REFUSALS_REMEMBERED: usize = 1024;
/// Socket buffer asked for each way: a few ms of a fast LAN's datagrams.
pub const UDP_BUFFER: usize = 8 << 20;
/// QUIC application close code for a node shutting down cleanly.
pub const CLOSE_SHUTDOWN: u32 = 0x10;

#[derive(Debug, Error)]
pub enum MeshError {
    #[error("mesh.listen: cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("peer {0} is not in the table")]
    UnknownPeer(NodeId),
    #[error("cannot reach peer {peer}: {reason}")]
    Unreachable { peer: NodeId, reason: String },
}

pub struct Mesh {
    endpoint: quinn::Endpoint,
    identity: TlsIdentity,
    admission: Admission,
    table: Arc<Mutex<PeerTable>>,
    conns: Mutex<HashMap<NodeId, quinn::Connection>>,
    /// Per connection (by stable id): datagrams received when last looked.
    heard: Mutex<HashMap<usize, u64>>,
    /// When each peer last answered (or was asked) a request-level ping.
    app_pinged: Mutex<HashMap<NodeId, AppPings>>,
    plan: Mutex<DialPlan>,
    dials: tokio::sync::Semaphore,
    pinging: Mutex<HashSet<NodeId>>,
    refused: Mutex<HashSet<std::net::IpAddr>>,
    inbound: InboundGate,
    server: Arc<PeerServer>,
    tasks: TaskTracker,
    store_dir: String,
    started: Instant,
    summaries: Mutex<Summaries>,
    /// The summary feed of each peer: the connection it reads, how to stop
    /// it and how to make it start over.
    feeds: Mutex<HashMap<NodeId, Feed>>,
    shutdown: CancellationToken,
    /// Peers whose bulk connection failed, asked on QUIC for a while.
    bulk_resting: bulk::Resting,
    /// Bulk connections under TLS kept for the next part (version 7).
    bulk_idle: Arc<bulk::Idle<BulkStream>>,
    /// Plain ones (version 8), kept apart: a kept connection is taken only
    /// where a new one would be dialled the same way now.
    plain_idle: Arc<bulk::Idle<BulkStream>>,
    /// Whether bulk connections go without TLS where the peer speaks
    /// version 8 (`plain_bulk::allowed`), both ways.
    plain_bulk: bool,
    /// Peers that refused a plain bulk connection, dialled under TLS for a
    /// while.
    plain_refused: bulk::Resting,
    /// Peers whose bytes that came in the clear failed their check,
    /// dialled under TLS for `plain_bulk::DISTRUST`.
    plain_distrusted: bulk::Resting,
    /// Where bulk connections are taken (TCP), once listening.
    bulk_addr: std::sync::OnceLock<SocketAddr>,
    /// The buffers bulk readers read chunks into, shared by all of them.
    chunk_buffers: ChunkBuffers,
}

struct Feed {
    conn: usize,
    cancel: CancellationToken,
    refresh: Arc<tokio::sync::Notify>,
}

/// Just after start, peers are still being reached; a race that finds none
/// waits up to this long for the first one instead of answering 404 (a 404
/// is cached by Nix for an hour).
pub const WARMUP: Duration = Duration::from_secs(5);

/// Who this node is on the mesh and where it listens.
pub struct MeshSetup {
    pub listen: SocketAddr,
    pub identity: TlsIdentity,
    pub admission: Admission,
    /// The store dir peers must share (`/nix/store`).
    pub store_dir: String,
    /// `mesh.bulk_encryption`.
    pub bulk_encryption: BulkEncryption,
}

impl Mesh {
    /// Binds the endpoint and starts accepting peers and checking health.
    /// Every task it starts is tracked by `tasks` and ends after `shutdown`.
    pub fn start(
        setup: MeshSetup,
        table: Arc<Mutex<PeerTable>>,
        server: Arc<PeerServer>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, MeshError> {
        let MeshSetup {
            listen,
            identity,
            admission,
            store_dir,
            bulk_encryption,
        } = setup;
        let plain_bulk = plain_bulk::allowed(bulk_encryption, &admission);
        let server_config = transport::server_config(&identity, admission.clone())?;
        let socket = bind_udp(listen).map_err(|source| MeshError::Bind {
            addr: listen,
            source,
        })?;
        let mut endpoint_config = quinn::EndpointConfig::default();
        // Datagrams as large as MTU discovery may find (`transport`).
        let _ = endpoint_config.max_udp_payload_size(transport::link_payload().max(1472));
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| MeshError::Bind {
            addr: listen,
            source,
        })?;
        let own = identity.node;
        let mesh = Arc::new(Self {
            endpoint,
            identity,
            admission,
            table,
            conns: Mutex::new(HashMap::new()),
            heard: Mutex::new(HashMap::new()),
            app_pinged: Mutex::new(HashMap::new()),
            plan: Mutex::new(DialPlan::new(own)),
            dials: tokio::sync::Semaphore::new(MAX_DIALS_IN_FLIGHT),
            pinging: Mutex::new(HashSet::new()),
            refused: Mutex::new(HashSet::new()),
            inbound: InboundGate::default(),
            server,
            tasks: tasks.clone(),
            store_dir,
            started: Instant::now(),
            summaries: Mutex::new(Summaries::new()),
            feeds: Mutex::new(HashMap::new()),
            shutdown: shutdown.clone(),
            bulk_resting: bulk::Resting::default(),
            bulk_idle: Arc::default(),
            plain_idle: Arc::default(),
            plain_bulk,
            plain_refused: bulk::Resting::default(),
            plain_distrusted: bulk::Resting::lasting(plain_bulk::DISTRUST),
            bulk_addr: std::sync::OnceLock::new(),
            chunk_buffers: nar_chunks::chunk_buffers(),
        });
        mesh.listen_bulk(&tasks, &shutdown);
        tasks.spawn(mesh.clone().accept_loop(shutdown.clone()));
        tasks.spawn(mesh.clone().health_loop(shutdown));
        Ok(mesh)
    }

    pub fn node(&self) -> NodeId {
        self.identity.node
    }

    /// Where this agent takes bulk connections (TCP), if it does.
    pub fn bulk_addr(&self) -> Option<SocketAddr> {
        self.bulk_addr.get().copied()
    }

    /// Takes bulk connections (version 5) on TCP at the QUIC endpoint's
    /// address. Without them (the port is taken on TCP) peers ask on QUIC.
    fn listen_bulk(self: &Arc<Self>, tasks: &TaskTracker, shutdown: &CancellationToken) {
        if self.admission.max_protocol < 5 {
            return;
        }
        let addr = match self.endpoint.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "no address for bulk connections");
                return;
            }
        };
        let tls = match transport::bulk_server_config(&self.identity, self.admission.clone()) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "no TLS settings for bulk connections");
                return;
            }
        };
        match bulk::bind(addr) {
            Ok(listener) => {
                if let Ok(at) = listener.local_addr() {
                    let _ = self.bulk_addr.set(at);
                }
                tasks.spawn(bulk::serve(
                    listener,
                    tls,
                    self.plain_bulk,
                    self.server.clone(),
                    tasks.clone(),
                    shutdown.clone(),
                ));
            }
            Err(e) => tracing::warn!(
                %addr,
                error = %e,
                "cannot listen for bulk connections on TCP; peers will send NARs over QUIC"
            ),
        }
    }

    /// Opens `part` of a NAR from `node` (see `client::open_nar_part`):
    /// over a bulk connection (in chunk frames at `bulk_level`, which may
    /// leave compression to the holder, from version 6 with LZ4 too) when
    /// the part is large (`len` bytes, at least `bulk::BULK_FROM`; from
    /// version 7 `bulk::KEPT_FROM` for a stripe, or where a connection is
    /// kept from the last part) and the peer speaks version 5; otherwise,
    /// or when that fails, on a stream of `conn` at `level`.
    #[allow(clippy::too_many_arguments)]
    pub async fn open_nar_part(
        &self,
        node: NodeId,
        conn: &quinn::Connection,
        hash: &HashPart,
        nar_hash: &Sha256Hash,
        part: std::ops::Range<u64>,
        len: u64,
        level: Option<u8>,
        bulk_level: u8,
        timeout: Duration,
    ) -> Result<Option<(u64, NarReader)>, PeerError> {
        let version = transport::version(conn);
        let keep = version >= 7;
        let now = Instant::now();
        // A part with an end is a stripe: more parts of the NAR follow from
        // this holder, so a kept connection pays for its handshake.
        let stripe = part.end != u64::MAX;
        let plain = self.dials_plain(&node, version, now);
        let large = len >= bulk::BULK_FROM
            || (keep && len >= bulk::KEPT_FROM && (stripe || self.idle(plain).has(&node, now)));
        if large && version >= 5 && !self.bulk_resting.resting(&node, now) {
            // From version 6 a holder that picks the codec may pick LZ4.
            let lz4 = bulk_level & nar_chunks::ADAPTIVE != 0 && version >= 6;
            let level = bulk_level
                | if lz4 { nar_chunks::LZ4 } else { 0 }
                | if keep { nar_chunks::KEEP } else { 0 };
            let req = Request::NarChunks {
                hash: hash.clone(),
                nar_hash: *nar_hash,
                offset: part.start,
                end: part.end,
                level,
            };
            match self.ask_bulk(node, conn, plain, &req, timeout).await {
                Ok((Response::NotFound, ..)) => return Ok(None),
                Ok((Response::NarFollows { nar_size }, io, clear)) => {
                    self.count(&node, |c| c.bulk_fetches += 1);
                    let recycle = keep.then(|| Recycle {
                        idle: self.idle(clear).clone(),
                        node,
                    });
                    let buffers = self.chunk_buffers.clone();
                    let reader = NarReader::bulk(io, level, recycle, buffers, clear);
                    return Ok(Some((nar_size, reader)));
                }
                // Busy, or an error it would give on QUIC too: QUIC says.
                Ok((other, ..)) => {
                    tracing::debug!(peer = %node, answer = ?other, "bulk connection answered; asking on QUIC");
                }
                Err(reason) => {
                    tracing::info!(peer = %node, %reason, "no bulk connection to peer; NARs from it go over QUIC for a while");
                    self.bulk_resting.failed(node, Instant::now());
                }
            }
        }
        client::open_nar_part(conn, hash, nar_hash, part, level, timeout).await
    }

    /// Sends `req` to `node` over a bulk connection kept from its last
    /// part, or (when there is none, or it fails before it answers) a new
    /// one: without TLS when `plain` (`dials_plain`), else, or after the
    /// peer refused that, under TLS. The answer, the connection, and
    /// whether it is plain.
    async fn ask_bulk(
        &self,
        node: NodeId,
        conn: &quinn::Connection,
        plain: bool,
        req: &Request,
        timeout: Duration,
    ) -> Result<(Response, BulkStream, bool), String> {
        let kept = self.idle(plain);
        if let Some(io) = kept.take(&node, Instant::now()) {
            match bulk::ask(io, req, timeout).await {
                Ok((answer, io)) => return Ok((answer, io, plain)),
                // The holder closed it (it restarted, or let it idle out
                // just before): dial, and drop the others kept to it,
                // which would fail too.
                Err(e) => {
                    tracing::debug!(peer = %node, error = %e, "a kept bulk connection failed");
                    kept.forget(&node);
                }
            }
        }
        let addr = conn.remote_address();
        if plain {
            let io = plain_bulk::dial(addr, &self.identity.node)
                .await
                .map_err(|e| format!("plain: {e}"))?;
            match bulk::ask(io, req, timeout).await {
                Ok((Response::Error { code, .. }, _)) if code == protocol::code::PLAIN_REFUSED => {
                    tracing::info!(peer = %node, "peer takes bulk connections under TLS only");
                    self.plain_refused.failed(node, Instant::now());
                }
                answer => {
                    self.count(&node, |c| {
                        c.bulk_connections += 1;
                        c.bulk_plain += 1;
                    });
                    let (answer, io) = answer.map_err(|e| format!("plain: {e}"))?;
                    return Ok((answer, io, true));
                }
            }
        }
        let tls = transport::bulk_client_config(&self.identity, self.admission.clone(), node)
            .map_err(|e| e.to_string())?;
        let io = bulk::dial(tls, addr).await.map_err(|e| e.to_string())?;
        self.count(&node, |c| c.bulk_connections += 1);
        let (answer, io) = bulk::ask(io, req, timeout)
            .await
            .map_err(|e| e.to_string())?;
        Ok((answer, io, false))
    }

    /// Where bulk connections kept to peers wait: the plain ones, or those
    /// under TLS.
    fn idle(&self, plain: bool) -> &Arc<bulk::Idle<BulkStream>> {
        match plain {
            true => &self.plain_idle,
            false => &self.bulk_idle,
        }
    }

    /// Whether a bulk connection to `node`, which speaks `version`, is
    /// dialled without TLS now.
    fn dials_plain(&self, node: &NodeId, version: u32, now: Instant) -> bool {
        self.plain_bulk
            && version >= plain_bulk::FROM_VERSION
            && !self.plain_refused.resting(node, now)
            && !self.plain_distrusted.resting(node, now)
    }

    /// What `node` sent failed its check (`why`). Bytes that came `clear`
    /// (on a plain bulk connection) may have been changed on the way: the
    /// peer stays in, and its bulk connections go under TLS for
    /// `plain_bulk::DISTRUST` (the plain ones kept to it are dropped).
    /// Bytes that came under TLS are the peer's own: it is left out for
    /// `period`.
    pub fn blame(&self, node: &NodeId, clear: bool, period: Duration, why: &str) {
        if !clear {
            tracing::error!(peer = %node, reason = why, "quarantining a peer");
            self.quarantine(node, period);
            return;
        }
        if self.plain_distrusted.failed(*node, Instant::now()) {
            self.count(node, |c| c.bulk_moved_to_tls += 1);
        }
        self.plain_idle.forget(node);
        tracing::warn!(peer = %node, reason = why, "bytes that came in the clear failed their check; bulk connections to the peer go under TLS for a while");
    }

    /// The server that answers this node's peers.
    pub fn server(&self) -> &Arc<PeerServer> {
        &self.server
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// What `nixmesh peers` shows: every peer in the table, now.
    pub fn views(&self) -> Vec<PeerView> {
        let now = Instant::now();
        let conns: Vec<(NodeId, quinn::Connection)> = lock(&self.conns)
            .iter()
            .map(|(node, c)| (*node, c.clone()))
            .collect();
        let payloads: HashMap<String, (u16, Option<u16>)> = conns
            .iter()
            .map(|(node, c)| {
                let stats = c.stats();
                let rx = stats.udp_rx;
                let average = (rx.datagrams > 0).then(|| (rx.bytes / rx.datagrams) as u16);
                (node.to_base64(), (stats.path.current_mtu, average))
            })
            .collect();
        let summaries = lock(&self.summaries);
        let mut views = self.with_table(|t| t.views(now, |node| summaries.view(node, now)));
        for v in &mut views {
            if let Some(&(sent, received)) = payloads.get(&v.key) {
                v.udp_payload = Some(sent);
                v.udp_payload_received = received;
            }
            v.bulk_refused = NodeId::parse(&v.key)
                .is_some_and(|node| self.bulk_resting.resting(&node, Instant::now()));
        }
        views
    }

    /// Works on the peers' summaries.
    pub fn summaries<R>(&self, f: impl FnOnce(&mut Summaries) -> R) -> R {
        f(&mut lock(&self.summaries))
    }

    /// What `node`'s summary says of the path with this fingerprint.
    pub fn summary_verdict(&self, node: &NodeId, fingerprint: u32) -> Verdict {
        lock(&self.summaries).verdict(node, fingerprint)
    }

    /// `node`'s summary listed a path it then said it does not have (or,
    /// `had`, did have).
    pub fn summary_answer(&self, node: &NodeId, had: bool) {
        if had {
            lock(&self.summaries).said_yes(node);
            return;
        }
        if lock(&self.summaries).said_no(node) {
            if let Some(feed) = lock(&self.feeds).get(node) {
                feed.refresh.notify_one();
            }
        }
    }

    /// Starts following `node`'s summary over `conn` (protocol 4), unless
    /// that is already under way.
    fn ensure_feed(self: &Arc<Self>, node: NodeId, conn: &quinn::Connection) {
        if transport::version(conn) < 4 || conn.close_reason().is_some() {
            return;
        }
        let mut feeds = lock(&self.feeds);
        if let Some(feed) = feeds.get(&node) {
            if feed.conn == conn.stable_id() && !feed.cancel.is_cancelled() {
                return;
            }
            feed.cancel.cancel();
        }
        let cancel = self.shutdown.child_token();
        let refresh = Arc::new(tokio::sync::Notify::new());
        feeds.insert(
            node,
            Feed {
                conn: conn.stable_id(),
                cancel: cancel.clone(),
                refresh: refresh.clone(),
            },
        );
        drop(feeds);
        self.tasks.spawn(crate::mesh::summary_feed::run(
            self.clone(),
            node,
            conn.clone(),
            cancel,
            refresh,
        ));
    }

    /// Leaves `node` out of races and fetches for `period`: it sent bytes
    /// that did not verify.
    pub fn quarantine(&self, node: &NodeId, period: Duration) {
        self.with_table(|t| t.quarantine(node, period, Instant::now()));
    }

    /// Adds to what is counted for `node` (requests, bytes), if it is known.
    pub fn count(&self, node: &NodeId, f: impl FnOnce(&mut PeerCounters)) {
        self.with_table(|t| t.counters_mut(node).map(f));
    }

    /// Records a NAR transfer from `node` in its link figures and in those
    /// of all peers.
    pub fn record_link(&self, node: &NodeId, f: impl Fn(&mut LinkStats)) {
        self.with_table(|t| t.record_link(node, f));
    }

    /// What NAR transfers from `node` achieved, and from all peers.
    pub fn links(&self, node: &NodeId) -> (LinkStats, LinkStats) {
        self.with_table(|t| t.links(node))
    }

    /// Whether `node` is in the peer table (alive or not).
    pub fn knows(&self, node: &NodeId) -> bool {
        self.with_table(|t| t.contains(node))
    }

    /// The peer's counters as they are now.
    pub fn peer_counters(&self, node: &NodeId) -> Option<PeerCounters> {
        self.with_table(|t| t.counters_mut(node).map(|c| c.clone()))
    }

    pub fn store_dir(&self) -> &str {
        &self.store_dir
    }

    fn with_table<R>(&self, f: impl FnOnce(&mut PeerTable) -> R) -> R {
        f(&mut lock(&self.table))
    }

    pub fn add_static_peer(&self, node: NodeId, addr: SocketAddr) {
        self.with_table(|t| t.upsert(node, "", vec![addr], PeerSource::Static, Instant::now()));
    }

    /// Feeds discovery events into the peer table until the channel closes.
    pub async fn intake(self: Arc<Self>, mut events: mpsc::Receiver<DiscoveryEvent>) {
        while let Some(event) = events.recv().await {
            match event {
                DiscoveryEvent::Found { key, name, addrs } => {
                    let node = NodeId(key);
                    let new = self.with_table(|t| {
                        t.upsert(node, &name, addrs.clone(), PeerSource::Mdns, Instant::now())
                    });
                    if new {
                        tracing::info!(peer = %node, %name, ?addrs, "discovered a peer");
                    }
                    let now = Instant::now();
                    let due = {
                        let mut plan = lock(&self.plan);
                        plan.announced(node, now);
                        plan.is_due(&node, now)
                    };
                    // Reach it now rather than at the next health round.
                    if due && !self.has_open_connection(&node) {
                        self.tasks.spawn(self.clone().ping_peer(node));
                    }
                }
                DiscoveryEvent::Lost { key } => {
                    let node = NodeId(key);
                    // An mDNS record can expire while the peer is there (its
                    // refreshes lost on a lossy LAN); a peer still talking
                    // on its connection stays. One shutting down closes it.
                    if self.heard_lately(&node) {
                        tracing::debug!(peer = %node, "mDNS record gone, but the peer is connected; keeping it");
                        continue;
                    }
                    tracing::info!(peer = %node, "peer said goodbye");
                    self.forget(&node);
                }
            }
        }
    }

    fn forget(&self, node: &NodeId) {
        if let Some(feed) = lock(&self.feeds).remove(node) {
            feed.cancel.cancel();
        }
        lock(&self.summaries).forget(node);
        self.with_table(|t| t.remove(node));
        lock(&self.conns).remove(node);
        lock(&self.plan).forget(node);
        lock(&self.app_pinged).remove(node);
    }

    fn has_open_connection(&self, node: &NodeId) -> bool {
        lock(&self.conns)
            .get(node)
            .is_some_and(|c| c.close_reason().is_none())
    }

    /// Whether the peer's connection carried traffic within `SUSPECT_AFTER`.
    fn heard_lately(&self, node: &NodeId) -> bool {
        self.has_open_connection(node) && self.heard_within(node, crate::mesh::peers::SUSPECT_AFTER)
    }

    fn heard_within(&self, node: &NodeId, within: Duration) -> bool {
        self.with_table(|t| {
            t.get(node)
                .and_then(|p| p.last_seen)
                .is_some_and(|s| s.elapsed() < within)
        })
    }

    /// Tells every peer this node is going away, and waits (briefly) for the
    /// word to go out.
    pub async fn close(&self) {
        self.endpoint.close(CLOSE_SHUTDOWN.into(), b"shutting down");
        // Let the close frames go out.
        let _ = tokio::time::timeout(Duration::from_millis(500), self.endpoint.wait_idle()).await;
    }

    async fn accept_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => return,
                i = self.endpoint.accept() => match i {
                    Some(i) => i,
                    None => return,
                },
            };
            let Some(mut admitted) = self.inbound.admit() else {
                let remote = incoming.remote_address();
                if self.first_refusal(remote.ip()) {
                    tracing::warn!(%remote, "refused a connection: too many handshakes or connections at once");
                }
                incoming.refuse();
                continue;
            };
            let this = self.clone();
            self.tasks.spawn(async move {
                let remote = incoming.remote_address();
                let handshake = incoming.await;
                admitted.handshake_done();
                let conn = match handshake {
                    Ok(c) => c,
                    Err(e) => {
                        if this.first_refusal(remote.ip()) {
                            tracing::info!(%remote, reason = %e, "refused a peer at the handshake");
                        } else {
                            tracing::debug!(%remote, reason = %e, "refused a peer at the handshake");
                        }
                        return;
                    }
                };
                let Some(node) = transport::peer_node(&conn) else {
                    conn.close(1u32.into(), b"no identity");
                    return;
                };
                // An IPv4 peer reaches the dual-stack socket as `::ffff:a.b.c.d`.
                let remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
                tracing::debug!(peer = %node, %remote, "peer connected");
                // The peer dials from its listening port: that is its address.
                let now = Instant::now();
                this.with_table(|t| {
                    t.upsert(node, "", vec![remote], PeerSource::Inbound, now);
                    t.record_heard(&node, conn.rtt(), now);
                });
                lock(&this.plan).connected(node, now);
                // A connection from another run of the peer's agent (it
                // died and came back with the same key) replaces the one
                // we hold at once, rather than wait out its idle timeout.
                // From the same run, the new one replaces ours only if ours
                // has gone quiet: it may be a dial the peer is about to give
                // up on (both ends dialled at once).
                let quiet = !this.heard_within(&node, QUIET_AFTER);
                let had_one = {
                    let mut conns = lock(&this.conns);
                    let held = conns.get(&node).filter(|c| c.close_reason().is_none());
                    let replace = held.is_none_or(|c| quiet || !transport::same_run(c, &conn));
                    let open = held.is_some();
                    if replace {
                        conns.insert(node, conn.clone());
                    }
                    open
                };
                if lock(&this.conns)
                    .get(&node)
                    .is_some_and(|c| c.stable_id() == conn.stable_id())
                {
                    this.ensure_feed(node, &conn);
                }
                if !had_one {
                    // Learn its name now (an inbound peer may not be
                    // announced to us at all).
                    this.tasks.spawn(this.clone().ping_peer(node));
                }
                this.watch_close(node, conn.clone());
                this.server.clone().serve_connection(conn, node).await;
            });
        }
    }

    /// True the first time a handshake from `ip` is refused, so a stranger
    /// retrying every second is logged once, not forever.
    fn first_refusal(&self, ip: std::net::IpAddr) -> bool {
        let mut seen = lock(&self.refused);
        if seen.len() >= MAX_REFUSALS_REMEMBERED {
            seen.clear();
        }
        seen.insert(ip)
    }

    /// A peer that closes its connection because it is shutting down is
    /// gone at once, like an mDNS goodbye.
    fn watch_close(self: &Arc<Self>, node: NodeId, conn: quinn::Connection) {
        let this = self.clone();
        self.tasks.spawn(async move {
            let reason = conn.closed().await;
            if let quinn::ConnectionError::ApplicationClosed(close) = &reason {
                if close.error_code == CLOSE_SHUTDOWN.into() {
                    tracing::info!(peer = %node, "peer shut down");
                    this.forget(&node);
                    return;
                }
            }
            lock(&this.heard).remove(&conn.stable_id());
            let mut conns = lock(&this.conns);
            if conns
                .get(&node)
                .is_some_and(|c| c.stable_id() == conn.stable_id())
            {
                conns.remove(&node);
            }
        });
    }

    /// A live connection to `node`, dialling it if needed.
    pub async fn connection(
        self: &Arc<Self>,
        node: NodeId,
    ) -> Result<quinn::Connection, MeshError> {
        let cached = lock(&self.conns).get(&node).cloned();
        if let Some(c) = cached {
            if c.close_reason().is_none() {
                return Ok(c);
            }
        }
        let peer = self
            .with_table(|t| t.get(&node).cloned())
            .ok_or(MeshError::UnknownPeer(node))?;
        lock(&self.plan).dialling(node, Instant::now());
        let dialled = match self.dials.acquire().await {
            Ok(_permit) => self.dial(&peer).await,
            Err(_) => Err(MeshError::Unreachable {
                peer: node,
                reason: "shutting down".into(),
            }),
        };
        let conn = match dialled {
            Ok(conn) => conn,
            Err(e) => {
                lock(&self.plan).failed(node, Instant::now(), jitter());
                return Err(e);
            }
        };
        lock(&self.plan).connected(node, Instant::now());
        lock(&self.conns).insert(node, conn.clone());
        self.ensure_feed(node, &conn);
        self.watch_close(node, conn.clone());
        let server = self.server.clone();
        let served = conn.clone();
        // Peers may ask us things on the connection we opened, too.
        self.tasks
            .spawn(async move { server.serve_connection(served, node).await });
        Ok(conn)
    }

    async fn dial(&self, peer: &Peer) -> Result<quinn::Connection, MeshError> {
        let config = transport::client_config(&self.identity, self.admission.clone(), peer.node)?;
        let mut last = String::from("no address");
        let mut addrs = peer.addrs.clone();
        // IPv4 first: link-local IPv6 without a scope is often unroutable.
        addrs.sort_by_key(|a| a.is_ipv6());
        for addr in addrs {
            let connecting =
                match self
                    .endpoint
                    .connect_with(config.clone(), addr, transport::SERVER_NAME)
                {
                    Ok(c) => c,
                    Err(e) => {
                        last = e.to_string();
                        continue;
                    }
                };
            match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
                Ok(Ok(conn)) => return Ok(conn),
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: no answer within {DIAL_TIMEOUT:?}"),
            }
        }
        Err(MeshError::Unreachable {
            peer: peer.node,
            reason: last,
        })
    }

    async fn ping_peer(self: Arc<Self>, node: NodeId) {
        let first = lock(&self.pinging).insert(node);
        if !first {
            return;
        }
        let conn = match self.connection(node).await {
            Ok(conn) => conn,
            Err(e) => {
                // The plan has counted it.
                tracing::debug!(peer = %node, error = %e, "dial failed");
                lock(&self.pinging).remove(&node);
                return;
            }
        };
        let result = client::ping(&conn, PING_TIMEOUT).await;
        let failures = {
            let mut pings = lock(&self.app_pinged);
            let entry = pings.entry(node).or_insert(AppPings {
                last: Instant::now(),
                failures: 0,
            });
            entry.last = Instant::now();
            entry.failures = if result.is_ok() {
                0
            } else {
                entry.failures + 1
            };
            entry.failures
        };
        match result {
            Ok((rtt, name)) => {
                self.with_table(|t| t.record_pong(&node, rtt, &name, Instant::now()));
            }
            Err(e) => {
                tracing::debug!(peer = %node, error = %e, failures, "ping failed");
                // QUIC may still answer for an agent whose server does
                // not; that connection must not keep the peer alive.
                if failures >= APP_PING_TRIES {
                    let mut conns = lock(&self.conns);
                    if conns
                        .get(&node)
                        .is_some_and(|c| c.stable_id() == conn.stable_id())
                    {
                        conns.remove(&node);
                    }
                    conn.close(CLOSE_UNRESPONSIVE.into(), b"no answer to pings");
                    lock(&self.app_pinged).remove(&node);
                }
            }
        }
        lock(&self.pinging).remove(&node);
    }

    /// Every `AGE_INTERVAL`: a peer whose connection received anything
    /// since the last look is alive; the table ages the others, so a silent
    /// peer is gone within `GONE_AFTER + AGE_INTERVAL` of its last packet.
    /// Peers without a connection are dialled when the plan says so, and
    /// connected ones pinged every `APP_PING_INTERVAL`. Kept bulk
    /// connections idle for `bulk::KEEP_IDLE` are closed.
    async fn health_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(AGE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            self.bulk_idle.sweep(now);
            self.plain_idle.sweep(now);
            let conns: Vec<(NodeId, quinn::Connection)> = lock(&self.conns)
                .iter()
                .filter(|(_, c)| c.close_reason().is_none())
                .map(|(n, c)| (*n, c.clone()))
                .collect();
            let heard: Vec<(NodeId, Duration)> = {
                let mut seen = lock(&self.heard);
                conns
                    .iter()
                    .filter_map(|(node, conn)| {
                        let received = conn.stats().udp_rx.datagrams;
                        let before = seen.insert(conn.stable_id(), received);
                        (before != Some(received)).then(|| (*node, conn.rtt()))
                    })
                    .collect()
            };
            let peers = self.with_table(|t| {
                for (node, rtt) in &heard {
                    t.record_heard(node, *rtt, now);
                }
                t.tick(now);
                t.all()
            });
            lock(&self.plan).retain(|n| peers.iter().any(|p| p.node == *n));
            // A feed whose connection gave way follows the new one.
            for (node, conn) in &conns {
                self.ensure_feed(*node, conn);
            }
            let connected: HashSet<NodeId> = conns.iter().map(|(n, _)| *n).collect();
            for p in peers {
                let due = if connected.contains(&p.node) {
                    lock(&self.app_pinged)
                        .get(&p.node)
                        .is_none_or(|pings| pings.due(now))
                } else {
                    lock(&self.plan).is_due(&p.node, now)
                };
                if due {
                    self.tasks.spawn(self.clone().ping_peer(p.node));
                }
            }
        }
    }

    /// True in the first seconds after start, while peers are being found.
    pub fn warming_up(&self) -> bool {
        self.started.elapsed() < WARMUP
    }

    /// Usable peers whose connection to this node speaks protocol
    /// version 2: the candidates to download from upstream for the office.
    pub fn peers_speaking_v2(&self) -> Vec<NodeId> {
        let usable = self.usable_peers();
        let conns = lock(&self.conns);
        usable
            .into_iter()
            .filter(|p| {
                conns
                    .get(&p.node)
                    .is_some_and(|c| c.close_reason().is_none() && transport::speaks_v2(c))
            })
            .map(|p| p.node)
            .collect()
    }

    /// Usable peers, fastest first.
    pub fn usable_peers(&self) -> Vec<Peer> {
        self.with_table(|t| t.usable(Instant::now()))
    }
}

/// A number in [0, 1) to spread retries, from the clock's low bits (no
/// need for more randomness than that).
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1_000_000) / 1_000_000.0
}

/// A UDP socket on `addr`; for `[::]` also reachable over IPv4. Its
/// buffers are enlarged: the kernel's default (about 200 KiB) overflows
/// while the agent is busy hashing, and each datagram lost there makes the
/// sender halve its rate, which costs most on links with a longer round
/// trip (Wi-Fi).
fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use rustix::net::sockopt;
    let socket = std::net::UdpSocket::bind(addr)?;
    // Past net.core.rmem_max only with CAP_NET_ADMIN; otherwise as much as
    // that limit allows.
    if sockopt::set_socket_recv_buffer_size_force(&socket, UDP_BUFFER).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(&socket, UDP_BUFFER);
    }
    if sockopt::set_socket_send_buffer_size_force(&socket, UDP_BUFFER).is_err() {
        let _ = sockopt::set_socket_send_buffer_size(&socket, UDP_BUFFER);
    }
    // The kernel reports twice what it grants (bookkeeping included).
    let received = sockopt::socket_recv_buffer_size(&socket).unwrap_or(0) / 2;
    let sent = sockopt::socket_send_buffer_size(&socket).unwrap_or(0) / 2;
    if received < UDP_BUFFER || sent < UDP_BUFFER {
        tracing::warn!(
            received,
            sent,
            wanted = UDP_BUFFER,
            "the UDP socket buffers are small; NAR streams may lose datagrams \
             and slow down (raise the net.core.rmem_max and wmem_max sysctls, \
             or run with CAP_NET_ADMIN; `nixmesh doctor` says how)"
        );
    }
    Ok(socket)
}
