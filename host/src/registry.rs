//! The async model registry.
//!
//! Loads follow the three-step protocol:
//! 1. under the lock (microseconds): check the state and insert `Loading`;
//! 2. with no lock held, on the blocking pool: read the config and the file,
//!    deserialise, move to the device, warm up and validate, start executors;
//! 3. under the lock again: swap in `Ready` (or `Failed{reason}`).
//!
//! The lock is a plain mutex over a map and is never held across `.await` or
//! any I/O, so `list`, health and inference on other models answer while any
//! number of loads run. Requests hold an `Arc<ReadyModel>`; unload only drops
//! the registry's reference, so in-flight requests finish and memory is freed
//! when the last holder lets go.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use tokio::sync::{Semaphore, broadcast, oneshot};
use tokio::task::JoinHandle;

use crate::config::{ModelConfig, ModelRepository, ModelVersion, valid_model_name};
use crate::error::Error;
use crate::executor::{ExecutorPool, Job, ThreadCounters};
use crate::tensor::{Tensor, shape_str};
use crate::torch::{self, TorchModule};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelState {
    /// In the repository, not loaded.
    Unavailable,
    Loading,
    Ready,
    Unloading,
    /// The last load failed; the reason is kept and a new load may be tried.
    Failed,
}

impl fmt::Display for ModelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelState::Unavailable => "UNAVAILABLE",
            ModelState::Loading => "LOADING",
            ModelState::Ready => "READY",
            ModelState::Unloading => "UNLOADING",
            ModelState::Failed => "FAILED",
        })
    }
}

/// A snapshot of one model's entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelStatus {
    pub name: String,
    pub state: ModelState,
    pub reason: Option<String>,
    pub since: SystemTime,
    pub load_duration: Option<Duration>,
    /// Ready version labels, oldest first.
    pub versions: Vec<String>,
    pub device: Option<String>,
    pub in_flight: u64,
    /// A replacement is loading while the current versions keep serving.
    pub reloading: bool,
}

/// A model as the health snapshot sees it.
#[derive(Debug, Clone)]
pub struct HealthRow {
    pub name: String,
    pub state: ModelState,
    pub reason: Option<String>,
    /// The newest ready version.
    pub version: Option<String>,
    pub queue_depth: usize,
    pub in_flight: u64,
    pub requests: u64,
    pub failures: u64,
}

/// Whether a load may replace a ready model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// Refused with ALREADY_EXISTS if the model is loading or ready.
    Load,
    /// Replaces a ready model; the old versions serve until the new ones are ready.
    Reload,
}

#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub repository: ModelRepository,
    /// Loads that may run at once; more wait for a slot.
    pub max_concurrent_loads: usize,
    /// Cores the torch thread budget divides among executors.
    pub cores: usize,
}

/// One loaded version: its executors and its statistics.
#[derive(Debug)]
pub struct ReadyVersion {
    pub version: ModelVersion,
    pool: ExecutorPool,
    pub stats: VersionStats,
}

/// A count of events and their summed duration.
#[derive(Debug, Default)]
pub struct StatCounter {
    count: AtomicU64,
    nanos: AtomicU64,
}

impl StatCounter {
    fn add(&self, duration: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.nanos.fetch_add(
            u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// `(count, total nanoseconds)`.
    pub fn get(&self) -> (u64, u64) {
        (
            self.count.load(Ordering::Relaxed),
            self.nanos.load(Ordering::Relaxed),
        )
    }
}

/// Per-batch-size timings: compute input, infer and output.
pub type BatchTimings = [(u64, u64); 3];

/// Cumulative statistics of one loaded version, in the shape of Triton's
/// model statistics. They live and die with the loaded version.
#[derive(Debug, Default)]
pub struct VersionStats {
    /// Whole requests that succeeded, end to end (plugins included).
    pub success: StatCounter,
    pub fail: StatCounter,
    /// Waiting for an executor.
    pub queue: StatCounter,
    /// The preprocess chain.
    pub compute_input: StatCounter,
    /// The forward pass.
    pub compute_infer: StatCounter,
    /// The postprocess chain.
    pub compute_output: StatCounter,
    /// Inferences; a request with a batch of N counts N.
    pub inference_count: AtomicU64,
    /// Forward passes.
    pub execution_count: AtomicU64,
    /// Milliseconds since the Unix epoch of the last request; 0 if none.
    pub last_inference_ms: AtomicU64,
    batches: Mutex<std::collections::BTreeMap<u64, BatchTimings>>,
}

/// What one request did, for [`ReadyModel::record`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestRecord {
    pub ok: bool,
    /// Whether the forward pass ran.
    pub executed: bool,
    pub total: Duration,
    pub queue: Duration,
    pub compute_input: Duration,
    pub compute_infer: Duration,
    pub compute_output: Duration,
    /// Rows of this request.
    pub batch_size: u64,
    /// Rows of the forward pass it was part of.
    pub executed_rows: u64,
    /// Whether this request counts the forward pass (one per pass).
    pub leader: bool,
}

impl VersionStats {
    fn record(&self, record: &RequestRecord) {
        if record.ok {
            self.success.add(record.total);
        } else {
            self.fail.add(record.total);
        }
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.last_inference_ms.store(now_ms, Ordering::Relaxed);
        if !record.executed {
            return;
        }
        self.queue.add(record.queue);
        self.compute_input.add(record.compute_input);
        self.compute_infer.add(record.compute_infer);
        self.compute_output.add(record.compute_output);
        self.inference_count
            .fetch_add(record.batch_size.max(1), Ordering::Relaxed);
        if !record.leader {
            return;
        }
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let mut batches = self.batches.lock();
        let row = batches.entry(record.executed_rows.max(1)).or_default();
        for (slot, d) in row.iter_mut().zip([
            record.compute_input,
            record.compute_infer,
            record.compute_output,
        ]) {
            slot.0 += 1;
            slot.1 += nanos(d);
        }
    }

    /// `(batch size, [compute input, infer, output])`, smallest batch first.
    pub fn batches(&self) -> Vec<(u64, BatchTimings)> {
        self.batches.lock().iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// A loaded model. Requests hold it by `Arc` for their whole life.
#[derive(Debug)]
pub struct ReadyModel {
    pub name: String,
    pub config: Arc<ModelConfig>,
    /// Oldest first; never empty.
    versions: Vec<ReadyVersion>,
    pub intra_op_threads: usize,
    in_flight: AtomicU64,
    success: AtomicU64,
    failure: AtomicU64,
}

/// Counts a request as in flight until dropped.
struct InFlight<'a>(&'a AtomicU64);

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

#[derive(Debug, Clone)]
pub struct InferRequest {
    pub model: String,
    /// `None` picks the newest ready version.
    pub version: Option<String>,
    pub inputs: Vec<Tensor>,
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
}

#[derive(Debug, Clone)]
pub struct InferResponse {
    pub model: String,
    pub version: String,
    pub outputs: Vec<Tensor>,
}

impl ReadyModel {
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
        self.versions.iter().map(|v| v.pool.queue_depth()).sum()
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
    fn arrange_inputs(&self, mut given: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
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
    pub async fn infer(
        &self,
        version: Option<&str>,
        inputs: Vec<Tensor>,
        timeout: Option<Duration>,
    ) -> Result<Inference, Error> {
        let _in_flight = InFlight::enter(&self.in_flight);
        self.infer_inner(version, inputs, timeout).await
    }

    async fn infer_inner(
        &self,
        version: Option<&str>,
        inputs: Vec<Tensor>,
        timeout: Option<Duration>,
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
        let (reply, answer) = oneshot::channel();
        let enqueued = Instant::now();
        ready_version.pool.submit(Job {
            inputs,
            rows,
            reply,
            enqueued,
            deadline: timeout.map(|t| enqueued + t),
        })?;
        let executed = answer
            .await
            .map_err(|_| Error::Internal("executor ended without answering".into()))??;
        Ok(Inference {
            version: ready_version.version.label.clone(),
            outputs: executed.outputs,
            queue: executed.queue,
            compute: executed.compute,
            batch_rows: executed.batch_rows,
            leader: executed.leader,
        })
    }
}

struct Entry {
    state: ModelState,
    reason: Option<String>,
    since: SystemTime,
    load_duration: Option<Duration>,
    serving: Option<Arc<ReadyModel>>,
    reloading: bool,
    /// Bumped by every load and unload, so a finishing task only touches the
    /// entry it started from.
    generation: u64,
}

impl Entry {
    fn new() -> Entry {
        Entry {
            state: ModelState::Unavailable,
            reason: None,
            since: SystemTime::now(),
            load_duration: None,
            serving: None,
            reloading: false,
            generation: 0,
        }
    }

    fn enter(&mut self, state: ModelState) {
        self.state = state;
        self.since = SystemTime::now();
    }

    fn status(&self, name: &str) -> ModelStatus {
        let serving = self.serving.as_deref();
        ModelStatus {
            name: name.to_owned(),
            state: self.state,
            reason: self.reason.clone(),
            since: self.since,
            load_duration: self.load_duration,
            versions: serving.map(ReadyModel::version_labels).unwrap_or_default(),
            device: serving.map(|m| m.config.device.to_string()),
            in_flight: serving.map_or(0, ReadyModel::in_flight),
            reloading: self.reloading,
        }
    }
}

struct Inner {
    settings: RegistrySettings,
    entries: Mutex<HashMap<String, Entry>>,
    events: broadcast::Sender<ModelStatus>,
    load_permits: Arc<Semaphore>,
    threads: Arc<ThreadCounters>,
}

/// Handle on the registry; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("settings", &self.inner.settings)
            .finish()
    }
}

/// A started load: its status right after step one, and its outcome.
#[derive(Debug)]
pub struct LoadTicket {
    pub status: ModelStatus,
    pub done: oneshot::Receiver<Result<ModelStatus, Error>>,
}

impl LoadTicket {
    /// Waits for step three.
    pub async fn finished(self) -> Result<ModelStatus, Error> {
        self.done
            .await
            .unwrap_or_else(|_| Err(Error::Internal("load task ended without an outcome".into())))
    }
}

/// The thread budget as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadBudget {
    pub cores: usize,
    /// Intra-op threads of an executor of a model with one instance and no override.
    pub intra_op_threads: usize,
    pub inter_op_threads: usize,
    pub executors: usize,
    pub torch_threads: usize,
}

impl Registry {
    pub fn new(settings: RegistrySettings) -> Registry {
        let (events, _) = broadcast::channel(1024);
        let permits = settings.max_concurrent_loads.max(1);
        Registry {
            inner: Arc::new(Inner {
                settings,
                entries: Mutex::new(HashMap::new()),
                events,
                load_permits: Arc::new(Semaphore::new(permits)),
                threads: Arc::new(ThreadCounters::default()),
            }),
        }
    }

    pub fn repository(&self) -> &ModelRepository {
        &self.inner.settings.repository
    }

    pub fn thread_budget(&self) -> ThreadBudget {
        let threads = &self.inner.threads;
        ThreadBudget {
            cores: self.inner.settings.cores,
            intra_op_threads: self.inner.settings.cores.max(1),
            inter_op_threads: 1,
            executors: threads.executors.load(Ordering::Relaxed),
            torch_threads: threads.torch_threads.load(Ordering::Relaxed),
        }
    }

    /// Changes of any model's state, as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<ModelStatus> {
        self.inner.events.subscribe()
    }

    /// Adds `Unavailable` entries for models found in the repository, so they
    /// are listed before they load. Existing entries are left alone.
    pub fn register_known(&self, names: &[String]) {
        let mut entries = self.inner.entries.lock();
        for name in names {
            entries.entry(name.clone()).or_insert_with(Entry::new);
        }
    }

    /// Drops the entry of a model that left the repository and is not loaded.
    pub fn forget(&self, name: &str) {
        let mut entries = self.inner.entries.lock();
        if entries
            .get(name)
            .is_some_and(|e| matches!(e.state, ModelState::Unavailable | ModelState::Failed))
        {
            entries.remove(name);
        }
    }

    pub fn list(&self) -> Vec<ModelStatus> {
        let entries = self.inner.entries.lock();
        let mut all: Vec<ModelStatus> = entries
            .iter()
            .map(|(name, entry)| entry.status(name))
            .collect();
        drop(entries);
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn status(&self, name: &str) -> Result<ModelStatus, Error> {
        let entries = self.inner.entries.lock();
        entries
            .get(name)
            .map(|entry| entry.status(name))
            .ok_or_else(|| Error::ModelNotFound {
                model: name.to_owned(),
            })
    }

    /// The ready model, for a request to hold.
    pub fn get_ready(&self, name: &str) -> Result<Arc<ReadyModel>, Error> {
        let entries = self.inner.entries.lock();
        let entry = entries.get(name).ok_or_else(|| Error::ModelNotFound {
            model: name.to_owned(),
        })?;
        match (&entry.serving, entry.state) {
            (Some(model), ModelState::Ready) => Ok(Arc::clone(model)),
            (_, state) => Err(Error::ModelNotReady {
                model: name.to_owned(),
                state,
                reason: entry.reason.clone(),
            }),
        }
    }

    /// One row per known model, for the health snapshot.
    pub fn health_rows(&self) -> Vec<HealthRow> {
        let entries = self.inner.entries.lock();
        entries
            .iter()
            .map(|(name, e)| {
                let serving = e.serving.as_deref();
                let (requests, failures) = serving.map_or((0, 0), |m| {
                    let (ok, failed) = m.counts();
                    (ok + failed, failed)
                });
                HealthRow {
                    name: name.clone(),
                    state: e.state,
                    reason: e.reason.clone(),
                    version: serving.and_then(|m| m.version_labels().pop()),
                    queue_depth: serving.map_or(0, ReadyModel::queue_depth),
                    in_flight: serving.map_or(0, ReadyModel::in_flight),
                    requests,
                    failures,
                }
            })
            .collect()
    }

    /// Ready models and their versions, for a router plugin to choose from.
    pub fn ready_refs(&self) -> Vec<crate::plugin::bindings::wit::ModelRef> {
        let entries = self.inner.entries.lock();
        entries
            .iter()
            .filter(|(_, e)| e.state == ModelState::Ready)
            .filter_map(|(name, e)| {
                e.serving
                    .as_ref()
                    .map(|m| crate::plugin::bindings::wit::ModelRef {
                        name: name.clone(),
                        versions: m.version_labels(),
                    })
            })
            .collect()
    }

    /// The serving model, whatever its state, for detail views.
    pub fn serving(&self, name: &str) -> Option<Arc<ReadyModel>> {
        self.inner
            .entries
            .lock()
            .get(name)
            .and_then(|e| e.serving.clone())
    }

    pub async fn infer(&self, request: InferRequest) -> Result<InferResponse, Error> {
        let model = self.get_ready(&request.model)?;
        let inference = model
            .infer(request.version.as_deref(), request.inputs, None)
            .await?;
        Ok(InferResponse {
            model: request.model,
            version: inference.version,
            outputs: inference.outputs,
        })
    }

    fn publish(&self, status: ModelStatus) {
        // No receivers is fine: nobody is watching.
        let _ = self.inner.events.send(status);
    }

    /// Starts loading `name` and returns after step one.
    pub async fn load(&self, name: &str, mode: LoadMode) -> Result<LoadTicket, Error> {
        if !valid_model_name(name) {
            return Err(Error::InvalidArgument(format!(
                "'{name}' is not a model name (letters, digits, '_', '-', '.'; not starting with '.')"
            )));
        }
        let repository = self.inner.settings.repository.clone();
        let owned_name = name.to_owned();
        let on_disk = tokio::task::spawn_blocking(move || repository.contains(&owned_name))
            .await
            .map_err(|err| Error::Internal(format!("repository check: {err}")))?;
        if !on_disk {
            return Err(Error::ModelNotFound {
                model: name.to_owned(),
            });
        }

        // Step one: the placeholder, under the lock, no I/O.
        let (generation, status) = {
            let mut entries = self.inner.entries.lock();
            let entry = entries.entry(name.to_owned()).or_insert_with(Entry::new);
            match (entry.state, mode) {
                (ModelState::Loading, _) => {
                    return Err(Error::AlreadyExists {
                        model: name.to_owned(),
                        state: ModelState::Loading,
                    });
                }
                (ModelState::Ready, LoadMode::Load) => {
                    return Err(Error::AlreadyExists {
                        model: name.to_owned(),
                        state: ModelState::Ready,
                    });
                }
                (ModelState::Ready, LoadMode::Reload) if entry.reloading => {
                    return Err(Error::AlreadyExists {
                        model: name.to_owned(),
                        state: ModelState::Loading,
                    });
                }
                (ModelState::Unloading, _) => {
                    return Err(Error::FailedPrecondition(format!(
                        "model '{name}' is UNLOADING; load it again once it is UNAVAILABLE"
                    )));
                }
                (ModelState::Ready, LoadMode::Reload) => {
                    entry.reloading = true;
                }
                (ModelState::Unavailable | ModelState::Failed, _) => {
                    entry.enter(ModelState::Loading);
                    entry.reason = None;
                }
            }
            entry.generation += 1;
            let status = entry.status(name);
            self.publish(status.clone());
            (entry.generation, status)
        };

        let (done_tx, done) = oneshot::channel();
        let registry = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let outcome = registry.run_load(&name, generation).await;
            let _ = done_tx.send(outcome);
        });
        Ok(LoadTicket { status, done })
    }

    /// Steps two and three.
    async fn run_load(&self, name: &str, generation: u64) -> Result<ModelStatus, Error> {
        let permit = Arc::clone(&self.inner.load_permits)
            .acquire_owned()
            .await
            .map_err(|_| Error::Unavailable("the registry is shutting down".into()))?;
        let started = Instant::now();
        let repository = self.inner.settings.repository.clone();
        let cores = self.inner.settings.cores;
        let threads = Arc::clone(&self.inner.threads);
        let owned_name = name.to_owned();
        // Step two: no lock held, on the blocking pool.
        let loaded = tokio::task::spawn_blocking(move || {
            load_model(&repository, &owned_name, cores, threads)
        })
        .await
        .unwrap_or_else(|err| Err(format!("load task panicked: {err}")));
        drop(permit);
        let elapsed = started.elapsed();
        match &loaded {
            Ok(_) => tracing::info!(
                model = name,
                elapsed_ms = elapsed.as_millis() as u64,
                "model ready"
            ),
            Err(reason) => tracing::warn!(model = name, %reason, "model load failed"),
        }

        // Step three: swap, under the lock.
        let mut replaced = None;
        let outcome = {
            let mut entries = self.inner.entries.lock();
            let Some(entry) = entries.get_mut(name).filter(|e| e.generation == generation) else {
                return Err(Error::Unavailable(format!(
                    "load of model '{name}' was superseded"
                )));
            };
            let reloading = entry.reloading;
            entry.reloading = false;
            let outcome = match loaded {
                Ok(model) => {
                    replaced = entry.serving.replace(Arc::new(model));
                    entry.enter(ModelState::Ready);
                    entry.reason = None;
                    entry.load_duration = Some(elapsed);
                    Ok(entry.status(name))
                }
                Err(reason) if reloading => {
                    entry.reason = Some(format!(
                        "reload failed, previous versions keep serving: {reason}"
                    ));
                    Err(Error::LoadFailed(reason))
                }
                Err(reason) => {
                    entry.enter(ModelState::Failed);
                    entry.reason = Some(reason.clone());
                    entry.load_duration = Some(elapsed);
                    Err(Error::LoadFailed(reason))
                }
            };
            self.publish(entry.status(name));
            outcome
        };
        // The old versions go when their last in-flight request finishes.
        drop(replaced);
        outcome
    }

    /// Refuses new requests at once; in-flight ones finish on the `Arc` they
    /// hold. Returns after marking `Unloading`; the entry becomes `Unavailable`
    /// once every executor has ended and freed its module.
    pub fn unload(&self, name: &str) -> Result<ModelStatus, Error> {
        self.start_unload(name).map(|(status, _)| status)
    }

    /// Unloads every ready model and returns once their executors have ended
    /// and freed their modules. The last step of a shutdown, after the
    /// servers have drained: no torch work may still run while the process
    /// exits and libtorch's static destructors run.
    pub async fn unload_all(&self) {
        let names: Vec<String> = {
            let entries = self.inner.entries.lock();
            entries
                .iter()
                .filter(|(_, entry)| entry.state == ModelState::Ready)
                .map(|(name, _)| name.clone())
                .collect()
        };
        let mut finished = Vec::new();
        for name in names {
            if let Ok((_, Some(done))) = self.start_unload(&name) {
                finished.push(done);
            }
        }
        for done in finished {
            let _ = done.await;
        }
    }

    /// [`Registry::unload`], also handing back the task that completes once
    /// the executors have ended (`None` when there was nothing to unload).
    fn start_unload(&self, name: &str) -> Result<(ModelStatus, Option<JoinHandle<()>>), Error> {
        let (model, generation, status) = {
            let mut entries = self.inner.entries.lock();
            let entry = entries.get_mut(name).ok_or_else(|| Error::ModelNotFound {
                model: name.to_owned(),
            })?;
            match entry.state {
                ModelState::Ready => {}
                ModelState::Loading => {
                    return Err(Error::FailedPrecondition(format!(
                        "model '{name}' is LOADING; unload it once the load finishes"
                    )));
                }
                // Already on its way out, or not loaded: nothing to do.
                ModelState::Unloading | ModelState::Unavailable | ModelState::Failed => {
                    return Ok((entry.status(name), None));
                }
            }
            let model = entry.serving.take().expect("a ready entry serves a model");
            entry.enter(ModelState::Unloading);
            entry.reloading = false;
            entry.generation += 1;
            let mut status = entry.status(name);
            status.in_flight = model.in_flight();
            self.publish(status.clone());
            (model, entry.generation, status)
        };
        let waiters: Vec<_> = model
            .versions
            .iter()
            .flat_map(|v| v.pool.take_exit_waiters())
            .collect();
        drop(model);
        tracing::info!(model = name, "unloading");
        let registry = self.clone();
        let name = name.to_owned();
        let done = tokio::spawn(async move {
            for waiter in waiters {
                let _ = waiter.await;
            }
            let mut entries = registry.inner.entries.lock();
            if let Some(entry) = entries
                .get_mut(&name)
                .filter(|e| e.generation == generation && e.state == ModelState::Unloading)
            {
                entry.enter(ModelState::Unavailable);
                registry.publish(entry.status(&name));
            }
        });
        Ok((status, Some(done)))
    }
}

/// Step two of a load. Blocking: file I/O, deserialisation, warm-up.
fn load_model(
    repository: &ModelRepository,
    name: &str,
    cores: usize,
    threads: Arc<ThreadCounters>,
) -> Result<ReadyModel, String> {
    let dir = repository.model_dir(name);
    let config = ModelConfig::load(&dir)?;
    torch::check_device(config.device)?;
    let chosen = repository.select_versions(name, &config.version_policy)?;
    let intra_op_threads = config
        .intra_op_threads
        .unwrap_or_else(|| (cores / config.instances).max(1));
    torch::set_intra_op_threads(intra_op_threads);
    let outputs: Arc<[crate::tensor::TensorSpec]> = config.outputs.clone().into();

    let mut prepared = Vec::with_capacity(chosen.len());
    for (version, file) in chosen {
        let bytes = std::fs::read(&file)
            .map_err(|err| format!("{}: cannot read: {err}", file.display()))?;
        let mut modules = Vec::with_capacity(config.instances);
        for _ in 0..config.instances {
            modules.push(
                TorchModule::load(&bytes, config.device)
                    .map_err(|err| format!("{}: {err}", file.display()))?,
            );
        }
        drop(bytes);
        warm_up(&modules[0], &config)
            .map_err(|err| format!("{}: warm-up: {err}", file.display()))?;
        prepared.push((version, modules));
    }
    // Every version validated: only now start threads.
    let mut versions = Vec::with_capacity(prepared.len());
    for (version, modules) in prepared {
        let label = format!("{name}:{}", version.label);
        let pool = ExecutorPool::start(
            &label,
            modules,
            Arc::clone(&outputs),
            intra_op_threads,
            config.max_queue_size,
            config.batching.clone(),
            Arc::clone(&threads),
        )
        .map_err(|err| format!("starting executor threads: {err}"))?;
        versions.push(ReadyVersion {
            version,
            pool,
            stats: VersionStats::default(),
        });
    }
    Ok(ReadyModel {
        name: name.to_owned(),
        config: Arc::new(config),
        versions,
        intra_op_threads,
        in_flight: AtomicU64::new(0),
        success: AtomicU64::new(0),
        failure: AtomicU64::new(0),
    })
}

/// Runs one forward on zeros shaped by the config (free dims and batch as 1)
/// and checks the outputs against the declared ones.
fn warm_up(module: &TorchModule, config: &ModelConfig) -> Result<(), String> {
    let mut inputs = Vec::with_capacity(config.inputs.len());
    for spec in &config.inputs {
        let shape: Vec<i64> = config
            .full_shape(spec)
            .into_iter()
            .map(|d| d.max(1))
            .collect();
        let n_bytes = crate::tensor::numel(&shape)
            .zip(spec.dtype.fixed_size())
            .and_then(|(n, size)| n.checked_mul(size))
            .ok_or_else(|| {
                format!(
                    "input '{}': shape {} is too large",
                    spec.name,
                    shape_str(&shape)
                )
            })?;
        let tensor = Tensor::new(&spec.name, spec.dtype, shape, vec![0u8; n_bytes].into())
            .map_err(|err| err.to_string())?;
        inputs.push(tensor);
    }
    let outputs = module
        .forward(&inputs, &config.outputs)
        .map_err(|err| match err {
            Error::Internal(msg) => msg,
            other => other.to_string(),
        })?;
    for (output, spec) in outputs.iter().zip(&config.outputs) {
        torch::check_output(output, spec, &config.full_shape(spec))?;
    }
    Ok(())
}
