//! Running totals of what happened to events and recipients, logged as a
//! summary line every `INTERVAL` and at shutdown, so an operator can see
//! where every message went without per-event log lines.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Decision;
use crate::dispatch::FanoutReport;

const INTERVAL: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Counters {
    acked: AtomicU64,
    duplicates: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    delivered: AtomicU64,
    offline: AtomicU64,
    failed: AtomicU64,
    already_delivered: AtomicU64,
}

/// Cheap to clone; all clones count into the same totals.
#[derive(Clone, Default)]
pub struct EventTotals(Arc<Counters>);

/// A point-in-time copy of the totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TotalsSnapshot {
    pub acked: u64,
    pub duplicates: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub delivered: u64,
    pub offline: u64,
    pub failed: u64,
    pub already_delivered: u64,
}

impl EventTotals {
    pub fn decision(&self, d: &Decision) {
        crate::telemetry::metrics::event_series().event(d.outcome());
        let c = match d {
            Decision::Ack => &self.0.acked,
            Decision::Duplicate => &self.0.duplicates,
            Decision::Retry { .. } | Decision::HandBack { .. } => &self.0.retried,
            Decision::DeadLetter { .. } => &self.0.dead_lettered,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn recipients(&self, r: &FanoutReport) {
        self.0
            .delivered
            .fetch_add(r.delivered as u64, Ordering::Relaxed);
        self.0
            .offline
            .fetch_add(r.offline.len() as u64, Ordering::Relaxed);
        self.0
            .failed
            .fetch_add(r.failed.len() as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> TotalsSnapshot {
        let c = &self.0;
        TotalsSnapshot {
            acked: c.acked.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            offline: c.offline.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            already_delivered: c.already_delivered.load(Ordering::Relaxed),
        }
    }

    fn log(&self) {
        let s = self.snapshot();
        tracing::info!(
            events_acked = s.acked,
            events_duplicate = s.duplicates,
            events_retried = s.retried,
            events_dead_lettered = s.dead_lettered,
            recipients_delivered = s.delivered,
            recipients_offline = s.offline,
            recipients_failed = s.failed,
            recipients_skipped_already_delivered = s.already_delivered,
            "fan-out totals"
        );
    }

    /// Logs the totals periodically (only when they changed) until
    /// `cancel`, then once more.
    pub async fn report_until(self, stop: CancellationToken) {
        let mut last = TotalsSnapshot::default();
        let mut tick = tokio::time::interval(INTERVAL);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    let now = self.snapshot();
                    if now != last {
                        self.log();
                        last = now;
                    }
                }
            }
        }
        self.log();
    }
}
