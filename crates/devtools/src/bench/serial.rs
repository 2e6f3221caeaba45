//! The upstream fan-out, as the benchmark's baseline: a core-NATS queue
//! subscription handled by 10 workers; per event one SQL query for the
//! members (upstream's own: every member a row, no cache, no read shared
//! with another event's), then per member one Redis GET of the route and
//! one push on the gateway's stream, awaited before the next member.
//! Gateway addresses come from the same watched etcd registry the service
//! uses.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use prost::Message;
use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};
use std::time::Duration;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::{BenchError, setup};
use resonance_task::config::Config;
use resonance_task::lifecycle::Lifecycle;
use resonance_task::proto::gateway::v1::push_service_client::PushServiceClient;
use resonance_task::proto::{PushEvent, PushMessageRequest, PushMessageResponse};
use resonance_task::registry::{GatewayEndpoint, GatewayRegistry};
use resonance_task::store::{RedisClient, Route, route_key};

/// Events in flight, as upstream's worker pool.
pub const UPSTREAM_WORKERS: usize = 10;

/// Messages the serial consumer's subscription buffers.
const SUBSCRIPTION_CAPACITY: usize = 1 << 20;

/// How long one step (the member read, a route read, a push) may take
/// before it is given up with a warning that names it: a stuck step would
/// otherwise stall the run without a word.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// One gateway's stream; a push holds it until its response arrives.
struct Stream {
    requests: mpsc::Sender<PushMessageRequest>,
    responses: Streaming<PushMessageResponse>,
}

struct Upstream {
    database: sqlx::AnyPool,
    /// `SELECT username FROM t_session_member WHERE session_id = ?`.
    members_sql: SqlStr,
    redis: RedisClient,
    registry: GatewayRegistry,
    streams: Mutex<HashMap<String, Arc<Mutex<Stream>>>>,
}

pub(crate) struct Serial {
    life: Lifecycle,
    task: JoinHandle<()>,
}

impl Serial {
    pub(crate) async fn start(config: &Config) -> Result<Self, BenchError> {
        let (pool, dialect) = resonance_task::store::connect_database(&config.database)
            .await
            .map_err(setup)?;
        let redis = RedisClient::connect(&config.redis).await.map_err(setup)?;
        let life = Lifecycle::new();
        let registry = GatewayRegistry::spawn(
            &config.etcd,
            &config.registry,
            &config.gateway_service_name,
            &life,
        );
        registry.wait_synced().await;
        // A core subscription drops what overflows its buffer (as upstream's
        // does); the benchmark submits everything at once, so the buffer
        // holds a whole run and the algorithm is measured, not the drops.
        let nats = async_nats::ConnectOptions::new()
            .name("resonance-task-bench-serial")
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            // Core NATS drops what a slow or cut connection misses; a run
            // that then stalls should say why.
            .event_callback(|event| async move {
                // Closed: the driver stopping.
                if !matches!(
                    event,
                    async_nats::Event::Connected | async_nats::Event::Closed
                ) {
                    tracing::warn!(%event, "serial: NATS event");
                }
            })
            .connect(config.nats.url.expose())
            .await
            .map_err(setup)?;
        let subscription = nats
            .queue_subscribe(
                config.consumer.topic.clone(),
                config.consumer.queue_group.clone(),
            )
            .await
            .map_err(setup)?;
        // In place on the server before anything is published to it.
        resonance_task::nats::round_trip(&nats)
            .await
            .map_err(setup)?;
        let upstream = Arc::new(Upstream {
            database: pool,
            members_sql: AssertSqlSafe(format!(
                "SELECT username FROM t_session_member WHERE session_id = {}",
                dialect.placeholder(1)
            ))
            .into_sql_str(),
            redis,
            registry,
            streams: Mutex::new(HashMap::new()),
        });
        let stop = life.stop.clone();
        let task = tokio::spawn(async move {
            let work = subscription.for_each_concurrent(UPSTREAM_WORKERS, |msg| {
                let upstream = upstream.clone();
                async move {
                    match PushEvent::decode(msg.payload) {
                        Ok(event) => upstream.handle(event).await,
                        Err(e) => tracing::warn!(error = %e, "undecodable event"),
                    }
                }
            });
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = work => {}
            }
            drop(nats);
        });
        Ok(Self { life, task })
    }

    pub(crate) async fn stop(self) {
        self.life.stop.cancel();
        let _ = self.task.await;
        self.life.drain(Duration::from_secs(5), None).await;
    }
}

impl Upstream {
    async fn handle(&self, event: PushEvent) {
        let session_id = &event.session_id;
        let read = sqlx::query_scalar::<_, String>(self.members_sql.clone())
            .bind(session_id)
            .fetch_all(&self.database);
        let members = match tokio::time::timeout(STEP_TIMEOUT, read).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "serial: members");
                return;
            }
            Err(_) => {
                tracing::warn!(%session_id, "serial: reading members took over {STEP_TIMEOUT:?}");
                return;
            }
        };
        if members.is_empty() {
            tracing::warn!(%session_id, "serial: the session has no members");
        }
        for member in members {
            let mut get = redis::cmd("GET");
            get.arg(route_key(&member));
            let route: Option<String> = match tokio::time::timeout(
                STEP_TIMEOUT,
                self.redis.query(&get),
            )
            .await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "serial: route");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(%member, "serial: reading the route took over {STEP_TIMEOUT:?}");
                    continue;
                }
            };
            let Some(route) = route.and_then(|r| serde_json::from_str::<Route>(&r).ok()) else {
                tracing::debug!(%member, "serial: no route (offline)");
                continue;
            };
            let endpoint = self.registry.snapshot().resolve(&route.gateway_id).cloned();
            let Some(endpoint) = endpoint else {
                tracing::warn!(%member, gateway_id = %route.gateway_id, "serial: the route's gateway is not in the registry");
                continue;
            };
            let gateway_id = endpoint.gateway_id.clone();
            match tokio::time::timeout(STEP_TIMEOUT, self.push(&endpoint, &event, member)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, %gateway_id, "serial: push"),
                Err(_) => {
                    tracing::warn!(%gateway_id, "serial: a push had no answer in {STEP_TIMEOUT:?}; reconnecting");
                    self.streams.lock().await.remove(&gateway_id);
                }
            }
        }
    }

    async fn stream(&self, endpoint: &GatewayEndpoint) -> Result<Arc<Mutex<Stream>>, BenchError> {
        let mut streams = self.streams.lock().await;
        if let Some(s) = streams.get(&endpoint.gateway_id) {
            return Ok(s.clone());
        }
        let channel = tonic::transport::Endpoint::from_shared(endpoint.uri.clone())
            .map_err(setup)?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(setup)?;
        let (requests, outbound) = mpsc::channel(16);
        let responses = PushServiceClient::new(channel)
            .push_message(ReceiverStream::new(outbound))
            .await
            .map_err(setup)?
            .into_inner();
        let stream = Arc::new(Mutex::new(Stream {
            requests,
            responses,
        }));
        streams.insert(endpoint.gateway_id.clone(), stream.clone());
        Ok(stream)
    }

    /// One push, awaited: send, then wait for its response.
    async fn push(
        &self,
        endpoint: &GatewayEndpoint,
        event: &PushEvent,
        to: String,
    ) -> Result<(), BenchError> {
        let stream = self.stream(endpoint).await?;
        let mut stream = stream.lock().await;
        let request = PushMessageRequest {
            to_username: to.clone(),
            message: Some(resonance_task::proto::PushMessage {
                to_username: to,
                ..resonance_task::dispatch::gateway_message(event)
            }),
            trace_headers: Default::default(),
        };
        stream.requests.send(request).await.map_err(setup)?;
        match stream.responses.message().await {
            Ok(Some(answer)) if !answer.error.is_empty() => Err(setup(format!(
                "gateway {} did not deliver: {}",
                endpoint.gateway_id, answer.error
            ))),
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(setup("gateway ended the stream")),
            Err(status) => Err(setup(status)),
        }
    }
}
