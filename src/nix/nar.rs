//! The NAR (Nix ARchive) format, byte for byte what `nix-store --dump`
//! writes: the framing of its tokens and nodes. Pure; `store::nar_encode`
//! walks a tree with it.
//!
//! Format: a string is its u64 LE length, its bytes, zero padding to 8.
//! `nix-archive-1`, then `( type regular [executable ""] contents <n> <bytes> )`,
//! `( type symlink target <t> )` or `( type directory entry ( name <n> node
//! <node> ) … )` with entries sorted byte-wise.

pub const MAGIC: &str = "nix-archive-1";

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

/// Appends string tokens.
pub fn tokens(out: &mut Vec<u8>, toks: &[&str]) {
    for t in toks {
        push_str(out, t.as_bytes());
    }
}

/// Appends everything of a regular file node before its contents.
pub fn regular_header(out: &mut Vec<u8>, executable: bool, size: u64) {
    tokens(out, &["(", "type", "regular"]);
    if executable {
        tokens(out, &["executable", ""]);
    }
    tokens(out, &["contents"]);
    out.extend_from_slice(&size.to_le_bytes());
}

/// Appends the padding after `size` content bytes, then the node's `)`.
pub fn regular_trailer(out: &mut Vec<u8>, size: u64) {
    out.extend_from_slice(&[0u8; 8][..padding(size)]);
    tokens(out, &[")"]);
}

/// Appends a whole symlink node.
pub fn symlink_node(out: &mut Vec<u8>, target: &[u8]) {
    tokens(out, &["(", "type", "symlink", "target"]);
    push_str(out, target);
    tokens(out, &[")"]);
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
}
