//! Asks another agent for things over an established QUIC connection: one
//! request per stream, every answer checked against the protocol's limits
//! and bounded in time. Returns what the peer said; judging whether to
//! believe it is the caller's business.

use std::time::{Duration, Instant};

use thiserror::Error;

use crate::mesh::nar_chunks;
use crate::mesh::nar_reader::NarReader;
use crate::mesh::protocol::{self, FrameError, Request, Response};
use crate::mesh::server::UpstreamLookup;
use crate::mesh::transport::{self, FrameReadError};
use crate::nix::narinfo::NarInfoError;
use crate::nix::{HashPart, NarInfo, Sha256Hash};

#[derive(Debug, Error)]
pub enum PeerError {
    #[error("opening a stream: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The peer gave no stream to ask on, or took no request on it, in
    /// time (a peer that is wedged, or grants no streams at all).
    #[error("no stream to ask on within {0:?}")]
    NoStream(Duration),
    #[error("sending the request: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("reading the answer: {0}")]
    Read(#[from] FrameReadError),
    #[error("malformed answer: {0}")]
    Malformed(#[from] FrameError),
    #[error("malformed narinfo: {0}")]
    BadNarInfo(#[from] NarInfoError),
    #[error("peer error {code}: {message}")]
    Remote { code: u32, message: String },
    #[error("unexpected answer {0}")]
    Unexpected(&'static str),
}

/// One request and the first frame of its answer, all within `timeout`:
/// opening the stream waits for the peer's stream credit, and sending
/// for its flow control, either of which a wedged peer may never give.
async fn exchange(
    conn: &quinn::Connection,
    req: &Request,
    timeout: Duration,
) -> Result<(quinn::RecvStream, Response), PeerError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let ask = async {
        let (mut send, recv) = conn.open_bi().await?;
        send.write_all(&req.encode()).await?;
        let _ = send.finish();
        Ok::<_, PeerError>(recv)
    };
    let mut recv = tokio::time::timeout_at(deadline, ask)
        .await
        .map_err(|_| PeerError::NoStream(timeout))??;
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let body = transport::read_frame(&mut recv, protocol::MAX_RESPONSE_FRAME, left).await?;
    let resp = Response::decode(&body).map_err(|e| {
        let _ = recv.stop(e.code().into());
        PeerError::Malformed(e)
    })?;
    if let Response::Error { code, message } = resp {
        return Err(PeerError::Remote { code, message });
    }
    Ok((recv, resp))
}

/// Round-trip time of one ping, and the name the peer gives itself.
pub async fn ping(
    conn: &quinn::Connection,
    timeout: Duration,
) -> Result<(Duration, String), PeerError> {
    let nonce = rand_nonce();
    let start = Instant::now();
    match exchange(conn, &Request::Ping { nonce }, timeout).await? {
        (_, Response::Pong { nonce: n, name }) if n == nonce => Ok((start.elapsed(), name)),
        _ => Err(PeerError::Unexpected("to ping")),
    }
}

/// The peer's narinfo for `hash`, parsed; `None` when it has no such path.
pub async fn path_info(
    conn: &quinn::Connection,
    store_dir: &str,
    hash: &HashPart,
    timeout: Duration,
) -> Result<Option<NarInfo>, PeerError> {
    let req = Request::PathInfo { hash: hash.clone() };
    match exchange(conn, &req, timeout).await? {
        (_, Response::NotFound) => Ok(None),
        (_, Response::PathInfo { narinfo }) => NarInfo::parse(store_dir, &narinfo)
            .map(Some)
            .map_err(PeerError::BadNarInfo),
        _ => Err(PeerError::Unexpected("to path info")),
    }
}

/// Which of `hashes` the peer would serve.
pub async fn have(
    conn: &quinn::Connection,
    hashes: Vec<HashPart>,
    timeout: Duration,
) -> Result<Vec<bool>, PeerError> {
    let n = hashes.len();
    match exchange(conn, &Request::Have { hashes }, timeout).await? {
        (_, Response::Have { present }) if present.len() == n => Ok(present),
        _ => Err(PeerError::Unexpected("to have")),
    }
}

/// Opens the NAR from `offset`: the stream then carries exactly
/// `nar_size - offset` bytes. `None` when the peer no longer has it.
pub async fn nar(
    conn: &quinn::Connection,
    hash: &HashPart,
    nar_hash: &Sha256Hash,
    offset: u64,
    timeout: Duration,
) -> Result<Option<(u64, quinn::RecvStream)>, PeerError> {
    let req = Request::Nar {
        hash: hash.clone(),
        nar_hash: *nar_hash,
        offset,
    };
    match exchange(conn, &req, timeout).await? {
        (_, Response::NotFound) => Ok(None),
        (recv, Response::NarFollows { nar_size }) => Ok(Some((nar_size, recv))),
        _ => Err(PeerError::Unexpected("to NAR")),
    }
}

/// Opens the NAR from `offset` for reading as plain bytes: in chunk
/// frames compressed at `level` if the connection speaks version 3 and a
/// level is given (`Some(0)`: frames, never compressed), else raw. The
/// reader then yields exactly `nar_size - offset` bytes from an honest
/// peer. `None` when the peer no longer has it.
pub async fn open_nar(
    conn: &quinn::Connection,
    hash: &HashPart,
    nar_hash: &Sha256Hash,
    offset: u64,
    level: Option<u8>,
    timeout: Duration,
) -> Result<Option<(u64, NarReader)>, PeerError> {
    open_nar_part(conn, hash, nar_hash, offset..u64::MAX, level, timeout).await
}

/// `open_nar` for the bytes in `part` only (its end at most the NAR's
/// size; `u64::MAX`: to the end). A part that ends early needs version 3.
pub async fn open_nar_part(
    conn: &quinn::Connection,
    hash: &HashPart,
    nar_hash: &Sha256Hash,
    part: std::ops::Range<u64>,
    level: Option<u8>,
    timeout: Duration,
) -> Result<Option<(u64, NarReader)>, PeerError> {
    let offset = part.start;
    let Some(level) = level.filter(|_| transport::version(conn) >= 3) else {
        if part.end != u64::MAX {
            return Err(PeerError::Unexpected(
                "a part of a NAR from an agent before version 3",
            ));
        }
        let opened = nar(conn, hash, nar_hash, offset, timeout).await?;
        return Ok(opened.map(|(size, recv)| (size, NarReader::raw(recv))));
    };
    let level = level.min(nar_chunks::MAX_LEVEL);
    let req = Request::NarChunks {
        hash: hash.clone(),
        nar_hash: *nar_hash,
        offset,
        end: part.end,
        level,
    };
    match exchange(conn, &req, timeout).await? {
        (_, Response::NotFound) => Ok(None),
        (recv, Response::NarFollows { nar_size }) => {
            Ok(Some((nar_size, NarReader::chunks(recv, level))))
        }
        _ => Err(PeerError::Unexpected("to NAR chunks")),
    }
}

/// (Version 3.) Tells the peer the NAR of `hash` it sent did not match
/// `nar_hash`. Nothing to do on a connection of an older version.
pub async fn bad_nar(
    conn: &quinn::Connection,
    hash: &HashPart,
    nar_hash: &Sha256Hash,
    timeout: Duration,
) -> Result<(), PeerError> {
    if transport::version(conn) < 3 {
        return Ok(());
    }
    let req = Request::BadNar {
        hash: hash.clone(),
        nar_hash: *nar_hash,
    };
    match exchange(conn, &req, timeout).await? {
        (_, Response::Noted) => Ok(()),
        _ => Err(PeerError::Unexpected("to a bad NAR report")),
    }
}

/// (Protocol version 2.) Asks the peer for an upstream file it downloads
/// for the office: the stream then carries exactly `file_size` bytes.
/// `None` when the peer has no such file to offer.
pub async fn upstream_file(
    conn: &quinn::Connection,
    hash: &HashPart,
    file_hash: &Sha256Hash,
    timeout: Duration,
) -> Result<Option<(u64, quinn::RecvStream)>, PeerError> {
    let req = Request::UpstreamFile {
        hash: hash.clone(),
        file_hash: *file_hash,
    };
    match exchange(conn, &req, timeout).await? {
        (_, Response::NotFound) => Ok(None),
        (recv, Response::FileFollows { file_size }) => Ok(Some((file_size, recv))),
        _ => Err(PeerError::Unexpected("to upstream file")),
    }
}

/// (Version 2.) What `conn`'s agent's upstream caches say about `hash`.
pub async fn upstream_narinfo(
    conn: &quinn::Connection,
    hash: &HashPart,
    timeout: Duration,
) -> Result<UpstreamLookup, PeerError> {
    let req = Request::UpstreamNarinfo { hash: hash.clone() };
    match exchange(conn, &req, timeout).await? {
        (_, Response::UpstreamHit { cache, narinfo }) => Ok(UpstreamLookup::Hit { cache, narinfo }),
        (_, Response::UpstreamMiss { asked }) => Ok(UpstreamLookup::Miss { asked }),
        _ => Err(PeerError::Unexpected("to upstream narinfo")),
    }
}

fn rand_nonce() -> u64 {
    let mut b = [0u8; 8];
    // A repeated nonce only weakens the pong check; no need to fail.
    let _ = getrandom::getrandom(&mut b);
    u64::from_le_bytes(b)
}

/// The stream error code a protocol reset carries, if that is what ended a read.
pub fn reset_code(e: &quinn::ReadError) -> Option<u32> {
    match e {
        quinn::ReadError::Reset(code) => u32::try_from(code.into_inner()).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::loopback;

    #[tokio::test]
    async fn a_peer_that_grants_no_stream_is_an_error_within_the_timeout() {
        let link = loopback::link(|t| {
            t.max_concurrent_bidi_streams(0u32.into());
        })
        .await;
        let began = Instant::now();
        let asked = tokio::time::timeout(
            Duration::from_secs(10),
            ping(&link.dialler, Duration::from_millis(300)),
        )
        .await
        .expect("a ping that cannot open a stream still ends");
        assert!(
            matches!(asked, Err(PeerError::NoStream(_))),
            "got {asked:?}"
        );
        assert!(
            began.elapsed() < Duration::from_secs(3),
            "{:?}",
            began.elapsed()
        );
    }

    #[tokio::test]
    async fn a_peer_that_answers_late_is_timed_from_the_request_not_the_stream() {
        let link = loopback::link(|_| {}).await;
        // The peer takes the request and answers only after the timeout.
        let acceptor = link.acceptor.clone();
        tokio::spawn(async move {
            if let Ok((mut send, _recv)) = acceptor.accept_bi().await {
                tokio::time::sleep(Duration::from_millis(800)).await;
                let pong = Response::Pong {
                    nonce: 1,
                    name: "late".to_string(),
                };
                let _ = send.write_all(&pong.encode()).await;
            }
        });
        let asked = ping(&link.dialler, Duration::from_millis(300)).await;
        assert!(
            matches!(asked, Err(PeerError::Read(FrameReadError::Timeout(_)))),
            "got {asked:?}"
        );
    }
}
