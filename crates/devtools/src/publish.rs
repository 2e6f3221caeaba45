//! `resonance-task publish`: publishes `PushEvent`s with a plain core-NATS
//! publish, exactly as the logic service does, optionally at a fixed rate.

use std::time::Duration;

use prost::Message;

use resonance_task::clock::now_ms;
use resonance_task::proto::PushEvent;

#[derive(Debug, Clone)]
pub struct EventTemplate {
    pub session_id: String,
    pub session_type: i32,
    pub from_username: String,
    pub to_username: String,
    pub content: String,
    pub kind: String,
}

/// An event from a template with its ids and the publish time.
pub fn event(t: &EventTemplate, msg_id: i64, seq_id: i64) -> PushEvent {
    PushEvent {
        msg_id,
        seq_id,
        session_id: t.session_id.clone(),
        from_username: t.from_username.clone(),
        to_username: t.to_username.clone(),
        content: t.content.clone(),
        r#type: t.kind.clone(),
        timestamp: now_ms(),
        session_name: String::new(),
        session_type: t.session_type,
        trace_headers: Default::default(),
    }
}

/// A msg_id base unlikely to collide with an earlier run's ids.
pub fn fresh_msg_id_base() -> i64 {
    now_ms() * 1000
}

/// Paces a loop to `rate` iterations per second (0 = unpaced).
pub struct Pacer {
    interval: Option<Duration>,
    start: tokio::time::Instant,
    n: u32,
}

impl Pacer {
    pub fn new(rate: f64) -> Self {
        Self {
            interval: (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate)),
            start: tokio::time::Instant::now(),
            n: 0,
        }
    }

    pub async fn tick(&mut self) {
        if let Some(interval) = self.interval {
            tokio::time::sleep_until(self.start + interval * self.n).await;
        }
        self.n += 1;
    }
}

/// Publishes `count` events from `template` and flushes.
pub async fn publish(
    client: &async_nats::Client,
    subject: &str,
    template: &EventTemplate,
    first_msg_id: i64,
    count: usize,
    rate: f64,
) -> Result<Vec<i64>, async_nats::Error> {
    let mut pacer = Pacer::new(rate);
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        pacer.tick().await;
        let msg_id = first_msg_id + i as i64;
        let e = event(template, msg_id, i as i64 + 1);
        client
            .publish(subject.to_string(), e.encode_to_vec().into())
            .await?;
        ids.push(msg_id);
    }
    client.flush().await?;
    Ok(ids)
}
