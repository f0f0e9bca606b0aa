//! Which agent of the office downloads a path from upstream: rendezvous
//! (highest random weight) hashing of the path over the live agents that
//! speak protocol version 2, this one included. Pure. Every agent with the
//! same view of the mesh picks the same owner without asking anyone; when
//! an agent comes or goes, only the paths it owned (or now owns) move.
//! Views that differ for a moment can pick two owners for one path: two
//! downloads, never a wrong or stuck one.

use sha2::{Digest, Sha256};

use crate::mesh::identity::NodeId;

fn weight(key: &[u8], node: &NodeId) -> u64 {
    let mut h = Sha256::new();
    h.update(b"nixmesh upstream owner\0");
    h.update(key);
    h.update(node.0);
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first)
}

/// The owner of `key` among `own` and `peers`.
pub fn owner(key: &[u8], own: NodeId, peers: &[NodeId]) -> NodeId {
    std::iter::once(own)
        .chain(peers.iter().copied())
        .max_by_key(|n| (weight(key, n), n.0))
        .unwrap_or(own)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: u8) -> Vec<NodeId> {
        (1..=n).map(|i| NodeId([i; 32])).collect()
    }

    #[test]
    fn every_agent_picks_the_same_owner() {
        let all = nodes(6);
        for path in 0..200u32 {
            let key = path.to_be_bytes();
            let picks: Vec<NodeId> = all
                .iter()
                .map(|me| {
                    let others: Vec<NodeId> = all.iter().copied().filter(|n| n != me).collect();
                    owner(&key, *me, &others)
                })
                .collect();
            assert!(picks.windows(2).all(|w| w[0] == w[1]), "path {path}");
        }
    }

    #[test]
    fn paths_spread_over_agents_and_only_a_leavers_paths_move() {
        let all = nodes(6);
        let owners: Vec<NodeId> = (0..600u32)
            .map(|p| owner(&p.to_be_bytes(), all[0], &all[1..]))
            .collect();
        for n in &all {
            let share = owners.iter().filter(|o| *o == n).count();
            assert!((50..=150).contains(&share), "{share} of 600 paths");
        }
        // Agent 6 leaves: only its paths get another owner.
        let after: Vec<NodeId> = (0..600u32)
            .map(|p| owner(&p.to_be_bytes(), all[0], &all[1..5]))
            .collect();
        for (before, now) in owners.iter().zip(&after) {
            if *before != all[5] {
                assert_eq!(before, now);
            }
        }
    }
}
