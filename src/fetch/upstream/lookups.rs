//! Narinfo look-ups at the upstream caches, shared: everyone who asks
//! about a path while it is being looked up (this agent's Nix, and peers
//! for whom this agent owns the path) waits for that one look-up, and a
//! hit is remembered for `HIT_MEMO`, so an office that needs the same
//! closure asks upstream about each path once. Misses are not remembered
//! past the look-up: a path may be pushed to a cache at any moment.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use super::{CacheUrl, UpstreamFile};
use crate::lock::lock;
use crate::nix::{HashPart, NarInfo};

/// How long a hit is remembered.
pub const HIT_MEMO: Duration = Duration::from_secs(60);
/// Hits remembered at most; past it the expired go, then all.
pub const MAX_HITS: usize = 16_384;

/// An upstream cache that has the path, and what it said.
#[derive(Debug)]
pub struct Hit {
    pub cache: CacheUrl,
    pub narinfo: NarInfo,
    pub file: UpstreamFile,
}

#[derive(Clone, Debug)]
pub enum Lookup {
    Hit(Arc<Hit>),
    /// None of `asked` has it (caches being skipped were not asked).
    Miss {
        asked: Vec<CacheUrl>,
    },
}

impl Lookup {
    /// The narinfo and file of a hit.
    pub fn found(&self) -> Option<(NarInfo, UpstreamFile)> {
        match self {
            Lookup::Hit(hit) => Some((hit.narinfo.clone(), hit.file.clone())),
            Lookup::Miss { .. } => None,
        }
    }
}

type Slot = Arc<OnceCell<Lookup>>;

#[derive(Default)]
pub struct Lookups {
    inflight: Mutex<HashMap<HashPart, Slot>>,
    hits: Mutex<HashMap<HashPart, (Instant, Arc<Hit>)>>,
}

impl Lookups {
    /// The remembered hit for `hash`, else the answer of the look-up
    /// running for it, else that of `run`, which then runs.
    pub async fn get_or_run(&self, hash: &HashPart, run: impl Future<Output = Lookup>) -> Lookup {
        if let Some(hit) = self.remembered(hash) {
            return Lookup::Hit(hit);
        }
        let slot: Slot = lock(&self.inflight)
            .entry(hash.clone())
            .or_default()
            .clone();
        let answer = slot
            .get_or_init(|| async {
                let answer = run.await;
                if let Lookup::Hit(hit) = &answer {
                    self.remember(hash, hit.clone());
                }
                answer
            })
            .await
            .clone();
        let mut inflight = lock(&self.inflight);
        if inflight.get(hash).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
            inflight.remove(hash);
        }
        answer
    }

    fn remembered(&self, hash: &HashPart) -> Option<Arc<Hit>> {
        let hits = lock(&self.hits);
        let (at, hit) = hits.get(hash)?;
        (at.elapsed() < HIT_MEMO).then(|| hit.clone())
    }

    fn remember(&self, hash: &HashPart, hit: Arc<Hit>) {
        let mut hits = lock(&self.hits);
        if hits.len() >= MAX_HITS {
            hits.retain(|_, (at, _)| at.elapsed() < HIT_MEMO);
            if hits.len() >= MAX_HITS {
                hits.clear();
            }
        }
        hits.insert(hash.clone(), (Instant::now(), hit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::Sha256Hash;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn hit() -> Lookup {
        let text = "StorePath: /nix/store/0c8kkjmc5s0mvbdbrqqcbi9yzg9ly8hn-a\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\nNarSize: 8\nReferences: \n";
        Lookup::Hit(Arc::new(Hit {
            cache: CacheUrl::parse("http://u").unwrap(),
            narinfo: NarInfo::parse("/nix/store", text).unwrap(),
            file: UpstreamFile {
                url: "http://u/nar/x.nar".into(),
                compression: "none".into(),
                file_hash: Sha256Hash([0; 32]),
                file_size: 8,
            },
        }))
    }

    #[tokio::test]
    async fn asks_at_the_same_moment_share_one_look_up_and_hits_are_remembered() {
        let lookups = Lookups::default();
        let runs = AtomicUsize::new(0);
        let h = HashPart::parse("0c8kkjmc5s0mvbdbrqqcbi9yzg9ly8hn").unwrap();
        let run = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            hit()
        };
        let (a, b) = tokio::join!(lookups.get_or_run(&h, run()), lookups.get_or_run(&h, run()));
        assert!(matches!((a, b), (Lookup::Hit(_), Lookup::Hit(_))));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Later: remembered, not asked again.
        assert!(matches!(
            lookups.get_or_run(&h, run()).await,
            Lookup::Hit(_)
        ));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn misses_are_asked_again() {
        let lookups = Lookups::default();
        let runs = AtomicUsize::new(0);
        let h = HashPart::parse("0c8kkjmc5s0mvbdbrqqcbi9yzg9ly8hn").unwrap();
        let run = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Lookup::Miss { asked: Vec::new() }
        };
        lookups.get_or_run(&h, run()).await;
        lookups.get_or_run(&h, run()).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }
}
