//! Whether an upstream cache's narinfo may be offered to Nix, and the file
//! it points at. Pure. The same trust rules as for peers (the path asked
//! for, a sane size, a signature from a trusted key unless the path is
//! content-addressed), plus what a compressed file needs: a compression Nix
//! knows, its FileHash and FileSize (the relay checks both on the way), and
//! a URL that stays under the cache.

use thiserror::Error;

use super::cache_url::CacheUrl;
use crate::fetch::race::{TrustPolicy, MAX_NAR_SIZE};
use crate::nix::{HashPart, NarInfo, Sha256Hash};

/// What Nix can decompress.
pub const COMPRESSIONS: [&str; 6] = ["none", "xz", "bzip2", "zstd", "br", "gzip"];

/// A file of an upstream cache, and what it must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamFile {
    /// Absolute URL.
    pub url: String,
    pub compression: String,
    pub file_hash: Sha256Hash,
    pub file_size: u64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Rejected {
    #[error("answer is for {0}, not the hash asked for")]
    WrongPath(String),
    #[error("NAR or file size {0} is not sane")]
    BadSize(u64),
    #[error("compression {0:?} is not one Nix knows")]
    Compression(String),
    #[error("a compressed file without FileHash and FileSize")]
    NoFileHash,
    #[error("URL {0:?} is not a plain path under the cache")]
    Url(String),
    #[error("no signature from a trusted key")]
    Unsigned,
}

pub fn judge(
    asked: &HashPart,
    cache: &CacheUrl,
    answer: &NarInfo,
    policy: &TrustPolicy,
) -> Result<UpstreamFile, Rejected> {
    let info = &answer.info;
    if &info.path.hash_part() != asked {
        return Err(Rejected::WrongPath(info.path.to_string()));
    }
    if info.nar_size == 0 || info.nar_size > MAX_NAR_SIZE {
        return Err(Rejected::BadSize(info.nar_size));
    }
    if !COMPRESSIONS.contains(&answer.compression.as_str()) {
        return Err(Rejected::Compression(answer.compression.clone()));
    }
    let (file_hash, file_size) = match (&answer.file_hash, answer.file_size) {
        (Some(h), Some(s)) => (*h, s),
        _ if answer.compression == "none" => (info.nar_hash, info.nar_size),
        _ => return Err(Rejected::NoFileHash),
    };
    if file_size == 0 || file_size > MAX_NAR_SIZE {
        return Err(Rejected::BadSize(file_size));
    }
    let url = cache
        .file(&answer.url)
        .ok_or_else(|| Rejected::Url(answer.url.chars().take(80).collect()))?;
    if policy.require_sigs && info.ca.is_none() && !info.is_signed_by_any(&policy.trusted_keys) {
        return Err(Rejected::Unsigned);
    }
    Ok(UpstreamFile {
        url,
        compression: answer.compression.clone(),
        file_hash,
        file_size,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// What `nix copy --to 'file://…?compression=zstd'` wrote (Nix 2.34).
    pub(in crate::fetch::upstream) const ZSTD: &str =
        "StorePath: /nix/store/0c8kkjmc5s0mvbdbrqqcbi9yzg9ly8hn-hello\n\
        URL: nar/1w8pjwz0xn2hf6a2ar1zqf1m3jn0jwbdrp5jwaw8zy3dmw2hvkb7.nar.zst\n\
        Compression: zstd\n\
        FileHash: sha256:1w8pjwz0xn2hf6a2ar1zqf1m3jn0jwbdrp5jwaw8zy3dmw2hvkb7\n\
        FileSize: 1234\n\
        NarHash: sha256:0mxsbhj5nrq1ry0ssvmfqz0rr1pr5cmv8yljr0fdmaqkikaqdjxk\n\
        NarSize: 5000\n\
        References: \n";

    fn parse(text: &str) -> NarInfo {
        NarInfo::parse("/nix/store", text).unwrap()
    }

    fn open() -> TrustPolicy {
        TrustPolicy {
            require_sigs: false,
            trusted_keys: Vec::new(),
        }
    }

    fn asked() -> HashPart {
        HashPart::parse("0c8kkjmc5s0mvbdbrqqcbi9yzg9ly8hn").unwrap()
    }

    #[test]
    fn a_compressed_narinfo_gives_its_file() {
        let cache = CacheUrl::parse("http://u:8080/c").unwrap();
        let file = judge(&asked(), &cache, &parse(ZSTD), &open()).unwrap();
        assert_eq!(
            file.url,
            "http://u:8080/c/nar/1w8pjwz0xn2hf6a2ar1zqf1m3jn0jwbdrp5jwaw8zy3dmw2hvkb7.nar.zst"
        );
        assert_eq!(file.compression, "zstd");
        assert_eq!(file.file_size, 1234);
    }

    #[test]
    fn hostile_or_untrusted_narinfos_are_refused() {
        let cache = CacheUrl::parse("http://u").unwrap();
        let other = HashPart::parse("1c8kkjmc5s0mvbdbrqqcbi9yzg9ly8hn").unwrap();
        assert!(matches!(
            judge(&other, &cache, &parse(ZSTD), &open()),
            Err(Rejected::WrongPath(_))
        ));
        let no_file = ZSTD.replace("FileSize: 1234\n", "");
        assert_eq!(
            judge(&asked(), &cache, &parse(&no_file), &open()),
            Err(Rejected::NoFileHash)
        );
        let lzip = ZSTD.replace("Compression: zstd", "Compression: lzip");
        assert!(matches!(
            judge(&asked(), &cache, &parse(&lzip), &open()),
            Err(Rejected::Compression(_))
        ));
        let escape = ZSTD.replace("URL: nar/", "URL: ../../nar/");
        assert!(matches!(
            judge(&asked(), &cache, &parse(&escape), &open()),
            Err(Rejected::Url(_))
        ));
        let huge = ZSTD.replace("FileSize: 1234", "FileSize: 99999999999999999");
        assert!(matches!(
            judge(&asked(), &cache, &parse(&huge), &open()),
            Err(Rejected::BadSize(_))
        ));
        let strict = TrustPolicy {
            require_sigs: true,
            trusted_keys: Vec::new(),
        };
        assert_eq!(
            judge(&asked(), &cache, &parse(ZSTD), &strict),
            Err(Rejected::Unsigned)
        );
    }
}
