//! The NAR (Nix ARchive) serialisation of a filesystem tree, byte for byte
//! what `nix-store --dump` writes. The framing functions are pure; `encode`
//! walks a tree and hands bytes to a `NarSink` in bounded pieces, so memory
//! stays constant whatever the file sizes.
//!
//! Format: a string is its u64 LE length, its bytes, zero padding to 8.
//! `nix-archive-1`, then `( type regular [executable ""] contents <n> <bytes> )`,
//! `( type symlink target <t> )` or `( type directory entry ( name <n> node
//! <node> ) … )` with entries sorted byte-wise.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use thiserror::Error;

pub const MAGIC: &str = "nix-archive-1";
/// How much of a file is read per call into the sink.
pub const READ_CHUNK: usize = 256 * 1024;
/// Deeper trees than this are refused rather than recursed into.
pub const MAX_DEPTH: usize = 512;

#[derive(Debug, Error)]
pub enum NarError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{0}: not a regular file, directory or symlink")]
    UnsupportedType(String),
    #[error("{0}: file changed size while being read")]
    SizeChanged(String),
    #[error("{0}: directory tree deeper than {MAX_DEPTH}")]
    TooDeep(String),
    #[error("NAR consumer stopped: {0}")]
    Sink(io::Error),
}

/// Where the encoder puts its bytes, in order.
pub trait NarSink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()>;
}

impl NarSink for Vec<u8> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.extend_from_slice(bytes);
        Ok(())
    }
}

/// Padding after a string of `len` bytes.
pub const fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// Appends one NAR string token.
pub fn push_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.extend_from_slice(&[0u8; 8][..padding(s.len() as u64)]);
}

fn tokens(out: &mut Vec<u8>, toks: &[&str]) {
    for t in toks {
        push_str(out, t.as_bytes());
    }
}

/// Everything of a regular file node before its contents.
pub fn regular_header(executable: bool, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    tokens(&mut out, &["(", "type", "regular"]);
    if executable {
        tokens(&mut out, &["executable", ""]);
    }
    tokens(&mut out, &["contents"]);
    out.extend_from_slice(&size.to_le_bytes());
    out
}

/// Padding after `size` content bytes, then the node's `)`.
pub fn regular_trailer(size: u64) -> Vec<u8> {
    let mut out = vec![0u8; padding(size)];
    tokens(&mut out, &[")"]);
    out
}

pub fn symlink_node(target: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + target.len());
    tokens(&mut out, &["(", "type", "symlink", "target"]);
    push_str(&mut out, target);
    tokens(&mut out, &[")"]);
    out
}

/// Serialises the tree at `root` into `sink`.
pub fn encode(root: &Path, sink: &mut impl NarSink) -> Result<(), NarError> {
    let mut head = Vec::new();
    push_str(&mut head, MAGIC.as_bytes());
    sink.write(&head).map_err(NarError::Sink)?;
    let mut buf = vec![0u8; READ_CHUNK];
    encode_node(root, None, sink, &mut buf, 0)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> NarError + '_ {
    move |source| NarError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn encode_node(
    path: &Path,
    kind: Option<fs::FileType>,
    sink: &mut impl NarSink,
    buf: &mut [u8],
    depth: usize,
) -> Result<(), NarError> {
    if depth > MAX_DEPTH {
        return Err(NarError::TooDeep(path.display().to_string()));
    }
    // The directory listing usually knows the type already: one stat less.
    let kind = match kind {
        Some(k) => k,
        None => fs::symlink_metadata(path)
            .map_err(io_err(path))?
            .file_type(),
    };
    if kind.is_symlink() {
        let target = fs::read_link(path).map_err(io_err(path))?;
        sink.write(&symlink_node(target.as_os_str().as_bytes()))
            .map_err(NarError::Sink)
    } else if kind.is_file() {
        encode_file(path, sink, buf)
    } else if kind.is_dir() {
        let mut entries: Vec<(std::ffi::OsString, Option<fs::FileType>)> = fs::read_dir(path)
            .map_err(io_err(path))?
            .map(|e| e.map(|e| (e.file_name(), e.file_type().ok())))
            .collect::<Result<_, _>>()
            .map_err(io_err(path))?;
        entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut out = Vec::with_capacity(256);
        tokens(&mut out, &["(", "type", "directory"]);
        sink.write(&out).map_err(NarError::Sink)?;
        for (name, kind) in entries {
            out.clear();
            tokens(&mut out, &["entry", "(", "name"]);
            push_str(&mut out, name.as_bytes());
            tokens(&mut out, &["node"]);
            sink.write(&out).map_err(NarError::Sink)?;
            encode_node(&path.join(&name), kind, sink, buf, depth + 1)?;
            out.clear();
            tokens(&mut out, &[")"]);
            sink.write(&out).map_err(NarError::Sink)?;
        }
        out.clear();
        tokens(&mut out, &[")"]);
        sink.write(&out).map_err(NarError::Sink)
    } else {
        Err(NarError::UnsupportedType(path.display().to_string()))
    }
}

fn encode_file(path: &Path, sink: &mut impl NarSink, buf: &mut [u8]) -> Result<(), NarError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    // fstat on the open file: no second path lookup.
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(NarError::UnsupportedType(path.display().to_string()));
    }
    let size = meta.len();
    let executable = meta.permissions().mode() & 0o100 != 0;
    sink.write(&regular_header(executable, size))
        .map_err(NarError::Sink)?;
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = file.read(&mut buf[..want]).map_err(io_err(path))?;
        if n == 0 {
            return Err(NarError::SizeChanged(path.display().to_string()));
        }
        sink.write(&buf[..n]).map_err(NarError::Sink)?;
        left -= n as u64;
    }
    // Bytes appended after the fstat are not part of the NAR; whether what
    // was sent is right is for the hash check of the caller to say.
    sink.write(&regular_trailer(size)).map_err(NarError::Sink)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_tokens_pad_to_eight() {
        let mut out = Vec::new();
        push_str(&mut out, b"abc");
        assert_eq!(
            out,
            [3, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', b'c', 0, 0, 0, 0, 0]
        );
        out.clear();
        push_str(&mut out, b"");
        assert_eq!(out, [0u8; 8]);
    }

    #[test]
    fn single_file_layout() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"hello\n").unwrap();
        let mut nar = Vec::new();
        encode(&f, &mut nar).unwrap();
        let mut want = Vec::new();
        tokens(&mut want, &[MAGIC, "(", "type", "regular", "contents"]);
        push_str(&mut want, b"hello\n");
        tokens(&mut want, &[")"]);
        assert_eq!(nar, want);
        // What `nix-store --dump` gave for a file holding "hello\n".
        assert_eq!(nar.len(), 120);
    }

    #[test]
    fn refuses_special_files() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(matches!(
            encode(&sock, &mut Vec::new()),
            Err(NarError::UnsupportedType(_))
        ));
    }
}
