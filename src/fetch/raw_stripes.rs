//! Raw stripes where the asker, not the link, holds a striped NAR back.
//!
//! Over a bulk connection the holder picks each chunk's codec from what
//! its TCP connection says of the link (`mesh::pace`). A striped holder's
//! connection carries 2 MiB answers; on a fast link each answer's last
//! bytes wait for the asker's delayed acknowledgement while the connection
//! counts as busy, so the holder reads the link at a few tens of MB/s and
//! sends zstd frames, which the asker must unpack. Where the asker's CPU
//! is what holds the NAR back (a fast LAN, Nix busy beside it), striping
//! then came slower than one holder sending raw bytes. The stripes'
//! throughput cannot tell the two apart either: on a busy asker every
//! holder's share of it looks like a slow link's.
//!
//! What does tell them apart is whether the asker waits for its frames. It
//! notes, for each frame of a stripe, whether its header was already there
//! when it came to read it (`mesh::nar_reader::Waits`). A link that holds
//! the NAR back keeps the asker waiting; an asker that is behind finds its
//! frames there. Where most of a holder's frames were there (`BEHIND`),
//! one stripe is asked raw, to try. Raw stripes then go on while the
//! stripes left to the holder do not come `EARNS` faster than raw ones
//! (compression must earn the asker's CPU), with every `RECHECK`th stripe
//! left to the holder again to keep that current. Each trial that lost
//! doubles the wait for the next (from `RETRY`, so 64 stripes after the
//! first loss), up to `RETRY_MAX`: on a slow link, where an asker can find
//! its frames there too (a token bucket's bursts, its CPU busy with Nix),
//! a raw stripe costs the link 2–3 times a compressed one's time. A trial
//! that lost and whose bytes came at most `SAME_WIRE` times as fast on the
//! wire as the packed stripes' bytes found the link full: the link, not
//! the asker, held both back, and raw cannot win there while the data
//! packs as well, so the next trial waits `RETRY_MAX` at once. Where the
//! asker held the packed stripes back, raw bytes, which it need not
//! unpack, come faster on the wire by about the packing ratio. (Data that
//! packs less than `SAME_WIRE` times `EARNS` makes every loss look so: raw
//! then at best matches the packed stripes' pace on the wire, and could
//! only win by a chance, not worth a trial every few dozen stripes; the
//! first stripes of a NAR of real binaries pack 1.3–1.8 to one.)
//!
//! Pure: one per holder, kept from one striped NAR to the next
//! (`renewed`), so that a holder whose raw trials lost is not tried again
//! for every NAR, and one whose raw stripes win gets raw ones from a NAR's
//! first stripe.

/// The share of a holder's frames found already there at or above which
/// the asker, not the link, is taken to hold the stripes back.
pub const BEHIND: f64 = 0.5;
/// While raw stripes win, one in this many is left to the holder.
pub const RECHECK: u64 = 16;
/// After a raw trial, this many stripes before the next…
pub const RETRY: u64 = 32;
/// …doubling with each trial raw stripes lost, up to this many.
pub const RETRY_MAX: u64 = 256;
/// A raw trial that lost, at a rate below this many times the wire rate
/// of the stripes left to the holder, found the link full.
pub const SAME_WIRE: f64 = 1.25;

use crate::fetch::compression::EARNS;
use crate::mesh::nar_chunks::ADAPTIVE;
use crate::mesh::nar_reader::Waits;
use crate::mesh::pace::follow;

/// Which level to ask one holder's next stripe at.
#[derive(Clone, Debug)]
pub struct RawStripes {
    /// The level that leaves the codec to the holder (`ADAPTIVE`), or a
    /// fixed one (`compression` off or a level), which is always asked.
    chosen: u8,
    /// NAR bytes per second of stripes left to the holder.
    left: Option<f64>,
    /// Their bytes on the wire per second.
    left_wire: Option<f64>,
    /// NAR bytes (and so wire bytes) per second of raw stripes.
    raw: Option<f64>,
    /// Of the frames of stripes left to the holder, the share found there.
    behind: Option<f64>,
    /// Stripes asked so far, the count at the last raw trial, and the
    /// stripes from there to the next.
    asked: u64,
    tried_at: Option<u64>,
    retry: u64,
}

impl RawStripes {
    /// For a holder asked at `level` when the choice is its own (with
    /// `mesh::nar_chunks::ADAPTIVE`), or always at `level` without.
    pub fn new(level: u8) -> Self {
        Self {
            chosen: level,
            left: None,
            left_wire: None,
            raw: None,
            behind: None,
            asked: 0,
            tried_at: None,
            retry: RETRY,
        }
    }

    /// What was learnt of the holder, for a NAR whose stripes are to be
    /// asked at `level`. A choice that is no longer the holder's (or has
    /// just become so) starts afresh.
    pub fn renewed(self, level: u8) -> Self {
        match self.adaptive() && level & ADAPTIVE != 0 {
            true => Self {
                chosen: level,
                ..self
            },
            false => Self::new(level),
        }
    }

    /// The holder chooses the codec of stripes not asked raw.
    fn adaptive(&self) -> bool {
        self.chosen & ADAPTIVE != 0
    }

    /// Raw stripes come fast enough that stripes left to the holder do not
    /// earn the asker's CPU (compression must be `EARNS` faster).
    fn raw_wins(&self) -> bool {
        match (self.left, self.raw) {
            (Some(left), Some(raw)) => left * (EARNS.1 as f64) < raw * (EARNS.0 as f64),
            _ => false,
        }
    }

    /// The level for the next stripe: 0 for raw chunks.
    pub fn level(&mut self) -> u8 {
        self.asked += 1;
        if !self.adaptive() {
            return self.chosen;
        }
        if self.raw_wins() {
            return match self.asked % RECHECK {
                0 => self.chosen,
                _ => 0,
            };
        }
        let behind = self.behind.is_some_and(|b| b >= BEHIND);
        let due = self.tried_at.is_none_or(|at| self.asked >= at + self.retry);
        if behind && due {
            self.tried_at = Some(self.asked);
            return 0;
        }
        self.chosen
    }

    /// A raw stripe at `raw` bytes per second came at most a quarter
    /// faster on the wire than the stripes left to the holder: the link
    /// carried what it could either way.
    fn link_full(&self, raw: f64) -> bool {
        self.left_wire
            .is_some_and(|left_wire| raw < left_wire * SAME_WIRE)
    }

    /// A stripe asked at `level` came whole: `nar` bytes in `secs`, `wire`
    /// bytes of them on the wire, with `waits` of its frames.
    pub fn arrived(&mut self, level: u8, nar: u64, wire: u64, secs: f64, waits: Waits) {
        let Waits { frames, there } = waits;
        if !self.adaptive() || secs <= 0.0 || nar == 0 {
            return;
        }
        let rate = nar as f64 / secs;
        if level == 0 {
            self.raw = follow(self.raw, rate);
            self.retry = match (self.raw_wins(), self.link_full(rate)) {
                (true, _) => RETRY,
                (false, true) => RETRY_MAX,
                (false, false) => (self.retry * 2).min(RETRY_MAX),
            };
        } else {
            self.left = follow(self.left, rate);
            self.left_wire = follow(self.left_wire, wire as f64 / secs);
            if frames > 0 {
                let share = f64::from(there.min(frames)) / f64::from(frames);
                self.behind = follow(self.behind, share);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRIPE: u64 = 2 << 20;
    const AUTO: u8 = ADAPTIVE | 1;

    /// Eight frames, `there` of them found already arrived.
    fn waits(there: u32) -> Waits {
        Waits { frames: 8, there }
    }

    /// NAR bytes per wire byte of stripes left to the holder: real
    /// binaries in kept zstd frames.
    const PACKS: f64 = 2.7;

    /// `n` stripes from a holder whose stripes left to it come at `left`
    /// bytes per second with `there` of 8 frames found there, and raw ones
    /// at `raw`: the levels asked, in order.
    fn run(n: usize, left: f64, there: u32, raw: f64) -> Vec<u8> {
        run_on(&mut RawStripes::new(AUTO), n, left, there, raw)
    }

    /// `run`, on what `s` has learnt so far.
    fn run_on(s: &mut RawStripes, n: usize, left: f64, there: u32, raw: f64) -> Vec<u8> {
        run_packed(s, n, (left, PACKS), there, raw)
    }

    /// `run_on`, with the stripes left to the holder packed at `left.1`
    /// NAR bytes per wire byte.
    fn run_packed(s: &mut RawStripes, n: usize, left: (f64, f64), there: u32, raw: f64) -> Vec<u8> {
        let (rate, packs) = left;
        let wire = (STRIPE as f64 / packs) as u64;
        (0..n)
            .map(|_| {
                let level = s.level();
                match level {
                    0 => s.arrived(0, STRIPE, STRIPE, STRIPE as f64 / raw, waits(8)),
                    _ => s.arrived(level, STRIPE, wire, STRIPE as f64 / rate, waits(there)),
                }
                level
            })
            .collect()
    }

    /// The indices of the raw stripes among `levels`, and the gaps between.
    fn trials(levels: &[u8]) -> (Vec<usize>, Vec<usize>) {
        let raw: Vec<usize> = (0..levels.len()).filter(|i| levels[*i] == 0).collect();
        let gaps = raw.windows(2).map(|p| p[1] - p[0]).collect();
        (raw, gaps)
    }

    fn raw_share(levels: &[u8]) -> f64 {
        levels.iter().filter(|l| **l == 0).count() as f64 / levels.len() as f64
    }

    #[test]
    fn an_asker_that_waits_for_its_frames_leaves_the_codec_to_the_holder() {
        // A 300 Mbit/s link: the asker waits for nearly every frame.
        let levels = run(200, 100e6, 1, 37e6);
        assert!(levels.iter().all(|l| *l == AUTO), "{levels:?}");
    }

    #[test]
    fn an_asker_that_is_behind_tries_raw_and_keeps_it_where_it_is_faster() {
        // A fast LAN, the asker's CPU the limit: frames are there, and raw
        // stripes, which it need not unpack, come faster.
        let levels = run(200, 200e6, 8, 300e6);
        assert_eq!(levels[0], AUTO, "the first stripe is the holder's choice");
        assert_eq!(levels[1], 0, "then a raw trial");
        let share = raw_share(&levels);
        assert!(share > 0.9, "raw share {share}: {levels:?}");
        // …with every RECHECK-th left to the holder, to keep comparing.
        assert!(levels.contains(&AUTO) && share < 1.0);
    }

    #[test]
    fn a_raw_trial_that_loses_waits_ever_longer_before_the_next() {
        // The asker finds its frames there, and raw stripes come faster on
        // the wire than packed ones (the asker's unpacking held those
        // back), but not fast enough to win: the asker was only somewhat
        // behind.
        let mut s = RawStripes::new(AUTO);
        let levels = run_packed(&mut s, 1000, (300e6, 4.0), 8, 110e6);
        let (raw, gaps) = trials(&levels);
        assert_eq!(
            raw.first(),
            Some(&1),
            "it tries raw once frames are seen there"
        );
        assert_eq!(gaps[..3], [64, 128, 256], "trials at {raw:?}");
        assert!(
            gaps[3..].iter().all(|g| *g == RETRY_MAX as usize),
            "{gaps:?}"
        );
        assert!(raw_share(&levels) < 0.01, "{levels:?}");
    }

    #[test]
    fn a_raw_trial_that_finds_the_link_full_waits_longest() {
        // The asker finds its frames there, but raw bytes come no faster
        // on the wire than packed ones: the link is the limit after all (a
        // slow link whose bursts fill the asker's buffers, compressed
        // binaries at 2.7 NAR bytes per wire byte, raw at 110 MB/s).
        let levels = run(1000, 300e6, 8, 110e6);
        assert_eq!(trials(&levels).0, [1, 257, 513, 769], "{levels:?}");
        // Packed four to one, raw a fifth faster on the wire than packed
        // stripes (and far from winning): still the link's pace…
        let mut s = RawStripes::new(AUTO);
        let levels = run_packed(&mut s, 300, (300e6, 4.0), 8, 1.2 * 75e6);
        assert_eq!(trials(&levels).0, [1, 257], "{levels:?}");
        // …where half as fast again is the asker's unpacking (the doubling
        // test above: 110 MB/s against 75 on the wire).
    }

    #[test]
    fn a_near_miss_of_data_that_packs_little_is_taken_for_a_full_link() {
        // Packed stripes at 1.5 NAR bytes per wire byte, raw 4 % short of
        // winning and on the wire a sixth faster than them: at best the
        // packed stripes' pace, so no trial every few dozen stripes.
        let mut s = RawStripes::new(AUTO);
        let levels = run_packed(&mut s, 600, (300e6, 1.5), 8, 230e6);
        assert_eq!(trials(&levels).0, [1, 257, 513], "{levels:?}");
    }

    #[test]
    fn raw_stripes_must_be_beaten_by_a_quarter_to_give_way() {
        // Stripes left to the holder come 20 % faster: not enough to pay
        // for the asker's unpacking.
        let levels = run(200, 240e6, 8, 200e6);
        assert!(raw_share(&levels) > 0.9, "{levels:?}");
        // 30 % faster: they are asked for again.
        let levels = run(200, 260e6, 8, 200e6);
        assert!(raw_share(&levels) < 0.05, "{levels:?}");
    }

    #[test]
    fn the_next_nar_goes_on_from_what_the_last_one_learnt() {
        // A slow link: 85 stripes of a NAR (512 MiB over three holders).
        let mut s = RawStripes::new(AUTO);
        let first = run_on(&mut s, 85, 300e6, 8, 110e6);
        assert_eq!(trials(&first).0, [1], "{first:?}");
        // The next NAR's stripes from the same holder: the trials that lost
        // are not made again at once.
        let mut s = s.renewed(AUTO);
        let next = run_on(&mut s, 85, 300e6, 8, 110e6);
        assert!(next.iter().all(|l| *l == AUTO), "{next:?}");
        // A fast LAN where raw won: the next NAR is raw from its first
        // stripe.
        let mut s = RawStripes::new(AUTO);
        run_on(&mut s, 20, 200e6, 8, 300e6);
        let mut s = s.renewed(ADAPTIVE | 3);
        let next = run_on(&mut s, 20, 200e6, 8, 300e6);
        assert_eq!(next[0], 0, "{next:?}");
        // The stripe left to the holder is asked at its new level.
        assert!(next.contains(&(ADAPTIVE | 3)), "{next:?}");
    }

    #[test]
    fn a_level_no_longer_the_holders_starts_afresh() {
        let mut s = RawStripes::new(AUTO);
        run_on(&mut s, 20, 200e6, 8, 300e6);
        // `compression` set to a level: that level, always.
        let mut fixed = s.clone().renewed(3);
        assert_eq!(run_on(&mut fixed, 5, 200e6, 8, 300e6), [3; 5]);
        // And back to the holder's choice: nothing carried from before.
        let mut again = fixed.renewed(AUTO);
        assert_eq!(again.level(), AUTO);
        assert_eq!(again.left, None);
    }

    #[test]
    fn a_fixed_level_or_off_is_always_what_is_asked() {
        for level in [0, 1, 3] {
            let mut s = RawStripes::new(level);
            for _ in 0..100 {
                assert_eq!(s.level(), level);
                s.arrived(level, STRIPE, STRIPE, 0.001, waits(8));
            }
        }
    }

    #[test]
    fn nothing_measured_changes_nothing() {
        let mut s = RawStripes::new(AUTO);
        s.arrived(AUTO, 0, 0, 1.0, waits(8));
        s.arrived(AUTO, STRIPE, STRIPE, 0.0, waits(8));
        s.arrived(AUTO, STRIPE, STRIPE, 1.0, Waits::default());
        // A stripe with no frames (cannot happen) says nothing of them.
        assert_eq!(s.behind, None);
        assert_eq!(s.level(), AUTO);
    }
}
