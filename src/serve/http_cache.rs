//! This host's store as a plain Nix binary cache over HTTP, for LAN machines
//! without an agent (a Mac, a CI runner). Off by default. Plumbing between
//! the route table, the store reader, the share policy and the NAR stream.
//! A narinfo request is answered 200 or 404, never 5xx: a 5xx makes Nix
//! abort the whole substitution.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use crate::nix::binary_cache;
use crate::nix::{narinfo, PathInfo};
use crate::serve::byte_range::RangeAnswer;
use crate::serve::http::{self, Body};
use crate::serve::routes::{self, Route};
use crate::store::shared::SharedStore;

pub struct HttpCache {
    shared: Arc<SharedStore>,
    priority: u32,
}

impl HttpCache {
    pub fn new(shared: Arc<SharedStore>, priority: u32) -> Arc<Self> {
        Arc::new(Self { shared, priority })
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let head_only = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return http::empty(StatusCode::METHOD_NOT_ALLOWED),
        };
        let resp = match routes::route(req.uri().path()) {
            Route::CacheInfo => http::text(
                StatusCode::OK,
                "text/x-nix-cache-info",
                binary_cache::cache_info(self.shared.store().store_dir(), self.priority),
            ),
            Route::NarInfo(hash) => match self.shared.info(hash).await {
                Some(info) => {
                    let text = binary_cache::narinfo_text(info);
                    http::text(StatusCode::OK, narinfo::CONTENT_TYPE, text)
                }
                None => http::empty(StatusCode::NOT_FOUND),
            },
            Route::Nar { hash, nar_hash } => match self.shared.info(hash).await {
                Some(info) if info.nar_hash == nar_hash => {
                    let range = http::range_of(&req, info.nar_size);
                    self.nar_response(info, range, head_only)
                }
                _ => http::empty(StatusCode::NOT_FOUND),
            },
            // Only the substituter relays upstream files, to its own Nix.
            Route::UpstreamFile { .. } => http::empty(StatusCode::NOT_FOUND),
            Route::Refuse(status) => http::empty(status),
        };
        // For HEAD, hyper sends the headers (Content-Length included) and
        // drops the body.
        resp
    }

    fn nar_response(&self, info: PathInfo, range: RangeAnswer, head_only: bool) -> Response<Body> {
        let size = info.nar_size;
        let window = range.window(size);
        let body = (!head_only && !window.is_empty()).then(|| {
            let stream = self.shared.nar(info, window.start, window.end);
            http::channel_body_limited(stream.into_receiver(), window.end - window.start)
        });
        http::nar(size, range, body)
    }
}
