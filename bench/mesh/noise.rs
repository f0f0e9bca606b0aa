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

pub(crate) fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}
