//! The HTTP edge (axum): the Open Inference Protocol v2 REST API with the
//! health probes ([`v2`]), and Prometheus `/metrics` on its own port. Probe
//! answers come from in-memory state, so a probe never waits on a load.

mod shm;
pub mod v2;

use std::sync::Arc;

use axum::Router;
use axum::extract::{RawPathParams, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, get, post};

use crate::health::Health;
use crate::pipeline::Pipeline;

#[derive(Clone)]
pub struct HttpState {
    pub pipeline: Pipeline,
    /// The cached readiness verdict.
    pub health: Arc<Health>,
    /// Largest request body accepted (the same limit as gRPC messages).
    pub max_body_bytes: usize,
    /// The system shared-memory regions (shared with the gRPC edge).
    pub shm: Arc<crate::oip::shm::SharedMemory>,
}

/// Every route of the HTTP port: its template and its handlers. The
/// router is built from this list, and the gate's group table
/// (`security::groups::HTTP_ROUTES`) is tested against it both ways.
fn routes() -> Vec<(&'static str, MethodRouter<HttpState>)> {
    vec![
        ("/v2", get(v2::server_metadata)),
        ("/v2/health/live", get(|| async { StatusCode::OK })),
        ("/v2/health/ready", get(ready)),
        ("/v2/models/stats", get(v2::all_statistics)),
        ("/v2/models/{model}", get(v2::model_metadata)),
        ("/v2/models/{model}/ready", get(v2::model_ready)),
        ("/v2/models/{model}/config", get(v2::model_config)),
        ("/v2/models/{model}/stats", get(v2::model_statistics)),
        ("/v2/models/{model}/infer", post(v2::infer)),
        (
            "/v2/models/{model}/versions/{version}",
            get(v2::model_metadata),
        ),
        (
            "/v2/models/{model}/versions/{version}/ready",
            get(v2::model_ready),
        ),
        (
            "/v2/models/{model}/versions/{version}/config",
            get(v2::model_config),
        ),
        (
            "/v2/models/{model}/versions/{version}/stats",
            get(v2::model_statistics),
        ),
        (
            "/v2/models/{model}/versions/{version}/infer",
            post(v2::infer),
        ),
        ("/v2/repository/index", post(v2::repository_index)),
        (
            "/v2/repository/models/{model}/load",
            post(v2::repository_load),
        ),
        (
            "/v2/repository/models/{model}/unload",
            post(v2::repository_unload),
        ),
        ("/v2/systemsharedmemory/status", get(shm::status)),
        ("/v2/systemsharedmemory/unregister", post(shm::unregister)),
        (
            "/v2/systemsharedmemory/region/{region}/status",
            get(shm::status),
        ),
        (
            "/v2/systemsharedmemory/region/{region}/register",
            post(shm::register),
        ),
        (
            "/v2/systemsharedmemory/region/{region}/unregister",
            post(shm::unregister),
        ),
        ("/v2/cudasharedmemory/status", get(shm::cuda)),
        ("/v2/cudasharedmemory/unregister", post(shm::cuda)),
        (
            "/v2/cudasharedmemory/region/{region}/status",
            get(shm::cuda),
        ),
        (
            "/v2/cudasharedmemory/region/{region}/register",
            post(shm::cuda),
        ),
        (
            "/v2/cudasharedmemory/region/{region}/unregister",
            post(shm::cuda),
        ),
    ]
}

/// The routes of the metrics port.
fn metrics_routes() -> Vec<(&'static str, MethodRouter<HttpState>)> {
    vec![("/metrics", get(metrics))]
}

fn build(routes: Vec<(&'static str, MethodRouter<HttpState>)>, state: HttpState) -> Router {
    let mut router = Router::new();
    for (template, handlers) in routes {
        router = router.route(template, handlers);
    }
    router
        .route_layer(axum::middleware::from_fn(refuse_empty_segments))
        .fallback(v2::not_found)
        .with_state(state)
}

/// The inference API on the HTTP port.
pub fn router(state: HttpState) -> Router {
    build(routes(), state)
}

/// Prometheus text on the metrics port.
pub fn metrics_router(state: HttpState) -> Router {
    build(metrics_routes(), state)
}

/// axum matches an empty `{model}` or `{version}` segment
/// (`/v2/models/m/versions//infer`); no handler should see one, so it is
/// refused here, after the gate and before any body is read.
async fn refuse_empty_segments(
    params: RawPathParams,
    request: axum::extract::Request,
    next: Next,
) -> axum::response::Response {
    if let Some((key, _)) = params.iter().find(|(_, value)| value.is_empty()) {
        return v2::ApiError(
            StatusCode::BAD_REQUEST,
            format!("the {key} segment of the path is empty: expected a {key} name"),
        )
        .into_response();
    }
    next.run(request).await
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
    let text = tokio::task::spawn_blocking(move || crate::metrics::render(&pipeline))
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

    /// Every served route has a group, and every grouped template is a
    /// route: the gate, which fails closed, never refuses a real route
    /// for want of a group, and the table names nothing unserved.
    #[test]
    fn the_group_table_and_the_routes_agree_both_ways() {
        let served: Vec<&str> = routes()
            .into_iter()
            .chain(metrics_routes())
            .map(|(template, _)| template)
            .collect();
        for template in &served {
            assert!(
                crate::security::http_group(template).is_some(),
                "route {template} has no API group"
            );
        }
        for (template, group) in HTTP_ROUTES {
            assert!(
                served.contains(template),
                "the table gives {template} to {group}, but no route serves it"
            );
        }
    }

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
            pipeline: Pipeline::new(registry, host, Default::default()),
            health: Arc::new(Health::default()),
            max_body_bytes: 1 << 20,
            shm: Default::default(),
        };
        for (template, group) in HTTP_ROUTES {
            let path = template
                .replace("{model}", "no_such_model")
                .replace("{version}", "1")
                .replace("{region}", "no_such_region");
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
