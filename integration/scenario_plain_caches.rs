//! Caches an office already runs, beside the agents: host S serves its
//! store over HTTP only (the agent's `[http_cache]` with the mesh off, as
//! nix-serve would) and announces it as `_nix-serve._tcp` with
//! avahi-publish; host N serves a `nix copy --to file://` cache with nginx,
//! listed in the client's `mesh.plain_caches`; host H runs an agent and
//! holds a path S holds too; host L serves a cache whose file was tampered
//! with. Client C's Nix lists only its agent. C gets paths from S and from
//! N, from whichever of S and H answers first when both hold one, and
//! never a path from L; a cache of another store dir and an mDNS record
//! pointing off the LAN are listed in `nixmesh peers` and never used.

use std::process::{Child, Stdio};
use std::time::Duration;

use crate::harness::{wait_until, AgentHandle, Host, Lan, Nginx};
use crate::office::*;
use crate::scenario_avahi::start_avahi;

const NGINX_PORT: u16 = 8080;

/// `nix copy --to file://…?compression=xz` of `paths` from `host` into
/// `dir` under its host directory; returns the directory.
fn export(host: &Host, paths: &[&str], dir: &str) -> std::path::PathBuf {
    let export = host.dir().join(dir);
    let to = format!("file://{}?compression=xz", export.display());
    let mut argv = vec!["nix", "copy", "--to", &to];
    argv.extend_from_slice(paths);
    host.run_ok(&argv);
    export
}

/// Runs `argv` on `host` in the background until killed.
fn background(host: &Host, argv: &[&str]) -> Child {
    host.command(argv)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: cannot start {argv:?}: {e}", host.name()))
}

/// The plain cache C's agent lists at `url`, if any.
fn plain(agent: &AgentHandle, url: &str) -> Option<nixmesh::api::PeerView> {
    agent
        .peers()
        .into_iter()
        .find(|p| p.plain_cache.is_some() && p.addrs.first().map(String::as_str) == Some(url))
}

fn plain_named(agent: &AgentHandle, part: &str) -> Option<nixmesh::api::PeerView> {
    agent
        .peers()
        .into_iter()
        .find(|p| p.plain_cache.is_some() && p.name.contains(part))
}

fn fetched_from(agent: &AgentHandle, name: &str) -> u64 {
    agent.peer(name).map_or(0, |p| p.counters.bytes_fetched)
}

#[test]
fn plain_caches_found_by_mdns_or_listed_serve_beside_the_agents_and_a_liar_gets_nothing_in() {
    let lan = Lan::new(5);
    let (c, s, n, h, l) = (
        lan.host(0),
        lan.host(1),
        lan.host(2),
        lan.host(3),
        lan.host(4),
    );
    let key = s.generate_key("office-1");
    let sign = |host: &Host, top: &str| {
        let closure = host.closure(top);
        let refs: Vec<&str> = closure.iter().map(String::as_str).collect();
        host.sign(&refs, &key.secret_file);
    };

    // S: x (H builds the same), x2 and x3 (only S); N: y; L: z, tampered.
    let x = s.build(&closure_expr("plain-x", 1 << 20));
    let x2 = s.build(&closure_expr("plain-x2", 1 << 20));
    let x3 = s.build(&closure_expr("plain-x3", (1 << 20) + 3));
    for top in [&x, &x2, &x3] {
        sign(s, top);
    }
    assert_eq!(h.build(&closure_expr("plain-x", 1 << 20)), x);
    assert_eq!(h.build(&closure_expr("plain-x3", (1 << 20) + 3)), x3);
    for top in [&x, &x3] {
        sign(h, top);
    }
    let y = n.build(&closure_expr("plain-y", 1 << 20));
    sign(n, &y);
    let _nginx_n = Nginx::start(n, &export(n, &[&y], "export-y"), NGINX_PORT);
    // Another store dir's cache, on N too.
    let other = n.dir().join("other-store");
    std::fs::create_dir_all(&other).expect("mkdir");
    std::fs::write(other.join("nix-cache-info"), "StoreDir: /other/store\n").expect("write");
    let _nginx_other = Nginx::start(n, &other, NGINX_PORT + 1);
    let z = l.build(&closure_expr("plain-z", (1 << 20) + 7));
    sign(l, &z);
    let l_export = export(l, &[&z], "export-z");
    let z_dep = l
        .closure(&z)
        .into_iter()
        .find(|p| p.ends_with("-dep"))
        .expect("dep");
    let narinfo = std::fs::read_to_string(l_export.join(format!("{}.narinfo", hash_part(&z_dep))))
        .expect("narinfo");
    let file = l_export.join(
        narinfo
            .lines()
            .find_map(|x| x.strip_prefix("URL: "))
            .expect("URL"),
    );
    let mut bytes = std::fs::read(&file).expect("file");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&file, &bytes).expect("write");
    let _nginx_l = Nginx::start(l, &l_export, NGINX_PORT);

    // S: no mesh, its store over HTTP, announced as nix-serve is.
    let agent_s = s.start_agent(&format!(
        "[share]\nall = true\n[mesh]\nenable = false\n[http_cache]\nenable = true\nlisten = \"{}:{CACHE_PORT}\"\n",
        s.addr()
    ));
    start_avahi(s);
    let port = CACHE_PORT.to_string();
    let mut publish = background(
        s,
        &[
            "avahi-publish",
            "-s",
            "nix-serve-s",
            "_nix-serve._tcp",
            &port,
        ],
    );
    // A record for a cache off the LAN (an address this LAN has no route to).
    let mut off_lan_addr = background(s, &["avahi-publish", "-a", "-R", "far.local", "192.0.2.7"]);
    let mut off_lan = background(
        s,
        &[
            "avahi-publish",
            "-s",
            "-H",
            "far.local",
            "far-cache",
            "_nix-serve._tcp",
            "80",
        ],
    );
    let mut agent_h = h.start_agent("[share]\nall = true\n");

    let n_url = format!("http://{}:{NGINX_PORT}", n.addr());
    let other_url = format!("http://{}:{}", n.addr(), NGINX_PORT + 1);
    let l_url = format!("http://{}:{NGINX_PORT}", l.addr());
    let s_url = format!("http://{}:{CACHE_PORT}", s.addr());
    c.configure_nix(&nix_conf(SUBSTITUTER, &[&key.public]));
    // A cache that fails is skipped for 8 s here (30 s by default).
    let agent_c = c.start_agent(&format!(
        "[mesh]\nplain_caches = [\"{n_url}\", \"{other_url}\", \"{l_url}\"]\n[upstream]\nskip_ms = 8000\n"
    ));
    let ready = |url: &str| {
        plain(&agent_c, url).is_some_and(|p| p.state == nixmesh::mesh::peers::PeerState::Alive)
    };
    wait_until(
        Duration::from_secs(30),
        "C to find S by mDNS and N, L ready, H alive",
        || ready(&n_url) && ready(&l_url) && ready(&s_url) && sees_alive(&agent_c, h.name()),
    );
    let shown = agent_c.peers();
    eprintln!("C's peers: {shown:#?}");
    let other_cache = plain(&agent_c, &other_url).expect("the other store's cache is listed");
    assert!(
        other_cache
            .plain_cache
            .as_deref()
            .unwrap_or("")
            .contains("/other/store"),
        "{other_cache:?}"
    );
    wait_until(
        Duration::from_secs(20),
        "the off-LAN record to be listed",
        || plain_named(&agent_c, "far-cache").is_some(),
    );
    let far = plain_named(&agent_c, "far-cache").expect("listed");
    assert_ne!(far.state, nixmesh::mesh::peers::PeerState::Alive, "{far:?}");
    assert!(
        far.plain_cache
            .as_deref()
            .unwrap_or("")
            .contains("192.0.2.7"),
        "{far:?}"
    );

    // From S (found by mDNS) and from N (listed): verified, and the bytes
    // came from those caches.
    realise(c, &[&x2]);
    realise(c, &[&y]);
    for path in c.closure(&x2).iter().chain(c.closure(&y).iter()) {
        assert_verified(c, path);
    }
    assert!(plain(&agent_c, &s_url).expect("S").counters.bytes_fetched > 0);
    assert!(plain(&agent_c, &n_url).expect("N").counters.bytes_fetched > 0);
    let rows = agent_c.why(&y);
    assert!(
        rows.iter()
            .any(|r| r.name.contains(&n_url) && r.answer == nixmesh::api::SurveyAnswer::Has),
        "{rows:#?}"
    );

    // x is on S and on H: with S's server frozen, H answers first and
    // serves it; with H frozen, S does (x3).
    let s_before = plain(&agent_c, &s_url).expect("S").counters.bytes_fetched;
    let h_before = fetched_from(&agent_c, h.name());
    agent_s.signal("STOP");
    let started = std::time::Instant::now();
    realise(c, &[&x]);
    eprintln!("x realised from H in {:?} with S frozen", started.elapsed());
    assert_verified(c, &x);
    assert!(fetched_from(&agent_c, h.name()) > h_before, "H served x");
    assert_eq!(
        plain(&agent_c, &s_url).expect("S").counters.bytes_fetched,
        s_before
    );
    // The frozen cache's questions time out (upstream.timeout_ms) and it is
    // skipped: later races do not wait for it.
    wait_until(
        Duration::from_secs(15),
        "the frozen plain cache to be skipped",
        || plain(&agent_c, &s_url).is_some_and(|p| p.quarantined),
    );
    let (status, miss) = c.http_status(&format!("{SUBSTITUTER}/{}.narinfo", "0".repeat(32)));
    assert_eq!(status, 404);
    assert!(
        miss < Duration::from_millis(300),
        "a miss took {miss:?} with S skipped"
    );
    agent_s.signal("CONT");
    wait_until(Duration::from_secs(20), "S to be used again", || {
        plain(&agent_c, &s_url).is_some_and(|p| !p.quarantined)
    });
    agent_h.signal("STOP");
    realise(c, &[&x3]);
    agent_h.signal("CONT");
    assert_verified(c, &x3);
    assert!(
        plain(&agent_c, &s_url).expect("S").counters.bytes_fetched > s_before,
        "S served x3"
    );

    // L's file was tampered with: Nix never gets z, and L is skipped.
    let _ = realise_fails(c, &[&z]);
    for path in l.closure(&z) {
        assert_absent_or_intact(c, &path);
    }
    assert!(!c.has_path(&z_dep), "the tampered path became valid");
    let liar = plain(&agent_c, &l_url).expect("L");
    assert!(liar.counters.errors >= 1 && liar.quarantined, "{liar:?}");
    let metrics = agent_c.metric("nixmesh_plain_cache_hits_total");
    assert!(metrics >= 3.0, "{metrics}");

    for child in [&mut publish, &mut off_lan_addr, &mut off_lan] {
        let _ = child.kill();
        let _ = child.wait();
    }
    agent_h.stop();
}

/// Two plain caches with the same file: N, whose narinfo the agent gave
/// Nix, stops answering in the middle of things; Nix's next try of the
/// file gets it from M (same FileHash), and the path arrives intact.
#[test]
fn a_plain_cache_that_hangs_is_replaced_by_another_with_the_same_file() {
    let lan = Lan::new(3);
    let (c, n, m) = (lan.host(0), lan.host(1), lan.host(2));
    let key = n.generate_key("office-1");
    let y = n.add_path(&random_file(&n.dir().join("files"), "plain-y", 4 << 20));
    n.sign(&[&y], &key.secret_file);
    let n_export = export(n, &[&y], "export-y");
    // M serves a copy of the same files, at first without y's narinfo.
    let m_export = m.dir().join("export-y");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&n_export)
        .arg(&m_export)
        .status()
        .expect("cp");
    assert!(copied.success());
    let narinfo = m_export.join(format!("{}.narinfo", hash_part(&y)));
    let hidden = m_export.join("hidden.narinfo.txt");
    std::fs::rename(&narinfo, &hidden).expect("hide");
    let nginx_n = Nginx::start(n, &n_export, NGINX_PORT);
    let _nginx_m = Nginx::start(m, &m_export, NGINX_PORT);
    let (n_url, m_url) = (
        format!("http://{}:{NGINX_PORT}", n.addr()),
        format!("http://{}:{NGINX_PORT}", m.addr()),
    );
    c.configure_nix(&nix_conf(SUBSTITUTER, &[&key.public]));
    let agent_c = c.start_agent(&format!(
        "[mesh]\nplain_caches = [\"{n_url}\", \"{m_url}\"]\n[upstream]\ntimeout_ms = 2000\nstall_ms = 2000\n"
    ));
    wait_until(Duration::from_secs(20), "both plain caches ready", || {
        [&n_url, &m_url].iter().all(|u| {
            plain(&agent_c, u).is_some_and(|p| p.state == nixmesh::mesh::peers::PeerState::Alive)
        })
    });
    // The agent learns y from N (M does not list it yet), and keeps that.
    let (status, _) = c.http_status(&format!("{SUBSTITUTER}/{}.narinfo", hash_part(&y)));
    assert_eq!(status, 200);
    std::fs::rename(&hidden, &narinfo).expect("unhide");
    nginx_n.signal("STOP");
    realise(c, &[&y]);
    nginx_n.signal("CONT");
    assert_verified(c, &y);
    let from_m = plain(&agent_c, &m_url).expect("M").counters.bytes_fetched;
    assert!(from_m > 0, "M served the file");
    let n_view = plain(&agent_c, &n_url).expect("N");
    assert!(n_view.quarantined, "{n_view:?}");
}
