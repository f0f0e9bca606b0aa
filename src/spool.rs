//! A NAR being fetched ahead onto disk, which Nix can read while it is
//! still being written. The file is unlinked as soon as it is made: only
//! the writer's and the reader's descriptors keep it, so its space goes back
//! when both are done, and nothing is left behind if the agent dies.
//!
//! The writer says how far it got through a `watch`; a reader sends what is
//! on disk, waits for more, and ends where the writer ended: cleanly after
//! all of the NAR, or with an error (cutting Nix's response short) when the
//! fetch failed.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, watch};

use crate::identity::NodeId;

/// Bytes a reader sends at once.
const READ_CHUNK: usize = 256 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    Writing(u64),
    /// All of the NAR is on disk, verified; who sent it.
    Done(NodeId),
    Failed,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the NAR fetched ahead could not be completed")]
    Incomplete,
    #[error("spool file: {0}")]
    Io(#[from] io::Error),
}

/// Where spool files are made; emptied when the agent starts.
pub struct SpoolDir {
    dir: PathBuf,
    next: AtomicU64,
}

impl SpoolDir {
    pub fn open(dir: &Path) -> io::Result<Self> {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            next: AtomicU64::new(0),
        })
    }

    /// A new, already unlinked file and the handle readers follow it by.
    pub fn create(&self) -> io::Result<(Writer, Spooled)> {
        let n = self.next.fetch_add(1, Relaxed);
        let path = self.dir.join(format!("{n}.nar"));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        let reader = file.try_clone()?;
        let (tx, rx) = watch::channel(Progress::Writing(0));
        let writer = Writer {
            file,
            written: 0,
            progress: tx,
        };
        let spooled = Spooled {
            file: Arc::new(reader),
            progress: rx,
        };
        Ok((writer, spooled))
    }
}

pub struct Writer {
    file: File,
    written: u64,
    progress: watch::Sender<Progress>,
}

impl Writer {
    pub async fn append(mut self, chunk: Bytes) -> io::Result<Self> {
        let (result, writer) = tokio::task::spawn_blocking(move || {
            let result = self.file.write_all(&chunk);
            if result.is_ok() {
                self.written += chunk.len() as u64;
            }
            (result, self)
        })
        .await
        .map_err(io::Error::other)?;
        result?;
        writer
            .progress
            .send_replace(Progress::Writing(writer.written));
        Ok(writer)
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Whether anybody still follows this file (or might: the handle kept
    /// for a reader to come).
    pub fn wanted(&self) -> bool {
        !self.progress.is_closed()
    }

    pub fn finish(self, peer: Option<NodeId>) {
        self.progress.send_replace(match peer {
            Some(p) => Progress::Done(p),
            None => Progress::Failed,
        });
    }
}

/// A spool file as readers see it.
#[derive(Clone)]
pub struct Spooled {
    file: Arc<File>,
    progress: watch::Receiver<Progress>,
}

impl Spooled {
    /// Sends the NAR (`size` bytes) into `tx` as it reaches the disk; an
    /// `Err` item ends it early. Returns the peer that sent the NAR once
    /// all of it went out, `None` otherwise.
    pub async fn follow(
        mut self,
        size: u64,
        tx: mpsc::Sender<Result<Bytes, SpoolError>>,
    ) -> Option<NodeId> {
        let mut sent = 0u64;
        loop {
            let progress = *self.progress.borrow_and_update();
            let on_disk = match progress {
                Progress::Writing(n) => n,
                Progress::Done(_) => size,
                Progress::Failed => {
                    let _ = tx.send(Err(SpoolError::Incomplete)).await;
                    return None;
                }
            };
            if sent < on_disk {
                let want = (on_disk - sent).min(READ_CHUNK as u64) as usize;
                let chunk = match read_at(self.file.clone(), sent, want).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return None;
                    }
                };
                sent += chunk.len() as u64;
                if tx.send(Ok(chunk)).await.is_err() {
                    return None;
                }
                continue;
            }
            if let Progress::Done(peer) = progress {
                return Some(peer);
            }
            // The writer gone without a word is a failed fetch.
            if self.progress.changed().await.is_err() {
                let done = *self.progress.borrow();
                if let Progress::Done(_) = done {
                    continue;
                }
                let _ = tx.send(Err(SpoolError::Incomplete)).await;
                return None;
            }
        }
    }
}

async fn read_at(file: Arc<File>, offset: u64, len: usize) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = BytesMut::zeroed(len);
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf.freeze())
    })
    .await
    .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeId {
        NodeId([7; 32])
    }

    async fn drain(mut rx: mpsc::Receiver<Result<Bytes, SpoolError>>) -> (Vec<u8>, bool) {
        let mut got = Vec::new();
        while let Some(item) = rx.recv().await {
            match item {
                Ok(b) => got.extend_from_slice(&b),
                Err(_) => return (got, false),
            }
        }
        (got, true)
    }

    #[tokio::test]
    async fn a_reader_follows_the_writer_to_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SpoolDir::open(&tmp.path().join("spool")).unwrap();
        let (mut writer, spooled) = dir.create().unwrap();
        // Unlinked at once: nothing to clean up, ever.
        assert_eq!(
            std::fs::read_dir(tmp.path().join("spool")).unwrap().count(),
            0
        );
        let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        writer = writer
            .append(Bytes::copy_from_slice(&data[..1000]))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(4);
        let size = data.len() as u64;
        let reader = tokio::spawn(spooled.follow(size, tx));
        let collected = tokio::spawn(drain(rx));
        for piece in data[1000..].chunks(90_000) {
            writer = writer.append(Bytes::copy_from_slice(piece)).await.unwrap();
            tokio::task::yield_now().await;
        }
        assert_eq!(writer.written(), size);
        writer.finish(Some(node()));
        assert_eq!(reader.await.unwrap(), Some(node()));
        let (got, clean) = collected.await.unwrap();
        assert!(clean);
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn a_failed_fetch_cuts_the_reader_short() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SpoolDir::open(tmp.path()).unwrap();
        let (writer, spooled) = dir.create().unwrap();
        let writer = writer.append(Bytes::from_static(b"partial")).await.unwrap();
        let (tx, rx) = mpsc::channel(4);
        let reader = tokio::spawn(spooled.clone().follow(100, tx));
        writer.finish(None);
        assert_eq!(reader.await.unwrap(), None);
        let (got, clean) = drain(rx).await;
        assert!(!clean, "a short NAR must end in an error");
        assert!(got.len() <= 7);

        // A writer dropped without finishing is a failure too.
        let (writer, spooled) = dir.create().unwrap();
        drop(writer);
        let (tx, rx) = mpsc::channel(4);
        assert_eq!(spooled.follow(10, tx).await, None);
        assert!(!drain(rx).await.1);
    }

    #[tokio::test]
    async fn a_reader_that_comes_late_gets_it_all_from_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SpoolDir::open(tmp.path()).unwrap();
        let (writer, spooled) = dir.create().unwrap();
        let writer = writer
            .append(Bytes::from(vec![9u8; 600_000]))
            .await
            .unwrap();
        writer.finish(Some(node()));
        let (tx, rx) = mpsc::channel(8);
        let reader = tokio::spawn(spooled.follow(600_000, tx));
        let (got, clean) = drain(rx).await;
        assert_eq!(reader.await.unwrap(), Some(node()));
        assert!(clean && got == vec![9u8; 600_000]);
    }

    #[test]
    fn opening_empties_what_an_earlier_run_left() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("spool");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("3.nar"), b"stale").unwrap();
        SpoolDir::open(&dir).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }
}
