//! Plain bulk connections (protocol version 8): in an open mesh, a bulk
//! connection carries its `NarChunks` request and the chunk frames that
//! answer it on TCP without TLS.
//!
//! Why that gives nothing away: in an open mesh (no `mesh.secret_file`,
//! no `mesh.allowed_peers`) any agent on the LAN is admitted and may ask
//! any holder for any NAR it shares, so encrypting the bytes hides only
//! which NARs a host fetched. Their integrity never rested on TLS: the
//! asker checks every NAR against the NarHash of its narinfo, which comes
//! over the QUIC connection (TLS, the holder's key pinned), and Nix checks
//! the narinfo as it checks any cache's. A byte changed on the wire is
//! caught as a lying holder's is, so a host on the path can make a NAR
//! fail (as dropping its packets can), never get a wrong byte into a
//! store. Nor can it get an honest holder quarantined: bytes that came in
//! the clear and fail their check move the holder's bulk connections under
//! TLS for `DISTRUST` (`Mesh::blame`; the readers note which parts came
//! so), and only bytes that fail under TLS quarantine a holder.
//! AES-GCM cost the two agents 0.67 of their 3.05 CPU-seconds per GiB in
//! session 33's profile (docs/benchmarks.md).
//!
//! An agent takes and makes plain bulk connections only with
//! `mesh.bulk_encryption = "auto"` (the default) in an open mesh. A closed
//! mesh's NARs are for its members only, so there bulk connections stay
//! under TLS, and a holder refuses a plain one with `code::PLAIN_REFUSED`
//! (after reading its request, so the asker reads the refusal rather than
//! a reset); its asker then dials it under TLS.
//!
//! The connection opens with `PREAMBLE_LEN` bytes: `MAGIC`, then the
//! asker's node key. TLS opens with a handshake record (first byte 0x16),
//! so a holder tells the two apart by the first byte. The key is the
//! asker's word only: the holder uses it to count what it served to whom,
//! never to admit.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::mesh::bulk::{BulkError, HANDSHAKE_TIMEOUT, READ_BUFFER};
use crate::mesh::identity::NodeId;
use crate::mesh::nar_reader::BulkStream;
use crate::mesh::protocol::{self, Response};
use crate::mesh::transport::{self, Admission};

/// What a plain bulk connection opens with (its first byte is not TLS's
/// 0x16).
pub const MAGIC: &[u8; 16] = b"nixmesh-plain/8\n";
/// `MAGIC` and the asker's node key.
pub const PREAMBLE_LEN: usize = MAGIC.len() + 32;
/// The first protocol version with plain bulk connections.
pub const FROM_VERSION: u32 = 8;
/// How long an asker dials a holder under TLS after bytes from it failed
/// their check while they came in the clear.
pub const DISTRUST: Duration = Duration::from_secs(3600);

/// `mesh.bulk_encryption`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BulkEncryption {
    /// TLS in a closed mesh; none between agents of version 8 in an open
    /// one.
    #[default]
    Auto,
    /// TLS on every bulk connection.
    Always,
}

/// Whether this agent takes and makes plain bulk connections.
pub fn allowed(setting: BulkEncryption, admission: &Admission) -> bool {
    setting == BulkEncryption::Auto
        && !admission.mesh.is_set()
        && admission.allowed.is_none()
        && admission.max_protocol >= FROM_VERSION
}

/// What an asker opens a plain connection with.
pub fn preamble(asker: &NodeId) -> [u8; PREAMBLE_LEN] {
    let mut out = [0u8; PREAMBLE_LEN];
    out[..MAGIC.len()].copy_from_slice(MAGIC);
    out[MAGIC.len()..].copy_from_slice(&asker.0);
    out
}

/// The asker's node key, from a connection's first `PREAMBLE_LEN` bytes;
/// `None` if they do not open with `MAGIC`.
pub fn asker_of(preamble: &[u8; PREAMBLE_LEN]) -> Option<NodeId> {
    let (magic, key) = preamble.split_at(MAGIC.len());
    if magic != MAGIC {
        return None;
    }
    Some(NodeId(key.try_into().ok()?))
}

/// Whether a connection whose first byte is `first` opens as a plain one.
pub fn opens_plain(first: u8) -> bool {
    first == MAGIC[0]
}

/// Opens a plain bulk connection to `addr` as `asker`, within
/// `HANDSHAKE_TIMEOUT`, reading through a buffer as a TLS one does.
pub async fn dial(addr: SocketAddr, asker: &NodeId) -> Result<BulkStream, BulkError> {
    let timeout = HANDSHAKE_TIMEOUT;
    let connect = async {
        let mut tcp = TcpStream::connect(addr).await.map_err(BulkError::Connect)?;
        let _ = tcp.set_nodelay(true);
        tcp.write_all(&preamble(asker))
            .await
            .map_err(BulkError::Write)?;
        Ok::<_, BulkError>(tcp)
    };
    let tcp = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| BulkError::Timeout(timeout))??;
    Ok(Box::new(BufReader::with_capacity(READ_BUFFER, tcp)))
}

/// Reads a plain connection's preamble (its first byte already seen) by
/// `deadline` and returns the asker's word for who it is; `None` for a
/// wrong preamble, or none in time.
pub async fn accept(tcp: &mut TcpStream, deadline: tokio::time::Instant) -> Option<NodeId> {
    let mut preamble = [0u8; PREAMBLE_LEN];
    match tokio::time::timeout_at(deadline, tcp.read_exact(&mut preamble)).await {
        Ok(Ok(_)) => asker_of(&preamble),
        _ => None,
    }
}

/// Answers a plain connection's request with `code::PLAIN_REFUSED` (this
/// holder keeps TLS), all by `deadline`. The request is read first, so
/// that closing does not reset the connection before the asker reads the
/// answer.
pub async fn refuse(mut tcp: TcpStream, deadline: tokio::time::Instant) {
    let _ = tokio::time::timeout_at(
        deadline,
        transport::read_frame_from(&mut tcp, protocol::MAX_REQUEST_FRAME, HANDSHAKE_TIMEOUT),
    )
    .await;
    let refusal = Response::Error {
        code: protocol::code::PLAIN_REFUSED,
        message: "this agent takes bulk connections under TLS only".into(),
    };
    let _ = tokio::time::timeout_at(deadline, tcp.write_all(&refusal.encode())).await;
    let _ = tcp.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::identity::MeshSecret;

    #[test]
    fn a_preamble_names_its_asker_and_anything_else_names_nobody() {
        let node = NodeId([42; 32]);
        let p = preamble(&node);
        assert_eq!(asker_of(&p), Some(node));
        assert!(opens_plain(p[0]));
        // A TLS handshake record never opens as a plain connection.
        assert!(!opens_plain(0x16));
        let mut other = p;
        other[3] ^= 1;
        assert_eq!(asker_of(&other), None);
    }

    #[test]
    fn only_an_open_mesh_of_version_8_with_auto_goes_without_tls() {
        let open = Admission::default();
        assert!(allowed(BulkEncryption::Auto, &open));
        assert!(!allowed(BulkEncryption::Always, &open));
        let secret = Admission {
            mesh: MeshSecret::new(Some(b"office".to_vec())),
            ..Admission::default()
        };
        assert!(!allowed(BulkEncryption::Auto, &secret));
        let listed = Admission {
            allowed: Some(vec![NodeId([1; 32])]),
            ..Admission::default()
        };
        assert!(!allowed(BulkEncryption::Auto, &listed));
        let older = Admission {
            max_protocol: FROM_VERSION - 1,
            ..Admission::default()
        };
        assert!(!allowed(BulkEncryption::Auto, &older));
    }

    #[test]
    fn the_setting_reads_as_a_word() {
        #[derive(Deserialize)]
        struct S {
            e: BulkEncryption,
        }
        let read = |t: &str| toml::from_str::<S>(t).map(|s| s.e);
        assert_eq!(read("e = \"auto\"").ok(), Some(BulkEncryption::Auto));
        assert_eq!(read("e = \"always\"").ok(), Some(BulkEncryption::Always));
        let err = read("e = \"never\"").err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("`auto`") && e.contains("`always`")),
            "{err:?}"
        );
    }
}
