//! The NixOS module and the flake: every `.nix` file parses, and the module,
//! evaluated by real Nix against a stand-in of the NixOS option system
//! (tests/nixos/eval.nix), produces the expected systemd socket and service,
//! Nix settings, and a config file nixmesh accepts.

mod common;

use std::path::Path;

use common::nix_command;

use serde_json::{json, Value};

fn nix_files() -> Vec<String> {
    let mut files = vec!["flake.nix".to_string(), "tests/nixos/eval.nix".to_string()];
    for entry in std::fs::read_dir("nixos").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "nix") {
            files.push(path.display().to_string());
        }
    }
    files
}

#[test]
fn every_nix_file_parses() {
    let files = nix_files();
    assert!(files.len() >= 5, "{files:?}");
    for f in files {
        let out = nix_command("nix-instantiate")
            .args(["--parse", &f])
            .output()
            .expect("nix-instantiate (Debian nix-bin)");
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn eval(user: Value) -> Value {
    eval_with(user, json!(["https://cache.nixos.org/"]))
}

/// `eval` with `others`: the substituters other modules set.
fn eval_with(user: Value, others: Value) -> Value {
    let out = nix_command("nix-instantiate")
        .args([
            "--eval",
            "--strict",
            "--json",
            "tests/nixos/eval.nix",
            "--argstr",
            "othersJson",
        ])
        .arg(others.to_string())
        .args(["--argstr", "userJson"])
        .arg(user.to_string())
        .output()
        .expect("nix-instantiate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The generated settings, turned into TOML and parsed by nixmesh itself.
fn parsed_settings(config: &Value) -> nixmesh::config::Config {
    let settings = &config["environment"]["etc"]["nixmesh/config.toml"]["source"]["value"];
    let toml_text = toml::to_string(&settings).unwrap();
    nixmesh::config::Config::parse("module-settings", &toml_text)
        .unwrap_or_else(|e| panic!("{e}\n{toml_text}"))
}

#[test]
fn module_makes_socket_service_and_nix_settings() {
    assert!(Path::new("nixos/module.nix").exists());
    let out = eval(json!({
        "enable": true,
        "openFirewall": true,
        "signingKeyFile": "/secrets/office.sk",
        "meshSecretFile": "/secrets/mesh",
        "trustedPublicKeys": ["office-1:CImzJtHegRxATUqefe4Rv01hwNEOGIet8vyiXmxFPvs="],
        "settings": { "mesh": { "name": "box-1" }, "share": { "content_addressed": true } }
    }));
    for name in [
        "enable",
        "package",
        "settings",
        "openFirewall",
        "signingKeyFile",
        "trustedPublicKeys",
    ] {
        assert!(
            out["optionNames"]
                .as_array()
                .unwrap()
                .contains(&json!(name)),
            "{name}"
        );
    }
    let c = &out["config"];

    let socket = &c["systemd"]["sockets"]["nixmesh"];
    assert_eq!(socket["listenStreams"], json!(["127.0.0.1:5181"]));
    assert_eq!(socket["socketConfig"]["FileDescriptorName"], "substituter");
    assert_eq!(socket["wantedBy"], json!(["sockets.target"]));

    // Room for the agent's 8 MiB UDP buffers, which it cannot force.
    for knob in ["net.core.rmem_max", "net.core.wmem_max"] {
        assert_eq!(c["boot"]["kernel"]["sysctl"][knob], 8388608, "{knob}");
    }

    let service = &c["systemd"]["services"]["nixmesh"];
    let sc = &service["serviceConfig"];
    let exec = sc["ExecStart"].as_str().unwrap();
    assert!(
        exec.ends_with(
            "/bin/nixmesh agent --config /nix/store/00000000000000000000000000000000-nixmesh.toml"
        ),
        "{exec}"
    );
    assert_eq!(service["requires"], json!(["nixmesh.socket"]));
    assert_eq!(sc["NoNewPrivileges"], true);
    assert_eq!(sc["ProtectSystem"], "strict");
    assert_eq!(sc["CapabilityBoundingSet"], "");
    assert_eq!(sc["StateDirectory"], "nixmesh");
    assert_eq!(sc["StateDirectoryMode"], "0700");
    assert_eq!(sc["ReadOnlyPaths"], json!(["/nix/store"]));
    assert_eq!(
        sc["ReadWritePaths"],
        json!(["/nix/var/nix/db"]),
        "only for SQLite's -shm"
    );
    assert_eq!(
        sc["LoadCredential"],
        json!([
            "signing-key:/secrets/office.sk",
            "mesh-secret:/secrets/mesh"
        ])
    );

    let subs = &c["nix"]["settings"]["substituters"];
    assert_eq!(subs["value"], json!(["http://127.0.0.1:5181"]));
    assert!(
        subs["_order"].as_i64().unwrap() < 1000,
        "placed ahead of the others (mkBefore)"
    );
    assert_eq!(
        c["nix"]["settings"]["trusted-public-keys"],
        json!(["office-1:CImzJtHegRxATUqefe4Rv01hwNEOGIet8vyiXmxFPvs="])
    );
    assert_eq!(
        c["networking"]["firewall"]["allowedUDPPorts"],
        json!([5182, 5353])
    );
    // Bulk NAR connections between agents (protocol version 5).
    assert_eq!(
        c["networking"]["firewall"]["allowedTCPPorts"],
        json!([5182])
    );

    let settings = parsed_settings(c);
    assert_eq!(settings.substituter.listen.to_string(), "127.0.0.1:5181");
    assert_eq!(settings.mesh.listen.port(), 5182);
    assert_eq!(settings.mesh.name.as_deref(), Some("box-1"));
    assert!(settings.share.content_addressed);
    assert_eq!(
        settings.signing_key_file.as_deref(),
        Some(Path::new("/run/credentials/nixmesh.service/signing-key"))
    );
    assert_eq!(
        settings.mesh.secret_file.as_deref(),
        Some(Path::new("/run/credentials/nixmesh.service/mesh-secret"))
    );
    assert_eq!(settings.state_dir, Path::new("/var/lib/nixmesh"));
    // The agent pulls from the host's other substituters.
    assert_eq!(
        settings.upstream.caches,
        Some(vec!["https://cache.nixos.org".to_string()])
    );
}

#[test]
fn module_fills_upstream_caches_from_the_other_http_substituters() {
    let out = eval_with(
        json!({ "enable": true }),
        json!([
            "https://cache.nixos.org/",
            "http://nas.lan:8080?priority=10",
            "ssh://builder",
            "http://127.0.0.1:5181"
        ]),
    );
    let settings = parsed_settings(&out["config"]);
    assert_eq!(
        settings.upstream.caches,
        Some(vec![
            "https://cache.nixos.org".to_string(),
            "http://nas.lan:8080".to_string()
        ])
    );
}

#[test]
fn module_ports_follow_options_and_disabled_means_nothing() {
    let c = &eval(json!({ "enable": true, "port": 6001, "quicPort": 6002 }))["config"];
    assert_eq!(
        c["systemd"]["sockets"]["nixmesh"]["listenStreams"],
        json!(["127.0.0.1:6001"])
    );
    assert_eq!(
        c["nix"]["settings"]["substituters"]["value"],
        json!(["http://127.0.0.1:6001"])
    );
    assert!(
        c["networking"]["firewall"].is_null(),
        "firewall untouched without openFirewall"
    );
    assert!(
        c["systemd"]["services"]["nixmesh"]["serviceConfig"]["LoadCredential"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let settings = parsed_settings(c);
    assert_eq!(settings.substituter.listen.port(), 6001);
    assert_eq!(settings.mesh.listen.port(), 6002);
    assert_eq!(settings.signing_key_file, None);

    let off = eval(json!({ "enable": false }));
    assert!(
        off["config"].is_null(),
        "a disabled module changes nothing: {off}"
    );
}
