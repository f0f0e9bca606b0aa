//! Reads a NAR a peer sends after `NarFollows`: raw bytes up to the end of
//! the stream (`Nar`), or chunk frames (`NarChunks`, `nar_chunks`) that are
//! checked and inflated here, off a QUIC stream or a bulk connection.
//! Either way the caller gets plain NAR bytes in order; judging them
//! (size, hash) is its business.

use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::chunk_buffers::ChunkBuffers;
use crate::mesh::bulk::Idle;
use crate::mesh::identity::NodeId;
use crate::mesh::nar_chunks::{self, ChunkError, ChunkHeader, Unpacker, HEADER};

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
    /// A bulk connection broke (or was cut off by the holder).
    #[error("bulk connection: {0}")]
    Bulk(std::io::Error),
    /// The holder stopped a bulk connection's NAR with this code (what a
    /// QUIC stream's reset would say).
    #[error("the holder stopped with code {0}")]
    Stopped(u32),
}

impl NarReadError {
    /// The code the holder stopped with, on either transport.
    pub fn holder_code(&self) -> Option<u32> {
        match self {
            NarReadError::Read(e) => crate::mesh::client::reset_code(e),
            NarReadError::Stopped(code) => Some(*code),
            _ => None,
        }
    }
}

/// A bulk connection (TLS on TCP) as the asker holds it.
pub trait BulkConn: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> BulkConn for T {}
pub type BulkStream = Box<dyn BulkConn>;

/// (Version 7.) Where a kept bulk connection goes once its part is done.
pub struct Recycle {
    pub idle: Arc<Idle<BulkStream>>,
    pub node: NodeId,
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
    /// Chunk frames on a bulk connection, which ends after the last (or,
    /// kept, is handed to `recycle` at the holder's `DONE`).
    Bulk {
        /// `None` once the part is done.
        io: Option<BulkStream>,
        unpacker: Unpacker,
        wire: u64,
        recycle: Option<Recycle>,
    },
}

impl NarReader {
    pub fn raw(recv: quinn::RecvStream) -> Self {
        NarReader::Raw {
            recv,
            buf: BytesMut::new(),
        }
    }

    /// Chunk frames answering a request at `level`.
    pub fn chunks(recv: quinn::RecvStream, level: u8) -> Self {
        NarReader::Chunks {
            recv,
            unpacker: Unpacker::new(level),
            wire: 0,
        }
    }

    /// Chunk frames on a bulk connection answering a request at `level`,
    /// read into `buffers`; with `recycle`, the request set
    /// `nar_chunks::KEEP`.
    pub fn bulk(
        io: BulkStream,
        level: u8,
        recycle: Option<Recycle>,
        buffers: ChunkBuffers,
    ) -> Self {
        NarReader::Bulk {
            io: Some(io),
            unpacker: Unpacker::with_buffers(level, buffers),
            wire: 0,
            recycle,
        }
    }

    /// Whether the bytes come over a bulk connection.
    pub fn is_bulk(&self) -> bool {
        matches!(self, NarReader::Bulk { .. })
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
                let len = header.wire_len as usize;
                let mut payload = unpacker.buffers().take_len(len);
                if read_exact(recv, &mut payload).await? < len {
                    return Err(NarReadError::EndsMidFrame);
                }
                *wire += (HEADER + len) as u64;
                let payload = unpacker.buffers().lend(payload);
                Ok(Some(unpacker.unpack(header, payload)?))
            }
            NarReader::Bulk {
                io: slot,
                unpacker,
                wire,
                recycle,
            } => {
                let Some(io) = slot else {
                    return Ok(None);
                };
                let mut head = [0u8; HEADER];
                match fill(io, &mut head).await.map_err(NarReadError::Bulk)? {
                    0 => return Ok(None),
                    n if n < HEADER => return Err(NarReadError::EndsMidFrame),
                    _ => {}
                }
                match nar_chunks::stop_code(head) {
                    // The part is over and the connection ready for the
                    // next; one that was not asked to stay is closed.
                    Some(nar_chunks::DONE) => {
                        if let (Some(io), Some(r)) = (slot.take(), recycle.take()) {
                            r.idle.put(r.node, io, Instant::now());
                        }
                        return Ok(None);
                    }
                    Some(code) => return Err(NarReadError::Stopped(code)),
                    None => {}
                }
                let header = ChunkHeader::parse(head)?;
                let len = header.wire_len as usize;
                let mut payload = unpacker.buffers().take(len);
                while payload.len() < len {
                    let room = len - payload.len();
                    match io.read_buf(&mut (&mut payload).limit(room)).await {
                        Ok(0) => return Err(NarReadError::EndsMidFrame),
                        Ok(_) => {}
                        Err(e) => return Err(NarReadError::Bulk(e)),
                    }
                }
                *wire += (HEADER + len) as u64;
                let payload = unpacker.buffers().lend(payload);
                Ok(Some(unpacker.unpack(header, payload)?))
            }
        }
    }

    /// Bytes that crossed the wire so far, if they differ from the NAR's.
    pub fn wire_bytes(&self) -> Option<u64> {
        match self {
            NarReader::Raw { .. } => None,
            NarReader::Chunks { wire, .. } | NarReader::Bulk { wire, .. } => Some(*wire),
        }
    }

    /// Tells the peer to stop sending. A bulk connection carries no code:
    /// it closes when the reader is dropped, and the holder's next write
    /// fails.
    pub fn stop(&mut self, code: u32) {
        match self {
            NarReader::Raw { recv, .. } | NarReader::Chunks { recv, .. } => {
                let _ = recv.stop(code.into());
            }
            NarReader::Bulk { .. } => {}
        }
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

/// `read_exact` that tells how much it filled when the stream ends first.
async fn fill(io: &mut BulkStream, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match io.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
