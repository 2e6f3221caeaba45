//! NATS intake and the ack policy. Two intakes share one [`EventHandler`]:
//! `jetstream` (default: a durable pull consumer every pod shares, ack only
//! after the fan-out settled) and `core` (a plain queue group, at-most-once,
//! the legacy behaviour). The handler decodes an event, dispatches it and
//! turns the result into a [`Decision`]; `dead_letter` parks what can never
//! succeed on `resonance.push.dead.v1` with the reason in headers.

mod attempts;
pub mod dead_letter;
pub mod dlq;
pub mod jetstream;
pub mod lanes;
pub mod queue_group;
mod sweep;
mod totals;

use std::time::Duration;

use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{DispatchError, Dispatcher, FanoutReport, SessionOrder, Turn};
use crate::proto::PushEvent;
use crate::retry::Backoff;
use crate::telemetry;
pub use attempts::{FailedAttempts, failed_key};
pub use lanes::{Lane, LaneRules};
pub use totals::EventTotals;

/// What the durable intake hands each message to: the push-event handler
/// here, or the offline-notice handler of `notify`.
pub trait MessageHandler: Send + Sync + 'static {
    /// The lane the message waits in for a worker.
    fn lane(&self, _headers: Option<&async_nats::HeaderMap>, _payload: &[u8]) -> Lane {
        Lane::Normal
    }

    /// The message's session, when its order must be kept.
    fn session_of(&self, _payload: &[u8]) -> Option<String> {
        None
    }

    /// Its turn in its session's order, taken when a worker takes it.
    fn turn(&self, _payload: &[u8]) -> Turn {
        Turn::free()
    }

    fn handle(
        &self,
        payload: &[u8],
        headers: Option<&async_nats::HeaderMap>,
        attempt: Attempt,
        abort: &CancellationToken,
        turn: Turn,
    ) -> impl std::future::Future<Output = Decision> + Send;

    /// Counts and logs the decision once it is carried out.
    fn decided(&self, decision: &Decision);

    /// The message is stored in the dead letters: keep what a replay needs.
    fn dead_lettered(&self, _payload: &[u8]) -> impl std::future::Future<Output = ()> + Send {
        async {}
    }
}

/// What to do with a message once its handling is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Every recipient was delivered or is offline.
    Ack,
    /// The event had settled before (a redelivery or a duplicate publish):
    /// acked without pushing.
    Duplicate,
    /// The attempt failed (a dependency or gateway): redeliver after
    /// `delay`. Counts against `consumer.max_deliver`.
    Retry { delay: Duration, reason: String },
    /// It can never succeed, or it ran out of attempts.
    DeadLetter { reason: String, last_error: String },
    /// Not a failure: redeliver after `delay` without spending an attempt
    /// (shutdown hands it to another pod at once; another handler holding
    /// the event is waited for).
    HandBack { delay: Duration },
}

impl Decision {
    /// Its `outcome` label in `resonance_task_events_total` (one of
    /// [`crate::telemetry::metrics::EVENT_OUTCOMES`]).
    pub fn outcome(&self) -> &'static str {
        match self {
            Decision::Ack => "acked",
            Decision::Duplicate => "duplicate",
            Decision::Retry { .. } => "retried",
            Decision::HandBack { .. } => "handed_back",
            Decision::DeadLetter { .. } => "dead_lettered",
        }
    }

    /// Shutdown interrupted the message: redeliver at once, elsewhere.
    pub const SHUTDOWN: Decision = Decision::HandBack {
        delay: Duration::ZERO,
    };

    /// Turns a failed attempt into a dead letter once `failures` failed
    /// attempts (this one included) reach `max_deliver`.
    pub fn or_give_up(self, failures: i64, max_deliver: i64) -> Decision {
        match self {
            Decision::Retry { reason, .. } if failures >= max_deliver => Decision::DeadLetter {
                reason: if failures == 1 {
                    "gave up after 1 failed attempt".to_string()
                } else {
                    format!("gave up after {failures} failed attempts")
                },
                last_error: reason,
            },
            d => d,
        }
    }
}

/// Where a message stands in its delivery history.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// JetStream's delivery count, 1 for the first delivery; handbacks
    /// count here too, so it is for logs, not for giving up.
    pub delivery: i64,
}

/// The ack policy: a pure function of the dispatch result. Giving up after
/// too many failed attempts is the intake's part ([`Decision::or_give_up`]).
pub fn decide(result: &Result<FanoutReport, DispatchError>, retry_interval: Duration) -> Decision {
    let reason = match result {
        Ok(report) if report.duplicate => return Decision::Duplicate,
        // Not a failure: the other handler settles it. Come back when its
        // claim could have lapsed.
        Ok(report) if report.busy => {
            return Decision::HandBack {
                delay: report
                    .busy_for
                    .map_or(retry_interval, |left| left.max(BUSY_MIN_WAIT)),
            };
        }
        Ok(report) if report.is_settled() => return Decision::Ack,
        Ok(report) => {
            let failure = report
                .first_failure()
                .expect("unsettled report has a failure");
            format!(
                "{} of {} recipients not delivered: {failure}",
                report.failed.len(),
                report.members
            )
        }
        Err(e) if !e.is_transient() => {
            return Decision::DeadLetter {
                reason: e.to_string(),
                last_error: e.to_string(),
            };
        }
        Err(e) => e.to_string(),
    };
    Decision::Retry {
        delay: retry_interval,
        reason,
    }
}

/// How an event is retried inside the pod before it goes back to NATS.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// In-process attempts after the first (`consumer.max_retry`).
    pub max_retry: u32,
    /// Redelivery delay once in-process attempts are spent
    /// (`consumer.retry_interval`).
    pub retry_interval: Duration,
}

/// Decodes, dispatches and decides, for either intake.
pub struct EventHandler {
    dispatcher: Dispatcher,
    retry: RetryPolicy,
    totals: EventTotals,
    order: SessionOrder,
    lanes: LaneRules,
}

/// Copies `traceparent`/`tracestate` from NATS headers into an event that
/// carries no trace context of its own.
fn adopt_trace_context(event: &mut PushEvent, headers: &async_nats::HeaderMap) {
    if event.trace_headers.contains_key("traceparent") {
        return;
    }
    for name in ["traceparent", "tracestate"] {
        if let Some(v) = headers.get(name) {
            event
                .trace_headers
                .insert(name.to_string(), v.as_str().to_string());
        }
    }
}

/// A name for one handling of one event, unique across pods.
fn handling_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The shortest wait for another handler's claim.
const BUSY_MIN_WAIT: Duration = Duration::from_millis(100);

/// First in-process retry delay; doubles per attempt up to `RETRY_CAP`.
const RETRY_BASE: Duration = Duration::from_millis(100);
const RETRY_CAP: Duration = Duration::from_secs(2);

impl EventHandler {
    pub fn new(dispatcher: Dispatcher, retry: RetryPolicy, totals: EventTotals) -> Self {
        Self {
            dispatcher,
            retry,
            totals,
            order: SessionOrder::default(),
            lanes: LaneRules::default(),
        }
    }

    /// Chooses lanes by these rules (default: every event is normal unless
    /// its header says otherwise).
    pub fn with_lanes(mut self, lanes: LaneRules) -> Self {
        self.lanes = lanes;
        self
    }

    /// Dispatches, then retries in-process with capped, jittered backoff:
    /// the whole event while nothing was pushed yet, afterwards only the
    /// recipients whose push failed, so those already delivered are not
    /// pushed again.
    async fn dispatch_with_retries(
        &self,
        event: &PushEvent,
        token: &str,
        turn: Turn,
    ) -> Result<FanoutReport, DispatchError> {
        let mut result = self.dispatcher.dispatch(event, token, turn).await;
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP);
        for _ in 0..self.retry.max_retry {
            match &mut result {
                Ok(report) if !report.is_settled() => {
                    tokio::time::sleep(backoff.next_delay()).await;
                    let failed: Vec<String> =
                        report.failed.iter().map(|(u, _)| u.clone()).collect();
                    match self
                        .dispatcher
                        .redeliver(event, failed, report.members)
                        .await
                    {
                        Ok(retry) => report.absorb_retry(retry),
                        Err(e) => {
                            tracing::debug!(error = %e, "in-process retry failed");
                        }
                    }
                }
                Err(e) if e.is_transient() => {
                    // Nothing was pushed; let go of the claim so the next
                    // attempt (ours or another delivery's) can take it.
                    let _ = self
                        .dispatcher
                        .finish(event.msg_id, token, false, true)
                        .await;
                    tokio::time::sleep(backoff.next_delay()).await;
                    result = self.dispatcher.dispatch(event, token, Turn::free()).await;
                }
                _ => break,
            }
        }
        result
    }

    pub fn totals(&self) -> &EventTotals {
        &self.totals
    }

    /// Handles one payload. The decision is also logged and counted.
    /// When `abort` fires first, the fan-out is dropped where it stands,
    /// the event's claim is released and it is handed back.
    /// `headers` are the NATS message's headers: their W3C trace context is
    /// used when the event's own `trace_headers` carry none. `turn` comes
    /// from [`EventHandler::turn`], taken when the payload was received.
    pub async fn handle_event(
        &self,
        payload: &[u8],
        headers: Option<&async_nats::HeaderMap>,
        attempt: Attempt,
        abort: &CancellationToken,
        turn: Turn,
    ) -> Decision {
        let event = match self.admit(payload, headers, attempt) {
            Ok(event) => event,
            Err(rejected) => return rejected,
        };
        telemetry::metrics::event_series()
            .event_age
            .record(telemetry::metrics::seconds_since_ms(event.timestamp));
        let token = handling_token();
        // The claim is renewed for as long as this handler lives, so no
        // second delivery of the event pushes in parallel however long the
        // fan-out takes.
        let result = tokio::select! {
            r = self.dispatch_with_retries(&event, &token, turn) => r,
            _ = self.dispatcher.keep_claim(event.msg_id, &token) => unreachable!("keep_claim never ends"),
            _ = abort.cancelled() => {
                tracing::warn!(msg_id = event.msg_id, session_id = %event.session_id, "shutdown grace over; handing the event back");
                self.dispatcher.let_claim_lapse(event.msg_id, &token).await;
                return Decision::SHUTDOWN;
            }
        };
        let decision = decide(&result, self.retry.retry_interval);
        if decision == Decision::Ack {
            telemetry::metrics::event_series()
                .publish_to_ack
                .record(telemetry::metrics::seconds_since_ms(event.timestamp));
        }
        let recorded = !matches!(&result, Ok(r) if !r.progress_written);
        if let Err(e) = self
            .dispatcher
            .finish(event.msg_id, &token, decision == Decision::Ack, recorded)
            .await
        {
            // The fan-out is over either way. Unmarked, a later duplicate may
            // be pushed again; an unreleased claim expires with its TTL.
            tracing::warn!(msg_id = event.msg_id, error = %e, "could not record the event's end in Redis");
        }
        if let Ok(report) = &result {
            self.totals.recipients(report);
        }
        log_decision(&event, attempt, &decision);
        decision
    }

    /// The payload as an event, within the limits and decodable, with the
    /// NATS headers' trace context where the event carries none; otherwise
    /// the dead letter it becomes.
    fn admit(
        &self,
        payload: &[u8],
        headers: Option<&async_nats::HeaderMap>,
        attempt: Attempt,
    ) -> Result<PushEvent, Decision> {
        let rejected = |reason: String| {
            tracing::warn!(%reason, delivery = attempt.delivery, "event rejected");
            Decision::DeadLetter {
                last_error: reason.clone(),
                reason,
            }
        };
        crate::dispatch::check_payload(payload.len(), self.dispatcher.limits())
            .map_err(|e| rejected(e.to_string()))?;
        let mut event = PushEvent::decode(payload).map_err(|e| {
            rejected(format!(
                "undecodable PushEvent ({} bytes): {e}",
                payload.len()
            ))
        })?;
        if let Some(headers) = headers {
            adopt_trace_context(&mut event, headers);
        }
        Ok(event)
    }
}

/// One log line per decision, at the level it deserves.
fn log_decision(event: &PushEvent, attempt: Attempt, decision: &Decision) {
    match decision {
        Decision::Ack => {
            tracing::debug!(msg_id = event.msg_id, session_id = %event.session_id, "event settled")
        }
        Decision::Retry { reason, delay } => tracing::warn!(
            msg_id = event.msg_id,
            session_id = %event.session_id,
            delivery = attempt.delivery,
            retry_in = ?delay,
            %reason,
            "event will be redelivered"
        ),
        Decision::HandBack { .. } => tracing::debug!(
            msg_id = event.msg_id,
            session_id = %event.session_id,
            "another handler holds the event; handed back"
        ),
        Decision::Duplicate => tracing::info!(
            msg_id = event.msg_id,
            session_id = %event.session_id,
            delivery = attempt.delivery,
            "event settled before; acked without pushing"
        ),
        Decision::DeadLetter { reason, .. } => tracing::warn!(
            msg_id = event.msg_id,
            session_id = %event.session_id,
            delivery = attempt.delivery,
            %reason,
            "event dead-lettered"
        ),
    }
}

impl MessageHandler for EventHandler {
    fn lane(&self, headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Lane {
        self.lanes.lane(headers, payload)
    }

    fn session_of(&self, payload: &[u8]) -> Option<String> {
        crate::dispatch::order::session_id_of(payload).map(str::to_string)
    }

    /// Intake calls this in the order workers take events.
    fn turn(&self, payload: &[u8]) -> Turn {
        match crate::dispatch::order::session_id_of(payload) {
            Some(session_id) => self.order.enter(session_id),
            None => Turn::free(),
        }
    }

    fn handle(
        &self,
        payload: &[u8],
        headers: Option<&async_nats::HeaderMap>,
        attempt: Attempt,
        abort: &CancellationToken,
        turn: Turn,
    ) -> impl std::future::Future<Output = Decision> + Send {
        self.handle_event(payload, headers, attempt, abort, turn)
    }

    fn decided(&self, decision: &Decision) {
        self.totals.decision(decision);
    }

    /// Keeps the event's progress as long as its dead letter, so a replay
    /// pushes only to the recipients it had not reached.
    async fn dead_lettered(&self, payload: &[u8]) {
        let Ok(event) = PushEvent::decode(payload) else {
            return;
        };
        if event.msg_id <= 0 {
            return;
        }
        if let Err(e) = self
            .dispatcher
            .keep_progress(event.msg_id, dead_letter::RETENTION)
            .await
        {
            tracing::warn!(msg_id = event.msg_id, error = %e, "progress of a dead letter not kept; a replay may push to recipients already reached");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::plan::OfflineReason;
    use crate::gateway::{FailureKind, PushFailure};

    const RETRY: Duration = Duration::from_secs(5);

    fn report(failed: usize) -> FanoutReport {
        FanoutReport {
            members: 3,
            delivered: 1,
            offline: vec![("b".into(), OfflineReason::NoRoute)],
            parked: 1,
            noticed: 1,
            duplicate: false,
            busy: false,
            busy_for: None,
            already_delivered: 0,
            failed: (0..failed)
                .map(|i| {
                    (
                        format!("f{i}"),
                        PushFailure::new(FailureKind::Timeout, "g1", "slow"),
                    )
                })
                .collect(),
            gateways: 1,
            progress_written: false,
        }
    }

    #[test]
    fn every_outcome_is_exported_from_the_start() {
        let every = [
            Decision::Ack,
            Decision::Duplicate,
            Decision::Retry {
                delay: Duration::ZERO,
                reason: String::new(),
            },
            Decision::DeadLetter {
                reason: String::new(),
                last_error: String::new(),
            },
            Decision::SHUTDOWN,
        ];
        for d in &every {
            assert!(
                crate::telemetry::metrics::EVENT_OUTCOMES.contains(&d.outcome()),
                "{d:?}"
            );
        }
        assert_eq!(crate::telemetry::metrics::EVENT_OUTCOMES.len(), every.len());
    }

    #[test]
    fn settled_fan_out_is_acked() {
        assert_eq!(decide(&Ok(report(0)), RETRY), Decision::Ack);
    }

    #[test]
    fn failures_retry_until_the_last_attempt() {
        let failed = decide(&Ok(report(1)), RETRY);
        match failed.clone().or_give_up(2, 3) {
            Decision::Retry { delay, reason } => {
                assert_eq!(delay, RETRY);
                assert!(reason.contains("g1"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
        match failed.or_give_up(3, 3) {
            Decision::DeadLetter { reason, last_error } => {
                assert!(last_error.contains("g1"), "{last_error}");
                assert!(reason.contains("after 3 failed attempts"), "{reason}")
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn an_event_held_elsewhere_is_retried_never_dead_lettered() {
        let busy = FanoutReport {
            busy: true,
            ..Default::default()
        };
        let decision = decide(&Ok(busy), RETRY);
        assert_eq!(decision, Decision::HandBack { delay: RETRY });
        assert_eq!(
            decision.clone().or_give_up(99, 3),
            decision,
            "never given up"
        );
    }

    #[test]
    fn nats_headers_supply_missing_trace_context() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-bbbbbbbbbbbbbbbb-01",
        );
        let mut bare = PushEvent::default();
        adopt_trace_context(&mut bare, &headers);
        assert!(bare.trace_headers["traceparent"].contains("aaaa"));
        let mut own = PushEvent::default();
        own.trace_headers.insert(
            "traceparent".into(),
            "00-cccccccccccccccccccccccccccccccc-dddddddddddddddd-01".into(),
        );
        adopt_trace_context(&mut own, &headers);
        assert!(
            own.trace_headers["traceparent"].contains("cccc"),
            "the event's own context wins"
        );
    }

    #[test]
    fn a_settled_duplicate_is_acked() {
        let dup = FanoutReport {
            duplicate: true,
            ..Default::default()
        };
        assert_eq!(decide(&Ok(dup), RETRY), Decision::Duplicate);
    }

    #[test]
    fn invalid_events_dead_letter_at_once() {
        let invalid = Err(DispatchError::Invalid("session_id is empty".into()));
        assert!(matches!(
            decide(&invalid, RETRY),
            Decision::DeadLetter { .. }
        ));
    }
}
