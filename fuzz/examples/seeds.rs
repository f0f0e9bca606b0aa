//! Writes the fuzz targets' seed corpora (`fuzz/seeds/<target>/`) from
//! real data: frames made by the real encoders, a narinfo written by
//! `nix copy --to file://` (`seed-data/`), the repo's own nix.conf and config
//! examples, the URLs the agent serves. Run from `fuzz/`:
//! `cargo run --example seeds`.

use std::fs;
use std::path::Path;

use nixmesh::mesh::discovery::txt::to_txt;
use nixmesh::mesh::discovery::{Announcement, PROTOCOL_VERSION};
use nixmesh::mesh::nar_chunks::{stop_header, Codec, Packer, DONE, KEEP, LZ4};
use nixmesh::mesh::protocol::{Request, Response};
use nixmesh::nix::{HashPart, NarInfo, Sha256Hash};

const NIX_COPY_NARINFO: &str = include_str!("../seed-data/nix-copy.narinfo");
const CONFIG_EXAMPLE: &str = include_str!("../../config.example.toml");
const NIX_CONF_EXAMPLE: &str = include_str!("../../docs/systemd/nix.conf");

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("seeds").join(target);
    fs::create_dir_all(&dir).expect("corpus dir");
    fs::write(dir.join(name), bytes).expect("seed file");
}

fn body(frame: Vec<u8>) -> Vec<u8> {
    frame[4..].to_vec()
}

fn main() {
    let narinfo = NarInfo::parse("/nix/store", NIX_COPY_NARINFO).expect("a real narinfo parses");
    let hash: HashPart = narinfo.info.path.hash_part();
    let nar_hash: Sha256Hash = narinfo.info.nar_hash;

    let requests = [
        Request::Ping { nonce: 7 },
        Request::PathInfo { hash: hash.clone() },
        Request::Nar {
            hash: hash.clone(),
            nar_hash,
            offset: 96,
        },
        Request::Have {
            hashes: vec![hash.clone(); 3],
        },
        Request::UpstreamFile {
            hash: hash.clone(),
            file_hash: nar_hash,
        },
        Request::UpstreamNarinfo { hash: hash.clone() },
        Request::NarChunks {
            hash: hash.clone(),
            nar_hash,
            offset: 96,
            end: 4096,
            level: 1,
        },
        Request::BadNar {
            hash: hash.clone(),
            nar_hash,
        },
    ];
    for (i, r) in requests.iter().enumerate() {
        write("wire_request", &format!("seed-{i}"), &body(r.encode()));
    }

    let responses = [
        Response::Pong {
            nonce: 7,
            name: "build-7".into(),
        },
        Response::PathInfo {
            narinfo: NIX_COPY_NARINFO.to_string(),
        },
        Response::NotFound,
        Response::NarFollows { nar_size: 144 },
        Response::FileFollows { file_size: 96 },
        Response::UpstreamHit {
            cache: "https://cache.nixos.org".into(),
            narinfo: NIX_COPY_NARINFO.to_string(),
        },
        Response::UpstreamMiss {
            asked: vec![
                "https://cache.nixos.org".into(),
                "http://nas.lan:8080".into(),
            ],
        },
        Response::Have {
            present: vec![true, false, true],
        },
        Response::Error {
            code: 5,
            message: "too many NAR streams".into(),
        },
    ];
    for (i, r) in responses.iter().enumerate() {
        write("wire_response", &format!("seed-{i}"), &body(r.encode()));
    }

    let own = Announcement {
        version: PROTOCOL_VERSION,
        key: [0x5a; 32],
        quic_port: 5182,
        mesh_id: "open".into(),
        name: "build-7".into(),
    };
    let txt: Vec<String> = to_txt(&own)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    write("mdns_txt", "seed-0", txt.join("\0").as_bytes());

    write("narinfo", "seed-0", NIX_COPY_NARINFO.as_bytes());
    write("narinfo", "seed-1", narinfo.render().as_bytes());

    write("nix_conf", "seed-0", NIX_CONF_EXAMPLE.as_bytes());
    write(
        "nix_conf",
        "seed-1",
        b"extra-trusted-public-keys = office-1:AAAA\ninclude more.conf\n!include absent.conf\nsubstituters = http://127.0.0.1:5181 https://cache.nixos.org\nrequire-sigs = true\n",
    );

    let nar_url = format!("/nar/{hash}-{}.nar", nar_hash.nix32_digest());
    for (i, (path, range)) in [
        ("/nix-cache-info", ""),
        (&*format!("/{hash}.narinfo"), ""),
        (&*nar_url, "bytes=96-"),
        (&*nar_url, "bytes=-16"),
        (&*nar_url, "bytes=0-1,4-5"),
    ]
    .iter()
    .enumerate()
    {
        let mut seed = 144u64.to_le_bytes().to_vec();
        seed.extend_from_slice(path.as_bytes());
        if !range.is_empty() {
            seed.push(b'\n');
            seed.extend_from_slice(range.as_bytes());
        }
        write("http_request", &format!("seed-{i}"), &seed);
    }

    // After a flags byte (1: a reader of LZ4 chunks), chunk frames of real
    // text (this repo's config example) at level 1: one that compresses,
    // one of random-looking bytes that goes raw; then the same for a
    // reader of LZ4, with a chunk of each codec.
    let mut packer = Packer::new(1);
    let mut frames = vec![0u8];
    frames.extend(packer.pack(CONFIG_EXAMPLE.as_bytes()));
    frames.extend(packer.pack(&nar_hash.0));
    write("nar_chunks", "seed-0", &frames);
    let mut packer = Packer::new(LZ4 | 1);
    let mut frames = vec![1u8];
    frames.extend(packer.pack_with(CONFIG_EXAMPLE.as_bytes(), Some(Codec::Lz4)));
    frames.extend(packer.pack_with(CONFIG_EXAMPLE.as_bytes(), Some(Codec::Zstd)));
    frames.extend(packer.pack_with(&nar_hash.0, Some(Codec::Lz4)));
    write("nar_chunks", "seed-2", &frames);
    // Flags (LZ4 reader and packer), a level, bytes to pack.
    let mut level_and_raw = vec![7u8, 3u8];
    level_and_raw.extend_from_slice(NIX_COPY_NARINFO.as_bytes());
    write("nar_chunks", "seed-1", &level_and_raw);

    // A bulk connection as a holder of version 7 answers a kept request
    // (flags 3: LZ4 and KEEP): the frames of a part, then `DONE`; and one
    // that stops a part with a code.
    let mut packer = Packer::new(KEEP | LZ4 | 1);
    let mut part = vec![3u8];
    part.extend(packer.pack_with(CONFIG_EXAMPLE.as_bytes(), Some(Codec::Lz4)));
    part.extend(packer.pack_with(&nar_hash.0, Some(Codec::Zstd)));
    part.extend(stop_header(DONE));
    write("bulk_reader", "seed-0", &part);
    let mut stopped = vec![1u8];
    stopped.extend(Packer::new(LZ4 | 1).pack(CONFIG_EXAMPLE.as_bytes()));
    stopped.extend(stop_header(5));
    write("bulk_reader", "seed-1", &stopped);

    // A summary stream as an agent sends it: the whole set in two parts,
    // then a change; each frame after one byte of clock.
    let mut stream = Vec::new();
    for part in [
        Response::SummaryPart {
            added: vec![1, 2, 3, 0xdead_beef],
            removed: vec![],
            complete: false,
        },
        Response::SummaryPart {
            added: vec![4],
            removed: vec![],
            complete: true,
        },
        Response::SummaryPart {
            added: vec![5],
            removed: vec![2],
            complete: true,
        },
    ] {
        stream.push(20);
        stream.extend(part.encode());
    }
    write("summary", "seed-0", &stream);
    write(
        "wire_response",
        "seed-summary",
        &body(
            Response::SummaryPart {
                added: vec![9, 10],
                removed: vec![11],
                complete: true,
            }
            .encode(),
        ),
    );
    write(
        "wire_request",
        "seed-summary",
        &body(Request::Summary.encode()),
    );

    write("agent_config", "seed-0", CONFIG_EXAMPLE.as_bytes());
    write(
        "agent_config",
        "seed-1",
        b"[mesh]\nallowed_peers = [\n  \"nixmesh-node:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\",\n]\n[substituter]\nprefetch_mib = 64\n",
    );
    println!("seed corpora written under seeds/");
}
