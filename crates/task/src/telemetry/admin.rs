//! The admin HTTP port: `/metrics` (Prometheus text), `/healthz` (the
//! process is alive) and `/readyz` (NATS connected, consumer bound, registry
//! synced at least once, database reachable; not ready while any is down).

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use std::net::SocketAddr;

use crate::config::AdminConfig;
use crate::lifecycle::Lifecycle;

#[derive(Debug, thiserror::Error)]
#[error("admin port {addr}: {cause}")]
pub struct AdminError {
    addr: SocketAddr,
    #[source]
    cause: std::io::Error,
}

/// A new lifecycle whose admin port (metrics, health, readiness) is
/// served when `admin.enabled`; the metrics are described either way.
pub async fn start(admin: &AdminConfig) -> Result<Lifecycle, AdminError> {
    let life = Lifecycle::new();
    super::metrics::describe();
    if admin.enabled {
        serve(admin.listen, &life).await?;
    }
    Ok(life)
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
