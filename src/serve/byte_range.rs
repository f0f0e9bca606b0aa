//! HTTP `Range` requests on NAR URLs (RFC 9110, one range of bytes), so a
//! modern Nix whose download was cut off resumes where it stopped instead
//! of starting again. Pure: a header value and the NAR size in, what to
//! answer out.
//!
//! Only single ranges are honoured. A header that does not parse, a unit
//! other than `bytes`, or a list of ranges is ignored, as the RFC allows:
//! the whole NAR is sent with `200`.

/// What to answer a NAR request of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// `200` with the whole NAR.
    Whole,
    /// `206` with bytes `first..=last`.
    Part { first: u64, last: u64 },
    /// `416`: the range starts past the end.
    Unsatisfiable,
}

impl RangeAnswer {
    /// `header`: the request's `Range` value, if it had one.
    pub fn of(header: Option<&[u8]>, size: u64) -> RangeAnswer {
        let Some(spec) = header
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| h.trim().strip_prefix("bytes="))
        else {
            return RangeAnswer::Whole;
        };
        if spec.contains(',') {
            return RangeAnswer::Whole;
        }
        let Some((first, last)) = spec.trim().split_once('-') else {
            return RangeAnswer::Whole;
        };
        let (first, last) = (first.trim(), last.trim());
        if first.is_empty() {
            // `bytes=-N`: the last N bytes.
            return match number(last) {
                Some(0) => RangeAnswer::Unsatisfiable,
                Some(n) if size > 0 => RangeAnswer::Part {
                    first: size.saturating_sub(n),
                    last: size - 1,
                },
                Some(_) => RangeAnswer::Unsatisfiable,
                None => RangeAnswer::Whole,
            };
        }
        let Some(first) = number(first) else {
            return RangeAnswer::Whole;
        };
        let last = if last.is_empty() {
            None
        } else {
            match number(last) {
                Some(l) if l >= first => Some(l),
                _ => return RangeAnswer::Whole,
            }
        };
        if first >= size {
            return RangeAnswer::Unsatisfiable;
        }
        RangeAnswer::Part {
            first,
            last: last.map_or(size - 1, |l| l.min(size - 1)),
        }
    }

    /// The bytes to send, as a half-open range of NAR offsets.
    pub fn window(&self, size: u64) -> std::ops::Range<u64> {
        match *self {
            RangeAnswer::Whole => 0..size,
            RangeAnswer::Part { first, last } => first..last + 1,
            RangeAnswer::Unsatisfiable => size..size,
        }
    }

    /// The `Content-Range` value to send with `206` or `416`.
    pub fn content_range(&self, size: u64) -> Option<String> {
        match *self {
            RangeAnswer::Whole => None,
            RangeAnswer::Part { first, last } => Some(format!("bytes {first}-{last}/{size}")),
            RangeAnswer::Unsatisfiable => Some(format!("bytes */{size}")),
        }
    }
}

/// A decimal offset: digits only (no sign, no spaces), at most 19 of them
/// so it fits a u64.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn of(h: &str, size: u64) -> RangeAnswer {
        RangeAnswer::of(Some(h.as_bytes()), size)
    }

    #[test]
    fn single_ranges() {
        assert_eq!(RangeAnswer::of(None, 100), RangeAnswer::Whole);
        assert_eq!(
            of("bytes=10-", 100),
            RangeAnswer::Part {
                first: 10,
                last: 99
            }
        );
        assert_eq!(
            of("bytes=0-", 100),
            RangeAnswer::Part { first: 0, last: 99 }
        );
        assert_eq!(
            of("bytes=10-19", 100),
            RangeAnswer::Part {
                first: 10,
                last: 19
            }
        );
        assert_eq!(
            of("bytes=99-99", 100),
            RangeAnswer::Part {
                first: 99,
                last: 99
            }
        );
        // A last byte past the end is cut to the end.
        assert_eq!(
            of("bytes=90-1000", 100),
            RangeAnswer::Part {
                first: 90,
                last: 99
            }
        );
        assert_eq!(
            of("bytes=-10", 100),
            RangeAnswer::Part {
                first: 90,
                last: 99
            }
        );
        assert_eq!(
            of("bytes=-1000", 100),
            RangeAnswer::Part { first: 0, last: 99 }
        );
        assert_eq!(
            of(" bytes=5-6 ", 100),
            RangeAnswer::Part { first: 5, last: 6 }
        );
    }

    #[test]
    fn ranges_past_the_end_are_unsatisfiable() {
        assert_eq!(of("bytes=100-", 100), RangeAnswer::Unsatisfiable);
        assert_eq!(of("bytes=100-200", 100), RangeAnswer::Unsatisfiable);
        assert_eq!(of("bytes=-0", 100), RangeAnswer::Unsatisfiable);
        assert_eq!(
            RangeAnswer::Unsatisfiable.content_range(100).as_deref(),
            Some("bytes */100")
        );
    }

    #[test]
    fn malformed_headers_get_the_whole_nar() {
        for h in [
            "bytes=",
            "bytes=-",
            "bytes=a-",
            "bytes=10-5",
            "bytes=+1-",
            "bytes=1-+5",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes 0-1",
            "bytes=99999999999999999999-",
            "bytes=1",
        ] {
            assert_eq!(of(h, 100), RangeAnswer::Whole, "{h}");
        }
        assert_eq!(
            RangeAnswer::of(Some(&[0xff, 0xfe]), 100),
            RangeAnswer::Whole
        );
    }

    proptest! {
        /// Whatever the header, the answer is a window inside the NAR that
        /// the Content-Range describes exactly.
        #[test]
        fn windows_stay_inside_the_nar(h in ".{0,40}", size in 1u64..1 << 40) {
            let answer = of(&h, size);
            let w = answer.window(size);
            prop_assert!(w.start <= w.end && w.end <= size);
            match answer {
                RangeAnswer::Whole => prop_assert_eq!(w, 0..size),
                RangeAnswer::Part { first, last } => {
                    prop_assert!(!w.is_empty());
                    prop_assert_eq!(
                        answer.content_range(size),
                        Some(format!("bytes {first}-{last}/{size}"))
                    );
                }
                RangeAnswer::Unsatisfiable => prop_assert!(w.is_empty()),
            }
        }

        #[test]
        fn numeric_ranges_round_trip(size in 1u64..1 << 40, a in 0u64..1 << 41, len in 0u64..1 << 20) {
            let answer = of(&format!("bytes={a}-{}", a + len), size);
            if a >= size {
                prop_assert_eq!(answer, RangeAnswer::Unsatisfiable);
            } else {
                prop_assert_eq!(answer, RangeAnswer::Part { first: a, last: (a + len).min(size - 1) });
            }
        }
    }
}
