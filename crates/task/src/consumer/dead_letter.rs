//! The dead-letter subject: events that can never succeed are published
//! there with their original bytes and headers saying why, kept in a
//! JetStream stream for inspection and replay, then terminated on the input.
//!
//! A net for what nobody foresaw: when JetStream itself stops redelivering
//! a message (it reached `consumer.delivery_ceiling`), the message would
//! stay in the work queue with nobody to deliver it. [`rescue_exhausted`]
//! follows JetStream's max-deliveries advisories and moves each such
//! message, read by its stream sequence, to the dead letters with reason
//! `max deliveries reached`, then deletes it from the work queue.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::ConsumerConfig;
use crate::retry::{Backoff, pause_for};
use crate::telemetry;

/// Why the event was dead-lettered.
pub const HEADER_REASON: &str = "Resonance-Dead-Reason";
/// How many times it had been delivered.
pub const HEADER_DELIVERIES: &str = "Resonance-Dead-Deliveries";
/// Its sequence in the input stream (absent in core mode).
pub const HEADER_STREAM_SEQ: &str = "Resonance-Dead-Stream-Seq";
/// The subject it was consumed from.
pub const HEADER_SUBJECT: &str = "Resonance-Dead-Subject";
/// The last error seen while handling it.
pub const HEADER_LAST_ERROR: &str = "Resonance-Dead-Last-Error";
/// When it was dead-lettered (unix milliseconds).
pub const HEADER_TIME: &str = "Resonance-Dead-Time";

/// The reason of a message JetStream stopped redelivering.
pub const MAX_DELIVERIES_REACHED: &str = "max deliveries reached";

/// Dead letters are kept this long.
pub const RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("ensuring dead-letter stream {stream}: {cause}")]
    Stream {
        stream: String,
        #[source]
        cause: crate::BoxError,
    },
    #[error("publishing to dead-letter subject {subject}: {cause}")]
    Publish {
        subject: String,
        #[source]
        cause: crate::BoxError,
    },
    #[error("moving message {sequence} of stream {stream} to the dead letters: {cause}")]
    Move {
        stream: String,
        sequence: u64,
        #[source]
        cause: crate::BoxError,
    },
}

/// What is known about a dead letter besides its bytes.
#[derive(Debug, Clone)]
pub struct DeadLetterInfo<'a> {
    pub reason: &'a str,
    pub last_error: &'a str,
    pub deliveries: i64,
    pub stream_sequence: Option<u64>,
    pub subject: &'a str,
}

fn headers(info: &DeadLetterInfo<'_>) -> HeaderMap {
    // Header values are single lines of bounded length.
    let line = |v: &str| -> String { v.replace(['\r', '\n'], " ").chars().take(1024).collect() };
    let mut h = HeaderMap::new();
    h.insert(HEADER_REASON, line(info.reason).as_str());
    h.insert(HEADER_LAST_ERROR, line(info.last_error).as_str());
    h.insert(HEADER_TIME, crate::clock::now_ms().to_string().as_str());
    h.insert(HEADER_DELIVERIES, info.deliveries.to_string().as_str());
    h.insert(HEADER_SUBJECT, info.subject);
    if let Some(seq) = info.stream_sequence {
        h.insert(HEADER_STREAM_SEQ, seq.to_string().as_str());
    }
    h
}

/// Makes sure the dead-letter stream exists.
pub async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &ConsumerConfig,
) -> Result<(), DeadLetterError> {
    crate::streams::ensure(
        js,
        stream::Config {
            name: cfg.dead_letter_stream.clone(),
            subjects: vec![cfg.dead_letter_topic.clone()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: RETENTION,
            ..Default::default()
        },
        &crate::streams::Replication::of(cfg),
    )
    .await
    .map_err(|e| DeadLetterError::Stream {
        stream: cfg.dead_letter_stream.clone(),
        cause: e.into(),
    })?;
    Ok(())
}

/// Publishes a dead letter and waits until the stream has stored it.
pub async fn publish(
    js: &jetstream::Context,
    subject: &str,
    payload: Bytes,
    info: &DeadLetterInfo<'_>,
) -> Result<(), DeadLetterError> {
    let err = |cause: crate::BoxError| DeadLetterError::Publish {
        subject: subject.to_string(),
        cause,
    };
    js.publish_with_headers(subject.to_string(), headers(info), payload)
        .await
        .map_err(|e| err(e.into()))?
        .await
        .map_err(|e| err(e.into()))?;
    Ok(())
}

/// What a max-deliveries advisory says (the fields used here).
#[derive(Debug, serde::Deserialize)]
struct MaxDeliveries {
    stream_seq: u64,
    deliveries: i64,
}

/// Attempts to move one exhausted message before leaving it to the log.
const RESCUE_TRIES: u32 = 8;

/// Follows `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`
/// until `stop`, as a queue group of the pods (one pod takes each
/// advisory), and moves every message it names to the dead letters.
pub async fn rescue_exhausted(
    js: jetstream::Context,
    cfg: ConsumerConfig,
    stop: CancellationToken,
) {
    let subject = format!(
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
        cfg.stream, cfg.queue_group
    );
    let client = js.client();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let subscribed = tokio::select! {
            _ = stop.cancelled() => return,
            s = client.queue_subscribe(subject.clone(), cfg.queue_group.clone()) => s,
        };
        let mut advisories = match subscribed {
            Ok(s) => s,
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, %subject, retry_in = ?delay, "cannot follow max-deliveries advisories");
                if pause_for(&stop, delay).await {
                    continue;
                }
                return;
            }
        };
        backoff.reset();
        loop {
            let advisory = tokio::select! {
                _ = stop.cancelled() => return,
                a = advisories.next() => match a {
                    Some(a) => a,
                    None => break,
                },
            };
            match serde_json::from_slice::<MaxDeliveries>(&advisory.payload) {
                Ok(advisory) => rescue(&js, &cfg, &advisory, &stop).await,
                Err(error) => {
                    tracing::warn!(%error, %subject, "unreadable max-deliveries advisory ignored")
                }
            }
        }
    }
}

async fn rescue(
    js: &jetstream::Context,
    cfg: &ConsumerConfig,
    advisory: &MaxDeliveries,
    stop: &CancellationToken,
) {
    let sequence = advisory.stream_seq;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    for _ in 0..RESCUE_TRIES {
        match move_to_dead_letters(js, cfg, advisory).await {
            Ok(true) => {
                metrics::counter!(telemetry::metrics::MAX_DELIVERIES_RESCUED).increment(1);
                tracing::warn!(
                    stream = %cfg.stream,
                    sequence,
                    deliveries = advisory.deliveries,
                    "JetStream stopped redelivering a message; moved to the dead letters"
                );
                return;
            }
            Ok(false) => {
                tracing::debug!(stream = %cfg.stream, sequence, "exhausted message already gone");
                return;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in = ?delay, "exhausted message not moved yet");
                if !pause_for(stop, delay).await {
                    return;
                }
            }
        }
    }
    tracing::error!(stream = %cfg.stream, sequence, "exhausted message left in the work queue: move it with `dlq` tools or raise consumer.delivery_ceiling");
}

/// Copies the message to the dead letters, then deletes it from the work
/// queue; `false` when it is no longer there (acked meanwhile).
async fn move_to_dead_letters(
    js: &jetstream::Context,
    cfg: &ConsumerConfig,
    advisory: &MaxDeliveries,
) -> Result<bool, DeadLetterError> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let sequence = advisory.stream_seq;
    let err = |cause: crate::BoxError| DeadLetterError::Move {
        stream: cfg.stream.clone(),
        sequence,
        cause,
    };
    let stream = js
        .get_stream(&cfg.stream)
        .await
        .map_err(|e| err(e.into()))?;
    let message = match stream.get_raw_message(sequence).await {
        Ok(m) => m,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(false),
        Err(e) => return Err(err(e.into())),
    };
    ensure_stream(js, cfg).await?;
    let last_error = format!(
        "JetStream stopped redelivering it after {} deliveries (consumer.delivery_ceiling)",
        advisory.deliveries
    );
    let info = DeadLetterInfo {
        reason: MAX_DELIVERIES_REACHED,
        last_error: &last_error,
        deliveries: advisory.deliveries,
        stream_sequence: Some(sequence),
        subject: message.subject.as_str(),
    };
    publish(js, &cfg.dead_letter_topic, message.payload, &info).await?;
    stream
        .delete_message(sequence)
        .await
        .map_err(|e| err(e.into()))?;
    Ok(true)
}

/// Core mode: fire-and-forget publish (the legacy path has no stream).
pub async fn publish_core(
    client: &async_nats::Client,
    subject: &str,
    payload: Bytes,
    info: &DeadLetterInfo<'_>,
) -> Result<(), DeadLetterError> {
    client
        .publish_with_headers(subject.to_string(), headers(info), payload)
        .await
        .map_err(|e| DeadLetterError::Publish {
            subject: subject.to_string(),
            cause: e.into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_carry_the_reason_on_one_line() {
        let h = headers(&DeadLetterInfo {
            reason: "bad\nthing",
            last_error: "timeout",
            deliveries: 3,
            stream_sequence: Some(42),
            subject: "resonance.push.event.v1",
        });
        assert_eq!(h.get(HEADER_REASON).unwrap().as_str(), "bad thing");
        assert_eq!(h.get(HEADER_LAST_ERROR).unwrap().as_str(), "timeout");
        assert_eq!(h.get(HEADER_DELIVERIES).unwrap().as_str(), "3");
        assert_eq!(h.get(HEADER_STREAM_SEQ).unwrap().as_str(), "42");
        assert_eq!(
            h.get(HEADER_SUBJECT).unwrap().as_str(),
            "resonance.push.event.v1"
        );
    }
}
