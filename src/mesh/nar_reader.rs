//! Reads a NAR a peer sends after `NarFollows`: raw bytes up to the end of
//! the stream (`Nar`), or chunk frames (`NarChunks`, `nar_chunks`) that are
//! checked and inflated here. Either way the caller gets plain NAR bytes in
//! order; judging them (size, hash) is its business.

use bytes::{Bytes, BytesMut};
use thiserror::Error;

use crate::mesh::nar_chunks::{ChunkError, ChunkHeader, Unpacker, HEADER};

/// Largest piece read off a raw stream at once.
const READ_CHUNK: usize = 256 * 1024;
/// A read buffer with less room left than this is replaced by a new one.
const MIN_READ: usize = 16 * 1024;

#[derive(Debug, Error)]
pub enum NarReadError {
    #[error(transparent)]
    Read(#[from] quinn::ReadError),
    /// The peer sent a frame that is not one (a lie, or a broken agent).
    #[error("bad chunk: {0}")]
    Chunk(#[from] ChunkError),
    #[error("stream ended inside a chunk frame")]
    EndsMidFrame,
}

pub enum NarReader {
    Raw {
        recv: quinn::RecvStream,
        buf: BytesMut,
    },
    Chunks {
        recv: quinn::RecvStream,
        unpacker: Unpacker,
        /// Bytes on the wire so far (frames and headers).
        wire: u64,
    },
}

impl NarReader {
    pub fn raw(recv: quinn::RecvStream) -> Self {
        NarReader::Raw {
            recv,
            buf: BytesMut::new(),
        }
    }

    pub fn chunks(recv: quinn::RecvStream) -> Self {
        NarReader::Chunks {
            recv,
            unpacker: Unpacker::new(),
            wire: 0,
        }
    }

    /// The next NAR bytes; `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<Bytes>, NarReadError> {
        match self {
            NarReader::Raw { recv, buf } => {
                // QUIC hands data over one packet's worth (about 1.4 KiB)
                // at a time; reading into a large buffer takes all that has
                // arrived at once, so hashing, counting and Nix's HTTP
                // stream work on big pieces.
                if buf.len() < MIN_READ {
                    *buf = BytesMut::zeroed(READ_CHUNK);
                }
                Ok(recv.read(buf).await?.map(|n| buf.split_to(n).freeze()))
            }
            NarReader::Chunks {
                recv,
                unpacker,
                wire,
            } => {
                let mut head = [0u8; HEADER];
                match read_exact(recv, &mut head).await? {
                    0 => return Ok(None),
                    n if n < HEADER => return Err(NarReadError::EndsMidFrame),
                    _ => {}
                }
                let header = ChunkHeader::parse(head)?;
                let mut payload = BytesMut::zeroed(header.wire_len as usize);
                if read_exact(recv, &mut payload).await? < payload.len() {
                    return Err(NarReadError::EndsMidFrame);
                }
                *wire += (HEADER + payload.len()) as u64;
                Ok(Some(unpacker.unpack(header, payload.freeze())?))
            }
        }
    }

    /// Bytes that crossed the wire so far, if they differ from the NAR's.
    pub fn wire_bytes(&self) -> Option<u64> {
        match self {
            NarReader::Raw { .. } => None,
            NarReader::Chunks { wire, .. } => Some(*wire),
        }
    }

    /// Tells the peer to stop sending.
    pub fn stop(&mut self, code: u32) {
        let recv = match self {
            NarReader::Raw { recv, .. } | NarReader::Chunks { recv, .. } => recv,
        };
        let _ = recv.stop(code.into());
    }
}

/// Fills `buf` unless the stream ends first; how much it filled.
async fn read_exact(
    recv: &mut quinn::RecvStream,
    buf: &mut [u8],
) -> Result<usize, quinn::ReadError> {
    let mut filled = 0;
    while filled < buf.len() {
        match recv.read(&mut buf[filled..]).await? {
            Some(n) => filled += n,
            None => break,
        }
    }
    Ok(filled)
}
