//! Chunk frames of a compressed NAR from a peer (protocol version 3): each
//! header is checked before its payload is read, a payload never inflates
//! past its declared size, never a panic. And the other way: any bytes
//! packed at any level come back as they were.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nixmesh::mesh::nar_chunks::{ChunkHeader, Packer, Unpacker, HEADER, MAX_CHUNK, MAX_LEVEL};

fuzz_target!(|data: &[u8]| {
    let mut unpacker = Unpacker::new();
    let mut rest = data;
    while rest.len() >= HEADER {
        let mut head = [0u8; HEADER];
        head.copy_from_slice(&rest[..HEADER]);
        rest = &rest[HEADER..];
        let Ok(header) = ChunkHeader::parse(head) else {
            break;
        };
        assert!(header.raw_len as usize <= MAX_CHUNK && header.wire_len <= header.raw_len);
        let n = header.wire_len as usize;
        if rest.len() < n {
            break;
        }
        let payload = Bytes::copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        if let Ok(out) = unpacker.unpack(header, payload) {
            assert_eq!(out.len(), header.raw_len as usize);
        }
    }
    if let Some((&level, raw)) = data.split_first() {
        if !raw.is_empty() && raw.len() <= MAX_CHUNK {
            let frame = Packer::new(level % (MAX_LEVEL + 1)).pack(raw);
            let mut head = [0u8; HEADER];
            head.copy_from_slice(&frame[..HEADER]);
            let header = ChunkHeader::parse(head).expect("a packed header parses");
            let out = Unpacker::new()
                .unpack(header, Bytes::copy_from_slice(&frame[HEADER..]))
                .expect("a packed chunk unpacks");
            assert_eq!(&out[..], raw);
        }
    }
});
