//! The etcd registry watch: instances come and go, the map follows, and an
//! etcd outage keeps the last map serving until the watch resumes.

use std::time::Duration;

use etcd_client::PutOptions;
use resonance_task::lifecycle::Lifecycle;
use resonance_task::registry::{self, GatewayRegistry, instance_key};

use resonance_testkit::harness::*;

/// An etcd client of the stack and the registry key of `instance_id`.
async fn instance_key_of(stack: &Stack, instance_id: &str) -> (etcd_client::Client, String) {
    let config = stack.config();
    let client = registry::connect(&config.etcd).await.unwrap();
    let key = instance_key(
        &config.registry.namespace,
        &config.gateway_service_name.0,
        instance_id,
    );
    (client, key)
}

async fn put_instance(stack: &Stack, instance_id: &str, value: &str) {
    let (mut client, key) = instance_key_of(stack, instance_id).await;
    client.put(key, value, None::<PutOptions>).await.unwrap();
}

async fn delete_instance(stack: &Stack, instance_id: &str) {
    let (mut client, key) = instance_key_of(stack, instance_id).await;
    client.delete(key, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_puts_and_deletes_and_survives_an_etcd_restart() {
    let mut stack = Stack::start().await;
    put_instance(
        &stack,
        "gateway-service-001",
        r#"{"id":"gateway-service-001","name":"gateway-service","metadata":{"gateway_id":"gateway-001"},"endpoints":["grpc://10.0.0.5:9091"]}"#,
    )
    .await;
    // Another service's instance under a sibling prefix is not a gateway.
    let config = stack.config();
    let mut client = registry::connect(&config.etcd).await.unwrap();
    client
        .put(
            "/resonance/services/logic-service/logic-1",
            r#"{"id":"logic-1","endpoints":["grpc://10.0.0.9:1"]}"#,
            None,
        )
        .await
        .unwrap();

    let life = Lifecycle::new();
    let registry = GatewayRegistry::spawn(
        &config.etcd,
        &config.registry,
        &config.gateway_service_name,
        &life,
    );
    tokio::time::timeout(PATIENCE, registry.wait_synced())
        .await
        .unwrap();
    let map = registry.snapshot();
    assert_eq!(
        map.resolve("gateway-001").unwrap().uri,
        "http://10.0.0.5:9091"
    );
    assert!(map.resolve("logic-1").is_none());
    assert_eq!(map.len(), 1);

    // No gateway_id metadata: the instance id names the gateway.
    put_instance(
        &stack,
        "gw-plain",
        r#"{"id":"gw-plain","endpoints":["10.0.0.6:9091"]}"#,
    )
    .await;
    eventually("fallback to instance id", || async {
        registry.snapshot().resolve("gw-plain").is_some()
    })
    .await;
    // The gateway moves.
    put_instance(
        &stack,
        "gateway-service-001",
        r#"{"id":"gateway-service-001","metadata":{"gateway_id":"gateway-001"},"endpoints":["grpc://10.0.0.7:9091"]}"#,
    )
    .await;
    eventually("move seen", || async {
        registry
            .snapshot()
            .resolve("gateway-001")
            .map(|e| e.uri.clone())
            .as_deref()
            == Some("http://10.0.0.7:9091")
    })
    .await;
    delete_instance(&stack, "gw-plain").await;
    eventually("delete seen", || async {
        registry.snapshot().resolve("gw-plain").is_none()
    })
    .await;

    // etcd goes away: the last known map keeps serving.
    stack.etcd.kill();
    // Let the outage last long enough for the watch to fail and retry.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        registry.snapshot().resolve("gateway-001").is_some(),
        "served from memory while etcd is down"
    );
    stack.etcd.start().await.unwrap();
    put_instance(
        &stack,
        "gw-late",
        r#"{"id":"gw-late","endpoints":["grpc://10.0.0.8:1"]}"#,
    )
    .await;
    eventually("watch resumed after the restart", || async {
        registry.snapshot().resolve("gw-late").is_some()
    })
    .await;
    assert!(registry.snapshot().resolve("gateway-001").is_some());

    life.drain(Duration::from_secs(5), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_gateway_registers_and_deregisters() {
    let stack = Stack::start().await;
    let config = stack.config();
    let life = Lifecycle::new();
    let registry = GatewayRegistry::spawn(
        &config.etcd,
        &config.registry,
        &config.gateway_service_name,
        &life,
    );
    let g = stack.gateway("gateway-042", &["a"]).await;
    let expected = format!("http://127.0.0.1:{}", g.grpc_addr.port());
    eventually("registered", || async {
        registry
            .snapshot()
            .resolve("gateway-042")
            .map(|e| e.uri.clone())
            == Some(expected.clone())
    })
    .await;
    let e = registry.snapshot().resolve("gateway-042").cloned().unwrap();
    assert_eq!(e.instance_id, "gateway-service-gateway-042");
    g.stop().await;
    eventually("deregistered on stop", || async {
        registry.snapshot().resolve("gateway-042").is_none()
    })
    .await;
    life.drain(Duration::from_secs(5), None).await;
}
