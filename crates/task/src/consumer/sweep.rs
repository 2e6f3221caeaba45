//! The last net under the work queue: messages the durable consumer has
//! left behind. In a work-queue stream an acked or terminated message is
//! removed, so a message still stored at or below the consumer's ack floor
//! is one the consumer will never deliver again (nats-server can leave such
//! messages behind after it was killed mid-write). Nobody would deliver
//! them, and nobody would know.
//!
//! Every [`SWEEP_EVERY`], each pod looks for stored messages at or below
//! the ack floor. One found on two sweeps in a row (so the max-deliveries
//! advisory of `dead_letter` had its chance first) is published again to
//! the work-queue subject, with its headers and a `Nats-Msg-Id` that makes
//! racing pods store it once, and then deleted. The handler's own
//! idempotency decides what the copy does: an event that had settled is
//! acked as a duplicate, one that had not pushes only to the recipients it
//! had not reached.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use tokio_util::sync::CancellationToken;

use crate::config::ConsumerConfig;
use crate::telemetry;

/// How often the work queue is swept.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Messages looked at in one sweep at the most.
const MAX_PER_SWEEP: usize = 1000;

/// Sweeps until `stop`.
pub async fn requeue_left_behind(
    js: jetstream::Context,
    cfg: ConsumerConfig,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    let mut seen_before: HashSet<u64> = HashSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let found = match left_behind(&js, &cfg).await {
            Ok(found) => found,
            Err(error) => {
                tracing::debug!(%error, stream = %cfg.stream, "work queue not swept this time");
                continue;
            }
        };
        let mut now_seen = HashSet::new();
        for message in found {
            if !seen_before.contains(&message.sequence) {
                now_seen.insert(message.sequence);
                continue;
            }
            match requeue(&js, &cfg, message).await {
                Ok(sequence) => {
                    metrics::counter!(telemetry::metrics::REQUEUED).increment(1);
                    tracing::warn!(stream = %cfg.stream, sequence, "message left behind by the consumer published again");
                }
                Err(error) => {
                    tracing::warn!(%error, stream = %cfg.stream, "message left behind not requeued yet")
                }
            }
        }
        seen_before = now_seen;
    }
}

type SweepError = Box<dyn std::error::Error + Send + Sync>;

/// Stored messages at or below the consumer's ack floor, oldest first.
async fn left_behind(
    js: &jetstream::Context,
    cfg: &ConsumerConfig,
) -> Result<Vec<jetstream::message::StreamMessage>, SweepError> {
    let mut stream = js.get_stream(&cfg.stream).await?;
    let state = stream.info().await?.state.clone();
    let mut consumer = stream
        .get_consumer::<pull::Config>(&cfg.queue_group)
        .await?;
    let floor = consumer.info().await?.ack_floor.stream_sequence;
    let mut found = Vec::new();
    let mut sequence = state.first_sequence;
    while state.messages > 0 && sequence <= floor && found.len() < MAX_PER_SWEEP {
        match stream
            .get_first_raw_message_by_subject(&cfg.topic, sequence)
            .await
        {
            Ok(m) if m.sequence <= floor => {
                sequence = m.sequence + 1;
                found.push(m);
            }
            _ => break,
        }
    }
    Ok(found)
}

/// Publishes `message` to the work-queue subject again and deletes the
/// stored original; returns its old sequence.
async fn requeue(
    js: &jetstream::Context,
    cfg: &ConsumerConfig,
    message: jetstream::message::StreamMessage,
) -> Result<u64, SweepError> {
    let mut headers = message.headers.clone();
    let id = format!(
        "requeue-{}-{}-{}",
        cfg.stream,
        message.sequence,
        message.time.unix_timestamp_nanos()
    );
    headers.insert("Nats-Msg-Id", id.as_str());
    js.publish_with_headers(cfg.topic.clone(), headers, message.payload.clone())
        .await?
        .await?;
    let stream = js.get_stream(&cfg.stream).await?;
    stream.delete_message(message.sequence).await?;
    Ok(message.sequence)
}
