//! Keeps one peer's summary (`summaries`) current: on a connection of
//! protocol 4, asks the peer for its summary on one stream and applies
//! every part it sends for as long as the connection lasts. A malformed,
//! oversized or too frequent part resets the stream and counts against
//! the peer, which is then asked about every path until a later
//! subscription completes. The mesh starts one feed per connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::mesh::identity::NodeId;
use crate::mesh::node::Mesh;
use crate::mesh::protocol::{self, code, Request, Response};
use crate::mesh::transport::{self, FrameReadError};

/// How long the peer may take to send the first parts of its summary (its
/// agent reads its whole store first, after a start).
const FIRST_PARTS_WITHIN: Duration = Duration::from_secs(60);
/// A subscription that failed is tried again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// A peer that keeps no summary is asked again after this long.
const NO_SUMMARY_RETRY: Duration = Duration::from_secs(60);

/// Why one subscription ended.
enum Ended {
    /// The summary was wanted anew (its answers disagreed with it).
    Refresh,
    /// The peer keeps no summary.
    NoSummary,
    /// The stream or connection ended, or the peer broke the rules.
    Failed(String),
}

/// Follows `node`'s summary over `conn` until `cancel` fires or the
/// connection closes; `refresh` starts it over.
pub async fn run(
    mesh: Arc<Mesh>,
    node: NodeId,
    conn: quinn::Connection,
    cancel: CancellationToken,
    refresh: Arc<Notify>,
) {
    loop {
        // A feed cancelled before it started must not start: it would
        // take the place of the feed that replaced it, whose parts would
        // then be ignored. Checked under the same lock as the start, so a
        // replacement (spawned after the cancel) always starts later.
        let started =
            mesh.summaries(|s| (!cancel.is_cancelled()).then(|| s.start(node, Instant::now())));
        let Some(generation) = started else {
            return;
        };
        let ended = tokio::select! {
            _ = cancel.cancelled() => Ended::Failed("cancelled".into()),
            _ = refresh.notified() => Ended::Refresh,
            ended = follow(&mesh, node, &conn, generation) => ended,
        };
        mesh.summaries(|s| s.end(&node, generation));
        if cancel.is_cancelled() || conn.close_reason().is_some() {
            return;
        }
        let wait = match ended {
            Ended::Refresh => {
                tracing::info!(peer = %node, "its answers disagree with its summary; fetching the summary again");
                Duration::ZERO
            }
            Ended::NoSummary => NO_SUMMARY_RETRY,
            Ended::Failed(reason) => {
                tracing::debug!(peer = %node, %reason, "summary subscription ended");
                RETRY_AFTER
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = conn.closed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn follow(
    mesh: &Arc<Mesh>,
    node: NodeId,
    conn: &quinn::Connection,
    generation: u64,
) -> Ended {
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return Ended::Failed(e.to_string()),
    };
    if let Err(e) = send.write_all(&Request::Summary.encode()).await {
        return Ended::Failed(e.to_string());
    }
    let _ = send.finish();
    mesh.count(&node, |c| c.requests_made += 1);
    let mut complete = false;
    loop {
        // Changes come whenever the peer's store changes: no limit on the
        // wait once the summary is whole.
        let wait = if complete {
            Duration::MAX
        } else {
            FIRST_PARTS_WITHIN
        };
        let body = match transport::read_frame(&mut recv, protocol::MAX_RESPONSE_FRAME, wait).await
        {
            Ok(body) => body,
            Err(FrameReadError::Frame(e)) => {
                return broke(mesh, node, &mut recv, e.code(), e.to_string())
            }
            Err(e) => return Ended::Failed(e.to_string()),
        };
        let (added, removed, last) = match Response::decode(&body) {
            Ok(Response::SummaryPart {
                added,
                removed,
                complete,
            }) => (added, removed, complete),
            Ok(Response::NotFound) => return Ended::NoSummary,
            Ok(Response::Error { code, message }) => {
                return Ended::Failed(format!("peer error {code}: {message}"))
            }
            Ok(_) => {
                return broke(
                    mesh,
                    node,
                    &mut recv,
                    code::MALFORMED,
                    "not a summary part".into(),
                )
            }
            Err(e) => return broke(mesh, node, &mut recv, e.code(), e.to_string()),
        };
        let applied =
            mesh.summaries(|s| s.apply(&node, generation, &added, &removed, last, Instant::now()));
        if let Err(e) = applied {
            let code = match e {
                crate::mesh::summaries::SummaryError::TooLarge => code::TOO_LARGE,
                crate::mesh::summaries::SummaryError::Flood => code::OVERLOADED,
            };
            return broke(mesh, node, &mut recv, code, e.to_string());
        }
        if last && !complete {
            complete = true;
            let paths = mesh.summaries(|s| s.view(&node, Instant::now()).map_or(0, |v| v.paths));
            tracing::debug!(peer = %node, paths, "summary complete");
        }
    }
}

/// The peer broke the protocol: stop its stream and count it.
fn broke(
    mesh: &Mesh,
    node: NodeId,
    recv: &mut quinn::RecvStream,
    code: u32,
    reason: String,
) -> Ended {
    tracing::warn!(peer = %node, %reason, "bad summary from peer; resetting the stream");
    let _ = recv.stop(code.into());
    mesh.count(&node, |c| c.errors += 1);
    Ended::Failed(reason)
}
