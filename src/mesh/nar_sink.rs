//! Where a holder writes its answer to a NAR request: a QUIC stream (each
//! piece handed over without a copy) or a bulk connection (TLS on TCP,
//! protocol version 5). The serving code is the same for both.

use std::future::Future;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// The reader went away (or the connection broke) before all was written.
#[derive(Debug)]
pub struct Gone;

pub trait NarSink: Send {
    fn put(&mut self, bytes: Bytes) -> impl Future<Output = Result<(), Gone>> + Send;
}

impl NarSink for quinn::SendStream {
    async fn put(&mut self, bytes: Bytes) -> Result<(), Gone> {
        self.write_chunk(bytes).await.map_err(|_| Gone)
    }
}

/// A bulk connection's write half.
pub struct BulkSink<S>(pub S);

impl<S: AsyncWrite + Unpin + Send> NarSink for BulkSink<S> {
    async fn put(&mut self, bytes: Bytes) -> Result<(), Gone> {
        self.0.write_all(&bytes).await.map_err(|_| Gone)
    }
}
