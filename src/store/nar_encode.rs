//! Serialises a store path's filesystem tree as a NAR (the framing is
//! `nix::nar`), byte for byte what `nix-store --dump` writes: `encode`
//! walks a tree and hands the NAR to a `NarSink` in chunks of at most
//! `CHUNK` bytes, so memory stays constant whatever the file sizes.
//!
//! The walk is built to be cheap per file, because every NAR served is
//! encoded afresh: an entry is opened relative to its directory's descriptor
//! (one name to look up, not the whole path), a file is `fstat`ed through the
//! descriptor it is read from, and file data is read straight into the chunk
//! that goes to the sink. Chunk buffers come from, and go back to,
//! `chunk_pool`.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use bytes::Bytes;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RawDir, CWD};
use thiserror::Error;

use super::chunk_pool;
use crate::nix::nar::{push_str, regular_header, regular_trailer, symlink_node, tokens, MAGIC};

/// Bytes per chunk handed to the sink, and the most read from a file at once.
pub const CHUNK: usize = chunk_pool::BUF;
/// Deeper trees than this are refused rather than recursed into.
pub const MAX_DEPTH: usize = 512;
/// Directories down to this depth keep their descriptor open while their
/// entries are encoded, so an entry is opened by its name alone. Below it,
/// entries are opened by their path from the deepest open directory: a deep
/// tree cannot run the process out of descriptors.
const HELD_DIR_DEPTH: usize = 8;
/// File contents the sink would drop are skipped over (not read) only in
/// runs of at least this many bytes.
const MIN_SKIP: u64 = 64 * 1024;
/// The buffer for bytes beyond what the sink expects.
const OVERFLOW_BUF: usize = 4096;
/// getdents buffer; far more than one entry (names are at most 255 bytes).
const DENTS_BUF: usize = 32 * 1024;

#[derive(Debug, Error)]
pub enum NarError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{0}: not a regular file, directory or symlink")]
    UnsupportedType(String),
    #[error("{0}: file changed size while being read")]
    SizeChanged(String),
    #[error("{0}: directory tree deeper than {MAX_DEPTH}")]
    TooDeep(String),
    #[error("NAR consumer stopped: {0}")]
    Sink(io::Error),
}

/// Where the encoder puts the NAR, in order.
pub trait NarSink {
    /// The next piece, at most `CHUNK` bytes.
    fn chunk(&mut self, chunk: Bytes) -> io::Result<()>;

    /// The NAR's size, if known ahead. Chunks are then cut to fit it: a
    /// small NAR gets a buffer of its own size rather than a whole `CHUNK`.
    fn expected_size(&self) -> Option<u64> {
        None
    }

    /// How many of the next bytes the sink would drop unseen (it wants
    /// the NAR from an offset and need not hash what lies before): file
    /// contents in them are skipped over, not read.
    fn skippable(&self) -> u64 {
        0
    }

    /// `n` bytes (at most `skippable`) went by without being read.
    fn skipped(&mut self, _n: u64) {}

    /// Whether the sink takes each regular file's contents as a reference
    /// (`contents_at`) instead of its bytes: it records the NAR's layout
    /// (`nar_layout`), and no file is read.
    fn by_reference(&self) -> bool {
        false
    }

    /// (`by_reference` only.) The next `size` bytes of the NAR are the
    /// contents of the file at `path`.
    fn contents_at(&mut self, _path: &[u8], _size: u64) -> io::Result<()> {
        Ok(())
    }
}

impl NarSink for Vec<u8> {
    fn chunk(&mut self, chunk: Bytes) -> io::Result<()> {
        self.extend_from_slice(&chunk);
        Ok(())
    }
}

/// What `encode` went through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Walked {
    /// Regular files read.
    pub files: u64,
}

/// Serialises the tree at `root` into `sink`.
pub fn encode(root: &Path, sink: &mut impl NarSink) -> Result<Walked, NarError> {
    let mut walker = Walker::new(root, sink);
    walker.put_tokens(&[MAGIC])?;
    // The root is opened by its whole path, relative to the working directory.
    let base = Base { fd: CWD, len: 0 };
    walker.node(base, FileType::Unknown, 0)?;
    walker.out.flush()?;
    Ok(walker.walked)
}

/// Hands `sink` the `size` bytes of `file` at `path`, a NAR encoded
/// earlier, in the chunks `encode` would cut (skipping, not reading, what
/// the sink would drop). `SizeChanged` if the file ends sooner.
pub fn replay(path: &Path, file: File, size: u64, sink: &mut impl NarSink) -> Result<(), NarError> {
    let mut walker = Walker::new(path, sink);
    walker.contents(file, size)?;
    walker.out.flush()
}

/// What an entry is opened relative to: a directory's descriptor, and where
/// that directory's path ends in `Walker::path` (plus the `/`).
#[derive(Clone, Copy)]
struct Base<'f> {
    fd: BorrowedFd<'f>,
    len: usize,
}

/// The state of one `encode`: the path being encoded and reused scratch.
struct Walker<'s, S> {
    out: Chunker<'s, S>,
    /// The entry being encoded, for error messages and for opening it: the
    /// part after its `Base` is what is looked up.
    path: Vec<u8>,
    /// Framing tokens before they go out.
    head: Vec<u8>,
    /// getdents output; a directory is read whole before its entries.
    dents: Vec<u8>,
    walked: Walked,
}

impl<'s, S: NarSink> Walker<'s, S> {
    fn new(root: &Path, sink: &'s mut S) -> Self {
        Self {
            out: Chunker::new(sink),
            path: root.as_os_str().as_bytes().to_vec(),
            head: Vec::with_capacity(256),
            dents: Vec::with_capacity(DENTS_BUF),
            walked: Walked::default(),
        }
    }

    fn node(&mut self, base: Base, kind: FileType, depth: usize) -> Result<(), NarError> {
        if depth > MAX_DEPTH {
            return Err(NarError::TooDeep(self.display()));
        }
        // The directory listing usually says what an entry is: no stat. The
        // root, and filesystems that leave d_type unset, need one.
        let kind = match kind {
            FileType::Unknown => {
                let st = rustix::fs::statat(base.fd, self.rel(base), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| self.io_err(e.into()))?;
                FileType::from_raw_mode(st.st_mode)
            }
            known => known,
        };
        match kind {
            FileType::Symlink => self.symlink(base),
            FileType::RegularFile => self.file(base),
            FileType::Directory => self.directory(base, depth),
            _ => Err(NarError::UnsupportedType(self.display())),
        }
    }

    fn symlink(&mut self, base: Base) -> Result<(), NarError> {
        let target = rustix::fs::readlinkat(base.fd, self.rel(base), Vec::new())
            .map_err(|e| self.io_err(e.into()))?;
        self.head.clear();
        symlink_node(&mut self.head, target.as_bytes());
        self.out.write(&self.head)
    }

    fn file(&mut self, base: Base) -> Result<(), NarError> {
        if self.out.skippable() > 0 && self.skip_file(base)? {
            return Ok(());
        }
        // NOFOLLOW: an entry swapped for a symlink since the listing fails
        // instead of being followed.
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(base.fd, self.rel(base), flags, Mode::empty())
            .map_err(|e| self.io_err(e.into()))?;
        // fstat on the open file: what is read is what was stat'ed.
        let st = rustix::fs::fstat(&fd).map_err(|e| self.io_err(e.into()))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(NarError::UnsupportedType(self.display()));
        }
        let size = u64::try_from(st.st_size).map_err(|_| {
            self.io_err(io::Error::new(io::ErrorKind::InvalidData, "negative size"))
        })?;
        let executable = st.st_mode & 0o100 != 0;
        self.walked.files += 1;
        self.head.clear();
        regular_header(&mut self.head, executable, size);
        self.out.write(&self.head)?;
        if self.out.sink.by_reference() {
            self.out.flush()?;
            self.out
                .sink
                .contents_at(&self.path, size)
                .map_err(NarError::Sink)?;
        } else {
            self.contents(File::from(fd), size)?;
        }
        self.head.clear();
        regular_trailer(&mut self.head, size);
        self.out.write(&self.head)
    }

    /// A regular file whose whole node lies in what the sink would drop
    /// (a part of the NAR from an offset) goes by on a stat alone, neither
    /// opened nor read; whether it did. Anything else is left to `file`.
    fn skip_file(&mut self, base: Base) -> Result<bool, NarError> {
        let st = rustix::fs::statat(base.fd, self.rel(base), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.io_err(e.into()))?;
        let Ok(size) = u64::try_from(st.st_size) else {
            return Ok(false);
        };
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Ok(false);
        }
        self.head.clear();
        regular_header(&mut self.head, st.st_mode & 0o100 != 0, size);
        let header = self.head.len() as u64;
        self.head.clear();
        regular_trailer(&mut self.head, size);
        let node = header
            .saturating_add(size)
            .saturating_add(self.head.len() as u64);
        if node > self.out.skippable() {
            return Ok(false);
        }
        self.out.flush()?;
        self.out.skipped(node);
        Ok(true)
    }

    /// Reads `size` bytes of `file` straight into the outgoing chunks, or
    /// seeks past those the sink would drop.
    fn contents(&mut self, mut file: File, size: u64) -> Result<(), NarError> {
        let mut left = size;
        // What the sink drops goes by in one seek (it only shrinks as
        // bytes go by, so once too short to seek over it stays so).
        if self.out.skippable().min(left) >= MIN_SKIP {
            self.out.flush()?;
            let skip = self.out.skippable().min(left);
            let to = i64::try_from(skip).unwrap_or(i64::MAX);
            file.seek(io::SeekFrom::Current(to))
                .map_err(|e| self.io_err(e))?;
            self.out.skipped(skip);
            left -= skip;
        }
        let path = &self.path;
        self.out.read_file(&mut file, left, || shown(path))
    }

    fn directory(&mut self, base: Base, depth: usize) -> Result<(), NarError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(base.fd, self.rel(base), flags, Mode::empty())
            .map_err(|e| self.io_err(e.into()))?;
        let listing = list(&fd, &mut self.dents).map_err(|e| self.io_err(e))?;
        let dir_len = self.path.len();
        let held = (depth < HELD_DIR_DEPTH).then_some(fd);
        let inner = match &held {
            Some(fd) => Base {
                fd: fd.as_fd(),
                len: dir_len + 1,
            },
            None => base,
        };
        self.put_tokens(&["(", "type", "directory"])?;
        for (name, kind) in listing.iter() {
            self.head.clear();
            tokens(&mut self.head, &["entry", "(", "name"]);
            push_str(&mut self.head, name);
            tokens(&mut self.head, &["node"]);
            self.out.write(&self.head)?;
            self.path.push(b'/');
            self.path.extend_from_slice(name);
            let done = self.node(inner, kind, depth + 1);
            self.path.truncate(dir_len);
            done?;
            self.put_tokens(&[")"])?;
        }
        self.put_tokens(&[")"])
    }

    fn put_tokens(&mut self, toks: &[&str]) -> Result<(), NarError> {
        self.head.clear();
        tokens(&mut self.head, toks);
        self.out.write(&self.head)
    }

    /// The current entry's path relative to `base`.
    fn rel(&self, base: Base) -> &[u8] {
        &self.path[base.len..]
    }

    fn display(&self) -> String {
        shown(&self.path)
    }

    fn io_err(&self, source: io::Error) -> NarError {
        NarError::Io {
            path: self.display(),
            source,
        }
    }
}

/// A path as errors show it.
pub(crate) fn shown(path: &[u8]) -> String {
    Path::new(OsStr::from_bytes(path)).display().to_string()
}

/// A directory's entries in NAR order (byte-wise by name): the names back
/// to back in one buffer, so listing a directory costs two allocations.
#[derive(Default)]
struct Listing {
    names: Vec<u8>,
    entries: Vec<(usize, usize, FileType)>,
}

impl Listing {
    fn iter(&self) -> impl Iterator<Item = (&[u8], FileType)> + '_ {
        self.entries
            .iter()
            .map(|&(start, end, kind)| (&self.names[start..end], kind))
    }
}

/// Reads the whole directory `dir` (all but `.` and `..`), sorted.
fn list(dir: &OwnedFd, scratch: &mut Vec<u8>) -> io::Result<Listing> {
    let mut listing = Listing::default();
    let mut dents = RawDir::new(dir, scratch.spare_capacity_mut());
    while let Some(entry) = dents.next() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let start = listing.names.len();
        listing.names.extend_from_slice(name);
        let end = listing.names.len();
        listing.entries.push((start, end, entry.file_type()));
    }
    let names = &listing.names;
    listing
        .entries
        .sort_unstable_by(|a, b| names[a.0..a.1].cmp(&names[b.0..b.1]));
    Ok(listing)
}

/// Cuts the NAR into chunks for the sink: `CHUNK` bytes each, or less where
/// the sink's expected size ends. Bytes are put straight into a pooled
/// buffer, which becomes the chunk without being copied again.
pub(crate) struct Chunker<'s, S> {
    sink: &'s mut S,
    /// The next chunk; empty until something is written.
    buf: Vec<u8>,
    filled: usize,
    /// Bytes the sink expects that are not in a chunk yet.
    expected_left: u64,
}

impl<'s, S: NarSink> Chunker<'s, S> {
    pub(crate) fn new(sink: &'s mut S) -> Self {
        let expected_left = sink.expected_size().unwrap_or(u64::MAX);
        Self {
            sink,
            buf: Vec::new(),
            filled: 0,
            expected_left,
        }
    }

    pub(crate) fn write(&mut self, mut bytes: &[u8]) -> Result<(), NarError> {
        // Wholly in what the sink would drop: it goes by uncopied.
        if self.filled == 0 && bytes.len() as u64 <= self.sink.skippable() {
            self.skipped(bytes.len() as u64);
            return Ok(());
        }
        while !bytes.is_empty() {
            let room = self.room(bytes.len());
            let n = room.len();
            room.copy_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            self.commit(n)?;
        }
        Ok(())
    }

    /// Where the next bytes go, at most `max` of them; never empty (for
    /// `max` > 0). `commit` says how many were put there.
    pub(crate) fn room(&mut self, max: usize) -> &mut [u8] {
        if self.buf.is_empty() {
            self.buf = self.new_buf();
        }
        let end = self.buf.len().min(self.filled.saturating_add(max));
        &mut self.buf[self.filled..end]
    }

    /// The next `left` bytes of `file` (named by `shown` in errors),
    /// read straight into the chunks.
    pub(crate) fn read_file(
        &mut self,
        file: &mut File,
        mut left: u64,
        shown: impl Fn() -> String,
    ) -> Result<(), NarError> {
        while left > 0 {
            let room = self.room(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match file.read(room) {
                // Bytes appended after the fstat are not part of the NAR;
                // whether what was sent is right is for the caller's hash
                // check to say. Fewer bytes than stat'ed is an error now.
                Ok(0) => return Err(NarError::SizeChanged(shown())),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(NarError::Io {
                        path: shown(),
                        source,
                    })
                }
            };
            self.commit(n)?;
            left -= n as u64;
        }
        Ok(())
    }

    pub(crate) fn commit(&mut self, n: usize) -> Result<(), NarError> {
        self.filled += n;
        if self.filled == self.buf.len() {
            self.flush()?;
        }
        Ok(())
    }

    /// A whole chunk's buffer, or one just big enough for the rest of the
    /// expected NAR. Past the expected size (the sink will refuse it) a
    /// small one, to find that out cheaply.
    fn new_buf(&mut self) -> Vec<u8> {
        match usize::try_from(self.expected_left) {
            Ok(0) => vec![0; OVERFLOW_BUF],
            Ok(left) if left < CHUNK => vec![0; left],
            _ => chunk_pool::take(),
        }
    }

    /// Bytes from here on the sink would drop unseen, less what is waiting
    /// in the chunk being filled.
    fn skippable(&self) -> u64 {
        self.sink.skippable().saturating_sub(self.filled as u64)
    }

    pub(crate) fn skipped(&mut self, n: u64) {
        self.expected_left = self.expected_left.saturating_sub(n);
        self.sink.skipped(n);
    }

    /// Hands what is filled to the sink.
    pub(crate) fn flush(&mut self) -> Result<(), NarError> {
        if self.filled == 0 {
            return Ok(());
        }
        self.expected_left = self.expected_left.saturating_sub(self.filled as u64);
        let chunk = chunk_pool::into_bytes(std::mem::take(&mut self.buf), self.filled);
        self.filled = 0;
        self.sink.chunk(chunk).map_err(NarError::Sink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    /// Wants the NAR from `from` on, as a peer's request from an offset.
    struct FromOffset {
        from: u64,
        seen: u64,
        out: Vec<u8>,
        read_past: u64,
    }

    impl FromOffset {
        /// What encoding `root` from `from` on hands over.
        fn encode(root: &Path, from: u64) -> Self {
            let mut sink = FromOffset {
                from,
                seen: 0,
                out: Vec::new(),
                read_past: 0,
            };
            encode(root, &mut sink).unwrap();
            sink
        }
    }

    impl NarSink for FromOffset {
        fn chunk(&mut self, chunk: Bytes) -> io::Result<()> {
            let start = self.seen;
            self.seen += chunk.len() as u64;
            let from = self.from.saturating_sub(start).min(chunk.len() as u64) as usize;
            self.read_past += from as u64;
            self.out.extend_from_slice(&chunk[from..]);
            Ok(())
        }
        fn skippable(&self) -> u64 {
            self.from.saturating_sub(self.seen)
        }
        fn skipped(&mut self, n: u64) {
            self.seen += n;
        }
    }

    #[test]
    fn contents_before_the_offset_are_skipped_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        fs::create_dir(&root).unwrap();
        let big: Vec<u8> = (0..3 * CHUNK + 5).map(|i| (i % 251) as u8).collect();
        fs::write(root.join("a"), &big).unwrap();
        fs::write(root.join("b"), &big[..1000]).unwrap();
        fs::write(root.join("c"), &big).unwrap();
        let mut whole = Vec::new();
        encode(&root, &mut whole).unwrap();
        let n = whole.len() as u64;
        for from in [0, 100, CHUNK as u64 + 7, n / 2, n - 3, n] {
            let sink = FromOffset::encode(&root, from);
            assert_eq!(sink.out, &whole[from as usize..], "from {from}");
            // Whole files before the offset were never handed over.
            if from >= n / 2 {
                assert!(
                    sink.read_past < CHUNK as u64 * 2,
                    "from {from}: {}",
                    sink.read_past
                );
            }
        }
    }

    #[test]
    fn small_files_before_the_offset_are_neither_read_nor_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        for i in 0..300u32 {
            let sub = root.join(format!("d{}", i % 7));
            fs::create_dir_all(&sub).unwrap();
            let bytes: Vec<u8> = (0..1000 + i * 13)
                .map(|j| (j * (i + 3) % 251) as u8)
                .collect();
            fs::write(sub.join(format!("f{i}")), bytes).unwrap();
            if i % 50 == 0 {
                std::os::unix::fs::symlink("f0", sub.join(format!("l{i}"))).unwrap();
                fs::set_permissions(sub.join(format!("f{i}")), fs::Permissions::from_mode(0o755))
                    .unwrap();
            }
        }
        let mut whole = Vec::new();
        encode(&root, &mut whole).unwrap();
        let n = whole.len() as u64;
        for from in [1, 77, n / 3, n / 2 + 5, n - 1, n] {
            let sink = FromOffset::encode(&root, from);
            assert_eq!(sink.out, &whole[from as usize..], "from {from}");
            // At most the node the offset falls in was handed over whole.
            assert!(sink.read_past < 5000, "from {from}: {}", sink.read_past);
        }
    }

    #[test]
    fn single_file_layout() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"hello\n").unwrap();
        let mut nar = Vec::new();
        encode(&f, &mut nar).unwrap();
        let mut want = Vec::new();
        tokens(&mut want, &[MAGIC, "(", "type", "regular", "contents"]);
        push_str(&mut want, b"hello\n");
        tokens(&mut want, &[")"]);
        assert_eq!(nar, want);
        // What `nix-store --dump` gave for a file holding "hello\n".
        assert_eq!(nar.len(), 120);
    }

    /// The NAR of `path` the plain way: whole paths, std::fs, all in memory.
    fn reference(path: &Path, out: &mut Vec<u8>) {
        let meta = fs::symlink_metadata(path).unwrap();
        if meta.file_type().is_symlink() {
            let target = fs::read_link(path).unwrap();
            symlink_node(out, target.as_os_str().as_bytes());
        } else if meta.is_file() {
            let data = fs::read(path).unwrap();
            let executable = meta.permissions().mode() & 0o100 != 0;
            regular_header(out, executable, data.len() as u64);
            out.extend_from_slice(&data);
            regular_trailer(out, data.len() as u64);
        } else {
            tokens(out, &["(", "type", "directory"]);
            let mut names: Vec<_> = fs::read_dir(path)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for name in names {
                tokens(out, &["entry", "(", "name"]);
                push_str(out, name.as_bytes());
                tokens(out, &["node"]);
                reference(&path.join(&name), out);
                tokens(out, &[")"]);
            }
            tokens(out, &[")"]);
        }
    }

    /// Records the length of every chunk it is given; expects `.1` bytes.
    #[derive(Default)]
    struct Lengths(Vec<usize>, Option<u64>);

    impl NarSink for Lengths {
        fn chunk(&mut self, chunk: Bytes) -> io::Result<()> {
            self.0.push(chunk.len());
            Ok(())
        }

        fn expected_size(&self) -> Option<u64> {
            self.1
        }
    }

    #[test]
    fn chunks_fit_the_expected_size() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, vec![7u8; CHUNK + 1000]).unwrap();
        let mut nar = Vec::new();
        encode(&f, &mut nar).unwrap();
        let size = nar.len();
        // As expected: whole chunks, then one just big enough.
        let mut exact = Lengths(Vec::new(), Some(size as u64));
        encode(&f, &mut exact).unwrap();
        assert_eq!(exact.0, [CHUNK, size - CHUNK]);
        // Smaller than expected: the same cut.
        let mut less = Lengths(Vec::new(), Some(size as u64 + 5000));
        encode(&f, &mut less).unwrap();
        assert_eq!(less.0, [CHUNK, size - CHUNK]);
        // Bigger than expected: the surplus comes in small chunks.
        let mut more = Lengths(Vec::new(), Some(100));
        encode(&f, &mut more).unwrap();
        assert_eq!(more.0[0], 100);
        assert!(more.0[1..].iter().all(|&n| n <= OVERFLOW_BUF));
        assert_eq!(more.0.iter().sum::<usize>(), size);
    }

    #[test]
    fn a_mixed_tree_matches_a_plain_walk() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        // Deeper than HELD_DIR_DEPTH, so both ways of opening are used.
        let mut deep = root.clone();
        for i in 0..HELD_DIR_DEPTH + 4 {
            deep.push(format!("level{i}"));
            fs::create_dir_all(&deep).unwrap();
            fs::write(deep.join("f"), format!("at {i}")).unwrap();
        }
        fs::create_dir(root.join("empty-dir")).unwrap();
        fs::write(root.join("empty"), b"").unwrap();
        fs::write(root.join("B"), b"upper case sorts first").unwrap();
        fs::write(root.join("_"), b"underscore").unwrap();
        fs::write(root.join("grüße"), b"non-ASCII name").unwrap();
        fs::write(root.join(OsStr::from_bytes(b"latin1-\xe9")), b"not UTF-8").unwrap();
        let big: Vec<u8> = (0..2 * CHUNK + 13).map(|i| (i % 251) as u8).collect();
        fs::write(root.join("big"), &big).unwrap();
        fs::write(root.join("run"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("run"), fs::Permissions::from_mode(0o555)).unwrap();
        std::os::unix::fs::symlink("big", root.join("link")).unwrap();
        std::os::unix::fs::symlink("/nowhere/at/all", deep.join("dangling")).unwrap();

        let mut nar = Vec::new();
        encode(&root, &mut nar).unwrap();
        let mut want = Vec::new();
        push_str(&mut want, MAGIC.as_bytes());
        reference(&root, &mut want);
        assert_eq!(nar.len(), want.len());
        assert!(nar == want, "NARs differ");

        let mut lengths = Lengths::default();
        encode(&root, &mut lengths).unwrap();
        let (last, full) = lengths.0.split_last().unwrap();
        assert!(full.iter().all(|&n| n == CHUNK), "{:?}", lengths.0);
        assert!(*last > 0 && *last <= CHUNK);
        assert_eq!(lengths.0.iter().sum::<usize>(), want.len());
    }

    #[test]
    fn a_symlink_root_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink("target", &link).unwrap();
        let mut nar = Vec::new();
        encode(&link, &mut nar).unwrap();
        let mut want = Vec::new();
        push_str(&mut want, MAGIC.as_bytes());
        symlink_node(&mut want, b"target");
        assert_eq!(nar, want);
    }

    #[test]
    fn refuses_trees_deeper_than_max_depth() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().join("r");
        for _ in 0..=MAX_DEPTH {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let got = encode(&dir.path().join("r"), &mut Vec::new());
        assert!(matches!(got, Err(NarError::TooDeep(_))), "{got:?}");
    }

    #[test]
    fn refuses_a_fifo_without_opening_it() {
        // Opening a FIFO for reading would block until a writer came.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(CWD, &fifo, FileType::Fifo, Mode::from(0o644), 0).unwrap();
        assert!(matches!(
            encode(dir.path(), &mut Vec::new()),
            Err(NarError::UnsupportedType(p)) if p.ends_with("/fifo")
        ));
    }

    #[test]
    fn refuses_special_files() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(matches!(
            encode(&sock, &mut Vec::new()),
            Err(NarError::UnsupportedType(_))
        ));
    }
}
