//! A `nixmesh agent` process as the tests and the LAN harness both start
//! it: its config written to a file, its output to a log file beside it,
//! `RUST_LOG` at debug for nixmesh unless the run sets one, killed when
//! dropped. Where and how it runs (on the machine, behind `setpriv`, inside
//! a LAN host) is the caller's `launch`; when it counts as ready, too.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};

pub struct AgentProcess {
    child: Child,
    config_path: PathBuf,
    log_path: PathBuf,
}

impl AgentProcess {
    /// Writes `config_toml` to `<dir>/<name>.toml` and starts
    /// `launch(["<nixmesh>", "agent", "--config", "<that file>"])`, logging
    /// to `<dir>/<name>.log`.
    pub fn spawn(
        dir: &Path,
        name: &str,
        config_toml: &str,
        binary: &Path,
        launch: impl FnOnce(&[&str]) -> Command,
    ) -> Self {
        let config_path = dir.join(format!("{name}.toml"));
        let log_path = dir.join(format!("{name}.log"));
        fs::write(&config_path, config_toml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
        let log = fs::File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let binary = binary.display().to_string();
        let config_arg = config_path.display().to_string();
        let mut cmd = launch(&[&binary, "agent", "--config", &config_arg]);
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info,nixmesh=debug".into()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log file handle"))
        .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nixmesh agent ({cmd:?}): {e}"));
        Self {
            child,
            config_path,
            log_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the agent has logged so far.
    pub fn log(&self) -> String {
        match fs::read(&self.log_path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("(cannot read {}: {e})", self.log_path.display()),
        }
    }

    /// How it exited, if it has.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
