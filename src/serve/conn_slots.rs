//! The connection slots of one HTTP listener: at most `MAX` connections at
//! once, and when all are taken a new connection gets the slot of the one
//! that has been idle longest (no request being answered: between
//! requests, or still sending its head). So a local program that opens
//! thousands of connections, or sends its request heads slowly, cannot
//! keep Nix out: each of Nix's connections pushes out one of the idle ones.
//! A connection is never pushed out while a response is on its way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use crate::lock::lock;

/// One connection's state, shared by its task and the slots.
pub struct Conn {
    /// Requests being answered (a response body still being sent counts).
    busy: AtomicUsize,
    /// When it last became idle: milliseconds since the slots were made.
    idle_since: AtomicU64,
    /// Told when the connection must give up its slot.
    pub evicted: Notify,
}

/// Held while a request is being answered; the connection is idle again
/// when the last one drops.
pub struct Busy {
    conn: Arc<Conn>,
    epoch: Instant,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.conn.idle_since.store(now, Ordering::Relaxed);
        self.conn.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct ConnSlots {
    epoch: Instant,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Default for ConnSlots {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        }
    }
}

impl ConnSlots {
    /// Registers a new connection; `leave` it when it ends.
    pub fn join(&self) -> (u64, Arc<Conn>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            evicted: Notify::new(),
        });
        lock(&self.conns).insert(id, conn.clone());
        (id, conn)
    }

    pub fn leave(&self, id: u64) {
        lock(&self.conns).remove(&id);
    }

    /// Marks `conn` busy until the returned guard drops.
    pub fn busy(&self, conn: &Arc<Conn>) -> Busy {
        conn.busy.fetch_add(1, Ordering::AcqRel);
        Busy {
            conn: conn.clone(),
            epoch: self.epoch,
        }
    }

    /// Tells the connection idle longest to give up its slot; false when
    /// every connection is answering a request.
    pub fn evict_idlest(&self) -> bool {
        let conns = lock(&self.conns);
        let idlest = conns
            .values()
            .filter(|c| c.busy.load(Ordering::Acquire) == 0)
            .min_by_key(|c| c.idle_since.load(Ordering::Relaxed));
        match idlest {
            Some(c) => {
                // Stays set if the task is not waiting yet.
                c.evicted.notify_one();
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.conns).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_connection_idle_longest_goes_first_and_busy_ones_never() {
        let slots = ConnSlots::default();
        let (_, first) = slots.join();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (_, second) = slots.join();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (third_id, third) = slots.join();
        // The first is answering a request: the second is idle longest.
        let guard = slots.busy(&first);
        assert!(slots.evict_idlest());
        tokio::time::timeout(Duration::from_secs(1), second.evicted.notified())
            .await
            .expect("the second was told");
        // Once the first is idle again it is the most recently active.
        drop(guard);
        slots.leave(third_id);
        assert_eq!(slots.len(), 2);
        assert!(slots.evict_idlest());
        tokio::time::timeout(Duration::from_secs(1), second.evicted.notified())
            .await
            .expect("the second again, not the first");
        let _ = third;
    }

    #[test]
    fn nothing_to_evict_when_all_are_busy() {
        let slots = ConnSlots::default();
        let (_, a) = slots.join();
        let _busy = slots.busy(&a);
        assert!(!slots.evict_idlest());
        assert!(!ConnSlots::default().evict_idlest());
    }
}
