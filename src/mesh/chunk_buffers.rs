//! Buffers an asker reads chunk frames into and inflates them to, used
//! again once the chunk is done with. A chunk's `Bytes` goes on to the hash
//! and to Nix's relay; when hyper has written the last of it and dropped it,
//! a whole chunk's buffer comes back here instead of to the allocator. A
//! fresh 256 KiB buffer per chunk cost the asker a page fault for every
//! 4 KiB it wrote (the allocator gives such buffers back to the kernel as
//! soon as they are freed): about 5 % of its CPU.
//!
//! Only buffers of exactly `CHUNK` bytes are kept, at most `KEPT` of them;
//! the rest go back to the allocator. A small NAR's one short frame gets a
//! buffer of its own size, and what the pool holds stays bounded whatever
//! a holder sends or the pace of the relay.

use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use crate::lock::lock;
use crate::mesh::nar_chunks::CHUNK;

/// Buffers kept for reuse: what one NAR has in flight at once (the relay's
/// queue, the chunk being hashed, the one being read) and a little more.
const KEPT: usize = 16;

/// A pool of chunk buffers; clones share it.
#[derive(Clone, Default)]
pub struct ChunkBuffers {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl ChunkBuffers {
    /// An empty buffer with room for at least `capacity` bytes: a kept one
    /// where `capacity` is at most a chunk and one is free, else a new one
    /// of `capacity` bytes.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        let kept = match capacity <= CHUNK {
            true => lock(&self.free).pop(),
            false => None,
        };
        match kept {
            Some(mut buf) => {
                buf.clear();
                buf
            }
            None => Vec::with_capacity(capacity),
        }
    }

    /// `buf`'s bytes, lent out: the buffer comes back to this pool when the
    /// last `Bytes` pointing into it is dropped.
    pub fn lend(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(OnLoan {
            buf,
            home: Arc::downgrade(&self.free),
        })
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        lock(&self.free).len()
    }
}

/// A buffer lent out; dropped, a whole chunk's buffer goes home if the pool
/// is still there and has room.
struct OnLoan {
    buf: Vec<u8>,
    home: Weak<Mutex<Vec<Vec<u8>>>>,
}

impl AsRef<[u8]> for OnLoan {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for OnLoan {
    fn drop(&mut self) {
        if self.buf.capacity() != CHUNK {
            return;
        }
        if let Some(home) = self.home.upgrade() {
            let mut free = lock(&home);
            if free.len() < KEPT {
                free.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_buffer_comes_back_when_its_last_bytes_are_dropped() {
        let pool = ChunkBuffers::default();
        let mut buf = pool.take(CHUNK);
        buf.extend_from_slice(&[7; 1000]);
        let at = buf.as_ptr();
        let bytes = pool.lend(buf);
        let piece = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.kept(), 0, "a slice still points into it");
        assert_eq!(&piece[..], &[7; 10]);
        drop(piece);
        assert_eq!(pool.kept(), 1);
        let again = pool.take(800);
        assert_eq!(again.as_ptr(), at, "the same memory is used again");
        assert!(again.is_empty() && again.capacity() == CHUNK);
        assert_eq!(pool.kept(), 0);
    }

    #[test]
    fn only_whole_chunk_buffers_are_kept_and_only_so_many() {
        let pool = ChunkBuffers::default();
        let small = pool.take(100);
        assert!(small.capacity() < CHUNK, "a short frame gets its own size");
        drop(pool.lend(small));
        drop(pool.lend(Vec::with_capacity(CHUNK + 1)));
        assert_eq!(pool.kept(), 0, "neither a short nor a large one is kept");
        let all: Vec<Bytes> = (0..KEPT + 5).map(|_| pool.lend(pool.take(CHUNK))).collect();
        drop(all);
        assert_eq!(pool.kept(), KEPT);
        let large = pool.take(CHUNK + 1);
        assert!(large.capacity() > CHUNK);
        assert_eq!(pool.kept(), KEPT, "a kept buffer is too small for it");
    }
}
