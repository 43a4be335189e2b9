//! Exponential backoff with jitter, for reconnecting to the broker and reopening the camera.

use std::time::Duration;

/// Waits drawn between `min / 2` and a ceiling that doubles after each draw, up to `max`
/// ("full jitter", so that many nodes restarted together do not reconnect in step).
pub struct Backoff {
    min: u64,
    max: u64,
    ceiling: u64,
    seed: u64,
}

impl Backoff {
    /// Bounds in milliseconds; `max` below `min` is taken as `min`.
    pub fn new(min_ms: u64, max_ms: u64) -> Self {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        Self::with_seed(min_ms, max_ms, seed)
    }

    /// The same, with a fixed jitter sequence (tests).
    pub fn with_seed(min_ms: u64, max_ms: u64, seed: u64) -> Self {
        Backoff { min: min_ms, max: max_ms.max(min_ms), ceiling: min_ms, seed: seed | 1 }
    }

    /// Back to the shortest waits (after a success that lasted).
    pub fn reset(&mut self) {
        self.ceiling = self.min;
    }

    /// The longest wait, for failures that retrying soon cannot fix.
    pub fn max(&self) -> Duration {
        Duration::from_millis(self.max)
    }

    /// The ceiling the next wait is drawn under, in milliseconds.
    pub fn ceiling_ms(&self) -> u64 {
        self.ceiling
    }

    /// The next wait; doubles the ceiling.
    pub fn next_wait(&mut self) -> Duration {
        // xorshift: jitter only needs to spread nodes apart, not be unpredictable.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let low = self.min / 2;
        let wait = low + self.seed % (self.ceiling - low + 1);
        self.ceiling = self.ceiling.saturating_mul(2).min(self.max);
        Duration::from_millis(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_ceiling_with_jitter_and_resets() {
        let mut b = Backoff::with_seed(500, 30_000, 7);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let c = b.ceiling_ms();
            let w = b.next_wait().as_millis() as u64;
            assert!((250..=c).contains(&w), "wait {w} outside 250..={c}");
            ceilings.push(c);
        }
        assert_eq!(ceilings, [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000]);
        b.reset();
        assert_eq!(b.ceiling_ms(), 500);
    }
}
