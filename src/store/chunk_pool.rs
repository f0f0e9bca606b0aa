//! Chunk buffers to reuse. NAR chunks are handed to other threads (the
//! hasher, the connection), which put them back here when done: a reused
//! buffer skips the allocator, the page faults of fresh memory and the
//! zeroing, which took about a quarter of the CPU spent on a 1 MB NAR.
//! Shared by all streams, so a new stream starts with warm buffers.

use std::sync::Mutex;

use bytes::Bytes;

/// The size of a pooled buffer: a whole NAR chunk.
pub const BUF: usize = 256 * 1024;
/// Free buffers kept for reuse, by all streams together: 8 MiB.
const POOL_MAX: usize = 32;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer of `BUF` bytes, reused when one is free.
pub fn take() -> Vec<u8> {
    let reused = crate::lock::lock(&POOL).pop();
    reused.unwrap_or_else(|| vec![0; BUF])
}

/// The first `len` bytes of `buf` as a chunk; a `BUF`-sized buffer comes
/// back here when the last `Bytes` of it is dropped.
pub fn into_bytes(buf: Vec<u8>, len: usize) -> Bytes {
    Bytes::from_owner(Pooled { buf, len })
}

fn put(buf: Vec<u8>) {
    if buf.len() != BUF {
        return;
    }
    let mut free = crate::lock::lock(&POOL);
    if free.len() < POOL_MAX {
        free.push(buf);
    }
}

/// The memory behind one chunk.
struct Pooled {
    buf: Vec<u8>,
    len: usize,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        put(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::lock;

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
        assert!(lock(&POOL).iter().all(|b| b.len() == BUF));
    }
}
