//! Where a holder writes its answer to a NAR request: a QUIC stream (each
//! piece handed over without a copy) or a bulk connection (TLS on TCP,
//! protocol version 5). The serving code is the same for both.

use std::future::Future;
use std::io::IoSlice;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::mesh::pace::LinkSample;

/// The reader went away (or the connection broke) before all was written.
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
        self.write_chunk(bytes).await.map_err(|_| Gone)
    }
}

/// A bulk connection's write half.
pub struct BulkSink<S>(pub S);

impl<S: BulkIo> NarSink for BulkSink<S> {
    async fn put(&mut self, bytes: Bytes) -> Result<(), Gone> {
        self.0.write_all(&bytes).await.map_err(|_| Gone)
    }

    /// One vectored write for a frame's header and payload: TLS makes
    /// records across the parts, and a chunk goes to the socket in one
    /// call rather than a tiny record for its header and then the rest.
    async fn put_all(&mut self, parts: Vec<Bytes>) -> Result<(), Gone> {
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        IoSlice::advance_slices(&mut rest, 0);
        while !rest.is_empty() {
            match self.0.write_vectored(rest).await {
                Ok(0) | Err(_) => return Err(Gone),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
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

    struct Pipe(DuplexStream);

    impl AsyncRead for Pipe {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Pipe {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    impl BulkIo for Pipe {
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
        let mut sink = BulkSink(Pipe(near));
        assert!(sink.put_all(parts).await.is_ok());
        drop(sink);
        assert_eq!(reader.await.expect("reader").expect("read"), want);
    }

    #[tokio::test]
    async fn a_frame_to_a_reader_that_left_is_gone() {
        let (near, far) = tokio::io::duplex(1000);
        drop(far);
        let mut sink = BulkSink(Pipe(near));
        let parts = vec![Bytes::from(vec![1u8; 4000])];
        assert!(sink.put_all(parts).await.is_err());
    }
}
