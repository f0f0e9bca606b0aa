//! One agent of a loopback mesh: its store, ports, node key and config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use super::{free_port, run_ok, stdout_line, Agent, TestStore};

/// Ports and settings of one agent in a loopback mesh.
pub struct MeshNode {
    pub name: String,
    pub quic: u16,
    pub admin: u16,
    pub substituter: u16,
    pub config_path: PathBuf,
    pub key: String,
    pub store: TestStore,
}

/// Extra settings for `MeshNode::new`, one string per TOML section.
#[derive(Default, Clone)]
pub struct NodeSettings {
    pub top: String,
    pub share: String,
    pub mesh: String,
    pub substituter: String,
    /// The `[upstream]` section; empty: `caches = []` (a test agent never
    /// reaches for the Internet's caches).
    pub upstream: String,
}

impl MeshNode {
    pub fn new(name: &str, settings: &NodeSettings) -> Self {
        let store = TestStore::new();
        // Every store needs a DB; adding a path makes one.
        let seed = store.root().join("seed");
        std::fs::write(&seed, name).unwrap();
        store.add(&seed);
        let (quic, admin, substituter) = (free_port(), free_port(), free_port());
        let config_path = store.root().join("agent.toml");
        let mut node = Self {
            name: name.to_string(),
            quic,
            admin,
            substituter,
            config_path,
            key: String::new(),
            store,
        };
        node.write_config(settings, &[]);
        let out = run_ok(
            Command::new(env!("CARGO_BIN_EXE_nixmesh"))
                .args(["id", "--config"])
                .arg(&node.config_path),
        );
        node.key = stdout_line(&out);
        node
    }

    /// Rewrites the config with `peers` as static peers.
    pub fn write_config(&self, s: &NodeSettings, peers: &[&MeshNode]) {
        let statics: Vec<String> = peers
            .iter()
            .map(|p| {
                format!(
                    "{{ address = \"127.0.0.1:{}\", key = {:?} }}",
                    p.quic, p.key
                )
            })
            .collect();
        let text = format!(
            "{top}\nstate_dir = {state:?}\n\
             [store]\nroot = {root:?}\nnix_conf = \"/nonexistent/nix.conf\"\n\
             [share]\n{share}\n\
             [mesh]\nlisten = \"127.0.0.1:{quic}\"\nmdns = false\nname = {name:?}\nstatic_peers = [{statics}]\n{mesh}\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [substituter]\nlisten = \"127.0.0.1:{sub}\"\n{substituter}\n\
             [upstream]\n{upstream}\n",
            top = s.top,
            state = self.store.root().join("state").display().to_string(),
            root = self.store.root().display().to_string(),
            share = s.share,
            quic = self.quic,
            name = self.name,
            statics = statics.join(", "),
            mesh = s.mesh,
            admin = self.admin,
            sub = self.substituter,
            substituter = s.substituter,
            upstream = if s.upstream.is_empty() {
                "caches = []"
            } else {
                &s.upstream
            },
        );
        std::fs::write(&self.config_path, text).unwrap();
    }

    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin))
    }

    pub fn substituter_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.substituter))
    }

    pub fn start(&self) -> Agent {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        Agent::start(&text, self.admin_addr())
    }

    /// `nixmesh peers --json` against this node.
    pub fn peers(&self) -> Vec<serde_json::Value> {
        let out = run_ok(
            Command::new(env!("CARGO_BIN_EXE_nixmesh"))
                .args(["peers", "--json", "--admin"])
                .arg(self.admin_addr().to_string()),
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `nixmesh status` against this node: its text, and what `--json` says.
    pub fn status(&self) -> (String, serde_json::Value) {
        let run = |json: bool| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixmesh"));
            cmd.arg("status");
            if json {
                cmd.arg("--json");
            }
            run_ok(cmd.arg("--admin").arg(self.admin_addr().to_string())).stdout
        };
        (
            String::from_utf8_lossy(&run(false)).into_owned(),
            serde_json::from_slice(&run(true)).unwrap(),
        )
    }

    /// The state of the peer named `name` in this node's table.
    pub fn peer_state(&self, name: &str) -> Option<String> {
        self.peers()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["state"].as_str().unwrap_or("").to_string())
    }
}
