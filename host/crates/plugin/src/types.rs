//! The host's side of the records that cross the plugin boundary, and the
//! plugin kinds. Callers outside the plugin layer fill and read these;
//! `convert.rs` converts them to and from the WIT types, which stay private
//! to the plugin layer. What the host hands an orchestrator to call models
//! with is here too. This module uses no other module of the crate.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plinth_core::error::Error;
use plinth_core::tensor::Tensor;

/// The world a plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PluginKind {
    Router,
    Processor,
    Metrics,
    Health,
    /// Served as a model; calls other models (0.1.1).
    Orchestrator,
}

impl PluginKind {
    /// Every kind, in the order `inspect` looks for them.
    pub const ALL: [PluginKind; 5] = [
        PluginKind::Router,
        PluginKind::Processor,
        PluginKind::Metrics,
        PluginKind::Health,
        PluginKind::Orchestrator,
    ];

    pub fn world(self) -> &'static str {
        match self {
            PluginKind::Router => "router-plugin",
            PluginKind::Processor => "processor-plugin",
            PluginKind::Metrics => "metrics-plugin",
            PluginKind::Health => "health-plugin",
            PluginKind::Orchestrator => "orchestrator-plugin",
        }
    }

    pub(super) fn interface(self) -> &'static str {
        match self {
            PluginKind::Router => "router",
            PluginKind::Processor => "processor",
            PluginKind::Metrics => "metrics",
            PluginKind::Health => "health",
            PluginKind::Orchestrator => "orchestrator",
        }
    }

    /// Metrics and health plugins keep state across calls: they get exactly
    /// one instance and calls to them are serialised.
    pub(super) fn stateful(self) -> bool {
        matches!(self, PluginKind::Metrics | PluginKind::Health)
    }
}

/// The request as a plugin sees it.
#[derive(Debug, Clone, Default)]
pub struct RequestView {
    pub id: String,
    pub model: String,
    pub version: Option<String>,
    pub metadata: Vec<(String, String)>,
}

/// What `describe` returned: the plugin's own name, version and summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginInfo {
    pub name: String,
    /// Semver, checked at load.
    pub version: String,
    pub description: String,
}

/// The answer a plugin gives instead of a result (WIT `plugin-error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginError {
    /// The request is wrong; the client gets INVALID_ARGUMENT.
    InvalidInput(String),
    /// The request cannot be served now; the client gets UNAVAILABLE.
    Unavailable(String),
    /// A bug in the plugin; the client gets INTERNAL.
    Internal(String),
}

impl PluginError {
    /// The plugin's own words, without the class.
    pub fn message(&self) -> &str {
        match self {
            PluginError::InvalidInput(msg)
            | PluginError::Unavailable(msg)
            | PluginError::Internal(msg) => msg,
        }
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginError::InvalidInput(msg) => write!(f, "invalid input: {msg}"),
            PluginError::Unavailable(msg) => write!(f, "unavailable: {msg}"),
            PluginError::Internal(msg) => write!(f, "internal error: {msg}"),
        }
    }
}

/// A model a router may send a request to: its name and its ready version
/// labels, oldest to newest (WIT `model-ref`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelChoice {
    pub name: String,
    pub versions: Vec<String>,
}

/// Where a router sends a request; `version: None` lets the host pick the
/// newest ready version (WIT `route-decision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteDecision {
    pub model: String,
    pub version: Option<String>,
}

/// How a request ended, as metrics plugins see it (WIT `request-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStatus {
    Ok,
    InvalidInput,
    NotFound,
    Unavailable,
    DeadlineExceeded,
    Cancelled,
    Internal,
}

impl RequestStatus {
    /// The status a failed request reports, by the code its error maps to.
    pub fn of_error(err: &Error) -> RequestStatus {
        match err {
            Error::InvalidArgument(_) => RequestStatus::InvalidInput,
            Error::ModelNotFound { .. } | Error::VersionNotFound { .. } | Error::NotFound(_) => {
                RequestStatus::NotFound
            }
            Error::ModelNotReady { .. } | Error::Unavailable(_) | Error::ResourceExhausted(_) => {
                RequestStatus::Unavailable
            }
            Error::DeadlineExceeded(_) => RequestStatus::DeadlineExceeded,
            Error::Cancelled => RequestStatus::Cancelled,
            _ => RequestStatus::Internal,
        }
    }
}

/// Time a request spent in each stage; a stage that did not run is zero.
/// Plugins get whole microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageTimings {
    pub queue: Duration,
    pub preprocess: Duration,
    pub compute: Duration,
    pub postprocess: Duration,
    pub total: Duration,
}

/// One finished request, handed to metrics plugins (WIT `request-event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestEvent {
    /// The model after routing.
    pub model: String,
    /// The version that served it; `None` when none was reached.
    pub version: Option<String>,
    pub status: RequestStatus,
    pub timings: StageTimings,
    /// Requests in the batch it ran in; 0 when it never reached the model.
    pub batch_size: u32,
}

/// A model a routed request also runs on (WIT `mirror-target`, 0.1.1).
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorTarget {
    pub model: String,
    /// `None`: the newest ready version.
    pub version: Option<String>,
    /// Largest difference, element by element, at which the mirror's
    /// outputs still agree with the primary's.
    pub tolerance: f64,
}

/// A request an orchestrator made, with what it was made for (WIT
/// `nested-event`, 0.1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NestedEvent {
    pub parent_id: String,
    pub parent_model: String,
    pub depth: u32,
    pub event: RequestEvent,
}

/// One mirrored run, handed to metrics plugins that count them (WIT
/// `mirror-event`, 0.1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorEvent {
    pub primary_model: String,
    pub primary_version: Option<String>,
    pub model: String,
    pub version: Option<String>,
    pub status: RequestStatus,
    pub latency: std::time::Duration,
    pub primary_latency: std::time::Duration,
    /// `None` when either run failed.
    pub agree: Option<bool>,
}

/// Lifecycle of one model version in a health snapshot (WIT `model-state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelPhase {
    Loading,
    Ready,
    Unloading,
    /// The last load failed, with the reason.
    Failed(String),
}

/// State and load of one model version (WIT `model-status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelStatus {
    pub name: String,
    pub version: String,
    pub phase: ModelPhase,
    pub queue_depth: u32,
    pub in_flight: u32,
    pub requests: u64,
    pub failures: u64,
}

/// Call counts of one loaded plugin (WIT `plugin-status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginStatus {
    pub name: String,
    pub version: String,
    pub kind: PluginKind,
    pub calls: u64,
    pub errors: u64,
}

/// Memory of one compute device (WIT `device-memory`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMemory {
    pub device: String,
    pub used_bytes: u64,
    pub total_bytes: u64,
}

/// What a health plugin judges (WIT `host-snapshot`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSnapshot {
    pub uptime: Duration,
    pub models: Vec<ModelStatus>,
    pub plugins: Vec<PluginStatus>,
    pub devices: Vec<DeviceMemory>,
}

/// A health plugin's verdict (WIT `health-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    Ready,
    Degraded,
    NotReady,
}

/// A health plugin's verdict and why (WIT `health-report`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    pub status: HealthStatus,
    pub message: String,
}

/// A boxed, sendable future: what [`ModelCaller::infer`] returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A model call an orchestrator makes.
#[derive(Debug)]
pub struct NestedCall {
    /// The request the orchestrator is answering.
    pub parent: RequestView,
    /// 1 for a call made while answering a client's request, 2 for one made
    /// by an orchestrator that was itself called by one, and so on.
    pub depth: u32,
    pub model: String,
    /// `None`: the newest ready version.
    pub version: Option<String>,
    pub inputs: Vec<Tensor>,
    /// When the client's request must be answered by.
    pub deadline: Instant,
}

/// The host's models, as orchestrators call them. The host's pipeline
/// implements it: a nested call runs the model's processors, the model and
/// its statistics, as a client request would, without the router.
pub trait ModelCaller: Send + Sync + 'static {
    fn infer(&self, call: NestedCall) -> BoxFuture<Result<Vec<Tensor>, Error>>;
}

/// What one run of an orchestrator is given.
#[derive(Clone)]
pub struct RunContext {
    pub caller: Arc<dyn ModelCaller>,
    /// The depth of the request being answered: 0 for a client's.
    pub depth: u32,
    /// The most a nested call may be ([`NestedCall::depth`]).
    pub max_depth: u32,
    /// When the client's request must be answered by.
    pub deadline: Instant,
}

impl std::fmt::Debug for RunContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunContext")
            .field("depth", &self.depth)
            .field("max_depth", &self.max_depth)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_status_follows_the_error_code() {
        let cases = [
            (
                Error::InvalidArgument("x".into()),
                RequestStatus::InvalidInput,
            ),
            (Error::NotFound("x".into()), RequestStatus::NotFound),
            (Error::Unavailable("x".into()), RequestStatus::Unavailable),
            (
                Error::ResourceExhausted("x".into()),
                RequestStatus::Unavailable,
            ),
            (
                Error::DeadlineExceeded("x".into()),
                RequestStatus::DeadlineExceeded,
            ),
            (Error::Cancelled, RequestStatus::Cancelled),
            (Error::Internal("x".into()), RequestStatus::Internal),
            (
                Error::FailedPrecondition("x".into()),
                RequestStatus::Internal,
            ),
        ];
        for (err, want) in cases {
            assert_eq!(RequestStatus::of_error(&err), want, "{err:?}");
        }
    }
}
