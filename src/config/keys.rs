//! Key files on disk: Nix-format signing keys (as `nix-store
//! --generate-binary-cache-key` writes them) and this node's identity key,
//! made on first start and kept in the state dir with mode 0600. File I/O
//! only; the key formats themselves live in `nix::signature`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::nix::signature::KeyError;
use crate::nix::{PublicKey, SecretKey};

pub const NODE_KEY_FILE: &str = "node.key";
pub const NODE_KEY_NAME: &str = "nixmesh-node";

#[derive(Debug, Error)]
pub enum KeyFileError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Format { path: String, source: KeyError },
    #[error("{path} is readable by other users (mode {mode:o}); chmod 600 it")]
    TooOpen { path: String, mode: u32 },
    #[error("no random source: {0}")]
    Random(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub fn read_secret_key(path: &Path) -> Result<SecretKey, KeyFileError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    SecretKey::parse(&text).map_err(|source| KeyFileError::Format {
        path: path.display().to_string(),
        source,
    })
}

pub fn read_public_key(path: &Path) -> Result<PublicKey, KeyFileError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    PublicKey::parse(&text).map_err(|source| KeyFileError::Format {
        path: path.display().to_string(),
        source,
    })
}

/// Writes `text` to a new file with `mode`; an existing file is an error,
/// so a key is never overwritten by accident.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), KeyFileError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    file.write_all(text.as_bytes()).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// Makes a signing key pair in Nix's format: the secret file mode 0600.
pub fn generate_pair(
    name: &str,
    secret_path: &Path,
    public_path: &Path,
) -> Result<SecretKey, KeyFileError> {
    let key = SecretKey::generate(name).map_err(|e| KeyFileError::Random(e.to_string()))?;
    write_new(secret_path, &key.to_nix_string(), 0o600)?;
    write_new(public_path, &key.public().to_nix_string(), 0o644)?;
    Ok(key)
}

pub fn node_key_path(state_dir: &Path) -> PathBuf {
    state_dir.join(NODE_KEY_FILE)
}

/// This node's identity key: loaded from the state dir, or made there on
/// first start.
pub fn load_or_create_node_key(state_dir: &Path) -> Result<SecretKey, KeyFileError> {
    let path = node_key_path(state_dir);
    if path.exists() {
        let mode = fs::metadata(&path).map_err(io(&path))?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::TooOpen {
                path: path.display().to_string(),
                mode,
            });
        }
        return read_secret_key(&path);
    }
    fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    let key =
        SecretKey::generate(NODE_KEY_NAME).map_err(|e| KeyFileError::Random(e.to_string()))?;
    write_new(&path, &key.to_nix_string(), 0o600)?;
    tracing::info!(path = %path.display(), key = %key.public().to_nix_string(), "made a new node key");
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_key_is_made_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_node_key(dir.path()).unwrap();
        let mode = fs::metadata(node_key_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = load_or_create_node_key(dir.path()).unwrap();
        assert_eq!(a.public(), b.public());
    }

    #[test]
    fn world_readable_node_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create_node_key(dir.path()).unwrap();
        let path = node_key_path(dir.path());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create_node_key(dir.path()),
            Err(KeyFileError::TooOpen { .. })
        ));
    }

    #[test]
    fn generated_pair_loads_back_and_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let (s, p) = (dir.path().join("sk"), dir.path().join("pk"));
        let key = generate_pair("office-1", &s, &p).unwrap();
        assert_eq!(read_secret_key(&s).unwrap().public(), key.public());
        assert_eq!(read_public_key(&p).unwrap(), key.public());
        assert!(generate_pair("office-1", &s, &p).is_err());
    }
}
