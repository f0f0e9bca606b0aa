//! Fetches small NARs before Nix asks for them. Nix first asks for the
//! narinfo of every path in a closure, then downloads the NARs one at a
//! time. Starting each small NAR's fetch as soon as its narinfo is served
//! turns those one-by-one round trips to peers into parallel ones, and Nix's
//! own download becomes a copy out of memory.
//!
//! Only whole, verified NARs are kept: they come through the same relay as
//! Nix's downloads, which withholds a NAR's end until it matches its hash.
//! Memory is bounded by a byte budget and a size limit per NAR, so big NARs
//! always stream and memory stays flat however large a NAR is. Owns nothing
//! but its table of NARs fetched ahead; asks the resolver and the relay for
//! everything else.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, watch, Semaphore};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::fetch::relay::{self, FetchStats, Purpose};
use crate::fetch::resolver::{Found, Resolver};
use crate::lock::lock;
use crate::mesh::identity::NodeId;
use crate::nix::{HashPart, Sha256Hash, StorePath};

/// NARs bigger than this are never fetched ahead.
pub const MAX_NAR: u64 = 4 << 20;
/// Fetches ahead running at once; more wait their turn.
pub const PARALLEL: usize = 8;
/// A NAR fetched ahead that Nix has not asked for by then is dropped.
pub const KEEP: Duration = Duration::from_secs(120);
/// Old entries are looked for at most this often.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Chunks buffered between the relay and the collector.
const DEPTH: usize = 8;

#[derive(Default)]
pub struct PrefetchStats {
    pub started: Counter,
    /// NARs Nix got out of memory.
    pub served: Counter,
    pub failed: Counter,
    /// Fetched but never asked for, or dropped before their turn came.
    pub unused: Counter,
    /// Bytes held now.
    pub held_bytes: Gauge<u64, AtomicU64>,
}

impl PrefetchStats {
    pub fn register(&self, registry: &mut Registry) {
        let counters = [
            (
                "nixmesh_prefetch_started",
                "Small NARs fetched ahead of Nix",
                &self.started,
            ),
            (
                "nixmesh_prefetch_served",
                "NARs Nix got from memory, fetched ahead",
                &self.served,
            ),
            (
                "nixmesh_prefetch_failed",
                "Fetches ahead that did not deliver a verified NAR",
                &self.failed,
            ),
            (
                "nixmesh_prefetch_unused",
                "NARs fetched ahead that Nix never asked for in time",
                &self.unused,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "nixmesh_prefetch_held_bytes",
            "Bytes of NARs fetched ahead held in memory now",
            self.held_bytes.clone(),
        );
    }
}

#[derive(Clone)]
enum Phase {
    Queued,
    Fetching,
    Ready { nar: Bytes, peer: NodeId },
    Failed,
}

struct Entry {
    id: u64,
    path: StorePath,
    nar_hash: Sha256Hash,
    size: u64,
    at: Instant,
    phase: watch::Receiver<Phase>,
}

#[derive(Default)]
struct Table {
    entries: HashMap<HashPart, Entry>,
    /// Bytes promised to entries, fetched or not.
    reserved: u64,
    next_id: u64,
    swept: Option<Instant>,
}

impl Table {
    /// Makes room for a NAR of `size` bytes if it is small enough, not
    /// already here, and fits in `budget`; returns its id and the sender
    /// its fetch reports through.
    fn admit(
        &mut self,
        path: &StorePath,
        nar_hash: Sha256Hash,
        size: u64,
        budget: u64,
        now: Instant,
    ) -> Option<(u64, watch::Sender<Phase>)> {
        let hash = path.hash_part();
        if size > MAX_NAR.min(budget)
            || self.entries.contains_key(&hash)
            || self.reserved + size > budget
        {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.reserved += size;
        let (tx, rx) = watch::channel(Phase::Queued);
        let entry = Entry {
            id,
            path: path.clone(),
            nar_hash,
            size,
            at: now,
            phase: rx,
        };
        self.entries.insert(hash, entry);
        Some((id, tx))
    }

    fn remove(&mut self, hash: &HashPart, id: Option<u64>) -> Option<Entry> {
        if id.is_some_and(|id| self.entries.get(hash).is_none_or(|e| e.id != id)) {
            return None;
        }
        let entry = self.entries.remove(hash)?;
        self.reserved -= entry.size;
        Some(entry)
    }

    /// Drops entries older than `KEEP`; returns how many.
    fn sweep(&mut self, now: Instant) -> u64 {
        if self
            .swept
            .is_some_and(|t| now.duration_since(t) < SWEEP_EVERY)
        {
            return 0;
        }
        self.swept = Some(now);
        let old: Vec<HashPart> = self
            .entries
            .iter()
            .filter(|(_, e)| now.duration_since(e.at) > KEEP)
            .map(|(h, _)| h.clone())
            .collect();
        for hash in &old {
            self.remove(hash, None);
        }
        old.len() as u64
    }
}

/// A NAR fetched ahead, verified, and who sent it.
pub struct Prefetched {
    pub path: StorePath,
    pub nar: Bytes,
    pub peer: NodeId,
}

pub struct Prefetcher {
    resolver: Arc<Resolver>,
    fetch_stats: Arc<FetchStats>,
    budget: u64,
    table: Mutex<Table>,
    slots: Semaphore,
    pub stats: PrefetchStats,
    tasks: TaskTracker,
    /// When the agent stops, NARs held for Nix are let go at once.
    shutdown: CancellationToken,
}

impl Prefetcher {
    /// `budget` bytes may be held at once; 0 turns fetching ahead off.
    pub fn new(
        resolver: Arc<Resolver>,
        fetch_stats: Arc<FetchStats>,
        budget: u64,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            resolver,
            fetch_stats,
            budget,
            table: Mutex::new(Table::default()),
            slots: Semaphore::new(PARALLEL),
            stats: PrefetchStats::default(),
            tasks,
            shutdown,
        })
    }

    /// Nix was just told `found` exists: fetch its NAR now if it is small
    /// and there is room.
    pub fn offer(self: &Arc<Self>, found: &Found) {
        let info = &found.narinfo.info;
        let mut table = lock(&self.table);
        let now = Instant::now();
        let swept = table.sweep(now);
        self.stats.unused.inc_by(swept);
        let admitted = table.admit(&info.path, info.nar_hash, info.nar_size, self.budget, now);
        drop(table);
        let Some((id, tx)) = admitted else {
            return;
        };
        self.stats.started.inc();
        let hash = info.path.hash_part();
        self.tasks
            .spawn(self.clone().fetch(id, hash, found.clone(), tx));
    }

    async fn fetch(
        self: Arc<Self>,
        id: u64,
        hash: HashPart,
        found: Found,
        tx: watch::Sender<Phase>,
    ) {
        let Ok(_slot) = self.slots.acquire().await else {
            return;
        };
        // Nix came for it before its turn and streamed it itself.
        if tx.is_closed() {
            return;
        }
        tx.send_replace(Phase::Fetching);
        let size = found.narinfo.info.nar_size;
        let (chunks_tx, chunks_rx) = mpsc::channel(DEPTH);
        let relay = relay::relay(
            self.resolver.clone(),
            self.fetch_stats.clone(),
            found,
            0..size,
            chunks_tx,
            Purpose::Prefetch,
        );
        let (peer, nar) = tokio::join!(relay, collect(chunks_rx, size, &tx));
        match (peer, nar) {
            (Some(peer), Some(nar)) => {
                self.stats.held_bytes.inc_by(size);
                tx.send_replace(Phase::Ready { nar, peer });
                // Still in the table: the bytes count until Nix takes them
                // or they age out.
                self.tasks
                    .spawn(self.clone().release_when_gone(id, hash, tx, size));
            }
            _ => {
                // Nobody wanting it any more (swept, or claimed before its
                // turn) is already counted as unused.
                if !tx.is_closed() {
                    self.stats.failed.inc();
                }
                tx.send_replace(Phase::Failed);
                lock(&self.table).remove(&hash, Some(id));
            }
        }
    }

    /// Keeps `held_bytes` honest: the NAR leaves memory when the last
    /// receiver (the table's, or a waiting request's) is gone. One that Nix
    /// has not come for within `KEEP` is dropped here, so memory is given
    /// back even when no later narinfo request runs a sweep.
    async fn release_when_gone(
        self: Arc<Self>,
        id: u64,
        hash: HashPart,
        tx: watch::Sender<Phase>,
        size: u64,
    ) {
        let unused = tokio::select! {
            unused = until_released(&self.table, id, &hash, &tx, KEEP) => unused,
            // The agent is stopping: nobody will claim it now.
            _ = self.shutdown.cancelled() => true,
        };
        if unused {
            self.stats.unused.inc();
        }
        self.stats.held_bytes.dec_by(size);
    }

    /// The NAR of `hash`, if it was fetched ahead and verified against
    /// `nar_hash`; waits for a fetch under way. `None`: stream it instead.
    pub async fn claim(&self, hash: &HashPart, nar_hash: &Sha256Hash) -> Option<Prefetched> {
        // The entry stays in the table, and keeps its bytes reserved, while
        // its fetch runs: a waiting request does not free budget early.
        let (id, path, mut phase) = {
            let table = lock(&self.table);
            let entry = table.entries.get(hash)?;
            if entry.nar_hash != *nar_hash {
                return None;
            }
            (entry.id, entry.path.clone(), entry.phase.clone())
        };
        let settled = phase
            .wait_for(|p| !matches!(p, Phase::Fetching))
            .await
            .ok()?
            .clone();
        // Taken, failed, or left to Nix: either way no longer ahead.
        lock(&self.table).remove(hash, Some(id));
        match settled {
            Phase::Ready { nar, peer } => {
                self.stats.served.inc();
                Some(Prefetched { path, nar, peer })
            }
            // Not started: Nix streams it itself, and the fetch, once
            // nobody holds a receiver, does not bother.
            Phase::Queued => {
                self.stats.unused.inc();
                None
            }
            Phase::Failed | Phase::Fetching => None,
        }
    }
}

/// Waits until nobody holds entry `id`'s NAR any more. If Nix has not
/// claimed it within `keep`, takes it out of `table`; returns whether it
/// went unused that way.
async fn until_released(
    table: &Mutex<Table>,
    id: u64,
    hash: &HashPart,
    tx: &watch::Sender<Phase>,
    keep: Duration,
) -> bool {
    if tokio::time::timeout(keep, tx.closed()).await.is_ok() {
        return false;
    }
    // `is_some` drops the entry, and its receiver, right here.
    let dropped = lock(table).remove(hash, Some(id)).is_some();
    tx.closed().await;
    dropped
}

/// Gathers a relayed NAR. `None` unless all `size` bytes arrived, which the
/// relay allows only once they matched the NAR's hash. Stops early when
/// nobody wants the NAR any more.
async fn collect(
    mut chunks: mpsc::Receiver<Result<Bytes, relay::FetchError>>,
    size: u64,
    wanted: &watch::Sender<Phase>,
) -> Option<Bytes> {
    let mut nar = BytesMut::with_capacity(usize::try_from(size).ok()?);
    while let Some(chunk) = chunks.recv().await {
        if wanted.is_closed() {
            return None;
        }
        nar.extend_from_slice(&chunk.ok()?);
    }
    (nar.len() as u64 == size).then(|| nar.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store path whose hash part ends in digit `n`.
    fn path(n: u8) -> StorePath {
        assert!(n < 10);
        let full = format!("/nix/store/{}{n}-p", "0".repeat(31));
        StorePath::parse("/nix/store", &full).unwrap()
    }

    #[test]
    fn admission_keeps_to_the_budget_and_the_size_limit() {
        let mut t = Table::default();
        let now = Instant::now();
        let h = Sha256Hash([0; 32]);
        let (_a, _tx_a) = t.admit(&path(1), h, 600, 1000, now).unwrap();
        // Already here, or beyond what is left of the budget: no.
        assert!(t.admit(&path(1), h, 10, 1000, now).is_none());
        assert!(t.admit(&path(2), h, 401, 1000, now).is_none());
        let (_b, _tx_b) = t.admit(&path(2), h, 400, 1000, now).unwrap();
        assert_eq!(t.reserved, 1000);
        // Bigger than MAX_NAR: never, whatever the budget.
        assert!(t.admit(&path(3), h, MAX_NAR + 1, u64::MAX, now).is_none());
        // A budget of 0 admits nothing.
        assert!(Table::default().admit(&path(4), h, 1, 0, now).is_none());
    }

    #[test]
    fn removing_frees_the_budget_and_stale_ids_remove_nothing() {
        let mut t = Table::default();
        let now = Instant::now();
        let h = Sha256Hash([0; 32]);
        let (old, _tx) = t.admit(&path(1), h, 500, 1000, now).unwrap();
        let hash = path(1).hash_part();
        assert!(t.remove(&hash, Some(old)).is_some());
        assert_eq!(t.reserved, 0);
        // The same path admitted again: the first fetch's clean-up must
        // not remove the second's entry.
        let (new, _tx) = t.admit(&path(1), h, 500, 1000, now).unwrap();
        assert!(t.remove(&hash, Some(old)).is_none());
        assert_eq!(t.reserved, 500);
        assert!(t.remove(&hash, Some(new)).is_some());
        assert_eq!(t.reserved, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unclaimed_nar_is_let_go_without_any_sweep() {
        let table = Mutex::new(Table::default());
        let h = Sha256Hash([0; 32]);
        let hash = path(1).hash_part();
        let (id, tx) = table
            .lock()
            .unwrap()
            .admit(&path(1), h, 100, 1000, Instant::now())
            .unwrap();
        let unused = until_released(&table, id, &hash, &tx, KEEP).await;
        assert!(unused);
        assert!(table.lock().unwrap().entries.is_empty());
        assert_eq!(table.lock().unwrap().reserved, 0);

        // Claimed in time: not unused, and the table is left alone.
        let (id, tx) = table
            .lock()
            .unwrap()
            .admit(&path(2), h, 100, 1000, Instant::now())
            .unwrap();
        let hash = path(2).hash_part();
        let claimed = table.lock().unwrap().remove(&hash, None);
        let waiter = until_released(&table, id, &hash, &tx, KEEP);
        drop(claimed);
        assert!(!waiter.await);
    }

    #[test]
    fn entries_age_out_after_keep() {
        let mut t = Table::default();
        let start = Instant::now();
        let h = Sha256Hash([0; 32]);
        t.admit(&path(1), h, 100, 1000, start).unwrap();
        assert_eq!(t.sweep(start + KEEP / 2), 0);
        // Sweeps are rate-limited; the next one after SWEEP_EVERY finds it.
        assert_eq!(t.sweep(start + KEEP / 2 + SWEEP_EVERY / 2), 0);
        assert_eq!(t.sweep(start + KEEP + SWEEP_EVERY * 2), 1);
        assert_eq!(t.reserved, 0);
        assert!(t.entries.is_empty());
    }
}
