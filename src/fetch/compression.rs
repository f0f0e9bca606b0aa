//! Which zstd level to ask a holder to compress a NAR at: the receiver's
//! choice (`mesh.compression`), from what NARs from that holder achieved.
//! Compression pays while the link, not the CPU, is the limit: level 1
//! packs a few hundred MB/s per core, so on a 1 Gbit/s LAN real binaries
//! (3x smaller) arrive about twice as fast; on a link faster than the two
//! agents' CPUs (veth, 10 GbE) packing costs more than the bytes it saves.
//! Which case a link is shows only in what transfers achieve, so `auto`
//! keeps the NAR bytes per second of both kinds of transfer per peer and
//! over all peers. Compression must earn its CPU: it is asked for only
//! while packed transfers are `EARNS` faster than raw ones (on a fast link
//! both go at Nix's pace, and raw leaves both agents' CPU to Nix). The
//! other kind is tried now and then (every `EXPLORE_EVERY`th large
//! transfer) in case things changed. A peer not yet measured both ways is
//! judged by what all peers achieved: on a LAN the receiver's own link and
//! its Nix are what most transfers share. A slow link
//! (100 Mbit/s and under on the wire) gets level 3, which packs a little
//! tighter for CPU the link leaves idle anyway. Data that does not compress
//! costs little: the holder sends such chunks raw (`mesh::nar_chunks`).
//! Pure.

use serde::Deserialize;

use crate::mesh::peers::LinkStats;

/// Links slower than this (100 Mbit/s) get `SLOW_LEVEL`.
pub const SLOW_LINK: u64 = 12_500_000;
pub const SLOW_LEVEL: u8 = 3;
pub const DEFAULT_LEVEL: u8 = 1;
/// Every this many large transfers from a peer, the kind that is behind is
/// tried again.
pub const EXPLORE_EVERY: u64 = 8;
/// Transfers of fewer NAR bytes say more about latency than the link and
/// are not measured.
pub const MEASURED: u64 = 1 << 20;
/// Packed transfers must be this much faster than raw ones (in NAR bytes
/// per second) to be chosen: 5/4.
pub const EARNS: (u64, u64) = (5, 4);

/// `mesh.compression`: "auto", "off", or a zstd level (1 to
/// `mesh::nar_chunks::MAX_LEVEL`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "CompressionSetting")]
pub enum Compression {
    #[default]
    Auto,
    Off,
    Level(u8),
}

impl Compression {
    /// The level to ask a peer whose transfers achieved `peer` for, when
    /// transfers from all peers achieved `all`; `None`: raw bytes, as
    /// agents before protocol version 3 send them.
    pub fn level(self, peer: &LinkStats, all: &LinkStats) -> Option<u8> {
        let measured = |l: &LinkStats| l.packed > 0 && l.raw > 0;
        let link = if measured(peer) || !measured(all) {
            peer
        } else {
            all
        };
        let packed = match self {
            Compression::Off => return None,
            Compression::Level(l) => return Some(l),
            Compression::Auto if link.wire > 0 && link.wire < SLOW_LINK => SLOW_LEVEL,
            Compression::Auto => DEFAULT_LEVEL,
        };
        let compress = match (link.packed, link.raw) {
            (0, _) => true,
            // One of each first, then the faster (compression only if it
            // earns its CPU), and now and then the other.
            (_, 0) => false,
            (p, r) => {
                let earns = p * EARNS.1 > r * EARNS.0;
                earns != (peer.transfers % EXPLORE_EVERY == EXPLORE_EVERY - 1)
            }
        };
        compress.then_some(packed)
    }
}

impl Compression {
    /// The level to ask for over a bulk connection (protocol version 5):
    /// `auto` leaves it to the holder, which packs each chunk only while
    /// its TCP connection says the link holds the NAR back
    /// (`nar_chunks::ADAPTIVE`, `mesh::pace`); at the slow-link level if
    /// what came from peers so far went slower than `SLOW_LINK`.
    pub fn bulk_level(self, peer: &LinkStats, all: &LinkStats) -> u8 {
        match self {
            Compression::Off => 0,
            Compression::Level(l) => l,
            Compression::Auto => {
                let wire = if peer.wire > 0 { peer.wire } else { all.wire };
                let level = if wire > 0 && wire < SLOW_LINK {
                    SLOW_LEVEL
                } else {
                    DEFAULT_LEVEL
                };
                crate::mesh::nar_chunks::ADAPTIVE | level
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum CompressionSetting {
    Word(String),
    Level(i64),
    /// Anything else, so that the error below names what is wanted.
    Other(serde::de::IgnoredAny),
}

impl TryFrom<CompressionSetting> for Compression {
    type Error = String;

    fn try_from(s: CompressionSetting) -> Result<Self, String> {
        let max = crate::mesh::nar_chunks::MAX_LEVEL;
        match s {
            CompressionSetting::Word(w) if w == "auto" => Ok(Compression::Auto),
            CompressionSetting::Word(w) if w == "off" => Ok(Compression::Off),
            CompressionSetting::Level(l) if (1..=i64::from(max)).contains(&l) => {
                Ok(Compression::Level(l as u8))
            }
            _ => Err(format!(
                "must be \"auto\", \"off\" or a level from 1 to {max}"
            )),
        }
    }
}

/// Whether a transfer of `nar` NAR bytes that took `wire` bytes (`None`:
/// raw bytes, not frames) counts as packed: asked at a `level` above 0 on
/// QUIC; over a bulk connection, where the holder chose chunk by chunk,
/// when the wire saved at least 1/16.
pub fn came_packed(level: Option<u8>, bulk: bool, nar: u64, wire: Option<u64>) -> bool {
    match wire {
        Some(wire) if bulk => wire < nar - nar / 16,
        Some(_) => level.is_some_and(|l| l > 0),
        None => false,
    }
}

/// `link` after a transfer of `nar` NAR bytes, `wire` bytes on the wire,
/// in `secs`, compressed (`packed`) or raw.
pub fn record(link: &mut LinkStats, packed: bool, nar: u64, wire: u64, secs: f64) {
    if nar < MEASURED || secs <= 0.0 {
        return;
    }
    let average = |old: u64, bytes: u64| {
        let sample = (bytes as f64 / secs) as u64;
        if old == 0 {
            sample
        } else {
            (old * 3 + sample) / 4
        }
    };
    link.wire = average(link.wire, wire);
    if packed {
        link.packed = average(link.packed, nar);
    } else {
        link.raw = average(link.raw, nar);
    }
    link.transfers += 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_counts_as_a_packed_transfer() {
        assert!(came_packed(Some(1), false, 1000, Some(1000)));
        assert!(!came_packed(Some(0), false, 1000, Some(400)));
        assert!(!came_packed(Some(1), false, 1000, None));
        assert!(came_packed(Some(0x81), true, 1000, Some(400)));
        assert!(!came_packed(Some(0x81), true, 1000, Some(990)));
    }

    #[test]
    fn bulk_connections_leave_auto_to_the_holder() {
        use crate::mesh::nar_chunks::ADAPTIVE;
        let none = LinkStats::default();
        let slow = LinkStats {
            wire: SLOW_LINK / 2,
            ..LinkStats::default()
        };
        assert_eq!(
            Compression::Auto.bulk_level(&none, &none),
            ADAPTIVE | DEFAULT_LEVEL
        );
        assert_eq!(
            Compression::Auto.bulk_level(&none, &slow),
            ADAPTIVE | SLOW_LEVEL
        );
        assert_eq!(Compression::Off.bulk_level(&slow, &slow), 0);
        assert_eq!(Compression::Level(5).bulk_level(&none, &none), 5);
    }

    const MB: u64 = 1_000_000;

    /// The levels `auto` asks for over `n` transfers of 64 MB from a peer
    /// whose link gives `packed` and `raw` NAR MB/s (and `ratio` wire
    /// bytes per NAR byte when packed).
    fn run(n: usize, packed: u64, raw: u64, ratio: f64) -> Vec<Option<u8>> {
        let mut link = LinkStats::default();
        (0..n)
            .map(|_| {
                let level = Compression::Auto.level(&link, &LinkStats::default());
                let (rate, wire) = match level {
                    Some(_) => (packed, ratio),
                    None => (raw, 1.0),
                };
                let secs = 64.0 / rate as f64;
                let nar = 64 * MB;
                record(
                    &mut link,
                    level.is_some(),
                    nar,
                    (nar as f64 * wire) as u64,
                    secs,
                );
                level
            })
            .collect()
    }

    #[test]
    fn auto_takes_the_faster_kind_and_tries_the_other_now_and_then() {
        // A 1 Gbit/s link, real binaries: packing wins.
        let gbit = run(24, 248, 119, 0.38);
        assert_eq!(gbit[0], Some(DEFAULT_LEVEL));
        assert_eq!(gbit[1], None, "raw is measured once");
        let raw = gbit[2..].iter().filter(|l| l.is_none()).count();
        assert_eq!(raw, 3, "{gbit:?}");
        // veth, CPU-bound: raw wins.
        let veth = run(24, 241, 366, 0.38);
        let packed = veth[2..].iter().filter(|l| l.is_some()).count();
        assert_eq!(packed, 3, "{veth:?}");
        // A slow link gets the tighter level.
        let slow = run(3, 11, 5, 0.38);
        assert_eq!(slow[2], Some(SLOW_LEVEL));
    }

    #[test]
    fn compression_must_earn_its_cpu() {
        // Both kinds at Nix's pace (a fast link): raw, bar the explorations.
        let paced = run(24, 200, 190, 0.38);
        let packed = paced[2..].iter().filter(|l| l.is_some()).count();
        assert_eq!(packed, 3, "{paced:?}");
        // Packed clearly ahead: packed.
        let ahead = run(24, 260, 190, 0.38);
        let raw = ahead[2..].iter().filter(|l| l.is_none()).count();
        assert_eq!(raw, 3, "{ahead:?}");
    }

    #[test]
    fn a_new_peer_is_judged_by_what_all_peers_achieved() {
        let fast_lan = LinkStats {
            wire: 300 * MB,
            packed: 200 * MB,
            raw: 300 * MB,
            transfers: 6,
        };
        let new = LinkStats::default();
        assert_eq!(Compression::Auto.level(&new, &fast_lan), None);
        let gbit = LinkStats {
            wire: 110 * MB,
            packed: 250 * MB,
            raw: 119 * MB,
            transfers: 6,
        };
        assert_eq!(Compression::Auto.level(&new, &gbit), Some(DEFAULT_LEVEL));
        // Once the peer is measured both ways, its own figures count.
        let measured = LinkStats {
            wire: 110 * MB,
            packed: 100 * MB,
            raw: 119 * MB,
            transfers: 2,
        };
        assert_eq!(Compression::Auto.level(&measured, &gbit), None);
        // Nothing measured anywhere: packed first.
        assert_eq!(Compression::Auto.level(&new, &new), Some(DEFAULT_LEVEL));
    }

    #[test]
    fn off_and_a_level_are_what_they_say() {
        let link = LinkStats {
            wire: 5 * MB,
            packed: 10 * MB,
            raw: 100 * MB,
            transfers: 4,
        };
        let none = LinkStats::default();
        assert_eq!(Compression::Off.level(&none, &none), None);
        assert_eq!(Compression::Level(6).level(&link, &none), Some(6));
        assert_eq!(Compression::Auto.level(&link, &none), None);
    }

    #[test]
    fn the_setting_is_a_word_or_a_level() {
        #[derive(Deserialize)]
        struct T {
            c: Compression,
        }
        let parse = |v: &str| toml::from_str::<T>(&format!("c = {v}")).map(|t| t.c);
        assert_eq!(parse("\"auto\"").unwrap(), Compression::Auto);
        assert_eq!(parse("\"off\"").unwrap(), Compression::Off);
        assert_eq!(parse("3").unwrap(), Compression::Level(3));
        for bad in ["0", "10", "\"fast\"", "true"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("\"auto\", \"off\" or a level from 1 to 9"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn small_transfers_leave_the_estimate_alone() {
        let mut link = LinkStats::default();
        record(&mut link, true, 1000, 500, 0.001);
        assert_eq!(link, LinkStats::default());
        record(&mut link, true, 8 << 20, 4 << 20, 0.1);
        assert_eq!(
            (link.packed, link.wire, link.transfers),
            (83_886_080, 41_943_040, 1)
        );
        record(&mut link, false, 4 << 20, 4 << 20, 1.0);
        assert_eq!(link.raw, 4 << 20);
        assert_eq!(link.wire, (41_943_040 * 3 + (4 << 20)) / 4);
    }
}
