//! HTTP/1.1 server plumbing shared by every listener (the binary-cache
//! endpoints and the admin API): the accept loop, connection limits,
//! shutdown, and response builders. Knows no routes.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::serve::byte_range::RangeAnswer;
use crate::serve::conn_slots::ConnSlots;
use crate::serve::write_stall::{self, WriteStall};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Open connections per listener; past it a new one takes the slot of the
/// one idle longest (`conn_slots`), or waits if all are answering.
const MAX_CONNECTIONS: usize = 1024;
/// Request head (line plus headers) size limit; real heads are under 1 KiB
/// (hyper's own minimum is 8 KiB).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// A client must send its request head within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

pub fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Empty::new().map_err(|e| match e {}).boxed());
    *resp.status_mut() = status;
    resp
}

pub fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let body: Bytes = body.into();
    let mut resp = Response::new(full_body(body));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// A NAR response for a NAR of `size` bytes as `range` asks for it:
/// headers only (`body` None, for HEAD and 416) or streamed from `body`,
/// which must hold exactly the bytes of `range`'s window. Every NAR
/// response says `Accept-Ranges: bytes`, so a modern Nix resumes a cut-off
/// download instead of starting again.
pub fn nar(size: u64, range: RangeAnswer, body: Option<Body>) -> Response<Body> {
    let status = match range {
        RangeAnswer::Whole => StatusCode::OK,
        RangeAnswer::Part { .. } => StatusCode::PARTIAL_CONTENT,
        RangeAnswer::Unsatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
    };
    let mut resp = match body {
        Some(b) if range != RangeAnswer::Unsatisfiable => Response::new(b),
        _ => empty(status),
    };
    *resp.status_mut() = status;
    let window = range.window(size);
    let headers = resp.headers_mut();
    headers.insert(
        hyper::header::ACCEPT_RANGES,
        hyper::header::HeaderValue::from_static("bytes"),
    );
    headers.insert(
        hyper::header::CONTENT_LENGTH,
        (window.end - window.start).into(),
    );
    if let Some(Ok(v)) = range.content_range(size).map(|v| v.parse()) {
        headers.insert(hyper::header::CONTENT_RANGE, v);
    }
    if range != RangeAnswer::Unsatisfiable {
        headers.insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/x-nix-nar"),
        );
    }
    resp
}

/// What a request's `Range` header asks of a NAR of `size` bytes.
pub fn range_of<B>(req: &Request<B>, size: u64) -> RangeAnswer {
    RangeAnswer::of(
        req.headers()
            .get(hyper::header::RANGE)
            .map(|v| v.as_bytes()),
        size,
    )
}

/// A body that is all there in memory.
pub fn full_body(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|e| match e {}).boxed()
}

/// A body fed by a channel of chunks; an `Err` item aborts the response
/// before its end, so the client sees a truncated transfer, never a
/// complete wrong one.
pub fn channel_body<E>(rx: tokio::sync::mpsc::Receiver<Result<Bytes, E>>) -> Body
where
    E: std::error::Error + Send + Sync + 'static,
{
    channel_body_limited(rx, u64::MAX)
}

/// Like `channel_body`, ending after `limit` bytes (the rest of the
/// channel is dropped, which stops its producer).
pub fn channel_body_limited<E>(
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, E>>,
    limit: u64,
) -> Body
where
    E: std::error::Error + Send + Sync + 'static,
{
    channel_body_window(rx, 0..limit)
}

/// Like `channel_body`, for the bytes `window` of what the channel
/// carries: the ones before it are read and dropped (a producer that
/// checks the whole still sees them all), and the body ends at its end.
pub fn channel_body_window<E>(
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, E>>,
    window: std::ops::Range<u64>,
) -> Body
where
    E: std::error::Error + Send + Sync + 'static,
{
    let skip = window.start;
    let left = window.end.saturating_sub(window.start);
    let stream =
        futures_util::stream::unfold((rx, skip, left), |(mut rx, mut skip, left)| async move {
            if left == 0 {
                return None;
            }
            loop {
                let item = match rx.recv().await? {
                    Ok(mut chunk) => {
                        if skip >= chunk.len() as u64 {
                            skip -= chunk.len() as u64;
                            continue;
                        }
                        let _ = chunk.split_to(skip as usize);
                        skip = 0;
                        if chunk.len() as u64 > left {
                            chunk.truncate(left as usize);
                        }
                        let left = left - chunk.len() as u64;
                        return Some((Ok(Frame::data(chunk)), (rx, skip, left)));
                    }
                    Err(e) => Err(Box::new(e) as BoxError),
                };
                return Some((item, (rx, skip, left)));
            }
        });
    BodyExt::boxed(StreamBody::new(stream))
}

/// Serves `handler` on `listener` until `shutdown` fires; then stops
/// accepting, closes idle connections, and returns once requests in flight
/// have finished.
pub async fn serve<F, Fut>(listener: TcpListener, handler: F, shutdown: CancellationToken)
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let live = Arc::new(ConnSlots::default());
    let mut conns = tokio::task::JoinSet::new();
    loop {
        // Reap finished connection tasks so the set stays small.
        while conns.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !live.evict_idlest() {
                    tracing::debug!(%peer, "every HTTP connection is answering a request; this one waits");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        let live = live.clone();
        conns.spawn(async move {
            let _permit = permit;
            let (id, me) = live.join();
            let service = {
                let (live, me) = (live.clone(), me.clone());
                hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    let busy = live.busy(&me);
                    async move {
                        let resp = handler(req, peer).await;
                        // Busy until the body is sent.
                        Ok::<_, Infallible>(resp.map(|inner| BusyBody { inner, _busy: busy }))
                    }
                })
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(
                    TokioIo::new(WriteStall::new(stream, write_stall::LIMIT)),
                    service,
                );
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
                // Idle, and its slot is wanted: dropped, not drained (it
                // may be half-way through a slow request head).
                _ = me.evicted.notified() => {
                    tracing::debug!(%peer, "closed an idle HTTP connection to make room");
                }
            }
            live.leave(id);
        });
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// A response body that keeps its connection marked busy until it is
/// sent or dropped; its length and end are the inner body's (so a
/// response keeps its Content-Length).
struct BusyBody {
    inner: Body,
    _busy: crate::serve::conn_slots::Busy,
}

impl hyper::body::Body for BusyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_a_body_loses_its_connection() {
        const BODY: usize = 64 << 20;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bound");
        let addr = listener.local_addr().expect("address");
        let shutdown = CancellationToken::new();
        let handler = |_req: Request<Incoming>, _peer: SocketAddr| async {
            text(StatusCode::OK, "application/x-nix-nar", vec![0u8; BODY])
        };
        tokio::spawn(serve(listener, handler, shutdown.clone()));
        let mut client = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connected");
        client
            .write_all(b"GET /nar HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("asked");
        // Nothing read for longer than the limit: the server gives up.
        tokio::time::sleep(write_stall::LIMIT + Duration::from_secs(60)).await;
        let mut got = 0;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        assert!(got > 0, "the response began");
        assert!(
            got < BODY,
            "the connection was closed mid-body ({got} bytes)"
        );
        shutdown.cancel();
    }

    async fn collect(body: Body) -> (Vec<u8>, bool) {
        let mut body = body;
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => out.extend_from_slice(&f.into_data().unwrap_or_default()),
                Err(_) => return (out, false),
            }
        }
        (out, true)
    }

    #[test]
    fn a_busy_body_keeps_the_length_of_its_body() {
        use hyper::body::Body as _;
        let slots = ConnSlots::default();
        let (_, conn) = slots.join();
        let body = BusyBody {
            inner: full_body(Bytes::from_static(b"0123456789")),
            _busy: slots.busy(&conn),
        };
        assert_eq!(body.size_hint().exact(), Some(10));
        assert!(!slots.evict_idlest(), "busy while its body lives");
        drop(body);
        assert!(slots.evict_idlest(), "idle once it is gone");
    }

    #[tokio::test]
    async fn a_window_skips_what_comes_before_it_and_ends_at_its_end() {
        let all: Vec<u8> = (0u8..30).collect();
        for (window, chunk) in [(5..15, 10), (0..30, 7), (29..30, 4), (10..10, 3)] {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
            for c in all.chunks(chunk) {
                tx.send(Ok(Bytes::copy_from_slice(c))).await.unwrap();
            }
            drop(tx);
            let (got, whole) = collect(channel_body_window(rx, window.clone())).await;
            assert!(whole);
            assert_eq!(
                got,
                all[window.start as usize..window.end as usize],
                "{window:?}"
            );
        }
        // An error inside the window cuts the body off.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        tx.send(Ok(Bytes::from_static(b"abcdef"))).await.unwrap();
        tx.send(Err(std::io::Error::other("bad file")))
            .await
            .unwrap();
        drop(tx);
        let (got, whole) = collect(channel_body_window(rx, 2..20)).await;
        assert_eq!((got.as_slice(), whole), (&b"cdef"[..], false));
    }
}
