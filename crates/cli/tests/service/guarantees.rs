//! Delivery guarantees on real servers: redeliveries and duplicate
//! publishes reach nobody twice, a killed pod loses nothing, SIGTERM drains,
//! and the grace period hands unfinished events back at once.

use std::time::Duration;

use resonance_reference_gateway::ReferenceGateway;
use resonance_testkit::fault_proxy::ProxyMode;

use resonance_testkit::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_pushes_only_to_recipients_not_yet_reached() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    let (g2, proxy) = stack.gateway_behind_proxy("gateway-002", &["c"]).await;
    stack.session(&store, "g", &["a", "b", "c"]).await;
    let mut config = stack.config();
    config.consumer.max_retry = 0;
    config.consumer.retry_interval = Duration::from_millis(200);
    config.consumer.retry_backoff_max = Duration::from_millis(200);
    let nats = stack.nats().await;
    proxy.set(ProxyMode::Cut);
    let pod = Pod::start(config.clone());
    wait_consuming(&nats, &config).await;
    publish(&nats, &config.consumer.topic, &event(1, "g", "a")).await;
    eventually("g1's recipients reached", || async {
        g1.ledger.count("a", 1) == 1 && g1.ledger.count("b", 1) == 1
    })
    .await;
    eventually("the event was redelivered while g2 was cut", || async {
        consumer_info(&nats, &config).await.num_redelivered >= 1
    })
    .await;
    proxy.set(ProxyMode::Pass);
    eventually("c reached after g2 came back", || async {
        g2.ledger.count("c", 1) == 1
    })
    .await;
    wait_settled(&nats, &config).await;
    assert_eq!(g1.ledger.count("a", 1), 1, "a was not pushed again");
    assert_eq!(g1.ledger.count("b", 1), 1, "b was not pushed again");
    assert_eq!(g1.ledger.stats().received, 2);
    pod.stop().await;
    g1.stop().await;
    g2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_publish_is_acked_without_pushing() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    stack.session(&store, "g", &["a", "b"]).await;
    let config = stack.config();
    let (nats, pod) = stack.pod(&config).await;
    let e = event(9, "g", "a");
    publish(&nats, &config.consumer.topic, &e).await;
    eventually("delivered", || async { g1.ledger.count("b", 9) == 1 }).await;
    wait_settled(&nats, &config).await;
    publish(&nats, &config.consumer.topic, &e).await;
    eventually("the copy was consumed", || async {
        let info = consumer_info(&nats, &config).await;
        info.ack_floor.stream_sequence == 2 && info.num_ack_pending == 0
    })
    .await;
    assert_eq!(g1.ledger.count("a", 9), 1);
    assert_eq!(g1.ledger.count("b", 9), 1);
    pod.stop().await;
    g1.stop().await;
}

/// Pods of an earlier version marked a settled event with a key of its
/// own; while both versions share the stream (a rolling upgrade), a copy
/// of an event they settled is still a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_an_event_an_earlier_version_settled_is_not_pushed() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    stack.session(&store, "g", &["a", "b"]).await;
    let config = stack.config();
    let redis = resonance_task::store::RedisClient::connect(&config.redis)
        .await
        .unwrap();
    let _: () = redis
        .query(
            redis::cmd("SET")
                .arg(resonance_task::store::settled_key(5))
                .arg(1)
                .arg("PX")
                .arg(60_000),
        )
        .await
        .unwrap();
    let (nats, pod) = stack.pod(&config).await;
    publish(&nats, &config.consumer.topic, &event(5, "g", "a")).await;
    publish(&nats, &config.consumer.topic, &event(6, "g", "a")).await;
    eventually("the next event delivered", || async {
        g1.ledger.count("b", 6) == 1
    })
    .await;
    wait_settled(&nats, &config).await;
    assert_eq!(
        g1.ledger.count("a", 5),
        0,
        "the settled event was not pushed"
    );
    assert_eq!(
        g1.ledger.count("b", 5),
        0,
        "the settled event was not pushed"
    );
    assert_eq!(
        g1.ledger.stats().received,
        2,
        "only the next event's pushes"
    );
    pod.stop().await;
    g1.stop().await;
}

/// A pod SIGKILLed in the middle of large fan-outs: a new pod finishes the
/// work, every recipient is reached, and progress tracking keeps repeats to
/// the pushes that were in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pod_loses_nothing() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let users: Vec<String> = (0..300).map(|i| format!("u{i:03}")).collect();
    let held: Vec<&str> = users.iter().map(String::as_str).collect();
    let g1 = stack.gateway("gateway-001", &held).await;
    stack.session(&store, "big", &held).await;
    let mut config = stack.config();
    config.consumer.ack_wait = Duration::from_secs(2);
    config.gateway.max_in_flight = 256;
    let nats = stack.nats().await;
    let first = PodProcess::spawn(&config);
    wait_consuming(&nats, &config).await;
    let events = 100;
    for id in 1..=events {
        publish(&nats, &config.consumer.topic, &event(id, "big", "u000")).await;
    }
    eventually("the first pod is mid-way", || async {
        g1.ledger.stats().received >= 3000
    })
    .await;
    first.signal("KILL");
    assert!(!first.wait().await.success());
    let second = Pod::start(config.clone());
    let expected = events as u64 * 300;
    eventually("every recipient reached", || async {
        g1.ledger.stats().distinct == expected
    })
    .await;
    wait_settled(&nats, &config).await;
    let dups = g1.ledger.stats().duplicates;
    eprintln!("after SIGKILL: {expected} deliveries, {dups} duplicates");
    // Only pushes the gateway had received but the dead pod had not yet
    // recorded can repeat, and a push keeps its share of the stream window
    // until its outcome is recorded: at most gateway.max_in_flight, or one
    // batch-v1 frame if that is larger (twice that allows for the frame the
    // kill interrupted on the wire). Without progress tracking every
    // recipient of every unacked event would.
    let frame = config.dispatch.batch_size.min(users.len());
    let bound = 2 * config.gateway.max_in_flight.max(frame) as u64;
    assert!(dups <= bound, "duplicates {dups} above {bound}");
    second.stop().await;
    g1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_events_and_exits_cleanly() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let mut opts = stack.gateway_options("gateway-001", &["a", "b"]);
    opts.reply_delay = Duration::from_millis(500);
    let g1 = ReferenceGateway::start(opts).await.unwrap();
    stack.session(&store, "g", &["a", "b"]).await;
    let config = stack.config();
    let nats = stack.nats().await;
    let pod = PodProcess::spawn(&config);
    wait_consuming(&nats, &config).await;
    for id in 1..=5 {
        publish(&nats, &config.consumer.topic, &event(id, "g", "a")).await;
    }
    eventually("pushes in flight", || async {
        g1.ledger.stats().max_pending >= 1
    })
    .await;
    pod.signal("TERM");
    let status = pod.wait().await;
    assert!(status.success(), "exit 0 after draining: {status}");
    for id in 1..=5 {
        assert_eq!(g1.ledger.count("b", id), 1, "msg {id} finished before exit");
    }
    wait_settled(&nats, &config).await;
    g1.stop().await;
}

/// Past the grace period, unfinished events go back to NATS at once: with
/// an ack_wait of ten minutes, only the hand-back lets the next pod deliver.
/// The stopped handler's claim lapses once its queued push is answered or
/// timed out (request_timeout after the streams' drain allowance), not
/// after ack_wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_period_hands_unfinished_events_back() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let mut opts = stack.gateway_options("gateway-001", &["a", "b"]);
    opts.reply_delay = Duration::from_secs(3);
    let g1 = ReferenceGateway::start(opts).await.unwrap();
    stack.session(&store, "g", &["a", "b"]).await;
    let mut config = stack.config();
    config.consumer.ack_wait = Duration::from_secs(600);
    config.consumer.shutdown_grace = Duration::from_millis(300);
    config.gateway.request_timeout = Duration::from_secs(5);
    let nats = stack.nats().await;
    let first = PodProcess::spawn(&config);
    wait_consuming(&nats, &config).await;
    publish(&nats, &config.consumer.topic, &event(1, "g", "a")).await;
    eventually("push in flight", || async {
        g1.ledger.stats().max_pending >= 1
    })
    .await;
    first.signal("TERM");
    assert!(first.wait().await.success());
    let second = Pod::start(config.clone());
    wait_settled(&nats, &config).await;
    assert!(g1.ledger.count("b", 1) >= 1);
    second.stop().await;
    g1.stop().await;
}
