//! User routes (contract section 4): `resonance:router:user:{username}` holds
//! JSON naming the gateway that has the user's connection; no key means the
//! user is offline. Lookups are chunked MGETs run concurrently, never one
//! round trip per member.

use std::borrow::Cow;
use std::io::Write;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use memchr::memmem;
use redis::RedisWrite;
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
        Ok(self
            .raw(usernames)
            .await?
            .into_iter()
            .zip(usernames)
            .map(|(raw, username)| parse_route(username, &raw?))
            .collect())
    }

    /// The gateway id of each user's route, in input order, `None` as in
    /// [`RouteStore::lookup`]. The hot path: only `gateway_id` is decoded,
    /// and each distinct id is allocated once per call.
    pub async fn gateway_ids(
        &self,
        usernames: &[String],
    ) -> Result<Vec<Option<Arc<str>>>, RedisError> {
        Ok(gateway_ids_of(usernames, self.raw(usernames).await?))
    }

    /// The MGETs of [`RouteStore::gateway_ids`], to send along with other
    /// commands; [`RouteStore::gateway_ids_from`] reads their answers.
    pub fn lookup_commands(&self, usernames: &[String]) -> Vec<redis::Cmd> {
        usernames
            .chunks(self.chunk_size)
            .map(|chunk| {
                // Keys are written straight into the command's buffer,
                // sized once: a member's key allocates nothing of its own.
                let mut cmd = redis::cmd("MGET");
                cmd.reserve_space_for_args(chunk.iter().map(|u| ROUTE_KEY_PREFIX.len() + u.len()));
                for u in chunk {
                    let mut arg = cmd.writer_for_next_arg();
                    arg.write_all(ROUTE_KEY_PREFIX.as_bytes())
                        .and_then(|()| arg.write_all(u.as_bytes()))
                        .expect("a command's buffer takes any bytes");
                }
                cmd
            })
            .collect()
    }

    /// The gateway ids from the answers to [`RouteStore::lookup_commands`].
    pub fn gateway_ids_from(
        &self,
        usernames: &[String],
        answers: Vec<redis::Value>,
    ) -> Result<Vec<Option<Arc<str>>>, RedisError> {
        let mut raw = Vec::with_capacity(usernames.len());
        for answer in answers {
            raw.extend(self.redis.parse::<Vec<Option<Vec<u8>>>>(answer)?);
        }
        Ok(gateway_ids_of(usernames, raw))
    }

    /// The raw route values, in input order.
    async fn raw(&self, usernames: &[String]) -> Result<Vec<Option<Vec<u8>>>, RedisError> {
        // Each chunk's future owns its command and client handle, so the
        // set can be driven concurrently without borrowing from `self`.
        let pending: Vec<_> = self
            .lookup_commands(usernames)
            .into_iter()
            .map(|cmd| {
                let redis = self.redis.clone();
                async move { redis.query::<Vec<Option<Vec<u8>>>>(&cmd).await }
            })
            .collect();
        let chunks: Vec<Vec<Option<Vec<u8>>>> = futures::stream::iter(pending)
            .buffered(self.concurrency)
            .try_collect()
            .await?;
        Ok(chunks.into_iter().flatten().collect())
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

/// The gateway id of each user from its raw route value (`None` as in
/// [`RouteStore::lookup`]), each distinct id allocated once. Ids already
/// seen are found by hash, so a recipient costs the same whether the fleet
/// has four gateways or a hundred.
fn gateway_ids_of(usernames: &[String], raw: Vec<Option<Vec<u8>>>) -> Vec<Option<Arc<str>>> {
    let mut seen: foldhash::HashSet<Arc<str>> = Default::default();
    raw.into_iter()
        .zip(usernames)
        .map(|(raw, username)| {
            let raw = raw?;
            let id = parse_gateway_id(username, &raw)?;
            match seen.get(id.as_ref()) {
                Some(known) => Some(known.clone()),
                None => {
                    let new: Arc<str> = id.as_ref().into();
                    seen.insert(new.clone());
                    Some(new)
                }
            }
        })
        .collect()
}

fn parse_route(username: &str, raw: &[u8]) -> Option<Route> {
    let route = serde_json::from_slice::<Route>(raw);
    usable(username, route.as_ref().map(|r| r.gateway_id.as_str()))?;
    route.ok()
}

/// Just the gateway id of a route value, borrowed from it where possible.
fn parse_gateway_id<'a>(username: &str, raw: &'a [u8]) -> Option<Cow<'a, str>> {
    if let Some(id) = scan_gateway_id(raw) {
        usable(username, Ok(id))?;
        return Some(Cow::Borrowed(id));
    }
    #[derive(Deserialize)]
    struct Target<'a> {
        #[serde(borrow)]
        gateway_id: Cow<'a, str>,
    }
    let target = serde_json::from_slice::<Target>(raw);
    usable(username, target.as_ref().map(|t| t.gateway_id.as_ref()))?;
    target.ok().map(|t| t.gateway_id)
}

static GATEWAY_ID_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(br#""gateway_id""#));

/// The gateway id of a route value found without decoding the rest of it,
/// for the values the logic service writes: a flat object with no escape
/// before the end of an unescaped `gateway_id` string. Every recipient
/// costs one route, and decoding all of its fields to keep one cost about
/// three times this scan. `None` sends the value to the full decoder: an
/// escape, a nested value or a second `gateway_id`, anything unusual.
///
/// With no backslash before it, every quote is a string's delimiter, so
/// the first `"gateway_id"` followed by a colon is a key, and with no `{`
/// or `[` before it, a key of the outer object.
fn scan_gateway_id(raw: &[u8]) -> Option<&str> {
    let json_space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    if raw.first() != Some(&b'{') || raw.iter().rev().find(|b| !json_space(b)) != Some(&b'}') {
        return None;
    }
    let at = GATEWAY_ID_KEY.find(raw)?;
    if memchr::memchr3(b'\\', b'{', b'[', &raw[1..at]).is_some() {
        return None;
    }
    let mut rest = raw[at + GATEWAY_ID_KEY.needle().len()..].iter();
    let mut next_token = || rest.by_ref().find(|b| !json_space(b)).copied();
    if next_token() != Some(b':') || next_token() != Some(b'"') {
        return None;
    }
    let value = rest.as_slice();
    let end = memchr::memchr2(b'"', b'\\', value)?;
    if value[end] != b'"'
        || value[..end].iter().any(|b| *b < 0x20)
        || GATEWAY_ID_KEY.find(&value[end..]).is_some()
    {
        return None;
    }
    std::str::from_utf8(&value[..end]).ok()
}

/// Logs why a route value is unusable (a malformed route must not block
/// the rest of the event; the user counts as offline).
fn usable(username: &str, gateway_id: Result<&str, &serde_json::Error>) -> Option<()> {
    match gateway_id {
        Ok(id) if !id.is_empty() => Some(()),
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
    use proptest::prelude::*;

    /// What the full decoder makes of a value.
    fn decoded(raw: &[u8]) -> Option<String> {
        serde_json::from_slice::<Route>(raw)
            .ok()
            .map(|r| r.gateway_id)
    }

    proptest! {
        /// Whatever the fields hold (quotes, backslashes, braces, control
        /// characters, any script) and however the value is laid out, the
        /// scan finds what decoding finds or leaves the value to it.
        #[test]
        fn the_scan_agrees_with_decoding(
            username in "\\PC{0,12}|[\"\\\\{}\\[\\]:, \\x00-\\x1f]{0,6}|x?\"gateway_id\":\"[a-z]{0,3}",
            gateway_id in "\\PC{0,12}|[a-z0-9-]{1,12}|[\"\\\\]{0,3}",
            remote_ip in "\\PC{0,8}",
            pretty in any::<bool>(),
            id_first in any::<bool>(),
        ) {
            let route = Route { username, gateway_id, remote_ip, timestamp: 1_700_000_000_000 };
            // The struct's order puts the username before the id; a
            // `Value`'s sorted keys put the id first.
            let raw = match (id_first, pretty) {
                (false, false) => serde_json::to_vec(&route),
                (false, true) => serde_json::to_vec_pretty(&route),
                (true, false) => serde_json::to_vec(&serde_json::to_value(&route).unwrap()),
                (true, true) => serde_json::to_vec_pretty(&serde_json::to_value(&route).unwrap()),
            }
            .unwrap();
            prop_assert_eq!(raw.starts_with(br#"{"gateway_id""#) || raw.starts_with(b"{\n  \"gateway_id\""), id_first);
            if let Some(id) = scan_gateway_id(&raw) {
                prop_assert_eq!(Some(id.to_string()), decoded(&raw));
            }
            // And the scan does take the values it is for.
            let escaped = |s: &str| s.chars().any(|c| c == '"' || c == '\\' || c < ' ');
            let nested = |s: &str| s.contains(['{', '[']);
            let before_id_plain = id_first || !(escaped(&route.username) || nested(&route.username));
            if !escaped(&route.gateway_id) && before_id_plain {
                prop_assert!(scan_gateway_id(&raw).is_some());
            }
            prop_assert_eq!(
                parse_gateway_id(&route.username, &raw).map(Cow::into_owned),
                decoded(&raw).filter(|id| !id.is_empty())
            );
        }
    }

    #[test]
    fn a_plain_route_is_read_without_decoding() {
        let raw = br#"{"username":"alice","gateway_id":"gateway-001","remote_ip":"1.2.3.4","timestamp":1700000000000}"#;
        assert_eq!(scan_gateway_id(raw), Some("gateway-001"));
        let spaced = b"{ \"gateway_id\" :\n \"g-2\" , \"username\": \"b\" }\n";
        assert_eq!(scan_gateway_id(spaced), Some("g-2"));
    }

    #[test]
    fn unusual_values_go_to_the_decoder() {
        for raw in [
            // an escape before the key: the match may sit inside a string
            &br#"{"username":"x\"gateway_id\":\"evil","gateway_id":"real"}"#[..],
            // a nested object holding the key
            br#"{"meta":{"gateway_id":"inner"},"gateway_id":"outer"}"#,
            // an escaped id
            br#"{"gateway_id":"gate\u0077ay-2"}"#,
            // the key twice
            br#"{"gateway_id":"a","gateway_id":"b"}"#,
            // cut short
            br#"{"gateway_id":"a""#,
            br#"["gateway_id","a"]"#,
        ] {
            assert_eq!(
                scan_gateway_id(raw),
                None,
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let tricky = br#"{"username":"x\"gateway_id\":\"evil","gateway_id":"real"}"#;
        assert_eq!(parse_gateway_id("x", tricky).as_deref(), Some("real"));
        let nested = br#"{"meta":{"gateway_id":"inner"},"gateway_id":"outer"}"#;
        assert_eq!(parse_gateway_id("x", nested).as_deref(), Some("outer"));
    }

    #[test]
    fn key_layout_matches_the_contract() {
        assert_eq!(route_key("alice"), "resonance:router:user:alice");
    }

    #[test]
    fn contract_route_json_parses() {
        let raw = br#"{"username":"alice","gateway_id":"gateway-001","remote_ip":"1.2.3.4","timestamp":1700000000000}"#;
        let r = parse_route("alice", raw).unwrap();
        assert_eq!(r.gateway_id, "gateway-001");
        assert_eq!(r.timestamp, 1_700_000_000_000);
        assert_eq!(
            parse_gateway_id("alice", raw).as_deref(),
            Some("gateway-001")
        );
        let escaped = br#"{"gateway_id":"gate\u0077ay-2","username":"b"}"#;
        assert_eq!(parse_gateway_id("b", escaped).as_deref(), Some("gateway-2"));
        for bad in [
            &b"not json"[..],
            br#"{"username":"a","gateway_id":""}"#,
            br#"{"username":"a"}"#,
        ] {
            assert!(parse_route("a", bad).is_none());
            assert!(parse_gateway_id("a", bad).is_none());
        }
    }
}
