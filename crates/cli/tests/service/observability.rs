//! What operators see: `/metrics` counts match what happened, `/readyz`
//! follows NATS going away and coming back, and an event's trace context
//! reaches the gateway.

use resonance_task::telemetry::trace::trace_id;
use resonance_testkit::fault_proxy::{FaultProxy, ProxyMode};

use resonance_testkit::harness::*;

/// Status and body; (0, "") while the port is not listening yet.
async fn get(url: &str) -> (u16, String) {
    match resonance_testkit::http_client()
        .build()
        .unwrap()
        .get(url)
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

/// The value of the sample of `name` whose labels include every `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    stack.session(&store, "g", &["a", "b", "z"]).await;
    let mut config = stack.config();
    let port = free_port();
    config.admin.listen = ([127, 0, 0, 1], port).into();
    let (nats, pod) = stack.pod(&config).await;
    for id in 1..=10 {
        publish(&nats, &config.consumer.topic, &event(id, "g", "a")).await;
    }
    nats.publish(config.consumer.topic.clone(), vec![0xff].into())
        .await
        .unwrap();
    eventually("delivered", || async {
        (1..=10).all(|id| g1.ledger.count("b", id) == 1)
    })
    .await;
    wait_settled(&nats, &config).await;

    let url = format!("http://127.0.0.1:{port}/metrics");
    let (status, text) = get(&url).await;
    assert_eq!(status, 200);
    let value = |name: &str, labels: &[&str]| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} in\n{text}"))
    };
    assert_eq!(
        value("resonance_task_events_total", &["outcome=\"acked\""]),
        10.0
    );
    assert_eq!(
        value(
            "resonance_task_events_total",
            &["outcome=\"dead_lettered\""]
        ),
        1.0
    );
    assert_eq!(
        value(
            "resonance_task_deliveries_total",
            &["outcome=\"delivered\"", "gateway_id=\"gateway-001\""]
        ),
        20.0
    );
    assert_eq!(
        value(
            "resonance_task_deliveries_total",
            &["outcome=\"offline\"", "gateway_id=\"none\""]
        ),
        10.0
    );
    assert_eq!(
        value("resonance_task_dispatch_duration_seconds_count", &[]),
        10.0
    );
    assert_eq!(
        value("resonance_task_publish_to_ack_seconds_count", &[]),
        10.0
    );
    assert_eq!(value("resonance_task_event_age_seconds_count", &[]), 10.0);
    assert!(
        value(
            "resonance_task_gateway_round_trip_seconds_count",
            &["gateway_id=\"gateway-001\""]
        ) >= 10.0
    );
    assert_eq!(value("resonance_task_registry_gateways", &[]), 1.0);
    assert_eq!(value("resonance_task_gateway_streams_open", &[]), 1.0);
    assert_eq!(value("resonance_task_events_in_flight", &[]), 0.0);
    let ratio = value("resonance_task_member_cache_hit_ratio", &[]);
    assert!((0.0..=1.0).contains(&ratio));
    eventually("lag gauge published", || async {
        let (_, text) = get(&url).await;
        sample(&text, "resonance_task_consumer_pending", &[]) == Some(0.0)
    })
    .await;
    let (status, body) = get(&format!("http://127.0.0.1:{port}/healthz")).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    pod.stop().await;
    g1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_nats() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a"]).await;
    stack.session(&store, "g", &["a", "b"]).await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], stack.nats.port).into())
        .await
        .unwrap();
    let mut config = stack.config();
    config.nats.url = resonance_task::config::SecretUrl::new(format!("nats://{}", proxy.addr));
    let port = free_port();
    config.admin.listen = ([127, 0, 0, 1], port).into();
    let pod = Pod::start(config.clone());
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    eventually("ready", || async { get(&readyz).await.0 == 200 }).await;
    proxy.set(ProxyMode::Cut);
    eventually("not ready while NATS is cut", || async {
        let (status, body) = get(&readyz).await;
        status == 503 && body.contains("\"nats_connected\":false")
    })
    .await;
    assert_eq!(
        get(&format!("http://127.0.0.1:{port}/healthz")).await.0,
        200,
        "still alive"
    );
    proxy.set(ProxyMode::Pass);
    eventually("ready again", || async { get(&readyz).await.0 == 200 }).await;
    pod.stop().await;
    g1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_reaches_the_gateway() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    stack.session(&store, "g", &["a", "b"]).await;
    let config = stack.config();
    let (nats, pod) = stack.pod(&config).await;
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut e = event(1, "g", "a");
    e.trace_headers
        .insert("traceparent".into(), incoming.into());
    publish(&nats, &config.consumer.topic, &e).await;
    eventually("delivered", || async { g1.ledger.count("b", 1) == 1 }).await;
    let forwarded = g1
        .ledger
        .traceparent(1)
        .expect("the push carried trace context");
    assert_eq!(
        trace_id(&forwarded),
        trace_id(incoming),
        "same trace: {forwarded}"
    );
    assert_ne!(
        forwarded, incoming,
        "a new span of the pod's, not the publisher's"
    );
    // An event without context still starts a trace of its own.
    publish(&nats, &config.consumer.topic, &event(2, "g", "a")).await;
    eventually("delivered", || async { g1.ledger.count("b", 2) == 1 }).await;
    let own = g1
        .ledger
        .traceparent(2)
        .expect("context for untraced events too");
    assert_ne!(trace_id(&own), trace_id(incoming));
    pod.stop().await;
    g1.stop().await;
}

/// A pod whose stderr goes to a file (a container runtime, a log shipper)
/// writes plain text: terminal colour codes would end up in every stored
/// line and in every search over them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_logging_to_a_file_writes_no_terminal_codes() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    stack.session(&store, "g", &["a", "b"]).await;
    let config = stack.config();
    let nats = stack.nats().await;
    let pod = PodProcess::spawn(&config);
    wait_consuming(&nats, &config).await;
    publish(&nats, &config.consumer.topic, &event(1, "g", "a")).await;
    eventually("delivered", || async { g1.ledger.count("b", 1) == 1 }).await;
    pod.signal("TERM");
    let (status, log) = pod.wait_with_log().await;
    assert!(status.success(), "{log}");
    assert!(log.contains("INFO"), "the pod logged at info: {log}");
    let coloured: Vec<&str> = log.lines().filter(|l| l.contains('\x1b')).collect();
    assert!(
        coloured.is_empty(),
        "{} of {} lines carry terminal codes, e.g. {:?}",
        coloured.len(),
        log.lines().count(),
        coloured[0]
    );
    g1.stop().await;
}

/// Dashboard panels whose query is empty on a healthy system, and why.
const EMPTY_UNTIL_SOMETHING_FAILS: &[(&str, &str)] = &[
    (
        "Failed pushes by gateway",
        "counts failed pushes; none fail here",
    ),
    (
        "Reconnects by dependency",
        "counts reconnects to NATS, Redis, etcd or a gateway; none here",
    ),
];

/// Alerts that stay quiet on a healthy system (the dead-letter alert is
/// made to go pending on purpose).
const QUIET_WHEN_HEALTHY: &[&str] = &[
    "ResonanceConsumerLagRising",
    "ResonanceDeliveryFailureRatio",
    "ResonanceNoGatewaysRegistered",
    "ResonanceTaskPodNotReady",
];

/// A private Prometheus scrapes a live pod and gateway while events flow,
/// with the shipped alert rules loaded. Every dashboard panel's query
/// returns series (those listed in `EMPTY_UNTIL_SOMETHING_FAILS` only
/// evaluate), every alert rule evaluates without error, a dead letter
/// makes `ResonanceDeadLettersGrowing` go pending, and the other alerts
/// stay inactive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_live_pods_and_every_panel_and_alert_evaluates() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let gateway_http = free_port();
    let mut opts = stack.gateway_options("gateway-001", &["a", "b"]);
    opts.http_listen = Some(([127, 0, 0, 1], gateway_http).into());
    let g1 = resonance_reference_gateway::ReferenceGateway::start(opts)
        .await
        .unwrap();
    stack.session(&store, "g", &["a", "b", "z"]).await;
    let mut config = stack.config();
    let admin = free_port();
    config.admin.listen = ([127, 0, 0, 1], admin).into();
    let (nats, pod) = stack.pod(&config).await;

    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let rules = repo.join("deploy/prometheus/alerts.yml");
    let prometheus = resonance_testkit::servers::prometheus_server(&format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
         rule_files: [{rules}]\n\
         scrape_configs:\n\
         - job_name: resonance-task\n  static_configs: [{{targets: ['127.0.0.1:{admin}']}}]\n\
         - job_name: resonance-gateway\n  static_configs: [{{targets: ['127.0.0.1:{gateway_http}']}}]\n",
        rules = rules.display()
    ))
    .await
    .expect("prometheus starts (Debian's prometheus package)");
    let api = format!("http://127.0.0.1:{}/api/v1", prometheus.port);

    // Traffic for as long as the test looks.
    let traffic = {
        let nats = nats.clone();
        let topic = config.consumer.topic.clone();
        tokio::spawn(async move {
            for id in 1.. {
                publish(&nats, &topic, &event(id, "g", "a")).await;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
    };

    let api_get = |path: String| {
        let url = format!("{api}/{path}");
        async move {
            let (status, body) = get(&url).await;
            assert_eq!(status, 200, "{url}: {body}");
            serde_json::from_str::<serde_json::Value>(&body).unwrap()
        }
    };
    let query = |expr: String| {
        let encoded: String = url::form_urlencoded::byte_serialize(expr.as_bytes()).collect();
        let answer = api_get(format!("query?query={encoded}"));
        async move {
            let body = answer.await;
            assert_eq!(body["status"], "success", "{expr}: {body}");
            body["data"]["result"].as_array().unwrap().len()
        }
    };
    eventually("both targets scraped and up", || async {
        query("up == 1".into()).await == 2
    })
    .await;
    // A pod that has been scraped dead-letters an undecodable payload: the
    // alert must see it (a counter that only appears with its first
    // increment starts at 1, and `increase` would never see it rise).
    nats.publish(config.consumer.topic.clone(), vec![0xff].into())
        .await
        .unwrap();

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo.join("deploy/grafana/dashboards/resonance-task.json"))
            .unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap().to_string();
            if EMPTY_UNTIL_SOMETHING_FAILS.iter().any(|(t, _)| *t == title) {
                query(expr).await;
                continue;
            }
            eventually(&format!("panel {title:?} has series: {expr}"), || {
                let expr = expr.clone();
                let query = &query;
                async move { query(expr).await > 0 }
            })
            .await;
        }
    }

    let rules_of = || async {
        let body = api_get("rules".into()).await;
        body["data"]["groups"][0]["rules"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    eventually("the dead-letter alert goes pending", || async {
        rules_of()
            .await
            .iter()
            .any(|r| r["name"] == "ResonanceDeadLettersGrowing" && r["state"] == "pending")
    })
    .await;
    let rules = rules_of().await;
    assert_eq!(rules.len(), 5, "{rules:?}");
    for rule in &rules {
        let name = rule["name"].as_str().unwrap();
        assert_eq!(rule["health"], "ok", "{name}: {rule}");
        if QUIET_WHEN_HEALTHY.contains(&name) {
            assert_eq!(rule["state"], "inactive", "{name}: {rule}");
            assert_eq!(
                query(rule["query"].as_str().unwrap().into()).await,
                0,
                "{name}"
            );
        }
    }
    traffic.abort();
    pod.stop().await;
    g1.stop().await;
}
