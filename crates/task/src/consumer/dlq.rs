//! `resonance-task dlq`: inspect and replay dead letters. They live in the
//! dead-letter stream with their original bytes and the headers the
//! consumer wrote (reason, deliveries, last error, time); `replay`
//! publishes them to the input subject again, where the pods pick them up
//! and progress tracking skips recipients an earlier attempt reached.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, stream::Stream};
use prost::Message;
use serde::Serialize;

use crate::clock::now_ms;
use crate::config::ConsumerConfig;
use crate::consumer::dead_letter::{
    HEADER_DELIVERIES, HEADER_LAST_ERROR, HEADER_REASON, HEADER_STREAM_SEQ, HEADER_TIME,
};
use crate::proto::PushEvent;

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("dead-letter stream {stream}: {cause}")]
    Stream {
        stream: String,
        #[source]
        cause: crate::BoxError,
    },
    #[error("dead letter {seq}: {cause}")]
    Message {
        seq: u64,
        #[source]
        cause: crate::BoxError,
    },
    #[error("replaying dead letter {seq} to {subject}: {cause}")]
    Replay {
        seq: u64,
        subject: String,
        #[source]
        cause: crate::BoxError,
    },
}

/// One dead letter as listed.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub seq: u64,
    pub reason: String,
    pub last_error: String,
    pub deliveries: u64,
    /// Sequence in the input stream, when it came from JetStream.
    pub source_seq: Option<u64>,
    pub age_s: Option<u64>,
    /// Set when the payload decodes as a PushEvent.
    pub msg_id: Option<i64>,
    pub session_id: Option<String>,
    pub bytes: usize,
    #[serde(skip)]
    pub payload: bytes::Bytes,
}

#[derive(Debug, Serialize, Default)]
pub struct DlqSummary {
    pub total: usize,
    /// Count per reason, with numbers in it folded so alike reasons group.
    pub by_reason: BTreeMap<String, usize>,
}

/// The dead-letter stream; `None` when it does not exist yet (nothing was
/// ever dead-lettered: the consumer creates it with the first letter).
async fn stream(js: &jetstream::Context, cfg: &ConsumerConfig) -> Result<Option<Stream>, DlqError> {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::GetStreamErrorKind;
    match js.get_stream(&cfg.dead_letter_stream).await {
        Ok(stream) => Ok(Some(stream)),
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) => {
            Ok(None)
        }
        Err(e) => Err(DlqError::Stream {
            stream: cfg.dead_letter_stream.clone(),
            cause: e.into(),
        }),
    }
}

/// Every dead letter still kept, oldest first (none when the dead-letter
/// stream does not exist yet).
pub async fn list(
    js: &jetstream::Context,
    cfg: &ConsumerConfig,
) -> Result<Vec<DeadLetter>, DlqError> {
    let Some(mut stream) = stream(js, cfg).await? else {
        return Ok(Vec::new());
    };
    let state = stream
        .info()
        .await
        .map_err(|e| DlqError::Stream {
            stream: cfg.dead_letter_stream.clone(),
            cause: e.into(),
        })?
        .state
        .clone();
    let mut out = Vec::with_capacity(state.messages as usize);
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        // Replayed letters leave gaps.
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        let header = |name: &str| m.headers.get(name).map(|v| v.as_str().to_string());
        let event = PushEvent::decode(m.payload.as_ref()).ok();
        out.push(DeadLetter {
            seq,
            reason: header(HEADER_REASON).unwrap_or_default(),
            last_error: header(HEADER_LAST_ERROR).unwrap_or_default(),
            deliveries: header(HEADER_DELIVERIES)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            source_seq: header(HEADER_STREAM_SEQ).and_then(|v| v.parse().ok()),
            age_s: header(HEADER_TIME)
                .and_then(|v| v.parse::<i64>().ok())
                .map(|t| ((now_ms() - t).max(0) / 1000) as u64),
            msg_id: event.as_ref().map(|e| e.msg_id),
            session_id: event.map(|e| e.session_id),
            bytes: m.payload.len(),
            payload: m.payload,
        });
    }
    Ok(out)
}

/// Groups reasons that differ only in numbers (counts, ids, durations).
pub fn summarize(letters: &[DeadLetter]) -> DlqSummary {
    let mut by_reason = BTreeMap::new();
    for l in letters {
        let folded: String = l
            .reason
            .split(|c: char| c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("N");
        *by_reason.entry(folded).or_insert(0) += 1;
    }
    DlqSummary {
        total: letters.len(),
        by_reason,
    }
}

/// Which dead letters to replay.
#[derive(Debug, Clone)]
pub enum Selection {
    All,
    Sequences(Vec<u64>),
}

/// Publishes the selected dead letters to the input subject (waiting for
/// the input stream to store each), then removes them from the dead-letter
/// stream unless `keep`. Returns the sequences replayed.
pub async fn replay(
    js: &jetstream::Context,
    cfg: &ConsumerConfig,
    selection: &Selection,
    keep: bool,
) -> Result<Vec<u64>, DlqError> {
    let letters = list(js, cfg).await?;
    let chosen: Vec<&DeadLetter> = match selection {
        Selection::All => letters.iter().collect(),
        Selection::Sequences(seqs) => {
            for seq in seqs {
                if !letters.iter().any(|l| l.seq == *seq) {
                    return Err(DlqError::Message {
                        seq: *seq,
                        cause: "no such dead letter".into(),
                    });
                }
            }
            letters.iter().filter(|l| seqs.contains(&l.seq)).collect()
        }
    };
    let mut replayed = Vec::with_capacity(chosen.len());
    if chosen.is_empty() {
        return Ok(replayed);
    }
    // The letters were read from it, so it exists unless deleted since.
    let Some(stream) = stream(js, cfg).await? else {
        return Ok(replayed);
    };
    for letter in chosen {
        let err = |cause: crate::BoxError| DlqError::Replay {
            seq: letter.seq,
            subject: cfg.topic.clone(),
            cause,
        };
        let ack = js
            .publish(cfg.topic.clone(), letter.payload.clone())
            .await
            .map_err(|e| err(e.into()))?;
        tokio::time::timeout(Duration::from_secs(10), ack)
            .await
            .map_err(|_| err("no ack from the input stream".into()))?
            .map_err(|e| err(e.into()))?;
        if !keep {
            stream
                .delete_message(letter.seq)
                .await
                .map_err(|e| DlqError::Message {
                    seq: letter.seq,
                    cause: e.into(),
                })?;
        }
        replayed.push(letter.seq);
    }
    Ok(replayed)
}

/// Aligned text for `dlq list`.
pub fn to_text(letters: &[DeadLetter]) -> String {
    let mut out = format!(
        "{:>8}  {:>8}  {:>10}  {:>20}  {:<24}  {}\n",
        "seq", "age", "deliveries", "msg_id", "session", "reason"
    );
    for l in letters {
        let age = l.age_s.map_or("-".into(), |a| format!("{a}s"));
        let msg = l.msg_id.map_or("-".into(), |m| m.to_string());
        out.push_str(&format!(
            "{:>8}  {:>8}  {:>10}  {:>20}  {:<24}  {}\n",
            l.seq,
            age,
            l.deliveries,
            msg,
            l.session_id.as_deref().unwrap_or("-"),
            l.reason
        ));
    }
    let summary = summarize(letters);
    out.push_str(&format!("{} dead letters\n", summary.total));
    for (reason, n) in &summary.by_reason {
        out.push_str(&format!("{n:>8}  {reason}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(reason: &str) -> DeadLetter {
        DeadLetter {
            seq: 1,
            reason: reason.into(),
            last_error: String::new(),
            deliveries: 1,
            source_seq: None,
            age_s: None,
            msg_id: None,
            session_id: None,
            bytes: 0,
            payload: bytes::Bytes::new(),
        }
    }

    #[test]
    fn reasons_group_when_only_numbers_differ() {
        let s = summarize(&[
            letter("undecodable PushEvent (5 bytes): x"),
            letter("undecodable PushEvent (17 bytes): x"),
            letter("gave up after 10 deliveries"),
        ]);
        assert_eq!(s.total, 3);
        assert_eq!(s.by_reason.len(), 2);
        assert_eq!(
            s.by_reason.get("undecodable PushEvent (N bytes): x"),
            Some(&2)
        );
    }
}
