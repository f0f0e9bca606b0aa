//! NAR bytes in chunk frames (protocol version 3): after `NarFollows`, a
//! `NarChunks` stream carries the NAR from the asked offset as a sequence
//! of frames, each `u32 BE raw_len`, `u32 BE wire_len`, then `wire_len`
//! bytes. `wire_len == raw_len`: the chunk's bytes as they are (it did not
//! compress); `wire_len < raw_len`: one zstd frame that inflates to exactly
//! `raw_len` bytes. Every frame stands alone, so a reader knows the NAR
//! offset of each byte and failover from an offset works as for raw bytes.
//! From version 6 an asker that sets `LZ4` in its request's level also
//! reads LZ4: every compressed payload then begins with a byte naming its
//! codec (`TAG_ZSTD`, `TAG_LZ4`: one LZ4 block), and the holder picks the
//! codec per chunk.
//! On a bulk connection (protocol version 5), which has no stream reset, a
//! header with `raw_len == 0` is a stop: `wire_len` is the code a QUIC
//! stream's reset would carry, and nothing follows.
//! Pure: no I/O, the caller moves the bytes.

use bytes::Bytes;
use thiserror::Error;

use crate::chunk_buffers::ChunkBuffers;

/// Bytes of NAR per chunk the packer makes.
pub const CHUNK: usize = 256 << 10;
/// Chunk buffers an asker keeps for reuse, all its readers together: what
/// a few NARs have in flight at once (the relay's queue, the chunk being
/// hashed, the one being read).
const KEPT_BUFFERS: usize = 16;

/// A pool of chunk buffers for readers of chunk frames.
pub fn chunk_buffers() -> ChunkBuffers {
    ChunkBuffers::new(CHUNK, KEPT_BUFFERS)
}

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
    Undecodable(u32),
    #[error("chunk names no codec this reader knows (tag {0:?})")]
    UnknownCodec(Option<u8>),
}

/// The compressor of a packed chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// zstd at the level asked for: the smaller chunks.
    Zstd,
    /// One LZ4 block: packs faster and unpacks several times faster than
    /// zstd, to about a third more bytes.
    Lz4,
}

/// (Version 6.) The codec byte of a zstd payload, after `LZ4`.
pub const TAG_ZSTD: u8 = 1;
/// (Version 6.) The codec byte of an LZ4 block.
pub const TAG_LZ4: u8 = 2;

impl Codec {
    fn tag(self) -> u8 {
        match self {
            Codec::Zstd => TAG_ZSTD,
            Codec::Lz4 => TAG_LZ4,
        }
    }
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
/// never compress), or with LZ4 where the asker reads it, skipping the
/// work on data that does not compress.
pub struct Packer {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// The asker set `LZ4`: payloads carry a codec byte, LZ4 allowed.
    tagged: bool,
    skip: u32,
    misses: u64,
    /// The codec the last chunk was run through, if any.
    tried: Option<Codec>,
    /// The zstd level (0: never compresses).
    level: u8,
}

impl Packer {
    pub fn new(level: u8) -> Self {
        let zstd_level = level & !(ADAPTIVE | LZ4 | KEEP);
        let compressor = (zstd_level > 0)
            .then(|| zstd::bulk::Compressor::new(i32::from(zstd_level.min(MAX_LEVEL))).ok())
            .flatten();
        let tagged = level & LZ4 != 0;
        let level = match &compressor {
            Some(_) => zstd_level.min(MAX_LEVEL),
            None => 0,
        };
        Self {
            compressor,
            tagged,
            skip: 0,
            misses: 0,
            tried: None,
            level,
        }
    }

    /// One frame of `raw` (at most `MAX_CHUNK` bytes, not empty), zstd.
    pub fn pack(&mut self, raw: &[u8]) -> Vec<u8> {
        self.pack_with(raw, Some(Codec::Zstd))
    }

    /// `pack` with `codec`, or raw for `None` (the holder's pace may say
    /// the link takes raw bytes as fast as it could pack them). LZ4 is
    /// zstd for an asker that did not say it reads LZ4.
    pub fn pack_with(&mut self, raw: &[u8], codec: Option<Codec>) -> Vec<u8> {
        debug_assert!(!raw.is_empty() && raw.len() <= MAX_CHUNK);
        let raw_len = raw.len() as u32;
        let mut frame = Vec::with_capacity(HEADER + raw.len());
        frame.extend_from_slice(&raw_len.to_be_bytes());
        frame.extend_from_slice(&[0; 4]);
        let codec = match codec {
            Some(Codec::Lz4) if !self.tagged => Some(Codec::Zstd),
            other => other,
        };
        self.tried = None;
        let tag = usize::from(self.tagged);
        // Always under the raw length, however short the chunk: a payload
        // as long as its raw length would read as raw bytes.
        let room = raw.len() - (raw.len() / WORTH_IT).max(1);
        let packed = match (codec, &mut self.compressor) {
            (None, _) | (_, None) => None,
            // Too short to pack at all.
            _ if room <= tag => None,
            (Some(_), Some(_)) if self.skip > 0 => {
                self.skip -= 1;
                None
            }
            (Some(codec), Some(zstd)) => {
                self.tried = Some(codec);
                frame.resize(HEADER + room, 0);
                let (head, out) = frame.split_at_mut(HEADER + tag);
                if self.tagged {
                    head[HEADER] = codec.tag();
                }
                let n = match codec {
                    Codec::Zstd => zstd.compress_to_buffer(raw, out).ok(),
                    Codec::Lz4 => lz4::block::compress_to_buffer(raw, None, false, out).ok(),
                };
                if n.is_none() {
                    self.skip = SKIP_AFTER_MISS;
                    self.misses += 1;
                }
                n.map(|n| n + tag)
            }
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

    /// The codec the last chunk was run through (`None`: sent raw
    /// without trying).
    pub fn tried_last(&self) -> Option<Codec> {
        self.tried
    }

    /// The zstd level it packs at (0: never compresses).
    pub fn level(&self) -> u8 {
        self.level
    }

    /// Whether the asker reads LZ4 chunks.
    pub fn lz4(&self) -> bool {
        self.tagged
    }

    /// Whether it ever compresses (level 0 never does).
    pub fn compresses(&self) -> bool {
        self.compressor.is_some()
    }
}

/// A frame of `raw_len` NAR bytes from a zstd payload packed earlier
/// (`zstd_payload`), for an asker that reads codec bytes (`tagged`) or
/// not: `append` adds the payload to the frame's header and codec byte,
/// where it is read (`false`: there is none, and no frame).
pub fn zstd_frame_with(
    raw_len: u32,
    tagged: bool,
    append: impl FnOnce(&mut Vec<u8>) -> bool,
) -> Option<Vec<u8>> {
    let mut frame = Vec::with_capacity(HEADER + 1);
    frame.extend_from_slice(&raw_len.to_be_bytes());
    frame.extend_from_slice(&[0; 4]);
    if tagged {
        frame.push(TAG_ZSTD);
    }
    if !append(&mut frame) {
        return None;
    }
    let wire_len = (frame.len() - HEADER) as u32;
    frame[4..HEADER].copy_from_slice(&wire_len.to_be_bytes());
    Some(frame)
}

/// The zstd payload of a frame `Packer` made, if it is one (packed smaller
/// with zstd), without its header and codec byte.
pub fn zstd_payload(frame: &[u8], tagged: bool) -> Option<&[u8]> {
    let head: [u8; HEADER] = frame.get(..HEADER)?.try_into().ok()?;
    let header = ChunkHeader::parse(head).ok()?;
    if !header.compressed() {
        return None;
    }
    let payload = &frame[HEADER..];
    match (tagged, payload.first()) {
        (false, _) => Some(payload),
        (true, Some(&TAG_ZSTD)) => Some(&payload[1..]),
        (true, _) => None,
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
/// (Version 6.) Set in a request's level: the asker reads LZ4 chunks, and
/// every compressed payload begins with its codec byte.
pub const LZ4: u8 = 0x40;
/// (Version 7.) Set in a bulk connection's request: the holder ends the
/// part with a stop header of code `DONE` and reads the next request on
/// the same connection.
pub const KEEP: u8 = 0x20;
/// The stop code that ends a part whose request set `KEEP`: all of it was
/// sent, and the connection is ready for another request.
pub const DONE: u32 = 0;

/// The receiver's side: inflates frames, never past their raw length.
pub struct Unpacker {
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    /// Payloads begin with a codec byte (the request set `LZ4`).
    tagged: bool,
    /// Where payloads are read to and inflated chunks written.
    buffers: ChunkBuffers,
}

impl Unpacker {
    /// A reader for the answer to a request at `level`.
    pub fn new(level: u8) -> Self {
        Self::with_buffers(level, chunk_buffers())
    }

    /// `new`, with chunk buffers shared with other readers.
    pub fn with_buffers(level: u8, buffers: ChunkBuffers) -> Self {
        Self {
            decompressor: zstd::bulk::Decompressor::new().ok(),
            tagged: level & LZ4 != 0,
            buffers,
        }
    }

    /// The buffers the reader should read payloads into.
    pub fn buffers(&self) -> &ChunkBuffers {
        &self.buffers
    }

    /// The chunk's NAR bytes from its checked header and its `wire_len`
    /// bytes of payload.
    pub fn unpack(&mut self, header: ChunkHeader, payload: Bytes) -> Result<Bytes, ChunkError> {
        debug_assert_eq!(payload.len(), header.wire_len as usize);
        if !header.compressed() {
            return Ok(payload);
        }
        let mut out = self.buffers.take_len(header.raw_len as usize);
        self.unpack_into(header, &payload, &mut out)?;
        Ok(self.buffers.lend(out))
    }

    /// Inflates a compressed chunk's payload into `out`, which holds
    /// exactly its raw length. The slice is the bound: a payload that would
    /// inflate further, or less, fails. (Not a Vec's room: a pooled buffer
    /// has room for a whole chunk.)
    pub fn unpack_into(
        &mut self,
        header: ChunkHeader,
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<(), ChunkError> {
        let bad = ChunkError::Undecodable(header.raw_len);
        if !header.compressed() || out.len() != header.raw_len as usize {
            return Err(bad);
        }
        let (codec, body) = match (self.tagged, payload.first()) {
            (false, _) => (Codec::Zstd, payload),
            (true, Some(&TAG_ZSTD)) => (Codec::Zstd, &payload[1..]),
            (true, Some(&TAG_LZ4)) => (Codec::Lz4, &payload[1..]),
            (true, other) => return Err(ChunkError::UnknownCodec(other.copied())),
        };
        let n = match codec {
            Codec::Zstd => {
                let d = self.decompressor.as_mut().ok_or(bad.clone())?;
                d.decompress_to_buffer(body, out).ok()
            }
            Codec::Lz4 => {
                let size = i32::try_from(out.len()).map_err(|_| bad.clone())?;
                lz4::block::decompress_to_buffer(body, Some(size), out).ok()
            }
        };
        match n {
            Some(n) if n == out.len() => Ok(()),
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

    #[test]
    fn a_kept_zstd_payload_makes_the_frame_it_came_from() {
        let raw: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8 / 3).collect();
        for level in [1, 1 | LZ4] {
            let tagged = level & LZ4 != 0;
            let mut packer = Packer::new(level);
            let frame = packer.pack_with(&raw, Some(Codec::Zstd));
            let zstd = zstd_payload(&frame, tagged).expect("packed with zstd");
            let kept = zstd_frame_with(raw.len() as u32, tagged, |out| {
                out.extend_from_slice(zstd);
                true
            });
            assert_eq!(kept.as_ref(), Some(&frame));
            assert_eq!(zstd_frame_with(raw.len() as u32, tagged, |_| false), None);
            let lz4 = packer.pack_with(&raw, Some(Codec::Lz4));
            assert_eq!(zstd_payload(&lz4, tagged).is_some(), !tagged);
            assert_eq!(zstd_payload(&packer.pack_with(&raw, None), tagged), None);
        }
        assert_eq!(zstd_payload(&[0, 0, 0], false), None);
    }

    fn round_trip(packer: &mut Packer, raw: &[u8]) -> ChunkHeader {
        round_trip_with(packer, 0, raw, Some(Codec::Zstd))
    }

    /// Packs `raw` with `codec` and unpacks it as an asker at `level`.
    fn round_trip_with(
        packer: &mut Packer,
        level: u8,
        raw: &[u8],
        codec: Option<Codec>,
    ) -> ChunkHeader {
        let frame = packer.pack_with(raw, codec);
        let h = header(&frame);
        assert_eq!(frame.len(), HEADER + h.wire_len as usize);
        let out = Unpacker::new(level)
            .unpack(h, Bytes::copy_from_slice(&frame[HEADER..]))
            .unwrap();
        assert_eq!(&out[..], raw);
        h
    }

    fn binary_like() -> Vec<u8> {
        // Repetitive with variety, as code and tables are.
        (0..CHUNK as u32)
            .map(|i| (i % 251) as u8 ^ ((i / 4096) as u8).rotate_left(i % 7))
            .collect()
    }

    #[test]
    fn an_asker_that_reads_lz4_gets_tagged_chunks_of_either_codec() {
        let level = ADAPTIVE | LZ4 | 1;
        let raw = binary_like();
        let mut p = Packer::new(level);
        assert!(p.lz4());
        let lz4 = round_trip_with(&mut p, level, &raw, Some(Codec::Lz4));
        assert_eq!(p.tried_last(), Some(Codec::Lz4));
        let zstd = round_trip_with(&mut p, level, &raw, Some(Codec::Zstd));
        assert_eq!(p.tried_last(), Some(Codec::Zstd));
        assert!(lz4.compressed() && zstd.compressed(), "{lz4:?} {zstd:?}");
        let raw_frame = round_trip_with(&mut p, level, &raw, None);
        assert!(!raw_frame.compressed() && p.tried_last().is_none());
        // The codec byte leads: an LZ4 payload read as untagged zstd fails.
        let frame = p.pack_with(&raw, Some(Codec::Lz4));
        assert_eq!(frame[HEADER], TAG_LZ4);
        let h = header(&frame);
        let payload = Bytes::copy_from_slice(&frame[HEADER..]);
        assert_eq!(
            Unpacker::new(0).unpack(h, payload),
            Err(ChunkError::Undecodable(h.raw_len))
        );
    }

    #[test]
    fn an_asker_that_does_not_read_lz4_gets_zstd_untagged() {
        let raw = binary_like();
        let mut p = Packer::new(ADAPTIVE | 1);
        let h = round_trip_with(&mut p, ADAPTIVE | 1, &raw, Some(Codec::Lz4));
        assert!(h.compressed());
        assert_eq!(p.tried_last(), Some(Codec::Zstd));
    }

    #[test]
    fn a_reused_buffer_bounds_inflation_by_the_frame_not_by_its_room() {
        let mut u = Unpacker::new(LZ4 | 1);
        // A whole chunk inflated first, and dropped: its buffer, with room
        // for 256 KiB, is the next one used.
        let zeros = vec![0u8; CHUNK];
        let mut whole = vec![TAG_ZSTD];
        whole.extend(zstd::bulk::compress(&zeros, 1).unwrap());
        let h = ChunkHeader {
            raw_len: CHUNK as u32,
            wire_len: whole.len() as u32,
        };
        drop(u.unpack(h, Bytes::from(whole)).unwrap());
        // 8 KiB declared as 4 KiB, well within that room: refused, with
        // either codec.
        let mut zstd_bomb = vec![TAG_ZSTD];
        zstd_bomb.extend(zstd::bulk::compress(&zeros[..8192], 1).unwrap());
        let mut lz4_bomb = vec![TAG_LZ4];
        lz4_bomb.extend(lz4::block::compress(&zeros[..8192], None, false).unwrap());
        for bomb in [zstd_bomb, lz4_bomb] {
            let h = ChunkHeader {
                raw_len: 4096,
                wire_len: bomb.len() as u32,
            };
            assert_eq!(
                u.unpack(h, Bytes::from(bomb)),
                Err(ChunkError::Undecodable(4096))
            );
        }
    }

    #[test]
    fn unknown_codecs_and_lz4_bombs_are_refused() {
        let mut u = Unpacker::new(LZ4 | 1);
        let h = ChunkHeader {
            raw_len: 100,
            wire_len: 10,
        };
        assert_eq!(
            u.unpack(h, Bytes::from_static(&[9; 10])),
            Err(ChunkError::UnknownCodec(Some(9)))
        );
        // 1 MiB of zeros as one LZ4 block (4 KiB), declared as 8 KiB.
        let zeros = vec![0u8; MAX_CHUNK];
        let mut bomb = vec![TAG_LZ4];
        bomb.extend(lz4::block::compress(&zeros, None, false).unwrap());
        let h = ChunkHeader {
            raw_len: 8192,
            wire_len: bomb.len() as u32,
        };
        assert!(h.compressed());
        assert_eq!(
            u.unpack(h, Bytes::from(bomb)),
            Err(ChunkError::Undecodable(8192))
        );
        // Declared larger than it inflates to: refused too.
        let mut short = vec![TAG_LZ4];
        short.extend(lz4::block::compress(&zeros[..4096], None, false).unwrap());
        let h = ChunkHeader {
            raw_len: 8192,
            wire_len: short.len() as u32,
        };
        assert_eq!(
            u.unpack(h, Bytes::from(short)),
            Err(ChunkError::Undecodable(8192))
        );
        let mut garbage = vec![TAG_LZ4];
        garbage.extend_from_slice(&[0xff; 40]);
        let h = ChunkHeader {
            raw_len: 1000,
            wire_len: garbage.len() as u32,
        };
        assert!(u.unpack(h, Bytes::from(garbage)).is_err());
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
    fn a_short_chunk_is_never_packed_to_its_own_length() {
        // 28 bytes that LZ4 packs to 27, 28 with the codec byte: read as
        // raw, they would be the packed bytes (found by the fuzz target).
        let raw = b"astoore/2yre/2ya\x0a\x07astore/2ya\x0a";
        for (level, codec) in [(1, Codec::Zstd), (LZ4 | 1, Codec::Lz4)] {
            for len in 1..=raw.len() {
                let mut p = Packer::new(level);
                let h = round_trip_with(&mut p, level, &raw[..len], Some(codec));
                assert!(h.wire_len <= h.raw_len, "{h:?}");
            }
        }
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
            Unpacker::new(0).unpack(header, Bytes::from(bomb)),
            Err(ChunkError::Undecodable(4096))
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
        assert!(Unpacker::new(0)
            .unpack(header, Bytes::from(packed))
            .is_err());
        let header = ChunkHeader {
            raw_len: 100,
            wire_len: 50,
        };
        assert!(Unpacker::new(0)
            .unpack(header, Bytes::from(vec![7u8; 50]))
            .is_err());
    }
}
