//! Relays a NAR from the mesh to Nix: streams it from the best holder over
//! QUIC, hashing on the way. A holder that dies, stalls or disconnects is
//! replaced by another holder from the same byte offset (every holder has
//! the same canonical bytes). The last chunk is held back until the whole
//! NAR verified, so Nix never receives a complete wrong body: with no holder
//! left, or a hash mismatch, the response is cut off instead. A peer whose
//! bytes did not verify is quarantined.

use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::mpsc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::fetch::resolver::{Found, Resolver};
use crate::mesh::client;
use crate::mesh::identity::NodeId;
use crate::mesh::protocol::code;
use crate::nix::NarInfo;

/// A holder that sends nothing for this long is stalled.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a peer that sent bad bytes is left out.
pub const QUARANTINE: Duration = Duration::from_secs(600);
/// Largest piece read off a QUIC stream at once.
const READ_CHUNK: usize = 256 * 1024;
/// A read buffer with less room left than this is replaced by a new one.
const MIN_READ: usize = 16 * 1024;
/// After Nix leaves mid-NAR, up to this many remaining bytes are still read
/// and hashed, so a peer whose bytes made Nix give up is caught.
const DRAIN_LIMIT: u64 = 64 << 20;
/// Holders tried for one NAR before giving up.
const MAX_ATTEMPTS: usize = 8;

#[derive(Debug, Error)]
pub enum FetchError {
    #[error("no holder left for {path} at byte {offset} of {size}")]
    NoHolder {
        path: String,
        offset: u64,
        size: u64,
    },
    #[error("{path}: the NAR from the mesh does not match its NarHash")]
    HashMismatch { path: String },
}

#[derive(Default)]
pub struct FetchStats {
    pub failovers: Counter,
    pub verify_failures: Counter,
    pub in_flight: Gauge<u64, AtomicU64>,
    pub completed: Counter,
}

impl FetchStats {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "nixmesh_nar_completed",
            "NARs relayed to Nix and verified",
            self.completed.clone(),
        );
        registry.register(
            "nixmesh_nar_failovers",
            "Times a NAR stream moved to another holder",
            self.failovers.clone(),
        );
        registry.register(
            "nixmesh_nar_verify_failures",
            "NARs from the mesh that did not verify",
            self.verify_failures.clone(),
        );
        registry.register(
            "nixmesh_nar_streams_in_flight",
            "NAR streams being relayed now",
            self.in_flight.clone(),
        );
    }
}

enum HolderEnd {
    /// The holder delivered every remaining byte.
    Done,
    /// It failed; try the next one from the current offset.
    Failed(String),
    /// It said its own copy is corrupt before sending a byte: nothing it
    /// sent needs undoing, but it must not be asked again.
    Disowned,
    /// It sent more bytes than the NAR has, or said its own copy is
    /// corrupt after sending some: what it sent cannot be trusted.
    Lied(&'static str),
    /// Nix went away.
    ClientGone,
}

/// Who a relay is for: Nix waiting on the other end, or the prefetcher
/// filling memory ahead of Nix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Nix,
    Prefetch,
}

/// Streams the bytes of `found`'s NAR that lie in `window` (NAR offsets)
/// into `tx`. Every byte of the NAR is fetched and hashed, in the window or
/// not, and the last chunk sent is held back until the whole NAR verified.
/// Its holders are tried in order; more are asked for when they run out.
/// Returns the holder that finished a NAR that verified.
pub async fn relay(
    resolver: Arc<Resolver>,
    stats: Arc<FetchStats>,
    found: Found,
    window: Range<u64>,
    tx: mpsc::Sender<Result<Bytes, FetchError>>,
    purpose: Purpose,
) -> Option<NodeId> {
    let Found { narinfo, holders } = found;
    stats.in_flight.inc();
    let started = Instant::now();
    let info = &narinfo.info;
    let hash = info.path.hash_part();
    let size = info.nar_size;
    let mut progress = Progress {
        offset: 0,
        hasher: Sha256::new(),
        pending: None,
        window,
        client_gone: false,
        // Only bytes Nix has seen are worth checking after it leaves.
        drain: purpose == Purpose::Nix,
    };
    let mut queue = holders;
    let mut tried: Vec<NodeId> = Vec::new();
    let mut contributors: Vec<NodeId> = Vec::new();
    let mut outcome = None;
    while tried.len() < MAX_ATTEMPTS {
        if queue.is_empty() {
            queue = resolver.more_holders(&hash, &tried).await;
        }
        let Some(node) = queue.first().copied() else {
            break;
        };
        queue.remove(0);
        if !tried.is_empty() {
            stats.failovers.inc();
            tracing::warn!(path = %info.path, peer = %node, offset = progress.offset, "failing over to another holder");
        }
        tried.push(node);
        contributors.push(node);
        let end = from_holder(&resolver, node, &narinfo, &mut progress, &tx).await;
        match end {
            HolderEnd::Done => {
                outcome = Some(node);
                break;
            }
            HolderEnd::ClientGone => {
                stats.in_flight.dec();
                return None;
            }
            HolderEnd::Lied(why) => {
                quarantine(&resolver, node, why);
                stats.verify_failures.inc();
                // What it sent so far is suspect and Nix already has it: cut
                // the response off; Nix's next try avoids this peer.
                resolver.forget(&hash);
                let _ = tx
                    .send(Err(FetchError::HashMismatch {
                        path: info.path.to_string(),
                    }))
                    .await;
                stats.in_flight.dec();
                return None;
            }
            HolderEnd::Failed(reason) => {
                tracing::warn!(path = %info.path, peer = %node, offset = progress.offset, %reason, "holder failed mid-stream");
            }
            HolderEnd::Disowned => {
                quarantine(&resolver, node, "its own store copy is corrupt");
                stats.verify_failures.inc();
            }
        }
    }
    let Progress {
        offset,
        hasher,
        mut pending,
        client_gone,
        ..
    } = progress;
    let digest: [u8; 32] = hasher.finalize().into();
    let verified = offset == size && digest == info.nar_hash.0;
    if client_gone {
        if outcome.is_some() && !verified {
            stats.verify_failures.inc();
            for node in &contributors {
                quarantine(&resolver, *node, "NAR did not match its hash");
            }
            resolver.forget(&hash);
        }
        stats.in_flight.dec();
        return None;
    }
    let mut finished_by = None;
    match (outcome, verified) {
        (Some(node), true) => {
            if let Some(last) = pending.take() {
                let _ = tx.send(Ok(last)).await;
            }
            finished_by = Some(node);
            let ms = started.elapsed().as_millis() as u64;
            let peers = contributors.len();
            if purpose == Purpose::Nix {
                stats.completed.inc();
                tracing::info!(path = %info.path, peer = %node, peers, bytes = size, ms, "substituted");
            } else {
                tracing::debug!(path = %info.path, peer = %node, peers, bytes = size, ms, "prefetched");
            }
        }
        (Some(_), false) => {
            stats.verify_failures.inc();
            for node in &contributors {
                quarantine(&resolver, *node, "NAR did not match its hash");
            }
            resolver.forget(&hash);
            let _ = tx
                .send(Err(FetchError::HashMismatch {
                    path: info.path.to_string(),
                }))
                .await;
        }
        (None, _) => {
            resolver.forget(&hash);
            let _ = tx
                .send(Err(FetchError::NoHolder {
                    path: info.path.to_string(),
                    offset,
                    size,
                }))
                .await;
        }
    }
    stats.in_flight.dec();
    finished_by
}

/// Every NAR begins with the same string token, `nix-archive-1`: a holder
/// whose first bytes differ is lying, and is caught before Nix sees them.
fn starts_like_a_nar(offset: u64, chunk: &[u8]) -> bool {
    if offset >= 24 {
        return true;
    }
    let mut magic = Vec::with_capacity(24);
    crate::nix::nar::push_str(&mut magic, crate::nix::nar::MAGIC.as_bytes());
    let Ok(start) = usize::try_from(offset) else {
        return true;
    };
    if start >= magic.len() {
        return true;
    }
    let expected = &magic[start..];
    let n = expected.len().min(chunk.len());
    chunk[..n] == expected[..n]
}

/// The part of `chunk`, which starts at NAR offset `at`, that lies in
/// `window`.
fn in_window(at: u64, mut chunk: Bytes, window: &Range<u64>) -> Bytes {
    let end = at + chunk.len() as u64;
    if end <= window.start || at >= window.end {
        return Bytes::new();
    }
    let from = window.start.saturating_sub(at) as usize;
    let to = (window.end.min(end) - at) as usize;
    chunk.truncate(to);
    chunk.split_off(from)
}

fn quarantine(resolver: &Resolver, node: NodeId, why: &str) {
    tracing::error!(peer = %node, reason = why, "quarantining a peer");
    resolver.mesh().quarantine(&node, QUARANTINE);
}

/// How far a relay has come, across holders.
struct Progress {
    /// Bytes received and hashed so far.
    offset: u64,
    hasher: Sha256,
    /// The newest chunk, held back until the NAR verifies.
    pending: Option<Bytes>,
    /// The NAR offsets the consumer asked for.
    window: Range<u64>,
    /// Nix left; bytes are still read and hashed, not sent.
    client_gone: bool,
    /// Whether to go on reading (up to `DRAIN_LIMIT`) once the consumer left.
    drain: bool,
}

async fn from_holder(
    resolver: &Resolver,
    node: NodeId,
    narinfo: &NarInfo,
    progress: &mut Progress,
    tx: &mpsc::Sender<Result<Bytes, FetchError>>,
) -> HolderEnd {
    let info = &narinfo.info;
    let Progress {
        offset,
        hasher,
        pending,
        window,
        client_gone,
        drain,
    } = progress;
    let start = *offset;
    let mesh = resolver.mesh();
    let conn = match mesh.connection(node).await {
        Ok(c) => c,
        Err(e) => return HolderEnd::Failed(e.to_string()),
    };
    let opened = client::nar(
        &conn,
        &info.path.hash_part(),
        &info.nar_hash,
        *offset,
        STALL_TIMEOUT,
    )
    .await;
    let mut recv = match opened {
        Ok(Some((nar_size, recv))) if nar_size == info.nar_size => recv,
        Ok(Some((nar_size, _))) => {
            return HolderEnd::Failed(format!("says the NAR has {nar_size} bytes"))
        }
        Ok(None) => return HolderEnd::Failed("no longer has it".into()),
        Err(e) => return HolderEnd::Failed(e.to_string()),
    };
    let count = |n: u64| mesh.count(&node, |c| c.bytes_fetched += n);
    mesh.count(&node, |c| c.requests_made += 1);
    // QUIC hands data over one packet's worth (about 1.4 KiB) at a time;
    // reading into a large buffer takes all that has arrived at once, so
    // hashing, counting and Nix's HTTP stream work on big pieces.
    let mut buf = BytesMut::new();
    loop {
        if buf.len() < MIN_READ {
            buf = BytesMut::zeroed(READ_CHUNK);
        }
        let chunk = match tokio::time::timeout(STALL_TIMEOUT, recv.read(&mut buf)).await {
            Err(_) => {
                let _ = recv.stop(code::CANCELLED.into());
                return HolderEnd::Failed(format!("stalled for {STALL_TIMEOUT:?}"));
            }
            Ok(Err(e)) => {
                // The bytes a holder sent before saying its copy is
                // corrupt are as suspect as the rest of that copy.
                return match client::reset_code(&e) {
                    Some(code::CORRUPT) if *offset == start => HolderEnd::Disowned,
                    Some(code::CORRUPT) => HolderEnd::Lied("said its own store copy is corrupt"),
                    _ => HolderEnd::Failed(e.to_string()),
                };
            }
            Ok(Ok(None)) => {
                return if *offset == info.nar_size {
                    HolderEnd::Done
                } else {
                    HolderEnd::Failed(format!("stream ended at byte {offset}"))
                };
            }
            Ok(Ok(Some(n))) => buf.split_to(n).freeze(),
        };
        let len = chunk.len() as u64;
        if *offset + len > info.nar_size {
            let _ = recv.stop(code::MALFORMED.into());
            return HolderEnd::Lied("sent more bytes than the NAR has");
        }
        if !starts_like_a_nar(*offset, &chunk) {
            let _ = recv.stop(code::MALFORMED.into());
            return HolderEnd::Lied("sent bytes that are not a NAR");
        }
        hasher.update(&chunk);
        let visible = in_window(*offset, chunk, window);
        *offset += len;
        count(len);
        if *client_gone || visible.is_empty() {
            continue;
        }
        if let Some(prev) = pending.replace(visible) {
            if tx.send(Ok(prev)).await.is_err() {
                // Nix left, maybe because these bytes made no sense to it.
                // Finish checking them if that is cheap, to catch a liar.
                if !*drain || info.nar_size - *offset > DRAIN_LIMIT {
                    let _ = recv.stop(code::CANCELLED.into());
                    return HolderEnd::ClientGone;
                }
                *client_gone = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cut_chunks_at_nar_offsets() {
        let chunk = || Bytes::from_static(b"0123456789");
        // The chunk covers NAR offsets 100..110.
        assert_eq!(in_window(100, chunk(), &(0..1000)), chunk());
        assert_eq!(in_window(100, chunk(), &(105..1000)), &b"56789"[..]);
        assert_eq!(in_window(100, chunk(), &(0..103)), &b"012"[..]);
        assert_eq!(in_window(100, chunk(), &(102..104)), &b"23"[..]);
        assert!(in_window(100, chunk(), &(110..1000)).is_empty());
        assert!(in_window(100, chunk(), &(0..100)).is_empty());
        assert!(in_window(100, chunk(), &(50..50)).is_empty());
    }
}
