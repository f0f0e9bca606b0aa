//! Which codec, if any, a holder should pack the next chunk of a NAR with
//! when it sends over a bulk connection (a request with
//! `nar_chunks::ADAPTIVE`). Compression pays while the link, not the
//! holder, is what holds the transfer back: packed chunks then carry more
//! NAR per second than raw ones would. The holder knows both sides of
//! that: its TCP connection measures what the link delivers (the kernel's
//! delivery rate, while the holder keeps the connection busy), and it
//! times its own packing. So it decides chunk by chunk, from the first NAR
//! on, without a guess about a peer it has not measured, and follows a
//! link that changes.
//!
//! Packed with a codec, a chunk goes out at about `min(pack rate, link /
//! ratio)` NAR bytes per second; raw, at the link's rate. Compression must
//! earn its CPU: it is chosen only while packed is `EARNS` faster. Where
//! the asker reads LZ4 (version 6) it is the first choice, and zstd, which
//! costs both ends more CPU per byte, is chosen only while it carries
//! `EARNS` more than LZ4 would (a slow link, where its smaller chunks
//! count). One chunk in `PROBE_EVERY` is packed with each codec in turn
//! anyway, to keep ratios and pack rates current (real closures change
//! from text to compressed data and back). Pure.

use crate::mesh::nar_chunks::Codec;

/// Packed must beat raw (and zstd beat LZ4) by this much (5/4) to be
/// chosen.
pub const EARNS: (f64, f64) = (5.0, 4.0);
/// Every this many chunks one is packed to measure.
pub const PROBE_EVERY: u64 = 32;

/// What the kernel says about a TCP connection just now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkSample {
    /// Bytes per second the latest acknowledgements delivered.
    pub delivery_rate: u64,
    /// The holder did not keep the connection busy then, so the rate says
    /// less than what the link could carry.
    pub app_limited: bool,
}

/// What packing with one codec achieves.
#[derive(Debug, Default)]
struct Packing {
    /// NAR bytes per second.
    rate: Option<f64>,
    /// Wire bytes per NAR byte.
    ratio: Option<f64>,
}

impl Packing {
    /// NAR bytes per second packed chunks carry over `link`.
    fn carries(&self, link: f64) -> Option<f64> {
        Some(self.rate?.min(link / self.ratio?.max(1e-3)))
    }
}

#[derive(Debug, Default)]
pub struct Pace {
    /// Wire bytes per second the link delivers when kept busy.
    link: Option<f64>,
    zstd: Packing,
    /// `None`: the asker does not read LZ4.
    lz4: Option<Packing>,
    chunks: u64,
}

/// A moving average that follows a change within a few samples.
fn follow(old: Option<f64>, sample: f64) -> Option<f64> {
    Some(match old {
        None => sample,
        Some(o) => (o * 3.0 + sample) / 4.0,
    })
}

impl Pace {
    /// A pace for an asker that reads LZ4 chunks (`lz4`) or zstd only.
    pub fn new(lz4: bool) -> Self {
        Self {
            lz4: lz4.then(Packing::default),
            ..Self::default()
        }
    }

    pub fn link(&mut self, s: LinkSample) {
        if !s.app_limited && s.delivery_rate > 0 {
            self.link = follow(self.link, s.delivery_rate as f64);
        }
    }

    fn packing(&mut self, codec: Codec) -> Option<&mut Packing> {
        match codec {
            Codec::Zstd => Some(&mut self.zstd),
            Codec::Lz4 => self.lz4.as_mut(),
        }
    }

    /// A chunk of `raw` NAR bytes was packed with `codec` to `wire` bytes
    /// in `secs`.
    pub fn packed(&mut self, codec: Codec, raw: usize, wire: usize, secs: f64) {
        let Some(p) = self.packing(codec).filter(|_| raw > 0) else {
            return;
        };
        p.ratio = follow(p.ratio, wire as f64 / raw as f64);
        if secs > 0.0 {
            p.rate = follow(p.rate, raw as f64 / secs);
        }
    }

    /// The codec to pack the next chunk with; `None`: send it raw.
    pub fn choose(&mut self) -> Option<Codec> {
        self.chunks += 1;
        let codecs: &[Codec] = match self.lz4 {
            Some(_) => &[Codec::Lz4, Codec::Zstd],
            None => &[Codec::Zstd],
        };
        let probe = (self.chunks % PROBE_EVERY == 1)
            .then(|| codecs[(self.chunks / PROBE_EVERY) as usize % codecs.len()]);
        // Each codec packs a chunk first, to learn its rate and ratio;
        // then raw until the link has been measured.
        if let Some(c) = codecs
            .iter()
            .find(|c| self.packing(**c).is_some_and(|p| p.rate.is_none()))
        {
            return Some(*c);
        }
        let Some(link) = self.link else {
            return probe;
        };
        let zstd = self.zstd.carries(link).unwrap_or(0.0);
        let best = match self.lz4.as_ref().and_then(|p| p.carries(link)) {
            Some(lz4) if zstd * EARNS.1 <= lz4 * EARNS.0 => (Codec::Lz4, lz4),
            _ => (Codec::Zstd, zstd),
        };
        if best.1 * EARNS.1 > link * EARNS.0 {
            Some(best.0)
        } else {
            probe
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;
    const CHUNK: usize = 256 << 10;

    /// How a codec packs this data: NAR bytes per second, wire per NAR byte.
    #[derive(Clone, Copy)]
    struct Packs {
        rate: f64,
        ratio: f64,
    }

    /// This machine's binaries (issue 14's corpus), one core each.
    const ZSTD: Packs = Packs {
        rate: 220.0 * MB,
        ratio: 0.37,
    };
    const LZ4: Packs = Packs {
        rate: 370.0 * MB,
        ratio: 0.50,
    };

    /// Chunks sent over a link of `link` wire bytes per second; what each
    /// of `n` chunks went as (`None`: raw).
    fn run(n: u64, link: f64, lz4: Option<Packs>, zstd: Packs) -> Vec<Option<Codec>> {
        let mut pace = Pace::new(lz4.is_some());
        (0..n)
            .map(|_| {
                let codec = pace.choose();
                let packs = match codec {
                    Some(Codec::Lz4) => lz4,
                    Some(Codec::Zstd) => Some(zstd),
                    None => None,
                };
                if let (Some(c), Some(p)) = (codec, packs) {
                    let wire = (CHUNK as f64 * p.ratio) as usize;
                    pace.packed(c, CHUNK, wire, CHUNK as f64 / p.rate);
                }
                // Packing slower than the link drains leaves it idle part
                // of the time: app-limited.
                let app_limited = packs.is_some_and(|p| p.rate * p.ratio < link);
                pace.link(LinkSample {
                    delivery_rate: link as u64,
                    app_limited,
                });
                codec
            })
            .collect()
    }

    fn count(sent: &[Option<Codec>], codec: Option<Codec>) -> usize {
        sent.iter().filter(|c| **c == codec).count()
    }

    #[test]
    fn a_gigabit_link_gets_packed_binaries() {
        // 125 MB/s link: zstd carries 220 MB/s of NAR, so it is chosen
        // for an asker that reads zstd only.
        let sent = run(400, 125.0 * MB, None, ZSTD);
        assert!(count(&sent, Some(Codec::Zstd)) > 390, "{sent:?}");
    }

    #[test]
    fn a_gigabit_link_gets_lz4_where_the_asker_reads_it() {
        // LZ4 carries 250 MB/s (the link at 0.5), zstd 220: not 5/4 more.
        let sent = run(400, 125.0 * MB, Some(LZ4), ZSTD);
        assert!(count(&sent, Some(Codec::Lz4)) > 380, "{sent:?}");
        // zstd only when it is learnt and probed.
        assert!(
            count(&sent, Some(Codec::Zstd)) <= 400 / 32 / 2 + 2,
            "{sent:?}"
        );
    }

    #[test]
    fn a_slow_link_gets_zstd_whose_chunks_are_smaller() {
        // 100 Mbit/s: zstd carries 33.8 MB/s of NAR, LZ4 25.
        let sent = run(400, 12.5 * MB, Some(LZ4), ZSTD);
        assert!(count(&sent, Some(Codec::Zstd)) > 380, "{sent:?}");
    }

    #[test]
    fn a_link_faster_than_packing_gets_raw_bytes_but_for_probes() {
        // Unshaped veth or 10 GbE: 400 MB/s raw against 370 MB/s packing.
        for lz4 in [None, Some(LZ4)] {
            let sent = run(400, 400.0 * MB, lz4, ZSTD);
            let packed = 400 - count(&sent, None);
            assert!(packed <= 400 / PROBE_EVERY as usize + 2, "{sent:?}");
        }
    }

    #[test]
    fn bytes_that_do_not_compress_go_raw_on_a_slow_link_too() {
        let noise = |p: Packs| Packs { ratio: 1.0, ..p };
        let sent = run(400, 12.5 * MB, Some(noise(LZ4)), noise(ZSTD));
        let packed = 400 - count(&sent, None);
        assert!(packed <= 400 / PROBE_EVERY as usize + 2, "{sent:?}");
    }

    #[test]
    fn a_link_that_slows_down_is_followed() {
        let mut pace = Pace::new(false);
        let mut tail = Vec::new();
        for i in 0..200 {
            let link = if i < 100 { 400.0 * MB } else { 100.0 * MB };
            let codec = pace.choose();
            if let Some(c) = codec {
                pace.packed(c, CHUNK, CHUNK / 3, CHUNK as f64 / (220.0 * MB));
            }
            pace.link(LinkSample {
                delivery_rate: link as u64,
                app_limited: codec.is_some() && link > 220.0 * MB / 3.0,
            });
            if i >= 150 {
                tail.push(codec);
            }
        }
        assert!(tail.iter().all(|c| c.is_some()), "{tail:?}");
    }

    #[test]
    fn app_limited_samples_say_nothing_about_the_link() {
        let mut pace = Pace::default();
        pace.link(LinkSample {
            delivery_rate: 1000,
            app_limited: true,
        });
        assert_eq!(pace.link, None);
        pace.link(LinkSample {
            delivery_rate: 0,
            app_limited: false,
        });
        assert_eq!(pace.link, None);
    }

    #[test]
    fn a_codec_the_asker_does_not_read_is_never_chosen() {
        let mut pace = Pace::new(false);
        pace.packed(Codec::Lz4, CHUNK, CHUNK / 2, 0.001);
        let sent = run(100, 125.0 * MB, None, ZSTD);
        assert_eq!(count(&sent, Some(Codec::Lz4)), 0);
        assert_eq!(pace.choose(), Some(Codec::Zstd));
    }
}
