//! The gateway pool against real reference gateways: pipelining, order
//! correlation, offline answers, timeouts, broken streams, reconnects, idle
//! close and gateways that move.

use std::time::Duration;

use resonance_reference_gateway::{NOT_CONNECTED, ReferenceGateway};
use resonance_task::config::GatewayPoolConfig;
use resonance_task::gateway::{FailureKind, GatewayPool, PushOutcome};
use resonance_task::lifecycle::Lifecycle;
use resonance_task::proto::PushMessage;
use resonance_task::registry::{GatewayEndpoint, PushProtocol};

use resonance_testkit::harness::*;

fn endpoint(id: &str, g: &ReferenceGateway) -> GatewayEndpoint {
    endpoint_for(id, g, PushProtocol::PerUser)
}

fn endpoint_for(id: &str, g: &ReferenceGateway, protocol: PushProtocol) -> GatewayEndpoint {
    endpoint_at(id, &format!("http://{}", g.grpc_addr), protocol)
}

fn endpoint_at(id: &str, uri: &str, protocol: PushProtocol) -> GatewayEndpoint {
    GatewayEndpoint {
        gateway_id: id.into(),
        instance_id: format!("i-{id}"),
        uri: uri.into(),
        protocol,
    }
}

/// Declares one test per push protocol around `$body(protocol)`.
macro_rules! per_protocol {
    ($body:ident: $per_user:ident, $batch:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $per_user() {
            $body(PushProtocol::PerUser).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $batch() {
            $body(PushProtocol::BatchV1).await;
        }
    };
}

fn message(msg_id: i64) -> PushMessage {
    PushMessage {
        msg_id,
        seq_id: msg_id,
        session_id: "s".into(),
        from_username: "a".into(),
        content: "hi".into(),
        r#type: "text".into(),
        timestamp: resonance_task::clock::now_ms(),
        ..Default::default()
    }
}

fn pool(cfg: GatewayPoolConfig) -> GatewayPool {
    GatewayPool::new(cfg, &Lifecycle::new())
}

fn users(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("u{i}")).collect()
}

per_protocol!(pipelined: pushes_are_pipelined_and_matched_per_user, batches_are_pipelined_and_matched);

async fn pipelined(protocol: PushProtocol) {
    let stack = Stack::start().await;
    let held = users(100);
    let refs: Vec<&str> = held.iter().map(String::as_str).collect();
    let mut opts = stack.gateway_options("g1", &refs[..50]);
    opts.reply_delay = Duration::from_millis(20);
    let g = ReferenceGateway::start(opts).await.unwrap();
    let pool = pool(GatewayPoolConfig::default());
    let ep = endpoint_for("g1", &g, protocol);
    // Ten concurrent callers, each with held and unheld users interleaved.
    let calls = (0..10).map(|i| {
        let pool = pool.clone();
        let ep = ep.clone();
        let recipients: Vec<String> = (0..10).map(|j| format!("u{}", j * 10 + i)).collect();
        async move {
            (
                recipients.clone(),
                pool.push(&ep, message(i as i64 + 1), recipients, Default::default())
                    .await,
            )
        }
    });
    for (recipients, reply) in futures::future::join_all(calls).await {
        assert_eq!(
            reply.recipients, recipients,
            "recipients come back in order"
        );
        assert_eq!(reply.outcomes.len(), recipients.len());
        for (u, o) in recipients.iter().zip(reply.outcomes) {
            let index: usize = u[1..].parse().unwrap();
            if index < 50 {
                assert_eq!(o, PushOutcome::Delivered, "{u}");
            } else {
                assert_eq!(o, PushOutcome::NotConnected(NOT_CONNECTED.into()), "{u}");
            }
        }
    }
    let stats = g.ledger.stats();
    assert_eq!(stats.streams, 1, "one stream for every caller");
    assert_eq!(stats.received, 50);
    let frames = if protocol == PushProtocol::BatchV1 {
        10
    } else {
        0
    };
    assert_eq!(stats.batches, frames, "one batch-v1 frame per caller");
    assert!(
        stats.max_pending > 1,
        "requests were in flight together: {}",
        stats.max_pending
    );
    g.stop().await;
}

per_protocol!(time_out: unanswered_pushes_time_out_as_failures, unanswered_batches_time_out_as_failures);

async fn time_out(protocol: PushProtocol) {
    let stack = Stack::start().await;
    let mut opts = stack.gateway_options("g1", &["a", "b"]);
    opts.reply_delay = Duration::from_secs(30);
    let g = ReferenceGateway::start(opts).await.unwrap();
    let pool = pool(GatewayPoolConfig {
        request_timeout: Duration::from_millis(300),
        ..Default::default()
    });
    let outcomes = pool
        .push(
            &endpoint_for("g1", &g, protocol),
            message(1),
            vec!["a".into(), "b".into()],
            Default::default(),
        )
        .await
        .outcomes;
    assert_eq!(outcomes.len(), 2);
    for o in outcomes {
        match o {
            PushOutcome::Failed(f) => assert_eq!(f.kind, FailureKind::Timeout, "{f}"),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
    g.crash().await;
}

per_protocol!(broken: a_broken_stream_fails_in_flight_pushes_and_reconnects, a_broken_batch_stream_fails_in_flight_batches_and_reconnects);

async fn broken(protocol: PushProtocol) {
    let stack = Stack::start().await;
    let mut opts = stack.gateway_options("g1", &["a"]);
    opts.reply_delay = Duration::from_secs(5);
    let g = ReferenceGateway::start(opts.clone()).await.unwrap();
    let ep = endpoint_for("g1", &g, protocol);
    let pool = pool(GatewayPoolConfig {
        request_timeout: Duration::from_secs(60),
        max_backoff: Duration::from_millis(200),
        ..Default::default()
    });
    let in_flight = {
        let pool = pool.clone();
        let ep = ep.clone();
        tokio::spawn(async move {
            pool.push(&ep, message(1), vec!["a".into()], Default::default())
                .await
                .outcomes
        })
    };
    eventually("push reached the gateway", || async {
        g.ledger.stats().streams == 1
    })
    .await;
    let port = g.grpc_addr.port();
    g.crash().await;
    let outcomes = in_flight.await.unwrap();
    match &outcomes[..] {
        [PushOutcome::Failed(f)] => assert_eq!(f.kind, FailureKind::StreamBroken, "{f}"),
        other => panic!("expected a broken stream, got {other:?}"),
    }

    opts.reply_delay = Duration::ZERO;
    opts.grpc_listen = ([127, 0, 0, 1], port).into();
    let g = loop {
        match ReferenceGateway::start(opts.clone()).await {
            Ok(g) => break g,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    // Pushes during the reconnect backoff fail fast; keep pushing until the
    // stream is back, as redelivery would.
    eventually("delivered after reconnect", || {
        let pool = pool.clone();
        let ep = ep.clone();
        async move {
            pool.push(&ep, message(2), vec!["a".into()], Default::default())
                .await
                .outcomes
                == vec![PushOutcome::Delivered]
        }
    })
    .await;
    assert_eq!(g.ledger.count("a", 2), 1);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_gateway_fails_fast() {
    let port = free_port();
    let pool = pool(GatewayPoolConfig::default());
    let ep = endpoint_at(
        "g-down",
        &format!("http://127.0.0.1:{port}"),
        PushProtocol::PerUser,
    );
    let outcomes = pool
        .push(
            &ep,
            message(1),
            vec!["a".into(), "b".into()],
            Default::default(),
        )
        .await
        .outcomes;
    for o in outcomes {
        match o {
            PushOutcome::Failed(f) => {
                assert_eq!(f.kind, FailureKind::Connect);
                assert!(f.to_string().contains("g-down"), "{f}");
            }
            other => panic!("expected a connect failure, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_close_and_reopen_on_demand() {
    let stack = Stack::start().await;
    let g = stack.gateway("g1", &["a"]).await;
    let pool = pool(GatewayPoolConfig {
        idle_timeout: Duration::from_millis(200),
        ..Default::default()
    });
    let ep = endpoint("g1", &g);
    assert_eq!(
        pool.push(&ep, message(1), vec!["a".into()], Default::default())
            .await
            .outcomes,
        vec![PushOutcome::Delivered]
    );
    assert_eq!(pool.open_streams(), 1);
    eventually("idle stream closed", || async { pool.open_streams() == 0 }).await;
    assert_eq!(
        pool.push(&ep, message(2), vec!["a".into()], Default::default())
            .await
            .outcomes,
        vec![PushOutcome::Delivered]
    );
    assert_eq!(g.ledger.stats().streams, 2, "a fresh stream after idling");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_gateway_gets_a_new_stream() {
    let stack = Stack::start().await;
    let old = stack.gateway("g1", &["a"]).await;
    let mut opts = stack.gateway_options("g1", &["a"]);
    opts.instance_id = Some("second-instance".into());
    let new = ReferenceGateway::start(opts).await.unwrap();
    let pool = pool(GatewayPoolConfig::default());
    assert_eq!(
        pool.push(
            &endpoint("g1", &old),
            message(1),
            vec!["a".into()],
            Default::default()
        )
        .await
        .outcomes,
        vec![PushOutcome::Delivered]
    );
    assert_eq!(
        pool.push(
            &endpoint("g1", &new),
            message(2),
            vec!["a".into()],
            Default::default()
        )
        .await
        .outcomes,
        vec![PushOutcome::Delivered]
    );
    assert_eq!(old.ledger.count("a", 2), 0);
    assert_eq!(new.ledger.count("a", 2), 1);
    eventually("old stream closed", || async { pool.open_streams() == 1 }).await;
    old.stop().await;
    new.stop().await;
}

/// A per-user gateway that answers every request, but echoing another
/// msg_id than the request's: answers are matched by position, so taking
/// them would credit the wrong recipients. The stream is torn down and the
/// pushes fail (and are retried) instead of counting as delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_for_another_message_fail_the_stream() {
    use resonance_task::proto::gateway::v1::push_service_server::{PushService, PushServiceServer};
    use resonance_task::proto::{PushMessageRequest, PushMessageResponse};
    use tokio_stream::StreamExt;
    use tonic::{Request, Response, Status, Streaming};

    struct Misanswering;

    #[tonic::async_trait]
    impl PushService for Misanswering {
        type PushMessageStream =
            tokio_stream::wrappers::ReceiverStream<Result<PushMessageResponse, Status>>;

        async fn push_message(
            &self,
            request: Request<Streaming<PushMessageRequest>>,
        ) -> Result<Response<Self::PushMessageStream>, Status> {
            let mut inbound = request.into_inner();
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            tokio::spawn(async move {
                while let Some(Ok(request)) = inbound.next().await {
                    let message = request.message.unwrap_or_default();
                    let answer = PushMessageResponse {
                        msg_id: message.msg_id + 1,
                        seq_id: message.seq_id,
                        error: String::new(),
                    };
                    if tx.send(Ok(answer)).await.is_err() {
                        return;
                    }
                }
            });
            Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
                rx,
            )))
        }
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PushServiceServer::new(Misanswering))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let pool = pool(GatewayPoolConfig::default());
    let ep = endpoint_at("g1", &format!("http://{addr}"), PushProtocol::PerUser);
    let reply = pool
        .push(&ep, message(7), users(3), Default::default())
        .await;
    assert_eq!(reply.outcomes.len(), 3);
    for outcome in &reply.outcomes {
        assert!(
            matches!(outcome, PushOutcome::Failed(f) if f.kind == FailureKind::StreamBroken),
            "{outcome:?}"
        );
    }
}
