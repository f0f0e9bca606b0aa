//! The upstream spool: files from upstream caches on disk, under
//! `<state_dir>/spool`, each downloaded once however many requests want it:
//! the first request starts the download, and every request (the first one
//! included) reads the file as it grows and after it is complete, until it
//! is evicted. A reader never passes on the file's last byte before the
//! download has checked its size and hash, so a bad file is never a
//! complete transfer. Bounded by `upstream.spool_mib`: the least recently
//! used complete files go first; a file that does not fit is not spooled
//! (the request streams it straight from upstream instead). Nor is one
//! that the disk has no room for (`disk_has_room`), counting what the
//! files being written still need, so a full disk costs a request nothing.
//!
//! This is the single flight inside one agent, and what an agent serves
//! its peers from while a download it owns is under way.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::judge::UpstreamFile;
use super::RelayError;
use crate::disk_room::{disk_has_room, disk_space};
use crate::lock::lock;
use crate::nix::Sha256Hash;

/// Bytes read from a spooled file at a time.
const READ_CHUNK: usize = 256 * 1024;
/// How far a spooled file has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// This many bytes are on disk.
    Writing(u64),
    /// Complete, and its size and hash are right.
    Done,
    /// The download failed or the file was wrong; it is gone.
    Failed,
}

pub struct Entry {
    path: PathBuf,
    size: u64,
    progress: watch::Sender<Progress>,
    /// For eviction: the spool's clock when last read.
    last_used: AtomicU64,
}

/// What `Spool::claim` found.
pub enum Claim {
    /// Someone downloads it, or did: read it.
    Existing(Arc<Entry>),
    /// Nobody does: download it with the writer, and read it.
    Start(Arc<Entry>, Writer),
    /// No room: stream it without the spool.
    NoRoom,
}

struct State {
    entries: HashMap<Sha256Hash, Arc<Entry>>,
    /// Bytes reserved by the entries (their full sizes).
    used: u64,
    /// Whether to ask the disk for its free space (tests of the
    /// accounting alone say no).
    check_disk: bool,
    clock: u64,
}

pub struct Spool {
    dir: PathBuf,
    limit: u64,
    state: Mutex<State>,
}

impl Spool {
    /// A spool of at most `limit` bytes in `dir`, which is made if needed
    /// and emptied of what an earlier run left.
    pub fn new(dir: PathBuf, limit: u64) -> std::io::Result<Arc<Spool>> {
        std::fs::create_dir_all(&dir)?;
        for leftover in std::fs::read_dir(&dir)?.flatten() {
            let _ = std::fs::remove_file(leftover.path());
        }
        Ok(Arc::new(Spool {
            dir,
            limit,
            state: Mutex::new(State {
                entries: HashMap::new(),
                used: 0,
                check_disk: true,
                clock: 0,
            }),
        }))
    }

    /// The entry of `file`, starting one if there is none and there is
    /// room (evicting complete files, least recently used first).
    pub fn claim(self: &Arc<Self>, file: &UpstreamFile) -> Claim {
        let mut state = lock(&self.state);
        state.clock += 1;
        let now = state.clock;
        if let Some(entry) = state.entries.get(&file.file_hash) {
            entry.last_used.store(now, Ordering::Relaxed);
            return Claim::Existing(entry.clone());
        }
        if file.file_size > self.limit {
            return Claim::NoRoom;
        }
        while state.used + file.file_size > self.limit {
            let oldest = state
                .entries
                .iter()
                .filter(|(_, e)| *e.progress.borrow() == Progress::Done)
                .min_by_key(|(_, e)| e.last_used.load(Ordering::Relaxed))
                .map(|(h, _)| *h);
            let Some(hash) = oldest else {
                return Claim::NoRoom;
            };
            if let Some(gone) = state.entries.remove(&hash) {
                state.used -= gone.size;
                // Readers that have it open read on; the name goes now.
                let _ = std::fs::remove_file(&gone.path);
            }
        }
        if state.check_disk {
            let pending: u64 = state
                .entries
                .values()
                .map(|e| match *e.progress.borrow() {
                    Progress::Writing(w) => e.size.saturating_sub(w),
                    _ => 0,
                })
                .sum();
            let room = disk_space(&self.dir)
                .is_some_and(|(free, total)| disk_has_room(free, total, pending, file.file_size));
            if !room {
                tracing::debug!(
                    size = file.file_size,
                    "spool: no room on the disk; streaming the file past it"
                );
                return Claim::NoRoom;
            }
        }
        let path = self.dir.join(file.file_hash.nix32_digest());
        let (progress, _) = watch::channel(Progress::Writing(0));
        let entry = Arc::new(Entry {
            path,
            size: file.file_size,
            progress,
            last_used: AtomicU64::new(now),
        });
        state.entries.insert(file.file_hash, entry.clone());
        state.used += file.file_size;
        let writer = Writer {
            spool: self.clone(),
            entry: entry.clone(),
            hash: file.file_hash,
            file: None,
            written: 0,
        };
        Claim::Start(entry, writer)
    }

    /// Bytes held or reserved.
    pub fn used(&self) -> u64 {
        lock(&self.state).used
    }

    fn forget(&self, hash: &Sha256Hash, entry: &Arc<Entry>) {
        let mut state = lock(&self.state);
        if state
            .entries
            .get(hash)
            .is_some_and(|e| Arc::ptr_eq(e, entry))
        {
            state.entries.remove(hash);
            state.used -= entry.size;
        }
    }
}

/// Writes one spooled file; dropping it without `done` fails the entry.
pub struct Writer {
    spool: Arc<Spool>,
    entry: Arc<Entry>,
    hash: Sha256Hash,
    file: Option<tokio::fs::File>,
    written: u64,
}

impl Writer {
    pub async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() {
            self.file = Some(tokio::fs::File::create(&self.entry.path).await?);
        }
        if let Some(f) = self.file.as_mut() {
            f.write_all(chunk).await?;
            // Readers read what the kernel has; no need to sync to disk.
            f.flush().await?;
        }
        self.written += chunk.len() as u64;
        self.entry
            .progress
            .send_replace(Progress::Writing(self.written));
        Ok(())
    }

    /// The download is complete and checked.
    pub async fn done(mut self) {
        if self.file.is_none() {
            // An empty file: make it, so readers can open it.
            if let Err(e) = self.write(&[]).await {
                tracing::warn!(error = %e, "spool: cannot create an empty file");
            }
        }
        self.entry.progress.send_replace(Progress::Done);
        self.file = None;
        // `Drop` sees Done and leaves the entry.
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if *self.entry.progress.borrow() != Progress::Done {
            self.entry.progress.send_replace(Progress::Failed);
            self.spool.forget(&self.hash, &self.entry);
            let _ = std::fs::remove_file(&self.entry.path);
        }
    }
}

impl Entry {
    /// Sends the file into `tx` as it arrives: everything but its last
    /// byte while it is being written, the rest once it is done. Gives up
    /// when nothing new comes for `stall`.
    pub async fn read_into<E>(
        &self,
        tx: &mpsc::Sender<Result<Bytes, E>>,
        stall: Duration,
    ) -> Result<(), RelayError> {
        let mut progress = self.progress.subscribe();
        let mut file: Option<tokio::fs::File> = None;
        let mut offset = 0u64;
        loop {
            let now = *progress.borrow_and_update();
            let readable = match now {
                Progress::Writing(w) => w.min(self.size.saturating_sub(1)),
                Progress::Done => self.size,
                Progress::Failed => {
                    return Err(RelayError::Body("the upstream download failed".into()))
                }
            };
            if offset < readable {
                if file.is_none() {
                    let mut f = tokio::fs::File::open(&self.path)
                        .await
                        .map_err(|e| RelayError::Body(format!("spool: {e}")))?;
                    f.seek(SeekFrom::Start(offset))
                        .await
                        .map_err(|e| RelayError::Body(format!("spool: {e}")))?;
                    file = Some(f);
                }
                let Some(f) = file.as_mut() else {
                    continue;
                };
                while offset < readable {
                    let want = (readable - offset).min(READ_CHUNK as u64) as usize;
                    let mut buf = BytesMut::zeroed(want);
                    f.read_exact(&mut buf)
                        .await
                        .map_err(|e| RelayError::Body(format!("spool: {e}")))?;
                    offset += want as u64;
                    if tx.send(Ok(buf.freeze())).await.is_err() {
                        return Ok(());
                    }
                }
                continue;
            }
            if now == Progress::Done {
                return Ok(());
            }
            match tokio::time::timeout(stall, progress.changed()).await {
                Err(_) => return Err(RelayError::Stalled(stall)),
                // The writer is gone without a word: it failed.
                Ok(Err(_)) if *progress.borrow() != Progress::Done => {
                    return Err(RelayError::Body("the upstream download stopped".into()))
                }
                Ok(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(n: u8, size: u64) -> UpstreamFile {
        UpstreamFile {
            url: format!("http://u/nar/{n}.nar.zst"),
            compression: "zstd".into(),
            file_hash: Sha256Hash([n; 32]),
            file_size: size,
        }
    }

    /// A directory removed when the test ends, and a path in it for the
    /// spool (which makes its own directory).
    fn scratch() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        (dir, spool)
    }

    async fn collect(mut rx: mpsc::Receiver<Result<Bytes, RelayError>>) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut failed = false;
        while let Some(item) = rx.recv().await {
            match item {
                Ok(b) => out.extend_from_slice(&b),
                Err(_) => failed = true,
            }
        }
        (out, failed)
    }

    #[tokio::test]
    async fn readers_joining_early_and_late_get_the_whole_file_once_it_is_done() {
        let (_dir, spool_dir) = scratch();
        let spool = Spool::new(spool_dir, 1 << 20).unwrap();
        let f = file(1, 10);
        let Claim::Start(entry, mut writer) = spool.claim(&f) else {
            panic!("first claim must start");
        };
        let (tx1, rx1) = mpsc::channel(16);
        let early = tokio::spawn(async move {
            let r = entry.read_into(&tx1, Duration::from_secs(5)).await;
            drop(tx1);
            r
        });
        let reading = tokio::spawn(collect(rx1));
        writer.write(b"01234").await.unwrap();
        let Claim::Existing(late) = spool.claim(&f) else {
            panic!("second claim must join");
        };
        writer.write(b"56789").await.unwrap();
        // Not done yet: the last byte is held back.
        tokio::time::sleep(Duration::from_millis(50)).await;
        writer.done().await;
        early.await.unwrap().unwrap();
        assert_eq!(reading.await.unwrap(), (b"0123456789".to_vec(), false));
        let (tx2, rx2) = mpsc::channel(16);
        late.read_into(&tx2, Duration::from_secs(5)).await.unwrap();
        drop(tx2);
        assert_eq!(collect(rx2).await, (b"0123456789".to_vec(), false));
    }

    #[tokio::test]
    async fn a_failed_download_never_gives_the_last_byte_and_leaves_the_spool() {
        let (_dir, spool_dir) = scratch();
        let spool = Spool::new(spool_dir, 1 << 20).unwrap();
        let f = file(2, 4);
        let Claim::Start(entry, mut writer) = spool.claim(&f) else {
            panic!("start");
        };
        writer.write(b"abcd").await.unwrap();
        let (tx, rx) = mpsc::channel(16);
        let reader = tokio::spawn(async move {
            let r = entry.read_into(&tx, Duration::from_secs(5)).await;
            if let Err(e) = r {
                let _ = tx.send(Err(e)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(writer);
        reader.await.unwrap();
        let (bytes, failed) = collect(rx).await;
        assert_eq!(bytes, b"abc");
        assert!(failed);
        assert_eq!(spool.used(), 0);
        assert!(matches!(spool.claim(&f), Claim::Start(..)));
    }

    #[tokio::test]
    async fn complete_files_are_evicted_oldest_first_and_big_ones_are_not_spooled() {
        let (_dir, spool_dir) = scratch();
        let spool = Spool::new(spool_dir, 10).unwrap();
        lock(&spool.state).check_disk = false;
        for n in [1u8, 2] {
            let Claim::Start(_, mut w) = spool.claim(&file(n, 5)) else {
                panic!("start {n}");
            };
            w.write(b"xxxxx").await.unwrap();
            w.done().await;
        }
        // Use 1 again, so 2 is the least recently used: 3 takes its room.
        assert!(matches!(spool.claim(&file(1, 5)), Claim::Existing(_)));
        let Claim::Start(_, _w3) = spool.claim(&file(3, 5)) else {
            panic!("start 3");
        };
        assert!(matches!(spool.claim(&file(1, 5)), Claim::Existing(_)));
        // 2 is gone; coming back, it takes 1's room (files being written
        // are never evicted).
        let Claim::Start(_, _w2) = spool.claim(&file(2, 5)) else {
            panic!("start 2 again");
        };
        assert_eq!(spool.used(), 10);
        // Everything is being written: no room for more.
        assert!(matches!(spool.claim(&file(1, 5)), Claim::NoRoom));
        assert!(matches!(spool.claim(&file(4, 11)), Claim::NoRoom));
    }

    #[test]
    fn a_real_disk_is_asked() {
        let (_dir, dir) = scratch();
        std::fs::create_dir_all(&dir).unwrap();
        let (free, total) = disk_space(&dir).expect("statvfs");
        assert!(total > 0 && free <= total);
        // Nothing fits a spool bigger than the disk.
        let spool = Spool::new(dir, u64::MAX).unwrap();
        assert!(matches!(spool.claim(&file(9, total + 1)), Claim::NoRoom));
    }
}
