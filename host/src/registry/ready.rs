//! The ready-model request path: what a request holds (`Arc<ReadyModel>`),
//! version choice, input checks against the config, and the hand-off to the
//! version's executors.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use plinth_torch::executor::{ExecutorPool, ExecutorThreads, Forward, Job, TraceTag};

use super::stats::{RequestRecord, VersionStats};
use crate::config::{ModelConfig, ModelFormat, ModelVersion};
use crate::error::Error;
use crate::tensor::{Tensor, TensorSpec, shape_str};

/// One loaded version: its executors and its statistics.
#[derive(Debug)]
pub struct ReadyVersion {
    pub version: ModelVersion,
    /// The executors; `None` for an orchestrator entry, whose requests the
    /// pipeline hands to its plugin.
    pool: Option<ExecutorPool>,
    pub stats: VersionStats,
    /// The bytes of the version's tensors, times the model's instances.
    pub memory_bytes: u64,
    /// Its model file's format; `None` for an orchestrator entry.
    pub format: Option<ModelFormat>,
}

/// A loaded model. Requests hold it by `Arc` for their whole life.
#[derive(Debug)]
pub struct ReadyModel {
    pub name: String,
    pub config: Arc<ModelConfig>,
    /// Oldest first; never empty.
    versions: Vec<ReadyVersion>,
    pub intra_op_threads: usize,
    /// What the model keeps in its device's memory: the bytes of the
    /// tensors of each version's archive, times its instances.
    pub memory_bytes: u64,
    in_flight: AtomicU64,
    success: AtomicU64,
    failure: AtomicU64,
}

/// Counts a request as in flight until dropped.
/// Counts a request as in flight on a model until dropped.
pub(crate) struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicU64) -> InFlight<'a> {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One request's answer from a model, with where its time went.
#[derive(Debug)]
pub struct Inference {
    pub version: String,
    pub outputs: Vec<Tensor>,
    /// Waiting for an executor.
    pub queue: Duration,
    /// The forward pass on the executor.
    pub compute: Duration,
    /// Rows of the forward pass the request was part of (dynamic batching
    /// may have merged it with others).
    pub batch_rows: usize,
    /// Whether this request counts the forward pass (one per pass).
    pub leader: bool,
    /// When the request joined the queue, and when its forward pass started.
    pub enqueued: Instant,
    pub started: Instant,
    /// The traced requests of the pass, for the first of them (see
    /// [`plinth_torch::TraceTag`]).
    pub traced_with: Vec<TraceTag>,
}

#[derive(Debug, Clone)]
pub struct InferResponse {
    pub model: String,
    pub version: String,
    pub outputs: Vec<Tensor>,
}

impl ReadyModel {
    /// Starts the executors of every version: the last step of a load, once
    /// each version's modules are loaded and validated.
    pub(crate) fn start<M: Forward>(
        name: &str,
        config: ModelConfig,
        versions: Vec<(ModelVersion, Vec<M>)>,
        threads: &ExecutorThreads,
    ) -> std::io::Result<ReadyModel> {
        let outputs: Arc<[TensorSpec]> = config.outputs.clone().into();
        let mut ready = Vec::with_capacity(versions.len());
        for (version, modules) in versions {
            let label = format!("{name}:{}", version.label);
            let format = modules.first().and_then(Forward::format);
            let pool = ExecutorPool::start(
                &label,
                modules,
                Arc::clone(&outputs),
                config.max_queue_size,
                config.batching.clone(),
                threads,
            )?;
            ready.push(ReadyVersion {
                version,
                pool: Some(pool),
                stats: VersionStats::default(),
                memory_bytes: 0,
                format,
            });
        }
        Ok(ReadyModel {
            name: name.to_owned(),
            config: Arc::new(config),
            versions: ready,
            intra_op_threads: threads.intra_op_threads,
            memory_bytes: 0,
            in_flight: AtomicU64::new(0),
            success: AtomicU64::new(0),
            failure: AtomicU64::new(0),
        })
    }

    /// An orchestrator entry: version 1, no executors, nothing in memory.
    pub(crate) fn orchestrated(name: &str, config: ModelConfig) -> ReadyModel {
        ReadyModel {
            name: name.to_owned(),
            config: Arc::new(config),
            versions: vec![ReadyVersion {
                version: ModelVersion::parse("1").expect("1 is a version label"),
                pool: None,
                stats: VersionStats::default(),
                memory_bytes: 0,
                format: None,
            }],
            intra_op_threads: 0,
            memory_bytes: 0,
            in_flight: AtomicU64::new(0),
            success: AtomicU64::new(0),
            failure: AtomicU64::new(0),
        }
    }

    /// Lets small requests run the forward pass of each version (one of its
    /// modules, oldest version first) on their own thread
    /// ([`ExecutorPool::try_inline`]). Does nothing without modules.
    pub(crate) fn set_inline(&mut self, modules: Vec<plinth_torch::Module>, max_bytes: usize) {
        for (version, module) in self.versions.iter_mut().zip(modules) {
            if let Some(pool) = &mut version.pool {
                let forward: plinth_torch::InlineForward =
                    Arc::new(move |inputs: &[Tensor], outputs: &[TensorSpec]| {
                        plinth_torch::Forward::forward(&module, inputs, outputs)
                    });
                pool.set_inline(forward, max_bytes);
            }
        }
    }

    /// Sets what each version keeps in memory (oldest first, as the
    /// versions), as the load measured it.
    pub(crate) fn with_memory_bytes(mut self, per_version: &[u64]) -> ReadyModel {
        for (version, bytes) in self.versions.iter_mut().zip(per_version) {
            version.memory_bytes = *bytes;
        }
        self.memory_bytes = self.versions.iter().map(|v| v.memory_bytes).sum();
        self
    }

    /// Gives each version its process-wide serving series.
    pub(crate) fn with_series(mut self, metrics: &super::series::ServingMetrics) -> ReadyModel {
        if !metrics.enabled() {
            return self;
        }
        for version in &mut self.versions {
            version.stats.series = Some(metrics.series(&self.name, &version.version.label));
        }
        self
    }

    /// Requests waiting in each version's queue, with its label.
    pub fn queued(&self) -> Vec<(&str, usize)> {
        self.versions
            .iter()
            .map(|v| {
                (
                    v.version.label.as_str(),
                    v.pool.as_ref().map_or(0, ExecutorPool::waiting),
                )
            })
            .collect()
    }

    /// Receivers that complete when each executor thread of every version
    /// has ended and freed its module. Taken once, by the unload.
    pub(crate) fn take_exit_waiters(&self) -> Vec<oneshot::Receiver<()>> {
        self.versions
            .iter()
            .filter_map(|v| v.pool.as_ref())
            .flat_map(ExecutorPool::take_exit_waiters)
            .collect()
    }

    /// Each version's format (`torchscript`, `aoti-package`; `orchestrator`
    /// for an orchestrator entry), in the order of [`Self::version_labels`].
    pub fn version_formats(&self) -> Vec<String> {
        self.versions
            .iter()
            .map(|v| {
                v.format
                    .map_or("orchestrator", ModelFormat::as_str)
                    .to_owned()
            })
            .collect()
    }

    /// The OIP `platform` of a version (the newest when `version` is
    /// `None`): `pytorch_libtorch` for TorchScript, as Triton names it,
    /// `pytorch_aoti` for an AOTInductor package.
    pub fn platform(&self, version: Option<&str>) -> &'static str {
        match self.format(version) {
            Some(ModelFormat::AotiPackage) => "pytorch_aoti",
            _ => "pytorch_libtorch",
        }
    }

    /// The format of a version (the newest when `version` is `None`);
    /// `None` for an orchestrator entry or an unknown version.
    pub fn format(&self, version: Option<&str>) -> Option<ModelFormat> {
        let chosen = match version {
            Some(label) => self.versions.iter().find(|v| v.version.answers_to(label)),
            None => self.versions.last(),
        };
        chosen.and_then(|v| v.format)
    }

    pub fn version_labels(&self) -> Vec<String> {
        self.versions
            .iter()
            .map(|v| v.version.label.clone())
            .collect()
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn counts(&self) -> (u64, u64) {
        (
            self.success.load(Ordering::Relaxed),
            self.failure.load(Ordering::Relaxed),
        )
    }

    pub fn queue_depth(&self) -> usize {
        self.versions
            .iter()
            .filter_map(|v| v.pool.as_ref())
            .map(ExecutorPool::queue_depth)
            .sum()
    }

    /// The loaded versions, oldest first.
    pub fn versions(&self) -> &[ReadyVersion] {
        &self.versions
    }

    /// Adds one request to the model's success or failure count and to the
    /// statistics of `version` (the newest when `None`); a version that is
    /// not loaded has no statistics to add to. `Pipeline` calls this once for
    /// every request, so the two counts always agree.
    pub fn record(&self, version: Option<&str>, record: &RequestRecord) {
        let counter = if record.ok {
            &self.success
        } else {
            &self.failure
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(ready) = self.pick_version(version) {
            ready.stats.record(record);
        }
    }

    /// The version a request for `requested` runs on: the newest that answers
    /// to it, or the newest of all when `None` or empty.
    pub fn pick_version(&self, requested: Option<&str>) -> Result<&ReadyVersion, Error> {
        let Some(requested) = requested.filter(|v| !v.is_empty()) else {
            return Ok(self.versions.last().expect("a ready model has a version"));
        };
        self.versions
            .iter()
            .rev()
            .find(|v| v.version.answers_to(requested))
            .ok_or_else(|| Error::VersionNotFound {
                model: self.name.clone(),
                version: requested.to_owned(),
                available: self.version_labels().join(", "),
            })
    }

    /// Checks the inputs against the config and puts them in declared order.
    pub(crate) fn arrange_inputs(&self, mut given: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let model = &self.name;
        let invalid = |msg: String| Error::InvalidArgument(format!("model '{model}': {msg}"));
        let config = &self.config;
        let expected_names = || {
            config
                .inputs
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (idx, tensor) in given.iter().enumerate() {
            if !config.inputs.iter().any(|spec| spec.name == tensor.name()) {
                return Err(invalid(format!(
                    "unexpected input '{}' (expected inputs: {})",
                    tensor.name(),
                    expected_names()
                )));
            }
            if given[..idx]
                .iter()
                .any(|earlier| earlier.name() == tensor.name())
            {
                return Err(invalid(format!("input '{}' is given twice", tensor.name())));
            }
        }
        let mut ordered = Vec::with_capacity(config.inputs.len());
        let mut batch: Option<(i64, String)> = None;
        for spec in &config.inputs {
            let Some(pos) = given.iter().position(|t| t.name() == spec.name) else {
                return Err(invalid(format!(
                    "missing input '{}' (expected inputs: {})",
                    spec.name,
                    expected_names()
                )));
            };
            let tensor = given.swap_remove(pos);
            if tensor.dtype() != spec.dtype {
                return Err(invalid(format!(
                    "input '{}': expected dtype {}, got {}",
                    spec.name,
                    spec.dtype,
                    tensor.dtype()
                )));
            }
            let full = config.full_shape(spec);
            let fits = full.len() == tensor.shape().len()
                && full
                    .iter()
                    .zip(tensor.shape())
                    .all(|(want, got)| *want == -1 || want == got);
            if !fits {
                return Err(invalid(format!(
                    "input '{}': expected shape {}, got {}",
                    spec.name,
                    shape_str(&full),
                    shape_str(tensor.shape())
                )));
            }
            if config.max_batch_size > 0 {
                let n = tensor.shape()[0];
                if n < 1 || n as u64 > config.max_batch_size as u64 {
                    return Err(invalid(format!(
                        "input '{}': batch size {n} is outside 1..={}",
                        spec.name, config.max_batch_size
                    )));
                }
                match &batch {
                    None => batch = Some((n, spec.name.clone())),
                    Some((first, first_name)) if *first != n => {
                        return Err(invalid(format!(
                            "input '{}': batch size {n} differs from input '{first_name}' ({first})",
                            spec.name
                        )));
                    }
                    Some(_) => {}
                }
            }
            ordered.push(tensor);
        }
        Ok(ordered)
    }

    /// Runs one request on this model. The caller holds the `Arc`, so an
    /// unload during the request leaves it to finish.
    /// `timeout` bounds the time the request may wait in the queue.
    ///
    /// Crate-private: `Pipeline::infer` is the one way in, so that plugins
    /// and statistics are never skipped.
    /// Counts a request the model answers some other way than [`infer`]
    /// (an orchestrator entry's run) as in flight until the guard drops:
    /// GetModel shows it, and eviction sees the model busy.
    ///
    /// [`infer`]: ReadyModel::infer
    pub(crate) fn in_flight_guard(&self) -> InFlight<'_> {
        InFlight::enter(&self.in_flight)
    }

    pub(crate) async fn infer(
        &self,
        version: Option<&str>,
        inputs: Vec<Tensor>,
        timeout: Option<Duration>,
        trace: Option<TraceTag>,
    ) -> Result<Inference, Error> {
        let _in_flight = InFlight::enter(&self.in_flight);
        self.infer_inner(version, inputs, timeout, trace).await
    }

    async fn infer_inner(
        &self,
        version: Option<&str>,
        inputs: Vec<Tensor>,
        timeout: Option<Duration>,
        trace: Option<TraceTag>,
    ) -> Result<Inference, Error> {
        let ready_version = self.pick_version(version)?;
        let inputs = self.arrange_inputs(inputs)?;
        let rows = match (self.config.max_batch_size, inputs.first()) {
            (0, _) | (_, None) => 1,
            (_, Some(first)) => first
                .shape()
                .first()
                .map_or(1, |n| usize::try_from(*n).unwrap_or(1)),
        };
        let Some(pool) = &ready_version.pool else {
            return Err(Error::Internal(format!(
                "model '{}' is answered by its orchestrator, not by executors",
                self.name
            )));
        };
        let enqueued = Instant::now();
        let executed = match pool.try_inline(inputs, rows, enqueued, trace) {
            Ok(executed) => executed?,
            Err((inputs, trace)) => {
                let (reply, answer) = oneshot::channel();
                pool.submit(Job {
                    inputs,
                    rows,
                    reply,
                    enqueued,
                    deadline: timeout.map(|t| enqueued + t),
                    trace,
                })?;
                answer
                    .await
                    .map_err(|_| Error::Internal("executor ended without answering".into()))??
            }
        };
        Ok(Inference {
            version: ready_version.version.label.clone(),
            outputs: executed.outputs,
            queue: executed.queue,
            compute: executed.compute,
            batch_rows: executed.batch_rows,
            leader: executed.leader,
            enqueued,
            started: executed.started,
            traced_with: executed.traced_with,
        })
    }
}

/// A ready model for unit tests: input `x` and output `y`, f32 of any
/// length, one executor per version running `forward` (a closure standing in
/// for the model), on a budget of one core.
#[cfg(test)]
pub(crate) fn test_model<F>(name: &str, versions: &[&str], forward: F) -> ReadyModel
where
    F: Fn(&[Tensor]) -> Result<Vec<Tensor>, Error> + Clone + Send + 'static,
{
    test_model_with(name, "", versions, forward)
}

/// [`test_model`] with `extra` prepended to its `config.toml`.
#[cfg(test)]
pub(crate) fn test_model_with<F>(
    name: &str,
    extra: &str,
    versions: &[&str],
    forward: F,
) -> ReadyModel
where
    F: Fn(&[Tensor]) -> Result<Vec<Tensor>, Error> + Clone + Send + 'static,
{
    let text = format!(
        "{extra}\n[[input]]\nname = \"x\"\ndtype = \"f32\"\nshape = [-1]\n\n[[output]]\nname = \"y\"\ndtype = \"f32\"\nshape = [-1]\n"
    );
    let config = ModelConfig::parse(std::path::Path::new("config.toml"), &text)
        .expect("the test config parses");
    let threads = ExecutorThreads {
        intra_op_threads: 1,
        budget: Arc::new(plinth_torch::ComputeBudget::new(1)),
        counters: Arc::default(),
        spin: std::time::Duration::ZERO,
    };
    let versions = versions
        .iter()
        .map(|label| {
            let version = ModelVersion::parse(label).expect("a version label");
            (version, vec![forward.clone()])
        })
        .collect();
    ReadyModel::start(name, config, versions, &threads).expect("executor threads start")
}
