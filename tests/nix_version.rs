//! The Nix the tests run is the one `NIXMESH_TEST_NIX` selects, so a wrong
//! selection cannot pass silently: on the machine (the chroot-store tests)
//! here, and inside every LAN host in `integration/harness.rs`.

mod common;

use common::{nix_under_test, run_ok, stdout_line, TestStore};

#[test]
fn the_selected_nix_is_the_one_that_runs() {
    let nix = nix_under_test::selected();
    let said = nix.check_version();
    eprintln!("running against {said}");
    // The chroot-store commands of every test go through the same door.
    let store = TestStore::new();
    let out = run_ok(store.cmd("nix-store").arg("--version"));
    nix.assert_version(&stdout_line(&out), "");
}

#[test]
fn tests_never_touch_the_machines_nix() {
    // A command aimed at no store of its own writes to the default one: it
    // must land in a throwaway /nix, not the machine's.
    let store = TestStore::new();
    let file = store
        .root()
        .join(format!("probe-{}", common::rand_suffix()));
    std::fs::write(&file, "x").unwrap();
    let added = stdout_line(&run_ok(
        common::nix_command("nix-store").arg("--add").arg(&file),
    ));
    assert!(added.starts_with("/nix/store/"), "{added}");
    assert!(
        !std::path::Path::new(&added).exists(),
        "{added} landed in the machine's /nix"
    );
}

#[test]
fn sids_nix_may_be_newer_than_the_tests_were_written_against_but_no_other() {
    use nix_under_test::version_fits;
    assert!(version_fits("2.34.8", "2.34", false));
    assert!(version_fits("2.34", "2.34", false));
    assert!(!version_fits("2.340.1", "2.34", false));
    assert!(!version_fits("2.35.0", "2.34", false));
    // Debian sid moving on (or_newer): a later release fits, an older or
    // an unreadable one does not.
    assert!(version_fits("2.35.0", "2.34", true));
    assert!(version_fits("2.40pre20270101_abcdef", "2.34", true));
    assert!(version_fits("3.0.1", "2.34", true));
    assert!(!version_fits("2.33.9", "2.34", true));
    assert!(!version_fits("2.4.0", "2.34", true));
    assert!(!version_fits("unknown", "2.34", true));
}
