//! The fetch flow: a path this host's Nix wants, found in the mesh and
//! streamed from its holders. `race` decides which narinfo answer wins,
//! `resolver` runs the race across live peers, `relay` streams and verifies
//! the NAR with failover (compressed at the level `compression` picks for
//! the link; a large NAR several peers hold in `stripes` from all of them,
//! raw where the asker is behind, `raw_stripes`),
//! `prefetch` fetches small NARs ahead of Nix, and
//! `upstream` pulls what no peer holds from the upstream caches.

pub mod compression;
pub mod plain;
pub mod prefetch;
pub mod race;
pub mod raw_stripes;
pub mod relay;
pub mod resolver;
pub mod stripes;
pub mod upstream;
pub mod verify;
