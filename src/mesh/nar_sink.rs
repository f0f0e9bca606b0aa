//! Where a holder writes its answer to a NAR request: a QUIC stream (each
//! piece handed over without a copy) or a bulk connection (TLS on TCP,
//! protocol version 5). The serving code is the same for both.

use std::future::Future;
use std::io::IoSlice;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::mesh::pace::LinkSample;
use crate::mesh::protocol;

/// A bulk connection whose reader takes nothing for this long is given up,
/// and what TLS holds for it freed (a frame, `bulk::SEND_BUFFER`). An asker
/// stops reading only while Nix does, for moments; one that was cut off
/// asks again from the offset it reached.
pub const WRITE_STALL: Duration = Duration::from_secs(60);

/// The reader went away (or the connection broke, or stalled for
/// `WRITE_STALL`) before all was written.
#[derive(Debug)]
pub struct Gone;

pub trait NarSink: Send {
    fn put(&mut self, bytes: Bytes) -> impl Future<Output = Result<(), Gone>> + Send;

    /// `parts` one after another, as one write where the transport can.
    fn put_all(&mut self, parts: Vec<Bytes>) -> impl Future<Output = Result<(), Gone>> + Send {
        async move {
            for part in parts {
                self.put(part).await?;
            }
            Ok(())
        }
    }

    /// What the transport says about the link now, where it can tell.
    fn link_sample(&self) -> Option<LinkSample> {
        None
    }
}

/// A bulk connection as the holder sees it: bytes both ways, and what its
/// TCP connection measures of the link.
pub trait BulkIo: AsyncRead + AsyncWrite + Unpin + Send {
    fn link_sample(&self) -> Option<LinkSample>;
}

impl NarSink for quinn::SendStream {
    async fn put(&mut self, bytes: Bytes) -> Result<(), Gone> {
        write_or_reset(self, bytes, WRITE_STALL).await
    }
}

/// Writes `bytes` to a QUIC stream unless its reader leaves no room for
/// them for `stall`: the stream is then reset (`code::TIMEOUT`), which
/// tells the reader and ends the serve that holds one of the holder's NAR
/// slots. (The connection's keep-alives go on regardless, so nothing else
/// would end it.)
async fn write_or_reset(
    send: &mut quinn::SendStream,
    bytes: Bytes,
    stall: Duration,
) -> Result<(), Gone> {
    match tokio::time::timeout(stall, send.write_chunk(bytes)).await {
        Ok(written) => written.map_err(|_| Gone),
        Err(_) => {
            let _ = send.reset(protocol::code::TIMEOUT.into());
            Err(Gone)
        }
    }
}

/// A bulk connection's write half.
pub struct BulkSink<S>(pub S);

impl<S: BulkIo> BulkSink<S> {
    /// Sends what TLS still holds.
    pub async fn flush(&mut self) -> Result<(), Gone> {
        within_stall(self.0.flush()).await
    }

    /// Says goodbye (TLS close) and closes the write side.
    pub async fn close(&mut self) -> Result<(), Gone> {
        within_stall(self.0.shutdown()).await
    }
}

/// `write` unless it takes longer than `WRITE_STALL`.
async fn within_stall<T>(write: impl Future<Output = std::io::Result<T>>) -> Result<T, Gone> {
    match tokio::time::timeout(WRITE_STALL, write).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(_)) | Err(_) => Err(Gone),
    }
}

impl<S: BulkIo> NarSink for BulkSink<S> {
    async fn put(&mut self, bytes: Bytes) -> Result<(), Gone> {
        within_stall(self.0.write_all(&bytes)).await
    }

    /// One vectored write for a frame's header and payload: TLS makes
    /// records across the parts, and a chunk goes to the socket in one
    /// call rather than a tiny record for its header and then the rest.
    async fn put_all(&mut self, parts: Vec<Bytes>) -> Result<(), Gone> {
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        IoSlice::advance_slices(&mut rest, 0);
        while !rest.is_empty() {
            match within_stall(self.0.write_vectored(rest)).await? {
                0 => return Err(Gone),
                n => IoSlice::advance_slices(&mut rest, n),
            }
        }
        Ok(())
    }

    fn link_sample(&self) -> Option<LinkSample> {
        self.0.link_sample()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, DuplexStream};

    impl BulkIo for DuplexStream {
        fn link_sample(&self) -> Option<LinkSample> {
            None
        }
    }

    #[tokio::test]
    async fn a_frame_written_at_once_arrives_whole_across_short_writes() {
        // The pipe takes 1000 bytes at a time: every write is short.
        let (near, mut far) = tokio::io::duplex(1000);
        let parts: Vec<Bytes> = vec![
            Bytes::from_static(b"header"),
            Bytes::new(),
            Bytes::from((0..5000u32).map(|i| i as u8).collect::<Vec<u8>>()),
            Bytes::from_static(b"tail"),
        ];
        let want: Vec<u8> = parts.iter().flat_map(|p| p.to_vec()).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.map(|_| got)
        });
        let mut sink = BulkSink(near);
        assert!(sink.put_all(parts).await.is_ok());
        drop(sink);
        assert_eq!(reader.await.expect("reader").expect("read"), want);
    }

    #[tokio::test]
    async fn a_frame_to_a_reader_that_left_is_gone() {
        let (near, far) = tokio::io::duplex(1000);
        drop(far);
        let mut sink = BulkSink(near);
        let parts = vec![Bytes::from(vec![1u8; 4000])];
        assert!(sink.put_all(parts).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_reading_is_given_up_after_the_stall_limit() {
        let (near, _far) = tokio::io::duplex(1000);
        let mut sink = BulkSink(near);
        let started = tokio::time::Instant::now();
        let parts = vec![Bytes::from(vec![1u8; 4000])];
        assert!(sink.put_all(parts).await.is_err());
        assert_eq!(started.elapsed(), WRITE_STALL);
        assert!(sink.put(Bytes::from(vec![1u8; 4000])).await.is_err());
        // A reader that takes what was written lets the sink go on.
        let (near, mut far) = tokio::io::duplex(1000);
        let mut sink = BulkSink(near);
        let reader = tokio::spawn(async move {
            tokio::time::sleep(WRITE_STALL / 2).await;
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.map(|_| got.len())
        });
        assert!(sink.put(Bytes::from(vec![1u8; 4000])).await.is_ok());
        assert!(sink.close().await.is_ok());
        drop(sink);
        assert_eq!(reader.await.expect("reader").expect("read"), 4000);
    }

    #[tokio::test]
    async fn a_quic_reader_that_takes_nothing_is_reset_with_timeout() {
        let link = crate::mesh::loopback::link(|_| {}).await;
        let (mut send, _recv) = link.dialler.open_bi().await.expect("stream");
        let piece = || Bytes::from(vec![7u8; 1 << 20]);
        // The first piece makes the stream known to the other end, which
        // then never reads: its window fills, and a write waits.
        write_or_reset(&mut send, piece(), Duration::from_secs(5))
            .await
            .expect("the window has room");
        let (_their_send, mut their_recv) = link.acceptor.accept_bi().await.expect("accepted");
        let stall = Duration::from_millis(300);
        let began = tokio::time::Instant::now();
        let mut sent = 1 << 20;
        let writes = async {
            loop {
                match write_or_reset(&mut send, piece(), stall).await {
                    Ok(()) => sent += 1 << 20,
                    Err(Gone) => break began.elapsed(),
                }
                assert!(sent <= 64 << 20, "the stream's window never filled");
            }
        };
        let given_up = tokio::time::timeout(Duration::from_secs(20), writes)
            .await
            .expect("a write to a reader that takes nothing still ends");
        assert!(given_up >= stall, "{given_up:?}");
        assert!(given_up < Duration::from_secs(10), "{given_up:?}");
        // The reader is told why, not left waiting for more.
        let mut buf = vec![0u8; 1 << 20];
        let reads = async {
            loop {
                match their_recv.read(&mut buf).await {
                    Ok(Some(_)) => continue,
                    other => break other,
                }
            }
        };
        let ended = tokio::time::timeout(Duration::from_secs(20), reads)
            .await
            .expect("the reader hears the stream's end");
        match ended {
            Err(e) => assert_eq!(
                crate::mesh::client::reset_code(&e),
                Some(protocol::code::TIMEOUT)
            ),
            Ok(None) => panic!("the stream ended as if whole"),
            Ok(Some(_)) => unreachable!(),
        }
    }
}
