//! Waiting between attempts: capped exponential [`Backoff`] with full
//! jitter, shared by every reconnect loop (etcd watch, gateway streams, NATS
//! intake) and by retry delays; [`pause`], the one way a loop sleeps so that
//! shutdown interrupts it; and [`until_ready`], which waits for a dependency
//! at start-up. Jitter keeps many pods from reconnecting to a recovered
//! dependency in lock-step.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::refusal::Refusal;

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

/// Sleeps `delay` unless `stop` fires first. Returns `false` when
/// cancelled, so a loop ends with `if !pause_for(..).await { return }`.
pub async fn pause_for(stop: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Sleeps the backoff's next delay unless `stop` fires first; `false`
/// when stopped.
pub async fn pause(stop: &CancellationToken, backoff: &mut Backoff) -> bool {
    pause_for(stop, backoff.next_delay()).await
}

/// A dependency that refused this service at start-up.
#[derive(Debug, thiserror::Error)]
#[error("{dependency} refused this service: {cause}")]
pub struct Refused {
    pub dependency: &'static str,
    #[source]
    pub cause: Box<dyn std::error::Error + Send + Sync>,
}

/// Retries `attempt` with backoff until it succeeds or `stop` fires
/// (`Ok(None)`). Each failure is logged with `what`, so a dependency that is
/// down at start-up is named in the log while the pod waits for it. A
/// server that refuses the credentials or certificates ends the wait with
/// [`Refused`]: the pod exits naming the dependency, since waiting will not
/// help until the configuration changes.
pub async fn until_ready<T, E, F, Fut>(
    what: &'static str,
    stop: &CancellationToken,
    mut attempt: F,
) -> Result<Option<T>, Refused>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::error::Error + Refusal + Send + Sync + 'static,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            r = attempt() => r,
        };
        match result {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.refused() => {
                tracing::error!(dependency = what, error = %e, "dependency refused the configured credentials or certificates");
                return Err(Refused {
                    dependency: what,
                    cause: Box::new(e),
                });
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(dependency = what, error = %e, retry_in = ?delay, "dependency not ready");
                if !pause_for(stop, delay).await {
                    return Ok(None);
                }
            }
        }
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
