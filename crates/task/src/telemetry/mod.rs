//! Telemetry: logs (`tracing`, console or JSON by `log.format`, filter from
//! `RUST_LOG` or `log.level`), W3C trace context carried from events to
//! gateways (`trace`), optional OTLP span export (`log.otlp_endpoint`),
//! Prometheus metrics (`metrics`) and the admin HTTP port with health and
//! readiness (`admin`).

pub mod admin;
pub mod metrics;
pub mod trace;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{LevelFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogConfig, LogFormat};

static PROVIDER: std::sync::OnceLock<SdkTracerProvider> = std::sync::OnceLock::new();

/// Flushes spans still waiting for export (call before exit).
pub fn flush() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.force_flush();
    }
}

/// Installs the global subscriber; a second call (tests) keeps the first.
/// Spans always carry OpenTelemetry context, so trace ids propagate even
/// when nothing exports them.
pub fn init(cfg: &LogConfig) {
    install(cfg, None);
}

/// As [`init`], but only events at `printed` or above are written. Spans
/// stay enabled as `cfg` says, and still reach every layer, so a process
/// that runs pods beside output of its own (the benchmark) pays for them
/// what a pod pays, and keeps its output readable.
pub fn init_printing(cfg: &LogConfig, printed: LevelFilter) {
    install(cfg, Some(printed));
}

fn install(cfg: &LogConfig, printed: Option<LevelFilter>) {
    if PROVIDER.get().is_some() {
        return;
    }
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let mut provider = SdkTracerProvider::builder().with_resource(
        Resource::builder()
            .with_service_name("resonance-task")
            .build(),
    );
    if let Some(endpoint) = &cfg.otlp_endpoint {
        crate::tls::install_provider();
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint.clone())
            .build()
        {
            Ok(exporter) => provider = provider.with_batch_exporter(exporter),
            Err(e) => eprintln!("OTLP export to {endpoint} disabled: {e}"),
        }
    }
    let provider = PROVIDER.get_or_init(|| provider.build());
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("resonance-task"));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let lines = match cfg.format {
        LogFormat::Console => tracing_subscriber::fmt::layer()
            .with_ansi(colours_wanted())
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let _ = match printed {
        None => registry.with(lines).try_init(),
        Some(floor) => registry
            .with(lines.with_filter(filter_fn(move |m| m.is_span() || *m.level() <= floor)))
            .try_init(),
    };
}

/// Colour codes only for a person at a terminal: stderr redirected to a
/// file or a pipe (a container runtime, a log shipper) gets plain text,
/// and `NO_COLOR` (set and not empty) turns them off anywhere.
fn colours_wanted() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The benchmark's way of logging: the configured level (`info` by
    /// default) still decides which spans exist, so its pods pay for their
    /// `dispatch` spans; only the printing is narrowed.
    #[test]
    fn printing_only_warnings_keeps_spans_at_the_configured_level() {
        let cfg = LogConfig {
            level: "info".into(),
            ..LogConfig::default()
        };
        init_printing(&cfg, LevelFilter::WARN);
        assert!(!tracing::info_span!("dispatch").is_disabled());
        assert!(tracing::debug_span!("gateway_batch").is_disabled());
    }
}
