//! The SHA-256 NAR hash as Nix writes and reads it: `sha256:<nix32>` in
//! narinfos, `sha256:<base16>` in the store DB, `sha256-<base64>` (SRI) in
//! `nix path-info --json`. Pure parsing and printing.

use std::fmt;

use base64::Engine;
use thiserror::Error;

use super::base32;

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    #[error("hash {0:?} is not sha256")]
    NotSha256(String),
    #[error("sha256 hash {0:?} is neither base16, nix base32 nor base64")]
    BadEncoding(String),
}

/// A SHA-256 digest, usually of a NAR.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Hash(pub [u8; 32]);

impl Sha256Hash {
    /// Accepts every form Nix prints: `sha256:` followed by base16, nix base32
    /// or base64, and SRI `sha256-<base64>`.
    pub fn parse(text: &str) -> Result<Self, HashError> {
        let digest = if let Some(rest) = text.strip_prefix("sha256:") {
            rest
        } else if let Some(rest) = text.strip_prefix("sha256-") {
            return decode_base64(rest).ok_or_else(|| HashError::BadEncoding(text.to_string()));
        } else {
            return Err(HashError::NotSha256(text.to_string()));
        };
        let bad = || HashError::BadEncoding(text.to_string());
        match digest.len() {
            64 => decode_base16(digest).ok_or_else(bad),
            52 => base32::decode::<32>(digest).map(Self).map_err(|_| bad()),
            44 => decode_base64(digest).ok_or_else(bad),
            _ => Err(bad()),
        }
    }

    /// `sha256:<nix base32>`, the form narinfos carry.
    pub fn to_nix32(&self) -> String {
        format!("sha256:{}", base32::encode(&self.0))
    }

    /// Bare nix base32 digest, for URLs.
    pub fn nix32_digest(&self) -> String {
        base32::encode(&self.0)
    }

    /// `sha256-<base64>`, as `nix path-info --json` prints it.
    pub fn to_sri(&self) -> String {
        format!("sha256-{}", BASE64.encode(self.0))
    }
}

impl fmt::Debug for Sha256Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix32())
    }
}

impl fmt::Display for Sha256Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix32())
    }
}

fn decode_base16(text: &str) -> Option<Sha256Hash> {
    super::base16::decode(text).map(Sha256Hash)
}

fn decode_base64(text: &str) -> Option<Sha256Hash> {
    let bytes = BASE64.decode(text).ok()?;
    Some(Sha256Hash(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    // sha256 of "hello\n" in the forms Nix prints.
    const HEX: &str = "sha256:5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
    const NIX32: &str = "sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq";
    const SRI: &str = "sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM=";

    #[test]
    fn all_forms_agree() {
        let a = Sha256Hash::parse(HEX).unwrap();
        assert_eq!(Sha256Hash::parse(NIX32).unwrap(), a);
        assert_eq!(Sha256Hash::parse(SRI).unwrap(), a);
        assert_eq!(a.to_nix32(), NIX32);
        assert_eq!(a.to_sri(), SRI);
    }

    #[test]
    fn signs_are_not_hex_digits() {
        let plus = format!("sha256:{}", "+f".repeat(32));
        assert!(Sha256Hash::parse(&plus).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(text in "(sha256[:-])?[ -~]{0,70}") {
            let _ = Sha256Hash::parse(&text);
        }
    }

    #[test]
    fn rejects_other_algorithms_and_garbage() {
        assert!(matches!(
            Sha256Hash::parse("md5:abc"),
            Err(HashError::NotSha256(_))
        ));
        assert!(Sha256Hash::parse("sha256:zz").is_err());
        assert!(Sha256Hash::parse(&format!("sha256:{}", "g".repeat(64))).is_err());
        assert!(Sha256Hash::parse("sha256-!!!").is_err());
    }
}
