//! Durable intake: a JetStream stream bound to `consumer.topic` captures the
//! publishers' plain core-NATS publishes, and one durable pull consumer
//! (named after `consumer.queue_group`) shared by every pod is the queue
//! group. Each pod keeps `consumer.worker_count` events in flight and a
//! bounded prefetch (count and bytes) waiting in priority lanes. A message
//! is acked only after its fan-out settled, nak'ed with a delay on a failed
//! attempt (counted in Redis by `attempts`), handed back without spending
//! an attempt when it was not its fault, and dead-lettered then terminated
//! when it can never succeed or its attempts are spent. Whatever happens,
//! a message leaves the work queue acked or in the dead letters.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind, stream};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::attempts::{FailedAttempts, failed_key};
use super::dead_letter::{self, DeadLetterInfo};
use super::lanes::LaneQueue;
use super::{Attempt, Decision, MessageHandler};
use crate::config::ConsumerConfig;
use crate::dispatch::Turn;
use crate::lifecycle::{Lifecycle, Readiness};
use crate::retry::{Backoff, pause_for};
use crate::telemetry;

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("JetStream stream {stream}: {cause}")]
    Stream {
        stream: String,
        #[source]
        cause: crate::BoxError,
    },
    #[error("JetStream consumer {consumer} on {stream}: {cause}")]
    Consumer {
        stream: String,
        consumer: String,
        #[source]
        cause: crate::BoxError,
    },
    #[error(transparent)]
    DeadLetter(#[from] dead_letter::DeadLetterError),
}

/// Unacked messages across all pods before JetStream stops handing out more.
const MAX_ACK_PENDING: i64 = 20_000;

fn consumer_config(cfg: &ConsumerConfig) -> pull::Config {
    pull::Config {
        durable_name: Some(cfg.queue_group.clone()),
        description: Some("resonance-task fan-out (shared by every pod)".into()),
        ack_policy: AckPolicy::Explicit,
        deliver_policy: DeliverPolicy::All,
        ack_wait: cfg.ack_wait,
        // Giving up after consumer.max_deliver failed attempts is ours;
        // JetStream's limit is the ceiling over every kind of delivery.
        max_deliver: cfg.delivery_ceiling,
        filter_subject: cfg.topic.clone(),
        max_ack_pending: MAX_ACK_PENDING,
        ..Default::default()
    }
}

/// Creates the input stream (or checks an existing one captures the topic),
/// the dead-letter stream, and the shared durable consumer, updating the
/// consumer when its settings differ from the configuration.
pub async fn ensure(
    js: &jetstream::Context,
    cfg: &ConsumerConfig,
) -> Result<PullConsumer, IntakeError> {
    let stream_err = |cause: crate::BoxError| IntakeError::Stream {
        stream: cfg.stream.clone(),
        cause,
    };
    let mut stream = crate::streams::ensure(
        js,
        stream::Config {
            name: cfg.stream.clone(),
            subjects: vec![cfg.topic.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_age: cfg.stream_max_age,
            ..Default::default()
        },
        &crate::streams::Replication::of(cfg),
    )
    .await
    .map_err(|e| stream_err(e.into()))?;
    let subjects = stream
        .info()
        .await
        .map_err(|e| stream_err(e.into()))?
        .config
        .subjects
        .clone();
    if !subjects.iter().any(|s| s == &cfg.topic) {
        return Err(stream_err(
            format!(
                "exists but captures {subjects:?}, not consumer.topic `{}`",
                cfg.topic
            )
            .into(),
        ));
    }
    dead_letter::ensure_stream(js, cfg).await?;

    let consumer_err = |cause: crate::BoxError| IntakeError::Consumer {
        stream: cfg.stream.clone(),
        consumer: cfg.queue_group.clone(),
        cause,
    };
    let wanted = consumer_config(cfg);
    let mut consumer: PullConsumer = stream
        .get_or_create_consumer(&cfg.queue_group, wanted.clone())
        .await
        .map_err(|e| consumer_err(e.into()))?;
    let current = consumer
        .info()
        .await
        .map_err(|e| consumer_err(e.into()))?
        .config
        .clone();
    if current.ack_wait != wanted.ack_wait
        || current.max_deliver != wanted.max_deliver
        || current.filter_subject != wanted.filter_subject
        || current.max_ack_pending != wanted.max_ack_pending
    {
        tracing::info!(consumer = %cfg.queue_group, "updating durable consumer settings");
        consumer = stream
            .update_consumer(wanted)
            .await
            .map_err(|e| consumer_err(e.into()))?;
    }
    Ok(consumer)
}

/// Most messages asked for in one pull request.
const MAX_BATCH: usize = 256;
/// How long one pull request stays open when fewer messages are waiting.
/// Short, because a pod that stops reads its open request to the end
/// (handing back what it still brings) rather than abandon messages to
/// ack_wait; an idle pod sends one request per expiry.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// What a stored message may add to its payload in a pull response
/// (headers, subject, reply), so a pull can always take the largest one.
const MESSAGE_OVERHEAD: usize = 64 << 10;
/// After stop, the longest wait for the hand-back of what is left (the
/// open pull request's end, the naks), NATS up or down.
const HANDBACK_LIMIT: Duration = Duration::from_secs(10);

/// How much may wait in the pod ahead of its workers, and how many of the
/// workers only high-priority messages may take.
#[derive(Debug, Clone, Copy)]
pub struct Prefetch {
    pub count: usize,
    pub bytes: usize,
    pub reserved_workers: usize,
}

/// A worker slot: one of `consumer.worker_count`, and for a normal message
/// one of the slots not reserved for the high lane.
struct Worker {
    _any: tokio::sync::OwnedSemaphorePermit,
    _normal: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Waits for a worker slot for a message of `lane`.
async fn worker_for(lane: super::Lane, any: &Arc<Semaphore>, normal: &Arc<Semaphore>) -> Worker {
    let normal = match lane {
        super::Lane::High => None,
        super::Lane::Normal => Some(
            normal
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore is never closed"),
        ),
    };
    let any = any
        .clone()
        .acquire_owned()
        .await
        .expect("semaphore is never closed");
    Worker {
        _any: any,
        _normal: normal,
    }
}

/// Messages taken from NATS that wait for a worker, in lanes, with what
/// they hold in bytes.
struct Waiting {
    lanes: LaneQueue<jetstream::Message>,
    bytes: usize,
    metrics: LaneMetrics,
}

/// The lanes' counters and gauges, looked up once rather than per event.
struct LaneMetrics {
    /// High, normal.
    events: [metrics::Counter; 2],
    queued: [metrics::Gauge; 2],
}

impl LaneMetrics {
    const LANES: [super::Lane; 2] = [super::Lane::High, super::Lane::Normal];

    fn new() -> Self {
        let [high, normal] = Self::LANES.map(|l| l.as_str());
        Self {
            events: [
                metrics::counter!(telemetry::metrics::LANE_EVENTS, "lane" => high),
                metrics::counter!(telemetry::metrics::LANE_EVENTS, "lane" => normal),
            ],
            queued: [
                metrics::gauge!(telemetry::metrics::LANE_QUEUED, "lane" => high),
                metrics::gauge!(telemetry::metrics::LANE_QUEUED, "lane" => normal),
            ],
        }
    }

    fn index(lane: super::Lane) -> usize {
        match lane {
            super::Lane::High => 0,
            super::Lane::Normal => 1,
        }
    }

    fn report<T>(&self, waiting: &LaneQueue<T>) {
        for lane in Self::LANES {
            self.queued[Self::index(lane)].set(waiting.len_of(lane) as f64);
        }
    }
}

impl Waiting {
    fn new() -> Self {
        Self {
            lanes: LaneQueue::default(),
            bytes: 0,
            metrics: LaneMetrics::new(),
        }
    }

    fn push<H: MessageHandler>(&mut self, handler: &H, message: jetstream::Message) {
        let lane = handler.lane(message.headers.as_ref(), &message.payload);
        self.metrics.events[LaneMetrics::index(lane)].increment(1);
        let session = handler.session_of(&message.payload);
        self.bytes += message.length;
        self.lanes.push(message, session, lane);
        self.metrics.report(&self.lanes);
    }

    fn pop(&mut self) -> Option<jetstream::Message> {
        let next = self.lanes.pop()?;
        self.bytes -= next.item.length;
        self.metrics.report(&self.lanes);
        Some(next.item)
    }

    /// What the next pull request may ask for, if anything: `None` while
    /// too little has left to be worth a request. A message as large as
    /// the server allows (`largest`) always fits when nothing waits.
    fn room(&self, limit: Prefetch, largest: usize) -> Option<(usize, usize)> {
        let count = limit.count.saturating_sub(self.lanes.len());
        let bytes = limit.bytes.saturating_sub(self.bytes);
        let refill = (limit.count / 4).clamp(1, MAX_BATCH / 4);
        if self.lanes.is_empty() {
            return Some((count.min(MAX_BATCH), bytes.max(largest)));
        }
        (count >= refill && bytes >= largest).then_some((count.min(MAX_BATCH), bytes))
    }

    /// In-progress acks for every message not touched for `age`, so none
    /// is redelivered for waiting.
    async fn keep_alive(&mut self, age: Duration) {
        for queued in self.lanes.iter_mut().filter(|q| q.touched.elapsed() >= age) {
            queued.touched = std::time::Instant::now();
            if let Err(e) = queued.item.ack_with(AckKind::Progress).await {
                tracing::debug!(error = %e, "in-progress ack for a waiting event not sent");
            }
        }
    }
}

/// One durable intake: the JetStream context and consumer settings, the
/// handler, and the ledger of failed attempts.
pub struct Intake<H> {
    js: jetstream::Context,
    cfg: ConsumerConfig,
    handler: Arc<H>,
    attempts: FailedAttempts,
}

impl<H: MessageHandler> Intake<H> {
    pub fn new(
        client: async_nats::Client,
        cfg: ConsumerConfig,
        handler: Arc<H>,
        attempts: FailedAttempts,
    ) -> Self {
        Self {
            js: jetstream::new(client),
            cfg,
            handler,
            attempts,
        }
    }

    /// Pulls and handles events until `life.stop` fires. Up to
    /// `prefetch` pulled messages wait in priority lanes for one of
    /// `worker_count` workers, high lane first; each pull request asks for
    /// no more than fits, so nothing waits unseen in the client, and every
    /// waiting message gets in-progress acks well within ack_wait. On stop
    /// no further pull is requested: what waits, and what the open request
    /// still brings, is handed back once each. Connection trouble is
    /// retried with backoff; events in flight are spawned on `life`, and
    /// `life.abort` ends their grace period.
    pub async fn run(self, life: &Lifecycle, prefetch: Prefetch) {
        let intake = Arc::new(self);
        let prefetch = Prefetch {
            count: prefetch.count.max(1),
            bytes: prefetch.bytes.max(1),
            ..prefetch
        };
        let largest = intake.js.client().server_info().max_payload + MESSAGE_OVERHEAD;
        let workers = Arc::new(Semaphore::new(intake.cfg.worker_count));
        let normal_workers = Arc::new(Semaphore::new(
            intake
                .cfg
                .worker_count
                .saturating_sub(prefetch.reserved_workers)
                .max(1),
        ));
        let stop = &life.stop;
        life.spawn(dead_letter::rescue_exhausted(
            intake.js.clone(),
            intake.cfg.clone(),
            stop.clone(),
        ));
        life.spawn(super::sweep::requeue_left_behind(
            intake.js.clone(),
            intake.cfg.clone(),
            stop.clone(),
        ));
        let mut waiting = Waiting::new();
        let mut puller = Puller::new(life);
        let touch_after = intake.cfg.ack_wait / 3;
        let mut keep_alive = tokio::time::interval(intake.cfg.ack_wait / 6);
        loop {
            if let Some((count, bytes)) = waiting.room(prefetch, largest) {
                puller.request(&intake.js, &intake.cfg, count, bytes).await;
            }
            let retry_at = puller.next_request;
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                worker = worker_for(
                    waiting.lanes.next_lane().unwrap_or(super::Lane::Normal),
                    &workers,
                    &normal_workers,
                ), if !waiting.lanes.is_empty() => {
                    let message = waiting.pop().expect("lanes are not empty");
                    intake.start(message, worker, life);
                }
                next = next_of(&mut puller.pull), if puller.pull.is_some() => match next {
                    Some(Ok(message)) => {
                        puller.backoff.reset();
                        waiting.push(intake.handler.as_ref(), message);
                    }
                    Some(Err(error)) => {
                        puller.pull = None;
                        if !ends_request(&error) {
                            puller.broke(&error, "JetStream pull broke; re-binding the consumer");
                        }
                    }
                    None => puller.pull = None,
                },
                _ = keep_alive.tick() => waiting.keep_alive(touch_after).await,
                _ = tokio::time::sleep_until(retry_at), if puller.pull.is_none() && retry_at > Instant::now() => {}
            }
        }
        let pull = puller.pull.take();
        drop(puller);
        hand_back(waiting, pull).await;
    }

    /// Hands `message` to a worker task holding `worker` until it settles.
    fn start(self: &Arc<Self>, message: jetstream::Message, worker: Worker, life: &Lifecycle) {
        let turn = self.handler.turn(&message.payload);
        let (intake, abort) = (self.clone(), life.abort.clone());
        let in_flight = &telemetry::metrics::event_series().events_in_flight;
        in_flight.increment(1.0);
        // Boxed: the handling's state is large, and a boxed future moves
        // into its task as a pointer rather than as a copy.
        life.spawn(Box::pin(async move {
            intake.settle(message, &abort, turn).await;
            in_flight.decrement(1.0);
            drop(worker);
        }));
    }

    /// Handles one message and carries out the decision: ack, nak with a
    /// delay (a failed attempt, counted), nak without spending an attempt
    /// (a handback), or dead letter then terminate. In-progress acks keep
    /// JetStream from handing it to another pod meanwhile, however long
    /// the fan-out or the dead-letter store takes.
    async fn settle(&self, message: jetstream::Message, abort: &CancellationToken, turn: Turn) {
        let info = message.info().ok();
        let delivery = info.as_ref().map_or(1, |i| i.delivered);
        let stream_sequence = info.as_ref().map(|i| i.stream_sequence);
        // Names the stored message for the failure count, built only when
        // an attempt fails.
        let stored = info
            .as_ref()
            .map(|i| (i.stream_sequence, i.published.unix_timestamp_nanos()));
        // Built in place and pinned here: the handling's state is large,
        // and a future passed by value is copied into each frame it
        // crosses.
        let work = std::pin::pin!(async {
            let attempt = Attempt { delivery };
            let decision = self
                .handler
                .handle(
                    &message.payload,
                    message.headers.as_ref(),
                    attempt,
                    abort,
                    turn,
                )
                .await;
            // The rare paths are boxed, so their state takes a pointer's
            // room in every event's future rather than the largest path's.
            let decision = match decision {
                Decision::Retry { reason, delay } => {
                    Box::pin(self.count_failure(stored, reason, delivery, delay)).await
                }
                d => d,
            };
            match decision {
                Decision::DeadLetter { reason, last_error } => {
                    let info = DeadLetterInfo {
                        reason: &reason,
                        last_error: &last_error,
                        deliveries: delivery,
                        stream_sequence,
                        subject: message.subject.as_str(),
                    };
                    if Box::pin(self.store_dead_letter(&message, &info, abort)).await {
                        Box::pin(self.handler.dead_lettered(&message.payload)).await;
                        Decision::DeadLetter { reason, last_error }
                    } else {
                        Decision::SHUTDOWN
                    }
                }
                d => d,
            }
        });
        let decision = with_progress_acks(&message, self.cfg.ack_wait / 3, work).await;
        let kind = match &decision {
            Decision::Ack | Decision::Duplicate => AckKind::Ack,
            Decision::Retry { delay, .. } => AckKind::Nak(Some(*delay)),
            Decision::HandBack { delay } if delay.is_zero() => AckKind::Nak(None),
            Decision::HandBack { delay } => AckKind::Nak(Some(*delay)),
            Decision::DeadLetter { .. } => AckKind::Term,
        };
        // A lost ack means a redelivery, which progress tracking makes safe.
        if let Err(e) = message.ack_with(kind).await {
            tracing::warn!(error = %e, stream_sequence, ?kind, "ack not sent; the event will be redelivered");
        }
        self.handler.decided(&decision);
    }

    /// A failed attempt: counted, then retried later or, once
    /// `consumer.max_deliver` attempts have failed, dead-lettered. When the
    /// count cannot be kept (Redis is down too) the event is retried:
    /// JetStream's ceiling still bounds it. The redelivery waits at least
    /// `asked` (a handler that was told when to come back).
    async fn count_failure(
        &self,
        stored: Option<(u64, i128)>,
        reason: String,
        delivery: i64,
        asked: Duration,
    ) -> Decision {
        let counted = match stored {
            Some((sequence, published_ns)) => {
                let key = failed_key(&self.cfg.stream, sequence, published_ns);
                self.attempts.add(&key).await
            }
            None => Ok(delivery),
        };
        match counted {
            Ok(failures) => Decision::Retry {
                delay: redelivery_delay(&self.cfg, failures).max(asked),
                reason,
            }
            .or_give_up(failures, self.cfg.max_deliver),
            Err(e) => {
                tracing::warn!(error = %e, delivery, "failed attempt not counted; the event will be redelivered");
                Decision::Retry {
                    delay: redelivery_delay(&self.cfg, delivery).max(asked),
                    reason,
                }
            }
        }
    }

    /// Stores the dead letter, recreating a missing dead-letter stream and
    /// retrying with backoff until it is stored: the event stays in the
    /// work queue meanwhile, never nak'ed into oblivion. `false` when the
    /// grace period ran out first (the event is then handed back).
    async fn store_dead_letter(
        &self,
        message: &jetstream::Message,
        info: &DeadLetterInfo<'_>,
        abort: &CancellationToken,
    ) -> bool {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let stored = dead_letter::publish(
                &self.js,
                &self.cfg.dead_letter_topic,
                message.payload.clone(),
                info,
            )
            .await;
            let error = match stored {
                Ok(()) => return true,
                Err(e) => e,
            };
            let delay = backoff.next_delay();
            tracing::error!(%error, stream_sequence = info.stream_sequence, retry_in = ?delay, "dead letter not stored; the event stays in the work queue");
            if let Err(e) = dead_letter::ensure_stream(&self.js, &self.cfg).await {
                tracing::warn!(error = %e, "dead-letter stream not recreated");
            }
            if !pause_for(abort, delay).await {
                return false;
            }
        }
    }
}

/// The pull side of an intake: the bound consumer (if any), the one open
/// pull request, and when the next may be sent after a failure.
struct Puller<'a> {
    consumer: Option<PullConsumer>,
    /// Stops the lag reporter of the bound consumer when dropped.
    lag: Option<tokio_util::sync::DropGuard>,
    pull: Option<pull::Batch>,
    next_request: Instant,
    backoff: Backoff,
    life: &'a Lifecycle,
}

impl<'a> Puller<'a> {
    fn new(life: &'a Lifecycle) -> Self {
        Self {
            consumer: None,
            lag: None,
            pull: None,
            next_request: Instant::now(),
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
            life,
        }
    }

    /// Opens a pull request for up to `count` messages and `bytes`, unless
    /// one is open or a failure's backoff is still running; binds the
    /// consumer first when needed.
    async fn request(
        &mut self,
        js: &jetstream::Context,
        cfg: &ConsumerConfig,
        count: usize,
        bytes: usize,
    ) {
        if self.pull.is_some() || Instant::now() < self.next_request {
            return;
        }
        if self.consumer.is_none() {
            match ensure(js, cfg).await {
                Ok(c) => {
                    tracing::info!(stream = %cfg.stream, consumer = %cfg.queue_group, topic = %cfg.topic, "consuming");
                    Readiness::set(&self.life.readiness.consumer_bound, true);
                    let bound = self.life.stop.child_token();
                    self.life.spawn(report_lag(c.clone(), bound.clone()));
                    self.lag = Some(bound.drop_guard());
                    self.consumer = Some(c);
                }
                Err(error) => return self.broke(&error, "JetStream intake not ready"),
            }
        }
        let Some(consumer) = &self.consumer else {
            return;
        };
        match request(consumer, count, bytes).await {
            Ok(batch) => self.pull = Some(batch),
            Err(error) => self.broke(
                error.as_ref(),
                "JetStream pull request failed; re-binding the consumer",
            ),
        }
    }

    /// The consumer must be bound again, after a backoff.
    fn broke(&mut self, error: &dyn std::fmt::Display, what: &'static str) {
        let delay = self.backoff.next_delay();
        tracing::warn!(%error, retry_in = ?delay, "{what}");
        Readiness::set(&self.life.readiness.consumer_bound, false);
        (self.consumer, self.lag) = (None, None);
        self.next_request = Instant::now() + delay;
    }
}

/// Runs `work`, sending in-progress acks for `message` every `period`.
async fn with_progress_acks<F: std::future::Future>(
    message: &jetstream::Message,
    period: Duration,
    mut work: std::pin::Pin<&mut F>,
) -> F::Output {
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    loop {
        tokio::select! {
            out = work.as_mut() => return out,
            _ = tick.tick() => {
                if let Err(e) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %e, "in-progress ack not sent");
                }
            }
        }
    }
}

/// Asks for up to `count` messages of at most `bytes` in all.
async fn request(
    consumer: &PullConsumer,
    count: usize,
    bytes: usize,
) -> Result<pull::Batch, async_nats::Error> {
    let batch = consumer
        .batch()
        .max_messages(count)
        .max_bytes(bytes)
        .expires(PULL_EXPIRES)
        .messages();
    match tokio::time::timeout(PULL_EXPIRES, batch).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err("pull request not sent in time".into()),
    }
}

async fn next_of(
    pull: &mut Option<pull::Batch>,
) -> Option<Result<jetstream::Message, async_nats::Error>> {
    match pull {
        Some(batch) => batch.next().await,
        None => std::future::pending().await,
    }
}

/// Statuses that only end one pull request: the byte limit was reached.
fn ends_request(error: &async_nats::Error) -> bool {
    let text = error.to_string();
    text.contains("409") && text.contains("MaxBytes")
}

/// Hands back, once each, what waits and what the open pull request still
/// brings (no new request is sent), so another pod takes it now; bounded
/// by [`HANDBACK_LIMIT`] even when NATS is unreachable (those messages come
/// back after ack_wait instead, still without spending an attempt).
async fn hand_back(mut waiting: Waiting, pull: Option<pull::Batch>) {
    let mut handed_back = 0u64;
    let work = async {
        while let Some(message) = waiting.pop() {
            let _ = message.ack_with(AckKind::Nak(None)).await;
            handed_back += 1;
        }
        if let Some(mut pull) = pull {
            while let Some(Ok(message)) = pull.next().await {
                let _ = message.ack_with(AckKind::Nak(None)).await;
                handed_back += 1;
            }
        }
    };
    let finished = tokio::time::timeout(HANDBACK_LIMIT, work).await.is_ok();
    if handed_back > 0 || !finished {
        tracing::info!(
            handed_back,
            finished,
            "waiting events handed back on shutdown"
        );
    }
}

/// Publishes the consumer's backlog (num_pending) and unacked count as
/// gauges every few seconds, so lag is visible, until `stop`.
async fn report_lag(mut consumer: PullConsumer, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Ok(info) = consumer.info().await {
            metrics::gauge!(telemetry::metrics::CONSUMER_PENDING).set(info.num_pending as f64);
            metrics::gauge!(telemetry::metrics::CONSUMER_ACK_PENDING)
                .set(info.num_ack_pending as f64);
        }
    }
}

/// The redelivery delay after the `failures`-th failed attempt: doubling
/// from `consumer.retry_interval` up to `consumer.retry_backoff_max`, so a
/// long outage is not hammered at a fixed rate.
pub fn redelivery_delay(cfg: &ConsumerConfig, failures: i64) -> Duration {
    let doublings = failures.clamp(1, 32) as u32 - 1;
    cfg.retry_interval
        .saturating_mul(2u32.saturating_pow(doublings))
        .min(cfg.retry_backoff_max.max(cfg.retry_interval))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redelivery_delay_doubles_up_to_the_cap() {
        let cfg = ConsumerConfig {
            retry_interval: Duration::from_secs(5),
            retry_backoff_max: Duration::from_secs(60),
            ..Default::default()
        };
        let delays: Vec<u64> = (1..=6)
            .map(|d| redelivery_delay(&cfg, d).as_secs())
            .collect();
        assert_eq!(delays, vec![5, 10, 20, 40, 60, 60]);
        assert_eq!(redelivery_delay(&cfg, 0), Duration::from_secs(5));
        assert_eq!(redelivery_delay(&cfg, i64::MAX), Duration::from_secs(60));
    }
}
