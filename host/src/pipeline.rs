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

use tokio::sync::mpsc;

use crate::error::Error;
use crate::plugin::{
    ModelChoice, PluginHost, RequestEvent, RequestStatus, RequestView, Stage, StageTimings, kind,
};
use crate::registry::{InferResponse, ReadyModel, Registry, RequestRecord};
use crate::tensor::Tensor;

const EVENT_QUEUE: usize = 8192;
const EVENT_BATCH: usize = 512;
/// How long a batch of events may wait to fill up. Metrics are scraped
/// seconds apart; handing them over one by one would cost a thread hop and a
/// guest call per request.
const EVENT_FLUSH: Duration = Duration::from_millis(50);

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
    events: mpsc::Sender<RequestEvent>,
    dropped_events: AtomicU64,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").finish_non_exhaustive()
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
}

impl Pipeline {
    /// Starts the task that feeds request events to the metrics plugins.
    pub fn new(registry: Registry, plugins: Arc<PluginHost>) -> Pipeline {
        let (events, rx) = mpsc::channel(EVENT_QUEUE);
        tokio::spawn(feed_metrics(Arc::clone(&plugins), rx));
        Pipeline {
            inner: Arc::new(Inner {
                registry,
                plugins,
                events,
                dropped_events: AtomicU64::new(0),
            }),
        }
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

    pub async fn infer(&self, request: PipelineRequest) -> Result<InferResponse, Error> {
        let started = Instant::now();
        let mut timings = Timings::default();
        let mut view = RequestView {
            id: request.id,
            model: request.model,
            version: request.version,
            metadata: request.metadata,
        };
        let res = self
            .run(&mut view, request.inputs, request.timeout, &mut timings)
            .await;
        let total = started.elapsed();
        if let Some(model) = timings.model.take() {
            let version = timings.version.as_deref().or(view.version.as_deref());
            model.record(
                version,
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
        let status = match &res {
            Ok(_) => RequestStatus::Ok,
            Err(err) => RequestStatus::of_error(err),
        };
        let event = RequestEvent {
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
        };
        if self.inner.events.try_send(event).is_err() {
            self.inner.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
        res
    }

    async fn run(
        &self,
        view: &mut RequestView,
        inputs: Vec<Tensor>,
        timeout: Option<Duration>,
        timings: &mut Timings,
    ) -> Result<InferResponse, Error> {
        if let Some(router) = self.inner.plugins.router() {
            let candidates: Vec<ModelChoice> = self
                .inner
                .registry
                .ready_models()
                .into_iter()
                .map(|(name, versions)| ModelChoice { name, versions })
                .collect();
            let decision = router.route(view, &candidates)?;
            view.model = decision.model;
            view.version = decision.version;
        }
        let model = self.inner.registry.get_ready(&view.model)?;
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
        let inference = model
            .infer(view.version.as_deref(), inputs, timeout)
            .await?;
        timings.queue = inference.queue;
        timings.compute = inference.compute;
        timings.executed = true;
        timings.executed_rows = u64::try_from(inference.batch_rows).unwrap_or(u64::MAX);
        timings.leader = inference.leader;
        let (version, outputs) = (inference.version, inference.outputs);
        timings.version = Some(version.clone());
        let request_version = view.version.replace(version.clone());
        let t = Instant::now();
        let outputs = self.chain(&model, Stage::Post, view, outputs);
        view.version = request_version;
        timings.post = t.elapsed();
        Ok(InferResponse {
            model: model.name.clone(),
            version,
            outputs: outputs?,
        })
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
                Error::Unavailable(format!(
                    "model '{}': {label} plugin '{name}' is not loaded (no {name}.wasm in the plugin directory)",
                    model.name
                ))
            })?;
            tensors = plugin
                .into_kind::<kind::Processor>()?
                .process(stage, view, tensors)?;
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
        text
    }
}

/// Hands events to every metrics plugin in batches, off the request path.
async fn feed_metrics(plugins: Arc<PluginHost>, mut rx: mpsc::Receiver<RequestEvent>) {
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
        let events = std::mem::take(&mut batch);
        let _ = tokio::task::spawn_blocking(move || {
            for plugin in sinks {
                // A failing metrics plugin is counted by its own stats; the
                // others still get the events.
                let _ = plugin.record(&events);
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
        Pipeline::new(registry, Arc::new(PluginHost::new(plugin_dir)))
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
counts ok=0 failed=0
v1 success=0 fail=1",
        )
        .await;
    }
}
