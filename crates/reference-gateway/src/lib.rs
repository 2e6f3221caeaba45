//! The reference gateway: a real push server for development, tests, the
//! demo and benchmarks. It serves the upstream `PushService` and, unless
//! told to act like an upstream gateway, batch-v1 `BatchPushService`, which
//! it then advertises in etcd (`metadata.push_protocol = "batch-v1"`). It
//! plays a gateway that holds a fixed set of connected users: it registers
//! in etcd under a kept-alive lease (`metadata.gateway_id`), writes those
//! users' routes to Redis in the contract format, answers every push, with
//! an error for users it does not hold, and counts what each user received
//! so a test or the demo can check exactly what arrived (`GET /stats` on
//! its HTTP port).

#![forbid(unsafe_code)]

pub mod cli;
mod registration;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::routing::get;
use axum::{Json, Router};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

pub use registration::{Registration, RegistrationError};

use resonance_task::config::{EtcdConfig, RedisConfig};
use resonance_task::proto::gateway::v1::batch_push_service_server::{
    BatchPushService, BatchPushServiceServer,
};
use resonance_task::proto::gateway::v1::push_service_server::{PushService, PushServiceServer};
use resonance_task::proto::{
    PushBatchRequest, PushBatchResponse, PushMessage, PushMessageRequest, PushMessageResponse,
    RecipientFailure,
};
use resonance_task::registry::{
    BATCH_V1, GATEWAY_ID_METADATA, PUSH_PROTOCOL_METADATA, ServiceInstance, instance_key,
};
use resonance_task::store::{ROUTE_TTL, RedisClient, RedisError, Route, RouteStore};

/// The error text for a user this gateway does not hold.
pub const NOT_CONNECTED: &str = "user not connected";

#[derive(Debug, thiserror::Error)]
pub enum ReferenceGatewayError {
    #[error("binding {what} on {addr}: {cause}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        cause: std::io::Error,
    },
    #[error("ledger journal {path}: {cause}")]
    Journal {
        path: std::path::PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error(transparent)]
    Registration(#[from] RegistrationError),
    #[error("writing routes: {0}")]
    Routes(#[from] RedisError),
    #[error("gRPC TLS: {0}")]
    Tls(#[from] tonic::transport::Error),
}

/// TLS the reference gateway serves with (PEM). With `client_ca`, callers
/// must present a certificate that CA signed (mutual TLS).
#[derive(Clone)]
pub struct ServerTls {
    pub cert: Vec<u8>,
    pub key: zeroize::Zeroizing<Vec<u8>>,
    pub client_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("client_ca", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct ReferenceGatewayOptions {
    pub gateway_id: String,
    /// etcd instance id; defaults to `gateway-service-{gateway_id}`.
    pub instance_id: Option<String>,
    pub grpc_listen: SocketAddr,
    /// Host written into the etcd endpoint (`grpc://host:port`).
    pub advertise_host: String,
    /// Port written into the etcd endpoint, when callers reach the gateway
    /// through something in front of it (a proxy); default: the bound port.
    pub advertise_port: Option<u16>,
    pub http_listen: Option<SocketAddr>,
    pub users: Vec<String>,
    /// Write the held users' routes to Redis (and delete them on exit).
    pub write_routes: bool,
    pub etcd: EtcdConfig,
    pub redis: RedisConfig,
    pub namespace: String,
    pub service_name: String,
    pub lease_ttl: Duration,
    /// Hold every response this long before sending it (a slow gateway).
    pub reply_delay: Duration,
    /// Refuse this many push streams with UNAVAILABLE before serving
    /// normally (a flapping gateway, for fault tests).
    pub refuse_streams: u32,
    /// Append every delivery here and count those already in it, so a
    /// restarted gateway reports what its predecessors received.
    pub journal: Option<std::path::PathBuf>,
    /// Serve and advertise batch-v1 as well as `PushService`; off, it acts
    /// like an upstream gateway.
    pub batch: bool,
    /// Keep a count per (user, msg_id), for exact duplicate and loss
    /// checks; off (benchmarks), only totals and latency are kept, so
    /// memory stays flat however many pushes arrive.
    pub track_deliveries: bool,
    /// Serve gRPC over TLS and advertise `grpcs://`.
    pub tls: Option<ServerTls>,
}

/// Deliveries of one message at one gateway.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct MsgCount {
    pub users: u64,
    pub deliveries: u64,
}

/// What one gateway received.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct GatewayStats {
    pub gateway_id: String,
    pub held: usize,
    /// Pushes answered as delivered, duplicates included.
    pub received: u64,
    /// Distinct (user, msg_id) pairs delivered.
    pub distinct: u64,
    /// Deliveries of a (user, msg_id) pair beyond the first.
    pub duplicates: u64,
    /// Pushes for users this gateway does not hold.
    pub rejected: u64,
    /// Push streams opened by task pods (both protocols).
    pub streams: u64,
    /// batch-v1 requests received.
    pub batches: u64,
    /// Most requests seen at once that were received but not yet answered:
    /// above 1 only if callers pipeline.
    pub max_pending: u64,
    /// Per msg_id: distinct users reached and deliveries in all.
    pub per_msg: BTreeMap<i64, MsgCount>,
    /// Unix microseconds of the latest delivery (0 if none).
    pub last_delivery_us: i64,
    /// Publish-to-gateway latency in microseconds as (value, count) pairs,
    /// measured from the event's `timestamp`.
    pub latency_us: Vec<(u64, u64)>,
}

struct Received {
    deliveries: HashMap<(String, i64), u32>,
    /// Per user, msg_ids in arrival order.
    arrivals: HashMap<String, Vec<i64>>,
    rejected: u64,
    received: u64,
    streams: u64,
    batches: u64,
    /// The first `traceparent` seen per msg_id.
    traces: HashMap<i64, String>,
    pending: u64,
    max_pending: u64,
    last_delivery_us: i64,
    latency_us: Histogram<u64>,
}

/// Counters shared by the gRPC service and the stats endpoint.
pub struct Ledger {
    gateway_id: String,
    held: HashSet<String>,
    track_deliveries: bool,
    journal: Option<Mutex<std::fs::File>>,
    received: Mutex<Received>,
}

impl Ledger {
    fn new(gateway_id: String, users: &[String]) -> Self {
        Self::with_journal(gateway_id, users, None, HashMap::new())
    }

    /// A ledger that appends every delivery to `journal`, starting from the
    /// deliveries an earlier process recorded there, so counts survive a
    /// gateway restart (the chaos run restarts gateways).
    fn open(gateway_id: String, users: &[String], path: &std::path::Path) -> std::io::Result<Self> {
        let mut deliveries: HashMap<(String, i64), u32> = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines() {
                if let Some((msg_id, user)) = line.split_once(' ')
                    && let Ok(msg_id) = msg_id.parse()
                {
                    *deliveries.entry((user.to_string(), msg_id)).or_default() += 1;
                }
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self::with_journal(
            gateway_id,
            users,
            Some(file),
            deliveries,
        ))
    }

    fn with_journal(
        gateway_id: String,
        users: &[String],
        journal: Option<std::fs::File>,
        deliveries: HashMap<(String, i64), u32>,
    ) -> Self {
        Self {
            gateway_id,
            held: users.iter().cloned().collect(),
            track_deliveries: true,
            journal: journal.map(Mutex::new),
            received: Mutex::new(Received {
                received: deliveries.values().map(|c| u64::from(*c)).sum(),
                deliveries,
                arrivals: HashMap::new(),
                rejected: 0,
                streams: 0,
                batches: 0,
                traces: HashMap::new(),
                pending: 0,
                max_pending: 0,
                last_delivery_us: 0,
                latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                    .expect("histogram bounds"),
            }),
        }
    }

    fn answer(&self, request: PushMessageRequest) -> PushMessageResponse {
        let message = request.message.unwrap_or_default();
        let mut r = self.received.lock().expect("ledger lock");
        r.pending = r.pending.saturating_sub(1);
        self.note_trace(&mut r, &message, &request.trace_headers);
        let now_us = unix_micros();
        let error = if self.deliver(&mut r, &request.to_username, &message, now_us) {
            String::new()
        } else {
            NOT_CONNECTED.to_string()
        };
        PushMessageResponse {
            msg_id: message.msg_id,
            seq_id: message.seq_id,
            error,
        }
    }

    fn answer_batch(&self, request: PushBatchRequest) -> PushBatchResponse {
        let message = request.message.unwrap_or_default();
        let mut r = self.received.lock().expect("ledger lock");
        r.pending = r.pending.saturating_sub(1);
        r.batches += 1;
        self.note_trace(&mut r, &message, &request.trace_headers);
        let now_us = unix_micros();
        let failed = request
            .to_usernames
            .into_iter()
            .filter(|user| !self.deliver(&mut r, user, &message, now_us))
            .map(|username| RecipientFailure {
                username,
                reason: NOT_CONNECTED.to_string(),
            })
            .collect();
        PushBatchResponse {
            batch_id: request.batch_id,
            failed,
        }
    }

    /// Records one push; false when `user` is not held here.
    fn deliver(&self, r: &mut Received, user: &str, message: &PushMessage, now_us: i64) -> bool {
        if !self.held.contains(user) {
            r.rejected += 1;
            return false;
        }
        if let Some(journal) = &self.journal {
            use std::io::Write;
            // One write per delivery, before the answer: a gateway killed
            // after this line has delivered.
            let line = format!("{} {user}\n", message.msg_id);
            if let Err(e) = journal
                .lock()
                .expect("journal lock")
                .write_all(line.as_bytes())
            {
                tracing::error!(error = %e, "ledger journal write failed");
            }
        }
        r.received += 1;
        if self.track_deliveries {
            *r.deliveries
                .entry((user.to_string(), message.msg_id))
                .or_default() += 1;
            r.arrivals
                .entry(user.to_string())
                .or_default()
                .push(message.msg_id);
        }
        r.last_delivery_us = r.last_delivery_us.max(now_us);
        let latency = now_us
            .saturating_sub(message.timestamp.saturating_mul(1000))
            .max(1) as u64;
        r.latency_us.saturating_record(latency);
        true
    }

    /// Keeps the first trace context of each message, when tracking.
    fn note_trace(
        &self,
        r: &mut Received,
        message: &PushMessage,
        headers: &HashMap<String, String>,
    ) {
        if !self.track_deliveries {
            return;
        }
        if let Some(tp) = headers.get("traceparent") {
            r.traces.entry(message.msg_id).or_insert_with(|| tp.clone());
        }
    }

    fn arrived(&self) {
        let mut r = self.received.lock().expect("ledger lock");
        r.pending += 1;
        r.max_pending = r.max_pending.max(r.pending);
    }

    /// Forgets latency recorded so far (a benchmark measures each phase on
    /// its own).
    pub fn reset_latency(&self) {
        self.received
            .lock()
            .expect("ledger lock")
            .latency_us
            .reset();
    }

    fn stream_opened(&self) {
        self.received.lock().expect("ledger lock").streams += 1;
    }

    /// The trace context the first push of `msg_id` carried (kept only
    /// when deliveries are tracked).
    pub fn traceparent(&self, msg_id: i64) -> Option<String> {
        self.received
            .lock()
            .expect("ledger lock")
            .traces
            .get(&msg_id)
            .cloned()
    }

    /// How often `user` received `msg_id`.
    pub fn count(&self, user: &str, msg_id: i64) -> u32 {
        let r = self.received.lock().expect("ledger lock");
        r.deliveries
            .get(&(user.to_string(), msg_id))
            .copied()
            .unwrap_or(0)
    }

    /// The msg_ids `user` received, in arrival order.
    pub fn arrivals(&self, user: &str) -> Vec<i64> {
        let r = self.received.lock().expect("ledger lock");
        r.arrivals.get(user).cloned().unwrap_or_default()
    }

    /// Every delivered (user, msg_id) pair with its count.
    pub fn deliveries(&self) -> Vec<((String, i64), u32)> {
        let r = self.received.lock().expect("ledger lock");
        r.deliveries.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Pushes delivered so far: the count alone, for callers that poll
    /// it while pushes arrive (building [`Ledger::stats`] walks the whole
    /// latency histogram under the lock the pushes take).
    pub fn received(&self) -> u64 {
        self.received.lock().expect("ledger lock").received
    }

    pub fn stats(&self) -> GatewayStats {
        let r = self.received.lock().expect("ledger lock");
        let mut per_msg = BTreeMap::new();
        let mut duplicates = 0;
        for ((_, msg_id), count) in &r.deliveries {
            let m: &mut MsgCount = per_msg.entry(*msg_id).or_default();
            m.users += 1;
            m.deliveries += u64::from(*count);
            duplicates += u64::from(count - 1);
        }
        GatewayStats {
            gateway_id: self.gateway_id.clone(),
            held: self.held.len(),
            received: r.received,
            distinct: r.deliveries.len() as u64,
            duplicates,
            rejected: r.rejected,
            streams: r.streams,
            batches: r.batches,
            max_pending: r.max_pending,
            per_msg,
            last_delivery_us: r.last_delivery_us,
            latency_us: r
                .latency_us
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        }
    }
}

fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64
}

#[derive(Clone)]
struct Service {
    ledger: Arc<Ledger>,
    /// Microseconds; adjustable while running.
    reply_delay: Arc<AtomicU64>,
    refuse_streams: Arc<AtomicU32>,
    /// Ends every open push stream when the gateway stops.
    serving: CancellationToken,
    /// Each stream's reader and answerer, so stopping waits for them.
    tracker: TaskTracker,
}

type Answers<T> = ReceiverStream<Result<T, Status>>;

impl Service {
    /// Serves one push stream of either protocol: reading and answering are
    /// separate tasks, so requests pipelined by the caller are seen as
    /// pending together and each is answered `reply_delay` after it
    /// arrived, as a gateway with latency would.
    fn serve<Req, Resp>(
        &self,
        request: Request<Streaming<Req>>,
        answer: impl Fn(&Ledger, Req) -> Resp + Send + 'static,
    ) -> Result<Response<Answers<Resp>>, Status>
    where
        Req: prost::Message + Default + Send + 'static,
        Resp: Send + 'static,
    {
        let refused = self
            .refuse_streams
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if refused {
            return Err(Status::unavailable("stream refused (fault injection)"));
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        let (queue, mut queued) = mpsc::channel::<(Req, tokio::time::Instant)>(1024);
        let ledger = self.ledger.clone();
        ledger.stream_opened();
        let delay = self.reply_delay.clone();
        let reading = self.serving.clone();
        let reader_ledger = ledger.clone();
        self.tracker.spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = reading.cancelled() => return,
                    m = inbound.message() => m,
                };
                match next {
                    Ok(Some(request)) => {
                        reader_ledger.arrived();
                        if queue
                            .send((request, tokio::time::Instant::now()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        tracing::debug!(error = %status, "push stream from task ended");
                        return;
                    }
                }
            }
        });
        let serving = self.serving.clone();
        self.tracker.spawn(async move {
            while let Some((request, arrived)) = queued.recv().await {
                let delay = Duration::from_micros(delay.load(Ordering::Relaxed));
                if !delay.is_zero() {
                    tokio::select! {
                        // Stopping drops what is unanswered, as a dying gateway does.
                        _ = serving.cancelled() => return,
                        _ = tokio::time::sleep_until(arrived + delay) => {}
                    }
                } else if serving.is_cancelled() {
                    return;
                }
                if tx.send(Ok(answer(&ledger, request))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl PushService for Service {
    type PushMessageStream = Answers<PushMessageResponse>;

    async fn push_message(
        &self,
        request: Request<Streaming<PushMessageRequest>>,
    ) -> Result<Response<Self::PushMessageStream>, Status> {
        self.serve(request, Ledger::answer)
    }
}

#[tonic::async_trait]
impl BatchPushService for Service {
    type PushBatchStream = Answers<PushBatchResponse>;

    async fn push_batch(
        &self,
        request: Request<Streaming<PushBatchRequest>>,
    ) -> Result<Response<Self::PushBatchStream>, Status> {
        self.serve(request, Ledger::answer_batch)
    }
}

/// A started reference gateway.
pub struct ReferenceGateway {
    pub grpc_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub ledger: Arc<Ledger>,
    serving: CancellationToken,
    registered: CancellationToken,
    connected: CancellationToken,
    registration: JoinHandle<()>,
    tracker: TaskTracker,
    reply_delay: Arc<AtomicU64>,
    crashed: bool,
}

/// A gateway dropped without `stop` still stops: it deregisters, removes
/// its routes (unless it crashed) and ends its streams, in the background.
impl Drop for ReferenceGateway {
    fn drop(&mut self) {
        self.registered.cancel();
        if !self.crashed {
            self.connected.cancel();
        }
        self.serving.cancel();
    }
}

impl ReferenceGateway {
    /// Delays every answer from now on by `delay` (a gateway that slows
    /// down).
    pub fn set_reply_delay(&self, delay: Duration) {
        self.reply_delay
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Binds, serves, writes routes and registers; returns once the gateway
    /// is visible in etcd.
    pub async fn start(opts: ReferenceGatewayOptions) -> Result<Self, ReferenceGatewayError> {
        let serving = CancellationToken::new();
        let registered = CancellationToken::new();
        let connected = CancellationToken::new();
        let tracker = TaskTracker::new();
        let ledger = Arc::new(match &opts.journal {
            Some(path) => {
                Ledger::open(opts.gateway_id.clone(), &opts.users, path).map_err(|cause| {
                    ReferenceGatewayError::Journal {
                        path: path.clone(),
                        cause,
                    }
                })?
            }
            None => Ledger::new(opts.gateway_id.clone(), &opts.users),
        });
        let ledger = Arc::new({
            let mut ledger = Arc::into_inner(ledger).expect("not shared yet");
            ledger.track_deliveries = opts.track_deliveries;
            ledger
        });

        let grpc = TcpListener::bind(opts.grpc_listen).await.map_err(|cause| {
            ReferenceGatewayError::Bind {
                what: "gRPC",
                addr: opts.grpc_listen,
                cause,
            }
        })?;
        let grpc_addr = grpc.local_addr().expect("bound socket has an address");
        let reply_delay = Arc::new(AtomicU64::new(opts.reply_delay.as_micros() as u64));
        let service = Service {
            ledger: ledger.clone(),
            reply_delay: reply_delay.clone(),
            refuse_streams: Arc::new(AtomicU32::new(opts.refuse_streams)),
            serving: serving.clone(),
            tracker: tracker.clone(),
        };
        let batch = opts
            .batch
            .then(|| BatchPushServiceServer::new(service.clone()));
        let per_user = PushServiceServer::new(service);
        let shutdown = serving.clone();
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = &opts.tls {
            let mut config = tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(&tls.cert, tls.key.as_slice()),
            );
            if let Some(ca) = &tls.client_ca {
                config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
            }
            server = server.tls_config(config)?;
        }
        tracker.spawn(async move {
            let served = server
                .add_service(per_user)
                .add_optional_service(batch)
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(grpc),
                    shutdown.cancelled_owned(),
                )
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "reference gateway gRPC server failed");
            }
        });

        let http_addr = match opts.http_listen {
            Some(addr) => Some(serve_http(addr, ledger.clone(), &tracker, serving.clone()).await?),
            None => None,
        };

        if opts.write_routes {
            let redis = RedisClient::connect(&opts.redis).await?;
            let routes = RouteStore::new(redis, 500, 4);
            write_routes(&routes, &opts.gateway_id, &opts.users).await?;
            let users = opts.users.clone();
            let gateway_id = opts.gateway_id.clone();
            let done = connected.clone();
            // Users "disconnect" when the gateway stops: their routes go.
            tracker.spawn(async move {
                done.cancelled().await;
                for user in &users {
                    if let Err(e) = routes.remove(user).await {
                        tracing::warn!(gateway_id, error = %e, "could not remove routes on exit");
                        return;
                    }
                }
            });
        }

        let instance_id = opts
            .instance_id
            .clone()
            .unwrap_or_else(|| format!("gateway-service-{}", opts.gateway_id));
        let instance = ServiceInstance {
            id: instance_id.clone(),
            name: opts.service_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            metadata: HashMap::from_iter(
                [(GATEWAY_ID_METADATA, opts.gateway_id.as_str())]
                    .into_iter()
                    .chain(opts.batch.then_some((PUSH_PROTOCOL_METADATA, BATCH_V1)))
                    .map(|(k, v)| (k.to_string(), v.into())),
            ),
            endpoints: vec![format!(
                "{}://{}:{}",
                if opts.tls.is_some() { "grpcs" } else { "grpc" },
                opts.advertise_host,
                opts.advertise_port.unwrap_or(grpc_addr.port())
            )],
        };
        let key = instance_key(&opts.namespace, &opts.service_name, &instance_id);
        let keep_alive = Registration::new(opts.etcd.clone(), key, &instance, opts.lease_ttl)
            .register(registered.clone())
            .await?;
        let registration = tracker.spawn(keep_alive);
        tracker.close();
        tracing::info!(gateway_id = %opts.gateway_id, %grpc_addr, ?http_addr, users = opts.users.len(), "reference gateway up");
        Ok(Self {
            grpc_addr,
            http_addr,
            ledger,
            serving,
            registered,
            connected,
            registration,
            tracker,
            reply_delay,
            crashed: false,
        })
    }

    /// Removes its etcd record (revoking the lease) but keeps serving and
    /// keeps its users' routes: a gateway taken out of the registry.
    pub async fn deregister(&mut self) {
        self.registered.cancel();
        (&mut self.registration).await.ok();
    }

    /// Deregisters, removes its routes, ends open push streams and stops.
    pub async fn stop(self) {
        self.registered.cancel();
        self.connected.cancel();
        self.serving.cancel();
        self.tracker.wait().await;
    }

    /// Stops like a crash: streams and listener go, but the etcd record and
    /// the routes stay until their TTLs expire.
    pub async fn crash(mut self) {
        self.registration.abort();
        self.serving.cancel();
        // Route removal waits for `connected`, which a crash never fires
        // (not even when this value is dropped).
        self.crashed = true;
        self.tracker.close();
        let _ = (&mut self.registration).await;
    }

    /// Stops when `signal` resolves.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        self.stop().await;
    }
}

async fn write_routes(
    routes: &RouteStore,
    gateway_id: &str,
    users: &[String],
) -> Result<(), RedisError> {
    let now = resonance_task::clock::now_ms();
    let writes = users.iter().map(|u| {
        let route = Route {
            username: u.clone(),
            gateway_id: gateway_id.to_string(),
            remote_ip: "127.0.0.1".into(),
            timestamp: now,
        };
        async move { routes.put(&route, ROUTE_TTL).await }
    });
    use futures::StreamExt;
    let results: Vec<_> = futures::stream::iter(writes)
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn serve_http(
    addr: SocketAddr,
    ledger: Arc<Ledger>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) -> Result<SocketAddr, ReferenceGatewayError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|cause| ReferenceGatewayError::Bind {
            what: "HTTP",
            addr,
            cause,
        })?;
    let bound = listener.local_addr().expect("bound socket has an address");
    let metrics_ledger = ledger.clone();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ready" }))
        .route(
            "/metrics",
            get(move || async move { metrics_text(&metrics_ledger.stats()) }),
        )
        .route("/stats", get(move || async move { Json(ledger.stats()) }));
    tracker.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "reference gateway HTTP server failed");
        }
    });
    Ok(bound)
}

/// The gateway's counters in Prometheus text format (its own process has
/// no recorder; these few lines need none).
fn metrics_text(s: &GatewayStats) -> String {
    let id = &s.gateway_id;
    let mut out = String::new();
    for (name, help, kind, value) in [
        (
            "resonance_gateway_pushes_total",
            "Pushes delivered, duplicates included",
            "counter",
            s.received,
        ),
        (
            "resonance_gateway_rejected_total",
            "Pushes for users not held here",
            "counter",
            s.rejected,
        ),
        (
            "resonance_gateway_duplicates_total",
            "Deliveries of a (user, msg_id) beyond the first",
            "counter",
            s.duplicates,
        ),
        (
            "resonance_gateway_streams_total",
            "Push streams opened by task pods",
            "counter",
            s.streams,
        ),
        (
            "resonance_gateway_users_held",
            "Users this gateway holds",
            "gauge",
            s.held as u64,
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{gateway_id=\"{id}\"}} {value}\n"
        ));
    }
    out
}

/// The simulated user with index `i` (`user-000042`): the seed tool, the
/// reference gateway and the demo agree on these names.
pub fn user_name(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:06}")
}

/// Parses `A..B` (half-open) into a range of user indexes.
pub fn parse_range(s: &str) -> Result<std::ops::Range<usize>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("`{s}` is not a range like 0..500"))?;
    let a: usize = a
        .trim()
        .parse()
        .map_err(|_| format!("`{a}` is not a number"))?;
    let b: usize = b
        .trim()
        .parse()
        .map_err(|_| format!("`{b}` is not a number"))?;
    if a >= b {
        return Err(format!("`{s}` is empty"));
    }
    Ok(a..b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use resonance_task::proto::PushMessage;

    fn request(user: &str, msg_id: i64) -> PushMessageRequest {
        PushMessageRequest {
            trace_headers: Default::default(),
            to_username: user.into(),
            message: Some(PushMessage {
                msg_id,
                seq_id: msg_id * 10,
                to_username: user.into(),
                timestamp: 1,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_journal_carries_counts_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger");
        let users = ["a".to_string()];
        let first = Ledger::open("g".into(), &users, &path).unwrap();
        first.answer(request("a", 1));
        first.answer(request("a", 2));
        drop(first);
        let second = Ledger::open("g".into(), &users, &path).unwrap();
        second.answer(request("a", 2));
        assert_eq!(second.count("a", 1), 1);
        assert_eq!(second.count("a", 2), 2);
        assert_eq!(second.stats().received, 3);
    }

    #[test]
    fn ledger_answers_and_counts() {
        let ledger = Ledger::new("g1".into(), &["a".to_string(), "b".to_string()]);
        let ok = ledger.answer(request("a", 7));
        assert_eq!((ok.msg_id, ok.seq_id, ok.error.as_str()), (7, 70, ""));
        ledger.answer(request("a", 7));
        ledger.answer(request("b", 7));
        let no = ledger.answer(request("c", 7));
        assert_eq!(no.error, NOT_CONNECTED);
        let s = ledger.stats();
        assert_eq!(
            (s.received, s.distinct, s.duplicates, s.rejected),
            (3, 2, 1, 1)
        );
        assert_eq!(ledger.received(), 3);
        assert_eq!(
            s.per_msg.get(&7),
            Some(&MsgCount {
                users: 2,
                deliveries: 3
            })
        );
        assert_eq!(ledger.count("a", 7), 2);
        assert_eq!(ledger.count("c", 7), 0);
        assert_eq!(s.latency_us.iter().map(|(_, c)| c).sum::<u64>(), 3);
    }

    /// Without tracking, memory stays flat however many pushes arrive:
    /// nothing is kept per message, trace context included.
    #[test]
    fn an_untracked_ledger_keeps_nothing_per_message() {
        let mut ledger = Ledger::new("g".into(), &["a".to_string()]);
        ledger.track_deliveries = false;
        for msg_id in 0..100 {
            let mut traced = request("a", msg_id);
            traced.trace_headers.insert(
                "traceparent".into(),
                format!("00-{msg_id:032x}-00f067aa0ba902b7-01"),
            );
            ledger.answer(traced);
        }
        let r = ledger.received.lock().unwrap();
        assert_eq!(r.received, 100);
        assert_eq!(
            (r.deliveries.len(), r.arrivals.len(), r.traces.len()),
            (0, 0, 0)
        );
    }

    #[test]
    fn names_and_ranges() {
        assert_eq!(user_name("user-", 42), "user-000042");
        assert_eq!(parse_range("0..500").unwrap(), 0..500);
        assert!(parse_range("5..5").is_err());
        assert!(parse_range("x..5").is_err());
        assert!(parse_range("5").is_err());
    }
}
