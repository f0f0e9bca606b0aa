//! When to dial which peer. Pure: the health loop asks it which peers
//! without a connection are due, and tells it how each dial went.
//!
//! Three things keep a growing office from dialling itself into the ground
//! when many agents start at once (every agent learns of every other within
//! the same second):
//! - one dial per pair, not two: of two peers that learn of each other, the
//!   one with the lower key dials at once, the other waits `DEFER` for that
//!   connection before it dials itself (whoever connects first wins, and a
//!   connection serves both ways);
//! - a failed dial backs off (`FIRST_BACKOFF`, doubling to `MAX_BACKOFF`),
//!   with a jitter so that peers refused together do not retry together;
//! - a fresh announcement of a peer (it restarted, or came back) makes it
//!   due again at once.
//!
//! The limit on dials in flight at once is the node's (a semaphore), not
//! this plan's.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::mesh::identity::NodeId;

/// How long the peer with the higher key waits for the other to dial.
pub const DEFER: Duration = Duration::from_millis(1500);
pub const FIRST_BACKOFF: Duration = Duration::from_millis(1000);
pub const MAX_BACKOFF: Duration = Duration::from_secs(15);

#[derive(Debug)]
struct Attempts {
    /// Not before this.
    next: Instant,
    /// Failures in a row.
    failures: u32,
}

#[derive(Debug)]
pub struct DialPlan {
    own: NodeId,
    peers: HashMap<NodeId, Attempts>,
}

impl DialPlan {
    pub fn new(own: NodeId) -> Self {
        Self {
            own,
            peers: HashMap::new(),
        }
    }

    /// `node` was announced (for the first time, or again): due now if this
    /// node is the one to dial, else after `DEFER`. Forgets past failures.
    pub fn announced(&mut self, node: NodeId, now: Instant) {
        let next = if self.own.0 < node.0 {
            now
        } else {
            now + DEFER
        };
        self.peers.insert(node, Attempts { next, failures: 0 });
    }

    /// Whether to dial `node`, which has no connection, at `now`. A peer
    /// the plan has not heard of (a static peer, one left from before) is
    /// due at once.
    pub fn is_due(&self, node: &NodeId, now: Instant) -> bool {
        self.peers.get(node).is_none_or(|a| now >= a.next)
    }

    /// A dial is starting: no second one until it reports.
    pub fn dialling(&mut self, node: NodeId, now: Instant) {
        let failures = self.peers.get(&node).map_or(0, |a| a.failures);
        self.peers.insert(
            node,
            Attempts {
                next: now + MAX_BACKOFF,
                failures,
            },
        );
    }

    /// The dial failed; `jitter` in [0, 1) spreads the retry over the
    /// second half of the back-off.
    pub fn failed(&mut self, node: NodeId, now: Instant, jitter: f64) {
        let failures = self.peers.get(&node).map_or(0, |a| a.failures) + 1;
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (failures - 1).min(8))
            .min(MAX_BACKOFF);
        let wait = backoff.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        self.peers.insert(
            node,
            Attempts {
                next: now + wait,
                failures,
            },
        );
    }

    /// A connection to `node` exists (dialled or accepted): if it is lost,
    /// dial again after the first back-off.
    pub fn connected(&mut self, node: NodeId, now: Instant) {
        self.peers.insert(
            node,
            Attempts {
                next: now + FIRST_BACKOFF,
                failures: 0,
            },
        );
    }

    /// The peer left the table.
    pub fn forget(&mut self, node: &NodeId) {
        self.peers.remove(node);
    }

    /// Keeps the plan to the peers still in the table.
    pub fn retain(&mut self, keep: impl Fn(&NodeId) -> bool) {
        self.peers.retain(|n, _| keep(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn of_two_peers_only_the_lower_key_dials_at_once() {
        let (low, high) = (NodeId([1; 32]), NodeId([2; 32]));
        let now = Instant::now();
        let mut at_low = DialPlan::new(low);
        let mut at_high = DialPlan::new(high);
        at_low.announced(high, now);
        at_high.announced(low, now);
        assert!(at_low.is_due(&high, now));
        assert!(!at_high.is_due(&low, now));
        // If the lower one never dials, the higher one does.
        assert!(at_high.is_due(&low, now + DEFER));
    }

    #[test]
    fn failures_back_off_up_to_the_cap_and_an_announcement_resets() {
        let (own, peer) = (NodeId([1; 32]), NodeId([2; 32]));
        let mut plan = DialPlan::new(own);
        let mut now = Instant::now();
        plan.announced(peer, now);
        let mut waits = Vec::new();
        for _ in 0..8 {
            plan.dialling(peer, now);
            assert!(!plan.is_due(&peer, now + MAX_BACKOFF - Duration::from_millis(1)));
            plan.failed(peer, now, 0.999_999);
            let mut wait = Duration::ZERO;
            while !plan.is_due(&peer, now + wait) {
                wait += Duration::from_millis(10);
            }
            waits.push(wait);
            now += wait;
        }
        assert!(waits[0] >= Duration::from_millis(990) && waits[0] <= FIRST_BACKOFF);
        assert!(waits[1] > waits[0] && waits[2] > waits[1]);
        assert!(waits.iter().all(|&w| w <= MAX_BACKOFF));
        assert!(waits[7] >= MAX_BACKOFF - Duration::from_millis(10));
        plan.announced(peer, now);
        assert!(plan.is_due(&peer, now));
    }

    #[test]
    fn jitter_spreads_retries_over_the_second_half() {
        let (own, peer) = (NodeId([1; 32]), NodeId([2; 32]));
        let now = Instant::now();
        let mut plan = DialPlan::new(own);
        plan.failed(peer, now, 0.0);
        assert!(plan.is_due(&peer, now + FIRST_BACKOFF / 2));
        assert!(!plan.is_due(&peer, now + FIRST_BACKOFF / 2 - Duration::from_millis(1)));
    }

    #[test]
    fn unknown_peers_are_due_and_a_connection_defers_the_next_dial() {
        let (own, peer) = (NodeId([1; 32]), NodeId([2; 32]));
        let now = Instant::now();
        let mut plan = DialPlan::new(own);
        assert!(plan.is_due(&peer, now));
        plan.connected(peer, now);
        assert!(!plan.is_due(&peer, now));
        assert!(plan.is_due(&peer, now + FIRST_BACKOFF));
        plan.forget(&peer);
        assert!(plan.is_due(&peer, now));
    }
}
