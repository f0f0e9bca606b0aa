//! This host's store as the outside sees it: only the paths the share policy
//! lets out, with this host's signature added. Both the LAN HTTP endpoint and
//! the peer server serve through it, so the policy is applied in one place.
//! NARs go out checked for size only (their receivers hash them); a peer
//! that found one wrong says so (`recheck`), the copy is then hashed here,
//! and a corrupt one is no longer shared. NARs of many small files are
//! served from their kept copies (`nar_cache`); a report drops the copy.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::lock::lock;
use crate::nix::{HashPart, PathInfo, Sha256Hash};
use crate::store::db::Store;
use crate::store::nar_cache::NarCache;
use crate::store::nar_layout::NarLayouts;
use crate::store::nar_stream::{self, Check, Kept, NarStream};
use crate::store::packed_frames::PackedFrames;
use crate::store::share::SharePolicy;

/// Copies hashed at once after reports of corruption.
const CHECKS_AT_ONCE: usize = 2;
/// A path is hashed again after a report at most this often: reports cost
/// the reporter nothing and the holder a read of the whole NAR.
const RECHECK_EVERY: Duration = Duration::from_secs(600);
/// Paths remembered as recently checked, at most.
const MAX_CHECKED: usize = 4096;

pub struct SharedStore {
    store: Arc<Store>,
    policy: Arc<SharePolicy>,
    /// Paths whose copy here failed its NarHash: not shared until the
    /// agent restarts (Nix's `--repair-path` mends them).
    corrupt: Mutex<HashSet<HashPart>>,
    checked: Mutex<HashMap<HashPart, Instant>>,
    check_slots: Arc<Semaphore>,
    nar_cache: Option<Arc<NarCache>>,
    packed: Option<Arc<PackedFrames>>,
    /// Layouts of the trees served last in parts (stripes, failover).
    layouts: Arc<NarLayouts>,
}

/// What became of a report that a NAR from here was wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recheck {
    /// The copy is being hashed.
    Started,
    /// Not now: checked lately, or enough checks under way.
    Later,
    /// No such path is shared (or not with that NarHash).
    NotShared,
}

impl SharedStore {
    pub fn new(
        store: Arc<Store>,
        policy: Arc<SharePolicy>,
        nar_cache: Option<Arc<NarCache>>,
        packed: Option<Arc<PackedFrames>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            policy,
            corrupt: Mutex::new(HashSet::new()),
            checked: Mutex::new(HashMap::new()),
            check_slots: Arc::new(Semaphore::new(CHECKS_AT_ONCE)),
            nar_cache,
            packed,
            layouts: Arc::default(),
        })
    }

    /// The layouts of trees served in parts.
    pub fn layouts(&self) -> &Arc<NarLayouts> {
        &self.layouts
    }

    /// The zstd frames kept for peers (`share.packed_mib`), if any.
    pub fn packed_frames(&self) -> Option<&Arc<PackedFrames>> {
        self.packed.as_ref()
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The path's info if it exists and may leave this host. A failed lookup
    /// is logged and treated as absent: callers answer "not found".
    pub async fn info(&self, hash: HashPart) -> Option<PathInfo> {
        // Inline: one lookup is cheaper than a hop to a blocking thread.
        self.info_now(hash)
    }

    /// Which of `hashes` exist and may leave this host. A batch is up to
    /// `MAX_HAVE_BATCH` DB look-ups (and signatures): it runs on a blocking
    /// thread, never on the async workers that serve everyone else.
    pub async fn have_many(self: &Arc<Self>, hashes: Vec<HashPart>) -> Vec<bool> {
        let n = hashes.len();
        let this = self.clone();
        let found = tokio::task::spawn_blocking(move || {
            hashes
                .into_iter()
                .map(|h| this.info_now(h).is_some())
                .collect()
        });
        found.await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "a batch look-up failed; answering not found");
            vec![false; n]
        })
    }

    /// `info`, for callers that are not async.
    pub fn info_now(&self, hash: HashPart) -> Option<PathInfo> {
        if lock(&self.corrupt).contains(&hash) {
            return None;
        }
        match self.store.path_info(&hash) {
            Ok(info) => self.policy.prepare(info?),
            Err(e) => {
                tracing::warn!(error = %e, "store lookup failed; answering not found");
                None
            }
        }
    }

    /// Streams the NAR of a path `info` returned, from byte `offset` up to
    /// `end` (the caller stops reading there), checked for size only: the
    /// receiver hashes it.
    pub fn nar(&self, info: PathInfo, offset: u64, end: u64) -> NarStream {
        let kept = self.nar_cache.clone().map(|cache| Kept {
            cache,
            whole: offset == 0 && end == info.nar_size,
        });
        let layouts = Some(self.layouts.clone());
        nar_stream::spawn(self.store.clone(), kept, layouts, info, offset, Check::Size)
    }

    /// `reporter` says the NAR of `hash` it got from here did not match
    /// `nar_hash`: hashes this host's copy in the background and stops
    /// sharing it if it is corrupt.
    pub fn recheck(
        self: &Arc<Self>,
        hash: HashPart,
        nar_hash: Sha256Hash,
        reporter: &str,
    ) -> Recheck {
        let Some(info) = self
            .info_now(hash.clone())
            .filter(|i| i.nar_hash == nar_hash)
        else {
            return Recheck::NotShared;
        };
        // The kept copy may be what was wrong: the next NAR comes from the
        // store, which is checked below.
        if let Some(cache) = &self.nar_cache {
            cache.forget(&info);
        }
        if let Some(frames) = &self.packed {
            frames.forget(&info);
        }
        {
            let mut checked = lock(&self.checked);
            if checked
                .get(&hash)
                .is_some_and(|at| at.elapsed() < RECHECK_EVERY)
            {
                return Recheck::Later;
            }
            if checked.len() >= MAX_CHECKED {
                checked.retain(|_, at| at.elapsed() < RECHECK_EVERY);
            }
            if checked.len() >= MAX_CHECKED {
                return Recheck::Later;
            }
            checked.insert(hash.clone(), Instant::now());
        }
        let Ok(slot) = self.check_slots.clone().try_acquire_owned() else {
            lock(&self.checked).remove(&hash);
            return Recheck::Later;
        };
        tracing::warn!(path = %info.path, peer = reporter, "a peer says a NAR from here did not match its hash; checking the store copy");
        let this = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let path = info.path.to_string();
            // Every byte hashed, none sent: the stream ends in an error if
            // the copy is wrong.
            let mut stream = nar_stream::spawn(
                this.store.clone(),
                None,
                None,
                info.clone(),
                info.nar_size,
                Check::Hash,
            );
            let mut outcome = Ok(());
            while let Some(item) = stream.next().await {
                if let Err(e) = item {
                    outcome = Err(e);
                }
            }
            match outcome {
                Err(e @ nar_stream::NarStreamError::Corrupt { .. }) => {
                    tracing::error!(path = %path, error = %e, "the store copy is corrupt; no longer sharing it (nix-store --repair-path mends it)");
                    lock(&this.corrupt).insert(hash);
                }
                Err(e) => {
                    tracing::warn!(path = %path, error = %e, "could not check the store copy")
                }
                Ok(()) => tracing::info!(path = %path, "the store copy is intact"),
            }
        });
        Recheck::Started
    }
}
