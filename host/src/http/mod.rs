//! The HTTP edge (axum): the Open Inference Protocol v2 REST API with the
//! health probes ([`v2`]), and Prometheus `/metrics` on its own port. Probe
//! answers come from in-memory state, so a probe never waits on a load.

pub mod v2;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};

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

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;
    use crate::registry::{Registry, RegistrySettings};
    use crate::security::groups::HTTP_ROUTES;

    /// The access gate classifies paths by `HTTP_ROUTES`: every template
    /// there must be a route of these routers (not the fallback), so that
    /// the table cannot drift from what is served.
    #[tokio::test]
    async fn every_classified_route_is_served() {
        let repo = tempfile::tempdir().unwrap();
        let plugins = tempfile::tempdir().unwrap();
        let registry = Registry::new(RegistrySettings::new(
            crate::config::ModelRepository::new(repo.path()),
            1,
        ));
        let host = Arc::new(crate::plugin::PluginHost::new(plugins.path()));
        let state = HttpState {
            pipeline: Pipeline::new(registry, host),
            health: Arc::new(Health::default()),
            max_body_bytes: 1 << 20,
        };
        for (template, group) in HTTP_ROUTES {
            let path = template
                .replace("{model}", "no_such_model")
                .replace("{version}", "1");
            let router = if path == "/metrics" {
                metrics_router(state.clone())
            } else {
                router(state.clone())
            };
            for method in ["GET", "POST"] {
                let request = axum::http::Request::builder()
                    .method(method)
                    .uri(&path)
                    .body(Body::empty())
                    .unwrap();
                let response = router.clone().oneshot(request).await.unwrap();
                let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                    .await
                    .unwrap();
                let text = String::from_utf8_lossy(&body);
                assert!(
                    !text.contains("no such endpoint"),
                    "{method} {path} ({group}) reached the fallback: the table names a route the router lacks"
                );
            }
        }
    }
}
