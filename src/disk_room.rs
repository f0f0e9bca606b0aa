//! Whether a disk has room for one more file that nixmesh writes for
//! itself (the upstream spool, the kept NARs): it always leaves the disk a
//! reserve, so a full disk costs the host's own work nothing.

use std::path::Path;

/// Free space never taken: this, or a tenth of a smaller disk.
pub const DISK_RESERVE: u64 = 256 << 20;

/// Whether a file of `size` bytes may be written on a disk of `total`
/// bytes with `free` free, while the files being written still need
/// `pending` more: the disk keeps `DISK_RESERVE` (a tenth of a small one)
/// free after all of them. Pure.
pub fn disk_has_room(free: u64, total: u64, pending: u64, size: u64) -> bool {
    let reserve = DISK_RESERVE.min(total / 10);
    free.saturating_sub(pending).saturating_sub(reserve) >= size
}

/// Makes `dir` if missing and checks that files can be made in it: a
/// directory that cannot be written is an error at start, not a silent
/// cache of nothing.
pub fn writable_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(".probe");
    std::fs::File::create(&probe)?;
    std::fs::remove_file(&probe)
}

/// (free, total) bytes of the file system holding `dir`; `None` if it
/// cannot be asked.
pub fn disk_space(dir: &Path) -> Option<(u64, u64)> {
    let st = rustix::fs::statvfs(dir).ok()?;
    let block = st.f_frsize;
    Some((
        st.f_bavail.saturating_mul(block),
        st.f_blocks.saturating_mul(block),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_keeps_its_reserve_and_room_for_files_being_written() {
        const MIB: u64 = 1 << 20;
        // A big disk keeps 256 MiB free.
        assert!(disk_has_room(1024 * MIB, 100_000 * MIB, 0, 768 * MIB));
        assert!(!disk_has_room(1024 * MIB, 100_000 * MIB, 0, 769 * MIB));
        // Files under way still need 500 MiB of it.
        assert!(!disk_has_room(
            1024 * MIB,
            100_000 * MIB,
            500 * MIB,
            300 * MIB
        ));
        assert!(disk_has_room(
            1024 * MIB,
            100_000 * MIB,
            500 * MIB,
            268 * MIB
        ));
        // A small disk keeps a tenth.
        assert!(disk_has_room(40 * MIB, 40 * MIB, 0, 36 * MIB));
        assert!(!disk_has_room(40 * MIB, 40 * MIB, 24 * MIB, 24 * MIB));
        // A full one takes nothing, and nothing overflows.
        assert!(!disk_has_room(0, 40 * MIB, 24 * MIB, 1));
        assert!(disk_has_room(u64::MAX, u64::MAX, 0, 1));
    }
}
