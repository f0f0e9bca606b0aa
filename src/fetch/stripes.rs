//! Striped NAR fetches: a large NAR that several peers hold comes in
//! stripes from all of them at once. Each holder has two stripes under way
//! and takes the next as soon as one is in, so faster holders send more; a stripe whose holder
//! fails goes back for another; stripes are put in order and hashed before
//! Nix sees them, so Nix still gets one in-order stream. At most `WINDOW`
//! stripes past the first missing one are fetched or held at once, and
//! `PASSING` more are on their way to Nix, which bounds memory; a holder
//! left idle by that bound fetches the first missing
//! stripe too (whichever copy comes first is taken), so one slow holder
//! cannot hold everyone up.
//!
//! Each holder's stripes are asked at the level `raw_stripes` picks: the
//! holder's own choice of codec, or raw bytes where the asker finds its
//! frames waiting for it and raw stripes come faster; what it learns of a
//! holder carries over to the next striped NAR.
//!
//! `StripePlan` is the pure bookkeeping; `fetch_striped` moves the bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::chunk_buffers::ChunkBuffers;
use crate::fetch::raw_stripes::RawStripes;
use crate::fetch::relay::{self, FetchError, STALL_TIMEOUT};
use crate::fetch::resolver::Resolver;
use crate::fetch::verify::{NarCheck, Verdict};
use crate::mesh::identity::NodeId;
use crate::mesh::nar_chunks;
use crate::mesh::nar_reader::{NarReadError, Waits};
use crate::mesh::protocol::code;
use crate::mesh::transport;
use crate::nix::NarInfo;

/// NAR bytes per stripe.
pub const STRIPE: u64 = 2 << 20;
/// Stripes fetched or held at once, from the first missing one on.
pub const WINDOW: u64 = 12;
/// Stripes on their way to Nix: one waiting to be hashed, one being hashed,
/// and the one whose last piece the NarHash check holds back until the NAR
/// is whole (a piece keeps its stripe's buffer).
pub const PASSING: u64 = 3;

/// Who sent a stripe, and whether it came in the clear (on a plain bulk
/// connection, where a host on the path could have changed it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    pub node: NodeId,
    pub clear: bool,
}

/// Which stripes of a NAR are done, under way and still to fetch.
#[derive(Debug)]
pub struct StripePlan {
    size: u64,
    /// The next stripe never handed out.
    next: u64,
    /// Stripes handed back by a holder that failed.
    again: BTreeSet<u64>,
    /// Stripes fetched but not yet passed on, and who sent each.
    done: BTreeMap<u64, (Bytes, Origin)>,
    /// Stripes under way, and how many holders fetch each.
    under_way: BTreeMap<u64, u32>,
    /// The first stripe not yet passed on.
    first_missing: u64,
}

impl StripePlan {
    pub fn new(size: u64) -> Self {
        Self {
            size,
            next: 0,
            again: BTreeSet::new(),
            done: BTreeMap::new(),
            under_way: BTreeMap::new(),
            first_missing: 0,
        }
    }

    pub fn stripes(&self) -> u64 {
        self.size.div_ceil(STRIPE)
    }

    /// The NAR bytes of stripe `i`.
    pub fn range(&self, i: u64) -> Range<u64> {
        i * STRIPE..((i + 1) * STRIPE).min(self.size)
    }

    /// A stripe for a free holder: one handed back, else the next new one
    /// inside the window, else (the window is full) the first missing one
    /// if only one holder fetches it. `None`: nothing for it to do now.
    pub fn take(&mut self) -> Option<u64> {
        let i = if let Some(i) = self.again.pop_first() {
            i
        } else if self.next < self.stripes() && self.next < self.first_missing + WINDOW {
            self.next += 1;
            self.next - 1
        } else if self.under_way.get(&self.first_missing) == Some(&1) {
            self.first_missing
        } else {
            return None;
        };
        *self.under_way.entry(i).or_default() += 1;
        Some(i)
    }

    /// Stripe `i` arrived from `from`. A copy of a stripe already in is
    /// ignored.
    pub fn arrived(&mut self, i: u64, bytes: Bytes, from: Origin) {
        self.leave(i);
        if i >= self.first_missing {
            self.done.entry(i).or_insert((bytes, from));
            self.under_way.remove(&i);
            self.again.remove(&i);
        }
    }

    /// Stripe `i`'s holder failed: someone else must fetch it, unless
    /// another holder already does or it is in.
    pub fn failed(&mut self, i: u64) {
        self.leave(i);
        let wanted = i >= self.first_missing && !self.done.contains_key(&i);
        if wanted && !self.under_way.contains_key(&i) {
            self.again.insert(i);
        }
    }

    fn leave(&mut self, i: u64) {
        if let Some(n) = self.under_way.get_mut(&i) {
            *n -= 1;
            if *n == 0 {
                self.under_way.remove(&i);
            }
        }
    }

    /// Whether the next stripe in order is in.
    pub fn is_ready(&self) -> bool {
        self.done.contains_key(&self.first_missing)
    }

    /// The next stripe in order, if it is in, and who sent it.
    pub fn pop_ready(&mut self) -> Option<(Bytes, Origin)> {
        let bytes = self.done.remove(&self.first_missing)?;
        self.first_missing += 1;
        Some(bytes)
    }

    pub fn finished(&self) -> bool {
        self.first_missing == self.stripes()
    }
}

/// How a striped fetch ended.
pub enum Striped {
    /// Every byte verified and went to the consumer. The holders that sent
    /// stripes.
    Done(Vec<NodeId>),
    /// The NAR did not match its hash; these holders sent parts of it.
    /// `Prefixes` tells the liar apart once the NAR came whole from one
    /// holder.
    Mismatch(Vec<NodeId>, Prefixes),
    /// The consumer left.
    ClientGone,
    /// No holder could send a stripe any more.
    NoHolder { offset: u64 },
}

/// Who sent each stripe of a striped fetch (and whether in the clear), and
/// the SHA-256 of the NAR up to that stripe's end as it arrived. A later
/// fetch of the whole NAR that verifies finds the first stripe where its
/// prefix digest differs: that stripe's sender lied, or, if the stripe
/// came in the clear, maybe a host on the path (`first_liar`).
#[derive(Clone, Debug, Default)]
pub struct Prefixes(pub Vec<(Origin, [u8; 32])>);

impl Prefixes {
    /// Given the prefix digests of a verified copy at the same stripe
    /// ends, where the stripe that first differs came from.
    pub fn first_liar(&self, verified: &[[u8; 32]]) -> Option<Origin> {
        self.0
            .iter()
            .zip(verified)
            .find(|((_, seen), good)| seen != *good)
            .map(|((origin, _), _)| *origin)
    }
}

/// The level to ask `node` for over a bulk connection, from its transfers
/// so far (or all peers', for a holder not yet measured). Taken once per
/// NAR: kept frames are kept per level, and with
/// two stripes sharing the holder's link each stripe's rate sits near the
/// slow-link mark, so levels chosen stripe by stripe flipped between 1
/// and 3, and the holder packed afresh what it had kept at the other.
fn bulk_level(resolver: &Resolver, node: &NodeId) -> u8 {
    let (link, all) = resolver.mesh().links(node);
    resolver.compression().bulk_level(&link, &all)
}

/// One stripe from one holder, whole, or why not.
async fn fetch_stripe(
    resolver: &Resolver,
    node: NodeId,
    narinfo: &NarInfo,
    part: Range<u64>,
    bulk_level: u8,
    buffers: &ChunkBuffers,
) -> Result<Arrived, StripeError> {
    let info = &narinfo.info;
    let mesh = resolver.mesh();
    let conn = mesh
        .connection(node)
        .await
        .map_err(|e| StripeError::Failed(e.to_string()))?;
    if transport::version(&conn) < 3 {
        return Err(StripeError::Failed("it speaks no version 3".into()));
    }
    let (link, all) = mesh.links(&node);
    let level = resolver.compression().level(&link, &all).or(Some(0));
    let want = part.end - part.start;
    let began = Instant::now();
    let opened = mesh
        .open_nar_part(
            node,
            &conn,
            &info.path.hash_part(),
            &info.nar_hash,
            part,
            want,
            level,
            bulk_level,
            STALL_TIMEOUT,
        )
        .await;
    let mut reader = match opened {
        Ok(Some((size, reader))) if size == info.nar_size => reader,
        Ok(Some(_)) => return Err(StripeError::Failed("it has another NAR size".into())),
        Ok(None) => return Err(StripeError::Failed("no longer has it".into())),
        Err(e) => return Err(StripeError::Failed(e.to_string())),
    };
    mesh.count(&node, |c| c.requests_made += 1);
    let clear = reader.in_the_clear();
    let lied = |reason: String| StripeError::Lied { reason, clear };
    // Chunks are read and inflated straight into the stripe's buffer. A
    // kept one was filled before: no zeroing.
    let mut bytes = buffers.take_len(want as usize);
    let mut filled = 0;
    loop {
        match tokio::time::timeout(STALL_TIMEOUT, reader.next_into(&mut bytes[filled..])).await {
            Err(_) => {
                reader.stop(code::CANCELLED);
                return Err(StripeError::Failed(format!(
                    "stalled for {STALL_TIMEOUT:?}"
                )));
            }
            // Cut off after the stripe's last byte (the holder died
            // before its `DONE`): the stripe is whole.
            Ok(Err(NarReadError::Bulk(e)))
                if e.kind() == std::io::ErrorKind::UnexpectedEof && filled as u64 == want =>
            {
                break
            }
            Ok(Err(
                e @ (NarReadError::Read(_) | NarReadError::Bulk(_) | NarReadError::Stopped(_)),
            )) => return Err(StripeError::Failed(e.to_string())),
            Ok(Err(NarReadError::Overflow)) => {
                reader.stop(code::MALFORMED);
                return Err(lied("more bytes than the stripe has".into()));
            }
            Ok(Err(e)) => {
                reader.stop(code::MALFORMED);
                return Err(lied(e.to_string()));
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(n))) => filled += n,
        }
    }
    if (filled as u64) < want {
        return Err(StripeError::Failed(format!(
            "stripe ended after {filled} bytes"
        )));
    }
    mesh.count(&node, |c| c.bytes_fetched += want);
    Ok(Arrived {
        clear,
        waits: reader.waits(),
        bytes: buffers.lend(bytes),
        packed: crate::fetch::compression::came_packed(
            level,
            reader.is_bulk(),
            want,
            reader.wire_bytes(),
        ),
        wire: reader.wire_bytes().unwrap_or(want),
        began,
        ended: Instant::now(),
    })
}

/// A stripe that came whole, and what its transfer saw of the link.
struct Arrived {
    bytes: Bytes,
    /// It came on a plain bulk connection.
    clear: bool,
    /// Of its frames, how many had arrived when the asker came for them.
    waits: Waits,
    /// It came compressed.
    packed: bool,
    /// Its bytes on the wire.
    wire: u64,
    began: Instant,
    ended: Instant,
}

/// What one holder's stripes of a NAR saw of its link. Its stripes
/// overlap (two are under way at once, sharing the link), so each stripe's
/// own rate is a share of the link's, and the time of a pair that began
/// together is nearly all shared. The holder's link time is the union of
/// its stripes' spans, recorded once per NAR.
#[derive(Debug, Default)]
struct HolderLink {
    nar: u64,
    /// Of `nar`, what came packed.
    packed: u64,
    wire: u64,
    secs: f64,
    /// The latest arrival so far.
    last: Option<Instant>,
}

impl HolderLink {
    /// A stripe of `nar` bytes, `wire` on the wire, asked for at `began`,
    /// whole at `ended`. Each adds the part of its span past the latest
    /// arrival before it (stripes are taken in about the order they end).
    fn add(&mut self, nar: u64, wire: u64, packed: bool, began: Instant, ended: Instant) {
        let from = self.last.map_or(began, |last| last.max(began));
        self.secs += ended.saturating_duration_since(from).as_secs_f64();
        self.last = Some(self.last.map_or(ended, |last| last.max(ended)));
        self.nar += nar;
        self.wire += wire;
        if packed {
            self.packed += nar;
        }
    }

    /// Whether most of it came packed.
    fn came_packed(&self) -> bool {
        self.packed * 2 > self.nar
    }
}

/// Sends `bytes` to Nix's relay in pieces of one chunk at most, as a fetch
/// from one holder sends them: the relay's queue then holds a few pieces,
/// and so only the few stripes they are cut from (a piece shares its
/// stripe's memory), not as many whole stripes. False once the consumer is
/// gone.
async fn send_in_pieces(bytes: Bytes, tx: &mpsc::Sender<Result<Bytes, FetchError>>) -> bool {
    for piece in pieces(bytes, nar_chunks::CHUNK) {
        if tx.send(Ok(piece)).await.is_err() {
            return false;
        }
    }
    true
}

/// `bytes` cut into pieces of at most `max` bytes, in order, sharing its
/// memory. Pure.
fn pieces(mut bytes: Bytes, max: usize) -> impl Iterator<Item = Bytes> {
    std::iter::from_fn(move || {
        if bytes.is_empty() {
            return None;
        }
        let n = bytes.len().min(max.max(1));
        Some(bytes.split_to(n))
    })
}

enum StripeError {
    Failed(String),
    /// `clear`: the stripe came on a plain bulk connection.
    Lied {
        reason: String,
        clear: bool,
    },
}

/// Fetches `narinfo`'s NAR in stripes from `holders`, checks it, and
/// sends the bytes inside `window` into `tx` in order (the last piece once
/// the whole NAR verified, as the single-holder relay does).
///
/// Fetching and passing on run side by side: Nix takes the bytes at its
/// own pace, and a fetch loop that waited for it (and for the hashing, in
/// the same loop) left the holders' links idle between requests (a third
/// of a striped transfer's time here). The two share a task, so the loop
/// still waits while a stripe is hashed (about a millisecond of CPU), but
/// each holder has a second stripe under way meanwhile.
pub async fn fetch_striped(
    resolver: &Arc<Resolver>,
    narinfo: &NarInfo,
    holders: Vec<NodeId>,
    window: Range<u64>,
    tx: &mpsc::Sender<Result<Bytes, FetchError>>,
) -> Striped {
    let info = &narinfo.info;
    let check = NarCheck::new(info.nar_size, info.nar_hash, window);
    // One stripe waits between the two; the rest wait in the fetch's
    // window, which bounds memory.
    let (ordered_tx, ordered) = mpsc::channel(1);
    let (contributors, (passed, prefixes)) = tokio::join!(
        fetch_in_order(resolver, narinfo, holders, ordered_tx),
        pass_on(check, ordered, tx),
    );
    match passed {
        Passed::Done => Striped::Done(contributors),
        Passed::Mismatch => Striped::Mismatch(contributors, prefixes),
        Passed::NotANar(from) => {
            let why = "sent a stripe that is not a NAR";
            relay::blame(resolver, from.node, from.clear, why);
            Striped::Mismatch(contributors, prefixes)
        }
        Passed::ClientGone => Striped::ClientGone,
        Passed::Short { offset } => Striped::NoHolder { offset },
    }
}

/// Fetches the stripes from `holders` and hands them to `ordered` in
/// order, until all are handed on, no holder can send what is missing, or
/// `ordered`'s reader left. The holders that sent stripes.
async fn fetch_in_order(
    resolver: &Arc<Resolver>,
    narinfo: &NarInfo,
    holders: Vec<NodeId>,
    ordered: mpsc::Sender<(Bytes, Origin)>,
) -> Vec<NodeId> {
    let info = &narinfo.info;
    let mut plan = StripePlan::new(info.nar_size);
    // Two stripes under way per holder: the next request is on its way
    // while a stripe is still arriving, so no holder's link idles.
    let mut idle: Vec<NodeId> = holders.iter().flat_map(|&h| [h, h]).collect();
    let mut contributors: Vec<NodeId> = Vec::new();
    // Stripe buffers, used again once the relay has sent a stripe's pieces:
    // a fresh 2 MiB per stripe faulted in every page of it.
    let buffers = ChunkBuffers::new(STRIPE as usize, (WINDOW + PASSING) as usize);
    let narinfo = Arc::new(narinfo.clone());
    // Each holder's stripes at the level its transfers so far call for,
    // or raw where the asker, not the link, holds them back, going on from
    // what the striped NARs before learnt of it.
    let mut levels: HashMap<NodeId, RawStripes> = holders
        .iter()
        .map(|&h| (h, resolver.raw_stripes(&h, bulk_level(resolver, &h))))
        .collect();
    let mut links: HashMap<NodeId, HolderLink> = HashMap::new();
    // Each stripe is a task of its own, so the runtime's threads unpack
    // stripes side by side, and this loop and the hashing beside it are
    // never held up behind a stripe's unpacking. Dropping the set (the
    // fetch is over or abandoned) aborts what is still under way.
    let mut fetches = JoinSet::new();
    while !plan.finished() {
        while let Some(node) = idle.first().copied() {
            let Some(i) = plan.take() else { break };
            idle.remove(0);
            let part = plan.range(i);
            let level = levels.get_mut(&node).map_or(0, RawStripes::level);
            let (resolver, narinfo, buffers) = (resolver.clone(), narinfo.clone(), buffers.clone());
            fetches.spawn(async move {
                let stripe = fetch_stripe(&resolver, node, &narinfo, part, level, &buffers).await;
                (node, i, level, stripe)
            });
        }
        let ready = plan.is_ready();
        if fetches.is_empty() && !ready {
            // Holders left, but none of them can take what is missing.
            break;
        }
        tokio::select! {
            Some(joined) = fetches.join_next(), if !fetches.is_empty() => {
                let (node, i, level, result) = match joined {
                    Ok(done) => done,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    // Cancelled: the runtime is shutting down.
                    Err(_) => break,
                };
                match result {
                    Ok(arrived) => {
                        let nar = arrived.bytes.len() as u64;
                        links.entry(node).or_default().add(nar, arrived.wire, arrived.packed, arrived.began, arrived.ended);
                        if let Some(stripes) = levels.get_mut(&node) {
                            let secs = arrived.ended.saturating_duration_since(arrived.began).as_secs_f64();
                            stripes.arrived(level, nar, arrived.wire, secs, arrived.waits);
                            if level == 0 {
                                tracing::debug!(peer = %node, stripe = i, rate = nar as f64 / secs, ?stripes, "a raw stripe came");
                            }
                        }
                        let from = Origin { node, clear: arrived.clear };
                        plan.arrived(i, arrived.bytes, from);
                        if !contributors.contains(&node) {
                            contributors.push(node);
                        }
                        idle.push(node);
                    }
                    Err(StripeError::Failed(reason)) => {
                        tracing::warn!(path = %info.path, peer = %node, stripe = i, %reason, "a holder failed a stripe; it is asked elsewhere");
                        plan.failed(i);
                    }
                    Err(StripeError::Lied { reason, clear }) => {
                        tracing::warn!(peer = %node, path = %info.path, %reason, "a holder sent a wrong stripe");
                        relay::blame(resolver, node, clear, &reason);
                        plan.failed(i);
                    }
                }
            }
            room = ordered.reserve(), if ready => match (room, plan.pop_ready()) {
                (Ok(room), Some(stripe)) => room.send(stripe),
                // The NAR failed its check, or the client left.
                (Err(_), _) => break,
                (Ok(_), None) => {}
            },
            () = ordered.closed() => break,
        }
    }
    // What is still under way (second copies of a stripe, or everything
    // when the fetch ended early) is stopped, and gone before this returns.
    fetches.shutdown().await;
    for (node, stripes) in &levels {
        tracing::debug!(peer = %node, ?stripes, "stripe levels after a striped NAR");
    }
    resolver.keep_raw_stripes(levels);
    for (node, link) in &links {
        resolver.mesh().record_link(node, |stats| {
            let packed = link.came_packed();
            crate::fetch::compression::record(stats, packed, link.nar, link.wire, link.secs)
        });
    }
    contributors
}

/// How passing a striped NAR on ended.
enum Passed {
    /// Every byte verified and went to the consumer.
    Done,
    /// The NAR did not match its hash.
    Mismatch,
    /// The stripe this holder sent is not part of a NAR.
    NotANar(Origin),
    /// The consumer left.
    ClientGone,
    /// The stripes ended here, before the NAR did.
    Short { offset: u64 },
}

/// Checks the stripes from `ordered`, in order, and sends what `check`
/// releases into `tx`; with who sent each stripe and the NAR's digest up
/// to its end.
async fn pass_on(
    mut check: NarCheck,
    mut ordered: mpsc::Receiver<(Bytes, Origin)>,
    tx: &mpsc::Sender<Result<Bytes, FetchError>>,
) -> (Passed, Prefixes) {
    let mut prefixes = Prefixes::default();
    while let Some((stripe, from)) = ordered.recv().await {
        // Hashed here, on the task the fetch loop shares (the stripes'
        // unpacking runs in tasks of their own): handing each stripe to a
        // blocking thread and back cost two wake-ups, which on busy cores
        // took as long as the hash itself.
        for piece in pieces(stripe, nar_chunks::CHUNK) {
            let release = match check.on_chunk(piece) {
                Ok(r) => r,
                // Not a NAR: only a lie gets here.
                Err(_) => return (Passed::NotANar(from), prefixes),
            };
            if let Some(piece) = release {
                if !send_in_pieces(piece, tx).await {
                    return (Passed::ClientGone, prefixes);
                }
            }
        }
        prefixes.0.push((from, check.prefix_digest()));
    }
    let passed = match check.finish() {
        Verdict::Verified { last } => {
            let sent = match last {
                Some(last) => send_in_pieces(last, tx).await,
                None => true,
            };
            match sent {
                true => Passed::Done,
                false => Passed::ClientGone,
            }
        }
        Verdict::Mismatch => Passed::Mismatch,
        Verdict::Short { offset } => Passed::Short { offset },
    };
    (passed, prefixes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: Origin = Origin {
        node: NodeId([1; 32]),
        clear: false,
    };
    const M: Origin = Origin {
        node: NodeId([2; 32]),
        clear: false,
    };

    fn bytes(i: u64) -> Bytes {
        Bytes::from(vec![i as u8; 3])
    }

    #[test]
    fn overlapping_stripes_of_one_holder_count_its_link_time_once() {
        use std::time::Duration;
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let secs = |stripes: &[(u64, u64)]| {
            let mut link = HolderLink::default();
            for &(began, ended) in stripes {
                link.add(1000, 400, true, ms(began), ms(ended));
            }
            assert_eq!(
                (link.nar, link.wire),
                (1000 * stripes.len() as u64, 400 * stripes.len() as u64)
            );
            (link.secs * 1000.0).round() as u64
        };
        // A pair asked for at once, sharing the link, ends nearly together:
        // 81 ms of link time, whichever is taken first.
        assert_eq!(secs(&[(0, 80), (0, 81)]), 81);
        assert_eq!(secs(&[(0, 81), (0, 80)]), 81);
        // Staggered: each next stripe adds its time past the one before.
        assert_eq!(secs(&[(0, 40), (1, 60), (41, 100)]), 100);
        // A stripe asked for after the last arrived (the holder waited on
        // the window): the wait is not link time.
        assert_eq!(secs(&[(0, 40), (70, 100)]), 70);
    }

    #[test]
    fn a_holder_counts_as_packed_when_most_of_its_bytes_were() {
        let t = Instant::now();
        let mut link = HolderLink::default();
        link.add(1000, 400, true, t, t);
        link.add(1000, 1000, false, t, t);
        assert!(!link.came_packed());
        link.add(1000, 400, true, t, t);
        assert!(link.came_packed());
    }

    #[test]
    fn the_first_stripe_that_differs_names_the_liar() {
        // N's third stripe came in the clear, its first did not.
        let n_clear = Origin { clear: true, ..N };
        let seen = Prefixes(vec![(N, [1; 32]), (M, [2; 32]), (n_clear, [3; 32])]);
        assert_eq!(seen.first_liar(&[[1; 32], [9; 32], [8; 32]]), Some(M));
        assert_eq!(seen.first_liar(&[[1; 32], [2; 32], [8; 32]]), Some(n_clear));
        assert_eq!(seen.first_liar(&[[9; 32], [9; 32], [8; 32]]), Some(N));
        assert_eq!(seen.first_liar(&[[1; 32], [2; 32], [3; 32]]), None);
    }

    #[test]
    fn a_stripe_goes_to_the_relay_in_pieces_that_share_its_memory() {
        let stripe = Bytes::from((0..=255u8).cycle().take(1000).collect::<Vec<u8>>());
        let cut: Vec<Bytes> = pieces(stripe.clone(), 256).collect();
        assert_eq!(
            cut.iter().map(Bytes::len).collect::<Vec<_>>(),
            vec![256, 256, 256, 232]
        );
        assert_eq!(cut.concat(), stripe.to_vec());
        assert_eq!(cut[1].as_ptr(), stripe[256..].as_ptr());
        assert_eq!(pieces(Bytes::new(), 256).count(), 0);
    }

    #[test]
    fn stripes_come_out_in_order_within_the_window() {
        let mut plan = StripePlan::new(20 * STRIPE + 5);
        assert_eq!(plan.stripes(), 21);
        assert_eq!(plan.range(20), 20 * STRIPE..20 * STRIPE + 5);
        let taken: Vec<u64> = (0..WINDOW).filter_map(|_| plan.take()).collect();
        assert_eq!(taken, (0..WINDOW).collect::<Vec<_>>());
        // Window full: the first missing one goes to a second holder, once.
        assert_eq!(plan.take(), Some(0));
        assert_eq!(plan.take(), None);
        // Later stripes in first: nothing to pass on until stripe 0 is.
        plan.arrived(1, bytes(1), N);
        plan.arrived(2, bytes(2), N);
        assert!(plan.pop_ready().is_none());
        plan.arrived(0, bytes(0), N);
        // The second copy of 0 comes later and is ignored.
        plan.arrived(0, bytes(99), M);
        let out: Vec<(Bytes, Origin)> = std::iter::from_fn(|| plan.pop_ready()).collect();
        assert_eq!(out, vec![(bytes(0), N), (bytes(1), N), (bytes(2), N)]);
        assert_eq!(plan.take(), Some(WINDOW));
    }

    #[test]
    fn a_failed_stripe_is_fetched_again_first() {
        let mut plan = StripePlan::new(4 * STRIPE);
        let a = plan.take().unwrap();
        let b = plan.take().unwrap();
        plan.failed(a);
        assert_eq!(plan.take(), Some(a));
        plan.arrived(a, bytes(a), N);
        plan.arrived(b, bytes(b), N);
        // A holder that fails a stripe another already delivered changes
        // nothing.
        plan.failed(b);
        assert_eq!(plan.take(), Some(2));
        assert_eq!(plan.pop_ready(), Some((bytes(0), N)));
        assert_eq!(plan.pop_ready(), Some((bytes(1), N)));
        assert!(!plan.finished());
        plan.arrived(2, bytes(2), N);
        assert_eq!(plan.take(), Some(3));
        plan.arrived(3, bytes(3), N);
        assert_eq!(std::iter::from_fn(|| plan.pop_ready()).count(), 2);
        assert!(plan.finished());
    }

    #[test]
    fn a_stripe_two_holders_fetch_is_asked_again_only_if_both_fail() {
        let mut plan = StripePlan::new(WINDOW * STRIPE);
        for _ in 0..WINDOW {
            plan.take();
        }
        assert_eq!(plan.take(), Some(0));
        plan.failed(0);
        assert_eq!(plan.take(), Some(0), "one copy left under way: hedge again");
        plan.failed(0);
        plan.failed(0);
        assert_eq!(plan.take(), Some(0), "both failed: fetch it again");
    }
}
