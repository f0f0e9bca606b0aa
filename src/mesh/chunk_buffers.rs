//! Buffers an asker reads chunk frames into and inflates them to, used
//! again once the chunk is done with. A chunk's `Bytes` goes on to the hash
//! and to Nix's relay; when hyper has written the last of it and dropped it,
//! its buffer comes back here instead of to the allocator. A fresh 256 KiB
//! buffer per chunk cost the asker a page fault for every 4 KiB it wrote
//! (the allocator gives such buffers back to the kernel as soon as they are
//! freed): as much CPU per GiB as a third of its hashing.
//!
//! At most `KEPT` buffers wait here; the rest go back to the allocator, so
//! what the pool holds stays bounded whatever the pace of the relay.

use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use crate::lock::lock;
use crate::mesh::nar_chunks::CHUNK;

/// Buffers kept for reuse: what one NAR has in flight at once (the relay's
/// queue, the chunk being hashed, the one being read) and a little more.
pub const KEPT: usize = 16;
/// A buffer larger than this is not kept (a chunk frame is at most
/// `CHUNK` bytes and a codec byte either way).
pub const LARGEST_KEPT: usize = 2 * CHUNK;

/// A pool of chunk buffers; clones share it.
#[derive(Clone, Default)]
pub struct ChunkBuffers {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl ChunkBuffers {
    /// An empty buffer with room for at least `capacity` bytes: a kept one
    /// where one has room, else a new one with room for a whole chunk at
    /// least, so that any chunk can use it again.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        let kept = {
            let mut free = lock(&self.free);
            let at = free.iter().rposition(|b| b.capacity() >= capacity);
            at.map(|i| free.swap_remove(i))
        };
        match kept {
            Some(mut buf) => {
                buf.clear();
                buf
            }
            None => Vec::with_capacity(capacity.max(CHUNK)),
        }
    }

    /// `buf`'s bytes, handing the buffer back to this pool when the last
    /// `Bytes` pointing into it is dropped.
    pub fn share(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Returning {
            buf,
            home: Arc::downgrade(&self.free),
        })
    }

    /// Buffers waiting for reuse.
    pub fn kept(&self) -> usize {
        lock(&self.free).len()
    }
}

/// A buffer on loan; dropped, it goes home if the pool is still there and
/// has room.
struct Returning {
    buf: Vec<u8>,
    home: Weak<Mutex<Vec<Vec<u8>>>>,
}

impl AsRef<[u8]> for Returning {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if self.buf.capacity() > LARGEST_KEPT {
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
        let mut buf = pool.take(1000);
        buf.extend_from_slice(&[7; 1000]);
        let at = buf.as_ptr();
        let bytes = pool.share(buf);
        let piece = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.kept(), 0, "a slice still points into it");
        assert_eq!(&piece[..], &[7; 10]);
        drop(piece);
        assert_eq!(pool.kept(), 1);
        let again = pool.take(800);
        assert_eq!(again.as_ptr(), at, "the same memory is used again");
        assert!(again.is_empty() && again.capacity() >= 1000);
        assert_eq!(pool.kept(), 0);
    }

    #[test]
    fn every_new_buffer_fits_a_whole_chunk_and_the_pool_stays_bounded() {
        let pool = ChunkBuffers::default();
        drop(pool.share(pool.take(100)));
        let whole = pool.take(CHUNK);
        assert!(whole.capacity() >= CHUNK);
        assert_eq!(
            pool.kept(),
            0,
            "the buffer of a small frame is used for a whole chunk"
        );
        let all: Vec<Bytes> = (0..KEPT + 5).map(|_| pool.share(pool.take(64))).collect();
        drop(all);
        assert_eq!(pool.kept(), KEPT);
        drop(pool.share(Vec::with_capacity(LARGEST_KEPT + 1)));
        assert_eq!(
            pool.kept(),
            KEPT,
            "a huge buffer goes back to the allocator"
        );
        let _ = pool.take(CHUNK);
        drop(pool.share(Vec::with_capacity(LARGEST_KEPT + 1)));
        assert_eq!(pool.kept(), KEPT - 1);
    }
}
