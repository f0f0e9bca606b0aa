//! nix.conf text: whatever a host's file holds, reading it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixmesh::nix::conf::NixConf;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut included = 0;
    let conf = NixConf::parse(&text, &mut |_, _, _| included += 1);
    let _ = conf.trusted_public_keys();
    let _ = conf.list("substituters");
    let _ = conf.require_sigs();
});
