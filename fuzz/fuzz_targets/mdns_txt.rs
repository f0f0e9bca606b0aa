//! An mDNS TXT record from anyone on the LAN, as `key=value` strings (the
//! input is split at NUL bytes into entries and at the first `=`): parsed
//! with a limit per value, never a panic; what parses round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixmesh::mesh::discovery::txt::{parse_txt, to_txt};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let props: Vec<(String, String)> = text
        .split('\0')
        .map(|entry| match entry.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (entry.to_string(), String::new()),
        })
        .collect();
    if let Ok(a) = parse_txt(&props) {
        assert_eq!(parse_txt(&to_txt(&a)), Ok(a));
    }
});
