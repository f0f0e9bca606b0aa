//! The wires of the office LAN: one bridge, and per host a network namespace
//! joined to it by a veth pair. The machine takes no part: it has no address
//! on the bridge (IPv4 or IPv6) and the hosts have no route beyond their
//! subnet, so nothing a test does can reach any other network.

use std::net::Ipv4Addr;
use std::process::Command;

use super::exec::{self, ip};

/// The host's end of its veth, inside its namespace.
pub const HOST_IF: &str = "eth0";

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

fn no_ipv6_on_machine(link: &str) {
    let knob = format!("/proc/sys/net/ipv6/conf/{link}/disable_ipv6");
    if std::path::Path::new(&knob).exists() {
        std::fs::write(&knob, "1").unwrap_or_else(|e| panic!("cannot write {knob}: {e}"));
    }
}
