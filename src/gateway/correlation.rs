//! Matching gateway responses to requests. `PushService` responses carry no
//! username and msg_id repeats across recipients, so the only key is order:
//! the n-th response on a stream answers the n-th request. Requests are
//! queued here in the order they are written, grouped by the caller that
//! sent them; responses fill the oldest group first.

use std::collections::VecDeque;

use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::time::Instant;

use super::{PushFailure, PushOutcome};

/// The requests of one caller, answered together.
pub(crate) struct Group {
    expected: usize,
    outcomes: Vec<PushOutcome>,
    reply: oneshot::Sender<Vec<PushOutcome>>,
    pub(crate) deadline: Instant,
    _permits: Option<OwnedSemaphorePermit>,
}

impl Group {
    pub(crate) fn new(
        expected: usize,
        reply: oneshot::Sender<Vec<PushOutcome>>,
        deadline: Instant,
        permits: Option<OwnedSemaphorePermit>,
    ) -> Self {
        Self {
            expected,
            outcomes: Vec::with_capacity(expected),
            reply,
            deadline,
            _permits: permits,
        }
    }
}

/// A response arrived with no request waiting for it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Unexpected;

#[derive(Default)]
pub(crate) struct InFlight {
    groups: VecDeque<Group>,
}

impl InFlight {
    pub(crate) fn push(&mut self, group: Group) {
        if group.expected == 0 {
            let _ = group.reply.send(Vec::new());
            return;
        }
        self.groups.push_back(group);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    pub(crate) fn oldest_deadline(&self) -> Option<Instant> {
        self.groups.front().map(|g| g.deadline)
    }

    /// Records the answer to the oldest unanswered request; replies to its
    /// caller when that completes the group.
    pub(crate) fn answer(&mut self, outcome: PushOutcome) -> Result<(), Unexpected> {
        let group = self.groups.front_mut().ok_or(Unexpected)?;
        group.outcomes.push(outcome);
        if group.outcomes.len() == group.expected {
            let group = self.groups.pop_front().expect("front exists");
            // The caller may have stopped waiting; its answer is then moot.
            let _ = group.reply.send(group.outcomes);
        }
        Ok(())
    }

    /// Fails every unanswered request; answers already received stand.
    pub(crate) fn fail_all(&mut self, failure: &PushFailure) {
        for mut group in self.groups.drain(..) {
            let missing = group.expected - group.outcomes.len();
            group.outcomes.extend(std::iter::repeat_n(
                PushOutcome::Failed(failure.clone()),
                missing,
            ));
            let _ = group.reply.send(group.outcomes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::FailureKind;
    use proptest::prelude::*;

    fn group(n: usize) -> (Group, oneshot::Receiver<Vec<PushOutcome>>) {
        let (tx, rx) = oneshot::channel();
        (Group::new(n, tx, Instant::now(), None), rx)
    }

    fn outcome(i: usize) -> PushOutcome {
        if i.is_multiple_of(3) {
            PushOutcome::NotConnected(format!("r{i}"))
        } else {
            PushOutcome::Delivered
        }
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
                prop_assert!(inflight.answer(outcome(i)).is_ok());
            }
            prop_assert!(inflight.is_empty());
            prop_assert_eq!(inflight.answer(PushOutcome::Delivered), Err(Unexpected));
            let mut i = 0;
            for (rx, &n) in receivers.iter_mut().zip(&sizes) {
                let got = rx.try_recv().expect("answered");
                let want: Vec<_> = (i..i + n).map(outcome).collect();
                prop_assert_eq!(got, want);
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
                inflight.answer(outcome(i)).unwrap();
            }
            let failure = PushFailure::new(FailureKind::StreamBroken, "g", "reset");
            inflight.fail_all(&failure);
            let all: Vec<PushOutcome> = receivers.iter_mut().flat_map(|rx| rx.try_recv().unwrap()).collect();
            prop_assert_eq!(all.len(), total);
            for (i, o) in all.iter().enumerate() {
                if i < answered {
                    prop_assert_eq!(o, &outcome(i));
                } else {
                    prop_assert_eq!(o, &PushOutcome::Failed(failure.clone()));
                }
            }
        }
    }
}
