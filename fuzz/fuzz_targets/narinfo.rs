//! narinfo text from a peer or an upstream cache: parsed with limits, never
//! a panic; what parses renders and parses back to the same narinfo.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixmesh::nix::NarInfo;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = NarInfo::parse("/nix/store", text) {
        assert_eq!(NarInfo::parse("/nix/store", &n.render()).as_ref(), Ok(&n));
    }
});
