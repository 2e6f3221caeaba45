//! Legacy intake: a plain queue-group subscription on `consumer.topic`.
//! Core NATS has no acks or redelivery, so this is at-most-once: an event
//! whose fan-out fails, like an undecodable one, goes straight to the
//! dead-letter subject (from where it can be replayed) instead of being
//! retried. Kept for operators who want the upstream behaviour; JetStream
//! mode is the default.

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::dead_letter::{self, DeadLetterInfo};
use super::{Attempt, Decision, EventHandler, MessageHandler};
use crate::config::ConsumerConfig;
use crate::lifecycle::{Lifecycle, Readiness};

pub async fn run(
    client: async_nats::Client,
    cfg: ConsumerConfig,
    handler: Arc<EventHandler>,
    life: &Lifecycle,
) -> Result<(), async_nats::SubscribeError> {
    let mut subscription = client
        .queue_subscribe(cfg.topic.clone(), cfg.queue_group.clone())
        .await?;
    // Ready only once the server has the subscription: core NATS drops what
    // is published before it.
    if let Err(e) = crate::nats::round_trip(&client).await {
        tracing::warn!(error = %e, "could not confirm the subscription with the server");
    }
    Readiness::set(&life.readiness.consumer_bound, true);
    tracing::info!(topic = %cfg.topic, queue_group = %cfg.queue_group, "consuming (core mode, at-most-once)");
    let workers = Arc::new(Semaphore::new(cfg.worker_count));
    loop {
        let permit = tokio::select! {
            _ = life.stop.cancelled() => break,
            p = workers.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let message = tokio::select! {
            _ = life.stop.cancelled() => break,
            m = subscription.next() => match m {
                Some(m) => m,
                None => break,
            },
        };
        let turn = handler.turn(&message.payload);
        let handler = handler.clone();
        let client = client.clone();
        let dead_letter_topic = cfg.dead_letter_topic.clone();
        life.spawn(async move {
            let attempt = Attempt { delivery: 1 };
            // Core NATS cannot hand an event back or redeliver it, so its
            // one attempt is also its last.
            let decision = handler
                .handle_event(
                    &message.payload,
                    message.headers.as_ref(),
                    attempt,
                    &CancellationToken::new(),
                    turn,
                )
                .await
                .or_give_up(1, 1);
            if let Decision::DeadLetter { reason, last_error } = &decision {
                let info = DeadLetterInfo {
                    reason,
                    last_error,
                    deliveries: 1,
                    stream_sequence: None,
                    subject: message.subject.as_str(),
                };
                if let Err(e) = dead_letter::publish_core(
                    &client,
                    &dead_letter_topic,
                    message.payload.clone(),
                    &info,
                )
                .await
                {
                    tracing::error!(error = %e, "dead letter not published (core mode)");
                }
            }
            handler.totals().decision(&decision);
            drop(permit);
        });
    }
    let _ = subscription.unsubscribe().await;
    Ok(())
}
