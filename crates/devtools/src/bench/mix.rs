//! The traffic-mix workload: session sizes drawn from a distribution of
//! bands, `SIZExWEIGHT,...` where SIZE is a member count (`2`) or a range
//! (`3-20`) and WEIGHT its share of the events. The default is an
//! assumption about IM traffic, not a measurement of one: 70% of messages
//! go to one-to-one chats, 20% to groups of 3 to 20, 8% to groups of 21 to
//! 200 and 2% to groups of 201 to 5,000.
//!
//! Each band gets sessions of sizes spread evenly on a log scale over its
//! range (group sizes are skewed towards the small end); events are dealt
//! to bands by a smooth weighted round robin, so every stretch of the
//! sequence, the serial mode's shorter run included, has the band shares
//! of the whole.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::{LatencyResult, ModeResult, Session};

/// The default distribution.
pub const DEFAULT_MIX: &str = "2x70,3-20x20,21-200x8,201-5000x2";

/// Sessions per band whose sizes vary.
const SESSIONS_PER_RANGE: usize = 16;
/// Sessions per band of one size: one-to-one traffic is spread over many
/// conversations.
const SESSIONS_PER_SIZE: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Band {
    pub smallest: usize,
    pub largest: usize,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MixSpec {
    pub bands: Vec<Band>,
}

impl Default for MixSpec {
    fn default() -> Self {
        DEFAULT_MIX.parse().expect("the default mix parses")
    }
}

impl fmt::Display for MixSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.bands.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if b.smallest == b.largest {
                write!(f, "{}x{}", b.smallest, b.weight)?;
            } else {
                write!(f, "{}-{}x{}", b.smallest, b.largest, b.weight)?;
            }
        }
        Ok(())
    }
}

impl FromStr for MixSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let size = |s: &str| {
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("`{s}` is not a member count of at least 1"))
        };
        let mut bands = Vec::new();
        for part in text.split(',').filter(|p| !p.trim().is_empty()) {
            let (sizes, weight) = part
                .rsplit_once(['x', 'X'])
                .ok_or_else(|| format!("`{part}` is not SIZExWEIGHT (e.g. 2x70 or 3-20x20)"))?;
            let weight = weight
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|w| *w >= 1)
                .ok_or_else(|| format!("`{part}`: the weight must be a whole number >= 1"))?;
            let (smallest, largest) = match sizes.split_once('-') {
                Some((lo, hi)) => (size(lo)?, size(hi)?),
                None => (size(sizes)?, size(sizes)?),
            };
            if smallest > largest {
                return Err(format!("`{part}`: the range runs backwards"));
            }
            bands.push(Band {
                smallest,
                largest,
                weight,
            });
        }
        if bands.is_empty() {
            return Err("the mix names no band (e.g. 2x70,3-20x20)".into());
        }
        Ok(Self { bands })
    }
}

impl MixSpec {
    pub fn largest(&self) -> usize {
        self.bands.iter().map(|b| b.largest).max().unwrap_or(1)
    }

    /// The session sizes of each band.
    pub fn session_sizes(&self) -> Vec<Vec<usize>> {
        self.bands.iter().map(band_sizes).collect()
    }
}

/// Sizes spread evenly on a log scale from the band's smallest to largest.
fn band_sizes(band: &Band) -> Vec<usize> {
    if band.smallest == band.largest {
        return vec![band.smallest; SESSIONS_PER_SIZE];
    }
    let (lo, hi) = ((band.smallest as f64).ln(), (band.largest as f64).ln());
    (0..SESSIONS_PER_RANGE)
        .map(|i| {
            let t = i as f64 / (SESSIONS_PER_RANGE - 1) as f64;
            ((lo + t * (hi - lo)).exp().round() as usize).clamp(band.smallest, band.largest)
        })
        .collect()
}

/// `count` events over the bands' sessions (`sessions[band]`), in a smooth
/// weighted round robin over the bands and in turn within each.
pub fn sequence(spec: &MixSpec, sessions: &[Vec<Session>], count: usize) -> Vec<Session> {
    let total: i64 = spec.bands.iter().map(|b| b.weight as i64).sum();
    let mut credit = vec![0i64; spec.bands.len()];
    let mut next = vec![0usize; spec.bands.len()];
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        for (c, b) in credit.iter_mut().zip(&spec.bands) {
            *c += b.weight as i64;
        }
        let band = (0..credit.len())
            .max_by_key(|&i| (credit[i], std::cmp::Reverse(i)))
            .expect("a mix has bands");
        credit[band] -= total;
        let pool = &sessions[band];
        out.push(pool[next[band] % pool.len()].clone());
        next[band] += 1;
    }
    out
}

/// Mean members per event of a sequence.
pub fn mean_size(events: &[Session]) -> f64 {
    let total: usize = events.iter().map(|s| s.members.len()).sum();
    total as f64 / events.len().max(1) as f64
}

/// The mix run: every mode at saturation on the same sequence (serial on
/// its first part), and the batch mode's latency at half its peak.
#[derive(Debug, Clone, Serialize)]
pub struct MixResult {
    pub spec: String,
    pub mean_group_size: f64,
    pub serial: ModeResult,
    pub batch: ModeResult,
    pub floor_js: ModeResult,
    pub floor: ModeResult,
    /// Events per second, batch over serial.
    pub batch_vs_serial: f64,
    /// Events per second, batch over the floor.
    pub batch_vs_floor: f64,
    pub latency_at_half_peak: LatencyResult,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_default_mix_round_trips() {
        let spec = MixSpec::default();
        assert_eq!(spec.to_string(), DEFAULT_MIX);
        assert_eq!(spec.bands.len(), 4);
        assert_eq!(
            spec.bands[1],
            Band {
                smallest: 3,
                largest: 20,
                weight: 20
            }
        );
        assert_eq!(spec.largest(), 5000);
    }

    #[test]
    fn bad_mixes_say_what_is_wrong() {
        for (text, says) in [
            ("", "no band"),
            ("2", "SIZExWEIGHT"),
            ("2x0", "weight"),
            ("20-3x5", "backwards"),
            ("0x5", "at least 1"),
            ("ax5", "`a`"),
        ] {
            let err = text.parse::<MixSpec>().unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn band_sizes_span_the_range_on_a_log_scale() {
        let sizes = band_sizes(&Band {
            smallest: 201,
            largest: 5000,
            weight: 1,
        });
        assert_eq!(sizes.len(), SESSIONS_PER_RANGE);
        assert_eq!((sizes[0], sizes[SESSIONS_PER_RANGE - 1]), (201, 5000));
        assert!(sizes.windows(2).all(|w| w[0] <= w[1]));
        let median = sizes[SESSIONS_PER_RANGE / 2];
        assert!(median < (201 + 5000) / 2, "skewed small: {median}");
    }

    #[test]
    fn every_stretch_of_the_sequence_has_the_band_shares() {
        let spec: MixSpec = "2x70,3-20x20,21-200x8,201-5000x2".parse().unwrap();
        let sessions: Vec<Vec<Session>> = spec
            .session_sizes()
            .iter()
            .enumerate()
            .map(|(band, sizes)| {
                sizes
                    .iter()
                    .map(|&n| Session {
                        id: format!("{band}"),
                        members: Arc::new(vec![String::new(); n]),
                    })
                    .collect()
            })
            .collect();
        let events = sequence(&spec, &sessions, 1000);
        for (start, len) in [(0, 100), (0, 1000), (300, 200)] {
            let stretch = &events[start..start + len];
            for (band, b) in spec.bands.iter().enumerate() {
                let n = stretch.iter().filter(|s| s.id == band.to_string()).count();
                let want = len as u32 * b.weight / 100;
                assert!(n.abs_diff(want as usize) <= 1, "band {band}: {n} of {len}");
            }
        }
        assert!(mean_size(&events) > 2.0);
    }
}
