//! Plugins of the synchronous worlds (router, processor, metrics, health)
//! and their pools of warm instances. A call runs on a reused instance with
//! a fresh deadline and the memory cap; an instance that traps, times out or
//! runs out of memory is dropped, and the next call makes a fresh one.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use wasmtime::Store;
use wasmtime::component::{Component, InstancePre};

use super::bindings::wit;
use super::engine::{EPOCH_TICK, Runtime};
use super::manifest::Manifest;
use super::meta::{FailureCause, PluginMeta};
use super::outcome::{
    CallError, classify, described, initialised, panicked, plugin_error, root_cause,
};
use super::state::PluginState;
use super::types::PluginKind;

/// Warm instances kept per stateless plugin.
const MAX_IDLE_INSTANCES: usize = 16;

/// What the pool needs of a world: its bindgen types and how to make and
/// greet an instance. The kinds of `kind.rs` implement it. Sealed: it cannot
/// be named outside this crate, so the four worlds are the only kinds.
pub trait World: Sized + Send + Sync + 'static {
    const KIND: PluginKind;
    /// The pre-linked component, typed to the world.
    type Pre: Send + Sync + 'static;
    /// An instance's typed exports.
    type Exports: Send + Sync + 'static;

    fn pre(pre: InstancePre<PluginState>) -> wasmtime::Result<Self::Pre>;
    fn instantiate(
        pre: &Self::Pre,
        store: &mut Store<PluginState>,
    ) -> wasmtime::Result<Self::Exports>;
    fn describe(
        exports: &Self::Exports,
        store: &mut Store<PluginState>,
    ) -> wasmtime::Result<wit::PluginInfo>;
    fn init(
        exports: &Self::Exports,
        store: &mut Store<PluginState>,
    ) -> wasmtime::Result<Result<(), wit::PluginError>>;
}

/// A live instance of a plugin of kind `K`, with its typed exports.
pub(super) struct Instance<K: World> {
    pub store: Store<PluginState>,
    pub exports: K::Exports,
}

/// A compiled, validated plugin of kind `K` with its pool of warm instances.
/// Only the calls of its kind exist on it (`Plugin<Processor>::process`,
/// `Plugin<Router>::route`, ...).
pub struct Plugin<K: World> {
    meta: PluginMeta,
    state_name: Arc<str>,
    pre: K::Pre,
    idle: parking_lot::Mutex<Vec<Instance<K>>>,
}

impl<K: World> std::ops::Deref for Plugin<K> {
    type Target = PluginMeta;

    fn deref(&self) -> &PluginMeta {
        &self.meta
    }
}

impl<K: World> std::fmt::Debug for Plugin<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("version", &self.info.version)
            .finish()
    }
}

impl<K: World> Plugin<K> {
    /// The pre-linked component.
    pub(super) fn pre(&self) -> &K::Pre {
        &self.pre
    }

    /// Compiles, checks and instantiates a plugin that must be of kind `K`,
    /// and calls `describe` and `init` once. Blocking.
    pub fn load(
        name: &str,
        bytes: &[u8],
        manifest: Manifest,
        cache_dir: &Path,
    ) -> Result<Plugin<K>, String> {
        let runtime = Runtime::get();
        let (component, file_hash) = runtime.compile(bytes, cache_dir)?;
        let kind = runtime.inspect(&component)?;
        if kind != K::KIND {
            return Err(format!("is a {}, not a {}", kind.world(), K::KIND.world()));
        }
        Plugin::from_component(name, &component, file_hash, manifest)
    }

    /// Instantiates a component `inspect` found to be of kind `K` and calls
    /// `describe` and `init` once, so a plugin that cannot run is refused
    /// before it is swapped in. Blocking.
    pub(super) fn from_component(
        name: &str,
        component: &Component,
        file_hash: String,
        manifest: Manifest,
    ) -> Result<Plugin<K>, String> {
        let pre = Runtime::get().instance_pre(component)?;
        let pre = K::pre(pre).map_err(|err| {
            format!(
                "does not export the {} world's interface: {}",
                K::KIND.world(),
                root_cause(&err)
            )
        })?;
        let mut plugin = Plugin {
            meta: PluginMeta::new(name, K::KIND, file_hash, manifest),
            state_name: Arc::from(name),
            pre,
            idle: parking_lot::Mutex::new(Vec::new()),
        };
        let mut instance = plugin.instantiate().map_err(|err| err.to_string())?;
        plugin.arm(&mut instance);
        let info = K::describe(&instance.exports, &mut instance.store).map_err(|err| {
            format!(
                "describe() failed: {}",
                classify(err, &instance.store, &plugin.manifest)
            )
        })?;
        plugin.meta.info = described(info)?;
        plugin.idle.lock().push(instance);
        Ok(plugin)
    }

    fn instantiate(&self) -> Result<Instance<K>, CallError> {
        let runtime = Runtime::get();
        let mut store = runtime
            .store(&self.state_name, &self.manifest)
            .map_err(CallError::Instantiate)?;
        self.arm_store(&mut store);
        let exports = match K::instantiate(&self.pre, &mut store) {
            Ok(exports) => exports,
            Err(err) => {
                return Err(CallError::Instantiate(
                    classify(err, &store, &self.manifest).to_string(),
                ));
            }
        };
        let mut instance = Instance { store, exports };
        self.arm(&mut instance);
        let outcome = K::init(&instance.exports, &mut instance.store);
        initialised(outcome, &mut instance.store, &self.manifest)?;
        Ok(instance)
    }

    fn arm_store(&self, store: &mut Store<PluginState>) {
        let ticks = self
            .manifest
            .deadline
            .as_millis()
            .div_ceil(EPOCH_TICK.as_millis()) as u64
            + 1;
        store.set_epoch_deadline(ticks);
        let state = store.data_mut();
        state.last_error_log = None;
        state.memory.clear();
    }

    /// Sets a fresh deadline and clears what the last call left before a
    /// call.
    fn arm(&self, instance: &mut Instance<K>) {
        self.arm_store(&mut instance.store);
    }

    /// Runs `f` on a warm instance with a deadline and the memory cap. A trap,
    /// timeout or out-of-memory discards the instance; the next call gets a
    /// fresh one. Blocking, bounded by the deadline.
    pub(super) fn call<R>(
        &self,
        f: impl FnOnce(
            &K::Exports,
            &mut Store<PluginState>,
        ) -> wasmtime::Result<Result<R, wit::PluginError>>,
    ) -> Result<R, CallError> {
        // A plugin granted directories or the network may make WASI calls
        // that wasmtime-wasi runs through `Handle::block_on`, which a tokio
        // worker refuses; inside `block_in_place` it is allowed. Only such
        // plugins pay for it (the worker's other tasks move to a new
        // thread); streams and poll never need it (`sync_io`).
        if self.manifest.may_block()
            && tokio::runtime::Handle::try_current().is_ok_and(|handle| {
                handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
            })
        {
            return tokio::task::block_in_place(|| self.call_here(f));
        }
        self.call_here(f)
    }

    fn call_here<R>(
        &self,
        f: impl FnOnce(
            &K::Exports,
            &mut Store<PluginState>,
        ) -> wasmtime::Result<Result<R, wit::PluginError>>,
    ) -> Result<R, CallError> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        // Stateful plugins keep the lock for the whole call: one instance, in order.
        let mut stateful_guard = K::KIND.stateful().then(|| self.idle.lock());
        let pooled = match &mut stateful_guard {
            Some(idle) => idle.pop(),
            None => self.idle.lock().pop(),
        };
        let mut instance = match pooled {
            Some(instance) => instance,
            None => self
                .instantiate()
                .inspect_err(|err| self.record_error(err))?,
        };
        self.arm(&mut instance);
        // A host function that panics must cost the call, not the request's
        // task: contained as a trap of this call. (The blocking WASI I/O
        // that once did on a tokio worker is shadowed by `sync_io`.)
        let res = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            f(&instance.exports, &mut instance.store)
        })) {
            Ok(res) => res,
            Err(panic) => {
                let err = panicked(&*panic);
                self.record_error(&err);
                return Err(err);
            }
        };
        let err = match res {
            Ok(res) => {
                let stateless = stateful_guard.is_none();
                let idle = match &mut stateful_guard {
                    Some(idle) => idle,
                    None => &mut self.idle.lock(),
                };
                // A stateless instance that has crept up to its memory's
                // high-water mark is let go; the next call makes a fresh
                // one. A stateful one keeps its state, and its memory.
                if stateless && instance.store.data().memory.past_high_water() {
                    self.stats.recycled.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(plugin = %self.name, "instance past its memory high-water mark: not pooled again");
                } else if idle.len() < MAX_IDLE_INSTANCES {
                    idle.push(instance);
                }
                match res {
                    Ok(value) => return Ok(value),
                    Err(err) => CallError::Plugin(plugin_error(err)),
                }
            }
            // The instance is dropped here: after a trap its state is suspect.
            Err(err) => {
                let logged = instance.store.data_mut().last_error_log.take();
                let stderr = instance.store.data().output.take_tail();
                let backtrace = err
                    .downcast_ref::<wasmtime::WasmBacktrace>()
                    .map(|trace| format!("{trace}"));
                let classified = match (classify(err, &instance.store, &self.manifest), logged) {
                    (CallError::Trap(cause), Some(message)) => {
                        CallError::Trap(format!("{message} ({cause})"))
                    }
                    // What the guest printed before it trapped (an uncaught
                    // Python exception's traceback ends in the error).
                    (CallError::Trap(cause), None) if !stderr.is_empty() => CallError::Trap(
                        format!("{cause}; the guest's stderr ended: {}", stderr.join(" | ")),
                    ),
                    (other, _) => other,
                };
                if let Some(backtrace) = backtrace {
                    tracing::warn!(plugin = %self.name, %backtrace, "plugin trapped");
                }
                classified
            }
        };
        self.record_error(&err);
        Err(err)
    }

    /// Runs `f` on the warm instance, if there is one, without making one and
    /// without counting a call; the pool stays locked meanwhile. The
    /// instance goes back unless `f` failed. For state handoff.
    pub(super) fn call_idle<R>(
        &self,
        f: impl FnOnce(&K::Exports, &mut Store<PluginState>) -> wasmtime::Result<R>,
    ) -> Option<Result<R, CallError>> {
        let mut idle = self.idle.lock();
        let mut instance = idle.pop()?;
        self.arm(&mut instance);
        match f(&instance.exports, &mut instance.store) {
            Ok(value) => {
                idle.push(instance);
                Some(Ok(value))
            }
            Err(err) => Some(Err(classify(err, &instance.store, &self.manifest))),
        }
    }

    /// Makes a fresh instance (instantiate and `init`) and drops it: what a
    /// call costs when no warm instance is available. Used by benchmarks.
    pub fn instantiate_cold(&self) -> Result<(), CallError> {
        self.instantiate().map(drop)
    }

    fn record_error(&self, err: &CallError) {
        self.stats
            .record_failure(FailureCause::of(err), err.to_string());
        tracing::warn!(plugin = %self.name, error = %err, "plugin call failed");
    }
}
