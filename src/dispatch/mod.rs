//! Fan-out of one event: members (SQL) -> routes (Redis) -> per-gateway
//! batches (`plan`) -> concurrent pushes through the gateway pool. The
//! result is a [`FanoutReport`] saying what happened to every recipient;
//! the consumer turns it into an ack, a retry or a dead letter.

pub mod order;
pub mod plan;

use std::collections::HashMap;
use std::time::Instant;

use futures::future::join_all;
use tracing::Instrument;

use crate::config::DispatchConfig;
use crate::gateway::{Answer, GatewayPool, PushFailure, PushOutcome, PushReply};
use crate::proto::{PushEvent, PushMessage};
use crate::registry::GatewayRegistry;
use crate::store::{MemberError, MemberStore, Progress, ProgressStore, RedisError, RouteStore};
use crate::telemetry;
pub use order::{SessionOrder, Turn};
use plan::OfflineReason;

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The event can never succeed (dead-letter it).
    #[error("invalid event: {0}")]
    Invalid(String),
    #[error(transparent)]
    Members(#[from] MemberError),
    #[error("looking up routes: {0}")]
    Routes(RedisError),
    #[error("reading delivery progress: {0}")]
    Progress(RedisError),
}

impl DispatchError {
    /// Worth retrying: a dependency failed, not the event.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Invalid(_))
    }
}

/// What happened to each recipient of one event.
#[derive(Debug, Default)]
pub struct FanoutReport {
    pub members: usize,
    /// The event had settled before; nothing was pushed.
    pub duplicate: bool,
    /// Another handler holds the event right now; nothing was pushed.
    pub busy: bool,
    /// Recipients an earlier attempt already delivered (not pushed again).
    pub already_delivered: usize,
    pub delivered: Vec<String>,
    pub offline: Vec<(String, OfflineReason)>,
    pub failed: Vec<(String, PushFailure)>,
    pub gateways: usize,
}

impl FanoutReport {
    /// Every recipient was delivered or is offline.
    pub fn is_settled(&self) -> bool {
        self.failed.is_empty()
    }

    /// Folds in the report of a retry of this report's failed recipients.
    pub fn absorb_retry(&mut self, retry: FanoutReport) {
        self.delivered.extend(retry.delivered);
        self.offline.extend(retry.offline);
        self.failed = retry.failed;
        self.gateways = self.gateways.max(retry.gateways);
    }

    /// The first failure, to say why an event is retried.
    pub fn first_failure(&self) -> Option<&PushFailure> {
        self.failed.first().map(|(_, f)| f)
    }
}

/// Checks what dispatch relies on; anything else about the event is passed
/// through to the gateway as is.
pub fn validate(event: &PushEvent) -> Result<(), DispatchError> {
    if event.session_id.trim().is_empty() {
        return Err(DispatchError::Invalid("session_id is empty".into()));
    }
    if event.msg_id <= 0 {
        return Err(DispatchError::Invalid(format!(
            "msg_id {} is not a positive id",
            event.msg_id
        )));
    }
    Ok(())
}

/// The gateway message for an event (contract fields 1-8; `to_username`
/// is set per recipient by the pool).
pub fn gateway_message(event: &PushEvent) -> PushMessage {
    PushMessage {
        msg_id: event.msg_id,
        seq_id: event.seq_id,
        session_id: event.session_id.clone(),
        from_username: event.from_username.clone(),
        to_username: event.to_username.clone(),
        content: event.content.clone(),
        r#type: event.r#type.clone(),
        timestamp: event.timestamp,
    }
}

#[derive(Clone)]
pub struct Dispatcher {
    members: MemberStore,
    routes: RouteStore,
    registry: GatewayRegistry,
    pool: GatewayPool,
    progress: Option<ProgressStore>,
    cfg: DispatchConfig,
}

impl Dispatcher {
    /// `progress` is `None` when deduplication is off.
    pub fn new(
        members: MemberStore,
        routes: RouteStore,
        registry: GatewayRegistry,
        pool: GatewayPool,
        progress: Option<ProgressStore>,
        cfg: DispatchConfig,
    ) -> Self {
        Self {
            members,
            routes,
            registry,
            pool,
            progress,
            cfg,
        }
    }

    async fn claim(&self, msg_id: i64, token: &str) -> Result<Progress, DispatchError> {
        match &self.progress {
            Some(p) => p
                .claim(msg_id, token)
                .await
                .map_err(DispatchError::Progress),
            None => Ok(Progress::default()),
        }
    }

    /// Ends the claim `dispatch` took; `settled` marks the event done, so
    /// its redelivery or a duplicate publish is acked without pushing.
    pub async fn finish(&self, msg_id: i64, token: &str, settled: bool) -> Result<(), RedisError> {
        match &self.progress {
            Some(p) => p.finish(msg_id, token, settled).await,
            None => Ok(()),
        }
    }

    /// Fans one event out to its session's members. `Err` means nothing was
    /// pushed (the event failed before any gateway was contacted); `Ok`
    /// reports every recipient. `token` names this handling in the event's
    /// claim; call [`Dispatcher::finish`] with it afterwards. The event's
    /// trace context, if any, becomes the parent of the dispatch span.
    /// `turn` is the event's place in its session's order: its pushes are
    /// written only after the previous event's (see `order`).
    pub async fn dispatch(
        &self,
        event: &PushEvent,
        token: &str,
        turn: Turn,
    ) -> Result<FanoutReport, DispatchError> {
        let span = tracing::info_span!(
            "dispatch",
            msg_id = event.msg_id,
            session_id = %event.session_id,
            members = tracing::field::Empty
        );
        telemetry::trace::continue_from(&span, &event.trace_headers);
        let started = Instant::now();
        let result = self
            .dispatch_in_span(event, token, turn)
            .instrument(span)
            .await;
        metrics::histogram!(telemetry::metrics::DISPATCH_DURATION)
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn dispatch_in_span(
        &self,
        event: &PushEvent,
        token: &str,
        turn: Turn,
    ) -> Result<FanoutReport, DispatchError> {
        validate(event)?;
        let (members, progress) = tokio::join!(
            self.members.members(&event.session_id),
            self.claim(event.msg_id, token)
        );
        let (members, progress) = (members?, progress?);
        tracing::Span::current().record("members", members.len());
        if progress.settled || progress.busy {
            return Ok(FanoutReport {
                members: members.len(),
                duplicate: progress.settled,
                busy: !progress.settled,
                ..Default::default()
            });
        }
        let member_count = members.len();
        let mut recipients =
            plan::recipients(members, &event.from_username, self.cfg.push_to_sender);
        let before = recipients.len();
        recipients.retain(|u| !progress.delivered.contains(u));
        let already_delivered = before - recipients.len();
        count_deliveries("deduplicated", NO_GATEWAY, already_delivered);
        let mut report = self.fan_out(event, recipients, turn).await?;
        report.members = member_count;
        report.already_delivered = already_delivered;
        Ok(report)
    }

    /// Pushes an event to the given recipients only (a retry of those that
    /// failed): routes are looked up again, since a user may have moved.
    pub async fn redeliver(
        &self,
        event: &PushEvent,
        recipients: Vec<String>,
    ) -> Result<FanoutReport, DispatchError> {
        count_deliveries("retried", NO_GATEWAY, recipients.len());
        let span = tracing::info_span!(
            "retry",
            msg_id = event.msg_id,
            session_id = %event.session_id,
            recipients = recipients.len()
        );
        telemetry::trace::continue_from(&span, &event.trace_headers);
        self.fan_out(event, recipients, Turn::free())
            .instrument(span)
            .await
    }

    /// Waits for one chunk's answer and records whom it reached.
    async fn settle_chunk(
        &self,
        gateway_id: String,
        msg_id: i64,
        sent: Instant,
        answer: Answer,
    ) -> (String, PushReply) {
        let reply = answer.wait().await;
        metrics::histogram!(telemetry::metrics::GATEWAY_ROUND_TRIP, "gateway_id" => gateway_id.clone())
            .record(sent.elapsed().as_secs_f64());
        if let Some(progress) = &self.progress {
            let reached: Vec<&str> = reply
                .recipients
                .iter()
                .zip(&reply.outcomes)
                .filter(|(_, o)| **o == PushOutcome::Delivered)
                .map(|(u, _)| u.as_str())
                .collect();
            if let Err(e) = progress.record(msg_id, &reached).await {
                tracing::warn!(msg_id, error = %e, "delivery progress not recorded; a redelivery may repeat these pushes");
            }
        }
        (gateway_id, reply)
    }

    /// Queues one gateway's chunks on its stream, in order.
    async fn enqueue_gateway(
        &self,
        batch: plan::GatewayBatch,
        message: &PushMessage,
        trace_headers: &HashMap<String, String>,
    ) -> Vec<(String, Instant, Answer)> {
        let endpoint = batch.endpoint;
        let chunk = if self.pool.uses_batch(&endpoint) {
            self.cfg.batch_size
        } else {
            self.cfg.push_chunk_size
        };
        let mut answers = Vec::new();
        for recipients in plan::split(batch.recipients, chunk) {
            let answer = self
                .pool
                .enqueue(
                    &endpoint,
                    message.clone(),
                    recipients,
                    trace_headers.clone(),
                )
                .await;
            answers.push((endpoint.gateway_id.clone(), Instant::now(), answer));
        }
        answers
    }

    async fn fan_out(
        &self,
        event: &PushEvent,
        recipients: Vec<String>,
        mut turn: Turn,
    ) -> Result<FanoutReport, DispatchError> {
        let started = Instant::now();
        let routes = self
            .routes
            .gateway_ids(&recipients)
            .await
            .map_err(DispatchError::Routes)?;
        let gateways = self.registry.snapshot();
        let plan = plan::plan(recipients, routes, &gateways);
        let message = gateway_message(event);
        let trace_headers = telemetry::trace::headers_of(&tracing::Span::current());

        let gateways = plan.batches.len();
        // Each gateway's recipients go in chunks (one batch-v1 frame each, or
        // that many per-user requests), all in flight at once on its stream;
        // a chunk's deliveries are recorded as soon as it is answered, so a
        // crash re-pushes at most the chunks in flight. Chunks are queued
        // only after the session's previous event queued its own, and the
        // next event may queue as soon as these are (answers come later).
        turn.wait().await;
        let queued = join_all(plan.batches.into_iter().map(|batch| {
            let span = tracing::debug_span!(
                "gateway_batch",
                gateway_id = %batch.endpoint.gateway_id,
                recipients = batch.recipients.len()
            );
            self.enqueue_gateway(batch, &message, &trace_headers)
                .instrument(span)
        }))
        .await;
        turn.release();
        let pushes = queued
            .into_iter()
            .flatten()
            .map(|(gateway_id, sent, answer)| {
                self.settle_chunk(gateway_id, event.msg_id, sent, answer)
            });
        let results = join_all(pushes).await;
        for (user, reason) in &plan.offline {
            tracing::trace!(username = %user, reason = reason.as_str(), "offline");
        }
        count_deliveries("offline", NO_GATEWAY, plan.offline.len());
        let mut report = FanoutReport {
            offline: plan.offline,
            gateways,
            ..Default::default()
        };
        for (gateway_id, reply) in results {
            let (mut delivered, mut offline, mut failed) = (0, 0, 0);
            for (user, outcome) in reply.recipients.into_iter().zip(reply.outcomes) {
                match outcome {
                    PushOutcome::Delivered => {
                        delivered += 1;
                        report.delivered.push(user);
                    }
                    PushOutcome::NotConnected(reason) => {
                        offline += 1;
                        tracing::debug!(username = %user, %reason, "gateway says not connected");
                        report.offline.push((user, OfflineReason::NotConnected));
                    }
                    PushOutcome::Failed(failure) => {
                        failed += 1;
                        report.failed.push((user, failure));
                    }
                }
            }
            count_deliveries("delivered", &gateway_id, delivered);
            count_deliveries("offline", &gateway_id, offline);
            count_deliveries("failed", &gateway_id, failed);
        }
        tracing::debug!(
            delivered = report.delivered.len(),
            offline = report.offline.len(),
            failed = report.failed.len(),
            gateways = report.gateways,
            elapsed = ?started.elapsed(),
            "fan-out done"
        );
        Ok(report)
    }
}

/// The gateway_id label of recipients no gateway was involved with.
const NO_GATEWAY: &str = "none";

fn count_deliveries(outcome: &'static str, gateway_id: &str, n: usize) {
    if n > 0 {
        metrics::counter!(telemetry::metrics::DELIVERIES, "outcome" => outcome, "gateway_id" => gateway_id.to_string())
            .increment(n as u64);
    }
}
