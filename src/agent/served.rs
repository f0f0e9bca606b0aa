//! Where the two flows meet: this host's shared store (`store::shared`) as
//! the peer server (`mesh::server`) asks for it. Only the agent knows both
//! sides.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt};

use crate::agent::frame_filler::FrameFiller;
use crate::mesh::server::{FellBehind, NarFault, ServedPaths, SummaryChange, SummaryFeed};
use crate::nix::{HashPart, PathInfo, Sha256Hash};
use crate::store::catalog_watch::SharedCatalog;
use crate::store::nar_stream::NarStreamError;
use crate::store::packed_frames::{FramesKey, Put};
use crate::store::shared::SharedStore;

// A kept frame's slot holds one chunk as the peer server cuts them.
const _: () = assert!(crate::store::packed_frames::SLOT_PAYLOAD == crate::mesh::nar_chunks::CHUNK);

/// The shared store, the catalog of it that peers subscribe to (none when
/// `mesh.summaries` is off), and what packs kept frames while idle (none
/// without kept frames).
pub struct Served {
    pub shared: Arc<SharedStore>,
    pub catalog: Option<Arc<SharedCatalog>>,
    pub filler: Option<Arc<FrameFiller>>,
}

impl ServedPaths for Served {
    fn info(&self, hash: HashPart) -> Option<PathInfo> {
        self.shared.info_now(hash)
    }

    fn have_many(self: Arc<Self>, hashes: Vec<HashPart>) -> BoxFuture<'static, Vec<bool>> {
        Box::pin(async move { self.shared.have_many(hashes).await })
    }

    fn nar(
        &self,
        info: PathInfo,
        offset: u64,
        end: u64,
    ) -> BoxStream<'static, Result<Bytes, NarFault>> {
        let rx = self.shared.nar(info, offset, end).into_receiver();
        // The filler travels with the stream: no clone per chunk.
        stream::unfold((rx, self.filler.clone()), |(mut rx, filler)| async move {
            let item = rx.recv().await?.map_err(|e| match e {
                NarStreamError::Corrupt { .. } => NarFault::Corrupt,
                _ => NarFault::Unreadable,
            });
            if let Some(f) = &filler {
                f.busy();
            }
            Some((item, (rx, filler)))
        })
        .boxed()
    }

    fn packed_frame(
        &self,
        info: &PathInfo,
        level: u8,
        slot: u64,
        raw: &[Bytes],
        out: &mut Vec<u8>,
    ) -> bool {
        if let Some(f) = &self.filler {
            f.busy();
        }
        match (self.shared.packed_frames(), FramesKey::of(info, level)) {
            (Some(frames), Some(key)) => frames.get(&key, slot, raw, out),
            _ => false,
        }
    }

    fn packed_frame_sent(&self) {
        if let Some(frames) = self.shared.packed_frames() {
            frames.sent();
        }
    }

    fn keep_packed(&self, info: &PathInfo, level: u8, slot: u64, raw: &[u8], zstd: &[u8]) -> bool {
        match (self.shared.packed_frames(), FramesKey::of(info, level)) {
            (Some(frames), Some(key)) => {
                matches!(frames.put(&key, slot, raw, zstd), Put::Kept | Put::Had)
            }
            _ => false,
        }
    }

    fn fill_packed(&self, info: &PathInfo, level: u8) {
        if let Some(f) = &self.filler {
            f.ask(info, level);
        }
    }

    fn bad_nar(&self, hash: HashPart, nar_hash: Sha256Hash, reporter: &str) {
        let outcome = self.shared.recheck(hash.clone(), nar_hash, reporter);
        tracing::debug!(path = %hash, peer = reporter, ?outcome, "a peer reported a bad NAR");
    }

    fn summary(self: Arc<Self>) -> BoxFuture<'static, Option<SummaryFeed>> {
        Box::pin(async move {
            let catalog = self.catalog.clone()?;
            let sub = catalog.subscribe().await;
            let changes = stream::unfold(sub.changes, |mut rx| async move {
                use tokio::sync::broadcast::error::RecvError;
                let item = match rx.recv().await {
                    Ok(change) => Ok(SummaryChange {
                        added: change.added.clone(),
                        removed: change.removed.clone(),
                    }),
                    Err(RecvError::Lagged(_)) => Err(FellBehind),
                    Err(RecvError::Closed) => return None,
                };
                Some((item, rx))
            })
            .boxed();
            Some(SummaryFeed {
                fingerprints: sub.fingerprints,
                changes,
            })
        })
    }
}
