//! nixmesh: a LAN peer-to-peer cache mesh for Nix.
//!
//! Two flows, one folder each step, and data moves one way in each:
//!
//! ```text
//! fetch (this host's Nix wants a path):
//!   mesh::discovery ─▶ mesh::peers ─▶ fetch::resolver (fetch::race) ─▶ fetch::relay ─▶ serve::substituter ─▶ Nix
//!                                                          fetch::prefetch ┘
//! serve (a neighbour wants one of ours):
//!   store::db ─▶ store::share ─▶ store::nar_encode ─▶ store::nar_stream ─▶ mesh::server ─▶ peer
//!                                                                   └─────▶ serve::http_cache ─▶ a host without an agent
//! ```
//!
//! The folders depend one way: `nix` on nothing; `store` on `nix`; `mesh`
//! on `nix`; `fetch` on `mesh`; `serve` on `fetch` and `store`. Where a lower
//! part must act on a higher one it does so through a narrow method or a
//! trait handed down: the peer server reads the store through
//! `mesh::server::ServedPaths` (implemented in `agent`), the race asks peers
//! through `fetch::race::NarInfoSource`, the relay quarantines and counts
//! through `Mesh` methods.
//!
//! - `nix`: the Nix formats (NAR, narinfo, hashes, signatures, store paths,
//!   nix.conf, the binary-cache text); nothing else parses or prints them.
//! - `store`: reads this host's store (its DB read-only, NARs from the
//!   filesystem, or from `nar_cache` for trees of many small files served
//!   before) and decides what may leave the host.
//! - `mesh`: the peers: node identity, QUIC transport, the wire protocol,
//!   mDNS discovery, the live peer table, and both ends of a peer request.
//! - `fetch`: finds a path in the mesh (the narinfo race) and streams its
//!   NAR from the holders, verified, with failover.
//! - `serve`: the HTTP listeners: the substituter Nix talks to, the LAN
//!   binary cache, the admin API and its metrics.
//! - `config`: the config file and what it turns into (keys, policies).
//! - `agent`: wires the parts into a running agent; `cli`: the commands that
//!   talk to one (`peers`, `status`, `why`, `doctor`).
//! - `api`: the JSON views the admin API serves and the CLI reads.
//! - `lock`: the one policy for poisoned mutexes; `disk_room`: the one rule
//!   for how much of a disk nixmesh's own files may take.

pub mod agent;
pub mod api;
pub mod chunk_buffers;
pub mod cli;
pub mod config;
pub mod disk_room;
pub mod fetch;
pub mod lock;
pub mod mesh;
pub mod nix;
pub mod serve;
pub mod store;
