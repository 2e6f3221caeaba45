//! `offline`: parking messages for offline users and the notices that
//! wake their phones.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConsumerConfig, Problems, differs, nats_subject, positive, stream_name, within};

/// Recipients who are not connected: parked messages and offline notices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OfflineConfig {
    /// Park the message in Redis for each offline recipient, until drained.
    pub park: bool,
    /// Parked messages kept per user; the lowest seq_id go first.
    pub max_messages: usize,
    /// A user's parked messages expire this long after the last one parked.
    #[serde(with = "super::duration")]
    pub ttl: Duration,
    /// Sessions with more members than this are not parked per member:
    /// their members read history from the message store (0: always park).
    pub read_path_above: usize,
    /// Publish an offline notice for mobile push.
    pub notice: bool,
    pub notice_topic: String,
    /// JetStream stream that keeps notices for `resonance-task notify`.
    pub notice_stream: String,
    /// At most one notice per user per interval (0: one per message).
    #[serde(with = "super::duration")]
    pub notice_interval: Duration,
    /// Recipients per notice message.
    pub notice_batch: usize,
    /// Characters of the message text copied into a notice.
    pub preview_chars: usize,
}

impl Default for OfflineConfig {
    fn default() -> Self {
        Self {
            park: true,
            max_messages: 1000,
            ttl: Duration::from_secs(7 * 24 * 3600),
            read_path_above: 5000,
            notice: true,
            notice_topic: "resonance.push.offline.v1".into(),
            notice_stream: "RESONANCE_OFFLINE".into(),
            notice_interval: Duration::from_secs(30),
            notice_batch: 100,
            preview_chars: 64,
        }
    }
}

impl OfflineConfig {
    /// The notice stream must not be the event stream.
    pub(super) fn validate(&self, consumer: &ConsumerConfig, p: &mut Problems) {
        if self.park && self.max_messages == 0 {
            p.invalid("offline.max_messages", "must be at least 1");
        }
        if self.park {
            p.check(positive("offline.ttl", self.ttl));
        }
        if self.notice {
            p.check(nats_subject("offline.notice_topic", &self.notice_topic));
            p.check(stream_name("offline.notice_stream", &self.notice_stream));
            p.check(differs(
                "offline.notice_topic",
                &self.notice_topic,
                "consumer.topic",
                &consumer.topic,
            ));
            p.check(differs(
                "offline.notice_stream",
                &self.notice_stream,
                "consumer.stream",
                &consumer.stream,
            ));
            p.check(within(
                "offline.notice_batch",
                self.notice_batch,
                1..=10_000,
            ));
        }
    }
}
