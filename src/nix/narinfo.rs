//! The `.narinfo` text of the HTTP binary-cache protocol, written exactly as
//! Nix 2.8 parses it and read back with a limit on everything. Pure.
//!
//! Pitfalls this file exists for: every line ends in `\n`; `Compression` is
//! always written (absent means bzip2); `References` and `Deriver` hold base
//! names; hashes are `sha256:<nix32>`.

use std::fmt::Write as _;

use thiserror::Error;

use super::hash::Sha256Hash;
use super::path_info::PathInfo;
use super::store_path::StorePath;

pub const CONTENT_TYPE: &str = "text/x-nix-narinfo";
/// Largest narinfo text we read; real ones with thousands of references stay
/// well under this.
pub const MAX_NARINFO_LEN: usize = 1 << 20;
pub const MAX_REFERENCES: usize = 16_384;
pub const MAX_SIGNATURES: usize = 64;
pub const MAX_URL_LEN: usize = 1024;
pub const MAX_COMPRESSION_LEN: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NarInfoError {
    #[error("narinfo is {0} bytes, over the limit")]
    TooLong(usize),
    #[error("narinfo line {0} has no `: `")]
    BadLine(usize),
    #[error("narinfo lacks {0}")]
    Missing(&'static str),
    #[error("narinfo field {field}: {reason}")]
    BadField { field: &'static str, reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfo {
    pub info: PathInfo,
    /// Relative to the cache root, e.g. `nar/<…>.nar`.
    pub url: String,
    pub compression: String,
    /// Hash and size of the file at `url` (the compressed NAR), when they
    /// are not simply the NAR's (`Compression: none`).
    pub file_hash: Option<Sha256Hash>,
    pub file_size: Option<u64>,
}

impl NarInfo {
    pub fn render(&self) -> String {
        let info = &self.info;
        let mut out = String::with_capacity(512 + 80 * info.references.len());
        // Writing to a String cannot fail.
        let _ = writeln!(out, "StorePath: {}", info.path);
        let _ = writeln!(out, "URL: {}", self.url);
        let _ = writeln!(out, "Compression: {}", self.compression);
        if let Some(h) = &self.file_hash {
            let _ = writeln!(out, "FileHash: {}", h.to_nix32());
        } else if self.compression == "none" {
            // What `nix copy --to file://…?compression=none` writes too.
            let _ = writeln!(out, "FileHash: {}", info.nar_hash.to_nix32());
        }
        if let Some(size) = self.file_size {
            let _ = writeln!(out, "FileSize: {size}");
        } else if self.compression == "none" {
            let _ = writeln!(out, "FileSize: {}", info.nar_size);
        }
        let _ = writeln!(out, "NarHash: {}", info.nar_hash.to_nix32());
        let _ = writeln!(out, "NarSize: {}", info.nar_size);
        out.push_str("References:");
        for r in &info.references {
            out.push(' ');
            out.push_str(r.base_name());
        }
        if info.references.is_empty() {
            out.push(' ');
        }
        out.push('\n');
        if let Some(d) = &info.deriver {
            let _ = writeln!(out, "Deriver: {}", d.base_name());
        }
        for s in &info.sigs {
            let _ = writeln!(out, "Sig: {s}");
        }
        if let Some(ca) = &info.ca {
            let _ = writeln!(out, "CA: {ca}");
        }
        out
    }

    pub fn parse(store_dir: &str, text: &str) -> Result<Self, NarInfoError> {
        if text.len() > MAX_NARINFO_LEN {
            return Err(NarInfoError::TooLong(text.len()));
        }
        let bad = |field: &'static str, reason: String| NarInfoError::BadField { field, reason };
        let mut path = None;
        let mut url = None;
        let mut compression = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut references = Vec::new();
        let mut deriver = None;
        let mut sigs = Vec::new();
        let mut ca = None;
        for (n, line) in text.split('\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            // Nix keeps a `\r` or any other control character as part of the
            // value, where it breaks hashes, sizes and paths; we refuse the
            // line outright, so what we accept renders back the same.
            if line.chars().any(char::is_control) {
                return Err(NarInfoError::BadLine(n + 1));
            }
            let (key, value) = line
                .split_once(": ")
                .or_else(|| {
                    // `References:` with nothing after it is how some caches write none.
                    line.strip_suffix(':').map(|k| (k, ""))
                })
                .ok_or(NarInfoError::BadLine(n + 1))?;
            match key {
                "StorePath" => {
                    path = Some(
                        StorePath::parse(store_dir, value)
                            .map_err(|e| bad("StorePath", e.to_string()))?,
                    )
                }
                "URL" => {
                    if value.is_empty() || value.len() > MAX_URL_LEN {
                        return Err(bad("URL", "empty or too long".into()));
                    }
                    url = Some(value.to_string());
                }
                "Compression" => {
                    if value.is_empty() || value.len() > MAX_COMPRESSION_LEN {
                        return Err(bad("Compression", "empty or too long".into()));
                    }
                    compression = Some(value.to_string())
                }
                "FileHash" => {
                    file_hash =
                        Some(Sha256Hash::parse(value).map_err(|e| bad("FileHash", e.to_string()))?)
                }
                "FileSize" => {
                    file_size = Some(
                        value
                            .parse::<u64>()
                            .map_err(|_| bad("FileSize", format!("{value:?} is not a number")))?,
                    )
                }
                "NarHash" => {
                    nar_hash =
                        Some(Sha256Hash::parse(value).map_err(|e| bad("NarHash", e.to_string()))?)
                }
                "NarSize" => {
                    let size: u64 = value
                        .parse()
                        .map_err(|_| bad("NarSize", format!("{value:?} is not a number")))?;
                    if size == 0 {
                        return Err(bad("NarSize", "must be above 0".into()));
                    }
                    nar_size = Some(size);
                }
                "References" => {
                    for base in value.split(' ').filter(|s| !s.is_empty()) {
                        if references.len() == MAX_REFERENCES {
                            return Err(bad("References", "too many".into()));
                        }
                        references.push(
                            StorePath::from_base_name(store_dir, base)
                                .map_err(|e| bad("References", e.to_string()))?,
                        );
                    }
                }
                "Deriver" if value != "unknown-deriver" => {
                    deriver = Some(
                        StorePath::from_base_name(store_dir, value)
                            .map_err(|e| bad("Deriver", e.to_string()))?,
                    )
                }
                "Sig" => {
                    if sigs.len() == MAX_SIGNATURES {
                        return Err(bad("Sig", "too many".into()));
                    }
                    sigs.push(value.to_string());
                }
                "CA" => ca = Some(value.to_string()),
                _ => {}
            }
        }
        references.sort();
        let info = PathInfo {
            path: path.ok_or(NarInfoError::Missing("StorePath"))?,
            nar_hash: nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size: nar_size.ok_or(NarInfoError::Missing("NarSize"))?,
            references,
            deriver,
            sigs,
            ca,
            ultimate: false,
        };
        let compression = compression.unwrap_or_else(|| "bzip2".to_string());
        // Uncompressed, the file is the NAR: what render writes anyway.
        if compression == "none" {
            if file_hash.as_ref() == Some(&info.nar_hash) {
                file_hash = None;
            }
            if file_size == Some(info.nar_size) {
                file_size = None;
            }
        }
        Ok(Self {
            info,
            url: url.ok_or(NarInfoError::Missing("URL"))?,
            compression,
            file_hash,
            file_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NarInfo {
        let sp = |p: &str| StorePath::parse("/nix/store", p).unwrap();
        NarInfo {
            info: PathInfo {
                path: sp("/nix/store/i9zj2x3nvfjjph275b20kf37h0nw1y3r-top"),
                nar_hash: Sha256Hash::parse("sha256-Mo9VklW/2dH4FyJmTgb8Mu5ps7WXrxjMeItgwa/02Ps=")
                    .unwrap(),
                nar_size: 560,
                references: vec![sp("/nix/store/ygnhkm73da8rlsijix5xngqc6jvmxpjk-dep")],
                deriver: Some(sp("/nix/store/9yj9rjkgwspc33rl1l9b11sllpx5a146-top.drv")),
                sigs: vec!["k:AAAA".into()],
                ca: None,
                ultimate: false,
            },
            url: "nar/x.nar".into(),
            compression: "none".into(),
            file_hash: None,
            file_size: None,
        }
    }

    #[test]
    fn renders_every_line_with_newline() {
        let text = sample().render();
        assert!(text.ends_with('\n'));
        assert_eq!(
            text,
            "StorePath: /nix/store/i9zj2x3nvfjjph275b20kf37h0nw1y3r-top\n\
             URL: nar/x.nar\n\
             Compression: none\n\
             FileHash: sha256:1yyqyjpw2q4bg361ibwpnnrnkvijzh34wri22zwd3ndzan95b3rj\n\
             FileSize: 560\n\
             NarHash: sha256:1yyqyjpw2q4bg361ibwpnnrnkvijzh34wri22zwd3ndzan95b3rj\n\
             NarSize: 560\n\
             References: ygnhkm73da8rlsijix5xngqc6jvmxpjk-dep\n\
             Deriver: 9yj9rjkgwspc33rl1l9b11sllpx5a146-top.drv\n\
             Sig: k:AAAA\n"
        );
    }

    #[test]
    fn empty_references_keep_the_space() {
        let mut n = sample();
        n.info.references.clear();
        assert!(n.render().contains("\nReferences: \n"));
    }

    #[test]
    fn parse_inverts_render() {
        let n = sample();
        assert_eq!(NarInfo::parse("/nix/store", &n.render()).unwrap(), n);
    }

    /// Found by the `narinfo` fuzz target: a value ending in `\r` on a last
    /// line without `\n` was kept, and rendering it back lost the `\r`.
    #[test]
    fn control_characters_are_refused() {
        let good = sample().render();
        let cr = good.replace("NarSize: 560\n", "NarSize: 560\r\n");
        assert_eq!(
            NarInfo::parse("/nix/store", &cr).unwrap_err(),
            NarInfoError::BadLine(7)
        );
        let crash = "StorePath: /nix/store/2vfr8maj73ns9sx0x8ir9aszgj4g3g0w-h.txt\nURL: nas\n\
            NarHash: sha256:03b5j63rqzzwwifni51vhsh8hrc052l2ql1b3rp173n1gdij8ssc\nNarSize: 144\n\
            Rrees: \nCA: fixesha2c\r";
        assert!(NarInfo::parse("/nix/store", crash).is_err());
        let tab = good.replace("URL: nar/x.nar", "URL: nar/x\t.nar");
        assert!(NarInfo::parse("/nix/store", &tab).is_err());
    }

    #[test]
    fn rejects_malformed() {
        let good = sample().render();
        assert_eq!(
            NarInfo::parse("/nix/store", "garbage\n").unwrap_err(),
            NarInfoError::BadLine(1)
        );
        let no_hash: String = good
            .lines()
            .filter(|l| !l.starts_with("NarHash"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            NarInfo::parse("/nix/store", &no_hash).unwrap_err(),
            NarInfoError::Missing("NarHash")
        );
        let zero = good.replace("NarSize: 560", "NarSize: 0");
        assert!(NarInfo::parse("/nix/store", &zero).is_err());
        let other_store = good.replace("/nix/store/i9", "/gnu/store/i9");
        assert!(NarInfo::parse("/nix/store", &other_store).is_err());
        assert!(NarInfo::parse("/nix/store", &"x".repeat(MAX_NARINFO_LEN + 1)).is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const NIX32: &str = "0123456789abcdfghijklmnpqrsvwxyz";

        fn store_path() -> impl Strategy<Value = StorePath> {
            (
                proptest::collection::vec(proptest::sample::select(NIX32.as_bytes().to_vec()), 32),
                "[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]{0,40}",
            )
                .prop_map(|(hash, name)| {
                    let hash = String::from_utf8(hash).unwrap();
                    StorePath::parse("/nix/store", &format!("/nix/store/{hash}-{name}")).unwrap()
                })
        }

        fn narinfo() -> impl Strategy<Value = NarInfo> {
            (
                store_path(),
                proptest::array::uniform32(any::<u8>()),
                1u64..1 << 40,
                proptest::collection::vec(store_path(), 0..6),
                proptest::option::of(store_path()),
                proptest::collection::vec("[a-z0-9-]{1,12}:[A-Za-z0-9+/]{4,88}={0,2}", 0..3),
                proptest::option::of("fixed:r:sha256:[0-9a-z]{52}"),
                prop_oneof![
                    Just("none".to_string()),
                    Just("xz".to_string()),
                    Just("zstd".to_string())
                ],
                "nar/[a-z0-9]{1,60}\\.nar(\\.xz|\\.zst)?",
            )
                .prop_map(
                    |(
                        path,
                        hash,
                        nar_size,
                        mut references,
                        deriver,
                        sigs,
                        ca,
                        compression,
                        url,
                    )| {
                        references.sort();
                        references.dedup();
                        NarInfo {
                            info: PathInfo {
                                path,
                                nar_hash: Sha256Hash(hash),
                                nar_size,
                                references,
                                deriver,
                                sigs,
                                ca,
                                ultimate: false,
                            },
                            url,
                            file_hash: (compression != "none").then_some(Sha256Hash([7; 32])),
                            file_size: (compression != "none").then_some(nar_size / 2 + 1),
                            compression,
                        }
                    },
                )
        }

        proptest! {
            #[test]
            fn parse_inverts_render_for_any_narinfo(n in narinfo()) {
                prop_assert_eq!(NarInfo::parse("/nix/store", &n.render()).unwrap(), n);
            }

            /// Hostile text: any bytes, or a real narinfo with one line
            /// mangled, gets an error or a narinfo, never a panic.
            #[test]
            fn parse_never_panics(text in "(?s).{0,400}") {
                let _ = NarInfo::parse("/nix/store", &text);
            }

            #[test]
            fn mangled_lines_never_panic(n in narinfo(), line in 0usize..12, junk in ".{0,60}") {
                let text: String = n
                    .render()
                    .lines()
                    .enumerate()
                    .map(|(i, l)| if i == line { format!("{junk}\n") } else { format!("{l}\n") })
                    .collect();
                let _ = NarInfo::parse("/nix/store", &text);
            }
        }
    }
}
