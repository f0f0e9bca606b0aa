//! Chunk frames of a compressed NAR from a peer (protocol version 3): each
//! header is checked before its payload is read, a payload never inflates
//! past its declared size, never a panic, for a reader of zstd chunks and
//! one that reads LZ4 too (version 6: each payload names its codec). And
//! the other way: any bytes packed at any level, with either codec, come
//! back as they were.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nixmesh::mesh::nar_chunks::{
    ChunkHeader, Codec, Packer, Unpacker, HEADER, LZ4, MAX_CHUNK, MAX_LEVEL,
};

fuzz_target!(|data: &[u8]| {
    // The first byte says which reader, the rest is frames.
    let Some((&flags, frames)) = data.split_first() else {
        return;
    };
    let mut unpacker = Unpacker::new(if flags & 1 == 1 { LZ4 | 1 } else { 1 });
    let mut rest = frames;
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
    if let Some((&level, raw)) = frames.split_first() {
        if !raw.is_empty() && raw.len() <= MAX_CHUNK {
            let lz4 = if flags & 2 == 2 { LZ4 } else { 0 };
            let level = level % (MAX_LEVEL + 1) | lz4;
            let codec = if flags & 4 == 4 { Codec::Lz4 } else { Codec::Zstd };
            let frame = Packer::new(level).pack_with(raw, Some(codec));
            let mut head = [0u8; HEADER];
            head.copy_from_slice(&frame[..HEADER]);
            let header = ChunkHeader::parse(head).expect("a packed header parses");
            let out = Unpacker::new(level)
                .unpack(header, Bytes::copy_from_slice(&frame[HEADER..]))
                .expect("a packed chunk unpacks");
            assert_eq!(&out[..], raw);
        }
    }
});
