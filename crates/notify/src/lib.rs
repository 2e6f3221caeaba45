//! `resonance-task notify`: the mobile-push worker. It consumes offline
//! notices (`dispatch::offline` publishes them) through the same durable
//! intake as the task pods (`consumer::jetstream`: a shared JetStream
//! consumer, ack after success, redelivery with backoff, dead letters on
//! `notify.dead_letter_topic`), and hands every recipient to each
//! configured provider: `webhook` (signed JSON POST), `getui` (Getui
//! REST API v2), `fcm` (Firebase Cloud Messaging HTTP v1) and `apns`
//! (Apple Push Notification service, HTTP/2).
//!
//! A notice is acked when every recipient was sent or dropped by every
//! provider. What was sent is remembered per notice in Redis
//! (`resonance:notify:{<msg_id>}:sent`, one member per provider and user,
//! and per device of users with several), so a redelivery sends only what
//! is left. Each provider works through its recipients on its own, with
//! its own retries and request slots: one that fails or is slow holds up
//! none of the others.

#![forbid(unsafe_code)]

pub mod apns;
pub mod devices;
pub mod fcm;
pub mod getui;
pub mod webhook;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;

use resonance_task::config::{Config, ConsumerConfig, ConsumerMode, NotifyConfig};
use resonance_task::consumer::jetstream::Intake;
use resonance_task::consumer::{Attempt, Decision, MessageHandler};
use resonance_task::lifecycle::Readiness;
use resonance_task::proto::OfflineNotice;
use resonance_task::retry::Backoff;
use resonance_task::store::{RedisClient, RedisError};
use resonance_task::telemetry;

/// What a provider did with one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    /// Will never work (no device, refused request): not retried.
    Dropped(String),
    /// A transient failure: try again later, not before `after` when the
    /// provider said when.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
}

impl Delivery {
    pub fn retry(reason: impl Into<String>) -> Self {
        Self::Retry {
            reason: reason.into(),
            after: None,
        }
    }
}

/// A provider's access token, renewed before it expires: in the last
/// tenth of its life, at most five minutes early.
#[derive(Debug, Clone)]
pub(crate) struct CachedToken {
    pub value: String,
    pub issued_ms: i64,
    pub expires_ms: i64,
}

/// Renew at most this long before expiry.
const MAX_EARLY_RENEWAL: Duration = Duration::from_secs(300);

impl CachedToken {
    /// The cached value of `slot` while it is good: not due, and not the
    /// one a provider just `refused` (then whoever comes first renews it,
    /// and the others take the renewed one).
    pub fn reusable(slot: &Option<Self>, refused: Option<&str>, now_ms: i64) -> Option<String> {
        slot.as_ref()
            .filter(|t| refused != Some(t.value.as_str()) && !t.due(now_ms))
            .map(|t| t.value.clone())
    }

    pub fn due(&self, now_ms: i64) -> bool {
        let life = (self.expires_ms - self.issued_ms).max(0);
        let early = (life / 10).min(MAX_EARLY_RENEWAL.as_millis() as i64);
        now_ms >= self.expires_ms - early
    }
}

/// Notification title and body for a notice: the sender in one-to-one
/// sessions, the session name (and the sender in the body) in groups.
pub fn title_and_body(notice: &OfflineNotice) -> (String, String) {
    if notice.session_type == 1 {
        (notice.from_username.clone(), notice.preview.clone())
    } else {
        let title = if notice.session_name.is_empty() {
            notice.session_id.clone()
        } else {
            notice.session_name.clone()
        };
        (
            title,
            format!("{}: {}", notice.from_username, notice.preview),
        )
    }
}

pub enum Provider {
    Webhook(webhook::Webhook),
    Getui(getui::Getui),
    Fcm(Box<fcm::Fcm>),
    Apns(Box<apns::Apns>),
}

impl Provider {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Webhook(_) => "webhook",
            Self::Getui(_) => "getui",
            Self::Fcm(_) => "fcm",
            Self::Apns(_) => "apns",
        }
    }

    pub async fn send(&self, notice: &OfflineNotice, username: &str) -> Delivery {
        match self {
            Self::Webhook(w) => w.send(notice, username).await,
            Self::Getui(g) => g.send(notice, username).await,
            Self::Fcm(f) => f.send(notice, username).await,
            Self::Apns(a) => a.send(notice, username).await,
        }
    }

    /// Outcomes counted for this provider, so each series exists from the
    /// start.
    fn outcomes(&self) -> &'static [&'static str] {
        match self {
            Self::Webhook(_) | Self::Getui(_) => &["sent", "dropped", "retried"],
            Self::Fcm(_) | Self::Apns(_) => &["sent", "dropped", "retried", "token_removed"],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "no mobile-push provider configured: set notify.webhook.url, notify.getui.app_id, notify.fcm.service_account_file or notify.apns.key_file"
    )]
    NoProvider,
    #[error("{key}: {reason}")]
    Key { key: &'static str, reason: String },
    #[error("building the HTTP client: {0}")]
    Http(#[source] reqwest::Error),
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error(transparent)]
    NoticeStream(#[from] resonance_task::dispatch::offline::NoticeStreamError),
    #[error(transparent)]
    Admin(#[from] telemetry::admin::AdminError),
}

impl NotifyError {
    pub fn key(key: &'static str, reason: impl Into<String>) -> Self {
        Self::Key {
            key,
            reason: reason.into(),
        }
    }
}

/// The providers the configuration turns on.
pub fn providers(notify: &NotifyConfig, redis: &RedisClient) -> Result<Vec<Provider>, NotifyError> {
    resonance_task::tls::install_provider();
    let http = reqwest::Client::builder()
        .timeout(notify.request_timeout)
        .connect_timeout(notify.request_timeout)
        .build()
        .map_err(NotifyError::Http)?;
    let mut providers = Vec::new();
    let hook = &notify.webhook;
    if !hook.url.is_empty() {
        let secret = hook.secret.clone().ok_or(NotifyError::NoProvider)?;
        providers.push(Provider::Webhook(webhook::Webhook::new(
            http.clone(),
            hook.url.clone(),
            secret,
        )));
    }
    if !notify.getui.app_id.is_empty() {
        providers.push(Provider::Getui(getui::Getui::new(
            http.clone(),
            &notify.getui,
            redis.clone(),
        )));
    }
    if let Some(file) = &notify.fcm.service_account_file {
        let account = fcm::ServiceAccount::read(file)?;
        providers.push(Provider::Fcm(Box::new(fcm::Fcm::new(
            http,
            &notify.fcm,
            account,
            redis.clone(),
            notify.request_timeout,
        )?)));
    }
    if notify.apns.key_file.is_some() {
        providers.push(Provider::Apns(Box::new(apns::Apns::new(
            notify.request_timeout,
            &notify.apns,
            redis.clone(),
        )?)));
    }
    if providers.is_empty() {
        return Err(NotifyError::NoProvider);
    }
    for p in &providers {
        for outcome in p.outcomes() {
            metrics::counter!(telemetry::metrics::NOTIFY, "provider" => p.name(), "outcome" => *outcome)
                .increment(0);
        }
    }
    Ok(providers)
}

/// The durable intake's settings for notices.
pub fn consumer_config(config: &Config) -> ConsumerConfig {
    let n = &config.notify;
    ConsumerConfig {
        mode: ConsumerMode::Jetstream,
        topic: config.offline.notice_topic.clone(),
        queue_group: n.queue_group.clone(),
        worker_count: n.worker_count,
        max_retry: n.max_retry,
        retry_interval: n.retry_interval,
        retry_backoff_max: n.retry_interval.max(Duration::from_secs(120)),
        shutdown_grace: config.consumer.shutdown_grace,
        stream: config.offline.notice_stream.clone(),
        ack_wait: n.ack_wait,
        max_deliver: n.max_deliver,
        delivery_ceiling: config.consumer.delivery_ceiling.max(n.max_deliver),
        stream_max_age: Duration::from_secs(24 * 3600),
        dead_letter_topic: n.dead_letter_topic.clone(),
        dead_letter_stream: n.dead_letter_stream.clone(),
        stream_replicas: config.consumer.stream_replicas,
        stream_placement_tags: config.consumer.stream_placement_tags.clone(),
    }
}

pub fn sent_key(msg_id: i64) -> String {
    format!("resonance:notify:{{{msg_id}}}:sent")
}

/// How long a notice's sent list is kept.
const SENT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Recipients sent to at once per notice and provider.
const SENDS_IN_FLIGHT: usize = 16;
/// The longest a provider's retry waits in-process; a longer wait (a
/// `Retry-After`, say) is left to the notice's redelivery.
const MAX_IN_PROCESS_WAIT: Duration = Duration::from_secs(5);

pub struct NoticeHandler {
    providers: Vec<Provider>,
    redis: RedisClient,
    max_retry: u32,
}

impl NoticeHandler {
    pub fn new(providers: Vec<Provider>, redis: RedisClient, max_retry: u32) -> Self {
        Self {
            providers,
            redis,
            max_retry,
        }
    }

    /// `provider/username` pairs of `notice` not yet sent.
    async fn unsent(&self, notice: &OfflineNotice) -> Result<Vec<(usize, String)>, RedisError> {
        let pairs: Vec<(usize, String)> = (0..self.providers.len())
            .flat_map(|p| notice.recipients.iter().map(move |u| (p, u.clone())))
            .collect();
        if pairs.is_empty() {
            return Ok(pairs);
        }
        let mut check = redis::cmd("SMISMEMBER");
        check.arg(sent_key(notice.msg_id));
        for (p, u) in &pairs {
            check.arg(format!("{}/{u}", self.providers[*p].name()));
        }
        let known: Vec<bool> = self.redis.query(&check).await?;
        let left: Vec<(usize, String)> = pairs
            .into_iter()
            .zip(known)
            .filter(|(_, sent)| !sent)
            .map(|(pair, _)| pair)
            .collect();
        Ok(left)
    }

    async fn remember(&self, msg_id: i64, done: &[(usize, String)]) -> Result<(), RedisError> {
        if done.is_empty() {
            return Ok(());
        }
        let key = sent_key(msg_id);
        let mut add = redis::cmd("SADD");
        add.arg(&key);
        for (p, u) in done {
            add.arg(format!("{}/{u}", self.providers[*p].name()));
        }
        let mut expire = redis::cmd("PEXPIRE");
        expire.arg(&key).arg(SENT_TTL.as_millis() as u64);
        self.redis
            .per_key(vec![vec![add, expire]])
            .await
            .map(|_| ())
    }

    /// Sends what is left, every provider on its own with its own
    /// retries; on failure, what is still unsent and the earliest time a
    /// provider asked to be tried again.
    async fn send_all(&self, notice: &OfflineNotice) -> Result<(), (String, Option<Duration>)> {
        let left = self
            .unsent(notice)
            .await
            .map_err(|e| (e.to_string(), None))?;
        let deduplicated = self.providers.len() * notice.recipients.len() - left.len();
        if deduplicated > 0 {
            metrics::counter!(telemetry::metrics::NOTIFY, "provider" => "any", "outcome" => "deduplicated")
                .increment(deduplicated as u64);
        }
        let mut by_provider = vec![Vec::new(); self.providers.len()];
        for (p, user) in left {
            by_provider[p].push(user);
        }
        let failures: Vec<(String, Option<Duration>)> = futures::future::join_all(
            by_provider
                .into_iter()
                .enumerate()
                .filter(|(_, users)| !users.is_empty())
                .map(|(p, users)| self.send_with(notice, p, users)),
        )
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
        if failures.is_empty() {
            return Ok(());
        }
        let after = failures.iter().filter_map(|(_, a)| *a).max();
        let reason = failures
            .into_iter()
            .map(|(r, _)| r)
            .collect::<Vec<_>>()
            .join("; ");
        Err((reason, after))
    }

    /// One provider's share of a notice, retrying transient failures
    /// in-process while the wait is short.
    async fn send_with(
        &self,
        notice: &OfflineNotice,
        p: usize,
        mut left: Vec<String>,
    ) -> Result<(), (String, Option<Duration>)> {
        let provider = self.providers[p].name();
        let mut backoff = Backoff::new(Duration::from_millis(200), MAX_IN_PROCESS_WAIT);
        let (mut last_error, mut asked) = (String::new(), None);
        for attempt in 0..=self.max_retry {
            if left.is_empty() {
                return Ok(());
            }
            if attempt > 0 {
                let delay = backoff.next_delay().max(asked.unwrap_or_default());
                if delay > MAX_IN_PROCESS_WAIT {
                    // Too long to hold the notice: a redelivery comes back.
                    break;
                }
                tokio::time::sleep(delay).await;
            }
            let results: Vec<(String, Delivery)> = futures::stream::iter(left)
                .map(|user| async move {
                    let d = self.providers[p].send(notice, &user).await;
                    (user, d)
                })
                .buffer_unordered(SENDS_IN_FLIGHT)
                .collect()
                .await;
            let mut done = Vec::new();
            (left, asked) = (Vec::new(), None);
            for (user, delivery) in results {
                let outcome = match &delivery {
                    Delivery::Sent => "sent",
                    Delivery::Dropped(_) => "dropped",
                    Delivery::Retry { .. } => "retried",
                };
                metrics::counter!(telemetry::metrics::NOTIFY, "provider" => provider, "outcome" => outcome)
                    .increment(1);
                match delivery {
                    Delivery::Sent => done.push((p, user)),
                    Delivery::Dropped(reason) => {
                        tracing::info!(msg_id = notice.msg_id, username = %user, provider, %reason, "mobile push dropped");
                        done.push((p, user));
                    }
                    Delivery::Retry { reason, after } => {
                        tracing::debug!(msg_id = notice.msg_id, username = %user, provider, %reason, "mobile push will be retried");
                        last_error = reason;
                        asked = asked.max(after);
                        left.push(user);
                    }
                }
            }
            if let Err(e) = self.remember(notice.msg_id, &done).await {
                tracing::warn!(msg_id = notice.msg_id, error = %e, "sent list not recorded; a redelivery may push these again");
            }
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err((
                format!("{provider}: {} pushes not sent: {last_error}", left.len()),
                asked,
            ))
        }
    }
}

impl MessageHandler for NoticeHandler {
    async fn handle(
        &self,
        payload: &[u8],
        _headers: Option<&async_nats::HeaderMap>,
        attempt: Attempt,
        abort: &CancellationToken,
        _turn: resonance_task::dispatch::Turn,
    ) -> Decision {
        {
            let notice = match OfflineNotice::decode(payload) {
                Ok(n) => n,
                Err(e) => {
                    let reason =
                        format!("undecodable OfflineNotice ({} bytes): {e}", payload.len());
                    tracing::warn!(%reason, "notice rejected");
                    return Decision::DeadLetter {
                        last_error: reason.clone(),
                        reason,
                    };
                }
            };
            let sent = tokio::select! {
                r = self.send_all(&notice) => r,
                _ = abort.cancelled() => return Decision::SHUTDOWN,
            };
            match sent {
                Ok(()) => Decision::Ack,
                Err((error, after)) => {
                    tracing::warn!(msg_id = notice.msg_id, delivery = attempt.delivery, %error, retry_after = ?after, "notice will be redelivered");
                    Decision::Retry {
                        delay: after.unwrap_or_default(),
                        reason: error,
                    }
                }
            }
        }
    }

    fn decided(&self, decision: &Decision) {
        let outcome = match decision {
            Decision::Ack | Decision::Duplicate => "acked",
            Decision::Retry { .. } => "retried",
            Decision::HandBack { .. } => "handed_back",
            Decision::DeadLetter { .. } => "dead_lettered",
        };
        metrics::counter!(telemetry::metrics::NOTIFY, "provider" => "notice", "outcome" => outcome)
            .increment(1);
    }
}

/// Runs the notify worker until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), NotifyError> {
    let life = telemetry::admin::start(&config.admin).await?;
    let readiness = life.readiness.clone();
    // Neither a registry nor a database is involved here.
    Readiness::set(&readiness.registry_synced, true);
    Readiness::set(&readiness.database_reachable, true);
    let redis = RedisClient::connect(&config.redis).await?;
    let providers = providers(&config.notify, &redis)?;
    tracing::info!(
        providers = ?providers.iter().map(Provider::name).collect::<Vec<_>>(),
        "notify worker starting"
    );
    let nats = resonance_task::nats::connect_with(
        &config.nats,
        &format!("{}-notify", config.service.name),
        Some(readiness.clone()),
    )
    .await?;
    let js = async_nats::jetstream::new(nats.clone());
    resonance_task::dispatch::offline::ensure_notice_stream(
        &js,
        &config.offline,
        &resonance_task::streams::Replication::of(&config.consumer),
    )
    .await?;
    let attempts = resonance_task::consumer::FailedAttempts::new(redis.clone(), SENT_TTL);
    let handler = Arc::new(NoticeHandler::new(
        providers,
        redis,
        config.notify.max_retry,
    ));
    let cfg = consumer_config(&config);
    let prefetch = resonance_task::consumer::jetstream::Prefetch {
        count: cfg.worker_count,
        bytes: config.priority.prefetch_bytes,
        // Notices have one lane.
        reserved_workers: 0,
    };
    let intake = Intake::new(nats.clone(), cfg.clone(), handler, attempts).run(&life, prefetch);
    tokio::pin!(intake);
    tokio::select! {
        _ = &mut intake => {}
        _ = shutdown => {
            life.stop.cancel();
            intake.await;
        }
    }
    life.drain(cfg.shutdown_grace, Some(&nats)).await;
    tracing::info!("notify worker stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_name_the_sender_or_the_group() {
        let mut n = OfflineNotice {
            session_type: 1,
            from_username: "ann".into(),
            session_id: "s-1".into(),
            preview: "hi".into(),
            ..Default::default()
        };
        assert_eq!(title_and_body(&n), ("ann".into(), "hi".into()));
        n.session_type = 2;
        assert_eq!(title_and_body(&n), ("s-1".into(), "ann: hi".into()));
        n.session_name = "team".into();
        assert_eq!(title_and_body(&n).0, "team");
    }

    #[test]
    fn tokens_are_renewed_before_they_expire() {
        let day = 24 * 3600 * 1000;
        let t = CachedToken {
            value: "t".into(),
            issued_ms: 0,
            expires_ms: day,
        };
        assert!(!t.due(0));
        assert!(!t.due(day - 300_001));
        assert!(t.due(day - 300_000), "five minutes early at most");
        let short = CachedToken {
            value: "t".into(),
            issued_ms: 0,
            expires_ms: 10_000,
        };
        assert!(!short.due(8_999));
        assert!(short.due(9_000), "in the last tenth of its life");
    }
}
