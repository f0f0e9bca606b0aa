//! zstd frames of large NARs, kept on disk under `<state_dir>/packed` once
//! a holder has packed them for a peer, so that the next peer asking for
//! the same NAR at the same level gets the same frames without the holder
//! packing them again. zstd at level 1 packs a few hundred MB/s per core:
//! when ten hosts of an office fetch a new closure from the hosts that
//! have it, each holder would otherwise pack every chunk once per asker.
//!
//! One file per NAR and level, named by NarHash, size and level; chunk `i`
//! (the NAR's bytes from `i * SLOT_PAYLOAD`) in slot `i` at `i * SLOT`, so
//! the file is sparse and a slot no serve has filled reads as zeros. A
//! slot is a header (`MAGIC`, raw length, payload length, CRC-32 of the
//! payload) and the zstd payload, the payload written first: a slot whose
//! payload did not reach the disk fails its CRC, is dropped with its file,
//! and the chunk is packed afresh; no peer is sent a frame that differs
//! from what was packed. Whether the frames are right is for the asker's
//! NarHash check to say, as for any NAR: a peer reporting a NAR wrong
//! drops its frames here (`SharedStore::recheck`). Only NARs of at least
//! `MIN_NAR` bytes are kept (small ones cost little to pack). Bounded by
//! `share.packed_mib`: the least recently served files go first, a file
//! takes at most half, and a disk short of room gets nothing new.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::disk_room::{disk_has_room, disk_space, writable_dir};
use crate::lock::lock;
use crate::nix::PathInfo;
use crate::store::nar_cache::evictions;

/// NAR bytes per slot: the chunk the holder packs.
pub const SLOT_PAYLOAD: usize = 256 << 10;
/// Slot header: magic, raw length, payload length, CRC-32 of the payload.
const SLOT_HEADER: usize = 16;
/// Bytes from one slot to the next in a file.
const SLOT: u64 = (SLOT_PAYLOAD + SLOT_HEADER) as u64;
const MAGIC: [u8; 4] = *b"NMZ1";
/// NARs smaller than this are packed afresh each time.
pub const MIN_NAR: u64 = 1 << 20;
/// A file may take at most this share of the budget (1/n).
const FILE_SHARE: u64 = 2;
const SUFFIX: &str = ".frames";

/// A slot's header. Pure.
fn slot_header(raw_len: u32, payload: &[u8]) -> [u8; SLOT_HEADER] {
    let mut h = [0u8; SLOT_HEADER];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&raw_len.to_be_bytes());
    h[8..12].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    h[12..].copy_from_slice(&crc32fast::hash(payload).to_be_bytes());
    h
}

/// What a slot's header says.
#[derive(Debug, PartialEq, Eq)]
enum Slot {
    /// Never written (zeros).
    Empty,
    /// A frame of `len` payload bytes with this CRC.
    Frame { len: usize, crc: u32 },
    /// Not a header for a chunk of the raw length asked for.
    Wrong,
}

/// Reads a slot header for a chunk of `raw_len` NAR bytes. Pure.
fn parse_slot(h: &[u8; SLOT_HEADER], raw_len: usize) -> Slot {
    if h[..4] == [0; 4] {
        return Slot::Empty;
    }
    let word = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let (raw, len) = (word(4) as usize, word(8) as usize);
    if h[..4] != MAGIC || raw != raw_len || len == 0 || len >= raw_len || len > SLOT_PAYLOAD {
        return Slot::Wrong;
    }
    Slot::Frame { len, crc: word(12) }
}

/// The frames file of one NAR at one zstd level.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FramesKey(String);

impl FramesKey {
    /// The key of `info`'s frames at zstd `level`; `None` for a NAR too
    /// small to keep.
    pub fn of(info: &PathInfo, level: u8) -> Option<Self> {
        (info.nar_size >= MIN_NAR).then(|| {
            FramesKey(format!(
                "{}-{}-z{level}",
                info.nar_hash.nix32_digest(),
                info.nar_size
            ))
        })
    }

    fn is_of(&self, info: &PathInfo) -> bool {
        let prefix = format!("{}-{}-z", info.nar_hash.nix32_digest(), info.nar_size);
        self.0.starts_with(&prefix)
    }
}

/// What `/metrics` shows of the kept frames.
#[derive(Default)]
pub struct PackedStats {
    pub served: Counter,
    pub kept: Counter,
    pub dropped: Counter,
    pub bytes: Gauge<u64, AtomicU64>,
}

impl PackedStats {
    pub fn register(&self, registry: &mut Registry) {
        let counters = [
            (
                "nixmesh_packed_chunks_served",
                "NAR chunks sent to peers as kept zstd frames, not packed again",
                &self.served,
            ),
            (
                "nixmesh_packed_chunks_kept",
                "zstd frames of NAR chunks kept on disk",
                &self.kept,
            ),
            (
                "nixmesh_packed_files_dropped",
                "Files of kept frames dropped as wrong or unreadable",
                &self.dropped,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "nixmesh_packed_bytes",
            "Bytes of kept zstd frames on disk",
            self.bytes.clone(),
        );
    }
}

struct Meta {
    size: u64,
    last_used: u64,
}

#[derive(Default)]
struct Index {
    files: HashMap<FramesKey, Meta>,
    used: u64,
    clock: u64,
}

pub struct PackedFrames {
    pub stats: PackedStats,
    dir: PathBuf,
    limit: u64,
    index: Mutex<Index>,
}

impl PackedFrames {
    /// The frames in `dir` (made if missing), at most `limit` bytes. Files
    /// left by an earlier run are kept, the least recently modified first
    /// to go; anything else is removed. Fails if `dir` cannot be written.
    pub fn open(dir: PathBuf, limit: u64) -> io::Result<Arc<Self>> {
        writable_dir(&dir)?;
        let mut found = Vec::new();
        for item in std::fs::read_dir(&dir)? {
            let item = item?;
            let name = item.file_name().to_string_lossy().into_owned();
            let meta = item.metadata().ok().filter(|m| m.is_file());
            match (name.strip_suffix(SUFFIX), meta) {
                (Some(key), Some(m)) if !key.is_empty() => {
                    let modified = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                    // Sparse: what the disk holds, not the file's length.
                    found.push((modified, key.to_string(), m.blocks() * 512));
                }
                _ => {
                    let _ = std::fs::remove_file(item.path());
                }
            }
        }
        found.sort();
        let mut index = Index::default();
        for (tick, (_, key, size)) in found.into_iter().enumerate() {
            index.used += size;
            let last_used = tick as u64 + 1;
            index.files.insert(FramesKey(key), Meta { size, last_used });
        }
        index.clock = index.files.len() as u64;
        let frames = Arc::new(Self {
            stats: PackedStats::default(),
            dir,
            limit,
            index: Mutex::new(index),
        });
        frames.evict(&mut lock(&frames.index), 0);
        Ok(frames)
    }

    pub fn used(&self) -> u64 {
        lock(&self.index).used
    }

    fn path(&self, key: &FramesKey) -> PathBuf {
        self.dir.join(format!("{}{SUFFIX}", key.0))
    }

    /// The kept zstd payload of chunk `slot` (of `raw_len` NAR bytes), if
    /// one was kept and reads back whole. A slot that does not is dropped
    /// with its file.
    pub fn get(&self, key: &FramesKey, slot: u64, raw_len: usize) -> Option<Vec<u8>> {
        let file = {
            let mut index = lock(&self.index);
            index.clock += 1;
            let now = index.clock;
            index.files.get_mut(key)?.last_used = now;
            // Opened under the lock: eviction cannot come in between.
            File::open(self.path(key))
        };
        let read = |file: &File| -> io::Result<Option<Vec<u8>>> {
            let mut h = [0u8; SLOT_HEADER];
            match file.read_exact_at(&mut h, slot * SLOT) {
                // A file that ends before the slot: never written that far.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                other => other?,
            }
            let (len, crc) = match parse_slot(&h, raw_len) {
                Slot::Empty => return Ok(None),
                Slot::Frame { len, crc } => (len, crc),
                Slot::Wrong => return Err(io::Error::other("a slot header is wrong")),
            };
            let mut payload = vec![0u8; len];
            file.read_exact_at(&mut payload, slot * SLOT + SLOT_HEADER as u64)?;
            if crc32fast::hash(&payload) != crc {
                return Err(io::Error::other("a frame fails its CRC"));
            }
            Ok(Some(payload))
        };
        match file.and_then(|f| read(&f)) {
            Ok(Some(payload)) => {
                self.stats.served.inc();
                Some(payload)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(frames = %key.0, slot, error = %e, "kept zstd frames are unreadable; dropping them");
                self.drop_file(key);
                None
            }
        }
    }

    /// Keeps `payload`, chunk `slot`'s zstd frame of `raw_len` NAR bytes,
    /// if the slot is empty and the budget and the disk have room.
    pub fn put(&self, key: &FramesKey, slot: u64, raw_len: usize, payload: &[u8]) {
        if payload.is_empty() || payload.len() >= raw_len || payload.len() > SLOT_PAYLOAD {
            return;
        }
        let adds = (SLOT_HEADER + payload.len()) as u64;
        let Some((free, total)) = disk_space(&self.dir) else {
            return;
        };
        if !disk_has_room(free, total, 0, adds) {
            return;
        }
        let file = {
            let mut index = lock(&self.index);
            let had = index.files.get(key).map_or(0, |m| m.size);
            if had + adds > self.limit / FILE_SHARE {
                return;
            }
            self.evict_for(&mut index, key, adds);
            let opened = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(self.path(key));
            let Ok(file) = opened else {
                return;
            };
            index.clock += 1;
            let now = index.clock;
            let meta = index.files.entry(key.clone()).or_insert(Meta {
                size: 0,
                last_used: now,
            });
            meta.size += adds;
            meta.last_used = now;
            index.used += adds;
            self.stats.bytes.set(index.used);
            file
        };
        let mut h = [0u8; SLOT_HEADER];
        let written = match file.read_exact_at(&mut h, slot * SLOT) {
            // Another serve got there first.
            Ok(()) if parse_slot(&h, raw_len) != Slot::Empty => return,
            _ => file
                .write_all_at(payload, slot * SLOT + SLOT_HEADER as u64)
                .and_then(|()| {
                    file.write_all_at(&slot_header(raw_len as u32, payload), slot * SLOT)
                }),
        };
        match written {
            Ok(()) => {
                self.stats.kept.inc();
            }
            Err(e) => {
                tracing::debug!(frames = %key.0, error = %e, "cannot keep a zstd frame");
                self.drop_file(key);
            }
        }
    }

    /// Drops every kept frame of `info` (a peer found its NAR wrong).
    pub fn forget(&self, info: &PathInfo) {
        let keys: Vec<FramesKey> = lock(&self.index)
            .files
            .keys()
            .filter(|k| k.is_of(info))
            .cloned()
            .collect();
        for key in keys {
            self.drop_file(&key);
        }
    }

    fn drop_file(&self, key: &FramesKey) {
        let mut index = lock(&self.index);
        if let Some(meta) = index.files.remove(key) {
            index.used -= meta.size.min(index.used);
            let _ = std::fs::remove_file(self.path(key));
            self.stats.dropped.inc();
            self.stats.bytes.set(index.used);
        }
    }

    /// Makes room for `incoming` more bytes of `keep`'s file.
    fn evict_for(&self, index: &mut Index, keep: &FramesKey, incoming: u64) {
        let others = index
            .files
            .iter()
            .filter(|(k, _)| *k != keep)
            .map(|(k, m)| (k.0.as_str(), m.size, m.last_used));
        let gone: Vec<FramesKey> = evictions(others, index.used, incoming, self.limit)
            .into_iter()
            .map(|k| FramesKey(k.to_string()))
            .collect();
        for key in gone {
            if let Some(meta) = index.files.remove(&key) {
                index.used -= meta.size.min(index.used);
                let _ = std::fs::remove_file(self.path(&key));
            }
        }
        self.stats.bytes.set(index.used);
    }

    fn evict(&self, index: &mut Index, incoming: u64) {
        let none = FramesKey(String::new());
        self.evict_for(index, &none, incoming);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::Sha256Hash;
    use crate::store::nar_stream::tests::info_for;

    fn info(seed: u8, nar_size: u64) -> PathInfo {
        PathInfo {
            nar_hash: Sha256Hash([seed; 32]),
            nar_size,
            ..info_for(b"")
        }
    }

    fn scratch(limit: u64) -> (tempfile::TempDir, Arc<PackedFrames>) {
        let dir = tempfile::tempdir().unwrap();
        let frames = PackedFrames::open(dir.path().join("packed"), limit).unwrap();
        (dir, frames)
    }

    #[test]
    fn a_kept_frame_reads_back_and_an_empty_slot_is_none() {
        let (_dir, frames) = scratch(64 << 20);
        let key = FramesKey::of(&info(1, 8 << 20), 1).unwrap();
        assert_eq!(frames.get(&key, 3, SLOT_PAYLOAD), None);
        frames.put(&key, 3, SLOT_PAYLOAD, b"packed bytes");
        assert_eq!(
            frames.get(&key, 3, SLOT_PAYLOAD).as_deref(),
            Some(&b"packed bytes"[..])
        );
        assert_eq!(frames.get(&key, 2, SLOT_PAYLOAD), None);
        assert_eq!(frames.get(&key, 9, SLOT_PAYLOAD), None);
        // Another raw length is another chunk: not this frame.
        assert_eq!(frames.get(&key, 3, 1000), None);
        assert_eq!(frames.stats.kept.get(), 1);
        assert_eq!(frames.stats.served.get(), 1);
        // The other level is another file.
        assert_eq!(
            frames.get(
                &FramesKey::of(&info(1, 8 << 20), 3).unwrap(),
                3,
                SLOT_PAYLOAD
            ),
            None
        );
    }

    #[test]
    fn small_nars_and_frames_that_did_not_shrink_are_not_kept() {
        let (_dir, frames) = scratch(64 << 20);
        assert_eq!(FramesKey::of(&info(1, MIN_NAR - 1), 1), None);
        let key = FramesKey::of(&info(1, MIN_NAR), 1).unwrap();
        frames.put(&key, 0, 10, &[7; 10]);
        assert_eq!(frames.get(&key, 0, 10), None);
        assert_eq!(frames.used(), 0);
    }

    #[test]
    fn a_rotten_frame_drops_its_file() {
        let (dir, frames) = scratch(64 << 20);
        let key = FramesKey::of(&info(2, 8 << 20), 1).unwrap();
        frames.put(&key, 0, SLOT_PAYLOAD, &[5; 1000]);
        frames.put(&key, 1, SLOT_PAYLOAD, &[6; 1000]);
        let path = dir.path().join("packed").join(format!("{}{SUFFIX}", key.0));
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[9], SLOT + SLOT_HEADER as u64 + 500)
            .unwrap();
        assert_eq!(frames.get(&key, 1, SLOT_PAYLOAD), None);
        assert!(!path.exists());
        assert_eq!(frames.stats.dropped.get(), 1);
        assert_eq!(frames.get(&key, 0, SLOT_PAYLOAD), None);
        assert_eq!(frames.used(), 0);
    }

    #[test]
    fn a_header_without_its_payload_fails_its_crc() {
        let (dir, frames) = scratch(64 << 20);
        let key = FramesKey::of(&info(3, 8 << 20), 1).unwrap();
        frames.put(&key, 0, SLOT_PAYLOAD, &[5; 1000]);
        let path = dir.path().join("packed").join(format!("{}{SUFFIX}", key.0));
        // As after a crash that wrote the header of slot 1 but not its payload.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&slot_header(SLOT_PAYLOAD as u32, &[6; 1000]), SLOT)
            .unwrap();
        assert_eq!(frames.get(&key, 1, SLOT_PAYLOAD), None);
        assert!(!path.exists());
    }

    #[test]
    fn forget_drops_every_level_of_one_nar_only() {
        let (_dir, frames) = scratch(64 << 20);
        let (a, b) = (info(4, 8 << 20), info(5, 8 << 20));
        let keys = [
            FramesKey::of(&a, 1).unwrap(),
            FramesKey::of(&a, 3).unwrap(),
            FramesKey::of(&b, 1).unwrap(),
        ];
        for k in &keys {
            frames.put(k, 0, SLOT_PAYLOAD, &[1; 100]);
        }
        frames.forget(&a);
        assert_eq!(frames.get(&keys[0], 0, SLOT_PAYLOAD), None);
        assert_eq!(frames.get(&keys[1], 0, SLOT_PAYLOAD), None);
        assert!(frames.get(&keys[2], 0, SLOT_PAYLOAD).is_some());
    }

    #[test]
    fn the_least_recently_served_file_goes_first_and_reopening_keeps_files() {
        // Room for about two files of 100 KB frames; a file at most half.
        let limit = 256 << 10;
        let (dir, frames) = scratch(limit);
        let keys: Vec<FramesKey> = (0..3)
            .map(|i| FramesKey::of(&info(10 + i, 8 << 20), 1).unwrap())
            .collect();
        frames.put(&keys[0], 0, SLOT_PAYLOAD, &[1; 100_000]);
        frames.put(&keys[1], 0, SLOT_PAYLOAD, &[2; 100_000]);
        assert!(frames.get(&keys[0], 0, SLOT_PAYLOAD).is_some());
        frames.put(&keys[2], 0, SLOT_PAYLOAD, &[3; 100_000]);
        assert!(
            frames.get(&keys[1], 0, SLOT_PAYLOAD).is_none(),
            "least recently served goes"
        );
        assert!(frames.get(&keys[0], 0, SLOT_PAYLOAD).is_some());
        // A second frame would take file 2 over half the budget.
        frames.put(&keys[2], 1, SLOT_PAYLOAD, &[4; 100_000]);
        assert!(frames.get(&keys[2], 1, SLOT_PAYLOAD).is_none());
        drop(frames);
        std::fs::write(dir.path().join("packed/junk"), b"x").unwrap();
        let again = PackedFrames::open(dir.path().join("packed"), limit).unwrap();
        assert!(again.get(&keys[0], 0, SLOT_PAYLOAD).is_some());
        assert!(again.get(&keys[2], 0, SLOT_PAYLOAD).is_some());
        assert!(!dir.path().join("packed/junk").exists());
        assert!(again.used() > 0 && again.used() <= limit);
    }

    #[test]
    fn slot_headers_are_checked() {
        let h = slot_header(1000, &[1; 10]);
        assert_eq!(
            parse_slot(&h, 1000),
            Slot::Frame {
                len: 10,
                crc: crc32fast::hash(&[1; 10])
            }
        );
        assert_eq!(parse_slot(&h, 999), Slot::Wrong);
        assert_eq!(parse_slot(&[0; SLOT_HEADER], 1000), Slot::Empty);
        let mut bad = h;
        bad[0] = b'X';
        assert_eq!(parse_slot(&bad, 1000), Slot::Wrong);
        // A payload as long as the chunk is not a packed frame.
        assert_eq!(parse_slot(&slot_header(10, &[1; 10]), 10), Slot::Wrong);
    }
}
