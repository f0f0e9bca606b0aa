//! The one substituter Nix talks to, on localhost: `/nix-cache-info`,
//! narinfos raced across the mesh, and NARs relayed from peers with
//! failover. Plumbing between the route table, the resolver, the
//! prefetcher and the NAR relay. A narinfo request is answered 200 or 404,
//! never 5xx (Nix ≤ 2.31 aborts a whole substitution on a 5xx; 2.35 backs
//! off 60 s on a 503), within the race deadline once the mesh is up; in
//! the agent's first seconds the resolver first waits up to `WARMUP_WAIT`
//! (3 s) for a first usable peer.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::mpsc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fetch::plain::{PlainCache, PlainCaches};
use crate::fetch::prefetch::{Prefetched, Prefetcher};
use crate::fetch::relay::{self, FetchStats, Purpose};
use crate::fetch::resolver::{Found, Resolver};
use crate::fetch::upstream::{office, UpstreamFile, Upstreams};
use crate::nix::binary_cache;
use crate::nix::{narinfo, HashPart, NarInfo, Sha256Hash};
use crate::serve::byte_range::RangeAnswer;
use crate::serve::http::{self, Body};
use crate::serve::routes::{self, Route};

/// Chunks buffered between a peer stream and Nix.
const RELAY_DEPTH: usize = 8;

pub struct Substituter {
    resolver: Arc<Resolver>,
    pub fetch_stats: Arc<FetchStats>,
    pub prefetch: Arc<Prefetcher>,
    store_dir: String,
    priority: u32,
    tasks: TaskTracker,
}

impl Substituter {
    /// `prefetch_bytes`: memory for NARs fetched ahead of Nix (0: none).
    pub fn new(
        resolver: Arc<Resolver>,
        store_dir: String,
        priority: u32,
        prefetch_bytes: u64,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let fetch_stats = Arc::new(FetchStats::default());
        let prefetch = Prefetcher::new(
            resolver.clone(),
            fetch_stats.clone(),
            prefetch_bytes,
            tasks.clone(),
            shutdown,
        );
        Arc::new(Self {
            resolver,
            fetch_stats,
            prefetch,
            store_dir,
            priority,
            tasks,
        })
    }

    pub fn resolver(&self) -> &Arc<Resolver> {
        &self.resolver
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let head_only = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return http::empty(StatusCode::METHOD_NOT_ALLOWED),
        };
        match routes::route(req.uri().path()) {
            Route::CacheInfo => http::text(
                StatusCode::OK,
                "text/x-nix-cache-info",
                binary_cache::cache_info(&self.store_dir, self.priority),
            ),
            Route::NarInfo(hash) => match self.resolver.resolve(&hash).await {
                Some(found) => {
                    let text = match found.upstream {
                        // The upstream's file, compressed as it is, from here.
                        Some(file) => NarInfo {
                            url: binary_cache::upstream_url(&found.narinfo.info, &file.file_hash),
                            compression: file.compression,
                            file_hash: Some(file.file_hash),
                            file_size: Some(file.file_size),
                            info: found.narinfo.info,
                        }
                        .render(),
                        None => {
                            if !head_only {
                                self.prefetch.offer(&found);
                            }
                            binary_cache::narinfo_text(found.narinfo.info)
                        }
                    };
                    http::text(StatusCode::OK, narinfo::CONTENT_TYPE, text)
                }
                None => http::empty(StatusCode::NOT_FOUND),
            },
            Route::UpstreamFile { hash, file_hash } => {
                let Some(file) = self.find_upstream_file(&hash, &file_hash).await else {
                    return http::empty(StatusCode::NOT_FOUND);
                };
                let range = http::range_of(&req, file.file_size);
                // A plain cache's file comes from it directly; an upstream
                // cache's through the agent that downloads it for the office.
                let plain = self
                    .resolver
                    .plain()
                    .and_then(|p| Some((p.clone(), p.owner_of(&file)?)));
                if let Some((plain, cache)) = plain {
                    return match plain.source_of(&hash, cache, file).await {
                        Some((cache, file)) => {
                            self.plain_response(plain, cache, file, range, head_only)
                        }
                        None => http::empty(StatusCode::NOT_FOUND),
                    };
                }
                match self.resolver.upstreams() {
                    Some(upstreams) => {
                        self.upstream_response(upstreams.clone(), hash, file, range, head_only)
                    }
                    None => http::empty(StatusCode::NOT_FOUND),
                }
            }
            Route::Nar { hash, nar_hash } => {
                if !head_only {
                    if let Some(ahead) = self.prefetch.claim(&hash, &nar_hash).await {
                        let range = http::range_of(&req, ahead.nar.len() as u64);
                        return self.prefetched_response(ahead, range);
                    }
                }
                match self.find_nar(&hash, &nar_hash).await {
                    Some(found) => {
                        let range = http::range_of(&req, found.narinfo.info.nar_size);
                        self.nar_response(found, range, head_only)
                    }
                    None => http::empty(StatusCode::NOT_FOUND),
                }
            }
            Route::Refuse(status) => http::empty(status),
        }
    }

    /// The upstream file, checked on the way (`Upstreams::relay`). A range
    /// (Nix resuming a cut download) still reads the whole file, since the
    /// check needs every byte, and sends only the range; its last byte, if
    /// it is the file's, only once the file checked out.
    fn upstream_response(
        &self,
        upstreams: Arc<Upstreams>,
        hash: HashPart,
        file: UpstreamFile,
        range: RangeAnswer,
        head_only: bool,
    ) -> Response<Body> {
        let size = file.file_size;
        let window = range.window(size);
        let body = (!head_only && !window.is_empty()).then(|| {
            let (tx, rx) = mpsc::channel(RELAY_DEPTH);
            self.tasks.spawn(office::fetch_for_nix(
                self.resolver.mesh().clone(),
                upstreams,
                hash,
                file,
                tx,
            ));
            http::channel_body_window(rx, window)
        });
        http::nar(size, range, body)
    }

    /// A plain cache's file, checked on the way as an upstream's is.
    fn plain_response(
        &self,
        plain: Arc<PlainCaches>,
        cache: Arc<PlainCache>,
        file: UpstreamFile,
        range: RangeAnswer,
        head_only: bool,
    ) -> Response<Body> {
        let size = file.file_size;
        let window = range.window(size);
        let body = (!head_only && !window.is_empty()).then(|| {
            let (tx, rx) = mpsc::channel(RELAY_DEPTH);
            self.tasks.spawn(plain.relay(cache, file, tx));
            http::channel_body_window(rx, window)
        });
        http::nar(size, range, body)
    }

    /// The upstream file Nix asks for by the URL of a narinfo this agent
    /// gave it, perhaps long ago (Nix keeps narinfos for 30 days). If a
    /// peer has the path by now, the race finds that peer, not the file:
    /// the file is then looked up upstream on its own, as the URL promised.
    async fn find_upstream_file(
        &self,
        hash: &HashPart,
        file_hash: &Sha256Hash,
    ) -> Option<UpstreamFile> {
        let raced = self.resolver.resolve(hash).await.and_then(|f| f.upstream);
        let file = match raced {
            Some(file) => file,
            None => {
                if let Some(plain) = self.resolver.plain() {
                    let kept = plain.lookup(hash).await.map(|(_, file)| file);
                    if let Some(file) = kept.filter(|f| f.file_hash == *file_hash) {
                        return Some(file);
                    }
                }
                let upstreams = self.resolver.upstreams()?;
                office::narinfo_for_nix(self.resolver.mesh(), upstreams, hash)
                    .await?
                    .1
            }
        };
        (file.file_hash == *file_hash).then_some(file)
    }

    /// Peers holding the NAR Nix asks for. None if only an upstream has
    /// the path by now (a narinfo Nix kept from when a peer had it): the
    /// agent serves upstream files only as they are, compressed.
    async fn find_nar(&self, hash: &HashPart, nar_hash: &Sha256Hash) -> Option<Found> {
        let found = self.resolver.resolve(hash).await?;
        (found.narinfo.info.nar_hash == *nar_hash && !found.holders.is_empty()).then_some(found)
    }

    /// A NAR fetched ahead and verified: one line in the log, as for a
    /// streamed one.
    fn prefetched_response(&self, ahead: Prefetched, range: RangeAnswer) -> Response<Body> {
        let size = ahead.nar.len() as u64;
        let window = range.window(size);
        self.fetch_stats.completed.inc();
        tracing::info!(path = %ahead.path, peer = %ahead.peer, peers = 1, bytes = size, prefetched = true, "substituted");
        let part = ahead.nar.slice(window.start as usize..window.end as usize);
        http::nar(size, range, Some(http::full_body(part)))
    }

    fn nar_response(&self, found: Found, range: RangeAnswer, head_only: bool) -> Response<Body> {
        let size = found.narinfo.info.nar_size;
        let window = range.window(size);
        let body = (!head_only && !window.is_empty()).then(|| {
            let (tx, rx) = mpsc::channel(RELAY_DEPTH);
            self.tasks.spawn(relay::relay(
                self.resolver.clone(),
                self.fetch_stats.clone(),
                found,
                window,
                tx,
                Purpose::Nix,
            ));
            http::channel_body(rx)
        });
        http::nar(size, range, body)
    }
}
