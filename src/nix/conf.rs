//! The parts of `nix.conf` nixmesh needs: which keys this host's Nix trusts,
//! which substituters it uses and whether it requires signatures. `parse` is
//! pure; `load` follows `include` lines from the filesystem.
//!
//! Nix's own rules, which this mirrors: every setting starts at its built-in
//! default; `name = v` replaces the value; `extra-name = v` appends to the
//! value so far (the default included) and only works for list settings;
//! old names (`binary-caches`, `binary-cache-public-keys`) are aliases of
//! the new ones; later lines win; `include` and `!include` read another
//! file at that point, relative to the including file's directory.
//!
//! The agent reads the file only, never `NIX_CONFIG`: that variable lives in
//! the environment of each Nix process (the nix-daemon's and the clients'),
//! not the agent's, so the agent cannot see what they see.

use std::collections::BTreeMap;
use std::path::Path;

/// Nix's built-in `trusted-public-keys` when nix.conf does not set it.
pub const DEFAULT_TRUSTED_KEY: &str =
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
/// Nix's built-in `substituters`.
pub const DEFAULT_SUBSTITUTER: &str = "https://cache.nixos.org/";
const MAX_INCLUDE_DEPTH: usize = 8;

/// A setting nixmesh reads: its name, older names Nix still accepts, its
/// built-in default, and whether `extra-` may append to it.
struct Known {
    name: &'static str,
    aliases: &'static [&'static str],
    default: &'static str,
    list: bool,
}

const KNOWN: &[Known] = &[
    Known {
        name: "substituters",
        aliases: &["binary-caches"],
        default: DEFAULT_SUBSTITUTER,
        list: true,
    },
    Known {
        name: "trusted-public-keys",
        aliases: &["binary-cache-public-keys"],
        default: DEFAULT_TRUSTED_KEY,
        list: true,
    },
    Known {
        name: "require-sigs",
        aliases: &[],
        default: "true",
        list: false,
    },
];

fn known(name: &str) -> Option<&'static Known> {
    KNOWN
        .iter()
        .find(|k| k.name == name || k.aliases.contains(&name))
}

/// Settings as Nix would see them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NixConf {
    /// Settings the file set, by canonical name; the rest have defaults.
    values: BTreeMap<String, String>,
}

impl NixConf {
    /// The value Nix uses: what the file set, else Nix's default (for the
    /// settings nixmesh knows), else `None`.
    pub fn get(&self, name: &str) -> Option<&str> {
        let canonical = known(name).map_or(name, |k| k.name);
        self.values
            .get(canonical)
            .map(String::as_str)
            .or_else(|| known(name).map(|k| k.default))
    }

    /// Space-separated list setting.
    pub fn list(&self, name: &str) -> Vec<String> {
        self.get(name)
            .map(|v| v.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// `trusted-public-keys`, with Nix's default.
    pub fn trusted_public_keys(&self) -> Vec<String> {
        self.list("trusted-public-keys")
    }

    /// Whether Nix demands a trusted signature on what it substitutes.
    pub fn require_sigs(&self) -> bool {
        self.get("require-sigs") != Some("false")
    }

    fn apply(&mut self, line: &str) {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some((name, value)) = line.split_once('=') else {
            return;
        };
        let (name, value) = (name.trim(), value.trim());
        if let Some(base) = name.strip_prefix("extra-") {
            match known(base) {
                // Nix ignores `extra-` on a setting that is not a list.
                Some(k) if !k.list => {}
                Some(k) => {
                    let entry = self
                        .values
                        .entry(k.name.to_string())
                        .or_insert_with(|| k.default.to_string());
                    append(entry, value);
                }
                None => append(self.values.entry(base.to_string()).or_default(), value),
            }
        } else {
            let canonical = known(name).map_or(name, |k| k.name);
            self.values.insert(canonical.to_string(), value.to_string());
        }
    }

    /// Parses one file's text; `include` lines are handed to `include`.
    pub fn parse(text: &str, include: &mut dyn FnMut(&str, bool, &mut NixConf)) -> NixConf {
        let mut conf = NixConf::default();
        conf.parse_into(text, include);
        conf
    }

    fn parse_into(&mut self, text: &str, include: &mut dyn FnMut(&str, bool, &mut NixConf)) {
        for line in text.lines() {
            let trimmed = line.trim();
            if let Some(rest) = trimmed.strip_prefix("!include ") {
                include(rest.trim(), true, self);
            } else if let Some(rest) = trimmed.strip_prefix("include ") {
                include(rest.trim(), false, self);
            } else {
                self.apply(line);
            }
        }
    }

    /// Reads `path` and its includes. A missing file is an empty config, as
    /// for Nix.
    pub fn load(path: &Path) -> NixConf {
        let mut conf = NixConf::default();
        load_into(path, &mut conf, 0);
        conf
    }
}

fn append(entry: &mut String, value: &str) {
    if value.is_empty() {
        return;
    }
    if !entry.is_empty() {
        entry.push(' ');
    }
    entry.push_str(value);
}

fn load_into(path: &Path, conf: &mut NixConf, depth: usize) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    conf.parse_into(&text, &mut |name, _optional, conf| {
        if depth < MAX_INCLUDE_DEPTH {
            load_into(&dir.join(name), conf, depth + 1);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> NixConf {
        NixConf::parse(text, &mut |_, _, _| {})
    }

    #[test]
    fn later_lines_win_and_extra_appends() {
        let conf = conf(
            "substituters = a b\n# c\ntrusted-public-keys = k1\nextra-trusted-public-keys = k2 # note\nsubstituters = x\n",
        );
        assert_eq!(conf.list("substituters"), ["x"]);
        assert_eq!(conf.trusted_public_keys(), ["k1", "k2"]);
    }

    #[test]
    fn defaults_when_unset() {
        let conf = conf("sandbox = false\n");
        assert_eq!(conf.trusted_public_keys(), [DEFAULT_TRUSTED_KEY]);
        assert_eq!(conf.list("substituters"), [DEFAULT_SUBSTITUTER]);
        assert!(conf.require_sigs());
        assert_eq!(conf.get("sandbox"), Some("false"));
        assert_eq!(conf.get("no-such-setting"), None);
    }

    #[test]
    fn extra_alone_adds_to_the_default() {
        let conf = conf(
            "extra-trusted-public-keys = office-1:abc\nextra-substituters = http://127.0.0.1:5181\n",
        );
        assert_eq!(
            conf.trusted_public_keys(),
            [DEFAULT_TRUSTED_KEY, "office-1:abc"]
        );
        assert_eq!(
            conf.list("substituters"),
            [DEFAULT_SUBSTITUTER, "http://127.0.0.1:5181"]
        );
    }

    #[test]
    fn extra_before_the_base_setting_is_replaced_by_it() {
        let conf = conf("extra-trusted-public-keys = k2\ntrusted-public-keys = k1\n");
        assert_eq!(conf.trusted_public_keys(), ["k1"]);
    }

    #[test]
    fn extra_after_the_base_setting_appends_to_it() {
        let conf = conf("trusted-public-keys = k1\nextra-trusted-public-keys = k2 k3\n");
        assert_eq!(conf.trusted_public_keys(), ["k1", "k2", "k3"]);
    }

    #[test]
    fn an_empty_base_setting_clears_the_default() {
        let conf = conf("trusted-public-keys =\nsubstituters =\n");
        assert!(conf.trusted_public_keys().is_empty());
        assert!(conf.list("substituters").is_empty());
    }

    #[test]
    fn old_names_are_aliases() {
        let conf = conf("binary-cache-public-keys = k1\nextra-binary-caches = http://x\n");
        assert_eq!(conf.trusted_public_keys(), ["k1"]);
        assert_eq!(conf.list("substituters"), [DEFAULT_SUBSTITUTER, "http://x"]);
        let conf = self::conf("trusted-public-keys = k1\nbinary-cache-public-keys = k2\n");
        assert_eq!(conf.trusted_public_keys(), ["k2"]);
    }

    #[test]
    fn require_sigs_is_not_a_list() {
        assert!(!conf("require-sigs = false\n").require_sigs());
        // Nix ignores `extra-` on a boolean.
        assert!(conf("extra-require-sigs = false\n").require_sigs());
        assert!(!conf("require-sigs = false\nextra-require-sigs = true\n").require_sigs());
    }

    #[test]
    fn includes_are_followed_in_place() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("more.conf"),
            "extra-trusted-public-keys = k9\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("reset.conf"), "trusted-public-keys = k0\n").unwrap();
        let main = dir.path().join("nix.conf");
        std::fs::write(
            &main,
            "trusted-public-keys = k1\ninclude more.conf\n!include absent.conf\n",
        )
        .unwrap();
        assert_eq!(NixConf::load(&main).trusted_public_keys(), ["k1", "k9"]);

        // An included file's extra- adds to the default when nothing came
        // before it; a later include's base setting replaces everything.
        std::fs::write(&main, "include more.conf\n").unwrap();
        assert_eq!(
            NixConf::load(&main).trusted_public_keys(),
            [DEFAULT_TRUSTED_KEY, "k9"]
        );
        std::fs::write(
            &main,
            "include more.conf\n!include reset.conf\nextra-trusted-public-keys = k2\n",
        )
        .unwrap();
        assert_eq!(NixConf::load(&main).trusted_public_keys(), ["k0", "k2"]);
    }

    #[test]
    fn a_missing_file_is_nix_defaults() {
        let conf = NixConf::load(Path::new("/nonexistent/nix.conf"));
        assert_eq!(conf.trusted_public_keys(), [DEFAULT_TRUSTED_KEY]);
        assert!(conf.require_sigs());
    }
}
