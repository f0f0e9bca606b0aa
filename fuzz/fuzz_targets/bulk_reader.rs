//! What a holder sends on a bulk connection after `NarFollows` (protocol
//! versions 5 to 8), read as the asker reads it (`NarReader::bulk`): any
//! bytes end in the NAR's bytes then the end, the holder's `DONE`, its stop
//! code or an error, never a panic or a hang; the reader agrees frame by
//! frame with a plain walk over the same bytes; a request that asked to
//! keep the connection ends only at a `DONE` (on a plain connection the
//! holder's death closes it as cleanly as an end); and the connection goes
//! back to the pool of kept connections only after a `DONE` on a request
//! that asked to keep it (version 7).
#![no_main]

use std::io::Cursor;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nixmesh::mesh::bulk::Idle;
use nixmesh::mesh::identity::NodeId;
use nixmesh::mesh::nar_chunks::{self, ChunkHeader, Unpacker, HEADER, KEEP, LZ4};
use nixmesh::mesh::nar_reader::{BulkStream, NarReader, Recycle};

/// How a part ends.
#[derive(Debug, PartialEq)]
enum End {
    /// The connection closed at a frame boundary.
    Closed,
    /// The holder's `DONE`.
    Done,
    Stopped(u32),
    Broken,
}

/// The walk the reader must agree with: each frame's NAR bytes, then how
/// the part ended.
fn walk(mut rest: &[u8], level: u8) -> (Vec<Bytes>, End) {
    let mut unpacker = Unpacker::new(level);
    let mut parts = Vec::new();
    loop {
        if rest.is_empty() {
            return (parts, End::Closed);
        }
        if rest.len() < HEADER {
            return (parts, End::Broken);
        }
        let mut head = [0u8; HEADER];
        head.copy_from_slice(&rest[..HEADER]);
        rest = &rest[HEADER..];
        match nar_chunks::stop_code(head) {
            Some(nar_chunks::DONE) => return (parts, End::Done),
            Some(code) => return (parts, End::Stopped(code)),
            None => {}
        }
        let Ok(header) = ChunkHeader::parse(head) else {
            return (parts, End::Broken);
        };
        let n = header.wire_len as usize;
        if rest.len() < n {
            return (parts, End::Broken);
        }
        let payload = Bytes::copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        match unpacker.unpack(header, payload) {
            Ok(bytes) => parts.push(bytes),
            Err(_) => return (parts, End::Broken),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte says what the request asked for, the rest is what
    // the holder sent.
    let Some((&flags, sent)) = data.split_first() else {
        return;
    };
    let mut level = 1;
    if flags & 1 == 1 {
        level |= LZ4;
    }
    let keep = flags & 2 == 2;
    if keep {
        level |= KEEP;
    }
    let (expected, end) = walk(sent, level);

    let idle = Arc::new(Idle::<BulkStream>::default());
    let node = NodeId([7; 32]);
    let recycle = keep.then(|| Recycle {
        idle: idle.clone(),
        node,
    });
    let io: BulkStream = Box::new(Cursor::new(sent.to_vec()));
    let mut reader = NarReader::bulk(io, level, recycle, nar_chunks::chunk_buffers(), false);
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().build() else {
        return;
    };
    runtime.block_on(async {
        let mut got = Vec::new();
        let ended = loop {
            match reader.next().await {
                Ok(Some(bytes)) => got.push(bytes),
                Ok(None) => break true,
                Err(e) => {
                    if let End::Stopped(code) = end {
                        assert_eq!(e.holder_code(), Some(code));
                    }
                    break false;
                }
            }
        };
        assert_eq!(got, expected);
        assert_eq!(ended, end == End::Done || (end == End::Closed && !keep));
        if ended {
            assert!(matches!(reader.next().await, Ok(None)));
        }
        let wire = reader.wire_bytes().unwrap_or(0);
        assert!(wire <= sent.len() as u64);
    });
    let kept = idle.has(&node, Instant::now());
    assert_eq!(kept, keep && end == End::Done);
});
