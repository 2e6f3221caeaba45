//! Large groups under pressure: a task pod of this binary, as its own
//! process, fans out a burst of events to sessions of 100,000 members while
//! one gateway answers slowly; its resident memory is sampled throughout.
//! Memory must stay bounded because the fan-out works window by window and
//! a full gateway stream holds the next window back.

use std::time::Duration;

use serde::Serialize;

use super::drivers::pod_config;
use super::{Bench, BenchError, Mode, Session, setup};
use resonance_testkit::servers::LocalServer;

#[derive(Debug, Clone, Serialize)]
pub struct StormResult {
    pub group_size: usize,
    pub events: usize,
    pub deliveries: u64,
    /// Every answer of one gateway was held this long.
    pub slow_gateway_delay_ms: u64,
    pub elapsed_s: f64,
    /// Highest resident memory of the pod process (VmHWM).
    pub peak_rss_mib: f64,
}

/// Resident memory of `pid` now and at its peak, in MiB.
fn rss_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

pub(crate) async fn run(
    bench: &Bench,
    sessions: &[Session],
    events: usize,
    delay: Duration,
) -> Result<StormResult, BenchError> {
    let mut config = pod_config(&bench.config, Mode::Batch);
    config.consumer.topic = "resonance.bench.storm.v1".into();
    config.consumer.stream = "BENCH_STORM".into();
    config.consumer.queue_group = "bench-storm".into();
    let mut env = crate::chaos::env_for(&config);
    let prefix = resonance_task::config::ENV_PREFIX;
    for (key, value) in [
        ("CONSUMER__TOPIC", config.consumer.topic.clone()),
        ("CONSUMER__STREAM", config.consumer.stream.clone()),
        ("CONSUMER__QUEUE_GROUP", config.consumer.queue_group.clone()),
        ("ADMIN__ENABLED", "false".into()),
        ("LOG__LEVEL", "warn".into()),
    ] {
        env.retain(|(k, _)| *k != format!("{prefix}{key}"));
        env.push((format!("{prefix}{key}"), value));
    }
    let binary = std::env::current_exe().map_err(setup)?;
    let pod = LocalServer::process(
        "pod",
        binary.display().to_string(),
        vec!["run".into()],
        env,
        0,
    )
    .await?;
    let pid = pod
        .pid()
        .ok_or_else(|| setup("the pod process did not start"))?;
    let nats = resonance_task::nats::connect(&config.nats, "resonance-task-bench")
        .await
        .map_err(setup)?;
    super::drivers::wait_consuming(&nats, &config).await?;

    let slow = &bench.gateways[0];
    slow.set_reply_delay(delay);
    let per_event = sessions[0].members.len() as u64;
    let expected = per_event * events as u64;
    let base = bench.delivered();
    let started = tokio::time::Instant::now();
    for i in 0..events {
        let event = bench.event(&sessions[i % sessions.len()]);
        nats.publish(
            config.consumer.topic.clone(),
            prost::Message::encode_to_vec(&event).into(),
        )
        .await
        .map_err(setup)?;
    }
    nats.flush().await.map_err(setup)?;
    let mut peak = 0f64;
    let waiting = bench.wait_for(Mode::Batch, base, expected, bench.progress);
    tokio::pin!(waiting);
    let mut sample = tokio::time::interval(Duration::from_millis(100));
    let waited = loop {
        tokio::select! {
            r = &mut waiting => break r,
            _ = sample.tick() => {
                if let Some((now, hwm)) = rss_mib(pid) {
                    peak = peak.max(now).max(hwm);
                }
            }
        }
    };
    slow.set_reply_delay(Duration::ZERO);
    if let Some((now, hwm)) = rss_mib(pid) {
        peak = peak.max(now).max(hwm);
    }
    let mut pod = pod;
    pod.stop().await;
    waited?;
    Ok(StormResult {
        group_size: per_event as usize,
        events,
        deliveries: bench.delivered() - base,
        slow_gateway_delay_ms: delay.as_millis() as u64,
        elapsed_s: super::round(started.elapsed().as_secs_f64(), 2),
        peak_rss_mib: super::round(peak, 1),
    })
}
