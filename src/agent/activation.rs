//! systemd socket activation: listening sockets the agent inherits instead
//! of binding, so Nix never meets a refused connection while the agent
//! restarts (the socket, and its queue of waiting clients, outlive the
//! process). Implements the `LISTEN_PID` / `LISTEN_FDS` / `LISTEN_FDNAMES`
//! protocol; parsing is pure, taking ownership of the fds is the edge.

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The first inherited fd, by the protocol.
const FIRST_FD: RawFd = 3;
/// More inherited sockets than this is a misconfiguration; ignore them all.
const MAX_FDS: usize = 16;

/// Which inherited fd carries which listener, by name
/// (`FileDescriptorName=` in the socket unit: `substituter`, `admin`,
/// `http_cache`). An unnamed single socket is the substituter's.
pub fn parse(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    fd_names: Option<&str>,
    own_pid: u32,
) -> HashMap<String, RawFd> {
    let mut out = HashMap::new();
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else {
        return out;
    };
    if pid.trim().parse::<u32>().ok() != Some(own_pid) {
        return out;
    }
    let Ok(n) = fds.trim().parse::<usize>() else {
        return out;
    };
    if n == 0 || n > MAX_FDS {
        return out;
    }
    let names: Vec<&str> = fd_names.map(|s| s.split(':').collect()).unwrap_or_default();
    for i in 0..n {
        let name = match names.get(i) {
            Some(name) if !name.is_empty() && *name != "unknown" => name.to_string(),
            _ if n == 1 => "substituter".to_string(),
            _ => continue,
        };
        out.insert(name, FIRST_FD + i as RawFd);
    }
    out
}

/// Set once the inherited fds have been taken.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The inherited listeners of this process, by name, owned: they close
/// when dropped. Only the first call takes them; a later call gets none
/// (so no fd is ever owned twice). The environment variables are removed
/// so child processes do not inherit them.
pub fn inherited() -> HashMap<String, OwnedFd> {
    if TAKEN.swap(true, Ordering::SeqCst) {
        return HashMap::new();
    }
    let get = |k: &str| std::env::var(k).ok();
    let found = parse(
        get("LISTEN_PID").as_deref(),
        get("LISTEN_FDS").as_deref(),
        get("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    );
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    found
        .into_iter()
        .map(|(name, fd)| {
            // SAFETY: the service manager handed `fd` to this process under
            // the LISTEN_FDS protocol (`parse` checked LISTEN_PID is ours);
            // TAKEN makes this the only place that ever owns it.
            #[allow(unsafe_code)]
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            (name, owned)
        })
        .collect()
}

/// Takes an inherited socket as a TCP listener.
pub fn tcp_listener(fd: OwnedFd) -> std::io::Result<tokio::net::TcpListener> {
    let std_listener = std::net::TcpListener::from(fd);
    // A non-socket or non-listening fd fails here rather than later.
    std_listener.local_addr()?;
    std_listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(std_listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_sockets_map_to_fds() {
        let m = parse(Some("42"), Some("2"), Some("admin:substituter"), 42);
        assert_eq!(m.get("admin"), Some(&3));
        assert_eq!(m.get("substituter"), Some(&4));
    }

    #[test]
    fn one_unnamed_socket_is_the_substituter() {
        let m = parse(Some("7"), Some("1"), None, 7);
        assert_eq!(m.get("substituter"), Some(&3));
    }

    #[test]
    fn other_processes_and_garbage_are_ignored() {
        assert!(parse(Some("8"), Some("1"), None, 7).is_empty());
        assert!(parse(None, Some("1"), None, 7).is_empty());
        assert!(parse(Some("7"), Some("x"), None, 7).is_empty());
        assert!(parse(Some("7"), Some("0"), None, 7).is_empty());
        assert!(parse(Some("7"), Some("999"), None, 7).is_empty());
        assert!(
            parse(Some("7"), Some("2"), None, 7).is_empty(),
            "two unnamed"
        );
    }

    #[test]
    fn inherited_fds_are_taken_once() {
        // Whatever this process inherited (nothing, in a test), a second
        // call can never hand out the same fds again.
        let _first = inherited();
        std::env::set_var("LISTEN_PID", std::process::id().to_string());
        std::env::set_var("LISTEN_FDS", "1");
        assert!(inherited().is_empty());
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
    }
}
