//! Which Nix the tests run against, and how to run it. Shared by the tests
//! in `tests/` and the LAN harness in `integration/`.
//!
//! `NIXMESH_TEST_NIX` selects it: `host` (Debian 12's own `nix-bin`, 2.8),
//! `2.26` (Debian trixie's) or `2.34` (Debian sid's, the default). The
//! modern ones need a newer glibc than Debian 12's, so they run chrooted in
//! a Debian root that `.ci/nix-roots.sh` prepares (under
//! `NIXMESH_NIX_ROOTS`, default `/var/cache/nixmesh-test/roots`), with
//! `/proc`, `/dev`, the temp dir and the working directory bound inside.
//!
//! Every Nix command a test runs gets the test's own settings, never the
//! machine's: `NIX_CONF_DIR` points at a nix.conf written here (no
//! `nixbld` group, no substituter, nothing from `/etc/nix`), no user
//! config, no `NIX_CONFIG`. A command that is not aimed at a store of the
//! test's own gets an empty throwaway `/nix` (a tmpfs in a private mount
//! namespace), so no test ever touches the machine's `/nix`, and two tests
//! cannot race to create it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The programs of a `nix-bin` package.
const NIX_PROGRAMS: &[&str] = &[
    "nix",
    "nix-build",
    "nix-channel",
    "nix-collect-garbage",
    "nix-copy-closure",
    "nix-daemon",
    "nix-env",
    "nix-hash",
    "nix-instantiate",
    "nix-prefetch-url",
    "nix-shell",
    "nix-store",
];

/// The settings every test's Nix starts from.
const TEST_NIX_CONF: &str = "\
# Written by the nixmesh tests: the machine's /etc/nix is not used.
# No network: no cache.nixos.org (and no DNS retries for it).
substituters =
experimental-features = nix-command
";

/// Added for the machine's own Nix: Debian's nix-bin without its
/// recommends makes no nixbld group.
const HOST_NIX_CONF: &str = "build-users-group =\n";

/// Added for a Nix in a Debian root. Sandboxed builds in a chroot store
/// need build users there (without them Nix wants a user namespace, which
/// the kernel refuses to a chrooted process); `.ci/nix-roots.sh` makes them
/// in the root's own /etc/group, and a build dir outside the world-writable
/// temp dir, which modern Nix refuses to build below. Debian's modern
/// nix-bin defaults `sandbox-paths` to `/bin/sh=/usr/bin/bash-static`;
/// beside the tests' `/bin=/usr/bin` Nix would create that mount point
/// inside the bound /usr/bin and truncate the root's own /bin/sh.
const ROOT_NIX_CONF: &str = "\
build-users-group = nixbld
build-dir = /var/lib/nixmesh-test-builds
sandbox-paths =
";

/// Mounts a private view for a Nix command in a fresh mount namespace, then
/// runs it: `$1` the root ('' for the machine's own Nix), `$2` the temp
/// dir, `$3` the working directory, the rest the command.
const ISOLATE: &str = r#"set -e
root=$1 tmp=$2 cwd=$3
shift 3
if [ -z "$root" ]; then
    mount -t tmpfs -o size=64m,mode=0755 nixmesh-test-nix /nix
    exec "$@"
fi
mkdir -p "$root$tmp" "$root$cwd"
# The root read-only (no test can damage the cached root), and a mount
# point as /, so Nix's sandbox can make it private.
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount -t tmpfs -o size=64m,mode=0755 nixmesh-test-nix "$root/nix"
mount -t tmpfs -o mode=0755 nixmesh-test-builds "$root/var/lib/nixmesh-test-builds"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --rbind "$tmp" "$root$tmp"
[ "$cwd" = / ] || mount --rbind "$cwd" "$root$cwd"
exec chroot "$root" /bin/sh -c 'cd "$0" && exec "$@"' "$cwd" "$@"
"#;

#[derive(Debug)]
pub struct NixUnderTest {
    /// `2.8`, `2.26` or `2.34`: what `nix --version` must start with (or,
    /// with `or_newer`, the oldest release it may say).
    pub version: &'static str,
    /// Debian sid moves on: its Nix may be a newer release than the one
    /// these tests were written against, which is what users of sid get.
    /// Accepted, and `tests/nix_version.rs` prints which it is.
    pub or_newer: bool,
    /// The Debian root it runs in; `None` for the machine's own.
    pub root: Option<PathBuf>,
}

/// The Nix this test run uses. Panics, saying what to do, if the selection
/// is unknown or its root is not prepared.
pub fn selected() -> &'static NixUnderTest {
    static SELECTED: OnceLock<NixUnderTest> = OnceLock::new();
    SELECTED.get_or_init(|| {
        let choice = std::env::var("NIXMESH_TEST_NIX").unwrap_or_else(|_| "2.34".into());
        // sid moves on: its Nix may be newer than the selection's name.
        let (version, suite, or_newer) = match choice.as_str() {
            "host" | "2.8" => ("2.8", None, false),
            "2.26" => ("2.26", Some("trixie"), false),
            "2.34" | "" => ("2.34", Some("sid"), true),
            other => panic!("NIXMESH_TEST_NIX={other:?}: expected host, 2.26 or 2.34"),
        };
        let root = suite.map(|suite| {
            let roots = std::env::var_os("NIXMESH_NIX_ROOTS")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/cache/nixmesh-test/roots"));
            let root = roots.join(suite);
            assert!(
                root.join("usr/bin/nix").is_file(),
                "NIXMESH_TEST_NIX={choice}: no Nix in {}; prepare it with `bash .ci/nix-roots.sh {suite}` \
                 (`bash .ci/test` does)",
                root.display()
            );
            root
        });
        NixUnderTest {
            version,
            or_newer,
            root,
        }
    })
}

/// The release in `nix --version`'s output (`nix (Nix) 2.34.8`: `2.34.8`).
/// Pure.
pub fn release_of(text: &str) -> &str {
    text.rsplit(' ').next().unwrap_or(text)
}

/// Whether the release `got` (`2.34.8`, `2.35pre…`) is `want` (`2.34`) or,
/// with `or_newer`, a later major.minor. Pure.
pub fn version_fits(got: &str, want: &str, or_newer: bool) -> bool {
    let same = got == want
        || got
            .strip_prefix(want)
            .is_some_and(|rest| rest.starts_with('.'));
    let major_minor = |v: &str| -> Option<(u32, u32)> {
        let mut parts = v.split('.');
        let major = parts.next()?.parse().ok()?;
        let digits: String = parts
            .next()?
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        Some((major, digits.parse().ok()?))
    };
    same || (or_newer
        && matches!((major_minor(got), major_minor(want)), (Some(g), Some(w)) if g > w))
}

pub fn is_nix_program(program: &str) -> bool {
    let name = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program);
    NIX_PROGRAMS.contains(&name)
}

impl NixUnderTest {
    /// A Nix program on the machine (not in a LAN host), with the tests'
    /// settings and a throwaway `/nix`. Arguments and environment are the
    /// caller's to add; paths must be absolute or under the working dir.
    pub fn command(&self, program: &str) -> Command {
        assert!(is_nix_program(program), "{program} is not a Nix program");
        let tmp = std::env::temp_dir();
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let root = match &self.root {
            Some(r) => r.display().to_string(),
            None => {
                // The mount point for the throwaway /nix; empty, and left so.
                if !Path::new("/nix").is_dir() {
                    std::fs::create_dir_all("/nix")
                        .unwrap_or_else(|e| panic!("cannot create /nix (tests run as root): {e}"));
                }
                String::new()
            }
        };
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c", ISOLATE])
            .arg("nixmesh-test-nix")
            .arg(root)
            .arg(&tmp)
            .arg(&cwd)
            .arg(program);
        self.apply_settings(&mut c);
        c
    }

    /// The argv that runs `argv` with this Nix inside a LAN host, whose
    /// shell has already bound the root's mounts (`host_mounts`). A leading
    /// `timeout …` stays outside. Other programs are left as they are.
    pub fn host_argv(&self, cwd: &Path, argv: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(argv.len() + 6);
        let at = argv.iter().position(|a| is_nix_program(a));
        let wrapped = match (at, &self.root) {
            (Some(i), Some(root)) if i == 0 || argv[0] == "timeout" => Some((i, root)),
            _ => None,
        };
        let Some((i, root)) = wrapped else {
            return argv.iter().map(|s| s.to_string()).collect();
        };
        out.extend(argv[..i].iter().map(|s| s.to_string()));
        out.extend([
            "chroot".to_string(),
            root.display().to_string(),
            "/bin/sh".into(),
            "-c".into(),
            r#"cd "$0" && exec "$@""#.into(),
            cwd.display().to_string(),
        ]);
        out.extend(argv[i..].iter().map(|s| s.to_string()));
        out
    }

    /// Shell lines for a LAN host's shell, after it bound its own `/nix`
    /// (`$2`) and `/etc/nix` (`$3`): the root read-only, the same binds
    /// inside it, plus `/proc`, `/dev` and the temp dir. Empty for the
    /// machine's own Nix.
    pub fn host_mounts(&self) -> String {
        let Some(root) = &self.root else {
            return String::new();
        };
        let r = root.display();
        let tmp = std::env::temp_dir();
        let t = tmp.display();
        format!(
            "mkdir -p '{r}{t}' && mount --bind '{r}' '{r}' && mount -o remount,bind,ro '{r}' \
             && mount --bind \"$2\" '{r}/nix' && mount --bind \"$3\" '{r}/etc/nix' \
             && mount -t proc proc '{r}/proc' && mount --rbind /dev '{r}/dev' \
             && mount --rbind '{t}' '{r}{t}' && "
        )
    }

    /// The tests' nix.conf, their own for this process.
    fn apply_settings(&self, c: &mut Command) {
        c.env("NIX_CONF_DIR", self.conf_dir())
            .env("NIX_USER_CONF_FILES", "")
            .env_remove("NIX_CONFIG")
            .env_remove("NIX_REMOTE")
            .env_remove("NIX_STORE_DIR")
            .env_remove("NIX_STATE_DIR");
    }

    /// Runs `nix --version` and checks it is the selected one; returns it.
    pub fn check_version(&self) -> String {
        let out = self
            .command("nix")
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run nix --version: {e}"));
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        self.assert_version(&text, &String::from_utf8_lossy(&out.stderr));
        text
    }

    /// Panics unless `nix --version`'s output `text` is this version (or,
    /// `or_newer`, a later release).
    pub fn assert_version(&self, text: &str, stderr: &str) {
        assert!(
            version_fits(release_of(text), self.version, self.or_newer),
            "NIXMESH_TEST_NIX selects Nix {}{} but `nix --version` says {text:?} {stderr}",
            self.version,
            if self.or_newer { " or newer" } else { "" },
        );
    }
}

impl NixUnderTest {
    /// The directory holding the tests' nix.conf, under the temp dir (so a
    /// chrooted Nix sees it too); written once per process, atomically,
    /// since concurrent test processes share it.
    fn conf_dir(&self) -> &'static Path {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        DIR.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("nixmesh-test-nix-conf-{}", self.version));
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
            let text = match self.root {
                Some(_) => format!("{TEST_NIX_CONF}{ROOT_NIX_CONF}"),
                None => format!("{TEST_NIX_CONF}{HOST_NIX_CONF}"),
            };
            let staged = dir.join(format!(".nix.conf.{}", std::process::id()));
            std::fs::write(&staged, text)
                .and_then(|()| std::fs::rename(&staged, dir.join("nix.conf")))
                .unwrap_or_else(|e| {
                    panic!("cannot write the tests' nix.conf in {}: {e}", dir.display())
                });
            dir
        })
    }
}
