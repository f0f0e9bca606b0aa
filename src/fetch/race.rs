//! The narinfo race: which peer answers to believe and when a race is
//! decided (`judge`, `Race`: pure), and the race loop itself
//! (`race_narinfo`), which asks peers through a `NarInfoSource` so that it
//! runs and is tested without a network, on a paused clock. The resolver
//! gives it the QUIC mesh.
//!
//! An answer is offered to Nix only if Nix will accept it: the store path
//! matches the hash asked for, the sizes are sane, the NAR is uncompressed,
//! and, when Nix requires signatures, one verifies against a trusted key
//! (content-addressed paths need none).
//!
//! An answer signed by a trusted key wins at once: the signature covers
//! NarHash, NarSize and References. One that passes without such a
//! signature (a content-addressed path, or Nix not requiring signatures)
//! has fields nobody vouches for, and Nix keeps a narinfo it was given for
//! a long time (its narinfo cache): a peer that lied about NarSize would
//! make the path fail on that host for weeks. So such an answer wins only
//! when a second peer says the same, or when every peer has answered (or
//! the deadline came) and it has the most votes among the answers, alone.
//! Answers that disagree with no majority are all refused.

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
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
    #[error("other peers say otherwise about the NAR, and no signature settles it")]
    Disputed,
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
    /// Believable answers no trusted signature vouches for, in order.
    unvouched: Vec<(NodeId, Box<NarInfo>)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// This answer, from this peer.
    Win(Box<NarInfo>, NodeId),
    Wait,
    Lose,
}

/// Whether two answers describe the same NAR.
fn same_nar(a: &NarInfo, b: &NarInfo) -> bool {
    let (a, b) = (&a.info, &b.info);
    a.nar_hash == b.nar_hash
        && a.nar_size == b.nar_size
        && a.references == b.references
        && a.ca == b.ca
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
            unvouched: Vec::new(),
        }
    }

    pub fn on_answer(&mut self, peer: NodeId, answer: Answer, policy: &TrustPolicy) -> Decision {
        self.waiting = self.waiting.saturating_sub(1);
        if let Answer::Have(info) = answer {
            match judge(&self.asked, &info, policy) {
                Ok(()) if info.info.is_signed_by_any(&policy.trusted_keys) => {
                    return Decision::Win(info, peer)
                }
                Ok(()) => {
                    let agreeing = self.unvouched.iter().find(|(_, c)| same_nar(c, &info));
                    if let Some((first, _)) = agreeing {
                        return Decision::Win(info, *first);
                    }
                    self.unvouched.push((peer, info));
                }
                Err(r) => self.rejected.push((peer, r)),
            }
        }
        if self.waiting == 0 {
            self.settle()
        } else {
            Decision::Wait
        }
    }

    /// The decision once no more answers will come (all in, or the
    /// deadline): the unvouched answer most peers gave, if one did.
    pub fn settle(&mut self) -> Decision {
        let votes = |info: &NarInfo| {
            self.unvouched
                .iter()
                .filter(|(_, c)| same_nar(c, info))
                .count()
        };
        let most = self.unvouched.iter().map(|(_, c)| votes(c)).max();
        let Some(most) = most else {
            return Decision::Lose;
        };
        let leaders: Vec<&(NodeId, Box<NarInfo>)> = self
            .unvouched
            .iter()
            .filter(|(_, c)| votes(c) == most)
            .collect();
        let alone = leaders.iter().all(|(_, c)| same_nar(c, &leaders[0].1));
        if alone {
            let (node, info) = leaders[0].clone();
            return Decision::Win(info, node);
        }
        for (node, _) in std::mem::take(&mut self.unvouched) {
            self.rejected.push((node, Rejection::Disputed));
        }
        Decision::Lose
    }

    /// Peers whose positive answers were not believable, and why.
    pub fn rejected(&self) -> &[(NodeId, Rejection)] {
        &self.rejected
    }
}

/// Asks one peer for a narinfo: `None` when it has no such path.
pub trait NarInfoSource: Sync {
    type Error: std::fmt::Display;
    fn ask<'a>(
        &'a self,
        peer: NodeId,
        hash: &'a HashPart,
    ) -> BoxFuture<'a, Result<Option<NarInfo>, Self::Error>>;
}

/// How a race ended.
#[derive(Debug)]
pub struct RaceOutcome {
    /// The winning answer and the peer that gave it.
    pub won: Option<(NarInfo, NodeId)>,
    /// Positive answers that were not believable, and why.
    pub rejected: Vec<(NodeId, Rejection)>,
    /// Peers that answered that they have no such path.
    pub said_no: Vec<NodeId>,
    /// Peers asked.
    pub asked: usize,
}

/// Whom a race asks, and when.
#[derive(Clone, Debug, Default)]
pub struct AskPlan {
    /// Asked at once (peers that keep no summary: any may have it).
    pub at_once: Vec<NodeId>,
    /// Peers whose summary lists the path, fastest first: the first is
    /// asked at once, each next one when an answer settles nothing, or
    /// when `hedge` passes without one.
    pub hedged: Vec<NodeId>,
    pub hedge: std::time::Duration,
}

impl AskPlan {
    /// Everyone at once.
    pub fn all_at_once(peers: &[NodeId]) -> Self {
        Self {
            at_once: peers.to_vec(),
            ..Self::default()
        }
    }

    fn len(&self) -> usize {
        self.at_once.len() + self.hedged.len()
    }
}

/// Asks the peers of `plan`. The first believable positive answer wins at
/// once (the others are dropped, which cancels them); when every peer has
/// said no, or failed, the race is lost at once; at `deadline` whatever is
/// still out counts as no.
pub async fn race_narinfo<S: NarInfoSource>(
    source: &S,
    plan: &AskPlan,
    hash: &HashPart,
    policy: &TrustPolicy,
    deadline: tokio::time::Instant,
) -> RaceOutcome {
    let mut race = Race::new(hash.clone(), plan.len());
    let ask = |peer: NodeId| async move { (peer, source.ask(peer, hash).await) };
    let mut asks: FuturesUnordered<_> = plan.at_once.iter().map(|&peer| ask(peer)).collect();
    let mut waiting = plan.hedged.iter();
    if let Some(&first) = waiting.next() {
        asks.push(ask(first));
    }
    let mut asked = asks.len();
    let mut said_no = Vec::new();
    let mut next_hedge = tokio::time::Instant::now() + plan.hedge;
    let won = loop {
        if plan.len() == 0 {
            break None;
        }
        let more = waiting.len() > 0;
        let next = tokio::select! {
            next = asks.next() => next,
            _ = tokio::time::sleep_until(next_hedge), if more => {
                if let Some(&peer) = waiting.next() {
                    asks.push(ask(peer));
                    asked += 1;
                }
                next_hedge = tokio::time::Instant::now() + plan.hedge;
                continue;
            }
            _ = tokio::time::sleep_until(deadline) => None,
        };
        let Some((peer, answer)) = next else {
            // The deadline: what came in decides.
            match race.settle() {
                Decision::Win(narinfo, node) => break Some((*narinfo, node)),
                _ => break None,
            }
        };
        let answer = match answer {
            Ok(Some(info)) => Answer::Have(Box::new(info)),
            Ok(None) => {
                said_no.push(peer);
                Answer::NotFound
            }
            Err(reason) => {
                tracing::debug!(%peer, path = %hash, %reason, "peer failed to answer");
                Answer::Failed
            }
        };
        match race.on_answer(peer, answer, policy) {
            Decision::Win(narinfo, node) => break Some((*narinfo, node)),
            Decision::Wait => {
                // That answer settled nothing: the next holder now.
                if let Some(&peer) = waiting.next() {
                    asks.push(ask(peer));
                    asked += 1;
                    next_hedge = tokio::time::Instant::now() + plan.hedge;
                }
            }
            Decision::Lose => break None,
        }
    };
    RaceOutcome {
        won,
        rejected: race.rejected,
        said_no,
        asked,
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
            file_hash: None,
            file_size: None,
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
            Decision::Win(..)
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

    mod race_loop {
        use super::*;
        use std::collections::HashMap;
        use std::time::Duration;

        /// Peers that answer after a delay of their own.
        struct Scripted(HashMap<NodeId, (Duration, Result<Option<NarInfo>, String>)>);

        impl NarInfoSource for Scripted {
            type Error = String;
            fn ask<'a>(
                &'a self,
                peer: NodeId,
                _hash: &'a HashPart,
            ) -> BoxFuture<'a, Result<Option<NarInfo>, String>> {
                Box::pin(async move {
                    let (delay, answer) = self.0[&peer].clone();
                    tokio::time::sleep(delay).await;
                    answer
                })
            }
        }

        fn peer(n: u8) -> NodeId {
            NodeId([n; 32])
        }

        fn ms(n: u64) -> Duration {
            Duration::from_millis(n)
        }

        async fn run(
            script: Vec<(u8, u64, Result<Option<NarInfo>, String>)>,
        ) -> (RaceOutcome, Duration) {
            run_plan(script, |peers| AskPlan::all_at_once(&peers)).await
        }

        /// As `run`, the peers asked one after another `hedge` apart
        /// (the summaries' plan).
        async fn run_hedged(
            script: Vec<(u8, u64, Result<Option<NarInfo>, String>)>,
            hedge: u64,
        ) -> (RaceOutcome, Duration) {
            run_plan(script, |peers| AskPlan {
                at_once: vec![],
                hedged: peers,
                hedge: ms(hedge),
            })
            .await
        }

        /// Each scripted peer answers after its delay; `plan` says whom to
        /// ask when. Returns the outcome and how long the race took.
        async fn run_plan(
            script: Vec<(u8, u64, Result<Option<NarInfo>, String>)>,
            plan: impl Fn(Vec<NodeId>) -> AskPlan,
        ) -> (RaceOutcome, Duration) {
            let peers: Vec<NodeId> = script.iter().map(|(n, ..)| peer(*n)).collect();
            let source = Scripted(
                script
                    .into_iter()
                    .map(|(n, delay, a)| (peer(n), (ms(delay), a)))
                    .collect(),
            );
            let office = SecretKey::from_seed("office-1", [1; 32]);
            let policy = TrustPolicy {
                require_sigs: true,
                trusted_keys: vec![office.public()],
            };
            let start = tokio::time::Instant::now();
            let outcome =
                race_narinfo(&source, &plan(peers), &asked(), &policy, start + ms(400)).await;
            (outcome, start.elapsed())
        }

        #[tokio::test(start_paused = true)]
        async fn a_holder_that_answers_in_time_is_the_only_one_asked() {
            let (out, took) =
                run_hedged(vec![(1, 3, Ok(Some(good()))), (2, 1, Ok(Some(good())))], 10).await;
            assert_eq!(out.won.map(|(_, p)| p), Some(peer(1)));
            assert_eq!((out.asked, took), (1, ms(3)));
        }

        #[tokio::test(start_paused = true)]
        async fn a_slow_holder_gets_a_second_asked_after_the_hedge() {
            let (out, took) = run_hedged(
                vec![(1, 300, Ok(Some(good()))), (2, 5, Ok(Some(good())))],
                10,
            )
            .await;
            assert_eq!(out.won.map(|(_, p)| p), Some(peer(2)));
            assert_eq!((out.asked, took), (2, ms(15)));
        }

        #[tokio::test(start_paused = true)]
        async fn a_holder_that_says_no_sends_the_question_on_at_once() {
            let (out, took) = run_hedged(
                vec![
                    (1, 2, Ok(None)),
                    (2, 2, Err("reset".into())),
                    (3, 2, Ok(Some(good()))),
                ],
                50,
            )
            .await;
            assert_eq!(out.won.map(|(_, p)| p), Some(peer(3)));
            assert_eq!((out.asked, took), (3, ms(6)));
            assert_eq!(out.said_no, vec![peer(1)]);
            // All say no: lost once the last has answered.
            let (out, took) = run_hedged(vec![(1, 2, Ok(None)), (2, 2, Ok(None))], 50).await;
            assert!(out.won.is_none());
            assert_eq!((out.asked, took), (2, ms(4)));
        }

        #[tokio::test(start_paused = true)]
        async fn an_unsigned_answer_asks_the_next_holder_for_a_second_vote() {
            let (out, took) = run_hedged(
                vec![
                    (1, 2, Ok(Some(ca(560)))),
                    (2, 2, Ok(Some(ca(560)))),
                    (3, 2, Ok(Some(ca(560)))),
                ],
                50,
            )
            .await;
            assert_eq!(out.won.map(|(_, p)| p), Some(peer(1)));
            assert_eq!((out.asked, took), (2, ms(4)));
        }

        fn good() -> NarInfo {
            answer(Some(&SecretKey::from_seed("office-1", [1; 32])))
        }

        #[tokio::test(start_paused = true)]
        async fn the_first_believable_answer_wins_without_waiting_for_the_rest() {
            let (out, took) = run(vec![
                (1, 5, Ok(None)),
                (2, 30, Ok(Some(good()))),
                (3, 300, Ok(Some(good()))),
            ])
            .await;
            assert_eq!(out.won.map(|(_, p)| p), Some(peer(2)));
            assert_eq!(took, ms(30));
        }

        #[tokio::test(start_paused = true)]
        async fn unbelievable_answers_are_passed_over() {
            let (out, took) = run(vec![
                (1, 5, Ok(Some(answer(None)))),
                (2, 50, Ok(Some(good()))),
            ])
            .await;
            assert_eq!(out.won.map(|(_, p)| p), Some(peer(2)));
            assert_eq!(took, ms(50));
            assert_eq!(out.rejected, vec![(peer(1), Rejection::Unsigned)]);
        }

        #[tokio::test(start_paused = true)]
        async fn a_miss_is_known_as_soon_as_everyone_said_no() {
            let (out, took) = run(vec![
                (1, 5, Ok(None)),
                (2, 20, Err("reset".into())),
                (3, 60, Ok(None)),
            ])
            .await;
            assert!(out.won.is_none());
            assert_eq!(took, ms(60));
        }

        /// A content-addressed answer: believable without a signature.
        fn ca(nar_size: u64) -> NarInfo {
            let mut info = answer(None);
            info.info.ca =
                Some("fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw".into());
            info.info.nar_size = nar_size;
            info
        }

        #[tokio::test(start_paused = true)]
        async fn an_unsigned_answer_wins_when_a_second_peer_agrees() {
            let (out, took) = run(vec![
                (1, 5, Ok(Some(ca(560)))),
                (2, 20, Ok(Some(ca(560)))),
                (3, 300, Ok(None)),
            ])
            .await;
            let (info, from) = out.won.expect("a winner");
            assert_eq!((info.info.nar_size, from), (560, peer(1)));
            assert_eq!(took, ms(20), "no need to wait for the third");
        }

        #[tokio::test(start_paused = true)]
        async fn an_unsigned_answer_alone_wins_once_everyone_answered() {
            let (out, took) = run(vec![(1, 5, Ok(Some(ca(560)))), (2, 60, Ok(None))]).await;
            assert_eq!(out.won.map(|(_, p)| p), Some(peer(1)));
            assert_eq!(took, ms(60));
            // And at the deadline, if someone never answers.
            let (out, took) = run(vec![(1, 5, Ok(Some(ca(560)))), (2, 9_000, Ok(None))]).await;
            assert_eq!(out.won.map(|(_, p)| p), Some(peer(1)));
            assert_eq!(took, ms(400));
        }

        #[tokio::test(start_paused = true)]
        async fn a_lying_size_loses_to_the_majority_or_to_a_signature() {
            // The liar answers first; two honest peers outvote it.
            let (out, _) = run(vec![
                (1, 1, Ok(Some(ca(561)))),
                (2, 5, Ok(Some(ca(560)))),
                (3, 9, Ok(Some(ca(560)))),
            ])
            .await;
            let (info, from) = out.won.expect("a winner");
            assert_eq!((info.info.nar_size, from), (560, peer(2)));
            // One against one: nobody is believed.
            let (out, _) = run(vec![(1, 1, Ok(Some(ca(561)))), (2, 5, Ok(Some(ca(560))))]).await;
            assert!(out.won.is_none());
            assert_eq!(
                out.rejected,
                vec![
                    (peer(1), Rejection::Disputed),
                    (peer(2), Rejection::Disputed)
                ]
            );
            // A signed answer settles it at once.
            let (out, took) = run(vec![(1, 1, Ok(Some(ca(561)))), (2, 5, Ok(Some(good())))]).await;
            assert_eq!(out.won.map(|(_, p)| p), Some(peer(2)));
            assert_eq!(took, ms(5));
        }

        #[tokio::test(start_paused = true)]
        async fn a_slow_peer_costs_the_deadline_and_no_more() {
            let (out, took) = run(vec![(1, 5, Ok(None)), (2, 10_000, Ok(Some(good())))]).await;
            assert!(out.won.is_none());
            assert_eq!(took, ms(400));
        }

        #[tokio::test(start_paused = true)]
        async fn no_peers_is_a_miss_at_once() {
            let (out, took) = run(vec![]).await;
            assert!(out.won.is_none());
            assert_eq!(took, ms(0));
        }
    }
}
