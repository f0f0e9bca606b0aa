//! Config values that carry their own rules, checked while the TOML is
//! parsed: a value that breaks its rule fails right there, so the error
//! names the key and the line the parser saw it on (`config::Config::parse`)
//! instead of a line found afterwards by searching the text.

use std::net::SocketAddr;

use serde::de::{Deserializer, Error};
use serde::Deserialize;

use crate::mesh::identity::NodeId;

/// Largest `substituter.prefetch_mib`: 16 GiB of NARs held ahead.
pub const MAX_PREFETCH_MIB: u64 = 16 * 1024;
/// Largest `substituter.race_timeout_ms`.
pub const MAX_RACE_TIMEOUT_MS: u64 = 60_000;

/// `store.store_dir`: an absolute path without a trailing slash.
pub fn store_dir<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let dir = String::deserialize(d)?;
    if !dir.starts_with('/') || dir.ends_with('/') || dir.contains("//") {
        return Err(D::Error::custom(
            "must be an absolute path without a trailing slash",
        ));
    }
    Ok(dir)
}

/// `admin.listen`: the admin API answers this host only.
pub fn loopback<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let addr = SocketAddr::deserialize(d)?;
    if !addr.ip().is_loopback() {
        return Err(D::Error::custom("must be a loopback address"));
    }
    Ok(addr)
}

/// `substituter.race_timeout_ms`: 1 to 60000.
pub fn race_timeout_ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let ms = u64::deserialize(d)?;
    if ms == 0 || ms > MAX_RACE_TIMEOUT_MS {
        return Err(D::Error::custom(format!(
            "must be 1 to {MAX_RACE_TIMEOUT_MS}"
        )));
    }
    Ok(ms)
}

/// Longest `upstream.*_ms` value: ten minutes.
pub const MAX_UPSTREAM_MS: u64 = 600_000;
/// Most upstream caches.
pub const MAX_UPSTREAM_CACHES: usize = 16;

/// `upstream.timeout_ms`, `upstream.skip_ms`: 1 to `MAX_UPSTREAM_MS`.
pub fn upstream_timeout_ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let ms = u64::deserialize(d)?;
    if ms == 0 || ms > MAX_UPSTREAM_MS {
        return Err(D::Error::custom(format!("must be 1 to {MAX_UPSTREAM_MS}")));
    }
    Ok(ms)
}

/// `upstream.caches`: at most `MAX_UPSTREAM_CACHES` `http://` or
/// `https://` URLs with a host, without query or fragment.
pub fn upstream_caches<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    cache_list(&list).map_err(D::Error::custom)?;
    Ok(Some(list))
}

fn cache_list(list: &[String]) -> Result<(), String> {
    if list.len() > MAX_UPSTREAM_CACHES {
        return Err(format!("at most {MAX_UPSTREAM_CACHES} caches"));
    }
    for url in list {
        crate::fetch::upstream::CacheUrl::parse(url)?;
    }
    Ok(())
}

/// `mesh.plain_caches`: as `upstream.caches`, without the "unset" case.
pub fn plain_caches<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    cache_list(&list).map_err(D::Error::custom)?;
    Ok(list)
}

/// Largest upstream spool: 1 TiB.
pub const MAX_SPOOL_MIB: u64 = 1 << 20;

/// `upstream.spool_mib`: 0 (off) to `MAX_SPOOL_MIB`.
pub fn spool_mib<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let mib = u64::deserialize(d)?;
    if mib > MAX_SPOOL_MIB {
        return Err(D::Error::custom(format!("must be 0 to {MAX_SPOOL_MIB}")));
    }
    Ok(mib)
}

/// `share.nar_cache_mib`: 0 (off) to `MAX_SPOOL_MIB`.
pub fn nar_cache_mib<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    spool_mib(d)
}

/// `share.packed_mib`: 0 (off) to `MAX_SPOOL_MIB`.
pub fn packed_mib<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    spool_mib(d)
}

/// `mesh.max_protocol`: 1 to the newest version this agent speaks.
pub fn max_protocol<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u32::deserialize(d)?;
    let newest = crate::mesh::protocol::NEWEST;
    if v == 0 || v > newest {
        return Err(D::Error::custom(format!("must be 1 to {newest}")));
    }
    Ok(v)
}

/// `mesh.stripe_from_mib`: 0 (never) to 1 TiB.
pub fn stripe_from_mib<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let mib = u64::deserialize(d)?;
    if mib > 1 << 20 {
        return Err(D::Error::custom("must be 0 to 1048576"));
    }
    Ok(mib)
}

/// `substituter.prefetch_mib`: 0 (off) to `MAX_PREFETCH_MIB`.
pub fn prefetch_mib<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let mib = u64::deserialize(d)?;
    if mib > MAX_PREFETCH_MIB {
        return Err(D::Error::custom(format!("must be 0 to {MAX_PREFETCH_MIB}")));
    }
    Ok(mib)
}

/// A node key as the config writes it (`nixmesh id` prints it): 32 bytes
/// of base64, optionally behind a `name:`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeKey {
    text: String,
    node: NodeId,
}

impl NodeKey {
    pub fn node(&self) -> NodeId {
        self.node
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl<'de> Deserialize<'de> for NodeKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Checked inside the visitor, so the parser puts the span of this
        // very value (not of the list around it) on the error.
        d.deserialize_str(NodeKeyVisitor)
    }
}

struct NodeKeyVisitor;

impl serde::de::Visitor<'_> for NodeKeyVisitor {
    type Value = NodeKey;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a node key (32 bytes of base64)")
    }

    fn visit_str<E: Error>(self, text: &str) -> Result<NodeKey, E> {
        let node = NodeId::parse(text)
            .ok_or_else(|| E::custom(format!("{text:?} is not a 32-byte base64 node key")))?;
        Ok(NodeKey {
            text: text.to_string(),
            node,
        })
    }
}
