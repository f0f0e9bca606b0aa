//! nixmesh: a LAN peer-to-peer cache mesh for Nix.
//!
//! Data flows one way: `store` reads this host's Nix store; `http_cache`
//! serves it as a binary cache. The Nix formats live in `nix`, and nothing
//! else parses or prints them.

pub mod activation;
pub mod admin;
pub mod agent;
pub mod byte_range;
pub mod cache_api;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod doctor;
pub mod http;
pub mod http_cache;
pub mod identity;
pub mod keys;
pub mod mesh;
pub mod metrics;
pub mod nar_fetch;
pub mod nar_stream;
pub mod nix;
pub mod peer_client;
pub mod peer_server;
pub mod peers;
pub mod prefetch;
pub mod protocol;
pub mod race;
pub mod resolver;
pub mod share;
pub mod shared_store;
pub mod store;
pub mod substituter;
pub mod transport;
