//! The relay's verification, pure: NAR bytes in, in order and from any
//! number of holders; what may go on to the consumer out. Every byte is
//! checked and hashed; the newest chunk is held back, so the consumer never
//! has a complete NAR until the whole of it matched its NarHash. No
//! network, no clock: `fetch::relay` only moves bytes through it.

use std::ops::Range;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::nix::nar;
use crate::nix::Sha256Hash;

/// A holder's bytes that cannot be part of the NAR, whatever its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lie {
    /// More bytes than the NAR has.
    TooLong,
    /// The first bytes are not `nix-archive-1`.
    NotANar,
}

impl Lie {
    pub fn reason(self) -> &'static str {
        match self {
            Lie::TooLong => "sent more bytes than the NAR has",
            Lie::NotANar => "sent bytes that are not a NAR",
        }
    }
}

/// How a relay ends, once no more bytes will come.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every byte came and the NAR matches: send `last` (if the window
    /// held any bytes) and end the response.
    Verified { last: Option<Bytes> },
    /// Every byte came and the NAR does not match: cut the response off.
    Mismatch,
    /// Bytes are missing (no holder got further than `offset`).
    Short { offset: u64 },
}

pub struct NarCheck {
    size: u64,
    expected: Sha256Hash,
    /// NAR bytes received, checked and hashed so far.
    offset: u64,
    hasher: Sha256,
    /// The NAR offsets the consumer asked for.
    window: Range<u64>,
    held: Option<Bytes>,
}

impl NarCheck {
    pub fn new(size: u64, expected: Sha256Hash, window: Range<u64>) -> Self {
        Self {
            size,
            expected,
            offset: 0,
            hasher: Sha256::new(),
            window,
            held: None,
        }
    }

    /// Where the next holder must start.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn complete(&self) -> bool {
        self.offset == self.size
    }

    /// SHA-256 of the NAR's bytes so far (one block's work, not a pass
    /// over them): two fetches of the same NAR agree on it at the same
    /// offset exactly when their bytes up to there agree.
    pub fn prefix_digest(&self) -> [u8; 32] {
        self.hasher.clone().finalize().into()
    }

    /// The next bytes of the NAR. `Ok(Some(chunk))`: send that (the chunk
    /// held back until now); `Ok(None)`: nothing to send yet; `Err`: the
    /// holder lied, and nothing of this chunk was taken.
    pub fn on_chunk(&mut self, chunk: Bytes) -> Result<Option<Bytes>, Lie> {
        let len = chunk.len() as u64;
        if self.offset.saturating_add(len) > self.size {
            return Err(Lie::TooLong);
        }
        if !starts_like_a_nar(self.offset, &chunk) {
            return Err(Lie::NotANar);
        }
        self.hasher.update(&chunk);
        let visible = in_window(self.offset, chunk, &self.window);
        self.offset += len;
        if visible.is_empty() {
            return Ok(None);
        }
        Ok(self.held.replace(visible))
    }

    pub fn finish(self) -> Verdict {
        if self.offset != self.size {
            return Verdict::Short {
                offset: self.offset,
            };
        }
        let digest: [u8; 32] = self.hasher.finalize().into();
        if digest == self.expected.0 {
            Verdict::Verified { last: self.held }
        } else {
            Verdict::Mismatch
        }
    }
}

/// Every NAR begins with the same string token, `nix-archive-1`: a holder
/// whose first bytes differ is lying, and is caught before anyone sees them.
fn starts_like_a_nar(offset: u64, chunk: &[u8]) -> bool {
    // The token: its u64 length, 13 bytes, padding to 24. Past it (every
    // chunk but the first) there is nothing to check or build.
    const MAGIC_TOKEN_LEN: u64 = 24;
    if offset >= MAGIC_TOKEN_LEN {
        return true;
    }
    let mut magic = Vec::with_capacity(MAGIC_TOKEN_LEN as usize);
    nar::push_str(&mut magic, nar::MAGIC.as_bytes());
    let Some(expected) = usize::try_from(offset).ok().and_then(|o| magic.get(o..)) else {
        return true;
    };
    let n = expected.len().min(chunk.len());
    chunk[..n] == expected[..n]
}

/// The part of `chunk`, which starts at NAR offset `at`, that lies in
/// `window`.
fn in_window(at: u64, mut chunk: Bytes, window: &Range<u64>) -> Bytes {
    let end = at + chunk.len() as u64;
    if end <= window.start || at >= window.end {
        return Bytes::new();
    }
    let from = window.start.saturating_sub(at) as usize;
    let to = (window.end.min(end) - at) as usize;
    chunk.truncate(to);
    chunk.split_off(from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A NAR-shaped byte string of `len` bytes (it need not parse).
    fn nar_bytes(len: usize) -> Vec<u8> {
        let mut v = Vec::new();
        nar::push_str(&mut v, nar::MAGIC.as_bytes());
        v.extend((0..len).map(|i| (i * 7 % 251) as u8));
        v.truncate(len);
        v
    }

    fn hash(bytes: &[u8]) -> Sha256Hash {
        Sha256Hash(Sha256::digest(bytes).into())
    }

    /// Feeds `nar` in chunks of `sizes` (cycled) and collects what the
    /// check lets out, then the verdict.
    fn run(
        nar: &[u8],
        expected: Sha256Hash,
        window: Range<u64>,
        sizes: &[usize],
    ) -> (Vec<u8>, Verdict) {
        let mut check = NarCheck::new(nar.len() as u64, expected, window);
        let mut out = Vec::new();
        let mut at = 0;
        for size in sizes.iter().cycle() {
            if at >= nar.len() {
                break;
            }
            let end = (at + size.max(&1)).min(nar.len());
            if let Some(c) = check
                .on_chunk(Bytes::copy_from_slice(&nar[at..end]))
                .unwrap()
            {
                out.extend_from_slice(&c);
            }
            at = end;
        }
        (out, check.finish())
    }

    #[test]
    fn the_last_chunk_waits_for_the_hash() {
        let nar = nar_bytes(1000);
        let mut check = NarCheck::new(1000, hash(&nar), 0..1000);
        assert_eq!(
            check.on_chunk(Bytes::copy_from_slice(&nar[..400])),
            Ok(None)
        );
        let first = check.on_chunk(Bytes::copy_from_slice(&nar[400..])).unwrap();
        assert_eq!(first.as_deref(), Some(&nar[..400]));
        assert!(check.complete());
        assert_eq!(
            check.finish(),
            Verdict::Verified {
                last: Some(Bytes::copy_from_slice(&nar[400..]))
            }
        );
    }

    #[test]
    fn a_wrong_nar_never_gets_its_last_chunk_out() {
        let nar = nar_bytes(1000);
        let mut bad = nar.clone();
        bad[900] ^= 1;
        let (out, verdict) = run(&bad, hash(&nar), 0..1000, &[300]);
        assert_eq!(verdict, Verdict::Mismatch);
        assert!(out.len() < 1000, "the whole wrong NAR got out");
    }

    #[test]
    fn liars_are_named() {
        let nar = nar_bytes(100);
        let mut check = NarCheck::new(100, hash(&nar), 0..100);
        assert_eq!(
            check.on_chunk(Bytes::from_static(b"not a nar at all")),
            Err(Lie::NotANar)
        );
        assert_eq!(check.offset(), 0, "a lie is not taken");
        check.on_chunk(Bytes::copy_from_slice(&nar[..90])).unwrap();
        assert_eq!(
            check.on_chunk(Bytes::copy_from_slice(&nar[..20])),
            Err(Lie::TooLong)
        );
        assert_eq!(check.finish(), Verdict::Short { offset: 90 });
    }

    #[test]
    fn the_magic_token_is_24_bytes() {
        let mut magic = Vec::new();
        nar::push_str(&mut magic, nar::MAGIC.as_bytes());
        assert_eq!(magic.len(), 24);
    }

    #[test]
    fn a_second_holder_carries_on_from_the_offset() {
        let nar = nar_bytes(500);
        let mut check = NarCheck::new(500, hash(&nar), 0..500);
        check.on_chunk(Bytes::copy_from_slice(&nar[..123])).unwrap();
        // The first holder died; the next one starts at `offset`.
        let from = check.offset() as usize;
        check
            .on_chunk(Bytes::copy_from_slice(&nar[from..]))
            .unwrap();
        assert!(matches!(check.finish(), Verdict::Verified { .. }));
    }

    #[test]
    fn windows_cut_chunks_at_nar_offsets() {
        let chunk = || Bytes::from_static(b"0123456789");
        // The chunk covers NAR offsets 100..110.
        assert_eq!(in_window(100, chunk(), &(0..1000)), chunk());
        assert_eq!(in_window(100, chunk(), &(105..1000)), &b"56789"[..]);
        assert_eq!(in_window(100, chunk(), &(0..103)), &b"012"[..]);
        assert_eq!(in_window(100, chunk(), &(102..104)), &b"23"[..]);
        assert!(in_window(100, chunk(), &(110..1000)).is_empty());
        assert!(in_window(100, chunk(), &(0..100)).is_empty());
        assert!(in_window(100, chunk(), &(50..50)).is_empty());
    }

    proptest! {
        /// Whatever the chunking and window, an honest NAR lets out exactly
        /// the window's bytes, and a NAR with one byte changed never lets
        /// out all of the window.
        #[test]
        fn out_is_the_window_exactly(
            len in 30usize..3000,
            sizes in proptest::collection::vec(1usize..700, 1..6),
            a in 0usize..3000,
            b in 0usize..3000,
            flip in 24usize..3000,
        ) {
            let nar = nar_bytes(len);
            let (a, b) = (a.min(len), b.min(len));
            let window = a.min(b) as u64..a.max(b) as u64;
            let (mut out, verdict) = run(&nar, hash(&nar), window.clone(), &sizes);
            let Verdict::Verified { last } = verdict else {
                return Err(TestCaseError::fail("an honest NAR did not verify"));
            };
            out.extend_from_slice(last.as_deref().unwrap_or_default());
            prop_assert_eq!(&out[..], &nar[window.start as usize..window.end as usize]);

            let mut bad = nar.clone();
            let flip = flip.min(len - 1).max(24.min(len - 1));
            bad[flip] ^= 0x80;
            let (out, verdict) = run(&bad, hash(&nar), window.clone(), &sizes);
            prop_assert_eq!(verdict, Verdict::Mismatch);
            if !window.is_empty() {
                prop_assert!((out.len() as u64) < window.end - window.start);
            }
        }
    }
}
