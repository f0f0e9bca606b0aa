//! Jumbo frames: on a LAN whose links carry 9000-byte frames, the agents'
//! QUIC connections find that by MTU discovery and send packets of up to
//! 6548 bytes (each packet costs both agents about the same CPU whatever
//! its size; `mesh::transport` says why not 8952); on an Ethernet LAN
//! (1500) they stay at 1452 bytes. The same
//! two hosts, first at 1500, then with every link at 9000 and the agents
//! restarted; each time Nix on C substitutes a path only H holds, and the
//! packet sizes are what `nixmesh peers --json` shows. The agents stay at
//! protocol version 4, so that the NAR comes over QUIC (from version 5 a
//! NAR this large comes over TCP: `scenario_bulk`).

use crate::harness::{wait_until, Lan};
use crate::office::*;

const SIZE: u64 = 16 << 20;

#[test]
fn agents_send_jumbo_packets_on_a_jumbo_lan_and_ethernet_sized_ones_otherwise() {
    let lan = Lan::new(2);
    let (client, holder) = (lan.host(0), lan.host(1));
    let office = client.generate_key("office-1");
    let files = holder.dir().join("files");
    let paths = add_paths(
        holder,
        &[
            random_file(&files, "ethernet.bin", SIZE),
            random_file(&files, "jumbo.bin", SIZE),
        ],
    );
    holder.configure_nix(&nix_conf("", &[&office.public]));
    holder.sign(&[&paths[0], &paths[1]], &office.secret_file);
    client.configure_nix(&nix_conf(SUBSTITUTER, &[&office.public]));

    let mut payloads = Vec::new();
    for (path, mtu) in paths.iter().zip([1500, 9000]) {
        if mtu != 1500 {
            lan.set_mtu(mtu);
        }
        let quic_only = "[mesh]\nmax_protocol = 4\n";
        let mut agent_h = holder.start_agent(quic_only);
        let mut agent_c = client.start_agent(quic_only);
        wait_all_alive(&[(client, &agent_c), (holder, &agent_h)]);
        realise(client, &[path]);
        assert_verified(client, path);
        let fetched = agent_c.peer("h1").map_or(0, |p| p.counters.bytes_fetched);
        assert!(fetched >= SIZE, "C fetched {fetched} bytes from H");
        // MTU discovery runs after the handshake; by now it is long over.
        // C's connection to H: the packets C sends, and the average size
        // of those H sent (the NAR, almost all of it).
        let mut sizes = (None, None);
        wait_until(
            std::time::Duration::from_secs(10),
            "C reports the packet sizes of its connection to H",
            || {
                let view = agent_c.peer("h1");
                sizes = (
                    view.as_ref().and_then(|p| p.udp_payload),
                    view.as_ref().and_then(|p| p.udp_payload_received),
                );
                sizes.0.is_some() && sizes.1.is_some()
            },
        );
        eprintln!(
            "MTU {mtu}: UDP payload C to H {:?}, average from H {:?}",
            sizes.0, sizes.1
        );
        payloads.push((mtu, sizes));
        agent_c.stop();
        agent_h.stop();
    }
    let [(_, ethernet), (_, jumbo)] = payloads[..] else {
        panic!("two runs: {payloads:?}");
    };
    assert_eq!(ethernet.0, Some(1452), "Ethernet-sized packets");
    let received = ethernet.1.unwrap_or(0);
    assert!(
        (1300..=1452).contains(&received),
        "Ethernet-sized packets from H: {ethernet:?}"
    );
    assert!(
        (6500..=6548).contains(&jumbo.0.unwrap_or(0)),
        "jumbo packets from C on a 9000 MTU LAN: {jumbo:?}"
    );
    // The NAR's packets, less the few small ones before discovery ended
    // and the acknowledgements.
    assert!(
        jumbo.1.unwrap_or(0) >= 5000,
        "jumbo packets from H on a 9000 MTU LAN: {jumbo:?}"
    );
}
