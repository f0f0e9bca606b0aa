//! Nix binary-cache signatures: `name:base64` keys as written by
//! `nix-store --generate-binary-cache-key`, the path fingerprint they sign,
//! and `name:base64` signatures as narinfo `Sig:` lines carry them. Pure.

use std::fmt;

use base64::Engine;
use ed25519_dalek::{Signer, Verifier};
use thiserror::Error;

use super::hash::Sha256Hash;
use super::store_path::StorePath;

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key has no `name:` prefix")]
    MissingName,
    #[error("key {0:?}: the base64 part does not decode")]
    BadBase64(String),
    #[error("key {name:?} has {got} bytes, expected {want}")]
    BadLength {
        name: String,
        got: usize,
        want: usize,
    },
    #[error("secret key {0:?}: its public half does not match its seed")]
    Inconsistent(String),
    #[error("key {0:?} is not a valid ed25519 point")]
    BadPoint(String),
}

fn split_named(text: &str) -> Result<(&str, Vec<u8>), KeyError> {
    let text = text.trim();
    let (name, b64) = text.split_once(':').ok_or(KeyError::MissingName)?;
    if name.is_empty() {
        return Err(KeyError::MissingName);
    }
    let bytes = BASE64
        .decode(b64)
        .map_err(|_| KeyError::BadBase64(name.to_string()))?;
    Ok((name, bytes))
}

fn exact<const N: usize>(name: &str, bytes: Vec<u8>) -> Result<[u8; N], KeyError> {
    let got = bytes.len();
    bytes.try_into().map_err(|_| KeyError::BadLength {
        name: name.to_string(),
        got,
        want: N,
    })
}

/// A signing key: 64 bytes, the seed then the public key.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl SecretKey {
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_named(text)?;
        let bytes: [u8; 64] = exact(name, bytes)?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| KeyError::Inconsistent(name.to_string()))?;
        Ok(Self {
            name: name.to_string(),
            key,
        })
    }

    /// A fresh key from the operating system's random source.
    pub fn generate(name: &str) -> Result<Self, getrandom::Error> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed)?;
        Ok(Self::from_seed(name, seed))
    }

    pub fn from_seed(name: &str, seed: [u8; 32]) -> Self {
        Self {
            name: name.to_string(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The file text, exactly as Nix writes it (no trailing newline).
    pub fn to_nix_string(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        )
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature {
            name: self.name.clone(),
            bytes: self.key.sign(message).to_bytes(),
        }
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}, <redacted>)", self.name)
    }
}

/// A verifying key: 32 bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_named(text)?;
        let bytes: [u8; 32] = exact(name, bytes)?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| KeyError::BadPoint(name.to_string()))?;
        Ok(Self {
            name: name.to_string(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn to_nix_string(&self) -> String {
        format!("{}:{}", self.name, BASE64.encode(self.key.to_bytes()))
    }

    /// True when `sig` is by this key (same name) and verifies over `message`.
    pub fn verifies(&self, message: &[u8], sig: &Signature) -> bool {
        sig.name == self.name
            && self
                .key
                .verify(message, &ed25519_dalek::Signature::from_bytes(&sig.bytes))
                .is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

/// One `Sig:` value.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature {
    name: String,
    bytes: [u8; 64],
}

impl Signature {
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_named(text)?;
        Ok(Self {
            name: name.to_string(),
            bytes: exact(name, bytes)?,
        })
    }

    pub fn key_name(&self) -> &str {
        &self.name
    }

    pub fn to_nix_string(&self) -> String {
        format!("{}:{}", self.name, BASE64.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

/// What a narinfo signature signs:
/// `1;<path>;sha256:<nix32>;<size>;<sorted full reference paths, comma-joined>`.
pub fn fingerprint(
    path: &StorePath,
    nar_hash: &Sha256Hash,
    nar_size: u64,
    references: &[StorePath],
) -> String {
    let mut refs: Vec<&str> = references.iter().map(StorePath::full).collect();
    refs.sort_unstable();
    format!(
        "1;{};{};{};{}",
        path.full(),
        nar_hash.to_nix32(),
        nar_size,
        refs.join(",")
    )
}

/// True when any of `sigs` (raw `Sig:` texts) verifies against any of `keys`.
/// Unparsable signatures are skipped: other keys may still vouch for the path.
pub fn any_valid(fingerprint: &str, sigs: &[String], keys: &[PublicKey]) -> bool {
    sigs.iter()
        .filter_map(|s| Signature::parse(s).ok())
        .any(|sig| {
            keys.iter()
                .any(|k| k.verifies(fingerprint.as_bytes(), &sig))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by `nix-store --generate-binary-cache-key test-1 sk pk` (Nix 2.8).
    const SK: &str = "test-1:Od5sx/23kU9cip0yPBjikeRYXsL9rmUs0weDk7Sx3tEIibMm0d6BHEBNSp597hG/TWHA0Q4Yh63y/KJebEU++w==";
    const PK: &str = "test-1:CImzJtHegRxATUqefe4Rv01hwNEOGIet8vyiXmxFPvs=";
    // `nix store sign -k sk` on /nix/store/6h9lcbx523532ax1c5g2351w9bm8ykhy-f.txt.
    const SIG: &str = "test-1:Wu1Om7XOEdxvb++6CrPdyX/DY1m5eqRXNbK2Tialig9yHA5ccb+011C4tai7UeKnteam2w7TVTDn6wnRj6tGCA==";

    fn example() -> String {
        let path = StorePath::parse(
            "/nix/store",
            "/nix/store/6h9lcbx523532ax1c5g2351w9bm8ykhy-f.txt",
        )
        .unwrap();
        let hash = Sha256Hash::parse(
            "sha256:1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13",
        )
        .unwrap();
        fingerprint(&path, &hash, 120, &[])
    }

    #[test]
    fn nix_keys_load_and_agree() {
        let sk = SecretKey::parse(SK).unwrap();
        let pk = PublicKey::parse(PK).unwrap();
        assert_eq!(sk.public(), pk);
        assert_eq!(sk.to_nix_string(), SK);
        assert_eq!(pk.to_nix_string(), PK);
    }

    #[test]
    fn our_signature_equals_nix_signature() {
        let sk = SecretKey::parse(SK).unwrap();
        let fp = example();
        // ed25519 is deterministic: same key, same message, same bytes.
        assert_eq!(sk.sign(fp.as_bytes()).to_nix_string(), SIG);
        let pk = PublicKey::parse(PK).unwrap();
        assert!(any_valid(
            &fp,
            &[SIG.to_string()],
            std::slice::from_ref(&pk)
        ));
        assert!(!any_valid(&format!("{fp}x"), &[SIG.to_string()], &[pk]));
    }

    #[test]
    fn malformed_keys_are_errors() {
        assert_eq!(PublicKey::parse("abc").unwrap_err(), KeyError::MissingName);
        assert!(matches!(
            PublicKey::parse("a:!!"),
            Err(KeyError::BadBase64(_))
        ));
        assert!(matches!(
            PublicKey::parse("a:AAAA"),
            Err(KeyError::BadLength {
                got: 3,
                want: 32,
                ..
            })
        ));
        assert!(SecretKey::parse(PK).is_err());
        let mut bad = SecretKey::parse(SK).unwrap().seed().to_vec();
        bad.extend([0u8; 32]);
        let text = format!("x:{}", BASE64.encode(&bad));
        assert!(matches!(
            SecretKey::parse(&text),
            Err(KeyError::Inconsistent(_))
        ));
    }
}
