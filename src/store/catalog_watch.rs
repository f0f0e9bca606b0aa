//! Keeps this host's catalog (`catalog`) up to date with the store: looks
//! at the store DB's files every `POLL` (two `stat`s), and only when they
//! changed asks the DB for the rows above the highest id seen and, when
//! the row count says some went, for the ids still valid. Peers subscribe
//! to the set and its changes (`subscribe`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::lock::lock;
use crate::store::catalog::{Catalog, Change, Touched};
use crate::store::db::Store;
use crate::store::share::SharePolicy;

/// How often the DB files are looked at: a path Nix adds is announced to
/// peers within about this long.
pub const POLL: Duration = Duration::from_millis(100);
/// Rows read from the DB per query.
const BATCH: usize = 4096;
/// Changes a subscriber may fall behind by before it must start over.
const BACKLOG: usize = 256;

pub struct SharedCatalog {
    catalog: Mutex<Catalog>,
    changes: broadcast::Sender<Arc<Change>>,
    ready: watch::Sender<bool>,
}

/// The set as it is, and its changes from then on.
pub struct Subscription {
    pub fingerprints: Vec<u32>,
    pub changes: broadcast::Receiver<Arc<Change>>,
}

/// What the DB files looked like: size and time of change of the DB and
/// of its write-ahead log.
type FileMarks = [Option<(u64, SystemTime)>; 2];

fn marks(files: &[PathBuf; 2]) -> FileMarks {
    files.clone().map(|f| {
        std::fs::metadata(f)
            .ok()
            .map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
    })
}

impl SharedCatalog {
    /// Starts watching `store`; the first full read runs at once, off the
    /// async workers.
    pub fn start(
        store: Arc<Store>,
        policy: Arc<SharePolicy>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let this = Arc::new(Self {
            catalog: Mutex::new(Catalog::new()),
            changes: broadcast::channel(BACKLOG).0,
            ready: watch::channel(false).0,
        });
        tasks.spawn(this.clone().watch(store, policy, shutdown));
        this
    }

    /// Shared paths (distinct fingerprints) now.
    pub fn len(&self) -> usize {
        lock(&self.catalog).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The set and its changes, once the first read of the store is done.
    pub async fn subscribe(&self) -> Subscription {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|r| *r).await;
        let catalog = lock(&self.catalog);
        Subscription {
            fingerprints: catalog.fingerprints(),
            changes: self.changes.subscribe(),
        }
    }

    async fn watch(
        self: Arc<Self>,
        store: Arc<Store>,
        policy: Arc<SharePolicy>,
        shutdown: CancellationToken,
    ) {
        let db = store.location().db.clone();
        let mut wal = db.clone().into_os_string();
        wal.push("-wal");
        let files = [db, PathBuf::from(wal)];
        let mut seen: Option<FileMarks> = None;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = marks(&files);
            if seen.as_ref() == Some(&now) {
                continue;
            }
            let this = self.clone();
            let (store, policy) = (store.clone(), policy.clone());
            let read = tokio::task::spawn_blocking(move || this.update(&store, &policy)).await;
            match read {
                Ok(Ok(())) => {
                    seen = Some(now);
                    self.ready.send_replace(true);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not read the store DB for the catalog; trying again")
                }
                Err(e) => tracing::warn!(error = %e, "the catalog update failed"),
            }
        }
    }

    /// Reads what changed in the DB and tells subscribers.
    fn update(
        &self,
        store: &Store,
        policy: &SharePolicy,
    ) -> Result<(), crate::store::db::StoreError> {
        if !store.db_exists() {
            return Ok(());
        }
        let (max_id, count) = store.row_stats()?;
        let (mut after, rows) = {
            let c = lock(&self.catalog);
            (c.max_id(), c.rows())
        };
        let mut touched = Touched::default();
        let mut added = 0usize;
        while after < max_id {
            let batch = store.paths_after(after, BATCH)?;
            let Some(last) = batch.last().map(|(id, _)| *id) else {
                break;
            };
            added += batch.len();
            let rows = batch.into_iter().map(|(id, info)| {
                let fp = policy
                    .allows(&info)
                    .then(|| info.path.hash_part().fingerprint());
                (id, fp)
            });
            lock(&self.catalog).add_rows(rows, &mut touched);
            after = last;
        }
        // Rows went when there are fewer than known plus added.
        if (count as usize) < rows + added {
            let ids = store.row_ids()?;
            lock(&self.catalog).keep_rows(&ids, &mut touched);
        }
        let catalog = lock(&self.catalog);
        let change = catalog.change(touched);
        if !change.is_empty() {
            tracing::debug!(
                added = change.added.len(),
                removed = change.removed.len(),
                shared = catalog.len(),
                "the shared set changed"
            );
            // Sent under the lock: a subscriber's snapshot and the changes
            // after it never overlap or leave a gap.
            let _ = self.changes.send(Arc::new(change));
        }
        Ok(())
    }
}
