//! Per-event delivery progress in Redis, so a redelivered event (after a
//! partial failure, a pod crash or a publisher's duplicate) reaches nobody
//! twice.
//!
//! While an event is in flight, `resonance:task:{<msg_id>}:reached` lists
//! the recipients a gateway confirmed: every answered gateway chunk APPENDs
//! its usernames as netstrings (`5:alice,3:bob,`), and the key is kept for
//! `dedup.progress_ttl`. Appending one string per chunk costs Redis one
//! copy, where a set would cost a hash insert per recipient; the list is
//! read back (and parsed here) only when an event is delivered again. When
//! the event settles, its claim (below) is overwritten with a settled
//! mark kept for `dedup.window`, and the list, if one was written, is
//! dropped: a later copy of the same msg_id is acked without pushing.
//!
//! `resonance:task:{<msg_id>}:lease` is a claim: whoever handles the event
//! sets it (NX, with a TTL of ack_wait) and renews it while it runs, so two
//! deliveries of one event (a publisher's repeat, a NATS restart that rolls
//! consumer state back, an ack_wait that ran out) are never fanned out at
//! the same time, however long the fan-out takes; the second one is handed
//! back and finds the event settled, or its progress, when it comes again.
//! A dead-lettered event keeps its progress as long as its dead letter, so
//! a replay pushes only to whom it had not reached. Settling writes
//! [`SETTLED`] over the claim, so an event leaves one key behind, not two:
//! the claim of a later copy fails on it and reads it back.
//!
//! `resonance:task:{<msg_id>}:settled` is where earlier versions kept the
//! settled mark. It is read, never written, so a copy of an event that an
//! earlier version settled is still a duplicate while pods of both
//! versions share the stream (a rolling upgrade).
//!
//! All keys share the `{msg_id}` hash tag, so they live in one Redis Cluster
//! slot and pipeline together: claiming and reading progress is one round
//! trip.

use std::collections::HashSet;
use std::time::Duration;

use super::redis::{RedisClient, RedisError};

pub fn delivered_key(msg_id: i64) -> String {
    format!("resonance:task:{{{msg_id}}}:reached")
}

/// The settled mark earlier versions wrote (read only, see the module
/// documentation).
pub fn settled_key(msg_id: i64) -> String {
    format!("resonance:task:{{{msg_id}}}:settled")
}

pub fn lease_key(msg_id: i64) -> String {
    format!("resonance:task:{{{msg_id}}}:lease")
}

/// What a settled event's claim holds; a handling token is 32 hex digits,
/// so never this.
pub const SETTLED: &str = "settled";

/// Deletes the lease only if it is still ours.
const RELEASE: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// Extends the lease only if it is still ours.
const RENEW: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end";

/// The claim's answers: the lease's `SET NX`, then what the lease holds
/// after it, the earlier versions' settled mark and the progress.
type ClaimAnswer = (
    Option<String>,
    (Option<String>, Option<redis::Value>, Option<Vec<u8>>),
);

/// What is known about an event before its fan-out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The event settled before: this is a duplicate.
    pub settled: bool,
    /// Another handler holds the event right now.
    pub busy: bool,
    /// When busy: how long the other handler's claim has left (`None` for
    /// a claim with no expiry).
    pub busy_for: Option<Duration>,
    /// Recipients already delivered by an earlier attempt.
    pub delivered: HashSet<String>,
}

#[derive(Clone)]
pub struct ProgressStore {
    redis: RedisClient,
    progress_ttl: Duration,
    window: Duration,
    lease_ttl: Duration,
}

impl ProgressStore {
    /// `lease_ttl` bounds how long a crashed handler's claim blocks others.
    pub fn new(
        redis: RedisClient,
        progress_ttl: Duration,
        window: Duration,
        lease_ttl: Duration,
    ) -> Self {
        Self {
            redis,
            progress_ttl,
            window,
            lease_ttl,
        }
    }

    /// One round trip: claims the event for `token`, and reads whether it
    /// settled before and whom it reached.
    pub async fn claim(&self, msg_id: i64, token: &str) -> Result<Progress, RedisError> {
        Ok(self.claim_with(msg_id, token, Vec::new()).await?.0)
    }

    /// As [`ProgressStore::claim`], with `also` (commands about any keys)
    /// sent in the same round trip; their answers come back in order.
    pub async fn claim_with(
        &self,
        msg_id: i64,
        token: &str,
        also: Vec<redis::Cmd>,
    ) -> Result<(Progress, Vec<redis::Value>), RedisError> {
        let lease = lease_key(msg_id);
        let mut set = redis::cmd("SET");
        set.arg(&lease)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(self.lease_ttl.as_millis() as u64);
        // What the lease holds (ours, another handler's or the settled
        // mark), the earlier settled mark and the progress in one command:
        // Redis's cost is mostly per command, not per key.
        let mut read = redis::cmd("MGET");
        read.arg(&lease)
            .arg(settled_key(msg_id))
            .arg(delivered_key(msg_id));
        let (claim, also) = self.redis.together(vec![set, read], also).await?;
        let (claimed, (holder, earlier, delivered)): ClaimAnswer =
            self.redis.parse(redis::Value::Array(claim))?;
        let settled = holder.as_deref() == Some(SETTLED) || earlier.is_some();
        let busy = claimed.is_none();
        let busy_for = if busy && !settled {
            // Rare: asked only when another handler holds the event.
            let mut pttl = redis::cmd("PTTL");
            pttl.arg(&lease);
            let left: i64 = self.redis.query(&pttl).await?;
            (left >= 0).then(|| Duration::from_millis(left as u64))
        } else {
            None
        };
        let progress = Progress {
            settled,
            busy,
            busy_for,
            delivered: delivered.map(|d| parse_names(&d)).unwrap_or_default(),
        };
        Ok((progress, also))
    }

    /// How long a claim lasts without renewal.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// Sets `token`'s claim to expire `ttl` from now; `false` when the
    /// claim is not (or no longer) `token`'s.
    pub async fn renew(&self, msg_id: i64, token: &str, ttl: Duration) -> Result<bool, RedisError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RENEW)
            .arg(1)
            .arg(lease_key(msg_id))
            .arg(token)
            .arg(ttl.as_millis().max(1) as u64);
        let renewed: i64 = self.redis.query(&cmd).await?;
        Ok(renewed == 1)
    }

    /// Keeps an unsettled event's progress for `ttl` from now (a dead
    /// letter's, for as long as it may be replayed).
    pub async fn keep(&self, msg_id: i64, ttl: Duration) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("PEXPIRE");
        cmd.arg(delivered_key(msg_id)).arg(ttl.as_millis() as u64);
        self.redis.query::<i64>(&cmd).await.map(|_| ())
    }

    /// Records recipients a gateway confirmed.
    pub async fn record(&self, msg_id: i64, users: &[&str]) -> Result<(), RedisError> {
        if users.is_empty() {
            return Ok(());
        }
        let key = delivered_key(msg_id);
        let mut pipe = redis::pipe();
        pipe.append(&key, encode_names(users))
            .ignore()
            .pexpire(&key, self.progress_ttl.as_millis() as i64)
            .ignore();
        self.redis.pipeline::<()>(&pipe).await
    }

    /// Ends `token`'s claim; when `settled`, marks the event settled and,
    /// if progress was `recorded`, drops it.
    ///
    /// The settled mark replaces the claim, whoever holds it now: the
    /// event is done, so the claim guards nothing any more, and a settled
    /// event costs one write, no script and one key. An unsettled event's
    /// claim is released only if it is still `token`'s.
    pub async fn finish(
        &self,
        msg_id: i64,
        token: &str,
        settled: bool,
        recorded: bool,
    ) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        if settled {
            pipe.cmd("SET")
                .arg(lease_key(msg_id))
                .arg(SETTLED)
                .arg("PX")
                .arg(self.window.as_millis() as u64)
                .ignore();
            if recorded {
                pipe.del(delivered_key(msg_id)).ignore();
            }
        } else {
            pipe.cmd("EVAL")
                .arg(RELEASE)
                .arg(1)
                .arg(lease_key(msg_id))
                .arg(token)
                .ignore();
        }
        self.redis.pipeline::<()>(&pipe).await
    }
}

/// Usernames as netstrings: `<byte length>:<name>,` each.
fn encode_names(names: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(names.iter().map(|n| n.len() + 5).sum());
    for name in names {
        out.extend_from_slice(name.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(name.as_bytes());
        out.push(b',');
    }
    out
}

/// Reads back what [`encode_names`] wrote; a damaged tail (a write cut
/// short) ends the list rather than failing it.
fn parse_names(mut data: &[u8]) -> HashSet<String> {
    let mut names = HashSet::new();
    while let Some(colon) = data.iter().position(|&b| b == b':') {
        let Some(len) = std::str::from_utf8(&data[..colon])
            .ok()
            .and_then(|l| l.parse::<usize>().ok())
        else {
            break;
        };
        let start = colon + 1;
        let Some(name) = data.get(start..start + len) else {
            break;
        };
        if data.get(start + len) != Some(&b',') {
            break;
        }
        names.insert(String::from_utf8_lossy(name).into_owned());
        data = &data[start + len + 1..];
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any usernames, separators and digits included, read back as
        /// written, over any number of appends.
        #[test]
        fn names_survive_encoding(chunks in proptest::collection::vec(proptest::collection::vec(".{0,12}", 0..8), 0..5)) {
            let mut stored = Vec::new();
            let mut expected = HashSet::new();
            for chunk in &chunks {
                let names: Vec<&str> = chunk.iter().map(String::as_str).collect();
                stored.extend(encode_names(&names));
                expected.extend(chunk.iter().cloned());
            }
            prop_assert_eq!(parse_names(&stored), expected);
        }
    }

    #[test]
    fn a_torn_tail_is_ignored() {
        let mut data = encode_names(&["alice", "bob"]);
        data.extend_from_slice(b"7:caro");
        assert_eq!(
            parse_names(&data),
            HashSet::from(["alice".into(), "bob".into()])
        );
    }

    /// Redis Cluster hashes only what is inside the first `{...}`, so both
    /// keys of one event land in one slot.
    #[test]
    fn keys_share_a_hash_tag() {
        assert_eq!(delivered_key(42), "resonance:task:{42}:reached");
        assert_eq!(settled_key(42), "resonance:task:{42}:settled");
        let tag = |k: &str| k[k.find('{').unwrap()..=k.find('}').unwrap()].to_string();
        assert_eq!(tag(&delivered_key(7)), tag(&settled_key(7)));
        assert_eq!(tag(&lease_key(7)), tag(&settled_key(7)));
    }
}
