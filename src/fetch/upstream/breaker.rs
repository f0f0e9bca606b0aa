//! When to leave an upstream cache alone for a while. Pure: an upstream
//! that failed (unreachable, timed out, answered 5xx or garbage) costs its
//! timeout once and is then skipped for `skip`, so an office that is offline
//! sees no delay at all; after `skip` one request tries it again.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Asked as usual.
    Closed,
    /// Skipped until the instant.
    Open { until: Instant },
}

#[derive(Debug)]
pub struct Breaker {
    skip: Duration,
    state: BreakerState,
    /// Failures in a row.
    failures: u32,
}

impl Breaker {
    pub fn new(skip: Duration) -> Self {
        Self {
            skip,
            state: BreakerState::Closed,
            failures: 0,
        }
    }

    /// Whether to ask this upstream at `now`.
    pub fn allows(&self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open { until } => now >= until,
        }
    }

    /// It answered (a 200 or a 404 both count).
    pub fn succeeded(&mut self) {
        self.state = BreakerState::Closed;
        self.failures = 0;
    }

    /// It failed: skipped for `skip` from `now`.
    pub fn failed(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        self.state = BreakerState::Open {
            until: now + self.skip,
        };
    }

    pub fn is_open(&self, now: Instant) -> bool {
        !self.allows(now)
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_skips_the_upstream_for_a_while_and_an_answer_closes_it() {
        let skip = Duration::from_secs(30);
        let mut b = Breaker::new(skip);
        let now = Instant::now();
        assert!(b.allows(now));
        b.failed(now);
        assert!(!b.allows(now + Duration::from_secs(29)));
        assert!(b.is_open(now + Duration::from_secs(1)));
        // After the pause, one try; a second failure opens it again.
        assert!(b.allows(now + skip));
        b.failed(now + skip);
        assert_eq!(b.failures(), 2);
        assert!(!b.allows(now + skip + Duration::from_secs(1)));
        b.succeeded();
        assert!(b.allows(now + skip + Duration::from_secs(1)));
        assert_eq!(b.failures(), 0);
    }
}
