//! A `nixmesh agent` process running inside a host: started from a config
//! text, logging to a file in the host's dir, asked about its peers, `why`
//! and metrics through its admin API inside the host, signalled, stopped
//! with SIGTERM or killed with SIGKILL. Dropping the handle kills the agent.

use std::path::Path;
use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use nixmesh::api::{PeerView, SurveyRow};
use nixmesh::config::Config;

use super::agent_process::AgentProcess;
use super::host::Host;

/// Longest an agent may take to listen after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest an agent may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest an admin API question (`nixmesh peers`, `/metrics`) may take.
const ADMIN_TIMEOUT_SECS: &str = "10";
const POLL: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, Debug)]
enum Protocol {
    Tcp,
    Udp,
}

pub struct AgentHandle {
    process: AgentProcess,
    host: String,
    shell_pid: u32,
    config: Config,
}

impl AgentHandle {
    /// Writes `config_toml` to the host's dir and starts the agent on it.
    /// Unless the config names a `state_dir`, the agent gets the host's own
    /// (`<host dir>/nixmesh`), never the machine's `/var/lib/nixmesh`. Logs
    /// at `RUST_LOG` (default `info,nixmesh=debug`).
    pub(super) fn spawn(host: &Host, n: usize, config_toml: &str) -> AgentHandle {
        let names_state_dir = config_toml
            .parse::<toml::Table>()
            .is_ok_and(|t| t.contains_key("state_dir"));
        let text = if names_state_dir {
            config_toml.to_string()
        } else {
            let state_dir = host.dir().join("nixmesh");
            format!(
                "state_dir = {}\n{config_toml}",
                toml::Value::String(state_dir.display().to_string())
            )
        };
        // What the agent itself will make of it decides what to wait for;
        // a config it rejects is the agent's to report, in its log.
        let config = Config::parse("agent config", &text).unwrap_or_default();
        let process = AgentProcess::spawn(
            host.dir(),
            &format!("agent-{n}"),
            &text,
            Path::new(env!("CARGO_BIN_EXE_nixmesh")),
            |argv| host.command(argv),
        );
        AgentHandle {
            process,
            host: host.name().to_string(),
            shell_pid: host.shell_pid(),
            config,
        }
    }

    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// Everything the agent has logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The config file the agent runs with.
    pub fn config_path(&self) -> &Path {
        self.process.config_path()
    }

    /// The agent's process id on the machine.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.exited().is_none()
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the agent (`nsenter` execs
    /// the agent, so the child's pid is the agent's).
    pub fn signal(&self, signal: &str) {
        super::exec::checked(
            Command::new("kill").args([format!("-{signal}"), self.process.pid().to_string()]),
        );
    }

    /// The agent's peer table, as `nixmesh peers --json` prints it inside
    /// the host.
    pub fn peers(&self) -> Vec<PeerView> {
        let admin = self.config.admin.listen.to_string();
        let out = self.admin_command(&[
            env!("CARGO_BIN_EXE_nixmesh"),
            "peers",
            "--json",
            "--admin",
            &admin,
        ]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{}: `nixmesh peers --json` printed something else ({e}):\n{}",
                self.host,
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The peer called `name` in the agent's table, if listed.
    pub fn peer(&self, name: &str) -> Option<PeerView> {
        self.peers().into_iter().find(|p| p.name == name)
    }

    /// What `nixmesh why --json` says about `path`: each peer's answer.
    pub fn why(&self, path: &str) -> Vec<SurveyRow> {
        let admin = self.config.admin.listen.to_string();
        let out = self.admin_command(&[
            env!("CARGO_BIN_EXE_nixmesh"),
            "why",
            path,
            "--json",
            "--admin",
            &admin,
        ]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{}: `nixmesh why --json` printed something else ({e}):\n{}",
                self.host,
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The value of the unlabelled metric `name` on the agent's `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        self.metric_opt(name)
            .unwrap_or_else(|| panic!("{}: no metric {name} on /metrics", self.host))
    }

    /// The value of the unlabelled metric `name`, if the agent shows it.
    pub fn metric_opt(&self, name: &str) -> Option<f64> {
        let url = format!("http://{}/metrics", self.config.admin.listen);
        let out = self.admin_command(&["curl", "-sSf", "--max-time", ADMIN_TIMEOUT_SECS, &url]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok())?
        })
    }

    /// Runs `argv` in the agent's network namespace; panics unless it
    /// succeeds.
    fn admin_command(&self, argv: &[&str]) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.shell_pid.to_string(), "-n", "--"])
            .args(["timeout", ADMIN_TIMEOUT_SECS])
            .args(argv)
            .env("PATH", super::host::PATH)
            .env("RUST_LOG", "warn");
        super::exec::checked(&mut cmd)
    }

    /// Waits until the agent listens on every socket its config opens.
    pub fn wait_ready(&mut self) {
        let c = &self.config;
        let mut sockets = vec![(Protocol::Tcp, c.admin.listen.port())];
        if c.http_cache.enable {
            sockets.push((Protocol::Tcp, c.http_cache.listen.port()));
        }
        if c.mesh.enable {
            sockets.push((Protocol::Udp, c.mesh.listen.port()));
            if c.substituter.enable {
                sockets.push((Protocol::Tcp, c.substituter.listen.port()));
            }
        }
        for (protocol, port) in sockets {
            // Port 0 is any port: nothing to look for.
            if port != 0 {
                self.wait_listening(protocol, port);
            }
        }
    }

    /// Waits until something in the agent's host listens on `port`; panics
    /// with the agent's log if the agent exits or time runs out.
    fn wait_listening(&mut self, protocol: Protocol, port: u16) {
        let deadline = Instant::now() + START_TIMEOUT;
        let filter = format!("sport = :{port}");
        let ss_flags = match protocol {
            Protocol::Tcp => "-Hltn",
            Protocol::Udp => "-Hlun",
        };
        loop {
            if let Some(status) = self.process.exited() {
                panic!(
                    "{}: nixmesh agent exited ({status}) before listening on {protocol:?} port {port}:\n{}",
                    self.host,
                    self.log()
                );
            }
            let listening = Command::new("nsenter")
                .args(["-t", &self.shell_pid.to_string(), "-n"])
                .args(["ss", ss_flags, &filter])
                .output()
                .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
            if listening {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: nixmesh agent does not listen on {protocol:?} port {port} after {START_TIMEOUT:?}:\n{}",
                    self.host,
                    self.log()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGKILL: the agent gets no chance to clean up.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGTERM, then waits for the agent to exit; panics if it takes longer
    /// than ten seconds.
    pub fn stop(&mut self) -> ExitStatus {
        if let Some(status) = self.process.exited() {
            return status;
        }
        let pid = self.process.pid().to_string();
        let _ = Command::new("sh")
            .args(["-c", "kill -TERM \"$1\"", "kill", &pid])
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.process.exited() {
                Some(status) => return status,
                None if Instant::now() < deadline => std::thread::sleep(POLL),
                None => {
                    self.kill();
                    panic!(
                        "{}: nixmesh agent did not exit within {STOP_TIMEOUT:?} of SIGTERM:\n{}",
                        self.host,
                        self.log()
                    );
                }
            }
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.kill();
    }
}
