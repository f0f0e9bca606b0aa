//! One download per path for the whole office. For a path no peer holds,
//! one agent, its owner (`owner`: rendezvous hashing over the live agents
//! that speak protocol version 2), downloads the file from upstream into
//! its spool; every other agent that wants it asks the owner
//! (`UpstreamFile`) and gets the bytes as they arrive, checking FileSize
//! and FileHash itself on the way (the owner may lie). If the owner cannot
//! help before sending anything (it has no upstream file for the path, it
//! is gone, it does not answer), the agent downloads the file itself; if
//! the owner stops after sending some of it (killed, frozen, cut off), the
//! agent goes on from upstream at the byte where the owner stopped (a
//! `Range` request), so Nix sees one unbroken download. An owner whose
//! bytes turn out wrong is quarantined, like a peer with a bad NAR, and
//! that transfer is cut off.
//!
//! `ForPeers` is the owner's side, handed down to the mesh's peer server;
//! `fetch_for_nix` the asker's.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::{owner, FileCheck, FileError, Lookup, RelayError, UpstreamFile, Upstreams};
use crate::fetch::relay::QUARANTINE;
use crate::fetch::resolver::Resolver;
use crate::mesh::client;
use crate::mesh::identity::NodeId;
use crate::mesh::node::Mesh;
use crate::mesh::server::{UpstreamFiles, UpstreamLookup};
use crate::nix::{HashPart, NarInfo, Sha256Hash};

/// Chunks buffered between the download and a peer's stream.
const DEPTH: usize = 8;
/// How long the owner may take to start sending: its own narinfo race and
/// the upstream's answer come first.
const OWNER_ANSWER: Duration = Duration::from_secs(10);

/// The owner's side: files this agent downloads, for its peers.
pub struct ForPeers {
    resolver: Weak<Resolver>,
}

impl ForPeers {
    pub fn new(resolver: &Arc<Resolver>) -> Arc<Self> {
        Arc::new(Self {
            resolver: Arc::downgrade(resolver),
        })
    }
}

impl UpstreamFiles for ForPeers {
    fn file(
        self: Arc<Self>,
        hash: HashPart,
        file_hash: Sha256Hash,
    ) -> BoxFuture<'static, Option<(u64, mpsc::Receiver<Result<Bytes, String>>)>> {
        Box::pin(async move {
            let resolver = self.resolver.upgrade()?;
            let upstreams = resolver.upstreams()?.clone();
            let file = resolver
                .resolve(&hash)
                .await?
                .upstream
                .filter(|f| f.file_hash == file_hash)?;
            let size = file.file_size;
            let (tx, rx) = mpsc::channel(DEPTH);
            upstreams.stats.for_peers.inc();
            upstreams.clone().spawn(upstreams.clone().relay(file, tx));
            Some((size, rx))
        })
    }

    fn narinfo(self: Arc<Self>, hash: HashPart) -> BoxFuture<'static, UpstreamLookup> {
        Box::pin(async move {
            let Some(upstreams) = self.resolver.upgrade().and_then(|r| r.upstreams().cloned())
            else {
                return UpstreamLookup::Miss { asked: Vec::new() };
            };
            upstreams.stats.narinfo_for_peers.inc();
            match upstreams.lookup(&hash).await {
                Lookup::Hit(hit) => UpstreamLookup::Hit {
                    cache: hit.cache.to_string(),
                    narinfo: hit.narinfo.render(),
                },
                Lookup::Miss { asked } => UpstreamLookup::Miss {
                    asked: asked.iter().map(|c| c.to_string()).collect(),
                },
            }
        })
    }
}

/// The agent that looks `hash` up and downloads it for the office: this
/// one or a usable peer speaking protocol version 2.
pub fn owner_of(mesh: &Mesh, hash: &HashPart) -> NodeId {
    owner::owner(
        hash.as_str().as_bytes(),
        mesh.node(),
        &mesh.peers_speaking_v2(),
    )
}

/// The asker's side of a narinfo look-up: for a path no peer holds, the
/// upstreams' narinfo through its owner if that is another agent (one
/// look-up for the office; the answer is checked here as if this agent had
/// got it from upstream), else, or if the owner cannot help, from the
/// upstreams directly. An owner's miss is taken for the caches it asked;
/// this agent asks only the others it has.
pub async fn narinfo_for_nix(
    mesh: &Arc<Mesh>,
    upstreams: &Upstreams,
    hash: &HashPart,
) -> Option<(NarInfo, UpstreamFile)> {
    let chosen = owner_of(mesh, hash);
    if chosen == mesh.node() {
        return upstreams.narinfo(hash).await;
    }
    let asked = async {
        let conn = mesh.connection(chosen).await.map_err(|e| e.to_string())?;
        client::upstream_narinfo(&conn, hash, upstreams.timeout())
            .await
            .map_err(|e| e.to_string())
    };
    match asked.await {
        Ok(UpstreamLookup::Hit { cache, narinfo }) => {
            match upstreams.accept(hash, &cache, &narinfo) {
                Ok(found) => {
                    upstreams.stats.narinfo_from_owner.inc();
                    upstreams.stats.narinfo_hits.inc();
                    return Some(found);
                }
                Err(why) => {
                    tracing::warn!(peer = %chosen, path = %hash, reason = %why, "refused the owner's upstream narinfo; asking upstream here");
                }
            }
        }
        Ok(UpstreamLookup::Miss { asked }) => {
            return upstreams.narinfo_except(hash, &asked).await;
        }
        Err(why) => {
            tracing::debug!(peer = %chosen, path = %hash, reason = %why, "the owner did not look the path up; asking upstream here");
        }
    }
    upstreams.narinfo(hash).await
}

/// Why a transfer from the owner ended.
enum FromOwner {
    /// Nothing reached Nix yet: get the file another way.
    Before(String),
    /// It stopped after part of the file reached Nix: what was received so
    /// far, to go on from (`held`, the last chunk, not passed on yet).
    During {
        error: RelayError,
        check: FileCheck,
        held: Option<Bytes>,
    },
    /// What it sent is not the file.
    Lied(RelayError),
}

/// The asker's side: `file` for this agent's Nix, from its owner if that
/// is another agent, else (or if the owner cannot help) downloaded here.
pub async fn fetch_for_nix(
    mesh: Arc<Mesh>,
    upstreams: Arc<Upstreams>,
    hash: HashPart,
    file: UpstreamFile,
    tx: mpsc::Sender<Result<Bytes, RelayError>>,
) {
    let chosen = owner_of(&mesh, &hash);
    if chosen != mesh.node() {
        let outcome = match from_owner(&mesh, chosen, &hash, &file, upstreams.stall(), &tx).await {
            Ok(()) => {
                upstreams.stats.from_owner.inc();
                Ok(())
            }
            Err(FromOwner::Before(why)) => {
                tracing::info!(peer = %chosen, path = %hash, reason = %why, "the owner cannot send the upstream file; downloading it here");
                return upstreams.relay(file, tx).await;
            }
            Err(FromOwner::During { error, check, held }) => {
                tracing::warn!(peer = %chosen, path = %hash, error = %error, at = check.seen(), "the owner stopped sending; going on from upstream");
                let resumed = upstreams.resume_direct(&file, check, held, &tx).await;
                if matches!(resumed, Err(RelayError::File(FileError::WrongHash))) {
                    // Upstream's part is checked against the same hash; the
                    // owner's part is the suspect.
                    mesh.quarantine(&chosen, QUARANTINE);
                }
                resumed
            }
            Err(FromOwner::Lied(e)) => {
                tracing::warn!(peer = %chosen, path = %hash, error = %e, "the owner sent a wrong upstream file; quarantining it");
                mesh.quarantine(&chosen, QUARANTINE);
                Err(e)
            }
        };
        match outcome {
            Ok(()) => {
                upstreams.stats.files.inc();
            }
            Err(e) => {
                upstreams.stats.file_failures.inc();
                tracing::warn!(path = %hash, error = %e, "upstream file cut off");
                let _ = tx.send(Err(e)).await;
            }
        }
        return;
    }
    upstreams.relay(file, tx).await;
}

async fn from_owner(
    mesh: &Arc<Mesh>,
    owner: NodeId,
    hash: &HashPart,
    file: &UpstreamFile,
    stall: Duration,
    tx: &mpsc::Sender<Result<Bytes, RelayError>>,
) -> Result<(), FromOwner> {
    let before = |e: String| FromOwner::Before(e);
    let conn = mesh
        .connection(owner)
        .await
        .map_err(|e| before(e.to_string()))?;
    let (size, mut recv) = client::upstream_file(&conn, hash, &file.file_hash, OWNER_ANSWER)
        .await
        .map_err(|e| before(e.to_string()))?
        .ok_or_else(|| before("it has no upstream file for the path".into()))?;
    if size != file.file_size {
        return Err(before(format!(
            "it offers {size} bytes, not {}",
            file.file_size
        )));
    }
    mesh.count(&owner, |c| c.requests_made += 1);
    let mut check = FileCheck::new(file.file_size, file.file_hash);
    let mut held: Option<Bytes> = None;
    let mut sent_any = false;
    loop {
        let read = tokio::time::timeout(stall, recv.read_chunk(256 * 1024, true)).await;
        let error = match read {
            Ok(Ok(None)) => break,
            Ok(Ok(Some(c))) => {
                let chunk = c.bytes;
                if let Err(e) = check.feed(&chunk) {
                    return Err(FromOwner::Lied(e.into()));
                }
                mesh.count(&owner, |c| c.bytes_fetched += chunk.len() as u64);
                if let Some(prev) = held.replace(chunk) {
                    sent_any = true;
                    if tx.send(Ok(prev)).await.is_err() {
                        return Ok(());
                    }
                }
                continue;
            }
            Err(_) => RelayError::Stalled(stall),
            Ok(Err(e)) => RelayError::Body(format!("from the owner: {e}")),
        };
        let _ = recv.stop(0u32.into());
        return Err(if sent_any {
            FromOwner::During { error, check, held }
        } else {
            FromOwner::Before(error.to_string())
        });
    }
    if let Err(e) = check.finish() {
        return Err(FromOwner::Lied(e.into()));
    }
    if let Some(last) = held {
        let _ = tx.send(Ok(last)).await;
    }
    Ok(())
}
