//! `consumer` (the intake: subjects, streams, workers, acks and retries),
//! `dedup` (how long delivery progress is kept) and `priority` (lanes and
//! what may wait ahead of the workers).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Problems, nats_subject, positive, stream_name, within};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConsumerMode {
    /// Shared durable JetStream consumer, explicit acks (no loss).
    #[default]
    Jetstream,
    /// Plain queue-group subscription, at-most-once (legacy behaviour).
    Core,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerConfig {
    pub mode: ConsumerMode,
    pub topic: String,
    /// Queue group (core mode) and durable consumer name (JetStream mode).
    pub queue_group: String,
    /// Events in flight per pod.
    pub worker_count: usize,
    /// In-process retries of a failed fan-out (only the recipients that
    /// failed) before the event is handed back to NATS.
    pub max_retry: u32,
    /// Delay before a failed event is first redelivered (integer seconds or
    /// `5s`); it doubles with each further delivery.
    #[serde(with = "super::duration")]
    pub retry_interval: Duration,
    /// Cap of the doubling redelivery delay.
    #[serde(with = "super::duration")]
    pub retry_backoff_max: Duration,
    /// On shutdown, how long events in flight get to finish before they are
    /// handed back to NATS.
    #[serde(with = "super::duration")]
    pub shutdown_grace: Duration,
    /// JetStream stream that captures `topic`.
    pub stream: String,
    /// Redelivery after this long without an ack.
    #[serde(with = "super::duration")]
    pub ack_wait: Duration,
    /// Failed attempts before an event is dead-lettered. Counted by the
    /// service in Redis: a handback (shutdown, another handler holding the
    /// event, an ack_wait that ran out while it waited) is not a failure.
    pub max_deliver: i64,
    /// JetStream's own limit on deliveries of one message, whatever their
    /// cause (failures, handbacks, crashed pods, lost acks). A message that
    /// reaches it is moved to the dead letters as `max deliveries reached`.
    pub delivery_ceiling: i64,
    /// Oldest unconsumed event the stream keeps.
    #[serde(with = "super::duration")]
    pub stream_max_age: Duration,
    pub dead_letter_topic: String,
    /// JetStream stream that keeps dead letters for inspection and replay.
    pub dead_letter_stream: String,
    /// Copies of every stream this service creates (input, dead letters,
    /// offline notices, notice dead letters) on separate NATS servers:
    /// 3 survives the loss of one server of a 3-node cluster. At most the
    /// cluster's JetStream servers; 1 on a single server. An existing
    /// stream with another count is updated.
    pub stream_replicas: usize,
    /// Only servers carrying all these tags (`server_tags` in their
    /// configuration) take a replica; empty: any.
    pub stream_placement_tags: Vec<String>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            mode: ConsumerMode::Jetstream,
            topic: "resonance.push.event.v1".into(),
            queue_group: "task-service".into(),
            worker_count: 64,
            max_retry: 3,
            retry_interval: Duration::from_secs(5),
            retry_backoff_max: Duration::from_secs(120),
            shutdown_grace: Duration::from_secs(30),
            stream: "RESONANCE_PUSH".into(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            delivery_ceiling: 100,
            stream_max_age: Duration::from_secs(7 * 24 * 3600),
            stream_replicas: 1,
            stream_placement_tags: Vec::new(),
            dead_letter_topic: "resonance.push.dead.v1".into(),
            dead_letter_stream: "RESONANCE_PUSH_DEAD".into(),
        }
    }
}

/// Redelivery without duplicates: per-event progress in Redis.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DedupConfig {
    /// Track which recipients each event reached, so a redelivery or a
    /// duplicate publish pushes to nobody twice.
    pub enabled: bool,
    /// How long an unsettled event's progress is kept.
    #[serde(with = "super::duration")]
    pub progress_ttl: Duration,
    /// How long a settled msg_id is remembered (duplicates within it are
    /// acked without pushing).
    #[serde(with = "super::duration")]
    pub window: Duration,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            progress_ttl: Duration::from_secs(3600),
            window: Duration::from_secs(600),
        }
    }
}

/// Two lanes: high-priority events are dispatched before normal ones.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PriorityConfig {
    /// Events a pod takes from NATS ahead of its workers and orders by
    /// lane: how far a high-priority event can overtake a backlog.
    pub prefetch: usize,
    /// Bytes those waiting events may hold at most (pull requests ask for
    /// no more); one message larger than this is still taken when nothing
    /// waits.
    pub prefetch_bytes: usize,
    /// Event `type` values that are high priority.
    pub high_types: Vec<String>,
    /// One-to-one sessions (session_type 1) are high priority.
    pub one_to_one_high: bool,
    /// Of `consumer.worker_count`, workers only high-priority events may
    /// take: a saturating normal load never holds them all, so a
    /// high-priority event starts at once. Unset: an eighth of the workers
    /// (8 of the default 64).
    pub reserved_workers: Option<usize>,
}

impl Default for PriorityConfig {
    fn default() -> Self {
        Self {
            prefetch: 4096,
            prefetch_bytes: 64 << 20,
            high_types: Vec::new(),
            one_to_one_high: false,
            reserved_workers: None,
        }
    }
}

impl ConsumerConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        p.check(nats_subject("consumer.topic", &self.topic));
        p.check(nats_subject(
            "consumer.dead_letter_topic",
            &self.dead_letter_topic,
        ));
        if self.topic == self.dead_letter_topic {
            p.invalid(
                "consumer.dead_letter_topic",
                "must differ from consumer.topic",
            );
        }
        for (key, name) in [
            ("consumer.queue_group", &self.queue_group),
            ("consumer.stream", &self.stream),
            ("consumer.dead_letter_stream", &self.dead_letter_stream),
        ] {
            p.check(stream_name(key, name));
        }
        if self.stream == self.dead_letter_stream {
            p.invalid(
                "consumer.dead_letter_stream",
                "must differ from consumer.stream",
            );
        }
        p.check(within(
            "consumer.worker_count",
            self.worker_count,
            1..=100_000,
        ));
        // JetStream's own bound.
        p.check(within(
            "consumer.stream_replicas",
            self.stream_replicas,
            1..=5,
        ));
        if self
            .stream_placement_tags
            .iter()
            .any(|t| t.trim().is_empty())
        {
            p.invalid(
                "consumer.stream_placement_tags",
                "must not hold an empty tag",
            );
        }
        p.check(positive("consumer.retry_interval", self.retry_interval));
        if self.retry_backoff_max < self.retry_interval {
            p.invalid(
                "consumer.retry_backoff_max",
                "must be at least consumer.retry_interval",
            );
        }
        p.check(positive("consumer.shutdown_grace", self.shutdown_grace));
        if self.ack_wait < Duration::from_secs(1) {
            p.invalid("consumer.ack_wait", "must be at least 1s");
        }
        if self.max_deliver < 1 {
            p.invalid("consumer.max_deliver", "must be at least 1");
        }
        if self.delivery_ceiling < self.max_deliver {
            p.invalid(
                "consumer.delivery_ceiling",
                "must be at least consumer.max_deliver",
            );
        }
        p.check(positive("consumer.stream_max_age", self.stream_max_age));
    }
}

impl DedupConfig {
    /// Progress must outlive the consumer's last redelivery.
    pub(super) fn validate(&self, consumer: &ConsumerConfig, p: &mut Problems) {
        p.check(positive("dedup.progress_ttl", self.progress_ttl));
        p.check(positive("dedup.window", self.window));
        // An unsettled event's progress must outlive its last redelivery,
        // or that redelivery pushes again to recipients already reached.
        let horizon = consumer
            .retry_backoff_max
            .saturating_mul(consumer.max_deliver.clamp(1, u32::MAX as i64) as u32)
            .saturating_add(consumer.ack_wait);
        if self.enabled && self.progress_ttl < horizon {
            p.invalid(
                "dedup.progress_ttl",
                format!(
                    "must be at least consumer.max_deliver x consumer.retry_backoff_max + consumer.ack_wait ({})",
                    humantime::format_duration(horizon)
                ),
            );
        }
    }
}

impl PriorityConfig {
    /// Workers kept for the high lane (see `reserved_workers`).
    pub fn reserved_for_high(&self, consumer: &ConsumerConfig) -> usize {
        self.reserved_workers
            .unwrap_or(consumer.worker_count / 8)
            .min(consumer.worker_count.saturating_sub(1))
    }

    pub(super) fn validate(&self, consumer: &ConsumerConfig, p: &mut Problems) {
        if let Some(reserved) = self.reserved_workers
            && reserved >= consumer.worker_count
        {
            p.invalid(
                "priority.reserved_workers",
                format!(
                    "must be below consumer.worker_count ({}), so normal events get workers too",
                    consumer.worker_count
                ),
            );
        }
        p.check(within("priority.prefetch", self.prefetch, 1..=100_000));
        p.check(within(
            "priority.prefetch_bytes",
            self.prefetch_bytes,
            (64 << 10)..=(16 << 30),
        ));
    }
}
