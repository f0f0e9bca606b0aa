//! How the benchmarks' large paths are addressed (`ADDRESSING`):
//!
//! - `input` [the default]: as a build farm's paths are, the ones users
//!   substitute (cache.nixos.org's). Nix checks a substituted path's
//!   NarHash while it unpacks it, and nothing more.
//! - `content`: as `nix-store --add` makes them (`CA: fixed:r:sha256:…`).
//!   After unpacking such a path, Nix reads it back from disk and hashes it
//!   once more, looking for self-references as it goes
//!   (`LocalStore::addToStore`); in a profile of the stripes part that made
//!   Nix the busiest process on the machine. Both sides of every
//!   comparison pay it alike, but where the machine's two cores are the
//!   bound, it is CPU neither the mesh nor a plain cache gets.
//!
//! An input-addressed path is made from the `nix-store --add` one: the
//! same files under the hash part reversed (still Nix's base-32 alphabet,
//! and the same on every host), registered with no CA field
//! (`nix-store --register-validity`, which hashes it) and signed with a
//! key that the holders share by and the client's Nix trusts.

use std::io::Write as _;
use std::process::Stdio;

use super::*;

pub(crate) enum Addressing {
    Input(harness::SigningKey),
    Content,
}

impl Addressing {
    /// From `ADDRESSING`; an input-addressed run makes its signing key on
    /// `host` (under the LAN's dir, which every host sees).
    pub(crate) fn from_env(host: &Host) -> Addressing {
        match std::env::var("ADDRESSING").as_deref() {
            Ok("input") | Err(_) => Addressing::Input(host.generate_key("bench-farm-1")),
            Ok("content") => Addressing::Content,
            Ok(other) => panic!("ADDRESSING={other:?}: `input` (the default) or `content`"),
        }
    }

    /// For a table's label.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Addressing::Input(_) => "input-addressed",
            Addressing::Content => "content-addressed",
        }
    }

    /// The path to benchmark on `host` for `added`, a path `nix-store
    /// --add` made there: an input-addressed copy of it, registered and
    /// signed, or `added` itself.
    pub(crate) fn path(&self, host: &Host, added: &str) -> String {
        let Addressing::Input(key) = self else {
            return added.to_string();
        };
        let (hash, name) = (&added[11..43], &added[44..]);
        let copy = format!(
            "/nix/store/{}-{name}",
            hash.chars().rev().collect::<String>()
        );
        if !host.has_path(&copy) {
            let (from, to) = (host.real_path(added), host.real_path(&copy));
            if to.symlink_metadata().is_ok() {
                let _ = fs::remove_dir_all(&to).or_else(|_| fs::remove_file(&to));
            }
            let cp = std::process::Command::new("cp")
                .arg("-a")
                .args([&from, &to])
                .status()
                .unwrap_or_else(|e| panic!("cp -a {}: {e}", from.display()));
            assert!(cp.success(), "cp -a {} {}", from.display(), to.display());
            register(host, &copy);
        }
        host.sign(&[&copy], &key.secret_file);
        copy
    }

    /// The holders' `[share]` lines: content-addressed paths (the other
    /// paths a part adds are), and those signed by the run's key.
    pub(crate) fn share_lines(&self) -> String {
        let signed = match self {
            Addressing::Input(key) => format!(
                "trusted_keys = [{}]\n",
                toml::Value::String(key.public.clone())
            ),
            Addressing::Content => String::new(),
        };
        format!("[share]\ncontent_addressed = true\n{signed}")
    }

    /// The keys the client's Nix (and so its agent) trusts.
    pub(crate) fn trusted(&self) -> Vec<&str> {
        match self {
            Addressing::Input(key) => vec![key.public.as_str()],
            Addressing::Content => Vec::new(),
        }
    }
}

/// Registers `path`, whose files are in `host`'s store already, as valid
/// with no references, deriver or CA field. `--register-validity` needs
/// the local store, not the daemon.
fn register(host: &Host, path: &str) {
    let mut cmd = host.command(&["nix-store", "--register-validity"]);
    cmd.env("NIX_REMOTE", "local")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{}: nix-store --register-validity: {e}", host.name()));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(format!("{path}\n\n0\n").as_bytes())
            .expect("write to nix-store --register-validity");
    }
    let out = child
        .wait_with_output()
        .expect("nix-store --register-validity");
    assert!(
        out.status.success(),
        "{}: nix-store --register-validity {path}: {}",
        host.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        host.has_path(path),
        "{path} is not valid after registering it"
    );
}
