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
use resonance_task::store::SessionSeed;

/// Normal load offered, relative to the measured batch peak.
const OVERLOAD: f64 = 1.2;
/// High-priority events per second.
const HIGH_RATE: f64 = 20.0;

#[derive(Debug, Clone, Serialize)]
pub struct LaneLatency {
    pub high_p50_ms: f64,
    pub high_p99_ms: f64,
    pub normal_p50_ms: f64,
    pub normal_p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PriorityResult {
    pub normal_group_size: usize,
    /// Normal events offered per second (above the peak).
    pub normal_events_per_sec: f64,
    pub normal_events: usize,
    pub high_events: usize,
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
    let rate = peak_events_per_sec * OVERLOAD;
    let normal_events = ((rate * seconds) as usize).max(sessions.len());
    let high_events = ((HIGH_RATE * seconds) as usize).max(1);
    let mut measured = Vec::new();
    for lanes in [true, false] {
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
        let expected = (normal_events * sessions[0].members.len()) as u64 + high_events as u64 * 2;
        let normal = async {
            let mut pacer = crate::publish::Pacer::new(rate);
            for i in 0..normal_events {
                pacer.tick().await;
                driver
                    .submit(bench.event(&sessions[i % sessions.len()]))
                    .await?;
            }
            driver.flush().await
        };
        let high = async {
            let mut pacer = crate::publish::Pacer::new(HIGH_RATE);
            for _ in 0..high_events {
                pacer.tick().await;
                let mut event = bench.event(&urgent);
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
        let (n, h, a) = tokio::join!(normal, high, arrived);
        n?;
        h?;
        a?;
        let high = super::super::workload::latency(&[gateway.ledger.stats()]);
        let stats: Vec<_> = bench.gateways.iter().map(|g| g.ledger.stats()).collect();
        let normal = super::super::workload::latency(&stats);
        measured.push(LaneLatency {
            high_p50_ms: quantile_ms(&high, 0.5),
            high_p99_ms: quantile_ms(&high, 0.99),
            normal_p50_ms: quantile_ms(&normal, 0.5),
            normal_p99_ms: quantile_ms(&normal, 0.99),
        });
        driver.stop().await?;
    }
    gateway.stop().await;
    let lanes_off = measured.pop().expect("two runs");
    let lanes_on = measured.pop().expect("two runs");
    Ok(PriorityResult {
        normal_group_size: sessions[0].members.len(),
        normal_events_per_sec: rate.round(),
        normal_events,
        high_events,
        lanes_on,
        lanes_off,
    })
}
