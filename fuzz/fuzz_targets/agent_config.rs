//! The agent's TOML config: a bad file gets an error naming file, line and
//! key, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixmesh::config::Config;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = Config::parse("fuzz.toml", &text) {
        assert!(e.to_string().starts_with("fuzz.toml:"), "{e}");
    }
});
