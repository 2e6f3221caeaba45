//! `notify`: the mobile-push worker's intake and its providers (a signed
//! webhook, Getui, FCM, APNs). Read by the notify worker only.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    OfflineConfig, Problems, Secret, differs, nats_subject, non_empty, positive, stream_name,
    within,
};

/// `resonance-task notify`: offline notices to mobile-push providers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// Durable consumer shared by every notify worker.
    pub queue_group: String,
    /// Notices in flight per worker process.
    pub worker_count: usize,
    /// In-process retries of a provider's transient failure.
    pub max_retry: u32,
    /// First redelivery delay of a notice that could not be sent; doubles.
    #[serde(with = "super::duration")]
    pub retry_interval: Duration,
    #[serde(with = "super::duration")]
    pub ack_wait: Duration,
    /// Deliveries before a notice is dead-lettered.
    pub max_deliver: i64,
    pub dead_letter_topic: String,
    pub dead_letter_stream: String,
    /// One HTTP request to a provider.
    #[serde(with = "super::duration")]
    pub request_timeout: Duration,
    pub webhook: WebhookConfig,
    pub getui: GetuiConfig,
    pub fcm: FcmConfig,
    pub apns: ApnsConfig,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            queue_group: "notify-service".into(),
            worker_count: 32,
            max_retry: 3,
            retry_interval: Duration::from_secs(5),
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            dead_letter_topic: "resonance.push.offline.dead.v1".into(),
            dead_letter_stream: "RESONANCE_OFFLINE_DEAD".into(),
            request_timeout: Duration::from_secs(5),
            webhook: WebhookConfig::default(),
            getui: GetuiConfig::default(),
            fcm: FcmConfig::default(),
            apns: ApnsConfig::default(),
        }
    }
}

/// A generic webhook: a signed JSON POST per offline recipient.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Empty: no webhook.
    pub url: String,
    /// HMAC-SHA256 key of the signature header.
    pub secret: Option<Secret>,
    pub secret_file: Option<PathBuf>,
}

/// Getui (个推) REST API v2.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GetuiConfig {
    /// API root; the app id is appended.
    pub base_url: String,
    /// Empty: Getui off.
    pub app_id: String,
    pub app_key: String,
    pub master_secret: Option<Secret>,
    pub master_secret_file: Option<PathBuf>,
    /// Redis key holding a user's Getui client id (`{username}` replaced).
    pub cid_key: String,
    /// How long Getui keeps the notification for an offline phone.
    #[serde(with = "super::duration")]
    pub ttl: Duration,
}

impl Default for GetuiConfig {
    fn default() -> Self {
        Self {
            base_url: "https://restapi.getui.com/v2".into(),
            app_id: String::new(),
            app_key: String::new(),
            master_secret: None,
            master_secret_file: None,
            cid_key: "resonance:getui:cid:{username}".into(),
            ttl: Duration::from_secs(2 * 3600),
        }
    }
}

/// Firebase Cloud Messaging, HTTP v1 API, authorised by a service account.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FcmConfig {
    /// The service account's JSON key file (Firebase console, Project
    /// settings, Service accounts). Unset: FCM off.
    pub service_account_file: Option<PathBuf>,
    /// Empty: the service account's `project_id`.
    pub project_id: String,
    /// API root; `/v1/projects/{project}/messages:send` is appended.
    pub base_url: String,
    /// OAuth2 token endpoint. Empty: the service account's `token_uri`.
    pub token_url: String,
    /// Redis set of a user's FCM registration tokens (`{username}`
    /// replaced), one member per device.
    pub token_key: String,
    /// How long FCM keeps the notification for an offline phone.
    #[serde(with = "super::duration")]
    pub ttl: Duration,
    /// Requests to FCM in flight at once, over all notices.
    pub max_in_flight: usize,
}

impl Default for FcmConfig {
    fn default() -> Self {
        Self {
            service_account_file: None,
            project_id: String::new(),
            base_url: "https://fcm.googleapis.com".into(),
            token_url: String::new(),
            token_key: "resonance:notify:fcm:{username}".into(),
            ttl: Duration::from_secs(2 * 3600),
            max_in_flight: 64,
        }
    }
}

/// Apple Push Notification service, token-based (a .p8 signing key).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApnsConfig {
    /// The .p8 signing key (Apple Developer, Certificates, Identifiers &
    /// Profiles, Keys). Unset: APNs off.
    pub key_file: Option<PathBuf>,
    /// The key's 10-character Key ID.
    pub key_id: String,
    /// The 10-character Team ID the key belongs to.
    pub team_id: String,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
    /// `https://api.push.apple.com`, or `https://api.sandbox.push.apple.com`
    /// for development builds of the app.
    pub base_url: String,
    /// Redis set of a user's APNs device tokens (`{username}` replaced),
    /// one member per device.
    pub token_key: String,
    /// `apns-push-type`.
    pub push_type: String,
    /// `apns-priority`: 10 delivers at once, 5 when the phone sees fit.
    pub priority: u8,
    /// How long APNs keeps the notification for an offline phone
    /// (`apns-expiration`).
    #[serde(with = "super::duration")]
    pub ttl: Duration,
    /// Requests to APNs in flight at once, over all notices.
    pub max_in_flight: usize,
}

impl Default for ApnsConfig {
    fn default() -> Self {
        Self {
            key_file: None,
            key_id: String::new(),
            team_id: String::new(),
            topic: String::new(),
            base_url: "https://api.push.apple.com".into(),
            token_key: "resonance:notify:apns:{username}".into(),
            push_type: "alert".into(),
            priority: 10,
            ttl: Duration::from_secs(2 * 3600),
            max_in_flight: 64,
        }
    }
}

impl NotifyConfig {
    /// Its dead letters must not be the notices it consumes.
    pub(super) fn validate(&self, offline: &OfflineConfig, p: &mut Problems) {
        p.check(stream_name("notify.queue_group", &self.queue_group));
        p.check(stream_name(
            "notify.dead_letter_stream",
            &self.dead_letter_stream,
        ));
        p.check(nats_subject(
            "notify.dead_letter_topic",
            &self.dead_letter_topic,
        ));
        p.check(differs(
            "notify.dead_letter_topic",
            &self.dead_letter_topic,
            "offline.notice_topic",
            &offline.notice_topic,
        ));
        p.check(within("notify.worker_count", self.worker_count, 1..=10_000));
        p.check(positive("notify.retry_interval", self.retry_interval));
        p.check(positive("notify.request_timeout", self.request_timeout));
        if self.ack_wait < Duration::from_secs(1) {
            p.invalid("notify.ack_wait", "must be at least 1s");
        }
        if self.max_deliver < 1 {
            p.invalid("notify.max_deliver", "must be at least 1");
        }
        if !self.webhook.url.is_empty() {
            http(p, "notify.webhook.url", &self.webhook.url);
        }
        if !self.getui.app_id.is_empty() {
            http(p, "notify.getui.base_url", &self.getui.base_url);
        }
        let missing = |s: &Option<Secret>| s.as_ref().is_none_or(|s| s.expose().is_empty());
        if !self.webhook.url.is_empty() && missing(&self.webhook.secret) {
            p.invalid(
                "notify.webhook.secret",
                "is required when notify.webhook.url is set",
            );
        }
        if !self.getui.app_id.is_empty() {
            p.check(non_empty("notify.getui.app_key", &self.getui.app_key));
            if missing(&self.getui.master_secret) {
                p.invalid(
                    "notify.getui.master_secret",
                    "is required when notify.getui.app_id is set",
                );
            }
            if !self.getui.cid_key.contains("{username}") {
                p.invalid("notify.getui.cid_key", "must contain `{username}`");
            }
        }
        if let Some(file) = &self.fcm.service_account_file {
            let fcm = &self.fcm;
            readable(p, "notify.fcm.service_account_file", file);
            http(p, "notify.fcm.base_url", &fcm.base_url);
            if !fcm.token_url.is_empty() {
                http(p, "notify.fcm.token_url", &fcm.token_url);
            }
            if !fcm.token_key.contains("{username}") {
                p.invalid("notify.fcm.token_key", "must contain `{username}`");
            }
            p.check(positive("notify.fcm.ttl", fcm.ttl));
            p.check(within(
                "notify.fcm.max_in_flight",
                fcm.max_in_flight,
                1..=10_000,
            ));
        }
        if let Some(file) = &self.apns.key_file {
            let apns = &self.apns;
            readable(p, "notify.apns.key_file", file);
            http(p, "notify.apns.base_url", &apns.base_url);
            for (key, value) in [
                ("notify.apns.key_id", &apns.key_id),
                ("notify.apns.team_id", &apns.team_id),
            ] {
                if value.len() != 10 || !value.chars().all(|c| c.is_ascii_alphanumeric()) {
                    p.invalid(key, format!("`{value}` is not 10 letters and digits"));
                }
            }
            p.check(non_empty("notify.apns.topic", &apns.topic));
            p.check(non_empty("notify.apns.push_type", &apns.push_type));
            if ![1, 5, 10].contains(&apns.priority) {
                p.invalid("notify.apns.priority", "must be 10, 5 or 1");
            }
            if !apns.token_key.contains("{username}") {
                p.invalid("notify.apns.token_key", "must contain `{username}`");
            }
            p.check(positive("notify.apns.ttl", apns.ttl));
            p.check(within(
                "notify.apns.max_in_flight",
                apns.max_in_flight,
                1..=10_000,
            ));
        }
    }
}

/// A key file that must be there at start-up.
fn readable(p: &mut Problems, key: &'static str, file: &std::path::Path) {
    if let Err(e) = std::fs::metadata(file) {
        p.invalid(key, format!("{}: {e}", file.display()));
    }
}

fn http(p: &mut Problems, key: &'static str, url: &str) {
    if !url.starts_with("http://") && !url.starts_with("https://") {
        p.invalid(key, format!("`{url}` is not an http:// or https:// URL"));
    }
}
