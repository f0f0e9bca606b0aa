//! A standard mDNS browser sees an agent: Avahi (the Linux desktop's mDNS
//! stack) on one host lists the agent on another as `_nixmesh._udp` with
//! the TXT record docs/protocol.md describes. So the announcements are
//! plain DNS-SD, readable by any tool an administrator already has.

use std::time::Duration;

use nixmesh::mesh::discovery::txt::instance_name;
use nixmesh::mesh::identity::NodeId;

use crate::harness::{wait_until, Host, Lan};

/// Gives `host` a private `/run` and starts a system D-Bus and
/// avahi-daemon there (both live in the host's namespaces, so the Lan's
/// cleanup ends them).
pub(crate) fn start_avahi(host: &Host) {
    for (tool, package) in [
        ("avahi-daemon", "avahi-daemon"),
        ("avahi-browse", "avahi-utils"),
        ("dbus-daemon", "dbus-daemon"),
    ] {
        let found = host.run(&["sh", "-c", &format!("command -v {tool}")]);
        assert!(
            found.status.success(),
            "`{tool}` is not on PATH (Debian package {package})"
        );
    }
    let run = host.dir().join("run");
    std::fs::create_dir_all(&run).expect("mkdir run");
    let script = format!(
        "set -e
         mount --bind '{}' /run
         mkdir -p /run/dbus /run/avahi-daemon
         dbus-daemon --system --fork
         avahi-daemon --no-chroot --no-drop-root --no-rlimits -D",
        run.display()
    );
    host.run_ok(&["sh", "-c", &script]);
}

/// One resolved record of `avahi-browse -rtp`: `=;iface;proto;instance;
/// type;domain;host;address;port;"txt" "txt" …`.
struct Resolved {
    line: String,
    iface: String,
    protocol: String,
    instance: String,
    address: String,
    port: String,
    txt: Vec<String>,
}

fn browse(host: &Host) -> Vec<Resolved> {
    let out = host.run(&["avahi-browse", "-rtp", "_nixmesh._udp"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.splitn(10, ';').collect();
            if fields.len() < 10 || fields[0] != "=" {
                return None;
            }
            Some(Resolved {
                line: line.to_string(),
                iface: fields[1].to_string(),
                protocol: fields[2].to_string(),
                instance: fields[3].to_string(),
                address: fields[7].to_string(),
                port: fields[8].to_string(),
                txt: fields[9]
                    .split("\" \"")
                    .map(|t| t.trim_matches('"').to_string())
                    .collect(),
            })
        })
        .collect()
}

#[test]
fn avahi_browse_lists_the_agent_with_its_txt_record() {
    let lan = Lan::new(2);
    let (a, w) = (lan.host(0), lan.host(1));
    let key = a.node_key();
    let node = NodeId::parse(&key).expect("a node key");
    let _agent = a.start_agent("[mesh]\nname = \"front-desk\"\n");
    start_avahi(w);

    let mut found = None;
    wait_until(
        Duration::from_secs(20),
        "avahi-browse to list the agent",
        || {
            found = browse(w)
                .into_iter()
                .find(|r| r.protocol == "IPv4" && r.address == a.addr().to_string());
            found.is_some()
        },
    );
    let record = found.expect("found");
    eprintln!("avahi-browse on {}: {}", w.name(), record.line);
    assert_eq!(record.iface, "eth0");
    assert_eq!(record.instance, instance_name(&node.0));
    assert_eq!(record.port, "5182");
    let mut txt = record.txt.clone();
    txt.sort();
    assert_eq!(
        txt,
        [
            format!("key={}", node.to_base64()),
            "mesh=open".to_string(),
            "name=front-desk".to_string(),
            "port=5182".to_string(),
            "v=1".to_string(),
        ],
        "TXT record of {}",
        record.instance
    );
}
