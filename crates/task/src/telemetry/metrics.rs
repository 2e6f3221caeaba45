//! Prometheus metrics, all named `resonance_task_*` with small closed label
//! sets (outcome, reason, gateway_id, dependency). The recorder is global
//! and installed once per process; `/metrics` on the admin port renders it.

use std::sync::{Arc, OnceLock, RwLock};

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Events by how they ended: acked, duplicate, retried, handed_back,
/// dead_lettered.
pub const EVENTS: &str = "resonance_task_events_total";
/// Recipients by outcome (delivered, offline, failed, retried,
/// deduplicated) and gateway_id (`none` when no gateway was involved).
pub const DELIVERIES: &str = "resonance_task_deliveries_total";
/// Now minus the event's `timestamp` when a pod starts handling it.
pub const EVENT_AGE: &str = "resonance_task_event_age_seconds";
/// One event's whole fan-out.
pub const DISPATCH_DURATION: &str = "resonance_task_dispatch_duration_seconds";
/// One push to one gateway, request to answer, by gateway_id.
pub const GATEWAY_ROUND_TRIP: &str = "resonance_task_gateway_round_trip_seconds";
/// The event's `timestamp` to its ack.
pub const PUBLISH_TO_ACK: &str = "resonance_task_publish_to_ack_seconds";
/// Gateway streams alive in this pod.
pub const GATEWAY_STREAMS: &str = "resonance_task_gateway_streams_open";
/// Events being handled by this pod.
pub const EVENTS_IN_FLIGHT: &str = "resonance_task_events_in_flight";
/// Gateways in the registry map.
pub const REGISTRY_GATEWAYS: &str = "resonance_task_registry_gateways";
/// Share of member lookups served from the in-process cache.
pub const MEMBER_CACHE_HIT_RATIO: &str = "resonance_task_member_cache_hit_ratio";
pub const MEMBER_CACHE_INVALIDATIONS: &str = "resonance_task_member_cache_invalidations_total";
/// Background re-reads of cached sessions, by outcome (`replaced`: the
/// entry now holds the new list; `discarded`: it was dropped or replaced
/// meanwhile; `failed`: SQL failed, the entry stays until its TTL).
pub const MEMBER_CACHE_REFRESHES: &str = "resonance_task_member_cache_refreshes_total";
/// Events waiting in the durable consumer (JetStream num_pending): lag.
pub const CONSUMER_PENDING: &str = "resonance_task_consumer_pending";
/// Events delivered to a pod but not yet acked (JetStream num_ack_pending).
pub const CONSUMER_ACK_PENDING: &str = "resonance_task_consumer_ack_pending";
/// Offline recipients by outcome: parked, already_parked, read_path
/// (session too large to park per member), failed.
pub const OFFLINE: &str = "resonance_task_offline_total";
/// Messages JetStream stopped redelivering, moved to the dead letters.
pub const MAX_DELIVERIES_RESCUED: &str = "resonance_task_max_deliveries_total";
/// Messages the consumer left behind in the work queue, published again.
pub const REQUEUED: &str = "resonance_task_requeued_total";
/// Parked messages dropped to keep a user within `offline.max_messages`
/// (oldest arrival first).
pub const OFFLINE_TRIMMED: &str = "resonance_task_offline_trimmed_total";
/// Offline notices by outcome: published, rate_limited, failed (per
/// recipient).
pub const OFFLINE_NOTICES: &str = "resonance_task_offline_notices_total";
/// Events taken from NATS by priority lane (high, normal).
pub const LANE_EVENTS: &str = "resonance_task_lane_events_total";
/// Events taken from NATS and waiting for a worker, by lane.
pub const LANE_QUEUED: &str = "resonance_task_lane_queued";
/// Notify worker: recipients by provider and outcome (sent, dropped,
/// retried, deduplicated).
pub const NOTIFY: &str = "resonance_task_notify_total";
/// Reconnects by dependency (nats, etcd, gateway).
pub const RECONNECTS: &str = "resonance_task_reconnects_total";
/// TLS files read again after a change, by section (gateway.tls, ...).
pub const TLS_RELOADS: &str = "resonance_task_tls_reloads_total";
/// Events dead-lettered for breaking an input limit, by limit.
pub const LIMIT_VIOLATIONS: &str = "resonance_task_limit_violations_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The `outcome` label values of [`EVENTS`].
pub const EVENT_OUTCOMES: &[&str] = &[
    "acked",
    "duplicate",
    "retried",
    "handed_back",
    "dead_lettered",
];

/// The `outcome` label values of [`DELIVERIES`].
pub const DELIVERY_OUTCOMES: &[&str] =
    &["delivered", "offline", "failed", "retried", "deduplicated"];

/// Handles of the series every event touches, registered once. Naming a
/// series by name and labels costs a key built and hashed, a lock and, for
/// a `gateway_id`, a label string allocated, at every use; a handle costs
/// an atomic add.
pub struct EventSeries {
    pub event_age: Histogram,
    pub dispatch_duration: Histogram,
    pub publish_to_ack: Histogram,
    pub events_in_flight: Gauge,
    pub member_cache_hit_ratio: Gauge,
    /// [`EVENTS`] by [`EVENT_OUTCOMES`], in its order.
    events: Vec<Counter>,
    gateways: RwLock<foldhash::HashMap<Arc<str>, Arc<GatewaySeries>>>,
}

/// One gateway's series, registered at its first use.
struct GatewaySeries {
    round_trip: Histogram,
    /// [`DELIVERIES`] by [`DELIVERY_OUTCOMES`], in its order: only the
    /// outcomes that happened appear in the exposition.
    deliveries: Vec<OnceLock<Counter>>,
}

/// The series of [`EventSeries`], on the process-wide recorder.
pub fn event_series() -> &'static EventSeries {
    static SERIES: OnceLock<EventSeries> = OnceLock::new();
    SERIES.get_or_init(|| {
        // Handles taken before the recorder is installed would count
        // nowhere.
        handle();
        EventSeries {
            event_age: metrics::histogram!(EVENT_AGE),
            dispatch_duration: metrics::histogram!(DISPATCH_DURATION),
            publish_to_ack: metrics::histogram!(PUBLISH_TO_ACK),
            events_in_flight: metrics::gauge!(EVENTS_IN_FLIGHT),
            member_cache_hit_ratio: metrics::gauge!(MEMBER_CACHE_HIT_RATIO),
            events: EVENT_OUTCOMES
                .iter()
                .map(|outcome| metrics::counter!(EVENTS, "outcome" => *outcome))
                .collect(),
            gateways: Default::default(),
        }
    })
}

impl EventSeries {
    /// Counts an event that ended with `outcome`.
    pub fn event(&self, outcome: &'static str) {
        match EVENT_OUTCOMES.iter().position(|o| *o == outcome) {
            Some(i) => self.events[i].increment(1),
            None => metrics::counter!(EVENTS, "outcome" => outcome).increment(1),
        }
    }

    /// Records one push's round trip to `gateway_id`.
    pub fn round_trip(&self, gateway_id: &str, seconds: f64) {
        self.gateway(gateway_id).round_trip.record(seconds);
    }

    /// Counts `n` recipients of `gateway_id` ([`NO_GATEWAY`] when none
    /// was involved) that ended with `outcome`.
    pub fn deliveries(&self, outcome: &'static str, gateway_id: &str, n: u64) {
        match DELIVERY_OUTCOMES.iter().position(|o| *o == outcome) {
            Some(i) => self.gateway(gateway_id).deliveries[i]
                .get_or_init(|| {
                    metrics::counter!(DELIVERIES, "outcome" => outcome, "gateway_id" => gateway_id.to_string())
                })
                .increment(n),
            None => metrics::counter!(DELIVERIES, "outcome" => outcome, "gateway_id" => gateway_id.to_string())
                .increment(n),
        }
    }

    fn gateway(&self, gateway_id: &str) -> Arc<GatewaySeries> {
        let known = self.gateways.read().unwrap_or_else(|e| e.into_inner());
        if let Some(series) = known.get(gateway_id) {
            return series.clone();
        }
        drop(known);
        let mut known = self.gateways.write().unwrap_or_else(|e| e.into_inner());
        known
            .entry(Arc::from(gateway_id))
            .or_insert_with(|| {
                Arc::new(GatewaySeries {
                    round_trip: metrics::histogram!(GATEWAY_ROUND_TRIP, "gateway_id" => gateway_id.to_string()),
                    deliveries: DELIVERY_OUTCOMES.iter().map(|_| OnceLock::new()).collect(),
                })
            })
            .clone()
    }
}

/// The `gateway_id` label of recipients no gateway was involved with.
pub const NO_GATEWAY: &str = "none";

/// The process-wide recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .expect("bucket list is not empty")
            .install_recorder()
            .expect("no other metrics recorder is installed")
    })
}

pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    handle();
    describe_counter!(
        EVENTS,
        "Events by outcome: acked, duplicate, retried, handed_back, dead_lettered"
    );
    // Every outcome's series exists from the start at zero: a counter that
    // first appears with its first increment would start at 1, and
    // `increase()` (the dead-letter alert) would never see it rise.
    for outcome in EVENT_OUTCOMES {
        metrics::counter!(EVENTS, "outcome" => *outcome).increment(0);
    }
    describe_counter!(DELIVERIES, "Recipients by outcome and gateway_id");
    describe_histogram!(
        EVENT_AGE,
        metrics::Unit::Seconds,
        "Event age when a pod starts handling it"
    );
    describe_histogram!(
        DISPATCH_DURATION,
        metrics::Unit::Seconds,
        "Fan-out duration of one event"
    );
    describe_histogram!(
        GATEWAY_ROUND_TRIP,
        metrics::Unit::Seconds,
        "Push round trip to a gateway"
    );
    describe_histogram!(
        PUBLISH_TO_ACK,
        metrics::Unit::Seconds,
        "Event timestamp to ack"
    );
    describe_gauge!(GATEWAY_STREAMS, "Open gateway streams");
    describe_gauge!(EVENTS_IN_FLIGHT, "Events being handled");
    describe_gauge!(REGISTRY_GATEWAYS, "Gateways in the registry map");
    describe_gauge!(MEMBER_CACHE_HIT_RATIO, "Member lookups served from cache");
    describe_counter!(
        MEMBER_CACHE_INVALIDATIONS,
        "Sessions dropped from the member cache by a membership-change message"
    );
    describe_counter!(
        MEMBER_CACHE_REFRESHES,
        "Background re-reads of cached sessions, by outcome"
    );
    describe_gauge!(CONSUMER_PENDING, "Events waiting in the durable consumer");
    describe_gauge!(CONSUMER_ACK_PENDING, "Events delivered but not yet acked");
    describe_counter!(RECONNECTS, "Reconnects by dependency");
    describe_counter!(OFFLINE, "Offline recipients by outcome");
    describe_counter!(
        REQUEUED,
        "Messages left behind below the consumer's ack floor, published to the work queue again"
    );
    describe_counter!(
        MAX_DELIVERIES_RESCUED,
        "Messages JetStream stopped redelivering (consumer.delivery_ceiling), moved to the dead letters"
    );
    describe_counter!(
        OFFLINE_TRIMMED,
        "Parked messages dropped by offline.max_messages, oldest arrival first"
    );
    describe_counter!(OFFLINE_NOTICES, "Offline notice recipients by outcome");
    describe_counter!(LANE_EVENTS, "Events taken from NATS by priority lane");
    describe_gauge!(LANE_QUEUED, "Events waiting for a worker by priority lane");
    describe_counter!(NOTIFY, "Mobile-push recipients by provider and outcome");
    describe_counter!(TLS_RELOADS, "TLS files read again after a change");
    describe_counter!(
        LIMIT_VIOLATIONS,
        "Events refused for breaking an input limit"
    );
}

/// Seconds since a unix-millisecond timestamp (0 for one in the future).
pub fn seconds_since_ms(timestamp_ms: i64) -> f64 {
    (crate::clock::now_ms().saturating_sub(timestamp_ms).max(0) as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the exposition's series `line_start` (name and labels
    /// as rendered), if it is there.
    fn rendered(line_start: &str) -> Option<f64> {
        handle()
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
    }

    /// Counts through the held handles land on the series the names and
    /// labels say, and an outcome outside the known lists still counts.
    #[test]
    fn held_handles_count_on_their_series() {
        let series = event_series();
        series.deliveries("delivered", "gw-series-test", 3);
        series.deliveries("delivered", "gw-series-test", 2);
        series.deliveries("unlisted", "gw-series-test", 1);
        series.round_trip("gw-series-test", 0.002);
        assert_eq!(
            rendered(
                r#"resonance_task_deliveries_total{outcome="delivered",gateway_id="gw-series-test"}"#
            ),
            Some(5.0)
        );
        assert_eq!(
            rendered(
                r#"resonance_task_deliveries_total{outcome="unlisted",gateway_id="gw-series-test"}"#
            ),
            Some(1.0)
        );
        // Outcomes that never happened at a gateway are not in the
        // exposition.
        assert_eq!(
            rendered(
                r#"resonance_task_deliveries_total{outcome="failed",gateway_id="gw-series-test"}"#
            ),
            None
        );
        assert_eq!(
            rendered(
                r#"resonance_task_gateway_round_trip_seconds_count{gateway_id="gw-series-test"}"#
            ),
            Some(1.0)
        );
    }
}
