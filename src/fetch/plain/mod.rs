//! Plain HTTP binary caches on the LAN that run no agent (nix-serve,
//! harmonia, nginx over a `nix copy --to file://` directory): listed in
//! `mesh.plain_caches` or found by mDNS (`_nix-serve._tcp`). They are
//! asked in the same narinfo race as the agents, with the same trust
//! checks, and their files (compressed as they store them) are relayed to
//! Nix and checked against FileSize and FileHash, by the machinery of the
//! upstream caches (`fetch::upstream`), one `Upstreams` per plain cache.
//!
//! Before a cache is used its `/nix-cache-info` is read once: another
//! StoreDir and it is refused. One that fails, stalls or sends a file
//! that does not check out is skipped for `upstream.skip_ms`. Only GETs
//! go to them: nothing of the mesh secret or the node key.

pub mod lan;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio_util::task::TaskTracker;

use crate::api::{SurveyAnswer, SurveyRow};
use crate::fetch::race::TrustPolicy;
use crate::fetch::upstream::{
    Answer, CacheUrl, RelayError, Timing, UpstreamClient, UpstreamFile, Upstreams,
};
use crate::lock::lock;
use crate::mesh::peers::{PeerCounters, PeerSource, PeerState, PeerView};
use crate::nix::{binary_cache, HashPart, NarInfo};

/// Most plain caches kept (configured and found together); more found by
/// mDNS are ignored.
pub const MAX_PLAIN_CACHES: usize = 64;
/// A cache whose `/nix-cache-info` could not be read is tried again after
/// this long.
const RECHECK_AFTER: Duration = Duration::from_secs(30);
/// Longest `/nix-cache-info` read.
const MAX_CACHE_INFO: usize = 4096;

/// Where a plain cache came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Config,
    Mdns,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// Its `/nix-cache-info` is being read.
    Checking,
    Ready,
    /// Not used, and why (another StoreDir, an address off the LAN).
    Refused(String),
    /// Its `/nix-cache-info` could not be read; tried again later.
    Unreachable {
        since: Instant,
        why: String,
    },
}

pub struct PlainCache {
    /// The mDNS instance name, or the URL for a configured one.
    pub name: String,
    pub url: CacheUrl,
    pub origin: Origin,
    state: Mutex<State>,
    upstreams: Arc<Upstreams>,
    counters: Mutex<PeerCounters>,
}

impl PlainCache {
    fn state(&self) -> State {
        lock(&self.state).clone()
    }

    /// Being left alone for a while (it failed or sent a bad file).
    pub fn skipping(&self) -> bool {
        self.upstreams.skipping()
    }
}

/// Counters for metrics.
#[derive(Default)]
pub struct PlainStats {
    /// Narinfo look-ups a plain cache won.
    pub hits: Counter,
    /// File bytes relayed from plain caches.
    pub bytes: Counter,
}

impl PlainStats {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "nixmesh_plain_cache_hits",
            "Narinfo look-ups a plain cache on the LAN won",
            self.hits.clone(),
        );
        registry.register(
            "nixmesh_plain_cache_bytes",
            "File bytes relayed to Nix from plain caches on the LAN",
            self.bytes.clone(),
        );
    }
}

pub struct PlainCaches {
    caches: Mutex<Vec<Arc<PlainCache>>>,
    client: UpstreamClient,
    tasks: TaskTracker,
    timing: Timing,
    store_dir: String,
    policy: TrustPolicy,
    pub stats: PlainStats,
}

impl PlainCaches {
    pub fn new(
        client: UpstreamClient,
        tasks: TaskTracker,
        timing: Timing,
        store_dir: String,
        policy: TrustPolicy,
    ) -> Arc<Self> {
        Arc::new(Self {
            caches: Mutex::new(Vec::new()),
            client,
            tasks,
            timing,
            store_dir,
            policy,
            stats: PlainStats::default(),
        })
    }

    /// Adds a cache (or, by the same name, replaces its URL) and reads its
    /// `/nix-cache-info` in the background. `refused`: why it is listed
    /// but never used (an mDNS record pointing off the LAN).
    pub fn add(
        self: &Arc<Self>,
        name: &str,
        url: CacheUrl,
        origin: Origin,
        refused: Option<String>,
    ) {
        let mut caches = lock(&self.caches);
        if let Some(same) = caches.iter().find(|c| c.name == name) {
            if same.url == url && refused.is_none() {
                return;
            }
        }
        caches.retain(|c| c.name != name);
        if caches.len() >= MAX_PLAIN_CACHES {
            tracing::warn!(%name, %url, "too many plain caches; ignoring this one");
            return;
        }
        let state = match &refused {
            Some(why) => State::Refused(why.clone()),
            None => State::Checking,
        };
        let cache = Arc::new(PlainCache {
            name: name.to_string(),
            url: url.clone(),
            origin,
            state: Mutex::new(state),
            upstreams: Arc::new(Upstreams::new(
                vec![url.clone()],
                self.client.clone(),
                None,
                self.tasks.clone(),
                self.timing,
                self.store_dir.clone(),
                self.policy.clone(),
            )),
            counters: Mutex::new(PeerCounters::default()),
        });
        caches.push(cache.clone());
        drop(caches);
        match refused {
            Some(why) => tracing::warn!(%name, %url, %why, "not using a plain cache"),
            None => {
                tracing::info!(%name, %url, ?origin, "a plain cache on the LAN");
                self.tasks.spawn(self.clone().check(cache));
            }
        }
    }

    /// An mDNS cache said goodbye.
    pub fn remove(&self, name: &str) {
        lock(&self.caches).retain(|c| !(c.name == name && c.origin == Origin::Mdns));
    }

    /// Reads the cache's `/nix-cache-info`: its StoreDir must be ours.
    async fn check(self: Arc<Self>, cache: Arc<PlainCache>) {
        let url = format!("{}/nix-cache-info", cache.url);
        let answer = self
            .client
            .get_text(&url, MAX_CACHE_INFO, self.timing.answer)
            .await;
        let state = match answer {
            Ok(Some(text)) => match binary_cache::cache_info_store_dir(&text) {
                Some(dir) if dir == self.store_dir => State::Ready,
                Some(dir) => {
                    State::Refused(format!("its StoreDir is {dir}, not {}", self.store_dir))
                }
                None => State::Refused("its /nix-cache-info names no StoreDir".into()),
            },
            Ok(None) => State::Refused("it has no /nix-cache-info".into()),
            Err(e) => State::Unreachable {
                since: Instant::now(),
                why: e.to_string(),
            },
        };
        match &state {
            State::Ready => {
                tracing::info!(name = %cache.name, url = %cache.url, "plain cache ready")
            }
            State::Refused(why) => {
                tracing::warn!(name = %cache.name, url = %cache.url, %why, "not using a plain cache")
            }
            _ => {
                tracing::debug!(name = %cache.name, url = %cache.url, ?state, "plain cache unreachable")
            }
        }
        *lock(&cache.state) = state;
    }

    /// Caches to ask now; those unreachable for long enough are checked
    /// again (and asked once that succeeds).
    fn ready(self: &Arc<Self>) -> Vec<Arc<PlainCache>> {
        let caches = lock(&self.caches).clone();
        let mut ready = Vec::new();
        for c in caches {
            match c.state() {
                State::Ready if !c.upstreams.skipping() => ready.push(c),
                State::Unreachable { since, .. } if since.elapsed() >= RECHECK_AFTER => {
                    *lock(&c.state) = State::Checking;
                    self.tasks.spawn(self.clone().check(c));
                }
                _ => {}
            }
        }
        ready
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.caches).is_empty()
    }

    /// The first believable narinfo any ready plain cache has for `hash`,
    /// asking all at once. Each question runs to its own end (the
    /// `upstream.timeout_ms`) even when the race that asked is decided or
    /// gives up first: a cache that stalls is then skipped for a while,
    /// and costs the races after it nothing.
    pub async fn lookup(self: &Arc<Self>, hash: &HashPart) -> Option<(NarInfo, UpstreamFile)> {
        let ready = self.ready();
        if ready.is_empty() {
            return None;
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(ready.len());
        for cache in ready {
            let (tx, hash) = (tx.clone(), hash.clone());
            self.tasks.spawn(async move {
                lock(&cache.counters).requests_made += 1;
                let found = cache.upstreams.narinfo(&hash).await;
                let _ = tx.send((found, cache)).await;
            });
        }
        drop(tx);
        while let Some((found, cache)) = rx.recv().await {
            if let Some(found) = found {
                self.stats.hits.inc();
                tracing::debug!(path = %hash, cache = %cache.url, "a plain cache has it");
                return Some(found);
            }
        }
        None
    }

    /// Where to get `file` now: from `cache`, or, if that is being left
    /// alone, from another ready plain cache that has the same file (the
    /// same FileHash). `None`: no plain cache can give it now.
    pub async fn source_of(
        self: &Arc<Self>,
        hash: &HashPart,
        cache: Arc<PlainCache>,
        file: UpstreamFile,
    ) -> Option<(Arc<PlainCache>, UpstreamFile)> {
        if !cache.skipping() {
            return Some((cache, file));
        }
        let (_, other) = self.lookup(hash).await?;
        if other.file_hash != file.file_hash {
            return None;
        }
        let owner = self.owner_of(&other)?;
        tracing::info!(path = %hash, from = %owner.url, instead_of = %cache.url, "a plain cache failed; the same file from another");
        Some((owner, other))
    }

    /// The plain cache `file` comes from, if it is one of theirs.
    pub fn owner_of(&self, file: &UpstreamFile) -> Option<Arc<PlainCache>> {
        lock(&self.caches)
            .iter()
            .find(|c| c.upstreams.owns(file))
            .cloned()
    }

    /// Streams `file` from `cache` into `tx`, checked on the way; a file
    /// that does not check out (or breaks off) gets the cache skipped for
    /// a while.
    pub async fn relay(
        self: Arc<Self>,
        cache: Arc<PlainCache>,
        file: UpstreamFile,
        tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, RelayError>>,
    ) {
        let (inner_tx, mut inner_rx) = tokio::sync::mpsc::channel(4);
        let relay = cache.upstreams.clone().relay::<RelayError>(file, inner_tx);
        let forward = async {
            while let Some(item) = inner_rx.recv().await {
                match &item {
                    Ok(chunk) => {
                        let n = chunk.len() as u64;
                        self.stats.bytes.inc_by(n);
                        lock(&cache.counters).bytes_fetched += n;
                    }
                    Err(e) => {
                        tracing::warn!(cache = %cache.url, error = %e, "a file from a plain cache failed; skipping the cache for a while");
                        lock(&cache.counters).errors += 1;
                        cache.upstreams.fail_all();
                    }
                }
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        };
        tokio::join!(relay, forward);
    }

    /// What `nixmesh peers` shows of them.
    pub fn views(&self) -> Vec<PeerView> {
        lock(&self.caches)
            .iter()
            .map(|c| {
                let state = c.state();
                let skipping = c.upstreams.skipping();
                let (peer_state, note) = match &state {
                    State::Ready => (PeerState::Alive, None),
                    State::Checking => (PeerState::New, None),
                    State::Refused(why) => (PeerState::Gone, Some(format!("refused: {why}"))),
                    State::Unreachable { why, .. } => {
                        (PeerState::Gone, Some(format!("unreachable: {why}")))
                    }
                };
                PeerView {
                    name: c.name.clone(),
                    key: String::new(),
                    fingerprint: "plain cache".into(),
                    addrs: vec![c.url.to_string()],
                    source: match c.origin {
                        Origin::Config => PeerSource::Static,
                        Origin::Mdns => PeerSource::Mdns,
                    },
                    state: peer_state,
                    rtt_ms: None,
                    udp_payload: None,
                    udp_payload_received: None,
                    bulk_refused: false,
                    last_seen_ms_ago: None,
                    quarantined: skipping,
                    counters: lock(&c.counters).clone(),
                    summary: None,
                    plain_cache: Some(note.unwrap_or_default()),
                }
            })
            .collect()
    }

    /// Every plain cache's answer for `hash`, for `nixmesh why`.
    pub async fn survey(&self, hash: &HashPart) -> Vec<SurveyRow> {
        let caches = lock(&self.caches).clone();
        let asks: FuturesUnordered<_> = caches
            .into_iter()
            .map(|c| async move {
                // A refused cache is not contacted at all.
                if let State::Refused(why) = c.state() {
                    return vec![SurveyRow {
                        name: format!("plain cache {}", c.url),
                        fingerprint: "plain cache".into(),
                        rtt_ms: None,
                        answer_ms: 0.0,
                        answer: SurveyAnswer::Failed(format!("not used: {why}")),
                        would_win: false,
                        summary: None,
                    }];
                }
                let rows = c.upstreams.survey(hash).await;
                rows.into_iter()
                    .map(|(url, answer, ms)| SurveyRow {
                        name: format!("plain cache {url}"),
                        fingerprint: "plain cache".into(),
                        rtt_ms: None,
                        answer_ms: ms,
                        answer: match answer {
                            Ok(Answer::Has(..)) => SurveyAnswer::Has,
                            Ok(Answer::NotFound) => SurveyAnswer::NotFound,
                            Ok(Answer::Rejected(why)) => SurveyAnswer::Rejected(why),
                            Err(e) => SurveyAnswer::Failed(e.to_string()),
                        },
                        would_win: false,
                        summary: None,
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut rows: Vec<SurveyRow> = asks.collect::<Vec<_>>().await.concat();
        rows.sort_by(|a, b| a.answer_ms.total_cmp(&b.answer_ms));
        rows
    }
}
