//! Running machine commands for the harness, and saying exactly what went
//! wrong when one fails. Also what the harness needs to know about a process
//! it did not start: whether it is still the same, live process.

use std::fmt::Write as _;
use std::process::{Command, Output};

/// Runs `cmd` to completion; panics with its command line, status and
/// output when it cannot start or fails.
pub fn checked(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)));
    if !out.status.success() {
        panic!("{}", failure(cmd, &out));
    }
    out
}

/// `ip ARGS…` on the machine (not inside a host).
pub fn ip(args: &[&str]) {
    checked(Command::new("ip").args(args));
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.contains([' ', '\'', '"']) || a.is_empty() {
            let _ = write!(s, " '{}'", a.replace('\'', r"'\''"));
        } else {
            let _ = write!(s, " {a}");
        }
    }
    s
}

pub fn failure(cmd: &Command, out: &Output) -> String {
    format!(
        "{} failed ({})\n--- stdout ---\n{}--- stderr ---\n{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    )
}

/// A process as the harness records it: a pid alone can be reused, a pid
/// with its start time cannot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcessId {
    /// `None` when `pid` is gone or a zombie.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state …`: comm may hold spaces and parentheses.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        if fields.first() == Some(&"Z") {
            return None;
        }
        // Field 22 of proc(5); `fields` starts at field 3.
        let start_time = fields.get(22 - 3)?.parse().ok()?;
        Some(Self { pid, start_time })
    }

    pub fn is_alive(&self) -> bool {
        Self::of(self.pid) == Some(*self)
    }

    pub fn to_line(self) -> String {
        format!("{} {}", self.pid, self.start_time)
    }

    pub fn parse_line(line: &str) -> Option<Self> {
        let (pid, start) = line.trim().split_once(' ')?;
        Some(Self {
            pid: pid.parse().ok()?,
            start_time: start.parse().ok()?,
        })
    }
}
