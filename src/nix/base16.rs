//! Lower-case hexadecimal, as Nix writes SHA-256 digests in its store DB
//! and as nixmesh shows keys and fingerprints. Decoding is strict: exactly
//! two hex digits per byte, nothing else (no sign, no spaces).

pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// `N` bytes from exactly `2 * N` hex digits (either case).
pub fn decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        assert_eq!(encode(&[0x00, 0x7f, 0xff, 0x1a]), "007fff1a");
        assert_eq!(decode::<4>("007fff1a"), Some([0x00, 0x7f, 0xff, 0x1a]));
        assert_eq!(decode::<2>("ABcd"), Some([0xab, 0xcd]));
    }

    #[test]
    fn anything_but_hex_digits_is_refused() {
        // `u8::from_str_radix` takes "+f"; a digest must not.
        assert_eq!(decode::<2>("+f00"), None);
        assert_eq!(decode::<2>("0g00"), None);
        assert_eq!(decode::<2>(" f00"), None);
        assert_eq!(decode::<2>("f00"), None);
        assert_eq!(decode::<2>("f0000"), None);
        assert_eq!(decode::<1>("é"), None);
    }

    proptest! {
        #[test]
        fn round_trips(bytes in proptest::array::uniform32(any::<u8>())) {
            prop_assert_eq!(decode::<32>(&encode(&bytes)), Some(bytes));
        }

        #[test]
        fn never_panics(text in ".{0,70}") {
            let _ = decode::<32>(&text);
        }
    }
}
