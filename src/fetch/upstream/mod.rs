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

use crate::fetch::race::TrustPolicy;
use crate::lock::lock;
use crate::nix::narinfo::MAX_NARINFO_LEN;
use crate::nix::{HashPart, NarInfo};

/// Longest wait for the next bytes of a file before it counts as stalled.
pub const STALL: Duration = Duration::from_secs(30);

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
    pub errors: Counter,
    pub files: Counter,
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
                "nixmesh_upstream_errors",
                "Upstream requests that failed (unreachable, timed out, 5xx)",
                &self.errors,
            ),
            (
                "nixmesh_upstream_files",
                "Files relayed whole from upstream caches",
                &self.files,
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
    timeout: Duration,
    skip: Duration,
    store_dir: String,
    policy: TrustPolicy,
    pub stats: UpstreamStats,
}

impl Upstreams {
    pub fn new(
        caches: Vec<CacheUrl>,
        client: UpstreamClient,
        timeout: Duration,
        skip: Duration,
        store_dir: String,
        policy: TrustPolicy,
    ) -> Self {
        Self {
            caches: caches
                .into_iter()
                .map(|url| Cache {
                    url,
                    breaker: Mutex::new(Breaker::new(skip)),
                })
                .collect(),
            client,
            timeout,
            skip,
            store_dir,
            policy,
            stats: UpstreamStats::default(),
        }
    }

    pub fn caches(&self) -> Vec<String> {
        self.caches.iter().map(|c| c.url.to_string()).collect()
    }

    /// The first narinfo for `hash` that an upstream has and that passes
    /// the checks, asking every upstream not being skipped at once.
    pub async fn narinfo(&self, hash: &HashPart) -> Option<(NarInfo, UpstreamFile)> {
        let now = Instant::now();
        let mut asks: FuturesUnordered<_> = self
            .caches
            .iter()
            .filter(|c| lock(&c.breaker).allows(now))
            .map(|c| async move { (c, self.ask(c, hash).await) })
            .collect();
        let mut found = None;
        while let Some((cache, answer)) = asks.next().await {
            match answer {
                Ok(Some(hit)) => {
                    found = Some(hit);
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(upstream = %cache.url, %hash, error = %e, "upstream narinfo")
                }
            }
        }
        self.update_skipped();
        if found.is_some() {
            self.stats.narinfo_hits.inc();
        } else {
            self.stats.narinfo_misses.inc();
        }
        found
    }

    async fn ask(
        &self,
        cache: &Cache,
        hash: &HashPart,
    ) -> Result<Option<(NarInfo, UpstreamFile)>, UpstreamError> {
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
            return Ok(None);
        };
        let narinfo = match NarInfo::parse(&self.store_dir, &text) {
            Ok(n) => n,
            Err(e) => {
                self.stats.narinfo_rejected.inc();
                tracing::warn!(upstream = %cache.url, %hash, error = %e, "refused a malformed upstream narinfo");
                return Ok(None);
            }
        };
        match judge::judge(hash, &cache.url, &narinfo, &self.policy) {
            Ok(file) => Ok(Some((narinfo, file))),
            Err(e) => {
                self.stats.narinfo_rejected.inc();
                tracing::warn!(upstream = %cache.url, %hash, reason = %e, "refused an upstream narinfo");
                Ok(None)
            }
        }
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

    /// Streams `file` into `tx`, checking it on the way: every chunk is
    /// passed on only after the next one arrived (or the end did), and the
    /// last one only when size and hash are right; otherwise the channel
    /// gets an error instead, which cuts the response to Nix short.
    pub async fn relay(&self, file: &UpstreamFile, tx: mpsc::Sender<Result<Bytes, RelayError>>) {
        let result = self.relay_checked(file, &tx).await;
        match result {
            Ok(()) => {
                self.stats.files.inc();
            }
            Err(e) => {
                self.stats.file_failures.inc();
                tracing::warn!(url = %file.url, error = %e, "upstream file cut off");
                let _ = tx.send(Err(e)).await;
            }
        };
    }

    async fn relay_checked(
        &self,
        file: &UpstreamFile,
        tx: &mpsc::Sender<Result<Bytes, RelayError>>,
    ) -> Result<(), RelayError> {
        let resp = self.client.get(&file.url, self.timeout).await?;
        if resp.status() != StatusCode::OK {
            return Err(UpstreamError::Status(resp.status()).into());
        }
        let mut body = resp.into_body();
        let mut check = FileCheck::new(file.file_size, file.file_hash);
        let mut held: Option<Bytes> = None;
        loop {
            let frame = match tokio::time::timeout(STALL, body.frame()).await {
                Err(_) => return Err(RelayError::Stalled(STALL)),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(RelayError::Body(e.to_string())),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            check.feed(&data)?;
            self.stats.bytes.inc_by(data.len() as u64);
            if let Some(prev) = held.replace(data) {
                if tx.send(Ok(prev)).await.is_err() {
                    // Nix went away.
                    return Ok(());
                }
            }
        }
        check.finish()?;
        if let Some(last) = held {
            let _ = tx.send(Ok(last)).await;
        }
        Ok(())
    }
}
