//! Streams a store path's NAR out of the local store: a blocking thread runs
//! the encoder and hands bounded chunks to an async consumer. The last chunk
//! is held back until the size (and, with `Check::Hash`, the SHA-256)
//! matches the DB: a file of another size never produces a complete NAR,
//! the stream ends in an error instead and the event is logged. What is
//! served to peers and to Nix is checked for size only, since the receiver
//! hashes every byte anyway (a peer that finds a wrong hash says so, and
//! the copy is then hashed here: `Check::Hash`, `store::shared`). A NAR of
//! many small files is served from its encoded copy in the `nar_cache`
//! when there is one, and put there (hashed) when it is served whole; a
//! part of a tree's NAR from an offset, from the tree's `nar_layout`.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::nix::PathInfo;
use crate::store::db::Store;
use crate::store::nar_cache::{CacheWriter, NarCache};
use crate::store::nar_encode::{self as nar, NarSink};
use crate::store::nar_layout::NarLayouts;

/// Chunks in flight per stream; with `nar::CHUNK` this bounds memory per
/// stream.
const CHANNEL_DEPTH: usize = 4;

#[derive(Debug, Error, Clone)]
pub enum NarStreamError {
    #[error("reading {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: NAR does not match the store DB ({reason}); the store is corrupt")]
    Corrupt { path: String, reason: String },
    #[error("offset {offset} is beyond the NAR's {size} bytes")]
    OffsetBeyondEnd { offset: u64, size: u64 },
}

pub struct NarStream {
    rx: mpsc::Receiver<Result<Bytes, NarStreamError>>,
}

impl NarStream {
    /// The next chunk; `None` after the last (verified) one. A stream that
    /// ends without `None` being preceded by the final chunk ends in `Err`.
    pub async fn next(&mut self) -> Option<Result<Bytes, NarStreamError>> {
        self.rx.recv().await
    }

    pub fn into_receiver(self) -> mpsc::Receiver<Result<Bytes, NarStreamError>> {
        self.rx
    }
}

/// What a stream checks before its last chunk goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// The NAR's size against the DB's NarSize.
    Size,
    /// Its size and its SHA-256 against the DB's NarHash.
    Hash,
}

/// The kept copies a served NAR may come from and go to.
pub struct Kept {
    pub cache: Arc<NarCache>,
    /// The whole NAR is wanted (not a part of it): it may be kept.
    pub whole: bool,
}

/// Starts streaming `info`'s NAR from byte `offset`, checked as `check`
/// says. With `kept`, a NAR checked for size only comes from its kept copy
/// if there is one, and one served whole may be kept. With `layouts`, a
/// part of a tree's NAR from an offset (checked for size only) is served
/// from its layout instead of a walk up to the offset.
pub fn spawn(
    store: Arc<Store>,
    kept: Option<Kept>,
    layouts: Option<Arc<NarLayouts>>,
    info: PathInfo,
    offset: u64,
    check: Check,
) -> NarStream {
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    if offset > info.nar_size {
        let err = NarStreamError::OffsetBeyondEnd {
            offset,
            size: info.nar_size,
        };
        let _ = tx.try_send(Err(err));
        return NarStream { rx };
    }
    tokio::task::spawn_blocking(move || {
        let kept = kept.filter(|_| check == Check::Size);
        if let Some(Kept { cache, .. }) = &kept {
            if let Some((path, file)) = cache.open_entry(&info) {
                if let Err(e) = run_kept(&path, file, &info, offset, tx.clone()) {
                    // Cut short or unreadable: the stream ends in an error
                    // (part of it went out), and the next one comes from
                    // the store.
                    tracing::warn!(path = %info.path, error = %e, "a kept NAR could not be read; dropping it");
                    cache.forget(&info);
                    let _ = tx.blocking_send(Err(NarStreamError::Read {
                        path: info.path.to_string(),
                        reason: format!("its kept copy: {e}"),
                    }));
                }
                return;
            }
        }
        let layouts = layouts.filter(|_| offset > 0 && check == Check::Size);
        run(
            &store,
            kept.as_ref(),
            layouts.as_deref(),
            &info,
            offset,
            check,
            tx,
        )
    });
    NarStream { rx }
}

/// Serves `info`'s NAR from `offset` out of its kept copy `file` (at
/// `path`). `Err` if the copy could not be read whole (nothing final was
/// sent then).
fn run_kept(
    path: &Path,
    file: File,
    info: &PathInfo,
    offset: u64,
    tx: mpsc::Sender<Result<Bytes, NarStreamError>>,
) -> Result<(), nar::NarError> {
    let mut sink = VerifyingSink::new(tx, info.nar_size, offset, Check::Size);
    match nar::replay(path, file, info.nar_size, &mut sink) {
        // The size is right by construction: this only sends the last piece.
        Ok(()) => {
            let _ = sink.finish(info);
            Ok(())
        }
        // The consumer went away.
        Err(nar::NarError::Sink(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

fn run(
    store: &Store,
    kept: Option<&Kept>,
    layouts: Option<&NarLayouts>,
    info: &PathInfo,
    offset: u64,
    check: Check,
    tx: mpsc::Sender<Result<Bytes, NarStreamError>>,
) {
    let real = store.real_path(&info.path);
    let path = info.path.to_string();
    let corrupt = |reason: String| NarStreamError::Corrupt {
        path: path.clone(),
        reason,
    };
    let mut sink = VerifyingSink::new(tx.clone(), info.nar_size, offset, check);
    // Only a tree can hold the many files that make a NAR worth keeping,
    // and only a whole NAR can be kept.
    let whole = kept.filter(|k| k.whole && offset == 0 && real.is_dir());
    if let Some(writer) = whole.and_then(|k| k.cache.begin(info)) {
        sink.keep_in(writer);
    }
    let layout = layouts.and_then(|l| l.get(info, &real));
    let encoded = match &layout {
        Some(layout) => layout
            .replay(offset, &mut sink)
            .map(|()| nar::Walked::default()),
        None => nar::encode(&real, &mut sink),
    };
    let outcome = match encoded {
        Ok(walked) => {
            let keep = sink.keep.take();
            let (sent, digest) = sink.finish_hashed(info);
            match (&sent, keep, whole) {
                (Ok(()), Some(keep), _) => keep.finish(info, walked.files, digest),
                (Ok(()), None, Some(Kept { cache, .. })) => cache.served(info, walked.files),
                _ => {}
            }
            sent
        }
        Err(nar::NarError::Sink(_)) if sink.oversized => Err(corrupt(format!(
            "longer than the {} bytes the DB says",
            info.nar_size
        ))),
        // The consumer went away: nothing to tell anyone.
        Err(nar::NarError::Sink(_)) => return,
        Err(e @ nar::NarError::SizeChanged(_)) => Err(corrupt(e.to_string())),
        Err(e) => Err(NarStreamError::Read {
            path: path.clone(),
            reason: e.to_string(),
        }),
    };
    if let Err(e) = outcome {
        match e {
            NarStreamError::Corrupt { .. } => {
                tracing::error!(path = %path, error = %e, "refusing to serve a corrupt NAR")
            }
            _ => tracing::warn!(path = %path, error = %e, "NAR stream failed"),
        }
        let _ = tx.blocking_send(Err(e));
    }
}

/// SHA-256 of a stream of chunks: inline for small NARs, on a thread of its
/// own for big ones, so hashing runs beside reading and sending instead of
/// between them.
enum Digester {
    Inline(Sha256),
    Thread {
        tx: std::sync::mpsc::SyncSender<Bytes>,
        done: std::thread::JoinHandle<[u8; 32]>,
    },
}

/// NARs at least this big are hashed on their own thread.
const THREADED_HASH_FROM: u64 = 8 << 20;
/// Chunks queued for the hashing thread.
const HASH_QUEUE: usize = 8;

impl Digester {
    fn new(size: u64) -> Self {
        if size < THREADED_HASH_FROM {
            return Self::Inline(Sha256::new());
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(HASH_QUEUE);
        let spawned = std::thread::Builder::new()
            .name("nar-hash".into())
            .spawn(move || {
                let mut h = Sha256::new();
                for chunk in rx {
                    h.update(&chunk);
                }
                h.finalize().into()
            });
        match spawned {
            Ok(done) => Self::Thread { tx, done },
            // No thread to be had: hash inline.
            Err(_) => Self::Inline(Sha256::new()),
        }
    }

    fn update(&mut self, chunk: &Bytes) {
        match self {
            Self::Inline(h) => h.update(chunk),
            // The thread only stops when `tx` is dropped.
            Self::Thread { tx, .. } => {
                let _ = tx.send(chunk.clone());
            }
        }
    }

    fn finish(self) -> Option<[u8; 32]> {
        match self {
            Self::Inline(h) => Some(h.finalize().into()),
            Self::Thread { tx, done } => {
                drop(tx);
                done.join().ok()
            }
        }
    }
}

/// Hashes everything, skips the first `skip` bytes, passes the encoder's
/// chunks on as they are, and always holds the newest piece back for
/// `finish`, which sends it only when the whole NAR verified.
struct VerifyingSink {
    tx: mpsc::Sender<Result<Bytes, NarStreamError>>,
    /// None: size only.
    digester: Option<Digester>,
    expected_size: u64,
    /// Bytes taken so far: where the next chunk starts in the NAR.
    written: u64,
    skip: u64,
    held: Option<Bytes>,
    oversized: bool,
    /// Whether the hash must match for the last piece to go out.
    check: Check,
    /// Where the NAR is being kept, if it is (it is hashed for that too).
    keep: Option<CacheWriter>,
}

impl VerifyingSink {
    fn new(
        tx: mpsc::Sender<Result<Bytes, NarStreamError>>,
        expected_size: u64,
        skip: u64,
        check: Check,
    ) -> Self {
        Self {
            tx,
            digester: (check == Check::Hash).then(|| Digester::new(expected_size)),
            expected_size,
            written: 0,
            skip,
            held: None,
            oversized: false,
            check,
            keep: None,
        }
    }

    /// Hashes `chunk` (which starts at `start`) and queues what of it lies
    /// past `skip`; the previously held piece goes out.
    fn take_chunk(&mut self, chunk: Bytes, start: u64) -> io::Result<()> {
        if let Some(d) = &mut self.digester {
            d.update(&chunk);
        }
        let end = start + chunk.len() as u64;
        if end <= self.skip {
            return Ok(());
        }
        let from = usize::try_from(self.skip.saturating_sub(start)).unwrap_or(0);
        let piece = chunk.slice(from..);
        if let Some(prev) = self.held.replace(piece) {
            self.tx
                .blocking_send(Ok(prev))
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "NAR consumer gone"))?;
        }
        Ok(())
    }

    /// Also writes what goes by to `writer`, and hashes it for it.
    fn keep_in(&mut self, writer: CacheWriter) {
        let size = self.expected_size;
        self.digester.get_or_insert_with(|| Digester::new(size));
        self.keep = Some(writer);
    }

    fn finish(self, info: &PathInfo) -> Result<(), NarStreamError> {
        self.finish_hashed(info).0
    }

    /// `finish`, and the SHA-256 of the NAR if it was hashed.
    fn finish_hashed(mut self, info: &PathInfo) -> (Result<(), NarStreamError>, Option<[u8; 32]>) {
        let corrupt = |reason: String| NarStreamError::Corrupt {
            path: info.path.to_string(),
            reason,
        };
        if self.written != self.expected_size {
            let reason = format!("{} bytes, DB says {}", self.written, self.expected_size);
            return (Err(corrupt(reason)), None);
        }
        let digest = self.digester.take().and_then(Digester::finish);
        if self.check == Check::Hash && digest != Some(info.nar_hash.0) {
            return (Err(corrupt("hash differs".into())), digest);
        }
        if let Some(last) = self.held.take() {
            // A consumer that left before the last chunk is no fault of the
            // store's: nothing to report.
            let _ = self.tx.blocking_send(Ok(last));
        }
        (Ok(()), digest)
    }
}

impl NarSink for VerifyingSink {
    fn chunk(&mut self, chunk: Bytes) -> io::Result<()> {
        let start = self.written;
        self.written += chunk.len() as u64;
        if self.written > self.expected_size {
            // Bigger than the DB says: stop reading now.
            self.oversized = true;
            return Err(io::Error::other("NAR longer than NarSize"));
        }
        if let Some(keep) = &mut self.keep {
            keep.write(&chunk);
        }
        self.take_chunk(chunk, start)
    }

    fn expected_size(&self) -> Option<u64> {
        Some(self.expected_size)
    }

    /// What lies before the offset asked for, unless it must be hashed.
    fn skippable(&self) -> u64 {
        match self.digester {
            Some(_) => 0,
            None => self.skip.saturating_sub(self.written),
        }
    }

    fn skipped(&mut self, n: u64) {
        self.written += n;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::nix::{Sha256Hash, StorePath};
    use crate::store::nar_encode::CHUNK;

    /// A path info whose NarHash and size are those of `nar`.
    pub(crate) fn info_for(nar: &[u8]) -> PathInfo {
        PathInfo {
            path: StorePath::parse(
                "/nix/store",
                "/nix/store/00000000000000000000000000000000-x",
            )
            .unwrap(),
            nar_hash: Sha256Hash(Sha256::digest(nar).into()),
            nar_size: nar.len() as u64,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
            ultimate: false,
        }
    }

    /// Feeds `nar` through a sink in uneven pieces; returns what came out
    /// and how `finish` ended.
    fn stream(nar: &[u8], info: &PathInfo, skip: u64) -> (Vec<u8>, Result<(), NarStreamError>) {
        stream_checked(nar, info, skip, Check::Hash)
    }

    fn stream_checked(
        nar: &[u8],
        info: &PathInfo,
        skip: u64,
        check: Check,
    ) -> (Vec<u8>, Result<(), NarStreamError>) {
        let (tx, mut rx) = mpsc::channel(4096);
        let mut sink = VerifyingSink::new(tx, info.nar_size, skip, check);
        for piece in nar.chunks(100_003) {
            sink.chunk(Bytes::copy_from_slice(piece)).unwrap();
        }
        let end = sink.finish(info);
        let mut out = Vec::new();
        while let Ok(item) = rx.try_recv() {
            out.extend_from_slice(&item.unwrap());
        }
        (out, end)
    }

    #[test]
    fn any_offset_gives_the_rest_of_the_nar() {
        for size in [1000usize, 3 * CHUNK + 17, (THREADED_HASH_FROM as usize) + 5] {
            let nar: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let info = info_for(&nar);
            let skips = [0, 1, CHUNK as u64, size as u64 - 1, size as u64];
            for skip in skips.into_iter().filter(|s| *s <= size as u64) {
                let (out, end) = stream(&nar, &info, skip);
                assert!(end.is_ok(), "size {size} skip {skip}");
                assert_eq!(out, &nar[skip as usize..], "size {size} skip {skip}");
            }
        }
    }

    #[test]
    fn a_mismatch_withholds_the_end() {
        for size in [1000usize, (THREADED_HASH_FROM as usize) + 5] {
            let nar = vec![3u8; size];
            let mut info = info_for(&nar);
            info.nar_hash = Sha256Hash([0; 32]);
            let (out, end) = stream(&nar, &info, 0);
            assert!(matches!(end, Err(NarStreamError::Corrupt { .. })));
            assert!(out.len() < size, "a wrong NAR was sent whole");
            // Checked for size only, it goes out whole: the receiver's
            // hash is what catches it.
            let (out, end) = stream_checked(&nar, &info, 0, Check::Size);
            assert!(end.is_ok());
            assert_eq!(out.len(), size);
        }
    }

    #[test]
    fn a_size_check_withholds_the_end_of_a_short_nar() {
        let nar = vec![3u8; 5000];
        let mut info = info_for(&nar);
        info.nar_size += 1;
        let (out, end) = stream_checked(&nar, &info, 0, Check::Size);
        assert!(matches!(end, Err(NarStreamError::Corrupt { .. })));
        assert!(out.len() < nar.len());
    }
}
