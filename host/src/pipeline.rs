//! The request path every edge calls: router plugin, the model's preprocess
//! chain, the model, its postprocess chain, and a request event for the
//! metrics plugins.
//!
//! Plugin calls run inline on the request's task: each is bounded by its
//! epoch deadline (50 ms unless its manifest says otherwise) and typically
//! takes microseconds, which a hop to another thread would dwarf.
//!
//! Events go to metrics plugins through a bounded channel with `try_send`: a
//! request never waits on metrics, and events that do not fit are counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::config::ModelConfig;
use crate::error::Error;
use crate::plugin::{
    BoxFuture, Candidates, Manifest, MirrorEvent, MirrorTarget, ModelCaller, NestedCall,
    NestedEvent, OnError, PluginHost, PluginMeta, RequestEvent, RequestStatus, RequestView,
    RunContext, Stage, StageTimings, kind,
};
use crate::registry::{ReadyModel, ReadySet, Registry, RequestRecord};
use crate::tensor::Tensor;

const EVENT_QUEUE: usize = 8192;
const EVENT_BATCH: usize = 512;
/// How long a batch of events may wait to fill up. Metrics are scraped
/// seconds apart; handing them over one by one would cost a thread hop and a
/// guest call per request.
const EVENT_FLUSH: Duration = Duration::from_millis(50);

/// Mirrored runs waiting to start; more are dropped and counted.
const MIRROR_QUEUE: usize = 256;
/// Mirrored runs in flight at once.
const MIRROR_CONCURRENCY: usize = 4;
/// What a pipeline is told at its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineSettings {
    /// How deep orchestrators' model calls nest (`--max-call-depth`; 0
    /// refuses every nested call).
    pub max_call_depth: u32,
    /// The longest a mirrored run may take, on any target
    /// (`--mirror-timeout-s`): a stuck one then gives its slot back.
    pub mirror_timeout: Duration,
}

impl Default for PipelineSettings {
    fn default() -> PipelineSettings {
        PipelineSettings {
            max_call_depth: crate::plugin::DEFAULT_MAX_DEPTH,
            mirror_timeout: Duration::from_secs(30),
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

/// The request's `grpc-timeout` (gRPC metadata is a header), read by the
/// gRPC grammar; `None` when absent or malformed.
fn grpc_timeout(metadata: &[(String, String)]) -> Option<Duration> {
    let (_, value) = metadata.iter().find(|(key, _)| key == "grpc-timeout")?;
    plinth_core::deadline::parse_grpc_timeout(value)
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

/// The `timeout` request parameter, as Triton reads it: microseconds the
/// request may wait in the model's queue. `None` when absent.
pub fn queue_timeout(value: Option<&str>) -> Result<Option<Duration>, Error> {
    let Some(text) = value else {
        return Ok(None);
    };
    match text.trim().parse::<u64>() {
        Ok(us) if us > 0 => Ok(Some(Duration::from_micros(us))),
        _ => Err(Error::InvalidArgument(format!(
            "parameter 'timeout': expected a positive number of microseconds, got {text:?}"
        ))),
    }
}

#[derive(Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    plugins: Arc<PluginHost>,
    events: mpsc::Sender<(RequestEvent, Option<NestedTag>)>,
    dropped_events: AtomicU64,
    /// Bidirectional streams open now.
    open_streams: AtomicU64,
    /// The router's candidates, converted once per ready set: the set they
    /// were made from, and them.
    candidates: ArcSwap<(Arc<ReadySet>, Arc<Candidates>)>,
    /// How deep orchestrators' model calls may nest.
    max_call_depth: u32,
    mirror_timeout: Duration,
    /// Mirrored runs for the mirror task, and how they went.
    mirrors: mpsc::Sender<MirrorJob>,
    mirror_counts: MirrorCounts,
}

/// What a nested call's event is tagged with: the client's request id,
/// the orchestrator entry and the depth.
type NestedTag = (String, String, u32);

/// Mirrored runs since startup.
#[derive(Debug, Default)]
struct MirrorCounts {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Did not fit in the queue.
    dropped: AtomicU64,
    agreed: AtomicU64,
    disagreed: AtomicU64,
}

/// A routed request's mirror targets, with its inputs as the client sent them.
struct MirrorPlan {
    targets: Vec<MirrorTarget>,
    inputs: Vec<Tensor>,
}

/// One mirrored run to make, off the response path.
struct MirrorJob {
    target: MirrorTarget,
    id: String,
    metadata: Vec<(String, String)>,
    inputs: Vec<Tensor>,
    primary_model: String,
    primary_version: String,
    primary_outputs: Vec<Tensor>,
    primary_latency: Duration,
}

/// Counts a stream open for as long as its response side lives (it is
/// dropped when the stream ends, the client goes away or the server stops).
pub struct OpenStream(Pipeline);

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

/// `err` with the model named, for errors raised before anything knew the
/// model (a tensor that did not decode, say). Errors that name it already
/// are left alone.
fn name_model(model: &str, err: Error) -> Error {
    let named = |message: String| {
        if model.is_empty()
            || message.contains(&format!("model '{model}'"))
            || message.contains(&format!("model '{model}:"))
        {
            message
        } else {
            format!("model '{model}': {message}")
        }
    };
    match err {
        Error::InvalidArgument(m) => Error::InvalidArgument(named(m)),
        Error::FailedPrecondition(m) => Error::FailedPrecondition(named(m)),
        Error::ResourceExhausted(m) => Error::ResourceExhausted(named(m)),
        Error::Unavailable(m) => Error::Unavailable(named(m)),
        Error::DeadlineExceeded(m) => Error::DeadlineExceeded(named(m)),
        Error::LoadFailed(m) => Error::LoadFailed(named(m)),
        Error::NotFound(m) => Error::NotFound(named(m)),
        Error::Internal(m) => Error::Internal(named(m)),
        named_already @ (Error::ModelNotFound { .. }
        | Error::VersionNotFound { .. }
        | Error::ModelNotReady { .. }
        | Error::AlreadyExists { .. }
        | Error::Cancelled) => named_already,
    }
}

#[derive(Default)]
struct Timings {
    pre: Duration,
    queue: Duration,
    compute: Duration,
    post: Duration,
    version: Option<String>,
    batch_size: u32,
    /// The model the request reached, for its statistics.
    model: Option<Arc<ReadyModel>>,
    executed: bool,
    executed_rows: u64,
    leader: bool,
    /// Where the router mirrors the request, if anywhere.
    mirror: Option<MirrorPlan>,
}

/// Whether a failed call may be skipped: the plugin asked for it, and the
/// failure is the plugin's, not its verdict that the request is invalid.
fn skippable(manifest: &Manifest, err: &Error) -> bool {
    manifest.on_error == OnError::Skip && !matches!(err, Error::InvalidArgument(_))
}

fn skipped(plugin: &PluginMeta, stage: &str, err: &Error) {
    plugin
        .stats
        .skips
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(plugin = %plugin.name, stage, %err, "plugin failed; skipped (on_error = \"skip\")");
}

impl Pipeline {
    /// Starts the task that feeds request events to the metrics plugins and
    /// the one that runs mirrored requests.
    pub fn new(
        registry: Registry,
        plugins: Arc<PluginHost>,
        settings: PipelineSettings,
    ) -> Pipeline {
        let (events, rx) = mpsc::channel(EVENT_QUEUE);
        tokio::spawn(feed_metrics(Arc::clone(&plugins), rx));
        let (mirrors, mirror_rx) = mpsc::channel(MIRROR_QUEUE);
        let pipeline = Pipeline {
            inner: Arc::new(Inner {
                registry,
                plugins,
                events,
                dropped_events: AtomicU64::new(0),
                open_streams: AtomicU64::new(0),
                candidates: ArcSwap::from_pointee((
                    Arc::new(ReadySet::default()),
                    Arc::new(Candidates::default()),
                )),
                max_call_depth: settings.max_call_depth,
                mirror_timeout: settings.mirror_timeout,
                mirrors,
                mirror_counts: MirrorCounts::default(),
            }),
        };
        tokio::spawn(run_mirrors(Arc::downgrade(&pipeline.inner), mirror_rx));
        pipeline
    }

    /// How deep orchestrators' model calls may nest.
    pub fn max_call_depth(&self) -> u32 {
        self.inner.max_call_depth
    }

    /// Counts a stream as open until the guard is dropped.
    pub fn open_stream(&self) -> OpenStream {
        self.inner.open_streams.fetch_add(1, Ordering::Relaxed);
        OpenStream(self.clone())
    }

    pub fn open_streams(&self) -> u64 {
        self.inner.open_streams.load(Ordering::Relaxed)
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub fn plugins(&self) -> &Arc<PluginHost> {
        &self.inner.plugins
    }

    /// Request events that did not fit in the metrics queue.
    pub fn dropped_events(&self) -> u64 {
        self.inner.dropped_events.load(Ordering::Relaxed)
    }

    /// Runs one request through the router, the model's chains and the model.
    pub async fn infer(&self, request: PipelineRequest) -> Result<PipelineResponse, Error> {
        self.infer_then(request, Ok).await
    }

    /// [`Pipeline::infer`], then `answer` (the edge rendering the response
    /// for its wire) as part of the same request: a request counts as
    /// failed, in the model's counts and its statistics, if `answer` fails.
    pub async fn infer_then<T>(
        &self,
        request: PipelineRequest,
        answer: impl FnOnce(PipelineResponse) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let started = Instant::now();
        let mut timings = Timings::default();
        let asked = (request.model.clone(), request.version.clone());
        let mut view = RequestView {
            id: request.id,
            model: request.model,
            version: request.version,
            metadata: request.metadata,
        };
        let mirrored = request.nested.as_ref().is_some_and(Nesting::is_mirror);
        let tag = request.nested.as_ref().and_then(|nesting| {
            let (id, model) = nesting.parent.clone()?;
            Some((id, model, nesting.depth))
        });
        let res = self
            .run(
                &mut view,
                request.inputs,
                request.timeout,
                request.nested,
                &mut timings,
            )
            .await;
        if let (Ok(response), Some(plan)) = (&res, timings.mirror.take()) {
            self.enqueue_mirrors(plan, &view, response, started.elapsed());
        }
        let res = res.and_then(|response| {
            let model = response.model.clone();
            answer(response).map_err(|err| name_model(&model, err))
        });
        let total = started.elapsed();
        // A request that failed before reaching a model (the router failed,
        // say) is a failure of the model the client asked for.
        let reached = match timings.model.take() {
            Some(model) => Some((model, timings.version.clone().or(view.version.clone()))),
            None if res.is_err() => self
                .inner
                .registry
                .serving(&asked.0)
                .map(|model| (model, asked.1.clone())),
            None => None,
        };
        if let Some((model, version)) = reached {
            model.record(
                version.as_deref(),
                &RequestRecord {
                    ok: res.is_ok(),
                    executed: timings.executed,
                    total,
                    queue: timings.queue,
                    compute_input: timings.pre,
                    compute_infer: timings.compute,
                    compute_output: timings.post,
                    batch_size: u64::from(timings.batch_size),
                    executed_rows: timings.executed_rows,
                    leader: timings.leader,
                },
            );
        }
        // A mirrored run reaches metrics plugins as a mirror event (see
        // `mirror`), never as a client request of its target.
        if mirrored {
            return res;
        }
        let status = match &res {
            Ok(_) => RequestStatus::Ok,
            Err(err) => RequestStatus::of_error(err),
        };
        self.send_event(
            RequestEvent {
                model: view.model.clone(),
                version: timings.version.take().or(view.version.clone()),
                status,
                timings: StageTimings {
                    queue: timings.queue,
                    preprocess: timings.pre,
                    compute: timings.compute,
                    postprocess: timings.post,
                    total,
                },
                batch_size: timings.batch_size,
            },
            tag,
        );
        res
    }

    /// Refuses a request to `model` (at `version`) before it reaches the
    /// pipeline, because the edge could not decode it: the refusal counts as
    /// a failed request of the model if it is loaded, exactly as a failure
    /// inside the pipeline does, and the message names the model.
    pub fn reject(&self, model: &str, version: Option<&str>, err: Error) -> Error {
        let err = name_model(model, err);
        if model.is_empty() {
            return err;
        }
        if let Some(ready) = self.inner.registry.serving(model) {
            // Not ok, nothing ran: a failure and nothing else.
            ready.record(version, &RequestRecord::default());
        }
        self.send_event(
            RequestEvent {
                model: model.to_owned(),
                version: version.map(str::to_owned),
                status: RequestStatus::of_error(&err),
                timings: StageTimings {
                    queue: Duration::ZERO,
                    preprocess: Duration::ZERO,
                    compute: Duration::ZERO,
                    postprocess: Duration::ZERO,
                    total: Duration::ZERO,
                },
                batch_size: 0,
            },
            None,
        );
        err
    }

    fn send_event(&self, event: RequestEvent, tag: Option<NestedTag>) {
        if self.inner.events.try_send((event, tag)).is_err() {
            self.inner.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn run(
        &self,
        view: &mut RequestView,
        inputs: Vec<Tensor>,
        timeout: Option<Duration>,
        nested: Option<Nesting>,
        timings: &mut Timings,
    ) -> Result<PipelineResponse, Error> {
        // The client's deadline: Triton's `timeout` parameter or the gRPC
        // deadline, whichever is sooner. A plain model's request waits in
        // the queue no longer; an orchestrator's whole call is bounded by it.
        let timeout = [timeout, grpc_timeout(&view.metadata)]
            .into_iter()
            .flatten()
            .min();
        if nested.is_some() {
            // An orchestrator named the model: no router second-guesses it.
        } else if let Some(router) = self.inner.plugins.router() {
            let candidates = self.candidates();
            match router.route(view, &candidates) {
                Ok(decision) => {
                    if router.mirrors_requests() {
                        match router.mirrors(view, &decision) {
                            Ok(targets) if !targets.is_empty() => {
                                timings.mirror = Some(MirrorPlan {
                                    targets,
                                    // Reference-counted: no copy.
                                    inputs: inputs.clone(),
                                });
                            }
                            Ok(_) => {}
                            // Mirrors never fail the primary.
                            Err(err) => {
                                tracing::warn!(%err, "mirror targets not known; not mirrored")
                            }
                        }
                    }
                    view.model = decision.model;
                    view.version = decision.version;
                }
                // Fail-open: the request goes where it asked to.
                Err(err) if skippable(&router.manifest, &err) => skipped(&router, "route", &err),
                Err(err) => return Err(err),
            }
        } else if let Some((name, known)) = self.inner.plugins.router_compiling() {
            // Never routed around: a router on its way is waited for.
            return Err(Error::Unavailable(if known {
                format!("router plugin '{name}' is compiling: requests are refused until it serves")
            } else {
                format!(
                    "plugin '{name}' is loading and may be a router: requests are refused until it is known"
                )
            }));
        }
        let mirrored = nested.as_ref().is_some_and(Nesting::is_mirror);
        let model = if mirrored {
            // Only a model that is loaded: a mirror never loads one on
            // demand, which could evict the primary's idle models.
            self.inner.registry.get_ready(&view.model)?
        } else {
            self.inner
                .registry
                .ready_for_request(&view.model, timeout)
                .await?
        };
        timings.model = Some(Arc::clone(&model));
        let t = Instant::now();
        let inputs = self.chain(&model, Stage::Pre, view, inputs)?;
        timings.pre = t.elapsed();
        timings.batch_size = match (model.config.max_batch_size, inputs.first()) {
            (0, _) | (_, None) => 1,
            (_, Some(first)) => first
                .shape()
                .first()
                .map_or(1, |n| u32::try_from(*n).unwrap_or(u32::MAX)),
        };
        let (version, outputs) = if let Some(plugin) = &model.config.orchestrator {
            let t = Instant::now();
            let in_flight = model.in_flight_guard();
            let outputs = self
                .orchestrate(&model, plugin, view, inputs, timeout, nested)
                .await;
            drop(in_flight);
            let outputs = outputs?;
            timings.compute = t.elapsed();
            timings.executed_rows = u64::from(timings.batch_size);
            timings.leader = true;
            (model.pick_version(None)?.version.label.clone(), outputs)
        } else {
            let inference = model
                .infer(view.version.as_deref(), inputs, timeout)
                .await?;
            timings.queue = inference.queue;
            timings.compute = inference.compute;
            timings.executed_rows = u64::try_from(inference.batch_rows).unwrap_or(u64::MAX);
            timings.leader = inference.leader;
            (inference.version, inference.outputs)
        };
        timings.executed = true;
        timings.version = Some(version.clone());
        let request_version = view.version.replace(version.clone());
        let t = Instant::now();
        let outputs = self.chain(&model, Stage::Post, view, outputs);
        view.version = request_version;
        timings.post = t.elapsed();
        Ok(PipelineResponse {
            model: model.name.clone(),
            version,
            config: Arc::clone(&model.config),
            outputs: outputs?,
        })
    }

    /// Answers a request to an orchestrator entry: its inputs checked
    /// against the entry's, its plugin run with this pipeline as the way to
    /// the models, and what the plugin returns checked against the entry's
    /// outputs. The request's deadline is the client's (`timeout`, else
    /// `grpc-timeout`), else the entry's `request_timeout_ms`; a nested one
    /// keeps its parent's.
    async fn orchestrate(
        &self,
        model: &ReadyModel,
        plugin: &str,
        view: &RequestView,
        inputs: Vec<Tensor>,
        timeout: Option<Duration>,
        nested: Option<Nesting>,
    ) -> Result<Vec<Tensor>, Error> {
        model.pick_version(view.version.as_deref())?;
        let orchestrator = self
            .inner
            .plugins
            .get(plugin)
            .ok_or_else(|| {
                Error::Unavailable(if self.inner.plugins.is_compiling(plugin) {
                    format!(
                        "model '{}': orchestrator plugin '{plugin}' is compiling; it serves once loaded",
                        model.name
                    )
                } else {
                    format!(
                        "model '{}': orchestrator plugin '{plugin}' is not loaded (no {plugin}.wasm in the plugin directory)",
                        model.name
                    )
                })
            })?
            .into_orchestrator()
            .map_err(|err| name_model(&model.name, err))?;
        let inputs = model.arrange_inputs(inputs)?;
        let (depth, deadline) = match nested {
            Some(nesting) => (nesting.depth, nesting.deadline),
            None => {
                let budget = timeout.unwrap_or(model.config.request_timeout);
                (
                    0,
                    plinth_core::deadline::deadline_after(Instant::now(), budget),
                )
            }
        };
        let context = RunContext {
            caller: Arc::new(self.clone()),
            depth,
            max_depth: self.inner.max_call_depth,
            deadline,
        };
        let outputs = orchestrator.run(view, inputs, context).await?;
        declared_outputs(model, plugin, outputs)
    }

    /// Queues a mirrored run per target of `plan`; what does not fit is
    /// dropped and counted. Never waits.
    fn enqueue_mirrors(
        &self,
        plan: MirrorPlan,
        view: &RequestView,
        primary: &PipelineResponse,
        primary_latency: Duration,
    ) {
        for target in plan.targets {
            let job = MirrorJob {
                target,
                id: view.id.clone(),
                metadata: view.metadata.clone(),
                inputs: plan.inputs.clone(),
                primary_model: primary.model.clone(),
                primary_version: primary.version.clone(),
                primary_outputs: primary.outputs.clone(),
                primary_latency,
            };
            if self.inner.mirrors.try_send(job).is_err() {
                self.inner
                    .mirror_counts
                    .dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Runs one mirrored request (the whole pipeline but the router) and
    /// tells the metrics plugins that count mirrors how it went.
    async fn mirror(&self, job: MirrorJob) {
        let started = Instant::now();
        // The mirror's deadline bounds every target, plain models too: a
        // stuck one gives its slot back when it runs out.
        let run = self.infer(PipelineRequest {
            id: job.id,
            model: job.target.model.clone(),
            version: job.target.version.clone(),
            inputs: job.inputs,
            metadata: job.metadata,
            timeout: Some(self.inner.mirror_timeout),
            nested: Some(Nesting {
                depth: 1,
                deadline: plinth_core::deadline::deadline_after(started, self.inner.mirror_timeout),
                parent: None,
            }),
        });
        let res = match tokio::time::timeout(self.inner.mirror_timeout, run).await {
            Ok(res) => res,
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "model '{}': the mirrored run did not finish within {} ms",
                job.target.model,
                self.inner.mirror_timeout.as_millis()
            ))),
        };
        let latency = started.elapsed();
        let counts = &self.inner.mirror_counts;
        let (status, version, agree) = match &res {
            Ok(response) => {
                counts.ok.fetch_add(1, Ordering::Relaxed);
                let agree = outputs_agree(
                    &job.primary_outputs,
                    &response.outputs,
                    job.target.tolerance,
                );
                let counter = if agree {
                    &counts.agreed
                } else {
                    &counts.disagreed
                };
                counter.fetch_add(1, Ordering::Relaxed);
                (
                    RequestStatus::Ok,
                    Some(response.version.clone()),
                    Some(agree),
                )
            }
            Err(err) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(model = %job.target.model, %err, "mirrored run failed");
                (RequestStatus::of_error(err), None, None)
            }
        };
        let event = MirrorEvent {
            primary_model: job.primary_model,
            primary_version: Some(job.primary_version),
            model: job.target.model,
            version: version.or(job.target.version),
            status,
            latency,
            primary_latency: job.primary_latency,
            agree,
        };
        let sinks: Vec<_> = self
            .inner
            .plugins
            .of_kind::<kind::Metrics>()
            .into_iter()
            .filter(|p| p.takes_context())
            .collect();
        if !sinks.is_empty() {
            let _ = tokio::task::spawn_blocking(move || {
                for sink in sinks {
                    let _ = sink.record_mirrors(std::slice::from_ref(&event));
                }
            })
            .await;
        }
    }

    /// The router's candidates for the registry's ready set as it stands:
    /// the ones made for it, or made now (once per change of the set).
    fn candidates(&self) -> Arc<Candidates> {
        let ready = self.inner.registry.ready_models();
        let cached = self.inner.candidates.load();
        if Arc::ptr_eq(&cached.0, &ready) {
            return Arc::clone(&cached.1);
        }
        let candidates = Arc::new(Candidates::new(
            ready
                .models
                .iter()
                .map(|(name, versions)| (name.as_str(), versions.as_slice())),
        ));
        self.inner
            .candidates
            .store(Arc::new((ready, Arc::clone(&candidates))));
        candidates
    }

    fn chain(
        &self,
        model: &ReadyModel,
        stage: Stage,
        view: &RequestView,
        mut tensors: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, Error> {
        let (names, label) = match stage {
            Stage::Pre => (&model.config.preprocess, "preprocess"),
            Stage::Post => (&model.config.postprocess, "postprocess"),
        };
        for name in names {
            let plugin = self.inner.plugins.get(name).ok_or_else(|| {
                if self.inner.plugins.is_compiling(name) {
                    Error::Unavailable(format!(
                        "model '{}': {label} plugin '{name}' is compiling; it serves once loaded",
                        model.name
                    ))
                } else {
                    Error::Unavailable(format!(
                        "model '{}': {label} plugin '{name}' is not loaded (no {name}.wasm in the plugin directory)",
                        model.name
                    ))
                }
            })?;
            let processor = plugin.into_kind::<kind::Processor>()?;
            if processor.manifest.on_error == OnError::Skip {
                // Tensors are reference-counted: keeping them costs no copy.
                let kept = tensors.clone();
                tensors = match processor.process(stage, view, tensors) {
                    Ok(out) => out,
                    Err(err) if skippable(&processor.manifest, &err) => {
                        skipped(&processor, label, &err);
                        kept
                    }
                    Err(err) => return Err(err),
                };
            } else {
                tensors = processor.process(stage, view, tensors)?;
            }
        }
        Ok(tensors)
    }

    /// Prometheus text of every metrics plugin, then the host's own counters
    /// about plugins. Blocking: call it off the tokio workers.
    pub fn render_plugin_metrics(&self) -> String {
        let mut text = String::new();
        for plugin in self.inner.plugins.of_kind::<kind::Metrics>() {
            match plugin.render() {
                Ok(rendered) => {
                    text.push_str(&rendered);
                    if !rendered.ends_with('\n') {
                        text.push('\n');
                    }
                }
                Err(err) => text.push_str(&format!(
                    "# plugin '{}' failed to render: {err}\n",
                    plugin.name
                )),
            }
        }
        text.push_str("# HELP plinth_metrics_events_dropped_total Request events dropped because the metrics queue was full.\n");
        text.push_str("# TYPE plinth_metrics_events_dropped_total counter\n");
        text.push_str(&format!(
            "plinth_metrics_events_dropped_total {}\n",
            self.dropped_events()
        ));
        let mirrors = &self.inner.mirror_counts;
        text.push_str("# HELP plinth_mirror_requests_total Mirrored runs of routed requests: ok, failed, or dropped because the mirror queue was full.\n");
        text.push_str("# TYPE plinth_mirror_requests_total counter\n");
        for (result, counter) in [
            ("ok", &mirrors.ok),
            ("failed", &mirrors.failed),
            ("dropped", &mirrors.dropped),
        ] {
            text.push_str(&format!(
                "plinth_mirror_requests_total{{result=\"{result}\"}} {}\n",
                counter.load(Ordering::Relaxed)
            ));
        }
        text.push_str("# HELP plinth_mirror_agreement_total Successful mirrored runs whose outputs agreed with the primary's within the target's tolerance, or not.\n");
        text.push_str("# TYPE plinth_mirror_agreement_total counter\n");
        for (result, counter) in [("agree", &mirrors.agreed), ("disagree", &mirrors.disagreed)] {
            text.push_str(&format!(
                "plinth_mirror_agreement_total{{result=\"{result}\"}} {}\n",
                counter.load(Ordering::Relaxed)
            ));
        }
        text.push_str("# HELP plinth_plugin_calls_total Calls into each plugin.\n# TYPE plinth_plugin_calls_total counter\n");
        let reports = self.inner.plugins.list();
        for report in reports.iter().filter_map(|r| r.plugin.as_ref()) {
            text.push_str(&format!(
                "plinth_plugin_calls_total{{plugin=\"{}\"}} {}\n",
                report.name,
                report.stats.calls.load(Ordering::Relaxed)
            ));
        }
        text.push_str("# HELP plinth_plugin_errors_total Failed calls into each plugin (traps, timeouts, memory, plugin errors).\n# TYPE plinth_plugin_errors_total counter\n");
        for report in reports.iter().filter_map(|r| r.plugin.as_ref()) {
            text.push_str(&format!(
                "plinth_plugin_errors_total{{plugin=\"{}\"}} {}\n",
                report.name,
                report.stats.errors.load(Ordering::Relaxed)
            ));
        }
        text.push_str("# HELP plinth_plugin_load_failures_total Plugin files that failed to load.\n# TYPE plinth_plugin_load_failures_total counter\n");
        text.push_str(&format!(
            "plinth_plugin_load_failures_total {}\n",
            self.inner.plugins.load_failures.load(Ordering::Relaxed)
        ));
        self.render_residency_metrics(&mut text);
        text
    }

    /// Each model's measured memory, the budget, and what on-demand
    /// residency did.
    fn render_residency_metrics(&self, text: &mut String) {
        use std::fmt::Write;
        let registry = &self.inner.registry;
        text.push_str("# HELP plinth_model_memory_bytes What each loaded model keeps in its device's memory: the bytes of its tensors, times its instances.\n# TYPE plinth_model_memory_bytes gauge\n");
        for status in registry.list() {
            if let Some(device) = &status.device {
                let _ = writeln!(
                    text,
                    "plinth_model_memory_bytes{{model=\"{}\",device=\"{device}\"}} {}",
                    status.name, status.memory_bytes
                );
            }
        }
        let counts = registry.residency_counts();
        if let Some(budget) = counts.budget_bytes {
            let _ = write!(
                text,
                "# HELP plinth_memory_budget_bytes The memory budget per device (--memory-budget-mib).\n# TYPE plinth_memory_budget_bytes gauge\nplinth_memory_budget_bytes {budget}\n"
            );
        }
        let _ = write!(
            text,
            "# HELP plinth_on_demand_requests_total Requests to on-demand models: found loaded (hit) or waited for a load (miss).\n# TYPE plinth_on_demand_requests_total counter\nplinth_on_demand_requests_total{{result=\"hit\"}} {}\nplinth_on_demand_requests_total{{result=\"miss\"}} {}\n",
            counts.hits, counts.misses
        );
        let _ = write!(
            text,
            "# HELP plinth_on_demand_loads_total Loads of on-demand models started by a request.\n# TYPE plinth_on_demand_loads_total counter\nplinth_on_demand_loads_total {}\n# HELP plinth_on_demand_load_seconds_total Time from the request that started an on-demand load to the model being ready, summed.\n# TYPE plinth_on_demand_load_seconds_total counter\nplinth_on_demand_load_seconds_total {:.6}\n",
            counts.on_demand_loads,
            counts.on_demand_load_time.as_secs_f64()
        );
        let _ = write!(
            text,
            "# HELP plinth_evictions_total Idle on-demand models unloaded to stay within the memory budget.\n# TYPE plinth_evictions_total counter\nplinth_evictions_total {}\n",
            counts.evictions
        );
    }
}

/// What an orchestrator returned, checked against its entry's declared
/// outputs and put in their order. A mismatch is the plugin's fault.
fn declared_outputs(
    model: &ReadyModel,
    plugin: &str,
    mut outputs: Vec<Tensor>,
) -> Result<Vec<Tensor>, Error> {
    let config = &model.config;
    let blame = |what: String| {
        Error::Internal(format!(
            "model '{}': orchestrator plugin '{plugin}' {what}",
            model.name
        ))
    };
    if let Some(extra) = outputs
        .iter()
        .find(|t| !config.outputs.iter().any(|spec| spec.name == t.name()))
    {
        return Err(blame(format!(
            "returned an undeclared output '{}' (declared: {})",
            extra.name(),
            config
                .outputs
                .iter()
                .map(|spec| spec.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut ordered = Vec::with_capacity(config.outputs.len());
    for spec in &config.outputs {
        let Some(pos) = outputs.iter().position(|t| t.name() == spec.name) else {
            return Err(blame(format!("returned no output '{}'", spec.name)));
        };
        let tensor = outputs.swap_remove(pos);
        plinth_torch::check_output(&tensor, spec, &config.full_shape(spec)).map_err(blame)?;
        ordered.push(tensor);
    }
    Ok(ordered)
}

/// The way orchestrators call models: a nested request through the whole
/// pipeline but the router, bounded by the client's deadline.
impl ModelCaller for Pipeline {
    fn infer(&self, call: NestedCall) -> BoxFuture<Result<Vec<Tensor>, Error>> {
        let pipeline = self.clone();
        Box::pin(async move {
            let left = call.deadline.saturating_duration_since(Instant::now());
            let model = call.model.clone();
            let ran_out = || {
                Error::DeadlineExceeded(format!(
                    "model '{model}': the request's time ran out before the orchestrator's call to it finished"
                ))
            };
            if left.is_zero() {
                return Err(ran_out());
            }
            let request = PipelineRequest {
                id: call.parent.id.clone(),
                model: call.model,
                version: call.version,
                inputs: call.inputs,
                metadata: call.parent.metadata.clone(),
                timeout: Some(left),
                nested: Some(Nesting {
                    depth: call.depth,
                    deadline: call.deadline,
                    parent: Some((call.parent.id.clone(), call.parent.model.clone())),
                }),
            };
            match tokio::time::timeout(left, pipeline.infer(request)).await {
                Ok(answer) => answer
                    .map(|response| response.outputs)
                    .map_err(|err| name_model(&model, err)),
                Err(_) => Err(ran_out()),
            }
        })
    }
}

/// Whether `mirror` answers what `primary` did: the same output names,
/// dtypes and shapes, and numbers within `tolerance` of each other (byte
/// strings equal).
fn outputs_agree(primary: &[Tensor], mirror: &[Tensor], tolerance: f64) -> bool {
    primary.len() == mirror.len()
        && primary.iter().all(|p| {
            mirror.iter().any(|m| {
                m.name() == p.name()
                    && m.dtype() == p.dtype()
                    && m.shape() == p.shape()
                    && match (p.to_f64_lossy(), m.to_f64_lossy()) {
                        (Some(a), Some(b)) => a
                            .iter()
                            .zip(&b)
                            .all(|(x, y)| (x - y).abs() <= tolerance || x == y),
                        _ => p.data() == m.data(),
                    }
            })
        })
}

/// Starts mirrored runs as they are queued, at most
/// [`MIRROR_CONCURRENCY`] at once. Ends with the pipeline.
async fn run_mirrors(inner: std::sync::Weak<Inner>, mut rx: mpsc::Receiver<MirrorJob>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MIRROR_CONCURRENCY));
    while let Some(job) = rx.recv().await {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let pipeline = Pipeline { inner };
        tokio::spawn(async move {
            pipeline.mirror(job).await;
            drop(permit);
        });
    }
}

/// Hands events to every metrics plugin in batches, off the request path;
/// nested calls' tags also to those that take `metrics-context`.
async fn feed_metrics(
    plugins: Arc<PluginHost>,
    mut rx: mpsc::Receiver<(RequestEvent, Option<NestedTag>)>,
) {
    let mut batch = Vec::with_capacity(EVENT_BATCH);
    while rx.recv_many(&mut batch, EVENT_BATCH).await > 0 {
        let flush = tokio::time::sleep(EVENT_FLUSH);
        tokio::pin!(flush);
        while batch.len() < EVENT_BATCH {
            let room = EVENT_BATCH - batch.len();
            tokio::select! {
                () = &mut flush => break,
                n = rx.recv_many(&mut batch, room) => if n == 0 { break },
            }
        }
        let sinks = plugins.of_kind::<kind::Metrics>();
        if sinks.is_empty() {
            batch.clear();
            continue;
        }
        let mut nested = Vec::new();
        let events: Vec<RequestEvent> = batch
            .drain(..)
            .map(|(event, tag)| {
                if let Some((parent_id, parent_model, depth)) = tag {
                    nested.push(NestedEvent {
                        parent_id,
                        parent_model,
                        depth,
                        event: event.clone(),
                    });
                }
                event
            })
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for plugin in sinks {
                // A failing metrics plugin is counted by its own stats; the
                // others still get the events.
                let _ = plugin.record(&events);
                if !nested.is_empty() {
                    let _ = plugin.record_nested(&nested);
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelRepository;
    use crate::registry::{RegistrySettings, test_model, test_model_with};

    /// `y = 2x`, answering as "y".
    fn double(inputs: &[Tensor]) -> Result<Vec<Tensor>, Error> {
        let x = inputs[0].to_f32().expect("f32");
        let y: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
        Ok(vec![Tensor::from_f32("y", inputs[0].shape().to_vec(), &y)?])
    }

    /// A pipeline over a registry holding `double` (versions 1 and 2), a
    /// model whose forward fails, and one that needs a preprocess plugin the
    /// (empty) plugin directory lacks.
    fn pipeline(plugin_dir: &std::path::Path) -> Pipeline {
        let registry = Registry::new(RegistrySettings::new(ModelRepository::new(plugin_dir), 1));
        registry.insert_ready(test_model("double", &["1", "2"], double));
        registry.insert_ready(test_model("broken", &["1"], |_: &[Tensor]| {
            Err(Error::Internal("forward failed: boom".into()))
        }));
        registry.insert_ready(test_model_with(
            "needs-plugin",
            "preprocess = [\"absent\"]",
            &["1"],
            double,
        ));
        Pipeline::new(
            registry,
            Arc::new(PluginHost::new(plugin_dir)),
            PipelineSettings::default(),
        )
    }

    /// Sends `x = [1, 2]` to `model` (at `version`) and renders the answer,
    /// then the model's success/failure counts and the version's statistics.
    async fn check(model: &str, version: Option<&str>, expect: &str) {
        let dir = tempfile::tempdir().unwrap();
        let pipeline = pipeline(dir.path());
        let x = Tensor::from_f32("x", vec![2], &[1., 2.]).unwrap();
        let res = pipeline
            .infer(PipelineRequest {
                id: "r1".into(),
                model: model.into(),
                version: version.map(str::to_owned),
                inputs: vec![x],
                ..PipelineRequest::default()
            })
            .await;
        let mut text = match res {
            Ok(response) => format!(
                "ok {}:{} {:?}",
                response.model,
                response.version,
                response.outputs[0].to_f32().unwrap()
            ),
            Err(err) => format!("err {err}"),
        };
        if let Some(ready) = pipeline.registry().serving(model) {
            let (ok, failed) = ready.counts();
            text.push_str(&format!("\ncounts ok={ok} failed={failed}"));
            for version in ready.versions() {
                let (success, _) = version.stats.success.get();
                let (fail, _) = version.stats.fail.get();
                text.push_str(&format!(
                    "\nv{} success={success} fail={fail}",
                    version.version.label
                ));
            }
        }
        assert_eq!(text, expect.trim());
    }

    #[tokio::test]
    async fn requests_reach_the_model_and_are_counted_on_their_version() {
        check(
            "double",
            None,
            "
ok double:2 [2.0, 4.0]
counts ok=1 failed=0
v1 success=0 fail=0
v2 success=1 fail=0",
        )
        .await;
        check(
            "double",
            Some("1"),
            "
ok double:1 [2.0, 4.0]
counts ok=1 failed=0
v1 success=1 fail=0
v2 success=0 fail=0",
        )
        .await;
    }

    #[tokio::test]
    async fn refusals_name_the_model_and_count_as_its_failures() {
        check(
            "nope",
            None,
            "err model 'nope' is not in the model repository",
        )
        .await;
        check(
            "double",
            Some("7"),
            "
err model 'double' has no ready version '7' (ready: 1, 2)
counts ok=0 failed=1
v1 success=0 fail=0
v2 success=0 fail=0",
        )
        .await;
        check(
            "broken",
            None,
            "
err internal error: forward failed: boom
counts ok=0 failed=1
v1 success=0 fail=1",
        )
        .await;
        check(
            "needs-plugin",
            None,
            "
err model 'needs-plugin': preprocess plugin 'absent' is not loaded (no absent.wasm in the plugin directory)
counts ok=0 failed=1
v1 success=0 fail=1",
        )
        .await;
    }

    #[test]
    fn grpc_timeout_is_read_from_the_metadata() {
        let read = |value: &str| grpc_timeout(&[("grpc-timeout".to_owned(), value.to_owned())]);
        assert_eq!(read("250m"), Some(Duration::from_millis(250)));
        assert_eq!(read("5é"), None);
        assert_eq!(read("18446744073709551615S"), None);
        assert_eq!(grpc_timeout(&[]), None);
    }

    #[test]
    fn outputs_agree_within_the_tolerance_and_only_like_for_like() {
        let t = |name: &str, values: &[f32]| {
            Tensor::from_f32(name, vec![values.len() as i64], values).unwrap()
        };
        let primary = [t("y", &[1.0, 2.0])];
        assert!(outputs_agree(&primary, &[t("y", &[1.0005, 2.0])], 0.001));
        assert!(!outputs_agree(&primary, &[t("y", &[1.01, 2.0])], 0.001));
        assert!(
            !outputs_agree(&primary, &[t("z", &[1.0, 2.0])], 0.001),
            "other name"
        );
        assert!(
            !outputs_agree(&primary, &[t("y", &[1.0])], 0.001),
            "other shape"
        );
        assert!(!outputs_agree(&primary, &[], 0.001), "missing output");
        assert!(
            outputs_agree(&primary, &[t("y", &[1.0, 2.0])], 0.0),
            "exact"
        );
    }

    #[test]
    fn refusals_name_the_model_once() {
        let check = |err: Error, want: &str| assert_eq!(name_model("m", err).to_string(), want);
        check(
            Error::InvalidArgument("tensor 'x': dtype is not set".into()),
            "model 'm': tensor 'x': dtype is not set",
        );
        check(
            Error::InvalidArgument("model 'm': input 'x' is given twice".into()),
            "model 'm': input 'x' is given twice",
        );
        check(
            Error::ResourceExhausted("model 'm:1': queue is full".into()),
            "model 'm:1': queue is full",
        );
        check(
            Error::Internal("the body ended early".into()),
            "internal error: model 'm': the body ended early",
        );
        check(
            Error::ModelNotFound { model: "m".into() },
            "model 'm' is not in the model repository",
        );
        assert_eq!(
            name_model("", Error::InvalidArgument("tensor 'x': bad".into())).to_string(),
            "tensor 'x': bad"
        );
    }
}
