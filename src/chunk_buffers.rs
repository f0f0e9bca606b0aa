//! Pools of byte buffers of one size, for chunks handed to other tasks and
//! threads (the hasher, a connection, Nix's relay) that are dropped there.
//! `lend` turns a buffer into `Bytes`; when the last `Bytes` of it is
//! dropped, a buffer of the pool's size comes back instead of going to the
//! allocator, which would give it to the kernel and fault every page of
//! the next one in again (a quarter of the CPU of serving a 1 MB NAR, 5 %
//! of an asker's, 15 % while striping).
//!
//! The store's NAR encoder keeps one pool (`store::chunk_pool`), the mesh's
//! bulk readers another (`nar_chunks::chunk_buffers`), a striped fetch one
//! of stripes. Only buffers of exactly the pool's size are kept, and only so
//! many; what a pool holds stays bounded whatever a peer sends.

use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use crate::lock::lock;

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
        match self.kept_for(capacity) {
            Some(mut buf) => {
                buf.clear();
                buf
            }
            None => Vec::with_capacity(capacity),
        }
    }

    /// A buffer of `len` bytes, whatever they hold (a kept one's old
    /// bytes): for a caller that overwrites all of them. A kept buffer of
    /// the pool's size needs no zeroing.
    pub fn take_len(&self, len: usize) -> Vec<u8> {
        match self.kept_for(len) {
            Some(mut buf) => {
                buf.resize(len, 0);
                buf
            }
            None => vec![0; len],
        }
    }

    /// A kept buffer, if one is free and `need` bytes fit in it.
    fn kept_for(&self, need: usize) -> Option<Vec<u8>> {
        match need <= self.pool.size {
            true => lock(&self.pool.free).pop(),
            false => None,
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

    /// A buffer taken and not lent, given back: kept if it is of the
    /// pool's size and the pool has room.
    pub fn put_back(&self, buf: Vec<u8>) {
        self.pool.keep(buf);
    }

    #[cfg(test)]
    pub(crate) fn kept(&self) -> usize {
        lock(&self.pool.free).len()
    }
}

impl Pool {
    /// Keeps `buf` for the next taker if it is of the pool's size and the
    /// pool has room; else it goes to the allocator.
    fn keep(&self, buf: Vec<u8>) {
        if buf.capacity() != self.size {
            return;
        }
        let mut free = lock(&self.free);
        if free.len() < self.most {
            free.push(buf);
        }
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
        if let Some(home) = self.home.upgrade() {
            home.keep(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk's size, and how many the mesh keeps.
    const CHUNK: usize = 256 << 10;
    const KEPT: usize = 16;

    #[test]
    fn a_chunk_buffer_comes_back_when_its_last_bytes_are_dropped() {
        let pool = ChunkBuffers::new(CHUNK, KEPT);
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
        let pool = ChunkBuffers::new(CHUNK, KEPT);
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

    #[test]
    fn a_sized_buffer_is_a_kept_one_where_it_fits() {
        let pool = ChunkBuffers::new(CHUNK, KEPT);
        let fresh = pool.take_len(CHUNK);
        assert_eq!(fresh.len(), CHUNK);
        let at = fresh.as_ptr();
        drop(pool.lend(fresh));
        let again = pool.take_len(100);
        assert_eq!((again.len(), again.as_ptr()), (100, at));
        assert_eq!(pool.take_len(CHUNK + 1).len(), CHUNK + 1);
    }
}
