//! Which store paths may leave this host, and the signature this host adds to
//! what it shares. Pure: it looks only at a path's metadata.
//!
//! The default suits an office: a path is shared only when it carries a valid
//! signature from a trusted key (by default the keys this host's Nix trusts,
//! so what came from cache.nixos.org or was signed by the office key). With a
//! signing key configured, paths built on this host are signed and shared, as
//! Nix's own `secret-key-files` does. Sharing everything, or every
//! content-addressed path, is an explicit opt-in.

use crate::nix::{PathInfo, PublicKey, SecretKey};

#[derive(Clone, Debug, Default)]
pub struct SharePolicy {
    pub trusted_keys: Vec<PublicKey>,
    pub signing_key: Option<SecretKey>,
    /// With a signing key: share paths built here (`ultimate` in the DB).
    pub sign_local_builds: bool,
    pub content_addressed: bool,
    pub all: bool,
}

impl SharePolicy {
    pub fn allows(&self, info: &PathInfo) -> bool {
        self.all
            || (self.content_addressed && info.ca.is_some())
            || (self.sign_local_builds && self.signing_key.is_some() && info.ultimate)
            || info.is_signed_by_any(&self.trusted_keys)
    }

    /// What to hand out for `info`: its own signatures plus this host's, or
    /// `None` when the path may not leave the host.
    pub fn prepare(&self, mut info: PathInfo) -> Option<PathInfo> {
        if !self.allows(&info) {
            return None;
        }
        if let Some(key) = &self.signing_key {
            info.add_signature(key);
        }
        Some(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::{Sha256Hash, StorePath};

    fn info() -> PathInfo {
        PathInfo {
            path: StorePath::parse(
                "/nix/store",
                "/nix/store/6h9lcbx523532ax1c5g2351w9bm8ykhy-f.txt",
            )
            .unwrap(),
            nar_hash: Sha256Hash([7; 32]),
            nar_size: 120,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
            ultimate: false,
        }
    }

    fn key(name: &str, seed: u8) -> SecretKey {
        SecretKey::from_seed(name, [seed; 32])
    }

    #[test]
    fn unsigned_paths_stay_home_by_default() {
        let office = key("office-1", 1);
        let policy = SharePolicy {
            trusted_keys: vec![office.public()],
            ..Default::default()
        };
        assert!(policy.prepare(info()).is_none());
        let mut built = info();
        built.ultimate = true;
        assert!(
            policy.prepare(built).is_none(),
            "no signing key: local builds stay"
        );
    }

    #[test]
    fn trusted_signature_lets_a_path_out_untouched() {
        let office = key("office-1", 1);
        let policy = SharePolicy {
            trusted_keys: vec![office.public()],
            ..Default::default()
        };
        let mut signed = info();
        signed.add_signature(&office);
        assert_eq!(policy.prepare(signed.clone()), Some(signed.clone()));
        let stranger = key("stranger-1", 2);
        let mut other = info();
        other.add_signature(&stranger);
        assert!(policy.prepare(other).is_none());
    }

    #[test]
    fn signing_key_shares_and_signs_local_builds_only() {
        let office = key("office-1", 1);
        let policy = SharePolicy {
            trusted_keys: vec![office.public()],
            signing_key: Some(office.clone()),
            sign_local_builds: true,
            ..Default::default()
        };
        let mut built = info();
        built.ultimate = true;
        let out = policy.prepare(built).unwrap();
        assert!(out.is_signed_by_any(&[office.public()]));
        assert!(
            policy.prepare(info()).is_none(),
            "substituted, unsigned: stays"
        );
    }

    #[test]
    fn opt_ins() {
        let mut ca = info();
        ca.ca = Some("fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw".into());
        let ca_policy = SharePolicy {
            content_addressed: true,
            ..Default::default()
        };
        assert!(ca_policy.allows(&ca));
        assert!(!ca_policy.allows(&info()));
        let all = SharePolicy {
            all: true,
            ..Default::default()
        };
        assert!(all.allows(&info()));
    }
}
