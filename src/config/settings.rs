//! What the config file turns into: keys, policies, the store location,
//! this node's name. Read by the agent when it starts and by `doctor`
//! when it checks a setup; errors name the config key.

use std::net::SocketAddr;

use thiserror::Error;

use crate::config::keys::{self, KeyFileError};
use crate::config::{Config, NodeKey};
use crate::fetch::race::TrustPolicy;
use crate::fetch::upstream::CacheUrl;
use crate::mesh::identity::{MeshSecret, NodeId};
use crate::nix::conf::NixConf;
use crate::nix::store_url::StoreUrl;
use crate::nix::{PublicKey, SecretKey};
use crate::store::db::StoreLocation;
use crate::store::share::SharePolicy;

#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("{key}: {source}")]
    Key {
        key: &'static str,
        source: KeyFileError,
    },
    #[error("share.trusted_keys: {0}")]
    TrustedKey(String),
    #[error("substituter.trusted_keys: {0}")]
    SubstituterKey(String),
    #[error("mesh.secret_file: {0}")]
    MeshSecret(String),
    #[error("{0}")]
    Upstream(#[from] crate::fetch::upstream::UpstreamError),
}

/// The upstream caches to pull from: `upstream.caches`, else the HTTP(S)
/// substituters of this host's nix.conf other than this agent's own.
pub fn upstream_caches(config: &Config) -> Vec<CacheUrl> {
    if let Some(list) = &config.upstream.caches {
        // Checked when the config was parsed.
        return list
            .iter()
            .filter_map(|u| CacheUrl::parse(u).ok())
            .collect();
    }
    let substituters = NixConf::load(&config.store.nix_conf).list("substituters");
    caches_among(&substituters, config.substituter.listen)
}

/// The HTTP(S) caches among nix.conf's `substituters` other than the
/// agent's own (listening on `own`); store settings after `?` (such as
/// `priority=`) are Nix's and dropped. Pure.
pub fn caches_among(substituters: &[String], own: SocketAddr) -> Vec<CacheUrl> {
    let port = own.port();
    let mut own_urls = vec![format!("http://{own}"), format!("http://localhost:{port}")];
    if own.ip().is_unspecified() || own.ip().is_loopback() {
        own_urls.push(format!("http://127.0.0.1:{port}"));
        own_urls.push(format!("http://[::1]:{port}"));
    }
    substituters
        .iter()
        .map(|s| StoreUrl::split(s).base)
        .filter(|base| !own_urls.iter().any(|o| base == o))
        .filter_map(|s| match CacheUrl::parse(s) {
            Ok(url) => Some(url),
            Err(_) => {
                tracing::debug!(substituter = %s, "not an HTTP cache; the agent does not pull from it");
                None
            }
        })
        .collect()
}

/// This node's human name: `mesh.name`, else the host name.
pub fn node_name(config: &Config) -> String {
    config.mesh.name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "nixmesh".into())
    })
}

pub fn mesh_secret(config: &Config) -> Result<MeshSecret, SettingsError> {
    let Some(path) = &config.mesh.secret_file else {
        return Ok(MeshSecret::new(None));
    };
    let text = std::fs::read(path)
        .map_err(|e| SettingsError::MeshSecret(format!("{}: {e}", path.display())))?;
    let trimmed = String::from_utf8_lossy(&text).trim().as_bytes().to_vec();
    if trimmed.is_empty() {
        return Err(SettingsError::MeshSecret(format!(
            "{} is empty",
            path.display()
        )));
    }
    Ok(MeshSecret::new(Some(trimmed)))
}

/// `mesh.allowed_peers`, already checked by the config parser.
pub fn allowed_peers(config: &Config) -> Option<Vec<NodeId>> {
    config
        .mesh
        .allowed_peers
        .as_ref()
        .map(|list| list.iter().map(NodeKey::node).collect())
}

pub fn store_location(config: &Config) -> StoreLocation {
    let mut loc = StoreLocation::under_root(&config.store.root, &config.store.store_dir);
    loc.db = config.db_path();
    loc
}

pub fn signing_key(config: &Config) -> Result<Option<SecretKey>, SettingsError> {
    config
        .signing_key_file
        .as_deref()
        .map(keys::read_secret_key)
        .transpose()
        .map_err(|source| SettingsError::Key {
            key: "signing_key_file",
            source,
        })
}

/// Keys whose signatures make a path shareable: `share.trusted_keys`, or
/// what this host's Nix trusts.
pub fn trusted_keys(config: &Config) -> Result<Vec<PublicKey>, SettingsError> {
    match &config.share.trusted_keys {
        Some(list) => list
            .iter()
            .map(|k| {
                PublicKey::parse(k).map_err(|e| SettingsError::TrustedKey(format!("{k:?}: {e}")))
            })
            .collect(),
        None => Ok(parse_keys_leniently(
            &NixConf::load(&config.store.nix_conf).trusted_public_keys(),
        )),
    }
}

/// What the local Nix will demand of a narinfo, so the substituter never
/// offers one it would reject: `substituter.*`, else this host's nix.conf.
pub fn trust_policy(config: &Config) -> Result<TrustPolicy, SettingsError> {
    let nix_conf = NixConf::load(&config.store.nix_conf);
    let require_sigs = config
        .substituter
        .require_sigs
        .unwrap_or_else(|| nix_conf.require_sigs());
    let trusted_keys = match &config.substituter.trusted_keys {
        Some(list) => list
            .iter()
            .map(|k| {
                PublicKey::parse(k)
                    .map_err(|e| SettingsError::SubstituterKey(format!("{k:?}: {e}")))
            })
            .collect::<Result<_, _>>()?,
        None => parse_keys_leniently(&nix_conf.trusted_public_keys()),
    };
    Ok(TrustPolicy {
        require_sigs,
        trusted_keys,
    })
}

fn parse_keys_leniently(keys: &[String]) -> Vec<PublicKey> {
    keys.iter()
        .filter_map(|k| match PublicKey::parse(k) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::warn!(key = %k, error = %e, "ignoring a malformed key in nix.conf");
                None
            }
        })
        .collect()
}

pub fn share_policy(config: &Config) -> Result<SharePolicy, SettingsError> {
    Ok(SharePolicy {
        trusted_keys: trusted_keys(config)?,
        signing_key: signing_key(config)?,
        sign_local_builds: config.share.sign_local_builds,
        content_addressed: config.share.content_addressed,
        all: config.share.all,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_are_the_other_http_substituters() {
        let own: SocketAddr = "127.0.0.1:5181".parse().unwrap();
        let subs: Vec<String> = [
            "http://127.0.0.1:5181?priority=10",
            "http://localhost:5181/",
            "https://cache.nixos.org/",
            "http://nas.lan:8080?priority=20&trusted=1",
            "ssh://builder",
            "file:///mnt/cache",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let caches: Vec<String> = caches_among(&subs, own)
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(caches, ["https://cache.nixos.org", "http://nas.lan:8080"]);
    }
}
