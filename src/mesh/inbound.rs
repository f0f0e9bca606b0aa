//! How many strangers may knock at once. The mesh is open by default, so
//! anyone on the LAN can start QUIC handshakes: each costs a TLS handshake
//! and, once admitted, a connection with up to 128 streams. Both are
//! capped; an attempt beyond a cap is refused at once (QUIC's
//! CONNECTION_REFUSED), before any crypto is done for it.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::mesh::peers::MAX_PEERS;

/// Handshakes in progress at once. Peers connect once and keep the
/// connection, so more than this at a time is a flood.
pub const MAX_HANDSHAKES: usize = 64;
/// Inbound connections held at once: one per peer the table can hold.
pub const MAX_INBOUND: usize = MAX_PEERS;

#[derive(Clone)]
pub struct InboundGate {
    handshakes: Arc<Semaphore>,
    connections: Arc<Semaphore>,
}

/// An admitted attempt: the handshake slot is given back when the
/// handshake ends (`handshake_done`), the connection slot when this drops.
pub struct Admitted {
    handshake: Option<OwnedSemaphorePermit>,
    _connection: OwnedSemaphorePermit,
}

impl Admitted {
    pub fn handshake_done(&mut self) {
        self.handshake = None;
    }
}

impl InboundGate {
    pub fn new(handshakes: usize, connections: usize) -> Self {
        Self {
            handshakes: Arc::new(Semaphore::new(handshakes)),
            connections: Arc::new(Semaphore::new(connections)),
        }
    }

    /// A slot for one more inbound attempt, or `None`: refuse it.
    pub fn admit(&self) -> Option<Admitted> {
        let connection = self.connections.clone().try_acquire_owned().ok()?;
        let handshake = self.handshakes.clone().try_acquire_owned().ok()?;
        Some(Admitted {
            handshake: Some(handshake),
            _connection: connection,
        })
    }
}

impl Default for InboundGate {
    fn default() -> Self {
        Self::new(MAX_HANDSHAKES, MAX_INBOUND)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_in_flight_are_capped() {
        let gate = InboundGate::new(2, 10);
        let mut a = gate.admit().expect("first");
        let _b = gate.admit().expect("second");
        assert!(gate.admit().is_none(), "a third handshake at once");
        a.handshake_done();
        assert!(
            gate.admit().is_some(),
            "a finished handshake frees its slot"
        );
    }

    #[test]
    fn connections_are_capped_until_they_end() {
        let gate = InboundGate::new(10, 2);
        let mut a = gate.admit().expect("first");
        a.handshake_done();
        let mut b = gate.admit().expect("second");
        b.handshake_done();
        assert!(gate.admit().is_none(), "a third connection");
        drop(a);
        assert!(gate.admit().is_some(), "a closed connection frees its slot");
    }
}
