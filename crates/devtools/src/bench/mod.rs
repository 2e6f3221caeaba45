//! `resonance-task bench`: measures fan-out throughput and latency of four
//! ways to do the same work, side by side in one run on one workload, with
//! private `nats-server`, `etcd` and `redis-server` processes and in-process
//! reference gateways (like the demo):
//!
//! - `serial`: the upstream algorithm — per member one Redis GET and one
//!   push awaited before the next, 10 events in flight (`serial`);
//! - `stream`: this service with per-user `PushService` requests, pipelined;
//! - `batch`: this service with batch-v1 frames;
//! - `floor-js`: the floor behind a JetStream stream and durable consumer,
//!   one consume and one ack per event (what the queue itself costs);
//! - `floor`: only the I/O the path cannot avoid, done directly — one MGET
//!   per recipient chunk and pre-encoded batch-v1 frames, no NATS, no SQL,
//!   no service logic (`floor`): the practical limit of this machine.
//!
//! Throughput is measured at saturation: every event is submitted at once
//! and the clock runs from the first submit to the last delivery any gateway
//! saw. Latency is publish-to-gateway, from each push's `timestamp` (Unix
//! milliseconds) to its arrival, so it has millisecond resolution. A second
//! phase measures latency at half of the batch mode's peak with smaller
//! groups, where latency rather than queueing is what shows.
//!
//! `--sweep` repeats serial, batch, floor-js and floor at group sizes from 2
//! to 100,000; `--mix` runs them on a traffic mix of session sizes (see
//! `mix`). `--compare` checks the report's ratios against a recorded
//! baseline (see `baseline`).

pub mod baseline;
mod drivers;
mod floor;
mod mix;
mod plot;
mod priority;
mod serial;
mod storm;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use drivers::Driver;
use resonance_reference_gateway::user_name;
use resonance_reference_gateway::{
    ReferenceGateway, ReferenceGatewayError, ReferenceGatewayOptions,
};
use resonance_task::clock::now_ms;
use resonance_task::config::{Config, SecretUrl};
use resonance_task::proto::PushEvent;
use resonance_task::store::{MemberError, MemberStore, SessionSeed};
use resonance_testkit::certs::DevPki;
use resonance_testkit::engines::Engines;
use resonance_testkit::servers::StackError;

pub use drivers::Mode;
pub use mix::{DEFAULT_MIX, MixSpec};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Stack(#[from] StackError),
    #[error("starting a reference gateway: {0}")]
    Gateway(#[from] ReferenceGatewayError),
    #[error("seeding sessions: {0}")]
    Seed(#[from] MemberError),
    #[error("{0}")]
    Setup(String),
    #[error("{mode}: {delivered} of {expected} deliveries arrived; none for {stalled:?}")]
    Stalled {
        mode: Mode,
        delivered: u64,
        expected: u64,
        stalled: Duration,
    },
    #[error("writing {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

pub(crate) fn setup(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub modes: Vec<Mode>,
    /// Members per session in the throughput run.
    pub group_size: usize,
    pub gateways: usize,
    /// Deliveries each of `stream`, `batch` and `floor` makes; `serial`
    /// makes a tenth of it (it is that much slower).
    pub deliveries: u64,
    /// Sessions the throughput run (and the TLS and cluster comparisons)
    /// spreads its events over; `None`: as many as the users make up, 8 to
    /// 256. Many more sessions than a pod keeps warm (each seen again only
    /// after `dispatch.member_cache_ttl`) measure traffic spread over many
    /// conversations, whose members are read from SQL.
    pub sessions: Option<usize>,
    /// Members per session in the latency run.
    pub latency_group_size: usize,
    /// How long the latency run publishes at half of peak.
    pub latency_seconds: f64,
    /// Also measure group sizes 2 .. 100,000 and write the curve here.
    pub sweep: Option<PathBuf>,
    /// Also measure every mode on this traffic mix.
    pub mix: Option<MixSpec>,
    /// Also run a burst of 100,000-member events through a pod process
    /// with one slow gateway and report its peak memory.
    pub storm: bool,
    /// Also measure high-priority latency under a saturating normal load,
    /// lanes on and off.
    pub priority: bool,
    /// Also measure the batch mode with mutual TLS to every gateway, beside
    /// plaintext.
    pub tls: bool,
    /// Also measure the batch mode on clustered engines (3 NATS nodes with
    /// R3 streams, a Redis Cluster, 3 etcd members), beside single servers.
    pub cluster: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Where the pods' `consumer.worker_count`, `gateway`, `dispatch`,
    /// `dedup` and `priority` settings come from (the loaded configuration), so tuning
    /// can be measured; servers and addresses are the benchmark's own.
    pub tuning: Config,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            modes: Mode::ALL.to_vec(),
            group_size: 1000,
            gateways: 4,
            deliveries: 1_000_000,
            sessions: None,
            latency_group_size: 100,
            latency_seconds: 5.0,
            sweep: None,
            mix: None,
            storm: false,
            priority: false,
            tls: false,
            cluster: false,
            progress: true,
            tuning: Config::default(),
        }
    }
}

/// Group sizes of the sweep.
pub const SWEEP_SIZES: [usize; 6] = [2, 10, 100, 1_000, 10_000, 100_000];

/// The storm: this many events of this many members, one gateway holding
/// every answer this long.
const STORM_GROUP: usize = 100_000;
const STORM_EVENTS: usize = 30;
const STORM_DELAY: Duration = Duration::from_millis(20);

/// How long the priority phase offers its load, per lane setting.
const PRIORITY_SECONDS: f64 = 5.0;

/// Sessions per group size at least; events go round-robin over them.
const SESSIONS_PER_SIZE: usize = 8;
/// Sessions per group size at most: small groups get as many as the users
/// allow up to this, since small-group traffic is spread over many
/// conversations.
const MAX_SESSIONS_PER_SIZE: usize = 256;

/// Deliveries the serial mode makes at most per sweep point (it is slow).
const SERIAL_SWEEP_DELIVERIES: usize = 200_000;

#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub mode: Mode,
    pub group_size: usize,
    pub events: usize,
    pub deliveries: u64,
    pub elapsed_s: f64,
    pub events_per_sec: f64,
    pub deliveries_per_sec: f64,
    /// Cost of one delivery in CPU-microseconds of wall time at saturation
    /// (1e6 / deliveries_per_sec).
    pub per_delivery_us: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyResult {
    pub group_size: usize,
    /// The batch mode's peak with these groups.
    pub peak_events_per_sec: f64,
    /// Half of it: the rate the latency was measured at.
    pub events_per_sec: f64,
    pub deliveries: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub machine: Machine,
    pub group_size: usize,
    /// Sessions the throughput run's events went round-robin over.
    pub sessions: usize,
    pub gateways: usize,
    pub modes: BTreeMap<String, ModeResult>,
    pub batch_vs_serial: Option<f64>,
    pub batch_vs_stream: Option<f64>,
    pub batch_vs_floor: Option<f64>,
    pub latency_at_half_peak: Option<LatencyResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep: Option<Vec<plot::SweepPoint>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mix: Option<mix::MixResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storm: Option<storm::StormResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<priority::PriorityResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterResult>,
    /// Batch throughput on clustered engines over single servers: what
    /// replication costs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_vs_single: Option<f64>,
}

/// The batch mode on single servers and on clustered engines, same
/// workload, interleaved.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterResult {
    /// Sessions the events went round robin over, on each stack.
    pub sessions: usize,
    pub single: ModeResult,
    pub cluster: ModeResult,
    pub cluster_vs_single: f64,
}

/// The batch mode over plaintext and over mutual TLS, measured one after
/// the other on the same workload.
#[derive(Debug, Clone, Serialize)]
pub struct TlsResult {
    /// Sessions the events went round robin over, on each stack.
    pub sessions: usize,
    pub plain: ModeResult,
    pub mtls: ModeResult,
    /// mTLS throughput over plaintext throughput.
    pub mtls_vs_plain: f64,
}

impl BenchReport {
    fn ratio(&self, a: Mode, b: Mode) -> Option<f64> {
        let a = self.modes.get(a.key())?.deliveries_per_sec;
        let b = self.modes.get(b.key())?.deliveries_per_sec;
        (b > 0.0).then(|| round(a / b, 2))
    }

    pub fn to_text(&self) -> String {
        let mut out = format!(
            "resonance-task bench: {} cpus ({}), {:.0} GiB; {}-member groups ({} sessions) over {} gateways\n\n",
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.memory_gib,
            self.group_size,
            self.sessions,
            self.gateways
        );
        out.push_str(&format!(
            "{:<8} {:>8} {:>11} {:>9} {:>16} {:>10} {:>10} {:>10}\n",
            "mode",
            "events",
            "deliveries",
            "seconds",
            "deliveries/s",
            "us/deliv",
            "p50 ms",
            "p99 ms"
        ));
        for mode in Mode::ALL {
            if let Some(r) = self.modes.get(mode.key()) {
                out.push_str(&format!(
                    "{:<8} {:>8} {:>11} {:>9.2} {:>16.0} {:>10.2} {:>10.1} {:>10.1}\n",
                    mode.as_str(),
                    r.events,
                    r.deliveries,
                    r.elapsed_s,
                    r.deliveries_per_sec,
                    r.per_delivery_us,
                    r.p50_ms,
                    r.p99_ms
                ));
            }
        }
        out.push('\n');
        for (name, value) in [
            ("batch_vs_serial", self.batch_vs_serial),
            ("batch_vs_stream", self.batch_vs_stream),
            ("batch_vs_floor", self.batch_vs_floor),
        ] {
            if let Some(v) = value {
                out.push_str(&format!("{name}: {v:.2}\n"));
            }
        }
        if let Some(l) = &self.latency_at_half_peak {
            out.push_str(&format!(
                "latency at half peak ({}-member groups, {:.0} of {:.0} events/s): p50 {:.1} ms, p99 {:.1} ms\n",
                l.group_size, l.events_per_sec, l.peak_events_per_sec, l.p50_ms, l.p99_ms
            ));
        }
        if let Some(s) = &self.storm {
            out.push_str(&format!(
                "storm: {} events of {} members, one gateway answering after {} ms: {} deliveries in {:.1} s, pod peak RSS {:.1} MiB\n",
                s.events, s.group_size, s.slow_gateway_delay_ms, s.deliveries, s.elapsed_s, s.peak_rss_mib
            ));
        }
        if let Some(p) = &self.priority {
            out.push_str(&format!(
                "priority: {} normal events/s of {} members (over the peak) and {} one-to-one high events: high p50 {:.1} ms p99 {:.1} ms (lanes off: p50 {:.1} ms p99 {:.1} ms); normal p99 {:.1} ms; backlog drained in {:.0} ms (lanes off: {:.0} ms){}\n",
                p.normal_events_per_sec,
                p.normal_group_size,
                p.high_events,
                p.lanes_on.high_p50_ms,
                p.lanes_on.high_p99_ms,
                p.lanes_off.high_p50_ms,
                p.lanes_off.high_p99_ms,
                p.lanes_on.normal_p99_ms,
                p.lanes_on.backlog_drain_ms,
                p.lanes_off.backlog_drain_ms,
                if p.saturated { "" } else { "; NOT SATURATED: the lanes had no backlog to jump" }
            ));
        }
        if let Some(t) = &self.tls {
            out.push_str(&format!(
                "batch over mutual TLS: {:.0} deliveries/s (p99 {:.1} ms) vs plaintext {:.0} (p99 {:.1} ms): mtls_vs_plain {:.2}\n",
                t.mtls.deliveries_per_sec,
                t.mtls.p99_ms,
                t.plain.deliveries_per_sec,
                t.plain.p99_ms,
                t.mtls_vs_plain
            ));
        }
        if let Some(c) = &self.cluster {
            out.push_str(&format!(
                "batch on clustered engines (R3 streams, Redis Cluster, 3 etcd): {:.0} deliveries/s (p99 {:.1} ms) vs single servers {:.0} (p99 {:.1} ms): cluster_vs_single {:.2}\n",
                c.cluster.deliveries_per_sec,
                c.cluster.p99_ms,
                c.single.deliveries_per_sec,
                c.single.p99_ms,
                c.cluster_vs_single
            ));
        }
        if let Some(sweep) = &self.sweep {
            out.push_str("\nsweep (deliveries/s by group size):\n");
            out.push_str(&format!(
                "{:>8} {:>12} {:>12} {:>12} {:>12} {:>9} {:>9}\n",
                "group", "serial", "batch", "floor-js", "floor", "b/floor", "b/serial"
            ));
            for p in sweep {
                out.push_str(&format!(
                    "{:>8} {:>12.0} {:>12.0} {:>12.0} {:>12.0} {:>9.2} {:>9.2}\n",
                    p.group_size,
                    p.serial.deliveries_per_sec,
                    p.batch.deliveries_per_sec,
                    p.floor_js.deliveries_per_sec,
                    p.floor.deliveries_per_sec,
                    p.batch_vs_floor,
                    p.batch_vs_serial
                ));
            }
        }
        if let Some(m) = &self.mix {
            out.push_str(&format!(
                "\nmix {} (mean {:.1} members per event):\n",
                m.spec, m.mean_group_size
            ));
            out.push_str(&format!(
                "{:<8} {:>8} {:>12} {:>14} {:>10}\n",
                "mode", "events", "events/s", "deliveries/s", "p99 ms"
            ));
            for r in [&m.serial, &m.batch, &m.floor_js, &m.floor] {
                out.push_str(&format!(
                    "{:<8} {:>8} {:>12.0} {:>14.0} {:>10.1}\n",
                    r.mode.as_str(),
                    r.events,
                    r.events_per_sec,
                    r.deliveries_per_sec,
                    r.p99_ms
                ));
            }
            let l = &m.latency_at_half_peak;
            out.push_str(&format!(
                "mix batch_vs_serial (events/s): {:.2}; batch_vs_floor: {:.2}; at half peak ({:.0} of {:.0} events/s): p50 {:.1} ms, p99 {:.1} ms\n",
                m.batch_vs_serial, m.batch_vs_floor, l.events_per_sec, l.peak_events_per_sec, l.p50_ms, l.p99_ms
            ));
        }
        out
    }
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| round(kb / 1024.0 / 1024.0, 1));
    Machine {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        memory_gib,
    }
}

/// One session of the workload: its id and members, the sender first.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub id: String,
    pub members: Arc<Vec<String>>,
}

/// The private servers, gateways and sessions every mode shares.
pub(crate) struct Bench {
    _servers: Engines,
    _dir: tempfile::TempDir,
    pub config: Config,
    pub gateways: Vec<ReferenceGateway>,
    pub users: usize,
    store: MemberStore,
    sessions: BTreeMap<usize, Vec<Session>>,
    /// The traffic mix's sessions.
    pub(crate) mixed: Vec<Session>,
    /// The sessions of a throughput run given its own count of them.
    pub(crate) spread: Vec<Session>,
    next_msg_id: AtomicI64,
    progress: bool,
}

impl Bench {
    /// With `tls`, gateways serve mutual TLS with its server certificate
    /// and pods connect with its client certificate; with `cluster`, the
    /// engines are clustered.
    async fn start(
        gateways: usize,
        users: usize,
        progress: bool,
        tuning: &Config,
        tls: Option<&DevPki>,
        cluster: bool,
    ) -> Result<Self, BenchError> {
        let engines = Engines::start(cluster, false).await?;
        let dir = tempfile::tempdir().map_err(setup)?;
        let mut config = Config::default();
        config.consumer.worker_count = tuning.consumer.worker_count;
        config.gateway = tuning.gateway.clone();
        config.dispatch = tuning.dispatch.clone();
        config.dedup = tuning.dedup.clone();
        config.priority = tuning.priority.clone();
        engines.wire(&mut config);
        config.database.url = SecretUrl::new(format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.db").display()
        ));
        config.database.migrate_on_start = Some(true);
        config.admin.enabled = false;
        config.log.level = "warn".into();
        let server_tls = match tls {
            Some(pki) => {
                config.gateway.tls = pki.client_tls();
                Some(pki.server_tls().map_err(setup)?)
            }
            None => None,
        };
        config.validate().map_err(setup)?;

        let (pool, dialect) = resonance_task::store::connect_database(&config.database)
            .await
            .map_err(setup)?;
        resonance_task::store::migrate(&pool, dialect, &config.database)
            .await
            .map_err(setup)?;
        let store = MemberStore::new(pool, dialect);

        let names: Vec<String> = (0..users).map(|i| user_name("user-", i)).collect();
        let mut started = Vec::with_capacity(gateways);
        for g in 0..gateways {
            // Users are dealt round-robin, so every group spans every gateway.
            let held = names.iter().skip(g).step_by(gateways).cloned().collect();
            let mut opts = gateway_options(&config, format!("gateway-{:03}", g + 1), held);
            opts.tls = server_tls.clone();
            started.push(ReferenceGateway::start(opts).await?);
        }
        Ok(Self {
            _servers: engines,
            _dir: dir,
            config,
            gateways: started,
            users,
            store,
            sessions: BTreeMap::new(),
            mixed: Vec::new(),
            spread: Vec::new(),
            next_msg_id: AtomicI64::new(super::publish::fresh_msg_id_base()),
            progress,
        })
    }

    /// The sessions a throughput run of `size`-member groups goes round
    /// robin over: `count` of their own when given (`--sessions`), else
    /// the shared ones of that size.
    async fn throughput_sessions(
        &mut self,
        size: usize,
        count: Option<usize>,
    ) -> Result<Vec<Session>, BenchError> {
        match count {
            Some(count) => {
                self.spread = self.create_many("bench-spread", size, count).await?;
                Ok(self.spread.clone())
            }
            None => self.sessions(size).await,
        }
    }

    /// Creates the sessions of `size` members (once): as many as the users
    /// make up, at least `SESSIONS_PER_SIZE`, at most `MAX_SESSIONS_PER_SIZE`.
    async fn sessions(&mut self, size: usize) -> Result<Vec<Session>, BenchError> {
        if let Some(s) = self.sessions.get(&size) {
            return Ok(s.clone());
        }
        let size = size.min(self.users);
        let count = (self.users / size).clamp(SESSIONS_PER_SIZE, MAX_SESSIONS_PER_SIZE);
        let sessions = self.create_many("bench", size, count).await?;
        self.sessions.insert(size, sessions.clone());
        Ok(sessions)
    }

    /// `count` sessions of `size` members, ids `<prefix>-<size>-<n>`. The
    /// members of one are consecutive users, and the sessions start evenly
    /// spaced over the users (more sessions than the users make up share
    /// member lists, each under its own id).
    async fn create_many(
        &self,
        prefix: &str,
        size: usize,
        count: usize,
    ) -> Result<Vec<Session>, BenchError> {
        let size = size.min(self.users);
        let mut sessions = Vec::with_capacity(count);
        for s in 0..count {
            let offset = s * size.max(self.users / count) % self.users;
            sessions.push(
                self.create(format!("{prefix}-{size}-{s}"), size, offset)
                    .await?,
            );
        }
        Ok(sessions)
    }

    /// A session of `size` users from the `offset`-th on.
    async fn create(&self, id: String, size: usize, offset: usize) -> Result<Session, BenchError> {
        let members: Vec<String> = (0..size.min(self.users))
            .map(|i| user_name("user-", (offset + i) % self.users))
            .collect();
        self.store
            .create_session(&SessionSeed {
                session_id: id.clone(),
                kind: if size == 2 { 1 } else { 2 },
                name: id.clone(),
                owner: members[0].clone(),
                members: members.clone(),
            })
            .await?;
        Ok(Session {
            id,
            members: Arc::new(members),
        })
    }

    /// The sessions of a traffic mix, per band (once).
    async fn mix_sessions(&mut self, spec: &MixSpec) -> Result<Vec<Vec<Session>>, BenchError> {
        let mut bands = Vec::new();
        let mut made = 0usize;
        for (band, sizes) in spec.session_sizes().into_iter().enumerate() {
            let mut sessions = Vec::with_capacity(sizes.len());
            for (i, size) in sizes.into_iter().enumerate() {
                let id = format!("bench-mix-{band}-{i}-{size}");
                sessions.push(self.create(id, size, made * 7919 % self.users).await?);
                made += 1;
            }
            bands.push(sessions);
        }
        for session in bands.iter().flatten() {
            self.mixed.push(session.clone());
        }
        Ok(bands)
    }

    /// Stops the gateways while the servers they leave (etcd, Redis) are
    /// still up, then the servers.
    pub(crate) async fn stop(self) {
        futures::future::join_all(self.gateways.into_iter().map(ReferenceGateway::stop)).await;
    }

    pub(crate) fn event(&self, session: &Session) -> PushEvent {
        let msg_id = self.next_msg_id.fetch_add(1, Ordering::Relaxed);
        PushEvent {
            msg_id,
            seq_id: msg_id,
            session_id: session.id.clone(),
            from_username: session.members[0].clone(),
            to_username: String::new(),
            content: "benchmark message: a chat line of about sixty-four bytes..".into(),
            r#type: "text".into(),
            timestamp: now_ms(),
            session_name: String::new(),
            session_type: 2,
            trace_headers: Default::default(),
        }
    }

    pub(crate) fn delivered(&self) -> u64 {
        self.gateways.iter().map(|g| g.ledger.received()).sum()
    }

    /// Submits an event to each of `events` in turn at `rate` per second
    /// (0: all at once) and waits until every delivery arrived.
    async fn measure(
        &self,
        driver: &Driver,
        events: &[Session],
        rate: f64,
    ) -> Result<ModeResult, BenchError> {
        let expected: u64 = events.iter().map(|s| s.members.len() as u64).sum();
        let base = self.delivered();
        for g in &self.gateways {
            g.ledger.reset_latency();
        }
        let started_us = now_ms() * 1000;
        let clock = tokio::time::Instant::now();
        let mut pacer = super::publish::Pacer::new(rate);
        let submit = async {
            for session in events {
                pacer.tick().await;
                driver.submit(self.event(session)).await?;
            }
            driver.flush().await
        };
        let mode = driver.mode();
        let (submitted, waited) =
            tokio::join!(submit, self.wait_for(mode, base, expected, self.progress));
        submitted?;
        waited?;
        let stats: Vec<_> = self.gateways.iter().map(|g| g.ledger.stats()).collect();
        let last_us = stats.iter().map(|s| s.last_delivery_us).max().unwrap_or(0);
        // Wall clock from the first submit to the last delivery; the
        // monotonic clock bounds it if the gateways saw nothing new.
        let elapsed_s = if last_us > started_us {
            (last_us - started_us) as f64 / 1e6
        } else {
            clock.elapsed().as_secs_f64()
        };
        let latency = super::workload::latency(&stats);
        let deliveries = self.delivered() - base;
        let per_sec = deliveries as f64 / elapsed_s.max(1e-6);
        Ok(ModeResult {
            mode,
            group_size: (expected as f64 / events.len().max(1) as f64).round() as usize,
            events: events.len(),
            deliveries,
            elapsed_s: round(elapsed_s, 3),
            events_per_sec: round(events.len() as f64 / elapsed_s.max(1e-6), 1),
            deliveries_per_sec: per_sec.round(),
            per_delivery_us: round(1e6 / per_sec.max(1e-9), 3),
            p50_ms: quantile_ms(&latency, 0.5),
            p99_ms: quantile_ms(&latency, 0.99),
        })
    }

    /// Waits until `expected` deliveries beyond `base` arrived, drawing the
    /// progress bar; fails if none arrive for a while.
    pub(crate) async fn wait_for(
        &self,
        mode: Mode,
        base: u64,
        expected: u64,
        show: bool,
    ) -> Result<(), BenchError> {
        const STALL: Duration = Duration::from_secs(60);
        let mut last = (0, tokio::time::Instant::now());
        loop {
            let done = self.delivered().saturating_sub(base);
            if show {
                draw_progress(mode, done, expected);
            }
            if done >= expected {
                if show {
                    eprintln!();
                }
                return Ok(());
            }
            if done > last.0 {
                last = (done, tokio::time::Instant::now());
            } else if last.1.elapsed() > STALL {
                if show {
                    eprintln!();
                }
                return Err(BenchError::Stalled {
                    mode,
                    delivered: done,
                    expected,
                    stalled: STALL,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A short unmeasured run: opens streams, fills caches. The sessions get
    /// an event each in turn (twice round at most) while that makes no more
    /// than `WARM_UP_DELIVERIES` deliveries, one event at least.
    async fn warm_up(&self, driver: &Driver, sessions: &[Session]) -> Result<(), BenchError> {
        const WARM_UP_DELIVERIES: u64 = 20_000;
        let mut expected = 0u64;
        let base = self.delivered();
        for (i, session) in sessions.iter().cycle().take(sessions.len() * 2).enumerate() {
            let size = session.members.len() as u64;
            if i > 0 && expected + size > WARM_UP_DELIVERIES {
                break;
            }
            driver.submit(self.event(session)).await?;
            expected += size;
        }
        driver.flush().await?;
        self.wait_for(driver.mode(), base, expected, false).await
    }
}

/// `count` events round-robin over `sessions`.
fn round_robin(sessions: &[Session], count: usize) -> Vec<Session> {
    sessions.iter().cycle().take(count).cloned().collect()
}

fn quantile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    round(h.value_at_quantile(q) as f64 / 1000.0, 2)
}

fn draw_progress(mode: Mode, done: u64, expected: u64) {
    const WIDTH: usize = 30;
    let fraction = (done as f64 / expected.max(1) as f64).min(1.0);
    let filled = (fraction * WIDTH as f64) as usize;
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r{:<7} [{}{}] {:>3.0}% {done}/{expected} deliveries",
        mode.as_str(),
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        fraction * 100.0
    );
    let _ = err.flush();
}

/// Events a mode submits to make about `deliveries` deliveries.
fn events_for(mode: Mode, deliveries: u64, group_size: usize) -> usize {
    let budget = if mode == Mode::Serial {
        deliveries / 10
    } else {
        deliveries
    };
    ((budget / group_size.max(1) as u64) as usize).max(SESSIONS_PER_SIZE)
}

/// Events per sweep point: enough deliveries to measure, few enough events
/// that small groups finish in seconds; the serial mode makes at most
/// `SERIAL_SWEEP_DELIVERIES`, two events at least.
fn sweep_events(mode: Mode, group_size: usize) -> usize {
    match mode {
        Mode::Serial => (SERIAL_SWEEP_DELIVERIES / group_size).clamp(2, 10_000),
        _ => (500_000 / group_size).clamp(SESSIONS_PER_SIZE, 50_000),
    }
}

/// A reference gateway of the benchmark: batch-v1, no per-user ledger.
pub(crate) fn gateway_options(
    config: &Config,
    gateway_id: String,
    users: Vec<String>,
) -> ReferenceGatewayOptions {
    ReferenceGatewayOptions {
        gateway_id,
        instance_id: None,
        grpc_listen: ([127, 0, 0, 1], 0).into(),
        advertise_host: "127.0.0.1".into(),
        advertise_port: None,
        http_listen: None,
        users,
        write_routes: true,
        etcd: config.etcd.clone(),
        redis: config.redis.clone(),
        namespace: config.registry.namespace.clone(),
        service_name: config.gateway_service_name.0.clone(),
        lease_ttl: Duration::from_secs(30),
        reply_delay: Duration::ZERO,
        refuse_streams: 0,
        journal: None,
        batch: true,
        track_deliveries: false,
        tls: None,
    }
}

pub async fn run(opts: BenchOptions) -> Result<BenchReport, BenchError> {
    if opts.gateways == 0 || opts.group_size == 0 || opts.latency_group_size == 0 {
        return Err(setup("gateways and group sizes must be at least 1"));
    }
    if opts.sessions == Some(0) {
        return Err(setup("sessions must be at least 1"));
    }
    let largest = if opts.sweep.is_some() || opts.storm {
        SWEEP_SIZES[SWEEP_SIZES.len() - 1]
    } else {
        opts.group_size.max(opts.latency_group_size)
    }
    .max(opts.mix.as_ref().map_or(0, MixSpec::largest));
    let users = largest.max(4000).div_ceil(opts.gateways) * opts.gateways;
    let mut bench = Bench::start(
        opts.gateways,
        users,
        opts.progress,
        &opts.tuning,
        None,
        false,
    )
    .await?;
    let sessions = bench
        .throughput_sessions(opts.group_size, opts.sessions)
        .await?;
    let mut modes = BTreeMap::new();
    for &mode in &opts.modes {
        let events = round_robin(
            &sessions,
            events_for(mode, opts.deliveries, opts.group_size),
        );
        let result = run_mode(&bench, mode, &sessions, &events).await?;
        modes.insert(mode.key().to_string(), result);
    }

    let latency_at_half_peak = if opts.modes.contains(&Mode::Batch) {
        let sessions = bench.sessions(opts.latency_group_size).await?;
        let driver = Driver::start(Mode::Batch, &bench).await?;
        bench.warm_up(&driver, &sessions).await?;
        let peak_events = events_for(Mode::Batch, opts.deliveries, opts.latency_group_size);
        let peak = bench
            .measure(&driver, &round_robin(&sessions, peak_events), 0.0)
            .await?;
        let latency = at_half_peak(&bench, &driver, &peak, opts.latency_seconds, |n| {
            round_robin(&sessions, n)
        })
        .await?;
        driver.stop().await?;
        Some(latency)
    } else {
        None
    };

    let sweep = match &opts.sweep {
        Some(dir) => {
            let mut points = Vec::new();
            for size in SWEEP_SIZES {
                let sessions = bench.sessions(size).await?;
                let mut measured = Vec::new();
                for mode in [Mode::Serial, Mode::Batch, Mode::FloorJs, Mode::Floor] {
                    let events = round_robin(&sessions, sweep_events(mode, size));
                    measured.push(run_mode(&bench, mode, &sessions, &events).await?);
                }
                let [serial, batch, floor_js, floor] =
                    <[ModeResult; 4]>::try_from(measured).expect("four modes");
                points.push(plot::SweepPoint::new(size, serial, batch, floor_js, floor));
            }
            write_sweep(dir, &points)?;
            Some(points)
        }
        None => None,
    };

    let mix = match &opts.mix {
        Some(spec) => Some(run_mix(&mut bench, spec, opts.deliveries, opts.latency_seconds).await?),
        None => None,
    };

    let priority = if opts.priority {
        let peak = match modes.get(Mode::Batch.as_str()) {
            Some(batch) => batch.deliveries_per_sec,
            None => {
                let events = events_for(Mode::Batch, opts.deliveries, opts.group_size);
                run_mode(
                    &bench,
                    Mode::Batch,
                    &sessions,
                    &round_robin(&sessions, events),
                )
                .await?
                .deliveries_per_sec
            }
        };
        let per_event = opts.group_size.min(bench.users) as f64;
        Some(priority::run(&bench, &sessions, peak / per_event, PRIORITY_SECONDS).await?)
    } else {
        None
    };

    let storm = if opts.storm {
        let sessions = bench.sessions(STORM_GROUP).await?;
        Some(storm::run(&bench, &sessions, STORM_EVENTS, STORM_DELAY).await?)
    } else {
        None
    };

    let tls = if opts.tls {
        Some(compare_tls(&opts, users).await?)
    } else {
        None
    };
    let cluster = if opts.cluster {
        Some(compare_cluster(&opts, users).await?)
    } else {
        None
    };

    let mut report = BenchReport {
        machine: machine(),
        group_size: opts.group_size,
        sessions: sessions.len(),
        gateways: opts.gateways,
        modes,
        batch_vs_serial: None,
        batch_vs_stream: None,
        batch_vs_floor: None,
        latency_at_half_peak,
        sweep,
        mix,
        storm,
        priority,
        tls,
        cluster_vs_single: cluster.as_ref().map(|c| c.cluster_vs_single),
        cluster,
    };
    bench.stop().await;
    report.batch_vs_serial = report.ratio(Mode::Batch, Mode::Serial);
    report.batch_vs_stream = report.ratio(Mode::Batch, Mode::Stream);
    report.batch_vs_floor = report.ratio(Mode::Batch, Mode::Floor);
    Ok(report)
}

/// The batch mode on two fresh stacks alike but for TLS: one plaintext, one
/// whose gateways require client certificates; same workload, interleaved.
async fn compare_tls(opts: &BenchOptions, users: usize) -> Result<TlsResult, BenchError> {
    let dir = tempfile::tempdir().map_err(setup)?;
    let pki = DevPki::create(dir.path()).map_err(setup)?;
    let start = |tls| {
        Bench::start(
            opts.gateways,
            users,
            opts.progress,
            &opts.tuning,
            tls,
            false,
        )
    };
    let (plain, mtls, sessions) =
        side_by_side(opts, start(None).await?, start(Some(&pki)).await?).await?;
    let mtls_vs_plain = round(mtls.deliveries_per_sec / plain.deliveries_per_sec, 2);
    Ok(TlsResult {
        sessions,
        plain,
        mtls,
        mtls_vs_plain,
    })
}

/// The batch mode on single servers and on clustered engines, same
/// workload, interleaved.
async fn compare_cluster(opts: &BenchOptions, users: usize) -> Result<ClusterResult, BenchError> {
    let start = |cluster| {
        Bench::start(
            opts.gateways,
            users,
            opts.progress,
            &opts.tuning,
            None,
            cluster,
        )
    };
    let (single, cluster, sessions) =
        side_by_side(opts, start(false).await?, start(true).await?).await?;
    let cluster_vs_single = round(cluster.deliveries_per_sec / single.deliveries_per_sec, 2);
    Ok(ClusterResult {
        sessions,
        single,
        cluster,
        cluster_vs_single,
    })
}

/// The batch mode on stacks `a` and `b`, same workload, in the order a, b,
/// b, a, so a drift over the run (the machine warming, a neighbour's load)
/// weighs on both alike; each side reports the faster of its two runs.
/// Also returns how many sessions the events went round robin over.
async fn side_by_side(
    opts: &BenchOptions,
    mut a: Bench,
    mut b: Bench,
) -> Result<(ModeResult, ModeResult, usize), BenchError> {
    let a_sessions = a
        .throughput_sessions(opts.group_size, opts.sessions)
        .await?;
    let b_sessions = b
        .throughput_sessions(opts.group_size, opts.sessions)
        .await?;
    let events = events_for(Mode::Batch, opts.deliveries, opts.group_size);
    let (a_events, b_events) = (
        round_robin(&a_sessions, events),
        round_robin(&b_sessions, events),
    );
    let run_a = |bench| run_mode(bench, Mode::Batch, &a_sessions, &a_events);
    let run_b = |bench| run_mode(bench, Mode::Batch, &b_sessions, &b_events);
    let a_first = run_a(&a).await?;
    let b_first = run_b(&b).await?;
    let b_second = run_b(&b).await?;
    let a_second = run_a(&a).await?;
    tokio::join!(a.stop(), b.stop());
    let faster = |x: ModeResult, y: ModeResult| {
        if x.deliveries_per_sec >= y.deliveries_per_sec {
            x
        } else {
            y
        }
    };
    Ok((
        faster(a_first, a_second),
        faster(b_first, b_second),
        a_sessions.len(),
    ))
}

/// Starts a mode, warms it up on `sessions`, measures `events` at
/// saturation, stops it.
async fn run_mode(
    bench: &Bench,
    mode: Mode,
    sessions: &[Session],
    events: &[Session],
) -> Result<ModeResult, BenchError> {
    let driver = Driver::start(mode, bench).await?;
    bench.warm_up(&driver, sessions).await?;
    let result = bench.measure(&driver, events, 0.0).await;
    driver.stop().await?;
    result
}

/// Latency at half of `peak`'s event rate, for `seconds`, on the first
/// events `workload` makes.
async fn at_half_peak(
    bench: &Bench,
    driver: &Driver,
    peak: &ModeResult,
    seconds: f64,
    workload: impl Fn(usize) -> Vec<Session>,
) -> Result<LatencyResult, BenchError> {
    let rate = peak.events_per_sec / 2.0;
    let events = ((rate * seconds) as usize).max(SESSIONS_PER_SIZE);
    let paced = bench.measure(driver, &workload(events), rate).await?;
    Ok(LatencyResult {
        group_size: peak.group_size,
        peak_events_per_sec: peak.events_per_sec.round(),
        events_per_sec: rate.round(),
        deliveries: paced.deliveries,
        p50_ms: paced.p50_ms,
        p99_ms: paced.p99_ms,
    })
}

/// Every mode on the traffic mix, at saturation, then the batch mode at
/// half of its peak.
async fn run_mix(
    bench: &mut Bench,
    spec: &MixSpec,
    deliveries: u64,
    latency_seconds: f64,
) -> Result<mix::MixResult, BenchError> {
    let bands = bench.mix_sessions(spec).await?;
    let all: Vec<Session> = bands.iter().flatten().cloned().collect();
    let probe = mix::sequence(spec, &bands, 10_000);
    let mean = mix::mean_size(&probe);
    let count = |budget: u64| ((budget as f64 / mean) as usize).max(100);
    let full = mix::sequence(spec, &bands, count(deliveries));
    let serial_events = &full[..count(deliveries / 10).min(full.len())];
    let serial = run_mode(bench, Mode::Serial, &all, serial_events).await?;
    let floor_js = run_mode(bench, Mode::FloorJs, &all, &full).await?;
    let floor = run_mode(bench, Mode::Floor, &all, &full).await?;
    let driver = Driver::start(Mode::Batch, bench).await?;
    bench.warm_up(&driver, &all).await?;
    let batch = bench.measure(&driver, &full, 0.0).await?;
    let latency = at_half_peak(bench, &driver, &batch, latency_seconds, |n| {
        mix::sequence(spec, &bands, n)
    })
    .await?;
    driver.stop().await?;
    Ok(mix::MixResult {
        spec: spec.to_string(),
        mean_group_size: round(mean, 1),
        batch_vs_serial: round(batch.events_per_sec / serial.events_per_sec.max(1e-9), 2),
        batch_vs_floor: round(batch.events_per_sec / floor.events_per_sec.max(1e-9), 2),
        serial,
        batch,
        floor_js,
        floor,
        latency_at_half_peak: latency,
    })
}

fn write_sweep(dir: &std::path::Path, points: &[plot::SweepPoint]) -> Result<(), BenchError> {
    let write_err = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |cause| BenchError::Write { path, cause }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let json = dir.join("bench-sweep.json");
    let text = serde_json::json!({
        "machine": machine(),
        "sizes": SWEEP_SIZES,
        "batch_cost_max_over_min": plot::flatness(points).map(|f| round(f, 2)),
        "points": points,
    });
    std::fs::write(
        &json,
        serde_json::to_string_pretty(&text).expect("sweep serializes") + "\n",
    )
    .map_err(write_err(&json))?;
    plot::draw(points, &dir.join("bench-sweep.svg"))
}
