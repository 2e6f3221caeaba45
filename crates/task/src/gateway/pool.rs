//! The pool of gateway streams: at most one live [`GatewayStream`] per
//! gateway id, shared by every event in the pod. An entry is replaced when
//! the registry moves the gateway to a new endpoint and dropped when its
//! stream goes idle; the next push opens a fresh one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{mpsc, oneshot};

use super::PushReply;
use super::correlation::Pending;
use super::stream::{Batch, GatewayStream, PerUser, PushCommand};
use crate::config::{GatewayPoolConfig, PushProtocolChoice};
use crate::lifecycle::Lifecycle;
use crate::proto::PushMessage;
use crate::registry::{GatewayEndpoint, PushProtocol};
use crate::telemetry;
use crate::tls::TlsFiles;

/// Pushes queued per stream before callers wait (backpressure).
const COMMAND_QUEUE: usize = 64;

struct Entry {
    endpoint: GatewayEndpoint,
    commands: mpsc::Sender<PushCommand>,
    generation: u64,
}

struct Inner {
    cfg: GatewayPoolConfig,
    /// `gateway.tls`, read again when its files change.
    tls: Arc<TlsFiles>,
    life: Lifecycle,
    /// Looked up for every push (foldhash, seeded per process).
    streams: Mutex<foldhash::HashMap<String, Entry>>,
    generations: AtomicU64,
}

/// The answer to a queued push.
pub struct PendingReply(oneshot::Receiver<PushReply>);

impl PendingReply {
    pub async fn wait(self) -> PushReply {
        self.0
            .await
            .expect("a push is always answered, if only by being dropped")
    }
}

#[derive(Clone)]
pub struct GatewayPool {
    inner: Arc<Inner>,
}

impl GatewayPool {
    /// Stream tasks are spawned on `life`'s tracker, so the drain waits for
    /// them; they end once the pool and every push using them are gone (not
    /// at `stop`: in-flight events still push while they finish).
    pub fn new(cfg: GatewayPoolConfig, life: &Lifecycle) -> Self {
        Self {
            inner: Arc::new(Inner {
                tls: Arc::new(TlsFiles::new("gateway.tls", &cfg.tls)),
                cfg,
                life: life.clone(),
                streams: Mutex::new(Default::default()),
                generations: AtomicU64::new(0),
            }),
        }
    }

    /// Pushes `message` to each recipient held by `endpoint`'s gateway and
    /// hands the recipients back with one outcome each, in input order.
    /// `trace_headers` (W3C context) ride along with every request.
    pub async fn push(
        &self,
        endpoint: &GatewayEndpoint,
        message: PushMessage,
        recipients: Vec<String>,
        trace_headers: HashMap<String, String>,
    ) -> PushReply {
        self.enqueue(endpoint, message, recipients, trace_headers)
            .await
            .wait()
            .await
    }

    /// Hands a push to `endpoint`'s stream and returns once it is queued
    /// there: pushes queued one after another are written to the gateway
    /// in that order. The answer comes later, through [`PendingReply::wait`].
    pub async fn enqueue(
        &self,
        endpoint: &GatewayEndpoint,
        message: PushMessage,
        recipients: Vec<String>,
        trace_headers: HashMap<String, String>,
    ) -> PendingReply {
        let (reply, answer) = oneshot::channel();
        if recipients.is_empty() {
            let _ = reply.send(PushReply {
                recipients,
                outcomes: Vec::new(),
                window: None,
            });
            return PendingReply(answer);
        }
        let gateway_id: Arc<str> = endpoint.gateway_id.as_str().into();
        let command = PushCommand {
            message,
            trace_headers,
            pending: Pending::new(recipients, reply, gateway_id),
        };
        // A command that cannot be queued, or is dropped unanswered, answers
        // itself: every recipient failed.
        let _ = self.sender_for(endpoint).send(command).await;
        PendingReply(answer)
    }

    /// Whether pushes to `endpoint` go over batch-v1.
    pub fn uses_batch(&self, endpoint: &GatewayEndpoint) -> bool {
        endpoint.protocol == PushProtocol::BatchV1
            && self.inner.cfg.push_protocol == PushProtocolChoice::Auto
    }

    /// Gateways with a stream task alive (open, or opening on demand).
    /// How long a written push waits for its answer.
    pub fn request_timeout(&self) -> std::time::Duration {
        self.inner.cfg.request_timeout
    }

    pub fn open_streams(&self) -> usize {
        let streams = self.inner.streams.lock().expect("pool lock");
        streams.values().filter(|e| !e.commands.is_closed()).count()
    }

    fn sender_for(&self, endpoint: &GatewayEndpoint) -> mpsc::Sender<PushCommand> {
        let mut streams = self.inner.streams.lock().expect("pool lock");
        if let Some(entry) = streams.get(&endpoint.gateway_id)
            && entry.endpoint == *endpoint
            && !entry.commands.is_closed()
        {
            return entry.commands.clone();
        }
        let generation = self.inner.generations.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let pool: Weak<Inner> = Arc::downgrade(&self.inner);
        let gateway_id = endpoint.gateway_id.clone();
        let on_idle = Box::new(move || {
            if let Some(pool) = pool.upgrade() {
                let mut streams = pool.streams.lock().expect("pool lock");
                if streams
                    .get(&gateway_id)
                    .is_some_and(|e| e.generation == generation)
                {
                    streams.remove(&gateway_id);
                }
            }
        });
        let cfg = self.inner.cfg.clone();
        let tls = self.inner.tls.clone();
        let batch = self.uses_batch(endpoint);
        let target = endpoint.clone();
        self.inner.life.spawn(async move {
            let open = metrics::gauge!(telemetry::metrics::GATEWAY_STREAMS);
            open.increment(1.0);
            if batch {
                GatewayStream::<Batch>::new(target, cfg, tls, rx, on_idle)
                    .run()
                    .await;
            } else {
                GatewayStream::<PerUser>::new(target, cfg, tls, rx, on_idle)
                    .run()
                    .await;
            }
            open.decrement(1.0);
        });
        if let Some(old) = streams.insert(
            endpoint.gateway_id.clone(),
            Entry {
                endpoint: endpoint.clone(),
                commands: tx.clone(),
                generation,
            },
        ) && old.endpoint != *endpoint
        {
            tracing::info!(gateway_id = %endpoint.gateway_id, from = %old.endpoint.uri, to = %endpoint.uri, "gateway moved; new stream");
        }
        tx
    }
}
