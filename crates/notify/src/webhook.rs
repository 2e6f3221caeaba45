//! The generic webhook provider: one JSON POST per offline recipient,
//! signed so the receiver can tell it came from us and is fresh.
//!
//! Headers: `X-Resonance-Timestamp` (unix ms), `X-Resonance-Signature:
//! sha256=<hex>` where the hex is HMAC-SHA256 under `notify.webhook.secret`
//! of `{timestamp}.{body}`, and `X-Resonance-Delivery: {msg_id}:{username}`
//! (the same on every retry, for the receiver's deduplication). A 2xx is
//! sent; 408, 429, 5xx, a timeout or a connection error are retried; any
//! other 4xx is dropped (the request itself is wrong; repeating it helps
//! nobody).

use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use sha2::Sha256;

use super::Delivery;
use resonance_task::config::Secret;
use resonance_task::proto::OfflineNotice;

pub const HEADER_TIMESTAMP: &str = "X-Resonance-Timestamp";
pub const HEADER_SIGNATURE: &str = "X-Resonance-Signature";
pub const HEADER_DELIVERY: &str = "X-Resonance-Delivery";

/// The JSON body.
#[derive(Debug, Serialize)]
pub struct WebhookBody<'a> {
    pub msg_id: i64,
    pub seq_id: i64,
    pub session_id: &'a str,
    pub session_name: &'a str,
    pub session_type: i32,
    pub from_username: &'a str,
    pub to_username: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub timestamp: i64,
    pub preview: &'a str,
}

/// `sha256=<hex HMAC-SHA256 of "{timestamp}.{body}">`.
pub fn signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub struct Webhook {
    http: reqwest::Client,
    url: String,
    secret: Secret,
}

impl Webhook {
    pub fn new(http: reqwest::Client, url: String, secret: Secret) -> Self {
        Self { http, url, secret }
    }

    pub async fn send(&self, notice: &OfflineNotice, username: &str) -> Delivery {
        let body = serde_json::to_vec(&WebhookBody {
            msg_id: notice.msg_id,
            seq_id: notice.seq_id,
            session_id: &notice.session_id,
            session_name: &notice.session_name,
            session_type: notice.session_type,
            from_username: &notice.from_username,
            to_username: username,
            kind: &notice.r#type,
            timestamp: notice.timestamp,
            preview: &notice.preview,
        })
        .expect("the body serializes");
        let timestamp = resonance_task::clock::now_ms().to_string();
        let signed = signature(self.secret.expose().as_bytes(), &timestamp, &body);
        let sent = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(HEADER_TIMESTAMP, &timestamp)
            .header(HEADER_SIGNATURE, signed)
            .header(HEADER_DELIVERY, format!("{}:{username}", notice.msg_id))
            .body(body)
            .send()
            .await;
        match sent {
            Err(e) => Delivery::retry(format!("webhook {}: {e}", self.url)),
            Ok(response) => by_status(
                response.status(),
                crate::devices::retry_after(response.headers()),
            ),
        }
    }
}

fn by_status(status: reqwest::StatusCode, after: Option<std::time::Duration>) -> Delivery {
    let code = status.as_u16();
    if status.is_success() {
        Delivery::Sent
    } else if code == 408 || code == 429 || status.is_server_error() {
        Delivery::Retry {
            reason: format!("webhook answered {status}"),
            after,
        }
    } else {
        Delivery::Dropped(format!("webhook refused it: {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Python: hmac.new(b"secret", b'1700000000000.{"a":1}', sha256).
        let sig = signature(b"secret", "1700000000000", br#"{"a":1}"#);
        assert_eq!(
            sig,
            "sha256=4ef2732b0d632a6897af3a6d02a6de287f60d6c5f15dabdb0ceb045a34e3c5a7"
        );
    }

    #[test]
    fn statuses_map_to_retry_or_drop() {
        use reqwest::StatusCode as S;
        assert_eq!(by_status(S::OK, None), Delivery::Sent);
        assert_eq!(by_status(S::ACCEPTED, None), Delivery::Sent);
        for s in [
            S::SERVICE_UNAVAILABLE,
            S::INTERNAL_SERVER_ERROR,
            S::TOO_MANY_REQUESTS,
            S::REQUEST_TIMEOUT,
        ] {
            assert!(matches!(by_status(s, None), Delivery::Retry { .. }), "{s}");
        }
        for s in [S::BAD_REQUEST, S::UNAUTHORIZED, S::NOT_FOUND] {
            assert!(matches!(by_status(s, None), Delivery::Dropped(_)), "{s}");
        }
    }
}
