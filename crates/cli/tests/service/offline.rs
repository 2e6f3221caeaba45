//! Offline delivery on real servers: parking in Redis, draining it back in
//! order exactly once, offline notices on NATS (batched, rate-limited), the
//! read path for large sessions, and priority lanes.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream;
use prost::Message;
use resonance_task::config::Config;
use resonance_task::proto::{OfflineNotice, PushMessage};
use resonance_task::store::{OfflineStore, RedisClient};
use resonance_testkit::harness::*;

async fn offline_store(config: &Config) -> OfflineStore {
    let redis = RedisClient::connect(&config.redis).await.unwrap();
    OfflineStore::new(redis, config.offline.max_messages, config.offline.ttl)
}

/// The seq_ids of up to `max` messages pulled for `user`.
async fn pulled_seqs(store: &OfflineStore, user: &str, max: usize) -> Vec<i64> {
    store
        .pull(user, max)
        .await
        .unwrap()
        .iter()
        .map(|m| m.seq_id)
        .collect()
}

/// Every notice stored so far, decoded.
async fn notices(nats: &async_nats::Client, config: &Config) -> Vec<OfflineNotice> {
    let js = jetstream::new(nats.clone());
    let mut stream = js.get_stream(&config.offline.notice_stream).await.unwrap();
    let stored = stream.info().await.unwrap().state.messages;
    let mut out = Vec::new();
    for seq in 1..=stored {
        let m = stream.get_raw_message(seq).await.unwrap();
        out.push(OfflineNotice::decode(m.payload).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_members_get_their_messages_back_in_order_exactly_once() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a"]).await;
    stack.session(&store, "s", &["a", "b", "c"]).await;
    let config = stack.config();
    let (nats, pod) = stack.pod(&config).await;
    // Published out of seq order: parking sorts by seq_id.
    let seqs = [3, 1, 5, 2, 4, 6];
    for (i, seq) in seqs.iter().enumerate() {
        let mut e = event(100 + i as i64, "s", "a");
        e.seq_id = *seq;
        publish(&nats, &config.consumer.topic, &e).await;
    }
    wait_settled(&nats, &config).await;
    assert_eq!(
        g1.ledger.arrivals("a").len(),
        6,
        "the online member got all"
    );
    let parked = offline_store(&config).await;
    assert_eq!(parked.count("b").await.unwrap(), 6);
    assert_eq!(
        parked.count("a").await.unwrap(),
        0,
        "online: nothing parked"
    );

    // Two drains at once share the messages without overlap.
    let (left, right) = tokio::join!(parked.pull("b", 3), parked.pull("b", 3));
    let (left, right) = (left.unwrap(), right.unwrap());
    let mut all: Vec<PushMessage> = left.iter().chain(&right).cloned().collect();
    assert_eq!(all.len(), 6);
    let ids: HashSet<i64> = all.iter().map(|m| m.msg_id).collect();
    assert_eq!(ids.len(), 6, "no message pulled twice");
    for half in [&left, &right] {
        let s: Vec<i64> = half.iter().map(|m| m.seq_id).collect();
        assert!(s.windows(2).all(|w| w[0] < w[1]), "in order: {s:?}");
    }
    all.sort_by_key(|m| m.seq_id);
    assert_eq!(
        all.iter().map(|m| m.seq_id).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert!(
        all.iter()
            .all(|m| m.to_username == "b" && m.session_id == "s")
    );
    assert!(parked.pull("b", 10).await.unwrap().is_empty(), "drained");

    // c drains in one go, lowest seq_id first.
    assert_eq!(pulled_seqs(&parked, "c", 100).await, vec![1, 2, 3, 4, 5, 6]);
    pod.stop().await;
    g1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parking_is_idempotent_bounded_and_expires() {
    let stack = Stack::start().await;
    let mut config = stack.config();
    config.offline.max_messages = 3;
    config.offline.ttl = Duration::from_secs(600);
    let store = offline_store(&config).await;
    let users = vec!["u".to_string(), "v".to_string()];
    for seq in 1..=5 {
        let m = PushMessage {
            msg_id: 1000 + seq,
            seq_id: seq,
            session_id: "s".into(),
            content: format!("m{seq}"),
            ..Default::default()
        };
        let first = store.park(&m, &users).await.unwrap();
        assert_eq!((first.added, first.already), (2, 0));
        let again = store.park(&m, &users).await.unwrap();
        assert_eq!((again.added, again.already), (0, 2), "same msg_id: no copy");
    }
    assert_eq!(store.count("u").await.unwrap(), 3, "bounded");
    let redis = redis::Client::open(format!("redis://{}/", config.redis.addr)).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(resonance_task::store::offline_key("u"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 600_000, "ttl {ttl}");
    assert_eq!(
        pulled_seqs(&store, "u", 10).await,
        vec![3, 4, 5],
        "the oldest went first"
    );
}

/// The bound trims the oldest by arrival, never the message just parked,
/// even when it comes from a session whose sequence numbers are lower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bound_never_drops_the_message_just_parked() {
    let stack = Stack::start().await;
    let mut config = stack.config();
    config.offline.max_messages = 3;
    let store = offline_store(&config).await;
    let user = vec!["u".to_string()];
    let message = |msg_id, seq_id, session: &str| PushMessage {
        msg_id,
        seq_id,
        session_id: session.into(),
        content: format!("m{msg_id}"),
        ..Default::default()
    };
    for seq in 100..=102 {
        store.park(&message(seq, seq, "s1"), &user).await.unwrap();
    }
    let parked = store.park(&message(1, 1, "s2"), &user).await.unwrap();
    assert_eq!(parked.added, 1);
    let drained = store.pull("u", 10).await.unwrap();
    let ids: Vec<(String, i64)> = drained
        .iter()
        .map(|m| (m.session_id.clone(), m.seq_id))
        .collect();
    assert_eq!(
        ids,
        vec![("s1".into(), 101), ("s1".into(), 102), ("s2".into(), 1)],
        "the oldest arrival went, the newest stayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_notices_are_batched_and_rate_limited_per_user() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a"]).await;
    stack
        .session(&store, "s", &["a", "b", "c", "d", "e", "f"])
        .await;
    stack.session(&store, "t", &["a", "b"]).await;
    let mut config = stack.config();
    config.offline.notice_batch = 2;
    config.offline.notice_interval = Duration::from_secs(3600);
    let (nats, pod) = stack.pod(&config).await;
    publish(&nats, &config.consumer.topic, &event(1, "s", "a")).await;
    wait_settled(&nats, &config).await;
    let first = notices(&nats, &config).await;
    assert_eq!(first.len(), 3, "5 offline recipients in notices of 2");
    let named: Vec<&str> = first
        .iter()
        .flat_map(|n| n.recipients.iter().map(String::as_str))
        .collect();
    let mut sorted = named.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["b", "c", "d", "e", "f"], "each once");
    assert!(first.iter().all(|n| n.msg_id == 1 && n.session_id == "s"));
    assert_eq!(first[0].preview, "message 1");

    // Within the interval: parked again, but no second notice.
    publish(&nats, &config.consumer.topic, &event(2, "s", "a")).await;
    publish(&nats, &config.consumer.topic, &event(3, "t", "a")).await;
    wait_settled(&nats, &config).await;
    assert_eq!(notices(&nats, &config).await.len(), 3, "rate-limited");
    let parked = offline_store(&config).await;
    assert_eq!(parked.count("b").await.unwrap(), 3, "parked all the same");
    assert_eq!(parked.count("f").await.unwrap(), 2);
    pod.stop().await;
    g1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_sessions_are_left_to_the_read_path() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "x"]).await;
    stack.session(&store, "big", &["a", "b", "c", "d"]).await;
    stack.session(&store, "small", &["x", "y", "z"]).await;
    let mut config = stack.config();
    config.offline.read_path_above = 3;
    config.offline.notice = false;
    let (nats, pod) = stack.pod(&config).await;
    publish(&nats, &config.consumer.topic, &event(1, "big", "a")).await;
    publish(&nats, &config.consumer.topic, &event(2, "small", "x")).await;
    wait_settled(&nats, &config).await;
    let parked = offline_store(&config).await;
    for user in ["b", "c", "d"] {
        assert_eq!(parked.count(user).await.unwrap(), 0, "{user}: read path");
    }
    assert_eq!(parked.count("y").await.unwrap(), 1, "small sessions park");
    assert_eq!(parked.count("z").await.unwrap(), 1);
    let js = jetstream::new(nats.clone());
    assert!(
        js.get_stream(&config.offline.notice_stream).await.is_err(),
        "notices off: no stream, nothing published"
    );
    pod.stop().await;
    g1.stop().await;
}

/// One worker, a gateway that takes 25 ms per push and a backlog of normal
/// events: a high-priority event published last is pushed right after the
/// events already in flight, and a session's messages keep their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_events_overtake_a_normal_backlog() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["p", "q", "x"]).await;
    g1.set_reply_delay(Duration::from_millis(25));
    stack.session(&store, "normal", &["p", "x"]).await;
    stack.session(&store, "urgent", &["q", "x"]).await;
    let mut config = stack.config();
    config.consumer.worker_count = 1;
    config.offline.notice = false;
    let (nats, pod) = stack.pod(&config).await;
    for id in 1..=40 {
        publish(&nats, &config.consumer.topic, &event(id, "normal", "p")).await;
    }
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(resonance_task::consumer::lanes::PRIORITY_HEADER, "high");
    nats.publish_with_headers(
        config.consumer.topic.clone(),
        headers,
        event(99, "urgent", "q").encode_to_vec().into(),
    )
    .await
    .unwrap();
    nats.flush().await.unwrap();
    eventually("everything delivered", || async {
        g1.ledger.arrivals("x").len() == 41
    })
    .await;
    let order = g1.ledger.arrivals("x");
    let at = order.iter().position(|&m| m == 99).unwrap();
    assert!(
        at <= 5,
        "the high-priority event came {at}th of 41: {order:?}"
    );
    let normal: Vec<i64> = order.iter().copied().filter(|&m| m != 99).collect();
    assert_eq!(normal, (1..=40).collect::<Vec<_>>(), "normal order kept");
    pod.stop().await;
    g1.stop().await;
}
