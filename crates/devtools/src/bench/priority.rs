//! The priority phase of the benchmark: one pod is offered normal
//! large-group events at more than its measured batch peak, so it runs
//! saturated with a backlog, while one-to-one events (high priority by the
//! `priority.one_to_one_high` rule) are published at a low rate to users of
//! a gateway of their own. Their publish-to-gateway latency is measured with
//! the lanes on, then again with them off (every event normal), side by
//! side on the same load.

use std::sync::Arc;

use serde::Serialize;

use super::drivers::{Driver, Mode, pod_config};
use super::{Bench, BenchError, Session, gateway_options, quantile_ms};
use resonance_reference_gateway::ReferenceGateway;
use resonance_task::clock::now_ms;
use resonance_task::store::SessionSeed;

/// Normal load offered, relative to the measured batch peak.
const OVERLOAD: f64 = 1.2;
/// High-priority events per second.
const HIGH_RATE: f64 = 20.0;
/// The pod counts as saturated when the normal backlog left as publishing
/// stops takes at least this share of the publishing time to drain (a
/// load 1.1 times what the pod sustains leaves a tenth).
const SATURATED_DRAIN: f64 = 0.1;
/// Times the offered load is raised by [`ESCALATION`] when a run leaves no
/// such backlog: the measured peak is taken at a burst, and a machine may
/// sustain more. Small steps, so the backlog found is not one that outgrows
/// `priority.prefetch` (beyond it high events wait in the stream too).
const ESCALATIONS: u32 = 4;
const ESCALATION: f64 = 1.25;

#[derive(Debug, Clone, Serialize)]
pub struct LaneLatency {
    pub high_p50_ms: f64,
    pub high_p99_ms: f64,
    pub normal_p50_ms: f64,
    pub normal_p99_ms: f64,
    /// From the last normal event published to the last delivery.
    pub backlog_drain_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PriorityResult {
    pub normal_group_size: usize,
    /// Normal events offered per second (above the peak).
    pub normal_events_per_sec: f64,
    pub normal_events: usize,
    pub high_events: usize,
    /// Whether a backlog formed in both runs; without one the lanes had
    /// nothing to jump and the comparison says nothing about them.
    pub saturated: bool,
    pub lanes_on: LaneLatency,
    pub lanes_off: LaneLatency,
}

pub(crate) async fn run(
    bench: &Bench,
    sessions: &[Session],
    peak_events_per_sec: f64,
    seconds: f64,
) -> Result<PriorityResult, BenchError> {
    let pair = vec!["prio-a".to_string(), "prio-b".to_string()];
    let gateway = ReferenceGateway::start(gateway_options(
        &bench.config,
        "gateway-priority".into(),
        pair.clone(),
    ))
    .await?;
    bench
        .store
        .create_session(&SessionSeed {
            session_id: "bench-priority".into(),
            kind: 1,
            name: "bench-priority".into(),
            owner: pair[0].clone(),
            members: pair.clone(),
        })
        .await?;
    let urgent = Session {
        id: "bench-priority".into(),
        members: Arc::new(pair),
    };
    let mut overload = OVERLOAD;
    let mut escalations = 0;
    let result = loop {
        let rate = peak_events_per_sec * overload;
        let normal_events = ((rate * seconds) as usize).max(sessions.len());
        let high_events = ((HIGH_RATE * seconds) as usize).max(1);
        let load = Load {
            sessions,
            urgent: &urgent,
            gateway: &gateway,
            rate,
            normal_events,
            high_events,
        };
        let lanes_on = measure(bench, &load, true).await?;
        let lanes_off = measure(bench, &load, false).await?;
        let drained_ms = lanes_on.backlog_drain_ms.min(lanes_off.backlog_drain_ms);
        let saturated = drained_ms >= seconds * 1000.0 * SATURATED_DRAIN;
        if saturated || escalations == ESCALATIONS {
            break PriorityResult {
                normal_group_size: sessions[0].members.len(),
                normal_events_per_sec: rate.round(),
                normal_events,
                high_events,
                saturated,
                lanes_on,
                lanes_off,
            };
        }
        tracing::warn!(
            offered_events_per_sec = rate.round(),
            backlog_drain_ms = drained_ms,
            "the priority run did not saturate the pod; offering more normal events"
        );
        overload *= ESCALATION;
        escalations += 1;
    };
    gateway.stop().await;
    Ok(result)
}

/// What one measurement offers the pod.
struct Load<'a> {
    sessions: &'a [Session],
    urgent: &'a Session,
    gateway: &'a ReferenceGateway,
    rate: f64,
    normal_events: usize,
    high_events: usize,
}

/// Offers `load` to a fresh pod with the lanes on or off and measures
/// both lanes' latency and how long the normal backlog took to drain once
/// publishing stopped.
async fn measure(bench: &Bench, load: &Load<'_>, lanes: bool) -> Result<LaneLatency, BenchError> {
    let (sessions, gateway) = (load.sessions, load.gateway);
    let mut config = pod_config(&bench.config, Mode::Batch);
    let name = if lanes { "on" } else { "off" };
    config.consumer.topic = format!("resonance.bench.priority-{name}.v1");
    config.consumer.stream = format!("BENCH_PRIORITY_{}", name.to_uppercase());
    config.consumer.queue_group = format!("bench-priority-{name}");
    config.priority.one_to_one_high = lanes;
    let driver = Driver::start_with(Mode::Batch, config).await?;
    bench.warm_up(&driver, sessions).await?;
    gateway.ledger.reset_latency();
    for g in &bench.gateways {
        g.ledger.reset_latency();
    }
    let base = bench.delivered() + gateway.ledger.received();
    let expected =
        (load.normal_events * sessions[0].members.len()) as u64 + load.high_events as u64 * 2;
    let normal = async {
        let mut pacer = crate::publish::Pacer::new(load.rate);
        for i in 0..load.normal_events {
            pacer.tick().await;
            driver
                .submit(bench.event(&sessions[i % sessions.len()]))
                .await?;
        }
        driver.flush().await.map(|()| now_ms() * 1000)
    };
    let high = async {
        let mut pacer = crate::publish::Pacer::new(HIGH_RATE);
        for _ in 0..load.high_events {
            pacer.tick().await;
            let mut event = bench.event(load.urgent);
            event.session_type = 1;
            driver.submit(event).await?;
            driver.flush().await?;
        }
        Ok::<(), BenchError>(())
    };
    let arrived = async {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(300);
        while bench.delivered() + gateway.ledger.received() - base < expected {
            if tokio::time::Instant::now() > deadline {
                return Err(super::setup("the priority run did not finish in 300 s"));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(())
    };
    let (published_us, h, a) = tokio::join!(normal, high, arrived);
    let published_us = published_us?;
    h?;
    a?;
    let high = super::super::workload::latency(&[gateway.ledger.stats()]);
    let stats: Vec<_> = bench.gateways.iter().map(|g| g.ledger.stats()).collect();
    let last_us = stats.iter().map(|s| s.last_delivery_us).max().unwrap_or(0);
    let normal = super::super::workload::latency(&stats);
    driver.stop().await?;
    Ok(LaneLatency {
        high_p50_ms: quantile_ms(&high, 0.5),
        high_p99_ms: quantile_ms(&high, 0.99),
        normal_p50_ms: quantile_ms(&normal, 0.5),
        normal_p99_ms: quantile_ms(&normal, 0.99),
        backlog_drain_ms: ((last_us - published_us).max(0) / 1000) as f64,
    })
}
