//! Connecting to NATS: the configured identity (user and password, token,
//! NKey seed or `.creds` file), TLS options, and the connection events that
//! keep readiness and the reconnect counter current. Every NATS client of the
//! service and of the notify worker is made here.

use std::sync::Arc;

use crate::config::NatsConfig;
use crate::lifecycle::Readiness;

/// Connects to NATS with the configured identity. Reconnects forever after
/// the first connection.
pub async fn connect(
    cfg: &NatsConfig,
    name: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    connect_with(cfg, name, None).await
}

/// [`connect`], keeping `readiness` and the reconnect counter current.
/// Waits until the server has handled everything `client` sent before.
/// `flush` only puts it on the wire: a subscription made just before may
/// not be in place yet when another connection publishes, and core NATS
/// drops what no subscription takes. A request nobody answers comes back
/// as "no responders" only after the server has read what preceded it on
/// this connection.
pub async fn round_trip(client: &async_nats::Client) -> Result<(), async_nats::RequestError> {
    match client.request(client.new_inbox(), Default::default()).await {
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
        Err(e) => Err(e),
        // Someone answers on a fresh inbox subject: the round trip is done
        // all the same.
        Ok(_) => Ok(()),
    }
}

pub async fn connect_with(
    cfg: &NatsConfig,
    name: &str,
    readiness: Option<Arc<Readiness>>,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(cfg.connect_timeout)
        .max_reconnects(None)
        .event_callback(move |event| {
            let readiness = readiness.clone();
            async move {
                let connected = |up: bool| {
                    if let Some(r) = &readiness {
                        Readiness::set(&r.nats_connected, up);
                    }
                };
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!("NATS connected");
                        metrics::counter!(crate::telemetry::metrics::RECONNECTS, "dependency" => "nats")
                            .increment(1);
                        connected(true);
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!("NATS disconnected; reconnecting");
                        connected(false);
                    }
                    // Core messages were dropped on this side: say so.
                    async_nats::Event::SlowConsumer(sid) => {
                        tracing::warn!(sid, "NATS subscription too slow; messages were dropped")
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            }
        });
    if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
        options = options.user_and_password(user.clone(), password.expose().to_string());
    }
    if let Some(token) = &cfg.token {
        options = options.token(token.expose().to_string());
    }
    if let Some(seed) = &cfg.nkey {
        options = options.nkey(seed.expose().to_string());
    }
    if let Some(path) = &cfg.credentials_file {
        options = options.credentials_file(path).await.map_err(|e| {
            async_nats::ConnectError::with_source(
                async_nats::ConnectErrorKind::Authentication,
                format!("nats.credentials_file {}: {e}", path.display()),
            )
        })?;
    }
    let tls = &cfg.tls;
    // Every server of a cluster: the client starts at one and moves to
    // another when it goes away.
    let servers: Vec<&str> = cfg
        .url
        .expose()
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if tls.enabled || servers.iter().any(|u| u.starts_with("tls://")) {
        options = options.require_tls(true);
    }
    if let Some(ca) = &tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    options.connect(servers.as_slice()).await
}
