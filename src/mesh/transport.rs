//! QUIC between agents: the TLS 1.3 identity made from the node key, the
//! verifiers that pin the key each side expects and enforce admission
//! (mesh secret, `allowed_peers`), the QUIC settings, and reading frames
//! off streams with a limit. Knows nothing of what the frames mean.

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::pkcs8::EncodePrivateKey;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use thiserror::Error;

use crate::mesh::identity::{MeshSecret, NodeId};
use crate::mesh::protocol::{self, FrameError};
use crate::nix::SecretKey;

/// The server name clients ask for; identity is checked by key, not name.
pub const SERVER_NAME: &str = "nixmesh";
/// A connection with no traffic for this long is dead. Keep-alives go out
/// well before it, so only a vanished peer reaches it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
pub const KEEP_ALIVE: Duration = Duration::from_millis(1000);
pub const INITIAL_RTT: Duration = Duration::from_millis(100);
/// Concurrent requests a peer may have open on one connection.
pub const MAX_STREAMS_PER_PEER: u32 = 128;
/// A request frame must arrive within this after its stream opened.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key
/// bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("making the TLS certificate: {0}")]
    Certificate(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("QUIC configuration: {0}")]
    Quic(String),
}

#[derive(Debug, Error)]
pub enum FrameReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream read failed: {0}")]
    Read(String),
    #[error("stream reset by the peer with code {0}")]
    Reset(u32),
    #[error("no frame within {0:?}")]
    Timeout(Duration),
}

impl FrameReadError {
    pub fn code(&self) -> u32 {
        match self {
            FrameReadError::Frame(f) => f.code(),
            FrameReadError::Read(_) | FrameReadError::Reset(_) => protocol::code::MALFORMED,
            FrameReadError::Timeout(_) => protocol::code::TIMEOUT,
        }
    }
}

/// Who may talk to this node.
#[derive(Clone, Debug)]
pub struct Admission {
    pub mesh: MeshSecret,
    /// When set, only these keys are admitted.
    pub allowed: Option<Vec<NodeId>>,
    /// The newest protocol version offered and accepted (`mesh.max_protocol`).
    pub max_protocol: u32,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            mesh: MeshSecret::default(),
            allowed: None,
            max_protocol: protocol::NEWEST,
        }
    }
}

impl Admission {
    /// The ALPNs this node offers and accepts, newest first.
    fn alpns(&self) -> Vec<Vec<u8>> {
        let oldest = protocol::ALPNS.len() as u32;
        protocol::ALPNS
            .iter()
            .enumerate()
            .filter(|(i, _)| oldest - (*i as u32) <= self.max_protocol.max(1))
            .map(|(_, p)| p.to_vec())
            .collect()
    }
}

impl Admission {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<NodeId, rustls::Error> {
        let node = node_of_cert(cert)?;
        if let Some(allowed) = &self.allowed {
            if !allowed.contains(&node) {
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ));
            }
        }
        if let Some(name) = self.mesh.admission_name(&node) {
            let parsed = webpki::EndEntityCert::try_from(cert)
                .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
            let name = ServerName::try_from(name)
                .map_err(|_| rustls::Error::General("bad admission name".into()))?;
            parsed
                .verify_is_valid_for_subject_name(&name)
                .map_err(|_| {
                    rustls::Error::InvalidCertificate(
                        CertificateError::ApplicationVerificationFailure,
                    )
                })?;
        }
        Ok(node)
    }
}

/// The node key behind an end-entity certificate, which must be Ed25519.
pub fn node_of_cert(cert: &CertificateDer<'_>) -> Result<NodeId, rustls::Error> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let spki = parsed.subject_public_key_info();
    let spki = spki.as_ref();
    if spki.len() != ED25519_SPKI_PREFIX.len() + 32 || spki[..12] != ED25519_SPKI_PREFIX {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ));
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&spki[12..]);
    Ok(NodeId(key))
}

/// This node's certificate and key for TLS.
pub struct TlsIdentity {
    pub node: NodeId,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl TlsIdentity {
    pub fn new(key: &SecretKey, mesh: &MeshSecret) -> Result<Self, TransportError> {
        let cert_err = |e: String| TransportError::Certificate(e);
        let signing = ed25519_dalek::SigningKey::from_bytes(&key.seed());
        let node = NodeId(signing.verifying_key().to_bytes());
        let pkcs8 = signing
            .to_pkcs8_der()
            .map_err(|e| cert_err(e.to_string()))?;
        let key_pair =
            rcgen::KeyPair::try_from(pkcs8.as_bytes()).map_err(|e| cert_err(e.to_string()))?;
        let mut names = vec![SERVER_NAME.to_string()];
        names.extend(mesh.admission_name(&node));
        let mut params =
            rcgen::CertificateParams::new(names).map_err(|e| cert_err(e.to_string()))?;
        // A serial number of its own for each run of the agent: peers check
        // only the key, but a peer that sees a connection with another
        // certificate than the one it holds knows this node restarted
        // (`same_run`), and drops the old connection at once.
        let mut serial = [0u8; 16];
        getrandom::getrandom(&mut serial).map_err(|e| cert_err(e.to_string()))?;
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params
            .self_signed(&key_pair)
            .map_err(|e| cert_err(e.to_string()))?;
        Ok(Self {
            node,
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec()),
        })
    }

    fn chain(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            vec![self.cert.clone()],
            PrivateKeyDer::Pkcs8(self.key.clone_key()),
        )
    }
}

/// ring's suites with AES-128-GCM first (ring lists AES-256-GCM first).
/// Every NAR byte between agents is sealed by the holder and opened by the
/// asker; AES-128-GCM does it for about four fifths of AES-256-GCM's CPU
/// (0.121 against 0.154 s/GiB on this project's test machine), and it is
/// TLS 1.3's mandatory suite. A dialler's order decides, so an older agent
/// that offers AES-256-GCM first still gets it.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// QUIC is TLS 1.3 only; a TLS 1.2 signature never comes, and is refused.
const TLS12_REFUSED: rustls::Error =
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic);
/// Node keys are Ed25519, so that is the one scheme either side accepts.
const SCHEMES: [SignatureScheme; 1] = [SignatureScheme::ED25519];

#[derive(Debug)]
struct PeerVerifier {
    admission: Admission,
    /// The key discovery or config named for the peer we dial.
    expected: Option<NodeId>,
    provider: Arc<CryptoProvider>,
}

impl PeerVerifier {
    fn verify(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let node = self.admission.check(cert)?;
        match self.expected {
            Some(want) if want != node => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(()),
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(TLS12_REFUSED)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(TLS12_REFUSED)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

/// Which end of a connection a config is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Dialler,
    Acceptor,
}

/// Only the dialling end sends keep-alives: each is acknowledged, so both
/// ends hear from the other about once per `KEEP_ALIVE` (which is what the
/// health check looks for), at half the packets and wake-ups of both ends
/// sending their own. An older agent still sends its own either way.
pub fn transport_config(role: Role) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval((role == Role::Dialler).then_some(KEEP_ALIVE));
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    // A LAN's round trip is a few ms, not the 333 ms QUIC assumes before
    // it has measured one: a lost handshake packet is sent again after
    // about 3 x this, well inside `DIAL_TIMEOUT`, not after a second.
    t.initial_rtt(INITIAL_RTT);
    t.max_concurrent_bidi_streams(MAX_STREAMS_PER_PEER.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Room for a LAN's bandwidth-delay product on bulk NAR streams (10
    // Gbit/s over a 4 ms round trip is 5 MB); what a stream may hold
    // unread is memory the receiving agent spends when Nix reads slower.
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    // Each QUIC packet costs both agents about the same CPU whatever its
    // size, so on a LAN with jumbo frames MTU discovery may go up to what
    // the interfaces carry (quinn stops at 1452 unless told).
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(link_payload());
    t.mtu_discovery_config(Some(mtu));
    t
}

/// Bytes of IPv6 and UDP header in a datagram (IPv4's are fewer).
const UDP_OVERHEAD: u32 = 48;
/// Jumbo frames; larger MTUs (loopback's 64 KiB) are not LANs.
const MAX_LAN_MTU: u32 = 9000;
/// quinn hands the kernel up to 10 datagrams in one segmented send (GSO),
/// which may not exceed 64 KiB in all; a batch over that is dropped
/// whole, which MTU discovery then takes for a black hole. So at most a
/// tenth of that per datagram: 6548 bytes (still 4.5 times 1452).
const MAX_PAYLOAD: u16 = ((65_535 - UDP_OVERHEAD) / 10) as u16;
/// Ethernet's payload less headers: quinn's own limit.
const ETHERNET_PAYLOAD: u16 = 1452;

/// The largest UDP payload worth trying on a LAN whose up, non-loopback
/// interfaces have `mtus`: that of the largest, within Ethernet (1500)
/// and jumbo frames (9000), and no more than `MAX_PAYLOAD`. Pure.
pub fn payload_limit(mtus: impl IntoIterator<Item = u32>) -> u16 {
    let largest = mtus
        .into_iter()
        .filter(|&m| m <= MAX_LAN_MTU)
        .max()
        .map(|m| m.saturating_sub(UDP_OVERHEAD));
    match largest {
        Some(p) => (p as u16).clamp(ETHERNET_PAYLOAD, MAX_PAYLOAD),
        None => ETHERNET_PAYLOAD,
    }
}

/// `payload_limit` of this machine's interfaces, read once.
pub fn link_payload() -> u16 {
    static LIMIT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| payload_limit(interface_mtus()))
}

/// The MTUs of the interfaces that are up, loopback left out.
fn interface_mtus() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let read = |path: std::path::PathBuf| std::fs::read_to_string(path).unwrap_or_default();
    dir.flatten()
        .filter(|e| e.file_name() != "lo")
        .filter(|e| read(e.path().join("operstate")).trim() != "down")
        .filter_map(|e| read(e.path().join("mtu")).trim().parse().ok())
        .collect()
}

/// The TLS side of this node as a server: its certificate, and every
/// client checked against `admission`.
fn server_tls(
    identity: &TlsIdentity,
    admission: Admission,
    alpns: Vec<Vec<u8>>,
) -> Result<rustls::ServerConfig, TransportError> {
    let provider = provider();
    let verifier = Arc::new(PeerVerifier {
        admission,
        expected: None,
        provider: provider.clone(),
    });
    let (chain, key) = identity.chain();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = alpns;
    Ok(tls)
}

/// The TLS side of this node dialling `expected`, whose key it pins.
fn client_tls(
    identity: &TlsIdentity,
    admission: Admission,
    expected: NodeId,
    alpns: Vec<Vec<u8>>,
) -> Result<rustls::ClientConfig, TransportError> {
    client_tls_with(provider(), identity, admission, expected, alpns)
}

fn client_tls_with(
    provider: Arc<CryptoProvider>,
    identity: &TlsIdentity,
    admission: Admission,
    expected: NodeId,
    alpns: Vec<Vec<u8>>,
) -> Result<rustls::ClientConfig, TransportError> {
    let verifier = Arc::new(PeerVerifier {
        admission,
        expected: Some(expected),
        provider: provider.clone(),
    });
    let (chain, key) = identity.chain();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = alpns;
    Ok(tls)
}

pub fn server_config(
    identity: &TlsIdentity,
    admission: Admission,
) -> Result<quinn::ServerConfig, TransportError> {
    let alpns = admission.alpns();
    let tls = server_tls(identity, admission, alpns)?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport_config(Role::Acceptor)));
    Ok(config)
}

/// Client settings for dialling the node `expected`.
pub fn client_config(
    identity: &TlsIdentity,
    admission: Admission,
    expected: NodeId,
) -> Result<quinn::ClientConfig, TransportError> {
    let alpns = admission.alpns();
    let tls = client_tls(identity, admission, expected, alpns)?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config(Role::Dialler)));
    Ok(config)
}

/// TLS settings for accepting bulk connections (TCP, version 5): the same
/// identity and admission as QUIC, ALPN `protocol::ALPN_BULK`.
pub fn bulk_server_config(
    identity: &TlsIdentity,
    admission: Admission,
) -> Result<Arc<rustls::ServerConfig>, TransportError> {
    let tls = server_tls(identity, admission, vec![protocol::ALPN_BULK.to_vec()])?;
    Ok(Arc::new(tls))
}

/// TLS settings for a bulk connection to the node `expected`.
pub fn bulk_client_config(
    identity: &TlsIdentity,
    admission: Admission,
    expected: NodeId,
) -> Result<Arc<rustls::ClientConfig>, TransportError> {
    let tls = client_tls(
        identity,
        admission,
        expected,
        vec![protocol::ALPN_BULK.to_vec()],
    )?;
    Ok(Arc::new(tls))
}

/// The key the other side of an established connection proved it holds.
fn read_error(e: quinn::ReadExactError) -> FrameReadError {
    if let quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code)) = &e {
        if let Ok(code) = u32::try_from(code.into_inner()) {
            return FrameReadError::Reset(code);
        }
    }
    FrameReadError::Read(e.to_string())
}

/// The protocol version the connection settled on (1 if it cannot tell).
pub fn version(conn: &quinn::Connection) -> u32 {
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    let oldest = protocol::ALPNS.len() as u32;
    alpn.and_then(|p| protocol::ALPNS.iter().position(|a| *a == p.as_slice()))
        .map_or(1, |i| oldest - i as u32)
}

/// Whether the connection settled on protocol version 2 (or later).
pub fn speaks_v2(conn: &quinn::Connection) -> bool {
    version(conn) >= 2
}

/// Whether two connections come from the same run of the peer's agent:
/// each run presents a certificate with its own serial number.
pub fn same_run(a: &quinn::Connection, b: &quinn::Connection) -> bool {
    let cert = |c: &quinn::Connection| {
        c.peer_identity()?
            .downcast::<Vec<CertificateDer<'static>>>()
            .ok()?
            .first()
            .cloned()
    };
    match (cert(a), cert(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

pub fn peer_node(conn: &quinn::Connection) -> Option<NodeId> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    node_of_cert(certs.first()?).ok()
}

/// Reads one length-prefixed frame body of at most `max` bytes, bounded in
/// time.
///
/// A stream the peer reset keeps its code (`FrameReadError::Reset`): a
/// holder that finds its own copy corrupt may reset before its answer.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
    timeout: Duration,
) -> Result<Vec<u8>, FrameReadError> {
    let read = async {
        let mut header = [0u8; 4];
        recv.read_exact(&mut header).await.map_err(read_error)?;
        let len = protocol::body_len(header, max)?;
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await.map_err(read_error)?;
        Ok(body)
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| FrameReadError::Timeout(timeout))?
}

/// `read_frame` off a byte stream (a bulk connection): one frame body of
/// at most `max` bytes, bounded in time.
pub async fn read_frame_from<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    timeout: Duration,
) -> Result<Vec<u8>, FrameReadError> {
    use tokio::io::AsyncReadExt;
    let read = async {
        let failed = |e: std::io::Error| FrameReadError::Read(e.to_string());
        let mut header = [0u8; 4];
        r.read_exact(&mut header).await.map_err(failed)?;
        let len = protocol::body_len(header, max)?;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await.map_err(failed)?;
        Ok(body)
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| FrameReadError::Timeout(timeout))?
}

/// Resets both halves of a stream with `code`.
pub fn reset_stream(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, code: u32) {
    let _ = send.reset(code.into());
    let _ = recv.stop(code.into());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_limit_follows_the_lan_not_loopback() {
        assert_eq!(payload_limit([]), 1452);
        assert_eq!(payload_limit([1500]), 1452);
        assert_eq!(payload_limit([1500, 9000]), 6548);
        assert_eq!(payload_limit([4000]), 3952);
        assert_eq!(
            payload_limit([65536]),
            1452,
            "loopback-sized MTUs are no LAN"
        );
        assert_eq!(
            payload_limit([1280]),
            1452,
            "never below what quinn does anyway"
        );
    }

    /// What `from` has to send, read by `to`.
    fn fly(from: &mut rustls::Connection, to: &mut rustls::Connection) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).expect("writes");
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).expect("reads");
            to.process_new_packets().expect("accepts");
        }
    }

    /// Runs a TLS handshake between two configs in memory; the client's
    /// end of it.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> rustls::Connection {
        let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).expect("name");
        let mut c = rustls::ClientConnection::new(client, name)
            .expect("client")
            .into();
        let mut s = rustls::ServerConnection::new(server)
            .expect("server")
            .into();
        for _ in 0..10 {
            fly(&mut c, &mut s);
            fly(&mut s, &mut c);
            if !c.is_handshaking() && !s.is_handshaking() {
                return c;
            }
        }
        panic!("no handshake within 10 flights");
    }

    #[test]
    fn agents_seal_with_aes_128_gcm_unless_the_dialler_prefers_another() {
        // The bulk configs here; QUIC's come from the same `provider`.
        let seed = |b: u8| SecretKey::from_seed("node", [b; 32]);
        let (near, far) = (seed(1), seed(2));
        let mesh = MeshSecret::default();
        let near_id = TlsIdentity::new(&near, &mesh).expect("identity");
        let far_id = TlsIdentity::new(&far, &mesh).expect("identity");
        let server = bulk_server_config(&far_id, Admission::default()).expect("server");
        let client =
            bulk_client_config(&near_id, Admission::default(), far_id.node).expect("client");
        let c = handshake(client, server.clone());
        let suite = |c: &rustls::Connection| c.negotiated_cipher_suite().map(|s| s.suite());
        assert_eq!(
            suite(&c),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        // A dialler of an older version, with ring's own order.
        let older = client_tls_with(
            Arc::new(rustls::crypto::ring::default_provider()),
            &near_id,
            Admission::default(),
            far_id.node,
            vec![protocol::ALPN_BULK.to_vec()],
        )
        .expect("client");
        let c = handshake(Arc::new(older), server);
        assert_eq!(
            suite(&c),
            Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384)
        );
    }

    #[test]
    fn an_agent_offers_every_version_up_to_its_newest() {
        let newest = Admission::default();
        assert_eq!(
            newest.alpns(),
            vec![
                protocol::ALPN_V8.to_vec(),
                protocol::ALPN_V7.to_vec(),
                protocol::ALPN_V6.to_vec(),
                protocol::ALPN_V5.to_vec(),
                protocol::ALPN_V4.to_vec(),
                protocol::ALPN_V3.to_vec(),
                protocol::ALPN_V2.to_vec(),
                protocol::ALPN_V1.to_vec()
            ]
        );
        let two = Admission {
            max_protocol: 2,
            ..Admission::default()
        };
        assert_eq!(
            two.alpns(),
            vec![protocol::ALPN_V2.to_vec(), protocol::ALPN_V1.to_vec()]
        );
        let held = Admission {
            max_protocol: 1,
            ..Admission::default()
        };
        assert_eq!(held.alpns(), vec![protocol::ALPN_V1.to_vec()]);
    }
}
