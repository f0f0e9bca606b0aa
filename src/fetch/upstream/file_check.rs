//! Checks a file from an upstream cache as it streams by: never more bytes
//! than the narinfo's `FileSize`, and at the end exactly that many with the
//! narinfo's `FileHash`. Pure. The relay passes a chunk on only after it
//! was fed here, and holds the last chunk back until `finish` says yes, so a
//! wrong or cut file never reaches Nix as a complete download.

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::nix::Sha256Hash;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FileError {
    #[error("the upstream file is longer than its FileSize {0}")]
    TooLong(u64),
    #[error("the upstream file ended after {got} of {want} bytes")]
    TooShort { got: u64, want: u64 },
    #[error("the upstream file does not match its FileHash")]
    WrongHash,
}

pub struct FileCheck {
    want_size: u64,
    want_hash: Sha256Hash,
    seen: u64,
    hasher: Sha256,
}

impl FileCheck {
    pub fn new(want_size: u64, want_hash: Sha256Hash) -> Self {
        Self {
            want_size,
            want_hash,
            seen: 0,
            hasher: Sha256::new(),
        }
    }

    /// Bytes seen so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Whether the bytes seen so far are the whole file (by size).
    pub fn is_complete(&self) -> bool {
        self.seen == self.want_size
    }

    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), FileError> {
        let after = self.seen.saturating_add(chunk.len() as u64);
        if after > self.want_size {
            return Err(FileError::TooLong(self.want_size));
        }
        self.hasher.update(chunk);
        self.seen = after;
        Ok(())
    }

    /// The file ended: right size and hash, or why not.
    pub fn finish(self) -> Result<(), FileError> {
        if self.seen != self.want_size {
            return Err(FileError::TooShort {
                got: self.seen,
                want: self.want_size,
            });
        }
        let digest: [u8; 32] = self.hasher.finalize().into();
        if digest != self.want_hash.0 {
            return Err(FileError::WrongHash);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_of(bytes: &[u8]) -> Sha256Hash {
        Sha256Hash(Sha256::digest(bytes).into())
    }

    #[test]
    fn the_right_file_passes_in_any_chunking() {
        let file: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        for chunk in [1, 7, 4096, 10_000] {
            let mut c = FileCheck::new(file.len() as u64, hash_of(&file));
            for part in file.chunks(chunk) {
                c.feed(part).unwrap();
            }
            assert!(c.is_complete());
            c.finish().unwrap();
        }
    }

    #[test]
    fn long_short_and_wrong_files_fail() {
        let file = b"a compressed nar".to_vec();
        let mut long = FileCheck::new(4, hash_of(&file));
        assert_eq!(long.feed(&file), Err(FileError::TooLong(4)));
        let mut short = FileCheck::new(file.len() as u64, hash_of(&file));
        short.feed(&file[..3]).unwrap();
        assert_eq!(
            short.finish(),
            Err(FileError::TooShort {
                got: 3,
                want: file.len() as u64
            })
        );
        let mut flipped = file.clone();
        flipped[5] ^= 1;
        let mut wrong = FileCheck::new(file.len() as u64, hash_of(&file));
        wrong.feed(&flipped).unwrap();
        assert_eq!(wrong.finish(), Err(FileError::WrongHash));
    }
}
