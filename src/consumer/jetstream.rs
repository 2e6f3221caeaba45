//! Durable intake: a JetStream stream bound to `consumer.topic` captures the
//! publishers' plain core-NATS publishes, and one durable pull consumer
//! (named after `consumer.queue_group`) shared by every pod is the queue
//! group. Each pod keeps `consumer.worker_count` events in flight. A message
//! is acked only after its fan-out settled, nak'ed with a delay on a
//! transient failure, and dead-lettered then terminated when it can never
//! succeed or ran out of deliveries.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind, stream};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dead_letter::{self, DeadLetterInfo};
use super::lanes::LaneQueue;
use super::{Attempt, Decision, Handle};
use crate::backoff::Backoff;
use crate::config::ConsumerConfig;
use crate::dispatch::Turn;
use crate::telemetry::{self, admin::Readiness};

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("JetStream stream {stream}: {detail}")]
    Stream { stream: String, detail: String },
    #[error("JetStream consumer {consumer} on {stream}: {detail}")]
    Consumer {
        stream: String,
        consumer: String,
        detail: String,
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
        max_deliver: cfg.max_deliver,
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
    let stream_err = |detail: String| IntakeError::Stream {
        stream: cfg.stream.clone(),
        detail,
    };
    let mut stream = js
        .get_or_create_stream(stream::Config {
            name: cfg.stream.clone(),
            subjects: vec![cfg.topic.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_age: cfg.stream_max_age,
            ..Default::default()
        })
        .await
        .map_err(|e| stream_err(e.to_string()))?;
    let subjects = stream
        .info()
        .await
        .map_err(|e| stream_err(e.to_string()))?
        .config
        .subjects
        .clone();
    if !subjects.iter().any(|s| s == &cfg.topic) {
        return Err(stream_err(format!(
            "exists but captures {subjects:?}, not consumer.topic `{}`",
            cfg.topic
        )));
    }
    dead_letter::ensure_stream(js, cfg).await?;

    let consumer_err = |detail: String| IntakeError::Consumer {
        stream: cfg.stream.clone(),
        consumer: cfg.queue_group.clone(),
        detail,
    };
    let wanted = consumer_config(cfg);
    let mut consumer: PullConsumer = stream
        .get_or_create_consumer(&cfg.queue_group, wanted.clone())
        .await
        .map_err(|e| consumer_err(e.to_string()))?;
    let current = consumer
        .info()
        .await
        .map_err(|e| consumer_err(e.to_string()))?
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
            .map_err(|e| consumer_err(e.to_string()))?;
    }
    Ok(consumer)
}

/// Most messages asked for in one pull request.
const MAX_BATCH: usize = 256;
/// How long one pull request stays open when fewer messages are waiting,
/// and the idle heartbeat that detects a dead pull meanwhile (the server
/// requires it to be at most half the expiry).
const PULL_EXPIRES: Duration = Duration::from_secs(10);
const PULL_HEARTBEAT: Duration = Duration::from_secs(3);

/// Cancellation of the intake, in two steps.
#[derive(Clone)]
pub struct Shutdown {
    /// Stop pulling; events in flight finish.
    pub stop: CancellationToken,
    /// The grace period is over: nak what is still in flight so another pod
    /// takes it at once.
    pub abort: CancellationToken,
    /// `consumer_bound` is kept current here.
    pub readiness: Arc<Readiness>,
}

/// Pulls and handles events until `shutdown.stop` fires. Up to `prefetch`
/// pulled messages wait in priority lanes (`lanes`) for one of
/// `worker_count` workers, high lane first; while they wait they get
/// in-progress acks so ack_wait does not hand them to another pod. On stop,
/// what waits is nak'ed at once. Connection trouble is retried with
/// backoff; events in flight are handled on `tracker`.
pub async fn run<H: Handle>(
    client: async_nats::Client,
    cfg: ConsumerConfig,
    handler: Arc<H>,
    shutdown: Shutdown,
    tracker: TaskTracker,
    prefetch: usize,
) {
    let prefetch = prefetch.max(1);
    let js = jetstream::new(client);
    let workers = Arc::new(Semaphore::new(cfg.worker_count));
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let stop = &shutdown.stop;
    while !stop.is_cancelled() {
        let consumer = match ensure(&js, &cfg).await {
            Ok(c) => c,
            Err(error) => {
                Readiness::set(&shutdown.readiness.consumer_bound, false);
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in = ?delay, "JetStream intake not ready");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        tracing::info!(stream = %cfg.stream, consumer = %cfg.queue_group, topic = %cfg.topic, "consuming");
        Readiness::set(&shutdown.readiness.consumer_bound, true);
        let bound = stop.child_token();
        tokio::spawn(report_lag(consumer.clone(), bound.clone()));
        let _unbind = bound.drop_guard();
        let pulled = consumer
            .stream()
            .max_messages_per_batch(prefetch.clamp(cfg.worker_count.min(MAX_BATCH), MAX_BATCH))
            .heartbeat(PULL_HEARTBEAT)
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        let mut messages = match pulled {
            Ok(m) => m,
            Err(error) => {
                tracing::warn!(%error, "JetStream pull failed; re-binding the consumer");
                Readiness::set(&shutdown.readiness.consumer_bound, false);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                }
            }
        };
        backoff.reset();
        let mut waiting: LaneQueue<jetstream::Message> = LaneQueue::default();
        let mut keep_alive = tokio::time::interval(cfg.ack_wait / 3);
        loop {
            // A free worker takes the next waiting event; meanwhile pulled
            // messages join the lanes until `prefetch` wait.
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                permit = workers.clone().acquire_owned(), if !waiting.is_empty() => {
                    let permit = permit.expect("semaphore is never closed");
                    let next = waiting.pop().expect("lanes are not empty");
                    report_lanes(&waiting);
                    let message = next.item;
                    let turn = handler.turn(&message.payload);
                    let (handler, js, cfg, abort) = (
                        handler.clone(),
                        js.clone(),
                        cfg.clone(),
                        shutdown.abort.clone(),
                    );
                    let in_flight = metrics::gauge!(telemetry::metrics::EVENTS_IN_FLIGHT);
                    in_flight.increment(1.0);
                    tracker.spawn(async move {
                        settle(&js, &cfg, handler.as_ref(), message, &abort, turn).await;
                        in_flight.decrement(1.0);
                        drop(permit);
                    });
                }
                next = messages.next(), if waiting.len() < prefetch => match next {
                    Some(Ok(message)) => {
                        let lane = handler.lane(message.headers.as_ref(), &message.payload);
                        metrics::counter!(telemetry::metrics::LANE_EVENTS, "lane" => lane.as_str()).increment(1);
                        let session = handler.session_of(&message.payload);
                        waiting.push(message, session, lane);
                        report_lanes(&waiting);
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "JetStream pull broke; re-binding the consumer");
                        Readiness::set(&shutdown.readiness.consumer_bound, false);
                        break;
                    }
                    None => {
                        tracing::warn!("JetStream message stream ended; re-binding the consumer");
                        break;
                    }
                },
                _ = keep_alive.tick() => {
                    let old = cfg.ack_wait / 3;
                    for queued in waiting.iter().filter(|q| q.since.elapsed() >= old) {
                        if let Err(e) = queued.item.ack_with(AckKind::Progress).await {
                            tracing::debug!(error = %e, "in-progress ack for a waiting event not sent");
                        }
                    }
                }
            }
        }
        // Waiting events go back at once, to another pod.
        for queued in waiting.drain() {
            let _ = queued.item.ack_with(AckKind::Nak(None)).await;
        }
        report_lanes(&waiting);
        if stop.is_cancelled() {
            hand_back_prefetched(&mut messages).await;
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

fn report_lanes<T>(waiting: &LaneQueue<T>) {
    for lane in [super::Lane::High, super::Lane::Normal] {
        metrics::gauge!(telemetry::metrics::LANE_QUEUED, "lane" => lane.as_str())
            .set(waiting.len_of(lane) as f64);
    }
}

/// Messages the client already pulled but no worker took: nak them so
/// another pod gets them now, not after ack_wait. Pulls still open may
/// deliver a few more; those are nak'ed as they come until it is quiet.
async fn hand_back_prefetched<S>(messages: &mut S)
where
    S: futures::Stream<
            Item = Result<jetstream::Message, async_nats::jetstream::consumer::pull::MessagesError>,
        > + Unpin,
{
    let mut handed_back = 0;
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_millis(200), messages.next()).await
    {
        let _ = message.ack_with(AckKind::Nak(None)).await;
        handed_back += 1;
    }
    if handed_back > 0 {
        tracing::info!(handed_back, "prefetched events handed back on shutdown");
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

/// The redelivery delay after the `delivery`-th attempt failed: doubling
/// from `consumer.retry_interval` up to `consumer.retry_backoff_max`, so a
/// long outage is not hammered at a fixed rate.
pub fn redelivery_delay(cfg: &ConsumerConfig, delivery: i64) -> Duration {
    let doublings = delivery.clamp(1, 32) as u32 - 1;
    cfg.retry_interval
        .saturating_mul(2u32.saturating_pow(doublings))
        .min(cfg.retry_backoff_max.max(cfg.retry_interval))
}

async fn settle<H: Handle>(
    js: &jetstream::Context,
    cfg: &ConsumerConfig,
    handler: &H,
    message: jetstream::Message,
    abort: &CancellationToken,
    turn: Turn,
) {
    let (delivery, stream_sequence) = match message.info() {
        Ok(info) => (info.delivered, Some(info.stream_sequence)),
        Err(_) => (1, None),
    };
    let attempt = Attempt {
        delivery,
        max_deliver: cfg.max_deliver,
    };
    // A long fan-out tells JetStream it is still working, so ack_wait does
    // not hand the event to a second pod meanwhile.
    let mut in_progress = tokio::time::interval(cfg.ack_wait / 3);
    in_progress.tick().await;
    let handling = handler.handle(
        &message.payload,
        message.headers.as_ref(),
        attempt,
        abort,
        turn,
    );
    tokio::pin!(handling);
    let decision = loop {
        tokio::select! {
            d = &mut handling => break d,
            _ = in_progress.tick() => {
                if let Err(e) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %e, stream_sequence, "in-progress ack not sent");
                }
            }
        }
    };
    let decision = match decision {
        Decision::Retry { reason, .. } => Decision::Retry {
            delay: redelivery_delay(cfg, delivery),
            reason,
        },
        Decision::DeadLetter { reason, last_error } => {
            let info = DeadLetterInfo {
                reason: &reason,
                last_error: &last_error,
                deliveries: delivery,
                stream_sequence,
                subject: message.subject.as_str(),
            };
            match dead_letter::publish(js, &cfg.dead_letter_topic, message.payload.clone(), &info)
                .await
            {
                Ok(()) => Decision::DeadLetter { reason, last_error },
                Err(e) => {
                    tracing::error!(error = %e, stream_sequence, "dead letter not stored; the event will be redelivered");
                    Decision::Retry {
                        delay: cfg.retry_interval,
                        reason: e.to_string(),
                    }
                }
            }
        }
        d => d,
    };
    let kind = match &decision {
        Decision::Ack | Decision::Duplicate => AckKind::Ack,
        Decision::Retry { delay, .. } => AckKind::Nak(Some(*delay)),
        Decision::HandBack => AckKind::Nak(None),
        Decision::DeadLetter { .. } => AckKind::Term,
    };
    // A lost ack means a redelivery, which progress tracking makes safe.
    if let Err(e) = message.ack_with(kind).await {
        tracing::warn!(error = %e, stream_sequence, ?kind, "ack not sent; the event will be redelivered");
    }
    handler.decided(&decision);
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
