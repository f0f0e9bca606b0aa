//! Who a node is and which mesh it belongs to. A node is its ed25519 public
//! key; a mesh is its shared secret. Pure derivations only: the mesh id that
//! discovery announces, and the per-node admission tag that the TLS
//! certificate carries so a node without the secret is refused at the
//! handshake.

use std::fmt;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::nix::base16;

/// Longest node name (a host name, carried in mDNS TXT records and in
/// pongs): a DNS label's limit.
pub const MAX_NODE_NAME: usize = 63;

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A node's ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        // Accept a Nix-style `name:base64` public key as well as bare base64.
        let b64 = text.rsplit_once(':').map_or(text, |(_, k)| k);
        let bytes = BASE64.decode(b64).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    /// Short, stable, readable: the first 16 hex digits of SHA-256(key).
    pub fn fingerprint(&self) -> String {
        base16::encode(&Sha256::digest(self.0)[..8])
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.fingerprint())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

/// The shared secret of one mesh, or none for an open mesh.
#[derive(Clone, Default)]
pub struct MeshSecret(Option<Vec<u8>>);

impl MeshSecret {
    pub fn new(secret: Option<Vec<u8>>) -> Self {
        Self(secret.filter(|s| !s.is_empty()))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// What discovery announces so two meshes on one LAN do not mix. It
    /// reveals nothing about the secret.
    pub fn mesh_id(&self) -> String {
        match &self.0 {
            None => "open".to_string(),
            Some(s) => {
                let mut h = Sha256::new();
                h.update(b"nixmesh mesh id\0");
                h.update(s);
                base16::encode(&h.finalize()[..8])
            }
        }
    }

    /// Proof that the holder of `node`'s key knew the secret: bound to the key,
    /// so copying another node's tag is useless without that node's key.
    pub fn admission_tag(&self, node: &NodeId) -> Option<String> {
        let secret = self.0.as_ref()?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).ok()?;
        mac.update(b"nixmesh admission\0");
        mac.update(&node.0);
        Some(base16::encode(&mac.finalize().into_bytes()[..16]))
    }

    /// The DNS name the certificate of `node` carries in this mesh.
    pub fn admission_name(&self, node: &NodeId) -> Option<String> {
        self.admission_tag(node)
            .map(|t| format!("{t}.mesh.nixmesh"))
    }
}

impl fmt::Debug for MeshSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MeshSecret({})",
            if self.is_set() { "set" } else { "open" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_ids_differ_by_secret_and_hide_it() {
        let a = MeshSecret::new(Some(b"alpha".to_vec()));
        let b = MeshSecret::new(Some(b"beta".to_vec()));
        assert_ne!(a.mesh_id(), b.mesh_id());
        assert_eq!(MeshSecret::new(None).mesh_id(), "open");
        assert_eq!(MeshSecret::new(Some(vec![])).mesh_id(), "open");
        assert!(!a.mesh_id().contains("alpha"));
    }

    #[test]
    fn admission_tag_is_bound_to_key_and_secret() {
        let a = MeshSecret::new(Some(b"alpha".to_vec()));
        let b = MeshSecret::new(Some(b"beta".to_vec()));
        let (n1, n2) = (NodeId([1; 32]), NodeId([2; 32]));
        assert_ne!(a.admission_tag(&n1), a.admission_tag(&n2));
        assert_ne!(a.admission_tag(&n1), b.admission_tag(&n1));
        assert_eq!(MeshSecret::new(None).admission_tag(&n1), None);
    }

    #[test]
    fn node_id_parses_bare_and_nix_style() {
        let id = NodeId([7; 32]);
        assert_eq!(NodeId::parse(&id.to_base64()), Some(id));
        assert_eq!(
            NodeId::parse(&format!("nixmesh-node:{}", id.to_base64())),
            Some(id)
        );
        assert_eq!(NodeId::parse("AAAA"), None);
        assert_eq!(NodeId::parse("!!"), None);
    }
}
