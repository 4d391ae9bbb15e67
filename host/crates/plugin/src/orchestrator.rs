//! Orchestrator plugins: the `orchestrator-plugin` world of WIT 0.1.1, a
//! plugin served as a model that answers by calling other models.
//!
//! The other worlds are called synchronously, inline on the request's
//! thread. An orchestrator waits for models, so its instances live on the
//! runtime's async linker: `run` is a future, and while the guest sits in
//! `models.infer` its fiber is parked and the thread serves other requests.
//!
//! Time is kept two ways. The manifest's deadline bounds the guest's own
//! time: the epoch callback takes the time spent waiting in `models.infer`
//! off the clock before it judges, so a deadline of 50 ms is 50 ms of guest
//! work however long the models take. The request's deadline bounds the
//! whole call, nested models included. Calls into models nest at most
//! [`RunContext::max_depth`] deep, which stops an orchestrator that calls
//! itself.
//!
//! This crate knows nothing of models: the host hands each run a
//! [`ModelCaller`](crate::types::ModelCaller), its pipeline, through which
//! nested calls go. That trait and the records a run is given and makes
//! ([`RunContext`], [`NestedCall`]) are in `types.rs`; the clock an
//! orchestrator's store carries ([`Orchestration`]) is in `state.rs`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::FutureExt;
use wasmtime::component::Component;
use wasmtime::{Store, UpdateDeadline};

use plinth_core::error::Error;
use plinth_core::tensor::Tensor;

use super::bindings::orchestrator::{OrchestratorPlugin, OrchestratorPluginPre};
use super::bindings::{wit, wit_models};
use super::convert::{from_wit, to_wit};
use super::engine::{EPOCH_TICK, Runtime};
use super::manifest::Manifest;
use super::meta::FailureCause;
use super::meta::PluginMeta;
use super::outcome::{
    CallError, call_error, classify, described, initialised, panicked, plugin_error, root_cause,
};
use super::state::{Orchestration, PluginState};
use super::types::{NestedCall, PluginKind, RequestView, RunContext};

/// How deep nested model calls may go unless the server says otherwise.
pub const DEFAULT_MAX_DEPTH: u32 = 4;
/// Warm instances kept per orchestrator.
const MAX_IDLE_INSTANCES: usize = 16;

fn ticks(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis().div_ceil(EPOCH_TICK.as_millis())).unwrap_or(u64::MAX) + 1
}

/// A nested failure as the guest sees it: the host's message, classed.
fn infer_error(err: &Error) -> wit_models::InferError {
    use wit_models::InferError;
    let message = err.to_string();
    match err {
        Error::ModelNotFound { .. } | Error::VersionNotFound { .. } | Error::NotFound(_) => {
            InferError::NotFound(message)
        }
        Error::InvalidArgument(_) => InferError::InvalidInput(message),
        Error::ModelNotReady { .. }
        | Error::Unavailable(_)
        | Error::ResourceExhausted(_)
        | Error::Cancelled => InferError::Unavailable(message),
        Error::DeadlineExceeded(_) => InferError::DeadlineExceeded(message),
        Error::FailedPrecondition(_)
        | Error::AlreadyExists { .. }
        | Error::Conflict(_)
        | Error::Unimplemented(_)
        | Error::LoadFailed(_)
        | Error::Internal(_) => InferError::Internal(message),
    }
}

impl wit_models::Host for PluginState {
    async fn infer(
        &mut self,
        model: String,
        version: String,
        inputs: Vec<wit::Tensor>,
    ) -> Result<Vec<wit::Tensor>, wit_models::InferError> {
        let plugin = self.name.clone();
        let Some((parent, context)) = self.orchestration.as_ref().and_then(|o| o.scope.clone())
        else {
            return Err(wit_models::InferError::Internal(
                "models.infer is only available while the orchestrator answers a request (not in init)"
                    .into(),
            ));
        };
        let depth = context.depth + 1;
        let outcome = if depth > context.max_depth {
            Err(Error::FailedPrecondition(format!(
                "model '{model}': orchestrator '{plugin}' would call it at depth {depth}, past the limit of {} nested calls (--max-call-depth)",
                context.max_depth
            )))
        } else {
            let inputs: Result<Vec<Tensor>, Error> =
                inputs.into_iter().map(|t| from_wit(&plugin, t)).collect();
            match inputs {
                Err(err) => Err(err),
                Ok(inputs) => {
                    let call = NestedCall {
                        parent,
                        depth,
                        model,
                        version: Some(version).filter(|v| !v.is_empty()),
                        inputs,
                        deadline: context.deadline,
                    };
                    let waiting = Instant::now();
                    let outcome = context.caller.infer(call).await;
                    if let Some(orchestration) = self.orchestration.as_mut() {
                        orchestration.waited += waiting.elapsed();
                    }
                    outcome
                }
            }
        };
        match outcome {
            Ok(outputs) => Ok(outputs.into_iter().map(to_wit).collect()),
            Err(err) => {
                let too_deep = depth > context.max_depth;
                let answer = if too_deep {
                    wit_models::InferError::TooDeep(err.to_string())
                } else {
                    infer_error(&err)
                };
                if let Some(orchestration) = self.orchestration.as_mut() {
                    orchestration.nested_failure = Some(err);
                }
                Err(answer)
            }
        }
    }
}

/// A live orchestrator instance.
struct Instance {
    store: Store<PluginState>,
    exports: OrchestratorPlugin,
}

/// A compiled, validated orchestrator with its pool of warm instances.
pub struct Orchestrator {
    meta: PluginMeta,
    state_name: Arc<str>,
    pre: OrchestratorPluginPre<PluginState>,
    idle: parking_lot::Mutex<Vec<Instance>>,
}

impl std::ops::Deref for Orchestrator {
    type Target = PluginMeta;

    fn deref(&self) -> &PluginMeta {
        &self.meta
    }
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("name", &self.name)
            .field("version", &self.info.version)
            .finish()
    }
}

impl Orchestrator {
    /// Instantiates a component `inspect` found to be an orchestrator and
    /// calls `describe` and `init` once. Blocking: call it off the tokio
    /// workers.
    pub(super) fn from_component(
        name: &str,
        component: &Component,
        file_hash: String,
        manifest: Manifest,
    ) -> Result<Orchestrator, String> {
        let pre = Runtime::get().orchestrator_pre(component)?;
        let pre = OrchestratorPluginPre::new(pre).map_err(|err| {
            format!(
                "does not export the orchestrator-plugin world's interface: {}",
                root_cause(&err)
            )
        })?;
        let mut plugin = Orchestrator {
            meta: PluginMeta::new(name, PluginKind::Orchestrator, file_hash, manifest),
            state_name: Arc::from(name),
            pre,
            idle: parking_lot::Mutex::new(Vec::new()),
        };
        let (info, instance) = futures::executor::block_on(async {
            let mut instance = plugin.instantiate().await.map_err(|err| err.to_string())?;
            plugin.arm(&mut instance.store);
            let info = instance
                .exports
                .call_describe(&mut instance.store)
                .await
                .map_err(|err| {
                    format!(
                        "describe() failed: {}",
                        classify(err, &instance.store, &plugin.manifest)
                    )
                })?;
            Ok::<_, String>((info, instance))
        })?;
        plugin.meta.info = described(info)?;
        plugin.idle.lock().push(instance);
        Ok(plugin)
    }

    /// Starts the clock of a call on `store` and clears what the last one left.
    fn arm(&self, store: &mut Store<PluginState>) {
        store.set_epoch_deadline(ticks(self.manifest.deadline));
        let state = store.data_mut();
        state.last_error_log = None;
        state.memory.clear();
        let orchestration = state
            .orchestration
            .get_or_insert_with(|| Orchestration::new(self.manifest.deadline));
        orchestration.started = Instant::now();
        orchestration.waited = Duration::ZERO;
        orchestration.scope = None;
        orchestration.nested_failure = None;
    }

    async fn instantiate(&self) -> Result<Instance, CallError> {
        let mut store = Runtime::get()
            .store(&self.state_name, &self.manifest)
            .map_err(CallError::Instantiate)?;
        // At the deadline, judge the guest's own time: what it spent waiting
        // for models does not count. A guest with time left yields the thread
        // (a long computation shares it) and goes on.
        store.epoch_deadline_callback(|context| {
            match context
                .data()
                .orchestration
                .as_ref()
                .and_then(Orchestration::left)
            {
                Some(left) => Ok(UpdateDeadline::Yield(ticks(left))),
                None => Ok(UpdateDeadline::Interrupt),
            }
        });
        self.arm(&mut store);
        let exports = match self.pre.instantiate_async(&mut store).await {
            Ok(exports) => exports,
            Err(err) => {
                return Err(CallError::Instantiate(
                    classify(err, &store, &self.manifest).to_string(),
                ));
            }
        };
        let mut instance = Instance { store, exports };
        self.arm(&mut instance.store);
        let outcome = instance.exports.call_init(&mut instance.store).await;
        initialised(outcome, &mut instance.store, &self.manifest)?;
        Ok(instance)
    }

    /// Answers `request` with `inputs`: runs the guest's `run` on a warm
    /// instance, its nested model calls going through `context.caller`. A
    /// trap, a timeout or running out of memory fails this request only, and
    /// the instance is dropped; so is one still running when the request's
    /// deadline passes.
    pub async fn run(
        &self,
        request: &RequestView,
        inputs: Vec<Tensor>,
        context: RunContext,
    ) -> Result<Vec<Tensor>, Error> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let pooled = self.idle.lock().pop();
        let mut instance = match pooled {
            Some(instance) => instance,
            None => self.instantiate().await.map_err(|err| {
                self.record_error(&err);
                call_error(&self.name, "run", err)
            })?,
        };
        self.arm(&mut instance.store);
        let deadline = context.deadline;
        if let Some(orchestration) = instance.store.data_mut().orchestration.as_mut() {
            orchestration.scope = Some((request.clone(), context));
        }
        let info = request.to_wit();
        let tensors: Vec<wit::Tensor> = inputs.into_iter().map(to_wit).collect();
        let left = deadline.saturating_duration_since(Instant::now());
        let outcome = {
            let call = std::panic::AssertUnwindSafe(
                instance.exports.plinth_plugin_orchestrator().call_run(
                    &mut instance.store,
                    &info,
                    &tensors,
                ),
            )
            .catch_unwind();
            tokio::time::timeout(left, call).await
        };
        let res = match outcome {
            // The instance is dropped mid-call: its fiber goes with it.
            Err(_) => {
                let err = Error::DeadlineExceeded(format!(
                    "model '{}': the request's time ran out while orchestrator '{}' was answering",
                    request.model, self.name
                ));
                self.stats
                    .record_failure(FailureCause::Timeout, err.to_string());
                return Err(err);
            }
            Ok(Err(panic)) => {
                let err = panicked(&*panic);
                self.record_error(&err);
                return Err(call_error(&self.name, "run", err));
            }
            Ok(Ok(res)) => res,
        };
        let nested_failure = instance
            .store
            .data_mut()
            .orchestration
            .as_mut()
            .and_then(|o| {
                o.scope = None;
                o.nested_failure.take()
            });
        match res {
            Ok(answer) => {
                if !instance.store.data().memory.past_high_water() {
                    let mut idle = self.idle.lock();
                    if idle.len() < MAX_IDLE_INSTANCES {
                        idle.push(instance);
                    }
                } else {
                    self.stats.recycled.fetch_add(1, Ordering::Relaxed);
                }
                match answer {
                    Ok(outputs) => outputs
                        .into_iter()
                        .map(|t| from_wit(&self.name, t))
                        .collect(),
                    Err(err) => {
                        let err = plugin_error(err);
                        // The guest passed a model's failure on (`?`): the
                        // client gets that failure, with its own status.
                        if let Some(nested) = nested_failure
                            && nested.to_string() == err.message()
                        {
                            return Err(nested);
                        }
                        let err = CallError::Plugin(err);
                        self.record_error(&err);
                        Err(call_error(&self.name, "run", err))
                    }
                }
            }
            Err(trap) => {
                let logged = instance.store.data_mut().last_error_log.take();
                let classified = match (classify(trap, &instance.store, &self.manifest), logged) {
                    (CallError::Trap(cause), Some(message)) => {
                        CallError::Trap(format!("{message} ({cause})"))
                    }
                    (other, _) => other,
                };
                self.record_error(&classified);
                Err(call_error(&self.name, "run", classified))
            }
        }
    }

    fn record_error(&self, err: &CallError) {
        self.stats
            .record_failure(FailureCause::of(err), err.to_string());
        tracing::warn!(plugin = %self.name, error = %err, "orchestrator call failed");
    }
}
