//! `notify`: the mobile-push worker's intake and its providers (a signed
//! webhook, Getui). Read by the notify worker only.

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
        let mut http = |key: &'static str, url: &str| {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                p.invalid(key, format!("`{url}` is not an http:// or https:// URL"));
            }
        };
        if !self.webhook.url.is_empty() {
            http("notify.webhook.url", &self.webhook.url);
        }
        if !self.getui.app_id.is_empty() {
            http("notify.getui.base_url", &self.getui.base_url);
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
    }
}
