//! A peer's summary stream (protocol 4): frames cut from the input by their
//! length headers, decoded with the response limits and applied to the
//! summaries table as the feed does, the clock advancing by the input.
//! Never a panic; a peer's set never passes its limit; what a part adds
//! is listed once the summary is complete, what it removes is not.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use nixmesh::mesh::identity::NodeId;
use nixmesh::mesh::protocol::{body_len, Response, MAX_RESPONSE_FRAME};
use nixmesh::mesh::summaries::{Summaries, Verdict, MAX_PATHS_PER_PEER};

fuzz_target!(|data: &[u8]| {
    let node = NodeId([7; 32]);
    let mut table = Summaries::new();
    let t0 = Instant::now();
    let mut now = t0;
    let mut generation = table.start(node, now);
    let mut rest = data;
    while rest.len() >= 5 {
        // One byte of clock (ms), then a frame.
        now += Duration::from_millis(u64::from(rest[0]));
        let header = [rest[1], rest[2], rest[3], rest[4]];
        rest = &rest[5..];
        let Ok(len) = body_len(header, MAX_RESPONSE_FRAME) else {
            return;
        };
        if rest.len() < len {
            return;
        }
        let (body, tail) = rest.split_at(len);
        rest = tail;
        let Ok(Response::SummaryPart {
            added,
            removed,
            complete,
        }) = Response::decode(body)
        else {
            continue;
        };
        match table.apply(&node, generation, &added, &removed, complete, now) {
            Ok(()) => {
                let view = table.view(&node, now).expect("a summary under way");
                assert!(view.paths as usize <= MAX_PATHS_PER_PEER);
                if view.complete {
                    for fp in removed.iter().filter(|fp| !added.contains(fp)) {
                        assert_eq!(table.verdict(&node, *fp), Verdict::DoesNotHold);
                    }
                    for fp in &added {
                        assert_eq!(table.verdict(&node, *fp), Verdict::MayHold);
                    }
                }
            }
            Err(_) => {
                // Ended: asked about every path until it starts over.
                assert_eq!(table.verdict(&node, 0), Verdict::Unknown);
                generation = table.start(node, now);
            }
        }
    }
});
