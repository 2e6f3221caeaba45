//! `resonance-task workload`: the demo's sample load and delivery report,
//! and the pieces the chaos run shares with it.
//!
//! It reads the seeded sessions and who is online (routes to a gateway that
//! reports stats), publishes events to random sessions from random members,
//! waits until the gateways have received everything expected (or stop
//! making progress), and compares: expected online deliveries, delivered,
//! offline, lost, duplicates, throughput and publish-to-gateway latency.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use hdrhistogram::Histogram;
use prost::Message;
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;

use super::publish::{EventTemplate, Pacer, event, fresh_msg_id_base};
use resonance_reference_gateway::GatewayStats;
use resonance_task::clock::now_ms;
use resonance_task::dispatch::plan::recipients;
use resonance_task::proto::PushEvent;
use resonance_task::store::{MemberError, MemberStore, RedisError, RouteStore};

#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    pub events: usize,
    /// Events per second (0 = as fast as possible).
    pub rate: f64,
    /// `GET /stats` URLs of the reference gateways.
    pub stats_urls: Vec<String>,
    pub push_to_sender: bool,
    pub rng_seed: u64,
    /// Give up waiting after this long without progress.
    pub settle_timeout: Duration,
    pub subject: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkloadReport {
    pub events: usize,
    pub expected: u64,
    pub delivered: u64,
    pub offline: u64,
    pub lost: u64,
    pub duplicates: u64,
    /// Deliveries to a user who was not expected to get the message.
    pub unexpected: u64,
    pub deliveries_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub elapsed_s: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error(transparent)]
    Members(#[from] MemberError),
    #[error(transparent)]
    Routes(#[from] RedisError),
    #[error("publishing: {0}")]
    Publish(#[from] async_nats::Error),
    #[error("reading gateway stats from {url}: {cause}")]
    Stats { url: String, cause: reqwest::Error },
    #[error("no sessions in the database; run `resonance-task seed` first")]
    NoSessions,
}

/// Reads the reference gateways' `GET /stats`.
pub struct StatsClient {
    http: reqwest::Client,
    urls: Vec<String>,
}

impl StatsClient {
    pub fn new(urls: Vec<String>) -> Self {
        let http = resonance_testkit::http_client()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("HTTP client builds");
        Self { http, urls }
    }

    pub async fn fetch(&self) -> Result<Vec<GatewayStats>, WorkloadError> {
        let mut all = Vec::with_capacity(self.urls.len());
        for url in &self.urls {
            let err = |cause| WorkloadError::Stats {
                url: url.clone(),
                cause,
            };
            let response = self
                .http
                .get(url)
                .send()
                .await
                .and_then(|r| r.error_for_status());
            all.push(
                response
                    .map_err(err)?
                    .json::<GatewayStats>()
                    .await
                    .map_err(err)?,
            );
        }
        Ok(all)
    }
}

/// A seeded session and which of its members are online.
pub struct SessionInfo {
    pub id: String,
    pub members: Vec<String>,
    pub online: HashSet<String>,
}

/// Every session with its online members: those routed to one of
/// `gateways`.
pub async fn load_sessions(
    members: &MemberStore,
    routes: &RouteStore,
    gateways: &HashSet<String>,
) -> Result<Vec<SessionInfo>, WorkloadError> {
    let mut sessions = Vec::new();
    for id in members.session_ids().await? {
        let m = members.members(&id).await?;
        let r = routes.lookup(&m).await?;
        let online = m
            .iter()
            .zip(r)
            .filter(|(_, r)| r.as_ref().is_some_and(|r| gateways.contains(&r.gateway_id)))
            .map(|(u, _)| u.clone())
            .collect();
        sessions.push(SessionInfo {
            id,
            members: m,
            online,
        });
    }
    if sessions.is_empty() {
        return Err(WorkloadError::NoSessions);
    }
    Ok(sessions)
}

/// What the published events should produce at the gateways.
#[derive(Debug, Default)]
pub struct Expectation {
    by_msg: HashMap<i64, u64>,
    pub expected: u64,
    pub offline: u64,
}

/// What the gateways received of the expected events.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub unexpected: u64,
}

impl Expectation {
    /// Draws the `i`-th event: a random session and sender, counted here.
    pub fn draw(
        &mut self,
        rng: &mut StdRng,
        sessions: &[SessionInfo],
        push_to_sender: bool,
        msg_id: i64,
    ) -> PushEvent {
        let s = &sessions[rng.random_range(0..sessions.len())];
        let sender = s.members[rng.random_range(0..s.members.len())].clone();
        let single = s.members.len() == 2;
        let to = if single {
            s.members
                .iter()
                .find(|m| **m != sender)
                .cloned()
                .unwrap_or_default()
        } else {
            String::new()
        };
        let (targets, _) = recipients(&s.members, &sender, push_to_sender, &HashSet::new());
        let online = targets
            .iter()
            .filter(|&&i| s.online.contains(&s.members[i as usize]))
            .count() as u64;
        self.by_msg.insert(msg_id, online);
        self.expected += online;
        self.offline += targets.len() as u64 - online;
        let template = EventTemplate {
            session_id: s.id.clone(),
            session_type: if single { 1 } else { 2 },
            from_username: sender,
            to_username: to,
            content: format!("workload message {msg_id}"),
            kind: "text".into(),
        };
        event(&template, msg_id, self.by_msg.len() as i64)
    }

    pub fn events(&self) -> usize {
        self.by_msg.len()
    }

    /// Compares gateway stats with the expectation, per msg_id.
    pub fn compare(&self, stats: &[GatewayStats]) -> Received {
        let mut got: HashMap<i64, (u64, u64)> = HashMap::new();
        for s in stats {
            for (msg_id, c) in &s.per_msg {
                if self.by_msg.contains_key(msg_id) {
                    let e = got.entry(*msg_id).or_default();
                    e.0 += c.users;
                    e.1 += c.deliveries;
                }
            }
        }
        let mut r = Received::default();
        for (id, want) in &self.by_msg {
            let (users, deliveries) = got.get(id).copied().unwrap_or_default();
            r.delivered += users.min(*want);
            r.lost += want.saturating_sub(users);
            r.unexpected += users.saturating_sub(*want);
            r.duplicates += deliveries - users;
        }
        r
    }

    /// The msg_ids some online member of which did not receive.
    pub fn incomplete(&self, stats: &[GatewayStats]) -> Vec<i64> {
        let mut got: HashMap<i64, u64> = HashMap::new();
        for s in stats {
            for (msg_id, c) in &s.per_msg {
                *got.entry(*msg_id).or_default() += c.users;
            }
        }
        self.by_msg
            .iter()
            .filter(|(id, want)| got.get(id).copied().unwrap_or(0) < **want)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Polls the gateways until every expected delivery arrived, or nothing
    /// new arrived for `settle_timeout`. Returns the last stats.
    pub async fn wait(
        &self,
        stats: &StatsClient,
        settle_timeout: Duration,
    ) -> Result<Vec<GatewayStats>, WorkloadError> {
        let mut last_progress = tokio::time::Instant::now();
        let mut last = 0u64;
        let mut shown = tokio::time::Instant::now();
        loop {
            let now = stats.fetch().await?;
            let reached = self.compare(&now).delivered;
            if reached >= self.expected {
                return Ok(now);
            }
            if shown.elapsed() >= PROGRESS_EVERY {
                // Progress for whoever runs the tool; logs stay structured.
                eprintln!(
                    "waiting: {reached} of {} expected deliveries arrived",
                    self.expected
                );
                shown = tokio::time::Instant::now();
            }
            if reached > last {
                last = reached;
                last_progress = tokio::time::Instant::now();
            } else if last_progress.elapsed() >= settle_timeout {
                tracing::warn!(
                    reached,
                    expected = self.expected,
                    "deliveries stopped making progress"
                );
                return Ok(now);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// How often the tool says how far it got, on standard error.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Publish-to-gateway latency of every delivery the gateways saw.
pub fn latency(stats: &[GatewayStats]) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds");
    for s in stats {
        for (value, count) in &s.latency_us {
            h.saturating_record_n(*value, *count);
        }
    }
    h
}

pub async fn run(
    opts: &WorkloadOptions,
    members: &MemberStore,
    routes: &RouteStore,
    nats: &async_nats::Client,
) -> Result<WorkloadReport, WorkloadError> {
    let stats = StatsClient::new(opts.stats_urls.clone());
    let gateways: HashSet<String> = stats
        .fetch()
        .await?
        .into_iter()
        .map(|s| s.gateway_id)
        .collect();
    let sessions = load_sessions(members, routes, &gateways).await?;

    let mut rng = StdRng::seed_from_u64(opts.rng_seed);
    let base = fresh_msg_id_base();
    let mut expectation = Expectation::default();
    let mut pacer = Pacer::new(opts.rate);
    let started_us = now_ms() * 1000;
    let started = tokio::time::Instant::now();
    let mut shown = tokio::time::Instant::now();
    for i in 0..opts.events {
        let e = expectation.draw(&mut rng, &sessions, opts.push_to_sender, base + i as i64);
        pacer.tick().await;
        nats.publish(opts.subject.clone(), e.encode_to_vec().into())
            .await
            .map_err(|e| WorkloadError::Publish(e.into()))?;
        if shown.elapsed() >= PROGRESS_EVERY {
            let reached = expectation.compare(&stats.fetch().await?).delivered;
            eprintln!(
                "published {} of {} events; {reached} of {} expected deliveries arrived",
                i + 1,
                opts.events,
                expectation.expected
            );
            shown = tokio::time::Instant::now();
        }
    }
    nats.flush()
        .await
        .map_err(|e| WorkloadError::Publish(e.into()))?;
    tracing::info!(
        events = opts.events,
        expected = expectation.expected,
        "published; waiting for deliveries"
    );

    let last = expectation.wait(&stats, opts.settle_timeout).await?;
    let wall = started.elapsed();
    let r = expectation.compare(&last);
    let latency = latency(&last);
    let last_us = last
        .iter()
        .map(|s| s.last_delivery_us)
        .max()
        .unwrap_or(started_us);
    let busy_s = ((last_us - started_us) as f64 / 1e6).max(1e-3);
    Ok(WorkloadReport {
        events: opts.events,
        expected: expectation.expected,
        delivered: r.delivered,
        offline: expectation.offline,
        lost: r.lost,
        duplicates: r.duplicates,
        unexpected: r.unexpected,
        deliveries_per_sec: (r.delivered as f64 / busy_s).round(),
        p50_ms: latency.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: latency.value_at_quantile(0.99) as f64 / 1000.0,
        elapsed_s: (wall.as_secs_f64() * 100.0).round() / 100.0,
    })
}

impl WorkloadReport {
    /// The report as aligned text lines.
    pub fn to_text(&self) -> String {
        format!(
            "events published      {}\nexpected deliveries   {}\ndelivered             {}\noffline recipients    {}\nlost                  {}\nduplicates            {}\nunexpected            {}\ndeliveries per second {:.0}\nlatency p50 / p99     {:.2} ms / {:.2} ms\nwall time             {:.2} s\n",
            self.events,
            self.expected,
            self.delivered,
            self.offline,
            self.lost,
            self.duplicates,
            self.unexpected,
            self.deliveries_per_sec,
            self.p50_ms,
            self.p99_ms,
            self.elapsed_s
        )
    }
}
