//! A `nixmesh agent` on the machine, ready once a TCP address answers.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::agent_process::AgentProcess;

/// A `nixmesh agent` process on the machine; killed on drop, its log
/// printed if the test is failing.
pub struct Agent {
    process: AgentProcess,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts the agent with `config` and waits until `ready` accepts TCP.
    pub fn start(config: &str, ready: SocketAddr) -> Self {
        Self::start_with(config, ready, &[], Path::new(env!("CARGO_BIN_EXE_nixmesh")))
    }

    /// Like `start`, running `binary` behind `wrapper` (e.g. `setpriv …`).
    pub fn start_with(config: &str, ready: SocketAddr, wrapper: &[&str], binary: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let process = AgentProcess::spawn(dir.path(), "agent", config, binary, |argv| {
            let mut all: Vec<&str> = wrapper.to_vec();
            all.extend_from_slice(argv);
            let mut c = Command::new(all[0]);
            c.args(&all[1..]);
            c
        });
        let mut agent = Self { process, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(ready).is_err() {
            if let Some(status) = agent.process.exited() {
                panic!("agent exited with {status}:\n{}", agent.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "agent not up:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn log_text(&self) -> String {
        self.process.log()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.process.kill();
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log_text());
        }
    }
}
