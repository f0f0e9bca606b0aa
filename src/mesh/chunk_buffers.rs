//! Buffers an asker reads chunk frames into and inflates them to, used
//! again once the chunk is done with. A chunk's `Bytes` goes on to the hash
//! and to Nix's relay; when hyper has written the last of it and dropped it,
//! a whole chunk's buffer comes back here instead of to the allocator. A
//! fresh 256 KiB buffer per chunk cost the asker a page fault for every
//! 4 KiB it wrote (the allocator gives such buffers back to the kernel as
//! soon as they are freed): about 5 % of its CPU, and 15 % while striping,
//! where every 2 MiB stripe was a fresh buffer too. The node's bulk readers
//! share one pool of chunk buffers; a striped fetch keeps one of stripes.
//!
//! Only buffers of exactly the pool's size are kept, and only so many; the
//! rest go back to the allocator. A small NAR's one short frame gets a
//! buffer of its own size, and what a pool holds stays bounded whatever a
//! holder sends or the pace of the relay.

use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use crate::lock::lock;
use crate::mesh::nar_chunks::CHUNK;

/// Chunk buffers kept for reuse by default: what a few NARs have in flight
/// at once (the relay's queue, the chunk being hashed, the one being read).
const KEPT: usize = 16;

/// A pool of buffers of one size; clones share it.
#[derive(Clone)]
pub struct ChunkBuffers {
    pool: Arc<Pool>,
}

struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    /// The size of the buffers kept.
    size: usize,
    /// How many are kept at most.
    most: usize,
}

impl Default for ChunkBuffers {
    /// A pool of chunk buffers (`CHUNK`).
    fn default() -> Self {
        Self::new(CHUNK, KEPT)
    }
}

impl ChunkBuffers {
    /// A pool that keeps at most `most` buffers of `size` bytes.
    pub fn new(size: usize, most: usize) -> Self {
        Self {
            pool: Arc::new(Pool {
                free: Mutex::new(Vec::new()),
                size,
                most,
            }),
        }
    }

    /// An empty buffer with room for at least `capacity` bytes: a kept one
    /// where `capacity` is at most the pool's size and one is free, else a
    /// new one of `capacity` bytes.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        let kept = match capacity <= self.pool.size {
            true => lock(&self.pool.free).pop(),
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
            home: Arc::downgrade(&self.pool),
        })
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        lock(&self.pool.free).len()
    }
}

/// A buffer lent out; dropped, a buffer of the pool's size goes home if
/// the pool is still there and has room.
struct OnLoan {
    buf: Vec<u8>,
    home: Weak<Pool>,
}

impl AsRef<[u8]> for OnLoan {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for OnLoan {
    fn drop(&mut self) {
        let Some(home) = self.home.upgrade() else {
            return;
        };
        if self.buf.capacity() != home.size {
            return;
        }
        let mut free = lock(&home.free);
        if free.len() < home.most {
            free.push(std::mem::take(&mut self.buf));
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

    #[test]
    fn a_pool_of_stripes_keeps_stripe_sized_buffers() {
        let stripes = ChunkBuffers::new(4 * CHUNK, 2);
        let all: Vec<Bytes> = (0..3)
            .map(|_| stripes.lend(stripes.take(4 * CHUNK)))
            .collect();
        drop(stripes.lend(stripes.take(CHUNK)));
        assert_eq!(
            stripes.kept(),
            0,
            "a short last stripe's buffer is not kept"
        );
        drop(all);
        assert_eq!(stripes.kept(), 2);
        assert_eq!(stripes.take(3 * CHUNK).capacity(), 4 * CHUNK);
    }
}
