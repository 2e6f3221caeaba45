//! The admin HTTP port: `/metrics` (Prometheus text), `/healthz` (the
//! process is alive) and `/readyz` (NATS connected, consumer bound, registry
//! synced at least once, database reachable; not ready while any is down).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::lifecycle::Lifecycle;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use serde::Serialize;

/// What readiness depends on; each part is set by the component that knows.
#[derive(Default)]
pub struct Readiness {
    pub nats_connected: AtomicBool,
    pub consumer_bound: AtomicBool,
    pub registry_synced: AtomicBool,
    pub database_reachable: AtomicBool,
}

#[derive(Serialize)]
struct ReadyReport {
    ready: bool,
    nats_connected: bool,
    consumer_bound: bool,
    registry_synced: bool,
    database_reachable: bool,
}

impl Readiness {
    fn report(&self) -> ReadyReport {
        let nats_connected = self.nats_connected.load(Ordering::Relaxed);
        let consumer_bound = self.consumer_bound.load(Ordering::Relaxed);
        let registry_synced = self.registry_synced.load(Ordering::Relaxed);
        let database_reachable = self.database_reachable.load(Ordering::Relaxed);
        ReadyReport {
            ready: nats_connected && consumer_bound && registry_synced && database_reachable,
            nats_connected,
            consumer_bound,
            registry_synced,
            database_reachable,
        }
    }

    pub fn set(flag: &AtomicBool, value: bool) {
        flag.store(value, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("admin port {addr}: {cause}")]
pub struct AdminError {
    addr: SocketAddr,
    #[source]
    cause: std::io::Error,
}

/// Serves the admin port until `life` stops; returns the bound address.
pub async fn serve(addr: SocketAddr, life: &Lifecycle) -> Result<SocketAddr, AdminError> {
    let readiness = life.readiness.clone();
    let stop = life.stop.clone();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|cause| AdminError { addr, cause })?;
    let bound = listener
        .local_addr()
        .map_err(|cause| AdminError { addr, cause })?;
    let handle = super::metrics::handle();
    let app = Router::new()
        .route("/metrics", get(move || async move { handle.render() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                let report = readiness.report();
                let status = if report.ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (status, axum::Json(report))
            }),
        );
    life.spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "admin port failed");
        }
    });
    tracing::info!(%bound, "admin port: /metrics /healthz /readyz");
    Ok(bound)
}
