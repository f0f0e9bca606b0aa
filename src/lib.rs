//! nixmesh: a LAN peer-to-peer cache mesh for Nix.
//!
//! Data flows one way: `store` reads this host's Nix store; `http_cache`
//! serves it as a binary cache. The Nix formats live in `nix`, and nothing
//! else parses or prints them.

pub mod agent;
pub mod cache_api;
pub mod config;
pub mod http;
pub mod http_cache;
pub mod keys;
pub mod nar_stream;
pub mod nix;
pub mod share;
pub mod store;
