//! Providers that address a phone by a device token (FCM, APNs): a user's
//! tokens are a Redis set (one member per device, `token_key` with
//! `{username}` replaced), and a notice goes to each of them.
//!
//! Progress is kept per device: when one of a user's devices must be
//! retried, the devices already reached are marked in the notice's sent
//! list (`{provider}/{username}/{device}`, the device being a digest of
//! its token), so the retry reaches only the rest. A token the provider
//! calls unregistered is removed from the set. Requests in flight are
//! bounded per provider over all notices (`max_in_flight`): a slow
//! provider queues its own sends and no one else's, and a send that finds
//! no free slot within the request timeout is retried later rather than
//! holding its notice.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::{Delivery, SENT_TTL, sent_key};
use resonance_task::store::RedisClient;
use resonance_task::telemetry;

/// What a provider did with one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceOutcome {
    Sent,
    /// The token is no longer valid: it is removed.
    Unregistered(String),
    /// Refused for a reason a retry will not change.
    Dropped(String),
    Retry {
        reason: String,
        after: Option<Duration>,
    },
}

impl DeviceOutcome {
    pub fn retry(reason: impl Into<String>, after: Option<Duration>) -> Self {
        Self::Retry {
            reason: reason.into(),
            after,
        }
    }
}

/// 16 hex characters naming a device in the sent list without its token.
pub fn device_id(token: &str) -> String {
    hex::encode(&Sha256::digest(token.as_bytes())[..8])
}

pub struct Devices {
    provider: &'static str,
    key: String,
    redis: RedisClient,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    slot_wait: Duration,
}

impl Devices {
    pub fn new(
        provider: &'static str,
        key: &str,
        redis: RedisClient,
        max_in_flight: usize,
        slot_wait: Duration,
    ) -> Self {
        Self {
            provider,
            key: key.to_string(),
            redis,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            slot_wait,
        }
    }

    pub fn key_of(&self, username: &str) -> String {
        self.key.replace("{username}", username)
    }

    async fn tokens(&self, username: &str) -> Result<Vec<String>, Delivery> {
        let mut members = redis::cmd("SMEMBERS");
        members.arg(self.key_of(username));
        let mut tokens: Vec<String> =
            self.redis.query(&members).await.map_err(|e| {
                Delivery::retry(format!("{} tokens of {username}: {e}", self.provider))
            })?;
        tokens.retain(|t| !t.is_empty());
        tokens.sort();
        Ok(tokens)
    }

    fn mark(&self, username: &str, token: &str) -> String {
        format!("{}/{username}/{}", self.provider, device_id(token))
    }

    /// Tokens of `tokens` not yet marked sent for `msg_id`.
    async fn unsent(
        &self,
        msg_id: i64,
        username: &str,
        tokens: Vec<String>,
    ) -> Result<Vec<String>, Delivery> {
        if tokens.len() < 2 {
            // A single device is marked with its user, by the caller.
            return Ok(tokens);
        }
        let mut check = redis::cmd("SMISMEMBER");
        check.arg(sent_key(msg_id));
        for t in &tokens {
            check.arg(self.mark(username, t));
        }
        let sent: Vec<bool> = self
            .redis
            .query(&check)
            .await
            .map_err(|e| Delivery::retry(format!("sent devices of {username}: {e}")))?;
        Ok(tokens
            .into_iter()
            .zip(sent)
            .filter(|(_, sent)| !sent)
            .map(|(t, _)| t)
            .collect())
    }

    async fn remove(&self, username: &str, token: &str, reason: &str) {
        let mut rem = redis::cmd("SREM");
        rem.arg(self.key_of(username)).arg(token);
        match self.redis.query::<i64>(&rem).await {
            Ok(_) => {
                metrics::counter!(telemetry::metrics::NOTIFY, "provider" => self.provider, "outcome" => "token_removed")
                    .increment(1);
                tracing::info!(provider = self.provider, username, device = %device_id(token), %reason, "device token removed");
            }
            Err(e) => {
                tracing::warn!(provider = self.provider, username, device = %device_id(token), error = %e, "device token not removed; it will be tried again")
            }
        }
    }

    /// One request, once a slot is free.
    async fn one<F, Fut>(&self, send: &F, token: String) -> DeviceOutcome
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = DeviceOutcome>,
    {
        let slot = tokio::time::timeout(self.slot_wait, self.in_flight.acquire()).await;
        match slot {
            Ok(Ok(_permit)) => send(token).await,
            _ => DeviceOutcome::retry(
                format!(
                    "{}: all {} request slots busy for {:?}",
                    self.provider, self.max_in_flight, self.slot_wait
                ),
                None,
            ),
        }
    }

    /// Sends to every device of `username` not yet reached for `msg_id`.
    pub async fn send<F, Fut>(&self, msg_id: i64, username: &str, send: F) -> Delivery
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = DeviceOutcome>,
    {
        let tokens = match self.tokens(username).await {
            Ok(t) if t.is_empty() => {
                return Delivery::Dropped(format!("no {} device token", self.provider));
            }
            Ok(t) => t,
            Err(d) => return d,
        };
        let (several, total) = (tokens.len() > 1, tokens.len());
        let left = match self.unsent(msg_id, username, tokens).await {
            Ok(left) => left,
            Err(d) => return d,
        };
        let outcomes =
            futures::future::join_all(left.iter().map(|t| self.one(&send, t.clone()))).await;
        let (mut reached, mut refused, mut retry) = (Vec::new(), Vec::new(), None);
        for (token, outcome) in left.iter().zip(outcomes) {
            match outcome {
                DeviceOutcome::Sent => reached.push(token),
                DeviceOutcome::Unregistered(reason) => {
                    self.remove(username, token, &reason).await;
                    refused.push(reason);
                }
                DeviceOutcome::Dropped(reason) => {
                    tracing::info!(provider = self.provider, msg_id, username, device = %device_id(token), %reason, "push to a device dropped");
                    refused.push(reason);
                }
                DeviceOutcome::Retry { reason, after } => {
                    let (_, waited) = retry.get_or_insert((reason, None));
                    *waited = (*waited).max(after);
                }
            }
        }
        if let Some((reason, after)) = retry {
            if several && !reached.is_empty() {
                self.remember(msg_id, username, &reached).await;
            }
            return Delivery::Retry { reason, after };
        }
        // Nobody: no device reached now, and none on an earlier attempt.
        let nobody = reached.is_empty() && left.len() == total;
        if nobody && !several {
            Delivery::Dropped(refused.swap_remove(0))
        } else if nobody {
            Delivery::Dropped(format!(
                "every {} device refused: {}",
                self.provider,
                refused.join("; ")
            ))
        } else {
            Delivery::Sent
        }
    }

    async fn remember(&self, msg_id: i64, username: &str, reached: &[&String]) {
        let key = sent_key(msg_id);
        let mut add = redis::cmd("SADD");
        add.arg(&key);
        for t in reached {
            add.arg(self.mark(username, t));
        }
        let mut expire = redis::cmd("PEXPIRE");
        expire.arg(&key).arg(SENT_TTL.as_millis() as u64);
        if let Err(e) = self.redis.per_key(vec![vec![add, expire]]).await {
            tracing::warn!(provider = self.provider, msg_id, username, error = %e, "reached devices not recorded; a retry may push to them again");
        }
    }
}

/// `Retry-After` as a delay: seconds, or an HTTP date.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_short_stable_digests() {
        let id = device_id("token-a");
        assert_eq!(id.len(), 16);
        assert_eq!(id, device_id("token-a"));
        assert_ne!(id, device_id("token-b"));
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert(
            reqwest::header::RETRY_AFTER,
            httpdate::fmt_http_date(later).parse().unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
