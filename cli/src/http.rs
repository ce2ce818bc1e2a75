//! The HTTP side door: `/healthz` (the process serves), `/readyz` (the pool and loop devices are
//! usable), `/metrics` (Prometheus text). For probes and scrapers; never carries CSI traffic.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use plinth_controller::metrics::Metrics;
use plinth_engine::Engine;

/// What `/readyz` asks: `Err(reason)` means not ready.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct Shared {
    /// Pool figures for /metrics, where this process owns a pool.
    engine: Option<Arc<Engine>>,
    ready: ReadyCheck,
    metrics: Arc<Metrics>,
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(shared): State<Shared>) -> impl IntoResponse {
    match tokio::task::spawn_blocking(move || (shared.ready)()).await {
        Ok(Ok(())) => (StatusCode::OK, "ok".to_owned()),
        Ok(Err(reason)) => (StatusCode::SERVICE_UNAVAILABLE, reason),
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err.to_string()),
    }
}

/// Ready when the engine's pool (and, for node duty, loop devices) can be used.
pub fn engine_ready(engine: Arc<Engine>, node_duty: bool) -> ReadyCheck {
    Arc::new(move || engine.probe(node_duty).map_err(|e| e.chain()))
}

async fn metrics_text(State(shared): State<Shared>) -> impl IntoResponse {
    // Pool figures are read at scrape time: always current, no background poller.
    let metrics = Arc::clone(&shared.metrics);
    let Some(engine) = shared.engine.clone() else {
        return ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics.encode());
    };
    let pool_metrics = Arc::clone(&metrics);
    let _ = tokio::task::spawn_blocking(move || -> plinth_engine::Result<()> {
        let metrics = pool_metrics;
        let records = engine.volumes()?;
        let capacity = engine.capacity(None)?;
        metrics.set_pool("available", capacity.available_bytes);
        metrics.set_pool("provisioned", capacity.provisioned_bytes);
        metrics.set_pool("allocated", capacity.allocated_bytes);
        metrics.set_pool("filesystem_total", capacity.filesystem_total_bytes);
        metrics.set_volumes("created", records.len());
        metrics.set_volumes("staged", records.iter().filter(|r| r.staged.is_some()).count());
        metrics.set_volumes("published", records.iter().filter(|r| !r.published.is_empty()).count());
        for support in engine.filesystem_support() {
            metrics.set_filesystem_support(support.fs.as_str(), "format", support.format);
            metrics.set_filesystem_support(support.fs.as_str(), "grow", support.grow);
        }
        Ok(())
    })
    .await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics.encode())
}

/// Binds first, so a taken port fails the start instead of surfacing at shutdown.
pub async fn bind(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    tokio::net::TcpListener::bind(address).await.with_context(|| format!("binding the HTTP endpoint {address}"))
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Option<Arc<Engine>>,
    ready: ReadyCheck,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Shared { engine, ready, metrics });
    tracing::info!(address = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}
