//! The wires of the office LAN: one bridge, and per host a network namespace
//! joined to it by a veth pair. The machine takes no part: it has no address
//! on the bridge (IPv4 or IPv6) and the hosts have no route beyond their
//! subnet, so nothing a test does can reach any other network.

use std::net::Ipv4Addr;
use std::process::Command;

use super::exec::{self, ip};

/// The host's end of its veth, inside its namespace.
pub const HOST_IF: &str = "eth0";

/// The machine's ARP table is one for all network namespaces: its limits
/// (`gc_thresh1..3`, by default 128 / 512 / 1024 entries) count the
/// entries of every host of every Lan together. A LAN of `n` hosts that all
/// talk to each other needs about `n * (n - 1)` of them; past the hard
/// limit the kernel drops packets to new neighbours ("neighbor table
/// overflow"), which real machines, each with its own table, never see.
/// Raises the limits (never lowers them) to fit `n_hosts`, with room for a
/// few Lans at once.
pub fn make_room_for_neighbours(n_hosts: usize) {
    let needed = (n_hosts * n_hosts.saturating_sub(1) * 4).max(1024);
    for (knob, value) in [
        ("gc_thresh1", needed / 4),
        ("gc_thresh2", needed / 2),
        ("gc_thresh3", needed),
    ] {
        let path = format!("/proc/sys/net/ipv4/neigh/default/{knob}");
        let now: usize = std::fs::read_to_string(&path)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if now < value {
            std::fs::write(&path, value.to_string())
                .unwrap_or_else(|e| panic!("cannot raise {path} to {value}: {e}"));
        }
    }
}

pub fn create_bridge(bridge: &str) {
    // No snooping, so multicast (mDNS) reaches every port without IGMP; no
    // netfilter, so the machine's firewall rules never see LAN traffic.
    ip(&[
        "link",
        "add",
        bridge,
        "type",
        "bridge",
        "mcast_snooping",
        "0",
        "nf_call_iptables",
        "0",
        "nf_call_ip6tables",
        "0",
        "nf_call_arptables",
        "0",
    ]);
    no_ipv6_on_machine(bridge);
    ip(&["link", "set", bridge, "up"]);
}

/// Makes `netns`, wired to `bridge` through `veth` (machine end) and
/// `eth0` (host end) with `addr/prefix_len`, loopback up, and the multicast
/// route mDNS needs.
pub fn attach_host(bridge: &str, netns: &str, veth: &str, addr: Ipv4Addr, prefix_len: u8) {
    ip(&["netns", "add", netns]);
    ip(&[
        "link", "add", veth, "type", "veth", "peer", "name", HOST_IF, "netns", netns,
    ]);
    no_ipv6_on_machine(veth);
    ip(&["link", "set", veth, "master", bridge]);
    ip(&["link", "set", veth, "up"]);
    // Link-local IPv6 inside the LAN is usable at once, without waiting for
    // duplicate address detection. Not fatal where IPv6 is off.
    let _ = Command::new("ip")
        .args(["netns", "exec", netns, "sh", "-c"])
        .arg(format!(
            "echo 0 > /proc/sys/net/ipv6/conf/{HOST_IF}/accept_dad"
        ))
        .output();
    let cidr = format!("{addr}/{prefix_len}");
    ip(&["-n", netns, "addr", "add", &cidr, "dev", HOST_IF]);
    ip(&["-n", netns, "link", "set", "lo", "up"]);
    ip(&["-n", netns, "link", "set", HOST_IF, "up"]);
    ip(&["-n", netns, "route", "add", "224.0.0.0/4", "dev", HOST_IF]);
}

/// Sets the MTU of `veth` (machine end) and of `netns`'s `eth0`: jumbo
/// frames (9000) for a LAN that has them.
pub fn set_host_mtu(netns: &str, veth: &str, mtu: u32) {
    let mtu = mtu.to_string();
    ip(&["link", "set", veth, "mtu", &mtu]);
    ip(&["-n", netns, "link", "set", HOST_IF, "mtu", &mtu]);
}

pub fn set_bridge_mtu(bridge: &str, mtu: u32) {
    ip(&["link", "set", bridge, "mtu", &mtu.to_string()]);
}

/// Limits the host's link to `bits_per_sec` each way: egress of `eth0` is
/// what the host sends, egress of the machine end what it receives.
pub fn shape(netns: &str, veth: &str, bits_per_sec: u64) {
    assert!(
        bits_per_sec >= 8_000,
        "rate {bits_per_sec} bit/s is too low"
    );
    let rate = format!("{bits_per_sec}bit");
    // tbf needs a bucket of at least one timer tick's worth of bytes.
    let burst = (bits_per_sec / 8 / 100).max(16 * 1024).to_string();
    let tbf = [
        "root", "tbf", "rate", &rate, "burst", &burst, "latency", "50ms",
    ];
    let tc = |prefix: &[&str], dev: &str| {
        exec::checked(
            Command::new("tc")
                .args(prefix)
                .args(["qdisc", "replace", "dev", dev])
                .args(tbf),
        );
    };
    tc(&["-n", netns], HOST_IF);
    tc(&[], veth);
}

/// Drops `per_mille` of the frames that arrive at `netns`'s `eth0`, each
/// on its own draw (nftables, at the device's ingress, before anything in
/// the host sees them); 0 removes the rule. The kernel here has no
/// `netem`, but nftables' random number generator does this job.
pub fn lose_frames(netns: &str, per_mille: u32) {
    assert!(per_mille <= 1000, "{per_mille} per mille is not a share");
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "nft",
            "delete",
            "table",
            "netdev",
            "nixmesh_loss",
        ])
        .output();
    if per_mille == 0 {
        return;
    }
    // nftables' comparison takes 0..999: all of them is a plain drop.
    let rule = if per_mille == 1000 {
        "drop".to_string()
    } else {
        format!("numgen random mod 1000 < {per_mille} drop")
    };
    let rules = format!(
        "table netdev nixmesh_loss {{\n\
           chain ingress {{\n\
             type filter hook ingress device {HOST_IF} priority 0; policy accept;\n\
             {rule}\n\
           }}\n\
         }}\n"
    );
    let mut nft = Command::new("ip");
    nft.args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = nft
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run nft in {netns} (Debian package nftables): {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write as _;
        stdin
            .write_all(rules.as_bytes())
            .unwrap_or_else(|e| panic!("nft in {netns}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("nft in {netns}: {e}"));
    if !out.status.success() {
        panic!("{}", exec::failure(&nft, &out));
    }
}

fn no_ipv6_on_machine(link: &str) {
    let knob = format!("/proc/sys/net/ipv6/conf/{link}/disable_ipv6");
    if std::path::Path::new(&knob).exists() {
        std::fs::write(&knob, "1").unwrap_or_else(|e| panic!("cannot write {knob}: {e}"));
    }
}
