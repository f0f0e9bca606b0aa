//! Finds who in the mesh has a path: races a narinfo query across every
//! usable peer at once, takes the first believable answer, and cancels the
//! rest. Concurrent asks for the same path share one race; a short memo
//! absorbs Nix's repeated queries and tells the NAR fetcher where to go.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use thiserror::Error;
use tokio::sync::{OnceCell, Semaphore};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::api::{SurveyAnswer, SurveyRow};
use crate::fetch::compression::Compression;
use crate::fetch::plain::PlainCaches;
use crate::fetch::race::{race_narinfo, AskPlan, NarInfoSource, TrustPolicy};
use crate::fetch::raw_stripes::RawStripes;
use crate::fetch::upstream::{Answer as UpstreamAnswer, UpstreamFile, Upstreams};
use crate::lock::lock;
use crate::mesh::client::{self, PeerError};
use crate::mesh::identity::NodeId;
use crate::mesh::node::{Mesh, MeshError};
use crate::mesh::summaries::{hedge_after, Verdict};
use crate::nix::{HashPart, NarInfo};

/// How long a found path is remembered.
pub const POSITIVE_MEMO: Duration = Duration::from_secs(30);
/// How long "nobody has it" is remembered.
pub const NEGATIVE_MEMO: Duration = Duration::from_secs(2);
/// Longest a race waits for a first usable peer while the mesh warms up.
pub const WARMUP_WAIT: Duration = Duration::from_secs(3);
/// Races running at once; more wait for a slot until their deadline.
pub const MAX_RACES: usize = 256;
/// Memo entries kept; the oldest go first.
pub const MAX_MEMO: usize = 65_536;

#[derive(Clone, Debug)]
pub struct Found {
    pub narinfo: NarInfo,
    /// Peers known to hold it, the race winner (whose narinfo this is)
    /// first.
    pub holders: Vec<NodeId>,
    /// No peer has it, an upstream cache does: this file of it.
    pub upstream: Option<UpstreamFile>,
}

/// Why a peer gave no answer.
#[derive(Debug, Error)]
pub enum AskError {
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error(transparent)]
    Peer(#[from] PeerError),
}

/// The race's peers, asked over QUIC.
struct QuicSource<'m> {
    mesh: &'m Arc<Mesh>,
    timeout: Duration,
}

impl NarInfoSource for QuicSource<'_> {
    type Error = AskError;
    fn ask<'a>(
        &'a self,
        peer: NodeId,
        hash: &'a HashPart,
    ) -> BoxFuture<'a, Result<Option<NarInfo>, AskError>> {
        Box::pin(ask(self.mesh, peer, hash, self.timeout))
    }
}

/// `node`'s narinfo for `hash`: `None` when it has no such path.
async fn ask(
    mesh: &Arc<Mesh>,
    node: NodeId,
    hash: &HashPart,
    timeout: Duration,
) -> Result<Option<NarInfo>, AskError> {
    let conn = mesh.connection(node).await?;
    mesh.count(&node, |c| c.requests_made += 1);
    Ok(client::path_info(&conn, mesh.store_dir(), hash, timeout).await?)
}

type Slot = Arc<OnceCell<Option<Found>>>;

pub struct Resolver {
    mesh: Arc<Mesh>,
    upstreams: Option<Arc<Upstreams>>,
    plain: Option<Arc<PlainCaches>>,
    policy: TrustPolicy,
    deadline: Duration,
    transfer: Transfer,
    memo: Mutex<HashMap<HashPart, (Instant, Option<Found>)>>,
    inflight: Mutex<HashMap<HashPart, Slot>>,
    slots: Semaphore,
    /// What striped NARs learnt of each holder's raw stripes, for the next.
    raw_stripes: Mutex<HashMap<NodeId, RawStripes>>,
    pub stats: RaceStats,
}

/// How NARs come from holders (`mesh.compression`, `mesh.stripe_from_mib`).
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    pub compression: Compression,
    pub stripe_from: Option<u64>,
}

/// Counters for metrics.
pub struct RaceStats {
    pub hits: Counter,
    pub misses: Counter,
    pub rejected: Counter,
    pub latency: Histogram,
    /// Narinfo requests sent to peers.
    pub asks: Counter,
    /// Misses that no peer was asked about: every summary said no.
    pub summary_misses: Counter,
}

/// Upper bounds of the race latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

impl Default for RaceStats {
    fn default() -> Self {
        Self {
            hits: Counter::default(),
            misses: Counter::default(),
            rejected: Counter::default(),
            latency: Histogram::new(LATENCY_BUCKETS),
            asks: Counter::default(),
            summary_misses: Counter::default(),
        }
    }
}

impl RaceStats {
    pub fn register(&self, registry: &mut Registry) {
        let counters = [
            (
                "nixmesh_narinfo_hits",
                "Narinfo races won by a peer",
                &self.hits,
            ),
            (
                "nixmesh_narinfo_misses",
                "Narinfo races no peer won",
                &self.misses,
            ),
            (
                "nixmesh_narinfo_rejected",
                "Peer narinfos rejected by the trust checks",
                &self.rejected,
            ),
            (
                "nixmesh_narinfo_requests",
                "Narinfo requests sent to peers",
                &self.asks,
            ),
            (
                "nixmesh_narinfo_summary_misses",
                "Narinfo races lost without a request: no peer's summary lists the path",
                &self.summary_misses,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "nixmesh_race_seconds",
            "Time to decide a narinfo race",
            self.latency.clone(),
        );
    }
}

impl Resolver {
    /// `upstreams`: where to look when no peer has a path (none: nowhere);
    /// `plain`: caches on the LAN asked beside the peers;
    /// `transfer`: how NARs are to come from holders.
    pub fn new(
        mesh: Arc<Mesh>,
        upstreams: Option<Arc<Upstreams>>,
        plain: Option<Arc<PlainCaches>>,
        policy: TrustPolicy,
        deadline: Duration,
        transfer: Transfer,
    ) -> Arc<Self> {
        Arc::new(Self {
            mesh,
            upstreams,
            plain,
            policy,
            deadline,
            transfer,
            memo: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            slots: Semaphore::new(MAX_RACES),
            raw_stripes: Mutex::new(HashMap::new()),
            stats: RaceStats::default(),
        })
    }

    pub fn mesh(&self) -> &Arc<Mesh> {
        &self.mesh
    }

    pub fn compression(&self) -> Compression {
        self.transfer.compression
    }

    /// NARs at least this big come in stripes from several holders
    /// (`None`: never).
    pub fn stripe_from(&self) -> Option<u64> {
        self.transfer.stripe_from
    }

    /// How to ask `node`'s stripes of a NAR whose level it would be asked
    /// at is `level`: from what the striped NARs before learnt of it.
    pub fn raw_stripes(&self, node: &NodeId, level: u8) -> RawStripes {
        match lock(&self.raw_stripes).get(node) {
            Some(learnt) => learnt.clone().renewed(level),
            None => RawStripes::new(level),
        }
    }

    /// Keeps what a striped NAR learnt of its holders' raw stripes, for the
    /// next; holders the mesh has forgotten are forgotten here too. Of two
    /// striped NARs at once, the one that ends last is kept.
    pub fn keep_raw_stripes(&self, learnt: HashMap<NodeId, RawStripes>) {
        let mut kept = lock(&self.raw_stripes);
        kept.extend(learnt);
        kept.retain(|n, _| self.mesh.knows(n));
    }

    /// The plain caches on the LAN, if any are configured or browsed for.
    pub fn plain(&self) -> Option<&Arc<PlainCaches>> {
        self.plain.as_ref()
    }

    pub fn upstreams(&self) -> Option<&Arc<Upstreams>> {
        self.upstreams.as_ref()
    }

    fn memo_get(&self, hash: &HashPart) -> Option<Option<Found>> {
        let memo = lock(&self.memo);
        let (at, found) = memo.get(hash)?;
        let ttl = if found.is_some() {
            POSITIVE_MEMO
        } else {
            NEGATIVE_MEMO
        };
        (at.elapsed() < ttl).then(|| found.clone())
    }

    fn memo_put(&self, hash: HashPart, found: Option<Found>) {
        let mut memo = lock(&self.memo);
        if memo.len() >= MAX_MEMO {
            let now = Instant::now();
            memo.retain(|_, (at, f)| {
                let ttl = if f.is_some() {
                    POSITIVE_MEMO
                } else {
                    NEGATIVE_MEMO
                };
                now.duration_since(*at) < ttl
            });
            if memo.len() >= MAX_MEMO {
                memo.clear();
            }
        }
        memo.insert(hash, (Instant::now(), found));
    }

    /// Forget what is known about `hash` (a holder turned out wrong).
    pub fn forget(&self, hash: &HashPart) {
        lock(&self.memo).remove(hash);
    }

    /// Who has `hash`, within the race deadline. Never an error: a failure
    /// anywhere is "not found".
    pub async fn resolve(&self, hash: &HashPart) -> Option<Found> {
        if let Some(found) = self.memo_get(hash) {
            return found;
        }
        let slot: Slot = lock(&self.inflight)
            .entry(hash.clone())
            .or_default()
            .clone();
        let found = slot
            .get_or_init(|| async {
                let found = self.race(hash).await;
                self.memo_put(hash.clone(), found.clone());
                found
            })
            .await
            .clone();
        let mut inflight = lock(&self.inflight);
        if inflight.get(hash).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
            inflight.remove(hash);
        }
        found
    }

    /// Usable peers; right after start, waits a little for the first one.
    async fn peers_to_ask(&self) -> Vec<crate::mesh::peers::Peer> {
        let until = Instant::now() + WARMUP_WAIT;
        loop {
            let peers = self.mesh.usable_peers();
            if !peers.is_empty() || !self.mesh.warming_up() || Instant::now() >= until {
                return peers;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn race(&self, hash: &HashPart) -> Option<Found> {
        let start = Instant::now();
        let peers = self.peers_to_ask().await;
        let deadline = tokio::time::Instant::now() + self.deadline;
        let _slot = tokio::time::timeout_at(deadline, self.slots.acquire())
            .await
            .ok()?
            .ok()?;
        let from_peers = self.race_peers(hash, &peers, deadline);
        let result = match self.plain.as_ref().filter(|p| !p.is_empty()) {
            None => from_peers.await,
            Some(plain) => {
                // Plain caches run in the same race: the first answer that
                // passes the checks wins, from an agent or a plain cache.
                let from_plain = async {
                    let found = tokio::time::timeout_at(deadline, plain.lookup(hash)).await;
                    found.ok().flatten().map(|(narinfo, file)| Found {
                        narinfo,
                        holders: Vec::new(),
                        upstream: Some(file),
                    })
                };
                tokio::pin!(from_peers, from_plain);
                tokio::select! {
                    found = &mut from_peers => match found {
                        Some(found) => Some(found),
                        None => from_plain.await,
                    },
                    found = &mut from_plain => match found {
                        Some(found) => Some(found),
                        None => from_peers.await,
                    },
                }
            }
        };
        self.stats.latency.observe(start.elapsed().as_secs_f64());
        if result.is_some() {
            self.stats.hits.inc();
            return result;
        }
        self.stats.misses.inc();
        tracing::debug!(path = %hash, asked = peers.len(), ms = start.elapsed().as_millis() as u64, "no peer has it");
        let upstreams = self.upstreams.as_ref()?;
        let (narinfo, file) =
            crate::fetch::upstream::office::narinfo_for_nix(&self.mesh, upstreams, hash).await?;
        tracing::debug!(path = %hash, url = %file.url, "an upstream cache has it");
        Some(Found {
            narinfo,
            holders: Vec::new(),
            upstream: Some(file),
        })
    }

    /// The agents' part of a race.
    async fn race_peers(
        &self,
        hash: &HashPart,
        peers: &[crate::mesh::peers::Peer],
        deadline: tokio::time::Instant,
    ) -> Option<Found> {
        let plan = self.ask_plan(peers, hash);
        if plan.at_once.is_empty() && plan.hedged.is_empty() && !peers.is_empty() {
            self.stats.summary_misses.inc();
        }
        let source = QuicSource {
            mesh: &self.mesh,
            timeout: self.deadline,
        };
        let outcome = race_narinfo(&source, &plan, hash, &self.policy, deadline).await;
        self.stats.asks.inc_by(outcome.asked as u64);
        // Summaries that listed the path: did their peers have it?
        for node in &outcome.said_no {
            if plan.hedged.contains(node) {
                self.mesh.summary_answer(node, false);
            }
        }
        if let Some((_, node)) = &outcome.won {
            if plan.hedged.contains(node) {
                self.mesh.summary_answer(node, true);
            }
        }
        for (peer, why) in &outcome.rejected {
            tracing::warn!(peer = %peer, path = %hash, reason = %why, "ignored a peer's narinfo");
            self.stats.rejected.inc();
        }
        outcome.won.map(|(narinfo, node)| Found {
            narinfo,
            holders: vec![node],
            upstream: None,
        })
    }

    /// Whom to ask about `hash`: peers whose summary lists it one after
    /// another (fastest first), peers without a summary all at once, and
    /// no one whose summary leaves it out.
    fn ask_plan(&self, peers: &[crate::mesh::peers::Peer], hash: &HashPart) -> AskPlan {
        let fingerprint = hash.fingerprint();
        let mut plan = AskPlan::default();
        let mut first_rtt = None;
        for p in peers {
            match self.mesh.summary_verdict(&p.node, fingerprint) {
                Verdict::MayHold => {
                    if plan.hedged.is_empty() {
                        first_rtt = p.srtt;
                    }
                    plan.hedged.push(p.node);
                }
                Verdict::Unknown => plan.at_once.push(p.node),
                Verdict::DoesNotHold => {}
            }
        }
        plan.hedge = hedge_after(first_rtt);
        plan
    }

    /// Asks every usable peer about `hash` and reports each answer, for
    /// `nixmesh why`. Does not touch the memo.
    pub async fn survey(&self, hash: &HashPart) -> Vec<SurveyRow> {
        let asks: FuturesUnordered<_> = self
            .mesh
            .usable_peers()
            .into_iter()
            .map(|peer| {
                let mesh = self.mesh.clone();
                let hash = hash.clone();
                let listed = match mesh.summary_verdict(&peer.node, hash.fingerprint()) {
                    Verdict::MayHold => Some(true),
                    Verdict::DoesNotHold => Some(false),
                    Verdict::Unknown => None,
                };
                async move {
                    let start = Instant::now();
                    let answer = match ask(&mesh, peer.node, &hash, self.deadline).await {
                        Ok(Some(info)) => {
                            match crate::fetch::race::judge(&hash, &info, &self.policy) {
                                Ok(()) => SurveyAnswer::Has,
                                Err(r) => SurveyAnswer::Rejected(r.to_string()),
                            }
                        }
                        Ok(None) => SurveyAnswer::NotFound,
                        Err(e) => SurveyAnswer::Failed(e.to_string()),
                    };
                    SurveyRow {
                        name: peer.name.clone(),
                        fingerprint: peer.node.fingerprint(),
                        rtt_ms: peer.srtt.map(|d| d.as_secs_f64() * 1e3),
                        answer_ms: start.elapsed().as_secs_f64() * 1e3,
                        answer,
                        would_win: false,
                        summary: listed,
                    }
                }
            })
            .collect();
        let mut rows: Vec<SurveyRow> = asks.collect().await;
        if let Some(plain) = &self.plain {
            rows.extend(plain.survey(hash).await);
        }
        rows.sort_by(|a, b| a.answer_ms.total_cmp(&b.answer_ms));
        // Upstreams are asked only when no peer has it: their rows come
        // after the peers', and one wins only if no peer would. Each says
        // which agent would download the path for the office.
        if let Some(upstreams) = &self.upstreams {
            let chosen = crate::fetch::upstream::office::owner_of(&self.mesh, hash);
            let via = if chosen == self.mesh.node() {
                "downloaded by this agent".to_string()
            } else {
                let name = self
                    .mesh
                    .usable_peers()
                    .into_iter()
                    .find(|p| p.node == chosen)
                    .map(|p| p.name)
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| chosen.fingerprint());
                format!("downloaded by {name} for the office")
            };
            let mut up: Vec<SurveyRow> = upstreams
                .survey(hash)
                .await
                .into_iter()
                .map(|(url, answer, ms)| SurveyRow {
                    name: format!("upstream {url}, {via}"),
                    fingerprint: chosen.fingerprint(),
                    rtt_ms: None,
                    answer_ms: ms,
                    answer: match answer {
                        Ok(UpstreamAnswer::Has(..)) => SurveyAnswer::Has,
                        Ok(UpstreamAnswer::NotFound) => SurveyAnswer::NotFound,
                        Ok(UpstreamAnswer::Rejected(why)) => SurveyAnswer::Rejected(why),
                        Err(e) => SurveyAnswer::Failed(e.to_string()),
                    },
                    would_win: false,
                    summary: None,
                })
                .collect();
            up.sort_by(|a, b| a.answer_ms.total_cmp(&b.answer_ms));
            rows.extend(up);
        }
        if let Some(first) = rows.iter_mut().find(|r| r.answer == SurveyAnswer::Has) {
            first.would_win = true;
        }
        rows
    }

    /// Other usable peers that say they have `hash`, for failover; asks
    /// all of them at once with the `Have` request.
    pub async fn more_holders(&self, hash: &HashPart, exclude: &[NodeId]) -> Vec<NodeId> {
        let fingerprint = hash.fingerprint();
        let peers: Vec<NodeId> = self
            .mesh
            .usable_peers()
            .into_iter()
            .map(|p| p.node)
            .filter(|n| !exclude.contains(n))
            .filter(|n| self.mesh.summary_verdict(n, fingerprint) != Verdict::DoesNotHold)
            .collect();
        let asks: FuturesUnordered<_> = peers
            .into_iter()
            .map(|node| {
                let mesh = self.mesh.clone();
                let hashes = vec![hash.clone()];
                async move {
                    let conn = mesh.connection(node).await.ok()?;
                    let have = client::have(&conn, hashes, self.deadline).await.ok()?;
                    have.first().copied().unwrap_or(false).then_some(node)
                }
            })
            .collect();
        let deadline = tokio::time::Instant::now() + self.deadline;
        let mut found = Vec::new();
        let mut asks = asks;
        while let Ok(Some(answer)) = tokio::time::timeout_at(deadline, asks.next()).await {
            found.extend(answer);
        }
        found
    }
}
