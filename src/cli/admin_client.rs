//! The one request the CLI makes: GET a path from an agent's admin API
//! (or its substituter), bounded in time and size.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest admin answer read.
const MAX_ADMIN_BODY: usize = 16 << 20;

/// GET `path` from the admin API and return the body.
pub async fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<Vec<u8>> {
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(admin)
            .await
            .with_context(|| {
                format!("is the agent running? cannot reach its admin API at {admin}")
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, admin.to_string())
            .body(Empty::<bytes::Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        if !resp.status().is_success() {
            bail!("admin API answered {} for {path}", resp.status());
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_ADMIN_BODY)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the admin answer: {e}"))?
            .to_bytes();
        Ok(body.to_vec())
    };
    tokio::time::timeout(ADMIN_TIMEOUT, fetch)
        .await
        .map_err(|_| anyhow!("the admin API at {admin} did not answer within {ADMIN_TIMEOUT:?}"))?
}
