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
//!
//! The files: `entry.rs` is one model's state machine, `load.rs` step two,
//! `ready.rs` the request path of a ready model, `stats.rs` its statistics.

mod entry;
mod load;
mod load_threads;
mod ready;
mod residency;
pub mod series;
mod stats;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::{Semaphore, broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use plinth_torch::ComputeBudget;
use plinth_torch::executor::ThreadCounters;

use crate::config::{ModelRepository, valid_model_name};
use crate::error::Error;
pub use plinth_core::ModelState;

use entry::{Entry, LoadFailure, LoadFinished};
use load::LoadContext;
pub use ready::{InferResponse, Inference, ReadyModel, ReadyVersion};
pub use residency::ResidencyCounts;
pub use stats::{BatchTimings, RequestRecord, StatCounter, VersionStats};

#[cfg(test)]
pub(crate) use ready::{test_model, test_model_with};

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
    /// Each ready version's format, in the order of `versions`.
    pub formats: Vec<String>,
    pub device: Option<String>,
    pub in_flight: u64,
    /// A replacement is loading while the current versions keep serving.
    pub reloading: bool,
    /// What the serving versions keep in memory (0 when none serve).
    pub memory_bytes: u64,
    /// Loaded on demand and evictable, rather than pinned.
    pub on_demand: bool,
}

impl ModelStatus {
    /// Whether a load, reload or unload of the model is under way: the one
    /// definition of "busy". A change to a busy model must wait until it
    /// settles ([`Registry::settled`]).
    pub fn is_busy(&self) -> bool {
        matches!(self.state, ModelState::Loading | ModelState::Unloading) || self.reloading
    }
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
    /// The compute budget: cores' worth of forward passes that may run at
    /// once over every model (`--threads`).
    pub cores: usize,
    /// Room in the broadcast of state changes; a watcher that falls further
    /// behind resyncs from [`Registry::list`].
    pub event_capacity: usize,
    /// How long an idle executor polls its queue before parking.
    pub executor_spin: Duration,
    /// Requests of at most this many input bytes run their forward pass on
    /// their own thread when nothing is queued and the budget has a core
    /// free (`--inline-forward-max-bytes`); 0 never does.
    pub inline_forward_max_bytes: usize,
    /// The memory budget per device (`--memory-budget-mib`): a load that
    /// would pass it first evicts idle on-demand models.
    pub memory_budget: Option<u64>,
    /// Record the per-model serving series (`plinth_model_*`); off only to
    /// measure what they cost (`--serving-metrics=false`).
    pub serving_series: bool,
}

impl RegistrySettings {
    pub fn new(repository: ModelRepository, cores: usize) -> RegistrySettings {
        RegistrySettings {
            repository,
            max_concurrent_loads: 4,
            cores,
            event_capacity: 1024,
            executor_spin: Duration::ZERO,
            inline_forward_max_bytes: 0,
            memory_budget: None,
            serving_series: true,
        }
    }
}

/// The ready models and their version labels, sorted by name: what a
/// router chooses among. Rebuilt under the entries lock at every state
/// change, so a request reads it without taking the lock or allocating.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReadySet {
    pub models: Vec<(String, Vec<String>)>,
}

struct Inner {
    settings: RegistrySettings,
    entries: Mutex<HashMap<String, Entry>>,
    ready: ArcSwap<ReadySet>,
    events: broadcast::Sender<ModelStatus>,
    load_permits: Arc<Semaphore>,
    /// Where loads run: one long-lived thread per permit.
    load_threads: load_threads::LoadThreads,
    load_context: LoadContext,
    /// Every load and unload task, so that a shutdown can wait for them.
    tasks: TaskTracker,
    residency: residency::ResidencyStats,
    /// The host's check on READY models ([`Registry::set_serving_gate`]).
    gate: std::sync::OnceLock<ServingGate>,
}

/// Why a loaded model cannot serve now, if it cannot.
type ServingGate = Box<dyn Fn(&crate::config::ModelConfig) -> Option<String> + Send + Sync>;

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

/// An unload under way: the model taken out of its entry, until its
/// executors have exited.
struct Drain {
    name: String,
    model: Arc<ReadyModel>,
    generation: u64,
    status: ModelStatus,
}

/// The thread budget as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadBudget {
    /// Cores' worth of forward passes that may run at once (`--threads`).
    pub cores: usize,
    /// Intra-op threads of an executor of a model with one instance and no override.
    pub intra_op_threads: usize,
    pub inter_op_threads: usize,
    pub executors: usize,
    /// Intra-op threads of every executor: the torch threads that exist.
    pub torch_threads: usize,
    /// Torch threads of the forward passes (and warm-ups) running now.
    pub cores_in_use: usize,
    /// The most torch threads ever computing at once; the budget keeps it
    /// at or below `cores`.
    pub cores_peak: usize,
}

impl Registry {
    pub fn new(settings: RegistrySettings) -> Registry {
        let (events, _) = broadcast::channel(settings.event_capacity.max(1));
        let permits = settings.max_concurrent_loads.max(1);
        let load_context = LoadContext {
            budget: Arc::new(ComputeBudget::new(settings.cores)),
            counters: Arc::new(ThreadCounters::default()),
            closing: CancellationToken::new(),
            spin: settings.executor_spin,
            inline_max_bytes: settings.inline_forward_max_bytes,
            metrics: if settings.serving_series {
                series::ServingMetrics::default()
            } else {
                series::ServingMetrics::disabled()
            },
        };
        Registry {
            inner: Arc::new(Inner {
                settings,
                entries: Mutex::new(HashMap::new()),
                ready: ArcSwap::default(),
                events,
                load_permits: Arc::new(Semaphore::new(permits)),
                load_threads: load_threads::LoadThreads::new(permits),
                load_context,
                tasks: TaskTracker::new(),
                residency: residency::ResidencyStats::default(),
                gate: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Adds the host's check to what the registry reports as READY: `gate`
    /// says why a loaded model cannot serve now (its orchestrator plugin is
    /// not loaded, say), and such a model is listed as UNAVAILABLE with that
    /// reason. The registry itself knows nothing of plugins. Set once.
    pub fn set_serving_gate(
        &self,
        gate: impl Fn(&crate::config::ModelConfig) -> Option<String> + Send + Sync + 'static,
    ) {
        if self.inner.gate.set(Box::new(gate)).is_err() {
            tracing::warn!("the registry's serving gate is already set");
        }
    }

    /// `status` as the gate sees it.
    fn gated(&self, entry: &Entry, status: ModelStatus) -> ModelStatus {
        let (Some(gate), Some(model)) = (self.inner.gate.get(), entry.serving.as_deref()) else {
            return status;
        };
        if status.state != ModelState::Ready {
            return status;
        }
        match gate(&model.config) {
            None => status,
            Some(reason) => ModelStatus {
                state: ModelState::Unavailable,
                reason: Some(reason),
                ..status
            },
        }
    }

    pub fn repository(&self) -> &ModelRepository {
        &self.inner.settings.repository
    }

    /// The serving series every loaded version records into.
    pub fn serving_metrics(&self) -> &series::ServingMetrics {
        &self.inner.load_context.metrics
    }

    /// The loaded models now (serving ones, also while draining for a
    /// reload), without touching their residency.
    pub fn serving_models(&self) -> Vec<(String, Arc<ReadyModel>)> {
        let entries = self.inner.entries.lock();
        let mut models: Vec<(String, Arc<ReadyModel>)> = entries
            .iter()
            .filter_map(|(name, entry)| entry.serving.clone().map(|m| (name.clone(), m)))
            .collect();
        models.sort_by(|a, b| a.0.cmp(&b.0));
        models
    }

    pub fn thread_budget(&self) -> ThreadBudget {
        let context = &self.inner.load_context;
        let budget = &context.budget;
        let (cores_in_use, cores_peak) = context.counters.computing_now_and_peak();
        ThreadBudget {
            cores: budget.limit(),
            intra_op_threads: budget.limit(),
            inter_op_threads: 1,
            executors: context.counters.executors.load(Ordering::Relaxed),
            torch_threads: context.counters.torch_threads.load(Ordering::Relaxed),
            cores_in_use,
            cores_peak,
        }
    }

    /// Whether [`Registry::unload_all`] has begun: loads are refused from then on.
    pub fn is_closing(&self) -> bool {
        self.inner.load_context.closing.is_cancelled()
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
            .map(|(name, entry)| self.gated(entry, entry.status(name)))
            .collect();
        drop(entries);
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn status(&self, name: &str) -> Result<ModelStatus, Error> {
        let entries = self.inner.entries.lock();
        entries
            .get(name)
            .map(|entry| self.gated(entry, entry.status(name)))
            .ok_or_else(|| Error::ModelNotFound {
                model: name.to_owned(),
            })
    }

    /// Waits until `name` is not busy ([`ModelStatus::is_busy`]) and returns
    /// its status then. A lagged subscription is not a lost change: the
    /// status is read again whatever the broadcast says.
    pub async fn settled(&self, name: &str) -> Result<ModelStatus, Error> {
        let mut changes = self.subscribe();
        loop {
            let status = self.status(name)?;
            if !status.is_busy() {
                return Ok(status);
            }
            loop {
                match changes.recv().await {
                    Ok(change) if change.name != name => continue,
                    // A change of this model, or an unknown number of missed
                    // changes: look again.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(Error::Unavailable("the registry has shut down".into()));
                    }
                }
            }
        }
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

    /// Ready models and their version labels, for a router plugin to choose
    /// from: the same `Arc` until the set changes.
    pub fn ready_models(&self) -> Arc<ReadySet> {
        self.inner.ready.load_full()
    }

    /// The serving model, whatever its state, for detail views.
    pub fn serving(&self, name: &str) -> Option<Arc<ReadyModel>> {
        self.inner
            .entries
            .lock()
            .get(name)
            .and_then(|e| e.serving.clone())
    }

    /// Announces a state change, with the entries lock held (`entries` is
    /// what it guards): the ready set is rebuilt if the change touched it.
    fn publish(&self, entries: &HashMap<String, Entry>, status: ModelStatus) {
        let ready = ReadySet {
            models: {
                let mut models: Vec<(String, Vec<String>)> = entries
                    .iter()
                    .filter(|(_, e)| e.state == ModelState::Ready)
                    .filter_map(|(name, e)| {
                        e.serving
                            .as_ref()
                            .map(|m| (name.clone(), m.version_labels()))
                    })
                    .collect();
                models.sort_unstable();
                models
            },
        };
        if **self.inner.ready.load() != ready {
            self.inner.ready.store(Arc::new(ready));
        }
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
        if self.is_closing() {
            return Err(shutting_down());
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
            // Checked again under the lock: `unload_all` closes the registry
            // under it, so no load starts after its drain began.
            if self.is_closing() {
                return Err(shutting_down());
            }
            let entry = entries.entry(name.to_owned()).or_insert_with(Entry::new);
            let generation = entry.begin_load(name, mode)?;
            let status = entry.status(name);
            self.publish(&entries, status.clone());
            (generation, status)
        };

        let (done_tx, done) = oneshot::channel();
        let registry = self.clone();
        let name = name.to_owned();
        self.inner.tasks.spawn(async move {
            let outcome = registry.run_load(&name, generation).await;
            let _ = done_tx.send(outcome);
        });
        Ok(LoadTicket { status, done })
    }

    /// Steps two and three.
    async fn run_load(&self, name: &str, generation: u64) -> Result<ModelStatus, Error> {
        let closing = self.inner.load_context.closing.clone();
        let permits = Arc::clone(&self.inner.load_permits);
        let started = Instant::now();
        let loaded = tokio::select! {
            // A load still waiting for a slot at shutdown never starts.
            () = closing.cancelled() => Err(LoadFailure::Broken("the server is shutting down".to_owned())),
            permit = permits.acquire_owned() => match permit {
                Ok(permit) => match self.make_room(name).await {
                    Err(failure) => Err(failure),
                    Ok(()) => {
                    let repository = self.inner.settings.repository.clone();
                    let context = self.inner.load_context.clone();
                    let owned_name = name.to_owned();
                    // Step two: no lock held, on a load thread.
                    let loaded = self
                        .inner
                        .load_threads
                        .run(move || load::load_model(&repository, &owned_name, &context))
                        .await
                        .and_then(|loaded| loaded)
                        // The executors start here, at a serving thread's
                        // priority, not on the (nice) load thread.
                        .and_then(|start| start())
                        .map_err(LoadFailure::Broken);
                    drop(permit);
                    loaded
                    }
                },
                Err(_) => Err(LoadFailure::Broken("the server is shutting down".to_owned())),
            },
        };
        let elapsed = started.elapsed();
        match &loaded {
            Ok(_) => tracing::info!(
                model = name,
                elapsed_ms = elapsed.as_millis() as u64,
                "model ready"
            ),
            Err(LoadFailure::Broken(reason)) => {
                tracing::warn!(model = name, %reason, "model load failed")
            }
            Err(LoadFailure::NoRoom(reason)) => {
                tracing::warn!(model = name, %reason, "model load postponed: no room in the memory budget now")
            }
        }

        // Step three: swap, under the lock.
        let (finished, status) = {
            let mut entries = self.inner.entries.lock();
            if let Some(entry) = entries.get_mut(name) {
                // The model's own size counts from here on (if it loaded).
                entry.reserved = None;
                if let Ok(model) = &loaded {
                    entry.residency = model.config.residency;
                    entry.last_used = Instant::now();
                }
            }
            let finished = entries
                .get_mut(name)
                .and_then(|entry| Some((entry.finish_load(generation, loaded, elapsed)?, entry)));
            let Some((finished, entry)) = finished else {
                return Err(Error::Unavailable(format!(
                    "load of model '{name}' was superseded"
                )));
            };
            let status = entry.status(name);
            self.publish(&entries, status.clone());
            (finished, status)
        };
        let LoadFinished { outcome, replaced } = finished;
        // The old versions go when their last in-flight request finishes.
        drop(replaced);
        outcome.map(|()| status)
    }

    /// Refuses new requests at once; in-flight ones finish on the `Arc` they
    /// hold. Returns after marking `Unloading`; the entry becomes `Unavailable`
    /// once every executor has ended and freed its module.
    pub fn unload(&self, name: &str) -> Result<ModelStatus, Error> {
        let (drain, status) = {
            let mut entries = self.inner.entries.lock();
            let Some(drain) = self.begin_unload_locked(&mut entries, name)? else {
                let entry = entries.get(name).ok_or_else(|| Error::ModelNotFound {
                    model: name.to_owned(),
                })?;
                return Ok(entry.status(name));
            };
            let status = drain.status.clone();
            (drain, status)
        };
        self.spawn_drain(drain);
        Ok(status)
    }

    /// The first half of an unload, with the entries lock held: the entry
    /// turns UNLOADING and its model's bytes count as draining on its
    /// device until its executors have exited (the budget's view). `None`
    /// when there is nothing to unload.
    fn begin_unload_locked(
        &self,
        entries: &mut HashMap<String, Entry>,
        name: &str,
    ) -> Result<Option<Drain>, Error> {
        let entry = entries.get_mut(name).ok_or_else(|| Error::ModelNotFound {
            model: name.to_owned(),
        })?;
        let Some((model, generation)) = entry.begin_unload(name)? else {
            return Ok(None);
        };
        entry
            .draining
            .push((generation, model.config.device, model.memory_bytes));
        let mut status = entry.status(name);
        status.in_flight = model.in_flight();
        self.publish(entries, status.clone());
        Ok(Some(Drain {
            name: name.to_owned(),
            model,
            generation,
            status,
        }))
    }

    /// The second half, in the background: waits for every executor of the
    /// model to exit (requests in flight finish first), then marks the
    /// entry UNAVAILABLE and stops counting its bytes. The receiver hears
    /// when that is done.
    fn spawn_drain(&self, drain: Drain) -> oneshot::Receiver<()> {
        let Drain {
            name,
            model,
            generation,
            ..
        } = drain;
        let waiters = model.take_exit_waiters();
        drop(model);
        tracing::info!(model = name, "unloading");
        let (done_tx, done) = oneshot::channel();
        let registry = self.clone();
        self.inner.tasks.spawn(async move {
            for waiter in waiters {
                let _ = waiter.await;
            }
            let mut entries = registry.inner.entries.lock();
            if let Some(entry) = entries.get_mut(&name) {
                entry.draining.retain(|(g, _, _)| *g != generation);
                if entry.finish_unload(generation) {
                    let status = entry.status(&name);
                    registry.publish(&entries, status);
                }
            }
            drop(entries);
            let _ = done_tx.send(());
        });
        done
    }

    /// The last step of a shutdown, after the servers have drained: refuses
    /// new loads, lets the loads under way finish (those that had not
    /// started their executors yet start none), unloads every ready model
    /// and returns once every executor thread has ended and freed its
    /// module. No torch work may still run while the process exits and
    /// libtorch's static destructors run.
    pub async fn unload_all(&self) {
        {
            // Under the lock, so that no load passes step one after this.
            let _entries = self.inner.entries.lock();
            self.inner.load_context.closing.cancel();
        }
        self.inner.tasks.close();
        // Loads (and unloads) under way.
        self.inner.tasks.wait().await;
        let ready: Vec<String> = {
            let entries = self.inner.entries.lock();
            entries
                .iter()
                .filter(|(_, entry)| entry.state == ModelState::Ready)
                .map(|(name, _)| name.clone())
                .collect()
        };
        for name in ready {
            if let Err(err) = self.unload(&name) {
                tracing::warn!(model = name, %err, "unload at shutdown failed");
            }
        }
        self.inner.tasks.wait().await;
    }

    /// Puts a ready model straight into the registry, for unit tests of what
    /// sits above it.
    #[cfg(test)]
    pub(crate) fn insert_ready(&self, model: ReadyModel) {
        let name = model.name.clone();
        let mut entries = self.inner.entries.lock();
        let entry = entries.entry(name.clone()).or_insert_with(Entry::new);
        let generation = entry
            .begin_load(&name, LoadMode::Load)
            .expect("a new entry loads");
        entry
            .finish_load(generation, Ok(model), Duration::ZERO)
            .expect("its own generation")
            .outcome
            .expect("a ready model");
        let status = entry.status(&name);
        self.publish(&entries, status);
    }
}

fn shutting_down() -> Error {
    Error::Unavailable("the server is shutting down".into())
}
