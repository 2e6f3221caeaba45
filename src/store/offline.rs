//! The offline store: messages parked in Redis for recipients who were not
//! connected, until their gateway (or the logic service) drains them on
//! reconnect.
//!
//! `resonance:offline:{username}` is a sorted set per user. Each entry is the
//! gateway `PushMessage` the user would have been pushed (protobuf bytes,
//! `to_username` set to the user), scored by the event's `seq_id`. Parking
//! is `ZADD NX`: the bytes of one msg_id for one user are always the same,
//! so parking a redelivered event again adds nothing. Each park trims the
//! set to its newest `offline.max_messages` entries and renews its TTL.
//! Draining is `ZPOPMIN`: atomic, lowest `seq_id` first, and two concurrent
//! drains never get the same entry. Every command names one key, so the
//! layout works on Redis Cluster unchanged.
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
        let mut entry = message.clone();
        let groups = users
            .iter()
            .map(|user| {
                entry.to_username.clone_from(user);
                let key = offline_key(user);
                let mut add = redis::cmd("ZADD");
                add.arg(&key)
                    .arg("NX")
                    .arg(message.seq_id)
                    .arg(entry.encode_to_vec());
                let mut trim = redis::cmd("ZREMRANGEBYRANK");
                trim.arg(&key).arg(0).arg(keep);
                let mut expire = redis::cmd("PEXPIRE");
                expire.arg(&key).arg(ttl_ms);
                vec![add, trim, expire]
            })
            .collect();
        let answers = self.redis.per_key(groups).await?;
        let added = answers
            .iter()
            .filter(|a| matches!(a, Value::Int(n) if *n > 0))
            .count();
        Ok(Parked {
            added,
            already: users.len() - added,
        })
    }

    /// Takes up to `max` of `username`'s parked messages, lowest `seq_id`
    /// first, and removes them. Concurrent callers get disjoint messages.
    pub async fn pull(&self, username: &str, max: usize) -> Result<Vec<PushMessage>, RedisError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut pop = redis::cmd("ZPOPMIN");
        pop.arg(offline_key(username)).arg(max);
        let popped: Vec<(Vec<u8>, f64)> = self.redis.query(&pop).await?;
        Ok(popped
            .into_iter()
            .filter_map(|(bytes, _)| match PushMessage::decode(bytes.as_slice()) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(username, error = %e, "unreadable offline entry dropped");
                    None
                }
            })
            .collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        assert_eq!(offline_key("alice"), "resonance:offline:alice");
        assert_eq!(notice_key("alice"), "resonance:notice:alice");
    }
}
