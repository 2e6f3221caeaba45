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

// FCM and APNs: local servers shaped like each API that check what they
// are sent (the JWTs' signatures and claims, headers, bodies) and answer
// like the real ones do.

const FCM_PROJECT: &str = "proj-1";
const FCM_KEY_ID: &str = "kid-1";
const FCM_ACCOUNT: &str = "push@proj-1.iam.gserviceaccount.com";
const APNS_KEY_ID: &str = "ABCDE12345";
const APNS_TEAM: &str = "TEAM123456";
const APNS_TOPIC: &str = "com.example.chat";

/// The public halves of the keys the worker signs with.
struct PublicKeys {
    fcm: jsonwebtoken::DecodingKey,
    apns: jsonwebtoken::DecodingKey,
}

struct PhoneCall {
    device: String,
    /// HTTP version, headers and body as received.
    version: axum::http::Version,
    headers: HeaderMap,
    body: Value,
    status: u16,
    at: tokio::time::Instant,
}

#[derive(Default)]
struct PhoneLog {
    /// Claims of every assertion the FCM token endpoint verified.
    assertions: Vec<resonance_notify::fcm::Assertion>,
    access_tokens: Vec<String>,
    revoked: Vec<String>,
    fcm: Vec<PhoneCall>,
    apns: Vec<PhoneCall>,
    /// APNs provider tokens seen, verified.
    provider_tokens: Vec<resonance_notify::apns::ProviderClaims>,
}

struct Phones {
    keys: PublicKeys,
    token_url: String,
    log: Mutex<PhoneLog>,
    /// FCM sends to `dev-slow` wait for a permit here...
    slow_gate: tokio::sync::Semaphore,
    /// ...once they have said they are waiting.
    slow_waiting: std::sync::atomic::AtomicBool,
}

type SharedPhones = Arc<Phones>;

impl Phones {
    fn calls(&self, fcm: bool, device: &str) -> Vec<(u16, tokio::time::Instant)> {
        let log = self.log.lock().unwrap();
        let calls = if fcm { &log.fcm } else { &log.apns };
        calls
            .iter()
            .filter(|c| c.device == device)
            .map(|c| (c.status, c.at))
            .collect()
    }

    /// Answers to pushes to `device`, leaving out refusals of the
    /// access token (which say nothing about the device).
    fn statuses(&self, fcm: bool, device: &str) -> Vec<u16> {
        self.calls(fcm, device)
            .into_iter()
            .map(|(s, _)| s)
            .filter(|s| !fcm || *s != 401)
            .collect()
    }
}

async fn fcm_token(State(phones): State<SharedPhones>, body: String) -> (StatusCode, Json<Value>) {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    if form.get("grant_type").map(String::as_str) != Some(resonance_notify::fcm::GRANT_TYPE) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type"})),
        );
    }
    let assertion = form.get("assertion").cloned().unwrap_or_default();
    let header = jsonwebtoken::decode_header(&assertion).unwrap();
    let mut check = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    check.set_audience(&[&phones.token_url]);
    check.set_issuer(&[FCM_ACCOUNT]);
    let claims = match jsonwebtoken::decode::<resonance_notify::fcm::Assertion>(
        &assertion,
        &phones.keys.fcm,
        &check,
    ) {
        Ok(data) if header.kid.as_deref() == Some(FCM_KEY_ID) => data.claims,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "invalid_grant"})),
            );
        }
    };
    let mut log = phones.log.lock().unwrap();
    log.assertions.push(claims);
    let token = format!("fcm-at-{}", log.access_tokens.len() + 1);
    log.access_tokens.push(token.clone());
    (
        StatusCode::OK,
        Json(json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})),
    )
}

fn fcm_error(status: StatusCode, code: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body = json!({"error": {
        "code": status.as_u16(),
        "message": format!("{code} for this token"),
        "status": if code == "UNREGISTERED" { "NOT_FOUND" } else { code },
        "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}],
    }});
    (status, Json(body)).into_response()
}

async fn fcm_send(
    State(phones): State<SharedPhones>,
    version: axum::http::Version,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let device = body["message"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if device == "dev-slow" {
        phones
            .slow_waiting
            .store(true, std::sync::atomic::Ordering::SeqCst);
        phones.slow_gate.acquire().await.unwrap().forget();
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    let mut log = phones.log.lock().unwrap();
    let valid = log.access_tokens.contains(&bearer) && !log.revoked.contains(&bearer);
    let tries = log
        .fcm
        .iter()
        .filter(|c| c.device == device && c.status != 401)
        .count();
    let response = if !valid {
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"code": 401, "status": "UNAUTHENTICATED"}})),
        )
            .into_response()
    } else {
        if bearer == "fcm-at-1" {
            // The first access token "expires" after one use.
            log.revoked.push(bearer.clone());
        }
        match (device.as_str(), tries) {
            ("dev-gone", _) => fcm_error(StatusCode::NOT_FOUND, "UNREGISTERED"),
            ("dev-invalid", _) => fcm_error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
            ("dev-busy", 0) => {
                let mut r = fcm_error(StatusCode::TOO_MANY_REQUESTS, "QUOTA_EXCEEDED");
                r.headers_mut()
                    .insert("retry-after", axum::http::HeaderValue::from_static("1"));
                r
            }
            ("dev-flaky", 0 | 1) => fcm_error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            _ => Json(json!({"name": format!("projects/{FCM_PROJECT}/messages/{tries}")}))
                .into_response(),
        }
    };
    log.fcm.push(PhoneCall {
        device,
        version,
        headers,
        body,
        status: response.status().as_u16(),
        at: tokio::time::Instant::now(),
    });
    response
}

async fn apns_push(
    State(phones): State<SharedPhones>,
    axum::extract::Path(device): axum::extract::Path<String>,
    version: axum::http::Version,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let jwt = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bearer "))
        .unwrap_or_default();
    let mut check = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    check.required_spec_claims.clear();
    check.validate_exp = false;
    check.set_issuer(&[APNS_TEAM]);
    let verified = jsonwebtoken::decode::<resonance_notify::apns::ProviderClaims>(
        jwt,
        &phones.keys.apns,
        &check,
    )
    .ok()
    .filter(|_| {
        jsonwebtoken::decode_header(jwt).is_ok_and(|h| h.kid.as_deref() == Some(APNS_KEY_ID))
    });
    let mut log = phones.log.lock().unwrap();
    let tries = log.apns.iter().filter(|c| c.device == device).count();
    let reason = |status: StatusCode, reason: &str| {
        (status, Json(json!({"reason": reason}))).into_response()
    };
    let response = match verified {
        None => reason(StatusCode::FORBIDDEN, "InvalidProviderToken"),
        Some(claims) => {
            log.provider_tokens.push(claims.claims);
            match (device.as_str(), tries) {
                // The first provider token is called expired once.
                ("apns-a", 0) => reason(StatusCode::FORBIDDEN, "ExpiredProviderToken"),
                ("apns-gone", _) => reason(StatusCode::GONE, "Unregistered"),
                ("apns-bad", _) => reason(StatusCode::BAD_REQUEST, "BadDeviceToken"),
                ("apns-busy", 0) => reason(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests"),
                _ => {
                    let mut ok = StatusCode::OK.into_response();
                    if let Some(id) = headers.get("apns-id") {
                        ok.headers_mut().insert("apns-id", id.clone());
                    }
                    ok
                }
            }
        }
    };
    log.apns.push(PhoneCall {
        device,
        version,
        headers,
        body,
        status: response.status().as_u16(),
        at: tokio::time::Instant::now(),
    });
    response
}

/// Keys, key files and servers standing in for FCM and APNs, and the
/// configuration that points the worker at them.
async fn phone_providers(config: &mut Config, dir: &std::path::Path) -> SharedPhones {
    use rsa::Generate;
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};

    let rsa_key = rsa::PrivateKey::generate();
    let rsa_private = rsa_key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let rsa_public = rsa_key
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let phones = Arc::new(Phones {
        keys: PublicKeys {
            fcm: jsonwebtoken::DecodingKey::from_rsa_pem(rsa_public.as_bytes()).unwrap(),
            apns: jsonwebtoken::DecodingKey::from_ec_pem(ec.public_key_pem().as_bytes()).unwrap(),
        },
        token_url: format!("http://{addr}/token"),
        log: Mutex::default(),
        slow_gate: tokio::sync::Semaphore::new(0),
        slow_waiting: Default::default(),
    });
    let app = Router::new()
        .route("/token", post(fcm_token))
        .route(
            &format!("/v1/projects/{FCM_PROJECT}/messages:send"),
            post(fcm_send),
        )
        .route("/3/device/{device}", post(apns_push))
        .with_state(phones.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let account = dir.join("service-account.json");
    let key = json!({
        "type": "service_account",
        "project_id": FCM_PROJECT,
        "private_key_id": FCM_KEY_ID,
        "private_key": rsa_private,
        "client_email": FCM_ACCOUNT,
        "token_uri": phones.token_url,
    });
    std::fs::write(&account, key.to_string()).unwrap();
    let p8 = dir.join(format!("AuthKey_{APNS_KEY_ID}.p8"));
    std::fs::write(&p8, ec.serialize_pem()).unwrap();

    let fcm = &mut config.notify.fcm;
    fcm.service_account_file = Some(account);
    fcm.base_url = format!("http://{addr}");
    let apns = &mut config.notify.apns;
    apns.key_file = Some(p8);
    apns.key_id = APNS_KEY_ID.into();
    apns.team_id = APNS_TEAM.into();
    apns.topic = APNS_TOPIC.into();
    apns.base_url = format!("http://{addr}");
    config.validate().unwrap();
    phones
}

async fn add_devices(conn: &mut redis::aio::MultiplexedConnection, key: &str, tokens: &[&str]) {
    let _: () = redis::cmd("SADD")
        .arg(key)
        .arg(tokens)
        .query_async(conn)
        .await
        .unwrap();
}

async fn devices(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<String> {
    let mut tokens: Vec<String> = redis::cmd("SMEMBERS")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap();
    tokens.sort();
    tokens
}

/// Starts the notify worker; the returned sender stops it.
async fn notify_worker(
    config: &Config,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), resonance_notify::NotifyError>>,
    Config,
) {
    resonance_task::telemetry::init(&config.log);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(resonance_notify::run(config.clone(), async move {
        let _ = stopped.await;
    }));
    let mut view = config.clone();
    view.consumer = resonance_notify::consumer_config(config);
    (stop, worker, view)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_and_apns_reach_every_device_signed_retried_and_prune_dead_tokens() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = stack.config();
    config.notify.max_deliver = 2;
    let phones = phone_providers(&mut config, dir.path()).await;
    let redis = redis::Client::open(format!("redis://{}/", config.redis.addr)).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let fcm_key = |u: &str| format!("resonance:notify:fcm:{u}");
    let apns_key = |u: &str| format!("resonance:notify:apns:{u}");
    add_devices(&mut conn, &fcm_key("u1"), &["dev-a", "dev-gone"]).await;
    add_devices(&mut conn, &apns_key("u1"), &["apns-a", "apns-gone"]).await;
    add_devices(&mut conn, &fcm_key("u2"), &["dev-invalid"]).await;
    add_devices(&mut conn, &apns_key("u2"), &["apns-bad"]).await;
    add_devices(&mut conn, &fcm_key("u3"), &["dev-busy", "dev-b"]).await;
    add_devices(&mut conn, &apns_key("u3"), &["apns-busy"]).await;
    add_devices(&mut conn, &fcm_key("u4"), &["dev-flaky"]).await;

    let (stop, worker, view) = notify_worker(&config).await;
    let nats = stack.nats().await;
    let js = jetstream::new(nats.clone());
    wait_consuming(&nats, &view).await;
    let recipients = ["u1", "u2", "u3", "u4"];
    settle_notice(&js, &nats, &view, notice(1, &recipients).encode_to_vec()).await;

    // FCM: every live device reached once; the dead ones tried once and
    // removed; 503 retried; 429 retried no sooner than its Retry-After;
    // a device already reached is not pushed again when its user's other
    // device is retried.
    assert_eq!(phones.statuses(true, "dev-a"), vec![200]);
    assert_eq!(phones.statuses(true, "dev-b"), vec![200]);
    assert_eq!(phones.statuses(true, "dev-gone"), vec![404]);
    assert_eq!(phones.statuses(true, "dev-invalid"), vec![400]);
    assert_eq!(phones.statuses(true, "dev-flaky"), vec![503, 503, 200]);
    let busy: Vec<_> = phones
        .calls(true, "dev-busy")
        .into_iter()
        .filter(|(s, _)| *s != 401)
        .collect();
    assert_eq!(
        busy.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![429, 200]
    );
    assert!(
        busy[1].1 - busy[0].1 >= std::time::Duration::from_secs(1),
        "Retry-After: 1 honoured"
    );
    assert_eq!(devices(&mut conn, &fcm_key("u1")).await, vec!["dev-a"]);
    assert!(devices(&mut conn, &fcm_key("u2")).await.is_empty());
    assert_eq!(
        devices(&mut conn, &fcm_key("u3")).await,
        vec!["dev-b", "dev-busy"]
    );
    {
        let log = phones.log.lock().unwrap();
        // The first access token was revoked after one use: the sends
        // refused with it renewed it once between them and went again.
        assert_eq!(log.access_tokens, vec!["fcm-at-1", "fcm-at-2"]);
        assert!(log.fcm.iter().any(|c| c.status == 401));
        for a in &log.assertions {
            assert_eq!(a.scope, resonance_notify::fcm::SCOPE);
            assert_eq!(a.exp - a.iat, 3600);
        }
        for call in log.fcm.iter().filter(|c| c.status == 200) {
            let message = &call.body["message"];
            assert_eq!(message["token"], call.device.as_str());
            assert_eq!(message["notification"]["title"], "team");
            assert_eq!(message["notification"]["body"], "ann: hello 1");
            assert_eq!(message["data"]["msg_id"], "1");
            assert_eq!(message["android"]["ttl"], "7200s");
        }
    }

    // APNs: HTTP/2 only; signed provider token (renewed once when called
    // expired); the headers; 410 and BadDeviceToken remove the token; a
    // 429 is retried with the same apns-id.
    assert_eq!(
        phones.statuses(false, "apns-a"),
        vec![403, 200],
        "called expired, signed again and sent again at once"
    );
    assert_eq!(phones.statuses(false, "apns-gone"), vec![410]);
    assert_eq!(phones.statuses(false, "apns-bad"), vec![400]);
    assert_eq!(phones.statuses(false, "apns-busy"), vec![429, 200]);
    assert_eq!(devices(&mut conn, &apns_key("u1")).await, vec!["apns-a"]);
    assert!(devices(&mut conn, &apns_key("u2")).await.is_empty());
    {
        let log = phones.log.lock().unwrap();
        let now = resonance_task::clock::now_ms() / 1000;
        for call in &log.apns {
            assert_eq!(call.version, axum::http::Version::HTTP_2);
            let h = |name: &str| call.headers[name].to_str().unwrap().to_string();
            assert_eq!(h("apns-topic"), APNS_TOPIC);
            assert_eq!(h("apns-push-type"), "alert");
            assert_eq!(h("apns-priority"), "10");
            assert_eq!(h("apns-collapse-id"), "resonance-1");
            let expires: i64 = h("apns-expiration").parse().unwrap();
            assert!((now + 7100..=now + 7200).contains(&expires), "{expires}");
            let user = match call.device.as_str() {
                "apns-bad" => "u2",
                "apns-busy" => "u3",
                _ => "u1",
            };
            assert_eq!(
                h("apns-id"),
                resonance_notify::apns::apns_id(1, user, &call.device)
            );
            assert_eq!(call.body["aps"]["alert"]["title"], "team");
            assert_eq!(call.body["aps"]["alert"]["body"], "ann: hello 1");
            assert_eq!(call.body["aps"]["thread-id"], "s-1");
        }
        let ids: Vec<_> = log
            .apns
            .iter()
            .filter(|c| c.device == "apns-busy")
            .map(|c| c.headers["apns-id"].clone())
            .collect();
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0], ids[1], "apns-id is stable across the retry");
        assert!(log.provider_tokens.iter().all(|c| c.iss == APNS_TEAM));
    }

    // The same notice again (a redelivery) pushes nothing twice.
    let before = {
        let log = phones.log.lock().unwrap();
        (log.fcm.len(), log.apns.len())
    };
    settle_notice(&js, &nats, &view, notice(1, &recipients).encode_to_vec()).await;
    {
        let log = phones.log.lock().unwrap();
        assert_eq!((log.fcm.len(), log.apns.len()), before);
    }

    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_provider_holds_up_no_other() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = stack.config();
    // One FCM request at a time: the stuck one holds FCM's only slot.
    config.notify.fcm.max_in_flight = 1;
    let phones = phone_providers(&mut config, dir.path()).await;
    let redis = redis::Client::open(format!("redis://{}/", config.redis.addr)).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    add_devices(&mut conn, "resonance:notify:fcm:slow", &["dev-slow"]).await;
    add_devices(&mut conn, "resonance:notify:apns:slow", &["apns-slow"]).await;
    add_devices(&mut conn, "resonance:notify:fcm:fast", &["dev-fast"]).await;
    add_devices(&mut conn, "resonance:notify:apns:fast", &["apns-fast"]).await;

    let (stop, worker, view) = notify_worker(&config).await;
    let nats = stack.nats().await;
    let js = jetstream::new(nats.clone());
    wait_consuming(&nats, &view).await;
    let publish = |id: i64, user: &'static str| {
        let js = js.clone();
        let topic = view.offline.notice_topic.clone();
        async move {
            js.publish(topic, notice(id, &[user]).encode_to_vec().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    publish(10, "slow").await;
    eventually("FCM stuck on dev-slow", || async {
        phones
            .slow_waiting
            .load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    publish(11, "fast").await;
    // FCM is stuck on dev-slow; APNs reaches both users meanwhile.
    eventually("APNs pushes while FCM is stuck", || async {
        phones.statuses(false, "apns-slow").contains(&200)
            && phones.statuses(false, "apns-fast").contains(&200)
    })
    .await;
    assert!(phones.calls(true, "dev-slow").is_empty(), "FCM still stuck");
    assert!(
        phones.calls(true, "dev-fast").is_empty(),
        "FCM's one slot is taken by the stuck send"
    );
    phones.slow_gate.add_permits(1);
    wait_settled(&nats, &view).await;
    assert_eq!(phones.statuses(true, "dev-slow"), vec![200]);
    assert_eq!(phones.statuses(true, "dev-fast"), vec![200]);
    assert_eq!(
        phones
            .statuses(false, "apns-slow")
            .iter()
            .filter(|s| **s == 200)
            .count(),
        1
    );
    assert_eq!(phones.statuses(false, "apns-fast"), vec![200]);

    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}
