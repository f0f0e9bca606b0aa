//! A journaled ext4 of its own under a run's hosts, for the benchmarks.
//!
//! The file system the harness's scratch dir sits on need not be what a Nix
//! user's store sits on. An ext4 made without a journal, when it allocates an
//! inode, skips every inode freed in the last minute (the last six minutes
//! while their table block is dirty), reading each one's table entry to
//! find out.
//! A benchmark deletes a closure and fetches it again, round after round: on
//! such a file system Nix's daemon then spends most of its CPU looking for
//! free inodes, and the faster the substitution, the larger its share of the
//! time. Stores on journaled file systems (ext4's default, and every other
//! one Nix users pick) do not do this.
//!
//! So a run that asks for it (`Lan::hosts_on_journaled_fs`, in the thread
//! that builds the `Lan`) gets a sparse image in its scratch dir, made into an ext4 with
//! mkfs's defaults (a journal), attached through a loop device with direct
//! I/O (no second copy of every page in the machine's cache) and mounted on
//! `hosts` in the scratch dir: every host's dir, its store with it, lives
//! there. The loop device is set to detach itself once the file system is
//! unmounted; the run's cleanup (`cleanup.sh`) unmounts it, however the run
//! ends, detaches any loop device still on the image, and removes the
//! scratch dir and the image with it. Every host shell gets a copy of the
//! machine's mounts in its private mount namespace, and such a copy keeps a
//! file system alive after the machine's unmount (shown with a plain
//! `unshare --mount`): so that a host of another run started meanwhile
//! cannot, host shells unmount every other run's `hosts` in their own
//! namespace first (`host.rs`).

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::exec::{checked, describe, failure};

/// The mount point in a run's scratch dir (`cleanup.sh` knows it too).
const MOUNT_DIR: &str = "hosts";
const IMAGE: &str = "hosts.img";
/// Left free on the machine's file system beside the sparse image.
const SPARE: u64 = 4 << 30;
/// The image is sparse: it only takes what is written, up to this.
const LARGEST: u64 = 64 << 30;

thread_local! {
    /// The smallest file system wanted, if any. Per thread, so that a test
    /// asking for it leaves the tests that run beside it in the same
    /// process alone.
    static WANTED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Every run this thread starts from now on puts its hosts on a journaled
/// ext4 of at least `smallest` bytes (it panics if the disk has less room).
pub(super) fn want(smallest: u64) {
    WANTED.set(Some(smallest));
}

/// Where the hosts of the run whose scratch dir is `run_dir` keep their
/// dirs: `run_dir` itself, or a journaled ext4 mounted in it if wanted.
pub(super) fn hosts_dir(run_dir: &Path) -> PathBuf {
    let Some(smallest) = WANTED.get() else {
        return run_dir.to_path_buf();
    };
    let image = run_dir.join(IMAGE);
    let mount_point = run_dir.join(MOUNT_DIR);
    let free = available(run_dir);
    let size = free.saturating_sub(SPARE).min(LARGEST);
    assert!(
        size >= smallest,
        "{}: {} MiB free; the hosts' journaled ext4 needs {} MiB and {} MiB are left spare",
        run_dir.display(),
        free >> 20,
        smallest >> 20,
        SPARE >> 20
    );
    let file = std::fs::File::create(&image)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", image.display()));
    file.set_len(size)
        .unwrap_or_else(|e| panic!("cannot size {}: {e}", image.display()));
    drop(file);
    std::fs::create_dir(&mount_point)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", mount_point.display()));
    // nodiscard: the file is sparse already. The inode tables are left
    // unwritten (zeros in a sparse file), and `noinit_itable` keeps the
    // kernel from zeroing them in the background during the measurements.
    checked(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "nodiscard,lazy_itable_init=1"])
            .arg(&image),
    );
    let device = stdout_of(
        Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(&image),
    );
    let device = device.trim();
    let mut mount = Command::new("mount");
    mount
        .args(["-o", "noinit_itable", device])
        .arg(&mount_point);
    let mounted = mount.output();
    // Mounted, the device is busy, so this only marks it to detach itself
    // once the file system is unmounted; not mounted, it detaches it now.
    // (The run's cleanup also detaches whatever still holds the image.)
    let mut detach = Command::new("losetup");
    detach.args(["--detach", device]);
    let detached = detach.output();
    for (cmd, out) in [(&mount, mounted), (&detach, detached)] {
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!("{}", failure(cmd, &o)),
            Err(e) => panic!("cannot run {}: {e}", describe(cmd)),
        }
    }
    // As the kernel lists it, so that a host shell knows it for its own
    // run's (`host.rs`) even where the scratch dir's path has a symlink.
    mount_point
        .canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", mount_point.display()))
}

/// Bytes free for unprivileged use on the file system holding `dir`.
fn available(dir: &Path) -> u64 {
    let out = stdout_of(
        Command::new("df")
            .args(["--output=avail", "--block-size=1"])
            .arg(dir),
    );
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("df of {}: cannot read {out:?}", dir.display()))
}

/// Runs `cmd` to success and returns its stdout.
fn stdout_of(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&checked(cmd).stdout).into_owned()
}
