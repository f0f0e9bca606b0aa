//! The agent's configuration: one TOML file, every key documented once in
//! `config.example.toml`. Parsing only: turning keys and paths into live
//! objects happens in `settings`. Values with rules of their own are
//! checked as they are parsed (`checked`), so every error names the key and
//! the line the TOML parser found it on.

pub mod checked;
pub mod keys;
pub mod settings;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// Where `nixmesh agent` looks when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/nixmesh/config.toml";
pub use checked::{NodeKey, MAX_PREFETCH_MIB};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}: {key}: {message}")]
    Invalid {
        file: String,
        line: usize,
        key: String,
        message: String,
    },
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub state_dir: PathBuf,
    pub signing_key_file: Option<PathBuf>,
    pub store: StoreConfig,
    pub share: ShareConfig,
    pub http_cache: HttpCacheConfig,
    pub mesh: MeshConfig,
    pub admin: AdminConfig,
    pub substituter: SubstituterConfig,
    pub upstream: UpstreamConfig,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    #[serde(default, deserialize_with = "checked::upstream_caches")]
    pub caches: Option<Vec<String>>,
    #[serde(deserialize_with = "checked::upstream_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(deserialize_with = "checked::upstream_timeout_ms")]
    pub skip_ms: u64,
    #[serde(deserialize_with = "checked::upstream_timeout_ms")]
    pub stall_ms: u64,
    pub ca_file: Option<PathBuf>,
    #[serde(deserialize_with = "checked::spool_mib")]
    pub spool_mib: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            caches: None,
            timeout_ms: 5000,
            skip_ms: 30_000,
            stall_ms: 30_000,
            ca_file: None,
            spool_mib: 1024,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(deserialize_with = "checked::store_dir")]
    pub store_dir: String,
    pub root: PathBuf,
    pub db: Option<PathBuf>,
    pub nix_conf: PathBuf,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShareConfig {
    pub trusted_keys: Option<Vec<String>>,
    pub sign_local_builds: bool,
    pub content_addressed: bool,
    pub all: bool,
    #[serde(deserialize_with = "checked::nar_cache_mib")]
    pub nar_cache_mib: u64,
    #[serde(deserialize_with = "checked::packed_mib")]
    pub packed_mib: u64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpCacheConfig {
    pub enable: bool,
    pub listen: SocketAddr,
    pub priority: u32,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    pub enable: bool,
    pub listen: SocketAddr,
    pub name: Option<String>,
    pub mdns: bool,
    pub interfaces: Vec<String>,
    pub ipv6: bool,
    pub secret_file: Option<PathBuf>,
    pub allowed_peers: Option<Vec<NodeKey>>,
    pub static_peers: Vec<StaticPeer>,
    #[serde(deserialize_with = "checked::max_protocol")]
    pub max_protocol: u32,
    pub bulk_encryption: crate::mesh::plain_bulk::BulkEncryption,
    pub compression: crate::fetch::compression::Compression,
    #[serde(deserialize_with = "checked::stripe_from_mib")]
    pub stripe_from_mib: u64,
    /// Plain HTTP binary caches on the LAN (nix-serve, harmonia, nginx
    /// over a `nix copy --to file://` directory) asked in the same race as
    /// the agents.
    #[serde(deserialize_with = "checked::plain_caches")]
    pub plain_caches: Vec<String>,
    /// Also find such caches by mDNS (`_nix-serve._tcp`).
    pub browse_nix_serve: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticPeer {
    pub address: SocketAddr,
    pub key: NodeKey,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(deserialize_with = "checked::loopback")]
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SubstituterConfig {
    pub enable: bool,
    pub listen: SocketAddr,
    pub priority: u32,
    #[serde(deserialize_with = "checked::race_timeout_ms")]
    pub race_timeout_ms: u64,
    #[serde(deserialize_with = "checked::prefetch_mib")]
    pub prefetch_mib: u64,
    pub require_sigs: Option<bool>,
    pub trusted_keys: Option<Vec<String>>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            enable: true,
            listen: SocketAddr::from(([0u16; 8], 5182)),
            name: None,
            mdns: true,
            interfaces: Vec::new(),
            ipv6: true,
            secret_file: None,
            allowed_peers: None,
            static_peers: Vec::new(),
            max_protocol: crate::mesh::protocol::NEWEST,
            bulk_encryption: crate::mesh::plain_bulk::BulkEncryption::Auto,
            compression: crate::fetch::compression::Compression::Auto,
            stripe_from_mib: 32,
            plain_caches: Vec::new(),
            browse_nix_serve: true,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 5183)),
        }
    }
}

impl Default for SubstituterConfig {
    fn default() -> Self {
        Self {
            enable: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 5181)),
            priority: 30,
            race_timeout_ms: 400,
            prefetch_mib: 64,
            require_sigs: None,
            trusted_keys: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/nixmesh"),
            signing_key_file: None,
            store: StoreConfig::default(),
            share: ShareConfig::default(),
            http_cache: HttpCacheConfig::default(),
            mesh: MeshConfig::default(),
            admin: AdminConfig::default(),
            substituter: SubstituterConfig::default(),
            upstream: UpstreamConfig::default(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            store_dir: "/nix/store".into(),
            root: PathBuf::from("/"),
            db: None,
            nix_conf: PathBuf::from("/etc/nix/nix.conf"),
        }
    }
}

impl Default for ShareConfig {
    fn default() -> Self {
        Self {
            trusted_keys: None,
            sign_local_builds: true,
            content_addressed: false,
            all: false,
            nar_cache_mib: 1024,
            packed_mib: 1024,
        }
    }
}

impl Default for HttpCacheConfig {
    fn default() -> Self {
        Self {
            enable: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 5180)),
            priority: 45,
        }
    }
}

impl Config {
    /// Parses `text`; `file` only names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(1);
            ConfigError::Invalid {
                file: file.to_string(),
                line,
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message: inner.message().to_string(),
            }
        })?;
        Ok(config)
    }

    /// Reads `path`, or the default file when it exists, or the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_PATH).exists() => PathBuf::from(DEFAULT_PATH),
            None => return Ok(Self::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// The store DB: `store.db`, else the standard place under `store.root`.
    pub fn db_path(&self) -> PathBuf {
        self.store
            .db
            .clone()
            .unwrap_or_else(|| self.store.root.join("nix/var/nix/db/db.sqlite"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_loads_and_shows_the_defaults() {
        let text = include_str!("../../config.example.toml");
        let parsed = Config::parse("config.example.toml", text).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::parse("x", "").unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = Config::parse("c.toml", "[http_cache]\nenable = true\nlisen = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml:3: http_cache"), "{err}");
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let err = Config::parse("c.toml", "\n[http_cache]\nlisten = \"nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml:3: http_cache.listen:"), "{err}");
    }

    #[test]
    fn semantic_check_names_key_and_line() {
        let err = Config::parse("c.toml", "[store]\n\nstore_dir = \"nix/store/\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml:3: store.store_dir:"), "{err}");
    }

    #[test]
    fn bad_peer_key_names_key_and_line() {
        let text =
            "[mesh]\nstatic_peers = [\n  { address = \"10.0.0.1:5182\", key = \"short\" },\n]\n";
        let err = Config::parse("c.toml", text).unwrap_err().to_string();
        assert!(
            err.starts_with("c.toml:3: mesh.static_peers[0].key:"),
            "{err}"
        );
    }

    #[test]
    fn admin_must_stay_on_loopback() {
        let err = Config::parse("c.toml", "[admin]\nlisten = \"0.0.0.0:5183\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml:2: admin.listen:"), "{err}");
    }

    #[test]
    fn syntax_error_has_a_line() {
        let err = Config::parse("c.toml", "a = 1\n[store\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml:2:"), "{err}");
    }

    #[test]
    fn a_bad_list_entry_names_its_own_line() {
        let good = "nixmesh-node:".to_string() + &"A".repeat(43) + "=";
        let text = format!(
            "# keys must not be short\n[mesh]\nallowed_peers = [\n  {good:?},\n  \"short\",\n]\n"
        );
        let err = Config::parse("c.toml", &text).unwrap_err().to_string();
        assert!(err.starts_with("c.toml:5: mesh.allowed_peers[1]:"), "{err}");
    }

    #[test]
    fn limits_name_key_and_line() {
        for (text, want) in [
            (
                "[substituter]\nrace_timeout_ms = 0\n",
                "c.toml:2: substituter.race_timeout_ms:",
            ),
            (
                "\n[substituter]\nprefetch_mib = 99999\n",
                "c.toml:3: substituter.prefetch_mib:",
            ),
        ] {
            let err = Config::parse("c.toml", text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err}");
        }
    }
}
