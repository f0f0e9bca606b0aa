//! The store reader and the LAN binary-cache endpoint against real Nix 2.8:
//! NARs equal `nix-store --dump`, narinfos equal `nix path-info --json`, and
//! real `nix-store -r` substitutes from the endpoint into a second store.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::*;
use nixmesh::nix::{NarInfo, Sha256Hash};
use sha2::{Digest, Sha256};

const DRV: &str = r#"
let
  sh = args: { system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/bin"; args = [ "-c" args ]; };
  dep = derivation (sh "echo dep > $out" // { name = "dep"; });
in derivation (sh "mkdir -p $out/bin; echo ${dep} > $out/ref; ln -s ${dep} $out/link; printf '#!/bin/sh\n' > $out/bin/run; chmod +x $out/bin/run; : > $out/empty" // { name = "top-RUN"; })
"#;

struct Served {
    agent: Agent,
    addr: SocketAddr,
}

/// An agent serving `store` with `share` settings and optional signing key.
fn serve(store: &TestStore, share: &str, signing_key: Option<&Path>) -> Served {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let key_line = signing_key
        .map(|k| format!("signing_key_file = {:?}\n", k.display().to_string()))
        .unwrap_or_default();
    let config = format!(
        "{key_line}state_dir = {state:?}\n\
         [store]\nroot = {root:?}\nnix_conf = \"/nonexistent/nix.conf\"\n\
         [share]\n{share}\n\
         [http_cache]\nenable = true\nlisten = \"{addr}\"\n\
         [mesh]\nenable = false\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n",
        state = store.root().join("agent-state").display().to_string(),
        root = store.root().display().to_string(),
        admin = free_port(),
    );
    Served {
        agent: Agent::start(&config, addr),
        addr,
    }
}

fn narinfo(addr: SocketAddr, path: &str) -> Option<NarInfo> {
    let hash = hash_part(path);
    let reply = get(addr, &format!("/{hash}.narinfo"));
    match reply.status {
        200 => {
            assert_eq!(reply.header("content-type"), Some("text/x-nix-narinfo"));
            Some(NarInfo::parse("/nix/store", &reply.text()).expect("narinfo parses"))
        }
        404 => None,
        s => panic!("narinfo for {path} answered {s}"),
    }
}

fn substitute(into: &TestStore, addr: SocketAddr, trusted: &str, paths: &[&str]) -> bool {
    into.substitute(&format!("http://{addr}"), Some(trusted), paths)
        .status
        .success()
}

fn make_tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    std::fs::create_dir_all(dir.join("empty-dir")).unwrap();
    std::fs::write(dir.join("empty"), b"").unwrap();
    std::fs::write(dir.join("ünïcødé ✓.txt"), "grüße\n").unwrap();
    std::fs::write(dir.join("sub/seven"), b"1234567").unwrap();
    std::fs::write(dir.join("sub/eight"), b"12345678").unwrap();
    std::fs::write(dir.join("sub/deeper/big"), vec![b'x'; 300_001]).unwrap();
    let exe = dir.join("sub/tool");
    std::fs::write(&exe, b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    symlink("sub/tool", dir.join("link-to-tool")).unwrap();
    symlink("/nonexistent/dangling", dir.join("dangling")).unwrap();
    // Byte order, not locale order: upper case sorts before lower case.
    std::fs::write(dir.join("B"), b"b").unwrap();
    std::fs::write(dir.join("a"), b"a").unwrap();
}

/// Every field Nix reports, as our narinfo carries it.
fn assert_matches_path_info(store: &TestStore, info: &NarInfo) {
    let path = info.info.path.full();
    let json = store.path_info_json(path);
    assert_eq!(
        info.info.nar_hash,
        Sha256Hash::parse(json["narHash"].as_str().unwrap()).unwrap(),
        "{path}"
    );
    assert_eq!(info.info.nar_size, json["narSize"].as_u64().unwrap());
    let refs: Vec<&str> = info.info.references.iter().map(|r| r.full()).collect();
    let mut want: Vec<&str> = json["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    want.sort();
    assert_eq!(refs, want, "{path} references");
    assert_eq!(
        info.info.deriver.as_ref().map(|d| d.full()),
        json["deriver"].as_str(),
        "{path} deriver"
    );
    assert_eq!(info.info.ca.as_deref(), json["ca"].as_str(), "{path} ca");
    let sigs: Vec<&str> = json["signatures"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap()).collect())
        .unwrap_or_default();
    for s in sigs {
        assert!(info.info.sigs.iter().any(|x| x == s), "{path} lost sig {s}");
    }
}

#[test]
fn every_kind_of_path_matches_nix_and_substitutes() {
    let store = TestStore::new();
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("tree");
    make_tree(&tree);
    let file = src.path().join("hello.txt");
    std::fs::write(&file, "hello\n").unwrap();
    let tree_path = store.add(&tree);
    let file_path = store.add(&file);
    let top = store.build(DRV);
    let dep_json = store.path_info_json(&top);
    let dep = dep_json["references"][0].as_str().unwrap().to_string();
    let office = nix_key("office-1");
    let served = serve(&store, "all = true", Some(&office.secret));

    let paths = [
        tree_path.as_str(),
        file_path.as_str(),
        top.as_str(),
        dep.as_str(),
    ];
    for path in paths {
        let info = narinfo(served.addr, path).expect("shared path has a narinfo");
        assert_eq!(info.info.path.full(), path);
        assert_eq!(info.compression, "none");
        assert_matches_path_info(&store, &info);
        let nar = get(served.addr, &format!("/{}", info.url));
        assert_eq!(nar.status, 200);
        assert!(nar.complete);
        assert_eq!(
            nar.body,
            store.dump(path),
            "NAR of {path} differs from nix-store --dump"
        );
        let head = http(served.addr, "HEAD", &format!("/{}", info.url));
        assert_eq!(
            head.header("content-length"),
            Some(info.info.nar_size.to_string().as_str())
        );
    }

    let client = TestStore::new();
    assert!(substitute(&client, served.addr, &office.public, &paths));
    for path in paths {
        assert!(client.is_valid(path), "{path} not in the second store");
        run_ok(client.cmd("nix-store").args(["--verify-path", path]));
    }
    // Our signature is what made the built paths acceptable.
    assert!(client.signed_by(&office.public, &[&top, &dep]));
    drop(served.agent);
}

#[test]
fn large_file_streams_with_flat_memory() {
    let store = TestStore::new();
    let src = tempfile::tempdir().unwrap();
    let big = src.path().join("big.bin");
    // 256 MiB of incompressible bytes.
    let mut random = std::fs::File::open("/dev/urandom").unwrap();
    let mut out = std::fs::File::create(&big).unwrap();
    std::io::copy(&mut std::io::Read::take(&mut random, 256 << 20), &mut out).unwrap();
    drop(out);
    let path = store.add(&big);
    std::fs::remove_file(&big).unwrap();
    let served = serve(&store, "all = true", None);
    let info = narinfo(served.addr, &path).unwrap();
    assert!(info.info.nar_size > 256 << 20);
    let nar = get(served.addr, &format!("/{}", info.url));
    assert!(nar.complete);
    let want = Sha256::digest(store.dump(&path));
    assert_eq!(Sha256::digest(&nar.body), want);
    assert_eq!(
        Sha256Hash(Sha256::digest(&nar.body).into()),
        info.info.nar_hash
    );
    let peak_kib = peak_rss_kib(served.agent.pid());
    assert!(
        peak_kib < 64 * 1024,
        "agent peaked at {peak_kib} KiB while streaming 256 MiB"
    );
    let client = TestStore::new();
    // Content-addressed: Nix needs no signature for it.
    assert!(substitute(&client, served.addr, "", &[&path]));
    run_ok(client.cmd("nix-store").args(["--verify-path", &path]));
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn share_policy_keeps_unsigned_paths_home() {
    let store = TestStore::new();
    let src = tempfile::tempdir().unwrap();
    let (a, b) = (
        src.path().join("signed.txt"),
        src.path().join("private.txt"),
    );
    std::fs::write(&a, "office\n").unwrap();
    std::fs::write(&b, "secret\n").unwrap();
    let signed = store.add(&a);
    let private = store.add(&b);
    let top = store.build(DRV);
    let office = nix_key("office-1");
    store.sign(&office.secret, &signed);
    let trusted = format!("trusted_keys = [{:?}]", office.public);

    // No signing key: only what the office key signed leaves the host.
    let served = serve(&store, &trusted, None);
    assert!(narinfo(served.addr, &signed).is_some());
    assert!(narinfo(served.addr, &private).is_none());
    assert!(
        narinfo(served.addr, &top).is_none(),
        "local build, no key: stays"
    );
    let client = TestStore::new();
    assert!(!substitute(
        &client,
        served.addr,
        &office.public,
        &[&private]
    ));
    assert!(!client.is_valid(&private));
    assert!(substitute(&client, served.addr, &office.public, &[&signed]));
    drop(served);

    // With the office key: local builds are signed and shared, added files not.
    let served = serve(&store, &trusted, Some(&office.secret));
    assert!(narinfo(served.addr, &top).is_some());
    assert!(narinfo(served.addr, &private).is_none());
    assert!(substitute(&client, served.addr, &office.public, &[&top]));
}

#[test]
fn nar_urls_answer_byte_ranges() {
    let store = TestStore::new();
    let src = tempfile::tempdir().unwrap();
    let file = src.path().join("ranged.bin");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&file, bytes).unwrap();
    let path = store.add(&file);
    let served = serve(&store, "all = true", None);
    let info = narinfo(served.addr, &path).expect("served");
    assert_nar_ranges(served.addr, &format!("/{}", info.url), &store.dump(&path));
}

#[test]
fn malformed_requests_get_clear_answers() {
    let store = TestStore::new();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("f"), "x").unwrap();
    store.add(&src.path().join("f"));
    let served = serve(&store, "all = true", None);
    let long = format!("/{}.narinfo", "a".repeat(2000));
    let cases: &[(&str, &str, u16)] = &[
        ("GET", "/nix-cache-info", 200),
        ("GET", "/abc.narinfo", 400),
        ("GET", "/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo", 400),
        ("GET", "/00000000000000000000000000000000.narinfo", 404),
        ("HEAD", "/00000000000000000000000000000000.narinfo", 404),
        ("GET", "/../../etc/passwd", 400),
        ("GET", "/nar/..%2f..%2fetc%2fpasswd", 400),
        ("GET", "/nar/00000000000000000000000000000000.nar", 400),
        (
            "GET",
            "/nar/00000000000000000000000000000000-1yyqyjpw2q4bg361ibwpnnrnkvijzh34wri22zwd3ndzan95b3rj.nar",
            404,
        ),
        ("GET", "/nar/x-y.nar", 400),
        ("GET", "/", 404),
        ("GET", "/log/foo", 404),
        ("POST", "/nix-cache-info", 405),
        ("DELETE", "/00000000000000000000000000000000.narinfo", 405),
        ("GET", &long, 414),
    ];
    for (method, target, want) in cases {
        let reply = http(served.addr, method, target);
        assert_eq!(reply.status, *want, "{method} {target}");
    }
    let info = get(served.addr, "/nix-cache-info").text();
    assert!(info.contains("StoreDir: /nix/store\n"), "{info}");
    assert!(info.contains("WantMassQuery: 1\n"), "{info}");
    // A request head over the limit is refused, and the agent lives on.
    let huge = format!("/{}", "a".repeat(100_000));
    let reply = std::panic::catch_unwind(|| get(served.addr, &huge));
    if let Ok(r) = reply {
        assert!(r.status >= 400 && r.status < 500, "huge head: {}", r.status);
    }
    assert_eq!(get(served.addr, "/nix-cache-info").status, 200);
}

/// `[http_cache]` checks what it sends for size only (Nix hashes every
/// NAR it gets): a file of another size is cut off, a byte flipped in
/// place goes out whole and real Nix refuses it. Either way nothing
/// corrupt becomes a valid path.
#[test]
fn corrupt_store_file_never_becomes_a_valid_path() {
    let store = TestStore::new();
    let src = tempfile::tempdir().unwrap();
    let f = src.path().join("victim.bin");
    std::fs::write(&f, vec![7u8; 3 << 20]).unwrap();
    let path = store.add(&f);
    let served = serve(&store, "all = true", None);
    let info = narinfo(served.addr, &path).unwrap();
    let good = get(served.addr, &format!("/{}", info.url));
    assert!(good.complete);

    // Flip one byte in place, size unchanged.
    let real = store.real(&path);
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&real).unwrap();
    bytes[2 << 20] ^= 1;
    std::fs::write(&real, &bytes).unwrap();
    let bad = get(served.addr, &format!("/{}", info.url));
    assert_eq!(bad.status, 200);
    assert_eq!(bad.body.len(), info.info.nar_size as usize, "not hashed");
    let client = TestStore::new();
    assert!(!substitute(&client, served.addr, "", &[&path]));
    assert!(!client.is_valid(&path), "Nix took a corrupt NAR");

    // Grown file: the NAR would be longer than the DB says.
    bytes.push(0);
    std::fs::write(&real, &bytes).unwrap();
    let bad = get(served.addr, &format!("/{}", info.url));
    assert!(!bad.complete);
    let client = TestStore::new();
    assert!(!substitute(&client, served.addr, "", &[&path]));
    assert!(!client.is_valid(&path));
    let log = served.agent.log_text();
    assert!(log.contains("corrupt"), "corruption not logged:\n{log}");
}

/// Adds a tree of `files` small files (1–12 KiB) in `dirs` directories to
/// `store`; returns its store path.
fn add_small_file_tree(store: &TestStore, files: u32, dirs: u32) -> String {
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("small-files");
    for i in 0..files {
        let dir = tree.join(format!("d{}", i % dirs));
        std::fs::create_dir_all(&dir).unwrap();
        let bytes: Vec<u8> = (0..1000 + i * 37)
            .map(|j| (j * (i + 3) % 251) as u8)
            .collect();
        std::fs::write(dir.join(format!("f{i}")), bytes).unwrap();
    }
    store.add(&tree)
}

/// What the agent of `serve` keeps in its NAR cache directory.
fn kept_files(store: &TestStore) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(store.root().join("agent-state/nar-cache"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

/// A tree of many small files is kept encoded after it was served whole
/// twice, and later requests (whole or ranges) are answered from the kept
/// copy. A kept copy that rots on disk goes out as it is and real Nix
/// refuses it (as with a rotten store file); one cut short is dropped and
/// the store serves again; a directory removed is made again.
#[test]
fn a_tree_of_small_files_is_served_from_its_kept_copy() {
    let store = TestStore::new();
    let path = add_small_file_tree(&store, 40, 4);
    let office = nix_key("office-1");
    let served = serve(&store, "all = true", Some(&office.secret));
    let info = narinfo(served.addr, &path).unwrap();
    let url = format!("/{}", info.url);
    let dump = store.dump(&path);
    let kept = || kept_files(&store);

    // Parts from the start are not whole serves: nothing is kept for them.
    for _ in 0..3 {
        let part = http_with(served.addr, "GET", &url, &[("Range", "bytes=0-999")]);
        assert_eq!(part.status, 206);
        assert_eq!(part.body, &dump[..1000]);
    }
    assert_eq!(get(served.addr, &url).body, dump);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        kept().is_empty(),
        "kept after one whole serve: {:?}",
        kept()
    );
    assert_eq!(get(served.addr, &url).body, dump);
    wait_for(Duration::from_secs(5), "the NAR is kept", || {
        kept()
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "nar"))
    });
    let entry = kept().into_iter().next().unwrap();
    assert_eq!(std::fs::read(&entry).unwrap(), dump);
    assert_nar_ranges(served.addr, &url, &dump);

    // The kept copy rots: one byte flipped, size unchanged. What goes out
    // is the kept copy (so it is what was served above), and Nix, which
    // hashes every NAR, refuses it.
    let mut rotten = dump.clone();
    rotten[dump.len() / 2] ^= 0x20;
    std::fs::write(&entry, &rotten).unwrap();
    let reply = get(served.addr, &url);
    assert!(reply.complete);
    assert_eq!(reply.body, rotten, "not served from the kept copy");
    let client = TestStore::new();
    assert!(!substitute(&client, served.addr, &office.public, &[&path]));
    assert!(!client.is_valid(&path), "Nix took a rotten NAR");

    // Cut short: dropped, and the store serves (and keeps it anew).
    std::fs::write(&entry, &dump[..1000]).unwrap();
    assert_eq!(get(served.addr, &url).body, dump);
    assert!(served
        .agent
        .log_text()
        .contains("a kept NAR has the wrong size"));
    wait_for(Duration::from_secs(5), "the NAR is kept anew", || {
        std::fs::read(&entry).is_ok_and(|b| b == dump)
    });
    let client = TestStore::new();
    assert!(substitute(&client, served.addr, &office.public, &[&path]));
    run_ok(client.cmd("nix-store").args(["--verify-path", &path]));

    // The whole directory removed by hand while the agent runs: the store
    // serves, and the directory is made again with the NAR kept in it.
    std::fs::remove_dir_all(entry.parent().unwrap()).unwrap();
    assert_eq!(get(served.addr, &url).body, dump);
    wait_for(Duration::from_secs(5), "the NAR is kept again", || {
        std::fs::read(&entry).is_ok_and(|b| b == dump)
    });
    assert!(served
        .agent
        .log_text()
        .contains("a directory of kept files was removed; made it again"));
    assert_eq!(get(served.addr, &url).body, dump);
    let client = TestStore::new();
    assert!(substitute(&client, served.addr, &office.public, &[&path]));
    run_ok(client.cmd("nix-store").args(["--verify-path", &path]));
}

/// Sixteen clients at once asking for a tree NAR that is being kept: every
/// one gets the whole NAR, one copy is kept, no unfinished write is left.
#[test]
fn clients_at_once_get_whole_nars_while_one_copy_is_kept() {
    let store = TestStore::new();
    let path = add_small_file_tree(&store, 300, 8);
    let served = serve(&store, "all = true", None);
    let info = narinfo(served.addr, &path).unwrap();
    let url = format!("/{}", info.url);
    let dump = store.dump(&path);
    for round in 0..3 {
        let bodies: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| s.spawn(|| get(served.addr, &url).body))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for body in &bodies {
            assert!(body == &dump, "round {round}: a NAR differs");
        }
    }
    wait_for(
        Duration::from_secs(5),
        "one kept copy and nothing else",
        || {
            let files = kept_files(&store);
            files.len() == 1 && files[0].extension().is_some_and(|e| e == "nar")
        },
    );
    let entry = kept_files(&store).remove(0);
    assert_eq!(std::fs::read(entry).unwrap(), dump);
}

#[test]
fn collected_paths_are_not_found_and_writers_do_not_disturb_readers() {
    let store = TestStore::new();
    let src = tempfile::tempdir().unwrap();
    let f = src.path().join("short-lived");
    std::fs::write(&f, "bye\n").unwrap();
    let gone = store.add(&f);
    let mut kept = Vec::new();
    for i in 0..5 {
        let f = src.path().join(format!("kept-{i}"));
        std::fs::write(&f, format!("{i}\n")).unwrap();
        kept.push(store.add(&f));
    }
    let served = serve(&store, "all = true", None);
    assert!(narinfo(served.addr, &gone).is_some());
    run_ok(store.cmd("nix-store").args(["--delete", &gone]));
    assert!(narinfo(served.addr, &gone).is_none());

    // Nix writes to the DB (new paths) while we read.
    let root = store.root().to_path_buf();
    let srcdir = src.path().to_path_buf();
    let writer = std::thread::spawn(move || {
        for i in 0..20 {
            let f = srcdir.join(format!("new-{i}"));
            std::fs::write(&f, format!("new {i}\n")).unwrap();
            run_ok(
                nix_command("nix-store")
                    .arg("--store")
                    .arg(&root)
                    .arg("--add")
                    .arg(&f),
            );
        }
    });
    let mut answered = 0;
    while !writer.is_finished() {
        for p in &kept {
            assert!(
                narinfo(served.addr, p).is_some(),
                "{p} vanished during writes"
            );
            answered += 1;
        }
    }
    writer.join().unwrap();
    assert!(answered > 0);
}

#[test]
fn an_unprivileged_agent_still_serves_the_store() {
    use std::os::unix::fs::PermissionsExt;
    let store = TestStore::new();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("open.txt"), "for everyone\n").unwrap();
    let path = store.add(&src.path().join("open.txt"));
    // A normal Nix host: the store is world-readable, its DB dir is not
    // writable by other users.
    std::fs::set_permissions(store.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    // A copy nobody can execute, wherever the build tree is.
    let binary = state.path().join("nixmesh");
    std::fs::copy(env!("CARGO_BIN_EXE_nixmesh"), &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let serve_as_nobody = || {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = format!(
            "state_dir = {:?}\n[store]\nroot = {:?}\n[share]\nall = true\n[mesh]\nenable = false\n\
             [admin]\nlisten = \"127.0.0.1:{}\"\n[http_cache]\nenable = true\nlisten = \"{addr}\"\n",
            state.path().join("nobody").display().to_string(),
            store.root().display().to_string(),
            free_port(),
        );
        let agent = Agent::start_with(
            &config,
            addr,
            &[
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
            ],
            &binary,
        );
        let info = narinfo(addr, &path).expect("served without root");
        let nar = get(addr, &format!("/{}", info.url));
        assert!(nar.complete);
        assert_eq!(nar.body, store.dump(&path));
        let uid = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
        assert!(
            uid.lines()
                .any(|l| l.starts_with("Uid:") && !l.contains("\t0\t")),
            "agent ran as root: {uid}"
        );
        agent
    };
    // As Nix left the DB: modern Nix leaves its shared-memory file behind,
    // which lets anyone read the DB as usual; 2.8 removes it.
    drop(serve_as_nobody());

    // With no shared-memory file (no Nix process has the DB open, and the
    // last one closed it cleanly), only the owner of the DB dir could
    // create one: the agent reads the DB as immutable instead.
    let db = store.root().join("nix/var/nix/db/db.sqlite");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.query_row("pragma schema_version", [], |_| Ok(()))
        .unwrap();
    conn.close().map_err(|(_, e)| e).unwrap();
    assert!(!db.with_extension("sqlite-shm").exists());
    let agent = serve_as_nobody();
    assert!(
        agent.log_text().contains("reading it as immutable"),
        "{}",
        agent.log_text()
    );
}

/// A peer's `Have` of up to 1024 hashes is answered on a blocking thread:
/// on a one-thread runtime, the batch is still running after the task
/// that asked for it yielded once (inline, it would have run to its end
/// before anything else could run).
#[test]
fn a_batch_lookup_leaves_the_async_workers_free() {
    use nixmesh::store::{db::Store, db::StoreLocation, share::SharePolicy, shared::SharedStore};
    let store = TestStore::new();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("here.txt"), "here\n").unwrap();
    let here = store.add(&src.path().join("here.txt"));
    let db = Store::open(StoreLocation::under_root(store.root(), "/nix/store")).unwrap();
    let policy = SharePolicy {
        trusted_keys: Vec::new(),
        signing_key: None,
        sign_local_builds: false,
        content_addressed: false,
        all: true,
    };
    let shared = SharedStore::new(db, std::sync::Arc::new(policy), None, None);
    let here_hash = nixmesh::nix::HashPart::parse(hash_part(&here)).unwrap();
    let absent = nixmesh::nix::HashPart::parse(&"0".repeat(32)).unwrap();
    let mut hashes = vec![absent; 1023];
    hashes.push(here_hash);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let batch = tokio::spawn(async move { shared.have_many(hashes).await });
        tokio::task::yield_now().await;
        assert!(!batch.is_finished(), "the batch ran on the async worker");
        let present = batch.await.unwrap();
        assert_eq!(present.len(), 1024);
        assert_eq!(present.iter().filter(|p| **p).count(), 1);
        assert!(present[1023]);
    });
}
