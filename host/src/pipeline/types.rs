//! The pipeline's vocabulary: its settings, what the edges hand it and get
//! back, the shared state behind [`Pipeline`], and the records its parts
//! pass each other (request events, mirrored runs). A leaf of the pipeline:
//! the request flow (`mod.rs`), orchestration, mirroring and events all
//! build on it, and it imports none of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::config::ModelConfig;
use crate::plugin::{Candidates, MirrorTarget, PluginHost, RequestEvent};
use crate::registry::{ReadySet, Registry};
use crate::telemetry::{Origin, Traces};
use crate::tensor::Tensor;
use opentelemetry::trace::SpanContext;

/// Request events waiting for the metrics plugins; more are dropped and counted.
pub const EVENT_QUEUE: usize = 8192;
/// Mirrored runs waiting to start; more are dropped and counted.
pub const MIRROR_QUEUE: usize = 256;

/// What a nested call's event is tagged with: the client's request id,
/// the orchestrator entry and the depth.
pub type NestedTag = (String, String, u32);

/// What a pipeline is told at its start.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// How deep orchestrators' model calls nest (`--max-call-depth`; 0
    /// refuses every nested call).
    pub max_call_depth: u32,
    /// The longest a mirrored run may take, on any target
    /// (`--mirror-timeout-s`): a stuck one then gives its slot back.
    pub mirror_timeout: Duration,
    /// Where requests' spans go; `None`: tracing is off.
    pub traces: Option<Arc<Traces>>,
}

impl Default for PipelineSettings {
    fn default() -> PipelineSettings {
        PipelineSettings {
            max_call_depth: crate::plugin::DEFAULT_MAX_DEPTH,
            mirror_timeout: Duration::from_secs(30),
            traces: None,
        }
    }
}

/// One inference as the edges hand it over.
#[derive(Debug, Clone, Default)]
pub struct PipelineRequest {
    pub id: String,
    pub model: String,
    /// `None` lets the router (or the newest ready version) decide.
    pub version: Option<String>,
    pub inputs: Vec<Tensor>,
    /// Request headers and parameters, for the router and processors.
    pub metadata: Vec<(String, String)>,
    /// The longest the request may wait in the model's queue.
    pub timeout: Option<Duration>,
    /// Set when an orchestrator makes the request: it skips the router.
    pub nested: Option<Nesting>,
    /// The edge it came by, for its trace (`kserve-v2-grpc`, …).
    pub protocol: &'static str,
    /// Where its trace comes from: by default the client's `traceparent`.
    pub trace: Origin,
}

/// Where a request an orchestrator makes comes from.
#[derive(Debug, Clone)]
pub struct Nesting {
    /// How deep it is: 1 for a call made while answering a client.
    pub depth: u32,
    /// When the client's request must be answered by.
    pub deadline: Instant,
    /// The client's request id and the orchestrator entry that made the
    /// call; `None` for a mirrored run, which no orchestrator made.
    pub parent: Option<(String, String)>,
}

impl Nesting {
    /// A mirrored run: it never loads a model on demand (nor refreshes its
    /// place in the eviction order), and it is not a client request of its
    /// target in the request events (it is counted as a mirror instead).
    pub fn is_mirror(&self) -> bool {
        self.parent.is_none()
    }
}

/// What a request got: the outputs, with the model, version and config
/// that computed them. The config is the one the request ran on; a reload
/// may have replaced the registry's since, so the edges render from this.
#[derive(Debug, Clone)]
pub struct PipelineResponse {
    pub model: String,
    pub version: String,
    pub config: Arc<ModelConfig>,
    pub outputs: Vec<Tensor>,
}

#[derive(Clone)]
pub struct Pipeline {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) registry: Registry,
    pub(super) plugins: Arc<PluginHost>,
    pub(super) events: mpsc::Sender<(RequestEvent, Option<NestedTag>)>,
    pub(super) dropped_events: AtomicU64,
    /// Bidirectional streams open now.
    pub(super) open_streams: AtomicU64,
    /// The router's candidates, converted once per ready set: the set they
    /// were made from, and them.
    pub(super) candidates: ArcSwap<(Arc<ReadySet>, Arc<Candidates>)>,
    /// How deep orchestrators' model calls may nest.
    pub(super) max_call_depth: u32,
    pub(super) mirror_timeout: Duration,
    pub(super) traces: Option<Arc<Traces>>,
    /// Mirrored runs for the mirror task, and how they went.
    pub(super) mirrors: mpsc::Sender<MirrorJob>,
    pub(super) mirror_counts: MirrorCounts,
}

/// Counts a stream open for as long as its response side lives (it is
/// dropped when the stream ends, the client goes away or the server stops).
pub struct OpenStream(pub(super) Pipeline);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.inner.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").finish_non_exhaustive()
    }
}

/// Mirrored runs since startup.
#[derive(Debug, Default)]
pub struct MirrorCounts {
    pub(super) ok: AtomicU64,
    pub(super) failed: AtomicU64,
    /// Did not fit in the queue.
    pub(super) dropped: AtomicU64,
    pub(super) agreed: AtomicU64,
    pub(super) disagreed: AtomicU64,
}

/// A routed request's mirror targets, with its inputs as the client sent them.
pub struct MirrorPlan {
    pub(super) targets: Vec<MirrorTarget>,
    pub(super) inputs: Vec<Tensor>,
}

/// One mirrored run to make, off the response path.
pub struct MirrorJob {
    pub(super) target: MirrorTarget,
    pub(super) id: String,
    pub(super) metadata: Vec<(String, String)>,
    pub(super) inputs: Vec<Tensor>,
    pub(super) primary_model: String,
    pub(super) primary_version: String,
    pub(super) primary_outputs: Vec<Tensor>,
    pub(super) primary_latency: Duration,
    /// The primary's request span, when it was traced.
    pub(super) primary_span: Option<SpanContext>,
}

/// A snapshot of the mirrored runs since startup, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MirrorTotals {
    pub ok: u64,
    pub failed: u64,
    pub dropped: u64,
    pub agreed: u64,
    pub disagreed: u64,
}

impl MirrorCounts {
    pub(super) fn totals(&self) -> MirrorTotals {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        MirrorTotals {
            ok: read(&self.ok),
            failed: read(&self.failed),
            dropped: read(&self.dropped),
            agreed: read(&self.agreed),
            disagreed: read(&self.disagreed),
        }
    }
}
