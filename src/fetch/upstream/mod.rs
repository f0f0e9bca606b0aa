//! Upstream binary caches (cache.nixos.org, an office's own): where a path
//! comes from when no peer holds it. The agent asks every upstream at once
//! and offers Nix the first narinfo that passes the trust checks, so Nix's
//! one-after-another walk over several caches is gone too; the file itself
//! (compressed as the upstream stored it: Nix decompresses) is relayed to
//! Nix through the agent and checked against its FileSize and FileHash on
//! the way, the last bytes held back until both match.
//!
//! An upstream that fails costs its timeout once and is then left alone
//! for `upstream.skip_ms` (`breaker`), so an offline office sees no delay.
//! `cache_url`, `judge`, `breaker` and `file_check` are pure; `client` and
//! this file do the I/O.

pub mod breaker;
pub mod cache_url;
pub mod client;
pub mod file_check;
pub mod judge;
pub mod lookups;
pub mod office;
pub mod owner;
pub mod spool;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http_body_util::BodyExt;
use hyper::StatusCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use thiserror::Error;
use tokio::sync::mpsc;

pub use breaker::Breaker;
pub use cache_url::CacheUrl;
pub use client::{UpstreamClient, UpstreamError};
pub use file_check::{FileCheck, FileError};
pub use judge::UpstreamFile;
pub use lookups::{Hit, Lookup, Lookups};
pub use spool::Spool;

use spool::{Claim, Writer};
use std::sync::Arc;
use tokio_util::task::TaskTracker;

use crate::fetch::race::TrustPolicy;
use crate::lock::lock;
use crate::nix::narinfo::MAX_NARINFO_LEN;
use crate::nix::{HashPart, NarInfo};

/// How long upstream requests may take.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// To answer (a narinfo, or a file's first bytes).
    pub answer: Duration,
    /// An upstream that failed is left alone this long.
    pub skip: Duration,
    /// The longest wait for a file's next bytes, from upstream or from the
    /// agent that owns its download, before it counts as stalled.
    pub stall: Duration,
}

/// Why a file did not arrive whole.
#[derive(Debug, Error)]
pub enum RelayError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("the upstream sent nothing for {0:?}")]
    Stalled(Duration),
    #[error("reading the upstream file: {0}")]
    Body(String),
    #[error("writing the spool: {0}")]
    Spool(std::io::Error),
}

impl From<RelayError> for String {
    fn from(e: RelayError) -> String {
        e.to_string()
    }
}

/// After a spool write fails (disk full), files go around the spool this
/// long.
pub const SPOOL_PAUSE: Duration = Duration::from_secs(60);

/// What one upstream said about a path.
pub enum Answer {
    Has(Box<NarInfo>, UpstreamFile),
    NotFound,
    /// It has the path, but its narinfo is not offered to Nix (why).
    Rejected(String),
}

struct Cache {
    url: CacheUrl,
    breaker: Mutex<Breaker>,
}

/// Counters for metrics.
#[derive(Default)]
pub struct UpstreamStats {
    pub narinfo_hits: Counter,
    pub narinfo_misses: Counter,
    pub narinfo_rejected: Counter,
    pub narinfo_requests: Counter,
    pub narinfo_for_peers: Counter,
    pub narinfo_from_owner: Counter,
    pub errors: Counter,
    pub files: Counter,
    pub downloads: Counter,
    pub joins: Counter,
    pub for_peers: Counter,
    pub from_owner: Counter,
    pub file_failures: Counter,
    pub bytes: Counter,
    pub skipped: Gauge,
}

impl UpstreamStats {
    pub fn register(&self, registry: &mut Registry) {
        let counters = [
            (
                "nixmesh_upstream_narinfo_hits",
                "Narinfos an upstream cache had",
                &self.narinfo_hits,
            ),
            (
                "nixmesh_upstream_narinfo_misses",
                "Narinfos no upstream cache had",
                &self.narinfo_misses,
            ),
            (
                "nixmesh_upstream_narinfo_rejected",
                "Upstream narinfos refused by the trust checks",
                &self.narinfo_rejected,
            ),
            (
                "nixmesh_upstream_narinfo_requests",
                "Narinfo requests sent to upstream caches",
                &self.narinfo_requests,
            ),
            (
                "nixmesh_upstream_narinfo_for_peers",
                "Upstream narinfo look-ups answered for peers that asked this agent, their owner",
                &self.narinfo_for_peers,
            ),
            (
                "nixmesh_upstream_narinfo_from_owner",
                "Upstream narinfos received from the agent that owns their look-up",
                &self.narinfo_from_owner,
            ),
            (
                "nixmesh_upstream_errors",
                "Upstream requests that failed (unreachable, timed out, 5xx)",
                &self.errors,
            ),
            (
                "nixmesh_upstream_files",
                "Files from upstream caches relayed whole to Nix",
                &self.files,
            ),
            (
                "nixmesh_upstream_downloads",
                "Files downloaded whole from upstream caches",
                &self.downloads,
            ),
            (
                "nixmesh_upstream_for_peers",
                "Upstream files sent to peers that asked this agent, their owner",
                &self.for_peers,
            ),
            (
                "nixmesh_upstream_from_owner",
                "Upstream files received whole from the agent that owns their download",
                &self.from_owner,
            ),
            (
                "nixmesh_upstream_joins",
                "Requests served by a download under way or spooled (single flight)",
                &self.joins,
            ),
            (
                "nixmesh_upstream_file_failures",
                "Upstream files cut off: wrong size or hash, stalled, or failed",
                &self.file_failures,
            ),
            (
                "nixmesh_upstream_bytes",
                "Bytes received from upstream caches",
                &self.bytes,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "nixmesh_upstream_skipped",
            "Upstream caches being skipped after a failure (circuit breaker open)",
            self.skipped.clone(),
        );
    }
}

pub struct Upstreams {
    caches: Vec<Cache>,
    client: UpstreamClient,
    spool: Option<Arc<Spool>>,
    spool_paused_until: Mutex<Option<Instant>>,
    tasks: TaskTracker,
    timeout: Duration,
    skip: Duration,
    stall: Duration,
    store_dir: String,
    policy: TrustPolicy,
    lookups: Lookups,
    pub stats: UpstreamStats,
}

impl Upstreams {
    /// `spool`: where files are kept while and after they arrive, shared by
    /// every request for them (none: each request streams its own).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        caches: Vec<CacheUrl>,
        client: UpstreamClient,
        spool: Option<Arc<Spool>>,
        tasks: TaskTracker,
        timing: Timing,
        store_dir: String,
        policy: TrustPolicy,
    ) -> Self {
        let Timing {
            answer: timeout,
            skip,
            stall,
        } = timing;
        Self {
            caches: caches
                .into_iter()
                .map(|url| Cache {
                    url,
                    breaker: Mutex::new(Breaker::new(skip)),
                })
                .collect(),
            client,
            spool,
            spool_paused_until: Mutex::new(None),
            tasks,
            timeout,
            skip,
            stall,
            store_dir,
            policy,
            lookups: Lookups::default(),
            stats: UpstreamStats::default(),
        }
    }

    pub fn caches(&self) -> Vec<String> {
        self.caches.iter().map(|c| c.url.to_string()).collect()
    }

    /// How long an upstream request may take to answer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The longest wait for a file's next bytes.
    pub fn stall(&self) -> Duration {
        self.stall
    }

    /// The first narinfo for `hash` that an upstream has and that passes
    /// the checks, asking every upstream not being skipped at once; shared
    /// with everyone asking at the same moment (`lookups`).
    pub async fn narinfo(&self, hash: &HashPart) -> Option<(NarInfo, UpstreamFile)> {
        self.lookup(hash).await.found()
    }

    /// What the upstreams say about `hash`, looked up once for everyone
    /// asking at the same moment, hits remembered for a while.
    pub async fn lookup(&self, hash: &HashPart) -> Lookup {
        self.lookups.get_or_run(hash, self.ask_all(hash, &[])).await
    }

    /// `narinfo`, asking only the upstreams not in `asked` (another agent
    /// asked those already); not shared.
    pub async fn narinfo_except(
        &self,
        hash: &HashPart,
        asked: &[String],
    ) -> Option<(NarInfo, UpstreamFile)> {
        let asked: Vec<CacheUrl> = asked
            .iter()
            .filter_map(|c| CacheUrl::parse(c).ok())
            .collect();
        self.ask_all(hash, &asked).await.found()
    }

    /// Checks a narinfo another agent got from upstream `cache` as if this
    /// agent had got it: the cache must be one of this agent's (so no peer
    /// can send it anywhere else), the narinfo must parse and pass the
    /// same trust checks.
    pub fn accept(
        &self,
        hash: &HashPart,
        cache: &str,
        text: &str,
    ) -> Result<(NarInfo, UpstreamFile), String> {
        let cache = CacheUrl::parse(cache)?;
        if !self.caches.iter().any(|c| c.url == cache) {
            return Err(format!(
                "{cache} is not one of this agent's upstream caches"
            ));
        }
        let narinfo = NarInfo::parse(&self.store_dir, text).map_err(|e| e.to_string())?;
        let file = judge::judge(hash, &cache, &narinfo, &self.policy).map_err(|e| e.to_string())?;
        Ok((narinfo, file))
    }

    /// Asks every upstream not being skipped and not in `except` at once;
    /// the first answer that passes the checks wins.
    async fn ask_all(&self, hash: &HashPart, except: &[CacheUrl]) -> Lookup {
        let now = Instant::now();
        let asking: Vec<&Cache> = self
            .caches
            .iter()
            .filter(|c| !except.contains(&c.url) && lock(&c.breaker).allows(now))
            .collect();
        let mut asks: FuturesUnordered<_> = asking
            .iter()
            .map(|c| async move { (*c, self.ask(c, hash).await) })
            .collect();
        let mut found = None;
        while let Some((cache, answer)) = asks.next().await {
            match answer {
                Ok(Answer::Has(narinfo, file)) => {
                    found = Some(Hit {
                        cache: cache.url.clone(),
                        narinfo: *narinfo,
                        file,
                    });
                    break;
                }
                Ok(Answer::NotFound | Answer::Rejected(_)) => {}
                Err(e) => {
                    tracing::debug!(upstream = %cache.url, %hash, error = %e, "upstream narinfo")
                }
            }
        }
        self.update_skipped();
        match found {
            Some(hit) => {
                self.stats.narinfo_hits.inc();
                Lookup::Hit(Arc::new(hit))
            }
            None => {
                self.stats.narinfo_misses.inc();
                Lookup::Miss {
                    asked: asking.iter().map(|c| c.url.clone()).collect(),
                }
            }
        }
    }

    /// Every upstream's answer for `hash`, skipped ones too, for
    /// `nixmesh why`: (cache, answer or why none, milliseconds).
    pub async fn survey(
        &self,
        hash: &HashPart,
    ) -> Vec<(String, Result<Answer, UpstreamError>, f64)> {
        let asks: FuturesUnordered<_> = self
            .caches
            .iter()
            .map(|c| async move {
                let start = Instant::now();
                let answer = self.ask(c, hash).await;
                (
                    c.url.to_string(),
                    answer,
                    start.elapsed().as_secs_f64() * 1e3,
                )
            })
            .collect();
        asks.collect().await
    }

    async fn ask(&self, cache: &Cache, hash: &HashPart) -> Result<Answer, UpstreamError> {
        self.stats.narinfo_requests.inc();
        let answer = self
            .client
            .get_text(&cache.url.narinfo(hash), MAX_NARINFO_LEN, self.timeout)
            .await;
        let text = match answer {
            Ok(text) => {
                lock(&cache.breaker).succeeded();
                text
            }
            Err(e) => {
                self.stats.errors.inc();
                let mut breaker = lock(&cache.breaker);
                if !breaker.is_open(Instant::now()) {
                    tracing::warn!(upstream = %cache.url, error = %e, skip = ?self.skip, "upstream cache failed; skipping it for a while");
                }
                breaker.failed(Instant::now());
                return Err(e);
            }
        };
        let Some(text) = text else {
            return Ok(Answer::NotFound);
        };
        let narinfo = match NarInfo::parse(&self.store_dir, &text) {
            Ok(n) => n,
            Err(e) => {
                self.stats.narinfo_rejected.inc();
                tracing::warn!(upstream = %cache.url, %hash, error = %e, "refused a malformed upstream narinfo");
                return Ok(Answer::Rejected(e.to_string()));
            }
        };
        match judge::judge(hash, &cache.url, &narinfo, &self.policy) {
            Ok(file) => Ok(Answer::Has(Box::new(narinfo), file)),
            Err(e) => {
                self.stats.narinfo_rejected.inc();
                tracing::warn!(upstream = %cache.url, %hash, reason = %e, "refused an upstream narinfo");
                Ok(Answer::Rejected(e.to_string()))
            }
        }
    }

    /// A file from these caches failed its checks (or the download broke):
    /// leave them alone for the skip time, as if they had failed to answer.
    pub fn fail_all(&self) {
        let now = Instant::now();
        for c in &self.caches {
            lock(&c.breaker).failed(now);
        }
        self.update_skipped();
    }

    /// Whether any of these caches is being left alone now.
    pub fn skipping(&self) -> bool {
        let now = Instant::now();
        self.caches.iter().any(|c| lock(&c.breaker).is_open(now))
    }

    /// Whether `file` is one of these caches' files.
    pub fn owns(&self, file: &UpstreamFile) -> bool {
        self.caches.iter().any(|c| {
            file.url
                .strip_prefix(c.url.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
        })
    }

    fn update_skipped(&self) {
        let now = Instant::now();
        let open = self
            .caches
            .iter()
            .filter(|c| lock(&c.breaker).is_open(now))
            .count();
        self.stats.skipped.set(open as i64);
    }

    /// Streams `file` into `tx`, checked on the way: through the spool
    /// when there is room (one download, however many ask), else straight
    /// from upstream. Either way no chunk goes out before the one after it
    /// arrived, and the last only when size and hash are right; otherwise
    /// the channel gets an error instead, which cuts the response to Nix
    /// short.
    pub async fn relay<E: From<RelayError> + Send>(
        self: Arc<Self>,
        file: UpstreamFile,
        tx: mpsc::Sender<Result<Bytes, E>>,
    ) {
        let result = match self.claim(&file) {
            Some(Claim::Start(entry, writer)) => {
                let this = self.clone();
                let download = file.clone();
                self.tasks
                    .spawn(async move { this.download(&download, writer).await });
                entry.read_into(&tx, self.stall).await
            }
            Some(Claim::Existing(entry)) => {
                self.stats.joins.inc();
                entry.read_into(&tx, self.stall).await
            }
            Some(Claim::NoRoom) | None => {
                let direct = self.relay_checked(&file, &tx).await;
                if direct.is_err() {
                    self.stats.file_failures.inc();
                }
                direct
            }
        };
        match result {
            Ok(()) => {
                self.stats.files.inc();
            }
            Err(e) => {
                tracing::warn!(url = %file.url, error = %e, "upstream file cut off");
                let _ = tx.send(Err(e.into())).await;
            }
        };
    }

    /// Runs `work` as a task of the agent's.
    pub fn spawn(self: Arc<Self>, work: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(work);
    }

    fn claim(&self, file: &UpstreamFile) -> Option<Claim> {
        let spool = self.spool.as_ref()?;
        let paused = lock(&self.spool_paused_until).is_some_and(|t| Instant::now() < t);
        (!paused).then(|| spool.claim(file))
    }

    /// Downloads `file` into the spool; a wrong or failed file leaves it.
    async fn download(&self, file: &UpstreamFile, mut writer: Writer) {
        match self.download_checked(file, &mut writer).await {
            Ok(()) => {
                self.stats.downloads.inc();
                writer.done().await;
            }
            Err(e) => {
                self.stats.file_failures.inc();
                if let RelayError::Spool(io) = &e {
                    tracing::warn!(error = %io, pause = ?SPOOL_PAUSE, "cannot write the upstream spool; files go around it for a while");
                    *lock(&self.spool_paused_until) = Some(Instant::now() + SPOOL_PAUSE);
                }
                tracing::warn!(url = %file.url, error = %e, "upstream download failed");
                // Dropping the writer fails the entry: its readers stop.
            }
        }
    }

    async fn download_checked(
        &self,
        file: &UpstreamFile,
        writer: &mut Writer,
    ) -> Result<(), RelayError> {
        let resp = self.client.get(&file.url, self.timeout).await?;
        if resp.status() != StatusCode::OK {
            return Err(UpstreamError::Status(resp.status()).into());
        }
        let mut body = resp.into_body();
        let mut check = FileCheck::new(file.file_size, file.file_hash);
        while let Some(data) = next_data(&mut body, self.stall).await? {
            check.feed(&data)?;
            self.stats.bytes.inc_by(data.len() as u64);
            writer.write(&data).await.map_err(RelayError::Spool)?;
        }
        check.finish()?;
        Ok(())
    }

    async fn relay_checked<E>(
        &self,
        file: &UpstreamFile,
        tx: &mpsc::Sender<Result<Bytes, E>>,
    ) -> Result<(), RelayError> {
        let check = FileCheck::new(file.file_size, file.file_hash);
        self.resume_direct(file, check, None, tx).await
    }

    /// Streams the rest of `file` straight from upstream into `tx`, after
    /// the bytes `check` has seen (of which `held`, the last chunk, has not
    /// been passed on yet): a `Range` request from there, or, if the
    /// upstream answers with the whole file, the whole file with those
    /// bytes skipped. The same rules as `relay`: the last chunk only when
    /// size and hash are right.
    pub async fn resume_direct<E>(
        &self,
        file: &UpstreamFile,
        mut check: FileCheck,
        mut held: Option<Bytes>,
        tx: &mpsc::Sender<Result<Bytes, E>>,
    ) -> Result<(), RelayError> {
        let from = check.seen();
        let resp = self.client.get_from(&file.url, from, self.timeout).await?;
        let mut skip = match resp.status() {
            StatusCode::OK => from,
            StatusCode::PARTIAL_CONTENT if from > 0 => 0,
            s => return Err(UpstreamError::Status(s).into()),
        };
        let mut body = resp.into_body();
        while let Some(mut data) = next_data(&mut body, self.stall).await? {
            self.stats.bytes.inc_by(data.len() as u64);
            if skip > 0 {
                let n = skip.min(data.len() as u64);
                let _ = data.split_to(n as usize);
                skip -= n;
            }
            if data.is_empty() {
                continue;
            }
            check.feed(&data)?;
            if let Some(prev) = held.replace(data) {
                if tx.send(Ok(prev)).await.is_err() {
                    // Nix went away.
                    return Ok(());
                }
            }
        }
        check.finish()?;
        self.stats.downloads.inc();
        if let Some(last) = held {
            let _ = tx.send(Ok(last)).await;
        }
        Ok(())
    }
}

/// The next bytes of an upstream answer; `None` at its end. Nothing for
/// `stall` is an error.
async fn next_data(
    body: &mut hyper::body::Incoming,
    stall: Duration,
) -> Result<Option<Bytes>, RelayError> {
    loop {
        let frame = match tokio::time::timeout(stall, body.frame()).await {
            Err(_) => return Err(RelayError::Stalled(stall)),
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => return Err(RelayError::Body(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if !data.is_empty() {
                return Ok(Some(data));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::{PublicKey, SecretKey};

    use judge::tests::ZSTD as NARINFO;

    fn upstreams(trusted: Vec<PublicKey>) -> Upstreams {
        Upstreams::new(
            vec![CacheUrl::parse("http://u:8080").unwrap()],
            UpstreamClient::new(None).unwrap(),
            None,
            TaskTracker::new(),
            Timing {
                answer: Duration::from_secs(1),
                skip: Duration::from_secs(1),
                stall: Duration::from_secs(1),
            },
            "/nix/store".into(),
            TrustPolicy {
                require_sigs: true,
                trusted_keys: trusted,
            },
        )
    }

    #[tokio::test]
    async fn an_owners_narinfo_is_checked_as_if_fetched_here() {
        let key = SecretKey::generate("upstream-1").unwrap();
        let hash = HashPart::parse("0c8kkjmc5s0mvbdbrqqcbi9yzg9ly8hn").unwrap();
        let mut signed = NarInfo::parse("/nix/store", NARINFO).unwrap();
        signed.info.add_signature(&key);
        let ups = upstreams(vec![key.public()]);
        let (narinfo, file) = ups
            .accept(&hash, "http://u:8080/", &signed.render())
            .unwrap();
        assert_eq!(narinfo, signed);
        assert_eq!(
            file.url,
            "http://u:8080/nar/1w8pjwz0xn2hf6a2ar1zqf1m3jn0jwbdrp5jwaw8zy3dmw2hvkb7.nar.zst"
        );
        // A cache this agent does not use: the owner cannot send it there.
        let elsewhere = ups.accept(&hash, "http://169.254.169.254", &signed.render());
        assert!(elsewhere.unwrap_err().contains("not one of this agent's"));
        // Unsigned, for another path, or not a narinfo at all.
        assert!(ups.accept(&hash, "http://u:8080", NARINFO).is_err());
        let other = HashPart::parse("1c8kkjmc5s0mvbdbrqqcbi9yzg9ly8hn").unwrap();
        assert!(ups
            .accept(&other, "http://u:8080", &signed.render())
            .is_err());
        assert!(ups.accept(&hash, "http://u:8080", "garbage").is_err());
    }

    #[tokio::test]
    async fn a_file_belongs_to_the_cache_it_is_under_and_a_failure_skips_it() {
        let ups = upstreams(vec![]);
        let file = |url: &str| UpstreamFile {
            url: url.into(),
            compression: "xz".into(),
            file_hash: crate::nix::Sha256Hash([1; 32]),
            file_size: 1,
        };
        assert!(ups.owns(&file("http://u:8080/nar/x.nar.xz")));
        assert!(!ups.owns(&file("http://u:80800/nar/x.nar.xz")));
        assert!(!ups.owns(&file("http://v:8080/nar/x.nar.xz")));
        assert!(!ups.skipping());
        ups.fail_all();
        assert!(ups.skipping());
    }
}
