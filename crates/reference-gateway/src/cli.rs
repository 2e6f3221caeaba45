//! The `gateway` command: a reference gateway holding simulated users,
//! serving until the shutdown signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use resonance_task::config::Config;

use crate::{ReferenceGateway, ReferenceGatewayOptions, ServerTls, parse_range, user_name};

#[derive(Args)]
pub struct GatewayArgs {
    /// gateway_id written to etcd metadata and to routes
    #[arg(long)]
    pub id: String,
    /// gRPC listen address (port 0 picks a free port)
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Host advertised in the etcd endpoint
    #[arg(long, default_value = "127.0.0.1")]
    pub advertise_host: String,
    /// HTTP address of GET /stats and /healthz
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Simulated users held, as an index range (A..B)
    #[arg(long, value_parser = parse_range)]
    pub users: Option<std::ops::Range<usize>>,
    /// An extra user held, by name (repeatable)
    #[arg(long = "user")]
    pub extra_users: Vec<String>,
    #[arg(long, default_value = "user-")]
    pub user_prefix: String,
    /// Do not write routes to Redis
    #[arg(long)]
    pub no_routes: bool,
    /// Delay every response (simulates a slow gateway)
    #[arg(long, default_value_t = 0)]
    pub reply_delay_ms: u64,
    /// Append every delivery to this file and count those already in it
    /// (keeps counts across a restart)
    #[arg(long)]
    pub journal: Option<PathBuf>,
    /// Serve only the upstream per-user PushService, like an upstream
    /// gateway (default: also serve and advertise batch-v1)
    #[arg(long)]
    pub no_batch: bool,
    /// Write {"grpc": ADDR, "http": ADDR} here once registered
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Serve gRPC over TLS with this certificate chain (PEM) and advertise
    /// grpcs://
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM)
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS)
    #[arg(long, requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
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

/// Starts the gateway, writes `--ready-file`, and serves until `shutdown`.
pub async fn run(
    args: GatewayArgs,
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
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
    gateway.run_until(shutdown).await;
    Ok(())
}
