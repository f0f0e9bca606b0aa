//! The command line as a user meets it: a bad config is named by key and
//! line with exit code 2, and `nixmesh keygen` writes keys real Nix uses.

mod common;

use std::process::Command;

use common::*;

#[test]
fn a_bad_config_names_key_and_line_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[mesh]\nlisten = \"not an address\"\n", "2: mesh.listen"),
        (
            "[substituter]\nrace_timeout_ms = 0\n",
            "2: substituter.race_timeout_ms",
        ),
        (
            "[substituter]\nenable = true\nprefetch_mib = 99999999\n",
            "3: substituter.prefetch_mib",
        ),
        ("[share]\nal = true\n", "2: share"),
        ("state_dir = 5\n", "1: state_dir"),
        ("[admin\n", ":1:"),
    ];
    for (text, want) in cases {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text).unwrap();
        for sub in ["agent", "check-config"] {
            let out = Command::new(env!("CARGO_BIN_EXE_nixmesh"))
                .args([sub, "--config"])
                .arg(&file)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{sub} with {text:?}: {err}");
            assert!(err.contains(want), "{sub} with {text:?}: {err}");
            assert!(err.contains("bad.toml"), "{err}");
        }
    }
    let good = dir.path().join("good.toml");
    std::fs::copy("config.example.toml", &good).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nixmesh"))
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn keygen_writes_keys_that_nix_uses() {
    let dir = tempfile::tempdir().unwrap();
    let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_nixmesh"))
            .args(["keygen", "office-7"])
            .arg(&sk)
            .arg(&pk),
    );
    let public = std::fs::read_to_string(&pk).unwrap();
    assert_eq!(stdout_line(&out), public.trim());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sk).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Real Nix signs with our secret key and verifies with our public key.
    // An input-addressed path: content-addressed ones need no signature.
    let store = TestStore::new();
    let path = store.build(
        r#"derivation { name = "signed"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/bin"; args = [ "-c" "echo signed > $out" ]; }"#,
    );
    store.sign(&sk, &path);
    assert!(store.signed_by(public.trim(), &[&path]));
    // And refuses a key that is not ours.
    let other = nix_key("office-7");
    assert!(!store.signed_by(&other.public, &[&path]));
    // An existing key file is never overwritten.
    let again = Command::new(env!("CARGO_BIN_EXE_nixmesh"))
        .args(["keygen", "office-7"])
        .arg(&sk)
        .arg(&pk)
        .output()
        .unwrap();
    assert!(!again.status.success());
}
