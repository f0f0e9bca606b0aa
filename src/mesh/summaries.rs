//! What each peer says it shares: the summaries peers of protocol 4 send
//! (32-bit fingerprints of hash parts, the whole set and then changes),
//! kept per peer with limits. A pure state machine: the feed
//! (`summary_feed`) applies the frames it reads, the resolver asks
//! `verdict` before it sends a look-up, and counts the peers whose
//! summary said yes and whose answer was no.
//!
//! A false positive costs one request, as before summaries: with 32-bit
//! fingerprints a path a peer of n paths does not have matches with
//! probability n / 2^32 (2.3e-5 for 100,000 paths).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::mesh::identity::NodeId;

/// Most fingerprints kept for one peer (4 MiB of them at most, 8 with the
/// set's overhead); a peer whose summary grows past it is asked about
/// every path, as before summaries.
pub const MAX_PATHS_PER_PEER: usize = 1 << 20;
/// Summary frames a peer may send after its first complete summary, in a
/// burst and then per second: the agent announces changes at most ten
/// times a second, in parts of 65,536.
pub const FRAME_BURST: f64 = 64.0;
pub const FRAMES_PER_SECOND: f64 = 16.0;
/// Answers of "no" to a path the summary listed, in a row, before the
/// summary is fetched anew (a peer whose summary lags or lies).
pub const WRONG_BEFORE_REFRESH: u32 = 4;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SummaryError {
    #[error("the summary lists more than {MAX_PATHS_PER_PEER} paths")]
    TooLarge,
    #[error("summary frames come faster than {FRAMES_PER_SECOND}/s")]
    Flood,
}

/// What a peer's summary says of a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It lists the path (or one with the same fingerprint).
    MayHold,
    /// A complete summary without it: no need to ask.
    DoesNotHold,
    /// No complete summary (an older agent, or one still arriving): ask.
    Unknown,
}

#[derive(Debug)]
struct PeerSummary {
    /// Which subscription this is (a new one starts afresh).
    generation: u64,
    set: HashSet<u32>,
    complete: bool,
    updated: Instant,
    /// Frame budget after completion (a token bucket).
    tokens: f64,
    refilled: Instant,
    /// "No" answers in a row to paths it listed; all of them since start.
    wrong_in_a_row: u32,
    wrong: u64,
}

impl PeerSummary {
    /// No summary (until a new subscription): nothing listed, memory
    /// returned, the counts kept.
    fn reset(&mut self) {
        self.generation = 0;
        self.set = HashSet::new();
        self.complete = false;
    }
}

/// What `nixmesh peers` shows of a peer's summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryView {
    /// Distinct fingerprints listed.
    pub paths: u64,
    /// Whether the whole set has arrived.
    pub complete: bool,
    /// Since the last change arrived.
    pub age_ms: u64,
    /// Look-ups it listed that the peer then answered "no".
    pub wrong: u64,
}

#[derive(Debug, Default)]
pub struct Summaries {
    peers: HashMap<NodeId, PeerSummary>,
    next_generation: u64,
}

impl Summaries {
    pub fn new() -> Self {
        Self::default()
    }

    /// A subscription to `node`'s summary starts: what came before is
    /// dropped. Returns its generation, which later calls name.
    pub fn start(&mut self, node: NodeId, now: Instant) -> u64 {
        self.next_generation += 1;
        let wrong = self.peers.get(&node).map_or(0, |p| p.wrong);
        self.peers.insert(
            node,
            PeerSummary {
                generation: self.next_generation,
                set: HashSet::new(),
                complete: false,
                updated: now,
                tokens: FRAME_BURST,
                refilled: now,
                wrong_in_a_row: 0,
                wrong,
            },
        );
        self.next_generation
    }

    /// The subscription `generation` ended: `node` is asked about every
    /// path until a new one completes (what it got wrong stays counted).
    pub fn end(&mut self, node: &NodeId, generation: u64) {
        if let Some(p) = self.current(node, generation) {
            p.reset();
        }
    }

    fn current(&mut self, node: &NodeId, generation: u64) -> Option<&mut PeerSummary> {
        self.peers
            .get_mut(node)
            .filter(|p| p.generation == generation)
    }

    /// Applies one `SummaryPart`. An error ends the subscription (the
    /// caller resets the stream); a part of an ended one is ignored.
    pub fn apply(
        &mut self,
        node: &NodeId,
        generation: u64,
        added: &[u32],
        removed: &[u32],
        complete: bool,
        now: Instant,
    ) -> Result<(), SummaryError> {
        let Some(p) = self.current(node, generation) else {
            return Ok(());
        };
        if p.complete {
            let elapsed = now.saturating_duration_since(p.refilled).as_secs_f64();
            p.tokens = (p.tokens + elapsed * FRAMES_PER_SECOND).min(FRAME_BURST);
            p.refilled = now;
            if p.tokens < 1.0 {
                p.reset();
                return Err(SummaryError::Flood);
            }
            p.tokens -= 1.0;
        }
        for fp in removed {
            p.set.remove(fp);
        }
        p.set.extend(added);
        if p.set.len() > MAX_PATHS_PER_PEER {
            p.reset();
            return Err(SummaryError::TooLarge);
        }
        p.complete |= complete;
        p.updated = now;
        Ok(())
    }

    pub fn verdict(&self, node: &NodeId, fingerprint: u32) -> Verdict {
        match self.peers.get(node) {
            Some(p) if p.complete => {
                if p.set.contains(&fingerprint) {
                    Verdict::MayHold
                } else {
                    Verdict::DoesNotHold
                }
            }
            _ => Verdict::Unknown,
        }
    }

    /// `node`'s summary listed a path and it answered "no". True when its
    /// summary should be fetched anew.
    pub fn said_no(&mut self, node: &NodeId) -> bool {
        let Some(p) = self.peers.get_mut(node) else {
            return false;
        };
        p.wrong += 1;
        p.wrong_in_a_row += 1;
        if p.wrong_in_a_row >= WRONG_BEFORE_REFRESH {
            p.wrong_in_a_row = 0;
            return true;
        }
        false
    }

    /// `node`'s summary listed a path and it had it.
    pub fn said_yes(&mut self, node: &NodeId) {
        if let Some(p) = self.peers.get_mut(node) {
            p.wrong_in_a_row = 0;
        }
    }

    pub fn forget(&mut self, node: &NodeId) {
        self.peers.remove(node);
    }

    pub fn view(&self, node: &NodeId, now: Instant) -> Option<SummaryView> {
        self.peers.get(node).map(|p| SummaryView {
            paths: p.set.len() as u64,
            complete: p.complete,
            age_ms: now.saturating_duration_since(p.updated).as_millis() as u64,
            wrong: p.wrong,
        })
    }

    /// Complete summaries held, and the fingerprints in them.
    pub fn totals(&self) -> (usize, usize) {
        let complete = self.peers.values().filter(|p| p.complete);
        complete.fold((0, 0), |(n, fps), p| (n + 1, fps + p.set.len()))
    }
}

/// How long to wait for the first peer asked before asking the next one
/// that may hold a path: a few round trips, at least enough for a busy
/// agent to answer.
pub fn hedge_after(srtt: Option<Duration>) -> Duration {
    let rtt = srtt.unwrap_or(Duration::from_millis(5));
    (rtt * 4).clamp(Duration::from_millis(10), Duration::from_millis(100))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId([1; 32]);

    #[test]
    fn a_summary_counts_once_complete_and_follows_changes() {
        let t0 = Instant::now();
        let mut s = Summaries::new();
        assert_eq!(s.verdict(&A, 5), Verdict::Unknown);
        let g = s.start(A, t0);
        s.apply(&A, g, &[5, 6], &[], false, t0).unwrap();
        assert_eq!(s.verdict(&A, 5), Verdict::Unknown, "still arriving");
        s.apply(&A, g, &[7], &[], true, t0).unwrap();
        assert_eq!(s.verdict(&A, 5), Verdict::MayHold);
        assert_eq!(s.verdict(&A, 8), Verdict::DoesNotHold);
        s.apply(&A, g, &[8], &[5], true, t0).unwrap();
        assert_eq!(s.verdict(&A, 5), Verdict::DoesNotHold);
        assert_eq!(s.verdict(&A, 8), Verdict::MayHold);
        assert_eq!(s.view(&A, t0).unwrap().paths, 3);
        assert_eq!(s.totals(), (1, 3));
    }

    #[test]
    fn an_old_subscription_changes_nothing_and_an_ended_one_means_ask() {
        let t0 = Instant::now();
        let mut s = Summaries::new();
        let old = s.start(A, t0);
        let new = s.start(A, t0);
        s.apply(&A, old, &[1], &[], true, t0).unwrap();
        assert_eq!(s.verdict(&A, 1), Verdict::Unknown);
        s.apply(&A, new, &[2], &[], true, t0).unwrap();
        s.end(&A, old);
        assert_eq!(s.verdict(&A, 2), Verdict::MayHold, "the old one ended");
        s.end(&A, new);
        assert_eq!(s.verdict(&A, 2), Verdict::Unknown);
    }

    #[test]
    fn too_large_or_too_fast_ends_the_summary() {
        let t0 = Instant::now();
        let mut s = Summaries::new();
        let g = s.start(A, t0);
        let many: Vec<u32> = (0..=MAX_PATHS_PER_PEER as u32).collect();
        assert_eq!(
            s.apply(&A, g, &many, &[], false, t0),
            Err(SummaryError::TooLarge)
        );
        assert_eq!(s.verdict(&A, 1), Verdict::Unknown);
        // The first dump may take as many frames as it needs; changes
        // after it are rationed.
        let g = s.start(A, t0);
        for _ in 0..1000 {
            s.apply(&A, g, &[1], &[], false, t0).unwrap();
        }
        s.apply(&A, g, &[], &[], true, t0).unwrap();
        let mut sent = 0;
        let flood = loop {
            match s.apply(&A, g, &[2], &[], true, t0) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(flood, SummaryError::Flood);
        assert_eq!(sent, FRAME_BURST as usize);
        // At the steady rate, none is refused.
        let g = s.start(A, t0);
        s.apply(&A, g, &[], &[], true, t0).unwrap();
        for i in 0..1000u32 {
            let at = t0 + Duration::from_millis(u64::from(i) * 1000 / 15);
            s.apply(&A, g, &[i], &[], true, at).unwrap();
        }
    }

    #[test]
    fn answers_of_no_to_listed_paths_ask_for_a_refresh() {
        let t0 = Instant::now();
        let mut s = Summaries::new();
        let g = s.start(A, t0);
        s.apply(&A, g, &[1], &[], true, t0).unwrap();
        for _ in 1..WRONG_BEFORE_REFRESH {
            assert!(!s.said_no(&A));
        }
        s.said_yes(&A);
        for _ in 1..WRONG_BEFORE_REFRESH {
            assert!(!s.said_no(&A));
        }
        assert!(s.said_no(&A), "four in a row");
        assert_eq!(s.view(&A, t0).unwrap().wrong, 7);
        // A new subscription keeps the count for `nixmesh peers`.
        s.start(A, t0);
        assert_eq!(s.view(&A, t0).unwrap().wrong, 7);
    }

    #[test]
    fn the_hedge_is_a_few_round_trips_within_bounds() {
        assert_eq!(hedge_after(None), Duration::from_millis(20));
        assert_eq!(
            hedge_after(Some(Duration::from_micros(100))),
            Duration::from_millis(10)
        );
        assert_eq!(
            hedge_after(Some(Duration::from_millis(8))),
            Duration::from_millis(32)
        );
        assert_eq!(
            hedge_after(Some(Duration::from_secs(1))),
            Duration::from_millis(100)
        );
    }
}
