//! Dependency outages recover with no operator action and no loss: NATS
//! restarts, Redis and SQL cut off, etcd down, one gateway stalled.

use std::net::SocketAddr;
use std::time::Duration;

use resonance_reference_gateway::ReferenceGateway;
use resonance_task::config::{Config, SecretUrl};
use resonance_testkit::fault_proxy::{FaultProxy, ProxyMode};

use resonance_testkit::harness::*;

fn local(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("u{i:02}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_loses_and_repeats_nothing() {
    let mut stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let users = names(50);
    let held: Vec<&str> = users.iter().map(String::as_str).collect();
    let mut opts = stack.gateway_options("gateway-001", &held);
    opts.reply_delay = Duration::from_millis(20);
    let g1 = ReferenceGateway::start(opts).await.unwrap();
    stack.session(&store, "g", &held).await;
    let mut config = stack.config();
    config.consumer.ack_wait = Duration::from_secs(2);
    let (nats, pod) = stack.pod(&config).await;
    for id in 1..=30 {
        publish(&nats, &config.consumer.topic, &event(id, "g", "u00")).await;
    }
    eventually("some delivered", || async {
        g1.ledger.stats().received >= 100
    })
    .await;
    stack.nats.kill();
    stack.nats.start().await.unwrap();
    let expected = 30 * 50;
    eventually("all delivered after the restart", || async {
        g1.ledger.stats().distinct == expected
    })
    .await;
    wait_settled(&nats, &config).await;
    assert_eq!(
        g1.ledger.stats().duplicates,
        0,
        "acks lost in the restart were absorbed by dedup"
    );
    pod.stop().await;
    g1.stop().await;
}

/// With `proxy` (in front of one dependency) cut, events published for
/// session "g" are retried and redelivered, nothing reaches `g1`; once the
/// proxy passes again, every event is delivered exactly once.
async fn ride_out_a_cut(
    stack: &Stack,
    config: &Config,
    proxy: &FaultProxy,
    g1: &ReferenceGateway,
    what: &str,
) {
    let (nats, pod) = stack.pod(config).await;
    proxy.set(ProxyMode::Cut);
    for id in 1..=5 {
        publish(&nats, &config.consumer.topic, &event(id, "g", "a")).await;
    }
    eventually(
        &format!("events redelivered while {what} is cut"),
        || async { consumer_info(&nats, config).await.num_redelivered >= 1 },
    )
    .await;
    assert_eq!(
        g1.ledger.stats().received,
        0,
        "nothing pushed while {what} is cut"
    );
    proxy.set(ProxyMode::Pass);
    eventually(&format!("delivered after {what} is back"), || async {
        (1..=5).all(|id| g1.ledger.count("b", id) == 1)
    })
    .await;
    wait_settled(&nats, config).await;
    assert_eq!(g1.ledger.stats().duplicates, 0);
    pod.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_out_a_redis_outage() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    stack.session(&store, "g", &["a", "b"]).await;
    let proxy = FaultProxy::start(local(stack.redis.port)).await.unwrap();
    let mut config = stack.config();
    config.redis.addr = proxy.addr.to_string();
    config.consumer.retry_interval = Duration::from_millis(200);
    config.consumer.retry_backoff_max = Duration::from_millis(500);
    ride_out_a_cut(&stack, &config, &proxy, &g1, "Redis").await;
    g1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_serves_from_the_last_known_registry() {
    let mut stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    stack.session(&store, "g", &["a", "b"]).await;
    let config = stack.config();
    let (nats, pod) = stack.pod(&config).await;
    publish(&nats, &config.consumer.topic, &event(1, "g", "a")).await;
    eventually("delivered", || async { g1.ledger.count("b", 1) == 1 }).await;
    stack.etcd.kill();
    for id in 2..=6 {
        publish(&nats, &config.consumer.topic, &event(id, "g", "a")).await;
    }
    eventually("delivered while etcd is down", || async {
        (2..=6).all(|id| g1.ledger.count("b", id) == 1)
    })
    .await;
    wait_settled(&nats, &config).await;
    stack.etcd.start().await.unwrap();
    publish(&nats, &config.consumer.topic, &event(7, "g", "a")).await;
    eventually("delivered after etcd is back", || async {
        g1.ledger.count("b", 7) == 1
    })
    .await;
    pod.stop().await;
    g1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_out_an_sql_outage() {
    let stack = Stack::with_db(TestDb::postgres().await).await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    stack.session(&store, "g", &["a", "b"]).await;
    let proxy = FaultProxy::start(local(5432)).await.unwrap();
    let mut config = stack.config();
    config.database.url = SecretUrl::new(stack.db.url_via(proxy.addr.port()));
    config.database.acquire_timeout = Duration::from_secs(1);
    config.consumer.retry_interval = Duration::from_millis(200);
    config.consumer.retry_backoff_max = Duration::from_millis(500);
    ride_out_a_cut(&stack, &config, &proxy, &g1, "SQL").await;
    g1.stop().await;
    drop(store);
    stack.db.drop_database().await;
}

/// A stalled gateway holds up only its own recipients: events for other
/// gateways keep flowing, and its recipients are delivered once it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_gateway_does_not_hold_up_the_others() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    let (g2, proxy) = stack.gateway_behind_proxy("gateway-002", &["c"]).await;
    stack.session(&store, "mixed", &["a", "b", "c"]).await;
    stack.session(&store, "only-g1", &["a", "b"]).await;
    let mut config = stack.config();
    config.gateway.request_timeout = Duration::from_millis(500);
    config.consumer.retry_interval = Duration::from_millis(200);
    config.consumer.retry_backoff_max = Duration::from_millis(500);
    let (nats, pod) = stack.pod(&config).await;
    proxy.set(ProxyMode::Blackhole);
    for id in 1..=20 {
        publish(&nats, &config.consumer.topic, &event(id, "mixed", "a")).await;
    }
    for id in 101..=120 {
        publish(&nats, &config.consumer.topic, &event(id, "only-g1", "a")).await;
    }
    eventually("g1's traffic flows while g2 is stalled", || async {
        (101..=120).all(|id| g1.ledger.count("b", id) == 1)
            && (1..=20).all(|id| g1.ledger.count("b", id) == 1)
    })
    .await;
    assert_eq!(proxy.mode(), ProxyMode::Blackhole, "still stalled");
    proxy.set(ProxyMode::Pass);
    eventually("g2's recipients delivered after it recovers", || async {
        (1..=20).all(|id| g2.ledger.count("c", id) >= 1)
    })
    .await;
    wait_settled(&nats, &config).await;
    for id in 1..=20 {
        assert_eq!(
            g1.ledger.count("a", id),
            1,
            "g1's recipients were not pushed again"
        );
    }
    pod.stop().await;
    g1.stop().await;
    g2.stop().await;
}
