//! Command line: parses arguments, loads the configuration and hands over to
//! the library. Nothing here decides how events are handled.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use resonance_task::config::{Config, LogConfig};
use resonance_task::gateway::reference::{ReferenceGateway, ReferenceGatewayOptions, ServerTls};
use resonance_task::store::{
    MemberStore, OfflineStore, RedisClient, RouteStore, connect_database, migrate,
};
use resonance_task::tools::publish::{EventTemplate, fresh_msg_id_base, publish};
use resonance_task::tools::seed::{SeedPlan, SessionMix, seed};
use resonance_task::tools::workload::{self, WorkloadOptions};
use resonance_task::tools::{bench, chaos, dlq, parse_range, user_name};
use resonance_task::{connect_nats, telemetry};

#[derive(Parser)]
#[command(
    name = "resonance-task",
    version,
    about = "Write fan-out for Resonance IM: NATS push events to gateway streams",
    after_help = "Configuration: defaults, then config/task.yaml (or --config), then RESONANCE_TASK__SECTION__KEY variables."
)]
struct Cli {
    /// YAML configuration file [default: config/task.yaml if present]
    #[arg(long, global = true, env = "RESONANCE_TASK_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a task pod: consume push events and fan them out to gateways.
    #[command(after_help = "Example:\n  resonance-task run --config config/task.yaml")]
    Run,
    /// Print the effective configuration (secrets redacted) and exit.
    #[command(
        after_help = "Example:\n  RESONANCE_TASK__CONSUMER__WORKER_COUNT=8 resonance-task check-config"
    )]
    CheckConfig,
    /// Create the session tables (t_session, t_session_member) if missing.
    #[command(
        after_help = "Example:\n  RESONANCE_TASK__DATABASE__URL=mysql://root@127.0.0.1/test resonance-task migrate"
    )]
    Migrate,
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
        after_help = "Example:\n  resonance-task chaos --json\n\nNeeds nats-server, etcd, redis-server and a PostgreSQL it may create a database in."
    )]
    Chaos(ChaosArgs),
    /// Inspect and replay dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Run the mobile-push worker: offline notices to the configured
    /// providers (webhook, Getui).
    #[command(
        after_help = "Example:\n  RESONANCE_TASK__NOTIFY__WEBHOOK__URL=https://push.example/hook \\\n  RESONANCE_TASK__NOTIFY__WEBHOOK__SECRET_FILE=/run/secrets/hook resonance-task notify"
    )]
    Notify,
    /// Messages parked for offline users.
    #[command(subcommand)]
    Offline(OfflineCommand),
    /// Publish a sample load to seeded sessions and report what arrived.
    #[command(
        after_help = "Example:\n  resonance-task workload --events 2000 --stats http://127.0.0.1:9191/stats --json"
    )]
    Workload(WorkloadArgs),
    /// Measure fan-out throughput and latency: the upstream serial
    /// algorithm, per-user streams, batch-v1 and the I/O floor, side by side
    /// on private servers.
    #[command(
        after_help = "Example:\n  resonance-task bench --json\n  resonance-task bench --sweep --modes batch,floor\n\nNeeds nats-server, etcd and redis-server. Build with --release for meaningful figures."
    )]
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// Modes to measure (comma-separated)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "serial,stream,batch,floor"
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
    /// Members per session in the latency run (at half of batch peak)
    #[arg(long, default_value_t = 100)]
    latency_group_size: usize,
    /// Seconds the latency run publishes
    #[arg(long, default_value_t = 5.0)]
    latency_seconds: f64,
    /// Also measure group sizes 2..100,000 (batch and floor) and write
    /// bench-sweep.json and bench-sweep.svg into --sweep-dir
    #[arg(long)]
    sweep: bool,
    #[arg(long, default_value = "docs")]
    sweep_dir: PathBuf,
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
    /// No progress bar on stderr
    #[arg(long)]
    no_progress: bool,
    /// Print the report as one JSON object on the last line
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChaosArgs {
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
}

#[derive(Subcommand)]
enum OfflineCommand {
    /// Take a user's parked messages, lowest seq_id first, removing them
    /// (concurrent pulls never return the same message). One JSON object
    /// per message.
    #[command(after_help = "Example:\n  resonance-task offline pull --user user-000042 --max 100")]
    Pull {
        #[arg(long)]
        user: String,
        /// At most this many messages
        #[arg(long, default_value_t = 1000)]
        max: usize,
    },
    /// How many messages a user has parked.
    #[command(after_help = "Example:\n  resonance-task offline count --user user-000042")]
    Count {
        #[arg(long)]
        user: String,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters with reason, deliveries and age, and a count per reason.
    #[command(after_help = "Example:\n  resonance-task dlq list")]
    List {
        /// One JSON object per dead letter instead of a table
        #[arg(long)]
        json: bool,
        /// The offline-notice dead letters of `notify` instead of events
        #[arg(long)]
        notices: bool,
    },
    /// Publish dead letters to the input subject again and remove them.
    #[command(
        after_help = "Examples:\n  resonance-task dlq replay --all\n  resonance-task dlq replay --seq 12 --seq 15 --keep"
    )]
    Replay {
        /// Stream sequence of a dead letter (repeatable)
        #[arg(long = "seq", conflicts_with = "all")]
        seqs: Vec<u64>,
        /// Every dead letter
        #[arg(long)]
        all: bool,
        /// Keep the dead letters after replaying them
        #[arg(long)]
        keep: bool,
        /// The offline-notice dead letters of `notify` instead of events
        #[arg(long)]
        notices: bool,
    },
}

#[derive(Args)]
struct GatewayArgs {
    /// gateway_id written to etcd metadata and to routes
    #[arg(long)]
    id: String,
    /// gRPC listen address (port 0 picks a free port)
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Host advertised in the etcd endpoint
    #[arg(long, default_value = "127.0.0.1")]
    advertise_host: String,
    /// HTTP address of GET /stats and /healthz
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Simulated users held, as an index range (A..B)
    #[arg(long, value_parser = parse_range)]
    users: Option<std::ops::Range<usize>>,
    /// An extra user held, by name (repeatable)
    #[arg(long = "user")]
    extra_users: Vec<String>,
    #[arg(long, default_value = "user-")]
    user_prefix: String,
    /// Do not write routes to Redis
    #[arg(long)]
    no_routes: bool,
    /// Delay every response (simulates a slow gateway)
    #[arg(long, default_value_t = 0)]
    reply_delay_ms: u64,
    /// Append every delivery to this file and count those already in it
    /// (keeps counts across a restart)
    #[arg(long)]
    journal: Option<PathBuf>,
    /// Serve only the upstream per-user PushService, like an upstream
    /// gateway (default: also serve and advertise batch-v1)
    #[arg(long)]
    no_batch: bool,
    /// Write {"grpc": ADDR, "http": ADDR} here once registered
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Serve gRPC over TLS with this certificate chain (PEM) and advertise
    /// grpcs://
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM)
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS)
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
}

#[derive(Args)]
struct SeedArgs {
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
struct PublishArgs {
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
struct WorkloadArgs {
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

// Fan-out allocates many small, short-lived strings and frames across
// threads; mimalloc handles that pattern with far less contention than the
// system allocator (measured with `resonance-task bench`, see the README).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match start(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn start(cli: Cli) -> Result<()> {
    let config = Config::load(cli.config.as_deref()).context("refusing to start")?;
    if let Command::CheckConfig = cli.command {
        print!("{}", config.to_redacted_yaml());
        return Ok(());
    }
    if let Command::Certs { dir } = &cli.command {
        let pki = resonance_task::tools::certs::DevPki::create(dir)?;
        println!(
            "wrote ca.pem, server.pem, server.key, client.pem, client.key to {}",
            pki.dir.display()
        );
        return Ok(());
    }
    let mut config = config;
    if matches!(cli.command, Command::Bench(_)) && config.log.level == LogConfig::default().level {
        // The pods run in this process; their info lines would bury the table.
        config.log.level = "warn".into();
    }
    telemetry::init(&config.log);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(dispatch(cli.command, config))
}

async fn dispatch(command: Command, config: Config) -> Result<()> {
    match command {
        Command::Run => resonance_task::run(config, shutdown_signal()).await?,
        Command::CheckConfig | Command::Certs { .. } => {
            unreachable!("handled before the runtime starts")
        }
        Command::Migrate => {
            let (pool, dialect) = connect_database(&config.database).await?;
            migrate(&pool, dialect, &config.database).await?;
        }
        Command::Gateway(args) => run_gateway(args, config).await?,
        Command::Seed(args) => {
            let store = member_store(&config).await?;
            let plan = SeedPlan {
                users: args.users,
                user_prefix: args.user_prefix,
                mix: args.sessions,
                rng_seed: args.rng_seed,
            };
            let summary = seed(&store, &plan).await?;
            println!("{}", serde_json::to_string(&summary)?);
        }
        Command::Publish(args) => {
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
        }
        Command::Dlq(command) => run_dlq(command, config).await?,
        Command::Notify => resonance_task::notify::run(config, shutdown_signal()).await?,
        Command::Offline(command) => run_offline(command, config).await?,
        Command::Bench(args) => {
            let report = bench::run(bench::BenchOptions {
                modes: args.modes,
                group_size: args.group_size,
                gateways: args.gateways,
                deliveries: args.deliveries,
                latency_group_size: args.latency_group_size,
                latency_seconds: args.latency_seconds,
                sweep: args.sweep.then_some(args.sweep_dir),
                storm: args.storm,
                priority: args.priority,
                tls: args.tls,
                progress: !args.no_progress && std::io::stderr().is_terminal(),
                tuning: config,
            })
            .await?;
            print!("{}", report.to_text());
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            }
        }
        Command::Chaos(args) => {
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
        }
        Command::Workload(args) => {
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
        }
    }
    Ok(())
}

async fn run_dlq(command: DlqCommand, config: Config) -> Result<()> {
    let nats = connect_nats(&config.nats, "resonance-task-dlq").await?;
    let js = async_nats::jetstream::new(nats);
    let which = |notices: bool| {
        if notices {
            resonance_task::notify::consumer_config(&config)
        } else {
            config.consumer.clone()
        }
    };
    match command {
        DlqCommand::List { json, notices } => {
            let letters = dlq::list(&js, &which(notices)).await?;
            if json {
                for l in &letters {
                    println!("{}", serde_json::to_string(l)?);
                }
            } else {
                print!("{}", dlq::to_text(&letters));
            }
        }
        DlqCommand::Replay {
            seqs,
            all,
            keep,
            notices,
        } => {
            let consumer = which(notices);
            let selection = match (all, seqs.is_empty()) {
                (true, _) => dlq::Selection::All,
                (false, false) => dlq::Selection::Sequences(seqs),
                (false, true) => bail!("say which dead letters: --all or --seq N"),
            };
            let replayed = dlq::replay(&js, &consumer, &selection, keep).await?;
            println!(
                "replayed {} dead letters to {}",
                replayed.len(),
                consumer.topic
            );
        }
    }
    Ok(())
}

async fn run_offline(command: OfflineCommand, config: Config) -> Result<()> {
    let redis = RedisClient::connect(&config.redis).await?;
    let store = OfflineStore::new(redis, config.offline.max_messages, config.offline.ttl);
    match command {
        OfflineCommand::Pull { user, max } => {
            for m in store.pull(&user, max).await? {
                let line = serde_json::json!({
                    "msg_id": m.msg_id,
                    "seq_id": m.seq_id,
                    "session_id": m.session_id,
                    "from_username": m.from_username,
                    "to_username": m.to_username,
                    "content": m.content,
                    "type": m.r#type,
                    "timestamp": m.timestamp,
                });
                println!("{line}");
            }
        }
        OfflineCommand::Count { user } => println!("{}", store.count(&user).await?),
    }
    Ok(())
}

async fn member_store(config: &Config) -> Result<MemberStore> {
    let (pool, dialect) = connect_database(&config.database).await?;
    migrate(&pool, dialect, &config.database).await?;
    Ok(MemberStore::new(pool, dialect))
}

/// The reference gateway's TLS from its PEM files, if asked for.
fn gateway_tls(args: &GatewayArgs) -> Result<Option<ServerTls>> {
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let (cert, key) = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => (read(c)?, read(k)?),
        (None, None) if args.client_ca.is_none() => return Ok(None),
        _ => anyhow::bail!("--tls-cert and --tls-key go together (and --client-ca needs them)"),
    };
    Ok(Some(ServerTls {
        cert,
        key: zeroize::Zeroizing::new(key),
        client_ca: args.client_ca.as_ref().map(read).transpose()?,
    }))
}

async fn run_gateway(args: GatewayArgs, config: Config) -> Result<()> {
    let tls = gateway_tls(&args)?;
    let mut users: Vec<String> = args
        .users
        .map(|r| r.map(|i| user_name(&args.user_prefix, i)).collect())
        .unwrap_or_default();
    users.extend(args.extra_users);
    let gateway = ReferenceGateway::start(ReferenceGatewayOptions {
        gateway_id: args.id,
        instance_id: None,
        grpc_listen: args.listen,
        advertise_host: args.advertise_host,
        advertise_port: None,
        http_listen: args.http,
        users,
        write_routes: !args.no_routes,
        etcd: config.etcd.clone(),
        redis: config.redis.clone(),
        namespace: config.registry.namespace.clone(),
        service_name: config.gateway_service_name.0.clone(),
        lease_ttl: config.registry.default_ttl,
        reply_delay: Duration::from_millis(args.reply_delay_ms),
        refuse_streams: 0,
        journal: args.journal,
        batch: !args.no_batch,
        track_deliveries: true,
        tls,
    })
    .await?;
    if let Some(path) = args.ready_file {
        let ready = serde_json::json!({
            "grpc": gateway.grpc_addr.to_string(),
            "http": gateway.http_addr.map(|a| a.to_string()),
        });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, ready.to_string())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    }
    gateway.run_until(shutdown_signal()).await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested");
}
