//! A host serves its store as a plain HTTP binary cache (`[http_cache]`),
//! and another host's unmodified Nix substitutes from it: signatures,
//! hashes and the share policy as a real client sees them.

use crate::harness::{Host, Lan};

const PORT: u16 = 5180;

/// The office closure (`top` refers to `dep`; a directory, an executable
/// and a symlink), with a small `dep`.
fn closure() -> String {
    crate::office::closure_expr("nixmesh-lan", 4)
}

fn http_cache_config(host: &Host, extra: &str) -> String {
    format!(
        "{extra}\n[http_cache]\nenable = true\nlisten = \"{}:{PORT}\"\n",
        host.addr()
    )
}

fn cache_url(host: &Host) -> String {
    format!("http://{}:{PORT}", host.addr())
}

#[test]
fn a_nix_client_that_checks_signatures_substitutes_a_closure_from_a_peer() {
    let lan = Lan::new(2);
    let (a, b) = (lan.host(0), lan.host(1));
    let key = a.generate_key("office-a-1");
    let file = a.add_file(
        "hello.txt",
        format!("hello from {}\n", lan.name()).as_bytes(),
    );
    let top = a.build(&closure());
    let built = a.closure(&top);
    assert_eq!(built.len(), 2, "top and dep: {built:?}");

    let _agent = a.start_agent(&http_cache_config(
        a,
        &format!(
            "signing_key_file = \"{}\"\n[share]\nall = true",
            key.secret_file.display()
        ),
    ));
    b.configure_nix(&format!(
        "substituters = {}\ntrusted-public-keys = {}",
        cache_url(a),
        key.public
    ));

    b.run_ok(&["nix-store", "--realise", &file, &top]);
    for path in built.iter().chain([&file]) {
        assert!(b.has_path(path), "{path} is not on {}", b.name());
        b.run_ok(&["nix-store", "--verify-path", path]);
        assert_eq!(
            b.run_ok(&["nix-store", "--query", "--hash", path]),
            a.run_ok(&["nix-store", "--query", "--hash", path]),
            "{path}"
        );
    }
    // The built paths came with the signature B's Nix checked.
    let sigs = b.run_ok(&["nix", "path-info", "--sigs", &top]);
    assert!(sigs.contains("office-a-1:"), "{sigs}");
}

#[test]
fn paths_outside_the_share_policy_stay_home() {
    let lan = Lan::new(2);
    let (a, b) = (lan.host(0), lan.host(1));
    // The office key: A's Nix trusts it, so A's agent shares what it signed.
    let office = a.generate_key("office-1");
    a.configure_nix(&format!("trusted-public-keys = {}", office.public));
    let signed = a.add_file("signed.txt", b"signed by the office key\n");
    a.sign(&[&signed], &office.secret_file);
    let unsigned = a.add_file("unsigned.txt", b"stays on h0\n");
    let built = a.build(&closure());

    // No `share.all`, no signing key: only office-signed paths leave A.
    let _agent = a.start_agent(&http_cache_config(a, ""));
    b.configure_nix(&format!(
        "substituters = {}\ntrusted-public-keys = {}",
        cache_url(a),
        office.public
    ));

    b.run_ok(&["nix-store", "--realise", &signed]);
    assert!(b.has_path(&signed));
    for path in [&unsigned, &built] {
        let out = b.run(&["nix-store", "--realise", path]);
        assert!(
            !out.status.success(),
            "{path} was substituted:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!b.has_path(path), "{path} reached {}", b.name());
    }
}
