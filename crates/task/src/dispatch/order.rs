//! Per-session ordering within a pod. Events are handled concurrently, and
//! one event's lookups can finish before an earlier one's; left alone, the
//! later message of a session could reach a gateway first. So each event
//! takes a [`Turn`] for its session when it is received, in arrival order,
//! and writes its pushes to the gateway streams only once the previous
//! event of that session has written its own (lookups still run in
//! parallel; only the hand-over to the streams is ordered, and answers are
//! awaited concurrently). A stream keeps the order it was written in, so a
//! user receives a session's messages in the order this pod received them.
//!
//! Not covered: pushes retried after a failure, and events a second pod
//! received (JetStream spreads one stream over the pods); clients order by
//! `seq_id` for those.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// A session's latest turn: its generation and the signal it sends once
/// it has written its pushes.
type Latest = (u64, oneshot::Receiver<()>);

#[derive(Clone, Default)]
pub struct SessionOrder {
    /// Per session: the generation of its latest turn and the signal that
    /// turn sends once it has written its pushes. Every event hashes its
    /// session id here twice: foldhash (seeded per process), not SipHash.
    latest: Arc<Mutex<foldhash::HashMap<String, Latest>>>,
    generations: Arc<std::sync::atomic::AtomicU64>,
}

impl SessionOrder {
    /// The next turn of `session_id`; call in arrival order.
    pub fn enter(&self, session_id: &str) -> Turn {
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (done, signal) = oneshot::channel();
        let previous = self
            .latest
            .lock()
            .expect("order lock")
            .insert(session_id.to_string(), (generation, signal))
            .map(|(_, signal)| signal);
        Turn {
            previous,
            done: Some(done),
            release: Some(Release {
                order: self.clone(),
                session_id: session_id.to_string(),
                generation,
            }),
        }
    }

    /// Sessions with a turn not yet released (for tests).
    pub fn pending_sessions(&self) -> usize {
        self.latest.lock().expect("order lock").len()
    }
}

struct Release {
    order: SessionOrder,
    session_id: String,
    generation: u64,
}

/// One event's place in its session's order. Dropping it (the event was a
/// duplicate, failed before pushing, or is done) lets the next one go.
#[derive(Default)]
pub struct Turn {
    previous: Option<oneshot::Receiver<()>>,
    done: Option<oneshot::Sender<()>>,
    release: Option<Release>,
}

impl Turn {
    /// A turn that waits for nothing and holds nothing back (retries,
    /// callers without ordering).
    pub fn free() -> Self {
        Self::default()
    }

    /// Waits until the session's previous event has written its pushes.
    pub async fn wait(&mut self) {
        if let Some(previous) = self.previous.take() {
            // An error means the previous turn was dropped: it is done too.
            let _ = previous.await;
        }
    }

    /// This event's pushes are written: the next event may go once the
    /// previous one has gone too. An event that ends without waiting (a
    /// duplicate, a dead letter, a failure before pushing) hands its
    /// predecessor on, so its successor still waits for it.
    pub fn release(&mut self) {
        let done = self.done.take();
        let release = self.release.take();
        let finish = move || {
            if let Some(done) = done {
                let _ = done.send(());
            }
            if let Some(r) = release {
                r.forget();
            }
        };
        match (self.previous.take(), tokio::runtime::Handle::try_current()) {
            (Some(previous), Ok(runtime)) => {
                runtime.spawn(async move {
                    // An error means the previous turn was dropped: done too.
                    let _ = previous.await;
                    finish();
                });
            }
            // No runtime is left to wait on (it is shutting down): nothing
            // is pushed any more either.
            _ => finish(),
        }
    }
}

impl Release {
    /// Drops the session's entry if this turn is still its latest.
    fn forget(self) {
        let mut latest = self.order.latest.lock().expect("order lock");
        if latest
            .get(&self.session_id)
            .is_some_and(|(g, _)| *g == self.generation)
        {
            latest.remove(&self.session_id);
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.release();
    }
}

/// The `session_id` (field 3) of an encoded `PushEvent`, read without
/// decoding the rest, so intake can take turns in arrival order cheaply.
/// Like a full decode, the last occurrence of the field wins; `None` when
/// the payload is malformed or has no session id.
pub fn session_id_of(mut buf: &[u8]) -> Option<&str> {
    use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
    let mut found = None;
    while !buf.is_empty() {
        let (tag, wire_type) = decode_key(&mut buf).ok()?;
        if tag == 3 && wire_type == WireType::LengthDelimited {
            let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
            let value = buf.get(..len)?;
            found = Some(std::str::from_utf8(value).ok()?);
            buf = &buf[len..];
            continue;
        }
        skip_field(wire_type, tag, &mut buf, DecodeContext::default()).ok()?;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::PushEvent;
    use proptest::prelude::*;
    use prost::Message;

    #[tokio::test]
    async fn turns_of_a_session_go_in_order_and_others_do_not_wait() {
        let order = SessionOrder::default();
        let mut first = order.enter("s");
        let mut second = order.enter("s");
        let mut other = order.enter("t");
        other.wait().await;
        first.wait().await;
        let waiting = tokio::spawn(async move {
            second.wait().await;
            second
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "second waits for first");
        first.release();
        let mut second = waiting.await.unwrap();
        second.release();
        other.release();
        assert_eq!(
            order.pending_sessions(),
            0,
            "released sessions are forgotten"
        );
    }

    #[tokio::test]
    async fn a_turn_dropped_before_its_wait_still_holds_the_next_back() {
        let order = SessionOrder::default();
        let mut first = order.enter("s");
        let skipped = order.enter("s");
        let mut third = order.enter("s");
        first.wait().await;
        drop(skipped);
        let waiting = tokio::spawn(async move {
            third.wait().await;
            third
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "third waits for first");
        first.release();
        drop(waiting.await.unwrap());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(order.pending_sessions(), 0);
    }

    #[tokio::test]
    async fn a_dropped_turn_lets_the_next_go() {
        let order = SessionOrder::default();
        let first = order.enter("s");
        let mut second = order.enter("s");
        drop(first);
        second.wait().await;
        drop(second);
        assert_eq!(order.pending_sessions(), 0);
    }

    proptest! {
        #[test]
        fn session_id_is_found_without_decoding(session in ".{0,40}", content in ".{0,100}", msg_id in any::<i64>()) {
            let event = PushEvent {
                msg_id,
                session_id: session.clone(),
                content,
                trace_headers: [("traceparent".to_string(), "x".to_string())].into(),
                ..Default::default()
            };
            let bytes = event.encode_to_vec();
            let expected = (!session.is_empty()).then_some(session.as_str());
            prop_assert_eq!(session_id_of(&bytes), expected);
        }
    }

    #[test]
    fn garbage_has_no_session() {
        assert_eq!(session_id_of(b"\xff\xff\xff"), None);
    }
}
