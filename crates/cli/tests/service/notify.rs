//! The mobile-push worker against local HTTP servers that answer like a
//! webhook receiver and like Getui's REST API v2: signatures, retries on
//! 5xx only, token renewal on code 10001, deduplication on redelivery and
//! dead letters for undecodable notices.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use hmac::{KeyInit, Mac};
use prost::Message;
use resonance_task::config::{Config, Secret};
use resonance_task::proto::OfflineNotice;
use resonance_testkit::harness::*;
use serde_json::{Value, json};
use sha2::Digest;

#[derive(Default)]
struct Seen {
    /// (headers, body) of every webhook request.
    hooks: Vec<(HeaderMap, Vec<u8>)>,
    /// Bodies of every Getui auth request.
    auths: Vec<Value>,
    /// (token, body, answered code) of every Getui push.
    pushes: Vec<(String, Value, i64)>,
    /// Tokens handed out; the first one is revoked after one push.
    tokens: Vec<String>,
    revoked: Vec<String>,
}

type Shared = Arc<Mutex<Seen>>;

async fn hook(
    State(seen): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let user = serde_json::from_slice::<Value>(&body).unwrap()["to_username"]
        .as_str()
        .unwrap()
        .to_string();
    let mut seen = seen.lock().unwrap();
    seen.hooks.push((headers, body.to_vec()));
    let tries = seen
        .hooks
        .iter()
        .filter(|(_, b)| {
            serde_json::from_slice::<Value>(b).unwrap()["to_username"] == user.as_str()
        })
        .count();
    match user.as_str() {
        "flaky" if tries <= 2 => StatusCode::SERVICE_UNAVAILABLE,
        "refused" => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    }
}

const APP_KEY: &str = "key-1";
const MASTER_SECRET: &str = "master-1";
const HOOK_SECRET: &str = "hook-secret";

async fn auth(State(seen): State<Shared>, Json(body): Json<Value>) -> Json<Value> {
    let mut seen = seen.lock().unwrap();
    let timestamp = body["timestamp"].as_str().unwrap_or_default();
    let expected = hex::encode(sha2::Sha256::digest(
        format!("{APP_KEY}{timestamp}{MASTER_SECRET}").as_bytes(),
    ));
    seen.auths.push(body.clone());
    if body["sign"] != expected.as_str() || body["appkey"] != APP_KEY {
        return Json(json!({"code": 10001, "msg": "sign invalid"}));
    }
    let token = format!("tok-{}", seen.tokens.len() + 1);
    seen.tokens.push(token.clone());
    let expires = resonance_task::clock::now_ms() + 24 * 3600 * 1000;
    Json(
        json!({"code": 0, "msg": "success", "data": {"expire_time": expires.to_string(), "token": token}}),
    )
}

async fn push(
    State(seen): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Json<Value> {
    let mut seen = seen.lock().unwrap();
    let token = headers
        .get("token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let valid = seen.tokens.contains(&token) && !seen.revoked.contains(&token);
    let code = if valid { 0 } else { 10001 };
    seen.pushes.push((token.clone(), body.clone(), code));
    if valid && token == "tok-1" {
        // The first token "expires" after one use.
        seen.revoked.push(token);
    }
    if code == 0 {
        let cid = body["audience"]["cid"][0].as_str().unwrap_or_default();
        Json(json!({"code": 0, "msg": "", "data": {"task-1": {cid: "successed_offline"}}}))
    } else {
        Json(json!({"code": code, "msg": "token invalid"}))
    }
}

async fn providers_server(seen: Shared) -> std::net::SocketAddr {
    let app = Router::new()
        .route("/hook", post(hook))
        .route("/v2/app-1/auth", post(auth))
        .route("/v2/app-1/push/single/cid", post(push))
        .with_state(seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn notice(msg_id: i64, recipients: &[&str]) -> OfflineNotice {
    OfflineNotice {
        msg_id,
        seq_id: msg_id,
        session_id: "s-1".into(),
        session_name: "team".into(),
        session_type: 2,
        from_username: "ann".into(),
        r#type: "text".into(),
        timestamp: resonance_task::clock::now_ms(),
        preview: format!("hello {msg_id}"),
        recipients: recipients.iter().map(|r| r.to_string()).collect(),
        ..Default::default()
    }
}

/// Publishes a notice and waits until the notify worker settled it.
async fn settle_notice(
    js: &jetstream::Context,
    nats: &async_nats::Client,
    view: &Config,
    payload: Vec<u8>,
) {
    js.publish(view.offline.notice_topic.clone(), payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
    wait_settled(nats, view).await;
}

fn hooks_for(seen: &Shared, user: &str) -> usize {
    seen.lock()
        .unwrap()
        .hooks
        .iter()
        .filter(|(_, b)| serde_json::from_slice::<Value>(b).unwrap()["to_username"] == user)
        .count()
}

/// Bodies of the pushes Getui accepted.
fn accepted_pushes(seen: &Shared) -> Vec<Value> {
    seen.lock()
        .unwrap()
        .pushes
        .iter()
        .filter(|(_, _, code)| *code == 0)
        .map(|(_, body, _)| body.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_reach_a_webhook_and_getui_signed_retried_and_once() {
    let stack = Stack::start().await;
    let seen = Shared::default();
    let addr = providers_server(seen.clone()).await;
    let mut config = stack.config();
    config.notify.webhook.url = format!("http://{addr}/hook");
    config.notify.webhook.secret = Some(Secret::new(HOOK_SECRET));
    config.notify.getui.base_url = format!("http://{addr}/v2");
    config.notify.getui.app_id = "app-1".into();
    config.notify.getui.app_key = APP_KEY.into();
    config.notify.getui.master_secret = Some(Secret::new(MASTER_SECRET));
    config.notify.max_deliver = 2;
    config.validate().unwrap();
    let redis = redis::Client::open(format!("redis://{}/", config.redis.addr)).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    for (user, cid) in [("u1", "cid-1"), ("u2", "cid-2")] {
        let _: () = redis::cmd("SET")
            .arg(format!("resonance:getui:cid:{user}"))
            .arg(cid)
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    resonance_task::telemetry::init(&config.log);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(resonance_notify::run(config.clone(), async move {
        let _ = stopped.await;
    }));
    let nats = stack.nats().await;
    let js = jetstream::new(nats.clone());
    let mut notify_view = config.clone();
    notify_view.consumer = resonance_notify::consumer_config(&config);
    wait_consuming(&nats, &notify_view).await;

    settle_notice(
        &js,
        &nats,
        &notify_view,
        notice(1, &["u1", "flaky", "refused"]).encode_to_vec(),
    )
    .await;
    settle_notice(
        &js,
        &nats,
        &notify_view,
        notice(2, &["u2", "u3"]).encode_to_vec(),
    )
    .await;

    // Webhook: 5xx retried until it worked, 4xx never retried.
    let counts: HashMap<&str, usize> = ["u1", "flaky", "refused", "u2", "u3"]
        .iter()
        .map(|u| (*u, hooks_for(&seen, u)))
        .collect();
    assert_eq!(counts["u1"], 1);
    assert_eq!(counts["flaky"], 3, "two 503s, then sent");
    assert_eq!(counts["refused"], 1, "a 400 is not retried");
    assert_eq!(counts["u2"], 1);
    assert_eq!(counts["u3"], 1);
    for (headers, body) in &seen.lock().unwrap().hooks {
        let ts = headers["x-resonance-timestamp"].to_str().unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(body);
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(headers["x-resonance-signature"].to_str().unwrap(), expected);
        let json: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(
            headers["x-resonance-delivery"].to_str().unwrap(),
            format!(
                "{}:{}",
                json["msg_id"],
                json["to_username"].as_str().unwrap()
            )
        );
    }

    // Getui: signed auth, one renewal after code 10001, one push per user
    // with a client id, none for the others.
    let ok = accepted_pushes(&seen);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.auths.len(), 2, "first token, then one renewal");
        let cids: Vec<&str> = ok
            .iter()
            .map(|b| b["audience"]["cid"][0].as_str().unwrap())
            .collect();
        assert_eq!(cids, vec!["cid-1", "cid-2"]);
        assert_eq!(
            seen.pushes.iter().filter(|(_, _, c)| *c == 10001).count(),
            1,
            "the revoked token was refused once"
        );
        assert_eq!(seen.pushes.last().unwrap().0, "tok-2");
        for body in &ok {
            assert_eq!(body["request_id"].as_str().unwrap().len(), 32);
            assert_eq!(body["push_message"]["notification"]["title"], "team");
            assert!(
                body["push_message"]["notification"]["body"]
                    .as_str()
                    .unwrap()
                    .starts_with("ann: hello")
            );
        }
    }

    // A redelivered notice (same msg_id) sends nothing twice.
    settle_notice(
        &js,
        &nats,
        &notify_view,
        notice(1, &["u1", "flaky", "refused"]).encode_to_vec(),
    )
    .await;
    assert_eq!(hooks_for(&seen, "u1"), 1);
    assert_eq!(hooks_for(&seen, "flaky"), 3);
    assert_eq!(accepted_pushes(&seen).len(), 2);

    // An undecodable notice is dead-lettered, not retried.
    settle_notice(&js, &nats, &notify_view, vec![0xff, 0xff, 0xff]).await;
    let letters = resonance_task::consumer::dlq::list(&js, &notify_view.consumer)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].reason.contains("undecodable OfflineNotice"),
        "{}",
        letters[0].reason
    );

    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}

#[tokio::test]
async fn notify_refuses_to_start_without_a_provider() {
    let stack = Stack::start().await;
    let config = stack.config();
    let err = resonance_notify::run(config, std::future::pending())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("notify.webhook.url") && text.contains("notify.getui.app_id"),
        "{text}"
    );
}
