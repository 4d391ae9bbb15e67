//! The HTTP edge (axum): health probes. Answers come from in-memory state,
//! so a probe never waits on a load.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

#[derive(Clone)]
pub struct HttpState {
    pub registry: Registry,
    /// True once the startup loads have finished.
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(ready))
        .with_state(state)
}

async fn ready(State(state): State<HttpState>) -> StatusCode {
    if state.ready.load(Ordering::Acquire) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

pub async fn serve(listener: TcpListener, state: HttpState, shutdown: CancellationToken) {
    let res = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(err) = res {
        tracing::error!(%err, "HTTP server failed");
    }
}
