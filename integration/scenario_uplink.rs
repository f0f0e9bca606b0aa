//! The office behind a slow uplink: an upstream cache U (outside the mesh)
//! sits behind a shaped link, and every office host's Nix asks its agent
//! first and U second. The first host to need a closure pulls it over the
//! uplink (through the agent that owns each path's download); the others
//! get it from that host over the LAN, so the uplink carries the closure
//! once, not once per host.

use crate::harness::Lan;
use crate::office::*;

/// U's link: slow, like an office's share of a WAN.
const UPLINK_RATE: u64 = 40_000_000;
/// Bytes of the closure's big path.
const DEP_BYTES: u64 = 12 << 20;

#[test]
fn the_uplink_carries_a_closure_once_for_the_whole_office() {
    let lan = Lan::new(4);
    let (a, b, c, u) = (lan.host(0), lan.host(1), lan.host(2), lan.host(3));
    let upstream = u.generate_key("upstream-1");
    let top = u.build(&closure_expr("uplink", DEP_BYTES));
    let closure = u.closure(&top);
    let closure_bytes = closure_nar_size(u, &top);
    let _agent_u = u.start_agent(&upstream_config(u, &upstream.secret_file));
    u.shape(UPLINK_RATE);

    // Each office host: its agent first, the upstream second; trusting
    // U's key also makes each agent share what it got from U.
    let office = [a, b, c];
    let substituters = format!("{SUBSTITUTER} {}", cache_url(u));
    for host in office {
        host.configure_nix(&nix_conf(&substituters, &[&upstream.public]));
    }
    let agents: Vec<_> = office.iter().map(|h| h.start_agent("")).collect();
    let pairs: Vec<_> = office.iter().copied().zip(agents.iter()).collect();
    wait_all_alive(&pairs);

    let before = u.link_bytes();
    let started = std::time::Instant::now();
    realise(a, &[&top]);
    let a_took = started.elapsed();
    let after_a = u.link_bytes();
    let started = std::time::Instant::now();
    realise(b, &[&top]);
    realise(c, &[&top]);
    let bc_took = started.elapsed();
    let after_all = u.link_bytes();

    let first = after_a.sent - before.sent;
    let rest = after_all.sent - after_a.sent;
    let total = after_all.sent - before.sent;
    eprintln!(
        "uplink: closure of {} paths, {closure_bytes} NAR bytes; U sent {first} bytes for A \
         ({a_took:?}), {rest} bytes for B and C ({bc_took:?}), {total} in all \
         ({:.2} closures); U received {} bytes",
        closure.len(),
        total as f64 / closure_bytes as f64,
        after_all.received - before.received,
    );
    assert!(first >= closure_bytes, "A's closure did not come from U");
    assert!(
        total < closure_bytes + closure_bytes / 5,
        "the uplink carried {total} bytes for a closure of {closure_bytes}"
    );
    assert!(
        rest < 64 * 1024,
        "U sent {rest} bytes after A had the closure"
    );

    for host in office {
        for path in &closure {
            assert_verified(host, path);
        }
        let sigs = host.run_ok(&["nix", "path-info", "--sigs", &top]);
        assert!(sigs.contains("upstream-1:"), "{}: {sigs}", host.name());
    }
    // Each path crossed the uplink once, to the agent that owns its
    // download for the office (A's own, or another that passed it on). B
    // and C then got the closure over the LAN, or, for a path their agent
    // downloaded for A, from that agent's spool.
    let from_mesh = |agent: &crate::harness::AgentHandle| -> u64 {
        agent.peers().iter().map(|p| p.counters.bytes_fetched).sum()
    };
    let spooled = |agent: &crate::harness::AgentHandle| -> f64 {
        agent.metric("nixmesh_upstream_joins_total")
    };
    for (i, agent) in agents.iter().enumerate().skip(1) {
        assert!(
            from_mesh(agent) > 0 || spooled(agent) > 0.0,
            "h{i} got the closure neither over the LAN nor from its spool"
        );
    }
    let lan_bytes: u64 = agents.iter().map(from_mesh).sum();
    assert!(
        lan_bytes >= DEP_BYTES,
        "the LAN carried {lan_bytes} bytes: the closure did not go round the office"
    );
}
