//! Relays a NAR from the mesh to Nix: streams it from the best holder over
//! QUIC, hashing on the way. A holder that dies, stalls or disconnects is
//! replaced by another holder from the same byte offset (every holder has
//! the same canonical bytes). The last chunk is held back until the whole
//! NAR verified, so Nix never receives a complete wrong body: with no holder
//! left, or a hash mismatch, the response is cut off instead. A peer whose
//! bytes did not verify is quarantined, or, where they came in the clear
//! (a host on the path may have changed them), dialled under TLS
//! (`Mesh::blame`).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::mpsc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::fetch::compression;
use crate::fetch::resolver::{Found, Resolver};
use crate::fetch::stripes;
use crate::fetch::verify::{NarCheck, Verdict};
use crate::lock::lock;
use crate::mesh::client;
use crate::mesh::identity::NodeId;
use crate::mesh::nar_reader::{NarReadError, NarReader};
use crate::mesh::protocol::code;
use crate::mesh::transport::FrameReadError;
use crate::nix::HashPart;
use crate::nix::NarInfo;

/// A holder that sends nothing for this long is stalled.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a peer that sent bad bytes is left out.
pub const QUARANTINE: Duration = Duration::from_secs(600);
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
    /// NARs whose striped fetch did not verify, and what it saw: fetched
    /// one holder at a time from then on, which tells the liar apart.
    unstriped: Mutex<HashMap<HashPart, stripes::Prefixes>>,
}

/// NARs remembered as not to be striped, at most.
const MAX_UNSTRIPED: usize = 1024;

impl FetchStats {
    fn striped_before(&self, hash: &HashPart) -> Option<stripes::Prefixes> {
        lock(&self.unstriped).get(hash).cloned()
    }

    fn stop_striping(&self, hash: HashPart, seen: stripes::Prefixes) {
        let mut map = lock(&self.unstriped);
        if map.len() >= MAX_UNSTRIPED {
            map.clear();
        }
        map.insert(hash, seen);
    }

    fn forget_striped(&self, hash: &HashPart) {
        lock(&self.unstriped).remove(hash);
    }

    pub fn register(&self, registry: &mut Registry) {
        let counters = [
            (
                "nixmesh_nar_completed",
                "NARs relayed to Nix and verified",
                &self.completed,
            ),
            (
                "nixmesh_nar_failovers",
                "Times a NAR stream moved to another holder",
                &self.failovers,
            ),
            (
                "nixmesh_nar_verify_failures",
                "NARs from the mesh that did not verify",
                &self.verify_failures,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
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
    /// It says the NAR has another size than the narinfo: one of them
    /// lies (try the next holder).
    OtherSize(u64),
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
    let Found {
        narinfo, holders, ..
    } = found;
    // The race winner, whose narinfo this is.
    let narinfo_from = holders.first().copied();
    stats.in_flight.inc();
    let started = Instant::now();
    let info = &narinfo.info;
    let hash = info.path.hash_part();
    let size = info.nar_size;
    let striped_before = stats.striped_before(&hash);
    let mut progress = Progress {
        check: NarCheck::new(size, info.nar_hash, window.clone()),
        client_gone: false,
        // Only bytes Nix has seen are worth checking after it leaves.
        drain: purpose == Purpose::Nix,
        stripe_ends: striped_before.as_ref().map(|_| Vec::new()),
        clear: Vec::new(),
    };
    let stripe = resolver.stripe_from().is_some_and(|from| size >= from);
    if purpose == Purpose::Nix && stripe && striped_before.is_none() {
        let mut all = holders.clone();
        all.extend(resolver.more_holders(&hash, &all).await);
        if all.len() >= 2 {
            let outcome = stripes::fetch_striped(&resolver, &narinfo, all, window, &tx).await;
            stats.in_flight.dec();
            return striped_end(&resolver, &stats, info, outcome, started, &tx).await;
        }
    }
    let mut queue = holders;
    let mut tried: Vec<NodeId> = Vec::new();
    let mut contributors: Vec<NodeId> = Vec::new();
    // Holders other than the narinfo's source that say the NAR has
    // another size than the narinfo.
    let mut disagree: Vec<NodeId> = Vec::new();
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
            tracing::warn!(path = %info.path, peer = %node, offset = progress.check.offset(), "failing over to another holder");
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
                blame(&resolver, node, progress.came_clear(&node), why);
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
                tracing::warn!(path = %info.path, peer = %node, offset = progress.check.offset(), %reason, "holder failed mid-stream");
            }
            HolderEnd::OtherSize(nar_size) => {
                tracing::warn!(path = %info.path, peer = %node, nar_size, narinfo_size = size, "holder says the NAR has another size than the narinfo");
                // The narinfo's source lied about its size if its own NAR
                // disagrees, or two other holders do (one might be the
                // liar, framing it). Content-addressed narinfos need no
                // signature, so NarSize is what a peer can lie about. A
                // size that came in the clear proves nothing: its sender
                // answers under TLS next time.
                let clear = progress.came_clear(&node);
                if Some(node) != narinfo_from && !clear {
                    disagree.push(node);
                }
                if clear {
                    blame(&resolver, node, true, "said the NAR has another size");
                } else if let Some(source) = narinfo_from {
                    if Some(node) == narinfo_from || disagree.len() >= 2 {
                        blame(
                            &resolver,
                            source,
                            false,
                            "its narinfo's NarSize is not its NAR's",
                        );
                        resolver.forget(&hash);
                    }
                }
            }
            HolderEnd::Disowned => {
                blame(
                    &resolver,
                    node,
                    progress.came_clear(&node),
                    "its own store copy is corrupt",
                );
                stats.verify_failures.inc();
            }
        }
    }
    let Progress {
        check,
        client_gone,
        stripe_ends,
        clear,
        ..
    } = progress;
    let verdict = check.finish();
    if client_gone {
        if outcome.is_some() && verdict == Verdict::Mismatch {
            stats.verify_failures.inc();
            blame_all(&resolver, &contributors, &clear);
            tell_holders(&resolver, &contributors, info);
            resolver.forget(&hash);
        }
        stats.in_flight.dec();
        return None;
    }
    let mut finished_by = None;
    match (outcome, verdict) {
        (Some(node), Verdict::Verified { last }) => {
            if let Some(last) = last {
                let _ = tx.send(Ok(last)).await;
            }
            // The striped fetch before this one failed its hash: the
            // holder whose stripe first differs from these bytes lied.
            let liar = striped_before
                .zip(stripe_ends)
                .and_then(|(p, e)| p.first_liar(&e));
            if let Some(liar) = liar {
                blame(
                    &resolver,
                    liar.node,
                    liar.clear,
                    "sent a wrong stripe of a NAR",
                );
            }
            stats.forget_striped(&hash);
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
        (Some(_), _) => {
            stats.verify_failures.inc();
            blame_all(&resolver, &contributors, &clear);
            tell_holders(&resolver, &contributors, info);
            resolver.forget(&hash);
            let _ = tx
                .send(Err(FetchError::HashMismatch {
                    path: info.path.to_string(),
                }))
                .await;
        }
        (None, verdict) => {
            resolver.forget(&hash);
            let offset = match verdict {
                Verdict::Short { offset } => offset,
                _ => size,
            };
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

/// What a striped fetch's end means for Nix, the metrics and the holders.
async fn striped_end(
    resolver: &Resolver,
    stats: &FetchStats,
    info: &crate::nix::PathInfo,
    outcome: stripes::Striped,
    started: Instant,
    tx: &mpsc::Sender<Result<Bytes, FetchError>>,
) -> Option<NodeId> {
    let hash = info.path.hash_part();
    let error = match outcome {
        stripes::Striped::Done(holders) => {
            stats.completed.inc();
            let ms = started.elapsed().as_millis() as u64;
            let first = holders.first().copied()?;
            tracing::info!(path = %info.path, peer = %first, peers = holders.len(), bytes = info.nar_size, ms, striped = true, "substituted");
            return Some(first);
        }
        stripes::Striped::ClientGone => return None,
        // Which holder lied is not known: each is told, each checks its
        // copy, and Nix's next try fetches from one holder at a time, which
        // finds the liar.
        stripes::Striped::Mismatch(holders, seen) => {
            stats.verify_failures.inc();
            stats.stop_striping(hash.clone(), seen);
            tell_holders(resolver, &holders, info);
            FetchError::HashMismatch {
                path: info.path.to_string(),
            }
        }
        stripes::Striped::NoHolder { offset } => FetchError::NoHolder {
            path: info.path.to_string(),
            offset,
            size: info.nar_size,
        },
    };
    tracing::warn!(path = %info.path, error = %error, "striped fetch failed");
    resolver.forget(&hash);
    let _ = tx.send(Err(error)).await;
    None
}

/// Tells the holders that sent parts of a NAR that did not match its hash
/// (holders do not hash what they send): each checks its copy and stops
/// sharing it if it is corrupt. A liar learns nothing it did not know.
fn tell_holders(resolver: &Resolver, holders: &[NodeId], info: &crate::nix::PathInfo) {
    for node in holders.iter().copied() {
        let mesh = resolver.mesh().clone();
        let (hash, nar_hash) = (info.path.hash_part(), info.nar_hash);
        tokio::spawn(async move {
            let Ok(conn) = mesh.connection(node).await else {
                return;
            };
            if let Err(e) = client::bad_nar(&conn, &hash, &nar_hash, STALL_TIMEOUT).await {
                tracing::debug!(peer = %node, path = %hash, error = %e, "could not tell a holder its NAR was bad");
            }
        });
    }
}

/// `node` sent bytes that failed their check: quarantined, or, where they
/// came in the clear, dialled under TLS from now on (`Mesh::blame`).
pub(crate) fn blame(resolver: &Resolver, node: NodeId, clear: bool, why: &str) {
    resolver.mesh().blame(&node, clear, QUARANTINE, why);
}

/// A NAR from `contributors` did not match its hash. If a part came in
/// the clear (from the holders in `clear`), a host on the path may have
/// changed it rather than any holder: those go under TLS and none is
/// quarantined, not even one whose part came under TLS (which part was
/// wrong is not known; a liar there goes free this once). Otherwise every
/// contributor is quarantined.
fn blame_all(resolver: &Resolver, contributors: &[NodeId], clear: &[NodeId]) {
    for (node, clear) in mismatch_blame(contributors, clear) {
        blame(resolver, node, clear, "NAR did not match its hash");
    }
}

/// Whom `blame_all` blames, and whether for bytes in the clear. Pure.
fn mismatch_blame(contributors: &[NodeId], clear: &[NodeId]) -> Vec<(NodeId, bool)> {
    let suspects = contributors.iter().copied();
    match clear.is_empty() {
        true => suspects.map(|node| (node, false)).collect(),
        false => suspects
            .filter(|node| clear.contains(node))
            .map(|node| (node, true))
            .collect(),
    }
}

/// How far a relay has come, across holders.
struct Progress {
    /// Every byte so far, checked; what may go on to the consumer.
    check: NarCheck,
    /// Nix left; bytes are still read and hashed, not sent.
    client_gone: bool,
    /// Whether to go on reading (up to `DRAIN_LIMIT`) once the consumer left.
    drain: bool,
    /// After a striped fetch of this NAR failed its hash: the prefix
    /// digests at each stripe's end, to compare with that fetch's.
    stripe_ends: Option<Vec<[u8; 32]>>,
    /// Holders whose part came in the clear (plain bulk connections).
    clear: Vec<NodeId>,
}

impl Progress {
    fn came_clear(&self, node: &NodeId) -> bool {
        self.clear.contains(node)
    }

    /// Checks `chunk`; what may go to the consumer now. Cut at stripe ends
    /// when their prefix digests are wanted.
    fn take(&mut self, mut chunk: Bytes) -> Result<Vec<Bytes>, crate::fetch::verify::Lie> {
        let mut out = Vec::new();
        let Some(ends) = &mut self.stripe_ends else {
            out.extend(self.check.on_chunk(chunk)?);
            return Ok(out);
        };
        while !chunk.is_empty() {
            let at = self.check.offset();
            let to_end = stripes::STRIPE - at % stripes::STRIPE;
            let piece = chunk.split_to(chunk.len().min(to_end as usize));
            out.extend(self.check.on_chunk(piece)?);
            if self.check.offset() % stripes::STRIPE == 0 || self.check.complete() {
                ends.push(self.check.prefix_digest());
            }
        }
        Ok(out)
    }
}

async fn from_holder(
    resolver: &Resolver,
    node: NodeId,
    narinfo: &NarInfo,
    progress: &mut Progress,
    tx: &mpsc::Sender<Result<Bytes, FetchError>>,
) -> HolderEnd {
    let info = &narinfo.info;
    let start = progress.check.offset();
    let mesh = resolver.mesh();
    let conn = match mesh.connection(node).await {
        Ok(c) => c,
        Err(e) => return HolderEnd::Failed(e.to_string()),
    };
    let (link, all) = mesh.links(&node);
    let level = resolver.compression().level(&link, &all);
    let opened = mesh
        .open_nar_part(
            node,
            &conn,
            &info.path.hash_part(),
            &info.nar_hash,
            start..u64::MAX,
            info.nar_size.saturating_sub(start),
            level,
            resolver.compression().bulk_level(&link, &all),
            STALL_TIMEOUT,
        )
        .await;
    if let Ok(Some((_, reader))) = &opened {
        if reader.in_the_clear() {
            progress.clear.push(node);
        }
    }
    let mut reader = match opened {
        Ok(Some((nar_size, reader))) if nar_size == info.nar_size => reader,
        Ok(Some((nar_size, _))) => return HolderEnd::OtherSize(nar_size),
        Ok(None) => return HolderEnd::Failed("no longer has it".into()),
        // It found its copy corrupt before its answer got out.
        Err(client::PeerError::Read(FrameReadError::Reset(code::CORRUPT))) => {
            return HolderEnd::Disowned
        }
        Err(e) => return HolderEnd::Failed(e.to_string()),
    };
    let count = |n: u64| mesh.count(&node, |c| c.bytes_fetched += n);
    mesh.count(&node, |c| c.requests_made += 1);
    let began = Instant::now();
    let measure = |reader: &NarReader, nar_bytes: u64| {
        let wire = reader.wire_bytes().unwrap_or(nar_bytes);
        let secs = began.elapsed().as_secs_f64();
        let packed =
            compression::came_packed(level, reader.is_bulk(), nar_bytes, reader.wire_bytes());
        mesh.record_link(&node, |link| {
            compression::record(link, packed, nar_bytes, wire, secs)
        });
    };
    loop {
        let chunk = match tokio::time::timeout(STALL_TIMEOUT, reader.next()).await {
            Err(_) => {
                reader.stop(code::CANCELLED);
                return HolderEnd::Failed(format!("stalled for {STALL_TIMEOUT:?}"));
            }
            // A bulk connection cut off after the NAR's last byte (the
            // holder died before its `DONE`): the NAR is whole and checked.
            Ok(Err(NarReadError::Bulk(e)))
                if e.kind() == std::io::ErrorKind::UnexpectedEof && progress.check.complete() =>
            {
                measure(&reader, progress.check.offset() - start);
                return HolderEnd::Done;
            }
            Ok(Err(
                e @ (NarReadError::Read(_) | NarReadError::Stopped(_) | NarReadError::Bulk(_)),
            )) => {
                // The bytes a holder sent before saying its copy is
                // corrupt are as suspect as the rest of that copy.
                return match e.holder_code() {
                    Some(code::CORRUPT) if progress.check.offset() == start => HolderEnd::Disowned,
                    Some(code::CORRUPT) => HolderEnd::Lied("said its own store copy is corrupt"),
                    _ => HolderEnd::Failed(e.to_string()),
                };
            }
            Ok(Err(e)) => {
                reader.stop(code::MALFORMED);
                tracing::warn!(peer = %node, path = %info.path, error = %e, "a holder sent a malformed chunk");
                return HolderEnd::Lied("sent a malformed NAR chunk");
            }
            Ok(Ok(None)) => {
                let check = &progress.check;
                measure(&reader, check.offset() - start);
                return if check.complete() {
                    HolderEnd::Done
                } else {
                    HolderEnd::Failed(format!("stream ended at byte {}", check.offset()))
                };
            }
            Ok(Ok(Some(chunk))) => chunk,
        };
        let len = chunk.len() as u64;
        let released = match progress.take(chunk) {
            Ok(released) => released,
            Err(lie) => {
                reader.stop(code::MALFORMED);
                return HolderEnd::Lied(lie.reason());
            }
        };
        count(len);
        let Progress {
            check,
            client_gone,
            drain,
            ..
        } = &mut *progress;
        if *client_gone {
            continue;
        }
        for prev in released {
            if tx.send(Ok(prev)).await.is_err() {
                // Nix left, maybe because these bytes made no sense to it.
                // Finish checking them if that is cheap, to catch a liar.
                if !*drain || info.nar_size - check.offset() > DRAIN_LIMIT {
                    reader.stop(code::CANCELLED);
                    return HolderEnd::ClientGone;
                }
                *client_gone = true;
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mismatch_with_a_part_in_the_clear_quarantines_no_one() {
        let (a, b, c) = (NodeId([1; 32]), NodeId([2; 32]), NodeId([3; 32]));
        // Under TLS or on QUIC only: every holder that sent a part.
        assert_eq!(mismatch_blame(&[a, b], &[]), vec![(a, false), (b, false)]);
        // A part came in the clear: a host on the path may have changed
        // it, so only its sender is moved under TLS.
        assert_eq!(mismatch_blame(&[a, b, c], &[b]), vec![(b, true)]);
    }
}
