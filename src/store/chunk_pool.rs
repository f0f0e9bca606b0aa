//! Chunk buffers to reuse. NAR chunks are handed to other threads (the
//! hasher, the connection), which put them back here when done: a reused
//! buffer skips the allocator, the page faults of fresh memory and the
//! zeroing, which took about a quarter of the CPU spent on a 1 MB NAR.
//! Shared by all streams, so a new stream starts with warm buffers.

use std::sync::LazyLock;

use bytes::Bytes;

use crate::chunk_buffers::ChunkBuffers;

/// The size of a pooled buffer: a whole NAR chunk.
pub const BUF: usize = 256 * 1024;
/// Free buffers kept for reuse, by all streams together: 8 MiB.
const POOL_MAX: usize = 32;

static POOL: LazyLock<ChunkBuffers> = LazyLock::new(|| ChunkBuffers::new(BUF, POOL_MAX));

/// A buffer of `BUF` bytes, reused when one is free.
pub fn take() -> Vec<u8> {
    POOL.take_len(BUF)
}

/// The first `len` bytes of `buf` as a chunk; a `BUF`-sized buffer comes
/// back here when the last `Bytes` of it is dropped.
pub fn into_bytes(mut buf: Vec<u8>, len: usize) -> Bytes {
    buf.truncate(len);
    POOL.lend(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_chunk_gives_its_buffer_back() {
        let mut buf = take();
        buf[..3].copy_from_slice(b"abc");
        let chunk = into_bytes(buf, 3);
        assert_eq!(&chunk[..], b"abc");
        let ptr = chunk.as_ptr();
        drop(chunk);
        // Other tests share the pool: look for ours among the free ones.
        let free: Vec<Vec<u8>> = (0..POOL_MAX).map(|_| take()).collect();
        assert!(
            free.iter().any(|b| b.as_ptr() == ptr),
            "the buffer came back"
        );
        assert!(free.iter().all(|b| b.len() == BUF));
        // A buffer of another size is not kept.
        drop(into_bytes(vec![0; 10], 10));
        assert!((0..POOL_MAX).all(|_| take().capacity() == BUF));
    }
}
