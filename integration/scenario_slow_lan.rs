//! The mesh on a LAN whose every link is slow to cross (4 ms round trip,
//! as on a busy Wi-Fi): peers still find each other over mDNS, measure the
//! round trip, and Nix gets a closure held by two of them.

use std::time::Duration;

use crate::harness::Lan;
use crate::office::*;

const ONE_WAY: Duration = Duration::from_millis(2);

#[test]
fn the_mesh_works_across_a_lan_with_a_4_ms_round_trip() {
    let lan = Lan::new(3);
    let (a, b, c) = (lan.host(0), lan.host(1), lan.host(2));
    let office = a.generate_key("office-1");
    let top = c.build(&closure_expr("slow", 256 * 1024));
    a.configure_nix(&nix_conf("", &[&office.public]));
    let file = a.add_file("note.txt", format!("{} note\n", lan.name()).as_bytes());
    a.sign(&[&file], &office.secret_file);
    b.configure_nix(&nix_conf(SUBSTITUTER, &[&office.public]));

    let _switch = lan.delay(ONE_WAY);
    let agent_a = a.start_agent("");
    let agent_b = b.start_agent("");
    let agent_c = c.start_agent(&signing(&office.secret_file));
    wait_all_alive(&[(a, &agent_a), (b, &agent_b), (c, &agent_c)]);

    // The delay is real: B's agent measures it on both peers.
    for name in ["h0", "h2"] {
        let rtt = agent_b.peer(name).and_then(|p| p.rtt_ms);
        assert!(
            rtt.is_some_and(|ms| (4.0..20.0).contains(&ms)),
            "{name}: rtt {rtt:?}"
        );
    }
    realise(b, &[&file, &top]);
    for path in c.closure(&top).iter().chain([&file]) {
        assert_verified(b, path);
    }
}
