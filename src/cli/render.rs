//! What `nixmesh peers`, `status` and `why` print, from the admin API's
//! JSON views. Pure and tested.

use std::fmt::Write as _;

use crate::api::PeerView;
use crate::api::StatusView;
use crate::api::SurveyRow;

pub fn render_peers(peers: &[PeerView]) -> String {
    if peers.is_empty() {
        return "no peers yet\n".to_string();
    }
    let mut rows = vec![[
        "NAME".to_string(),
        "KEY".into(),
        "STATE".into(),
        "RTT".into(),
        "ADDRESS".into(),
        "SOURCE".into(),
        "SERVED".into(),
        "FETCHED".into(),
        "ERRORS".into(),
        "SUMMARY".into(),
    ]];
    for p in peers {
        let mut state = if p.quarantined {
            format!("{:?} (quarantined)", p.state).to_lowercase()
        } else {
            format!("{:?}", p.state).to_lowercase()
        };
        if let Some(note) = p.plain_cache.as_deref().filter(|n| !n.is_empty()) {
            state = format!("{state} ({note})");
        }
        rows.push([
            if p.name.is_empty() {
                "-".into()
            } else {
                p.name.clone()
            },
            p.fingerprint.clone(),
            state,
            p.rtt_ms.map_or("-".into(), |r| format!("{r:.2}ms")),
            p.addrs.first().cloned().unwrap_or_else(|| "-".into()),
            format!("{:?}", p.source).to_lowercase(),
            human_bytes(p.counters.bytes_served),
            human_bytes(p.counters.bytes_fetched),
            p.counters.errors.to_string(),
            match &p.summary {
                None => "-".into(),
                Some(s) if !s.complete => format!("arriving ({} paths)", s.paths),
                Some(s) => format!("{} paths, {}", s.paths, human_age(s.age_ms)),
            },
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

pub fn render_status(s: &StatusView) -> String {
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "off".into());
    let mut out = String::new();
    let _ = writeln!(out, "node        {} ({})", s.name, s.fingerprint);
    let _ = writeln!(out, "node key    {}", s.node_key);
    let _ = writeln!(out, "mesh        {}", s.mesh_id);
    let _ = writeln!(out, "version     {}", s.version);
    let _ = writeln!(out, "quic        {}", opt(&s.listeners.quic));
    let _ = writeln!(out, "bulk (tcp)  {}", opt(&s.listeners.bulk));
    let _ = writeln!(out, "substituter {}", opt(&s.listeners.substituter));
    let _ = writeln!(out, "http cache  {}", opt(&s.listeners.http_cache));
    let _ = writeln!(out, "admin       {}", s.listeners.admin);
    let paths = s.store_paths.map_or("unreadable".into(), |n| n.to_string());
    let _ = writeln!(
        out,
        "store       {} ({} paths, db {})",
        s.store_dir, paths, s.store_db
    );
    let _ = writeln!(
        out,
        "peers       {} alive, {} suspect, {} gone",
        s.peers_alive, s.peers_suspect, s.peers_gone
    );
    let _ = writeln!(out, "uptime      {}s", s.uptime_s);
    out
}

/// The hash part of a store path or of a bare hash.
pub fn hash_part_of(text: &str) -> Option<String> {
    let base = text.trim().rsplit('/').next()?;
    let hash = base.get(..crate::nix::store_path::HASH_PART_LEN)?;
    crate::nix::HashPart::parse(hash)
        .ok()
        .map(|h| h.to_string())
}

pub fn render_why(rows: &[SurveyRow]) -> String {
    if rows.is_empty() {
        return "no usable peers to ask\n".to_string();
    }
    let mut out = String::new();
    for r in rows {
        let name = if r.name.is_empty() { "-" } else { &r.name };
        let rtt = r.rtt_ms.map_or("-".to_string(), |v| format!("{v:.2}ms"));
        let mark = if r.would_win { "  <- would win" } else { "" };
        let summary = match r.summary {
            Some(true) => "; its summary lists it",
            Some(false) => "; its summary does not list it (not asked in a race)",
            None => "",
        };
        let _ = writeln!(
            out,
            "{name} ({}) rtt {rtt}, answered in {:.2}ms: {}{summary}{mark}",
            r.fingerprint, r.answer_ms, r.answer
        );
    }
    out
}

/// How long ago, roughly: "4s ago", "3m ago", "2h ago".
fn human_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::peers::{PeerCounters, PeerSource, PeerState};

    #[test]
    fn hash_parts_from_paths_and_hashes() {
        let h = "i9zj2x3nvfjjph275b20kf37h0nw1y3r";
        assert_eq!(
            hash_part_of(&format!("/nix/store/{h}-top")).as_deref(),
            Some(h)
        );
        assert_eq!(hash_part_of(h).as_deref(), Some(h));
        assert_eq!(hash_part_of("/nix/store/short"), None);
    }

    #[test]
    fn peers_render_as_aligned_table() {
        let p = PeerView {
            counters: PeerCounters {
                bytes_served: 2048,
                ..Default::default()
            },
            summary: Some(crate::mesh::summaries::SummaryView {
                paths: 120,
                complete: true,
                age_ms: 4200,
                wrong: 0,
            }),
            ..PeerView::example("h2")
        };
        let out = render_peers(&[p]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].ends_with("120 paths, 4s ago"), "{}", lines[1]);
        // A plain cache: its URL, and why it is not used.
        let cache = PeerView {
            name: "nas".into(),
            key: String::new(),
            fingerprint: "plain cache".into(),
            addrs: vec!["http://10.0.0.9:8080".into()],
            source: PeerSource::Static,
            state: PeerState::Gone,
            rtt_ms: None,
            last_seen_ms_ago: None,
            plain_cache: Some("refused: its StoreDir is /gnu/store, not /nix/store".into()),
            ..PeerView::example("nas")
        };
        let out = render_peers(&[cache]);
        let row = out.lines().nth(1).unwrap();
        assert!(row.contains("plain cache"), "{row}");
        assert!(
            row.contains("gone (refused: its StoreDir is /gnu/store"),
            "{row}"
        );
        assert!(row.contains("http://10.0.0.9:8080"), "{row}");
        assert!(lines[0].starts_with("NAME  KEY"));
        assert!(lines[1].contains("alive"));
        assert!(lines[1].contains("0.42ms"));
        assert!(lines[1].contains("2.0KiB"));
        assert_eq!(render_peers(&[]), "no peers yet\n");
    }
}
