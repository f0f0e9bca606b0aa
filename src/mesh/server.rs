//! Answers other agents' requests from what this host lets out: one
//! request per QUIC stream (or per bulk connection, for NARs), decoded
//! with limits. A malformed, oversized or
//! unknown frame resets that stream with an error code and counts against
//! the peer; the connection and the agent carry on.
//!
//! The paths come through `ServedPaths`, which the agent hands down (the
//! serve flow's store side implements it), so `mesh` never reaches into
//! `store`.

use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, StreamExt};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::task::TaskTracker;

use crate::lock::lock;
use crate::mesh::bulk;
use crate::mesh::identity::NodeId;
use crate::mesh::nar_chunks::{self, Codec, Packer};
use crate::mesh::nar_sink::{BulkIo, BulkSink, NarSink};
use crate::mesh::pace::{Measured, Pace};
use crate::mesh::peers::PeerTable;
use crate::mesh::protocol::{self, code, Request, Response};
use crate::mesh::transport::{self, FrameReadError, REQUEST_TIMEOUT};
use crate::nix::{binary_cache, HashPart, PathInfo, Sha256Hash};

/// NAR streams served at once, to all peers together.
pub const MAX_NAR_STREAMS: usize = 64;

/// Why a NAR stream ended before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NarFault {
    /// This host's copy does not match its NarHash: the peer is told so
    /// (it must not trust what it already got from us).
    Corrupt,
    /// It could not be read (vanished, I/O error).
    Unreadable,
}

/// A NAR's bytes as `ServedPaths::nar` gives them.
type NarBytes = BoxStream<'static, Result<Bytes, NarFault>>;

/// What this host lets out to peers.
pub trait ServedPaths: Send + Sync + 'static {
    /// The path's info, if it exists and may leave this host.
    fn info(&self, hash: HashPart) -> Option<PathInfo>;
    /// Which of `hashes` `info` would find; may take a while (a batch).
    fn have_many(self: Arc<Self>, hashes: Vec<HashPart>) -> BoxFuture<'static, Vec<bool>>;
    /// The NAR of a path `info` returned, from byte `offset` up to `end`
    /// (the caller stops reading there).
    fn nar(
        &self,
        info: PathInfo,
        offset: u64,
        end: u64,
    ) -> BoxStream<'static, Result<Bytes, NarFault>>;
    /// Appends to `out` the zstd payload packed earlier for chunk `slot`
    /// (the NAR bytes from `slot * nar_chunks::CHUNK`, in the pieces
    /// `raw`) of `info`'s NAR at `level`, if one was kept from those
    /// bytes; `false` if none was (`out` as it was). Blocking (disk).
    fn packed_frame(
        &self,
        _info: &PathInfo,
        _level: u8,
        _slot: u64,
        _raw: &[Bytes],
        _out: &mut Vec<u8>,
    ) -> bool {
        false
    }
    /// A frame `packed_frame` gave went to the asker as it is (not beaten
    /// by LZ4 on a probe).
    fn packed_frame_sent(&self) {}
    /// Keeps a zstd payload just packed for that chunk, for the next
    /// asker; whether the chunk has a kept frame now. Blocking (disk).
    fn keep_packed(
        &self,
        _info: &PathInfo,
        _level: u8,
        _slot: u64,
        _raw: &[u8],
        _zstd: &[u8],
    ) -> bool {
        false
    }
    /// A serve of `info`'s NAR found that it compresses at zstd `level`
    /// but sent some chunks that have no kept frame (packed with LZ4, raw,
    /// or not at all): their frames may be packed and kept while this
    /// host is idle, for the next asker.
    fn fill_packed(&self, _info: &PathInfo, _level: u8) {}
    /// Peer `reporter` says the NAR of `hash` it got from here did not
    /// match `nar_hash`.
    fn bad_nar(&self, hash: HashPart, nar_hash: Sha256Hash, reporter: &str);
    /// What this host shares and every change from then on (`None`: no
    /// summary is kept).
    fn summary(self: Arc<Self>) -> BoxFuture<'static, Option<SummaryFeed>>;
}

/// Fingerprints (`HashPart::fingerprint`) that came into and went out of
/// the shared set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SummaryChange {
    pub added: Vec<u32>,
    pub removed: Vec<u32>,
}

/// The subscriber fell too far behind the changes and must start over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FellBehind;

/// What a `Summary` request is answered from.
pub struct SummaryFeed {
    pub fingerprints: Vec<u32>,
    pub changes: BoxStream<'static, Result<SummaryChange, FellBehind>>,
}

/// Most paths a summary sent to peers may list; a store with more is
/// asked about each path as before (peers keep 4 bytes a path).
pub const MAX_SUMMARY_PATHS: usize = 1 << 20;

/// Files this agent downloads from upstream caches for its peers: the
/// owner's side of the office-wide single flight. The fetch flow implements
/// it and hands it down once it exists (`PeerServer::serve_upstream`).
pub trait UpstreamFiles: Send + Sync + 'static {
    /// The upstream file of `hash` whose FileHash is `file_hash`: its size,
    /// and its bytes as they arrive (an error ends it early). `None` when
    /// this agent has no such upstream file to offer.
    #[allow(clippy::type_complexity)]
    fn file(
        self: Arc<Self>,
        hash: HashPart,
        file_hash: Sha256Hash,
    ) -> BoxFuture<'static, Option<(u64, mpsc::Receiver<Result<Bytes, String>>)>>;

    /// The narinfo of `hash` from this agent's upstream caches: looked up
    /// once however many peers (and this agent's own Nix) ask at once.
    fn narinfo(self: Arc<Self>, hash: HashPart) -> BoxFuture<'static, UpstreamLookup>;
}

/// What an agent's upstream caches say about a path, for a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamLookup {
    /// `cache` has it: its narinfo (signatures as the cache sent them).
    Hit { cache: String, narinfo: String },
    /// None of the caches `asked` has it.
    Miss { asked: Vec<String> },
}

/// Upstream narinfo look-ups for peers running at once; more are answered
/// "overloaded" (the asker then asks upstream itself), so that no peer can
/// make this agent flood its upstreams.
const MAX_UPSTREAM_LOOKUPS: usize = 64;

pub struct PeerServer {
    name: String,
    shared: Arc<dyn ServedPaths>,
    upstream: OnceLock<Arc<dyn UpstreamFiles>>,
    table: Arc<Mutex<PeerTable>>,
    nar_slots: Arc<Semaphore>,
    lookup_slots: Arc<Semaphore>,
    tasks: TaskTracker,
}

impl PeerServer {
    pub fn new(
        name: String,
        shared: Arc<dyn ServedPaths>,
        table: Arc<Mutex<PeerTable>>,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Self {
            name,
            shared,
            upstream: OnceLock::new(),
            table,
            nar_slots: Arc::new(Semaphore::new(MAX_NAR_STREAMS)),
            lookup_slots: Arc::new(Semaphore::new(MAX_UPSTREAM_LOOKUPS)),
            tasks,
        })
    }

    fn count(&self, node: &NodeId, f: impl FnOnce(&mut crate::mesh::peers::PeerCounters)) {
        if let Some(c) = lock(&self.table).counters_mut(node) {
            f(c);
        }
    }

    /// From now on, peers' `UpstreamFile` requests go to `files`.
    pub fn serve_upstream(&self, files: Arc<dyn UpstreamFiles>) {
        let _ = self.upstream.set(files);
    }

    /// Serves every stream the peer opens until the connection ends.
    pub async fn serve_connection(self: Arc<Self>, conn: quinn::Connection, node: NodeId) {
        let version = transport::version(&conn);
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(peer = %node, reason = %e, "peer connection ended");
                    return;
                }
            };
            let this = self.clone();
            self.tasks
                .spawn(async move { this.serve_stream(node, version, send, recv).await });
        }
    }

    /// Answers the requests of a bulk connection (TLS on TCP, version 5)
    /// from `node`: only `NarChunks`, answered as on a QUIC stream. A
    /// stream that would be reset ends with a stop header carrying the
    /// reset's code instead (`nar_chunks::stop_header`). One request, or
    /// (version 7) while each sets `nar_chunks::KEEP`, the next within
    /// `bulk::SERVE_IDLE` of the last. `slot` is the serving slot it was
    /// admitted with; between parts it waits in an idle slot of `room`
    /// instead, and without one it closes.
    pub async fn serve_bulk<S: BulkIo>(
        &self,
        node: NodeId,
        io: S,
        room: &bulk::Room,
        slot: bulk::Slot,
    ) {
        let mut sink = BulkSink(io);
        let mut slot = slot;
        // Whether the last request was answered and the connection kept.
        let mut kept = false;
        // What the connection has learnt of its link and the codecs, kept
        // from one part to the next: a 2 MiB stripe is too short to learn
        // it afresh.
        let mut pace = None;
        loop {
            let wait = if kept {
                bulk::SERVE_IDLE
            } else {
                REQUEST_TIMEOUT
            };
            let request =
                transport::read_frame_from(&mut sink.0, protocol::MAX_REQUEST_FRAME, wait).await;
            if kept {
                if matches!(
                    request,
                    Err(FrameReadError::Read(_) | FrameReadError::Timeout(_))
                ) {
                    // A kept connection the asker closed or left idle.
                    break;
                }
                // Back from idle, it serves again only in a free slot.
                let Some(serving) = room.serving() else {
                    let busy = Response::Error {
                        code: code::OVERLOADED,
                        message: "too many bulk connections".to_string(),
                    };
                    let _ = write_response(&mut sink, &busy).await;
                    break;
                };
                slot = serving;
            }
            match self
                .serve_bulk_request(node, &mut sink, &mut pace, request)
                .await
            {
                Some(true) => match room.idle() {
                    Some(idle) => {
                        slot = idle;
                        kept = true;
                    }
                    // No room to wait in: closed, and the asker dials anew
                    // for its next part.
                    None => break,
                },
                Some(false) => break,
                None => return,
            }
        }
        let _ = sink.close().await;
        drop(slot);
    }

    /// One request on a bulk connection. `Some(true)`: it was answered
    /// and the connection stays for the next; `Some(false)`: it was
    /// answered, or refused, and the connection closes; `None`: the asker
    /// is gone.
    async fn serve_bulk_request<S: BulkIo>(
        &self,
        node: NodeId,
        sink: &mut BulkSink<S>,
        pace: &mut Option<Pace>,
        request: Result<Vec<u8>, FrameReadError>,
    ) -> Option<bool> {
        let request = request
            .map_err(|e| (e.code(), e.to_string()))
            .and_then(|body| Request::decode(&body).map_err(|e| (e.code(), e.to_string())));
        let (hash, nar_hash, part, level) = match request {
            Ok(Request::NarChunks {
                hash,
                nar_hash,
                offset,
                end,
                level,
            }) => (hash, nar_hash, offset..end, level),
            other => {
                let (code, message) = match other {
                    Err(e) => e,
                    Ok(_) => (
                        code::UNKNOWN_KIND,
                        "a bulk connection carries NAR chunk requests only".to_string(),
                    ),
                };
                tracing::warn!(peer = %node, reason = %message, "bad request on a bulk connection");
                self.count(&node, |c| c.errors += 1);
                let _ = write_response(sink, &Response::Error { code, message }).await;
                return Some(false);
            }
        };
        self.count(&node, |c| c.requests_served += 1);
        let packer = Packer::new(level);
        let framing = if level & nar_chunks::ADAPTIVE != 0 {
            // What it learnt holds for every request that reads the same
            // codecs; of zstd, for each level.
            if pace.as_ref().is_some_and(|p| p.reads_lz4() != packer.lz4()) {
                *pace = None;
            }
            let pace = pace.get_or_insert_with(|| Pace::new(packer.lz4()));
            pace.zstd_level(packer.level());
            pace.answer_begins();
            Framing::Adaptive(packer, pace)
        } else {
            Framing::Chunks(packer)
        };
        let served = self
            .serve_nar(node, sink, hash, nar_hash, part, framing)
            .await;
        if let (Some(pace), true) = (pace.as_ref(), level & nar_chunks::ADAPTIVE != 0) {
            tracing::debug!(peer = %node, %pace, "pace after a NAR request");
        }
        // Resets come between whole frames, after `NarFollows`: a stop
        // header in place of the next frame says what a QUIC stream's
        // reset would, and `DONE` that all was sent.
        let (stop, keep) = match served {
            Ok(()) if level & nar_chunks::KEEP != 0 => (nar_chunks::DONE, true),
            Ok(()) => return Some(false),
            Err(StreamEnd::Reset(code)) => (code, false),
            Err(StreamEnd::PeerGone) => return None,
        };
        let stop = Bytes::copy_from_slice(&nar_chunks::stop_header(stop));
        sink.put(stop).await.ok()?;
        // What TLS still holds goes out now, not at the close that a kept
        // connection does not come to.
        sink.flush().await.ok()?;
        Some(keep)
    }

    async fn serve_stream(
        &self,
        node: NodeId,
        version: u32,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let request =
            match transport::read_frame(&mut recv, protocol::MAX_REQUEST_FRAME, REQUEST_TIMEOUT)
                .await
            {
                Ok(body) => Request::decode(&body).map_err(|e| (e.code(), e.to_string())),
                Err(e) => Err((e.code(), e.to_string())),
            };
        let request = match request {
            // A connection knows no request of a later version than its
            // own, as an agent of that version would not.
            Ok(Request::UpstreamFile { .. } | Request::UpstreamNarinfo { .. }) if version < 2 => {
                Err((
                    code::UNKNOWN_KIND,
                    "a version 2 request on a version 1 connection".to_string(),
                ))
            }
            Ok(Request::NarChunks { .. } | Request::BadNar { .. }) if version < 3 => Err((
                code::UNKNOWN_KIND,
                format!("a version 3 request on a version {version} connection"),
            )),
            Ok(Request::Summary) if version < 4 => Err((
                code::UNKNOWN_KIND,
                format!("a version 4 request on a version {version} connection"),
            )),
            other => other,
        };
        let request = match request {
            Ok(r) => r,
            Err((code, reason)) => {
                tracing::warn!(peer = %node, %reason, "bad request from peer; resetting the stream");
                self.count(&node, |c| c.errors += 1);
                transport::reset_stream(&mut send, &mut recv, code);
                return;
            }
        };
        if !matches!(request, Request::Ping { .. }) {
            self.count(&node, |c| c.requests_served += 1);
        }
        let result = match request {
            Request::Ping { nonce } => {
                let name = self.name.clone();
                write_response(&mut send, &Response::Pong { nonce, name }).await
            }
            Request::PathInfo { hash } => {
                let resp = match self.shared.info(hash) {
                    Some(info) => Response::PathInfo {
                        narinfo: binary_cache::narinfo_text(info),
                    },
                    None => Response::NotFound,
                };
                write_response(&mut send, &resp).await
            }
            Request::Have { hashes } => {
                let present = self.shared.clone().have_many(hashes).await;
                write_response(&mut send, &Response::Have { present }).await
            }
            Request::Nar {
                hash,
                nar_hash,
                offset,
            } => {
                self.serve_nar(
                    node,
                    &mut send,
                    hash,
                    nar_hash,
                    offset..u64::MAX,
                    Framing::Raw,
                )
                .await
            }
            Request::NarChunks {
                hash,
                nar_hash,
                offset,
                end,
                level,
            } => {
                // A QUIC stream cannot tell the holder what the link
                // delivers: the level as asked, adaptive or not.
                let packer = Packer::new(level);
                self.serve_nar(
                    node,
                    &mut send,
                    hash,
                    nar_hash,
                    offset..end,
                    Framing::Chunks(packer),
                )
                .await
            }
            Request::UpstreamFile { hash, file_hash } => {
                self.serve_upstream_file(node, &mut send, hash, file_hash)
                    .await
            }
            Request::UpstreamNarinfo { hash } => self.serve_upstream_narinfo(&mut send, hash).await,
            Request::BadNar { hash, nar_hash } => {
                self.shared.bad_nar(hash, nar_hash, &node.fingerprint());
                write_response(&mut send, &Response::Noted).await
            }
            Request::Summary => self.serve_summary(&mut send).await,
        };
        match result {
            Ok(()) => {
                let _ = send.finish();
            }
            Err(StreamEnd::Reset(code)) => {
                transport::reset_stream(&mut send, &mut recv, code);
            }
            Err(StreamEnd::PeerGone) => {}
        }
    }

    async fn serve_nar<S: NarSink>(
        &self,
        node: NodeId,
        send: &mut S,
        hash: HashPart,
        nar_hash: crate::nix::Sha256Hash,
        part: std::ops::Range<u64>,
        framing: Framing<'_>,
    ) -> Result<(), StreamEnd> {
        let offset = part.start;
        let info = match self.shared.info(hash) {
            Some(info) if info.nar_hash == nar_hash => info,
            _ => return write_response(send, &Response::NotFound).await,
        };
        // `u64::MAX`: to the end.
        let end = part.end.min(info.nar_size);
        if offset > end || (part.end != u64::MAX && part.end > info.nar_size) {
            let message = format!("bytes {offset}..{} beyond {}", part.end, info.nar_size);
            return write_response(
                send,
                &Response::Error {
                    code: code::MALFORMED,
                    message,
                },
            )
            .await;
        }
        let Ok(_slot) = self.nar_slots.clone().try_acquire_owned() else {
            return overloaded(send, "too many NAR streams").await;
        };
        write_response(
            send,
            &Response::NarFollows {
                nar_size: info.nar_size,
            },
        )
        .await?;
        let stream = take_bytes(self.shared.nar(info.clone(), offset, end), end - offset);
        let slots = ChunkSlots {
            info: Arc::new(info),
            at: offset,
        };
        match framing {
            Framing::Raw => self.send_raw(node, send, stream).await,
            Framing::Chunks(packer) => {
                self.send_chunks(node, send, stream, packer, None, slots)
                    .await
            }
            Framing::Adaptive(packer, pace) => {
                self.send_chunks(node, send, stream, packer, Some(pace), slots)
                    .await
            }
        }
    }

    async fn send_raw<S: NarSink>(
        &self,
        node: NodeId,
        send: &mut S,
        mut stream: NarBytes,
    ) -> Result<(), StreamEnd> {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(nar_fault)?;
            let len = chunk.len() as u64;
            send.put(chunk).await.map_err(|_| StreamEnd::PeerGone)?;
            self.count(&node, |c| c.bytes_served += len);
        }
        Ok(())
    }

    /// The NAR in chunk frames of `nar_chunks::CHUNK` bytes (the last one
    /// shorter). Compression runs on the blocking pool, off the workers
    /// that move every peer's bytes. With a `pace`: each chunk is packed
    /// only if the pace of the link says it pays (`mesh::pace`), else it goes
    /// out as it is. A chunk to be packed whose zstd frame was kept from an
    /// earlier serve goes out as that frame where the pace allows
    /// (`Pace::takes_kept`), and one packed with zstd is kept (`slots`).
    async fn send_chunks<S: NarSink>(
        &self,
        node: NodeId,
        send: &mut S,
        mut stream: NarBytes,
        mut packer: Packer,
        mut pace: Option<&mut Pace>,
        mut slots: ChunkSlots,
    ) -> Result<(), StreamEnd> {
        if !packer.compresses() {
            return self.send_raw_frames(node, send, stream).await;
        }
        // The next chunk's pieces, as the store gave them (`n` bytes, up
        // to `CHUNK`), and what is left of the piece that ended it: raw
        // chunks go out as those pieces, with no copy.
        let mut pieces: Vec<Bytes> = Vec::new();
        let mut rest = Bytes::new();
        let mut ended = false;
        let mut gaps = FrameGaps::default();
        // A packed frame not yet sent (its NAR bytes, and the codec that
        // packed it smaller): it goes out while the next chunk is being
        // packed.
        let mut ready: Option<(Vec<u8>, usize, Option<Codec>)> = None;
        loop {
            let mut n = 0;
            while n < nar_chunks::CHUNK {
                if rest.is_empty() {
                    if ended {
                        break;
                    }
                    match stream.next().await {
                        Some(piece) => rest = piece.map_err(nar_fault)?,
                        None => ended = true,
                    }
                    continue;
                }
                n = gather(&mut rest, &mut pieces, n);
            }
            if n == 0 {
                break;
            }
            let slot = slots.next(n);
            // A probe of the pace may be packed with both codecs; the
            // smaller frame goes.
            let (codec, pair, takes_kept, stands_in) = match &mut pace {
                Some(pace) => {
                    if let Some(sample) = send.link_sample() {
                        pace.link(sample);
                    }
                    let codec = pace.choose();
                    let stands_in = pace.kept_stands_in();
                    (codec, pace.pairs(), pace.takes_kept(codec), stands_in)
                }
                None => (Some(Codec::Zstd), false, true, false),
            };
            if codec.is_none() && !pair {
                gaps.chunk(slot, false, false);
                if let Some((frame, m, packed)) = ready.take() {
                    self.put_frame(node, send, frame, m, packed).await?;
                }
                self.put_raw_frame(node, send, &mut pieces).await?;
                continue;
            }
            let mut held = std::mem::take(&mut pieces);
            let shared = self.shared.clone();
            let info = slots.info.clone();
            let job = tokio::task::spawn_blocking(move || {
                let level = packer.level();
                // A kept frame is read straight into the frame that goes,
                // and checked against the pieces as they came: no copy of
                // the chunk unless it is packed.
                let kept = slot.filter(|_| takes_kept || stands_in).and_then(|i| {
                    nar_chunks::zstd_frame_with(n as u32, packer.lz4(), |out| {
                        shared.packed_frame(&info, level, i, &held, out)
                    })
                });
                let kept = match (kept, takes_kept) {
                    (Some(frame), true) => return (packer, Made::kept(frame)),
                    (kept, _) => kept,
                };
                let raw = contiguous(&mut held, n);
                if let Some(frame) = kept {
                    let made = probe_with_kept(&mut packer, &raw, frame, pair);
                    return (packer, made);
                }
                let first = if pair { Some(Codec::Lz4) } else { codec };
                let first = timed_pack(&mut packer, &raw, first);
                let second = pair.then(|| timed_pack(&mut packer, &raw, Some(Codec::Zstd)));
                // The zstd frame is kept even where a probe sends LZ4's.
                let zstd = [Some(&first), second.as_ref()]
                    .into_iter()
                    .flatten()
                    .find_map(|p| nar_chunks::zstd_payload(&p.frame, packer.lz4()));
                let kept = match (slot, zstd) {
                    (Some(i), Some(zstd)) => shared.keep_packed(&info, level, i, &raw, zstd),
                    _ => false,
                };
                let zstd_tried = first.tried == Some(Codec::Zstd) || second.is_some();
                let measured = [Some(&first), second.as_ref()].map(|p| p?.measured());
                let chosen = match second {
                    Some(s) if s.frame.len() < first.frame.len() => s,
                    _ => first,
                };
                let wire = chosen.frame.len() - nar_chunks::HEADER;
                let made = Made {
                    packed: chosen.tried.filter(|_| wire < n),
                    frame: chosen.frame,
                    measured,
                    kept,
                    from_kept: false,
                    zstd_tried,
                };
                (packer, made)
            });
            if let Some((frame, m, packed)) = ready.take() {
                self.put_frame(node, send, frame, m, packed).await?;
            }
            let (back, made) = job.await.map_err(|_| StreamEnd::Reset(code::INTERNAL))?;
            packer = back;
            if made.from_kept {
                self.shared.packed_frame_sent();
            }
            gaps.chunk(slot, made.kept, made.zstd_tried);
            if let Some(pace) = &mut pace {
                pace.measured(n, made.measured);
            }
            ready = Some((made.frame, n, made.packed));
        }
        if let Some((frame, m, packed)) = ready.take() {
            self.put_frame(node, send, frame, m, packed).await?;
        }
        if gaps.worth_filling() {
            self.shared.fill_packed(&slots.info, packer.level());
        }
        Ok(())
    }

    /// A frame of `n` NAR bytes, `packed` smaller by that codec.
    async fn put_frame<S: NarSink>(
        &self,
        node: NodeId,
        send: &mut S,
        frame: Vec<u8>,
        n: usize,
        packed: Option<Codec>,
    ) -> Result<(), StreamEnd> {
        send.put(Bytes::from(frame))
            .await
            .map_err(|_| StreamEnd::PeerGone)?;
        // NAR bytes, as the receiver counts them.
        let n = n as u64;
        self.count(&node, |c| {
            c.bytes_served += n;
            match packed {
                Some(Codec::Zstd) => c.served_zstd += n,
                Some(Codec::Lz4) => c.served_lz4 += n,
                None => {}
            }
        });
        Ok(())
    }

    /// Chunk frames that are never compressed (level 0): the store's
    /// pieces go out as they are, a header before each `CHUNK` of them,
    /// with no copy on the way.
    async fn send_raw_frames<S: NarSink>(
        &self,
        node: NodeId,
        send: &mut S,
        mut stream: NarBytes,
    ) -> Result<(), StreamEnd> {
        let mut pieces: Vec<Bytes> = Vec::new();
        let mut held = 0;
        loop {
            let next = stream.next().await;
            let ended = next.is_none();
            if let Some(piece) = next {
                let mut piece = piece.map_err(nar_fault)?;
                while !piece.is_empty() {
                    held = gather(&mut piece, &mut pieces, held);
                    if held == nar_chunks::CHUNK {
                        self.put_raw_frame(node, send, &mut pieces).await?;
                        held = 0;
                    }
                }
            }
            if ended {
                if held > 0 {
                    self.put_raw_frame(node, send, &mut pieces).await?;
                }
                return Ok(());
            }
        }
    }

    async fn put_raw_frame<S: NarSink>(
        &self,
        node: NodeId,
        send: &mut S,
        pieces: &mut Vec<Bytes>,
    ) -> Result<(), StreamEnd> {
        let len: usize = pieces.iter().map(Bytes::len).sum();
        let header = nar_chunks::raw_header(len as u32);
        let mut parts = Vec::with_capacity(pieces.len() + 1);
        parts.push(Bytes::copy_from_slice(&header));
        parts.append(pieces);
        send.put_all(parts).await.map_err(|_| StreamEnd::PeerGone)?;
        self.count(&node, |c| c.bytes_served += len as u64);
        Ok(())
    }
}

impl PeerServer {
    async fn serve_upstream_file(
        &self,
        node: NodeId,
        send: &mut quinn::SendStream,
        hash: HashPart,
        file_hash: Sha256Hash,
    ) -> Result<(), StreamEnd> {
        let Some(files) = self.upstream.get().cloned() else {
            return write_response(send, &Response::NotFound).await;
        };
        let Ok(_slot) = self.nar_slots.clone().try_acquire_owned() else {
            return overloaded(send, "too many file streams").await;
        };
        let Some((file_size, mut bytes)) = files.file(hash, file_hash).await else {
            return write_response(send, &Response::NotFound).await;
        };
        write_response(send, &Response::FileFollows { file_size }).await?;
        while let Some(chunk) = bytes.recv().await {
            let chunk = chunk.map_err(|e| {
                tracing::debug!(peer = %node, error = %e, "upstream file for a peer cut off");
                StreamEnd::Reset(code::CORRUPT)
            })?;
            let len = chunk.len() as u64;
            send.put(chunk).await.map_err(|_| StreamEnd::PeerGone)?;
            self.count(&node, |c| c.bytes_served += len);
        }
        Ok(())
    }
}

impl PeerServer {
    async fn serve_upstream_narinfo(
        &self,
        send: &mut quinn::SendStream,
        hash: HashPart,
    ) -> Result<(), StreamEnd> {
        let Some(upstream) = self.upstream.get().cloned() else {
            let none = Response::UpstreamMiss { asked: Vec::new() };
            return write_response(send, &none).await;
        };
        let Ok(_slot) = self.lookup_slots.clone().try_acquire_owned() else {
            return overloaded(send, "too many upstream look-ups").await;
        };
        let resp = match upstream.narinfo(hash).await {
            UpstreamLookup::Hit { cache, narinfo } => Response::UpstreamHit { cache, narinfo },
            UpstreamLookup::Miss { mut asked } => {
                asked.truncate(protocol::MAX_CACHES);
                Response::UpstreamMiss { asked }
            }
        };
        write_response(send, &resp).await
    }
}

impl PeerServer {
    /// This host's summary, then each change, until the peer stops the
    /// stream or the connection ends.
    async fn serve_summary(&self, send: &mut quinn::SendStream) -> Result<(), StreamEnd> {
        let stopped = send.stopped();
        tokio::pin!(stopped);
        let feed = tokio::select! {
            feed = self.shared.clone().summary() => feed,
            _ = &mut stopped => return Err(StreamEnd::PeerGone),
        };
        let Some(SummaryFeed {
            fingerprints,
            mut changes,
        }) = feed
        else {
            return write_response(send, &Response::NotFound).await;
        };
        if fingerprints.len() > MAX_SUMMARY_PATHS {
            let message = format!(
                "{} paths shared, over the summary limit of {MAX_SUMMARY_PATHS}",
                fingerprints.len()
            );
            let resp = Response::Error {
                code: code::TOO_LARGE,
                message,
            };
            return write_response(send, &resp).await;
        }
        write_summary_parts(send, &fingerprints, &[]).await?;
        drop(fingerprints);
        loop {
            let change = tokio::select! {
                change = changes.next() => change,
                _ = &mut stopped => return Err(StreamEnd::PeerGone),
            };
            match change {
                Some(Ok(change)) => {
                    write_summary_parts(send, &change.added, &change.removed).await?
                }
                Some(Err(FellBehind)) => return Err(StreamEnd::Reset(code::OVERLOADED)),
                None => return Ok(()),
            }
        }
    }
}

/// `added` and `removed` in as many `SummaryPart` frames as the frame
/// limit needs, the last one marked complete.
async fn write_summary_parts(
    send: &mut quinn::SendStream,
    added: &[u32],
    removed: &[u32],
) -> Result<(), StreamEnd> {
    for part in summary_parts(added, removed) {
        write_response(send, &part).await?;
    }
    Ok(())
}

/// Splits a change into frames of at most `MAX_SUMMARY_BATCH`
/// fingerprints; the last is marked complete (an empty change is one
/// empty, complete frame).
pub fn summary_parts(added: &[u32], removed: &[u32]) -> Vec<Response> {
    let batch = protocol::MAX_SUMMARY_BATCH;
    let mut parts: Vec<Response> = added
        .chunks(batch)
        .map(|a| Response::SummaryPart {
            added: a.to_vec(),
            removed: Vec::new(),
            complete: false,
        })
        .chain(removed.chunks(batch).map(|r| Response::SummaryPart {
            added: Vec::new(),
            removed: r.to_vec(),
            complete: false,
        }))
        .collect();
    match parts.last_mut() {
        Some(Response::SummaryPart { complete, .. }) => *complete = true,
        _ => parts.push(Response::SummaryPart {
            added: Vec::new(),
            removed: Vec::new(),
            complete: true,
        }),
    }
    parts
}

/// The first `len` bytes of `stream`.
fn take_bytes(stream: NarBytes, len: u64) -> NarBytes {
    stream
        .scan(len, |left, item| {
            let item = match item {
                Ok(_) if *left == 0 => None,
                Ok(mut b) => {
                    if b.len() as u64 > *left {
                        b.truncate(*left as usize);
                    }
                    *left -= b.len() as u64;
                    Some(Ok(b))
                }
                Err(e) => Some(Err(e)),
            };
            futures_util::future::ready(item)
        })
        .boxed()
}

fn nar_fault(e: NarFault) -> StreamEnd {
    match e {
        NarFault::Corrupt => StreamEnd::Reset(code::CORRUPT),
        NarFault::Unreadable => StreamEnd::Reset(code::INTERNAL),
    }
}

/// How a NAR answer is framed.
enum Framing<'a> {
    /// Raw bytes to the end of the stream (`Nar`).
    Raw,
    /// Chunk frames at the packer's level (`NarChunks`).
    Chunks(Packer),
    /// Chunk frames, each packed only while the pace of the link says it
    /// pays (`nar_chunks::ADAPTIVE`, on a bulk connection), by the
    /// connection's pace.
    Adaptive(Packer, &'a mut Pace),
}

enum StreamEnd {
    Reset(u32),
    PeerGone,
}

/// The answer when every stream slot is taken.
async fn overloaded<S: NarSink>(send: &mut S, why: &str) -> Result<(), StreamEnd> {
    let resp = Response::Error {
        code: code::OVERLOADED,
        message: why.to_string(),
    };
    write_response(send, &resp).await
}

async fn write_response<S: NarSink>(send: &mut S, resp: &Response) -> Result<(), StreamEnd> {
    send.put(Bytes::from(resp.encode()))
        .await
        .map_err(|_| StreamEnd::PeerGone)
}

/// The slots of kept zstd frames (`ServedPaths::packed_frame`) that the
/// chunks of a NAR being sent fall in. Pure.
struct ChunkSlots {
    /// Shared with each chunk's job on the blocking pool.
    info: Arc<PathInfo>,
    /// The NAR offset of the next chunk.
    at: u64,
}

impl ChunkSlots {
    /// The slot of the next chunk, `n` bytes, which it passes: only chunks
    /// on `CHUNK` boundaries, whole or the NAR's last, have one.
    fn next(&mut self, n: usize) -> Option<u64> {
        let at = self.at;
        self.at += n as u64;
        let chunk = nar_chunks::CHUNK as u64;
        (at % chunk == 0 && (n == nar_chunks::CHUNK || self.at == self.info.nar_size))
            .then_some(at / chunk)
    }
}

/// A chunk's frame, made on the blocking pool.
struct Made {
    frame: Vec<u8>,
    /// The codec that made it smaller, if one did.
    packed: Option<Codec>,
    /// What packing it measured, for the pace (nothing for a kept frame
    /// sent as it is).
    measured: [Option<Measured>; 2],
    /// Its chunk has a kept zstd frame now (sent, or packed and kept).
    kept: bool,
    /// It is that kept frame, read back (not packed now).
    from_kept: bool,
    /// Its chunk was packed with zstd (kept or not: one that did not
    /// shrink would not shrink when packed again).
    zstd_tried: bool,
}

impl Made {
    /// A kept zstd frame, sent as it is.
    fn kept(frame: Vec<u8>) -> Self {
        Made {
            frame,
            packed: Some(Codec::Zstd),
            measured: [None, None],
            kept: true,
            from_kept: true,
            zstd_tried: true,
        }
    }
}

/// A probe (`Pace::kept_stands_in`) of a chunk that has the kept zstd
/// frame `kept`: it gives zstd's ratio on the chunk, untimed; where the
/// asker reads LZ4 (`pair`), LZ4 is packed to compare and the smaller
/// frame goes. No zstd packing.
fn probe_with_kept(packer: &mut Packer, raw: &[u8], kept: Vec<u8>, pair: bool) -> Made {
    let zstd = (Codec::Zstd, kept.len() - nar_chunks::HEADER, None);
    let lz4 = pair.then(|| timed_pack(packer, raw, Some(Codec::Lz4)));
    let measured = [lz4.as_ref().and_then(TimedPack::measured), Some(zstd)];
    match lz4 {
        Some(lz4) if lz4.frame.len() < kept.len() => Made {
            packed: lz4
                .tried
                .filter(|_| lz4.frame.len() - nar_chunks::HEADER < raw.len()),
            frame: lz4.frame,
            measured,
            kept: true,
            from_kept: false,
            zstd_tried: true,
        },
        _ => Made {
            measured,
            ..Made::kept(kept)
        },
    }
}

/// What one serve saw of a NAR's kept frames: whether it is worth packing
/// the rest of them while idle. Pure.
#[derive(Default)]
struct FrameGaps {
    /// Chunks with a slot that went neither as a kept frame nor packed
    /// with zstd (raw, or LZ4).
    gaps: u64,
    /// Chunks that have a kept frame (the NAR compresses).
    kept: u64,
}

impl FrameGaps {
    /// A chunk went: in `slot` (if it has one), with a kept frame or not,
    /// packed with zstd or not.
    fn chunk(&mut self, slot: Option<u64>, kept: bool, zstd_tried: bool) {
        match (slot, kept, zstd_tried) {
            (None, _, _) => {}
            (Some(_), true, _) => self.kept += 1,
            (Some(_), false, false) => self.gaps += 1,
            (Some(_), false, true) => {}
        }
    }

    /// Some chunks have kept frames (zstd shrank them) and some do not.
    fn worth_filling(&self) -> bool {
        self.kept > 0 && self.gaps > 0
    }
}

/// A chunk frame and what packing it took.
struct TimedPack {
    frame: Vec<u8>,
    /// The codec it was run through (`None`: raw without trying).
    tried: Option<Codec>,
    took: std::time::Duration,
}

impl TimedPack {
    /// The codec it was run through, the wire bytes of its payload, and
    /// the seconds packing took; `None` if it went raw untried.
    fn measured(&self) -> Option<Measured> {
        let wire = self.frame.len() - nar_chunks::HEADER;
        Some((self.tried?, wire, Some(self.took.as_secs_f64())))
    }
}

/// Moves bytes from `rest` (a piece of the NAR as the store gave it) into
/// `pieces`, which hold `held` bytes of the next chunk, until they hold a
/// whole `CHUNK` or `rest` is used up; split, not copied. Returns the
/// bytes `pieces` now hold.
fn gather(rest: &mut Bytes, pieces: &mut Vec<Bytes>, held: usize) -> usize {
    let take = (nar_chunks::CHUNK - held).min(rest.len());
    if take > 0 {
        pieces.push(rest.split_to(take));
    }
    held + take
}

/// A chunk's `n` bytes in one piece, to pack: copied together only where
/// the store gave them in several.
fn contiguous(pieces: &mut Vec<Bytes>, n: usize) -> Bytes {
    if pieces.len() == 1 {
        return pieces.pop().unwrap_or_default();
    }
    let mut whole = BytesMut::with_capacity(n);
    for piece in pieces.drain(..) {
        whole.extend_from_slice(&piece);
    }
    whole.freeze()
}

/// Packs `raw` with `codec` and times it (on the blocking pool).
fn timed_pack(packer: &mut Packer, raw: &[u8], codec: Option<Codec>) -> TimedPack {
    let began = std::time::Instant::now();
    let frame = packer.pack_with(raw, codec);
    TimedPack {
        frame,
        tried: packer.tried_last(),
        took: began.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_gather_into_whole_chunks_and_a_short_last_one() {
        const C: usize = nar_chunks::CHUNK;
        // The store's pieces: uneven, empty, and whole-chunk ones.
        let sizes = [100, 0, C, C - 100, 7, C, 0, 3 * C / 2, 1];
        let nar: Vec<u8> = (0..sizes.iter().sum::<usize>()).map(|i| i as u8).collect();
        let mut at = 0;
        let (mut chunks, mut pieces, mut held) = (Vec::new(), Vec::new(), 0);
        for size in sizes {
            let mut rest = Bytes::copy_from_slice(&nar[at..at + size]);
            at += size;
            while !rest.is_empty() {
                held = gather(&mut rest, &mut pieces, held);
                if held == C {
                    chunks.push(contiguous(&mut pieces, held));
                    held = 0;
                }
            }
        }
        assert!(pieces.iter().all(|p| !p.is_empty()), "no empty piece");
        chunks.push(contiguous(&mut pieces, held));
        assert!(pieces.is_empty());
        let lens: Vec<usize> = chunks.iter().map(Bytes::len).collect();
        assert_eq!(lens, [C, C, C, C, nar.len() - 4 * C]);
        assert_eq!(chunks.concat(), nar);
    }

    #[test]
    fn a_nar_is_filled_where_it_compresses_and_chunks_went_unpacked() {
        let worth = |chunks: &[(Option<u64>, bool, bool)]| {
            let mut gaps = FrameGaps::default();
            for &(slot, kept, tried) in chunks {
                gaps.chunk(slot, kept, tried);
            }
            gaps.worth_filling()
        };
        // A kept frame, and a chunk sent raw or as LZ4.
        assert!(worth(&[(Some(0), true, true), (Some(1), false, false)]));
        // Every chunk kept, or the rest packed with zstd and not smaller.
        assert!(!worth(&[(Some(0), true, true), (Some(1), true, true)]));
        assert!(!worth(&[(Some(0), true, true), (Some(1), false, true)]));
        // Nothing shrank: it may not compress at all.
        assert!(!worth(&[(Some(0), false, false), (Some(1), false, true)]));
        // Chunks off the slots (a part from an odd offset) count for nothing.
        assert!(!worth(&[(None, true, true), (None, false, false)]));
    }

    #[test]
    fn only_chunks_on_chunk_boundaries_have_slots() {
        const C: usize = nar_chunks::CHUNK;
        let info = PathInfo {
            nar_size: 3 * C as u64 + 100,
            ..crate::store::nar_stream::tests::info_for(b"")
        };
        let slots = |at: u64, chunks: &[usize]| -> Vec<Option<u64>> {
            let mut s = ChunkSlots {
                info: Arc::new(info.clone()),
                at,
            };
            chunks.iter().map(|&n| s.next(n)).collect()
        };
        // A whole NAR: every chunk, the short last one too.
        assert_eq!(
            slots(0, &[C, C, C, 100]),
            [Some(0), Some(1), Some(2), Some(3)]
        );
        // A stripe from chunk 1 that ends inside chunk 2: its short end
        // is not the NAR's last chunk.
        assert_eq!(slots(C as u64, &[C, 5000]), [Some(1), None]);
        // From an offset off the boundaries (a failover): none.
        assert_eq!(slots(4096, &[C, C, C - 4096 + 100]), [None, None, None]);
    }

    #[test]
    fn summaries_go_in_bounded_parts_the_last_complete() {
        let batch = protocol::MAX_SUMMARY_BATCH;
        let added: Vec<u32> = (0..(batch as u32 * 2 + 5)).collect();
        let parts = summary_parts(&added, &[1, 2]);
        assert_eq!(parts.len(), 4);
        let mut got: Vec<u32> = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let Response::SummaryPart {
                added,
                removed,
                complete,
            } = part
            else {
                panic!("{part:?}")
            };
            assert!(added.len() + removed.len() <= batch);
            assert_eq!(*complete, i == 3);
            got.extend(added);
            // Each frame decodes within the limits.
            let frame = part.encode();
            assert_eq!(Response::decode(&frame[4..]).as_ref(), Ok(part));
        }
        assert_eq!(got, added);
        assert_eq!(
            summary_parts(&[], &[]),
            vec![Response::SummaryPart {
                added: vec![],
                removed: vec![],
                complete: true
            }]
        );
    }
}
