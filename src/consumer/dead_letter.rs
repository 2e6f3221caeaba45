//! The dead-letter subject: events that can never succeed are published
//! there with their original bytes and headers saying why, kept in a
//! JetStream stream for inspection and replay, then terminated on the input.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;

use crate::config::ConsumerConfig;

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

/// Dead letters are kept this long.
const RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("ensuring dead-letter stream {stream}: {detail}")]
    Stream { stream: String, detail: String },
    #[error("publishing to dead-letter subject {subject}: {detail}")]
    Publish { subject: String, detail: String },
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
    h.insert(HEADER_TIME, crate::tools::now_ms().to_string().as_str());
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
    js.get_or_create_stream(stream::Config {
        name: cfg.dead_letter_stream.clone(),
        subjects: vec![cfg.dead_letter_topic.clone()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: RETENTION,
        ..Default::default()
    })
    .await
    .map_err(|e| DeadLetterError::Stream {
        stream: cfg.dead_letter_stream.clone(),
        detail: e.to_string(),
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
    let err = |e: &dyn std::fmt::Display| DeadLetterError::Publish {
        subject: subject.to_string(),
        detail: e.to_string(),
    };
    js.publish_with_headers(subject.to_string(), headers(info), payload)
        .await
        .map_err(|e| err(&e))?
        .await
        .map_err(|e| err(&e))?;
    Ok(())
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
            detail: e.to_string(),
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
