//! Drifting clocks. Every node, and the directory, reads its own clock: an offset plus real
//! time scaled by a rate error of at most ρ (`max_drift_ppm`). The lease margin must cover the
//! drift, which is exactly what the simulator tests by giving every clock a different rate.

use crate::raft::rng::SplitMix64;

/// One process's clock.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Local time at real time 0.
    offset: u64,
    /// Rate error in parts per million (local time runs `1 + drift_ppm / 10^6` times as fast).
    drift_ppm: i64,
}

impl Clock {
    /// A clock with a random offset and a random rate error within `±max_drift_ppm`.
    pub fn random(rng: &mut SplitMix64, max_drift_ppm: u64) -> Self {
        let span = 2 * max_drift_ppm + 1;
        Clock {
            offset: rng.below(1_000_000),
            drift_ppm: rng.below(span) as i64 - max_drift_ppm as i64,
        }
    }

    /// Local time at real time `real` (milliseconds). Never goes backwards.
    pub fn local(&self, real: u64) -> u64 {
        let scaled = real as i128 * (1_000_000 + self.drift_ppm as i128) / 1_000_000;
        self.offset + scaled.max(0) as u64
    }
}
