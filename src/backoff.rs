//! Capped exponential backoff with full jitter, shared by every reconnect
//! loop (etcd watch, gateway streams, NATS intake) and by retry delays.
//! Jitter keeps many pods from reconnecting to a recovered dependency in
//! lock-step.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The upper bound of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(31));
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The next delay: uniform in `[ceiling/2, ceiling]`, so it never
    /// collapses to zero and never exceeds the cap.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let spread = (ceiling - half).as_nanos().min(u64::MAX as u128) as u64;
        half + Duration::from_nanos(rand::rng().random_range(0..=spread))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn delays_stay_within_half_ceiling_and_cap(
            base_ms in 1u64..5_000,
            max_ms in 1u64..120_000,
            steps in 1usize..80,
        ) {
            let base = Duration::from_millis(base_ms);
            let max = Duration::from_millis(max_ms);
            let mut b = Backoff::new(base, max);
            let mut last_ceiling = Duration::ZERO;
            for _ in 0..steps {
                let ceiling = b.ceiling();
                prop_assert!(ceiling >= last_ceiling, "ceiling never shrinks");
                prop_assert!(ceiling <= max.max(base));
                let d = b.next_delay();
                prop_assert!(d <= ceiling);
                prop_assert!(d >= ceiling / 2);
                last_ceiling = ceiling;
            }
        }
    }

    #[test]
    fn grows_then_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        b.next_delay();
        assert_eq!(b.ceiling(), Duration::from_millis(200));
        for _ in 0..10 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(1));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }
}
