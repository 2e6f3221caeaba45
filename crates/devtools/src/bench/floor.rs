//! The I/O floor: what fan-out cannot avoid, done directly. Per event, one
//! MGET per chunk of recipients straight to Redis, then one pre-encoded
//! batch-v1 frame per gateway chunk straight to the gateways over long-lived
//! gRPC streams, and the answers awaited. No NATS, no SQL, no claims or
//! progress, no planning: recipients' gateways and the frames' recipient
//! lists are worked out before the clock starts.
//!
//! `floor-js` is the same floor fed through JetStream: events are published
//! to a work-queue stream like the pod's, pulled by a durable consumer with
//! as many in flight as the pod's workers, and acked once pushed. Between
//! floor, floor-js and batch the gap splits into what the queue costs and
//! what the service adds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream;
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use prost::Message;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;

use super::{Bench, BenchError, Session, setup};
use resonance_task::config::Config;
use resonance_task::proto::{PushBatchResponse, PushEvent};
use resonance_task::store::{RedisClient, route_key};

/// A batch-v1 request as bytes: the per-event head (batch id, message) and
/// the recipient list encoded once, ahead of time. Protobuf fields may come
/// in any order, so the two halves concatenated are one valid message.
struct Frame {
    head: Bytes,
    recipients: Bytes,
}

struct FrameEncoder;

impl Encoder for FrameEncoder {
    type Item = Frame;
    type Error = tonic::Status;

    fn encode(&mut self, frame: Frame, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&frame.head);
        dst.put_slice(&frame.recipients);
        Ok(())
    }
}

#[derive(Default)]
struct FrameCodec;

impl Codec for FrameCodec {
    type Encode = Frame;
    type Decode = PushBatchResponse;
    type Encoder = FrameEncoder;
    type Decoder = ProstDecoder<PushBatchResponse>;

    fn encoder(&mut self) -> Self::Encoder {
        FrameEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

/// One gateway's batch-v1 stream with answers matched by batch id.
struct FrameStream {
    frames: mpsc::Sender<Frame>,
    waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>,
}

impl FrameStream {
    async fn open(uri: &str, tracker: &TaskTracker) -> Result<Self, BenchError> {
        let channel = tonic::transport::Endpoint::from_shared(uri.to_string())
            .map_err(setup)?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(setup)?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.map_err(setup)?;
        let (frames, outbound) = mpsc::channel(1024);
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/resonance.gateway.v1.BatchPushService/PushBatch",
        );
        let mut answers = grpc
            .streaming(
                tonic::Request::new(ReceiverStream::new(outbound)),
                path,
                FrameCodec,
            )
            .await
            .map_err(setup)?
            .into_inner();
        let waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>> = Arc::default();
        let answered = waiting.clone();
        tracker.spawn(async move {
            while let Some(Ok(answer)) = answers.next().await {
                let waiter = answered
                    .lock()
                    .expect("waiting lock")
                    .remove(&answer.batch_id);
                if let Some(w) = waiter {
                    let _ = w.send(());
                }
            }
        });
        Ok(Self { frames, waiting })
    }

    async fn send(&self, frame: Frame, batch_id: u64) {
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .expect("waiting lock")
            .insert(batch_id, tx);
        if self.frames.send(frame).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// What an event of one session needs, worked out ahead of time.
struct Prepared {
    /// Route keys, one MGET each.
    key_chunks: Vec<Vec<String>>,
    /// (gateway index, encoded recipient list) per frame.
    frames: Vec<(usize, Bytes)>,
}

struct Inner {
    redis: RedisClient,
    gateways: Vec<FrameStream>,
    sessions: HashMap<String, Prepared>,
    route_concurrency: usize,
    batch_ids: AtomicU64,
}

pub(crate) struct Floor {
    inner: Arc<Inner>,
    in_flight: Arc<Semaphore>,
    tracker: TaskTracker,
}

impl Floor {
    pub(crate) async fn start(bench: &Bench) -> Result<Self, BenchError> {
        let tracker = TaskTracker::new();
        let mut gateways = Vec::with_capacity(bench.gateways.len());
        for g in &bench.gateways {
            gateways.push(FrameStream::open(&format!("http://{}", g.grpc_addr), &tracker).await?);
        }
        let redis = RedisClient::connect(&bench.config.redis)
            .await
            .map_err(setup)?;
        let dispatch = &bench.config.dispatch;
        let sessions = bench
            .sessions
            .values()
            .flatten()
            .chain(&bench.mixed)
            .chain(&bench.spread)
            .map(|s| {
                (
                    s.id.clone(),
                    prepare(
                        s,
                        bench.gateways.len(),
                        dispatch.route_chunk_size,
                        dispatch.batch_size,
                    ),
                )
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                redis,
                gateways,
                sessions,
                route_concurrency: dispatch.route_concurrency,
                batch_ids: AtomicU64::new(0),
            }),
            in_flight: Arc::new(Semaphore::new(bench.config.consumer.worker_count)),
            tracker,
        })
    }

    /// Starts one event's fan-out once fewer than `worker_count` are in
    /// flight.
    pub(crate) async fn submit(&self, event: PushEvent) {
        let permit = self
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let inner = self.inner.clone();
        self.tracker.spawn(async move {
            inner.fan_out(event).await;
            drop(permit);
        });
    }

    pub(crate) async fn stop(self) {
        self.tracker.close();
        drop(self.inner);
        self.tracker.wait().await;
    }
}

/// The floor behind a JetStream stream and durable consumer of its own.
pub(crate) struct FloorJs {
    floor: Floor,
    stop: CancellationToken,
    pulling: JoinHandle<()>,
}

/// Messages one pull request asks for, as the pod's intake.
const PULL_BATCH: usize = 256;

impl FloorJs {
    /// Binds `config.consumer`'s stream and durable consumer (created as the
    /// pod creates them) and starts pulling.
    pub(crate) async fn start(bench: &Bench, config: &Config) -> Result<Self, BenchError> {
        let floor = Floor::start(bench).await?;
        let nats = resonance_task::nats::connect(&config.nats, "resonance-task-bench-floor-js")
            .await
            .map_err(setup)?;
        let js = jetstream::new(nats);
        let consumer = resonance_task::consumer::jetstream::ensure(&js, &config.consumer)
            .await
            .map_err(setup)?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH)
            .messages()
            .await
            .map_err(setup)?;
        let stop = CancellationToken::new();
        let (inner, in_flight, tracker) = (
            floor.inner.clone(),
            floor.in_flight.clone(),
            floor.tracker.clone(),
        );
        let stopped = stop.clone();
        let pulling = tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = stopped.cancelled() => return,
                    m = messages.next() => m,
                };
                let message = match message {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "floor-js: pull failed");
                        continue;
                    }
                    None => return,
                };
                let permit = in_flight
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore is never closed");
                let inner = inner.clone();
                tracker.spawn(async move {
                    match PushEvent::decode(message.payload.as_ref()) {
                        Ok(event) => inner.fan_out(event).await,
                        Err(e) => tracing::warn!(error = %e, "floor-js: undecodable event"),
                    }
                    if let Err(e) = message.ack().await {
                        tracing::warn!(error = %e, "floor-js: ack not sent");
                    }
                    drop(permit);
                });
            }
        });
        Ok(Self {
            floor,
            stop,
            pulling,
        })
    }

    pub(crate) async fn stop(self) {
        self.stop.cancel();
        let _ = self.pulling.await;
        self.floor.stop().await;
    }
}

impl Inner {
    async fn fan_out(&self, event: PushEvent) {
        let Some(prepared) = self.sessions.get(&event.session_id) else {
            tracing::warn!(session_id = %event.session_id, "floor: unknown session");
            return;
        };
        let lookups: Vec<_> = prepared
            .key_chunks
            .iter()
            .map(|keys| {
                let mut cmd = redis::cmd("MGET");
                cmd.arg(keys);
                let redis = self.redis.clone();
                async move { redis.query::<Vec<Option<Bytes>>>(&cmd).await }
            })
            .collect();
        let lookups: Vec<_> = futures::stream::iter(lookups)
            .buffer_unordered(self.route_concurrency)
            .collect()
            .await;
        if let Some(Err(e)) = lookups.into_iter().find(Result::is_err) {
            tracing::warn!(error = %e, "floor: MGET failed");
        }
        let message = resonance_task::dispatch::gateway_message(&event);
        let sends = prepared.frames.iter().map(|(gateway, recipients)| {
            let batch_id = self.batch_ids.fetch_add(1, Ordering::Relaxed);
            let mut head = BytesMut::new();
            prost::encoding::uint64::encode(1, &batch_id, &mut head);
            prost::encoding::message::encode(2, &message, &mut head);
            let frame = Frame {
                head: head.freeze(),
                recipients: recipients.clone(),
            };
            self.gateways[*gateway].send(frame, batch_id)
        });
        futures::future::join_all(sends).await;
    }
}

/// The session's MGET key chunks and its frames' encoded recipient lists.
/// Users are dealt to gateways round-robin by index (as the benchmark's
/// gateways hold them).
fn prepare(session: &Session, gateways: usize, route_chunk: usize, batch: usize) -> Prepared {
    let key_chunks = session
        .members
        .chunks(route_chunk.max(1))
        .map(|c| c.iter().map(|u| route_key(u)).collect())
        .collect();
    let mut per_gateway: Vec<Vec<&String>> = vec![Vec::new(); gateways];
    for user in session.members.iter() {
        per_gateway[gateway_of(user, gateways)].push(user);
    }
    let mut frames = Vec::new();
    for (g, users) in per_gateway.iter().enumerate() {
        for chunk in users.chunks(batch.max(1)) {
            let mut buf = BytesMut::new();
            for user in chunk {
                prost::encoding::string::encode(3, user, &mut buf);
            }
            frames.push((g, buf.freeze()));
        }
    }
    Prepared { key_chunks, frames }
}

/// The gateway index holding `user-NNNNNN` when users are dealt round-robin.
pub(crate) fn gateway_of(user: &str, gateways: usize) -> usize {
    user.rsplit('-')
        .next()
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(0, |i| i % gateways)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use resonance_task::proto::PushBatchRequest;

    #[test]
    fn a_frame_is_a_valid_batch_request() {
        let session = Session {
            id: "s".into(),
            members: Arc::new(
                (0..10)
                    .map(|i| resonance_reference_gateway::user_name("user-", i))
                    .collect(),
            ),
        };
        let prepared = prepare(&session, 2, 4, 3);
        assert_eq!(prepared.key_chunks.len(), 3);
        assert_eq!(
            prepared.frames.len(),
            4,
            "5 users per gateway in frames of 3"
        );
        let message = resonance_task::proto::PushMessage {
            msg_id: 7,
            ..Default::default()
        };
        let mut head = BytesMut::new();
        prost::encoding::uint64::encode(1, &9, &mut head);
        prost::encoding::message::encode(2, &message, &mut head);
        let (gateway, recipients) = &prepared.frames[1];
        let bytes = [head.as_ref(), recipients.as_ref()].concat();
        let decoded = PushBatchRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(*gateway, 0);
        assert_eq!(decoded.batch_id, 9);
        assert_eq!(decoded.message.unwrap().msg_id, 7);
        assert_eq!(decoded.to_usernames, ["user-000006", "user-000008"]);
    }
}
