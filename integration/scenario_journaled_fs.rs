//! The harness's journaled ext4 for the benchmarks' hosts
//! (`Lan::hosts_on_journaled_fs`): a real Nix store lives on it, and the
//! LAN's cleanup leaves no mount, loop device or image behind, even while
//! a host of another run, started meanwhile, lives on.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::Lan;
use crate::office::random_file;

/// The loop device's lazy detach happens once the last user of the file
/// system is gone, a moment after the cleanup.
const DETACHED_WITHIN: Duration = Duration::from_secs(10);

#[test]
fn a_store_on_the_journaled_ext4_works_and_leaves_nothing_behind() {
    Lan::hosts_on_journaled_fs(1 << 30);
    let lan = Lan::new(1);
    let host = lan.host(0);
    let path = host.add_path(&random_file(&host.dir().join("files"), "on-ext4", 1 << 20));
    host.run_ok(&["nix-store", "--verify-path", &path]);

    let file = host.real_path(&path);
    let (source, fstype, target) = mount_of(&file);
    assert_eq!(
        fstype,
        "ext4",
        "{} is on {source} ({fstype})",
        file.display()
    );
    let device = source
        .strip_prefix("/dev/")
        .filter(|d| d.starts_with("loop"))
        .unwrap_or_else(|| panic!("{} is on {source}, not a loop device", file.display()))
        .to_string();
    assert!(
        Path::new(&format!("/proc/fs/jbd2/{device}-8")).exists(),
        "{source} has no journal"
    );
    let image = std::fs::read_to_string(format!("/sys/block/{device}/loop/backing_file"))
        .expect("the loop device's backing file")
        .trim()
        .to_string();
    assert!(
        Path::new(&image).starts_with(Path::new(&target).parent().expect("a run dir")),
        "{device} is backed by {image}, outside the run's dir"
    );

    // Another run's host, started while the file system is mounted (in
    // another thread: the wish is per thread), gets a copy of the machine's
    // mounts in its own namespace, and outlives this Lan.
    let other = std::thread::spawn(|| Lan::agents_only(1))
        .join()
        .expect("another Lan");
    let their_mounts = other.host(0).run_ok(&["cat", "/proc/self/mounts"]);
    assert!(
        !their_mounts.contains(&format!(" {target} ")),
        "another run's host holds a copy of {target}"
    );

    drop(lan);
    assert!(
        !Path::new(&target).exists(),
        "{target} is still there after the cleanup"
    );
    assert!(!Path::new(&image).exists(), "{image} is still there");
    let start = Instant::now();
    while attached(&image) {
        assert!(
            start.elapsed() < DETACHED_WITHIN,
            "a loop device still holds {image} {DETACHED_WITHIN:?} after the cleanup"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(other);
}

/// Source, file system type and mount point of the file system `file` is on.
fn mount_of(file: &Path) -> (String, String, String) {
    let out = Command::new("findmnt")
        .args([
            "--noheadings",
            "--output",
            "SOURCE,FSTYPE,TARGET",
            "--target",
        ])
        .arg(file)
        .output()
        .expect("findmnt runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text.split_whitespace().collect();
    match fields.as_slice() {
        [source, fstype, target] => (source.to_string(), fstype.to_string(), target.to_string()),
        _ => panic!("findmnt --target {}: {text:?}", file.display()),
    }
}

/// Whether some loop device is still backed by `image` (deleted or not).
fn attached(image: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return false;
    };
    entries.flatten().any(|e| {
        std::fs::read_to_string(e.path().join("loop/backing_file"))
            .map(|b| b.trim().trim_end_matches(" (deleted)") == image)
            .unwrap_or(false)
    })
}
