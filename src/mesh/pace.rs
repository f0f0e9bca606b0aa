//! Whether a holder should compress the next chunk of a NAR it sends over
//! a bulk connection (a request with `nar_chunks::ADAPTIVE`). Compression
//! pays while the link, not the holder, is what holds the transfer back:
//! packed chunks then carry more NAR per second than raw ones would. The
//! holder knows both sides of that: its TCP connection measures what the
//! link delivers (the kernel's delivery rate, while the holder keeps the
//! connection busy), and it times its own packing. So it decides chunk by
//! chunk, from the first NAR on, without a guess about a peer it has not
//! measured, and follows a link that changes.
//!
//! Packed, a chunk goes out at about `min(pack rate, link / ratio)` NAR
//! bytes per second; raw, at the link's rate. Compression must earn its
//! CPU: it is chosen only while packed is `EARNS` faster. While raw, one
//! chunk in `PROBE_EVERY` is packed anyway, to keep the ratio and the pack
//! rate current (real closures change from text to compressed data and
//! back). Pure.

/// Packed must beat raw by this much (5/4) to be chosen.
pub const EARNS: (f64, f64) = (5.0, 4.0);
/// While raw, every this many chunks one is packed to measure.
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

#[derive(Debug, Default)]
pub struct Pace {
    /// Wire bytes per second the link delivers when kept busy.
    link: Option<f64>,
    /// NAR bytes per second packing achieves.
    pack_rate: Option<f64>,
    /// Wire bytes per NAR byte of chunks that were packed.
    ratio: Option<f64>,
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
    pub fn link(&mut self, s: LinkSample) {
        if !s.app_limited && s.delivery_rate > 0 {
            self.link = follow(self.link, s.delivery_rate as f64);
        }
    }

    /// A chunk of `raw` NAR bytes was packed to `wire` bytes in `secs`.
    pub fn packed(&mut self, raw: usize, wire: usize, secs: f64) {
        if raw == 0 {
            return;
        }
        self.ratio = follow(self.ratio, wire as f64 / raw as f64);
        if secs > 0.0 {
            self.pack_rate = follow(self.pack_rate, raw as f64 / secs);
        }
    }

    /// Whether packing the next chunk is worth trying.
    pub fn compress_next(&mut self) -> bool {
        self.chunks += 1;
        let probe = self.chunks % PROBE_EVERY == 1;
        let (Some(link), Some(pack), Some(ratio)) = (self.link, self.pack_rate, self.ratio) else {
            // The first chunk is packed to learn the pack rate and ratio;
            // then raw until the link has been measured.
            return self.pack_rate.is_none() || probe;
        };
        let packed = pack.min(link / ratio.max(1e-3));
        packed * EARNS.1 > link * EARNS.0 || probe
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    /// Chunks of 256 KiB sent over a link of `link` wire bytes per second
    /// by a holder that packs at `pack` NAR bytes per second to `ratio`;
    /// how many of `n` chunks were packed.
    fn run(n: u64, link: f64, pack: f64, ratio: f64) -> u64 {
        let chunk = 256 << 10;
        let mut pace = Pace::default();
        let mut packed = 0;
        for _ in 0..n {
            let compress = pace.compress_next();
            if compress {
                packed += 1;
                let wire = (chunk as f64 * ratio) as usize;
                pace.packed(chunk, wire, chunk as f64 / pack);
            }
            // Packing slower than the link drains leaves it idle part of
            // the time: app-limited.
            let app_limited = compress && pack * ratio < link;
            pace.link(LinkSample {
                delivery_rate: link as u64,
                app_limited,
            });
        }
        packed
    }

    #[test]
    fn a_gigabit_link_gets_packed_binaries() {
        // 125 MB/s link, packing 220 MB/s to 0.38: packed carries 220.
        let packed = run(400, 125.0 * MB, 220.0 * MB, 0.38);
        assert!(packed > 390, "{packed} of 400 packed");
    }

    #[test]
    fn a_link_faster_than_packing_gets_raw_bytes_but_for_probes() {
        // Unshaped veth or 10 GbE: 400 MB/s raw against 220 MB/s packing.
        let packed = run(400, 400.0 * MB, 220.0 * MB, 0.38);
        assert!(packed <= 400 / PROBE_EVERY + 2, "{packed} of 400 packed");
    }

    #[test]
    fn bytes_that_do_not_compress_go_raw_on_a_slow_link_too() {
        let packed = run(400, 12.5 * MB, 220.0 * MB, 1.0);
        assert!(packed <= 400 / PROBE_EVERY + 2, "{packed} of 400 packed");
    }

    #[test]
    fn a_link_that_slows_down_is_followed() {
        let mut pace = Pace::default();
        let chunk = 256 << 10;
        let mut tail = Vec::new();
        for i in 0..200 {
            let link = if i < 100 { 400.0 * MB } else { 100.0 * MB };
            let compress = pace.compress_next();
            if compress {
                pace.packed(chunk, chunk / 3, chunk as f64 / (220.0 * MB));
            }
            pace.link(LinkSample {
                delivery_rate: link as u64,
                app_limited: compress && link > 220.0 * MB / 3.0,
            });
            if i >= 150 {
                tail.push(compress);
            }
        }
        assert!(tail.iter().all(|c| *c), "{tail:?}");
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
}
