//! This host's store as the outside sees it: only the paths the share policy
//! lets out, with this host's signature added. Both the LAN HTTP endpoint and
//! the peer server serve through it, so the policy is applied in one place.

use std::sync::Arc;

use crate::nix::{HashPart, PathInfo};
use crate::store::db::Store;
use crate::store::nar_stream::{self, NarStream};
use crate::store::share::SharePolicy;

pub struct SharedStore {
    store: Arc<Store>,
    policy: Arc<SharePolicy>,
}

impl SharedStore {
    pub fn new(store: Arc<Store>, policy: Arc<SharePolicy>) -> Arc<Self> {
        Arc::new(Self { store, policy })
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
        match self.store.path_info(&hash) {
            Ok(info) => self.policy.prepare(info?),
            Err(e) => {
                tracing::warn!(error = %e, "store lookup failed; answering not found");
                None
            }
        }
    }

    /// Streams the NAR of a path `info` returned, from byte `offset`.
    pub fn nar(&self, info: PathInfo, offset: u64) -> NarStream {
        nar_stream::spawn(self.store.clone(), info, offset)
    }
}
