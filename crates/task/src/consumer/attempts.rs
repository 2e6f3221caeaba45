//! Failed attempts per message, counted in Redis, so that giving up after
//! `consumer.max_deliver` attempts counts only attempts that failed.
//! JetStream's own delivery count also grows when a message is handed back
//! (a pod shutting down, another handler holding the event, an ack_wait
//! that ran out while it waited), and those are not failures.
//!
//! `resonance:task:{<stream>:<seq>}:failed:<published ns>` is a counter per
//! stored message: the stream sequence names it, and the time JetStream
//! stored it tells it from a message of a recreated stream that reuses the
//! sequence. It lives for `dedup.progress_ttl`, which validation keeps
//! longer than the longest redelivery horizon. The first delivery reads
//! nothing: the counter is only written (INCR) when an attempt fails.

use std::time::Duration;

use crate::store::{RedisClient, RedisError};

pub fn failed_key(stream: &str, sequence: u64, published_ns: i128) -> String {
    format!("resonance:task:{{{stream}:{sequence}}}:failed:{published_ns}")
}

#[derive(Clone)]
pub struct FailedAttempts {
    redis: RedisClient,
    ttl: Duration,
}

impl FailedAttempts {
    pub fn new(redis: RedisClient, ttl: Duration) -> Self {
        Self { redis, ttl }
    }

    /// Counts one more failed attempt of the message `key` names; returns
    /// how many have failed so far, this one included.
    pub async fn add(&self, key: &str) -> Result<i64, RedisError> {
        let mut pipe = redis::pipe();
        pipe.incr(key, 1)
            .pexpire(key, self.ttl.as_millis() as i64)
            .ignore();
        let (failures,): (i64,) = self.redis.pipeline(&pipe).await?;
        Ok(failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_names_the_stored_message() {
        assert_eq!(
            failed_key("RESONANCE_PUSH", 42, 7),
            "resonance:task:{RESONANCE_PUSH:42}:failed:7"
        );
    }
}
