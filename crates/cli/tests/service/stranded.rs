//! Nothing stranded, nothing doubled: every event leaves the work queue
//! acked or dead-lettered with its reason, whatever the pods go through
//! (rolling restarts with a backlog, a missing dead-letter stream, a stuck
//! claim), and no second handler pushes an event while the first still
//! runs.

use std::time::Duration;

use async_nats::jetstream;
use resonance_task::config::Config;
use resonance_task::consumer::dlq;

use resonance_testkit::harness::*;

fn users(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("u{i:04}")).collect()
}

async fn stream_messages(nats: &async_nats::Client, stream: &str) -> u64 {
    let js = jetstream::new(nats.clone());
    let mut stream = js.get_stream(stream).await.expect("stream exists");
    stream.info().await.expect("stream info").state.messages
}

/// Waits until the work queue is empty and the consumer has nothing pending
/// or unacked.
async fn wait_drained(nats: &async_nats::Client, config: &Config) {
    wait_settled(nats, config).await;
    eventually("the work-queue stream is empty", || async {
        stream_messages(nats, &config.consumer.stream).await == 0
    })
    .await;
}

/// Rolling deploys with a backlog: a pod is SIGTERMed while most of the
/// events wait in its prefetch, a new one starts, again and again, more
/// times than `consumer.max_deliver`. A handback is not a failed attempt:
/// every event reaches every member and nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restarts_with_a_backlog_strand_nothing() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let members = users(10);
    let held: Vec<&str> = members.iter().map(String::as_str).collect();
    let g1 = stack
        .slow_gateway("gateway-001", &held, Duration::from_millis(150), true)
        .await;
    stack.session(&store, "s", &held).await;
    let mut config = stack.config();
    config.consumer.worker_count = 2;
    config.consumer.max_deliver = 2;
    let nats = stack.nats().await;
    let events = 80i64;
    let mut restarts = 0;
    let first = PodProcess::spawn(&config);
    wait_consuming(&nats, &config).await;
    for id in 1..=events {
        publish(&nats, &config.consumer.topic, &event(id, "s", "u0000")).await;
    }
    let mut pod = first;
    for round in 1..=4u64 {
        eventually("the pod is working through its backlog", || async {
            g1.ledger.stats().received >= round * 40
        })
        .await;
        pod.signal("TERM");
        let status = pod.wait().await;
        assert!(status.success(), "clean exit after SIGTERM: {status}");
        restarts += 1;
        pod = PodProcess::spawn(&config);
    }
    let expected = events as u64 * members.len() as u64;
    eventually("every member received every event", || async {
        g1.ledger.stats().distinct == expected
    })
    .await;
    wait_drained(&nats, &config).await;
    let js = jetstream::new(nats.clone());
    let letters = dlq::list(&js, &config.consumer).await.unwrap_or_default();
    assert!(letters.is_empty(), "nothing dead-lettered: {letters:?}");
    eprintln!(
        "{restarts} restarts: {expected} deliveries, {} duplicates",
        g1.ledger.stats().duplicates
    );
    pod.signal("TERM");
    assert!(pod.wait().await.success());
    g1.stop().await;
}

/// SIGTERM while NATS is down: the pod cannot hand anything back, and it
/// still exits within the grace period plus a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_nats_outage_is_bounded() {
    let mut stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack
        .slow_gateway("gateway-001", &["a", "b"], Duration::from_millis(200), true)
        .await;
    stack.session(&store, "g", &["a", "b"]).await;
    let mut config = stack.config();
    config.consumer.worker_count = 1;
    config.consumer.shutdown_grace = Duration::from_secs(2);
    let nats = stack.nats().await;
    let pod = PodProcess::spawn(&config);
    wait_consuming(&nats, &config).await;
    for id in 1..=50 {
        publish(&nats, &config.consumer.topic, &event(id, "g", "a")).await;
    }
    eventually("the pod is working", || async {
        g1.ledger.stats().received >= 2
    })
    .await;
    stack.nats.kill();
    pod.signal("TERM");
    let stopped = std::time::Instant::now();
    let status = pod.wait().await;
    let took = stopped.elapsed();
    assert!(status.success(), "clean exit: {status}");
    // Grace, then the hand-back and flush allowances of a few seconds each.
    assert!(
        took <= config.consumer.shutdown_grace + Duration::from_secs(15),
        "shutdown took {took:?}"
    );
    g1.stop().await;
}

/// The dead-letter stream was deleted by hand. An undecodable payload on
/// its last allowed attempt is not nak'ed into oblivion: the stream is
/// recreated and holds it, and the work queue is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_stream_is_recreated() {
    let stack = Stack::start().await;
    let mut config = stack.config();
    config.consumer.max_deliver = 2;
    config.consumer.retry_interval = Duration::from_millis(100);
    config.consumer.retry_backoff_max = Duration::from_millis(100);
    let (nats, pod) = stack.pod(&config).await;
    let js = jetstream::new(nats.clone());
    js.delete_stream(&config.consumer.dead_letter_stream)
        .await
        .expect("dead-letter stream deleted");
    nats.publish(config.consumer.topic.clone(), vec![0xff, 0x01, 0x02].into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    wait_dead_lettered(&nats, &config, "the dead letter is stored", |d| {
        d.reason.contains("undecodable")
    })
    .await;
    wait_drained(&nats, &config).await;
    pod.stop().await;
}

/// A claim nobody releases (a handler that hung with its lease) keeps an
/// event "busy"; that is not a failure, but JetStream's own delivery limit
/// ends it. The message that reaches the limit is moved to the dead
/// letters as `max deliveries reached` instead of staying in the stream
/// with nobody to deliver it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_past_the_delivery_limit_is_dead_lettered() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    stack.session(&store, "g", &["a", "b"]).await;
    let mut config = stack.config();
    config.consumer.retry_interval = Duration::from_millis(100);
    config.consumer.retry_backoff_max = Duration::from_millis(100);
    config.consumer.max_deliver = 2;
    config.consumer.delivery_ceiling = 3;
    let redis = redis::Client::open(format!("redis://127.0.0.1:{}", stack.redis.port)).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(resonance_task::store::lease_key(77))
        .arg("a-handler-that-hung")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (nats, pod) = stack.pod(&config).await;
    publish(&nats, &config.consumer.topic, &event(77, "g", "a")).await;
    wait_dead_lettered(&nats, &config, "moved to the dead letters", |d| {
        d.msg_id == Some(77) && d.reason == "max deliveries reached"
    })
    .await;
    wait_drained(&nats, &config).await;
    assert_eq!(g1.ledger.count("b", 77), 0, "never pushed while claimed");
    pod.stop().await;
    g1.stop().await;
}

/// A fan-out longer than ack_wait keeps its claim: the same bytes
/// published again meanwhile are not pushed in parallel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_fan_out_keeps_its_claim() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let members = users(400);
    let held: Vec<&str> = members.iter().map(String::as_str).collect();
    let g1 = stack
        .slow_gateway("gateway-001", &held, Duration::from_secs(1), false)
        .await;
    stack.session(&store, "big", &held).await;
    let mut config = stack.config();
    config.consumer.ack_wait = Duration::from_secs(10);
    config.gateway.max_in_flight = 16;
    config.dispatch.push_chunk_size = 16;
    config.gateway.request_timeout = Duration::from_secs(30);
    let (nats, pod) = stack.pod(&config).await;
    let e = event(5, "big", "u0000");
    publish(&nats, &config.consumer.topic, &e).await;
    eventually("the fan-out is under way", || async {
        g1.ledger.stats().received >= 16
    })
    .await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(
        g1.ledger.stats().distinct < members.len() as u64,
        "the fan-out outlasts ack_wait"
    );
    publish(&nats, &config.consumer.topic, &e).await;
    eventually("every member reached", || async {
        g1.ledger.stats().distinct == members.len() as u64
    })
    .await;
    wait_drained(&nats, &config).await;
    assert_eq!(g1.ledger.stats().duplicates, 0, "no parallel pushes");
    pod.stop().await;
    g1.stop().await;
}

/// An event that ends before pushing (here: over a content limit) still
/// waits its turn, so the one after it cannot overtake the one before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_ends_early_keeps_its_place() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let members = users(12);
    let held: Vec<&str> = members.iter().map(String::as_str).collect();
    let g1 = stack
        .slow_gateway("gateway-001", &held, Duration::from_millis(100), false)
        .await;
    stack.session(&store, "s", &held).await;
    let mut config = stack.config();
    config.gateway.max_in_flight = 2;
    config.dispatch.push_chunk_size = 1;
    config.limits.max_content_bytes = 64;
    let (nats, pod) = stack.pod(&config).await;
    let (z, a, mut b, c) = (
        event(1, "s", "u0000"),
        event(2, "s", "u0000"),
        event(3, "s", "u0000"),
        event(4, "s", "u0000"),
    );
    b.content = "x".repeat(100);
    for e in [&z, &a, &b, &c] {
        publish(&nats, &config.consumer.topic, e).await;
    }
    eventually("A and C reached everyone", || async {
        members
            .iter()
            .all(|u| g1.ledger.count(u, 2) == 1 && g1.ledger.count(u, 4) == 1)
    })
    .await;
    for user in &members {
        let arrivals = g1.ledger.arrivals(user);
        let at = |id| arrivals.iter().position(|m| *m == id).unwrap();
        assert!(at(2) < at(4), "{user} got C before A: {arrivals:?}");
    }
    wait_drained(&nats, &config).await;
    pod.stop().await;
    g1.stop().await;
}

/// A backlog far longer than ack_wait, most of it waiting in the pod: no
/// event is redelivered, since none failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_events_are_not_redelivered() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack
        .slow_gateway("gateway-001", &["a", "b"], Duration::from_millis(400), true)
        .await;
    stack.session(&store, "g", &["a", "b"]).await;
    let mut config = stack.config();
    config.consumer.worker_count = 1;
    config.consumer.ack_wait = Duration::from_secs(2);
    config.priority.prefetch = 4;
    let (nats, pod) = stack.pod(&config).await;
    let events = 20;
    for id in 1..=events {
        publish(&nats, &config.consumer.topic, &event(id, "g", "a")).await;
    }
    eventually("every event delivered", || async {
        (1..=events).all(|id| g1.ledger.count("b", id) >= 1)
    })
    .await;
    wait_drained(&nats, &config).await;
    // Every delivery JetStream made is counted in the consumer sequence:
    // one per event means nothing was redelivered.
    let info = consumer_info(&nats, &config).await;
    assert_eq!(
        info.delivered.consumer_sequence, events as u64,
        "deliveries"
    );
    assert_eq!(g1.ledger.stats().duplicates, 0);
    pod.stop().await;
    g1.stop().await;
}

/// A `timestamp` of i64::MIN is passed through, not an overflow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extreme_timestamp_is_delivered() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    stack.session(&store, "g", &["a", "b"]).await;
    let config = stack.config();
    let (nats, pod) = stack.pod(&config).await;
    for (id, timestamp) in [(1, i64::MIN), (2, i64::MAX)] {
        let mut e = event(id, "g", "a");
        e.timestamp = timestamp;
        publish(&nats, &config.consumer.topic, &e).await;
    }
    eventually("both delivered", || async {
        g1.ledger.count("b", 1) == 1 && g1.ledger.count("b", 2) == 1
    })
    .await;
    wait_drained(&nats, &config).await;
    pod.stop().await;
    g1.stop().await;
}

/// A gateway whose answers arrive just after `gateway.request_timeout`
/// (it stalled and resumed at the deadline): the answers on their way are
/// taken, so nobody is pushed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_just_past_the_deadline_are_not_pushed_again() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let mut config = stack.config();
    config.gateway.request_timeout = Duration::from_secs(2);
    let late = config.gateway.request_timeout + Duration::from_millis(100);
    for batch in [true, false] {
        let id = if batch { "gateway-001" } else { "gateway-002" };
        let session = format!("late-{id}");
        let g = stack.slow_gateway(id, &["a", "b", "c"], late, batch).await;
        stack.session(&store, &session, &["a", "b", "c"]).await;
        let (nats, pod) = stack.pod(&config).await;
        let msg_id = if batch { 1 } else { 2 };
        publish(&nats, &config.consumer.topic, &event(msg_id, &session, "a")).await;
        wait_drained(&nats, &config).await;
        for user in ["a", "b", "c"] {
            assert_eq!(g.ledger.count(user, msg_id), 1, "{user} via {id}");
        }
        pod.stop().await;
        g.stop().await;
    }
}

/// A burst of large payloads: what waits in the pod is bounded by
/// `priority.prefetch_bytes`, not only by the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_wait_within_the_byte_budget() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack
        .slow_gateway("gateway-001", &["a", "b"], Duration::from_millis(100), true)
        .await;
    stack.session(&store, "g", &["a", "b"]).await;
    let mut config = stack.config();
    config.consumer.worker_count = 1;
    config.limits.max_content_bytes = 512 << 10;
    const BUDGET: usize = 2 << 20;
    const SIZE: usize = 256 << 10;
    config.priority.prefetch_bytes = BUDGET;
    let (nats, pod) = stack.pod(&config).await;
    let events = 40;
    for id in 1..=events {
        let mut e = event(id, "g", "a");
        e.content = "x".repeat(SIZE);
        publish(&nats, &config.consumer.topic, &e).await;
    }
    // Taken from NATS and not yet acked: waiting plus the one in flight.
    let mut most_held = 0;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !(1..=events).all(|id| g1.ledger.count("b", id) == 1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for deliveries"
        );
        most_held = most_held.max(consumer_info(&nats, &config).await.num_ack_pending);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let budget = BUDGET / SIZE;
    assert!(
        most_held <= budget + config.consumer.worker_count + 1,
        "{most_held} large events held at once, budget {budget}"
    );
    wait_drained(&nats, &config).await;
    pod.stop().await;
    g1.stop().await;
}
