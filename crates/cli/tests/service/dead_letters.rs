//! Dead letters: poison and exhausted events land in the dead-letter stream
//! with reason, deliveries and last error; `dlq list` shows them and
//! `dlq replay` brings one back to be delivered.

use std::time::Duration;

use async_nats::jetstream;
use resonance_task::consumer::dlq::{self, Selection};
use resonance_testkit::fault_proxy::ProxyMode;

use resonance_testkit::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_and_exhausted_events_are_dead_lettered_listed_and_replayed() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let (g1, proxy) = stack.gateway_behind_proxy("gateway-001", &["a", "b"]).await;
    stack.session(&store, "g", &["a", "b"]).await;
    let mut config = stack.config();
    config.consumer.max_deliver = 2;
    config.consumer.max_retry = 0;
    config.consumer.retry_interval = Duration::from_millis(100);
    config.consumer.retry_backoff_max = Duration::from_millis(100);
    let nats = stack.nats().await;
    proxy.set(ProxyMode::Cut);
    let pod = Pod::start(config.clone());
    wait_consuming(&nats, &config).await;

    nats.publish(config.consumer.topic.clone(), vec![0xff, 0x00, 0x13].into())
        .await
        .unwrap();
    publish(&nats, &config.consumer.topic, &event(0, "g", "a")).await;
    publish(&nats, &config.consumer.topic, &event(5, "g", "a")).await;
    wait_settled(&nats, &config).await;

    let js = jetstream::new(nats.clone());
    let letters = dlq::list(&js, &config.consumer).await.unwrap();
    assert_eq!(letters.len(), 3, "{letters:?}");
    let undecodable = letters
        .iter()
        .find(|l| l.reason.contains("undecodable"))
        .expect("garbage");
    assert_eq!(undecodable.deliveries, 1, "never retried");
    let invalid = letters
        .iter()
        .find(|l| l.reason.contains("msg_id 0"))
        .expect("invalid");
    assert_eq!(invalid.deliveries, 1);
    let exhausted = letters
        .iter()
        .find(|l| l.msg_id == Some(5))
        .expect("exhausted");
    assert_eq!(exhausted.deliveries, 2);
    assert!(
        exhausted.reason.contains("gave up after 2 failed attempts"),
        "{}",
        exhausted.reason
    );
    assert!(
        exhausted.last_error.contains("gateway-001"),
        "{}",
        exhausted.last_error
    );
    assert!(exhausted.source_seq.is_some());
    assert_eq!(g1.ledger.count("b", 5), 0);

    // The table the CLI prints names every reason.
    let text = dlq::to_text(&letters);
    assert!(
        text.contains("3 dead letters") && text.contains("gave up after"),
        "{text}"
    );

    // The gateway is back; a pod with the everyday max_deliver takes the
    // replay. JetStream's own limit is the ceiling, not max_deliver.
    assert_eq!(
        consumer_info(&nats, &config).await.config.max_deliver,
        config.consumer.delivery_ceiling
    );
    proxy.set(ProxyMode::Pass);
    pod.stop().await;
    config.consumer.max_deliver = 10;
    let pod = Pod::start(config.clone());
    let replayed = dlq::replay(
        &js,
        &config.consumer,
        &Selection::Sequences(vec![exhausted.seq]),
        false,
    )
    .await
    .unwrap();
    assert_eq!(replayed, vec![exhausted.seq]);
    eventually("replayed event delivered", || async {
        g1.ledger.count("b", 5) == 1 && g1.ledger.count("a", 5) == 1
    })
    .await;
    wait_settled(&nats, &config).await;
    let left = dlq::list(&js, &config.consumer).await.unwrap();
    assert_eq!(left.len(), 2, "the replayed letter was removed");
    assert!(
        dlq::replay(
            &js,
            &config.consumer,
            &Selection::Sequences(vec![exhausted.seq]),
            false
        )
        .await
        .is_err()
    );
    pod.stop().await;
    g1.stop().await;
}

/// Each input limit refuses the event on its first delivery, names itself
/// in the dead letter, and leaves events within the limits alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_over_input_limits_are_dead_lettered_with_the_limit() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b", "c", "d"]).await;
    stack.session(&store, "small", &["a", "b"]).await;
    stack.session(&store, "crowd", &["a", "b", "c", "d"]).await;
    let mut config = stack.config();
    config.limits.max_payload_bytes = 4096;
    config.limits.max_content_bytes = 1024;
    config.limits.max_members = 3;
    config.limits.max_username_bytes = 16;
    config.limits.max_session_id_bytes = 16;
    let (nats, pod) = stack.pod(&config).await;
    let topic = &config.consumer.topic;

    let mut big_content = event(1, "small", "a");
    big_content.content = "x".repeat(2000);
    let mut huge = event(2, "small", "a");
    huge.content = "y".repeat(1000);
    huge.trace_headers = (0..100)
        .map(|i| (format!("k{i}"), "v".repeat(40)))
        .collect();
    let long_session = event(3, &"s".repeat(17), "a");
    let long_user = event(4, "small", &"u".repeat(17));
    let bad_chars = event(5, "small", "a\u{7}b");
    let spaced = event(6, "sm all", "a");
    let crowd = event(7, "crowd", "a");
    let fine = event(8, "small", "a");
    for e in [
        &big_content,
        &huge,
        &long_session,
        &long_user,
        &bad_chars,
        &spaced,
        &crowd,
        &fine,
    ] {
        publish(&nats, topic, e).await;
    }
    wait_settled(&nats, &config).await;

    let js = jetstream::new(nats.clone());
    let letters = dlq::list(&js, &config.consumer).await.unwrap();
    let reason = |msg_id: i64| -> String {
        letters
            .iter()
            .find(|l| l.msg_id == Some(msg_id))
            .map(|l| {
                assert_eq!(l.deliveries, 1, "msg {msg_id} is not retried");
                l.reason.clone()
            })
            .unwrap_or_default()
    };
    assert!(
        reason(1).contains("limits.max_content_bytes"),
        "{letters:?}"
    );
    // Too large to decode at all: the dead letter has no msg_id, only the
    // limit.
    assert!(
        letters
            .iter()
            .any(|l| l.reason.contains("limits.max_payload_bytes")),
        "{letters:?}"
    );
    assert!(
        reason(3).contains("limits.max_session_id_bytes"),
        "{letters:?}"
    );
    assert!(
        reason(4).contains("limits.max_username_bytes"),
        "{letters:?}"
    );
    assert!(reason(5).contains("limits.id_charset"), "{letters:?}");
    assert!(reason(6).contains("limits.id_charset"), "{letters:?}");
    assert!(reason(7).contains("limits.max_members"), "{letters:?}");
    assert_eq!(letters.len(), 7, "{letters:?}");
    assert_eq!(
        g1.ledger.count("b", 8),
        1,
        "an event within the limits is delivered"
    );
    for id in 1..=7 {
        assert_eq!(g1.ledger.count("b", id), 0, "msg {id} pushed to nobody");
    }
    pod.stop().await;
    g1.stop().await;
}

/// A dead-lettered event that reached some of its members, replayed after
/// its in-flight progress would have expired: only the members it had not
/// reached are pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_partial_event_pushes_only_the_rest() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let g1 = stack.gateway("gateway-001", &["a", "b"]).await;
    let (g2, proxy) = stack.gateway_behind_proxy("gateway-002", &["c"]).await;
    stack.session(&store, "g", &["a", "b", "c"]).await;
    let mut config = stack.config();
    config.consumer.max_deliver = 2;
    config.consumer.max_retry = 0;
    config.consumer.ack_wait = Duration::from_secs(1);
    config.consumer.retry_interval = Duration::from_millis(100);
    config.consumer.retry_backoff_max = Duration::from_millis(100);
    config.dedup.progress_ttl = Duration::from_secs(3);
    let nats = stack.nats().await;
    proxy.set(ProxyMode::Cut);
    let pod = Pod::start(config.clone());
    wait_consuming(&nats, &config).await;
    publish(&nats, &config.consumer.topic, &event(8, "g", "a")).await;
    wait_dead_lettered(&nats, &config, "dead-lettered", |d| d.msg_id == Some(8)).await;
    let js = jetstream::new(nats.clone());
    assert_eq!(g1.ledger.count("b", 8), 1);
    // Past the in-flight progress TTL.
    tokio::time::sleep(config.dedup.progress_ttl + Duration::from_secs(1)).await;
    proxy.set(ProxyMode::Pass);
    dlq::replay(&js, &config.consumer, &Selection::All, false)
        .await
        .unwrap();
    eventually("c reached by the replay", || async {
        g2.ledger.count("c", 8) == 1
    })
    .await;
    wait_settled(&nats, &config).await;
    assert_eq!(g1.ledger.count("a", 8), 1, "a not pushed again");
    assert_eq!(g1.ledger.count("b", 8), 1, "b not pushed again");
    pod.stop().await;
    g1.stop().await;
    g2.stop().await;
}

/// A session wider than one window, read cold, is pushed as it is read,
/// so its size is counted first: over `limits.max_members` it is
/// dead-lettered having pushed nobody; at the limit every member gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wide_session_read_cold_is_counted_before_anything_is_pushed() {
    let stack = Stack::start().await;
    let store = stack.db.member_store().await;
    let users: Vec<String> = (0..8).map(|i| format!("u{i}")).collect();
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    let g1 = stack.gateway("gateway-001", &names).await;
    stack.session(&store, "wide", &names[..6]).await;
    stack.session(&store, "wider", &names).await;
    let mut config = stack.config();
    config.limits.max_members = 6;
    // Windows of two members: both sessions are read as a stream.
    config.dispatch.route_chunk_size = 2;
    config.dispatch.route_concurrency = 1;
    config.dispatch.batch_size = 2;
    let (nats, pod) = stack.pod(&config).await;
    publish(&nats, &config.consumer.topic, &event(1, "wide", "u0")).await;
    publish(&nats, &config.consumer.topic, &event(2, "wider", "u0")).await;
    wait_settled(&nats, &config).await;

    let js = jetstream::new(nats.clone());
    let letters = dlq::list(&js, &config.consumer).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].msg_id, Some(2), "{letters:?}");
    assert!(
        letters[0].reason.contains("limits.max_members"),
        "{letters:?}"
    );
    for user in &users {
        let within = usize::from(names[..6].contains(&user.as_str())) as u32;
        assert_eq!(g1.ledger.count(user, 1), within, "{user}, msg 1");
        assert_eq!(
            g1.ledger.count(user, 2),
            0,
            "{user}: msg 2 pushed to nobody"
        );
    }
    pod.stop().await;
    g1.stop().await;
}

/// `dlq list` and `dlq replay --all` on a system that never dead-lettered
/// anything (its dead-letter stream does not exist yet) say so and exit 0,
/// for events and for notices alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_commands_on_a_fresh_system_say_there_is_nothing() {
    let nats = resonance_testkit::servers::nats_server()
        .await
        .expect("nats-server starts");
    for args in [
        &["dlq", "list"][..],
        &["dlq", "list", "--notices"],
        &["dlq", "replay", "--all"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_resonance-task"))
            .args(args)
            .env(
                "RESONANCE_TASK__NATS__URL",
                format!("nats://127.0.0.1:{}", nats.port),
            )
            .env("RESONANCE_TASK__LOG__LEVEL", "warn")
            .output()
            .expect("the command runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("no dead letters"), "{args:?}: {stdout}");
    }
}
