//! Nix's formats, each in its own file, and nothing else: every byte nixmesh
//! reads or writes in a Nix format goes through here. Pure code, no I/O (a
//! tree is walked into a NAR by `store::nar_encode`).

pub mod base16;
pub mod base32;
pub mod binary_cache;
pub mod conf;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod path_info;
pub mod signature;
pub mod store_path;
pub mod store_url;

pub use hash::Sha256Hash;
pub use narinfo::NarInfo;
pub use path_info::PathInfo;
pub use signature::{PublicKey, SecretKey, Signature};
pub use store_path::{HashPart, StorePath};
