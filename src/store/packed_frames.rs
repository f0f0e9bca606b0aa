//! zstd frames of large NARs, kept on disk under `<state_dir>/packed` once
//! a holder has packed them for a peer, so that the next peer asking for
//! the same NAR at the same level gets the same frames without the holder
//! packing them again. zstd at level 1 packs a few hundred MB/s per core:
//! when ten hosts of an office fetch a new closure from the hosts that
//! have it, each holder would otherwise pack every chunk once per asker.
//!
//! One file per NAR and level asked for, named by NarHash, size and level
//! (frames filled in while idle are packed tighter than that level: any
//! zstd frame unpacks the same); chunk `i` (the NAR's bytes from
//! `i * SLOT_PAYLOAD`) in slot `i` at `i * SLOT`, so
//! the file is sparse and a slot no serve has filled reads as zeros. A
//! slot is a header (`MAGIC`, raw length, payload length, CRC-32 of the
//! payload, CRC-32 of the NAR bytes it was packed from) and the zstd
//! payload, the payload written first: a slot whose payload did not reach
//! the disk fails its CRC, is dropped with its file, and the chunk is
//! packed afresh; so is one packed from other bytes than the store copy
//! now holds (mended since). No peer is sent a frame that differs from
//! what was packed from the bytes it stands for. Whether the frames are
//! right is for the asker's NarHash check to say, as for any NAR: a peer
//! reporting a NAR wrong drops its frames here (`SharedStore::recheck`).
//! Slots being written are claimed, so two serves of one NAR write (and
//! count) a slot once. Only NARs of at least
//! `MIN_NAR` bytes are kept (small ones cost little to pack). Bounded by
//! `share.packed_mib`: the least recently served files go first, a file
//! takes at most half, and a disk short of room gets nothing new.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::disk_room::{disk_has_room, disk_space};
use crate::lock::lock;
use crate::nix::PathInfo;
use crate::store::disk_lru::{remove_files, reopen, room_after_remaking, DiskLru, KeptStats};

/// NAR bytes per slot: the chunk the holder packs.
pub const SLOT_PAYLOAD: usize = 256 << 10;
/// Slot header: magic, raw length, payload length, CRC-32 of the payload,
/// CRC-32 of the NAR bytes it was packed from.
const SLOT_HEADER: usize = 20;
/// The file system's block: what a written slot takes on disk is counted
/// in these.
const BLOCK: u64 = 4096;
/// Bytes from one slot to the next in a file: whole blocks, so that no two
/// slots share one.
const SLOT: u64 = SLOT_PAYLOAD as u64 + BLOCK;
const MAGIC: [u8; 4] = *b"NMZ1";
/// NARs smaller than this are packed afresh each time.
pub const MIN_NAR: u64 = 1 << 20;
/// A file may take at most this share of the budget (1/n).
const FILE_SHARE: u64 = 2;
const SUFFIX: &str = ".frames";

/// A slot's header. Pure.
fn slot_header(raw: &[u8], payload: &[u8]) -> [u8; SLOT_HEADER] {
    let mut h = [0u8; SLOT_HEADER];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&(raw.len() as u32).to_be_bytes());
    h[8..12].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    h[12..16].copy_from_slice(&crc32fast::hash(payload).to_be_bytes());
    h[16..].copy_from_slice(&crc32fast::hash(raw).to_be_bytes());
    h
}

/// The CRC-32 of a chunk's NAR bytes, in the pieces the store gave. Pure.
fn crc_of(raw: &[Bytes]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    for piece in raw {
        crc.update(piece);
    }
    crc.finalize()
}

/// Whether a zstd payload of `len` bytes may stand for `raw_len` NAR
/// bytes: smaller by more than the codec byte a frame for an asker that
/// reads LZ4 adds (else that frame would read as raw bytes). Pure.
fn fits(len: usize, raw_len: usize) -> bool {
    len > 0 && len + 1 < raw_len && len <= SLOT_PAYLOAD
}

/// Disk bytes a slot holding a payload of `len` bytes takes. Pure.
fn slot_bytes(len: usize) -> u64 {
    ((SLOT_HEADER + len) as u64).div_ceil(BLOCK) * BLOCK
}

/// What a slot's header says.
#[derive(Debug, PartialEq, Eq)]
enum Slot {
    /// Never written (zeros).
    Empty,
    /// A frame of `len` payload bytes with the CRC `crc`, packed from NAR
    /// bytes with the CRC `raw_crc`.
    Frame { len: usize, crc: u32, raw_crc: u32 },
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
    if h[..4] != MAGIC || raw != raw_len || !fits(len, raw_len) {
        return Slot::Wrong;
    }
    Slot::Frame {
        len,
        crc: word(12),
        raw_crc: word(16),
    }
}

/// What became of a frame offered to `PackedFrames::put`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Put {
    /// Written to its slot.
    Kept,
    /// The slot holds a frame already, or another serve is writing it.
    Had,
    /// Not smaller than its chunk: not worth a slot.
    Unfit,
    /// No room: the budget's share for one NAR, the disk, or a write that
    /// failed.
    NoRoom,
}

/// The frames file of one NAR at one zstd level.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FramesKey(String);

impl FramesKey {
    /// The key of `info`'s frames at zstd `level`; `None` for a NAR too
    /// small to keep.
    pub fn of(info: &PathInfo, level: u8) -> Option<Self> {
        (info.nar_size >= MIN_NAR).then(|| FramesKey(format!("{}{level}", Self::prefix(info))))
    }

    /// Every key of `info`'s NAR begins with this, the level after it.
    fn prefix(info: &PathInfo) -> String {
        format!("{}-{}-z", info.nar_hash.nix32_digest(), info.nar_size)
    }
}

/// The kept frames' metrics: (name, help) of served, kept, dropped, bytes.
pub const METRICS: [(&str, &str); 4] = [
    (
        "nixmesh_packed_chunks_served",
        "NAR chunks sent to peers as kept zstd frames, not packed again",
    ),
    (
        "nixmesh_packed_chunks_kept",
        "zstd frames of NAR chunks kept on disk",
    ),
    (
        "nixmesh_packed_files_dropped",
        "Files of kept frames dropped as wrong or unreadable",
    ),
    ("nixmesh_packed_bytes", "Bytes of kept zstd frames on disk"),
];

pub struct PackedFrames {
    pub stats: KeptStats,
    dir: PathBuf,
    index: Mutex<Index>,
}

struct Index {
    files: DiskLru,
    /// Slots being written now, one writer each.
    writing: HashSet<(String, u64)>,
}

impl PackedFrames {
    /// The frames in `dir` (made if missing), at most `limit` bytes. Files
    /// left by an earlier run are kept, the least recently modified first
    /// to go; anything else is removed. Fails if `dir` cannot be written.
    pub fn open(dir: PathBuf, limit: u64) -> io::Result<Arc<Self>> {
        // Sparse: what the disk holds, not the files' lengths.
        let files = reopen(&dir, limit, SUFFIX, |_, m| Some(m.blocks() * 512))?;
        let frames = Arc::new(Self {
            stats: KeptStats::default(),
            dir,
            index: Mutex::new(Index {
                files,
                writing: HashSet::new(),
            }),
        });
        frames.stats.bytes.set(frames.used());
        Ok(frames)
    }

    pub fn used(&self) -> u64 {
        lock(&self.index).files.used()
    }

    /// A frame `get` gave went to a peer as it is.
    pub fn sent(&self) {
        self.stats.served.inc();
    }

    fn path(&self, key: &FramesKey) -> PathBuf {
        self.dir.join(format!("{}{SUFFIX}", key.0))
    }

    /// Appends to `out` the kept zstd payload of chunk `slot`, whose NAR
    /// bytes are the pieces `raw`, if one was kept, reads back whole and
    /// was packed from those bytes; `false` if not (`out` as it was). A
    /// slot that does not is dropped with its file (frames packed from a
    /// store copy since mended, or rotten on disk). The payload is read
    /// into `out` in one read: no copy after it.
    /// Not counted as served: a probe may send LZ4's frame instead (`sent`).
    pub fn get(&self, key: &FramesKey, slot: u64, raw: &[Bytes], out: &mut Vec<u8>) -> bool {
        let file = {
            let mut index = lock(&self.index);
            if !index.files.touch(&key.0) {
                return false;
            }
            // Opened under the lock: eviction cannot come in between.
            File::open(self.path(key))
        };
        let raw_len = raw.iter().map(Bytes::len).sum();
        let start = out.len();
        let read = |file: File, out: &mut Vec<u8>| -> io::Result<bool> {
            let mut h = [0u8; SLOT_HEADER];
            match file.read_exact_at(&mut h, slot * SLOT) {
                // A file that ends before the slot: never written that far.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
                other => other?,
            }
            let (len, crc) = match parse_slot(&h, raw_len) {
                Slot::Empty => return Ok(false),
                Slot::Frame { raw_crc, .. } if raw_crc != crc_of(raw) => {
                    return Err(io::Error::other("a frame was packed from other NAR bytes"))
                }
                Slot::Frame { len, crc, .. } => (len, crc),
                Slot::Wrong => return Err(io::Error::other("a slot header is wrong")),
            };
            out.resize(start + len, 0);
            file.read_exact_at(&mut out[start..], slot * SLOT + SLOT_HEADER as u64)?;
            if crc32fast::hash(&out[start..]) != crc {
                return Err(io::Error::other("a frame fails its CRC"));
            }
            Ok(true)
        };
        match file.and_then(|f| read(f, out)) {
            Ok(ok) => ok,
            Err(e) => {
                out.truncate(start);
                tracing::warn!(frames = %key.0, slot, error = %e, "kept zstd frames are unreadable; dropping them");
                self.drop_file(key);
                false
            }
        }
    }

    /// Keeps `payload`, chunk `slot`'s zstd frame of the NAR bytes `raw`,
    /// if the slot is empty and the budget and the disk have room.
    pub fn put(&self, key: &FramesKey, slot: u64, raw: &[u8], payload: &[u8]) -> Put {
        if !fits(payload.len(), raw.len()) {
            return Put::Unfit;
        }
        let adds = slot_bytes(payload.len());
        let Some((free, total)) = disk_space(&self.dir)
            .or_else(|| room_after_remaking(&self.dir, &mut lock(&self.index).files, &self.stats))
        else {
            return Put::NoRoom;
        };
        if !disk_has_room(free, total, 0, adds) {
            return Put::NoRoom;
        }
        let path = self.path(key);
        let claim = (key.0.clone(), slot);
        let (file, generation) = {
            let mut index = lock(&self.index);
            let Index { files, writing } = &mut *index;
            if files.size(&key.0).unwrap_or(0) + adds > files.limit() / FILE_SHARE {
                return Put::NoRoom;
            }
            // Another serve is writing this slot (the same bytes: zstd at
            // one level is deterministic).
            if writing.contains(&claim) {
                return Put::Had;
            }
            // Opened under the lock: eviction cannot come in between.
            let opened = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path);
            let Ok(file) = opened else {
                return Put::NoRoom;
            };
            // Filled by an earlier serve (a chunk packed to measure is
            // packed again): nothing to add.
            if filled(&file, slot) {
                return Put::Had;
            }
            let gone = files.make_room(adds, Some(&key.0));
            remove_files(&self.dir, &gone, SUFFIX);
            files.add(&key.0, adds);
            self.stats.bytes.set(files.used());
            writing.insert(claim.clone());
            (file, files.generation())
        };
        // The payload first: a header is never on disk before its payload
        // (and one that is, after a crash, fails its CRC).
        let written = file
            .write_all_at(payload, slot * SLOT + SLOT_HEADER as u64)
            .and_then(|()| file.write_all_at(&slot_header(raw, payload), slot * SLOT));
        let mut index = lock(&self.index);
        index.writing.remove(&claim);
        match written {
            Ok(()) => {
                self.stats.kept.inc();
                Put::Kept
            }
            Err(e) => {
                // The header was not written: the slot reads as empty.
                tracing::debug!(frames = %key.0, error = %e, "cannot keep a zstd frame");
                // Books cleared since (the directory was made again) never
                // counted this slot.
                if index.files.generation() == generation {
                    index.files.shrink(&key.0, adds);
                    self.stats.bytes.set(index.files.used());
                }
                Put::NoRoom
            }
        }
    }

    /// The slots, of the first `slots`, that hold no frame (or are being
    /// written): a NAR's chunks no serve has kept. Reads the headers only,
    /// and is not a serve (the file's place in the budget stays).
    pub fn missing(&self, key: &FramesKey, slots: u64) -> Vec<u64> {
        let file = {
            let index = lock(&self.index);
            if index.files.size(&key.0).is_none() {
                return (0..slots).collect();
            }
            File::open(self.path(key))
        };
        let Ok(file) = file else {
            return (0..slots).collect();
        };
        (0..slots).filter(|&slot| !filled(&file, slot)).collect()
    }

    /// Drops every kept frame of `info` (a peer found its NAR wrong).
    pub fn forget(&self, info: &PathInfo) {
        let keys = lock(&self.index)
            .files
            .keys_with_prefix(&FramesKey::prefix(info));
        for key in keys {
            self.drop_file(&FramesKey(key));
        }
    }

    fn drop_file(&self, key: &FramesKey) {
        let mut index = lock(&self.index);
        if index.files.remove(&key.0).is_some() {
            let _ = std::fs::remove_file(self.path(key));
            self.stats.dropped.inc();
            self.stats.bytes.set(index.files.used());
        }
    }
}

/// Whether `slot` of `file` holds a header (a file too short to reach it:
/// no).
fn filled(file: &File, slot: u64) -> bool {
    let mut magic = [0u8; 4];
    file.read_exact_at(&mut magic, slot * SLOT).is_ok() && magic != [0; 4]
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

    /// `get`, with the chunk's bytes in two pieces and the payload read
    /// after a head that must stay as it was.
    fn got(frames: &PackedFrames, key: &FramesKey, slot: u64, raw: &[u8]) -> Option<Vec<u8>> {
        let half = raw.len() / 2;
        let pieces = [
            Bytes::copy_from_slice(&raw[..half]),
            Bytes::copy_from_slice(&raw[half..]),
        ];
        let mut out = b"head".to_vec();
        let found = frames.get(key, slot, &pieces, &mut out);
        assert_eq!(&out[..4], b"head");
        assert!(
            found || out.len() == 4,
            "nothing found, but {out:?} appended"
        );
        found.then(|| out[4..].to_vec())
    }

    /// A chunk's NAR bytes.
    static FULL: [u8; SLOT_PAYLOAD] = [0; SLOT_PAYLOAD];

    fn scratch(limit: u64) -> (tempfile::TempDir, Arc<PackedFrames>) {
        let dir = tempfile::tempdir().unwrap();
        let frames = PackedFrames::open(dir.path().join("packed"), limit).unwrap();
        (dir, frames)
    }

    #[test]
    fn a_kept_frame_reads_back_and_an_empty_slot_is_none() {
        let (_dir, frames) = scratch(64 << 20);
        let key = FramesKey::of(&info(1, 8 << 20), 1).unwrap();
        assert_eq!(got(&frames, &key, 3, &FULL), None);
        frames.put(&key, 3, &FULL, b"packed bytes");
        assert_eq!(
            got(&frames, &key, 3, &FULL).as_deref(),
            Some(&b"packed bytes"[..])
        );
        assert_eq!(got(&frames, &key, 2, &FULL), None);
        assert_eq!(got(&frames, &key, 9, &FULL), None);
        assert_eq!(frames.stats.kept.get(), 1);
        // Read is not sent: a probe may send LZ4's frame instead.
        assert_eq!(frames.stats.served.get(), 0);
        frames.sent();
        assert_eq!(frames.stats.served.get(), 1);
        // The other level is another file.
        let other = FramesKey::of(&info(1, 8 << 20), 3).unwrap();
        assert_eq!(got(&frames, &other, 3, &FULL), None);
        // A slot of another raw length than its chunk's is wrong: the file
        // goes.
        assert_eq!(got(&frames, &key, 3, &FULL[..1000]), None);
        assert_eq!(frames.stats.dropped.get(), 1);
        assert_eq!(got(&frames, &key, 3, &FULL), None);
        assert_eq!(frames.used(), 0);
    }

    #[test]
    fn frames_packed_from_other_bytes_are_dropped() {
        // As after `nix-store --repair-path` mended a copy the frames were
        // packed from: same NAR, same length, other bytes.
        let (_dir, frames) = scratch(64 << 20);
        let key = FramesKey::of(&info(8, 8 << 20), 1).unwrap();
        let mut rotten = FULL.to_vec();
        rotten[1000] = 1;
        frames.put(&key, 0, &rotten, &[4; 500]);
        assert!(got(&frames, &key, 0, &rotten).is_some());
        assert_eq!(got(&frames, &key, 0, &FULL), None);
        assert_eq!(frames.stats.dropped.get(), 1);
        assert_eq!(frames.used(), 0);
    }

    #[test]
    fn frames_are_kept_again_after_their_directory_was_removed() {
        let (dir, frames) = scratch(64 << 20);
        let key = FramesKey::of(&info(9, 8 << 20), 1).unwrap();
        frames.put(&key, 0, &FULL, &[1; 100]);
        frames.put(&key, 1, &FULL, &[1; 100]);
        assert_eq!(frames.used(), 2 * BLOCK);
        std::fs::remove_dir_all(dir.path().join("packed")).unwrap();
        // Kept again before anything reads the frames that went: the books
        // start over, and count only what is on disk.
        frames.put(&key, 2, &FULL, &[2; 100]);
        assert_eq!(frames.used(), BLOCK);
        assert_eq!(frames.stats.bytes.get(), BLOCK);
        assert_eq!(
            got(&frames, &key, 2, &FULL).as_deref(),
            Some(&[2u8; 100][..])
        );
        // What was kept went with the directory; nothing is served from it.
        assert_eq!(got(&frames, &key, 0, &FULL), None);
    }

    #[test]
    fn a_slot_is_counted_once_in_whole_blocks() {
        let (_dir, frames) = scratch(64 << 20);
        let key = FramesKey::of(&info(6, 8 << 20), 1).unwrap();
        assert_eq!(frames.put(&key, 0, &FULL, &[1; 100]), Put::Kept);
        assert_eq!(frames.used(), BLOCK);
        // Kept again (a chunk packed to measure): nothing more.
        assert_eq!(frames.put(&key, 0, &FULL, &[1; 100]), Put::Had);
        assert_eq!(frames.put(&key, 1, &FULL, &[2; 5000]), Put::Kept);
        assert_eq!(frames.used(), 3 * BLOCK);
        assert_eq!(frames.stats.kept.get(), 2);
    }

    #[test]
    fn missing_slots_are_those_no_serve_kept() {
        let (_dir, frames) = scratch(64 << 20);
        let key = FramesKey::of(&info(10, 8 << 20), 1).unwrap();
        assert_eq!(frames.missing(&key, 4), vec![0, 1, 2, 3]);
        frames.put(&key, 1, &FULL, &[1; 100]);
        frames.put(&key, 3, &FULL, &[1; 100]);
        assert_eq!(frames.missing(&key, 4), vec![0, 2]);
        // A file shorter than the slots asked about.
        assert_eq!(frames.missing(&key, 6), vec![0, 2, 4, 5]);
        // Asking does not count as serving.
        assert_eq!(frames.stats.served.get(), 0);
    }

    #[test]
    fn a_file_past_its_share_of_the_budget_has_no_room() {
        // Two slots' worth of budget: a file may take one.
        let (_dir, frames) = scratch(2 * slot_bytes(100_000));
        let key = FramesKey::of(&info(11, 8 << 20), 1).unwrap();
        assert_eq!(frames.put(&key, 0, &FULL, &[1; 100_000]), Put::Kept);
        assert_eq!(frames.put(&key, 1, &FULL, &[1; 100_000]), Put::NoRoom);
        assert_eq!(frames.put(&key, 2, &FULL, &FULL), Put::Unfit);
    }

    #[test]
    fn a_payload_must_leave_room_for_a_codec_byte() {
        let (_dir, frames) = scratch(64 << 20);
        let key = FramesKey::of(&info(7, 8 << 20), 1).unwrap();
        // A NAR's last chunk of 40 bytes packed to 39: as a frame for an
        // asker that reads LZ4 it would be 40 bytes, which read as raw.
        frames.put(&key, 31, &FULL[..40], &[3; 39]);
        assert_eq!(got(&frames, &key, 31, &FULL[..40]), None);
        frames.put(&key, 31, &FULL[..40], &[3; 38]);
        assert_eq!(
            got(&frames, &key, 31, &FULL[..40]).as_deref(),
            Some(&[3u8; 38][..])
        );
    }

    #[test]
    fn small_nars_and_frames_that_did_not_shrink_are_not_kept() {
        let (_dir, frames) = scratch(64 << 20);
        assert_eq!(FramesKey::of(&info(1, MIN_NAR - 1), 1), None);
        let key = FramesKey::of(&info(1, MIN_NAR), 1).unwrap();
        assert_eq!(frames.put(&key, 0, &[7; 10], &[7; 10]), Put::Unfit);
        assert_eq!(got(&frames, &key, 0, &[7; 10]), None);
        assert_eq!(frames.used(), 0);
    }

    #[test]
    fn a_rotten_frame_drops_its_file() {
        let (dir, frames) = scratch(64 << 20);
        let key = FramesKey::of(&info(2, 8 << 20), 1).unwrap();
        frames.put(&key, 0, &FULL, &[5; 1000]);
        frames.put(&key, 1, &FULL, &[6; 1000]);
        let path = dir.path().join("packed").join(format!("{}{SUFFIX}", key.0));
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[9], SLOT + SLOT_HEADER as u64 + 500)
            .unwrap();
        assert_eq!(got(&frames, &key, 1, &FULL), None);
        assert!(!path.exists());
        assert_eq!(frames.stats.dropped.get(), 1);
        assert_eq!(got(&frames, &key, 0, &FULL), None);
        assert_eq!(frames.used(), 0);
    }

    #[test]
    fn a_header_without_its_payload_fails_its_crc() {
        let (dir, frames) = scratch(64 << 20);
        let key = FramesKey::of(&info(3, 8 << 20), 1).unwrap();
        frames.put(&key, 0, &FULL, &[5; 1000]);
        let path = dir.path().join("packed").join(format!("{}{SUFFIX}", key.0));
        // As after a crash that wrote the header of slot 1 but not its payload.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&slot_header(&FULL, &[6; 1000]), SLOT)
            .unwrap();
        assert_eq!(got(&frames, &key, 1, &FULL), None);
        assert!(!path.exists());
    }

    #[test]
    fn a_file_cut_short_in_a_payload_drops_its_file() {
        let (dir, frames) = scratch(64 << 20);
        let key = FramesKey::of(&info(4, 8 << 20), 1).unwrap();
        frames.put(&key, 0, &FULL, &[5; 1000]);
        let path = dir.path().join("packed").join(format!("{}{SUFFIX}", key.0));
        // As after a disk that filled up, or a file cut by hand.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(SLOT_HEADER as u64 + 600).unwrap();
        assert_eq!(got(&frames, &key, 0, &FULL), None);
        assert!(!path.exists());
        assert_eq!(frames.stats.dropped.get(), 1);
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
            frames.put(k, 0, &FULL, &[1; 100]);
        }
        frames.forget(&a);
        assert_eq!(got(&frames, &keys[0], 0, &FULL), None);
        assert_eq!(got(&frames, &keys[1], 0, &FULL), None);
        assert!(got(&frames, &keys[2], 0, &FULL).is_some());
    }

    #[test]
    fn the_least_recently_served_file_goes_first_and_reopening_keeps_files() {
        // Room for about two files of 100 KB frames; a file at most half.
        let limit = 256 << 10;
        let (dir, frames) = scratch(limit);
        let keys: Vec<FramesKey> = (0..3)
            .map(|i| FramesKey::of(&info(10 + i, 8 << 20), 1).unwrap())
            .collect();
        frames.put(&keys[0], 0, &FULL, &[1; 100_000]);
        frames.put(&keys[1], 0, &FULL, &[2; 100_000]);
        assert!(got(&frames, &keys[0], 0, &FULL).is_some());
        frames.put(&keys[2], 0, &FULL, &[3; 100_000]);
        assert!(
            got(&frames, &keys[1], 0, &FULL).is_none(),
            "least recently served goes"
        );
        assert!(got(&frames, &keys[0], 0, &FULL).is_some());
        // A second frame would take file 2 over half the budget.
        frames.put(&keys[2], 1, &FULL, &[4; 100_000]);
        assert!(got(&frames, &keys[2], 1, &FULL).is_none());
        drop(frames);
        std::fs::write(dir.path().join("packed/junk"), b"x").unwrap();
        let again = PackedFrames::open(dir.path().join("packed"), limit).unwrap();
        assert!(got(&again, &keys[0], 0, &FULL).is_some());
        assert!(got(&again, &keys[2], 0, &FULL).is_some());
        assert!(!dir.path().join("packed/junk").exists());
        assert!(again.used() > 0 && again.used() <= limit);
    }

    #[test]
    fn slot_headers_are_checked() {
        let h = slot_header(&FULL[..1000], &[1; 10]);
        assert_eq!(
            parse_slot(&h, 1000),
            Slot::Frame {
                len: 10,
                crc: crc32fast::hash(&[1; 10]),
                raw_crc: crc32fast::hash(&FULL[..1000]),
            }
        );
        assert_eq!(parse_slot(&h, 999), Slot::Wrong);
        assert_eq!(parse_slot(&[0; SLOT_HEADER], 1000), Slot::Empty);
        let mut bad = h;
        bad[0] = b'X';
        assert_eq!(parse_slot(&bad, 1000), Slot::Wrong);
        // A payload as long as the chunk is not a packed frame.
        assert_eq!(
            parse_slot(&slot_header(&FULL[..10], &[1; 10]), 10),
            Slot::Wrong
        );
    }
}
