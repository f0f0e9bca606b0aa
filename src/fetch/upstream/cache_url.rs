//! Where an upstream cache is, and the URLs of its files. Pure. A cache is
//! an `http://` or `https://` URL with a host; its narinfos are at
//! `<base>/<hash>.narinfo` and its files at `<base>/<URL field>`, where the
//! URL field must be a plain relative path (an upstream's narinfo must not
//! send the agent anywhere else).

use std::fmt;

use crate::nix::HashPart;

/// Longest cache URL accepted.
pub const MAX_CACHE_URL_LEN: usize = 512;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheUrl {
    /// Without a trailing slash.
    base: String,
}

impl CacheUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{text:?}: {why}");
        if text.len() > MAX_CACHE_URL_LEN {
            return Err(bad("too long"));
        }
        let rest = text
            .strip_prefix("http://")
            .or_else(|| text.strip_prefix("https://"))
            .ok_or_else(|| bad("not an http:// or https:// URL"))?;
        let host = rest.split('/').next().unwrap_or("");
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if text.contains(['?', '#', ' ', '\\']) || text.chars().any(char::is_control) {
            return Err(bad("has a query, fragment, space or control character"));
        }
        Ok(Self {
            base: text.trim_end_matches('/').to_string(),
        })
    }

    pub fn narinfo(&self, hash: &HashPart) -> String {
        format!("{}/{hash}.narinfo", self.base)
    }

    /// The URL of a narinfo's `URL:` field, if it is a plain relative path
    /// (letters, digits and `-._+/`, no `..`, not absolute).
    pub fn file(&self, relative: &str) -> Option<String> {
        let plain = !relative.is_empty()
            && !relative.starts_with('/')
            && !relative
                .split('/')
                .any(|part| part.is_empty() || part == "..")
            && relative
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._+/".contains(c));
        plain.then(|| format!("{}/{relative}", self.base))
    }

    pub fn as_str(&self) -> &str {
        &self.base
    }
}

impl fmt::Display for CacheUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caches_are_http_urls_with_a_host() {
        let c = CacheUrl::parse("https://cache.nixos.org/").unwrap();
        assert_eq!(c.as_str(), "https://cache.nixos.org");
        let h = HashPart::parse("0c8kkjmc5s0mvbdbrqqcbi9yzg9ly8hn").unwrap();
        assert_eq!(
            c.narinfo(&h),
            "https://cache.nixos.org/0c8kkjmc5s0mvbdbrqqcbi9yzg9ly8hn.narinfo"
        );
        assert!(CacheUrl::parse("http://10.0.0.1:8080/cache").is_ok());
        for bad in [
            "file:///nix/cache",
            "https://",
            "http:///x",
            "s3://b",
            "http://a/?x",
            "http://a b",
        ] {
            assert!(CacheUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_urls_stay_under_the_cache() {
        let c = CacheUrl::parse("http://u:5180").unwrap();
        assert_eq!(
            c.file("nar/1abc.nar.zst").as_deref(),
            Some("http://u:5180/nar/1abc.nar.zst")
        );
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "nar/../../x",
            "http://evil/x",
            "nar//x",
            "a?b",
        ] {
            assert_eq!(c.file(bad), None, "{bad}");
        }
    }
}
