//! Where the two flows meet: this host's shared store (`store::shared`) as
//! the peer server (`mesh::server`) asks for it. Only the agent knows both
//! sides.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt};

use crate::mesh::server::{NarFault, ServedPaths};
use crate::nix::{HashPart, PathInfo, Sha256Hash};
use crate::store::nar_stream::NarStreamError;
use crate::store::shared::SharedStore;

pub struct Served(pub Arc<SharedStore>);

impl ServedPaths for Served {
    fn info(&self, hash: HashPart) -> Option<PathInfo> {
        self.0.info_now(hash)
    }

    fn have_many(self: Arc<Self>, hashes: Vec<HashPart>) -> BoxFuture<'static, Vec<bool>> {
        Box::pin(async move { self.0.have_many(hashes).await })
    }

    fn nar(&self, info: PathInfo, offset: u64) -> BoxStream<'static, Result<Bytes, NarFault>> {
        let rx = self.0.nar(info, offset).into_receiver();
        stream::unfold(rx, |mut rx| async move {
            let item = rx.recv().await?.map_err(|e| match e {
                NarStreamError::Corrupt { .. } => NarFault::Corrupt,
                _ => NarFault::Unreadable,
            });
            Some((item, rx))
        })
        .boxed()
    }

    fn bad_nar(&self, hash: HashPart, nar_hash: Sha256Hash, reporter: &str) {
        let outcome = self.0.recheck(hash.clone(), nar_hash, reporter);
        tracing::debug!(path = %hash, peer = reporter, ?outcome, "a peer reported a bad NAR");
    }
}
