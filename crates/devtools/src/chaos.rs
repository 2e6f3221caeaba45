//! `resonance-task chaos`: a fault-injection run that proves the delivery
//! guarantees with numbers.
//!
//! It starts private nats-server, etcd and (persistent) redis-server, a
//! PostgreSQL database reached through a fault proxy, three reference
//! gateways and two task pods as separate processes of this binary, then
//! publishes a steady workload while, in turn, it SIGKILLs a pod (and starts
//! a new one), restarts NATS, Redis and etcd, cuts SQL, restarts one gateway
//! and stalls another, and, while a stalled gateway keeps a backlog in the
//! pods, SIGTERMs every pod in turn as a rolling deploy does; poison and
//! oversize payloads are mixed in. Pods and gateways run on the shipped
//! defaults: the configuration names only where the servers are. At the
//! end it audits the work queue (empty, nothing pending or unacked) and
//! compares what the gateways received with what was expected and what the
//! dead-letter stream holds: every event delivered to every online member
//! or dead-lettered with a reason.
//!
//! With `cluster` the engines are clustered (3 NATS nodes with R3 streams,
//! a Redis Cluster of 3 masters and 3 replicas, 3 etcd members) and, in
//! place of the single servers' restarts, the run SIGKILLs the NATS node
//! leading the input stream, a Redis master and the etcd leader (each
//! started again a fault gap later, to rejoin); the other faults are the
//! same.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sqlx::{AssertSqlSafe, Connection, Executor};

use super::publish::Pacer;
use super::seed::{SeedPlan, SessionMix, seed};
use super::workload::{Expectation, StatsClient, WorkloadError, load_sessions};
use resonance_task::config::{Config, SecretUrl};
use resonance_task::consumer::dlq;
use resonance_task::lifecycle::Lifecycle;
use resonance_task::registry::GatewayRegistry;
use resonance_task::retry::Backoff;
use resonance_task::store::{MemberStore, RedisClient, RouteStore, connect_database, migrate};
use resonance_testkit::cluster::NatsCluster;
use resonance_testkit::engines::{Clusters, Engines, SingleServers};
use resonance_testkit::fault_proxy::{FaultProxy, ProxyMode};
use resonance_testkit::servers::{self, LocalServer, StackError, free_port};

#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// This project's binary, started as pods and gateways.
    pub binary: PathBuf,
    pub events: usize,
    /// Events per second.
    pub rate: f64,
    pub users: usize,
    pub sessions: SessionMix,
    /// A PostgreSQL URL allowed to create and drop a database.
    pub postgres_admin_url: String,
    /// Pause before each fault.
    pub fault_gap: Duration,
    pub sql_cut: Duration,
    pub gateway_stall: Duration,
    /// One poison payload per this many events.
    pub poison_every: usize,
    pub settle_timeout: Duration,
    pub rng_seed: u64,
    /// Clustered engines, their nodes killed in turn.
    pub cluster: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub events: usize,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    /// Duplicates as a share of delivered, in percent.
    pub duplicate_pct: f64,
    pub unexpected: u64,
    /// Letters in the dead-letter stream.
    pub dead_lettered: usize,
    pub poison_injected: u64,
    /// Distinct injected poison payloads found among the dead letters.
    pub poison_dead_lettered: usize,
    /// Dead letters holding a valid workload event (should be none).
    pub valid_dead_lettered: usize,
    /// Published events (valid or poison) neither delivered to every
    /// online member nor in the dead letters.
    pub stranded: u64,
    /// Messages left in the work-queue stream at the end.
    pub stream_left: u64,
    /// The durable consumer's num_pending and num_ack_pending at the end.
    pub consumer_pending: u64,
    pub consumer_ack_pending: u64,
    /// Pods stopped with SIGTERM (and replaced) while a backlog waited.
    pub rolling_restarts: usize,
    /// Duplicates the gateways had seen when the rolling restarts began
    /// (what the other faults caused).
    pub duplicates_before_rolling_restarts: u64,
    pub faults_injected: usize,
    pub faults: Vec<String>,
    /// Nodes of clustered engines killed (0 on single servers).
    pub node_kills: usize,
    pub elapsed_s: f64,
}

impl ChaosReport {
    /// Lost and stranded nothing, the work queue is empty, and every
    /// poison payload, and no valid event, was dead-lettered.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.stranded == 0
            && self.stream_left == 0
            && self.consumer_pending == 0
            && self.consumer_ack_pending == 0
            && self.poison_dead_lettered as u64 == self.poison_injected
            && self.valid_dead_lettered == 0
    }

    pub fn to_text(&self) -> String {
        let mut out = format!(
            "events published      {}\nexpected deliveries   {}\ndelivered             {}\nlost                  {}\nduplicates            {} ({:.4}%)\nunexpected            {}\ndead-lettered         {} ({} of {} poison payloads, {} valid events)\nstranded              {}\naudit                 stream holds {}, consumer pending {}, unacked {}\nrolling restarts      {} (duplicates before them: {})\nfaults injected       {} ({} node kills)\nwall time             {:.1} s\n",
            self.events,
            self.expected,
            self.delivered,
            self.lost,
            self.duplicates,
            self.duplicate_pct,
            self.unexpected,
            self.dead_lettered,
            self.poison_dead_lettered,
            self.poison_injected,
            self.valid_dead_lettered,
            self.stranded,
            self.stream_left,
            self.consumer_pending,
            self.consumer_ack_pending,
            self.rolling_restarts,
            self.duplicates_before_rolling_restarts,
            self.faults_injected,
            self.node_kills,
            self.elapsed_s
        );
        for f in &self.faults {
            out.push_str(&format!("  fault: {f}\n"));
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error(transparent)]
    Stack(#[from] StackError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error("PostgreSQL at {url}: {cause}")]
    Postgres { url: String, cause: sqlx::Error },
    #[error("{0}")]
    Setup(String),
}

fn setup(what: impl std::fmt::Display) -> ChaosError {
    ChaosError::Setup(what.to_string())
}

/// A database created for the run and dropped after it.
struct ScratchDatabase {
    admin_url: String,
    name: String,
}

impl ScratchDatabase {
    async fn create(admin_url: &str) -> Result<Self, ChaosError> {
        let name = format!("chaos_{}_{}", std::process::id(), rand::random::<u32>());
        admin(admin_url, &format!("CREATE DATABASE {name}")).await?;
        Ok(Self {
            admin_url: admin_url.to_string(),
            name,
        })
    }

    /// The database's URL, optionally through another port.
    fn url(&self, port: Option<u16>) -> String {
        let (scheme, rest) = self.admin_url.split_once("://").unwrap_or(("postgres", ""));
        let authority = rest.split('/').next().unwrap_or("");
        let authority = match port {
            Some(p) => {
                let host_start = authority.rfind('@').map_or(0, |i| i + 1);
                format!("{}127.0.0.1:{p}", &authority[..host_start])
            }
            None => authority.to_string(),
        };
        format!("{scheme}://{authority}/{}", self.name)
    }

    async fn drop_it(self) {
        if let Err(e) = admin(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        )
        .await
        {
            tracing::warn!(error = %e, database = %self.name, "could not drop the scratch database");
        }
    }
}

async fn admin(url: &str, sql: &str) -> Result<(), ChaosError> {
    sqlx::any::install_default_drivers();
    let err = |cause| ChaosError::Postgres {
        url: url.to_string(),
        cause,
    };
    let mut conn = sqlx::AnyConnection::connect(url).await.map_err(err)?;
    conn.execute(AssertSqlSafe(sql.to_string()))
        .await
        .map_err(err)?;
    Ok(())
}

/// Environment that points a pod or gateway process at the run's servers:
/// where they are, and nothing else (every other setting is the shipped
/// default; the admin port is left to the OS so several pods share a
/// machine).
pub(crate) fn env_for(config: &Config) -> Vec<(String, String)> {
    let c = config;
    let redis = if c.redis.cluster_addrs.is_empty() {
        ("REDIS__ADDR", c.redis.addr.clone())
    } else {
        ("REDIS__CLUSTER_ADDRS", c.redis.cluster_addrs.join(","))
    };
    let mut env = vec![
        ("NATS__URL", c.nats.url.expose().to_string()),
        ("ETCD__ENDPOINTS", c.etcd.endpoints.join(",")),
        redis,
        ("DATABASE__URL", c.database.url.expose().to_string()),
        ("LOG__LEVEL", "info".into()),
        ("ADMIN__LISTEN", "127.0.0.1:0".into()),
    ];
    if c.consumer.stream_replicas != 1 {
        // How the streams are replicated is part of where they are.
        env.push((
            "CONSUMER__STREAM_REPLICAS",
            c.consumer.stream_replicas.to_string(),
        ));
    }
    env.into_iter()
        .map(|(k, v)| (format!("{}{k}", resonance_task::config::ENV_PREFIX), v))
        .collect()
}

struct Gateway {
    id: String,
    journal: PathBuf,
    grpc: u16,
    http: u16,
    users: std::ops::Range<usize>,
    /// Serves batch-v1; the others act like upstream gateways.
    batch: bool,
}

impl Gateway {
    async fn start(
        &self,
        opts: &ChaosOptions,
        env: &[(String, String)],
    ) -> Result<LocalServer, ChaosError> {
        let mut args: Vec<String> = vec![
            "gateway".into(),
            "--id".into(),
            self.id.clone(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.grpc),
            "--http".into(),
            format!("127.0.0.1:{}", self.http),
            "--users".into(),
            format!("{}..{}", self.users.start, self.users.end),
            "--journal".into(),
            self.journal.display().to_string(),
        ];
        if !self.batch {
            args.push("--no-batch".into());
        }
        Ok(LocalServer::process(
            "gateway",
            opts.binary.display().to_string(),
            args,
            env.to_vec(),
            self.http,
        )
        .await?)
    }
}

async fn start_pod(
    opts: &ChaosOptions,
    env: &[(String, String)],
    n: usize,
) -> Result<LocalServer, ChaosError> {
    let mut env = env.to_vec();
    env.push((
        format!("{}SERVICE__NAME", resonance_task::config::ENV_PREFIX),
        format!("chaos-pod-{n}"),
    ));
    Ok(LocalServer::process(
        "pod",
        opts.binary.display().to_string(),
        vec!["run".into()],
        env,
        0,
    )
    .await?)
}

/// Publishes through JetStream with a msg-id header, retrying until the
/// stream confirms, so the run knows exactly what entered the stream even
/// while NATS restarts.
async fn publish_confirmed(js: &jetstream::Context, subject: &str, id: &str, payload: Vec<u8>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        let sent = js
            .publish_with_headers(subject.to_string(), headers, payload.clone().into())
            .await;
        let confirmed = match sent {
            Ok(ack) => tokio::time::timeout(Duration::from_secs(5), ack)
                .await
                .is_ok_and(|r| r.is_ok()),
            Err(_) => false,
        };
        if confirmed {
            return;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// The `n`-th payload that can never be a valid event; each is distinct,
/// so the dead-letter stream can be checked for every one.
fn poison(rng: &mut StdRng, n: u64) -> Vec<u8> {
    let mut bytes = match n % 3 {
        // Undecodable bytes.
        0 => (0..64).map(|_| rng.random::<u8>() | 0x80).collect(),
        // Decodes, but names no session.
        1 => {
            return resonance_task::proto::PushEvent {
                msg_id: 1,
                seq_id: n as i64,
                ..Default::default()
            }
            .encode_to_vec();
        }
        // Oversize and undecodable.
        _ => vec![0xff; 600 * 1024],
    };
    bytes.extend(n.to_le_bytes());
    bytes
}

fn fingerprint(payload: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    payload.hash(&mut h);
    h.finish()
}

pub async fn run(opts: ChaosOptions) -> Result<ChaosReport, ChaosError> {
    let started = tokio::time::Instant::now();
    let engines = Engines::start(opts.cluster, true).await?;
    let database = ScratchDatabase::create(&opts.postgres_admin_url).await?;
    let pg_port = url_port(&opts.postgres_admin_url).unwrap_or(5432);
    let sql_proxy = FaultProxy::start(([127, 0, 0, 1], pg_port).into())
        .await
        .map_err(setup)?;
    let servers = Servers { engines, sql_proxy };
    let result = run_with(&opts, servers, &database, started).await;
    database.drop_it().await;
    result
}

fn url_port(url: &str) -> Option<u16> {
    let authority = url.split_once("://")?.1.split('/').next()?;
    let host = authority.rsplit('@').next()?;
    host.rsplit_once(':')?.1.parse().ok()
}

/// The private servers a run breaks.
struct Servers {
    engines: Engines,
    /// Between the pods and PostgreSQL.
    sql_proxy: FaultProxy,
}

impl Servers {
    /// The shipped defaults, pointed at these servers (SQL through the
    /// proxy); clustered engines replicate every stream three times.
    fn config(&self, database: &ScratchDatabase) -> Config {
        let mut config = Config::default();
        self.engines.wire(&mut config);
        config.database.url = SecretUrl::new(database.url(Some(self.sql_proxy.addr.port())));
        config
    }

    /// Breaks NATS, Redis and etcd in turn, `gap` apart: single servers
    /// are restarted; of clusters, the stream's leader node, a Redis master
    /// and the etcd leader are killed and started again a gap later.
    /// Returns the node kills.
    async fn break_engines(
        &mut self,
        gap: Duration,
        client: &async_nats::Client,
        config: &Config,
        fault: &mut impl FnMut(String),
    ) -> Result<usize, ChaosError> {
        match &mut self.engines {
            Engines::Single(single) => {
                let SingleServers { nats, etcd, redis } = single.as_mut();
                fault("restart NATS (SIGKILL)".into());
                nats.kill();
                nats.start().await?;
                tokio::time::sleep(gap).await;
                fault("restart Redis (SIGTERM)".into());
                redis.stop().await;
                redis.start().await?;
                tokio::time::sleep(gap).await;
                fault("restart etcd (SIGKILL)".into());
                etcd.kill();
                etcd.start().await?;
                Ok(0)
            }
            Engines::Cluster(clusters) => {
                let Clusters { nats, etcd, redis } = clusters.as_mut();
                let (leader, _) = nats
                    .stream_peers(client, &config.consumer.stream)
                    .await
                    .ok_or_else(|| setup("the input stream has no leader"))?;
                fault(format!(
                    "SIGKILL NATS node {} (leads {})",
                    NatsCluster::name(leader),
                    config.consumer.stream
                ));
                nats.nodes[leader].kill();
                tokio::time::sleep(gap).await;
                nats.nodes[leader].start().await?;
                tokio::time::sleep(gap).await;
                let master = redis.master_of("resonance:router:user:user-000000").await?;
                fault(format!(
                    "SIGKILL Redis master :{} (its replica takes over)",
                    redis.nodes[master].port
                ));
                redis.nodes[master].kill();
                // Back only once replaced: a master that returns before
                // its replica took over keeps its slots.
                redis.wait_replaced(master).await?;
                tokio::time::sleep(gap).await;
                redis.nodes[master].start().await?;
                tokio::time::sleep(gap).await;
                let leader = etcd
                    .leader()
                    .await
                    .ok_or_else(|| setup("etcd has no leader"))?;
                fault(format!("SIGKILL etcd leader e{}", leader + 1));
                etcd.members[leader].kill();
                tokio::time::sleep(gap).await;
                etcd.members[leader].start().await?;
                Ok(3)
            }
        }
    }
}

/// The processes of a run, started from this binary: three reference
/// gateways (two batch-v1, one upstream-style) and the pods.
struct Fleet {
    env: Vec<(String, String)>,
    gateways: Vec<Gateway>,
    gateway_processes: Vec<LocalServer>,
    pods: Vec<LocalServer>,
    _journals: tempfile::TempDir,
}

impl Fleet {
    /// Starts the gateways, waits until all are registered, then starts
    /// two pods.
    async fn start(opts: &ChaosOptions, config: &Config) -> Result<Self, ChaosError> {
        let env = env_for(config);
        let share = opts.users * 3 / 10;
        let journals = tempfile::tempdir().map_err(setup)?;
        let gateways: Vec<Gateway> = (0..3)
            .map(|i| Gateway {
                id: format!("gateway-{:03}", i + 1),
                journal: journals.path().join(format!("gateway-{:03}.ledger", i + 1)),
                grpc: free_port(),
                http: free_port(),
                users: i * share..(i + 1) * share,
                // Both push protocols face the faults.
                batch: i != 2,
            })
            .collect();
        let mut gateway_processes = Vec::new();
        for g in &gateways {
            gateway_processes.push(g.start(opts, &env).await?);
        }
        let watch = Lifecycle::new();
        let registry = GatewayRegistry::spawn(
            &config.etcd,
            &config.registry,
            &config.gateway_service_name,
            &watch,
        );
        let all_registered =
            tokio::time::timeout(Duration::from_secs(60), registry.wait_for(|m| m.len() == 3))
                .await;
        // The watch was only needed to see the gateways registered.
        watch.stop.cancel();
        all_registered.map_err(|_| setup("gateways did not register within 60 s"))?;
        let pods = vec![
            start_pod(opts, &env, 1).await?,
            start_pod(opts, &env, 2).await?,
        ];
        Ok(Self {
            env,
            gateways,
            gateway_processes,
            pods,
            _journals: journals,
        })
    }

    fn stats(&self) -> StatsClient {
        StatsClient::new(
            self.gateways
                .iter()
                .map(|g| format!("http://127.0.0.1:{}/stats", g.http))
                .collect(),
        )
    }

    fn gateway_ids(&self) -> HashSet<String> {
        self.gateways.iter().map(|g| g.id.clone()).collect()
    }

    async fn stop(&mut self) {
        for pod in &mut self.pods {
            pod.stop().await;
        }
        for g in &mut self.gateway_processes {
            g.stop().await;
        }
    }
}

/// What the publisher has sent so far.
#[derive(Default)]
struct Sent {
    events: AtomicU64,
    poison: AtomicU64,
    /// Fingerprints of the poison payloads.
    poison_payloads: std::sync::Mutex<HashSet<u64>>,
}

/// Publishes `events` at `opts.rate`, a poison payload after every
/// `opts.poison_every` of them, each confirmed by the stream.
fn spawn_publisher(
    opts: &ChaosOptions,
    js: jetstream::Context,
    subject: String,
    events: Vec<resonance_task::proto::PushEvent>,
    sent: Arc<Sent>,
) -> tokio::task::JoinHandle<()> {
    let (rate, every, seed) = (opts.rate, opts.poison_every.max(1), opts.rng_seed);
    tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let mut pacer = Pacer::new(rate);
        for (i, e) in events.into_iter().enumerate() {
            pacer.tick().await;
            publish_confirmed(&js, &subject, &e.msg_id.to_string(), e.encode_to_vec()).await;
            sent.events.fetch_add(1, Ordering::Relaxed);
            if i % every == every - 1 {
                let n = sent.poison.fetch_add(1, Ordering::Relaxed);
                let payload = poison(&mut rng, n);
                sent.poison_payloads
                    .lock()
                    .expect("poison set")
                    .insert(fingerprint(&payload));
                publish_confirmed(&js, &subject, &format!("poison-{seed}-{n}"), payload).await;
            }
        }
    })
}

/// Waits until a pod has bound the durable consumer.
async fn wait_for_consumer(js: &jetstream::Context, config: &Config) -> Result<(), ChaosError> {
    let bound = async {
        loop {
            if let Ok(s) = js.get_stream(&config.consumer.stream).await
                && s.get_consumer::<jetstream::consumer::pull::Config>(&config.consumer.queue_group)
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), bound)
        .await
        .map_err(|_| setup("pods did not bind the consumer within 60 s"))
}

/// Seeds the sessions straight into the database, not through the proxy.
async fn seed_sessions(
    opts: &ChaosOptions,
    config: &Config,
    database: &ScratchDatabase,
) -> Result<MemberStore, ChaosError> {
    let mut direct = config.database.clone();
    direct.url = SecretUrl::new(database.url(None));
    let (pool, dialect) = connect_database(&direct).await.map_err(setup)?;
    migrate(&pool, dialect, &direct).await.map_err(setup)?;
    let members = MemberStore::new(pool, dialect);
    let plan = SeedPlan {
        users: opts.users,
        user_prefix: "user-".into(),
        mix: opts.sessions.clone(),
        rng_seed: opts.rng_seed,
    };
    seed(&members, &plan).await.map_err(setup)?;
    Ok(members)
}

/// Breaks every dependency in turn, `opts.fault_gap` apart: a pod, NATS,
/// Redis, etcd, SQL, a gateway killed, a gateway stalled. Returns the node
/// kills of clustered engines.
async fn inject_faults(
    opts: &ChaosOptions,
    servers: &mut Servers,
    fleet: &mut Fleet,
    client: &async_nats::Client,
    config: &Config,
    fault: &mut impl FnMut(String),
) -> Result<usize, ChaosError> {
    let gap = opts.fault_gap;
    tokio::time::sleep(gap).await;
    fault("SIGKILL pod 1, start pod 3".into());
    fleet.pods[0].kill();
    fleet.pods.push(start_pod(opts, &fleet.env, 3).await?);
    tokio::time::sleep(gap).await;
    let node_kills = servers.break_engines(gap, client, config, fault).await?;
    tokio::time::sleep(gap).await;
    fault(format!("cut SQL for {:?}", opts.sql_cut));
    servers.sql_proxy.set(ProxyMode::Cut);
    tokio::time::sleep(opts.sql_cut).await;
    servers.sql_proxy.set(ProxyMode::Pass);
    tokio::time::sleep(gap).await;
    fault("restart gateway-001 (SIGKILL)".into());
    fleet.gateway_processes[0].kill();
    fleet.gateway_processes[0].start().await?;
    tokio::time::sleep(gap).await;
    fault(format!(
        "stall gateway-002 for {:?} (SIGSTOP)",
        opts.gateway_stall
    ));
    if let Some(pid) = fleet.gateway_processes[1].pid() {
        servers::signal(pid, "STOP").map_err(setup)?;
        tokio::time::sleep(opts.gateway_stall).await;
        servers::signal(pid, "CONT").map_err(setup)?;
    }
    tokio::time::sleep(gap).await;
    Ok(node_kills)
}

/// What the dead letters say about the run.
struct DeadLetterCount {
    total: usize,
    /// Distinct poison payloads found (a publish retried across the NATS
    /// restart can be stored twice).
    poison: usize,
    /// Valid events of this run among them (should be none).
    valid: usize,
    msg_ids: HashSet<i64>,
}

async fn count_dead_letters(
    js: &jetstream::Context,
    config: &Config,
    sent: &Sent,
    valid_ids: std::ops::Range<i64>,
) -> Result<DeadLetterCount, ChaosError> {
    let letters = dlq::list(js, &config.consumer).await.map_err(setup)?;
    let poison = sent.poison_payloads.lock().expect("poison set").clone();
    let found: HashSet<u64> = letters
        .iter()
        .map(|l| fingerprint(&l.payload))
        .filter(|f| poison.contains(f))
        .collect();
    Ok(DeadLetterCount {
        total: letters.len(),
        poison: found.len(),
        valid: letters
            .iter()
            .filter(|l| l.msg_id.is_some_and(|id| valid_ids.contains(&id)))
            .count(),
        msg_ids: letters.iter().filter_map(|l| l.msg_id).collect(),
    })
}

async fn run_with(
    opts: &ChaosOptions,
    mut servers: Servers,
    database: &ScratchDatabase,
    started: tokio::time::Instant,
) -> Result<ChaosReport, ChaosError> {
    let config = servers.config(database);
    let members = seed_sessions(opts, &config, database).await?;
    let mut fleet = Fleet::start(opts, &config).await?;
    let client = resonance_task::nats::connect(&config.nats, "resonance-task-chaos")
        .await
        .map_err(setup)?;
    let js = jetstream::new(client.clone());
    wait_for_consumer(&js, &config).await?;

    let redis_client = RedisClient::connect(&config.redis).await.map_err(setup)?;
    let routes = RouteStore::new(redis_client, 500, 4);
    let stats = fleet.stats();
    let sessions = load_sessions(&members, &routes, &fleet.gateway_ids()).await?;
    let mut rng = StdRng::seed_from_u64(opts.rng_seed);
    let base = super::publish::fresh_msg_id_base();
    let mut expectation = Expectation::default();
    let events: Vec<_> = (0..opts.events)
        .map(|i| expectation.draw(&mut rng, &sessions, true, base + i as i64))
        .collect();
    let sent = Arc::new(Sent::default());
    let publisher = spawn_publisher(
        opts,
        js.clone(),
        config.consumer.topic.clone(),
        events,
        sent.clone(),
    );

    let mut faults = Vec::new();
    let mut fault = |name: String| {
        tracing::warn!(fault = %name, elapsed = ?started.elapsed(), "injecting fault");
        eprintln!("chaos: t={:>5.1}s {name}", started.elapsed().as_secs_f64());
        faults.push(name);
    };
    let node_kills =
        inject_faults(opts, &mut servers, &mut fleet, &client, &config, &mut fault).await?;
    let duplicates_before_rolling_restarts = expectation.compare(&stats.fetch().await?).duplicates;
    let rolling_restarts = rolling_restart(
        opts,
        &fleet.env,
        &mut fleet.pods,
        &fleet.gateway_processes[1],
        &mut fault,
    )
    .await?;

    publisher.await.map_err(setup)?;
    let poison_injected = sent.poison.load(Ordering::Relaxed);
    eprintln!(
        "chaos: t={:>5.1}s published {} events and {poison_injected} poison payloads; waiting for deliveries",
        started.elapsed().as_secs_f64(),
        sent.events.load(Ordering::Relaxed),
    );
    let last = expectation.wait(&stats, opts.settle_timeout).await?;
    let received = expectation.compare(&last);
    let audit = audit(&js, &config, opts.settle_timeout).await?;
    let dead = count_dead_letters(&js, &config, &sent, base..base + opts.events as i64).await?;
    let stranded = expectation
        .incomplete(&last)
        .into_iter()
        .filter(|id| !dead.msg_ids.contains(id))
        .count() as u64
        + (poison_injected - dead.poison as u64);
    fleet.stop().await;
    Ok(ChaosReport {
        events: expectation.events(),
        expected: expectation.expected,
        delivered: received.delivered,
        lost: received.lost,
        duplicates: received.duplicates,
        duplicate_pct: if received.delivered == 0 {
            0.0
        } else {
            received.duplicates as f64 * 100.0 / received.delivered as f64
        },
        unexpected: received.unexpected,
        dead_lettered: dead.total,
        poison_injected,
        poison_dead_lettered: dead.poison,
        valid_dead_lettered: dead.valid,
        stranded,
        stream_left: audit.stream_left,
        consumer_pending: audit.pending,
        consumer_ack_pending: audit.ack_pending,
        rolling_restarts,
        duplicates_before_rolling_restarts,
        faults_injected: faults.len(),
        faults,
        node_kills,
        elapsed_s: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    })
}

/// The work queue at the end of a run.
struct Audit {
    stream_left: u64,
    pending: u64,
    ack_pending: u64,
}

/// Waits (up to `patience`) for the work queue to empty and the consumer
/// to have nothing pending or unacked, then reads what is left.
async fn audit(
    js: &jetstream::Context,
    config: &Config,
    patience: Duration,
) -> Result<Audit, ChaosError> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let mut stream = js
            .get_stream(&config.consumer.stream)
            .await
            .map_err(setup)?;
        let stream_left = stream.info().await.map_err(setup)?.state.messages;
        let mut consumer = stream
            .get_consumer::<jetstream::consumer::pull::Config>(&config.consumer.queue_group)
            .await
            .map_err(setup)?;
        let info = consumer.info().await.map_err(setup)?;
        let audit = Audit {
            stream_left,
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
        };
        let empty = audit.stream_left == 0 && audit.pending == 0 && audit.ack_pending == 0;
        if empty || tokio::time::Instant::now() >= deadline {
            return Ok(audit);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A rolling deploy with a backlog: for every running pod in turn,
/// `stalled` is stopped so events pile up in the pods, the pod is
/// SIGTERMed, the gateway resumes, and the pod is waited for (it hands its
/// backlog back) and replaced. Returns how many were restarted.
async fn rolling_restart(
    opts: &ChaosOptions,
    env: &[(String, String)],
    pods: &mut Vec<LocalServer>,
    stalled: &LocalServer,
    fault: &mut impl FnMut(String),
) -> Result<usize, ChaosError> {
    // A pod exits within its grace period plus the hand-back allowances.
    let exit_within = Config::default().consumer.shutdown_grace + Duration::from_secs(30);
    let gateway = stalled
        .pid()
        .ok_or_else(|| setup("gateway-002 is not running"))?;
    let mut restarted = 0;
    let running: Vec<usize> = (0..pods.len())
        .filter(|&i| pods[i].pid().is_some())
        .collect();
    for i in running {
        let pod = pods[i].pid().expect("running");
        servers::signal(gateway, "STOP").map_err(setup)?;
        tokio::time::sleep(opts.gateway_stall).await;
        fault(format!(
            "rolling restart: SIGTERM pod {} while gateway-002 stalls, start a new one",
            i + 1
        ));
        servers::signal(pod, "TERM").map_err(setup)?;
        servers::signal(gateway, "CONT").map_err(setup)?;
        if !pods[i].stop_within(exit_within).await {
            return Err(setup(format!(
                "pod {} did not exit within {exit_within:?} of SIGTERM",
                i + 1
            )));
        }
        let n = pods.len() + 1;
        pods.push(start_pod(opts, env, n).await?);
        restarted += 1;
    }
    Ok(restarted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_database_urls() {
        let db = ScratchDatabase {
            admin_url: "postgres://postgres@127.0.0.1:5432/test".into(),
            name: "chaos_1".into(),
        };
        assert_eq!(db.url(None), "postgres://postgres@127.0.0.1:5432/chaos_1");
        assert_eq!(
            db.url(Some(7000)),
            "postgres://postgres@127.0.0.1:7000/chaos_1"
        );
        assert_eq!(url_port("postgres://u:p@db:6543/x"), Some(6543));
        assert_eq!(url_port("postgres://db/x"), None);
    }
}
