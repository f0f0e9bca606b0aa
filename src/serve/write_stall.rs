//! A connection whose client takes nothing of a response for `limit` is
//! given up: hyper has no write timeout, and a body waiting on a full
//! socket is never polled, so nothing else would end it, and every such
//! connection would hold one of the listener's slots for good (a local
//! program, or a LAN host on `[http_cache]`, could take them all). Only
//! time in which the socket refuses bytes counts; a response waiting for
//! its body's next bytes (a peer or upstream being slow) is bounded where
//! those bytes come from.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{sleep, Sleep};

/// As long as Nix's own `stalled-download-timeout` (300 s by default):
/// a client that is merely slow never comes near it.
pub const LIMIT: Duration = Duration::from_secs(300);

/// `io`, whose writes fail (`TimedOut`) once one has waited `limit` for
/// the socket to take anything.
pub struct WriteStall<T> {
    io: T,
    limit: Duration,
    /// Set while a write waits; cleared when the socket takes bytes.
    waiting: Option<Pin<Box<Sleep>>>,
}

impl<T> WriteStall<T> {
    pub fn new(io: T, limit: Duration) -> Self {
        Self {
            io,
            limit,
            waiting: None,
        }
    }

    /// What a write that got `polled` from the socket makes of it.
    fn judge<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.waiting = None;
            return polled;
        }
        let limit = self.limit;
        let timer = self.waiting.get_or_insert_with(|| Box::pin(sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        self.waiting = None;
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client took nothing for {limit:?}"),
        )))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteStall<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteStall<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.judge(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.judge(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.judge(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.judge(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_nothing_fails_the_write_after_the_limit() {
        let (near, _far) = tokio::io::duplex(1000);
        let mut io = WriteStall::new(near, LIMIT);
        let began = Instant::now();
        let err = io.write_all(&[1u8; 4000]).await.expect_err("nobody reads");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(began.elapsed(), LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_is_never_cut_off() {
        // It takes 1000 bytes every 200 s: each wait is under the limit,
        // though the whole write takes far longer than it.
        let (near, mut far) = tokio::io::duplex(1000);
        let mut io = WriteStall::new(near, LIMIT);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 1000];
            loop {
                tokio::time::sleep(Duration::from_secs(200)).await;
                match far.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            got.len()
        });
        let began = Instant::now();
        io.write_all(&[1u8; 10_000])
            .await
            .expect("a slow reader is read");
        io.shutdown().await.expect("closed");
        drop(io);
        assert!(began.elapsed() > LIMIT * 3, "{:?}", began.elapsed());
        assert_eq!(reader.await.expect("reader"), 10_000);
    }
}
