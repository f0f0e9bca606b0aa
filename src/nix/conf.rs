//! The parts of `nix.conf` nixmesh needs: which keys this host's Nix trusts
//! and which substituters it uses. `parse` is pure; `load` follows `include`
//! lines from the filesystem.

use std::collections::BTreeMap;
use std::path::Path;

/// Nix's built-in `trusted-public-keys` when nix.conf does not set it.
pub const DEFAULT_TRUSTED_KEY: &str =
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
const MAX_INCLUDE_DEPTH: usize = 8;

/// Settings as Nix would see them: later lines win, `extra-` appends.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NixConf {
    values: BTreeMap<String, String>,
}

impl NixConf {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// Space-separated list setting.
    pub fn list(&self, name: &str) -> Vec<String> {
        self.get(name)
            .map(|v| v.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// `trusted-public-keys` (or its old name), with Nix's default.
    pub fn trusted_public_keys(&self) -> Vec<String> {
        for name in ["trusted-public-keys", "binary-cache-public-keys"] {
            if self.values.contains_key(name) {
                return self.list(name);
            }
        }
        vec![DEFAULT_TRUSTED_KEY.to_string()]
    }

    fn apply(&mut self, line: &str) {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some((name, value)) = line.split_once('=') else {
            return;
        };
        let (name, value) = (name.trim(), value.trim().to_string());
        if let Some(base) = name.strip_prefix("extra-") {
            let entry = self.values.entry(base.to_string()).or_default();
            if !entry.is_empty() {
                entry.push(' ');
            }
            entry.push_str(&value);
        } else {
            self.values.insert(name.to_string(), value);
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

    #[test]
    fn later_lines_win_and_extra_appends() {
        let conf = NixConf::parse(
            "substituters = a b\n# c\ntrusted-public-keys = k1\nextra-trusted-public-keys = k2 # note\nsubstituters = x\n",
            &mut |_, _, _| {},
        );
        assert_eq!(conf.list("substituters"), ["x"]);
        assert_eq!(conf.trusted_public_keys(), ["k1", "k2"]);
    }

    #[test]
    fn default_trusted_key() {
        let conf = NixConf::parse("sandbox = false\n", &mut |_, _, _| {});
        assert_eq!(conf.trusted_public_keys(), [DEFAULT_TRUSTED_KEY]);
    }

    #[test]
    fn includes_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("more.conf"),
            "extra-trusted-public-keys = k9\n",
        )
        .unwrap();
        let main = dir.path().join("nix.conf");
        std::fs::write(
            &main,
            "trusted-public-keys = k1\ninclude more.conf\n!include absent.conf\n",
        )
        .unwrap();
        assert_eq!(NixConf::load(&main).trusted_public_keys(), ["k1", "k9"]);
    }
}
