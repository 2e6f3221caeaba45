//! User routes (contract section 4): `resonance:router:user:{username}` holds
//! JSON naming the gateway that has the user's connection; no key means the
//! user is offline. Lookups are chunked MGETs run concurrently, never one
//! round trip per member.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::redis::{RedisClient, RedisError};

pub const ROUTE_KEY_PREFIX: &str = "resonance:router:user:";
/// TTL the logic service writes routes with.
pub const ROUTE_TTL: Duration = Duration::from_secs(24 * 3600);

pub fn route_key(username: &str) -> String {
    format!("{ROUTE_KEY_PREFIX}{username}")
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Route {
    pub username: String,
    pub gateway_id: String,
    #[serde(default)]
    pub remote_ip: String,
    /// Unix milliseconds.
    #[serde(default)]
    pub timestamp: i64,
}

#[derive(Clone)]
pub struct RouteStore {
    redis: RedisClient,
    chunk_size: usize,
    concurrency: usize,
}

impl RouteStore {
    pub fn new(redis: RedisClient, chunk_size: usize, concurrency: usize) -> Self {
        Self {
            redis,
            chunk_size: chunk_size.max(1),
            concurrency: concurrency.max(1),
        }
    }

    /// The route of each user, in input order; `None` for offline users and
    /// for values that are not route JSON (logged: a malformed route must not
    /// block the rest of the event).
    pub async fn lookup(&self, usernames: &[String]) -> Result<Vec<Option<Route>>, RedisError> {
        // Each chunk's future owns its command and client handle, so the
        // set can be driven concurrently without borrowing from `self`.
        let mut pending = Vec::with_capacity(usernames.len().div_ceil(self.chunk_size));
        for chunk in usernames.chunks(self.chunk_size) {
            let mut cmd = redis::cmd("MGET");
            for u in chunk {
                cmd.arg(route_key(u));
            }
            let redis = self.redis.clone();
            pending.push(async move { redis.query::<Vec<Option<String>>>(&cmd).await });
        }
        let chunks: Vec<Vec<Option<String>>> = futures::stream::iter(pending)
            .buffered(self.concurrency)
            .try_collect()
            .await?;
        Ok(chunks
            .into_iter()
            .flatten()
            .zip(usernames)
            .map(|(raw, username)| parse_route(username, raw?))
            .collect())
    }

    /// Writes a route as the logic service does (reference gateway, tests).
    pub async fn put(&self, route: &Route, ttl: Duration) -> Result<(), RedisError> {
        let value = serde_json::to_string(route).expect("route serializes");
        let mut cmd = redis::cmd("SET");
        cmd.arg(route_key(&route.username))
            .arg(value)
            .arg("PX")
            .arg(ttl.as_millis() as u64);
        self.redis.query::<()>(&cmd).await
    }

    pub async fn remove(&self, username: &str) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(route_key(username));
        self.redis.query::<()>(&cmd).await
    }
}

fn parse_route(username: &str, raw: String) -> Option<Route> {
    match serde_json::from_str::<Route>(&raw) {
        Ok(r) if !r.gateway_id.is_empty() => Some(r),
        Ok(_) => {
            tracing::warn!(
                username,
                "route has an empty gateway_id; treating the user as offline"
            );
            None
        }
        Err(e) => {
            tracing::warn!(username, error = %e, "route value is not route JSON; treating the user as offline");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout_matches_the_contract() {
        assert_eq!(route_key("alice"), "resonance:router:user:alice");
    }

    #[test]
    fn contract_route_json_parses() {
        let r = parse_route(
            "alice",
            r#"{"username":"alice","gateway_id":"gateway-001","remote_ip":"1.2.3.4","timestamp":1700000000000}"#.into(),
        )
        .unwrap();
        assert_eq!(r.gateway_id, "gateway-001");
        assert_eq!(r.timestamp, 1_700_000_000_000);
        assert!(parse_route("a", "not json".into()).is_none());
        assert!(parse_route("a", r#"{"username":"a","gateway_id":""}"#.into()).is_none());
    }
}
