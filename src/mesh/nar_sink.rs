//! Where a holder writes its answer to a NAR request: a QUIC stream (each
//! piece handed over without a copy) or a bulk connection (TLS on TCP,
//! protocol version 5). The serving code is the same for both.

use std::future::Future;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::mesh::pace::LinkSample;

/// The reader went away (or the connection broke) before all was written.
#[derive(Debug)]
pub struct Gone;

pub trait NarSink: Send {
    fn put(&mut self, bytes: Bytes) -> impl Future<Output = Result<(), Gone>> + Send;

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

    fn link_sample(&self) -> Option<LinkSample> {
        self.0.link_sample()
    }
}
