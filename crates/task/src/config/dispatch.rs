//! `dispatch` (chunk sizes, concurrency, the member cache) and `limits`
//! (what one event may carry).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Problems, within};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DispatchConfig {
    /// Push to the sender's own other devices too (upstream behaviour).
    pub push_to_sender: bool,
    /// Route keys per Redis MGET.
    pub route_chunk_size: usize,
    /// MGET chunks in flight per event.
    pub route_concurrency: usize,
    /// Recipients per push to one gateway over per-user `PushService`;
    /// each chunk's deliveries are recorded as soon as it is answered.
    pub push_chunk_size: usize,
    /// Recipients per batch-v1 request (one frame) to one gateway.
    pub batch_size: usize,
    /// How long session members are cached in-process (0 = no cache).
    #[serde(with = "super::duration")]
    pub member_cache_ttl: Duration,
    /// Members the cache holds at most, over all sessions.
    pub member_cache_capacity: u64,
    /// Core-NATS subject whose messages (a session id as UTF-8) drop that
    /// session from the member cache at once; empty: no subscription.
    pub session_changed_topic: String,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            push_to_sender: true,
            route_chunk_size: 500,
            route_concurrency: 4,
            push_chunk_size: 64,
            batch_size: 512,
            member_cache_ttl: Duration::from_secs(2),
            member_cache_capacity: 1_000_000,
            session_changed_topic: "resonance.session.changed.v1".into(),
        }
    }
}

/// Bounds on what one event may carry; an event beyond them is
/// dead-lettered with the bound it broke.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Encoded `PushEvent` bytes.
    pub max_payload_bytes: usize,
    /// Bytes of `content`.
    pub max_content_bytes: usize,
    /// Members of one session; the member query reads one more at most.
    pub max_members: usize,
    /// Bytes of a username (`from_username`, `to_username`, members).
    pub max_username_bytes: usize,
    /// Bytes of `session_id`.
    pub max_session_id_bytes: usize,
    /// Characters allowed in usernames and session ids.
    pub id_charset: IdCharset,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            max_content_bytes: 64 * 1024,
            max_members: 100_000,
            max_username_bytes: 128,
            max_session_id_bytes: 128,
            id_charset: IdCharset::Printable,
        }
    }
}

/// `printable`: any character but control characters and whitespace.
/// `ascii`: letters, digits and `.`, `_`, `-`, `@`, `:`, `#`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum IdCharset {
    #[default]
    Printable,
    Ascii,
}

impl IdCharset {
    pub fn allows(self, c: char) -> bool {
        match self {
            Self::Printable => !c.is_control() && !c.is_whitespace(),
            Self::Ascii => {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | ':' | '#')
            }
        }
    }
}

impl DispatchConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        p.check(within(
            "dispatch.route_chunk_size",
            self.route_chunk_size,
            1..=10_000,
        ));
        p.check(within(
            "dispatch.push_chunk_size",
            self.push_chunk_size,
            1..=100_000,
        ));
        p.check(within("dispatch.batch_size", self.batch_size, 1..=100_000));
        if self.session_changed_topic.chars().any(char::is_whitespace) {
            p.invalid(
                "dispatch.session_changed_topic",
                "a NATS subject has no whitespace",
            );
        }
        if self.route_concurrency == 0 {
            p.invalid("dispatch.route_concurrency", "must be at least 1");
        }
    }
}

impl LimitsConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        p.check(within(
            "limits.max_payload_bytes",
            self.max_payload_bytes,
            64..=64 * 1024 * 1024,
        ));
        p.check(within(
            "limits.max_content_bytes",
            self.max_content_bytes,
            1..=self.max_payload_bytes.max(1),
        ));
        p.check(within(
            "limits.max_members",
            self.max_members,
            1..=10_000_000,
        ));
        p.check(within(
            "limits.max_username_bytes",
            self.max_username_bytes,
            1..=4096,
        ));
        p.check(within(
            "limits.max_session_id_bytes",
            self.max_session_id_bytes,
            1..=4096,
        ));
    }
}
