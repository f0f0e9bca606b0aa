//! Store path names: `<store dir>/<32-char nix32 hash part>-<name>`. The hash
//! part is how binary caches address a path, so it is validated before it
//! reaches the DB or the filesystem. Pure.

use std::fmt;

use thiserror::Error;

use super::base32;

pub const HASH_PART_LEN: usize = 32;
/// Nix refuses names longer than this.
pub const MAX_NAME_LEN: usize = 211;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StorePathError {
    #[error("{0:?} is not under the store directory")]
    NotInStore(String),
    #[error("{0:?} has no valid 32-character hash part")]
    BadHashPart(String),
    #[error("{0:?} has an invalid name")]
    BadName(String),
}

/// The 32 nix32 characters that identify a store path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HashPart(String);

impl HashPart {
    pub fn parse(text: &str) -> Result<Self, StorePathError> {
        if text.len() == HASH_PART_LEN && base32::is_valid_text(text) {
            Ok(Self(text.to_string()))
        } else {
            Err(StorePathError::BadHashPart(text.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// 32 bits of the hash, for summaries of which paths an agent shares
    /// (the hash is uniform: two paths of one store collide with
    /// probability 2^-32, a path not in a store of n paths matches one of
    /// them with probability n / 2^32).
    pub fn fingerprint(&self) -> u32 {
        match base32::decode::<20>(&self.0) {
            Ok(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            // Not reached: `parse` admits only decodable text.
            Err(_) => self
                .0
                .bytes()
                .fold(0u32, |h, c| h.rotate_left(5) ^ u32::from(c)),
        }
    }
}

impl fmt::Display for HashPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HashPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HashPart({})", self.0)
    }
}

/// A full store path, checked to sit directly under a store directory.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    full: String,
    base_start: usize,
}

impl StorePath {
    pub fn parse(store_dir: &str, full: &str) -> Result<Self, StorePathError> {
        let base = full
            .strip_prefix(store_dir)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(full.to_string()))?;
        Self::check_base_name(base)?;
        Ok(Self {
            full: full.to_string(),
            base_start: full.len() - base.len(),
        })
    }

    pub fn from_base_name(store_dir: &str, base: &str) -> Result<Self, StorePathError> {
        Self::parse(store_dir, &format!("{store_dir}/{base}"))
    }

    fn check_base_name(base: &str) -> Result<(), StorePathError> {
        let (hash, name) = base
            .split_at_checked(HASH_PART_LEN)
            .ok_or_else(|| StorePathError::BadHashPart(base.to_string()))?;
        HashPart::parse(hash)?;
        let name = name
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::BadHashPart(base.to_string()))?;
        let valid_char = |c: char| c.is_ascii_alphanumeric() || "+-._?=".contains(c);
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || name.starts_with('.')
            || !name.chars().all(valid_char)
        {
            return Err(StorePathError::BadName(base.to_string()));
        }
        Ok(())
    }

    pub fn full(&self) -> &str {
        &self.full
    }

    /// `<hash>-<name>`, as narinfo `References` and `Deriver` carry it.
    pub fn base_name(&self) -> &str {
        &self.full[self.base_start..]
    }

    pub fn hash_part(&self) -> HashPart {
        HashPart(self.base_name()[..HASH_PART_LEN].to_string())
    }

    pub fn name(&self) -> &str {
        &self.base_name()[HASH_PART_LEN + 1..]
    }

    pub fn store_dir(&self) -> &str {
        &self.full[..self.base_start - 1]
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/nix/store/i9zj2x3nvfjjph275b20kf37h0nw1y3r-top";

    #[test]
    fn splits_a_path() {
        let p = StorePath::parse("/nix/store", P).unwrap();
        assert_eq!(p.base_name(), "i9zj2x3nvfjjph275b20kf37h0nw1y3r-top");
        assert_eq!(p.hash_part().as_str(), "i9zj2x3nvfjjph275b20kf37h0nw1y3r");
        assert_eq!(p.name(), "top");
        assert_eq!(p.store_dir(), "/nix/store");
    }

    #[test]
    fn rejects_bad_paths() {
        for bad in [
            "/nix/store/",
            "/nix/store/i9zj2x3nvfjjph275b20kf37h0nw1y3r",
            "/nix/store/i9zj2x3nvfjjph275b20kf37h0nw1y3r-",
            "/nix/store/i9zj2x3nvfjjph275b20kf37h0nw1y3r-.hidden",
            "/nix/store/i9zj2x3nvfjjph275b20kf37h0nw1y3r-a/b",
            "/nix/store/e9zj2x3nvfjjph275b20kf37h0nw1y3r-top",
            "/nix/storeX/i9zj2x3nvfjjph275b20kf37h0nw1y3r-top",
            "/other/i9zj2x3nvfjjph275b20kf37h0nw1y3r-top",
            "/nix/store/ü9zj2x3nvfjjph275b20kf37h0nw1y3-top",
        ] {
            assert!(StorePath::parse("/nix/store", bad).is_err(), "{bad}");
        }
        let long = format!(
            "/nix/store/i9zj2x3nvfjjph275b20kf37h0nw1y3r-{}",
            "a".repeat(212)
        );
        assert!(StorePath::parse("/nix/store", &long).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(text in "(/nix/store/)?[ -~é/]{0,260}") {
            if let Ok(p) = StorePath::parse("/nix/store", &text) {
                // What parses is exactly what it prints.
                proptest::prop_assert_eq!(p.to_string(), text.clone());
                proptest::prop_assert_eq!(p.hash_part().as_str().len(), 32);
            }
            let _ = HashPart::parse(&text);
        }
    }
}
