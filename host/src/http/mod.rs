//! The HTTP edge (axum): the Open Inference Protocol v2 REST API with the
//! health probes ([`v2`]), and Prometheus `/metrics` on its own port. Probe
//! answers come from in-memory state, so a probe never waits on a load.

pub mod v2;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::pipeline::Pipeline;

#[derive(Clone)]
pub struct HttpState {
    pub pipeline: Pipeline,
    /// The cached readiness verdict.
    pub health: Arc<Health>,
    /// Largest request body accepted (the same limit as gRPC messages).
    pub max_body_bytes: usize,
}

/// The inference API on the HTTP port.
pub fn router(state: HttpState) -> Router {
    let model_routes = |prefix: &str| {
        Router::new()
            .route(prefix, get(v2::model_metadata))
            .route(&format!("{prefix}/ready"), get(v2::model_ready))
            .route(&format!("{prefix}/config"), get(v2::model_config))
            .route(&format!("{prefix}/stats"), get(v2::model_statistics))
            .route(&format!("{prefix}/infer"), post(v2::infer))
    };
    Router::new()
        .route("/v2", get(v2::server_metadata))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/stats", get(v2::all_statistics))
        .merge(model_routes("/v2/models/{model}"))
        .merge(model_routes("/v2/models/{model}/versions/{version}"))
        .route("/v2/repository/index", post(v2::repository_index))
        .route(
            "/v2/repository/models/{model}/load",
            post(v2::repository_load),
        )
        .route(
            "/v2/repository/models/{model}/unload",
            post(v2::repository_unload),
        )
        .fallback(v2::not_found)
        .with_state(state)
}

/// Prometheus text on the metrics port.
pub fn metrics_router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(v2::not_found)
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

/// Serves `router` on `listener` until `shutdown`, then drains.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    use axum::serve::ListenerExt;
    // Small responses must not wait on Nagle and delayed ACKs.
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "TCP_NODELAY");
        }
    });
    let res = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(err) = res {
        tracing::error!(%err, "HTTP server failed");
    }
}
