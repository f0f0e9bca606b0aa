//! A tree's NAR as a layout: its framing bytes, and for each regular file
//! a reference to its contents, in NAR order. A part of the NAR from an
//! offset (a stripe, a failover, a `Range` request) is then found by a
//! binary search and served by reading only the files it covers, where
//! `nar_encode` lists every directory and stats every file before the
//! offset: striping a NAR of n files cost each holder O(n) lookups per
//! stripe, a third of its CPU on 885 files of real binaries, and far more
//! on larger trees. `NarLayouts` keeps the layouts of the NARs served last
//! in parts, bounded in count and bytes.
//!
//! What a layout says is checked as it is served: a file is opened without
//! following symlinks and must still be a regular file of the recorded
//! size, else the part ends in `SizeChanged`, as a walk would. Entries are
//! keyed by store path, NarHash and NarSize, so a path rebuilt with other
//! bytes never meets an old layout; what else could differ (a file's bytes
//! of the same size) the receiver's hash check catches, as it does for a
//! walk.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, CWD};

use crate::lock::lock;
use crate::nix::{PathInfo, Sha256Hash, StorePath};
use crate::store::nar_encode::{self, Chunker, NarError, NarSink};

/// Layouts kept at once.
const KEPT: usize = 8;
/// Bytes of framing and file names a layout may take (about 200 bytes a
/// file: 40,000 files); a larger tree is walked as before.
pub const MAX_LAYOUT_BYTES: usize = 8 << 20;
/// Bytes all kept layouts may take together.
const MAX_KEPT_BYTES: usize = 16 << 20;
/// NARs remembered as too large for a layout, so that none is recorded
/// for them again and again.
const TOO_LARGE_KEPT: usize = 64;

/// One stretch of the NAR.
#[derive(Debug)]
enum Part {
    /// `len` bytes of `NarLayout::framing` from `at`.
    Framing { at: usize, len: usize },
    /// The `size` bytes of the file at `path`.
    Contents { path: Box<[u8]>, size: u64 },
}

impl Part {
    fn len(&self) -> u64 {
        match self {
            Part::Framing { len, .. } => *len as u64,
            Part::Contents { size, .. } => *size,
        }
    }
}

#[derive(Debug, Default)]
pub struct NarLayout {
    framing: Vec<u8>,
    /// The parts in NAR order, each with the NAR offset it starts at.
    parts: Vec<(u64, Part)>,
    size: u64,
    /// Bytes of framing and paths, for the bound.
    bytes: usize,
}

impl NarLayout {
    /// The layout of the tree at `root`, walked once (no file is read);
    /// `None` if it would take more than `max_bytes`.
    pub fn record(root: &Path, max_bytes: usize) -> Result<Option<Self>, NarError> {
        let mut recorder = Recorder {
            layout: NarLayout::default(),
            max_bytes,
        };
        match nar_encode::encode(root, &mut recorder) {
            Ok(_) => {
                // Kept as long as it is used: what the bound counts.
                let mut layout = recorder.layout;
                layout.framing.shrink_to_fit();
                layout.parts.shrink_to_fit();
                Ok(Some(layout))
            }
            Err(NarError::Sink(e)) if e.kind() == io::ErrorKind::OutOfMemory => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The NAR's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Memory the layout takes, roughly.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Hands `sink` the NAR from byte `from` on, in the chunks `encode`
    /// cuts (`CHUNK` bytes from `from`), as if what lies before had been
    /// skipped.
    pub fn replay(&self, from: u64, sink: &mut impl NarSink) -> Result<(), NarError> {
        let mut out = Chunker::new(sink);
        let from = from.min(self.size);
        out.skipped(from);
        let first = self
            .parts
            .partition_point(|(start, part)| start + part.len() <= from);
        for (start, part) in &self.parts[first..] {
            let off = from.saturating_sub(*start);
            match part {
                Part::Framing { at, len } => {
                    let skip = usize::try_from(off).unwrap_or(*len).min(*len);
                    out.write(&self.framing[at + skip..at + len])?;
                }
                Part::Contents { path, size } => contents(&mut out, path, *size, off)?,
            }
        }
        out.flush()
    }
}

/// The `size` bytes of the file at `path` from `off` on, into `out`.
fn contents<S: NarSink>(
    out: &mut Chunker<'_, S>,
    path: &[u8],
    size: u64,
    off: u64,
) -> Result<(), NarError> {
    let shown = || nar_encode::shown(path);
    let io_err = |source: io::Error| NarError::Io {
        path: shown(),
        source,
    };
    let fd = open_no_symlinks(path).map_err(io_err)?;
    let st = rustix::fs::fstat(&fd).map_err(|e| io_err(e.into()))?;
    let same = FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
        && u64::try_from(st.st_size) == Ok(size);
    if !same {
        return Err(NarError::SizeChanged(shown()));
    }
    let mut file = File::from(fd);
    if off > 0 {
        file.seek(SeekFrom::Start(off)).map_err(io_err)?;
    }
    out.read_file(&mut file, size.saturating_sub(off), shown)
}

/// Opens `path` for reading, failing where any part of it is a symlink
/// (the walk opened each entry from its directory's descriptor); kernels
/// before 5.6 only refuse a symlink at its end.
fn open_no_symlinks(path: &[u8]) -> io::Result<std::os::fd::OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat2(CWD, path, flags, Mode::empty(), ResolveFlags::NO_SYMLINKS) {
        Err(rustix::io::Errno::NOSYS) => Ok(rustix::fs::openat(CWD, path, flags, Mode::empty())?),
        opened => Ok(opened?),
    }
}

/// Takes the walk's framing as bytes and its files as references.
struct Recorder {
    layout: NarLayout,
    max_bytes: usize,
}

impl Recorder {
    fn push(&mut self, part: Part, bytes: usize) -> io::Result<()> {
        let layout = &mut self.layout;
        layout.bytes += bytes + std::mem::size_of::<(u64, Part)>();
        if layout.bytes > self.max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "layout too large",
            ));
        }
        let len = part.len();
        layout.parts.push((layout.size, part));
        layout.size += len;
        Ok(())
    }
}

impl NarSink for Recorder {
    fn chunk(&mut self, chunk: Bytes) -> io::Result<()> {
        let at = self.layout.framing.len();
        self.layout.framing.extend_from_slice(&chunk);
        self.push(
            Part::Framing {
                at,
                len: chunk.len(),
            },
            chunk.len(),
        )
    }

    fn by_reference(&self) -> bool {
        true
    }

    fn contents_at(&mut self, path: &[u8], size: u64) -> io::Result<()> {
        let path: Box<[u8]> = path.into();
        let n = path.len();
        self.push(Part::Contents { path, size }, n)
    }
}

/// Which NAR a layout is of.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    path: StorePath,
    nar_hash: Sha256Hash,
    nar_size: u64,
}

impl Key {
    fn of(info: &PathInfo) -> Self {
        Self {
            path: info.path.clone(),
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
        }
    }
}

/// The layouts of the NARs served last in parts.
#[derive(Default)]
pub struct NarLayouts {
    state: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    /// Newest last.
    layouts: VecDeque<(Key, Arc<NarLayout>)>,
    too_large: VecDeque<Key>,
}

impl Kept {
    fn bytes(&self) -> usize {
        self.layouts.iter().map(|(_, l)| l.bytes()).sum()
    }
}

impl NarLayouts {
    /// The layout of `info`'s NAR, whose tree is at `real`: kept, or
    /// recorded now. `None` for a NAR that is no tree, one too large for a
    /// layout, or a tree that could not be walked (the walk that serves it
    /// instead says why).
    pub fn get(&self, info: &PathInfo, real: &Path) -> Option<Arc<NarLayout>> {
        let key = Key::of(info);
        {
            let mut kept = lock(&self.state);
            if kept.too_large.contains(&key) {
                return None;
            }
            if let Some(i) = kept.layouts.iter().position(|(k, _)| *k == key) {
                let entry = kept.layouts.remove(i)?;
                let layout = entry.1.clone();
                kept.layouts.push_back(entry);
                return Some(layout);
            }
        }
        if !real.is_dir() {
            return None;
        }
        let recorded = NarLayout::record(real, MAX_LAYOUT_BYTES);
        let mut kept = lock(&self.state);
        match recorded {
            Ok(Some(layout)) if layout.size() == info.nar_size => {
                let layout = Arc::new(layout);
                kept.layouts.retain(|(k, _)| *k != key);
                kept.layouts.push_back((key, layout.clone()));
                while kept.layouts.len() > KEPT
                    || (kept.layouts.len() > 1 && kept.bytes() > MAX_KEPT_BYTES)
                {
                    kept.layouts.pop_front();
                }
                Some(layout)
            }
            Ok(None) => {
                if kept.too_large.len() >= TOO_LARGE_KEPT {
                    kept.too_large.pop_front();
                }
                kept.too_large.push_back(key);
                None
            }
            // Another size than the DB's, or a walk that failed: the walk
            // serving it finds the same and reports it.
            Ok(Some(_)) | Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::nar_encode::{encode, CHUNK};
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    /// The chunks a replay hands over.
    #[derive(Default)]
    struct Chunks(Vec<Bytes>);

    impl NarSink for Chunks {
        fn chunk(&mut self, chunk: Bytes) -> io::Result<()> {
            self.0.push(chunk);
            Ok(())
        }
    }

    impl Chunks {
        fn joined(&self) -> Vec<u8> {
            self.0.iter().flat_map(|c| c.to_vec()).collect()
        }
    }

    /// A tree with nesting, empty and large files, an executable, a
    /// symlink and an empty directory.
    fn tree(root: &Path) {
        let big: Vec<u8> = (0..2 * CHUNK + 77).map(|i| (i % 251) as u8).collect();
        for i in 0..40u32 {
            let sub = root.join(format!("d{}", i % 3)).join(format!("e{}", i % 2));
            fs::create_dir_all(&sub).unwrap();
            let bytes: Vec<u8> = (0..100 + i * 97)
                .map(|j| (j * (i + 5) % 251) as u8)
                .collect();
            fs::write(sub.join(format!("f{i}")), bytes).unwrap();
        }
        fs::write(root.join("big"), &big).unwrap();
        fs::write(root.join("empty"), b"").unwrap();
        fs::write(root.join("run"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("run"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("big", root.join("link")).unwrap();
        fs::create_dir(root.join("nothing")).unwrap();
    }

    #[test]
    fn a_layout_replays_every_part_as_the_walk_encodes_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        tree(&root);
        let mut whole = Vec::new();
        encode(&root, &mut whole).unwrap();
        let layout = NarLayout::record(&root, MAX_LAYOUT_BYTES)
            .unwrap()
            .expect("small enough");
        assert_eq!(layout.size(), whole.len() as u64);
        let n = whole.len() as u64;
        let mut offsets: Vec<u64> = (0..n).step_by(97).collect();
        offsets.extend([1, 8, CHUNK as u64, 2 * CHUNK as u64, n - 1, n]);
        for from in offsets {
            let mut out = Chunks::default();
            layout.replay(from, &mut out).unwrap();
            assert_eq!(out.joined(), &whole[from as usize..], "from {from}");
            // Chunks of `CHUNK` bytes from the offset, as the walk cuts them.
            let sizes: Vec<usize> = out.0.iter().map(|c| c.len()).collect();
            let (last, full) = sizes.split_last().map_or((&0, &[][..]), |(l, f)| (l, f));
            assert!(full.iter().all(|&s| s == CHUNK), "from {from}: {sizes:?}");
            assert!(*last <= CHUNK, "from {from}");
        }
    }

    #[test]
    fn a_file_that_changed_since_is_an_error_not_a_wrong_part() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        tree(&root);
        let layout = NarLayout::record(&root, MAX_LAYOUT_BYTES).unwrap().unwrap();
        fs::write(root.join("big"), b"shorter now").unwrap();
        let err = layout.replay(0, &mut Chunks::default()).unwrap_err();
        assert!(matches!(err, NarError::SizeChanged(_)), "{err}");
        // A file swapped for a symlink is not followed.
        let target = root.join("d0/e0/f0");
        fs::remove_file(&target).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &target).unwrap();
        let layout_err = layout.replay(1, &mut Chunks::default());
        assert!(layout_err.is_err());
    }

    #[test]
    fn a_tree_too_large_for_a_layout_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        tree(&root);
        assert!(NarLayout::record(&root, 2000).unwrap().is_none());
    }

    fn info(root: &Path, hash_byte: u8) -> PathInfo {
        let mut whole = Vec::new();
        encode(root, &mut whole).unwrap();
        let path = StorePath::parse(
            "/nix/store",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-tree",
        )
        .unwrap();
        PathInfo {
            path,
            nar_hash: Sha256Hash([hash_byte; 32]),
            nar_size: whole.len() as u64,
            references: Vec::new(),
            deriver: None,
            sigs: Vec::new(),
            ca: None,
            ultimate: false,
        }
    }

    #[test]
    fn layouts_are_kept_per_nar_and_a_file_nar_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        tree(&root);
        let layouts = NarLayouts::default();
        let a = layouts.get(&info(&root, 1), &root).expect("a tree");
        let again = layouts.get(&info(&root, 1), &root).expect("kept");
        assert!(Arc::ptr_eq(&a, &again));
        // Another NAR of the same path is recorded afresh.
        let other = layouts.get(&info(&root, 2), &root).expect("a tree");
        assert!(!Arc::ptr_eq(&a, &other));
        // Only the latest are kept.
        for b in 3..3 + KEPT as u8 {
            layouts.get(&info(&root, b), &root).expect("a tree");
        }
        let first = layouts.get(&info(&root, 1), &root).expect("recorded again");
        assert!(!Arc::ptr_eq(&a, &first));
        assert!(lock(&layouts.state).layouts.len() <= KEPT);
        // A NAR of the wrong size gets no layout.
        let mut wrong = info(&root, 99);
        wrong.nar_size += 1;
        assert!(layouts.get(&wrong, &root).is_none());
        // A single file is no tree.
        let file = root.join("big");
        assert!(layouts.get(&info(&file, 7), &file).is_none());
    }
}
