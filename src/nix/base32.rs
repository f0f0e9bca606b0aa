//! Nix's own base32: the alphabet without `e o u t`, written least significant
//! digit last. Store path hash parts and `sha256:` hashes in narinfos use it.
//! Pure functions, no I/O.

use thiserror::Error;

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Base32Error {
    #[error("invalid nix base32 character {0:?}")]
    BadChar(char),
    #[error("nix base32 string has length {got}, expected {want}")]
    BadLength { got: usize, want: usize },
    #[error("nix base32 string has bits set beyond its byte length")]
    TrailingBits,
}

/// Length of the base32 text for `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len * 8 - 1) / 5 + 1
    }
}

pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let bit = n * 5;
        let i = bit / 8;
        let j = bit % 8;
        let low = u16::from(bytes[i]) >> j;
        let high = bytes.get(i + 1).map_or(0, |b| u16::from(*b) << (8 - j));
        out.push(char::from(ALPHABET[usize::from((low | high) & 0x1f)]));
    }
    out
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|a| *a == c).map(|p| p as u8)
}

/// True when `s` only uses the nix base32 alphabet.
pub fn is_valid_text(s: &str) -> bool {
    s.bytes().all(|c| digit(c).is_some())
}

/// Decodes into exactly `N` bytes.
pub fn decode<const N: usize>(s: &str) -> Result<[u8; N], Base32Error> {
    let want = encoded_len(N);
    if s.len() != want {
        return Err(Base32Error::BadLength { got: s.len(), want });
    }
    let mut out = [0u8; N];
    for (n, c) in s.bytes().rev().enumerate() {
        let d = digit(c).ok_or(Base32Error::BadChar(char::from(c)))?;
        let bit = n * 5;
        let i = bit / 8;
        let j = bit % 8;
        out[i] |= d << j;
        let carry = u16::from(d) >> (8 - j);
        if carry != 0 {
            match out.get_mut(i + 1) {
                Some(next) => *next |= carry as u8,
                None => return Err(Base32Error::TrailingBits),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_sha256_of_hello() {
        // `nix hash file --base32` of a file holding "hello\n".
        let bytes: [u8; 32] = [
            0x58, 0x91, 0xb5, 0xb5, 0x22, 0xd5, 0xdf, 0x08, 0x6d, 0x0f, 0xf0, 0xb1, 0x10, 0xfb,
            0xd9, 0xd2, 0x1b, 0xb4, 0xfc, 0x71, 0x63, 0xaf, 0x34, 0xd0, 0x82, 0x86, 0xa2, 0xe8,
            0x46, 0xf6, 0xbe, 0x03,
        ];
        assert_eq!(
            encode(&bytes),
            "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"
        );
    }

    #[test]
    fn rejects_bad_text() {
        assert_eq!(
            decode::<20>("e").unwrap_err(),
            Base32Error::BadLength { got: 1, want: 32 }
        );
        let bad = "e".repeat(32);
        assert_eq!(decode::<20>(&bad).unwrap_err(), Base32Error::BadChar('e'));
        // 52 chars carry 260 bits; a 1 in the top digit overflows 32 bytes.
        let overflow = format!("z{}", "0".repeat(51));
        assert_eq!(
            decode::<32>(&overflow).unwrap_err(),
            Base32Error::TrailingBits
        );
    }

    proptest! {
        #[test]
        fn round_trip_20(bytes in proptest::array::uniform20(any::<u8>())) {
            prop_assert_eq!(decode::<20>(&encode(&bytes)).unwrap(), bytes);
        }

        #[test]
        fn round_trip_32(bytes in proptest::array::uniform32(any::<u8>())) {
            prop_assert_eq!(decode::<32>(&encode(&bytes)).unwrap(), bytes);
        }

        #[test]
        fn decode_never_panics(s in "[0-9a-z]{0,60}") {
            let _ = decode::<32>(&s);
        }
    }
}
