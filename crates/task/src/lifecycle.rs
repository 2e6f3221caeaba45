//! The life of a long-running command (a pod, the notify worker): the
//! `stop` token that ends intake, the `abort` token that ends the grace
//! period, the tracker every task is spawned on, and readiness (which the
//! admin port reports). Components take one [`Lifecycle`] rather than
//! loose tokens, and spawn through it, so no task outlives the drain.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone)]
pub struct Lifecycle {
    /// Fired at shutdown: take no more work, finish what is in flight.
    pub stop: CancellationToken,
    /// Fired when the grace period is over: hand back what is unfinished.
    pub abort: CancellationToken,
    tracker: TaskTracker,
    pub readiness: Arc<Readiness>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    /// A lifecycle with no admin port (`telemetry::admin::start` adds one).
    pub fn new() -> Self {
        Self {
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            tracker: TaskTracker::new(),
            readiness: Arc::new(Readiness::default()),
        }
    }

    /// Runs `task` on the tracker, so the drain waits for it.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Stops intake, lets in-flight work finish within `grace`, then hands
    /// what is left back to NATS (so another process takes it now rather
    /// than after ack_wait) and flushes the acks on `nats`.
    pub async fn drain(&self, grace: Duration, nats: Option<&async_nats::Client>) {
        self.stop.cancel();
        self.tracker.close();
        tracing::info!(?grace, "shutting down: finishing in-flight work");
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            self.abort.cancel();
            if tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    "some in-flight messages could not be handed back; NATS redelivers them after ack_wait"
                );
            }
        }
        if let Some(nats) = nats {
            // NATS may be gone too; do not wait for it forever.
            match tokio::time::timeout(Duration::from_secs(5), nats.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "flushing acks to NATS failed"),
                Err(_) => tracing::warn!(
                    "flushing acks to NATS timed out; unflushed acks mean redeliveries"
                ),
            }
        }
    }
}

/// What readiness depends on; each part is set by the component that knows.
#[derive(Default)]
pub struct Readiness {
    pub nats_connected: AtomicBool,
    pub consumer_bound: AtomicBool,
    pub registry_synced: AtomicBool,
    pub database_reachable: AtomicBool,
}

#[derive(Serialize)]
pub(crate) struct ReadyReport {
    pub(crate) ready: bool,
    nats_connected: bool,
    consumer_bound: bool,
    registry_synced: bool,
    database_reachable: bool,
}

impl Readiness {
    pub(crate) fn report(&self) -> ReadyReport {
        let nats_connected = self.nats_connected.load(Ordering::Relaxed);
        let consumer_bound = self.consumer_bound.load(Ordering::Relaxed);
        let registry_synced = self.registry_synced.load(Ordering::Relaxed);
        let database_reachable = self.database_reachable.load(Ordering::Relaxed);
        ReadyReport {
            ready: nats_connected && consumer_bound && registry_synced && database_reachable,
            nats_connected,
            consumer_bound,
            registry_synced,
            database_reachable,
        }
    }

    pub fn set(flag: &AtomicBool, value: bool) {
        flag.store(value, Ordering::Relaxed);
    }
}
