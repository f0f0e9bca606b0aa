//! The HTTP listeners: the substituter Nix talks to on localhost, this
//! store as a LAN binary cache (`http_cache`), and the admin API with its
//! metrics. `http` is the shared server plumbing (`write_stall` ends a
//! connection whose client takes nothing), `routes` and `byte_range` the
//! pure request parsing.

pub mod admin;
pub mod byte_range;
pub mod conn_slots;
pub mod http;
pub mod http_cache;
pub mod metrics;
pub mod routes;
pub mod substituter;
pub mod write_stall;
