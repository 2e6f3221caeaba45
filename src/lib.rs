//! resonance-task: the write fan-out of Resonance IM.
//!
//! A `PushEvent` arrives on NATS (`consumer`), its session's members are read
//! from SQL and their routes from Redis (`store`), the routes are grouped per
//! gateway (`dispatch`), each gateway's address comes from a watched etcd
//! registry (`registry`), and the pushes go over pooled long-lived gRPC
//! streams (`gateway`). [`run`] wires these together; `main` only parses the
//! command line.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod consumer;
pub mod dispatch;
pub mod gateway;
pub mod notify;
pub mod proto;
pub mod registry;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod tools;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::config::{Config, ConsumerMode, NatsConfig};
use crate::consumer::{EventHandler, LaneRules, RetryPolicy, Tally};
use crate::dispatch::Dispatcher;
use crate::dispatch::offline::OfflineDelivery;
use crate::gateway::GatewayPool;
use crate::registry::GatewayRegistry;
use crate::store::{MemberStore, OfflineStore, ProgressStore, RedisClient, RouteStore};
use crate::telemetry::admin::Readiness;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Admin(#[from] telemetry::admin::AdminError),
    #[error(transparent)]
    Database(#[from] store::DatabaseError),
    #[error("NATS core subscription: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("{dependency} refused this service: {detail}")]
    Refused {
        dependency: &'static str,
        detail: String,
    },
}

/// Makes ring (which the NATS client links already) the process's TLS
/// crypto provider: reqwest is built without a default one. Call before
/// building any HTTP client; a second call is harmless.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An HTTP client builder that can speak HTTPS.
pub fn http_client() -> reqwest::ClientBuilder {
    install_tls_provider();
    reqwest::Client::builder()
}

/// Connects to NATS with the configured identity. Reconnects forever after
/// the first connection.
pub async fn connect_nats(
    cfg: &NatsConfig,
    name: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    connect_nats_with(cfg, name, None).await
}

/// [`connect_nats`], keeping `readiness` and the reconnect counter current.
pub async fn connect_nats_with(
    cfg: &NatsConfig,
    name: &str,
    readiness: Option<Arc<Readiness>>,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(cfg.connect_timeout)
        .max_reconnects(None)
        .event_callback(move |event| {
            let readiness = readiness.clone();
            async move {
                let connected = |up: bool| {
                    if let Some(r) = &readiness {
                        Readiness::set(&r.nats_connected, up);
                    }
                };
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!("NATS connected");
                        metrics::counter!(telemetry::metrics::RECONNECTS, "dependency" => "nats")
                            .increment(1);
                        connected(true);
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!("NATS disconnected; reconnecting");
                        connected(false);
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            }
        });
    if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
        options = options.user_and_password(user.clone(), password.expose().to_string());
    }
    if let Some(token) = &cfg.token {
        options = options.token(token.expose().to_string());
    }
    if let Some(seed) = &cfg.nkey {
        options = options.nkey(seed.expose().to_string());
    }
    if let Some(path) = &cfg.credentials_file {
        options = options.credentials_file(path).await.map_err(|e| {
            async_nats::ConnectError::with_source(
                async_nats::ConnectErrorKind::Authentication,
                format!("nats.credentials_file {}: {e}", path.display()),
            )
        })?;
    }
    let tls = &cfg.tls;
    if tls.enabled
        || cfg
            .url
            .expose()
            .split(',')
            .any(|u| u.trim().starts_with("tls://"))
    {
        options = options.require_tls(true);
    }
    if let Some(ca) = &tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    options.connect(cfg.url.expose()).await
}

/// A server that turned away who we are (credentials or certificates)
/// rather than being unreachable: waiting will not help until the
/// configuration changes.
pub trait Refusal {
    fn refused(&self) -> bool;
}

/// Whether any error in `e`'s chain says a TLS peer was not trusted or a
/// credential was rejected.
pub(crate) fn chain_refuses(e: &(dyn std::error::Error + 'static)) -> bool {
    const SIGNS: [&str; 12] = [
        "invalid peer certificate",
        "UnknownIssuer",
        "certificate required",
        "CertificateRequired",
        "bad certificate",
        "BadCertificate",
        "unknown ca",
        "UnknownCA",
        "authentication failed",
        "authorization violation",
        "WRONGPASS",
        "NOAUTH",
    ];
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if SIGNS.iter().any(|s| text.contains(s)) {
            return true;
        }
        next = err.source();
    }
    false
}

impl Refusal for async_nats::ConnectError {
    fn refused(&self) -> bool {
        use async_nats::ConnectErrorKind as K;
        matches!(
            self.kind(),
            K::AuthorizationViolation | K::Authentication | K::Tls
        ) || chain_refuses(self)
    }
}

/// Retries `attempt` with backoff until it succeeds or `cancel` fires
/// (`None`). Each failure is logged with `what`, so a dependency that is
/// down at start-up is named in the log while the pod waits for it. A
/// server that refuses the credentials or certificates ends the wait with
/// [`RunError::Refused`]: the pod exits naming the dependency.
pub async fn until_ready<T, E, F, Fut>(
    what: &'static str,
    cancel: &CancellationToken,
    mut attempt: F,
) -> Result<Option<T>, RunError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display + Refusal,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            r = attempt() => r,
        };
        match result {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.refused() => {
                tracing::error!(dependency = what, error = %e, "dependency refused the configured credentials or certificates");
                return Err(RunError::Refused {
                    dependency: what,
                    detail: e.to_string(),
                });
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(dependency = what, error = %e, retry_in = ?delay, "dependency not ready");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Keeps `readiness.database_reachable` current with a cheap query every
/// few seconds.
async fn watch_database(pool: sqlx::AnyPool, readiness: Arc<Readiness>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let probe = sqlx::query("SELECT 1").execute(&pool);
        let up = matches!(
            tokio::time::timeout(Duration::from_secs(2), probe).await,
            Ok(Ok(_))
        );
        Readiness::set(&readiness.database_reachable, up);
    }
}

/// What every long-running command shares: one cancellation for intake,
/// one for the end of the grace period, a tracker of every spawned task,
/// readiness, and the admin port.
pub(crate) struct Lifecycle {
    pub(crate) cancel: CancellationToken,
    pub(crate) abort: CancellationToken,
    pub(crate) tracker: TaskTracker,
    pub(crate) readiness: Arc<Readiness>,
}

impl Lifecycle {
    pub(crate) async fn start(
        admin: &config::AdminConfig,
    ) -> Result<Self, telemetry::admin::AdminError> {
        let lifecycle = Self {
            cancel: CancellationToken::new(),
            abort: CancellationToken::new(),
            tracker: TaskTracker::new(),
            readiness: Arc::new(Readiness::default()),
        };
        telemetry::metrics::describe();
        if admin.enabled {
            telemetry::admin::serve(
                admin.listen,
                lifecycle.readiness.clone(),
                &lifecycle.tracker,
                lifecycle.cancel.clone(),
            )
            .await?;
        }
        Ok(lifecycle)
    }

    /// Stops intake, lets in-flight work finish within `grace`, then hands
    /// what is left back to NATS (so another process takes it now rather
    /// than after ack_wait) and flushes the acks on `nats`.
    pub(crate) async fn drain(&self, grace: Duration, nats: Option<&async_nats::Client>) {
        self.cancel.cancel();
        self.tracker.close();
        tracing::info!(?grace, "shutting down: finishing in-flight work");
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            self.abort.cancel();
            if tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    "some in-flight messages could not be handed back; NATS redelivers them after ack_wait"
                );
            }
        }
        if let Some(nats) = nats {
            // NATS may be gone too; do not wait for it forever.
            match tokio::time::timeout(Duration::from_secs(5), nats.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "flushing acks to NATS failed"),
                Err(_) => tracing::warn!(
                    "flushing acks to NATS timed out; unflushed acks mean redeliveries"
                ),
            }
        }
    }
}

/// Runs the task service until `shutdown` resolves: stop intake, let
/// in-flight events finish (up to a grace period), close gateway streams.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let life = Lifecycle::start(&config.admin).await?;
    let serve = serve(
        &config,
        &life.cancel,
        &life.abort,
        &life.tracker,
        life.readiness.clone(),
    );
    tokio::pin!(serve);
    let result = tokio::select! {
        r = &mut serve => r,
        _ = shutdown => {
            life.cancel.cancel();
            serve.await
        }
    };
    let nats = match &result {
        Ok(Some(nats)) => Some(nats),
        _ => None,
    };
    life.drain(config.consumer.shutdown_grace, nats).await;
    tracing::info!("stopped");
    result.map(|_| ())
}

/// Drops a session from the member cache whenever its id arrives on
/// `dispatch.session_changed_topic`.
async fn follow_session_changes(
    mut changes: async_nats::Subscriber,
    members: MemberStore,
    cancel: CancellationToken,
) {
    use futures::StreamExt;
    loop {
        let change = tokio::select! {
            _ = cancel.cancelled() => return,
            c = changes.next() => match c {
                Some(c) => c,
                None => return,
            },
        };
        let session_id = String::from_utf8_lossy(&change.payload);
        let session_id = session_id.trim();
        if session_id.is_empty() {
            tracing::warn!(subject = %change.subject, "membership change without a session id; ignored");
            continue;
        }
        members.invalidate(session_id).await;
        metrics::counter!(telemetry::metrics::MEMBER_CACHE_INVALIDATIONS).increment(1);
        tracing::debug!(session_id, "session members changed; cache entry dropped");
    }
}

/// Connects the dependencies, then consumes until `cancel` fires. Returns
/// the NATS client (to flush acks) unless shutdown came before it connected.
async fn serve(
    config: &Config,
    cancel: &CancellationToken,
    abort: &CancellationToken,
    tracker: &TaskTracker,
    readiness: Arc<Readiness>,
) -> Result<Option<async_nats::Client>, RunError> {
    let Some((pool, dialect)) = until_ready("database", cancel, || {
        store::connect_database(&config.database)
    })
    .await?
    else {
        return Ok(None);
    };
    if config.database.migrates_on_start() {
        store::migrate(&pool, dialect, &config.database).await?;
    }
    tracker.spawn(watch_database(
        pool.clone(),
        readiness.clone(),
        cancel.clone(),
    ));
    let members = MemberStore::new(pool, dialect)
        .with_cache(
            config.dispatch.member_cache_ttl,
            config.dispatch.member_cache_capacity,
        )
        .with_max_members(config.limits.max_members);
    let Some(redis) = until_ready("redis", cancel, || RedisClient::connect(&config.redis)).await?
    else {
        return Ok(None);
    };
    let progress = config.dedup.enabled.then(|| {
        // A crashed handler's claim lapses by the time NATS redelivers.
        let lease = config.consumer.ack_wait;
        ProgressStore::new(
            redis.clone(),
            config.dedup.progress_ttl,
            config.dedup.window,
            lease,
        )
    });
    let offline_store = OfflineStore::new(
        redis.clone(),
        config.offline.max_messages,
        config.offline.ttl,
    );
    let attempts = consumer::FailedAttempts::new(redis.clone(), config.dedup.progress_ttl);
    let routes = RouteStore::new(
        redis,
        config.dispatch.route_chunk_size,
        config.dispatch.route_concurrency,
    );
    let cached_members = members.clone();
    // Connecting once first makes refused credentials a start-up error; the
    // registry's own watcher then reconnects on its own.
    if until_ready("etcd", cancel, || registry::connect_checked(&config.etcd))
        .await?
        .is_none()
    {
        return Ok(None);
    }
    let registry = GatewayRegistry::spawn(config, tracker, cancel.clone());
    tokio::select! {
        _ = cancel.cancelled() => return Ok(None),
        _ = registry.wait_synced() => {}
    }
    Readiness::set(&readiness.registry_synced, true);
    let Some(nats) = until_ready("nats", cancel, || {
        connect_nats_with(&config.nats, &config.service.name, Some(readiness.clone()))
    })
    .await?
    else {
        return Ok(None);
    };
    let notices = if config.offline.notice {
        let js = async_nats::jetstream::new(nats.clone());
        let ensured = until_ready("offline notice stream", cancel, || {
            dispatch::offline::ensure_notice_stream(&js, &config.offline)
        })
        .await?;
        if ensured.is_none() {
            return Ok(None);
        }
        Some(js)
    } else {
        None
    };
    let gateways = GatewayPool::new(config.gateway.clone(), tracker.clone());
    let dispatcher = Dispatcher::new(
        members,
        routes,
        registry,
        gateways,
        progress,
        config.dispatch.clone(),
    )
    .with_offline(OfflineDelivery::new(
        offline_store,
        notices,
        config.offline.clone(),
    ))
    .with_limits(config.limits.clone());
    let tally = Tally::default();
    tracker.spawn(tally.clone().report_until(cancel.clone()));
    let retry = RetryPolicy {
        max_retry: config.consumer.max_retry,
        retry_interval: config.consumer.retry_interval,
    };
    let handler = Arc::new(
        EventHandler::new(dispatcher, retry, tally).with_lanes(LaneRules::new(&config.priority)),
    );
    let topic = &config.dispatch.session_changed_topic;
    if !topic.is_empty() && !config.dispatch.member_cache_ttl.is_zero() {
        match nats.subscribe(topic.clone()).await {
            Ok(changes) => {
                // Registered before events flow, so no change is missed.
                let _ = nats.flush().await;
                tracker.spawn(follow_session_changes(
                    changes,
                    cached_members,
                    cancel.clone(),
                ));
            }
            Err(e) => {
                tracing::warn!(%topic, error = %e, "cannot follow membership changes; the member cache expires by its TTL only")
            }
        }
    }
    match config.consumer.mode {
        ConsumerMode::Jetstream => {
            let shutdown = consumer::jetstream::Shutdown {
                stop: cancel.clone(),
                abort: abort.clone(),
                readiness: readiness.clone(),
            };
            let prefetch = consumer::jetstream::Prefetch {
                count: config.priority.prefetch,
                bytes: config.priority.prefetch_bytes,
            };
            consumer::jetstream::Intake::new(
                nats.clone(),
                config.consumer.clone(),
                handler,
                attempts,
            )
            .run(shutdown, tracker.clone(), prefetch)
            .await;
        }
        ConsumerMode::Core => {
            consumer::core::run(
                nats.clone(),
                config.consumer.clone(),
                handler,
                cancel.clone(),
                tracker.clone(),
                readiness.clone(),
            )
            .await?;
        }
    }
    Ok(Some(nats))
}
