//! HTTP and HTTPS requests to upstream caches: hyper's client on rustls
//! (ring), trusting Mozilla's roots and, if configured, a private CA. Every
//! answer is bounded in time (`timeout` until the head) and in size (text
//! answers up to a limit; files are streamed by the caller).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("upstream.ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("bad URL {0:?}")]
    Url(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Request(String),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("answer over {0} bytes")]
    TooLong(usize),
}

#[derive(Clone)]
pub struct UpstreamClient {
    inner: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl UpstreamClient {
    pub fn new(ca_file: Option<&Path>) -> Result<Self, UpstreamError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            let bad = |reason: String| UpstreamError::CaFile {
                path: path.display().to_string(),
                reason,
            };
            let mut added = 0;
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
                let cert = cert.map_err(|e| bad(e.to_string()))?;
                roots.add(cert).map_err(|e| bad(e.to_string()))?;
                added += 1;
            }
            if added == 0 {
                return Err(bad("holds no PEM certificate".into()));
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| UpstreamError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(Self { inner })
    }

    /// GET `url`; the response head within `timeout`.
    pub async fn get(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.get_from(url, 0, timeout).await
    }

    /// GET `url` from byte `from` on (a `Range` request when `from` > 0;
    /// a server may still answer 200 with the whole file).
    pub async fn get_from(
        &self,
        url: &str,
        from: u64,
        timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut req = Request::get(url).header(
            hyper::header::USER_AGENT,
            concat!("nixmesh/", env!("CARGO_PKG_VERSION")),
        );
        if from > 0 {
            req = req.header(hyper::header::RANGE, format!("bytes={from}-"));
        }
        let req = req
            .body(Empty::new())
            .map_err(|_| UpstreamError::Url(url.to_string()))?;
        match tokio::time::timeout(timeout, self.inner.request(req)).await {
            Err(_) => Err(UpstreamError::Timeout(timeout)),
            Ok(Err(e)) => Err(UpstreamError::Request(e.to_string())),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// A text answer of at most `limit` bytes, whole within `timeout`;
    /// `None` for 404 (and 403, which S3-style caches send for a missing
    /// file).
    pub async fn get_text(
        &self,
        url: &str,
        limit: usize,
        timeout: Duration,
    ) -> Result<Option<String>, UpstreamError> {
        let work = async {
            let resp = self.get(url, timeout).await?;
            match resp.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND | StatusCode::FORBIDDEN => return Ok(None),
                s => return Err(UpstreamError::Status(s)),
            }
            let body = Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|_| UpstreamError::TooLong(limit))?
                .to_bytes();
            String::from_utf8(body.to_vec())
                .map(Some)
                .map_err(|_| UpstreamError::Request("answer is not UTF-8".into()))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| UpstreamError::Timeout(timeout))?
    }
}
