//! Firebase Cloud Messaging, HTTP v1 API.
//!
//! Authorisation: the service account's key signs a JWT (RS256, `kid` the
//! key's id; `iss` the account's e-mail, `scope` firebase.messaging, `aud`
//! the token endpoint, valid one hour), which the OAuth2 token endpoint
//! exchanges for an access token (`grant_type` jwt-bearer). The access
//! token is cached and renewed before it expires (in the last tenth of its
//! life, at most five minutes early); a send answered 401 renews it at
//! once and is sent again.
//!
//! Each of the user's devices gets `POST {base_url}/v1/projects/{project}/
//! messages:send`. An error whose FCM code (`details[].errorCode`, else
//! `error.status`) is `UNREGISTERED` or `INVALID_ARGUMENT` removes the
//! token; 429 and 5xx are retried after `Retry-After` when FCM sends one;
//! anything else is dropped.

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::devices::{DeviceOutcome, Devices, retry_after};
use super::{CachedToken, Delivery, NotifyError};
use resonance_task::config::FcmConfig;
use resonance_task::proto::OfflineNotice;
use resonance_task::store::RedisClient;

pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Google's token endpoint, when the key file names none.
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// The longest life Google grants a signed assertion.
const ASSERTION_LIFE: Duration = Duration::from_secs(3600);

/// The fields of a service account's JSON key that FCM needs.
#[derive(Debug, Clone, Deserialize)]
pub struct ServiceAccount {
    pub project_id: String,
    pub private_key_id: String,
    pub private_key: String,
    pub client_email: String,
    #[serde(default)]
    pub token_uri: String,
}

impl ServiceAccount {
    pub fn read(path: &Path) -> Result<Self, NotifyError> {
        let key = "notify.fcm.service_account_file";
        let text = std::fs::read(path)
            .map_err(|e| NotifyError::key(key, format!("{}: {e}", path.display())))?;
        serde_json::from_slice(&text).map_err(|e| {
            NotifyError::key(
                key,
                format!("{} is not a service account key: {e}", path.display()),
            )
        })
    }
}

/// The claims of the assertion sent to the token endpoint.
#[derive(Debug, Serialize, Deserialize)]
pub struct Assertion {
    pub iss: String,
    pub scope: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
}

#[derive(Deserialize)]
struct Granted {
    access_token: String,
    #[serde(default)]
    expires_in: u64,
}

pub struct Fcm {
    http: reqwest::Client,
    send_url: String,
    token_url: String,
    key: EncodingKey,
    key_id: String,
    client_email: String,
    ttl: Duration,
    devices: Devices,
    token: tokio::sync::Mutex<Option<CachedToken>>,
}

impl Fcm {
    pub fn new(
        http: reqwest::Client,
        cfg: &FcmConfig,
        account: ServiceAccount,
        redis: RedisClient,
        slot_wait: Duration,
    ) -> Result<Self, NotifyError> {
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes()).map_err(|e| {
            NotifyError::key(
                "notify.fcm.service_account_file",
                format!("private_key is not an RSA key: {e}"),
            )
        })?;
        let project = if cfg.project_id.is_empty() {
            account.project_id
        } else {
            cfg.project_id.clone()
        };
        if project.is_empty() {
            return Err(NotifyError::key(
                "notify.fcm.project_id",
                "is empty and the service account names no project",
            ));
        }
        let token_url = [&cfg.token_url, &account.token_uri]
            .into_iter()
            .find(|u| !u.is_empty())
            .cloned()
            .unwrap_or_else(|| DEFAULT_TOKEN_URI.to_string());
        Ok(Self {
            http,
            send_url: format!(
                "{}/v1/projects/{project}/messages:send",
                cfg.base_url.trim_end_matches('/')
            ),
            token_url,
            key,
            key_id: account.private_key_id,
            client_email: account.client_email,
            ttl: cfg.ttl,
            devices: Devices::new("fcm", &cfg.token_key, redis, cfg.max_in_flight, slot_wait),
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// The signed assertion the token endpoint exchanges.
    fn assertion(&self, now_s: u64) -> Result<String, DeviceOutcome> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.key_id.clone());
        let claims = Assertion {
            iss: self.client_email.clone(),
            scope: SCOPE.into(),
            aud: self.token_url.clone(),
            iat: now_s,
            exp: now_s + ASSERTION_LIFE.as_secs(),
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| DeviceOutcome::retry(format!("FCM assertion not signed: {e}"), None))
    }

    /// A valid access token, renewed first when due or when `refused` is
    /// the cached one (several sends refused at once renew it once).
    async fn access_token(&self, refused: Option<&str>) -> Result<String, DeviceOutcome> {
        let mut cached = self.token.lock().await;
        let now = resonance_task::clock::now_ms();
        if let Some(value) = CachedToken::reusable(&cached, refused, now) {
            return Ok(value);
        }
        let assertion = self.assertion((now / 1000) as u64)?;
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", GRANT_TYPE)
            .append_pair("assertion", &assertion)
            .finish();
        let response = self
            .http
            .post(&self.token_url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form)
            .send()
            .await
            .map_err(|e| DeviceOutcome::retry(format!("FCM token endpoint: {e}"), None))?;
        let status = response.status();
        let after = retry_after(response.headers());
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(DeviceOutcome::retry(
                format!("FCM token endpoint answered {status}: {}", text.trim()),
                after,
            ));
        }
        let granted: Granted = response.json().await.map_err(|e| {
            DeviceOutcome::retry(format!("FCM token endpoint answer unreadable: {e}"), None)
        })?;
        let life = Duration::from_secs(granted.expires_in.max(60));
        tracing::debug!(expires_in = ?life, "FCM access token renewed");
        *cached = Some(CachedToken {
            value: granted.access_token.clone(),
            issued_ms: now,
            expires_ms: now + life.as_millis() as i64,
        });
        Ok(granted.access_token)
    }

    fn message(&self, notice: &OfflineNotice, device: &str) -> Value {
        let (title, body) = super::title_and_body(notice);
        json!({
            "message": {
                "token": device,
                "notification": { "title": title, "body": body },
                "data": {
                    "msg_id": notice.msg_id.to_string(),
                    "seq_id": notice.seq_id.to_string(),
                    "session_id": notice.session_id,
                    "session_type": notice.session_type.to_string(),
                },
                "android": {
                    "priority": "HIGH",
                    "ttl": format!("{}s", self.ttl.as_secs()),
                },
            }
        })
    }

    async fn send_one(&self, notice: &OfflineNotice, device: String) -> DeviceOutcome {
        let message = self.message(notice, &device);
        let mut refused: Option<String> = None;
        for _ in 0..2 {
            let token = match self.access_token(refused.as_deref()).await {
                Ok(t) => t,
                Err(outcome) => return outcome,
            };
            let response = match self
                .http
                .post(&self.send_url)
                .bearer_auth(&token)
                .json(&message)
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => return DeviceOutcome::retry(format!("FCM send: {e}"), None),
            };
            let status = response.status();
            if status.is_success() {
                return DeviceOutcome::Sent;
            }
            if status == reqwest::StatusCode::UNAUTHORIZED {
                refused = Some(token);
                continue;
            }
            let after = retry_after(response.headers());
            let body: Value = response.json().await.unwrap_or(Value::Null);
            return by_answer(status, &body, after);
        }
        DeviceOutcome::retry("FCM kept refusing a fresh access token", None)
    }

    pub async fn send(&self, notice: &OfflineNotice, username: &str) -> Delivery {
        self.devices
            .send(notice.msg_id, username, |device| {
                self.send_one(notice, device)
            })
            .await
    }
}

/// FCM's own code of an error answer: `details[].errorCode`, else
/// `error.status`.
pub fn error_code(body: &Value) -> &str {
    let error = &body["error"];
    error["details"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|d| d["errorCode"].as_str())
        .or_else(|| error["status"].as_str())
        .unwrap_or("")
}

fn by_answer(status: reqwest::StatusCode, body: &Value, after: Option<Duration>) -> DeviceOutcome {
    let code = error_code(body);
    let text = format!(
        "FCM answered {status} {code}: {}",
        body["error"]["message"].as_str().unwrap_or_default()
    );
    match code {
        "UNREGISTERED" | "INVALID_ARGUMENT" => DeviceOutcome::Unregistered(text),
        _ if status.as_u16() == 429 || status.is_server_error() => {
            DeviceOutcome::retry(text, after)
        }
        _ => DeviceOutcome::Dropped(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode as S;

    fn error(status: &str, code: Option<&str>) -> Value {
        let details = code
            .map(|c| json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": c}]))
            .unwrap_or(json!([]));
        json!({"error": {"code": 0, "message": "m", "status": status, "details": details}})
    }

    #[test]
    fn answers_map_to_removal_retry_or_drop() {
        let gone = by_answer(
            S::NOT_FOUND,
            &error("NOT_FOUND", Some("UNREGISTERED")),
            None,
        );
        assert!(matches!(gone, DeviceOutcome::Unregistered(_)), "{gone:?}");
        let bad = by_answer(S::BAD_REQUEST, &error("INVALID_ARGUMENT", None), None);
        assert!(matches!(bad, DeviceOutcome::Unregistered(_)), "{bad:?}");
        let wait = Some(Duration::from_secs(3));
        assert_eq!(
            by_answer(
                S::TOO_MANY_REQUESTS,
                &error("RESOURCE_EXHAUSTED", Some("QUOTA_EXCEEDED")),
                wait
            ),
            DeviceOutcome::retry("FCM answered 429 Too Many Requests QUOTA_EXCEEDED: m", wait)
        );
        assert!(matches!(
            by_answer(S::SERVICE_UNAVAILABLE, &Value::Null, None),
            DeviceOutcome::Retry { after: None, .. }
        ));
        let mismatch = by_answer(
            S::FORBIDDEN,
            &error("PERMISSION_DENIED", Some("SENDER_ID_MISMATCH")),
            None,
        );
        assert!(
            matches!(mismatch, DeviceOutcome::Dropped(_)),
            "{mismatch:?}"
        );
    }
}
