//! The Getui (个推) provider, REST API v2: `{base_url}/{app_id}/auth` for
//! a token, `{base_url}/{app_id}/push/single/cid` for one phone.
//!
//! The token comes from `sign = sha256(appkey + timestamp + mastersecret)`
//! (hex, timestamp in ms), is cached, and is renewed before it expires (in
//! the last tenth of its life, at most five minutes early); a push answered
//! with code 10001 (token invalid) renews it at once and is sent again. The
//! user's client id is read from Redis (`notify.getui.cid_key`); a user
//! with none has no phone to wake and is dropped. The `request_id` is
//! derived from msg_id and username, so a retried push is the same request
//! to Getui (which ignores repeats). HTTP 5xx, 429, timeouts and connection
//! errors are retried; other non-zero codes are dropped.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{CachedToken, Delivery};
use resonance_task::config::{GetuiConfig, Secret};
use resonance_task::proto::OfflineNotice;
use resonance_task::store::RedisClient;

/// Getui's code for an invalid or expired token.
const TOKEN_INVALID: i64 = 10001;

/// `sha256(appkey + timestamp + mastersecret)` in hex.
pub fn sign(app_key: &str, timestamp_ms: &str, master_secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(app_key.as_bytes());
    h.update(timestamp_ms.as_bytes());
    h.update(master_secret.as_bytes());
    hex::encode(h.finalize())
}

/// 32 hex characters, the same for one message to one user.
pub fn request_id(msg_id: i64, username: &str) -> String {
    let mut h = Sha256::new();
    h.update(msg_id.to_be_bytes());
    h.update(username.as_bytes());
    hex::encode(&h.finalize()[..16])
}

#[derive(Deserialize)]
struct Reply {
    code: i64,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    data: serde_json::Value,
}

pub struct Getui {
    http: reqwest::Client,
    /// `{base_url}/{app_id}`.
    root: String,
    app_key: String,
    master_secret: Secret,
    cid_key: String,
    ttl: Duration,
    redis: RedisClient,
    token: tokio::sync::Mutex<Option<CachedToken>>,
}

impl Getui {
    pub fn new(http: reqwest::Client, cfg: &GetuiConfig, redis: RedisClient) -> Self {
        Self {
            http,
            root: format!("{}/{}", cfg.base_url.trim_end_matches('/'), cfg.app_id),
            app_key: cfg.app_key.clone(),
            master_secret: cfg.master_secret.clone().unwrap_or_else(|| Secret::new("")),
            cid_key: cfg.cid_key.clone(),
            ttl: cfg.ttl,
            redis,
            token: tokio::sync::Mutex::new(None),
        }
    }

    /// A valid token, renewed first when due or when `refused` is the
    /// cached one (several pushes refused at once renew it once).
    async fn token(&self, refused: Option<&str>) -> Result<String, Delivery> {
        let mut cached = self.token.lock().await;
        let now = resonance_task::clock::now_ms();
        if let Some(value) = CachedToken::reusable(&cached, refused, now) {
            return Ok(value);
        }
        let timestamp = now.to_string();
        let body = json!({
            "sign": sign(&self.app_key, &timestamp, self.master_secret.expose()),
            "timestamp": timestamp,
            "appkey": self.app_key,
        });
        let reply = self.call("auth", None, &body).await?;
        if reply.code != 0 {
            return Err(Delivery::retry(format!(
                "Getui auth refused: code {} {}",
                reply.code, reply.msg
            )));
        }
        let value = reply.data["token"].as_str().unwrap_or_default().to_string();
        let expires_ms = reply.data["expire_time"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| reply.data["expire_time"].as_i64())
            .unwrap_or(now);
        if value.is_empty() {
            return Err(Delivery::retry("Getui auth answered no token"));
        }
        tracing::debug!(expires_ms, "Getui token renewed");
        *cached = Some(CachedToken {
            value: value.clone(),
            issued_ms: now,
            expires_ms,
        });
        Ok(value)
    }

    async fn call(
        &self,
        path: &str,
        token: Option<&str>,
        body: &serde_json::Value,
    ) -> Result<Reply, Delivery> {
        let mut request = self.http.post(format!("{}/{path}", self.root)).json(body);
        if let Some(t) = token {
            request = request.header("token", t);
        }
        let response = request
            .send()
            .await
            .map_err(|e| Delivery::retry(format!("Getui {path}: {e}")))?;
        let status = response.status();
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(Delivery::retry(format!("Getui {path} answered {status}")));
        }
        if !status.is_success() {
            return Err(Delivery::Dropped(format!(
                "Getui {path} refused it: {status}"
            )));
        }
        response
            .json::<Reply>()
            .await
            .map_err(|e| Delivery::retry(format!("Getui {path} answer unreadable: {e}")))
    }

    async fn client_id(&self, username: &str) -> Result<Option<String>, Delivery> {
        let key = self.cid_key.replace("{username}", username);
        let mut get = redis::cmd("GET");
        get.arg(&key);
        self.redis
            .query::<Option<String>>(&get)
            .await
            .map_err(|e| Delivery::retry(format!("Getui client id of {username}: {e}")))
    }

    pub async fn send(&self, notice: &OfflineNotice, username: &str) -> Delivery {
        let cid = match self.client_id(username).await {
            Ok(Some(cid)) if !cid.is_empty() => cid,
            Ok(_) => return Delivery::Dropped("no Getui client id".into()),
            Err(d) => return d,
        };
        let (title, text) = super::title_and_body(notice);
        let body = json!({
            "request_id": request_id(notice.msg_id, username),
            "settings": { "ttl": self.ttl.as_millis() as u64 },
            "audience": { "cid": [cid] },
            "push_message": {
                "notification": {
                    "title": title,
                    "body": text,
                    "click_type": "startapp",
                }
            }
        });
        let mut refused: Option<String> = None;
        for _ in 0..2 {
            let token = match self.token(refused.as_deref()).await {
                Ok(t) => t,
                Err(d) => return d,
            };
            let reply = match self.call("push/single/cid", Some(&token), &body).await {
                Ok(r) => r,
                Err(d) => return d,
            };
            match reply.code {
                0 => return Delivery::Sent,
                TOKEN_INVALID => refused = Some(token),
                code => return Delivery::Dropped(format!("Getui code {code}: {}", reply.msg)),
            }
        }
        Delivery::retry("Getui kept refusing a fresh token")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_is_sha256_of_key_time_secret() {
        // sha256("abc") split over the three parts.
        assert_eq!(
            sign("a", "b", "c"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn request_ids_are_stable_and_32_hex() {
        let id = request_id(7, "alice");
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(id, request_id(7, "alice"));
        assert_ne!(id, request_id(7, "bob"));
        assert_ne!(id, request_id(8, "alice"));
    }
}
