//! What happens to the recipients of an event who are not connected: the
//! message is parked for them in the offline store, and an offline notice
//! names them on `offline.notice_topic` for mobile push, at most one per
//! user per `offline.notice_interval`. Sessions above
//! `offline.read_path_above` members are not parked per member (their
//! members read history from the message store). A recipient is settled
//! only once its parking and its notice are durable; a failure of either
//! makes it a failed recipient, retried like a failed push.

use async_nats::jetstream;
use bytes::Bytes;
use futures::future::join_all;
use prost::Message;

use crate::config::OfflineConfig;
use crate::gateway::{FailureKind, PushFailure};
use crate::proto::{OfflineNotice, PushEvent, PushMessage};
use crate::store::OfflineStore;
use crate::telemetry;

/// Offline recipients parked or noticed per Redis pipeline.
const PARK_CHUNK: usize = 500;

/// The `gateway_id` of failures that happened in offline handling.
const OFFLINE: &str = "offline";

/// What became of one event's offline recipients.
#[derive(Debug, Default)]
pub struct OfflineOutcome {
    /// Recipients whose message is parked (newly or by an earlier attempt).
    pub parked: usize,
    /// Recipients not parked because the session is read from history.
    pub read_path: usize,
    /// Recipients named in a published notice.
    pub noticed: usize,
    /// Recipients skipped by the per-user notice interval.
    pub rate_limited: usize,
    /// Recipients whose parking or notice failed (to be retried).
    pub failed: Vec<(String, PushFailure)>,
}

impl OfflineOutcome {
    /// The recipients whose handling is durable: they need nothing more.
    pub fn settled<'a>(&self, users: &'a [String]) -> Vec<&'a str> {
        if self.failed.is_empty() {
            return users.iter().map(String::as_str).collect();
        }
        let failed: std::collections::HashSet<&str> =
            self.failed.iter().map(|(u, _)| u.as_str()).collect();
        users
            .iter()
            .map(String::as_str)
            .filter(|u| !failed.contains(u))
            .collect()
    }
}

#[derive(Clone)]
pub struct OfflineDelivery {
    store: OfflineStore,
    js: Option<jetstream::Context>,
    cfg: OfflineConfig,
}

/// Makes sure the stream that keeps offline notices exists.
pub async fn ensure_notice_stream(
    js: &jetstream::Context,
    cfg: &OfflineConfig,
    replication: &crate::streams::Replication,
) -> Result<(), NoticeStreamError> {
    crate::streams::ensure(
        js,
        jetstream::stream::Config {
            name: cfg.notice_stream.clone(),
            subjects: vec![cfg.notice_topic.clone()],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            storage: jetstream::stream::StorageType::File,
            max_age: std::time::Duration::from_secs(24 * 3600),
            ..Default::default()
        },
        replication,
    )
    .await
    .map(|_| ())
    .map_err(|cause| NoticeStreamError {
        stream: cfg.notice_stream.clone(),
        cause,
    })
}

#[derive(Debug, thiserror::Error)]
#[error("offline notice stream {stream}: {cause}")]
pub struct NoticeStreamError {
    stream: String,
    #[source]
    cause: crate::streams::StreamError,
}

impl crate::refusal::Refusal for NoticeStreamError {
    fn refused(&self) -> bool {
        crate::refusal::refused(self)
    }
}

/// The notice for `recipients` of `event`.
pub fn notice(event: &PushEvent, recipients: Vec<String>, preview_chars: usize) -> OfflineNotice {
    OfflineNotice {
        msg_id: event.msg_id,
        seq_id: event.seq_id,
        session_id: event.session_id.clone(),
        session_name: event.session_name.clone(),
        session_type: event.session_type,
        from_username: event.from_username.clone(),
        r#type: event.r#type.clone(),
        timestamp: event.timestamp,
        preview: event.content.chars().take(preview_chars).collect(),
        recipients,
        trace_headers: event.trace_headers.clone(),
    }
}

impl OfflineDelivery {
    /// `js` publishes notices; `None` (the caller's choice when
    /// `offline.notice` is off) sends none.
    pub fn new(store: OfflineStore, js: Option<jetstream::Context>, cfg: OfflineConfig) -> Self {
        Self { store, js, cfg }
    }

    /// Parks `message` for `users` (offline recipients of `event`, whose
    /// session has `session_size` members) and publishes their notices.
    pub async fn settle(
        &self,
        event: &PushEvent,
        message: &PushMessage,
        session_size: usize,
        users: &[String],
    ) -> OfflineOutcome {
        let mut outcome = OfflineOutcome::default();
        if users.is_empty() {
            return outcome;
        }
        let read_path = self.cfg.read_path_above > 0 && session_size > self.cfg.read_path_above;
        let mut durable: Vec<&[String]> = Vec::new();
        if !self.cfg.park {
            durable.extend(users.chunks(PARK_CHUNK));
        } else if read_path {
            outcome.read_path = users.len();
            count(telemetry::metrics::OFFLINE, "read_path", users.len());
            durable.extend(users.chunks(PARK_CHUNK));
        } else {
            let parks = join_all(
                users
                    .chunks(PARK_CHUNK)
                    .map(|chunk| async move { (chunk, self.store.park(message, chunk).await) }),
            )
            .await;
            for (chunk, parked) in parks {
                match parked {
                    Ok(p) => {
                        outcome.parked += chunk.len();
                        count(telemetry::metrics::OFFLINE, "parked", p.added);
                        count(telemetry::metrics::OFFLINE, "already_parked", p.already);
                        durable.push(chunk);
                    }
                    Err(e) => {
                        tracing::warn!(msg_id = event.msg_id, recipients = chunk.len(), error = %e, "offline parking failed");
                        count(telemetry::metrics::OFFLINE, "failed", chunk.len());
                        let failure = PushFailure::new(FailureKind::Offline, OFFLINE, &e);
                        outcome
                            .failed
                            .extend(chunk.iter().map(|u| (u.clone(), failure.clone())));
                    }
                }
            }
        }
        if let Some(js) = &self.js {
            for chunk in durable {
                self.notify(js, event, chunk, &mut outcome).await;
            }
        }
        outcome
    }

    /// Publishes the notices for `users` who were not noticed lately.
    async fn notify(
        &self,
        js: &jetstream::Context,
        event: &PushEvent,
        users: &[String],
        outcome: &mut OfflineOutcome,
    ) {
        let fail =
            |outcome: &mut OfflineOutcome, users: &[String], detail: &dyn std::fmt::Display| {
                let failure = PushFailure::new(FailureKind::Offline, OFFLINE, detail);
                count(telemetry::metrics::OFFLINE_NOTICES, "failed", users.len());
                outcome
                    .failed
                    .extend(users.iter().map(|u| (u.clone(), failure.clone())));
            };
        let allowed = match self
            .store
            .claim_notices(users, self.cfg.notice_interval)
            .await
        {
            Ok(allowed) => allowed,
            Err(e) => {
                tracing::warn!(msg_id = event.msg_id, error = %e, "offline notice interval not checked");
                return fail(outcome, users, &e);
            }
        };
        let due: Vec<String> = users
            .iter()
            .zip(&allowed)
            .filter(|(_, ok)| **ok)
            .map(|(u, _)| u.clone())
            .collect();
        let limited = users.len() - due.len();
        outcome.rate_limited += limited;
        count(telemetry::metrics::OFFLINE_NOTICES, "rate_limited", limited);
        let batches: Vec<Vec<String>> = due
            .chunks(self.cfg.notice_batch.max(1))
            .map(<[String]>::to_vec)
            .collect();
        let published = join_all(batches.into_iter().map(|recipients| async move {
            let payload = Bytes::from(
                notice(event, recipients.clone(), self.cfg.preview_chars).encode_to_vec(),
            );
            let result = match js.publish(self.cfg.notice_topic.clone(), payload).await {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            (recipients, result)
        }))
        .await;
        for (recipients, result) in published {
            match result {
                Ok(()) => {
                    outcome.noticed += recipients.len();
                    count(
                        telemetry::metrics::OFFLINE_NOTICES,
                        "published",
                        recipients.len(),
                    );
                }
                Err(e) => {
                    tracing::warn!(msg_id = event.msg_id, recipients = recipients.len(), error = %e, "offline notice not published");
                    // Let the retry send it rather than the interval swallow it.
                    if let Err(e) = self.store.release_notices(&recipients).await {
                        tracing::debug!(error = %e, "notice marks not released");
                    }
                    fail(outcome, &recipients, &e);
                }
            }
        }
    }
}

fn count(metric: &'static str, outcome: &'static str, n: usize) {
    if n > 0 {
        metrics::counter!(metric, "outcome" => outcome).increment(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_carries_the_event_and_a_bounded_preview() {
        let event = PushEvent {
            msg_id: 9,
            seq_id: 3,
            session_id: "s".into(),
            session_name: "team".into(),
            session_type: 2,
            from_username: "ann".into(),
            content: "héllo wörld".into(),
            r#type: "text".into(),
            timestamp: 42,
            ..Default::default()
        };
        let n = notice(&event, vec!["bob".into()], 4);
        assert_eq!(n.preview, "héll");
        assert_eq!((n.msg_id, n.seq_id, n.timestamp), (9, 3, 42));
        assert_eq!(n.recipients, vec!["bob".to_string()]);
        assert_eq!(n.session_name, "team");
    }

    #[test]
    fn only_recipients_without_a_failure_are_settled() {
        let users = vec!["a".to_string(), "b".into(), "c".into()];
        let mut outcome = OfflineOutcome::default();
        assert_eq!(outcome.settled(&users), vec!["a", "b", "c"]);
        outcome.failed.push((
            "b".into(),
            PushFailure::new(FailureKind::Offline, OFFLINE, "down"),
        ));
        assert_eq!(outcome.settled(&users), vec!["a", "c"]);
    }
}
