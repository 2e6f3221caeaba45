//! Fan-out of one event: members (SQL) -> routes (Redis) -> per-gateway
//! batches (`plan`) -> concurrent pushes through the gateway pool. The
//! result is a [`FanoutReport`] saying what happened to every recipient;
//! the consumer turns it into an ack, a retry or a dead letter.

pub mod dry_run;
pub mod offline;
pub mod order;
pub mod plan;

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use std::sync::Arc;

use futures::StreamExt;
use futures::future::join_all;
use futures::stream::FuturesUnordered;
use tracing::Instrument;

use crate::config::{DispatchConfig, LimitsConfig};
use crate::gateway::{FailureKind, GatewayPool, PendingReply, PushFailure, PushOutcome, PushReply};
use crate::proto::{PushEvent, PushMessage};
use crate::registry::GatewayRegistry;
use crate::store::{
    MemberError, MemberStore, MemberStream, Members, Progress, ProgressStore, RedisError,
    RouteStore,
};
use crate::telemetry;
use crate::telemetry::metrics::NO_GATEWAY;
use offline::OfflineDelivery;
pub use order::{SessionOrder, Turn};
use plan::OfflineReason;

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The event can never succeed (dead-letter it).
    #[error("invalid event: {0}")]
    Invalid(String),
    /// The event breaks a configured input limit (dead-letter it).
    #[error("event over limit `limits.{limit}`: {detail}")]
    Limit { limit: &'static str, detail: String },
    #[error(transparent)]
    Members(#[from] MemberError),
    #[error("looking up routes: {0}")]
    Routes(#[source] RedisError),
    #[error("reading delivery progress: {0}")]
    Progress(#[source] RedisError),
}

impl DispatchError {
    /// Worth retrying: a dependency failed, not the event.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Invalid(_) | Self::Limit { .. })
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
    /// When busy: how long the other handler's claim has left.
    pub busy_for: Option<std::time::Duration>,
    /// Recipients an earlier attempt already delivered (not pushed again).
    pub already_delivered: usize,
    /// Recipients a gateway confirmed (counted, not listed: a large group
    /// would otherwise hold every name until the event ends).
    pub delivered: usize,
    pub offline: Vec<(String, OfflineReason)>,
    /// Offline recipients whose message is parked.
    pub parked: usize,
    /// Offline recipients named in a published offline notice.
    pub noticed: usize,
    pub failed: Vec<(String, PushFailure)>,
    pub gateways: usize,
    /// Delivery progress of the event was written to Redis (by this
    /// handling or an earlier one), so settling must drop it.
    pub progress_written: bool,
}

impl FanoutReport {
    /// Every recipient was delivered or is offline.
    pub fn is_settled(&self) -> bool {
        self.failed.is_empty()
    }

    /// Folds in the report of a retry of this report's failed recipients.
    pub fn absorb_retry(&mut self, retry: FanoutReport) {
        self.delivered += retry.delivered;
        self.offline.extend(retry.offline);
        self.parked += retry.parked;
        self.noticed += retry.noticed;
        self.failed = retry.failed;
        self.gateways = self.gateways.max(retry.gateways);
        self.progress_written |= retry.progress_written;
    }

    /// The first failure, to say why an event is retried.
    pub fn first_failure(&self) -> Option<&PushFailure> {
        self.failed.first().map(|(_, f)| f)
    }
}

/// An event over `limit`, counted.
fn over(limit: &'static str, detail: String) -> DispatchError {
    metrics::counter!(telemetry::metrics::LIMIT_VIOLATIONS, "limit" => limit).increment(1);
    DispatchError::Limit { limit, detail }
}

/// An encoded event of `len` bytes within `limits.max_payload_bytes`.
pub fn check_payload(len: usize, limits: &LimitsConfig) -> Result<(), DispatchError> {
    if len > limits.max_payload_bytes {
        return Err(over(
            "max_payload_bytes",
            format!("{len} bytes, at most {}", limits.max_payload_bytes),
        ));
    }
    Ok(())
}

/// A username or session id: length in bytes, then characters.
fn check_id(
    field: &str,
    value: &str,
    max_key: &'static str,
    max: usize,
    limits: &LimitsConfig,
) -> Result<(), DispatchError> {
    if value.len() > max {
        return Err(over(
            max_key,
            format!("{field} has {} bytes, at most {max}", value.len()),
        ));
    }
    if let Some(c) = value.chars().find(|c| !limits.id_charset.allows(*c)) {
        return Err(over(
            "id_charset",
            format!(
                "{field} holds {c:?}, not allowed by {:?}",
                limits.id_charset
            ),
        ));
    }
    Ok(())
}

/// Checks what dispatch relies on and the input limits; anything else
/// about the event is passed through to the gateway as is.
pub fn validate(event: &PushEvent, limits: &LimitsConfig) -> Result<(), DispatchError> {
    if event.session_id.trim().is_empty() {
        return Err(DispatchError::Invalid("session_id is empty".into()));
    }
    check_id(
        "session_id",
        &event.session_id,
        "max_session_id_bytes",
        limits.max_session_id_bytes,
        limits,
    )?;
    for (field, value) in [
        ("from_username", &event.from_username),
        ("to_username", &event.to_username),
    ] {
        check_id(
            field,
            value,
            "max_username_bytes",
            limits.max_username_bytes,
            limits,
        )?;
    }
    if event.content.len() > limits.max_content_bytes {
        return Err(over(
            "max_content_bytes",
            format!(
                "content has {} bytes, at most {}",
                event.content.len(),
                limits.max_content_bytes
            ),
        ));
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
    offline: Option<OfflineDelivery>,
    cfg: DispatchConfig,
    limits: LimitsConfig,
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
            offline: None,
            cfg,
            limits: LimitsConfig::default(),
        }
    }

    /// Refuses events beyond `limits` (default: [`LimitsConfig::default`]).
    pub fn with_limits(mut self, limits: LimitsConfig) -> Self {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    /// Parks messages and publishes notices for offline recipients.
    pub fn with_offline(mut self, offline: OfflineDelivery) -> Self {
        self.offline = Some(offline);
        self
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
    /// `recorded`: delivery progress may exist (see
    /// [`FanoutReport::progress_written`]).
    pub async fn finish(
        &self,
        msg_id: i64,
        token: &str,
        settled: bool,
        recorded: bool,
    ) -> Result<(), RedisError> {
        match &self.progress {
            Some(p) => p.finish(msg_id, token, settled, recorded).await,
            None => Ok(()),
        }
    }

    /// Renews `token`'s claim on the event every third of its lease, for
    /// as long as it is polled (never returns). A renewal that fails is
    /// logged and tried again at the next tick.
    pub async fn keep_claim(&self, msg_id: i64, token: &str) {
        let Some(progress) = &self.progress else {
            return std::future::pending().await;
        };
        let period = progress.lease_ttl() / 3;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tick.tick().await;
            // Boxed: few events live long enough to renew, and the renewal's
            // state would otherwise take room in every event's future.
            if let Err(e) = Box::pin(progress.renew(msg_id, token, progress.lease_ttl())).await {
                tracing::warn!(msg_id, error = %e, "claim not renewed; retrying at the next tick");
            }
        }
    }

    /// The handler of the event was stopped mid-way (shutdown): its pushes
    /// already queued on gateway streams may still go out while the
    /// process winds down, so the claim is not released but set to lapse
    /// once they are answered or timed out (`gateway.request_timeout`
    /// after the streams' drain allowance).
    pub async fn let_claim_lapse(&self, msg_id: i64, token: &str) {
        let Some(progress) = &self.progress else {
            return;
        };
        let ttl = self.pool.request_timeout() + STREAM_DRAIN_ALLOWANCE;
        if let Err(e) = progress.renew(msg_id, token, ttl).await {
            tracing::debug!(msg_id, error = %e, "claim left to its own expiry");
        }
    }

    /// Keeps an unsettled event's progress for `ttl`.
    pub async fn keep_progress(
        &self,
        msg_id: i64,
        ttl: std::time::Duration,
    ) -> Result<(), RedisError> {
        match &self.progress {
            Some(p) => p.keep(msg_id, ttl).await,
            None => Ok(()),
        }
    }

    /// Records `users` as reached, retrying a failed write with backoff: a
    /// reached recipient left unrecorded would be pushed again by the next
    /// attempt.
    async fn record_reached(&self, msg_id: i64, users: &[&str]) {
        let Some(progress) = &self.progress else {
            return;
        };
        let mut backoff = crate::retry::Backoff::new(
            std::time::Duration::from_millis(50),
            std::time::Duration::from_secs(1),
        );
        for attempt in 1..=PROGRESS_WRITES {
            match progress.record(msg_id, users).await {
                Ok(()) => return,
                Err(e) if attempt == PROGRESS_WRITES => {
                    tracing::warn!(msg_id, error = %e, recipients = users.len(), "delivery progress not recorded; a redelivery may repeat these pushes");
                }
                Err(e) => {
                    tracing::debug!(msg_id, error = %e, attempt, "delivery progress not recorded; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// Fans one event out to its session's members. `Err` means the event
    /// as a whole is to be tried again: nothing was pushed, or (a large
    /// session read from SQL as it was pushed, whose read or route lookup
    /// broke mid-way) what was pushed is recorded as reached, so the next
    /// attempt pushes only the rest. `Ok` reports every recipient. `token` names this handling in the event's
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
        telemetry::metrics::event_series()
            .dispatch_duration
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn dispatch_in_span(
        &self,
        event: &PushEvent,
        token: &str,
        turn: Turn,
    ) -> Result<FanoutReport, DispatchError> {
        validate(event, &self.limits)?;
        let (members, progress, first) = self.claim_and_look_up(event, token).await?;
        let member_count = members.len();
        tracing::Span::current().record("members", member_count);
        if progress.settled || progress.busy {
            return Ok(FanoutReport {
                members: member_count,
                duplicate: progress.settled,
                busy: !progress.settled,
                busy_for: progress.busy_for,
                ..Default::default()
            });
        }
        let reached_before = !progress.delivered.is_empty();
        let mut prefetched = None;
        let targets = match members {
            Looked::Whole(names) => {
                let (picked, already) = match first {
                    // Nobody reached yet: the recipients the routes were read for.
                    Some(first) if !reached_before => {
                        prefetched = Some(first.routes);
                        (first.picked, 0)
                    }
                    _ => plan::recipients(
                        &names,
                        &event.from_username,
                        self.cfg.push_to_sender,
                        &progress.delivered,
                    ),
                };
                count_deliveries("deduplicated", NO_GATEWAY, already);
                Targets::Picked {
                    names,
                    picked,
                    next: 0,
                    already,
                }
            }
            Looked::Streaming { stream, .. } => Targets::Streamed(Streamed {
                stream,
                sender: (!self.cfg.push_to_sender).then(|| event.from_username.clone()),
                reached: progress.delivered,
                already: 0,
            }),
        };
        let mut report = self
            .fan_out(event, targets, prefetched, member_count, turn)
            .await?;
        report.members = member_count;
        report.progress_written |= reached_before;
        Ok(report)
    }

    /// Pushes an event to the given recipients only (a retry of those that
    /// failed): routes are looked up again, since a user may have moved.
    /// `session_size` is the number of members of the event's session.
    pub async fn redeliver(
        &self,
        event: &PushEvent,
        recipients: Vec<String>,
        session_size: usize,
    ) -> Result<FanoutReport, DispatchError> {
        count_deliveries("retried", NO_GATEWAY, recipients.len());
        let span = tracing::info_span!(
            "retry",
            msg_id = event.msg_id,
            session_id = %event.session_id,
            recipients = recipients.len()
        );
        telemetry::trace::continue_from(&span, &event.trace_headers);
        self.fan_out(
            event,
            Targets::all(recipients),
            None,
            session_size,
            Turn::free(),
        )
        .instrument(span)
        .await
    }

    /// The session's members and the event's claim. When the members are
    /// cached, the routes of the first window of recipients are read in
    /// the claim's round trip (one round trip before the push); otherwise
    /// SQL and the claim run side by side and routes are read after. A
    /// session read cold that is wider than one window comes back while
    /// SQL is still sending it, its size counted first so a session over
    /// `limits.max_members` pushes nothing.
    async fn claim_and_look_up(
        &self,
        event: &PushEvent,
        token: &str,
    ) -> Result<(Looked, Progress, Option<FirstWindow>), DispatchError> {
        let cached = match &self.progress {
            Some(_) => self.members.cached(&event.session_id).await,
            None => None,
        };
        let (Some(members), Some(progress)) = (cached, &self.progress) else {
            // Boxed: the read's state is large, and an event of a cached
            // session (most of them) never takes it, so need not carry
            // room for it.
            let (looked, progress) = Box::pin(self.read_and_claim(event, token)).await?;
            return Ok((looked, progress, None));
        };
        self.check_members(event, members.len())?;
        let (picked, _) = plan::recipients(
            &members,
            &event.from_username,
            self.cfg.push_to_sender,
            &Default::default(),
        );
        let first = names_of(&members, &picked[..picked.len().min(self.window())]);
        let (progress, answers) = progress
            .claim_with(event.msg_id, token, self.routes.lookup_commands(&first))
            .await
            .map_err(DispatchError::Progress)?;
        let routes = self
            .routes
            .gateway_ids_from(&first, answers)
            .map_err(DispatchError::Routes)?;
        Ok((
            Looked::Whole(members),
            progress,
            Some(FirstWindow {
                picked,
                routes: (first, routes),
            }),
        ))
    }

    /// The session's members read (from SQL unless cached) beside the
    /// event's claim, for a session whose members were not at hand.
    async fn read_and_claim(
        &self,
        event: &PushEvent,
        token: &str,
    ) -> Result<(Looked, Progress), DispatchError> {
        let (members, progress) = tokio::join!(
            self.members.lookup(&event.session_id, self.window()),
            self.claim(event.msg_id, token)
        );
        let looked = match members? {
            Members::Whole(names) => {
                self.check_members(event, names.len())?;
                Looked::Whole(names)
            }
            Members::Streaming(stream) => {
                let size = stream.count().await?;
                self.check_members(event, size)?;
                Looked::Streaming { stream, size }
            }
        };
        Ok((looked, progress?))
    }

    fn check_members(&self, event: &PushEvent, members: usize) -> Result<(), DispatchError> {
        if members > self.limits.max_members {
            return Err(over(
                "max_members",
                format!(
                    "session {} has more than {} members",
                    event.session_id, self.limits.max_members
                ),
            ));
        }
        Ok(())
    }

    /// Recipients looked up, planned and queued at a time.
    fn window(&self) -> usize {
        (self.cfg.route_chunk_size * self.cfg.route_concurrency)
            .max(self.cfg.batch_size)
            .max(1)
    }

    /// Waits for one chunk's answer and records whom it reached, or, when
    /// `defer`, returns them to be recorded with the event's end. The
    /// answer is folded in here, so its share of the stream window goes
    /// back as soon as it is recorded (or, deferred, at once): holding it
    /// while other chunks wait for the window could hold the window up.
    async fn settle_chunk(
        &self,
        gateway_id: String,
        msg_id: i64,
        sent: Instant,
        answer: PendingReply,
        defer: bool,
    ) -> Answered {
        let reply = answer.wait().await;
        telemetry::metrics::event_series().round_trip(&gateway_id, sent.elapsed().as_secs_f64());
        let mut unrecorded = Vec::new();
        if self.progress.is_some() {
            let reached = reply
                .recipients
                .iter()
                .zip(&reply.outcomes)
                .filter(|(_, o)| **o == PushOutcome::Delivered)
                .map(|(u, _)| u.as_str());
            if defer {
                unrecorded.extend(reached.map(str::to_string));
            } else {
                self.record_reached(msg_id, &reached.collect::<Vec<_>>())
                    .await;
            }
        }
        let mut report = FanoutReport::default();
        report.absorb_reply(&gateway_id, reply);
        Answered { report, unrecorded }
    }

    /// Parks and notices the report's offline recipients; those it could
    /// not handle become failed recipients (retried), the others are
    /// recorded as reached so a redelivery leaves them alone.
    async fn settle_offline(
        &self,
        offline: &OfflineDelivery,
        event: &PushEvent,
        message: &PushMessage,
        session_size: usize,
        report: &mut FanoutReport,
    ) {
        if report.offline.is_empty() {
            return;
        }
        let users: Vec<String> = report.offline.iter().map(|(u, _)| u.clone()).collect();
        let outcome = offline.settle(event, message, session_size, &users).await;
        if self.progress.is_some() {
            self.record_reached(event.msg_id, &outcome.settled(&users))
                .await;
            report.progress_written = true;
        }
        report.parked += outcome.parked;
        report.noticed += outcome.noticed;
        if !outcome.failed.is_empty() {
            let failed: std::collections::HashSet<&str> =
                outcome.failed.iter().map(|(u, _)| u.as_str()).collect();
            report.offline.retain(|(u, _)| !failed.contains(u.as_str()));
            report.failed.extend(outcome.failed);
        }
    }

    /// Queues one gateway's chunks on its stream, in order, handing each to
    /// `queued` as soon as it is queued, and returns how many it queued.
    /// Each answer must be awaited from then on, not once the event's
    /// other chunks are queued too: an answer carries its share of the
    /// stream window, and answers left unread while the event waits to
    /// queue on another gateway's full stream could hold every window up.
    async fn enqueue_gateway(
        &self,
        batch: plan::GatewayBatch,
        message: &PushMessage,
        trace_headers: &HashMap<String, String>,
        queued: &(impl Fn(QueuedChunk) + Sync),
    ) -> usize {
        let endpoint = batch.endpoint;
        let chunk = if self.pool.uses_batch(&endpoint) {
            self.cfg.batch_size
        } else {
            self.cfg.push_chunk_size
        };
        let mut count = 0;
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
            queued((endpoint.gateway_id.clone(), Instant::now(), answer));
            count += 1;
        }
        count
    }

    /// Pushes to `targets` window by window: each window's routes are
    /// looked up, planned and queued on the gateway streams before the next
    /// window is touched, so an event holds at most one window of names and
    /// routes besides what its streams have in flight, however large its
    /// session. A full stream makes queuing wait, which holds the next
    /// window back.
    ///
    /// An event of at most `DEFERRED_RECORDING` recipients records whom it
    /// reached only at its end: with the settled mark when it settles
    /// (nothing to record then), in one write before its retries when some
    /// recipient failed. A larger event records each chunk as it is
    /// answered, so a crash mid-way repeats no more than the pushes in
    /// flight.
    async fn fan_out(
        &self,
        event: &PushEvent,
        targets: Targets,
        prefetched: Option<Prefetched>,
        session_size: usize,
        turn: Turn,
    ) -> Result<FanoutReport, DispatchError> {
        let started = Instant::now();
        let message = gateway_message(event);
        let defer = targets.defers_recording();
        // Queuing (windows in order) and settling (answers as they come,
        // recording progress) run side by side, so answered chunks give
        // their window share back and free their names while later chunks
        // are still being queued.
        let (queued_tx, queued_rx) = tokio::sync::mpsc::unbounded_channel();
        let (queued, answered) = tokio::join!(
            // The sender moves into the closure, so the channel closes when
            // queuing is done.
            self.queue_windows(&message, targets, prefetched, turn, move |c| {
                let _ = queued_tx.send(c);
            }),
            self.collect_answers(event.msg_id, queued_rx, defer)
        );
        let mut report = queued?;
        let Answered {
            report: answered,
            unrecorded,
        } = answered;
        report.absorb_answers(answered);
        report.progress_written = !defer;
        if !report.failed.is_empty() && !unrecorded.is_empty() {
            let reached: Vec<&str> = unrecorded.iter().map(String::as_str).collect();
            self.record_reached(event.msg_id, &reached).await;
            report.progress_written = true;
        }
        if let Some(offline) = &self.offline {
            self.settle_offline(offline, event, &message, session_size, &mut report)
                .await;
        }
        tracing::debug!(
            delivered = report.delivered,
            offline = report.offline.len(),
            parked = report.parked,
            noticed = report.noticed,
            failed = report.failed.len(),
            gateways = report.gateways,
            elapsed = ?started.elapsed(),
            "fan-out done"
        );
        Ok(report)
    }

    /// Looks up the targets' routes window by window, plans each window per
    /// gateway and queues its chunks on the gateway streams, handing every
    /// queued chunk to `queued`. The report holds who is offline and, when
    /// a later window's lookup fails, who could not be queued; `Err` means
    /// nothing was queued.
    async fn queue_windows(
        &self,
        message: &PushMessage,
        mut targets: Targets,
        mut prefetched: Option<Prefetched>,
        mut turn: Turn,
        queued: impl Fn(QueuedChunk) + Sync,
    ) -> Result<FanoutReport, DispatchError> {
        let trace_headers = telemetry::trace::headers_of(&tracing::Span::current());
        let mut report = FanoutReport::default();
        let mut gateways = std::collections::HashSet::new();
        let mut queued_any = false;
        let window = self.window();
        loop {
            let (names, looked_up) = match prefetched.take() {
                // The first window's routes came with the claim.
                Some((names, routes)) => {
                    targets.skip_window(window);
                    (names, Ok(routes))
                }
                None => match targets.next_window(window).await {
                    None => break,
                    Some(Ok(names)) if names.is_empty() => continue,
                    Some(Ok(names)) => {
                        let routes = self.routes.gateway_ids(&names).await;
                        (names, routes)
                    }
                    // The answers to what was queued are still collected
                    // and recorded, so trying the event again pushes only
                    // the members not reached.
                    Some(Err(e)) => return Err(e.into()),
                },
            };
            let routes = match looked_up {
                Ok(routes) => routes,
                // Nothing pushed yet: the event as a whole is retried.
                Err(e) if !queued_any => return Err(DispatchError::Routes(e)),
                // Earlier windows are out: these and the rest fail, and
                // only they are retried.
                Err(e) => match targets.rest() {
                    Some(rest) => {
                        let failure = PushFailure::new(FailureKind::Lookup, NO_GATEWAY, &e);
                        report
                            .failed
                            .extend(names.into_iter().chain(rest).map(|u| (u, failure.clone())));
                        break;
                    }
                    // The rest is not read yet: the event is tried again
                    // as a whole, past those already reached.
                    None => return Err(DispatchError::Routes(e)),
                },
            };
            let plan = plan::plan(names, routes, &self.registry.snapshot());
            for (user, reason) in &plan.offline {
                tracing::trace!(username = %user, reason = reason.as_str(), "offline");
            }
            count_deliveries("offline", NO_GATEWAY, plan.offline.len());
            report.offline.extend(plan.offline);
            gateways.extend(plan.batches.iter().map(|b| b.endpoint.gateway_id.clone()));
            // Chunks are queued only after the session's previous event
            // queued all of its own (the first wait does it); the next
            // event may go once this one's last window is queued.
            turn.wait().await;
            let chunks = join_all(plan.batches.into_iter().map(|batch| {
                let span = tracing::debug_span!(
                    "gateway_batch",
                    gateway_id = %batch.endpoint.gateway_id,
                    recipients = batch.recipients.len()
                );
                self.enqueue_gateway(batch, message, &trace_headers, &queued)
                    .instrument(span)
            }))
            .await;
            queued_any |= chunks.into_iter().any(|n| n > 0);
        }
        turn.release();
        report.gateways = gateways.len();
        report.already_delivered = targets.already_delivered();
        Ok(report)
    }

    /// Waits for the answers to the chunks arriving on `queued`, as they
    /// come, recording each (unless `defer`: then whom they reached is
    /// returned unrecorded), until the queuing side is done and every
    /// answer is in.
    async fn collect_answers(
        &self,
        msg_id: i64,
        mut queued: tokio::sync::mpsc::UnboundedReceiver<QueuedChunk>,
        defer: bool,
    ) -> Answered {
        let mut answered = Answered::default();
        let mut settling = FuturesUnordered::new();
        let mut open = true;
        loop {
            tokio::select! {
                chunk = queued.recv(), if open => match chunk {
                    Some((gateway_id, sent, reply)) => {
                        settling.push(self.settle_chunk(gateway_id, msg_id, sent, reply, defer));
                    }
                    None => open = false,
                },
                Some(chunk) = settling.next(), if !settling.is_empty() => {
                    answered.absorb(chunk);
                }
                else => break,
            }
        }
        answered
    }
}

/// The answers to an event's chunks, and whom they reached that is not
/// recorded yet.
#[derive(Default)]
struct Answered {
    report: FanoutReport,
    unrecorded: Vec<String>,
}

impl Answered {
    fn absorb(&mut self, chunk: Answered) {
        self.report.absorb_answers(chunk.report);
        self.unrecorded.extend(chunk.unrecorded);
    }
}

/// The first window of a cached session's recipients (all of them, by
/// index, when nobody was reached before), with its names and routes read
/// in the claim's round trip.
struct FirstWindow {
    picked: Vec<u32>,
    routes: Prefetched,
}

/// A window's names and their gateway ids, read ahead.
type Prefetched = (Vec<String>, Vec<Option<Arc<str>>>);

/// The names at `indices` of `names`.
fn names_of(names: &[String], indices: &[u32]) -> Vec<String> {
    indices.iter().map(|&i| names[i as usize].clone()).collect()
}

/// A chunk on a gateway stream: its gateway, when it was queued, and its
/// reply to come.
type QueuedChunk = (String, Instant, PendingReply);

/// A session's members as the claim found them.
enum Looked {
    Whole(Arc<Vec<String>>),
    /// Still being read; `size` counted by SQL.
    Streaming {
        stream: Box<MemberStream>,
        size: usize,
    },
}

impl Looked {
    fn len(&self) -> usize {
        match self {
            Self::Whole(names) => names.len(),
            Self::Streaming { size, .. } => *size,
        }
    }
}

/// Whom to push to.
enum Targets {
    /// Some of a shared list of names, by index, so a large session's
    /// member list is not copied per event; those before `next` are
    /// handed out, `already` were reached before.
    Picked {
        names: Arc<Vec<String>>,
        picked: Vec<u32>,
        next: usize,
        already: usize,
    },
    /// A session still being read from SQL: each window is planned as its
    /// rows arrive.
    Streamed(Streamed),
}

/// A streamed session's recipients: its members without the sender (when
/// `sender` is set) and without those reached before.
struct Streamed {
    stream: Box<MemberStream>,
    sender: Option<String>,
    reached: HashSet<String>,
    already: usize,
}

impl Targets {
    fn all(names: Vec<String>) -> Self {
        let picked = (0..names.len() as u32).collect();
        Self::Picked {
            names: Arc::new(names),
            picked,
            next: 0,
            already: 0,
        }
    }

    /// Whether whom the event reaches is recorded at its end only: a small
    /// event's (see `DEFERRED_RECORDING`); a streamed session is wider
    /// than one window.
    fn defers_recording(&self) -> bool {
        match self {
            Self::Picked { picked, .. } => picked.len() <= DEFERRED_RECORDING,
            Self::Streamed(_) => false,
        }
    }

    /// The next `window` recipients; `None` when there are no more.
    async fn next_window(&mut self, window: usize) -> Option<Result<Vec<String>, MemberError>> {
        match self {
            Self::Picked {
                names,
                picked,
                next,
                ..
            } => {
                let taken = picked
                    .get(*next..)?
                    .get(..window.min(picked.len() - *next))?;
                *next += taken.len();
                (!taken.is_empty()).then(|| Ok(names_of(names, taken)))
            }
            Self::Streamed(s) => {
                let mut names = match s.stream.next_window(window).await? {
                    Ok(names) => names,
                    Err(e) => return Some(Err(e)),
                };
                let before = names.len();
                names.retain(|m| s.sender.as_deref() != Some(m.as_str()));
                let sent_by = before - names.len();
                names.retain(|m| !s.reached.contains(m));
                let already = before - sent_by - names.len();
                s.already += already;
                count_deliveries("deduplicated", NO_GATEWAY, already);
                Some(Ok(names))
            }
        }
    }

    /// Passes over the next window, whose names were read ahead.
    fn skip_window(&mut self, window: usize) {
        if let Self::Picked { picked, next, .. } = self {
            *next = picked.len().min(*next + window);
        }
    }

    /// Every recipient not handed out yet, when they are known (`None` for
    /// a session still being read).
    fn rest(&mut self) -> Option<Vec<String>> {
        match self {
            Self::Picked {
                names,
                picked,
                next,
                ..
            } => {
                let rest = names_of(names, &picked[*next..]);
                *next = picked.len();
                Some(rest)
            }
            Self::Streamed(_) => None,
        }
    }

    /// Recipients an earlier attempt reached, left out.
    fn already_delivered(&self) -> usize {
        match self {
            Self::Picked { already, .. } => *already,
            Self::Streamed(s) => s.already,
        }
    }
}

impl FanoutReport {
    /// Folds in what gateways answered for some of this report's chunks.
    fn absorb_answers(&mut self, answered: FanoutReport) {
        self.delivered += answered.delivered;
        self.offline.extend(answered.offline);
        self.failed.extend(answered.failed);
    }

    /// Folds in one answered chunk.
    fn absorb_reply(&mut self, gateway_id: &str, reply: PushReply) {
        let (mut delivered, mut offline, mut failed) = (0, 0, 0);
        for (user, outcome) in reply.recipients.into_iter().zip(reply.outcomes) {
            match outcome {
                PushOutcome::Delivered => delivered += 1,
                PushOutcome::NotConnected(reason) => {
                    offline += 1;
                    tracing::debug!(username = %user, %reason, "gateway says not connected");
                    self.offline.push((user, OfflineReason::NotConnected));
                }
                PushOutcome::Failed(failure) => {
                    failed += 1;
                    self.failed.push((user, failure));
                }
            }
        }
        self.delivered += delivered;
        count_deliveries("delivered", gateway_id, delivered);
        count_deliveries("offline", gateway_id, offline);
        count_deliveries("failed", gateway_id, failed);
    }
}

/// Recipients up to which an event records its progress at its end rather
/// than chunk by chunk: what a crash can make a redelivery repeat grows by
/// at most this per event in flight, and a small event saves a Redis write
/// per gateway.
const DEFERRED_RECORDING: usize = 32;

/// How long, after the grace period, a stopping pod's gateway streams may
/// still write what was queued on them (the drain's own allowances).
const STREAM_DRAIN_ALLOWANCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Writes of one chunk's progress before giving up on it (about 2 s in
/// all with the backoff between them).
const PROGRESS_WRITES: u32 = 5;

fn count_deliveries(outcome: &'static str, gateway_id: &str, n: usize) {
    if n > 0 {
        telemetry::metrics::event_series().deliveries(outcome, gateway_id, n as u64);
    }
}
