//! The binary-cache texts nixmesh serves, on the LAN endpoint, on the
//! localhost substituter and to peers: the narinfo (always uncompressed),
//! its NAR URL, and `/nix-cache-info`.
//!
//! NAR URLs are `nar/<store hash part>-<nar hash, nix32>.nar`: they do not
//! depend on which peer holds the path, they still find the path after the
//! agent restarts (Nix caches narinfos for a month), and they pin the exact
//! bytes. `serve::routes` parses them back.

use super::{NarInfo, PathInfo};

/// The `.narinfo` text nixmesh serves for `info`: uncompressed, at
/// `nar_url`.
pub fn narinfo_text(info: PathInfo) -> String {
    NarInfo {
        url: nar_url(&info),
        compression: "none".into(),
        file_hash: None,
        file_size: None,
        info,
    }
    .render()
}

pub fn nar_url(info: &PathInfo) -> String {
    format!(
        "nar/{}-{}.nar",
        info.path.hash_part(),
        info.nar_hash.nix32_digest()
    )
}

/// Where the substituter serves a file it relays from an upstream cache.
pub fn upstream_url(info: &PathInfo, file_hash: &crate::nix::Sha256Hash) -> String {
    format!(
        "upstream/{}-{}",
        info.path.hash_part(),
        file_hash.nix32_digest()
    )
}

/// The `StoreDir` a `/nix-cache-info` body names, if any.
pub fn cache_info_store_dir(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("StoreDir:"))
        .map(str::trim)
}

/// Body of `/nix-cache-info`.
pub fn cache_info(store_dir: &str, priority: u32) -> String {
    format!("StoreDir: {store_dir}\nWantMassQuery: 1\nPriority: {priority}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_dir_of_a_cache_info() {
        let ours = cache_info("/nix/store", 40);
        assert_eq!(cache_info_store_dir(&ours), Some("/nix/store"));
        assert_eq!(
            cache_info_store_dir("WantMassQuery: 1\nStoreDir:   /gnu/store  \n"),
            Some("/gnu/store")
        );
        assert_eq!(cache_info_store_dir("Priority: 30\n"), None);
    }
}
