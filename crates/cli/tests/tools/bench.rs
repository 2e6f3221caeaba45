//! The benchmark itself, run small: every mode delivers exactly what it
//! submitted, and the report carries the figures and ratios the README
//! quotes. (Figures are not checked here: performance is measured by the
//! benchmark, not asserted by tests.)

use resonance_devtools::bench::{self, BenchOptions, Mode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_delivers_what_it_submitted() {
    let report = bench::run(BenchOptions {
        modes: Mode::ALL.to_vec(),
        group_size: 40,
        gateways: 2,
        deliveries: 4_000,
        latency_group_size: 10,
        latency_seconds: 0.5,
        progress: false,
        ..Default::default()
    })
    .await
    .expect("bench runs");
    for mode in Mode::ALL {
        let r = &report.modes[mode.key()];
        assert_eq!(r.deliveries, r.events as u64 * 40, "{mode}");
        assert!(
            r.deliveries_per_sec > 0.0 && r.p99_ms >= r.p50_ms,
            "{mode}: {r:?}"
        );
    }
    assert_eq!(
        report.modes["serial"].events, 10,
        "a tenth of the deliveries"
    );
    assert!(report.batch_vs_serial.is_some() && report.batch_vs_floor.is_some());
    let latency = report.latency_at_half_peak.as_ref().expect("latency run");
    assert!(latency.deliveries > 0 && latency.events_per_sec > 0.0);
    let json = serde_json::to_value(&report).unwrap();
    for key in ["deliveries_per_sec", "events_per_sec", "p50_ms", "p99_ms"] {
        assert!(json["modes"]["batch"][key].is_number(), "{key}");
        assert!(json["modes"]["floor_js"][key].is_number(), "{key}");
    }
    assert!(report.to_text().contains("batch_vs_serial"));
}

/// `--sessions`: the throughput run's events go round-robin over as many
/// sessions as asked, more than the users make up, and every mode (the
/// floor too, which knows sessions only from the benchmark) delivers all
/// of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_spreads_its_events_over_the_sessions_asked_for() {
    let report = bench::run(BenchOptions {
        modes: vec![Mode::Serial, Mode::Batch, Mode::FloorJs, Mode::Floor],
        group_size: 2,
        gateways: 2,
        deliveries: 6_000,
        sessions: Some(2_500),
        latency_group_size: 10,
        latency_seconds: 0.2,
        progress: false,
        ..Default::default()
    })
    .await
    .expect("bench runs");
    assert_eq!(report.sessions, 2_500);
    for (mode, r) in &report.modes {
        assert_eq!(r.deliveries, r.events as u64 * 2, "{mode}");
    }
    assert_eq!(report.modes["batch"].events, 3_000);
    assert!(report.to_text().contains("(2500 sessions)"));
    assert_eq!(serde_json::to_value(&report).unwrap()["sessions"], 2_500);

    let refused = bench::run(BenchOptions {
        sessions: Some(0),
        ..small_batch_run()
    })
    .await
    .expect_err("no sessions is refused");
    assert!(refused.to_string().contains("sessions"), "{refused}");
}

/// A small batch-mode run, for the side-by-side comparisons.
fn small_batch_run() -> BenchOptions {
    BenchOptions {
        modes: vec![Mode::Batch],
        group_size: 40,
        gateways: 2,
        deliveries: 4_000,
        latency_group_size: 10,
        latency_seconds: 0.2,
        progress: false,
        ..Default::default()
    }
}

/// `--tls`: the batch mode over mutual TLS delivers everything it submits,
/// beside a plaintext run of the same size, over the sessions asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_comparison_delivers_over_mutual_tls() {
    let report = bench::run(BenchOptions {
        tls: true,
        sessions: Some(3),
        ..small_batch_run()
    })
    .await
    .expect("bench runs");
    let tls = report.tls.as_ref().expect("TLS comparison");
    assert_eq!(tls.mtls.deliveries, tls.mtls.events as u64 * 40);
    assert_eq!(tls.plain.events, tls.mtls.events, "same workload");
    assert_eq!(tls.sessions, 3, "--sessions");
    assert!(tls.mtls_vs_plain > 0.0, "{tls:?}");
    assert!(report.to_text().contains("mtls_vs_plain"));
}

/// `--cluster`: the batch mode on clustered engines (R3 streams, a Redis
/// Cluster, 3 etcd members) delivers everything it submits, beside single
/// servers, over the sessions asked for, and the report carries
/// `cluster_vs_single` at the top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_comparison_delivers_on_clustered_engines() {
    let report = bench::run(BenchOptions {
        cluster: true,
        sessions: Some(3),
        ..small_batch_run()
    })
    .await
    .expect("bench runs");
    let cluster = report.cluster.as_ref().expect("cluster comparison");
    assert_eq!(
        cluster.cluster.deliveries,
        cluster.cluster.events as u64 * 40
    );
    assert_eq!(
        cluster.single.events, cluster.cluster.events,
        "same workload"
    );
    assert_eq!(cluster.sessions, 3, "--sessions");
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["cluster_vs_single"].as_f64().unwrap() > 0.0, "{json}");
    assert!(report.to_text().contains("cluster_vs_single"));
}

/// `--mix`: every mode runs the same sequence of session sizes (serial its
/// first part), delivers exactly what it submitted, and the report carries
/// events/s, deliveries/s and p99 per mode, the batch-over-serial ratio and
/// the latency at half of the batch peak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_traffic_mix_runs_every_mode_on_one_sequence() {
    let spec: bench::MixSpec = "2x70,3-20x20,21-60x10".parse().unwrap();
    let report = bench::run(BenchOptions {
        modes: vec![],
        group_size: 2,
        gateways: 2,
        deliveries: 6_000,
        latency_seconds: 0.3,
        mix: Some(spec),
        progress: false,
        ..Default::default()
    })
    .await
    .expect("bench runs");
    let mix = report.mix.as_ref().expect("the mix ran");
    assert!(mix.mean_group_size > 2.0, "{mix:?}");
    for r in [&mix.serial, &mix.batch, &mix.floor_js, &mix.floor] {
        assert!(r.events > 0 && r.events_per_sec > 0.0, "{r:?}");
        assert!(r.deliveries as usize >= r.events * 2, "{r:?}");
    }
    assert_eq!(mix.batch.events, mix.floor.events, "same sequence");
    assert!(mix.serial.events < mix.batch.events, "serial runs a part");
    assert!(mix.batch_vs_serial > 0.0);
    assert!(mix.latency_at_half_peak.deliveries > 0);
    let json = serde_json::to_value(&report).unwrap();
    for mode in ["serial", "batch", "floor_js", "floor"] {
        for key in ["events_per_sec", "deliveries_per_sec", "p99_ms"] {
            assert!(json["mix"][mode][key].is_number(), "mix.{mode}.{key}");
        }
    }
    assert!(json["mix"]["batch_vs_serial"].is_number());
    assert!(json["mix"]["latency_at_half_peak"]["p99_ms"].is_number());
    assert!(report.to_text().contains("mix 2x70,3-20x20,21-60x10"));
}

/// A finished run says nothing it need not: the drivers and gateways stop
/// while the servers they talk to are still up, so no warning about a
/// closed connection, a route left behind or a lease not revoked follows
/// the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_run_ends_without_warnings() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_resonance-task"))
        .args([
            "bench",
            "--modes",
            "serial,batch",
            "--group-size",
            "10",
            "--gateways",
            "2",
            "--deliveries",
            "2000",
            "--latency-group-size",
            "10",
            "--latency-seconds",
            "0.3",
            "--no-progress",
        ])
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("batch_vs_serial"),
        "the report is printed"
    );
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("WARN")).collect();
    assert!(warnings.is_empty(), "{}", warnings.join("\n"));
}
