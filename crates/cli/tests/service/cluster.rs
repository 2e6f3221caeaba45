//! The clustered deployment: 3 NATS nodes with R3 streams, a Redis Cluster
//! of 3 masters and 3 replicas, 3 etcd members. A node of each dies while
//! events flow; every online member still gets every event.

use std::time::Duration;

use async_nats::jetstream;
use prost::Message;
use resonance_reference_gateway::ReferenceGateway;
use resonance_task::config::Config;
use resonance_task::proto::PushEvent;
use resonance_testkit::harness::*;

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("u{i:02}")).collect()
}

/// Publishes as a chat backend does on a cluster: through JetStream,
/// again until the stream acknowledges (a publish in flight while the
/// stream's leader moves gets no ack and is repeated; JetStream's
/// duplicate window takes the repeat by its message id).
async fn publish_acked(js: &jetstream::Context, subject: &str, event: &PushEvent) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", event.msg_id.to_string().as_str());
        let acked = match js
            .publish_with_headers(subject.to_string(), headers, event.encode_to_vec().into())
            .await
        {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if acked {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "event {} never acknowledged by the stream",
            event.msg_id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes events `ids` to session "g" and waits until every member has
/// each of them.
async fn deliver(
    js: &jetstream::Context,
    config: &Config,
    gateway: &ReferenceGateway,
    users: &[String],
    ids: std::ops::RangeInclusive<i64>,
    what: &str,
) {
    for id in ids.clone() {
        publish_acked(js, &config.consumer.topic, &event(id, "g", "u00")).await;
    }
    eventually(
        &format!("every member has events {ids:?} ({what})"),
        || async {
            ids.clone()
                .all(|id| users.iter().all(|u| gateway.ledger.count(u, id) >= 1))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clustered_engines_lose_nothing_when_a_node_of_each_dies() {
    let mut stack = ClusterStack::start().await;
    let store = stack.db.member_store().await;
    let users = names(20);
    let held: Vec<&str> = users.iter().map(String::as_str).collect();
    let gateway = stack.gateway("gateway-001", &held).await;
    create_session(&store, "g", &held).await;
    let config = stack.config();
    let (nats, pod) = stack.pod(&config).await;
    let js = jetstream::new(nats.clone());

    // Every stream the pod made has three replicas on three nodes.
    for stream in [&config.consumer.stream, &config.consumer.dead_letter_stream] {
        let (_, replicas) = stack.nats.stream_peers(&nats, stream).await.unwrap();
        assert_eq!(replicas.len(), 2, "{stream}: a leader and two replicas");
    }
    deliver(&js, &config, &gateway, &users, 1..=20, "all up").await;

    // The NATS node leading the input stream dies.
    let (leader, _) = stack
        .nats
        .stream_peers(&nats, &config.consumer.stream)
        .await
        .unwrap();
    stack.nats.nodes[leader].kill();
    deliver(
        &js,
        &config,
        &gateway,
        &users,
        21..=40,
        "stream leader killed",
    )
    .await;
    let (moved, _) = stack
        .nats
        .stream_peers(&nats, &config.consumer.stream)
        .await
        .unwrap();
    assert_ne!(moved, leader, "another node leads the stream");
    stack.nats.nodes[leader].start().await.unwrap();

    // A Redis master dies; its replica takes over.
    let master = stack
        .redis
        .master_of("resonance:router:user:u00")
        .await
        .unwrap();
    stack.redis.nodes[master].kill();
    deliver(
        &js,
        &config,
        &gateway,
        &users,
        41..=60,
        "Redis master killed",
    )
    .await;
    stack.redis.wait_ok().await.unwrap();

    // The etcd leader dies.
    let leader = stack.etcd.leader().await.expect("an etcd leader");
    stack.etcd.members[leader].kill();
    deliver(
        &js,
        &config,
        &gateway,
        &users,
        61..=80,
        "etcd leader killed",
    )
    .await;
    eventually("another etcd member leads", || async {
        stack.etcd.leader().await.is_some_and(|l| l != leader)
    })
    .await;

    // A poison payload lands in the R3 dead-letter stream and is replayed
    // from it (and dead-lettered again, with its reason).
    let poison = bytes::Bytes::from_static(&[0xff, 0xfe, 0xfd]);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "poison-1");
    js.publish_with_headers(config.consumer.topic.clone(), headers, poison.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    wait_dead_lettered(&nats, &config, "the poison dead-lettered", |l| {
        l.payload == poison
    })
    .await;
    let replayed = resonance_task::consumer::dlq::replay(
        &js,
        &config.consumer,
        &resonance_task::consumer::dlq::Selection::All,
        false,
    )
    .await
    .unwrap();
    assert_eq!(replayed.len(), 1);
    eventually("the replayed poison dead-lettered again", || async {
        resonance_task::consumer::dlq::list(&js, &config.consumer)
            .await
            .is_ok_and(|l| l.len() == 1 && l[0].seq != replayed[0])
    })
    .await;

    wait_settled(&nats, &config).await;
    let stats = gateway.ledger.stats();
    assert_eq!(stats.distinct, 80 * users.len() as u64, "{stats:?}");
    // Acks lost with a dead node come back as redeliveries, which the
    // delivery progress absorbs.
    assert_eq!(stats.duplicates, 0, "{stats:?}");
    pod.stop().await;
    gateway.stop().await;
}

fn input_stream(name: &str) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: name.into(),
        subjects: vec![format!("{name}.events")],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_take_the_configured_replicas_and_a_stream_made_before_is_moved_to_them() {
    use resonance_task::streams::{Replication, ensure};
    let cluster = resonance_testkit::cluster::NatsCluster::start(3)
        .await
        .unwrap();
    let nats = async_nats::connect(cluster.urls().as_slice())
        .await
        .unwrap();
    let js = jetstream::new(nats.clone());
    let one = Replication::default();
    let three = Replication {
        replicas: 3,
        tags: Vec::new(),
    };
    ensure(&js, input_stream("OLD"), &one).await.unwrap();
    let (_, replicas) = cluster.stream_peers(&nats, "OLD").await.unwrap();
    assert!(replicas.is_empty(), "made with one replica");
    js.publish("OLD.events", "kept".into())
        .await
        .unwrap()
        .await
        .unwrap();
    ensure(&js, input_stream("OLD"), &three).await.unwrap();
    eventually("the stream is on three nodes", || async {
        cluster
            .stream_peers(&nats, "OLD")
            .await
            .is_some_and(|(_, r)| r.len() == 2)
    })
    .await;
    let mut stream = js.get_stream("OLD").await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        1,
        "its data kept"
    );

    // More replicas than the cluster has: an error that names the key.
    let five = Replication {
        replicas: 5,
        tags: Vec::new(),
    };
    let err = ensure(&js, input_stream("WIDE"), &five).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("consumer.stream_replicas is 5") && text.contains("WIDE"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_a_single_server_are_refused_naming_the_key() {
    let stack = Stack::start().await;
    let js = jetstream::new(stack.nats().await);
    let three = resonance_task::streams::Replication {
        replicas: 3,
        tags: Vec::new(),
    };
    let err = resonance_task::streams::ensure(&js, input_stream("ALONE"), &three)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("consumer.stream_replicas is 3"), "{text}");
}

/// The notify worker on a Redis Cluster: its per-notice sent list (hash
/// tag `{msg_id}`) keeps a redelivered notice from sending twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notify_worker_sends_each_notice_once_through_a_redis_cluster() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let stack = ClusterStack::start().await;
    let hooks = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = hooks.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut config = stack.config();
    config.notify.webhook.url = format!("http://{addr}/hook");
    config.notify.webhook.secret = Some(resonance_task::config::Secret::new("s"));
    config.validate().unwrap();
    resonance_task::telemetry::init(&config.log);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(resonance_notify::run(config.clone(), async move {
        let _ = stopped.await;
    }));
    let mut view = config.clone();
    view.consumer = resonance_notify::consumer_config(&config);
    let nats = stack.nats().await;
    let js = jetstream::new(nats.clone());
    wait_consuming(&nats, &view).await;
    let notice = resonance_task::proto::OfflineNotice {
        msg_id: 77,
        session_id: "s".into(),
        from_username: "a".into(),
        recipients: vec!["u1".into(), "u2".into(), "u3".into()],
        ..Default::default()
    };
    for _ in 0..2 {
        js.publish(
            view.offline.notice_topic.clone(),
            notice.encode_to_vec().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        wait_settled(&nats, &view).await;
    }
    assert_eq!(hooks.load(Ordering::SeqCst), 3, "one per recipient, once");
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}
