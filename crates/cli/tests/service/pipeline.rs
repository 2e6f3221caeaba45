//! The whole data path on real servers: PushEvent on NATS -> members (SQL)
//! -> routes (Redis) -> registry (etcd) -> reference gateways over gRPC.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use resonance_task::config::ConsumerMode;
use resonance_task::consumer::dead_letter::{HEADER_DELIVERIES, HEADER_REASON};
use resonance_task::store::{RedisClient, Route, RouteStore};

use resonance_testkit::harness::*;

/// One-to-one and group sessions: each online member gets each message
/// exactly once; offline members (no route, stale route, unknown gateway)
/// never do, and the events are still acked.
async fn delivers_exactly_once_to_online_members(db: TestDb) {
    let stack = Stack::with_db(db).await;
    let store = stack.db.member_store().await;
    // g2 holds "frank" but his route is removed: he is offline and must not
    // be pushed to. "gina" has a route to g1, which does not hold her.
    let g1 = stack
        .gateway("gateway-001", &["alice", "bob", "carol"])
        .await;
    let g2 = stack
        .gateway("gateway-002", &["dave", "erin", "frank"])
        .await;
    let routes = RouteStore::new(
        RedisClient::connect(&stack.config().redis).await.unwrap(),
        500,
        4,
    );
    routes.remove("frank").await.unwrap();
    let stale = Route {
        username: "gina".into(),
        gateway_id: "gateway-001".into(),
        remote_ip: String::new(),
        timestamp: 0,
    };
    routes.put(&stale, Duration::from_secs(60)).await.unwrap();
    let ghost = Route {
        gateway_id: "gateway-404".into(),
        username: "hank".into(),
        ..stale.clone()
    };
    routes.put(&ghost, Duration::from_secs(60)).await.unwrap();

    stack.session(&store, "single-1", &["alice", "dave"]).await;
    stack
        .session(
            &store,
            "group-1",
            &[
                "alice", "bob", "carol", "dave", "erin", "frank", "gina", "hank", "ivan",
            ],
        )
        .await;

    let config = stack.config();
    let (nats, pod) = stack.pod(&config).await;

    let mut one = event(1, "single-1", "alice");
    one.session_type = 1;
    one.to_username = "dave".into();
    publish(&nats, &config.consumer.topic, &one).await;
    for id in 2..=21 {
        publish(&nats, &config.consumer.topic, &event(id, "group-1", "bob")).await;
    }

    let expect: Vec<(&str, i64)> = [("alice", 1), ("dave", 1)]
        .into_iter()
        .chain((2..=21).flat_map(|id| {
            ["alice", "bob", "carol", "dave", "erin"]
                .into_iter()
                .map(move |u| (u, id))
        }))
        .collect();
    let ledgers = [g1.ledger.clone(), g2.ledger.clone()];
    let count = |u: &str, id: i64| ledgers.iter().map(|l| l.count(u, id)).sum::<u32>();
    eventually("every online member received every message", || async {
        expect.iter().all(|(u, id)| count(u, *id) >= 1)
    })
    .await;
    wait_settled(&nats, &config).await;

    for (u, id) in &expect {
        assert_eq!(count(u, *id), 1, "{u} got msg {id} exactly once");
    }
    let delivered: usize = ledgers.iter().map(|l| l.deliveries().len()).sum();
    assert_eq!(
        delivered,
        expect.len(),
        "nothing beyond the expected deliveries"
    );
    for id in 1..=21 {
        for offline in ["frank", "gina", "hank", "ivan"] {
            assert_eq!(count(offline, id), 0, "{offline} is offline");
        }
    }
    // The sender's own devices get the message too (push_to_sender).
    assert_eq!(count("bob", 2), 1);
    // gina's stale route reached g1, which answered "not connected".
    assert_eq!(g1.ledger.stats().rejected, 20);

    pod.stop().await;
    g1.stop().await;
    g2.stop().await;
    stack.db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_one_to_one_and_group_deliver_exactly_once() {
    delivers_exactly_once_to_online_members(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_one_to_one_and_group_deliver_exactly_once() {
    delivers_exactly_once_to_online_members(TestDb::mysql().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_one_to_one_and_group_deliver_exactly_once() {
    delivers_exactly_once_to_online_members(TestDb::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_is_skipped_when_configured() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b", "c"]).await;
    stack.session(&store, "g", &["a", "b", "c"]).await;
    let mut config = stack.config();
    config.dispatch.push_to_sender = false;
    let (nats, pod) = stack.pod(&config).await;
    publish(&nats, &config.consumer.topic, &event(5, "g", "a")).await;
    eventually("others received", || async {
        g1.ledger.count("b", 5) == 1 && g1.ledger.count("c", 5) == 1
    })
    .await;
    wait_settled(&nats, &config).await;
    assert_eq!(g1.ledger.count("a", 5), 0, "the sender is skipped");
    pod.stop().await;
    g1.stop().await;
}

/// A gateway registered after the pod started gets traffic, with no pod
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_after_the_pod_gets_traffic() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    stack.session(&store, "g", &["a", "b", "c", "d"]).await;
    let config = stack.config();
    let (nats, pod) = stack.pod(&config).await;

    publish(&nats, &config.consumer.topic, &event(1, "g", "a")).await;
    eventually("first message at g1", || async {
        g1.ledger.count("b", 1) == 1
    })
    .await;
    wait_settled(&nats, &config).await;
    assert_eq!(g1.ledger.stats().streams, 1);

    let g2 = stack.gateway("gateway-002", &["c", "d"]).await;
    // The pod learns of g2 through its etcd watch, a moment after g2 is up:
    // publish until an event reaches it, each with a new msg_id.
    let mut id = 1;
    eventually("the new gateway gets traffic", || {
        id += 1;
        let (nats, subject, ledger) = (
            nats.clone(),
            config.consumer.topic.clone(),
            g2.ledger.clone(),
        );
        let this = id;
        async move {
            publish(&nats, &subject, &event(this, "g", "a")).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            ledger.count("c", this) == 1
        }
    })
    .await;
    wait_settled(&nats, &config).await;
    for later in id + 1..=id + 10 {
        publish(&nats, &config.consumer.topic, &event(later, "g", "a")).await;
    }
    eventually("later events reach both gateways", || async {
        (id + 1..=id + 10).all(|m| g1.ledger.count("b", m) == 1 && g2.ledger.count("d", m) == 1)
    })
    .await;
    assert_eq!(
        g1.ledger.stats().streams,
        1,
        "the pod kept its stream to g1"
    );
    pod.stop().await;
    g1.stop().await;
    g2.stop().await;
}

/// A gateway removed from the registry stops getting traffic even though
/// it still runs and routes still name it: its users count as offline and
/// the events are acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_gateway_stops_getting_traffic() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    let mut g2 = stack.gateway("gateway-002", &["c", "d"]).await;
    stack.session(&store, "g", &["a", "b", "c", "d"]).await;
    let config = stack.config();
    let (nats, pod) = stack.pod(&config).await;
    publish(&nats, &config.consumer.topic, &event(1, "g", "a")).await;
    eventually("both gateways reached", || async {
        g1.ledger.count("b", 1) == 1 && g2.ledger.count("c", 1) == 1
    })
    .await;
    wait_settled(&nats, &config).await;

    g2.deregister().await;
    // Once one event reached g1 but not g2, the pod's registry has dropped
    // g2 (a watch never goes back in time); from then on g2 gets nothing.
    let mut id = 1;
    eventually("an event skips the removed gateway", || {
        id += 1;
        let (nats, subject) = (nats.clone(), config.consumer.topic.clone());
        let (l1, l2) = (g1.ledger.clone(), g2.ledger.clone());
        let this = id;
        async move {
            publish(&nats, &subject, &event(this, "g", "a")).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            l1.count("b", this) == 1 && l2.count("c", this) == 0
        }
    })
    .await;
    wait_settled(&nats, &config).await;
    let received_before = g2.ledger.stats().received;
    for later in id + 1..=id + 20 {
        publish(&nats, &config.consumer.topic, &event(later, "g", "a")).await;
    }
    eventually("g1 still served", || async {
        (id + 1..=id + 20).all(|m| g1.ledger.count("b", m) == 1)
    })
    .await;
    wait_settled(&nats, &config).await;
    assert_eq!(
        g2.ledger.stats().received,
        received_before,
        "no traffic to the removed gateway"
    );
    pod.stop().await;
    g1.stop().await;
    g2.stop().await;
}

/// A gateway that restarts (new process, new port, same gateway_id) gets
/// traffic again; events published while it was down are not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_gateway_gets_traffic_again_and_nothing_is_lost() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    stack.session(&store, "g", &["a", "b"]).await;
    let config = stack.config();
    let (nats, pod) = stack.pod(&config).await;
    publish(&nats, &config.consumer.topic, &event(1, "g", "a")).await;
    eventually("delivered before restart", || async {
        g1.ledger.count("b", 1) == 1
    })
    .await;
    wait_settled(&nats, &config).await;

    // Down hard: the process is gone but its registry entry and routes
    // stay, as after a crash. Pushes fail and the event is retried.
    let mut opts = stack.gateway_options("gateway-001", &["a", "b"]);
    let port = g1.grpc_addr.port();
    g1.crash().await;
    publish(&nats, &config.consumer.topic, &event(2, "g", "a")).await;

    opts.grpc_listen = ([127, 0, 0, 1], port).into();
    let g1 = ReferenceGatewayRetry::start(opts).await;
    eventually("delivered after restart", || async {
        g1.ledger.count("b", 2) == 1 && g1.ledger.count("a", 2) == 1
    })
    .await;
    wait_settled(&nats, &config).await;
    publish(&nats, &config.consumer.topic, &event(3, "g", "a")).await;
    eventually("new traffic after restart", || async {
        g1.ledger.count("b", 3) == 1
    })
    .await;
    pod.stop().await;
    g1.stop().await;
}

/// Starting a gateway on a port its previous process just released may
/// briefly fail to bind; retry until it binds.
struct ReferenceGatewayRetry;

impl ReferenceGatewayRetry {
    async fn start(
        opts: resonance_reference_gateway::ReferenceGatewayOptions,
    ) -> resonance_reference_gateway::ReferenceGateway {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match resonance_reference_gateway::ReferenceGateway::start(opts.clone()).await {
                Ok(g) => return g,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("gateway restart: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("gateway did not restart: {e}"),
            }
        }
    }
}

/// Garbage does not wedge the consumer: it is dead-lettered with its reason
/// and the events behind it are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_payload_is_dead_lettered_and_does_not_wedge() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    stack.session(&store, "g", &["a", "b"]).await;
    let config = stack.config();
    let (nats, pod) = stack.pod(&config).await;

    let garbage: &[u8] = &[0xff, 0xff, 0xff, 0x01, 0x02];
    nats.publish(config.consumer.topic.clone(), garbage.to_vec().into())
        .await
        .unwrap();
    let mut invalid = event(7, "", "a");
    invalid.session_id.clear();
    publish(&nats, &config.consumer.topic, &invalid).await;
    publish(&nats, &config.consumer.topic, &event(8, "g", "a")).await;

    eventually("valid event delivered", || async {
        g1.ledger.count("b", 8) == 1
    })
    .await;
    wait_settled(&nats, &config).await;

    let js = jetstream::new(nats.clone());
    let dead = js
        .get_stream(&config.consumer.dead_letter_stream)
        .await
        .unwrap();
    let consumer = dead
        .create_consumer(jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let mut reasons = Vec::new();
    let mut payloads = Vec::new();
    while let Some(m) = batch.next().await {
        let m = m.unwrap();
        let h = m.headers.clone().unwrap();
        reasons.push(h.get(HEADER_REASON).unwrap().to_string());
        assert_eq!(h.get(HEADER_DELIVERIES).unwrap().as_str(), "1");
        payloads.push(m.payload.to_vec());
    }
    // Workers run concurrently, so dead letters may be stored in any order.
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    let undecodable = reasons
        .iter()
        .position(|r| r.contains("undecodable"))
        .expect("garbage dead-lettered");
    assert_eq!(payloads[undecodable], garbage, "original bytes kept");
    assert!(
        reasons.iter().any(|r| r.contains("session_id is empty")),
        "{reasons:?}"
    );
    pod.stop().await;
    g1.stop().await;
}

/// Two pods on one durable consumer share the work: every event is
/// delivered once in all, and both pods did some of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_deliver_each_event_once() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let users: Vec<String> = (0..30).map(|i| format!("u{i}")).collect();
    let held: Vec<&str> = users.iter().map(String::as_str).collect();
    let g1 = stack.gateway("gateway-001", &held[..15]).await;
    let g2 = stack.gateway("gateway-002", &held[15..]).await;
    stack.session(&store, "big", &held).await;
    let config = stack.config();
    let nats = stack.nats().await;
    let a = Pod::start(config.clone());
    let b = Pod::start(config.clone());
    wait_consuming(&nats, &config).await;
    for id in 1..=200 {
        publish(&nats, &config.consumer.topic, &event(id, "big", "u0")).await;
    }
    let ledgers = [g1.ledger.clone(), g2.ledger.clone()];
    eventually("all delivered", || async {
        ledgers.iter().map(|l| l.stats().distinct).sum::<u64>() == 200 * 30
    })
    .await;
    wait_settled(&nats, &config).await;
    let dups: u64 = ledgers.iter().map(|l| l.stats().duplicates).sum();
    assert_eq!(dups, 0);
    a.stop().await;
    b.stop().await;
    g1.stop().await;
    g2.stop().await;
}

/// Legacy core mode: a queue-group subscription delivers too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_mode_delivers() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    stack.session(&store, "g", &["a", "b"]).await;
    let mut config = stack.config();
    config.consumer.mode = ConsumerMode::Core;
    let nats = stack.nats().await;
    let pod = Pod::start(config.clone());
    // Core subscriptions have no stream to observe: publish until the
    // subscription is there and a message arrives.
    let mut id = 0;
    eventually("core-mode delivery", || {
        id += 1;
        let this = id;
        let nats = nats.clone();
        let subject = config.consumer.topic.clone();
        let ledger = g1.ledger.clone();
        async move {
            publish(&nats, &subject, &event(this, "g", "a")).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            ledger.count("b", this) == 1
        }
    })
    .await;
    pod.stop().await;
    g1.stop().await;
}

/// The same message to users of one gateway rides one stream: the pool
/// opens one stream per gateway, not per event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_events_share_one_stream_per_gateway() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b", "c"]).await;
    stack.session(&store, "g", &["a", "b", "c"]).await;
    let config = stack.config();
    let (nats, pod) = stack.pod(&config).await;
    for id in 1..=100 {
        publish(&nats, &config.consumer.topic, &event(id, "g", "a")).await;
    }
    eventually("all delivered", || async {
        g1.ledger.stats().distinct == 300
    })
    .await;
    assert_eq!(
        g1.ledger.stats().streams,
        1,
        "one long-lived stream served every event"
    );
    let users: HashSet<String> = g1
        .ledger
        .deliveries()
        .into_iter()
        .map(|((u, _), _)| u)
        .collect();
    assert_eq!(users.len(), 3);
    pod.stop().await;
    g1.stop().await;
}

/// A gateway that refuses its first stream: the pod retries only that
/// gateway's recipients in-process, so every member gets the message once
/// and the event is acked without a redelivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_retry_reaches_only_the_failed_recipients() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    let mut flaky = stack.gateway_options("gateway-002", &["c"]);
    flaky.refuse_streams = 1;
    let g2 = resonance_reference_gateway::ReferenceGateway::start(flaky)
        .await
        .unwrap();
    stack.session(&store, "g", &["a", "b", "c"]).await;
    let mut config = stack.config();
    config.consumer.max_retry = 5;
    // Long enough that a redelivery could not hide a missing retry.
    config.consumer.retry_interval = Duration::from_secs(120);
    let (nats, pod) = stack.pod(&config).await;
    publish(&nats, &config.consumer.topic, &event(1, "g", "a")).await;
    eventually("all three delivered", || async {
        g1.ledger.count("a", 1) == 1 && g1.ledger.count("b", 1) == 1 && g2.ledger.count("c", 1) == 1
    })
    .await;
    wait_settled(&nats, &config).await;
    assert_eq!(
        g2.ledger.stats().streams,
        1,
        "one stream served after the refused one"
    );
    assert_eq!(
        g1.ledger.stats().received,
        2,
        "g1's recipients were not pushed again"
    );
    assert_eq!(
        consumer_info(&nats, &config).await.num_redelivered,
        0,
        "settled without a redelivery"
    );
    pod.stop().await;
    g1.stop().await;
    g2.stop().await;
}

/// One event to a group spread over a batch-v1 gateway and an upstream-like
/// one: one frame per chunk to the first, per-user requests to the second,
/// and every member once. With `gateway.push_protocol: per-user`, no frame
/// is batched even where batch-v1 is advertised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_v1_where_advertised_and_per_user_elsewhere() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let batched: Vec<String> = (0..300).map(|i| format!("b{i}")).collect();
    let batched: Vec<&str> = batched.iter().map(String::as_str).collect();
    let g1 = stack.gateway("gateway-001", &batched).await;
    let g2 = stack.upstream_gateway("gateway-002", &["p1", "p2"]).await;
    let mut members = batched.clone();
    members.extend(["p1", "p2", "gone"]);
    stack.session(&store, "g", &members).await;
    let mut config = stack.config();
    config.dispatch.batch_size = 128;
    let (nats, pod) = stack.pod(&config).await;
    publish(&nats, &config.consumer.topic, &event(1, "g", "p1")).await;
    eventually("every online member got it", || async {
        g1.ledger.stats().distinct == 300 && g2.ledger.stats().distinct == 2
    })
    .await;
    wait_settled(&nats, &config).await;
    let (s1, s2) = (g1.ledger.stats(), g2.ledger.stats());
    assert_eq!(s1.batches, 3, "300 recipients in frames of 128");
    assert_eq!((s1.duplicates, s1.rejected), (0, 0));
    assert_eq!((s2.batches, s2.received), (0, 2));
    pod.stop().await;

    config.gateway.push_protocol = resonance_task::config::PushProtocolChoice::PerUser;
    let (nats, pod) = stack.pod(&config).await;
    publish(&nats, &config.consumer.topic, &event(2, "g", "p1")).await;
    eventually("delivered per user", || async {
        g1.ledger.stats().per_msg.get(&2).map(|m| m.users) == Some(300)
    })
    .await;
    assert_eq!(g1.ledger.stats().batches, 3, "no new frames");
    pod.stop().await;
    g1.stop().await;
    g2.stop().await;
}

/// Many events of two sessions handled concurrently by one pod: every user
/// receives each session's messages in the order they were published, on
/// both push protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_s_messages_arrive_in_publish_order() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b", "x"]).await;
    let g2 = stack.upstream_gateway("gateway-002", &["c", "y"]).await;
    stack.session(&store, "s", &["a", "b", "c"]).await;
    stack.session(&store, "t", &["x", "y"]).await;
    let mut config = stack.config();
    config.consumer.worker_count = 64;
    // The guarantee covers first attempts; generous timeouts keep a loaded
    // machine from turning a slow push into a retry.
    config.gateway.request_timeout = Duration::from_secs(60);
    config.consumer.ack_wait = Duration::from_secs(120);
    let (nats, pod) = stack.pod(&config).await;
    let mut published: HashMap<&str, Vec<i64>> = HashMap::new();
    for id in 1..=400 {
        let session = if id % 3 == 0 { "t" } else { "s" };
        let sender = if session == "s" { "a" } else { "x" };
        publish(&nats, &config.consumer.topic, &event(id, session, sender)).await;
        published.entry(session).or_default().push(id);
    }
    eventually("all delivered", || async {
        g1.ledger.arrivals("b").len() == published["s"].len()
            && g2.ledger.arrivals("c").len() == published["s"].len()
            && g2.ledger.arrivals("y").len() == published["t"].len()
    })
    .await;
    assert_eq!(g1.ledger.arrivals("b"), published["s"], "batch-v1 gateway");
    assert_eq!(g2.ledger.arrivals("c"), published["s"], "per-user gateway");
    assert_eq!(g1.ledger.arrivals("x"), published["t"]);
    assert_eq!(g2.ledger.arrivals("y"), published["t"]);
    pod.stop().await;
    g1.stop().await;
    g2.stop().await;
}

/// With a long member cache TTL, a member added to a session gets the next
/// message only because its session id was published on
/// `dispatch.session_changed_topic`; a session not named stays cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_change_message_refreshes_the_cache_at_once() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack
        .gateway("gateway-001", &["a", "b", "c", "x", "y", "z"])
        .await;
    stack.session(&store, "g", &["a", "b"]).await;
    stack.session(&store, "h", &["x", "y"]).await;
    let mut config = stack.config();
    config.dispatch.member_cache_ttl = Duration::from_secs(3600);
    let (nats, pod) = stack.pod(&config).await;
    publish(&nats, &config.consumer.topic, &event(1, "g", "a")).await;
    publish(&nats, &config.consumer.topic, &event(2, "h", "x")).await;
    eventually("first messages", || async {
        g1.ledger.count("b", 1) == 1 && g1.ledger.count("y", 2) == 1
    })
    .await;
    stack.session(&store, "g", &["c"]).await;
    stack.session(&store, "h", &["z"]).await;
    nats.publish(config.dispatch.session_changed_topic.clone(), "g".into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    // The change is applied by its own task, so poll with fresh events.
    let next_id = std::sync::atomic::AtomicI64::new(3);
    eventually("the change is seen", || async {
        let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        publish(&nats, &config.consumer.topic, &event(id, "g", "a")).await;
        wait_settled(&nats, &config).await;
        g1.ledger.count("c", id) == 1
    })
    .await;
    publish(&nats, &config.consumer.topic, &event(1000, "h", "x")).await;
    eventually("h delivered", || async { g1.ledger.count("y", 1000) == 1 }).await;
    wait_settled(&nats, &config).await;
    assert_eq!(
        g1.ledger.count("z", 1000),
        0,
        "h is still served from the cache"
    );
    pod.stop().await;
    g1.stop().await;
}

/// A group far larger than one lookup window goes out window by window:
/// every member exactly once, frames never larger than `batch_size`, and
/// the session's order kept across events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_group_goes_out_window_by_window() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let users: Vec<String> = (0..1200).map(|i| format!("m{i:04}")).collect();
    let (left, right) = users.split_at(600);
    let left: Vec<&str> = left.iter().map(String::as_str).collect();
    let right: Vec<&str> = right.iter().map(String::as_str).collect();
    let g1 = stack.gateway("gateway-001", &left).await;
    let g2 = stack.upstream_gateway("gateway-002", &right).await;
    let all: Vec<&str> = users.iter().map(String::as_str).collect();
    stack.session(&store, "big", &all).await;
    let mut config = stack.config();
    config.dispatch.route_chunk_size = 25;
    config.dispatch.route_concurrency = 2;
    config.dispatch.batch_size = 20;
    config.dispatch.push_chunk_size = 7;
    let (nats, pod) = stack.pod(&config).await;
    for id in 1..=3 {
        publish(&nats, &config.consumer.topic, &event(id, "big", "m0000")).await;
    }
    eventually("every member reached", || async {
        g1.ledger.stats().distinct == 3 * 600 && g2.ledger.stats().distinct == 3 * 600
    })
    .await;
    wait_settled(&nats, &config).await;
    let (s1, s2) = (g1.ledger.stats(), g2.ledger.stats());
    assert_eq!((s1.duplicates, s2.duplicates), (0, 0));
    // Windows of 50 hold about 25 users of each gateway: two frames each.
    assert!(
        s1.batches >= 3 * 600 / 20,
        "frames of at most 20: {}",
        s1.batches
    );
    for user in [left[0], left[599], right[0], right[599]] {
        let arrivals = g1.ledger.arrivals(user);
        let arrivals = if arrivals.is_empty() {
            g2.ledger.arrivals(user)
        } else {
            arrivals
        };
        assert_eq!(arrivals, vec![1, 2, 3], "{user}");
    }
    pod.stop().await;
    g1.stop().await;
    g2.stop().await;
}

/// Calls per command since the last `CONFIG RESETSTAT`, from
/// `INFO commandstats` (`cmdstat_mget:calls=3,...`).
async fn redis_calls(redis: &RedisClient) -> HashMap<String, u64> {
    let info: String = redis
        .query(redis::cmd("INFO").arg("commandstats"))
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.strip_prefix("calls=")?.split(',').next()?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .collect()
}

/// The cost of an event whose members are cached and which settles: its
/// claim and its routes go to Redis together, its end is one write, and
/// neither runs a script or appends progress (nothing is left to record
/// once it settles); what it leaves behind is one key, its settled mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_small_event_costs_redis_no_script_and_no_progress_write() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b", "c"]).await;
    stack.session(&store, "g", &["a", "b", "c"]).await;
    let config = stack.config();
    let redis = RedisClient::connect(&config.redis).await.unwrap();
    let (nats, pod) = stack.pod(&config).await;
    // The first event reads the members from SQL and fills the cache.
    publish(&nats, &config.consumer.topic, &event(1, "g", "a")).await;
    eventually("the first event delivered", || async {
        g1.ledger.count("c", 1) == 1
    })
    .await;
    wait_settled(&nats, &config).await;
    let _: () = redis
        .query(redis::cmd("CONFIG").arg("RESETSTAT"))
        .await
        .unwrap();
    let events = 10;
    for id in 2..2 + events {
        publish(&nats, &config.consumer.topic, &event(id, "g", "a")).await;
    }
    eventually("every event delivered", || async {
        (2..2 + events).all(|id| g1.ledger.count("b", id) == 1)
    })
    .await;
    wait_settled(&nats, &config).await;
    let calls = redis_calls(&redis).await;
    let count = |name: &str| calls.get(name).copied().unwrap_or(0);
    assert_eq!(
        count("mget"),
        2 * events as u64,
        "the claim's read of the lease, the settled mark and progress, and one route lookup, per event: {calls:?}"
    );
    assert_eq!(
        count("exists") + count("get"),
        0,
        "nothing else read: {calls:?}"
    );
    assert_eq!(count("eval") + count("evalsha"), 0, "no script: {calls:?}");
    assert_eq!(count("append"), 0, "no progress write: {calls:?}");
    assert_eq!(
        count("set"),
        2 * events as u64,
        "a claim and a settled mark per event: {calls:?}"
    );
    // The settled mark replaces the claim: a settled event leaves one key.
    for id in 1..2 + events {
        let left: Vec<String> = redis
            .query(redis::cmd("KEYS").arg(format!("resonance:task:{{{id}}}:*")))
            .await
            .unwrap();
        assert_eq!(left, [resonance_task::store::lease_key(id)], "event {id}");
        let mark: Option<String> = redis
            .query(redis::cmd("GET").arg(resonance_task::store::lease_key(id)))
            .await
            .unwrap();
        assert_eq!(
            mark.as_deref(),
            Some(resonance_task::store::SETTLED),
            "event {id}"
        );
    }
    pod.stop().await;
    g1.stop().await;
}

/// The member cache serves a session past half its TTL without SQL on the
/// lookup, re-reads it in the background, and the re-read replaces the
/// entry before the TTL runs out; a dropped entry is read cold again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_session_is_served_while_it_is_re_read_in_the_background() {
    let db = TestDb::sqlite();
    let store = db.member_store().await;
    let ttl = Duration::from_secs(2);
    let cached = store.clone().with_cache(ttl, 1000);
    let seed = |members: &[&str]| resonance_task::store::SessionSeed {
        session_id: "s".into(),
        kind: 2,
        name: "s".into(),
        owner: "a".into(),
        members: members.iter().map(|m| m.to_string()).collect(),
    };
    store.create_session(&seed(&["a", "b"])).await.unwrap();
    assert_eq!(cached.members("s").await.unwrap(), ["a", "b"]);
    assert_eq!(
        cached.cache_lookups(),
        Some((0, 1)),
        "one miss, read from SQL"
    );
    // A member joins without a change message: only the TTL bounds how
    // long the cache may miss it.
    store.create_session(&seed(&["c"])).await.unwrap();
    assert_eq!(cached.cached("s").await.unwrap().len(), 2, "young: served");
    let started = std::time::Instant::now();
    // Let the entry reach half its TTL (this waits for age, not for a
    // task: the cache decides by the entry's age).
    tokio::time::sleep(ttl / 2 + Duration::from_millis(50)).await;
    let served = cached.cached("s").await.expect("still cached");
    assert_eq!(served.len(), 2, "served at once, the re-read runs behind");
    eventually("the background re-read replaced the entry", || async {
        cached.cached("s").await.is_some_and(|m| m.len() == 3)
    })
    .await;
    assert!(started.elapsed() < ttl, "replaced before the TTL ran out");
    let (_, misses) = cached.cache_lookups().unwrap();
    assert_eq!(misses, 1, "no lookup went to SQL after the first");
    assert!(cached.invalidate("s").await);
    assert!(cached.cached("s").await.is_none(), "dropped: read cold");
    assert_eq!(cached.shared("s").await.unwrap().len(), 3);
    assert_eq!(cached.cache_lookups().unwrap().1, 3, "two more misses");
}

/// Many events of a group several chunks wide, to per-user gateways whose
/// stream window holds two chunks and whose command queues fill up: every
/// member still gets every event. Each chunk an event queues goes to its
/// collector at once, so an answered chunk gives its share of the window
/// back while the event is still queuing the rest; held back until all of
/// the event's chunks were queued, the answered chunks kept the window
/// full, and every stream waited for it with nothing in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wider_than_the_stream_window_are_all_delivered() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let users: Vec<String> = (0..160).map(|i| format!("w{i:03}")).collect();
    let all: Vec<&str> = users.iter().map(String::as_str).collect();
    let mut gateways = Vec::new();
    for (g, held) in all.chunks(40).enumerate() {
        let id = format!("gateway-{:03}", g + 1);
        gateways.push(stack.upstream_gateway(&id, held).await);
    }
    stack.session(&store, "wide", &all).await;
    let mut config = stack.config();
    config.gateway.max_in_flight = 8;
    config.dispatch.push_chunk_size = 4;
    config.consumer.worker_count = 64;
    let (nats, pod) = stack.pod(&config).await;
    let events: u64 = 64;
    for id in 1..=events {
        publish(
            &nats,
            &config.consumer.topic,
            &event(id as i64, "wide", "w000"),
        )
        .await;
    }
    eventually("every member got every event", || async {
        gateways
            .iter()
            .all(|g| g.ledger.stats().distinct == 40 * events)
    })
    .await;
    wait_settled(&nats, &config).await;
    pod.stop().await;
    for g in gateways {
        g.stop().await;
    }
}

/// A large session read cold is pushed window by window while SQL is still
/// sending it. The session's table is a view whose 4,001st member waits on
/// an advisory lock the test holds whenever the member read (not the size
/// count) reaches it, and the planner is held to index scans so rows are
/// read in key order and no further than each page needs: the first window
/// (2,000 members at the shipped chunk sizes) must reach the gateway while
/// the read is held, and once the lock goes every member gets the event
/// exactly once. Read whole before pushing, nobody would be pushed while
/// the lock is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_session_read_cold_is_pushed_while_sql_still_sends_it() {
    const MEMBERS: usize = 5_000;
    const HELD_AT: usize = 4_001;
    let stack = Stack::with_db(TestDb::postgres().await).await;
    let store = stack.db.member_store().await;
    let users: Vec<String> = (1..=MEMBERS).map(|i| format!("u{i:06}")).collect();
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    let g1 = stack.gateway("gateway-001", &names).await;
    stack.session(&store, "big", &names).await;

    let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(&stack.db.url)
        .await
        .unwrap();
    let database = stack.db.url.rsplit('/').next().unwrap().to_string();
    let held = format!("u{HELD_AT:06}");
    for ddl in [
        "ALTER TABLE t_session_member RENAME TO member_rows".to_string(),
        "CREATE FUNCTION gate() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$ BEGIN \
         IF current_query() LIKE '%string_agg%' THEN \
         PERFORM pg_advisory_lock_shared(4242); PERFORM pg_advisory_unlock_shared(4242); \
         END IF; RETURN true; END $$"
            .to_string(),
        format!(
            "CREATE VIEW t_session_member AS SELECT session_id, username, role, last_read_seq \
             FROM member_rows WHERE username <> '{held}' OR gate()"
        ),
        format!("ALTER DATABASE {database} SET enable_seqscan = off"),
        format!("ALTER DATABASE {database} SET enable_bitmapscan = off"),
        format!("ALTER DATABASE {database} SET enable_sort = off"),
        "SELECT pg_advisory_lock(4242)".to_string(),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
            .execute(&mut admin)
            .await
            .unwrap();
    }

    let config = stack.config();
    let (nats, pod) = stack.pod(&config).await;
    publish(&nats, &config.consumer.topic, &event(1, "big", "u000001")).await;
    let reached = || g1.ledger.deliveries().len();
    eventually("the first window pushed while the read is held", || async {
        reached() >= 2_000
    })
    .await;
    assert!(
        reached() < HELD_AT,
        "nobody past the held row can have been read yet: {}",
        reached()
    );
    sqlx::raw_sql("SELECT pg_advisory_unlock(4242)")
        .execute(&mut admin)
        .await
        .unwrap();
    eventually("every member reached", || async { reached() == MEMBERS }).await;
    wait_settled(&nats, &config).await;
    for user in &users {
        assert_eq!(g1.ledger.count(user, 1), 1, "{user} pushed once");
    }
    pod.stop().await;
    g1.stop().await;
    drop(admin);
    stack.db.drop_database().await;
}

/// Members are read a page of names per SQL row: on every dialect a
/// session of several pages comes back whole, each name once, names with
/// separators, digits and multi-byte characters intact, and the read stops
/// at `limits.max_members + 1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_read_page_by_page_on_every_dialect() {
    for db in TestDb::every_dialect().await {
        let store = db.member_store().await;
        let names: Vec<String> = (0..4_500)
            .map(|i| match i % 3 {
                0 => format!("user-{i}"),
                1 => format!("{i}:ü,{i}"),
                _ => format!("名前{i}"),
            })
            .collect();
        let seed = resonance_task::store::SessionSeed {
            session_id: "paged".into(),
            kind: 2,
            name: "paged".into(),
            owner: names[0].clone(),
            members: names.clone(),
        };
        store.create_session(&seed).await.unwrap();
        let mut read = store.members("paged").await.unwrap();
        read.sort();
        let mut expected = names.clone();
        expected.sort();
        assert_eq!(read, expected, "{}", db.url);
        let capped = store.clone().with_max_members(2_500);
        assert_eq!(capped.members("paged").await.unwrap().len(), 2_501);
        db.drop_database().await;
    }
}

/// Many sessions read cold at the same moment are read together, several
/// to a statement: on every dialect each gets exactly its own members,
/// an empty session none, and a session longer than a page all of its
/// pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_read_cold_together_each_get_their_own_members() {
    for db in TestDb::every_dialect().await {
        let store = db.member_store().await;
        let mut sessions = Vec::new();
        for s in 0..150usize {
            let size = if s == 75 { 2_100 } else { s % 7 };
            let members: Vec<String> = (0..size).map(|m| format!("s{s}-m{m}")).collect();
            if !members.is_empty() {
                store
                    .create_session(&resonance_task::store::SessionSeed {
                        session_id: format!("together-{s}"),
                        kind: if size == 2 { 1 } else { 2 },
                        name: format!("together-{s}"),
                        owner: members[0].clone(),
                        members: members.clone(),
                    })
                    .await
                    .unwrap();
            }
            sessions.push((format!("together-{s}"), members));
        }
        let reads = futures::future::join_all(
            sessions
                .iter()
                .map(|(id, _)| async { store.members(id).await.unwrap() }),
        )
        .await;
        for ((id, expected), mut read) in sessions.iter().zip(reads) {
            read.sort();
            let mut expected = expected.clone();
            expected.sort();
            assert_eq!(read, expected, "{id} on {}", db.url);
        }
        db.drop_database().await;
    }
}

/// Many concurrent lookups of a few sessions, with and without the cache:
/// every one gets its session's members (none waits forever on a read
/// it joined).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_share_reads_and_all_finish() {
    let db = TestDb::sqlite();
    let store = db.member_store().await;
    for s in 0..4 {
        let members: Vec<String> = (0..10).map(|i| format!("s{s}-u{i}")).collect();
        store
            .create_session(&resonance_task::store::SessionSeed {
                session_id: format!("s{s}"),
                kind: 2,
                name: format!("s{s}"),
                owner: members[0].clone(),
                members,
            })
            .await
            .unwrap();
    }
    for store in [
        store.clone(),
        store.clone().with_cache(Duration::from_millis(1), 1000),
    ] {
        let lookups = (0..2_000).map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.members(&format!("s{}", i % 4)).await })
        });
        let all = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(lookups))
            .await
            .expect("every lookup finishes");
        for members in all {
            assert_eq!(members.unwrap().unwrap().len(), 10);
        }
    }
}
