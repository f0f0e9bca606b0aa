//! The books of a directory of files kept within a byte budget, the least
//! recently used going first: the kept NARs (`nar_cache`) and the kept
//! zstd frames (`packed_frames`). The books (`DiskLru`) are pure: they say
//! which files to drop; the caller removes them, under the same lock as
//! these books, so that a file is never opened between its eviction and
//! its removal. The directory's own I/O is at the edges: `reopen` at start,
//! `room_after_remaking` when it was removed while the agent runs.

use std::collections::HashMap;
use std::fs::Metadata;
use std::io;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::disk_room::{disk_space, writable_dir};

/// What `/metrics` shows of a directory of kept files: uses served from
/// them, files (or parts) kept, files dropped as wrong, bytes on disk.
#[derive(Default)]
pub struct KeptStats {
    pub served: Counter,
    pub kept: Counter,
    pub dropped: Counter,
    pub bytes: Gauge<u64, AtomicU64>,
}

impl KeptStats {
    /// Registers the four under `names`: (name, help) of served, kept,
    /// dropped and bytes, in that order.
    pub fn register(&self, registry: &mut Registry, names: [(&str, &str); 4]) {
        let [served, kept, dropped, bytes] = names;
        for ((name, help), counter) in
            [served, kept, dropped]
                .into_iter()
                .zip([&self.served, &self.kept, &self.dropped])
        {
            registry.register(name, help, counter.clone());
        }
        registry.register(bytes.0, bytes.1, self.bytes.clone());
    }
}

struct Entry {
    size: u64,
    last_used: u64,
}

/// The books of the files kept in `dir` (made if missing, and checked
/// writable) by an earlier run, within `limit` bytes: each file named
/// `key` + `suffix` that `size` finds whole (`Some(bytes on disk)`) is
/// kept, the least recently modified first to go; anything else, and what
/// is over the budget, is removed.
pub fn reopen(
    dir: &Path,
    limit: u64,
    suffix: &str,
    size: impl Fn(&str, &Metadata) -> Option<u64>,
) -> io::Result<DiskLru> {
    writable_dir(dir)?;
    let mut found = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let name = item.file_name().to_string_lossy().into_owned();
        let kept = name.strip_suffix(suffix).zip(item.metadata().ok());
        match kept.and_then(|(key, m)| Some((key, size(key, &m)?, m))) {
            Some((key, bytes, m)) if m.is_file() && !key.is_empty() => {
                let modified = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                found.push((modified, key.to_string(), bytes));
            }
            _ => {
                let _ = std::fs::remove_file(item.path());
            }
        }
    }
    let mut lru = DiskLru::new(limit);
    let over = lru.restore(found);
    remove_files(dir, &over, suffix);
    Ok(lru)
}

pub struct DiskLru {
    entries: HashMap<String, Entry>,
    used: u64,
    limit: u64,
    /// Counts uses: an entry's `last_used` is a reading.
    clock: u64,
    generation: u64,
}

impl DiskLru {
    pub fn new(limit: u64) -> Self {
        Self {
            entries: HashMap::new(),
            used: 0,
            limit,
            clock: 0,
            generation: 0,
        }
    }

    /// Takes entries found on disk at start, `(modified, key, size)`, the
    /// least recently modified to go first; returns those over the budget,
    /// to be removed.
    pub fn restore(&mut self, mut found: Vec<(SystemTime, String, u64)>) -> Vec<String> {
        found.sort();
        for (_, key, size) in found {
            self.add(&key, size);
        }
        self.make_room(0, None)
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    /// Forgets every entry (their files are gone), and counts the clearing:
    /// a write begun before it must not undo its share from the new books.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.used = 0;
        self.generation += 1;
    }

    /// How many times the books were cleared.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// The kept keys that begin with `prefix`.
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.entries
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// The bytes `key` holds, if it is kept.
    pub fn size(&self, key: &str) -> Option<u64> {
        self.entries.get(key).map(|e| e.size)
    }

    /// `key` was just used; false if it is not kept.
    pub fn touch(&mut self, key: &str) -> bool {
        self.clock += 1;
        let now = self.clock;
        match self.entries.get_mut(key) {
            Some(e) => {
                e.last_used = now;
                true
            }
            None => false,
        }
    }

    /// `key` (kept from now on if it was not) holds `size` more bytes and
    /// was just used.
    pub fn add(&mut self, key: &str, size: u64) {
        self.clock += 1;
        let now = self.clock;
        let e = self.entries.entry(key.to_string()).or_insert(Entry {
            size: 0,
            last_used: now,
        });
        e.size += size;
        e.last_used = now;
        self.used += size;
    }

    /// `key` holds `size` fewer bytes (what was added for a write that
    /// failed).
    pub fn shrink(&mut self, key: &str, size: u64) {
        if let Some(e) = self.entries.get_mut(key) {
            let size = size.min(e.size);
            e.size -= size;
            self.used -= size.min(self.used);
        }
    }

    /// Forgets `key`; its size if it was kept.
    pub fn remove(&mut self, key: &str) -> Option<u64> {
        let e = self.entries.remove(key)?;
        self.used -= e.size.min(self.used);
        Some(e.size)
    }

    /// Drops the least recently used entries, sparing `spare`, until
    /// `incoming` more bytes fit; returns the keys dropped, whose files the
    /// caller removes.
    pub fn make_room(&mut self, incoming: u64, spare: Option<&str>) -> Vec<String> {
        let others = self
            .entries
            .iter()
            .filter(|(k, _)| Some(k.as_str()) != spare)
            .map(|(k, e)| (k.as_str(), e.size, e.last_used));
        let gone: Vec<String> = evictions(others, self.used, incoming, self.limit)
            .into_iter()
            .map(str::to_string)
            .collect();
        for key in &gone {
            self.remove(key);
        }
        gone
    }
}

/// Which entries (key, size, last used) to drop, least recently used
/// first, so that `incoming` more bytes fit under `limit` with `used`
/// taken.
fn evictions<'k>(
    entries: impl Iterator<Item = (&'k str, u64, u64)>,
    used: u64,
    incoming: u64,
    limit: u64,
) -> Vec<&'k str> {
    let mut by_age: Vec<_> = entries.collect();
    by_age.sort_unstable_by_key(|&(_, _, last_used)| last_used);
    let mut left = used;
    let mut out = Vec::new();
    for (key, size, _) in by_age {
        if left.saturating_add(incoming) <= limit {
            break;
        }
        left -= size.min(left);
        out.push(key);
    }
    out
}

/// (free, total) bytes of the disk holding `dir`, once `dir`, if it was
/// removed (say by hand, to free the disk), is made again: the files the
/// books count went with it, so they are cleared and `stats.bytes` follows.
/// `None` if `dir` cannot be made. Call with the books' lock held.
pub fn room_after_remaking(
    dir: &Path,
    books: &mut DiskLru,
    stats: &KeptStats,
) -> Option<(u64, u64)> {
    if !dir.is_dir() {
        if let Err(e) = writable_dir(dir) {
            tracing::debug!(dir = %dir.display(), error = %e, "cannot make a directory of kept files again");
            return None;
        }
        tracing::warn!(dir = %dir.display(), dropped = books.entries.len(), "a directory of kept files was removed; made it again");
        books.clear();
        stats.bytes.set(books.used());
    }
    disk_space(dir)
}

/// Removes the files of `keys` from `dir`, each named `key` + `suffix`.
pub fn remove_files(dir: &Path, keys: &[String], suffix: &str) {
    for key in keys {
        let _ = std::fs::remove_file(dir.join(format!("{key}{suffix}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_are_evicted_until_the_new_one_fits() {
        let entries = [("a", 40, 3), ("b", 30, 1), ("c", 20, 2)];
        let pick =
            |used, incoming, limit| evictions(entries.iter().copied(), used, incoming, limit);
        assert!(pick(90, 10, 100).is_empty());
        assert_eq!(pick(90, 11, 100), vec!["b"]);
        assert_eq!(pick(90, 50, 100), vec!["b", "c"]);
        assert_eq!(pick(90, 100, 100), vec!["b", "c", "a"]);
        // More than the limit: everything goes, and nothing underflows.
        assert_eq!(pick(90, 500, 100), vec!["b", "c", "a"]);
        assert_eq!(pick(90, 0, 0), vec!["b", "c", "a"]);
    }

    #[test]
    fn books_follow_use_growth_and_failed_writes() {
        let t = |s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        let mut lru = DiskLru::new(100);
        // Restored oldest first; over the budget, the oldest go.
        let over = lru.restore(vec![
            (t(3), "new".into(), 50),
            (t(1), "old".into(), 40),
            (t(2), "mid".into(), 30),
        ]);
        assert_eq!(over, ["old"]);
        assert_eq!(lru.used(), 80);
        assert!(lru.touch("mid"));
        assert!(!lru.touch("gone"));
        // "new" is now the least recently used; "mid" is spared anyway.
        assert_eq!(lru.make_room(30, Some("mid")), ["new"]);
        lru.add("mid", 60);
        assert_eq!(lru.size("mid"), Some(90));
        lru.shrink("mid", 60);
        assert_eq!((lru.size("mid"), lru.used()), (Some(30), 30));
        assert_eq!(lru.remove("mid"), Some(30));
        assert_eq!(lru.used(), 0);
    }

    #[test]
    fn clearing_the_books_forgets_all_and_counts() {
        let mut lru = DiskLru::new(100);
        lru.add("a", 40);
        lru.add("b", 20);
        assert_eq!(lru.generation(), 0);
        lru.clear();
        assert_eq!((lru.used(), lru.limit(), lru.generation()), (0, 100, 1));
        assert!(!lru.contains("a") && !lru.touch("b"));
        assert!(lru.make_room(100, None).is_empty());
    }

    #[test]
    fn a_removed_directory_is_made_again_with_empty_books() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("kept");
        let mut books = reopen(&dir, 100, ".f", |_, m| Some(m.len())).unwrap();
        let stats = KeptStats::default();
        books.add("a", 40);
        stats.bytes.set(40);
        assert!(room_after_remaking(&dir, &mut books, &stats).is_some());
        assert_eq!(
            books.used(),
            40,
            "a directory that is there keeps its books"
        );
        assert_eq!(stats.bytes.get(), 40);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(room_after_remaking(&dir, &mut books, &stats).is_some());
        assert!(dir.is_dir());
        assert_eq!((books.used(), stats.bytes.get()), (0, 0));
        assert_eq!(books.generation(), 1);
        // Where it cannot be made (its parent is a file), it says so and
        // the books are left alone.
        books.add("b", 10);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::write(&dir, b"not a directory").unwrap();
        assert!(room_after_remaking(&dir.join("kept"), &mut books, &stats).is_none());
        assert_eq!(books.used(), 10);
    }
}
