//! The pod itself: its name (`service`), its logs (`log`) and its admin
//! port (`admin`).

use serde::{Deserialize, Serialize};

use super::{Problems, non_empty};

/// The admin HTTP port: /metrics, /healthz, /readyz.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub enabled: bool,
    pub listen: std::net::SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: ([0, 0, 0, 0], 9090).into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// Names this pod's NATS connection; shows up in `nats server report`.
    pub name: String,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            name: "resonance-task".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Console,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `resonance_task=debug,info`); `RUST_LOG`
    /// wins when set.
    pub level: String,
    pub format: LogFormat,
    /// OTLP/HTTP endpoint spans are exported to (e.g.
    /// `http://otel-collector:4318/v1/traces`); unset exports nothing.
    pub otlp_endpoint: Option<String>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Console,
            otlp_endpoint: None,
        }
    }
}

impl ServiceConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        p.check(non_empty("service.name", &self.name));
    }
}

impl LogConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            p.invalid("log.level", e.to_string());
        }
    }
}
