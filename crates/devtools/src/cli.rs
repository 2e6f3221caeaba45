//! The developer commands of `resonance-task`: a reference gateway, dev
//! certificates, seeding, publishing, a workload, the chaos run and the
//! benchmark. The command line crate adds them behind its `devtools`
//! feature; production images leave them out.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use resonance_reference_gateway::cli::GatewayArgs;
use resonance_task::config::Config;
use resonance_task::nats::connect as connect_nats;
use resonance_task::store::{MemberStore, RedisClient, RouteStore, connect_database, migrate};

use crate::publish::{EventTemplate, fresh_msg_id_base, publish};
use crate::seed::{SeedPlan, SessionMix, seed};
use crate::workload::{self, WorkloadOptions};
use crate::{bench, chaos};

#[derive(Subcommand)]
pub enum DevCommand {
    /// Run a reference gateway holding simulated users.
    #[command(
        after_help = "Example:\n  resonance-task gateway --id gateway-001 --listen 127.0.0.1:9091 --http 127.0.0.1:9191 --users 0..500"
    )]
    Gateway(GatewayArgs),
    /// Write a development CA, a server certificate and a client
    /// certificate (for localhost and 127.0.0.1) as PEM files.
    #[command(
        after_help = "Example:\n  resonance-task certs --dir tls\n  resonance-task gateway --id gateway-001 --tls-cert tls/server.pem --tls-key tls/server.key --client-ca tls/ca.pem\n  RESONANCE_TASK__GATEWAY__TLS__CA_FILE=tls/ca.pem RESONANCE_TASK__GATEWAY__TLS__CERT_FILE=tls/client.pem RESONANCE_TASK__GATEWAY__TLS__KEY_FILE=tls/client.key resonance-task run"
    )]
    Certs {
        /// Directory the files are written to (created if missing)
        #[arg(long)]
        dir: PathBuf,
    },
    /// Create sessions with members drawn from simulated users.
    #[command(
        after_help = "Example:\n  resonance-task seed --users 1200 --sessions 2x200,100x20,1000x2"
    )]
    Seed(SeedArgs),
    /// Publish push events as the logic service does (core NATS).
    #[command(
        after_help = "Example:\n  resonance-task publish --session s-2-0000 --from user-000001 --content hi --count 10 --rate 5"
    )]
    Publish(PublishArgs),
    /// Fault-injection run: workload through pods and gateways while every
    /// dependency fails in turn; reports lost, duplicates, dead letters.
    #[command(
        after_help = "Examples:\n  resonance-task chaos --json\n  resonance-task chaos --cluster --json\n\nNeeds nats-server, etcd, redis-server and a PostgreSQL it may create a database in."
    )]
    Chaos(ChaosArgs),
    /// Publish a sample load to seeded sessions and report what arrived.
    #[command(
        after_help = "Example:\n  resonance-task workload --events 2000 --stats http://127.0.0.1:9191/stats --json"
    )]
    Workload(WorkloadArgs),
    /// Measure fan-out throughput and latency: the upstream serial
    /// algorithm, per-user streams, batch-v1 and the I/O floor, side by side
    /// on private servers.
    #[command(
        after_help = "Example:\n  resonance-task bench --json\n  resonance-task bench --sweep --mix --json\n  resonance-task bench --mix 2x90,3-20x10 --modes batch\n  resonance-task bench --sweep --mix --compare docs/bench-baseline.json\n  resonance-task bench --cluster --modes batch --json\n\nNeeds nats-server, etcd and redis-server. Build with --release for meaningful figures."
    )]
    Bench(BenchArgs),
}

impl DevCommand {
    /// The benchmark runs pods in this process: their info lines would
    /// bury its table, so it prints warnings only unless told otherwise
    /// (spans stay enabled at the configured level, so the pods pay for
    /// them what a pod does).
    pub fn quiet_logs(&self) -> bool {
        matches!(self, Self::Bench(_))
    }

    pub async fn run(
        self,
        config: Config,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        match self {
            Self::Gateway(args) => {
                resonance_reference_gateway::cli::run(args, config, shutdown).await?
            }
            Self::Certs { dir } => {
                let pki = resonance_testkit::certs::DevPki::create(&dir)?;
                println!(
                    "wrote ca.pem, server.pem, server.key, client.pem, client.key to {}",
                    pki.dir.display()
                );
            }
            Self::Seed(args) => run_seed(args, config).await?,
            Self::Publish(args) => run_publish(args, config).await?,
            Self::Bench(args) => run_bench(args, config).await?,
            Self::Chaos(args) => run_chaos(args).await?,
            Self::Workload(args) => run_workload(args, config).await?,
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct BenchArgs {
    /// Modes to measure (comma-separated)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "serial,stream,batch,floor-js,floor"
    )]
    modes: Vec<bench::Mode>,
    /// Members per session in the throughput run
    #[arg(long, default_value_t = 1000)]
    group_size: usize,
    #[arg(long, default_value_t = 4)]
    gateways: usize,
    /// Deliveries per mode (serial makes a tenth)
    #[arg(long, default_value_t = 1_000_000)]
    deliveries: u64,
    /// Sessions the throughput run's events (and those of --tls and
    /// --cluster) go round-robin over (default: as many as the users make
    /// up, 8 to 256); many more than a pod keeps warm measure traffic
    /// spread over many conversations
    #[arg(long)]
    sessions: Option<usize>,
    /// Members per session in the latency run (at half of batch peak)
    #[arg(long, default_value_t = 100)]
    latency_group_size: usize,
    /// Seconds the latency run publishes
    #[arg(long, default_value_t = 5.0)]
    latency_seconds: f64,
    /// Also measure group sizes 2..100,000 (serial, batch, floor-js and
    /// floor) and write bench-sweep.json and bench-sweep.svg into
    /// --sweep-dir
    #[arg(long)]
    sweep: bool,
    #[arg(long, default_value = "docs")]
    sweep_dir: PathBuf,
    /// Also measure serial, batch, floor-js and floor on a traffic mix of
    /// session sizes, SIZExWEIGHT,... (SIZE a count or a range); without a
    /// value, the default mix (an assumption about IM traffic)
    #[arg(long, value_name = "MIX", num_args = 0..=1, default_missing_value = bench::DEFAULT_MIX)]
    mix: Option<bench::MixSpec>,
    /// Compare the report's ratios with a saved baseline; exit non-zero
    /// when one is more than 20% below it
    #[arg(long, value_name = "FILE")]
    compare: Option<PathBuf>,
    /// Save the report's ratios as a baseline (for --compare)
    #[arg(long, value_name = "FILE")]
    save_baseline: Option<PathBuf>,
    /// Also fan out 30 events of 100,000 members through a pod process
    /// while one gateway answers slowly, and report the pod's peak memory
    #[arg(long)]
    storm: bool,
    /// Also measure high-priority latency while normal large-group events
    /// are offered above the batch peak, with priority lanes on and off
    #[arg(long)]
    priority: bool,
    /// Also measure the batch mode with mutual TLS to every gateway, beside
    /// plaintext
    #[arg(long)]
    tls: bool,
    /// Also measure the batch mode on clustered engines (3 NATS nodes with
    /// R3 streams, a Redis Cluster of 3 masters and 3 replicas, 3 etcd
    /// members) beside single servers: `cluster_vs_single`
    #[arg(long)]
    cluster: bool,
    /// No progress bar on stderr
    #[arg(long)]
    no_progress: bool,
    /// Print the report as one JSON object on the last line
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ChaosArgs {
    #[arg(long, default_value_t = 4000)]
    events: usize,
    /// Events per second
    #[arg(long, default_value_t = 80.0)]
    rate: f64,
    #[arg(long, default_value_t = 3000)]
    users: usize,
    /// Sessions as SIZExCOUNT
    #[arg(long, default_value = "2x200,20x100,100x40,500x10")]
    sessions: SessionMix,
    /// PostgreSQL where a scratch database may be created
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    postgres: String,
    /// Seconds between faults
    #[arg(long, default_value_t = 4.0)]
    fault_gap: f64,
    /// Seconds SQL stays cut
    #[arg(long, default_value_t = 10.0)]
    sql_cut: f64,
    /// Seconds a gateway stays stalled
    #[arg(long, default_value_t = 5.0)]
    stall: f64,
    /// One poison payload per this many events
    #[arg(long, default_value_t = 50)]
    poison_every: usize,
    /// Seconds without progress before giving up waiting
    #[arg(long, default_value_t = 90)]
    settle_timeout: u64,
    #[arg(long, default_value_t = 11)]
    rng_seed: u64,
    /// Print the report as one JSON object on the last line
    #[arg(long)]
    json: bool,
    /// Clustered engines (3 NATS nodes with R3 streams, a Redis Cluster of
    /// 3 masters and 3 replicas, 3 etcd members); a node of each is killed
    #[arg(long)]
    cluster: bool,
}

#[derive(Args)]
pub struct SeedArgs {
    /// Size of the simulated user pool
    #[arg(long, default_value_t = 1200)]
    users: usize,
    #[arg(long, default_value = "user-")]
    user_prefix: String,
    /// Sessions as SIZExCOUNT, comma separated
    #[arg(long, default_value = "2x200,10x50,100x20,1000x3,3000x1")]
    sessions: SessionMix,
    #[arg(long, default_value_t = 42)]
    rng_seed: u64,
}

#[derive(Args)]
pub struct PublishArgs {
    #[arg(long)]
    session: String,
    #[arg(long)]
    from: String,
    /// Set for one-to-one sessions
    #[arg(long, default_value = "")]
    to: String,
    #[arg(long, default_value = "hello")]
    content: String,
    #[arg(long = "type", default_value = "text")]
    kind: String,
    /// 1 = single, 2 = group
    #[arg(long, default_value_t = 2)]
    session_type: i32,
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Events per second (0 = unpaced)
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// First msg_id [default: derived from the clock]
    #[arg(long)]
    msg_id: Option<i64>,
}

#[derive(Args)]
pub struct WorkloadArgs {
    #[arg(long, default_value_t = 2000)]
    events: usize,
    /// Events per second (0 = unpaced)
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Reference gateways' stats URLs (repeat or comma-separate)
    #[arg(long = "stats", value_delimiter = ',', required = true)]
    stats: Vec<String>,
    #[arg(long, default_value_t = 7)]
    rng_seed: u64,
    /// Seconds without progress before giving up
    #[arg(long, default_value_t = 30)]
    settle_timeout: u64,
    /// Print the report as one JSON object on the last line
    #[arg(long)]
    json: bool,
}

async fn member_store(config: &Config) -> Result<MemberStore> {
    let (pool, dialect) = connect_database(&config.database).await?;
    migrate(&pool, dialect, &config.database).await?;
    Ok(MemberStore::new(pool, dialect))
}

/// `seed`: sessions and members drawn from simulated users.
async fn run_seed(args: SeedArgs, config: Config) -> Result<()> {
    let store = member_store(&config).await?;
    let plan = SeedPlan {
        users: args.users,
        user_prefix: args.user_prefix,
        mix: args.sessions,
        rng_seed: args.rng_seed,
    };
    let summary = seed(&store, &plan).await?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// `publish`: events as the logic service sends them.
async fn run_publish(args: PublishArgs, config: Config) -> Result<()> {
    let nats = connect_nats(&config.nats, "resonance-task-publish").await?;
    let template = EventTemplate {
        session_id: args.session,
        session_type: args.session_type,
        from_username: args.from,
        to_username: args.to,
        content: args.content,
        kind: args.kind,
    };
    let first = args.msg_id.unwrap_or_else(fresh_msg_id_base);
    let ids = publish(
        &nats,
        &config.consumer.topic,
        &template,
        first,
        args.count,
        args.rate,
    )
    .await
    .map_err(|e| anyhow::anyhow!("publishing to {}: {e}", config.consumer.topic))?;
    println!(
        "published {} events, msg_id {}..={}",
        ids.len(),
        first,
        first + ids.len() as i64 - 1
    );
    Ok(())
}

/// `bench`: the report as a table, and as JSON when asked; then the
/// comparison with a baseline, when asked, which fails on a regression.
async fn run_bench(args: BenchArgs, config: Config) -> Result<()> {
    // Read before the run, so a wrong path fails in a second, not after it.
    let baseline = match &args.compare {
        Some(path) => Some(bench::baseline::Baseline::load(path).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let report = bench::run(bench::BenchOptions {
        modes: args.modes,
        group_size: args.group_size,
        gateways: args.gateways,
        deliveries: args.deliveries,
        sessions: args.sessions,
        latency_group_size: args.latency_group_size,
        latency_seconds: args.latency_seconds,
        sweep: args.sweep.then_some(args.sweep_dir),
        mix: args.mix,
        storm: args.storm,
        priority: args.priority,
        tls: args.tls,
        cluster: args.cluster,
        progress: !args.no_progress && std::io::stderr().is_terminal(),
        tuning: config,
    })
    .await
    .context("bench failed")?;
    print!("{}", report.to_text());
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    if let Some(path) = &args.save_baseline {
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        bench::baseline::Baseline::of(&report, command)
            .save(path)
            .map_err(anyhow::Error::msg)?;
    }
    if let Some(baseline) = baseline {
        let comparison = bench::baseline::compare(&baseline, &report);
        eprint!("{}", comparison.to_text());
        let regressed = comparison.regressed();
        if !regressed.is_empty() {
            anyhow::bail!(
                "{} ratio(s) more than 20% below the baseline: {}",
                regressed.len(),
                regressed
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(())
}

/// `chaos`: on the shipped defaults (no configuration is read); fails when
/// anything was lost, stranded or wrongly dead-lettered.
async fn run_chaos(args: ChaosArgs) -> Result<()> {
    let opts = chaos::ChaosOptions {
        binary: std::env::current_exe().context("locating this binary")?,
        events: args.events,
        rate: args.rate,
        users: args.users,
        sessions: args.sessions,
        postgres_admin_url: args.postgres,
        fault_gap: Duration::from_secs_f64(args.fault_gap),
        sql_cut: Duration::from_secs_f64(args.sql_cut),
        gateway_stall: Duration::from_secs_f64(args.stall),
        poison_every: args.poison_every,
        settle_timeout: Duration::from_secs(args.settle_timeout),
        rng_seed: args.rng_seed,
        cluster: args.cluster,
    };
    let report = chaos::run(opts).await?;
    print!("{}", report.to_text());
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    if !report.passed() {
        bail!(
            "chaos run failed: {} lost, {} stranded, {} left in the work queue, {} of {} poison payloads dead-lettered, {} valid events dead-lettered",
            report.lost,
            report.stranded,
            report.stream_left,
            report.poison_dead_lettered,
            report.poison_injected,
            report.valid_dead_lettered
        );
    }
    Ok(())
}

/// `workload`: fails when an expected delivery was lost.
async fn run_workload(args: WorkloadArgs, config: Config) -> Result<()> {
    let store = member_store(&config).await?;
    let redis = RedisClient::connect(&config.redis).await?;
    let routes = RouteStore::new(
        redis,
        config.dispatch.route_chunk_size,
        config.dispatch.route_concurrency,
    );
    let nats = connect_nats(&config.nats, "resonance-task-workload").await?;
    let opts = WorkloadOptions {
        events: args.events,
        rate: args.rate,
        stats_urls: args.stats,
        push_to_sender: config.dispatch.push_to_sender,
        rng_seed: args.rng_seed,
        settle_timeout: Duration::from_secs(args.settle_timeout),
        subject: config.consumer.topic.clone(),
    };
    let report = workload::run(&opts, &store, &routes, &nats).await?;
    print!("{}", report.to_text());
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    if report.lost > 0 {
        bail!("{} expected deliveries were lost", report.lost);
    }
    Ok(())
}
