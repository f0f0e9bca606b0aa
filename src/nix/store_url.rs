//! A store URL as nix.conf's `substituters` lists it: a base URL and, after
//! `?`, store settings such as `priority=10` or `trusted=1` (Nix's
//! `StoreReference`). Pure.

/// One entry of `substituters`, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreUrl<'a> {
    /// The URL without its settings and without a trailing slash.
    pub base: &'a str,
    /// `key=value` settings after `?`, in order; `&`-separated.
    query: &'a str,
}

impl<'a> StoreUrl<'a> {
    pub fn split(text: &'a str) -> Self {
        let (base, query) = text.split_once('?').unwrap_or((text, ""));
        Self {
            base: base.trim_end_matches('/'),
            query,
        }
    }

    /// The value of the setting `key`, if given.
    pub fn setting(&self, key: &str) -> Option<&'a str> {
        self.query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// The `priority` the URL sets (it overrides the cache's own
    /// `/nix-cache-info`), if it is given and a number.
    pub fn priority(&self) -> Option<i64> {
        self.setting("priority")?.parse().ok()
    }
}

/// The priority Nix gives a binary cache whose URL sets none: its
/// `/nix-cache-info` `Priority`, else 0 (Nix's default, which sorts it
/// ahead of every cache that states one).
pub fn cache_info_priority(cache_info: &str) -> i64 {
    cache_info
        .lines()
        .find_map(|l| l.strip_prefix("Priority:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_settings_off_the_base() {
        let u = StoreUrl::split("https://cache.example.org/?priority=10&trusted=1");
        assert_eq!(u.base, "https://cache.example.org");
        assert_eq!(u.priority(), Some(10));
        assert_eq!(u.setting("trusted"), Some("1"));
        assert_eq!(u.setting("want-mass-query"), None);
        let plain = StoreUrl::split("http://127.0.0.1:5181");
        assert_eq!(plain.base, "http://127.0.0.1:5181");
        assert_eq!(plain.priority(), None);
        assert_eq!(StoreUrl::split("http://x?priority=-3").priority(), Some(-3));
        assert_eq!(StoreUrl::split("http://x?priority=high").priority(), None);
    }

    #[test]
    fn a_cache_without_a_priority_is_asked_first() {
        assert_eq!(cache_info_priority("StoreDir: /nix/store\n"), 0);
        assert_eq!(
            cache_info_priority("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"),
            40
        );
        assert_eq!(cache_info_priority("Priority: x\n"), 0);
    }
}
