//! Reads this host's Nix store: path metadata from the store's SQLite DB,
//! opened read-only, and the files under the real store directory. Owns the
//! mapping from the logical store dir (`/nix/store`) to where the files and
//! DB really are (a chroot store keeps them under another root). Never writes
//! to the store; knows nothing of HTTP, peers or sharing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use thiserror::Error;

use crate::lock::lock;
use crate::nix::{HashPart, PathInfo, Sha256Hash, StorePath};

/// Connections kept open for reuse; more are opened under load and dropped.
const IDLE_CONNECTIONS: usize = 64;
/// How long a read waits on a DB lock (WAL recovery by the daemon) before
/// it counts as a failure. Reads run on the async threads (a lookup is tens
/// of microseconds; handing it to a blocking thread costs more), so this
/// stays short.
const BUSY_TIMEOUT: Duration = Duration::from_millis(100);

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot open the store DB {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("store DB query failed: {0}")]
    Query(#[from] rusqlite::Error),
    #[error("store DB row for {path} is malformed: {reason}")]
    BadRow { path: String, reason: String },
}

/// Where a store lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreLocation {
    /// The logical store dir, as written in store paths.
    pub store_dir: String,
    /// Where the files of `store_dir` really are.
    pub real_store_dir: PathBuf,
    /// The SQLite DB (`db.sqlite`).
    pub db: PathBuf,
}

impl StoreLocation {
    /// The standard layout under `root` (`/` for the host's own store).
    pub fn under_root(root: &Path, store_dir: &str) -> Self {
        let rel = |p: &str| root.join(p.trim_start_matches('/'));
        Self {
            store_dir: store_dir.to_string(),
            real_store_dir: rel(store_dir),
            db: rel("nix/var/nix/db/db.sqlite"),
        }
    }
}

pub struct Store {
    location: StoreLocation,
    idle: Mutex<Vec<Connection>>,
    warned_immutable: std::sync::atomic::AtomicBool,
}

impl StoreError {
    /// Whether the DB is there but locked just now: by a nix-daemon in a
    /// long write, or recovering its journal.
    pub fn is_busy(&self) -> bool {
        let source = match self {
            StoreError::Open { source, .. } | StoreError::Query(source) => source,
            StoreError::BadRow { .. } => return false,
        };
        matches!(
            source.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        )
    }
}

fn is_permission_error(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::CannotOpen)
    )
}

impl Store {
    /// Opens the DB once to fail early on a wrong location. A DB that does
    /// not exist yet (Nix installed but never run) is not an error: the store
    /// is empty until Nix creates it. Nor is one locked longer than
    /// `BUSY_TIMEOUT` as the agent starts (a nix-daemon recovering its
    /// journal, or one in a long write with `use-sqlite-wal = false`): it
    /// is there, and reads try again as they come.
    pub fn open(location: StoreLocation) -> Result<Arc<Self>, StoreError> {
        let store = Self {
            location,
            idle: Mutex::new(Vec::new()),
            warned_immutable: std::sync::atomic::AtomicBool::new(false),
        };
        if !store.location.db.exists() {
            tracing::warn!(
                db = %store.location.db.display(),
                "the store DB does not exist yet; serving nothing until Nix creates it"
            );
            return Ok(Arc::new(store));
        }
        let checked = store.connect().and_then(|conn| {
            conn.query_row("select count(*) from ValidPaths limit 1", [], |_| Ok(()))
                .map_err(|source| StoreError::Open {
                    path: store.location.db.display().to_string(),
                    source,
                })?;
            store.put_back(conn);
            Ok(())
        });
        match checked {
            Ok(()) => {}
            Err(e) if e.is_busy() => tracing::warn!(
                db = %store.location.db.display(),
                error = %e,
                "the store DB is locked just now; reads will try again"
            ),
            Err(e) => return Err(e),
        }
        Ok(Arc::new(store))
    }

    pub fn location(&self) -> &StoreLocation {
        &self.location
    }

    pub fn store_dir(&self) -> &str {
        &self.location.store_dir
    }

    /// Where the files of `path` are on this machine.
    pub fn real_path(&self, path: &StorePath) -> PathBuf {
        self.location.real_store_dir.join(path.base_name())
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        let open_err = |source| StoreError::Open {
            path: self.location.db.display().to_string(),
            source,
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.location.db, flags).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        match conn.query_row("pragma schema_version", [], |_| Ok(())) {
            Ok(()) => Ok(conn),
            // A WAL database can only be read by who may create its -shm
            // file next to it. Without that right (an unprivileged agent
            // while no Nix process has the DB open), read the file as
            // immutable: consistent unless Nix writes at that very moment,
            // and every NAR is checked against its hash anyway.
            Err(e) if is_permission_error(&e) => {
                if !self
                    .warned_immutable
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(
                        db = %self.location.db.display(),
                        "cannot create the store DB's shared-memory file (not root?); \
                         reading it as immutable. Run the agent as root (without \
                         capabilities) for reads that are safe beside a busy nix-daemon"
                    );
                }
                let uri = format!("file:{}?immutable=1", self.location.db.display());
                let conn = Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI)
                    .map_err(open_err)?;
                Ok(conn)
            }
            Err(e) => Err(open_err(e)),
        }
    }

    fn take(&self) -> Result<Connection, StoreError> {
        let idle = lock(&self.idle).pop();
        match idle {
            Some(conn) => Ok(conn),
            None => self.connect(),
        }
    }

    fn put_back(&self, conn: Connection) {
        let mut idle = lock(&self.idle);
        if idle.len() < IDLE_CONNECTIONS {
            idle.push(conn);
        }
    }

    /// The valid path whose hash part is `hash`, if any. Blocks for tens of
    /// microseconds, up to `BUSY_TIMEOUT` while the DB is locked.
    pub fn path_info(&self, hash: &HashPart) -> Result<Option<PathInfo>, StoreError> {
        let mut conn = match self.take() {
            Ok(c) => c,
            // Not created yet (Nix never ran): an empty store.
            Err(_) if !self.location.db.exists() => return Ok(None),
            Err(e) => return Err(e),
        };
        let result = query_path_info(&mut conn, &self.location.store_dir, hash);
        // A connection that failed mid-query may be in a bad state.
        if result.is_ok() {
            self.put_back(conn);
        }
        result
    }

    /// Count of valid paths, for status output.
    pub fn path_count(&self) -> Result<u64, StoreError> {
        let conn = self.take()?;
        let n: i64 = conn.query_row("select count(*) from ValidPaths", [], |r| r.get(0))?;
        self.put_back(conn);
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

impl Store {
    /// The highest row id of the valid paths and how many there are: what
    /// tells the catalog, cheaply, that paths came or went.
    pub fn row_stats(&self) -> Result<(i64, u64), StoreError> {
        let conn = self.take()?;
        let (max, n): (Option<i64>, i64) =
            conn.query_row("select max(id), count(*) from ValidPaths", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        self.put_back(conn);
        Ok((max.unwrap_or(0), u64::try_from(n).unwrap_or(0)))
    }

    /// Up to `limit` valid paths with row ids above `after`, by id, each
    /// with its id. Rows that do not parse are left out (and logged): they
    /// are not shared either.
    pub fn paths_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, PathInfo)>, StoreError> {
        let conn = self.take()?;
        let rows = {
            let mut stmt = conn.prepare_cached(
                "select v.id, v.path, v.hash, v.deriver, v.narSize, v.ultimate, v.sigs, v.ca, \
                   (select group_concat(p.path, ' ') from Refs r \
                      join ValidPaths p on r.reference = p.id where r.referrer = v.id) \
                 from ValidPaths v where v.id > ?1 order by v.id limit ?2",
            )?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = stmt.query_map(rusqlite::params![after, limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    Row {
                        path: r.get(1)?,
                        hash: r.get(2)?,
                        deriver: r.get(3)?,
                        nar_size: r.get(4)?,
                        ultimate: r.get(5)?,
                        sigs: r.get(6)?,
                        ca: r.get(7)?,
                        references: r.get(8)?,
                    },
                ))
            })?;
            rows.collect::<Result<Vec<_>, _>>()
        };
        let rows = rows?;
        self.put_back(conn);
        let mut out = Vec::with_capacity(rows.len());
        for (id, row) in rows {
            match row_to_info(&self.location.store_dir, row) {
                Ok(info) => out.push((id, info)),
                Err(e) => tracing::warn!(error = %e, "skipping a store DB row"),
            }
        }
        Ok(out)
    }

    /// The row ids of every valid path (to find those collected since).
    pub fn row_ids(&self) -> Result<Vec<i64>, StoreError> {
        let conn = self.take()?;
        let ids = {
            let mut stmt = conn.prepare_cached("select id from ValidPaths")?;
            let ids = stmt.query_map([], |r| r.get::<_, i64>(0))?;
            ids.collect::<Result<Vec<_>, _>>()
        };
        let ids = ids?;
        self.put_back(conn);
        Ok(ids)
    }

    /// Whether the DB file exists yet (Nix creates it on first use).
    pub fn db_exists(&self) -> bool {
        self.location.db.exists()
    }
}

struct Row {
    path: String,
    hash: String,
    deriver: Option<String>,
    nar_size: Option<i64>,
    ultimate: Option<i64>,
    sigs: Option<String>,
    ca: Option<String>,
    /// Full reference paths, space-separated (store paths hold no spaces).
    references: Option<String>,
}

fn query_path_info(
    conn: &mut Connection,
    store_dir: &str,
    hash: &HashPart,
) -> Result<Option<PathInfo>, StoreError> {
    let prefix = format!("{store_dir}/{hash}");
    // One statement is one read snapshot: the row and its references agree
    // even while Nix registers or collects paths.
    let row = conn
        .prepare_cached(
            "select v.path, v.hash, v.deriver, v.narSize, v.ultimate, v.sigs, v.ca, \
               (select group_concat(p.path, ' ') from Refs r \
                  join ValidPaths p on r.reference = p.id where r.referrer = v.id) \
             from ValidPaths v where v.path >= ?1 order by v.path limit 1",
        )?
        .query_row([&prefix], |r| {
            Ok(Row {
                path: r.get(0)?,
                hash: r.get(1)?,
                deriver: r.get(2)?,
                nar_size: r.get(3)?,
                ultimate: r.get(4)?,
                sigs: r.get(5)?,
                ca: r.get(6)?,
                references: r.get(7)?,
            })
        })
        .optional()?;
    let Some(row) = row.filter(|r| r.path.starts_with(&format!("{prefix}-"))) else {
        return Ok(None);
    };
    row_to_info(store_dir, row).map(Some)
}

fn row_to_info(store_dir: &str, row: Row) -> Result<PathInfo, StoreError> {
    let bad = |reason: String| StoreError::BadRow {
        path: row.path.clone(),
        reason,
    };
    let path = StorePath::parse(store_dir, &row.path).map_err(|e| bad(e.to_string()))?;
    let nar_hash = Sha256Hash::parse(&row.hash).map_err(|e| bad(e.to_string()))?;
    let nar_size = row
        .nar_size
        .and_then(|n| u64::try_from(n).ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| bad("no NAR size".into()))?;
    let mut refs = row
        .references
        .as_deref()
        .unwrap_or("")
        .split_whitespace()
        .map(|r| StorePath::parse(store_dir, r))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    refs.sort();
    let deriver = row
        .deriver
        .as_deref()
        .filter(|d| !d.is_empty())
        .and_then(|d| StorePath::parse(store_dir, d).ok());
    let sigs = row
        .sigs
        .as_deref()
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    Ok(PathInfo {
        path,
        nar_hash,
        nar_size,
        references: refs,
        deriver,
        sigs,
        ca: row.ca.filter(|c| !c.is_empty()),
        ultimate: row.ultimate.unwrap_or(0) != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(dir: &Path) -> StoreLocation {
        StoreLocation {
            store_dir: "/nix/store".into(),
            real_store_dir: dir.join("store"),
            db: dir.join("db.sqlite"),
        }
    }

    #[test]
    fn a_store_db_locked_as_the_agent_starts_is_read_once_it_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let at = location(dir.path());
        let writer = Connection::open(&at.db).unwrap();
        writer
            .execute_batch("create table ValidPaths (id integer primary key, path text)")
            .unwrap();
        // A nix-daemon in a long write (without WAL: a fresh DB has a
        // rollback journal).
        writer.execute_batch("begin exclusive").unwrap();
        let store = Store::open(at.clone()).expect("a locked DB is no wrong location");
        let busy = store.path_count().expect_err("read while locked");
        assert!(busy.is_busy(), "{busy}");
        writer.execute_batch("commit").unwrap();
        assert_eq!(store.path_count().unwrap(), 0);
    }

    #[test]
    fn a_file_that_is_no_store_db_still_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let at = location(dir.path());
        std::fs::write(&at.db, b"not a database, and long enough to be read as one").unwrap();
        let e = Store::open(at).err().expect("not a DB");
        assert!(!e.is_busy(), "{e}");
    }
}
