//! The offline store: messages parked in Redis for recipients who were not
//! connected, until their gateway (or the logic service) drains them on
//! reconnect.
//!
//! `resonance:offline:{username}` is a sorted set per user. Each entry is the
//! gateway `PushMessage` the user would have been pushed (protobuf bytes,
//! `to_username` set to the user), scored by when it was parked (unix
//! microseconds on the parking pod's clock, strictly increasing within a
//! pod). Parking is `ZADD NX`: the bytes
//! of one msg_id for one user are always the same, so parking a
//! redelivered event again adds nothing (and keeps its first arrival). Each
//! park trims the set to its newest `offline.max_messages` entries by
//! arrival, so the message just parked always stays whatever its session's
//! `seq_id`s, and renews the TTL. Draining is `ZPOPMIN`: atomic, oldest
//! first, and two concurrent drains never get the same entry; each drained
//! batch is put in `seq_id` order within every session (sessions keep the
//! places their messages had). Every command names one key, so the layout
//! works on Redis Cluster unchanged.
//!
//! `resonance:notice:{username}` marks a user who was sent an offline notice
//! recently (`SET NX PX`), so a busy group does not flood one phone.
//! Neighbours: `dispatch::offline` parks and notices; `offline pull` drains.

use std::time::Duration;

use prost::Message;
use redis::Value;

use super::redis::{RedisClient, RedisError};
use crate::proto::PushMessage;

pub fn offline_key(username: &str) -> String {
    format!("resonance:offline:{username}")
}

pub fn notice_key(username: &str) -> String {
    format!("resonance:notice:{username}")
}

/// What one park did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Parked {
    /// Entries added.
    pub added: usize,
    /// Users who had this message parked already (a redelivery).
    pub already: usize,
}

#[derive(Clone)]
pub struct OfflineStore {
    redis: RedisClient,
    max_messages: usize,
    ttl: Duration,
}

impl OfflineStore {
    /// Each user keeps at most `max_messages` parked messages (the oldest
    /// go first) for `ttl` after the last one parked.
    pub fn new(redis: RedisClient, max_messages: usize, ttl: Duration) -> Self {
        Self {
            redis,
            max_messages: max_messages.max(1),
            ttl,
        }
    }

    /// Parks `message` for every user in `users`, in one round trip on a
    /// standalone server.
    pub async fn park(
        &self,
        message: &PushMessage,
        users: &[String],
    ) -> Result<Parked, RedisError> {
        let ttl_ms = self.ttl.as_millis() as i64;
        let keep = -(self.max_messages as i64) - 1;
        let arrival = arrival_score();
        let mut entry = message.clone();
        let groups = users
            .iter()
            .map(|user| {
                entry.to_username.clone_from(user);
                let key = offline_key(user);
                let mut add = redis::cmd("ZADD");
                add.arg(&key)
                    .arg("NX")
                    .arg(arrival)
                    .arg(entry.encode_to_vec());
                let mut trim = redis::cmd("ZREMRANGEBYRANK");
                trim.arg(&key).arg(0).arg(keep);
                let mut expire = redis::cmd("PEXPIRE");
                expire.arg(&key).arg(ttl_ms);
                vec![add, trim, expire]
            })
            .collect();
        let answers = self.redis.per_key_all(groups).await?;
        let count = |i: usize| -> usize {
            answers
                .iter()
                .map(|a| match a.get(i) {
                    Some(Value::Int(n)) if *n > 0 => *n as usize,
                    _ => 0,
                })
                .sum()
        };
        let (added, trimmed) = (count(0), count(1));
        if trimmed > 0 {
            metrics::counter!(crate::telemetry::metrics::OFFLINE_TRIMMED).increment(trimmed as u64);
        }
        Ok(Parked {
            added,
            already: users.len() - added,
        })
    }

    /// Takes up to `max` of `username`'s parked messages, oldest first, and
    /// removes them; within each session they come in `seq_id` order.
    /// Concurrent callers get disjoint messages.
    pub async fn pull(&self, username: &str, max: usize) -> Result<Vec<PushMessage>, RedisError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut pop = redis::cmd("ZPOPMIN");
        pop.arg(offline_key(username)).arg(max);
        let popped: Vec<(Vec<u8>, f64)> = self.redis.query(&pop).await?;
        let mut messages: Vec<PushMessage> = popped
            .into_iter()
            .filter_map(|(bytes, _)| match PushMessage::decode(bytes.as_slice()) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(username, error = %e, "unreadable offline entry dropped");
                    None
                }
            })
            .collect();
        order_within_sessions(&mut messages);
        Ok(messages)
    }

    /// How many messages `username` has parked.
    pub async fn count(&self, username: &str) -> Result<usize, RedisError> {
        let mut card = redis::cmd("ZCARD");
        card.arg(offline_key(username));
        self.redis.query(&card).await
    }

    /// For each user, whether a notice may be sent now: true for those not
    /// noticed within `interval`, who are marked as noticed by this call.
    pub async fn claim_notices(
        &self,
        users: &[String],
        interval: Duration,
    ) -> Result<Vec<bool>, RedisError> {
        if interval.is_zero() {
            return Ok(vec![true; users.len()]);
        }
        let groups = users
            .iter()
            .map(|user| {
                let mut set = redis::cmd("SET");
                set.arg(notice_key(user))
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(interval.as_millis() as u64);
                vec![set]
            })
            .collect();
        let answers = self.redis.per_key(groups).await?;
        Ok(answers.iter().map(|a| !matches!(a, Value::Nil)).collect())
    }

    /// Undoes [`OfflineStore::claim_notices`] for users whose notice could
    /// not be published, so the next attempt sends it.
    pub async fn release_notices(&self, users: &[String]) -> Result<(), RedisError> {
        let groups = users
            .iter()
            .map(|user| {
                let mut del = redis::cmd("DEL");
                del.arg(notice_key(user));
                vec![del]
            })
            .collect();
        self.redis.per_key(groups).await.map(|_| ())
    }
}

/// Unix microseconds now, but always above the previous call's answer, so
/// messages parked one after another by this process never tie (a tie
/// would be ordered by the bytes, not by arrival). Exact in Redis's
/// doubles until the year 2255.
fn arrival_score() -> i64 {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64;
    let previous = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(now.max(last + 1))
        })
        .expect("the update always succeeds");
    now.max(previous + 1)
}

/// Puts each session's messages in `seq_id` order, in the places that
/// session's messages already hold: arrivals from pods whose clocks differ
/// a little cannot reorder a session.
fn order_within_sessions(messages: &mut [PushMessage]) {
    let mut by_session: std::collections::HashMap<String, Vec<usize>> =
        std::collections::HashMap::new();
    for (i, m) in messages.iter().enumerate() {
        by_session.entry(m.session_id.clone()).or_default().push(i);
    }
    for places in by_session.into_values() {
        let mut group: Vec<PushMessage> = places
            .iter()
            .map(|&i| std::mem::take(&mut messages[i]))
            .collect();
        group.sort_by_key(|m| m.seq_id);
        for (place, m) in places.into_iter().zip(group) {
            messages[place] = m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Each session's messages come out in seq_id order, and every
        /// session keeps the places its messages had.
        #[test]
        fn sessions_are_ordered_in_place(items in proptest::collection::vec((0u8..4, 0i64..50), 0..40)) {
            let mut messages: Vec<PushMessage> = items
                .iter()
                .map(|(s, seq)| PushMessage { session_id: s.to_string(), seq_id: *seq, ..Default::default() })
                .collect();
            let sessions_before: Vec<String> = messages.iter().map(|m| m.session_id.clone()).collect();
            order_within_sessions(&mut messages);
            let sessions_after: Vec<String> = messages.iter().map(|m| m.session_id.clone()).collect();
            prop_assert_eq!(sessions_before, sessions_after);
            for s in 0..4u8 {
                let seqs: Vec<i64> = messages.iter().filter(|m| m.session_id == s.to_string()).map(|m| m.seq_id).collect();
                prop_assert!(seqs.windows(2).all(|w| w[0] <= w[1]));
            }
        }
    }

    #[test]
    fn keys_follow_the_documented_layout() {
        assert_eq!(offline_key("alice"), "resonance:offline:alice");
        assert_eq!(notice_key("alice"), "resonance:notice:alice");
    }
}
