//! The serve flow's source: this host's Nix store. `db` reads path
//! metadata from the store's SQLite DB, `nar_stream` serializes a path's
//! NAR from the filesystem, `share` decides what may leave this host, and
//! `shared` is the store as the outside sees it (policy applied).

pub mod catalog;
pub mod catalog_watch;
pub mod chunk_pool;
pub mod db;
pub mod disk_lru;
pub mod nar_cache;
pub mod nar_encode;
pub mod nar_layout;
pub mod nar_stream;
pub mod packed_frames;
pub mod share;
pub mod shared;
