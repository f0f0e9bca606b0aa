//! Turns a `Config` into running services and runs them until shutdown. The
//! only place that knows every part; each part knows only what it is given.

use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http;
use crate::http_cache::HttpCache;
use crate::keys::{self, KeyFileError};
use crate::nix::conf::NixConf;
use crate::nix::{PublicKey, SecretKey};
use crate::share::SharePolicy;
use crate::store::{Store, StoreError, StoreLocation};

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("{key}: {source}")]
    Key {
        key: &'static str,
        source: KeyFileError,
    },
    #[error("share.trusted_keys: {0}")]
    TrustedKey(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: String,
        source: std::io::Error,
    },
}

pub fn store_location(config: &Config) -> StoreLocation {
    let mut loc = StoreLocation::under_root(&config.store.root, &config.store.store_dir);
    loc.db = config.db_path();
    loc
}

pub fn signing_key(config: &Config) -> Result<Option<SecretKey>, AgentError> {
    config
        .signing_key_file
        .as_deref()
        .map(keys::read_secret_key)
        .transpose()
        .map_err(|source| AgentError::Key {
            key: "signing_key_file",
            source,
        })
}

/// Keys whose signatures make a path shareable: `share.trusted_keys`, or
/// what this host's Nix trusts.
pub fn trusted_keys(config: &Config) -> Result<Vec<PublicKey>, AgentError> {
    match &config.share.trusted_keys {
        Some(list) => list
            .iter()
            .map(|k| PublicKey::parse(k).map_err(|e| AgentError::TrustedKey(format!("{k:?}: {e}"))))
            .collect(),
        None => Ok(NixConf::load(&config.store.nix_conf)
            .trusted_public_keys()
            .iter()
            .filter_map(|k| match PublicKey::parse(k) {
                Ok(key) => Some(key),
                Err(e) => {
                    tracing::warn!(key = %k, error = %e, "ignoring a malformed key in nix.conf");
                    None
                }
            })
            .collect()),
    }
}

pub fn share_policy(config: &Config) -> Result<SharePolicy, AgentError> {
    Ok(SharePolicy {
        trusted_keys: trusted_keys(config)?,
        signing_key: signing_key(config)?,
        sign_local_builds: config.share.sign_local_builds.unwrap_or(true),
        content_addressed: config.share.content_addressed,
        all: config.share.all,
    })
}

async fn bind(key: &'static str, addr: std::net::SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Bind {
            key,
            addr: addr.to_string(),
            source,
        })
}

/// Runs the agent until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    let store = Store::open(store_location(&config))?;
    let policy = Arc::new(share_policy(&config)?);
    tracing::info!(
        store = %config.store.store_dir,
        db = %store.location().db.display(),
        trusted_keys = policy.trusted_keys.len(),
        signing = policy.signing_key.is_some(),
        "store opened"
    );
    let mut tasks = tokio::task::JoinSet::new();
    if config.http_cache.enable {
        let listener = bind("http_cache.listen", config.http_cache.listen).await?;
        tracing::info!(addr = %config.http_cache.listen, "serving this store as an HTTP binary cache");
        let cache = HttpCache::new(store.clone(), policy.clone(), config.http_cache.priority);
        let token = shutdown.clone();
        tasks.spawn(http::serve(
            listener,
            move |req, _peer| cache.clone().handle(req),
            token,
        ));
    }
    shutdown.cancelled().await;
    while tasks.join_next().await.is_some() {}
    Ok(())
}
