//! What a local client sends the substituter or the LAN binary cache: the
//! request path (routed) and a `Range` header (for any NAR size). Never a
//! panic, never a server error, and a range never leaves the NAR.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixmesh::serve::byte_range::RangeAnswer;
use nixmesh::serve::routes::{route, Route};

fuzz_target!(|data: &[u8]| {
    let (size, rest) = match data.split_first_chunk::<8>() {
        Some((size, rest)) => (u64::from_le_bytes(*size), rest),
        None => (1, data),
    };
    let (path, range) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    if let Route::Refuse(status) = route(&String::from_utf8_lossy(path)) {
        assert!(status.is_client_error(), "{status}");
    }
    let size = size.max(1);
    let answer = RangeAnswer::of(range, size);
    let window = answer.window(size);
    assert!(window.start <= window.end && window.end <= size);
});
