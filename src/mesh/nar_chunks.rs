//! NAR bytes in chunk frames (protocol version 3): after `NarFollows`, a
//! `NarChunks` stream carries the NAR from the asked offset as a sequence
//! of frames, each `u32 BE raw_len`, `u32 BE wire_len`, then `wire_len`
//! bytes. `wire_len == raw_len`: the chunk's bytes as they are (it did not
//! compress); `wire_len < raw_len`: one zstd frame that inflates to exactly
//! `raw_len` bytes. Every frame stands alone, so a reader knows the NAR
//! offset of each byte and failover from an offset works as for raw bytes.
//! On a bulk connection (protocol version 5), which has no stream reset, a
//! header with `raw_len == 0` is a stop: `wire_len` is the code a QUIC
//! stream's reset would carry, and nothing follows.
//! Pure: no I/O, the caller moves the bytes.

use bytes::Bytes;
use thiserror::Error;

/// Bytes of NAR per chunk the packer makes.
pub const CHUNK: usize = 256 << 10;
/// Largest `raw_len` a reader accepts: what one frame may inflate to.
pub const MAX_CHUNK: usize = 1 << 20;
/// Frame header: raw length and wire length.
pub const HEADER: usize = 8;
/// A chunk is sent compressed only if that saves at least 1/32 of it.
const WORTH_IT: usize = 32;
/// After a chunk that did not compress, the next this many are sent raw
/// without trying (data that does not compress seldom starts to).
const SKIP_AFTER_MISS: u32 = 7;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("chunk of {0} bytes is over the limit")]
    TooLarge(u32),
    #[error("empty chunk")]
    Empty,
    #[error("chunk's wire length {wire} exceeds its raw length {raw}")]
    Inflated { raw: u32, wire: u32 },
    #[error("chunk does not decompress to its {0} bytes")]
    BadZstd(u32),
}

/// A frame header, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub raw_len: u32,
    pub wire_len: u32,
}

impl ChunkHeader {
    /// Checks a header before any of its payload is read.
    pub fn parse(b: [u8; HEADER]) -> Result<Self, ChunkError> {
        let raw_len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let wire_len = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        if raw_len as usize > MAX_CHUNK {
            return Err(ChunkError::TooLarge(raw_len));
        }
        if raw_len == 0 || wire_len == 0 {
            return Err(ChunkError::Empty);
        }
        if wire_len > raw_len {
            return Err(ChunkError::Inflated {
                raw: raw_len,
                wire: wire_len,
            });
        }
        Ok(Self { raw_len, wire_len })
    }

    pub fn compressed(&self) -> bool {
        self.wire_len < self.raw_len
    }
}

/// The sender's side: packs NAR bytes into frames at one zstd level (0:
/// never compress), skipping the work on data that does not compress.
pub struct Packer {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    skip: u32,
    misses: u64,
    /// Whether the last chunk was run through zstd.
    tried: bool,
}

impl Packer {
    pub fn new(level: u8) -> Self {
        let level = level & !ADAPTIVE;
        let compressor = (level > 0)
            .then(|| zstd::bulk::Compressor::new(i32::from(level.min(MAX_LEVEL))).ok())
            .flatten();
        Self {
            compressor,
            skip: 0,
            misses: 0,
            tried: false,
        }
    }

    /// One frame of `raw` (at most `MAX_CHUNK` bytes, not empty).
    pub fn pack(&mut self, raw: &[u8]) -> Vec<u8> {
        self.pack_with(raw, true)
    }

    /// `pack`, trying compression only if `try_it` (the holder's pace
    /// may say the link takes raw bytes as fast as it could pack them).
    pub fn pack_with(&mut self, raw: &[u8], try_it: bool) -> Vec<u8> {
        debug_assert!(!raw.is_empty() && raw.len() <= MAX_CHUNK);
        let raw_len = raw.len() as u32;
        let mut frame = Vec::with_capacity(HEADER + raw.len());
        frame.extend_from_slice(&raw_len.to_be_bytes());
        frame.extend_from_slice(&[0; 4]);
        let room = raw.len() - raw.len() / WORTH_IT;
        self.tried = try_it && self.skip == 0 && self.compressor.is_some();
        let packed = match &mut self.compressor {
            Some(_) if !try_it => None,
            Some(c) if self.skip == 0 => {
                frame.resize(HEADER + room, 0);
                let n = c.compress_to_buffer(raw, &mut frame[HEADER..]).ok();
                if n.is_none() {
                    self.skip = SKIP_AFTER_MISS;
                    self.misses += 1;
                }
                n
            }
            Some(_) => {
                self.skip -= 1;
                None
            }
            None => None,
        };
        let wire_len = match packed {
            Some(n) => {
                frame.truncate(HEADER + n);
                n as u32
            }
            None => {
                frame.truncate(HEADER);
                frame.extend_from_slice(raw);
                raw_len
            }
        };
        frame[4..HEADER].copy_from_slice(&wire_len.to_be_bytes());
        frame
    }

    /// Chunks that did not compress and went raw.
    pub fn misses(&self) -> u64 {
        self.misses
    }

    /// Whether the last chunk was run through zstd (not skipped).
    pub fn tried_last(&self) -> bool {
        self.tried
    }

    /// Whether it ever compresses (level 0 never does).
    pub fn compresses(&self) -> bool {
        self.compressor.is_some()
    }
}

/// The header of a frame that carries `raw_len` NAR bytes as they are.
pub fn raw_header(raw_len: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&raw_len.to_be_bytes());
    h[4..].copy_from_slice(&raw_len.to_be_bytes());
    h
}

/// The header that stops a bulk connection's NAR with `code` (in place
/// of a QUIC stream's reset).
pub fn stop_header(code: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[4..].copy_from_slice(&code.to_be_bytes());
    h
}

/// The code of a stop header, if `b` is one.
pub fn stop_code(b: [u8; HEADER]) -> Option<u32> {
    (b[..4] == [0; 4]).then(|| u32::from_be_bytes([b[4], b[5], b[6], b[7]]))
}

/// Highest level a receiver may ask for: beyond it zstd is too slow for a
/// LAN and its windows too big for the memory bound.
pub const MAX_LEVEL: u8 = 9;
/// (Version 5.) Set in a request's level: compress at the level in the
/// other bits only while the holder's pace says it pays (`mesh::pace`:
/// the holder's TCP connection delivers raw bytes slower than it packs
/// them). On a QUIC stream, where the holder cannot tell, it is ignored.
pub const ADAPTIVE: u8 = 0x80;

/// The receiver's side: inflates frames, never past their raw length.
pub struct Unpacker {
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl Default for Unpacker {
    fn default() -> Self {
        Self::new()
    }
}

impl Unpacker {
    pub fn new() -> Self {
        Self {
            decompressor: zstd::bulk::Decompressor::new().ok(),
        }
    }

    /// The chunk's NAR bytes from its checked header and its `wire_len`
    /// bytes of payload.
    pub fn unpack(&mut self, header: ChunkHeader, payload: Bytes) -> Result<Bytes, ChunkError> {
        debug_assert_eq!(payload.len(), header.wire_len as usize);
        if !header.compressed() {
            return Ok(payload);
        }
        let bad = ChunkError::BadZstd(header.raw_len);
        let d = self.decompressor.as_mut().ok_or(bad.clone())?;
        let mut out = vec![0u8; header.raw_len as usize];
        // The buffer is the bound: a frame that would inflate further fails.
        match d.decompress_to_buffer(&payload[..], &mut out[..]) {
            Ok(n) if n == out.len() => Ok(Bytes::from(out)),
            _ => Err(bad),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(frame: &[u8]) -> ChunkHeader {
        let mut h = [0u8; HEADER];
        h.copy_from_slice(&frame[..HEADER]);
        ChunkHeader::parse(h).unwrap()
    }

    fn round_trip(packer: &mut Packer, raw: &[u8]) -> ChunkHeader {
        let frame = packer.pack(raw);
        let h = header(&frame);
        assert_eq!(frame.len(), HEADER + h.wire_len as usize);
        let out = Unpacker::new()
            .unpack(h, Bytes::copy_from_slice(&frame[HEADER..]))
            .unwrap();
        assert_eq!(&out[..], raw);
        h
    }

    #[test]
    fn a_stop_header_carries_its_code_and_is_no_chunk() {
        let h = stop_header(6);
        assert_eq!(stop_code(h), Some(6));
        assert_eq!(ChunkHeader::parse(h), Err(ChunkError::Empty));
        assert_eq!(stop_code(raw_header(1)), None);
    }

    #[test]
    fn a_raw_header_is_what_the_packer_writes_for_bytes_it_leaves() {
        let raw = vec![9u8; 1000];
        let frame = Packer::new(0).pack(&raw);
        assert_eq!(frame[..HEADER], raw_header(1000));
        assert!(!header(&frame).compressed());
        assert!(!Packer::new(0).compresses() && Packer::new(1).compresses());
    }

    #[test]
    fn text_compresses_and_random_bytes_go_raw() {
        let text: Vec<u8> = b"ELF binaries and text compress; ".repeat(9000);
        let mut p = Packer::new(1);
        let h = round_trip(&mut p, &text[..CHUNK]);
        assert!(h.compressed() && h.wire_len < h.raw_len / 4, "{h:?}");
        let mut x = 0x9e3779b97f4a7c15u64;
        let noise: Vec<u8> = (0..CHUNK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let h = round_trip(&mut p, &noise);
        assert!(!h.compressed());
        assert_eq!(p.misses(), 1);
        // The next chunks are not even tried, then compression is again.
        for _ in 0..SKIP_AFTER_MISS {
            assert!(!round_trip(&mut p, &text[..CHUNK]).compressed());
        }
        assert!(round_trip(&mut p, &text[..CHUNK]).compressed());
    }

    #[test]
    fn level_zero_never_compresses() {
        let text = vec![b'a'; 4096];
        assert!(!round_trip(&mut Packer::new(0), &text).compressed());
    }

    #[test]
    fn headers_are_checked_before_any_payload() {
        let h = |raw: u32, wire: u32| {
            let mut b = [0u8; HEADER];
            b[..4].copy_from_slice(&raw.to_be_bytes());
            b[4..].copy_from_slice(&wire.to_be_bytes());
            ChunkHeader::parse(b)
        };
        assert_eq!(
            h(MAX_CHUNK as u32 + 1, 10),
            Err(ChunkError::TooLarge(MAX_CHUNK as u32 + 1))
        );
        assert_eq!(h(0, 0), Err(ChunkError::Empty));
        assert_eq!(h(10, 0), Err(ChunkError::Empty));
        assert_eq!(h(10, 11), Err(ChunkError::Inflated { raw: 10, wire: 11 }));
        assert!(h(10, 10).is_ok_and(|h| !h.compressed()));
    }

    #[test]
    fn a_bomb_is_refused_at_its_declared_size() {
        // 1 MiB of zeros compresses to a few bytes; declared as 4 KiB.
        let zeros = vec![0u8; MAX_CHUNK];
        let bomb = zstd::bulk::compress(&zeros, 19).unwrap();
        let header = ChunkHeader {
            raw_len: 4096,
            wire_len: bomb.len() as u32,
        };
        assert_eq!(
            Unpacker::new().unpack(header, Bytes::from(bomb)),
            Err(ChunkError::BadZstd(4096))
        );
    }

    #[test]
    fn a_frame_shorter_than_declared_or_garbage_is_refused() {
        let text = b"abcabcabcabcabcabcabcabcabcabcabcabcabcabcabcabc".repeat(100);
        let packed = zstd::bulk::compress(&text, 1).unwrap();
        let header = ChunkHeader {
            raw_len: text.len() as u32 + 1,
            wire_len: packed.len() as u32,
        };
        assert!(Unpacker::new().unpack(header, Bytes::from(packed)).is_err());
        let header = ChunkHeader {
            raw_len: 100,
            wire_len: 50,
        };
        assert!(Unpacker::new()
            .unpack(header, Bytes::from(vec![7u8; 50]))
            .is_err());
    }
}
