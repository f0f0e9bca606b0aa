//! A peer of the test's own making: a QUIC endpoint on loopback with a
//! fresh node key and the default admission (no mesh secret), for fake
//! peers that lie or misbehave; and a mesh node's config made to list it.

use std::net::SocketAddr;

use nixmesh::mesh::identity::{MeshSecret, NodeId};
use nixmesh::mesh::transport::{self, Admission, TlsIdentity};
use nixmesh::nix::SecretKey;

use super::{free_port, MeshNode};

/// The endpoint (bound inside `rt`), its node id and address.
pub fn fake_peer_endpoint(
    rt: &tokio::runtime::Runtime,
    name: &str,
) -> (quinn::Endpoint, NodeId, SocketAddr) {
    let (endpoint, _, node, addr) = fake_peer(rt, name);
    (endpoint, node, addr)
}

/// The endpoint, the identity it was made with, its node id and address.
fn fake_peer(
    rt: &tokio::runtime::Runtime,
    name: &str,
) -> (quinn::Endpoint, TlsIdentity, NodeId, SocketAddr) {
    let key = SecretKey::generate(name).unwrap();
    let node = NodeId(key.public().bytes());
    let id = TlsIdentity::new(&key, &MeshSecret::default()).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _guard = rt.enter();
    let endpoint = quinn::Endpoint::server(
        transport::server_config(&id, Admission::default()).unwrap(),
        addr,
    )
    .unwrap();
    (endpoint, id, node, addr)
}

/// A fake peer's bulk side (protocol version 5): a TCP listener at its
/// QUIC address and the TLS to accept agents with.
pub struct FakeBulk {
    pub listener: tokio::net::TcpListener,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

/// `fake_peer_endpoint` that also takes bulk connections.
pub fn fake_peer_with_bulk(
    rt: &tokio::runtime::Runtime,
    name: &str,
) -> (quinn::Endpoint, FakeBulk, NodeId, SocketAddr) {
    let (endpoint, id, node, addr) = fake_peer(rt, name);
    let tls = transport::bulk_server_config(&id, Admission::default()).unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .expect("the fake peer's TCP port");
    let bulk = FakeBulk {
        listener,
        acceptor: tokio_rustls::TlsAcceptor::from(tls),
    };
    (endpoint, bulk, node, addr)
}

/// Adds `node` at `addr` to the static peers in `mesh`'s config file.
pub fn add_static_peer(mesh: &MeshNode, node: &NodeId, addr: SocketAddr) {
    let entry = format!("{{ address = \"{addr}\", key = {:?} }}, ", node.to_base64());
    let text = std::fs::read_to_string(&mesh.config_path)
        .unwrap()
        .replace("static_peers = [", &format!("static_peers = [{entry}"));
    std::fs::write(&mesh.config_path, text).unwrap();
}
