//! A fault campaign, bounded in time and count. A closure of 120 signed
//! paths is spread over six holders: h0 holds all of it and is left alone
//! (so an honest holder of every path is always alive), h1..h5 hold about
//! half of it each. Two clients substitute paths of the closure in their
//! own random orders, one `nix-store --realise` at a time, checking each
//! and deleting it before it comes again, for at least 45 s and
//! 120 substitutions each, through their agents, while a chaos driver SIGKILLs holders and restarts them,
//! SIGSTOPs and resumes them, and restarts them cleanly (at most two of
//! h1..h5 disturbed at once), and a liar L, a static peer of both
//! clients, answers with h0's real narinfos (half of them with a wrong
//! NarSize) and NARs with one byte flipped. A further 30 paths are on no
//! peer, only in an upstream cache U (nginx serving a `nix copy --to
//! file://` cache) that every agent lists, and the chaos driver cuts U's
//! link (every frame dropped) for 2 to 4 s at a time. Counted: corrupt
//! store paths on either client (must be 0), Nix clients that hang past a
//! deadline (0), substitutions that failed while an honest source was
//! reachable (at most 1 %: h0 for every path of the closure, U for its
//! paths outside a cut and the agent's time to notice it ended), and, apart,
//! upstream paths that failed during a cut.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixmesh::mesh::client;
use nixmesh::mesh::identity::{MeshSecret, NodeId};
use nixmesh::mesh::nar_chunks::{self, Packer};
use nixmesh::mesh::protocol::{Request, Response, MAX_REQUEST_FRAME};
use nixmesh::mesh::transport::{self, Admission, TlsIdentity};
use nixmesh::nix::{HashPart, SecretKey};

use crate::harness::{AgentHandle, Host, Lan, Nginx};
use crate::office::*;

const PATHS: usize = 120;
/// Paths only upstream has.
const UPSTREAM_PATHS: usize = 30;
/// How long after a cut of the uplink ends an upstream path may still
/// fail: the agents' `timeout_ms` (a look-up that began in the cut),
/// `skip_ms` (U left alone after it failed) and `stall_ms` (a file cut
/// off mid-way) below, and a margin for Nix's own retries.
const AFTER_CUT: Duration = Duration::from_secs(2 + 2 + 3 + 3);
const UPSTREAM: &str = "timeout_ms = 2000\nskip_ms = 2000\nstall_ms = 3000\n";
/// The campaign runs at least this long, and at least `PATHS`
/// substitutions per client.
const CAMPAIGN: Duration = Duration::from_secs(45);
/// Longest one substitution may take before it counts as a hang.
const HANG: Duration = Duration::from_secs(90);
/// Longest a request to h0 may take, for the liar.
const ASK: Duration = Duration::from_secs(5);

/// The liar: a peer on `listen` that answers every request with h0's
/// answer (reached at `honest`), but every NAR with one byte flipped and,
/// for about half the paths, the narinfo with a wrong NarSize. Counts its
/// lies.
async fn run_liar(
    key: SecretKey,
    listen: SocketAddr,
    honest: (SocketAddr, NodeId),
    lies: Arc<AtomicU64>,
) {
    let id = TlsIdentity::new(&key, &MeshSecret::default()).expect("an identity");
    let server = transport::server_config(&id, Admission::default()).expect("server config");
    let endpoint = quinn::Endpoint::server(server, listen).expect("the liar's endpoint");
    let config =
        transport::client_config(&id, Admission::default(), honest.1).expect("client config");
    let to_h0 = endpoint
        .connect_with(config, honest.0, "nixmesh")
        .expect("dial h0")
        .await
        .expect("connected to h0");
    while let Some(incoming) = endpoint.accept().await {
        let (to_h0, lies) = (to_h0.clone(), lies.clone());
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let (to_h0, lies) = (to_h0.clone(), lies.clone());
                tokio::spawn(async move {
                    let Ok(body) = transport::read_frame(&mut recv, MAX_REQUEST_FRAME, ASK).await
                    else {
                        return;
                    };
                    let answer = match Request::decode(&body) {
                        Ok(Request::Ping { nonce }) => Some(Response::Pong {
                            nonce,
                            name: "liar".into(),
                        }),
                        Ok(Request::PathInfo { hash }) => {
                            match client::path_info(&to_h0, "/nix/store", &hash, ASK).await {
                                // For about half the paths, a field is a
                                // lie: one more byte than the NAR has.
                                Ok(Some(mut info))
                                    if hash.as_str().ends_with([
                                        '0', '1', '2', '3', 'a', 'b', 'c', 'd', 'f', 'g', 'h', 'i',
                                        'j', 'k',
                                    ]) =>
                                {
                                    info.info.nar_size += 1;
                                    lies.fetch_add(1, Ordering::SeqCst);
                                    Some(Response::PathInfo {
                                        narinfo: info.render(),
                                    })
                                }
                                Ok(Some(info)) => Some(Response::PathInfo {
                                    narinfo: info.render(),
                                }),
                                _ => Some(Response::NotFound),
                            }
                        }
                        Ok(Request::Have { hashes }) => {
                            let n = hashes.len();
                            let present = client::have(&to_h0, hashes, ASK)
                                .await
                                .unwrap_or_else(|_| vec![false; n]);
                            Some(Response::Have { present })
                        }
                        Ok(Request::Nar {
                            hash,
                            nar_hash,
                            offset,
                        }) => {
                            lie_about_nar(&to_h0, &hash, &nar_hash, offset, None, &mut send).await;
                            lies.fetch_add(1, Ordering::SeqCst);
                            None
                        }
                        Ok(Request::NarChunks {
                            hash,
                            nar_hash,
                            offset,
                            level,
                            ..
                        }) => {
                            let level = Some(level);
                            lie_about_nar(&to_h0, &hash, &nar_hash, offset, level, &mut send).await;
                            lies.fetch_add(1, Ordering::SeqCst);
                            None
                        }
                        Ok(Request::UpstreamFile { .. }) => Some(Response::NotFound),
                        Ok(Request::BadNar { .. }) => Some(Response::Noted),
                        // It keeps no summary: asked about every path.
                        Ok(Request::Summary) => Some(Response::NotFound),
                        Ok(Request::UpstreamNarinfo { .. }) => {
                            Some(Response::UpstreamMiss { asked: Vec::new() })
                        }
                        Err(_) => return,
                    };
                    if let Some(answer) = answer {
                        let _ = send.write_all(&answer.encode()).await;
                    }
                    let _ = send.finish();
                });
            }
        });
    }
}

/// h0's NAR of `hash` from `offset`, with its middle byte flipped; in
/// chunk frames compressed at `level` if one is given.
async fn lie_about_nar(
    to_h0: &quinn::Connection,
    hash: &HashPart,
    nar_hash: &nixmesh::nix::Sha256Hash,
    offset: u64,
    level: Option<u8>,
    send: &mut quinn::SendStream,
) {
    let Ok(Some((nar_size, mut recv))) = client::nar(to_h0, hash, nar_hash, offset, ASK).await
    else {
        let _ = send.write_all(&Response::NotFound.encode()).await;
        return;
    };
    let Ok(mut bytes) = recv.read_to_end(64 << 20).await else {
        return;
    };
    if let Some(mid) = bytes.len().checked_div(2) {
        if let Some(b) = bytes.get_mut(mid) {
            *b ^= 0x20;
        }
    }
    let _ = send
        .write_all(&Response::NarFollows { nar_size }.encode())
        .await;
    match level {
        None => {
            let _ = send.write_all(&bytes).await;
        }
        Some(level) => {
            let mut packer = Packer::new(level);
            for chunk in bytes.chunks(nar_chunks::CHUNK) {
                let _ = send.write_all(&packer.pack(chunk)).await;
            }
        }
    }
}

/// One substitution: the exit code of `timeout nix-store --realise`, and
/// whether the path was then valid and intact.
struct Outcome {
    path: String,
    upstream: bool,
    began: Instant,
    ended: Instant,
    code: Option<i32>,
    stderr: String,
    intact: Option<bool>,
}

/// Sets its flag when dropped by a panicking thread.
struct StopOnPanic(Arc<AtomicBool>);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// What the chaos driver does to one holder.
#[derive(Clone, Copy, Debug)]
enum Chaos {
    Kill,
    Freeze,
    Restart,
    /// U's link: every frame dropped.
    CutUplink,
}

/// Tiny deterministic generator: the campaign is the same every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

#[test]
fn a_fault_campaign_corrupts_nothing_hangs_nothing_and_fails_almost_nothing() {
    let lan = Lan::new(10);
    let holders: Vec<&Host> = (0..6).map(|i| lan.host(i)).collect();
    let clients = [lan.host(6), lan.host(7)];
    let liar_host = lan.host(8);
    let uplink = lan.host(9);
    let key = holders[0].generate_key("office-1");

    // The closure: random bytes, 16 KiB to 1 MiB a path.
    let mut rng = Lcg(7);
    let dir = holders[0].dir().join("files");
    let files: Vec<std::path::PathBuf> = (0..PATHS)
        .map(|i| {
            random_file(
                &dir,
                &format!("chaos-{i}"),
                16 << 10 | (rng.next(1 << 20) as u64),
            )
        })
        .collect();
    let paths = add_paths(holders[0], &files);
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    holders[0].sign(&refs, &key.secret_file);
    for h in &holders[1..] {
        let mine: Vec<std::path::PathBuf> =
            files.iter().filter(|_| rng.next(2) == 0).cloned().collect();
        let added = add_paths(h, &mine);
        let added: Vec<&str> = added.iter().map(String::as_str).collect();
        h.sign(&added, &key.secret_file);
    }

    // U: paths no peer has, as a zstd `file://` cache behind nginx.
    let upstream_files: Vec<std::path::PathBuf> = (0..UPSTREAM_PATHS)
        .map(|i| {
            random_file(
                &uplink.dir().join("files"),
                &format!("upstream-{i}"),
                16 << 10 | (rng.next(1 << 20) as u64),
            )
        })
        .collect();
    let upstream_paths = add_paths(uplink, &upstream_files);
    let upstream_refs: Vec<&str> = upstream_paths.iter().map(String::as_str).collect();
    uplink.sign(&upstream_refs, &key.secret_file);
    let export = uplink.dir().join("export");
    let to = format!("file://{}?compression=zstd", export.display());
    let mut argv = vec!["nix", "copy", "--to", &to];
    argv.extend_from_slice(&upstream_refs);
    uplink.run_ok(&argv);
    let _nginx = Nginx::start(uplink, &export, 8080);
    let upstream = format!(
        "[upstream]\ncaches = [\"http://{}:8080\"]\n{UPSTREAM}",
        uplink.addr()
    );

    // Holders list U too: any agent may be the one that downloads a path
    // for the office, and chaos falls on those.
    let holder_config = format!("[share]\nall = true\n{upstream}");
    let holder_config = holder_config.as_str();
    let mut holder_agents: Vec<Option<AgentHandle>> = holders
        .iter()
        .map(|h| Some(h.start_agent(holder_config)))
        .collect();

    // The liar, a static peer of both clients; it runs until the process
    // ends, and its sockets are L's.
    let liar_at = SocketAddr::from((liar_host.addr(), 5182));
    let h0 = (
        SocketAddr::from((holders[0].addr(), 5182)),
        NodeId::parse(&holders[0].node_key()).expect("h0's key"),
    );
    let lies = Arc::new(AtomicU64::new(0));
    let liar_key = SecretKey::generate("liar").expect("a key");
    let liar_node = NodeId(liar_key.public().bytes()).to_base64();
    {
        let lies = lies.clone();
        let _liar = liar_host.in_netns(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(run_liar(liar_key, liar_at, h0, lies));
        });
    }
    let client_config = format!(
        "[mesh]\nstatic_peers = [{{ address = \"{liar_at}\", key = \"{liar_node}\" }}]\n{upstream}"
    );
    let client_agents: Vec<AgentHandle> = clients
        .iter()
        .map(|c| {
            c.configure_nix(&nix_conf(SUBSTITUTER, &[&key.public]));
            c.start_agent(&client_config)
        })
        .collect();
    let mut everyone: Vec<(&Host, &AgentHandle)> =
        clients.iter().copied().zip(&client_agents).collect();
    let holder_refs: Vec<(&Host, &AgentHandle)> = holders
        .iter()
        .copied()
        .zip(holder_agents.iter().map(|a| a.as_ref().expect("started")))
        .collect();
    everyone.extend(holder_refs);
    wait_all_alive(&everyone);
    drop(everyone);

    // Chaos on h1..h5 until both clients are done.
    let done = Arc::new(AtomicBool::new(false));
    let actions = Arc::new(Mutex::new(Vec::<(Chaos, String)>::new()));
    // When U's link was cut: (from, to).
    let cuts = Arc::new(Mutex::new(Vec::<(Instant, Instant)>::new()));
    let started = Instant::now();
    let outcomes = std::thread::scope(|s| {
        let chaos = {
            let (done, actions, cuts) = (done.clone(), actions.clone(), cuts.clone());
            let holders = &holders;
            let agents = &mut holder_agents;
            s.spawn(move || {
                let mut rng = Lcg(11);
                // (holder, when it is to be made whole again, what was done)
                let mut disturbed: Vec<(usize, Instant, Chaos)> = Vec::new();
                // When the cut of U's link, if any, is to end.
                let mut cut: Option<(Instant, Instant)> = None;
                let mend = |cut: (Instant, Instant)| {
                    uplink.lose_frames(0);
                    cuts.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((cut.0, Instant::now()));
                };
                while !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(700));
                    let now = Instant::now();
                    match cut {
                        Some(c) if now >= c.1 => {
                            mend(c);
                            cut = None;
                        }
                        None if rng.next(14) == 0 => {
                            uplink.lose_frames(1000);
                            cut = Some((
                                now,
                                now + Duration::from_millis(2000 + 500 * rng.next(5) as u64),
                            ));
                            actions
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((Chaos::CutUplink, uplink.name().to_string()));
                        }
                        _ => {}
                    }
                    disturbed.retain(|&(i, until, what)| {
                        if now < until {
                            return true;
                        }
                        match what {
                            Chaos::Freeze => {
                                if let Some(a) = &agents[i] {
                                    a.signal("CONT");
                                }
                            }
                            Chaos::Kill | Chaos::Restart | Chaos::CutUplink => {
                                agents[i] = Some(holders[i].spawn_agent(holder_config));
                            }
                        }
                        false
                    });
                    if disturbed.len() >= 2 {
                        continue;
                    }
                    let i = 1 + rng.next(5);
                    if disturbed.iter().any(|d| d.0 == i) {
                        continue;
                    }
                    let what = [Chaos::Kill, Chaos::Freeze, Chaos::Restart][rng.next(3)];
                    let Some(agent) = agents[i].as_mut() else {
                        continue;
                    };
                    match what {
                        Chaos::Kill => {
                            agent.kill();
                            agents[i] = None;
                        }
                        Chaos::Freeze => agent.signal("STOP"),
                        Chaos::Restart | Chaos::CutUplink => {
                            agent.stop();
                            agents[i] = None;
                        }
                    }
                    let back = Duration::from_millis(1000 + 500 * rng.next(5) as u64);
                    disturbed.push((i, now + back, what));
                    actions
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((what, holders[i].name().to_string()));
                }
                for (i, _, what) in disturbed {
                    match what {
                        Chaos::Freeze => {
                            if let Some(a) = &agents[i] {
                                a.signal("CONT");
                            }
                        }
                        _ => agents[i] = Some(holders[i].spawn_agent(holder_config)),
                    }
                }
                if let Some(c) = cut {
                    mend(c);
                }
            })
        };
        let runs: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(n, c)| {
                let upstream_refs = &upstream_refs;
                let mut refs = refs.clone();
                refs.extend_from_slice(upstream_refs);
                let done = done.clone();
                s.spawn(move || {
                    // A client that panics stops the chaos, or the scope
                    // would wait for it for ever.
                    let _stop_chaos = StopOnPanic(done);
                    // Each client its own order, round after round.
                    let mut rng = Lcg(100 + n as u64);
                    let timeout = HANG.as_secs().to_string();
                    let mut outcomes = Vec::new();
                    while outcomes.len() < PATHS + UPSTREAM_PATHS || started.elapsed() < CAMPAIGN {
                        let p = refs[rng.next(refs.len())];
                        // Still here from an earlier round: Nix keeps a
                        // path a process has open (the agent may be
                        // sending it to the other client), so take another.
                        if c.has_path(p) && !c.run(&["nix-store", "--delete", p]).status.success() {
                            continue;
                        }
                        let began = Instant::now();
                        let out = c.run(&["timeout", &timeout, "nix-store", "--realise", p]);
                        let ended = Instant::now();
                        // A valid path must be intact; it goes before it
                        // comes again.
                        let intact = c
                            .has_path(p)
                            .then(|| c.run(&["nix-store", "--verify-path", p]).status.success());
                        outcomes.push(Outcome {
                            path: p.to_string(),
                            upstream: upstream_refs.contains(&p),
                            began,
                            ended,
                            code: out.status.code(),
                            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                            intact,
                        });
                    }
                    outcomes
                })
            })
            .collect();
        let outcomes: Vec<_> = runs
            .into_iter()
            .map(|r| r.join().expect("a client"))
            .collect();
        done.store(true, Ordering::SeqCst);
        chaos.join().expect("the chaos driver");
        outcomes
    });
    let took = started.elapsed();

    let substitutions: usize = outcomes.iter().map(Vec::len).sum();
    let all = || outcomes.iter().flatten();
    let hangs: Vec<&Outcome> = all().filter(|o| o.code == Some(124)).collect();
    let cuts = cuts.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let in_cut = |o: &Outcome| {
        o.upstream
            && cuts
                .iter()
                .any(|&(from, to)| o.began < to + AFTER_CUT && from < o.ended)
    };
    let failed = |o: &&Outcome| o.code != Some(0) && o.code != Some(124);
    let failures: Vec<&Outcome> = all().filter(failed).filter(|o| !in_cut(o)).collect();
    let cut_off = all().filter(failed).filter(|o| in_cut(o)).count();
    let from_upstream = all().filter(|o| o.upstream).count();
    let upstream_during_cuts = all().filter(|o| in_cut(o)).count();
    let corrupt = all().filter(|o| o.intact == Some(false)).count();
    let missing = all()
        .filter(|o| o.code == Some(0) && o.intact.is_none())
        .count();
    let actions = actions.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let count = |what: fn(&Chaos) -> bool| actions.iter().filter(|(a, _)| what(a)).count();
    let quarantined = client_agents
        .iter()
        .filter(|a| a.peer("liar").is_some_and(|p| p.quarantined))
        .count();
    eprintln!(
        "fault campaign: {substitutions} substitutions in {took:?} ({from_upstream} of paths only upstream has, \
         {upstream_during_cuts} of them during or just after a cut); chaos: {} SIGKILLs, {} SIGSTOPs, {} restarts, \
         {} uplink cuts; the liar told {} lies (NARs and narinfos) and is quarantined on {quarantined} of 2 clients; \
         corrupt paths {corrupt}, hangs {}, failures {} ({:.1} %), upstream paths failed during a cut {cut_off}",
        count(|a| matches!(a, Chaos::Kill)),
        count(|a| matches!(a, Chaos::Freeze)),
        count(|a| matches!(a, Chaos::Restart)),
        count(|a| matches!(a, Chaos::CutUplink)),
        lies.load(Ordering::SeqCst),
        hangs.len(),
        failures.len(),
        100.0 * failures.len() as f64 / substitutions as f64,
    );
    for o in failures.iter().chain(hangs.iter()).take(5) {
        eprintln!(
            "fault campaign: {} exited {:?}:\n{}",
            o.path, o.code, o.stderr
        );
    }
    assert!(
        substitutions >= 2 * (PATHS + UPSTREAM_PATHS),
        "{substitutions} substitutions"
    );
    assert!(
        count(|a| matches!(a, Chaos::CutUplink)) >= 2,
        "the uplink was cut too rarely: {actions:?}"
    );
    assert!(
        from_upstream > upstream_during_cuts,
        "no upstream path outside a cut"
    );
    assert_eq!(missing, 0, "Nix said yes, but the path is not valid");
    assert!(actions.len() >= 5, "too little chaos: {actions:?}");
    assert_eq!(corrupt, 0, "corrupt store paths");
    assert!(hangs.is_empty(), "{} hangs", hangs.len());
    assert!(
        failures.len() * 100 <= substitutions,
        "{} of {substitutions} substitutions failed",
        failures.len()
    );
}
