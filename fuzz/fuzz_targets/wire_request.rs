//! A request frame body from a peer (anyone on the LAN, the mesh is open by
//! default): decoded with limits, never a panic; what decodes re-encodes to
//! the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixmesh::mesh::protocol::{body_len, Request, MAX_REQUEST_FRAME};

fuzz_target!(|data: &[u8]| {
    if let Some(header) = data.get(..4) {
        let header: [u8; 4] = header.try_into().unwrap_or([0; 4]);
        let _ = body_len(header, MAX_REQUEST_FRAME);
    }
    if let Ok(req) = Request::decode(data) {
        let frame = req.encode();
        assert_eq!(
            &frame[4..],
            data,
            "a decoded request re-encodes to its bytes"
        );
    }
});
