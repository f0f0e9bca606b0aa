//! What Nix knows about one valid store path: hash and size of its NAR,
//! references, deriver, signatures, content address. The store DB fills it;
//! narinfo text renders and parses it. Pure data plus the signature checks
//! that belong to it.

use super::hash::Sha256Hash;
use super::signature::{self, PublicKey, SecretKey};
use super::store_path::StorePath;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: Sha256Hash,
    pub nar_size: u64,
    /// Full paths, sorted.
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    /// `name:base64` texts, exactly as the store holds them.
    pub sigs: Vec<String>,
    /// Content address (`fixed:r:sha256:…`, `text:sha256:…`), if any.
    pub ca: Option<String>,
    /// Built on this host rather than substituted.
    pub ultimate: bool,
}

impl PathInfo {
    pub fn fingerprint(&self) -> String {
        signature::fingerprint(&self.path, &self.nar_hash, self.nar_size, &self.references)
    }

    /// True when a signature on the path verifies against one of `keys`.
    pub fn is_signed_by_any(&self, keys: &[PublicKey]) -> bool {
        !keys.is_empty() && signature::any_valid(&self.fingerprint(), &self.sigs, keys)
    }

    /// Adds `key`'s signature unless one by that key name is already there.
    pub fn add_signature(&mut self, key: &SecretKey) {
        let prefix = format!("{}:", key.name());
        if self.sigs.iter().any(|s| s.starts_with(&prefix)) {
            return;
        }
        let sig = key.sign(self.fingerprint().as_bytes());
        self.sigs.push(sig.to_nix_string());
    }
}
