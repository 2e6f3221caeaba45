//! Apple Push Notification service, token-based authentication, HTTP/2.
//!
//! The provider token is a JWT signed with the .p8 key (ES256; header
//! `kid` the key id, claims `iss` the team id and `iat`), reused for 55
//! minutes (Apple refuses one older than an hour and throttles renewals
//! more often than every 20 minutes); an answer 403
//! `ExpiredProviderToken` renews it at once and the push is sent again.
//!
//! Each of the user's devices gets `POST {base_url}/3/device/{token}`
//! over HTTP/2 (TLS for https://, prior-knowledge cleartext for http://)
//! with `apns-topic`, `apns-push-type`, `apns-priority`,
//! `apns-expiration`, `apns-collapse-id` (one per message, so repeats
//! show once) and `apns-id` (derived from message, user and device, so a
//! retry is the same notification). 410 `Unregistered`, and 400
//! `BadDeviceToken` or `DeviceTokenNotForTopic`, remove the token; 429
//! and 5xx are retried (after `Retry-After` when sent); anything else is
//! dropped.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::devices::{DeviceOutcome, Devices, retry_after};
use super::{CachedToken, Delivery, NotifyError};
use resonance_task::config::ApnsConfig;
use resonance_task::proto::OfflineNotice;
use resonance_task::store::RedisClient;

/// How long one provider token is used.
const TOKEN_LIFE: Duration = Duration::from_secs(3600);

/// The claims of a provider token.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProviderClaims {
    pub iss: String,
    pub iat: u64,
}

/// `apns-id`: a UUID (version 8, RFC 9562) from a digest of message, user
/// and device, the same on every retry.
pub fn apns_id(msg_id: i64, username: &str, device: &str) -> String {
    let mut h = Sha256::new();
    h.update(msg_id.to_be_bytes());
    h.update(username.as_bytes());
    h.update([0]);
    h.update(device.as_bytes());
    let digest: [u8; 32] = h.finalize().into();
    let bytes: [u8; 16] = digest[..16].try_into().expect("16 of 32 bytes");
    uuid::Uuid::new_v8(bytes).hyphenated().to_string()
}

/// `apns-collapse-id`: one per message.
pub fn collapse_id(msg_id: i64) -> String {
    format!("resonance-{msg_id}")
}

pub struct Apns {
    http: reqwest::Client,
    root: String,
    key: EncodingKey,
    key_id: String,
    team_id: String,
    topic: String,
    push_type: String,
    priority: String,
    ttl: Duration,
    devices: Devices,
    token: std::sync::Mutex<Option<CachedToken>>,
}

impl Apns {
    pub fn new(
        request_timeout: Duration,
        cfg: &ApnsConfig,
        redis: RedisClient,
    ) -> Result<Self, NotifyError> {
        let path = cfg.key_file.as_ref().ok_or(NotifyError::NoProvider)?;
        let pem = std::fs::read(path).map_err(|e| {
            NotifyError::key("notify.apns.key_file", format!("{}: {e}", path.display()))
        })?;
        let key = EncodingKey::from_ec_pem(&pem).map_err(|e| {
            NotifyError::key(
                "notify.apns.key_file",
                format!("{} is not a .p8 (PKCS#8 P-256) key: {e}", path.display()),
            )
        })?;
        // APNs speaks HTTP/2 only.
        let http = reqwest::Client::builder()
            .http2_prior_knowledge()
            .timeout(request_timeout)
            .connect_timeout(request_timeout)
            .build()
            .map_err(NotifyError::Http)?;
        Ok(Self {
            http,
            root: cfg.base_url.trim_end_matches('/').to_string(),
            key,
            key_id: cfg.key_id.clone(),
            team_id: cfg.team_id.clone(),
            topic: cfg.topic.clone(),
            push_type: cfg.push_type.clone(),
            priority: cfg.priority.to_string(),
            ttl: cfg.ttl,
            devices: Devices::new(
                "apns",
                &cfg.token_key,
                redis,
                cfg.max_in_flight,
                request_timeout,
            ),
            token: std::sync::Mutex::new(None),
        })
    }

    /// The provider token, signed again when due or when `refused` is the
    /// cached one.
    fn provider_token(&self, refused: Option<&str>) -> Result<String, DeviceOutcome> {
        let mut cached = self.token.lock().expect("token lock");
        let now = resonance_task::clock::now_ms();
        if let Some(value) = CachedToken::reusable(&cached, refused, now) {
            return Ok(value);
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = ProviderClaims {
            iss: self.team_id.clone(),
            iat: (now / 1000) as u64,
        };
        let value = jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| {
            DeviceOutcome::retry(format!("APNs provider token not signed: {e}"), None)
        })?;
        tracing::debug!("APNs provider token signed");
        *cached = Some(CachedToken {
            value: value.clone(),
            issued_ms: now,
            expires_ms: now + TOKEN_LIFE.as_millis() as i64,
        });
        Ok(value)
    }

    fn payload(notice: &OfflineNotice) -> Value {
        let (title, body) = super::title_and_body(notice);
        json!({
            "aps": {
                "alert": { "title": title, "body": body },
                "sound": "default",
                "thread-id": notice.session_id,
            },
            "msg_id": notice.msg_id.to_string(),
            "seq_id": notice.seq_id.to_string(),
            "session_id": notice.session_id,
        })
    }

    async fn send_one(
        &self,
        notice: &OfflineNotice,
        username: &str,
        device: String,
    ) -> DeviceOutcome {
        let body = Self::payload(notice);
        let id = apns_id(notice.msg_id, username, &device);
        let expiration = (resonance_task::clock::now_ms() / 1000) as u64 + self.ttl.as_secs();
        let mut refused: Option<String> = None;
        for _ in 0..2 {
            let token = match self.provider_token(refused.as_deref()) {
                Ok(t) => t,
                Err(outcome) => return outcome,
            };
            let response = match self
                .http
                .post(format!("{}/3/device/{device}", self.root))
                .header(reqwest::header::AUTHORIZATION, format!("bearer {token}"))
                .header("apns-topic", &self.topic)
                .header("apns-push-type", &self.push_type)
                .header("apns-priority", &self.priority)
                .header("apns-expiration", expiration.to_string())
                .header("apns-collapse-id", collapse_id(notice.msg_id))
                .header("apns-id", &id)
                .json(&body)
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => return DeviceOutcome::retry(format!("APNs send: {e}"), None),
            };
            let status = response.status();
            if status.is_success() {
                return DeviceOutcome::Sent;
            }
            let after = retry_after(response.headers());
            let answer: Value = response.json().await.unwrap_or(Value::Null);
            let reason = answer["reason"].as_str().unwrap_or_default();
            if status == reqwest::StatusCode::FORBIDDEN && reason == "ExpiredProviderToken" {
                refused = Some(token);
                continue;
            }
            return by_answer(status, reason, after);
        }
        DeviceOutcome::retry("APNs kept refusing a fresh provider token", None)
    }

    pub async fn send(&self, notice: &OfflineNotice, username: &str) -> Delivery {
        self.devices
            .send(notice.msg_id, username, |device| {
                self.send_one(notice, username, device)
            })
            .await
    }
}

fn by_answer(status: reqwest::StatusCode, reason: &str, after: Option<Duration>) -> DeviceOutcome {
    let text = format!("APNs answered {status} {reason}");
    match (status.as_u16(), reason) {
        (410, _) | (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => {
            DeviceOutcome::Unregistered(text)
        }
        (429, _) => DeviceOutcome::retry(text, after),
        _ if status.is_server_error() => DeviceOutcome::retry(text, after),
        _ => DeviceOutcome::Dropped(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode as S;

    #[test]
    fn apns_ids_are_stable_uuids() {
        let id = apns_id(7, "alice", "dev-1");
        let parsed = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(parsed.get_version_num(), 8);
        assert_eq!(id, apns_id(7, "alice", "dev-1"));
        assert_ne!(id, apns_id(7, "alice", "dev-2"));
        assert_ne!(id, apns_id(8, "alice", "dev-1"));
        assert!(
            collapse_id(i64::MAX).len() <= 64,
            "APNs caps it at 64 bytes"
        );
    }

    #[test]
    fn answers_map_to_removal_retry_or_drop() {
        for (status, reason) in [
            (S::GONE, "Unregistered"),
            (S::BAD_REQUEST, "BadDeviceToken"),
            (S::BAD_REQUEST, "DeviceTokenNotForTopic"),
        ] {
            let o = by_answer(status, reason, None);
            assert!(matches!(o, DeviceOutcome::Unregistered(_)), "{o:?}");
        }
        let wait = Some(Duration::from_secs(2));
        assert_eq!(
            by_answer(S::TOO_MANY_REQUESTS, "TooManyRequests", wait),
            DeviceOutcome::retry("APNs answered 429 Too Many Requests TooManyRequests", wait)
        );
        for status in [S::INTERNAL_SERVER_ERROR, S::SERVICE_UNAVAILABLE] {
            assert!(matches!(
                by_answer(status, "", None),
                DeviceOutcome::Retry { .. }
            ));
        }
        for (status, reason) in [
            (S::BAD_REQUEST, "PayloadTooLarge"),
            (S::FORBIDDEN, "InvalidProviderToken"),
        ] {
            let o = by_answer(status, reason, None);
            assert!(matches!(o, DeviceOutcome::Dropped(_)), "{o:?}");
        }
    }
}
