//! The race policy, pure: which peer answers to believe, and when a narinfo
//! race is decided. The substituter runs the race; this file decides it.
//!
//! An answer is offered to Nix only if Nix will accept it: the store path
//! matches the hash asked for, the sizes are sane, the NAR is uncompressed,
//! and, when Nix requires signatures, one verifies against a trusted key
//! (content-addressed paths need none).

use thiserror::Error;

use crate::mesh::identity::NodeId;
use crate::nix::{HashPart, NarInfo, PublicKey};

/// Largest NAR we believe a peer about.
pub const MAX_NAR_SIZE: u64 = 1 << 40;

/// What the local Nix will demand of a narinfo.
#[derive(Clone, Debug, Default)]
pub struct TrustPolicy {
    pub require_sigs: bool,
    pub trusted_keys: Vec<PublicKey>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Rejection {
    #[error("answer is for {got}, not the hash asked for")]
    WrongPath { got: String },
    #[error("NAR size {0} is not sane")]
    BadSize(u64),
    #[error("compression {0:?} is not served through the mesh")]
    Compression(String),
    #[error("no signature from a trusted key")]
    Unsigned,
}

pub fn judge(asked: &HashPart, answer: &NarInfo, policy: &TrustPolicy) -> Result<(), Rejection> {
    let info = &answer.info;
    if &info.path.hash_part() != asked {
        return Err(Rejection::WrongPath {
            got: info.path.to_string(),
        });
    }
    if info.nar_size == 0 || info.nar_size > MAX_NAR_SIZE {
        return Err(Rejection::BadSize(info.nar_size));
    }
    if answer.compression != "none" {
        return Err(Rejection::Compression(answer.compression.clone()));
    }
    if policy.require_sigs && info.ca.is_none() && !info.is_signed_by_any(&policy.trusted_keys) {
        return Err(Rejection::Unsigned);
    }
    Ok(())
}

/// One narinfo race: answers come in one by one; the first acceptable
/// positive answer wins; when every peer has answered without one, it is
/// lost.
#[derive(Debug)]
pub struct Race {
    asked: HashPart,
    waiting: usize,
    rejected: Vec<(NodeId, Rejection)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Win(Box<NarInfo>),
    Wait,
    Lose,
}

/// What one peer said.
pub enum Answer {
    Have(Box<NarInfo>),
    NotFound,
    Failed,
}

impl Race {
    pub fn new(asked: HashPart, peers: usize) -> Self {
        Self {
            asked,
            waiting: peers,
            rejected: Vec::new(),
        }
    }

    pub fn on_answer(&mut self, peer: NodeId, answer: Answer, policy: &TrustPolicy) -> Decision {
        self.waiting = self.waiting.saturating_sub(1);
        if let Answer::Have(info) = answer {
            match judge(&self.asked, &info, policy) {
                Ok(()) => return Decision::Win(info),
                Err(r) => self.rejected.push((peer, r)),
            }
        }
        if self.waiting == 0 {
            Decision::Lose
        } else {
            Decision::Wait
        }
    }

    /// Peers whose positive answers were not believable, and why.
    pub fn rejected(&self) -> &[(NodeId, Rejection)] {
        &self.rejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::{PathInfo, SecretKey, Sha256Hash, StorePath};

    const P: &str = "/nix/store/i9zj2x3nvfjjph275b20kf37h0nw1y3r-top";

    fn answer(sign_with: Option<&SecretKey>) -> NarInfo {
        let mut info = PathInfo {
            path: StorePath::parse("/nix/store", P).unwrap(),
            nar_hash: Sha256Hash([1; 32]),
            nar_size: 560,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
            ultimate: false,
        };
        if let Some(k) = sign_with {
            info.add_signature(k);
        }
        NarInfo {
            info,
            url: "nar/x.nar".into(),
            compression: "none".into(),
        }
    }

    fn asked() -> HashPart {
        HashPart::parse("i9zj2x3nvfjjph275b20kf37h0nw1y3r").unwrap()
    }

    #[test]
    fn judge_checks_what_nix_checks() {
        let office = SecretKey::from_seed("office-1", [1; 32]);
        let policy = TrustPolicy {
            require_sigs: true,
            trusted_keys: vec![office.public()],
        };
        assert_eq!(judge(&asked(), &answer(Some(&office)), &policy), Ok(()));
        assert_eq!(
            judge(&asked(), &answer(None), &policy),
            Err(Rejection::Unsigned)
        );
        let stranger = SecretKey::from_seed("office-1", [2; 32]);
        assert_eq!(
            judge(&asked(), &answer(Some(&stranger)), &policy),
            Err(Rejection::Unsigned),
            "same key name, other key"
        );
        let mut ca = answer(None);
        ca.info.ca =
            Some("fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw".into());
        assert_eq!(judge(&asked(), &ca, &policy), Ok(()));
        let other = HashPart::parse("00000000000000000000000000000000").unwrap();
        assert!(matches!(
            judge(&other, &answer(Some(&office)), &policy),
            Err(Rejection::WrongPath { .. })
        ));
        let mut huge = answer(Some(&office));
        huge.info.nar_size = MAX_NAR_SIZE + 1;
        assert!(matches!(
            judge(&asked(), &huge, &policy),
            Err(Rejection::BadSize(_))
        ));
        let mut xz = answer(Some(&office));
        xz.compression = "xz".into();
        assert!(matches!(
            judge(&asked(), &xz, &policy),
            Err(Rejection::Compression(_))
        ));
        let lax = TrustPolicy::default();
        assert_eq!(judge(&asked(), &answer(None), &lax), Ok(()));
    }

    #[test]
    fn first_believable_answer_wins() {
        let office = SecretKey::from_seed("office-1", [1; 32]);
        let policy = TrustPolicy {
            require_sigs: true,
            trusted_keys: vec![office.public()],
        };
        let mut race = Race::new(asked(), 3);
        assert_eq!(
            race.on_answer(NodeId([1; 32]), Answer::NotFound, &policy),
            Decision::Wait
        );
        assert_eq!(
            race.on_answer(
                NodeId([2; 32]),
                Answer::Have(Box::new(answer(None))),
                &policy
            ),
            Decision::Wait,
            "an unsigned answer does not win"
        );
        assert!(matches!(
            race.on_answer(
                NodeId([3; 32]),
                Answer::Have(Box::new(answer(Some(&office)))),
                &policy
            ),
            Decision::Win(_)
        ));
        assert_eq!(race.rejected().len(), 1);
    }

    #[test]
    fn all_no_is_a_loss() {
        let policy = TrustPolicy::default();
        let mut race = Race::new(asked(), 2);
        assert_eq!(
            race.on_answer(NodeId([1; 32]), Answer::Failed, &policy),
            Decision::Wait
        );
        assert_eq!(
            race.on_answer(NodeId([2; 32]), Answer::NotFound, &policy),
            Decision::Lose
        );
        assert_eq!(
            Race::new(asked(), 0).on_answer(NodeId([1; 32]), Answer::NotFound, &policy),
            Decision::Lose
        );
    }
}
