//! The peers of this node: who they are (`identity`), how they are found
//! (`discovery`), the live table of them (`peers`), the QUIC link to them
//! (`transport`, `protocol`, NAR chunk frames in `nar_chunks`, written to
//! a `nar_sink` and read back by `nar_reader`; large
//! NARs over TLS on TCP in `bulk`), this node's end of it (`node`) and
//! when it dials whom (`dial_plan`), and both sides of a request: `client`
//! asks a peer, `server` answers one.

pub mod bulk;
pub mod client;
pub mod dial_plan;
pub mod discovery;
pub mod identity;
pub mod inbound;
#[cfg(test)]
pub mod loopback;
pub mod nar_chunks;
pub mod nar_reader;
pub mod nar_sink;
pub mod node;
pub mod pace;
pub mod peers;
pub mod plain_bulk;
pub mod protocol;
pub mod server;
pub mod summaries;
pub mod summary_feed;
pub mod transport;
