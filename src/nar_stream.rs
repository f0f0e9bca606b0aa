//! Streams a store path's NAR out of the local store: a blocking thread runs
//! the encoder, hashes every byte, and hands bounded chunks to an async
//! consumer. The last chunk is held back until the SHA-256 and size match the
//! DB, so a corrupted file can never produce a complete, wrong NAR: the
//! stream ends in an error instead and the event is logged.

use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::nix::nar::{self, NarSink};
use crate::nix::PathInfo;
use crate::store::Store;

/// Bytes per chunk handed to the consumer.
pub const CHUNK: usize = 256 * 1024;
/// Chunks in flight per stream; with `CHUNK` this bounds memory per stream.
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

/// Starts streaming `info`'s NAR from byte `offset`.
pub fn spawn(store: Arc<Store>, info: PathInfo, offset: u64) -> NarStream {
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    if offset > info.nar_size {
        let err = NarStreamError::OffsetBeyondEnd {
            offset,
            size: info.nar_size,
        };
        let _ = tx.try_send(Err(err));
        return NarStream { rx };
    }
    tokio::task::spawn_blocking(move || run(&store, &info, offset, tx));
    NarStream { rx }
}

fn run(
    store: &Store,
    info: &PathInfo,
    offset: u64,
    tx: mpsc::Sender<Result<Bytes, NarStreamError>>,
) {
    let real = store.real_path(&info.path);
    let path = info.path.to_string();
    let corrupt = |reason: String| NarStreamError::Corrupt {
        path: path.clone(),
        reason,
    };
    let mut sink = VerifyingSink::new(tx.clone(), info.nar_size, offset);
    let outcome = match nar::encode(&real, &mut sink) {
        Ok(()) => sink.finish(info),
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

/// Hashes everything, skips the first `skip` bytes, sends full chunks, and
/// always keeps at least one byte back for `finish`.
struct VerifyingSink {
    tx: mpsc::Sender<Result<Bytes, NarStreamError>>,
    hasher: Sha256,
    expected_size: u64,
    written: u64,
    skip: u64,
    buf: BytesMut,
    oversized: bool,
}

impl VerifyingSink {
    fn new(tx: mpsc::Sender<Result<Bytes, NarStreamError>>, expected_size: u64, skip: u64) -> Self {
        Self {
            tx,
            hasher: Sha256::new(),
            expected_size,
            written: 0,
            skip,
            buf: BytesMut::with_capacity(2 * CHUNK),
            oversized: false,
        }
    }

    fn finish(mut self, info: &PathInfo) -> Result<(), NarStreamError> {
        let corrupt = |reason: String| NarStreamError::Corrupt {
            path: info.path.to_string(),
            reason,
        };
        if self.written != self.expected_size {
            return Err(corrupt(format!(
                "{} bytes, DB says {}",
                self.written, self.expected_size
            )));
        }
        let digest: [u8; 32] = self.hasher.finalize_reset().into();
        if digest != info.nar_hash.0 {
            return Err(corrupt("hash differs".into()));
        }
        if !self.buf.is_empty() {
            // A consumer that left before the last chunk is no fault of the
            // store's: nothing to report.
            let _ = self.tx.blocking_send(Ok(self.buf.split().freeze()));
        }
        Ok(())
    }
}

impl NarSink for VerifyingSink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let start = self.written;
        self.written += bytes.len() as u64;
        if self.written > self.expected_size {
            // Bigger than the DB says: stop reading now.
            self.oversized = true;
            return Err(io::Error::other("NAR longer than NarSize"));
        }
        self.hasher.update(bytes);
        let keep_from = self.skip.saturating_sub(start);
        let Ok(keep_from) = usize::try_from(keep_from) else {
            return Ok(());
        };
        if keep_from >= bytes.len() {
            return Ok(());
        }
        self.buf.extend_from_slice(&bytes[keep_from..]);
        while self.buf.len() > CHUNK {
            let chunk = self.buf.split_to(CHUNK).freeze();
            self.tx
                .blocking_send(Ok(chunk))
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "NAR consumer gone"))?;
        }
        Ok(())
    }
}
