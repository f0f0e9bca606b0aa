//! NARs of many small files, kept encoded on disk under
//! `<state_dir>/nar-cache` so that serving one again reads a single file
//! instead of walking the tree. Walking costs per file (a lookup, an open,
//! an fstat, a read and a close each), so a tree of 2000 small files costs
//! about three times the CPU per byte of one large file; a NAR of few or
//! large files is cheap to encode and is not kept.
//!
//! What a whole serve from the store walked says whether the NAR is worth
//! keeping (`served`); most NARs a host serves go out once, so it is
//! written here only when it is served whole again (`begin`), hashed on
//! the way, and kept only if it then matches the DB's NarHash and size:
//! what is served from here was verified once, and is on disk (synced)
//! before it takes its name. Entries are named by NarHash and size, so a
//! path rebuilt with other bytes never meets an old entry. Bounded by
//! `share.nar_cache_mib`: the least recently served go first, an entry
//! takes at most an eighth, and a disk short of room (`disk_has_room`,
//! counting the entries being written) gets nothing new. A kept copy that
//! cannot be opened or has the wrong size is dropped and the store serves;
//! one that fails mid-stream ends that stream in an error and is dropped.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::disk_room::{disk_has_room, disk_space};
use crate::lock::lock;
use crate::nix::PathInfo;
use crate::store::disk_lru::{remove_files, reopen, room_after_remaking, DiskLru, KeptStats};

/// Regular files a NAR must hold to be kept.
pub const MIN_FILES: u64 = 16;
/// The largest mean file size (NAR bytes per file) of a NAR that is kept.
pub const MAX_MEAN_FILE: u64 = 64 * 1024;
/// An entry may take at most this share of the cache (1/n).
const ENTRY_SHARE: u64 = 8;
/// NARs remembered as served whole; past this the memory starts again
/// (about 100 bytes each).
const MAX_SEEN: usize = 16 * 1024;

/// Whether a NAR of `nar_size` bytes holding `files` regular files is worth
/// keeping encoded: many files, small on average. Pure.
pub fn worth_keeping(nar_size: u64, files: u64) -> bool {
    files >= MIN_FILES && nar_size / files <= MAX_MEAN_FILE
}

/// The cache's metrics: (name, help) of served, kept, dropped, bytes.
pub const METRICS: [(&str, &str); 4] = [
    (
        "nixmesh_nar_cache_served",
        "NARs served from their kept encoded copies",
    ),
    (
        "nixmesh_nar_cache_kept",
        "NARs of many small files kept encoded",
    ),
    (
        "nixmesh_nar_cache_dropped",
        "Kept NARs dropped as wrong, cut short or unreadable",
    ),
    ("nixmesh_nar_cache_bytes", "Bytes of kept NARs on disk"),
];

struct Index {
    kept: DiskLru,
    /// Keys being written now (one writer per NAR), with their sizes.
    writing: HashMap<String, u64>,
    /// NARs served whole from the store: whether worth keeping.
    seen: HashMap<String, bool>,
}

impl Index {
    fn pending(&self) -> u64 {
        self.writing.values().sum()
    }
}

pub struct NarCache {
    pub stats: KeptStats,
    dir: PathBuf,
    limit: u64,
    index: Mutex<Index>,
    temp_seq: AtomicU64,
}

/// The entry name of a NAR: its NarHash and size.
fn key_of(info: &PathInfo) -> String {
    format!("{}-{}", info.nar_hash.nix32_digest(), info.nar_size)
}

/// The NAR size an entry's key (its file name less `.nar`) states.
fn entry_size(key: &str) -> Option<u64> {
    key.rsplit_once('-')?.1.parse().ok()
}

impl NarCache {
    /// The cache in `dir` (made if missing), at most `limit` bytes. Whole
    /// entries left by an earlier run are kept, the least recently
    /// modified first to go; unfinished writes and anything else are
    /// removed. Fails if `dir` cannot be written.
    pub fn open(dir: PathBuf, limit: u64) -> io::Result<Arc<Self>> {
        let kept = reopen(&dir, limit, ".nar", |key, m| {
            let size = entry_size(key)?;
            (m.len() == size && size <= limit / ENTRY_SHARE).then_some(size)
        })?;
        let index = Index {
            kept,
            writing: HashMap::new(),
            seen: HashMap::new(),
        };
        let cache = Arc::new(Self {
            stats: KeptStats::default(),
            dir,
            limit,
            index: Mutex::new(index),
            temp_seq: AtomicU64::new(0),
        });
        cache.stats.bytes.set(cache.used());
        Ok(cache)
    }

    pub fn used(&self) -> u64 {
        lock(&self.index).kept.used()
    }

    fn entry_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.nar"))
    }

    /// The kept NAR of `info`, opened, and where it is, if there is one of
    /// the right size. An entry that cannot be opened or has another size
    /// is dropped.
    pub fn open_entry(&self, info: &PathInfo) -> Option<(PathBuf, File)> {
        let key = key_of(info);
        let path = self.entry_path(&key);
        let opened = {
            let mut index = lock(&self.index);
            if !index.kept.touch(&key) {
                return None;
            }
            // Opened under the lock: eviction cannot come in between.
            File::open(&path)
        };
        match opened.and_then(|f| Ok((f.metadata()?.len(), f))) {
            Ok((len, f)) if len == info.nar_size => {
                self.stats.served.inc();
                Some((path, f))
            }
            Ok((len, _)) => {
                tracing::warn!(path = %info.path, len, "a kept NAR has the wrong size; dropping it");
                self.forget(info);
                None
            }
            Err(e) => {
                tracing::warn!(path = %info.path, error = %e, "a kept NAR cannot be read; dropping it");
                self.forget(info);
                None
            }
        }
    }

    /// Drops the kept NAR of `info`, if any (it was found wrong).
    pub fn forget(&self, info: &PathInfo) {
        let key = key_of(info);
        let mut index = lock(&self.index);
        if index.kept.remove(&key).is_some() {
            let _ = std::fs::remove_file(self.entry_path(&key));
            self.stats.dropped.inc();
            self.stats.bytes.set(index.kept.used());
        }
    }

    /// `info`'s whole NAR, holding `files` regular files, was served from
    /// the store without being written here.
    pub fn served(&self, info: &PathInfo, files: u64) {
        let mut index = lock(&self.index);
        if index.seen.len() >= MAX_SEEN {
            index.seen.clear();
        }
        let worth = worth_keeping(info.nar_size, files);
        index.seen.insert(key_of(info), worth);
    }

    /// A writer for `info`'s whole NAR, which is being served, if it is to
    /// be kept: served whole before and worth keeping, not kept nor being
    /// written already, small enough for the cache, room on disk.
    pub fn begin(self: &Arc<Self>, info: &PathInfo) -> Option<CacheWriter> {
        if info.nar_size > self.limit / ENTRY_SHARE {
            return None;
        }
        let key = key_of(info);
        if lock(&self.index).seen.get(&key) != Some(&true) {
            return None;
        }
        let (free, total) = disk_space(&self.dir)
            .or_else(|| room_after_remaking(&self.dir, &mut lock(&self.index).kept, &self.stats))?;
        {
            let mut index = lock(&self.index);
            if index.kept.contains(&key) || index.writing.contains_key(&key) {
                return None;
            }
            if !disk_has_room(free, total, index.pending(), info.nar_size) {
                return None;
            }
            index.writing.insert(key.clone(), info.nar_size);
        }
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let temp = self.dir.join(format!("{key}.{seq}.part"));
        match File::create(&temp) {
            Ok(file) => Some(CacheWriter {
                cache: self.clone(),
                key,
                temp,
                file,
                failed: false,
            }),
            Err(e) => {
                tracing::debug!(error = %e, "cannot write to the NAR cache");
                lock(&self.index).writing.remove(&key);
                None
            }
        }
    }

    /// The complete, verified `temp` becomes the entry `key`.
    fn admit(&self, key: &str, temp: &Path, size: u64) -> io::Result<()> {
        let mut index = lock(&self.index);
        let gone = index.kept.make_room(size, None);
        remove_files(&self.dir, &gone, ".nar");
        std::fs::rename(temp, self.entry_path(key))?;
        index.kept.remove(key);
        index.kept.add(key, size);
        self.stats.kept.inc();
        self.stats.bytes.set(index.kept.used());
        Ok(())
    }
}

/// One NAR on its way into the cache: written as it is served (the stream
/// hashes it). Dropped without `finish`, it leaves nothing behind.
pub struct CacheWriter {
    cache: Arc<NarCache>,
    key: String,
    temp: PathBuf,
    file: File,
    failed: bool,
}

impl CacheWriter {
    /// The next bytes of the NAR. A failed write (a full disk) ends the
    /// entry, never the stream being served.
    pub fn write(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        if let Err(e) = self.file.write_all(bytes) {
            tracing::debug!(error = %e, "writing to the NAR cache failed; not keeping this NAR");
            self.failed = true;
        }
    }

    /// The whole NAR of `info` (its size checked), holding `files` regular
    /// files and hashing to `digest`, went by: kept if it matches `info`'s
    /// NarHash and is worth keeping.
    pub fn finish(self, info: &PathInfo, files: u64, digest: Option<[u8; 32]>) {
        if !worth_keeping(info.nar_size, files) {
            self.cache.served(info, files);
            return;
        }
        if self.failed {
            return;
        }
        if digest != Some(info.nar_hash.0) {
            tracing::warn!(path = %info.path, "the store copy does not match its NarHash; not keeping it");
            return;
        }
        // On disk before it has its name: a crash leaves a whole entry or
        // a temp file, never a named one with holes.
        let kept = self
            .file
            .sync_data()
            .and_then(|()| self.cache.admit(&self.key, &self.temp, info.nar_size));
        if let Err(e) = kept {
            tracing::debug!(error = %e, "cannot keep a NAR in the cache");
        }
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        // After a successful `admit` the temp name is gone: harmless.
        let _ = std::fs::remove_file(&self.temp);
        lock(&self.cache.index).writing.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::nar_stream::tests::info_for;
    use sha2::{Digest, Sha256};
    use std::io::Read;

    fn nar(n: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(n)).collect()
    }

    /// Serves `bytes` whole once through the cache, as `nar_stream` does.
    fn serve(cache: &Arc<NarCache>, info: &PathInfo, bytes: &[u8], files: u64) {
        match cache.begin(info) {
            Some(mut w) => {
                for piece in bytes.chunks(7000) {
                    w.write(piece);
                }
                w.finish(info, files, Some(Sha256::digest(bytes).into()));
            }
            None => cache.served(info, files),
        }
    }

    fn read_kept(cache: &NarCache, info: &PathInfo) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        cache.open_entry(info)?.1.read_to_end(&mut out).unwrap();
        Some(out)
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A cache of `limit` bytes in `<tempdir>/c`.
    fn scratch(limit: u64) -> (tempfile::TempDir, Arc<NarCache>) {
        let dir = tempfile::tempdir().unwrap();
        let cache = NarCache::open(dir.path().join("c"), limit).unwrap();
        (dir, cache)
    }

    #[test]
    fn many_small_files_are_worth_keeping_few_or_large_are_not() {
        assert!(worth_keeping(2000 * 8192, 2000));
        assert!(worth_keeping(MIN_FILES * MAX_MEAN_FILE, MIN_FILES));
        assert!(!worth_keeping(
            MIN_FILES * MAX_MEAN_FILE + MIN_FILES,
            MIN_FILES
        ));
        assert!(!worth_keeping(1000, MIN_FILES - 1));
        assert!(!worth_keeping(500 << 20, 40));
        assert!(!worth_keeping(0, 0));
    }

    #[test]
    fn a_nar_is_kept_when_served_whole_a_second_time() {
        let (dir, cache) = scratch(64 << 20);
        let bytes = nar(3, 100_000);
        let info = info_for(&bytes);
        serve(&cache, &info, &bytes, 40);
        assert_eq!(read_kept(&cache, &info), None, "kept after one serve");
        serve(&cache, &info, &bytes, 40);
        assert_eq!(read_kept(&cache, &info).as_deref(), Some(&bytes[..]));
        assert_eq!(cache.used(), bytes.len() as u64);
        assert!(cache.begin(&info).is_none(), "written twice");
        assert_eq!(cache.stats.kept.get(), 1);
        assert_eq!(cache.stats.served.get(), 1);
        assert_eq!(cache.stats.bytes.get(), bytes.len() as u64);
        // Only the entry is left on disk, no temp file.
        assert_eq!(files_in(&dir.path().join("c")).len(), 1);
        cache.forget(&info);
        assert_eq!(read_kept(&cache, &info), None);
        assert_eq!(cache.used(), 0);
        assert_eq!(cache.stats.dropped.get(), 1);
        assert_eq!(cache.stats.bytes.get(), 0);
        assert!(files_in(&dir.path().join("c")).is_empty());
    }

    #[test]
    fn nars_are_kept_again_after_their_directory_was_removed() {
        let (dir, cache) = scratch(64 << 20);
        let (a, b) = (nar(3, 100_000), nar(5, 90_000));
        let (info_a, info_b) = (info_for(&a), info_for(&b));
        for _ in 0..2 {
            serve(&cache, &info_a, &a, 40);
        }
        assert!(read_kept(&cache, &info_a).is_some());
        std::fs::remove_dir_all(dir.path().join("c")).unwrap();
        // Kept again before anything reads the NAR that went: the books
        // start over, and count only what is on disk.
        for _ in 0..2 {
            serve(&cache, &info_b, &b, 40);
        }
        assert_eq!(cache.used(), b.len() as u64);
        assert_eq!(cache.stats.bytes.get(), b.len() as u64);
        assert_eq!(read_kept(&cache, &info_b).as_deref(), Some(&b[..]));
        assert_eq!(read_kept(&cache, &info_a), None);
    }

    #[test]
    fn a_copy_that_fails_its_hash_or_size_or_is_not_worth_it_is_not_kept() {
        let (dir, cache) = scratch(64 << 20);
        let bytes = nar(5, 50_000);
        let info = info_for(&bytes);
        let mut rotten = bytes.clone();
        rotten[25_000] ^= 1;
        serve(&cache, &info, &bytes, 40);
        serve(&cache, &info, &rotten, 40);
        assert_eq!(read_kept(&cache, &info), None, "a wrong copy was kept");
        serve(&cache, &info, &bytes[..40_000], 40);
        assert_eq!(read_kept(&cache, &info), None, "a short copy was kept");
        assert!(
            files_in(&dir.path().join("c")).is_empty(),
            "temp files left"
        );

        // Few files: not kept, and not written again.
        let other = nar(7, 50_000);
        let few = info_for(&other);
        serve(&cache, &few, &other, 1);
        serve(&cache, &few, &other, 1);
        assert_eq!(read_kept(&cache, &few), None);
        assert!(cache.begin(&few).is_none(), "written again");
    }

    #[test]
    fn the_least_recently_served_go_first_and_big_ones_are_not_kept() {
        // Eight entries of 110 000 fit; an entry may take an eighth.
        let (_dir, cache) = scratch(8 * 120_000);
        let big = nar(9, 130_000);
        let big_info = info_for(&big);
        serve(&cache, &big_info, &big, 40);
        serve(&cache, &big_info, &big, 40);
        assert_eq!(read_kept(&cache, &big_info), None, "over an eighth kept");

        let kept: Vec<(PathInfo, Vec<u8>)> = (1..=9)
            .map(|n| {
                let bytes = nar(n, 110_000);
                (info_for(&bytes), bytes)
            })
            .collect();
        for (i, (info, bytes)) in kept.iter().enumerate() {
            serve(&cache, info, bytes, 40);
            serve(&cache, info, bytes, 40);
            // The first one is read after each new one: always the most
            // recently served.
            assert!(read_kept(&cache, &kept[0].0).is_some(), "entry {i}");
        }
        assert_eq!(cache.used(), 8 * 110_000);
        // The ninth pushed out the one kept right after the first.
        assert_eq!(read_kept(&cache, &kept[1].0), None);
        for (info, bytes) in kept.iter().skip(2) {
            assert_eq!(read_kept(&cache, info).as_deref(), Some(&bytes[..]));
        }
    }

    #[test]
    fn opening_keeps_whole_entries_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("c");
        let bytes = nar(4, 30_000);
        let info = info_for(&bytes);
        {
            let cache = NarCache::open(at.clone(), 64 << 20).unwrap();
            serve(&cache, &info, &bytes, 40);
            serve(&cache, &info, &bytes, 40);
        }
        std::fs::write(at.join("leftover.3.part"), b"x").unwrap();
        std::fs::write(at.join("junk"), b"x").unwrap();
        let cache = NarCache::open(at.clone(), 64 << 20).unwrap();
        assert_eq!(files_in(&at).len(), 1, "{:?}", files_in(&at));
        assert_eq!(read_kept(&cache, &info).as_deref(), Some(&bytes[..]));

        // An entry cut short on disk is dropped when it is next opened.
        let entry = at.join(&files_in(&at)[0]);
        std::fs::write(&entry, &bytes[..100]).unwrap();
        assert_eq!(read_kept(&cache, &info), None);
        assert!(files_in(&at).is_empty());
        assert_eq!(cache.used(), 0);

        // Entries over a smaller limit go at once.
        drop(cache);
        let cache = NarCache::open(at.clone(), 64 << 20).unwrap();
        serve(&cache, &info, &bytes, 40);
        serve(&cache, &info, &bytes, 40);
        drop(cache);
        let cache = NarCache::open(at.clone(), 1000).unwrap();
        assert_eq!(cache.used(), 0);
        assert!(files_in(&at).is_empty());
    }
}
