//! What /proc says about the agents: their pids, CPU time, peak memory,
//! and the machine's load.

use super::*;

pub(crate) fn agent_pid(agent: &AgentHandle) -> u32 {
    let config = agent.log_path().with_extension("toml");
    let config = config.display().to_string();
    let procs = fs::read_dir("/proc").expect("/proc");
    let mut found = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_agent = args.contains(&b"agent".as_slice())
            && args.contains(&config.as_bytes())
            && args.first().is_some_and(|a| a.ends_with(b"nixmesh"));
        if is_agent {
            found.push(pid);
        }
    }
    match found[..] {
        [pid] => pid,
        _ => panic!("expected one agent process with {config}, found {found:?}"),
    }
}

/// Lowers every thread of `pid` to niceness `n` (threads it starts later
/// inherit it from the thread that starts them).
pub(crate) fn renice_threads(pid: u32, n: u32) {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task");
    for task in tasks.flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let out = std::process::Command::new("renice")
            .args(["-n", &n.to_string(), "-p", &tid])
            .output()
            .expect("renice");
        assert!(out.status.success(), "renice {tid}: {out:?}");
    }
}

pub(crate) fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        let tasks = fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten();
        for task in tasks {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            all.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    all
}

/// Clock ticks per second, the unit of /proc's CPU times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64
}

pub(crate) fn cpu_secs(pids: &[u32]) -> f64 {
    let ticks = clock_ticks();
    pids.iter()
        .map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
            // Fields 14 and 15 of proc(5), after `pid (comm) `.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            let field = |n: usize| -> f64 {
                fields
                    .get(n - 3)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("/proc/{pid}/stat: no field {n}: {stat}"))
            };
            (field(14) + field(15)) / ticks
        })
        .sum()
}

pub(crate) fn vm_hwm(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM for {pid}:\n{status}"))
}

pub(crate) fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// CPU seconds the whole machine has spent busy since boot (user, nice,
/// system, irq and softirq of `/proc/stat`'s `cpu` line; not idle, iowait,
/// nor steal, which is the hypervisor's time for others): what a
/// measurement costs all processes together, Nix's daemon and its
/// children included.
pub(crate) fn machine_busy_secs() -> f64 {
    let ticks = clock_ticks();
    let stat = fs::read_to_string("/proc/stat").unwrap_or_else(|e| panic!("/proc/stat: {e}"));
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .unwrap_or_else(|| panic!("/proc/stat has no cpu line:\n{stat}"));
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or_else(|_| panic!("/proc/stat: {line}")))
        .collect();
    // user nice system idle iowait irq softirq (guest time is already
    // inside user).
    let busy: f64 = fields.iter().take(7).sum::<f64>() - fields[3] - fields[4];
    busy / ticks
}
