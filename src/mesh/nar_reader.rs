//! Reads a NAR a peer sends after `NarFollows`: raw bytes up to the end of
//! the stream (`Nar`), or chunk frames (`NarChunks`, `nar_chunks`) that are
//! checked and inflated here, off a QUIC stream or a bulk connection.
//! Either way the caller gets plain NAR bytes in order; judging them
//! (size, hash) is its business.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
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
    /// A bulk connection broke, was cut off by the holder, or ended before
    /// the part's end (`cut_off`).
    #[error("bulk connection: {0}")]
    Bulk(std::io::Error),
    /// The holder stopped a bulk connection's NAR with this code (what a
    /// QUIC stream's reset would say).
    #[error("the holder stopped with code {0}")]
    Stopped(u32),
    /// More bytes than the part asked for (`next_into`).
    #[error("more bytes than the part asked for")]
    Overflow,
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

/// A bulk connection (TLS on TCP, or plain TCP) as the asker holds it.
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
    /// Chunk frames (`nar_chunks`), checked and inflated here.
    Framed {
        from: FrameSource,
        unpacker: Unpacker,
        /// Bytes on the wire so far (frames and headers).
        wire: u64,
        waits: Waits,
    },
}

/// Of the frames read so far, how many had arrived when the reader came
/// for them: a reader that finds most of them there is behind the link
/// (`fetch::raw_stripes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Waits {
    pub frames: u32,
    pub there: u32,
}

/// `fut`'s output, and whether it was ready when first polled (nothing to
/// wait for).
async fn noting_wait<F: std::future::Future>(fut: F) -> (F::Output, bool) {
    let mut fut = std::pin::pin!(fut);
    match std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await {
        std::task::Poll::Ready(out) => (out, true),
        std::task::Poll::Pending => (fut.await, false),
    }
}

/// Where chunk frames come from.
pub enum FrameSource {
    Quic(quinn::RecvStream),
    /// A bulk connection, which ends after the last frame (or, with
    /// `keep`, at the holder's `DONE`, and is then handed to `recycle`).
    Bulk {
        /// `None` once the part is done.
        io: Option<BulkStream>,
        recycle: Option<Recycle>,
        /// The request set `nar_chunks::KEEP`: only `DONE` ends the part.
        keep: bool,
        /// A plain connection (version 8): the bytes came in the clear.
        clear: bool,
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
        NarReader::Framed {
            from: FrameSource::Quic(recv),
            unpacker: Unpacker::new(level),
            wire: 0,
            waits: Waits::default(),
        }
    }

    /// Chunk frames on a bulk connection answering a request at `level`,
    /// read into `buffers`; with `recycle`, the request set
    /// `nar_chunks::KEEP`; `clear`: a plain connection, not TLS.
    pub fn bulk(
        io: BulkStream,
        level: u8,
        recycle: Option<Recycle>,
        buffers: ChunkBuffers,
        clear: bool,
    ) -> Self {
        NarReader::Framed {
            from: FrameSource::Bulk {
                io: Some(io),
                recycle,
                keep: level & nar_chunks::KEEP != 0,
                clear,
            },
            unpacker: Unpacker::with_buffers(level, buffers),
            wire: 0,
            waits: Waits::default(),
        }
    }

    /// Whether the bytes come over a bulk connection.
    pub fn is_bulk(&self) -> bool {
        matches!(
            self,
            NarReader::Framed {
                from: FrameSource::Bulk { .. },
                ..
            }
        )
    }

    /// Whether the bytes come in the clear, on a plain bulk connection: a
    /// host on the path could have changed them.
    pub fn in_the_clear(&self) -> bool {
        matches!(
            self,
            NarReader::Framed {
                from: FrameSource::Bulk { clear: true, .. },
                ..
            }
        )
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
            NarReader::Framed {
                from,
                unpacker,
                wire,
                ..
            } => {
                let Some(header) = from.head().await? else {
                    return Ok(None);
                };
                let len = header.wire_len as usize;
                let mut payload = unpacker.buffers().take_len(len);
                from.payload(&mut payload).await?;
                *wire += (HEADER + len) as u64;
                let payload = unpacker.buffers().lend(payload);
                Ok(Some(unpacker.unpack(header, payload)?))
            }
        }
    }

    /// `next`, written to the start of `out` instead of into a buffer of
    /// its own: a striped fetch reads each stripe into one buffer, and so
    /// does not copy every byte once more. How many bytes it wrote; `None`
    /// at the end of the stream. A chunk that does not fit in `out` is
    /// `NarReadError::Overflow`, read no further.
    pub async fn next_into(&mut self, out: &mut [u8]) -> Result<Option<usize>, NarReadError> {
        match self {
            NarReader::Raw { recv, .. } => {
                if out.is_empty() {
                    // Any byte more is one too many.
                    let mut probe = [0u8; 1];
                    return match recv.read(&mut probe).await? {
                        Some(n) if n > 0 => Err(NarReadError::Overflow),
                        _ => Ok(None),
                    };
                }
                Ok(recv.read(out).await?)
            }
            NarReader::Framed {
                from,
                unpacker,
                wire,
                waits,
            } => {
                let (head, there) = noting_wait(from.head()).await;
                let Some(header) = head? else {
                    return Ok(None);
                };
                waits.frames = waits.frames.saturating_add(1);
                waits.there = waits.there.saturating_add(u32::from(there));
                let (raw, len) = (header.raw_len as usize, header.wire_len as usize);
                let out = out.get_mut(..raw).ok_or(NarReadError::Overflow)?;
                if header.compressed() {
                    let mut payload = unpacker.buffers().take_len(len);
                    from.payload(&mut payload).await?;
                    let unpacked = unpacker.unpack_into(header, &payload, out);
                    unpacker.buffers().put_back(payload);
                    unpacked?;
                } else {
                    from.payload(out).await?;
                }
                *wire += (HEADER + len) as u64;
                Ok(Some(raw))
            }
        }
    }

    /// Of the frames `next_into` read so far, how many had arrived when it
    /// came for them (none for raw bytes).
    pub fn waits(&self) -> Waits {
        match self {
            NarReader::Raw { .. } => Waits::default(),
            NarReader::Framed { waits, .. } => *waits,
        }
    }

    /// Bytes that crossed the wire so far, if they differ from the NAR's.
    pub fn wire_bytes(&self) -> Option<u64> {
        match self {
            NarReader::Raw { .. } => None,
            NarReader::Framed { wire, .. } => Some(*wire),
        }
    }

    /// Tells the peer to stop sending. A bulk connection carries no code:
    /// it closes when the reader is dropped, and the holder's next write
    /// fails.
    pub fn stop(&mut self, code: u32) {
        match self {
            NarReader::Raw { recv, .. }
            | NarReader::Framed {
                from: FrameSource::Quic(recv),
                ..
            } => {
                let _ = recv.stop(code.into());
            }
            NarReader::Framed {
                from: FrameSource::Bulk { .. },
                ..
            } => {}
        }
    }
}

impl FrameSource {
    /// The next frame's header, checked; `None` at the end of the part.
    async fn head(&mut self) -> Result<Option<ChunkHeader>, NarReadError> {
        let mut head = [0u8; HEADER];
        let n = match self {
            FrameSource::Quic(recv) => read_exact(recv, &mut head).await?,
            FrameSource::Bulk {
                io: slot,
                recycle,
                keep,
                ..
            } => {
                let Some(io) = slot else {
                    return Ok(None);
                };
                let n = fill(io, &mut head).await.map_err(NarReadError::Bulk)?;
                if (n == 0 && *keep) || (n > 0 && n < HEADER) {
                    return Err(cut_off());
                }
                match nar_chunks::stop_code(head).filter(|_| n == HEADER) {
                    // The part is over and the connection ready for the
                    // next; one that was not asked to stay is closed.
                    Some(nar_chunks::DONE) => {
                        if let (Some(io), Some(r)) = (slot.take(), recycle.take()) {
                            r.idle.put(r.node, io, Instant::now());
                        }
                        return Ok(None);
                    }
                    Some(code) => return Err(NarReadError::Stopped(code)),
                    None => n,
                }
            }
        };
        match n {
            0 => Ok(None),
            n if n < HEADER => Err(NarReadError::EndsMidFrame),
            _ => Ok(Some(ChunkHeader::parse(head)?)),
        }
    }

    /// Fills `buf` with the rest of the frame's payload.
    async fn payload(&mut self, buf: &mut [u8]) -> Result<(), NarReadError> {
        let n = match self {
            FrameSource::Quic(recv) => read_exact(recv, buf).await?,
            FrameSource::Bulk { io: Some(io), .. } => {
                match fill(io, buf).await.map_err(NarReadError::Bulk)? {
                    n if n < buf.len() => return Err(cut_off()),
                    n => n,
                }
            }
            FrameSource::Bulk { io: None, .. } => 0,
        };
        match n < buf.len() {
            true => Err(NarReadError::EndsMidFrame),
            false => Ok(()),
        }
    }
}

/// A bulk connection that ended inside a frame, or (its request set
/// `KEEP`) before the holder's `DONE`. On TCP the holder's death ends the
/// connection as its close would, so this is a failed holder, not a lie:
/// what a TLS connection says of an end without its close, and the same
/// error.
fn cut_off() -> NarReadError {
    NarReadError::Bulk(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the connection ended before the part's end",
    ))
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

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::mesh::nar_chunks::{chunk_buffers, Codec, Packer, CHUNK, LZ4};

    const LEVEL: u8 = LZ4 | 1;

    /// Bytes that compress, a chunk and a half of them.
    fn nar() -> Vec<u8> {
        (0..(CHUNK + CHUNK / 2) as u32)
            .map(|i| (i % 251) as u8 ^ ((i / 4096) as u8).rotate_left(i % 7))
            .collect()
    }

    /// A bulk reader of `frames`, then the holder's `DONE`.
    fn reader_of(frames: Vec<Vec<u8>>) -> NarReader {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            for f in frames {
                far.write_all(&f).await.unwrap();
            }
            far.write_all(&nar_chunks::stop_header(nar_chunks::DONE))
                .await
                .unwrap();
        });
        NarReader::bulk(Box::new(near), LEVEL, None, chunk_buffers(), false)
    }

    /// Frames of `raw`'s chunks, packed with each codec in turn.
    fn frames(raw: &[u8]) -> Vec<Vec<u8>> {
        let mut p = Packer::new(LEVEL);
        let codecs = [Some(Codec::Zstd), None, Some(Codec::Lz4)];
        raw.chunks(CHUNK / 2)
            .zip(codecs.iter().cycle())
            .map(|(c, &codec)| p.pack_with(c, codec))
            .collect()
    }

    #[tokio::test]
    async fn chunks_read_into_one_buffer_are_the_nar_whatever_their_codec() {
        let raw = nar();
        let mut reader = reader_of(frames(&raw));
        let mut out = vec![0u8; raw.len()];
        let mut filled = 0;
        while let Some(n) = reader.next_into(&mut out[filled..]).await.unwrap() {
            filled += n;
        }
        assert_eq!(filled, raw.len());
        assert!(out == raw, "the bytes differ");
        let mut reader = reader_of(frames(&raw));
        let mut whole = Vec::new();
        while let Some(chunk) = reader.next().await.unwrap() {
            whole.extend_from_slice(&chunk);
        }
        assert!(whole == raw, "next and next_into differ");
    }

    #[tokio::test]
    async fn a_kept_part_that_ends_without_done_is_cut_off() {
        let raw = nar();
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let sent = frames(&raw);
        tokio::spawn(async move {
            for f in sent {
                far.write_all(&f).await.unwrap();
            }
            // The holder's process dies here: the connection just ends.
        });
        let mut reader = NarReader::bulk(
            Box::new(near),
            LEVEL | nar_chunks::KEEP,
            None,
            chunk_buffers(),
            false,
        );
        let mut got = 0;
        let end = loop {
            match reader.next().await {
                Ok(Some(chunk)) => got += chunk.len(),
                other => break other,
            }
        };
        assert_eq!(got, raw.len(), "every frame sent was read");
        assert!(
            matches!(&end, Err(NarReadError::Bulk(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn a_chunk_that_does_not_fit_is_an_overflow() {
        let raw = nar();
        let mut reader = reader_of(frames(&raw));
        let mut out = vec![0u8; CHUNK / 2 + 100];
        assert_eq!(reader.next_into(&mut out).await.unwrap(), Some(CHUNK / 2));
        assert!(matches!(
            reader.next_into(&mut out[CHUNK / 2..]).await,
            Err(NarReadError::Overflow)
        ));
    }

    #[tokio::test]
    async fn a_frame_that_inflates_to_another_length_is_refused() {
        let raw = nar();
        let mut frame = Packer::new(LEVEL).pack_with(&raw[..CHUNK], Some(Codec::Zstd));
        // The header says one byte fewer than the payload inflates to.
        let claimed = (CHUNK as u32 - 1).to_be_bytes();
        frame[..4].copy_from_slice(&claimed);
        let mut reader = reader_of(vec![frame]);
        let mut out = vec![0u8; CHUNK];
        assert!(matches!(
            reader.next_into(&mut out).await,
            Err(NarReadError::Chunk(ChunkError::Undecodable(_)))
        ));
    }
}
