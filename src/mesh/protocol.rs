//! The peer-to-peer wire protocol, as pure encode/decode over byte slices.
//! One request per bidirectional QUIC stream: the client writes one request
//! frame and finishes its side; the server answers with one response frame,
//! followed for a NAR by the raw NAR bytes (or, for `NarChunks`, chunk
//! frames: `nar_chunks`) up to the end of the stream.
//! See docs/protocol.md. Every length is bounded here, before any allocation.
//!
//! Frame: `u32 BE body length`, then the body: `u8 kind`, then the fields.
//! Integers are big-endian; strings are `u32 length` + bytes.

use thiserror::Error;

use crate::mesh::identity::MAX_NODE_NAME;
use crate::nix::{HashPart, Sha256Hash};

/// ALPN of protocol version 1; a peer that speaks no common version fails
/// the TLS handshake instead of sending frames we cannot read.
pub const ALPN_V1: &[u8] = b"nixmesh/1";
/// Version 2 adds `UpstreamFile`/`FileFollows` and `UpstreamNarinfo`/
/// `UpstreamHit`/`UpstreamMiss` (the office-wide single flight of upstream
/// downloads and narinfo look-ups). Both ends offer both versions, newest
/// first; on a connection that settled on version 1 the new request is
/// never sent.
pub const ALPN_V2: &[u8] = b"nixmesh/2";
/// Version 3 adds `NarChunks`: the NAR in chunk frames, each compressed
/// with zstd at the level the asker chose, or raw if it does not compress.
/// It also adds `BadNar`/`Noted`: holders no longer hash what they send
/// (the receiver does), so a receiver tells the holder when a NAR did not
/// match its hash.
pub const ALPN_V3: &[u8] = b"nixmesh/3";
/// Version 4 adds `Summary`/`SummaryPart`: the asker learns which paths
/// the asked agent shares (32-bit fingerprints), then every change, on one
/// stream that stays open, and asks it about a path only when it may have
/// it.
pub const ALPN_V4: &[u8] = b"nixmesh/4";
/// Version 5 adds bulk connections (`mesh::bulk`): the agent also takes
/// `NarChunks` requests over TLS on TCP at the port of its QUIC endpoint,
/// one request per connection, the answer framed as on a QUIC stream. The
/// kernel's TCP moves bulk bytes at a fraction of QUIC's CPU per byte.
pub const ALPN_V5: &[u8] = b"nixmesh/5";
/// Version 6 adds LZ4 chunks: an asker may set `nar_chunks::LZ4` in a
/// `NarChunks` request's level, and the holder then packs each chunk with
/// LZ4 or zstd, whichever carries more NAR per second over the link
/// (`mesh::pace`), naming the codec in the chunk.
pub const ALPN_V6: &[u8] = b"nixmesh/6";
/// Version 7 keeps bulk connections open: an asker may set
/// `nar_chunks::KEEP` in a `NarChunks` request's level, and the holder then
/// ends the part with a stop header of code `nar_chunks::DONE` and waits
/// for the next request on the same connection. Askers keep a few idle
/// bulk connections per peer, so stripes and medium NARs go over TCP
/// without a handshake each.
pub const ALPN_V7: &[u8] = b"nixmesh/7";
/// Version 8 lets bulk connections go without TLS in an open mesh
/// (`mesh::plain_bulk`): an asker may open one with a plain preamble
/// instead of a TLS handshake, and a holder that keeps TLS refuses it with
/// `code::PLAIN_REFUSED`.
pub const ALPN_V8: &[u8] = b"nixmesh/8";
/// The ALPN of a bulk connection (TLS on TCP, version 5).
pub const ALPN_BULK: &[u8] = b"nixmesh-bulk/1";
/// The newest protocol version.
pub const NEWEST: u32 = 8;
/// What this node offers and accepts, in order of preference.
pub const ALPNS: [&[u8]; 8] = [
    ALPN_V8, ALPN_V7, ALPN_V6, ALPN_V5, ALPN_V4, ALPN_V3, ALPN_V2, ALPN_V1,
];
/// Largest request body: a `Have` of `MAX_HAVE_BATCH` hash parts is about
/// 33 KiB, every other request under 100 bytes. The server allocates this
/// much per stream at most, on up to 128 streams per peer.
pub const MAX_REQUEST_FRAME: usize = 64 << 10;
/// Largest response body; a narinfo is at most 1 MiB.
pub const MAX_RESPONSE_FRAME: usize = 2 << 20;
/// Most hashes in one `Have` request.
pub const MAX_HAVE_BATCH: usize = 1024;
/// Longest error message carried in a frame.
pub const MAX_MESSAGE: usize = 1024;
/// Longest upstream cache URL in a frame (as `upstream.caches` allows).
pub const MAX_CACHE_URL: usize = 512;
/// Most caches an `UpstreamMiss` lists.
pub const MAX_CACHES: usize = 32;
/// Most fingerprints in one `SummaryPart`, added and removed together
/// (256 KiB of them).
pub const MAX_SUMMARY_BATCH: usize = 65_536;

/// QUIC stream error codes this protocol resets streams with.
pub mod code {
    pub const MALFORMED: u32 = 1;
    pub const TOO_LARGE: u32 = 2;
    pub const UNKNOWN_KIND: u32 = 3;
    pub const INTERNAL: u32 = 4;
    pub const OVERLOADED: u32 = 5;
    /// The serving side found its own NAR does not match its DB.
    pub const CORRUPT: u32 = 6;
    pub const TIMEOUT: u32 = 7;
    /// The client stops reading (cancelled, or it found a better holder).
    pub const CANCELLED: u32 = 8;
    /// (Version 8.) This holder takes bulk connections under TLS only.
    pub const PLAIN_REFUSED: u32 = 9;
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("frame ends early")]
    Truncated,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("bad field {0}")]
    BadField(&'static str),
    #[error("{0} bytes after the frame's last field")]
    Trailing(usize),
}

impl FrameError {
    /// The stream error code to reset with.
    pub fn code(&self) -> u32 {
        match self {
            FrameError::TooLarge(_) => code::TOO_LARGE,
            FrameError::UnknownKind(_) => code::UNKNOWN_KIND,
            _ => code::MALFORMED,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Ping {
        nonce: u64,
    },
    /// The narinfo of the path with this hash part.
    PathInfo {
        hash: HashPart,
    },
    /// The path's NAR from byte `offset`; `nar_hash` pins the content.
    Nar {
        hash: HashPart,
        nar_hash: Sha256Hash,
        offset: u64,
    },
    /// Which of these paths the peer would serve.
    Have {
        hashes: Vec<HashPart>,
    },
    /// (Version 3.) As `Nar`, the bytes from `offset` up to `end` (at
    /// most the NAR's size), in chunk frames (`nar_chunks`) compressed at
    /// zstd `level` (0: none; at most `nar_chunks::MAX_LEVEL`) where that
    /// makes them smaller; the flags `nar_chunks::ADAPTIVE` (version 5)
    /// and `nar_chunks::LZ4` (version 6) may be set on top.
    NarChunks {
        hash: HashPart,
        nar_hash: Sha256Hash,
        offset: u64,
        end: u64,
        level: u8,
    },
    /// (Version 3.) The NAR of this path with this NarHash that the asker
    /// got from the asked agent did not match it: the holder should check
    /// its copy.
    BadNar {
        hash: HashPart,
        nar_hash: Sha256Hash,
    },
    /// (Version 2.) The upstream cache's file of this path, whose FileHash
    /// is `file_hash`, downloaded by the asked agent (once for the whole
    /// office) and streamed as it arrives.
    UpstreamFile {
        hash: HashPart,
        file_hash: Sha256Hash,
    },
    /// (Version 2.) The narinfo of this path from the asked agent's
    /// upstream caches (looked up once for the whole office).
    UpstreamNarinfo {
        hash: HashPart,
    },
    /// (Version 4.) What the asked agent shares: answered with
    /// `SummaryPart` frames, first its whole set, then each change, until
    /// either side ends the stream.
    Summary,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// Carries the answering node's name, for peers that did not learn it
    /// from mDNS (static peers).
    Pong {
        nonce: u64,
        name: String,
    },
    PathInfo {
        narinfo: String,
    },
    NotFound,
    /// The NAR's remaining bytes follow this frame, then the stream ends.
    NarFollows {
        nar_size: u64,
    },
    Have {
        present: Vec<bool>,
    },
    /// (Version 2.) The file's `file_size` bytes follow, then the stream
    /// ends; a stream reset before that means the file was wrong or failed.
    FileFollows {
        file_size: u64,
    },
    /// (Version 2.) Upstream cache `cache` has the path: its narinfo.
    UpstreamHit {
        cache: String,
        narinfo: String,
    },
    /// (Version 2.) None of the caches `asked` has the path (the asker
    /// still asks its own caches that are not among them).
    UpstreamMiss {
        asked: Vec<String>,
    },
    Error {
        code: u32,
        message: String,
    },
    /// (Version 3.) A `BadNar` report was heard (whether the copy gets
    /// checked now is the holder's business).
    Noted,
    /// (Version 4.) Fingerprints (`HashPart::fingerprint`) of paths the
    /// sender now shares and no longer shares. `complete`: the receiver
    /// now has the sender's whole set (the last part of the first dump,
    /// and every part after it that ends a change).
    SummaryPart {
        added: Vec<u32>,
        removed: Vec<u32>,
        complete: bool,
    },
}

mod kind {
    pub const PING: u8 = 1;
    pub const PATH_INFO: u8 = 2;
    pub const NAR: u8 = 3;
    pub const HAVE: u8 = 4;
    pub const UPSTREAM_FILE: u8 = 5;
    pub const UPSTREAM_NARINFO: u8 = 6;
    pub const NAR_CHUNKS: u8 = 7;
    pub const BAD_NAR: u8 = 8;
    pub const SUMMARY: u8 = 9;
    pub const PONG: u8 = 65;
    pub const PATH_INFO_REPLY: u8 = 66;
    pub const NOT_FOUND: u8 = 67;
    pub const NAR_FOLLOWS: u8 = 68;
    pub const HAVE_REPLY: u8 = 69;
    pub const ERROR: u8 = 70;
    pub const FILE_FOLLOWS: u8 = 71;
    pub const UPSTREAM_HIT: u8 = 72;
    pub const UPSTREAM_MISS: u8 = 73;
    pub const NOTED: u8 = 74;
    pub const SUMMARY_PART: u8 = 75;
}

struct Writer(Vec<u8>);

impl Writer {
    fn new(kind: u8) -> Self {
        // Length placeholder, filled in by `finish`.
        Self(vec![0, 0, 0, 0, kind])
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn u32s(&mut self, v: &[u32]) {
        self.u32(v.len() as u32);
        for x in v {
            self.u32(*x);
        }
    }
    fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&len.to_be_bytes());
        self.0
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn bytes(&mut self, max: usize, field: &'static str) -> Result<&'a [u8], FrameError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(FrameError::BadField(field));
        }
        self.take(len)
    }
    fn text(&mut self, max: usize, field: &'static str) -> Result<&'a str, FrameError> {
        std::str::from_utf8(self.bytes(max, field)?).map_err(|_| FrameError::BadField(field))
    }
    /// A counted list of u32s, at most `max` of them.
    fn u32s(&mut self, max: usize, field: &'static str) -> Result<Vec<u32>, FrameError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(FrameError::BadField(field));
        }
        let raw = self.take(n.checked_mul(4).ok_or(FrameError::BadField(field))?)?;
        Ok(raw
            .chunks_exact(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
    fn hash_part(&mut self) -> Result<HashPart, FrameError> {
        let raw = self.take(crate::nix::store_path::HASH_PART_LEN)?;
        std::str::from_utf8(raw)
            .ok()
            .and_then(|s| HashPart::parse(s).ok())
            .ok_or(FrameError::BadField("hash"))
    }
    fn end(self) -> Result<(), FrameError> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(FrameError::Trailing(n)),
        }
    }
}

/// Length of the frame body announced by a 4-byte header, checked against
/// `max` (`MAX_REQUEST_FRAME` or `MAX_RESPONSE_FRAME`) before anything is
/// read.
pub fn body_len(header: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge(len));
    }
    if len == 0 {
        return Err(FrameError::Truncated);
    }
    Ok(len)
}

impl Request {
    /// The whole frame, header included.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Ping { nonce } => {
                let mut w = Writer::new(kind::PING);
                w.u64(*nonce);
                w.finish()
            }
            Request::PathInfo { hash } => {
                let mut w = Writer::new(kind::PATH_INFO);
                w.0.extend_from_slice(hash.as_str().as_bytes());
                w.finish()
            }
            Request::Nar {
                hash,
                nar_hash,
                offset,
            } => {
                let mut w = Writer::new(kind::NAR);
                w.0.extend_from_slice(hash.as_str().as_bytes());
                w.0.extend_from_slice(&nar_hash.0);
                w.u64(*offset);
                w.finish()
            }
            Request::Have { hashes } => {
                let mut w = Writer::new(kind::HAVE);
                w.u32(hashes.len() as u32);
                for h in hashes {
                    w.0.extend_from_slice(h.as_str().as_bytes());
                }
                w.finish()
            }
            Request::UpstreamFile { hash, file_hash } => {
                let mut w = Writer::new(kind::UPSTREAM_FILE);
                w.0.extend_from_slice(hash.as_str().as_bytes());
                w.0.extend_from_slice(&file_hash.0);
                w.finish()
            }
            Request::UpstreamNarinfo { hash } => {
                let mut w = Writer::new(kind::UPSTREAM_NARINFO);
                w.0.extend_from_slice(hash.as_str().as_bytes());
                w.finish()
            }
            Request::Summary => Writer::new(kind::SUMMARY).finish(),
            Request::BadNar { hash, nar_hash } => {
                let mut w = Writer::new(kind::BAD_NAR);
                w.0.extend_from_slice(hash.as_str().as_bytes());
                w.0.extend_from_slice(&nar_hash.0);
                w.finish()
            }
            Request::NarChunks {
                hash,
                nar_hash,
                offset,
                end,
                level,
            } => {
                let mut w = Writer::new(kind::NAR_CHUNKS);
                w.0.extend_from_slice(hash.as_str().as_bytes());
                w.0.extend_from_slice(&nar_hash.0);
                w.u64(*offset);
                w.u64(*end);
                w.0.push(*level);
                w.finish()
            }
        }
    }

    /// Decodes a frame body (without its length header).
    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        if body.len() > MAX_REQUEST_FRAME {
            return Err(FrameError::TooLarge(body.len()));
        }
        let mut r = Reader(body);
        let req = match r.u8()? {
            kind::PING => Request::Ping { nonce: r.u64()? },
            kind::PATH_INFO => Request::PathInfo {
                hash: r.hash_part()?,
            },
            kind::NAR => {
                let hash = r.hash_part()?;
                let mut digest = [0u8; 32];
                digest.copy_from_slice(r.take(32)?);
                Request::Nar {
                    hash,
                    nar_hash: Sha256Hash(digest),
                    offset: r.u64()?,
                }
            }
            kind::HAVE => {
                let n = r.u32()? as usize;
                if n > MAX_HAVE_BATCH {
                    return Err(FrameError::BadField("have count"));
                }
                let hashes = (0..n).map(|_| r.hash_part()).collect::<Result<_, _>>()?;
                Request::Have { hashes }
            }
            kind::UPSTREAM_FILE => {
                let hash = r.hash_part()?;
                let mut digest = [0u8; 32];
                digest.copy_from_slice(r.take(32)?);
                Request::UpstreamFile {
                    hash,
                    file_hash: Sha256Hash(digest),
                }
            }
            kind::UPSTREAM_NARINFO => Request::UpstreamNarinfo {
                hash: r.hash_part()?,
            },
            kind::SUMMARY => Request::Summary,
            kind::BAD_NAR => {
                let hash = r.hash_part()?;
                let mut digest = [0u8; 32];
                digest.copy_from_slice(r.take(32)?);
                Request::BadNar {
                    hash,
                    nar_hash: Sha256Hash(digest),
                }
            }
            kind::NAR_CHUNKS => {
                let hash = r.hash_part()?;
                let mut digest = [0u8; 32];
                digest.copy_from_slice(r.take(32)?);
                let offset = r.u64()?;
                let end = r.u64()?;
                let level = r.u8()?;
                use crate::mesh::nar_chunks::{ADAPTIVE, KEEP, LZ4, MAX_LEVEL};
                if level & !(ADAPTIVE | LZ4 | KEEP) > MAX_LEVEL {
                    return Err(FrameError::BadField("level"));
                }
                if end < offset {
                    return Err(FrameError::BadField("end"));
                }
                Request::NarChunks {
                    hash,
                    nar_hash: Sha256Hash(digest),
                    offset,
                    end,
                    level,
                }
            }
            other => return Err(FrameError::UnknownKind(other)),
        };
        r.end()?;
        Ok(req)
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Response::Pong { nonce, name } => {
                let mut w = Writer::new(kind::PONG);
                w.u64(*nonce);
                let end = floor_char_boundary(name, MAX_NODE_NAME);
                w.bytes(&name.as_bytes()[..end]);
                w.finish()
            }
            Response::PathInfo { narinfo } => {
                let mut w = Writer::new(kind::PATH_INFO_REPLY);
                w.bytes(narinfo.as_bytes());
                w.finish()
            }
            Response::NotFound => Writer::new(kind::NOT_FOUND).finish(),
            Response::Noted => Writer::new(kind::NOTED).finish(),
            Response::SummaryPart {
                added,
                removed,
                complete,
            } => {
                let mut w = Writer::new(kind::SUMMARY_PART);
                w.0.push(u8::from(*complete));
                w.u32s(added);
                w.u32s(removed);
                w.finish()
            }
            Response::NarFollows { nar_size } => {
                let mut w = Writer::new(kind::NAR_FOLLOWS);
                w.u64(*nar_size);
                w.finish()
            }
            Response::Have { present } => {
                let mut w = Writer::new(kind::HAVE_REPLY);
                w.u32(present.len() as u32);
                w.0.extend(present.iter().map(|p| u8::from(*p)));
                w.finish()
            }
            Response::FileFollows { file_size } => {
                let mut w = Writer::new(kind::FILE_FOLLOWS);
                w.u64(*file_size);
                w.finish()
            }
            Response::UpstreamHit { cache, narinfo } => {
                let mut w = Writer::new(kind::UPSTREAM_HIT);
                w.bytes(cache.as_bytes());
                w.bytes(narinfo.as_bytes());
                w.finish()
            }
            Response::UpstreamMiss { asked } => {
                let mut w = Writer::new(kind::UPSTREAM_MISS);
                w.u32(asked.len() as u32);
                for cache in asked {
                    w.bytes(cache.as_bytes());
                }
                w.finish()
            }
            Response::Error { code, message } => {
                let mut w = Writer::new(kind::ERROR);
                w.u32(*code);
                let end = floor_char_boundary(message, MAX_MESSAGE);
                w.bytes(&message.as_bytes()[..end]);
                w.finish()
            }
        }
    }

    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        if body.len() > MAX_RESPONSE_FRAME {
            return Err(FrameError::TooLarge(body.len()));
        }
        let mut r = Reader(body);
        let resp = match r.u8()? {
            kind::PONG => Response::Pong {
                nonce: r.u64()?,
                name: r.text(MAX_NODE_NAME, "name")?.to_string(),
            },
            kind::PATH_INFO_REPLY => Response::PathInfo {
                narinfo: r
                    .text(crate::nix::narinfo::MAX_NARINFO_LEN, "narinfo")?
                    .to_string(),
            },
            kind::NOT_FOUND => Response::NotFound,
            kind::NOTED => Response::Noted,
            kind::SUMMARY_PART => {
                let complete = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(FrameError::BadField("complete")),
                };
                let added = r.u32s(MAX_SUMMARY_BATCH, "added")?;
                let removed = r.u32s(MAX_SUMMARY_BATCH - added.len(), "removed")?;
                Response::SummaryPart {
                    added,
                    removed,
                    complete,
                }
            }
            kind::NAR_FOLLOWS => Response::NarFollows { nar_size: r.u64()? },
            kind::FILE_FOLLOWS => Response::FileFollows {
                file_size: r.u64()?,
            },
            kind::UPSTREAM_HIT => Response::UpstreamHit {
                cache: r.text(MAX_CACHE_URL, "cache")?.to_string(),
                narinfo: r
                    .text(crate::nix::narinfo::MAX_NARINFO_LEN, "narinfo")?
                    .to_string(),
            },
            kind::UPSTREAM_MISS => {
                let n = r.u32()? as usize;
                if n > MAX_CACHES {
                    return Err(FrameError::BadField("cache count"));
                }
                let asked = (0..n)
                    .map(|_| Ok(r.text(MAX_CACHE_URL, "cache")?.to_string()))
                    .collect::<Result<_, FrameError>>()?;
                Response::UpstreamMiss { asked }
            }
            kind::HAVE_REPLY => {
                let n = r.u32()? as usize;
                if n > MAX_HAVE_BATCH {
                    return Err(FrameError::BadField("have count"));
                }
                let raw = r.take(n)?;
                if raw.iter().any(|b| *b > 1) {
                    return Err(FrameError::BadField("have flag"));
                }
                Response::Have {
                    present: raw.iter().map(|b| *b == 1).collect(),
                }
            }
            kind::ERROR => Response::Error {
                code: r.u32()?,
                message: r.text(MAX_MESSAGE, "message")?.to_string(),
            },
            other => return Err(FrameError::UnknownKind(other)),
        };
        r.end()?;
        Ok(resp)
    }
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hp(c: char) -> HashPart {
        HashPart::parse(&c.to_string().repeat(32)).unwrap()
    }

    fn body(frame: &[u8]) -> &[u8] {
        let len = body_len(frame[..4].try_into().unwrap(), MAX_RESPONSE_FRAME).unwrap();
        assert_eq!(len, frame.len() - 4);
        &frame[4..]
    }

    #[test]
    fn requests_round_trip() {
        for req in [
            Request::Ping { nonce: 7 },
            Request::PathInfo { hash: hp('a') },
            Request::Nar {
                hash: hp('b'),
                nar_hash: Sha256Hash([9; 32]),
                offset: 1 << 40,
            },
            Request::Have {
                hashes: vec![hp('c'), hp('d')],
            },
            Request::Have { hashes: vec![] },
            Request::UpstreamFile {
                hash: hp('f'),
                file_hash: Sha256Hash([3; 32]),
            },
            Request::UpstreamNarinfo { hash: hp('g') },
            Request::NarChunks {
                hash: hp('h'),
                nar_hash: Sha256Hash([4; 32]),
                offset: 5,
                end: 1 << 33,
                level: 3,
            },
            Request::BadNar {
                hash: hp('i'),
                nar_hash: Sha256Hash([5; 32]),
            },
            Request::Summary,
        ] {
            assert_eq!(Request::decode(body(&req.encode())).unwrap(), req);
        }
    }

    #[test]
    fn responses_round_trip() {
        for resp in [
            Response::Pong {
                nonce: 1,
                name: "h1".into(),
            },
            Response::PathInfo {
                narinfo: "StorePath: x\n".into(),
            },
            Response::NotFound,
            Response::NarFollows { nar_size: 120 },
            Response::FileFollows { file_size: 7 },
            Response::Noted,
            Response::SummaryPart {
                added: vec![1, u32::MAX],
                removed: vec![7],
                complete: true,
            },
            Response::SummaryPart {
                added: vec![],
                removed: vec![],
                complete: false,
            },
            Response::UpstreamHit {
                cache: "https://cache.nixos.org".into(),
                narinfo: "StorePath: x\n".into(),
            },
            Response::UpstreamMiss {
                asked: vec!["http://a".into(), "https://b".into()],
            },
            Response::UpstreamMiss { asked: vec![] },
            Response::Have {
                present: vec![true, false],
            },
            Response::Error {
                code: code::INTERNAL,
                message: "boom".into(),
            },
        ] {
            assert_eq!(Response::decode(body(&resp.encode())).unwrap(), resp);
        }
    }

    #[test]
    fn bad_frames_are_named() {
        for max in [MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME] {
            assert_eq!(
                body_len((max as u32 + 1).to_be_bytes(), max),
                Err(FrameError::TooLarge(max + 1))
            );
            assert_eq!(body_len((max as u32).to_be_bytes(), max), Ok(max));
            assert_eq!(body_len([0; 4], max), Err(FrameError::Truncated));
        }
        // The largest request there is fits its limit.
        let have = Request::Have {
            hashes: vec![HashPart::parse(&"a".repeat(32)).unwrap(); MAX_HAVE_BATCH],
        };
        let frame = have.encode();
        assert!(frame.len() - 4 <= MAX_REQUEST_FRAME, "{}", frame.len());
        assert_eq!(Request::decode(&frame[4..]), Ok(have));
        assert_eq!(Request::decode(&[99]), Err(FrameError::UnknownKind(99)));
        assert_eq!(
            Request::decode(&[kind::PING, 0, 0]),
            Err(FrameError::Truncated)
        );
        let mut ping = Request::Ping { nonce: 1 }.encode()[4..].to_vec();
        ping.push(0);
        assert_eq!(Request::decode(&ping), Err(FrameError::Trailing(1)));
        let mut bad_hash = vec![kind::PATH_INFO];
        bad_hash.extend_from_slice(&[b'e'; 32]);
        assert_eq!(
            Request::decode(&bad_hash),
            Err(FrameError::BadField("hash"))
        );
        let mut many = vec![kind::HAVE];
        many.extend_from_slice(&(MAX_HAVE_BATCH as u32 + 1).to_be_bytes());
        assert_eq!(
            Request::decode(&many),
            Err(FrameError::BadField("have count"))
        );
        let mut huge_text = vec![kind::PATH_INFO_REPLY];
        huge_text.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            Response::decode(&huge_text),
            Err(FrameError::BadField("narinfo"))
        );
        assert_eq!(Request::decode(&[]), Err(FrameError::Truncated));
        // An upstream miss listing too many caches, or too long a URL.
        let mut many = vec![kind::UPSTREAM_MISS];
        many.extend_from_slice(&(MAX_CACHES as u32 + 1).to_be_bytes());
        assert_eq!(
            Response::decode(&many),
            Err(FrameError::BadField("cache count"))
        );
        let mut long = vec![kind::UPSTREAM_HIT];
        long.extend_from_slice(&(MAX_CACHE_URL as u32 + 1).to_be_bytes());
        long.extend(std::iter::repeat_n(b'a', MAX_CACHE_URL + 1));
        assert_eq!(Response::decode(&long), Err(FrameError::BadField("cache")));
    }

    #[test]
    fn summary_parts_are_bounded() {
        // The largest part fits the response limit.
        let full = Response::SummaryPart {
            added: vec![9; MAX_SUMMARY_BATCH],
            removed: vec![],
            complete: true,
        };
        let frame = full.encode();
        assert!(frame.len() - 4 <= MAX_RESPONSE_FRAME);
        assert_eq!(Response::decode(body(&frame)), Ok(full));
        // More than that, counting both lists, is refused by its count,
        // before anything is read.
        let over = Response::SummaryPart {
            added: vec![9; MAX_SUMMARY_BATCH],
            removed: vec![1],
            complete: true,
        };
        assert_eq!(
            Response::decode(body(&over.encode())),
            Err(FrameError::BadField("removed"))
        );
        let mut huge = vec![kind::SUMMARY_PART, 1];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(Response::decode(&huge), Err(FrameError::BadField("added")));
        // A count with fewer numbers than it says.
        let mut short = vec![kind::SUMMARY_PART, 0];
        short.extend_from_slice(&3u32.to_be_bytes());
        short.extend_from_slice(&[0; 8]);
        assert_eq!(Response::decode(&short), Err(FrameError::Truncated));
        assert_eq!(
            Response::decode(&[kind::SUMMARY_PART, 2, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::BadField("complete"))
        );
    }

    #[test]
    fn long_error_messages_are_cut_on_a_char_boundary() {
        let msg = "é".repeat(MAX_MESSAGE);
        let frame = Response::Error {
            code: 1,
            message: msg,
        }
        .encode();
        let Response::Error { message, .. } = Response::decode(body(&frame)).unwrap() else {
            panic!()
        };
        assert!(message.len() <= MAX_MESSAGE);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = Request::decode(&bytes);
            let _ = Response::decode(&bytes);
        }

        #[test]
        fn decoders_never_panic_on_valid_kinds(k in 1u8..80, rest in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = vec![k];
            b.extend(rest);
            let _ = Request::decode(&b);
            let _ = Response::decode(&b);
        }
    }
}
