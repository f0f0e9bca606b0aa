//! (Tests only.) A QUIC link between two fresh identities on loopback,
//! with the agents' own TLS and transport settings, for unit tests of what
//! goes over it.

use std::sync::Arc;

use crate::mesh::identity::MeshSecret;
use crate::mesh::transport::{self, Admission, Role, TlsIdentity};
use crate::nix::SecretKey;

/// Both ends of one connection, and the endpoints that keep it up.
pub struct Link {
    pub dialler: quinn::Connection,
    pub acceptor: quinn::Connection,
    _endpoints: [quinn::Endpoint; 2],
}

/// A link whose accepting end has the agents' transport settings as
/// `tune` leaves them.
pub async fn link(tune: impl FnOnce(&mut quinn::TransportConfig)) -> Link {
    let key = |b: u8| SecretKey::from_seed("loopback", [b; 32]);
    let mesh = MeshSecret::default();
    let near = TlsIdentity::new(&key(1), &mesh).expect("identity");
    let far = TlsIdentity::new(&key(2), &mesh).expect("identity");
    let mut server = transport::server_config(&far, Admission::default()).expect("server");
    let mut t = transport::transport_config(Role::Acceptor);
    tune(&mut t);
    server.transport_config(Arc::new(t));
    let local = "127.0.0.1:0".parse().expect("address");
    let accepting = quinn::Endpoint::server(server, local).expect("server endpoint");
    let mut dialling = quinn::Endpoint::client(local).expect("client endpoint");
    dialling.set_default_client_config(
        transport::client_config(&near, Admission::default(), far.node).expect("client"),
    );
    let addr = accepting.local_addr().expect("bound");
    let dial = async {
        let connecting = dialling
            .connect(addr, transport::SERVER_NAME)
            .expect("connect");
        connecting.await.expect("dialled")
    };
    let accept = async {
        let incoming = accepting.accept().await.expect("incoming");
        incoming.await.expect("accepted")
    };
    let (dialler, acceptor) = tokio::join!(dial, accept);
    Link {
        dialler,
        acceptor,
        _endpoints: [accepting, dialling],
    }
}
