//! The upstream fan-out, as the benchmark's baseline: a core-NATS queue
//! subscription handled by 10 workers; per event one SQL query for the
//! members, then per member one Redis GET of the route and one push on the
//! gateway's stream, awaited before the next member. Gateway addresses come
//! from the same watched etcd registry the service uses.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use prost::Message;
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
use resonance_task::store::{MemberStore, RedisClient, Route, route_key};

/// Events in flight, as upstream's worker pool.
pub const UPSTREAM_WORKERS: usize = 10;

/// Messages the serial consumer's subscription buffers.
const SUBSCRIPTION_CAPACITY: usize = 1 << 20;

/// One gateway's stream; a push holds it until its response arrives.
struct Stream {
    requests: mpsc::Sender<PushMessageRequest>,
    responses: Streaming<PushMessageResponse>,
}

struct Upstream {
    members: MemberStore,
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
        nats.flush().await.map_err(setup)?;
        let upstream = Arc::new(Upstream {
            members: MemberStore::new(pool, dialect),
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
        let members = match self.members.members(&event.session_id).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "members");
                return;
            }
        };
        for member in members {
            let route: Option<String> = match self
                .redis
                .query(redis::cmd("GET").arg(route_key(&member)))
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "route");
                    continue;
                }
            };
            let Some(route) = route.and_then(|r| serde_json::from_str::<Route>(&r).ok()) else {
                continue;
            };
            let endpoint = self.registry.snapshot().resolve(&route.gateway_id).cloned();
            let Some(endpoint) = endpoint else {
                continue;
            };
            if let Err(e) = self.push(&endpoint, &event, member).await {
                tracing::warn!(error = %e, "push");
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
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(setup("gateway ended the stream")),
            Err(status) => Err(setup(status)),
        }
    }
}
