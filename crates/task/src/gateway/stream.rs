//! One gateway's push stream: a task that owns a long-lived bidirectional
//! call — `PushService.PushMessage` ([`PerUser`]) or batch-v1
//! `BatchPushService.PushBatch` ([`Batch`]) — writes requests as callers hand
//! them over (many in flight, not stop-and-wait), and matches responses to
//! callers (`correlation`).
//!
//! The stream opens lazily on the first push and reopens after a failure;
//! while the gateway cannot be reached, pushes fail at once (after a capped,
//! jittered backoff) so the event goes back to NATS instead of piling up
//! here. A request unanswered within `gateway.request_timeout` fails its
//! stream: nothing more is written, answers still arriving are taken for a
//! short linger (a gateway that resumes just at the deadline is not pushed
//! twice), then every request still in flight is reported failed, never
//! lost, and the next push reconnects. A stream with nothing to do for
//! `gateway.idle_timeout` closes; so does one whose pool entry was replaced
//! (the gateway moved), once its in-flight requests are answered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::collections::HashMap;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

use super::correlation::{Batches, Group, InFlight, Pending, Tracker};
use super::{FailureKind, PushFailure};
use crate::config::GatewayPoolConfig;
use crate::proto::gateway::v1::batch_push_service_client::BatchPushServiceClient;
use crate::proto::gateway::v1::push_service_client::PushServiceClient;
use crate::proto::{
    PushBatchRequest, PushBatchResponse, PushMessage, PushMessageRequest, PushMessageResponse,
};
use crate::registry::GatewayEndpoint;
use crate::retry::Backoff;
use crate::tls::TlsFiles;

/// Largest response frame accepted from a gateway.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// One caller's push: a message for some recipients on this gateway.
pub(crate) struct PushCommand {
    pub message: PushMessage,
    pub trace_headers: HashMap<String, String>,
    /// The recipients, and the caller's reply channel.
    pub pending: Pending,
}

impl PushCommand {
    fn fail(self, failure: &PushFailure) {
        self.pending.fail_rest(failure);
    }
}

/// What differs between the push protocols: the call, how a caller's push
/// becomes requests, and how responses find their callers.
pub(crate) trait Wire: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    type InFlight: Tracker<Response = Self::Response>;

    fn open(
        channel: Channel,
        requests: ReceiverStream<Self::Request>,
    ) -> impl Future<Output = Result<Streaming<Self::Response>, tonic::Status>> + Send;

    /// Records `cmd` as in flight and returns its requests, in write order.
    fn start(
        inflight: &mut Self::InFlight,
        cmd: PushCommand,
        deadline: Instant,
        permits: OwnedSemaphorePermit,
    ) -> Vec<Self::Request>;
}

/// Upstream `PushService`: one request per recipient.
pub(crate) struct PerUser;

impl Wire for PerUser {
    type Request = PushMessageRequest;
    type Response = PushMessageResponse;
    type InFlight = InFlight;

    async fn open(
        channel: Channel,
        requests: ReceiverStream<PushMessageRequest>,
    ) -> Result<Streaming<PushMessageResponse>, tonic::Status> {
        let mut client =
            PushServiceClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES);
        Ok(client.push_message(requests).await?.into_inner())
    }

    fn start(
        inflight: &mut InFlight,
        cmd: PushCommand,
        deadline: Instant,
        permits: OwnedSemaphorePermit,
    ) -> Vec<PushMessageRequest> {
        let requests = cmd
            .pending
            .recipients()
            .iter()
            .map(|recipient| {
                let mut message = cmd.message.clone();
                message.to_username.clone_from(recipient);
                PushMessageRequest {
                    to_username: recipient.clone(),
                    message: Some(message),
                    trace_headers: cmd.trace_headers.clone(),
                }
            })
            .collect();
        let msg_id = cmd.message.msg_id;
        inflight.push(Group::new(cmd.pending, deadline, Some(permits)).for_message(msg_id));
        requests
    }
}

/// batch-v1 `BatchPushService`: one request per caller's push.
pub(crate) struct Batch;

impl Wire for Batch {
    type Request = PushBatchRequest;
    type Response = PushBatchResponse;
    type InFlight = Batches;

    async fn open(
        channel: Channel,
        requests: ReceiverStream<PushBatchRequest>,
    ) -> Result<Streaming<PushBatchResponse>, tonic::Status> {
        let mut client =
            BatchPushServiceClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES);
        Ok(client.push_batch(requests).await?.into_inner())
    }

    fn start(
        inflight: &mut Batches,
        cmd: PushCommand,
        deadline: Instant,
        permits: OwnedSemaphorePermit,
    ) -> Vec<PushBatchRequest> {
        let mut message = cmd.message;
        message.to_username.clear();
        let to_usernames = cmd.pending.recipients().to_vec();
        let batch_id = inflight.push(Group::new(cmd.pending, deadline, Some(permits)));
        vec![PushBatchRequest {
            batch_id,
            message: Some(message),
            to_usernames,
            trace_headers: cmd.trace_headers,
        }]
    }
}

/// Why a stream session ended.
enum SessionEnd {
    /// Nothing to send for `idle_timeout`.
    Idle,
    /// Every sender is gone and in-flight requests are answered.
    Closed,
    Broken(PushFailure),
}

pub(crate) struct GatewayStream<W> {
    wire: std::marker::PhantomData<W>,
    endpoint: GatewayEndpoint,
    cfg: GatewayPoolConfig,
    tls: Arc<TlsFiles>,
    commands: mpsc::Receiver<PushCommand>,
    /// Called once when the stream goes idle, so the pool stops handing out
    /// this stream before it closes.
    on_idle: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl<W: Wire> GatewayStream<W> {
    pub(crate) fn new(
        endpoint: GatewayEndpoint,
        cfg: GatewayPoolConfig,
        tls: Arc<TlsFiles>,
        commands: mpsc::Receiver<PushCommand>,
        on_idle: Box<dyn FnOnce() + Send + Sync>,
    ) -> Self {
        Self {
            wire: std::marker::PhantomData,
            endpoint,
            cfg,
            tls,
            commands,
            on_idle: Some(on_idle),
        }
    }

    fn failure(&self, kind: FailureKind, detail: impl std::fmt::Display) -> PushFailure {
        PushFailure::new(kind, &self.endpoint.gateway_id, detail)
    }

    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), self.cfg.max_backoff);
        let mut opened = false;
        loop {
            let Some(first) = self.next_command().await else {
                tracing::debug!(gateway_id = %self.endpoint.gateway_id, "gateway stream closed");
                return;
            };
            let channel = match self.connect().await {
                Ok(c) => c,
                Err(failure) => {
                    first.fail(&failure);
                    self.fail_during_backoff(&failure, backoff.next_delay())
                        .await;
                    continue;
                }
            };
            tracing::info!(gateway_id = %self.endpoint.gateway_id, uri = %self.endpoint.uri, "gateway stream open");
            if opened {
                metrics::counter!(crate::telemetry::metrics::RECONNECTS, "dependency" => "gateway")
                    .increment(1);
            }
            opened = true;
            let (end, answered) = self.session(channel, first).await;
            match end {
                SessionEnd::Idle | SessionEnd::Closed => {
                    tracing::debug!(gateway_id = %self.endpoint.gateway_id, "gateway stream drained");
                }
                SessionEnd::Broken(failure) => {
                    tracing::warn!(gateway_id = %self.endpoint.gateway_id, error = %failure, "gateway stream failed; in-flight pushes reported failed");
                    if answered {
                        backoff.reset();
                    } else {
                        self.fail_during_backoff(&failure, backoff.next_delay())
                            .await;
                    }
                }
            }
        }
    }

    /// The next push, or `None` when the stream should end: every sender is
    /// gone, or it sat idle (then the pool entry is removed first and pushes
    /// already queued are still served).
    async fn next_command(&mut self) -> Option<PushCommand> {
        if self.on_idle.is_none() {
            return self.commands.recv().await;
        }
        match tokio::time::timeout(self.cfg.idle_timeout, self.commands.recv()).await {
            Ok(cmd) => cmd,
            Err(_) => {
                self.go_idle();
                self.commands.recv().await
            }
        }
    }

    fn go_idle(&mut self) {
        if let Some(on_idle) = self.on_idle.take() {
            on_idle();
            self.commands.close();
        }
    }

    /// Opens a channel: TLS for an `https://` endpoint (`grpcs://` in
    /// etcd) or for every gateway when `gateway.tls.enabled`, with the TLS
    /// files as they are now.
    async fn connect(&self) -> Result<Channel, PushFailure> {
        let uri = &self.endpoint.uri;
        let tls = self.cfg.tls.enabled || uri.starts_with("https://");
        let uri = match uri.strip_prefix("http://") {
            Some(rest) if tls => format!("https://{rest}"),
            _ => uri.clone(),
        };
        let mut endpoint =
            Endpoint::from_shared(uri).map_err(|e| self.failure(FailureKind::Connect, e))?;
        if tls {
            let material = self
                .tls
                .current()
                .map_err(|e| self.failure(FailureKind::Connect, e))?;
            endpoint = endpoint
                .tls_config(material.client_config())
                .map_err(|e| self.failure(FailureKind::Connect, e))?;
        }
        let endpoint = endpoint
            .connect_timeout(self.cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        endpoint.connect().await.map_err(|e| {
            // The cause is deep down (a refused connection, an untrusted
            // certificate): show the whole chain.
            let mut detail = e.to_string();
            let mut next = std::error::Error::source(&e);
            while let Some(cause) = next {
                detail = format!("{detail}: {cause}");
                next = cause.source();
            }
            self.failure(
                FailureKind::Connect,
                format!("{}: {detail}", self.endpoint.uri),
            )
        })
    }

    /// Waits out a backoff delay, failing pushes that arrive meanwhile so
    /// their events are retried later rather than queued here.
    async fn fail_during_backoff(&mut self, failure: &PushFailure, delay: Duration) {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => cmd.fail(failure),
                    None => return,
                },
            }
        }
    }

    /// Runs one gRPC call until it breaks, idles or closes. Returns how it
    /// ended and whether any response arrived.
    async fn session(&mut self, channel: Channel, first: PushCommand) -> (SessionEnd, bool) {
        let call = Call::<W>::new(&self.endpoint.gateway_id, &self.cfg);
        let (requests, request_stream) = mpsc::channel::<W::Request>(1024);
        let reader = call.read(channel, request_stream);
        tokio::pin!(reader);
        let (end, timed_out) = tokio::select! {
            end = call.write(first, &mut self.commands, &mut self.on_idle, requests) => (end, false),
            failure = &mut reader => (SessionEnd::Broken(failure), false),
            failure = call.watch() => (SessionEnd::Broken(failure), true),
        };
        if timed_out {
            // A gateway that stalled may resume just as the deadline passes,
            // with its answers already on their way: take them for a short
            // while (nothing new is written) rather than fail, and push
            // again, what it has delivered.
            tokio::select! {
                _ = tokio::time::sleep(linger(call.request_timeout)) => {}
                _ = &mut reader => {}
                _ = call.all_answered() => {}
            }
        }
        if let SessionEnd::Broken(failure) = &end {
            call.inflight().fail_all(failure);
        }
        (end, call.answered.load(Ordering::Relaxed))
    }
}

/// One gRPC call's shared state: what is in flight, the signals between
/// its writer, reader and watchdog, and the in-flight window.
struct Call<'a, W: Wire> {
    gateway_id: &'a str,
    request_timeout: Duration,
    idle_timeout: Duration,
    max_in_flight: usize,
    inflight: Mutex<W::InFlight>,
    /// A request went out while nothing was in flight (wakes the watchdog).
    sent: Notify,
    /// The last answer in flight arrived.
    drained: Notify,
    permits: Arc<Semaphore>,
    answered: AtomicBool,
}

impl<'a, W: Wire> Call<'a, W> {
    fn new(gateway_id: &'a str, cfg: &GatewayPoolConfig) -> Self {
        Self {
            gateway_id,
            request_timeout: cfg.request_timeout,
            idle_timeout: cfg.idle_timeout,
            max_in_flight: cfg.max_in_flight,
            inflight: Mutex::new(W::InFlight::default()),
            sent: Notify::new(),
            drained: Notify::new(),
            permits: Arc::new(Semaphore::new(cfg.max_in_flight)),
            answered: AtomicBool::new(false),
        }
    }

    fn inflight(&self) -> std::sync::MutexGuard<'_, W::InFlight> {
        self.inflight.lock().expect("in-flight lock")
    }

    fn broken(&self, detail: String) -> PushFailure {
        PushFailure::new(FailureKind::StreamBroken, self.gateway_id, detail)
    }

    /// Opens the call and matches responses to what is in flight until the
    /// stream breaks; returns why it broke.
    async fn read(&self, channel: Channel, requests: mpsc::Receiver<W::Request>) -> PushFailure {
        let mut inbound = match W::open(channel, ReceiverStream::new(requests)).await {
            Ok(inbound) => inbound,
            Err(s) => return self.broken(status_text(&s)),
        };
        loop {
            let response = match inbound.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return self.broken("gateway ended the stream".into()),
                Err(s) => return self.broken(status_text(&s)),
            };
            self.answered.store(true, Ordering::Relaxed);
            let mut guard = self.inflight();
            if guard.answer(response).is_err() {
                return self.broken(
                    "gateway sent a response that answers no request (none waiting, or another msg_id)".into(),
                );
            }
            if guard.is_empty() {
                self.drained.notify_waiters();
            }
        }
    }

    /// Writes `first`, then each command as it comes, inside the in-flight
    /// window; ends when the senders are gone and everything is answered,
    /// when the stream idles, or when the request stream closes.
    async fn write(
        &self,
        first: PushCommand,
        commands: &mut mpsc::Receiver<PushCommand>,
        on_idle: &mut Option<Box<dyn FnOnce() + Send + Sync>>,
        requests: mpsc::Sender<W::Request>,
    ) -> SessionEnd {
        let mut next = Some(first);
        // One idle timer for the call, pushed back only when it fires: a
        // timer armed for every push would cost an insert into the timer
        // wheel and a removal from it per push.
        let idle = tokio::time::sleep(self.idle_timeout);
        tokio::pin!(idle);
        let mut last_push = Instant::now();
        loop {
            let cmd = match next.take() {
                Some(cmd) => cmd,
                None => tokio::select! {
                    biased;
                    cmd = commands.recv() => match cmd {
                        Some(cmd) => cmd,
                        None => {
                            // Senders gone: finish what is in flight, then close.
                            self.all_answered().await;
                            return SessionEnd::Closed;
                        }
                    },
                    () = &mut idle => {
                        let now = Instant::now();
                        let due = last_push + self.idle_timeout;
                        if due > now {
                            idle.as_mut().reset(due);
                            continue;
                        }
                        idle.as_mut().reset(now + self.idle_timeout);
                        if !self.inflight().is_empty() {
                            continue;
                        }
                        if let Some(f) = on_idle.take() {
                            f();
                            commands.close();
                            continue;
                        }
                        return SessionEnd::Idle;
                    }
                },
            };
            let n = cmd.pending.recipients().len();
            let held = self
                .permits
                .clone()
                .acquire_many_owned(n.min(self.max_in_flight) as u32)
                .await
                .expect("semaphore is never closed");
            // One clock read per push: its deadline, and the idle timer's
            // reference.
            last_push = Instant::now();
            let batch = {
                let mut guard = self.inflight();
                let was_empty = guard.is_empty();
                let deadline = last_push + self.request_timeout;
                let batch = W::start(&mut guard, cmd, deadline, held);
                if was_empty {
                    self.sent.notify_one();
                }
                batch
            };
            for request in batch {
                if requests.send(request).await.is_err() {
                    return SessionEnd::Broken(self.broken("request stream closed".into()));
                }
            }
        }
    }

    /// Returns once the oldest request in flight is past its deadline.
    async fn watch(&self) -> PushFailure {
        loop {
            let wait = self.sent.notified();
            let deadline = self.inflight().oldest_deadline();
            match deadline {
                None => wait.await,
                Some(d) if d <= Instant::now() => {
                    return PushFailure::new(
                        FailureKind::Timeout,
                        self.gateway_id,
                        format!("no response within {:?}", self.request_timeout),
                    );
                }
                Some(d) => tokio::time::sleep_until(d).await,
            }
        }
    }

    /// Returns once nothing is in flight.
    async fn all_answered(&self) {
        loop {
            let wait = self.drained.notified();
            if self.inflight().is_empty() {
                return;
            }
            wait.await;
        }
    }
}

/// How long a timed-out stream keeps reading answers before it fails what
/// is still unanswered.
fn linger(request_timeout: Duration) -> Duration {
    (request_timeout / 5).min(Duration::from_secs(1))
}

fn status_text(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}
