//! The `resonance-task` command: parses arguments, loads the configuration
//! and hands over to the crates that do the work: a pod (`run`), the
//! notify worker, migrations, dead letters and offline messages, and with
//! the `devtools` feature the developer commands. Nothing here decides how
//! events are handled.

use std::path::PathBuf;
use std::process::ExitCode;
use tracing::level_filters::LevelFilter;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use resonance_task::config::Config;
use resonance_task::consumer::dlq;
use resonance_task::nats::connect as connect_nats;
use resonance_task::store::{OfflineStore, RedisClient, connect_database, migrate};
use resonance_task::telemetry;

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
    #[command(
        after_help = "Example (another pod beside a demo stack's; its admin port must be free):\n  RESONANCE_TASK__SERVICE__NAME=task-pod-3 RESONANCE_TASK__ADMIN__LISTEN=127.0.0.1:9393 resonance-task run"
    )]
    Run,
    /// Print the effective configuration (secrets redacted) and exit.
    #[command(
        after_help = "Example:\n  RESONANCE_TASK__CONSUMER__WORKER_COUNT=8 resonance-task check-config"
    )]
    CheckConfig,
    /// Create the session tables (t_session, t_session_member) if missing.
    #[command(
        after_help = "Examples:\n  resonance-task migrate\n  RESONANCE_TASK__DATABASE__URL=sqlite://sessions.db?mode=rwc resonance-task migrate"
    )]
    Migrate,
    /// Inspect and replay dead letters.
    #[command(
        subcommand,
        after_help = "Examples:\n  resonance-task dlq list\n  resonance-task dlq replay --all --keep"
    )]
    Dlq(DlqCommand),
    /// Run the mobile-push worker: offline notices to the configured
    /// providers (webhook, Getui, FCM, APNs).
    #[command(
        after_help = "Examples (each needs the provider's own endpoint or credentials):\n  RESONANCE_TASK__NOTIFY__WEBHOOK__URL=https://push.example/hook RESONANCE_TASK__NOTIFY__WEBHOOK__SECRET_FILE=/run/secrets/hook resonance-task notify\n  RESONANCE_TASK__NOTIFY__FCM__SERVICE_ACCOUNT_FILE=/run/secrets/fcm.json resonance-task notify"
    )]
    Notify,
    /// Messages parked for offline users.
    #[command(
        subcommand,
        after_help = "Examples:\n  resonance-task offline count --user user-000042\n  resonance-task offline pull --user user-000042 --max 100"
    )]
    Offline(OfflineCommand),
    #[cfg(feature = "devtools")]
    #[command(flatten)]
    Dev(Box<resonance_devtools::cli::DevCommand>),
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
    #[command(
        after_help = "Examples:\n  resonance-task dlq list\n  resonance-task dlq list --notices --json"
    )]
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
        after_help = "Examples:\n  resonance-task dlq replay --all\n  resonance-task dlq replay --all --keep --notices\n\nOne dead letter: --seq with the SEQ `dlq list` shows (repeatable)."
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
    #[cfg(feature = "devtools")]
    let quiet = matches!(&cli.command, Command::Dev(dev) if dev.quiet_logs())
        && config.log.level == resonance_task::config::LogConfig::default().level;
    #[cfg(not(feature = "devtools"))]
    let quiet = false;
    if quiet {
        telemetry::init_printing(&config.log, LevelFilter::WARN);
    } else {
        telemetry::init(&config.log);
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(dispatch(cli.command, config))
}

async fn dispatch(command: Command, config: Config) -> Result<()> {
    match command {
        Command::Run => resonance_task::run(config, shutdown_signal()).await?,
        Command::CheckConfig => unreachable!("handled before the runtime starts"),
        Command::Migrate => {
            let (pool, dialect) = connect_database(&config.database).await?;
            migrate(&pool, dialect, &config.database).await?;
        }
        Command::Dlq(command) => run_dlq(command, config).await?,
        Command::Notify => resonance_notify::run(config, shutdown_signal()).await?,
        Command::Offline(command) => run_offline(command, config).await?,
        #[cfg(feature = "devtools")]
        Command::Dev(dev) => dev.run(config, shutdown_signal()).await?,
    }
    Ok(())
}

async fn run_dlq(command: DlqCommand, config: Config) -> Result<()> {
    let nats = connect_nats(&config.nats, "resonance-task-dlq").await?;
    let js = async_nats::jetstream::new(nats);
    let which = |notices: bool| {
        if notices {
            resonance_notify::consumer_config(&config)
        } else {
            config.consumer.clone()
        }
    };
    match command {
        DlqCommand::List { json, notices } => {
            let consumer = which(notices);
            let letters = dlq::list(&js, &consumer).await?;
            if letters.is_empty() && !json {
                println!("no dead letters in {}", consumer.dead_letter_stream);
            } else if json {
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
            if replayed.is_empty() {
                println!(
                    "no dead letters in {}: nothing replayed",
                    consumer.dead_letter_stream
                );
                return Ok(());
            }
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
            let parked = store.pull(&user, max).await?;
            if parked.is_empty() {
                // Standard error: standard output carries JSON lines only.
                eprintln!("no parked messages for {user}");
            }
            for m in parked {
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
