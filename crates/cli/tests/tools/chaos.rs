//! A small chaos run in the suite, on the shipped defaults: pods and
//! gateways as processes, every dependency failing in turn, rolling SIGTERM
//! restarts with a backlog, nothing lost or stranded, the work queue empty
//! and every poison payload dead-lettered. `resonance-task chaos` runs the
//! full-size version.

use std::time::Duration;

use resonance_devtools::chaos::{ChaosOptions, run};

/// A small run on single servers or clustered engines, checked the same
/// way.
async fn small_run(cluster: bool) -> resonance_devtools::chaos::ChaosReport {
    resonance_task::telemetry::init(&resonance_task::config::LogConfig {
        level: "warn".into(),
        ..Default::default()
    });
    let report = run(ChaosOptions {
        binary: env!("CARGO_BIN_EXE_resonance-task").into(),
        events: 600,
        rate: 50.0,
        users: 600,
        sessions: "2x50,20x20,100x5".parse().unwrap(),
        postgres_admin_url: "postgres://postgres@127.0.0.1:5432/test".into(),
        fault_gap: Duration::from_millis(1200),
        sql_cut: Duration::from_secs(2),
        gateway_stall: Duration::from_secs(1),
        poison_every: 20,
        settle_timeout: Duration::from_secs(60),
        rng_seed: 3,
        cluster,
    })
    .await
    .expect("chaos run completes");
    eprintln!("{}", report.to_text());
    assert!(
        report.expected > 5_000,
        "a meaningful load: {}",
        report.expected
    );
    assert!(
        report.rolling_restarts >= 2,
        "every pod restarted with a backlog"
    );
    assert_eq!(report.faults_injected, 7 + report.rolling_restarts);
    assert_eq!(report.lost, 0, "nothing lost");
    assert_eq!(report.stranded, 0, "nothing stranded");
    assert_eq!(report.stream_left, 0, "the work queue is empty");
    assert_eq!(
        (report.consumer_pending, report.consumer_ack_pending),
        (0, 0),
        "nothing pending or unacked"
    );
    assert!(report.passed());
    assert_eq!(report.unexpected, 0);
    assert_eq!(report.poison_injected, 30);
    assert_eq!(
        report.poison_dead_lettered, 30,
        "every poison payload dead-lettered"
    );
    assert_eq!(
        report.valid_dead_lettered, 0,
        "no valid event was dead-lettered"
    );
    assert!(
        report.duplicate_pct <= 1.0,
        "duplicates {:.3}%",
        report.duplicate_pct
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_chaos_run_loses_nothing() {
    let report = small_run(false).await;
    assert_eq!(report.node_kills, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_chaos_run_on_clustered_engines_loses_nothing() {
    let report = small_run(true).await;
    assert_eq!(
        report.node_kills, 3,
        "the stream's NATS leader, a Redis master and the etcd leader"
    );
}
