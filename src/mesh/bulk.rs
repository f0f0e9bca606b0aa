//! Bulk connections (protocol version 5): a large NAR goes over TLS on TCP
//! instead of a QUIC stream. QUIC costs both agents several CPU-seconds per
//! GiB (every 1.4 KiB packet is encrypted, sent, received and acknowledged
//! in user space); the kernel's TCP moves the same bytes in 64 KiB
//! segments and leaves the agents little more than AES-GCM.
//!
//! A bulk connection carries a `NarChunks` request and its answer, framed
//! as on a QUIC stream, then closes (TLS close; on a plain connection the
//! TCP close). From version 7 an asker that sets `nar_chunks::KEEP` gets
//! a `DONE` stop header after the part
//! instead, and the holder waits `SERVE_IDLE` for the next request; the
//! asker keeps such connections in `Idle` for `KEEP_IDLE` and asks the
//! next part of that peer on one of them, so parts from `KEPT_FROM` (the
//! stripes of a NAR that several peers hold) pay no handshake. It is made
//! with the same identity and admission as the QUIC link and pins the key
//! of the peer it dials, so it grants nothing QUIC does not (a plain one,
//! only in an open mesh, where QUIC admits anyone). The agent
//! listens on TCP at its QUIC port; a peer that cannot be reached that way
//! (an older agent, a firewall) is asked on QUIC, and not over TCP again
//! for `RETRY_AFTER`. From version 8, in an open mesh, a bulk connection
//! may go without TLS (`mesh::plain_bulk`); the listener tells the two
//! apart by the connection's first byte.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::lock::lock;
use crate::mesh::identity::NodeId;
use crate::mesh::nar_chunks;
use crate::mesh::nar_reader::BulkStream;
use crate::mesh::nar_sink::BulkIo;
use crate::mesh::pace::LinkSample;
use crate::mesh::plain_bulk;
use crate::mesh::protocol::{self, Request, Response};
use crate::mesh::server::PeerServer;
use crate::mesh::transport::{self, FrameReadError};

/// NAR parts smaller than this stay on QUIC unless a kept connection
/// (version 7) takes them: a new bulk connection costs two more round
/// trips (TCP, then TLS) before the first byte.
pub const BULK_FROM: u64 = 4 << 20;
/// (Version 7.) Parts from this size go over bulk connections, which are
/// kept for the next part (a stripe is 2 MiB).
pub const KEPT_FROM: u64 = 1 << 20;
/// How long an asker keeps an idle bulk connection for the next part.
pub const KEEP_IDLE: Duration = Duration::from_secs(5);
/// Idle bulk connections an asker keeps per peer (a striped NAR has two
/// stripes under way per holder).
pub const IDLE_PER_PEER: usize = 4;
/// How long a holder waits for the next request on a kept connection
/// (longer than askers keep them, so an asker seldom finds one closed).
pub const SERVE_IDLE: Duration = Duration::from_secs(15);
/// A peer whose bulk connection failed is asked on QUIC for this long.
pub const RETRY_AFTER: Duration = Duration::from_secs(300);
/// TCP connect and TLS handshake (or a plain connection's preamble)
/// together, either side.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Bulk connections in their handshake at once; more are closed at once
/// (each handshake costs a signature and a key exchange).
const MAX_HANDSHAKES: usize = 32;
/// Bulk connections serving a part at once (their NAR streams also count
/// against the server's NAR slots).
const MAX_BULK: usize = 256;
/// (Version 7.) Kept bulk connections waiting idle for their next request
/// at once; past it, a connection closes after its part.
const MAX_BULK_IDLE: usize = 256;
/// TLS records a holder's connection holds before they reach the socket:
/// a whole chunk frame, so it goes out in one write (rustls's default,
/// 64 KiB, took four). A connection holds that much only while its reader
/// is behind, and gives up on one that takes nothing for
/// `nar_sink::WRITE_STALL`; `MAX_BULK` connections at most.
const SEND_BUFFER: usize = nar_chunks::CHUNK + (16 << 10);
/// The asker reads its socket through a buffer this large (kept with an
/// idle connection too). rustls asks its transport for at most 4 KiB at a
/// time, so without one a GiB of chunks costs a quarter of a million `recv`
/// calls; with it, as few as 8192.
pub(crate) const READ_BUFFER: usize = 128 << 10;

#[derive(Debug, Error)]
pub enum BulkError {
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("sending the request: {0}")]
    Write(std::io::Error),
    #[error("reading the answer: {0}")]
    Read(#[from] FrameReadError),
    #[error("malformed answer: {0}")]
    Malformed(#[from] protocol::FrameError),
}

/// Opens a bulk connection to `addr` with `tls` (which pins the peer's
/// key).
pub async fn dial(
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> Result<BulkStream, BulkError> {
    let connect = async {
        let tcp = TcpStream::connect(addr).await.map_err(BulkError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let tcp = BufReader::with_capacity(READ_BUFFER, tcp);
        let name = rustls::pki_types::ServerName::try_from(transport::SERVER_NAME)
            .map_err(|e| BulkError::Tls(std::io::Error::other(e)))?;
        TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(BulkError::Tls)
    };
    let io = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
        .await
        .map_err(|_| BulkError::Timeout(HANDSHAKE_TIMEOUT))??;
    Ok(Box::new(io))
}

/// Sends `req` on a bulk connection and reads the answer's first frame.
/// The connection then carries the chunk frames that follow `NarFollows`
/// (`NarReader::bulk`).
pub async fn ask(
    mut io: BulkStream,
    req: &Request,
    timeout: Duration,
) -> Result<(Response, BulkStream), BulkError> {
    io.write_all(&req.encode())
        .await
        .map_err(BulkError::Write)?;
    io.flush().await.map_err(BulkError::Write)?;
    let body = transport::read_frame_from(&mut io, protocol::MAX_RESPONSE_FRAME, timeout).await?;
    Ok((Response::decode(&body)?, io))
}

/// Idle bulk connections (version 7) an asker keeps for the next part,
/// per peer, newest last. Generic over the connection for its tests.
pub struct Idle<C> {
    conns: Mutex<HashMap<NodeId, Vec<(C, Instant)>>>,
}

impl<C> Default for Idle<C> {
    fn default() -> Self {
        Self {
            conns: Mutex::new(HashMap::new()),
        }
    }
}

impl<C> Idle<C> {
    /// Keeps `conn`, ready for `node`'s next part since `now`; with
    /// `IDLE_PER_PEER` kept already, the oldest of them is closed.
    pub fn put(&self, node: NodeId, conn: C, now: Instant) {
        let mut conns = lock(&self.conns);
        let kept = conns.entry(node).or_default();
        if kept.len() >= IDLE_PER_PEER {
            kept.remove(0);
        }
        kept.push((conn, now));
    }

    /// Whether a connection to `node` is kept and not idle for `KEEP_IDLE`.
    pub fn has(&self, node: &NodeId, now: Instant) -> bool {
        lock(&self.conns).get(node).is_some_and(|kept| {
            kept.iter()
                .any(|(_, since)| now.duration_since(*since) < KEEP_IDLE)
        })
    }

    /// The most recently kept connection to `node` not idle for
    /// `KEEP_IDLE`.
    pub fn take(&self, node: &NodeId, now: Instant) -> Option<C> {
        let mut conns = lock(&self.conns);
        let kept = conns.get_mut(node)?;
        kept.retain(|(_, since)| now.duration_since(*since) < KEEP_IDLE);
        let conn = kept.pop().map(|(c, _)| c);
        if kept.is_empty() {
            conns.remove(node);
        }
        conn
    }

    /// Closes every connection kept to `node` (one of them failed: the
    /// holder restarted, or is cut off, and the others would fail too).
    pub fn forget(&self, node: &NodeId) {
        lock(&self.conns).remove(node);
    }

    /// Closes the connections idle for `KEEP_IDLE`, whichever peer's (the
    /// agent's health loop calls it, so a quiet agent holds no sockets its
    /// holders have given up on).
    pub fn sweep(&self, now: Instant) {
        lock(&self.conns).retain(|_, kept| {
            kept.retain(|(_, since)| now.duration_since(*since) < KEEP_IDLE);
            !kept.is_empty()
        });
    }
}

/// A slot a holder's bulk connection holds: to serve a part, or (version
/// 7) to wait idle for the next request.
pub type Slot = OwnedSemaphorePermit;

/// A holder's room for bulk connections: `MAX_BULK` serving a part and
/// `MAX_BULK_IDLE` kept idle between parts. An idle connection holds no
/// serving slot, so askers' kept connections never lock a new one out.
#[derive(Clone)]
pub struct Room {
    serving: Arc<Semaphore>,
    idle: Arc<Semaphore>,
}

impl Room {
    pub fn new(serving: usize, idle: usize) -> Self {
        Self {
            serving: Arc::new(Semaphore::new(serving)),
            idle: Arc::new(Semaphore::new(idle)),
        }
    }

    /// A slot to serve a part in, if one is free.
    pub fn serving(&self) -> Option<Slot> {
        self.serving.clone().try_acquire_owned().ok()
    }

    /// A slot to wait for the next request in, if one is free.
    pub fn idle(&self) -> Option<Slot> {
        self.idle.clone().try_acquire_owned().ok()
    }
}

/// Which peers rest from one way of asking for a while (`RETRY_AFTER`
/// unless made `lasting` another period) after it failed: from bulk
/// connections (asked on QUIC meanwhile), or (version 8) from plain ones
/// (dialled under TLS meanwhile).
pub struct Resting {
    since: Mutex<HashMap<NodeId, Instant>>,
    period: Duration,
}

impl Default for Resting {
    fn default() -> Self {
        Resting::lasting(RETRY_AFTER)
    }
}

impl Resting {
    pub fn lasting(period: Duration) -> Self {
        Resting {
            since: Mutex::default(),
            period,
        }
    }

    /// `node` rests from `now`; whether that begins a rest (it was not
    /// resting).
    pub fn failed(&self, node: NodeId, now: Instant) -> bool {
        let mut since = lock(&self.since);
        let resting = since
            .get(&node)
            .is_some_and(|t| now.duration_since(*t) < self.period);
        since.insert(node, now);
        !resting
    }

    pub fn resting(&self, node: &NodeId, now: Instant) -> bool {
        let mut since = lock(&self.since);
        match since.get(node) {
            Some(t) if now.duration_since(*t) < self.period => true,
            Some(_) => {
                since.remove(node);
                false
            }
            None => false,
        }
    }
}

impl BulkIo for tokio_rustls::server::TlsStream<TcpStream> {
    fn link_sample(&self) -> Option<LinkSample> {
        tcp_sample(self.get_ref().0.as_fd())
    }
}

impl BulkIo for TcpStream {
    fn link_sample(&self) -> Option<LinkSample> {
        tcp_sample(self.as_fd())
    }
}

/// What a TCP connection delivered since it opened, and how long it was
/// busy and held back by the receiver's window (`TCP_INFO`); `None` where
/// the kernel does not count these.
#[allow(unsafe_code)] // getsockopt(2): no safe wrapper for TCP_INFO in the dependencies.
fn tcp_sample(fd: BorrowedFd<'_>) -> Option<LinkSample> {
    use std::mem::offset_of;
    let mut info = [0u8; std::mem::size_of::<libc::tcp_info>()];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: the buffer is writable for `len` bytes and outlives the call;
    // the kernel writes at most `len` bytes and says how many.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    let info = &info[..(len as usize).min(info.len())];
    // A field the kernel did not fill in is `None` (older kernels).
    let field = |at: usize| -> Option<u64> {
        let bytes = info.get(at..at + 8)?;
        Some(u64::from_ne_bytes(bytes.try_into().ok()?))
    };
    let small = |at: usize| -> Option<u32> {
        let bytes = info.get(at..at + 4)?;
        Some(u32::from_ne_bytes(bytes.try_into().ok()?))
    };
    Some(LinkSample {
        acked: field(offset_of!(libc::tcp_info, tcpi_bytes_acked))?,
        busy: field(offset_of!(libc::tcp_info, tcpi_busy_time))?,
        held: field(offset_of!(libc::tcp_info, tcpi_rwnd_limited))?,
        queued: u64::from(small(offset_of!(libc::tcp_info, tcpi_notsent_bytes))?)
            + u64::from(small(offset_of!(libc::tcp_info, tcpi_unacked))?)
                * u64::from(small(offset_of!(libc::tcp_info, tcpi_snd_mss))?),
    })
}

/// Binds the bulk listener at `addr` (the QUIC endpoint's address, TCP).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts bulk connections until `shutdown`: each is admitted by its TLS
/// handshake (the same checks as QUIC's), then `server` answers its
/// request (version 7: its requests, in `room`). A plain connection
/// (version 8) is served where `plain` (`plain_bulk::allowed`), and
/// otherwise refused with `code::PLAIN_REFUSED`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    plain: bool,
    server: Arc<PeerServer>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let room = Room::new(MAX_BULK, MAX_BULK_IDLE);
    loop {
        let (tcp, from) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "accepting a bulk connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (Ok(handshake), Some(slot)) = (handshakes.clone().try_acquire_owned(), room.serving())
        else {
            tracing::debug!(%from, "too many bulk connections; closing one");
            continue;
        };
        let acceptor = acceptor.clone();
        let server = server.clone();
        let stop = shutdown.clone();
        let room = room.clone();
        tasks.spawn(async move {
            let mut tcp = tcp;
            let mut first = [0u8; 1];
            // The first byte, the preamble or the TLS handshake, all
            // within `HANDSHAKE_TIMEOUT` of the accept.
            let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
            let peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await;
            if !matches!(peeked, Ok(Ok(1))) {
                return;
            }
            if plain_bulk::opens_plain(first[0]) {
                let Some(node) = plain_bulk::accept(&mut tcp, deadline).await else {
                    tracing::debug!(%from, "a bulk connection sent no plain preamble in time");
                    return;
                };
                if !plain {
                    // A refusal serves nothing: it holds its handshake
                    // slot, not a serving one, and ends by the deadline.
                    drop(slot);
                    plain_bulk::refuse(tcp, deadline).await;
                    return;
                }
                drop(handshake);
                tracing::trace!(%from, claimed = %node, "a plain bulk connection");
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = server.serve_bulk(node, tcp, &room, slot) => {}
                }
                return;
            }
            let accepted = tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await;
            drop(handshake);
            let mut io = match accepted {
                Ok(Ok(io)) => io,
                Ok(Err(e)) => {
                    tracing::debug!(%from, error = %e, "bulk connection refused in TLS");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%from, "bulk connection's handshake timed out");
                    return;
                }
            };
            io.get_mut().1.set_buffer_limit(Some(SEND_BUFFER));
            let node = io
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| transport::node_of_cert(c).ok());
            let Some(node) = node else {
                return;
            };
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = server.serve_bulk(node, io, &room, slot) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn a_busy_connection_reports_what_it_delivered_and_how_long_it_was_busy() {
        block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let reader = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = vec![0u8; 1 << 20];
                while s.read(&mut buf).await.unwrap_or(0) > 0 {}
            });
            let mut out = TcpStream::connect(addr).await.expect("connect");
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..32 {
                out.write_all(&chunk).await.expect("write");
            }
            let sample = tcp_sample(out.as_fd()).expect("TCP_INFO");
            assert!(sample.acked > 0 && sample.busy > 0, "{sample:?}");
            drop(out);
            reader.await.expect("reader");
        });
    }

    #[test]
    fn a_reader_that_does_not_keep_up_shows_as_window_limited() {
        block_on(async {
            use tokio::io::AsyncWriteExt;
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let mut out = TcpStream::connect(addr).await.expect("connect");
            // Accepted, never read: its receive window closes.
            let (_idle, _) = listener.accept().await.expect("accept");
            let chunk = vec![7u8; 1 << 20];
            let writing = async {
                loop {
                    out.write_all(&chunk).await.expect("write");
                }
            };
            let _ = tokio::time::timeout(Duration::from_millis(300), writing).await;
            let sample = tcp_sample(out.as_fd()).expect("TCP_INFO");
            assert!(sample.held > 0 && sample.held <= sample.busy, "{sample:?}");
        });
    }

    #[test]
    fn a_peer_rests_on_quic_for_a_while_after_a_failed_bulk_connection() {
        let resting = Resting::default();
        let node = NodeId([7; 32]);
        let t = Instant::now();
        assert!(!resting.resting(&node, t));
        resting.failed(node, t);
        assert!(resting.resting(&node, t + Duration::from_secs(1)));
        assert!(!resting.resting(&NodeId([8; 32]), t));
        assert!(!resting.resting(&node, t + RETRY_AFTER));
        // And it is forgotten once the rest is over.
        assert!(!resting.resting(&node, t + Duration::from_secs(1)));
        // A rest made to last longer.
        let distrust = Resting::lasting(RETRY_AFTER * 12);
        assert!(distrust.failed(node, t));
        assert!(distrust.resting(&node, t + RETRY_AFTER));
        // A failure while it rests begins no new rest (it extends it).
        assert!(!distrust.failed(node, t + Duration::from_secs(1)));
        let extended = t + RETRY_AFTER * 12 + Duration::from_millis(500);
        assert!(distrust.resting(&node, extended));
        assert!(!distrust.resting(&node, t + RETRY_AFTER * 12 + Duration::from_secs(1)));
    }

    #[test]
    fn kept_connections_go_to_their_peer_newest_first_until_they_idle_too_long() {
        let idle: Idle<u32> = Idle::default();
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let t = Instant::now();
        idle.put(a, 1, t);
        idle.put(a, 2, t + Duration::from_secs(1));
        idle.put(b, 3, t);
        assert!(idle.has(&a, t + Duration::from_secs(2)));
        assert_eq!(idle.take(&a, t + Duration::from_secs(2)), Some(2));
        assert_eq!(idle.take(&b, t + Duration::from_secs(2)), Some(3));
        assert_eq!(idle.take(&b, t + Duration::from_secs(2)), None);
        // The older one of `a` has idled for `KEEP_IDLE`: closed, not
        // handed out.
        assert!(!idle.has(&a, t + KEEP_IDLE));
        assert_eq!(idle.take(&a, t + KEEP_IDLE), None);
    }

    #[test]
    fn a_peer_keeps_its_newest_idle_connections_and_stale_ones_are_swept() {
        let idle: Idle<usize> = Idle::default();
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let t = Instant::now();
        idle.put(b, 99, t);
        for i in 0..IDLE_PER_PEER + 2 {
            idle.put(a, i, t + KEEP_IDLE);
        }
        // The two oldest of `a` were closed for the newer ones.
        let kept: Vec<usize> = lock(&idle.conns)[&a].iter().map(|(c, _)| *c).collect();
        assert_eq!(kept, (2..IDLE_PER_PEER + 2).collect::<Vec<_>>());
        // `b`'s connection has idled for `KEEP_IDLE`: the sweep closes it.
        assert!(lock(&idle.conns).contains_key(&b));
        idle.sweep(t + KEEP_IDLE);
        assert!(!lock(&idle.conns).contains_key(&b));
        assert!(idle.has(&a, t + KEEP_IDLE));
        // One of `a`'s failed: all of them go.
        idle.forget(&a);
        assert_eq!(idle.take(&a, t + KEEP_IDLE), None);
    }

    #[test]
    fn a_holder_serves_and_keeps_idle_in_separate_room() {
        let room = Room::new(1, 1);
        let serving = room.serving().expect("a free serving slot");
        assert!(room.serving().is_none(), "one serving slot");
        // A connection between parts trades its serving slot for an idle
        // one: a new connection may be served meanwhile.
        let idle = room.idle().expect("a free idle slot");
        drop(serving);
        assert!(room.idle().is_none(), "one idle slot");
        let other = room.serving().expect("the serving slot is free again");
        // The idle one's next request finds no serving slot: refused.
        assert!(room.serving().is_none());
        drop((idle, other));
        assert!(room.serving().is_some() && room.idle().is_some());
    }
}
