//! Which zstd level to ask a holder to compress a NAR at: the receiver's
//! choice (`mesh.compression`), from what it measured of the link to that
//! holder. Compression pays while the link is slower than zstd: level 1
//! packs a few hundred MB/s per core, so it pays on any LAN up to some
//! Gbit/s; a slow link (100 Mbit/s and under) gets level 3, which packs
//! a little tighter for the CPU the link leaves idle anyway. Data that does
//! not compress costs little: the holder sends such chunks raw
//! (`mesh::nar_chunks`). Pure.

use serde::Deserialize;

/// Links slower than this (100 Mbit/s) get `SLOW_LEVEL`.
pub const SLOW_LINK: u64 = 12_500_000;
/// Links faster than this (8 Gbit/s) get raw bytes: zstd's level 1 would
/// be slower than the link.
pub const FAST_LINK: u64 = 1_000_000_000;
pub const SLOW_LEVEL: u8 = 3;
pub const DEFAULT_LEVEL: u8 = 1;

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
    /// The level to ask for over a link measured at `link_bytes_per_sec`
    /// (0: not measured yet); `None`: raw bytes, as agents before protocol
    /// version 3 send them.
    pub fn level(self, link_bytes_per_sec: u64) -> Option<u8> {
        match self {
            Compression::Off => None,
            Compression::Level(l) => Some(l),
            Compression::Auto => match link_bytes_per_sec {
                0 => Some(DEFAULT_LEVEL),
                b if b < SLOW_LINK => Some(SLOW_LEVEL),
                b if b > FAST_LINK => None,
                _ => Some(DEFAULT_LEVEL),
            },
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

/// The link's new moving average after a transfer of `bytes` on the wire
/// in `secs`: transfers under 1 MiB say more about latency than the link
/// and leave it as it was.
pub fn measure(old: u64, bytes: u64, secs: f64) -> u64 {
    if bytes < 1 << 20 || secs <= 0.0 {
        return old;
    }
    let sample = (bytes as f64 / secs) as u64;
    if old == 0 {
        sample
    } else {
        (old * 3 + sample) / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_link() {
        let auto = Compression::Auto;
        assert_eq!(auto.level(0), Some(DEFAULT_LEVEL));
        assert_eq!(auto.level(5_000_000), Some(SLOW_LEVEL));
        assert_eq!(auto.level(117_000_000), Some(DEFAULT_LEVEL));
        assert_eq!(auto.level(3_000_000_000), None);
        assert_eq!(Compression::Off.level(5_000_000), None);
        assert_eq!(Compression::Level(6).level(3_000_000_000), Some(6));
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
        assert_eq!(measure(0, 1000, 0.001), 0);
        assert_eq!(measure(0, 8 << 20, 0.1), 83_886_080);
        assert_eq!(measure(100, 4 << 20, 1.0), (300 + (4 << 20)) / 4);
    }
}
