//! Fetches NARs before Nix asks for them. Nix first asks for the narinfo
//! of every path in a closure, then downloads the NARs one at a time.
//! Starting each NAR's fetch as soon as its narinfo is served turns those
//! one-by-one round trips to peers into parallel ones, and lets big
//! downloads run while Nix is still busy with earlier paths.
//!
//! Small NARs are held in memory, and only whole and verified: they come
//! through the same relay as Nix's downloads, which withholds a NAR's end
//! until it matches its hash. Bigger ones go to a spool file on disk, which
//! Nix reads while it is still being written (ending short if the fetch
//! fails, as a streamed NAR would). Each has its own byte budget, so memory
//! stays flat however large a NAR is. Owns nothing but its table of NARs
//! fetched ahead; asks the resolver and the relay for everything else.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::identity::NodeId;
use crate::nar_fetch::{self, FetchStats, Purpose};
use crate::nix::{HashPart, Sha256Hash, StorePath};
use crate::resolver::{Found, Resolver};
use crate::spool::{SpoolDir, Spooled, Writer};

/// NARs bigger than this are fetched ahead onto disk, not into memory.
pub const MAX_NAR: u64 = 4 << 20;
/// Fetches ahead into memory running at once; more wait their turn.
pub const PARALLEL: usize = 8;
/// Fetches ahead onto disk running at once: big NARs fill the link alone.
pub const SPOOL_PARALLEL: usize = 2;
/// A NAR fetched ahead that Nix has not asked for by then is dropped.
pub const KEEP: Duration = Duration::from_secs(120);
/// Old entries are looked for at most this often.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Chunks buffered between the relay and the collector.
const DEPTH: usize = 8;

/// What the relay delivers: the NAR in order, or why it stopped.
type Chunks = mpsc::Receiver<Result<Bytes, nar_fetch::FetchError>>;

#[derive(Default)]
pub struct PrefetchStats {
    pub started: AtomicU64,
    /// NARs Nix got out of memory.
    pub served: AtomicU64,
    pub failed: AtomicU64,
    /// Fetched but never asked for, or dropped before their turn came.
    pub unused: AtomicU64,
    /// Bytes held in memory now.
    pub held_bytes: AtomicU64,
    /// NARs written whole to disk.
    pub spooled: AtomicU64,
    /// Bytes of NARs on disk now, whole or on their way.
    pub spool_bytes: AtomicU64,
}

#[derive(Clone)]
enum Phase {
    Queued,
    Fetching,
    Ready {
        nar: Bytes,
        peer: NodeId,
    },
    /// On its way to disk, or there already (the file says which).
    Spooling(Spooled),
    Failed,
}

/// Where a NAR fetched ahead is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Memory,
    Disk,
}

/// Bytes that may be promised to NARs fetched ahead, in each place.
#[derive(Clone, Copy, Debug)]
pub struct Budgets {
    pub memory: u64,
    pub disk: u64,
}

struct Entry {
    id: u64,
    path: StorePath,
    nar_hash: Sha256Hash,
    size: u64,
    place: Place,
    at: Instant,
    phase: watch::Receiver<Phase>,
}

#[derive(Default)]
struct Table {
    entries: HashMap<HashPart, Entry>,
    /// Bytes promised to entries in memory, fetched or not.
    reserved: u64,
    /// The same for entries on disk.
    reserved_disk: u64,
    next_id: u64,
    swept: Option<Instant>,
}

impl Table {
    /// Makes room for a NAR of `size` bytes, in memory if it is small and
    /// on disk otherwise, if it is not already here and fits in what is left
    /// of that place's budget; returns its id, place and the sender its
    /// fetch reports through.
    fn admit(
        &mut self,
        path: &StorePath,
        nar_hash: Sha256Hash,
        size: u64,
        budgets: Budgets,
        now: Instant,
    ) -> Option<(u64, Place, watch::Sender<Phase>)> {
        let hash = path.hash_part();
        let (place, reserved, budget) = if size <= MAX_NAR {
            (Place::Memory, &mut self.reserved, budgets.memory)
        } else {
            (Place::Disk, &mut self.reserved_disk, budgets.disk)
        };
        if *reserved + size > budget || self.entries.contains_key(&hash) {
            return None;
        }
        *reserved += size;
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = watch::channel(Phase::Queued);
        let entry = Entry {
            id,
            path: path.clone(),
            nar_hash,
            size,
            place,
            at: now,
            phase: rx,
        };
        self.entries.insert(hash, entry);
        Some((id, place, tx))
    }

    fn remove(&mut self, hash: &HashPart, id: Option<u64>) -> Option<Entry> {
        if id.is_some_and(|id| self.entries.get(hash).is_none_or(|e| e.id != id)) {
            return None;
        }
        let entry = self.entries.remove(hash)?;
        match entry.place {
            Place::Memory => self.reserved -= entry.size,
            Place::Disk => self.reserved_disk -= entry.size,
        }
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

/// A NAR fetched ahead.
pub enum Prefetched {
    /// Whole and verified, and who sent it.
    Memory {
        path: StorePath,
        nar: Bytes,
        peer: NodeId,
    },
    /// On disk, all of it or on its way; follow it to the end.
    Disk {
        path: StorePath,
        size: u64,
        file: Spooled,
        interest: Interest,
    },
}

/// Keeps a fetch ahead going while it is held.
pub struct Interest {
    _phase: watch::Receiver<Phase>,
}

pub struct Prefetcher {
    resolver: Arc<Resolver>,
    fetch_stats: Arc<FetchStats>,
    budgets: Budgets,
    spool: Option<SpoolDir>,
    table: Mutex<Table>,
    slots: Semaphore,
    spool_slots: Semaphore,
    pub stats: PrefetchStats,
}

impl Prefetcher {
    /// Up to `budgets` bytes may be promised at once, in memory and in
    /// `spool` on disk; a budget of 0 (or no spool) turns that place off.
    pub fn new(
        resolver: Arc<Resolver>,
        fetch_stats: Arc<FetchStats>,
        budgets: Budgets,
        spool: Option<SpoolDir>,
    ) -> Arc<Self> {
        let budgets = Budgets {
            disk: if spool.is_some() { budgets.disk } else { 0 },
            ..budgets
        };
        Arc::new(Self {
            resolver,
            fetch_stats,
            budgets,
            spool,
            table: Mutex::new(Table::default()),
            slots: Semaphore::new(PARALLEL),
            spool_slots: Semaphore::new(SPOOL_PARALLEL),
            stats: PrefetchStats::default(),
        })
    }

    /// Nix was just told `found` exists: fetch its NAR now if there is
    /// room.
    pub fn offer(self: &Arc<Self>, found: &Found) {
        let info = &found.narinfo.info;
        let Ok(mut table) = self.table.lock() else {
            return;
        };
        let now = Instant::now();
        let swept = table.sweep(now);
        self.stats.unused.fetch_add(swept, Relaxed);
        let admitted = table.admit(&info.path, info.nar_hash, info.nar_size, self.budgets, now);
        drop(table);
        let Some((id, place, tx)) = admitted else {
            return;
        };
        self.stats.started.fetch_add(1, Relaxed);
        let hash = info.path.hash_part();
        match place {
            Place::Memory => tokio::spawn(self.clone().fetch(id, hash, found.clone(), tx)),
            Place::Disk => tokio::spawn(self.clone().fetch_to_disk(id, hash, found.clone(), tx)),
        };
    }

    /// The relay that fetches `found` ahead, and the chunks it delivers.
    fn relay(&self, found: Found) -> (impl Future<Output = Option<NodeId>>, Chunks) {
        let (chunks_tx, chunks_rx) = mpsc::channel(DEPTH);
        let relay = nar_fetch::relay(
            self.resolver.clone(),
            self.fetch_stats.clone(),
            found.narinfo,
            found.holders,
            chunks_tx,
            Purpose::Prefetch,
        );
        (relay, chunks_rx)
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
        let (relay, chunks_rx) = self.relay(found);
        let (peer, nar) = tokio::join!(relay, collect(chunks_rx, size, &tx));
        match (peer, nar) {
            (Some(peer), Some(nar)) => {
                self.stats.held_bytes.fetch_add(size, Relaxed);
                tx.send_replace(Phase::Ready { nar, peer });
                // Still in the table: the bytes count until Nix takes them
                // or they age out.
                tokio::spawn(
                    self.clone()
                        .release_when_gone(id, hash, tx, size, Place::Memory),
                );
            }
            _ => self.failed(id, &hash, &tx),
        }
    }

    async fn fetch_to_disk(
        self: Arc<Self>,
        id: u64,
        hash: HashPart,
        found: Found,
        tx: watch::Sender<Phase>,
    ) {
        let Ok(_slot) = self.spool_slots.acquire().await else {
            return;
        };
        let Some(spool) = &self.spool else {
            return;
        };
        if tx.is_closed() {
            return;
        }
        let (writer, file) = match spool.create() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "cannot make a spool file; not fetching ahead");
                return self.failed(id, &hash, &tx);
            }
        };
        tx.send_replace(Phase::Spooling(file));
        let size = found.narinfo.info.nar_size;
        self.stats.spool_bytes.fetch_add(size, Relaxed);
        let (relay, chunks_rx) = self.relay(found);
        let (peer, writer) = tokio::join!(relay, write_out(chunks_rx, writer, &tx));
        let complete = writer.filter(|w| w.written() == size);
        match (peer, complete) {
            (Some(peer), Some(writer)) => {
                writer.finish(Some(peer));
                self.stats.spooled.fetch_add(1, Relaxed);
                tokio::spawn(
                    self.clone()
                        .release_when_gone(id, hash, tx, size, Place::Disk),
                );
            }
            // A writer dropped unfinished tells its readers it failed.
            _ => {
                self.stats.spool_bytes.fetch_sub(size, Relaxed);
                self.failed(id, &hash, &tx);
            }
        }
    }

    fn failed(&self, id: u64, hash: &HashPart, tx: &watch::Sender<Phase>) {
        // Nobody wanting it any more (swept, or claimed before its turn) is
        // already counted as unused.
        if !tx.is_closed() {
            self.stats.failed.fetch_add(1, Relaxed);
        }
        tx.send_replace(Phase::Failed);
        if let Ok(mut table) = self.table.lock() {
            table.remove(hash, Some(id));
        }
    }

    /// Keeps `held_bytes` and `spool_bytes` honest: the NAR is let go
    /// when the last receiver (the table's, or a request's) is gone. One
    /// that Nix has not come for within `KEEP` is dropped here, so memory
    /// and disk are given back even when no later narinfo request runs a
    /// sweep.
    async fn release_when_gone(
        self: Arc<Self>,
        id: u64,
        hash: HashPart,
        tx: watch::Sender<Phase>,
        size: u64,
        place: Place,
    ) {
        if until_released(&self.table, id, &hash, &tx, KEEP).await {
            self.stats.unused.fetch_add(1, Relaxed);
        }
        match place {
            Place::Memory => self.stats.held_bytes.fetch_sub(size, Relaxed),
            Place::Disk => self.stats.spool_bytes.fetch_sub(size, Relaxed),
        };
    }

    /// The NAR of `hash`, if it was fetched ahead and verified against
    /// `nar_hash`; waits for a fetch under way. `None`: stream it instead.
    pub async fn claim(&self, hash: &HashPart, nar_hash: &Sha256Hash) -> Option<Prefetched> {
        // The entry stays in the table, and keeps its bytes reserved, while
        // its fetch runs: a waiting request does not free budget early.
        let (id, path, size, mut phase) = {
            let table = self.table.lock().ok()?;
            let entry = table.entries.get(hash)?;
            if entry.nar_hash != *nar_hash {
                return None;
            }
            (
                entry.id,
                entry.path.clone(),
                entry.size,
                entry.phase.clone(),
            )
        };
        let settled = phase
            .wait_for(|p| !matches!(p, Phase::Fetching))
            .await
            .ok()?
            .clone();
        // Taken, failed, or left to Nix: either way no longer ahead.
        if let Ok(mut table) = self.table.lock() {
            table.remove(hash, Some(id));
        }
        match settled {
            Phase::Ready { nar, peer } => {
                self.stats.served.fetch_add(1, Relaxed);
                Some(Prefetched::Memory { path, nar, peer })
            }
            Phase::Spooling(file) => {
                self.stats.served.fetch_add(1, Relaxed);
                Some(Prefetched::Disk {
                    path,
                    size,
                    file,
                    interest: Interest { _phase: phase },
                })
            }
            // Not started: Nix streams it itself, and the fetch, once
            // nobody holds a receiver, does not bother.
            Phase::Queued => {
                self.stats.unused.fetch_add(1, Relaxed);
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
    let dropped = table
        .lock()
        .ok()
        .and_then(|mut t| t.remove(hash, Some(id)))
        .is_some();
    tx.closed().await;
    dropped
}

/// Writes a relayed NAR to its spool file; the writer back once every
/// chunk is on disk. Stops early when nobody wants the NAR any more.
async fn write_out(
    mut chunks: Chunks,
    mut writer: Writer,
    wanted: &watch::Sender<Phase>,
) -> Option<Writer> {
    while let Some(chunk) = chunks.recv().await {
        if wanted.is_closed() {
            return None;
        }
        writer = match writer.append(chunk.ok()?).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot write a spool file");
                return None;
            }
        };
    }
    Some(writer)
}

/// Gathers a relayed NAR. `None` unless all `size` bytes arrived, which the
/// relay allows only once they matched the NAR's hash. Stops early when
/// nobody wants the NAR any more.
async fn collect(mut chunks: Chunks, size: u64, wanted: &watch::Sender<Phase>) -> Option<Bytes> {
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

    /// A memory budget of `bytes` and no disk.
    fn mem(bytes: u64) -> Budgets {
        Budgets {
            memory: bytes,
            disk: 0,
        }
    }

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
        let (_a, _, _tx_a) = t.admit(&path(1), h, 600, mem(1000), now).unwrap();
        // Already here, or beyond what is left of the budget: no.
        assert!(t.admit(&path(1), h, 10, mem(1000), now).is_none());
        assert!(t.admit(&path(2), h, 401, mem(1000), now).is_none());
        let (_b, _, _tx_b) = t.admit(&path(2), h, 400, mem(1000), now).unwrap();
        assert_eq!(t.reserved, 1000);
        // Bigger than MAX_NAR: never into memory, whatever its budget.
        assert!(t
            .admit(&path(3), h, MAX_NAR + 1, mem(u64::MAX), now)
            .is_none());
        // A budget of 0 admits nothing.
        assert!(Table::default()
            .admit(&path(4), h, 1, mem(0), now)
            .is_none());
    }

    #[test]
    fn big_nars_go_to_disk_within_its_own_budget() {
        let mut t = Table::default();
        let now = Instant::now();
        let h = Sha256Hash([0; 32]);
        let both = Budgets {
            memory: 1000,
            disk: 3 * MAX_NAR,
        };
        let (_a, place, _tx_a) = t.admit(&path(1), h, 2 * MAX_NAR, both, now).unwrap();
        assert_eq!(place, Place::Disk);
        // The memory budget is untouched by it; the disk one is not.
        let (_b, place, _tx_b) = t.admit(&path(2), h, 1000, both, now).unwrap();
        assert_eq!(place, Place::Memory);
        assert!(t.admit(&path(3), h, MAX_NAR + 1, both, now).is_none());
        assert_eq!((t.reserved, t.reserved_disk), (1000, 2 * MAX_NAR));
        t.remove(&path(1).hash_part(), None).unwrap();
        assert_eq!((t.reserved, t.reserved_disk), (1000, 0));
        assert!(t.admit(&path(3), h, MAX_NAR + 1, both, now).is_some());
    }

    #[test]
    fn removing_frees_the_budget_and_stale_ids_remove_nothing() {
        let mut t = Table::default();
        let now = Instant::now();
        let h = Sha256Hash([0; 32]);
        let (old, _, _tx) = t.admit(&path(1), h, 500, mem(1000), now).unwrap();
        let hash = path(1).hash_part();
        assert!(t.remove(&hash, Some(old)).is_some());
        assert_eq!(t.reserved, 0);
        // The same path admitted again: the first fetch's clean-up must
        // not remove the second's entry.
        let (new, _, _tx) = t.admit(&path(1), h, 500, mem(1000), now).unwrap();
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
        let (id, _, tx) = table
            .lock()
            .unwrap()
            .admit(&path(1), h, 100, mem(1000), Instant::now())
            .unwrap();
        let unused = until_released(&table, id, &hash, &tx, KEEP).await;
        assert!(unused);
        assert!(table.lock().unwrap().entries.is_empty());
        assert_eq!(table.lock().unwrap().reserved, 0);

        // Claimed in time: not unused, and the table is left alone.
        let (id, _, tx) = table
            .lock()
            .unwrap()
            .admit(&path(2), h, 100, mem(1000), Instant::now())
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
        t.admit(&path(1), h, 100, mem(1000), start).unwrap();
        assert_eq!(t.sweep(start + KEEP / 2), 0);
        // Sweeps are rate-limited; the next one after SWEEP_EVERY finds it.
        assert_eq!(t.sweep(start + KEEP / 2 + SWEEP_EVERY / 2), 0);
        assert_eq!(t.sweep(start + KEEP + SWEEP_EVERY * 2), 1);
        assert_eq!(t.reserved, 0);
        assert!(t.entries.is_empty());
    }
}
