//! Matching gateway responses to the callers that sent the requests.
//!
//! `PushService` ([`InFlight`]): responses carry no username and msg_id
//! repeats across recipients, so the only key is order: the n-th response on
//! a stream answers the n-th request. Requests are queued in the order they
//! are written, grouped by caller; responses fill the oldest group first.
//!
//! batch-v1 ([`Batches`]): one request per caller, answered by a response
//! that echoes its `batch_id` and lists the recipients not delivered, in any
//! order.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::time::Instant;

use super::{FailureKind, PushFailure, PushOutcome, PushReply};
use crate::proto::{PushBatchResponse, PushMessageResponse};

/// What a stream keeps about the requests it has written and not yet seen
/// answered.
pub(crate) trait Tracker: Default + Send {
    type Response;

    /// Records an answer; replies to its caller once the caller's requests
    /// are all answered.
    fn answer(&mut self, response: Self::Response) -> Result<(), Unexpected>;

    fn is_empty(&self) -> bool;

    /// The deadline of the oldest unanswered request.
    fn oldest_deadline(&self) -> Option<Instant>;

    /// Fails every unanswered recipient; answers already received stand.
    fn fail_all(&mut self, failure: &PushFailure);
}

/// One caller's recipients and the channel that answers it. Dropped
/// unanswered (its stream task ended, or the runtime is shutting down), it
/// answers every recipient not yet answered as failed, so no recipient is
/// ever silently lost.
pub(crate) struct Pending {
    recipients: Vec<String>,
    outcomes: Vec<PushOutcome>,
    reply: Option<oneshot::Sender<PushReply>>,
    gateway_id: Arc<str>,
    /// The stream window share, handed to the reply.
    window: Option<OwnedSemaphorePermit>,
}

impl Pending {
    pub(crate) fn new(
        recipients: Vec<String>,
        reply: oneshot::Sender<PushReply>,
        gateway_id: Arc<str>,
    ) -> Self {
        Self {
            outcomes: Vec::with_capacity(recipients.len()),
            recipients,
            reply: Some(reply),
            gateway_id,
            window: None,
        }
    }

    pub(crate) fn recipients(&self) -> &[String] {
        &self.recipients
    }

    fn send(mut self) {
        if let Some(reply) = self.reply.take() {
            // The caller may have stopped waiting; its answer is then moot.
            let _ = reply.send(PushReply {
                recipients: std::mem::take(&mut self.recipients),
                outcomes: std::mem::take(&mut self.outcomes),
                window: self.window.take().map(super::InFlightShare),
            });
        }
    }

    /// Answers every recipient not answered yet with `failure`.
    pub(crate) fn fail_rest(mut self, failure: &PushFailure) {
        let missing = self.recipients.len() - self.outcomes.len();
        self.outcomes.extend(std::iter::repeat_n(
            PushOutcome::Failed(failure.clone()),
            missing,
        ));
        self.send();
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.reply.is_some() {
            let failure = PushFailure {
                kind: FailureKind::Closed,
                gateway_id: self.gateway_id.clone(),
                detail: "push dropped unanswered".into(),
            };
            let missing = self.recipients.len() - self.outcomes.len();
            self.outcomes
                .extend(std::iter::repeat_n(PushOutcome::Failed(failure), missing));
            if let Some(reply) = self.reply.take() {
                let _ = reply.send(PushReply {
                    recipients: std::mem::take(&mut self.recipients),
                    outcomes: std::mem::take(&mut self.outcomes),
                    window: self.window.take().map(super::InFlightShare),
                });
            }
        }
    }
}

/// The requests of one caller on a stream, answered together.
pub(crate) struct Group {
    pending: Pending,
    pub(crate) deadline: Instant,
    /// The msg_id every answer must echo (per-user `PushService`).
    msg_id: Option<i64>,
}

impl Group {
    pub(crate) fn new(
        pending: Pending,
        deadline: Instant,
        permits: Option<OwnedSemaphorePermit>,
    ) -> Self {
        let mut pending = pending;
        pending.window = permits;
        Self {
            pending,
            deadline,
            msg_id: None,
        }
    }

    /// Answers to this group must echo `msg_id`.
    pub(crate) fn for_message(mut self, msg_id: i64) -> Self {
        self.msg_id = Some(msg_id);
        self
    }

    fn send(self) {
        self.pending.send();
    }

    fn fail_rest(self, failure: &PushFailure) {
        self.pending.fail_rest(failure);
    }
}

/// A response arrived with no request waiting for it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Unexpected;

/// Per-user `PushService`: answers matched by order.
#[derive(Default)]
pub(crate) struct InFlight {
    groups: VecDeque<Group>,
}

impl InFlight {
    pub(crate) fn push(&mut self, group: Group) {
        if group.pending.recipients.is_empty() {
            group.send();
            return;
        }
        self.groups.push_back(group);
    }
}

impl InFlight {
    /// Records the outcome of the oldest unanswered request.
    pub(crate) fn record(&mut self, outcome: PushOutcome) -> Result<(), Unexpected> {
        let group = &mut self.groups.front_mut().ok_or(Unexpected)?.pending;
        group.outcomes.push(outcome);
        if group.outcomes.len() == group.recipients.len() {
            self.groups.pop_front().expect("front exists").send();
        }
        Ok(())
    }
}

impl Tracker for InFlight {
    type Response = PushMessageResponse;

    /// Empty `error` means delivered; anything else, not connected there.
    /// An answer that echoes another msg_id than the oldest request's is
    /// unexpected: matched by position, it would shift outcomes onto other
    /// recipients, so the stream is torn down instead.
    fn answer(&mut self, response: PushMessageResponse) -> Result<(), Unexpected> {
        let expected = self.groups.front().ok_or(Unexpected)?.msg_id;
        if expected.is_some_and(|id| id != response.msg_id) {
            return Err(Unexpected);
        }
        self.record(if response.error.is_empty() {
            PushOutcome::Delivered
        } else {
            PushOutcome::NotConnected(response.error)
        })
    }

    fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    fn oldest_deadline(&self) -> Option<Instant> {
        self.groups.front().map(|g| g.deadline)
    }

    fn fail_all(&mut self, failure: &PushFailure) {
        for group in self.groups.drain(..) {
            group.fail_rest(failure);
        }
    }
}

/// batch-v1: answers matched by batch id.
#[derive(Default)]
pub(crate) struct Batches {
    next_id: u64,
    /// Hashed at every write, answer and expiry check: foldhash, not
    /// SipHash.
    pending: foldhash::HashMap<u64, Group>,
    /// Batch ids in the order written (deadlines ascend along it); ids
    /// already answered are skipped lazily.
    order: VecDeque<u64>,
}

impl Batches {
    /// Registers a batch and returns the id its request must carry.
    pub(crate) fn push(&mut self, group: Group) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.pending.insert(id, group);
        self.order.push_back(id);
        id
    }

    fn skip_answered(&mut self) {
        while let Some(id) = self.order.front() {
            if self.pending.contains_key(id) {
                break;
            }
            self.order.pop_front();
        }
    }
}

impl Tracker for Batches {
    type Response = PushBatchResponse;

    fn answer(&mut self, response: PushBatchResponse) -> Result<(), Unexpected> {
        let mut group = self.pending.remove(&response.batch_id).ok_or(Unexpected)?;
        let pending = &mut group.pending;
        pending
            .outcomes
            .resize(pending.recipients.len(), PushOutcome::Delivered);
        if !response.failed.is_empty() {
            let index: HashMap<&str, usize> = pending
                .recipients
                .iter()
                .enumerate()
                .map(|(i, u)| (u.as_str(), i))
                .collect();
            for failure in response.failed {
                if let Some(&i) = index.get(failure.username.as_str()) {
                    pending.outcomes[i] = PushOutcome::NotConnected(failure.reason);
                }
            }
        }
        group.send();
        self.skip_answered();
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn oldest_deadline(&self) -> Option<Instant> {
        let id = self.order.iter().find(|id| self.pending.contains_key(id))?;
        self.pending.get(id).map(|g| g.deadline)
    }

    fn fail_all(&mut self, failure: &PushFailure) {
        self.order.clear();
        for (_, group) in self.pending.drain() {
            group.fail_rest(failure);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn group(n: usize) -> (Group, oneshot::Receiver<PushReply>) {
        let (tx, rx) = oneshot::channel();
        let recipients = (0..n).map(|i| format!("u{i}")).collect();
        let pending = Pending::new(recipients, tx, "g".into());
        (Group::new(pending, Instant::now(), None), rx)
    }

    fn outcome(i: usize) -> PushOutcome {
        if i.is_multiple_of(3) {
            PushOutcome::NotConnected(format!("r{i}"))
        } else {
            PushOutcome::Delivered
        }
    }

    #[test]
    fn a_push_dropped_unanswered_answers_itself_as_failed() {
        let (g, mut rx) = group(3);
        let mut inflight = InFlight::default();
        inflight.push(g);
        inflight.record(PushOutcome::Delivered).unwrap();
        drop(inflight);
        let reply = rx.try_recv().expect("answered on drop");
        assert_eq!(reply.recipients, ["u0", "u1", "u2"]);
        assert_eq!(reply.outcomes[0], PushOutcome::Delivered);
        for o in &reply.outcomes[1..] {
            assert!(matches!(o, PushOutcome::Failed(f) if f.kind == FailureKind::Closed));
        }
    }

    #[test]
    fn an_answer_for_another_message_is_unexpected() {
        let (g, _rx) = group(2);
        let mut inflight = InFlight::default();
        inflight.push(g.for_message(7));
        let answer = |msg_id| PushMessageResponse {
            msg_id,
            ..Default::default()
        };
        assert!(inflight.answer(answer(7)).is_ok());
        assert_eq!(inflight.answer(answer(8)), Err(Unexpected));
    }

    proptest! {
        /// Whatever the group sizes, each caller gets exactly its own
        /// answers, in the order its requests were written.
        #[test]
        fn answers_reach_their_callers_in_order(sizes in proptest::collection::vec(0usize..20, 1..30)) {
            let mut inflight = InFlight::default();
            let mut receivers = Vec::new();
            for &n in &sizes {
                let (g, rx) = group(n);
                inflight.push(g);
                receivers.push(rx);
            }
            let total: usize = sizes.iter().sum();
            for i in 0..total {
                prop_assert!(inflight.record(outcome(i)).is_ok());
            }
            prop_assert!(inflight.is_empty());
            prop_assert_eq!(inflight.record(PushOutcome::Delivered), Err(Unexpected));
            let mut i = 0;
            for (rx, &n) in receivers.iter_mut().zip(&sizes) {
                let got = rx.try_recv().expect("answered");
                let want: Vec<_> = (i..i + n).map(outcome).collect();
                prop_assert_eq!(got.recipients.len(), n);
                prop_assert_eq!(got.outcomes, want);
                i += n;
            }
        }

        /// A broken stream keeps the answers that arrived and fails the rest.
        #[test]
        fn failure_fills_only_the_unanswered(sizes in proptest::collection::vec(1usize..10, 1..10), answered in 0usize..50) {
            let mut inflight = InFlight::default();
            let mut receivers = Vec::new();
            for &n in &sizes {
                let (g, rx) = group(n);
                inflight.push(g);
                receivers.push(rx);
            }
            let total: usize = sizes.iter().sum();
            let answered = answered.min(total);
            for i in 0..answered {
                inflight.record(outcome(i)).unwrap();
            }
            let failure = PushFailure::new(FailureKind::StreamBroken, "g", "reset");
            inflight.fail_all(&failure);
            let all: Vec<PushOutcome> = receivers.iter_mut().flat_map(|rx| rx.try_recv().unwrap().outcomes).collect();
            prop_assert_eq!(all.len(), total);
            for (i, o) in all.iter().enumerate() {
                if i < answered {
                    prop_assert_eq!(o, &outcome(i));
                } else {
                    prop_assert_eq!(o, &PushOutcome::Failed(failure.clone()));
                }
            }
        }

        /// Batches answered in any order, each naming some recipients as not
        /// delivered: every caller gets its own recipients back with exactly
        /// those marked, the rest delivered, in the order it sent them.
        #[test]
        fn batch_answers_match_by_id_in_any_order(
            sizes in proptest::collection::vec(1usize..12, 1..20),
            seed in any::<u64>(),
        ) {
            use crate::proto::RecipientFailure;
            use rand::{SeedableRng, seq::SliceRandom};
            let mut batches = Batches::default();
            let mut pending = Vec::new();
            for &n in &sizes {
                let (g, rx) = group(n);
                let id = batches.push(g);
                pending.push((id, n, rx));
            }
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut order: Vec<usize> = (0..pending.len()).collect();
            order.shuffle(&mut rng);
            for &k in &order {
                let (id, n, _) = &pending[k];
                let failed = (0..*n)
                    .filter(|i| (i + k).is_multiple_of(3))
                    .map(|i| RecipientFailure { username: format!("u{i}"), reason: format!("r{i}") })
                    .collect();
                let response = PushBatchResponse { batch_id: *id, failed };
                prop_assert!(batches.answer(response).is_ok());
            }
            prop_assert!(batches.is_empty());
            prop_assert_eq!(batches.oldest_deadline(), None);
            let stray = PushBatchResponse { batch_id: 1, failed: vec![] };
            prop_assert_eq!(batches.answer(stray), Err(Unexpected));
            for (k, (_, n, rx)) in pending.iter_mut().enumerate() {
                let got = rx.try_recv().expect("answered");
                prop_assert_eq!(got.recipients, (0..*n).map(|i| format!("u{i}")).collect::<Vec<_>>());
                let want: Vec<_> = (0..*n)
                    .map(|i| if (i + k).is_multiple_of(3) { PushOutcome::NotConnected(format!("r{i}")) } else { PushOutcome::Delivered })
                    .collect();
                prop_assert_eq!(got.outcomes, want);
            }
        }

        /// A broken batch stream fails exactly the batches not yet answered.
        #[test]
        fn batch_failure_fails_only_the_unanswered(sizes in proptest::collection::vec(1usize..8, 1..10), answered in 0usize..10) {
            let mut batches = Batches::default();
            let mut pending = Vec::new();
            for &n in &sizes {
                let (g, rx) = group(n);
                pending.push((batches.push(g), rx));
            }
            let answered = answered.min(pending.len());
            for (id, _) in &pending[..answered] {
                batches.answer(PushBatchResponse { batch_id: *id, failed: vec![] }).unwrap();
            }
            let failure = PushFailure::new(FailureKind::StreamBroken, "g", "reset");
            batches.fail_all(&failure);
            prop_assert!(batches.is_empty());
            for (k, (_, rx)) in pending.iter_mut().enumerate() {
                let got = rx.try_recv().expect("answered").outcomes;
                let want = if k < answered { PushOutcome::Delivered } else { PushOutcome::Failed(failure.clone()) };
                prop_assert!(got.iter().all(|o| *o == want));
            }
        }
    }
}
