//! Incompressible payloads from a seeded xorshift, the same on every run.

use super::*;

pub(crate) fn write_noise(path: &Path, size: u64, seed: u64) {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    }
    let file = fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = std::io::BufWriter::with_capacity(MIB as usize, file);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut left = size;
    let mut buf = vec![0u8; MIB as usize];
    while left > 0 {
        let n = left.min(MIB) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            let word = xorshift(&mut state).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        out.write_all(&buf[..n])
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        left -= n as u64;
    }
    out.flush()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A tree of small random files, about `size` bytes in all: 4 to 16 KiB
/// each, 256 to a directory (`CORPUS=tree`: what walking a tree costs per
/// file, which one large file does not show).
pub(crate) fn write_small_tree(dir: &Path, size: u64, seed: u64) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut total = 0u64;
    let mut n = 0u64;
    while total < size {
        let sub = dir.join(format!("d{:03}", n / 256));
        if n % 256 == 0 {
            fs::create_dir_all(&sub).unwrap_or_else(|e| panic!("mkdir {}: {e}", sub.display()));
        }
        let len = 4096 + xorshift(&mut state) % (12 * 1024);
        let bytes: Vec<u8> = (0..len.div_ceil(8))
            .flat_map(|_| xorshift(&mut state).to_le_bytes())
            .take(len as usize)
            .collect();
        let path = sub.join(format!("f{n}"));
        fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        total += len;
        n += 1;
    }
    eprintln!("small tree: {n} files, {} MiB", total / MIB);
}

pub(crate) fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// `size` bytes for a benchmark file: random (`corpus` "noise") or, for
/// "real", this machine's libraries and binaries read end to end from a
/// place chosen by `seed`, after 8 bytes of the seed (so that no two files
/// are the same store path). Real binaries compress about 3x, as real
/// closures do.
pub(crate) fn write_payload(path: &Path, size: u64, seed: u64, corpus: &str) {
    if corpus != "real" {
        return write_noise(path, size, seed);
    }
    static FILES: std::sync::OnceLock<Vec<std::path::PathBuf>> = std::sync::OnceLock::new();
    let files = FILES.get_or_init(real_files);
    assert!(!files.is_empty(), "no real files to read");
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    }
    let mut out = seed.to_le_bytes().to_vec();
    let mut i = (seed as usize).wrapping_mul(7919) % files.len();
    while (out.len() as u64) < size {
        if let Ok(bytes) = fs::read(&files[i]) {
            let want = (size - out.len() as u64) as usize;
            out.extend_from_slice(&bytes[..bytes.len().min(want)]);
        }
        i = (i + 1) % files.len();
    }
    out.truncate(size as usize);
    fs::write(path, out).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// The regular files of this machine's /usr/lib/x86_64-linux-gnu, /usr/bin
/// and /usr/libexec, in a fixed order (each directory sorted).
pub(crate) fn real_files() -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo: Vec<std::path::PathBuf> =
        ["/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/libexec"]
            .iter()
            .map(Into::into)
            .collect();
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => todo.push(path),
                Ok(m) if m.is_file() && m.len() > 0 => out.push(path),
                _ => {}
            }
        }
    }
    out
}
