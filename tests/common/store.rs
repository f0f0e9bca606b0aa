//! Chroot Nix stores made by the Nix under test, and signing keys made by
//! `nix-store --generate-binary-cache-key`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{nix_command, rand_suffix, run_ok, stdout_line};

pub const NIX_FLAGS: [&str; 2] = ["--extra-experimental-features", "nix-command"];
pub const SANDBOX_PATHS: &str = "/bin=/usr/bin /usr /lib=/usr/lib /lib64=/usr/lib64";

/// A chroot Nix store in a temp dir: logical `/nix/store`, real files under
/// `<dir>/nix/store`. Each store has its own client cache dir.
pub struct TestStore {
    pub dir: tempfile::TempDir,
}

impl TestStore {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nixmesh-store-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("cache")).unwrap();
        Self { dir }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn real(&self, store_path: &str) -> PathBuf {
        self.root().join(store_path.trim_start_matches('/'))
    }

    /// A Nix command aimed at this store, with a private client cache.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = nix_command(program);
        c.env("XDG_CACHE_HOME", self.root().join("cache"))
            .arg("--store")
            .arg(self.root());
        c
    }

    pub fn nix(&self, args: &[&str]) -> Output {
        let mut c = self.cmd("nix");
        c.args(NIX_FLAGS).args(args);
        run_ok(&mut c)
    }

    /// `nix-store --add` (a content-addressed path).
    pub fn add(&self, path: &Path) -> String {
        stdout_line(&run_ok(self.cmd("nix-store").arg("--add").arg(path)))
    }

    /// `nix-build` of `expr` (a Nix expression file's text); returns the out path.
    pub fn build(&self, expr: &str) -> String {
        let file = self.root().join(format!("expr-{}.nix", rand_suffix()));
        std::fs::write(&file, expr).unwrap();
        let out = run_ok(
            self.cmd("nix-build")
                .args([
                    "--option",
                    "extra-sandbox-paths",
                    SANDBOX_PATHS,
                    "--no-out-link",
                ])
                .arg(&file),
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string()
    }

    /// `nix path-info --json` of one path, in 2.8's shape whatever the
    /// Nix: 2.8 prints a list, 2.19 on an object keyed by path with the
    /// NarHash in SRI form; `narHash` here is always `sha256:<nix32>`.
    pub fn path_info_json(&self, path: &str) -> serde_json::Value {
        let out = self.nix(&["path-info", "--json", path]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut info = match v {
            serde_json::Value::Array(mut list) if !list.is_empty() => list.swap_remove(0),
            serde_json::Value::Object(mut by_path) => by_path
                .remove(path)
                .unwrap_or_else(|| panic!("no {path} in nix path-info's answer")),
            other => panic!("nix path-info --json printed {other}"),
        };
        if let Some(h) = info["narHash"].as_str() {
            let nix32 = nixmesh::nix::Sha256Hash::parse(h)
                .unwrap_or_else(|e| panic!("narHash {h:?}: {e}"))
                .to_nix32();
            info["narHash"] = nix32.into();
        }
        info
    }

    /// What `nix-store --dump` writes for `path` (read from the real files).
    pub fn dump(&self, path: &str) -> Vec<u8> {
        run_ok(nix_command("nix-store").arg("--dump").arg(self.real(path))).stdout
    }

    pub fn sign(&self, secret_key_file: &Path, path: &str) {
        self.nix(&[
            "store",
            "sign",
            "-k",
            secret_key_file.to_str().unwrap(),
            path,
        ]);
    }

    /// `nix-store -r paths` into this store with only `substituters`
    /// (space-separated URLs) and, when given, `trusted` public keys.
    pub fn substitute(&self, substituters: &str, trusted: Option<&str>, paths: &[&str]) -> Output {
        let mut c = self.cmd("nix-store");
        c.args(["-r", "--option", "substituters", substituters])
            .args(["--option", "narinfo-cache-negative-ttl", "0"]);
        if let Some(keys) = trusted {
            c.args(["--option", "trusted-public-keys", keys]);
        }
        c.args(paths).output().expect("nix-store (Debian nix-bin)")
    }

    /// `nix store verify --sigs-needed 1` trusting only `trusted`: true when
    /// every path carries a valid signature by it (or is content-addressed).
    pub fn signed_by(&self, trusted: &str, paths: &[&str]) -> bool {
        let mut c = self.cmd("nix");
        c.args(NIX_FLAGS)
            .args(["store", "verify", "--sigs-needed", "1"])
            .args(["--option", "trusted-public-keys", trusted])
            .args(paths);
        c.output().map(|o| o.status.success()).unwrap_or(false)
    }

    pub fn is_valid(&self, path: &str) -> bool {
        self.cmd("nix-store")
            .args(["--check-validity", path])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

/// A Nix signing key pair made by `nix-store --generate-binary-cache-key`.
pub struct NixKey {
    pub secret: PathBuf,
    pub public: String,
    _dir: tempfile::TempDir,
}

pub fn nix_key(name: &str) -> NixKey {
    let dir = tempfile::tempdir().unwrap();
    let (s, p) = (dir.path().join("sk"), dir.path().join("pk"));
    run_ok(
        nix_command("nix-store")
            .arg("--generate-binary-cache-key")
            .arg(name)
            .arg(&s)
            .arg(&p),
    );
    NixKey {
        secret: s,
        public: std::fs::read_to_string(&p).unwrap().trim().to_string(),
        _dir: dir,
    }
}
