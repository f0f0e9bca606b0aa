//! A response frame body from a peer: decoded with limits, never a panic;
//! what decodes re-encodes and decodes to the same response.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixmesh::mesh::protocol::Response;

fuzz_target!(|data: &[u8]| {
    if let Ok(resp) = Response::decode(data) {
        let frame = resp.encode();
        assert_eq!(Response::decode(&frame[4..]).as_ref(), Ok(&resp));
    }
});
