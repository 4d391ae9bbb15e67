//! The request path every edge calls: router plugin, the model's preprocess
//! chain, the model, its postprocess chain, and a request event for the
//! metrics plugins.
//!
//! Plugin calls run inline on the request's task: each is bounded by its
//! epoch deadline (50 ms unless its manifest says otherwise) and typically
//! takes microseconds, which a hop to another thread would dwarf.
//!
//! Events go to metrics plugins through a bounded channel with `try_send`: a
//! request never waits on metrics, and events that do not fit are counted
//! ([`events`]). Orchestrator entries ([`orchestrate`]) and mirrored runs
//! ([`mirror`]) have modules of their own; the host's Prometheus text is the
//! metrics edge's (`http::metrics`), and deadlines are read by
//! `plinth_core::deadline`.

mod events;
mod mirror;
mod orchestrate;
mod types;

pub use types::{
    MirrorTotals, Nesting, OpenStream, Pipeline, PipelineRequest, PipelineResponse,
    PipelineSettings,
};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::error::Error;
use crate::plugin::{
    Candidates, Manifest, OnError, PluginHost, PluginMeta, RequestEvent, RequestStatus,
    RequestView, Stage, StageTimings, kind,
};
use crate::registry::{Inference, ReadyModel, ReadySet, Registry, RequestRecord};
use crate::telemetry::{self, SpanScope};
use crate::tensor::Tensor;
use opentelemetry::KeyValue;
use opentelemetry::trace::{Link, SpanContext};
use plinth_torch::TraceTag;
use tracing::Instrument;
use types::{EVENT_QUEUE, Inner, MIRROR_QUEUE, MirrorCounts, MirrorPlan};

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
        tokio::spawn(Pipeline::feed_metrics(Arc::clone(&plugins), rx));
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
                traces: settings.traces,
                mirrors,
                mirror_counts: MirrorCounts::default(),
            }),
        };
        tokio::spawn(Pipeline::run_mirrors(
            Arc::downgrade(&pipeline.inner),
            mirror_rx,
        ));
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

    /// The tracer, when tracing is on.
    pub fn traces(&self) -> Option<&Arc<crate::telemetry::Traces>> {
        self.inner.traces.as_ref()
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
        let trace = self.inner.traces.as_ref().and_then(|traces| {
            traces.request(&request.trace, &request.metadata, || {
                let mut attributes = vec![
                    KeyValue::new("plinth.protocol", request.protocol),
                    KeyValue::new("plinth.request.id", request.id.clone()),
                    KeyValue::new("plinth.model", request.model.clone()),
                ];
                if let Some(version) = &request.version {
                    attributes.push(KeyValue::new(
                        "plinth.model.version.requested",
                        version.clone(),
                    ));
                }
                if let Some(nesting) = &request.nested {
                    attributes.push(KeyValue::new("plinth.call.depth", i64::from(nesting.depth)));
                }
                attributes
            })
        });
        let log_span = trace
            .as_ref()
            .map_or_else(tracing::Span::none, SpanScope::log_span);
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
                trace.as_ref(),
            )
            .instrument(log_span.clone())
            .await;
        if let (Ok(response), Some(plan)) = (&res, timings.mirror.take()) {
            let primary = trace.as_ref().map(SpanScope::span_context);
            self.enqueue_mirrors(plan, &view, response, started.elapsed(), primary);
        }
        let res = res.and_then(|response| {
            let model = response.model.clone();
            answer(response).map_err(|err| err.with_model(&model))
        });
        let total = started.elapsed();
        if let Some(span) = &trace {
            if view.model != asked.0 {
                // The router sent it elsewhere.
                span.set_attribute(KeyValue::new("plinth.model", view.model.clone()));
            }
            if let Some(version) = &timings.version {
                span.set_attribute(KeyValue::new("plinth.model.version", version.clone()));
            }
            span.set_attribute(KeyValue::new(
                "plinth.status",
                match &res {
                    Ok(_) => "OK",
                    Err(err) => err.code_name(),
                },
            ));
            log_span.in_scope(|| match &res {
                Ok(_) => tracing::debug!(model = %view.model, "request answered"),
                Err(err) => tracing::debug!(model = %view.model, %err, "request failed"),
            });
            span.end_with(&res);
        }
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
        let err = err.with_model(model);
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

    async fn run(
        &self,
        view: &mut RequestView,
        inputs: Vec<Tensor>,
        timeout: Option<Duration>,
        nested: Option<Nesting>,
        timings: &mut Timings,
        trace: Option<&SpanScope>,
    ) -> Result<PipelineResponse, Error> {
        // The client's deadline: Triton's `timeout` parameter or the gRPC
        // deadline, whichever is sooner. A plain model's request waits in
        // the queue no longer; an orchestrator's whole call is bounded by it.
        let timeout = [timeout, crate::deadline::grpc_timeout(&view.metadata)]
            .into_iter()
            .flatten()
            .min();
        if nested.is_some() {
            // An orchestrator named the model: no router second-guesses it.
        } else if let Some(router) = self.inner.plugins.router() {
            let candidates = self.candidates();
            let span = trace.map(|trace| trace.child("route", plugin_attributes(&router)));
            let routed = router.route(view, &candidates);
            if let Some(span) = &span {
                if let Ok(decision) = &routed {
                    span.set_attribute(KeyValue::new("plinth.route.model", decision.model.clone()));
                }
                span.end_with(&routed);
            }
            match routed {
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
        let inputs = self.chain(&model, Stage::Pre, view, inputs, trace)?;
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
            let span = trace.map(|trace| {
                trace.child(
                    "orchestrate",
                    vec![KeyValue::new("plinth.plugin.name", plugin.clone())],
                )
            });
            let outputs = self
                .orchestrate(&model, view, inputs, timeout, nested, span.as_ref())
                .await;
            if let Some(span) = &span {
                span.end_with(&outputs);
            }
            drop(in_flight);
            let outputs = outputs?;
            timings.compute = t.elapsed();
            timings.executed_rows = u64::from(timings.batch_size);
            timings.leader = true;
            (model.pick_version(None)?.version.label.clone(), outputs)
        } else {
            let tag = trace.map(|trace| Arc::new(trace.span_context()) as TraceTag);
            let inference = model
                .infer(view.version.as_deref(), inputs, timeout, tag)
                .await?;
            if let Some(trace) = trace {
                record_execution(trace, &inference);
            }
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
        let outputs = self.chain(&model, Stage::Post, view, outputs, trace);
        view.version = request_version;
        timings.post = t.elapsed();
        Ok(PipelineResponse {
            model: model.name.clone(),
            version,
            config: Arc::clone(&model.config),
            outputs: outputs?,
        })
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
        trace: Option<&SpanScope>,
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
            let span = trace.map(|trace| trace.child(label, plugin_attributes(&processor)));
            let _end = span.as_ref().map(EndOnDrop);
            if processor.manifest.on_error == OnError::Skip {
                // Tensors are reference-counted: keeping them costs no copy.
                let kept = tensors.clone();
                tensors = match processor.process(stage, view, tensors) {
                    Ok(out) => out,
                    Err(err) if skippable(&processor.manifest, &err) => {
                        skipped(&processor, label, &err);
                        if let Some(span) = &span {
                            span.set_attribute(KeyValue::new("plinth.plugin.skipped", true));
                            span.fail(err.to_string());
                        }
                        kept
                    }
                    Err(err) => {
                        if let Some(span) = &span {
                            span.fail(err.to_string());
                        }
                        return Err(err);
                    }
                };
            } else {
                tensors = processor.process(stage, view, tensors).inspect_err(|err| {
                    if let Some(span) = &span {
                        span.fail(err.to_string());
                    }
                })?;
            }
        }
        Ok(tensors)
    }
}

/// A plugin call's span attributes: the plugin's file name and version.
fn plugin_attributes(plugin: &PluginMeta) -> Vec<KeyValue> {
    vec![
        KeyValue::new("plinth.plugin.name", plugin.name.clone()),
        KeyValue::new("plinth.plugin.version", plugin.info.version.clone()),
    ]
}

/// Ends a span however its scope is left.
struct EndOnDrop<'a>(&'a SpanScope);

impl Drop for EndOnDrop<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A traced request's wait in the queue, and, for the first traced request
/// of a forward pass, the pass itself, linked to every traced request
/// merged into it.
fn record_execution(trace: &SpanScope, inference: &Inference) {
    let start = telemetry::wall_time(inference.started);
    let version = KeyValue::new("plinth.model.version", inference.version.clone());
    trace.record(
        "queue",
        telemetry::wall_time(inference.enqueued),
        start,
        vec![version.clone()],
        Vec::new(),
    );
    if inference.traced_with.is_empty() {
        return;
    }
    let links = if inference.traced_with.len() > 1 {
        inference
            .traced_with
            .iter()
            .filter_map(|tag| tag.downcast_ref::<SpanContext>())
            .map(|context| Link::with_context(context.clone()))
            .collect()
    } else {
        Vec::new()
    };
    trace.record(
        "forward",
        start,
        telemetry::wall_time(inference.started + inference.compute),
        vec![
            version,
            KeyValue::new(
                "plinth.batch.rows",
                i64::try_from(inference.batch_rows).unwrap_or(i64::MAX),
            ),
            KeyValue::new(
                "plinth.batch.traced_requests",
                i64::try_from(inference.traced_with.len()).unwrap_or(i64::MAX),
            ),
        ],
        links,
    );
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
    fn refusals_name_the_model_once() {
        let check = |err: Error, want: &str| assert_eq!(err.with_model("m").to_string(), want);
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
            Error::InvalidArgument("tensor 'x': bad".into())
                .with_model("")
                .to_string(),
            "tensor 'x': bad"
        );
    }
}
