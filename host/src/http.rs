//! The HTTP edge (axum): health probes. Answers come from in-memory state,
//! so a probe never waits on a load.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::pipeline::Pipeline;

#[derive(Clone)]
pub struct HttpState {
    pub pipeline: Pipeline,
    /// The cached readiness verdict.
    pub health: Arc<Health>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn ready(State(state): State<HttpState>) -> (StatusCode, String) {
    let verdict = state.health.verdict();
    let code = if state.health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, verdict.message.clone())
}

/// Prometheus text from the metrics plugins and the host's plugin counters.
async fn metrics(
    State(state): State<HttpState>,
) -> (
    StatusCode,
    [(axum::http::HeaderName, &'static str); 1],
    String,
) {
    let pipeline = state.pipeline.clone();
    let text = tokio::task::spawn_blocking(move || pipeline.render_plugin_metrics())
        .await
        .unwrap_or_else(|err| format!("# rendering failed: {err}\n"));
    (
        StatusCode::OK,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
}

pub async fn serve(listener: TcpListener, state: HttpState, shutdown: CancellationToken) {
    let res = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(err) = res {
        tracing::error!(%err, "HTTP server failed");
    }
}
