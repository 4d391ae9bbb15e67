//! The host's side of the records that cross the plugin boundary. Callers
//! outside the plugin layer fill and read these; `calls.rs` converts them to
//! and from the WIT types, which stay private to the plugin layer.

use std::time::Duration;

use plinth_core::error::Error;

use super::runtime::PluginKind;

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
