//! The wasmtime side: one shared `Engine` with epoch interruption, compiling
//! with an on-disk cache of precompiled artifacts, checking a component's
//! contract version and world, and calling plugins with a deadline and a
//! memory cap on warm, reused instances.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, InstancePre, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{wit, wit_host};
use super::guest_log::{GuestOutput, Which};
use super::kind::Kind;
use super::manifest::Manifest;
use super::types::{PluginError, PluginInfo, PluginStatus};

/// The contract version this host speaks (the `package` line of `wit/`).
pub const WIT_VERSION: &str = "0.1.1";
const WIT_PACKAGE: &str = "plinth:plugin/";

/// How often the epoch advances; deadlines are counted in these ticks.
pub(super) const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Warm instances kept per stateless plugin.
const MAX_IDLE_INSTANCES: usize = 16;
/// Most elements a table of a plugin instance may grow to.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// Most core instances a component may create in its store.
const MAX_INSTANCES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PluginKind {
    Router,
    Processor,
    Metrics,
    Health,
    /// Served as a model; calls other models (0.1.1).
    Orchestrator,
}

impl PluginKind {
    /// Every kind, in the order `inspect` looks for them.
    pub const ALL: [PluginKind; 5] = [
        PluginKind::Router,
        PluginKind::Processor,
        PluginKind::Metrics,
        PluginKind::Health,
        PluginKind::Orchestrator,
    ];

    pub fn world(self) -> &'static str {
        match self {
            PluginKind::Router => "router-plugin",
            PluginKind::Processor => "processor-plugin",
            PluginKind::Metrics => "metrics-plugin",
            PluginKind::Health => "health-plugin",
            PluginKind::Orchestrator => "orchestrator-plugin",
        }
    }

    pub(super) fn interface(self) -> &'static str {
        match self {
            PluginKind::Router => "router",
            PluginKind::Processor => "processor",
            PluginKind::Metrics => "metrics",
            PluginKind::Health => "health",
            PluginKind::Orchestrator => "orchestrator",
        }
    }

    /// Metrics and health plugins keep state across calls: they get exactly
    /// one instance and calls to them are serialised.
    pub(super) fn stateful(self) -> bool {
        matches!(self, PluginKind::Metrics | PluginKind::Health)
    }
}

/// Why a plugin call failed. The instance is discarded on every variant but
/// `Plugin`, which is the plugin's own, orderly answer.
#[derive(Debug, Clone)]
pub enum CallError {
    /// The plugin returned a `plugin-error`.
    Plugin(PluginError),
    Timeout(Duration),
    OutOfMemory(usize),
    Trap(String),
    /// A new instance could not be made (instantiation or `init` failed).
    Instantiate(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Plugin(err) => write!(f, "{err}"),
            CallError::Timeout(deadline) => {
                write!(f, "exceeded its {} ms deadline", deadline.as_millis())
            }
            CallError::OutOfMemory(cap) => write!(f, "exceeded its {} MiB memory cap", cap >> 20),
            CallError::Trap(msg) => write!(f, "trapped: {msg}"),
            CallError::Instantiate(msg) => write!(f, "could not be instantiated: {msg}"),
        }
    }
}

/// The store's resource limiter. It enforces the manifest's memory cap and
/// remembers that it refused a growth, which is how a failed call is known
/// to have run out of memory: the refusal traps the guest, and the flag, not
/// the trap's text, classifies the failure.
#[derive(Debug)]
pub struct MemoryCap {
    cap_bytes: usize,
    /// The size a linear memory asked to grow to, past the cap, since the
    /// flag was last cleared.
    refused: Option<usize>,
    /// The largest size a linear memory of the instance has grown to.
    largest: usize,
    /// `largest` when the instance was made (instantiated and `init`).
    baseline: usize,
}

impl MemoryCap {
    pub fn new(cap_bytes: usize) -> MemoryCap {
        MemoryCap {
            cap_bytes,
            refused: None,
            largest: 0,
            baseline: 0,
        }
    }

    /// Marks the instance's size as made, before any call.
    pub fn mark_baseline(&mut self) {
        self.baseline = self.largest;
    }

    /// Whether the instance has grown past its high-water mark (three
    /// quarters of the cap). Linear memory never shrinks: a guest whose
    /// heap creeps up across calls (a CPython guest's does, through
    /// fragmentation) would one day trap on a request that fits a fresh
    /// instance. Such an instance is not pooled again, unless it was that
    /// large when it was made (then a fresh one would be no better).
    pub fn past_high_water(&self) -> bool {
        self.largest > self.cap_bytes / 4 * 3 && self.largest > self.baseline
    }

    /// The size of the growth that was refused since the last `clear`.
    pub fn refused(&self) -> Option<usize> {
        self.refused
    }

    /// Forgets a refusal, before the next call.
    pub fn clear(&mut self) {
        self.refused = None;
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap_bytes {
            self.refused = Some(desired);
            // An error traps the guest at the growth, rather than letting
            // `memory.grow` answer -1 to an allocator that may not check.
            wasmtime::bail!(
                "linear memory growth to {desired} bytes refused: the cap is {} bytes",
                self.cap_bytes
            );
        }
        // Growth past the memory's own declared maximum is refused by
        // wasmtime itself, as the spec says (`memory.grow` answers -1).
        self.largest = self.largest.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            wasmtime::bail!(
                "table growth to {desired} elements refused: the cap is {MAX_TABLE_ELEMENTS}"
            );
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }
}

/// What a store carries: WASI, the memory limiter and the plugin's config.
pub struct PluginState {
    pub(super) name: Arc<str>,
    config: Arc<Manifest>,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) memory: MemoryCap,
    /// The last error the guest logged during the current call: a Rust guest
    /// logs its panic message just before it traps.
    pub(super) last_error_log: Option<String>,
    /// The instance's stdout and stderr, and the tail of its stderr.
    output: Arc<GuestOutput>,
    /// An orchestrator's clock and the request it is answering; `None` in
    /// the other worlds.
    pub(super) orchestration: Option<crate::orchestrator::Orchestration>,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wit::Host for PluginState {}

impl wit_host::Host for PluginState {
    fn log(&mut self, level: wit_host::LogLevel, message: String) {
        let plugin = &*self.name;
        match level {
            wit_host::LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            wit_host::LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            wit_host::LogLevel::Info => tracing::info!(plugin, "{message}"),
            wit_host::LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            wit_host::LogLevel::Error => {
                tracing::error!(plugin, "{message}");
                self.last_error_log = Some(message);
            }
        }
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.config.config.get(&key).cloned()
    }
}

/// The process-wide engine and its two linkers.
pub struct Runtime {
    engine: Engine,
    /// Synchronous host functions: the router, processor, metrics and
    /// health worlds, called inline on the request's thread.
    linker: Linker<PluginState>,
    /// Async host functions (WASI's and `models.infer`): the orchestrator
    /// world, whose calls wait for models without holding a thread.
    orchestrator_linker: Linker<PluginState>,
}

impl Runtime {
    /// The one runtime of this process; its epoch ticker runs for the
    /// process's life.
    pub fn get() -> &'static Runtime {
        static RUNTIME: OnceLock<Runtime> = OnceLock::new();
        RUNTIME.get_or_init(|| Runtime::new().expect("the wasmtime engine can be built"))
    }

    fn new() -> wasmtime::Result<Runtime> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.concurrency_support(false);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        crate::sync_io::shadow(&mut linker)?;
        wit_host::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |state| state)?;
        wit::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |state| state)?;
        let mut orchestrator_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut orchestrator_linker)?;
        wit_host::add_to_linker::<PluginState, HasSelf<PluginState>>(
            &mut orchestrator_linker,
            |state| state,
        )?;
        wit::add_to_linker::<PluginState, HasSelf<PluginState>>(
            &mut orchestrator_linker,
            |state| state,
        )?;
        super::bindings::wit_models::add_to_linker::<PluginState, HasSelf<PluginState>>(
            &mut orchestrator_linker,
            |state| state,
        )?;
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("plinth-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        Ok(Runtime {
            engine,
            linker,
            orchestrator_linker,
        })
    }

    /// Compiles `bytes`, or loads the artifact cached under its content hash
    /// in `cache_dir`. Blocking and slow on a miss (tens of milliseconds).
    pub fn compile(&self, bytes: &[u8], cache_dir: &Path) -> Result<(Component, String), String> {
        let hash = content_hash(bytes);
        let cached = cache_dir.join(format!("{hash}.cwasm"));
        // Native code is loaded only from a cache that no one else can
        // write (crate::cache); anything else compiles from the `.wasm`.
        let trusted = match crate::cache::prepare(cache_dir) {
            Ok(()) => true,
            Err(why) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::error!(%why, "not using the plugin compile cache: plugins are compiled at every load");
                });
                false
            }
        };
        if trusted && cached.is_file() && crate::cache::check_artifact(&cached).is_ok() {
            // SAFETY: the artifact is a regular file in a directory that
            // only this user (or root) can write, and is itself writable by
            // no one else (checked just above): it was written by this
            // function, from `precompile_component` of an engine built with
            // this same configuration. wasmtime also checks the artifact's
            // header against the engine and refuses a mismatch.
            match unsafe { Component::deserialize_file(&self.engine, &cached) } {
                Ok(component) => {
                    // Recently used: the last to be evicted.
                    let _ = std::fs::File::options()
                        .write(true)
                        .open(&cached)
                        .and_then(|f| f.set_modified(SystemTime::now()));
                    return Ok((component, hash));
                }
                Err(err) => {
                    tracing::warn!(file = %cached.display(), %err, "ignoring a stale compiled plugin")
                }
            }
        }
        let artifact = self.engine.precompile_component(bytes).map_err(|err| {
            // One line: a text-format parse error adds a source excerpt.
            let cause = root_cause(&err);
            let first = cause.lines().next().unwrap_or_default().trim();
            format!("not a valid WebAssembly component: {first}")
        })?;
        // SAFETY: the artifact was produced just above by this engine.
        let component = unsafe { Component::deserialize(&self.engine, &artifact) }
            .map_err(|err| format!("{err:#}"))?;
        if !trusted {
            return Ok((component, hash));
        }
        let partial = cache_dir.join(format!("{hash}.partial"));
        let written =
            write_private(&partial, &artifact).and_then(|()| std::fs::rename(&partial, &cached));
        if let Err(err) = written {
            // Once per process: a read-only plugin directory (a mounted
            // ConfigMap) fails every write the same way.
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    cache = %cache_dir.display(),
                    %err,
                    "cannot write the plugin compile cache: plugins are compiled again at every start; point --plugin-cache-dir at a writable directory"
                );
            });
        }
        Ok((component, hash))
    }

    /// The `plinth:plugin` interfaces a component imports or exports, with
    /// the versions it was built against.
    pub(super) fn plugin_interfaces(&self, component: &Component) -> Vec<String> {
        let ty = component.component_type();
        let mut names: Vec<String> = ty
            .imports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .chain(ty.exports(&self.engine).map(|(name, _)| name.to_owned()))
            .filter(|name| name.starts_with(WIT_PACKAGE))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Finds the one plugin world the component implements and checks that
    /// every `plinth:plugin` interface it names is at a compatible version.
    pub(super) fn inspect(&self, component: &Component) -> Result<PluginKind, String> {
        let ty = component.component_type();
        let host_version = semver::Version::parse(WIT_VERSION).expect("valid");
        let mut kinds = Vec::new();
        let names = ty
            .imports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .chain(ty.exports(&self.engine).map(|(name, _)| name.to_owned()))
            .collect::<Vec<_>>();
        for name in &names {
            let Some(rest) = name.strip_prefix(WIT_PACKAGE) else {
                continue;
            };
            let (interface, version) = rest.split_once('@').unwrap_or((rest, ""));
            let compatible = semver::VersionReq::parse(&format!("^{version}"))
                .ok()
                .is_some_and(|req| req.matches(&host_version));
            if !compatible {
                return Err(format!(
                    "built against plinth:plugin@{version}, but this host speaks plinth:plugin@{WIT_VERSION} (it accepts plugins built against {}.{}.x up to {WIT_VERSION})",
                    host_version.major, host_version.minor
                ));
            }
            for kind in PluginKind::ALL {
                if interface == kind.interface() && ty.exports(&self.engine).any(|(n, _)| n == name)
                {
                    kinds.push(kind);
                }
            }
        }
        match kinds.as_slice() {
            [kind] => Ok(*kind),
            [] => Err("exports none of the plugin interfaces (router, processor, metrics, health, orchestrator) of plinth:plugin".into()),
            _ => Err(format!("exports several plugin interfaces ({kinds:?}); a plugin implements one world")),
        }
    }

    pub(super) fn instance_pre(
        &self,
        component: &Component,
    ) -> Result<InstancePre<PluginState>, String> {
        self.linker.instantiate_pre(component).map_err(|err| {
            format!(
                "imports something this host does not provide: {}",
                root_cause(&err)
            )
        })
    }

    /// [`Runtime::instance_pre`] on the async linker, for orchestrators.
    pub(super) fn orchestrator_pre(
        &self,
        component: &Component,
    ) -> Result<InstancePre<PluginState>, String> {
        self.orchestrator_linker
            .instantiate_pre(component)
            .map_err(|err| {
                format!(
                    "imports something this host does not provide: {}",
                    root_cause(&err)
                )
            })
    }

    pub(super) fn store(
        &self,
        name: &Arc<str>,
        manifest: &Arc<Manifest>,
    ) -> Result<Store<PluginState>, String> {
        let mut wasi = WasiCtx::builder();
        for key in &manifest.env {
            if let Ok(value) = std::env::var(key) {
                wasi.env(key, value);
            }
        }
        for dir in &manifest.dirs {
            let perms = if dir.read_only {
                wasmtime_wasi::filesystem::FsPerms::ReadOnly
            } else {
                wasmtime_wasi::filesystem::FsPerms::ReadWrite
            };
            wasi.preopened_dir(&dir.host, &dir.guest, perms)
                .map_err(|err| format!("capabilities.dirs: {}: {err}", dir.host.display()))?;
        }
        if manifest.network {
            wasi.inherit_network();
            wasi.allow_ip_name_lookup(true);
        }
        // Always to the host log (the `stdio` capability is no longer
        // needed): the guest can read nothing through it.
        static INSTANCES: AtomicU64 = AtomicU64::new(0);
        let output = GuestOutput::new(Arc::clone(name), INSTANCES.fetch_add(1, Ordering::Relaxed));
        wasi.stdout(output.stream(Which::Stdout));
        wasi.stderr(output.stream(Which::Stderr));
        let mut store = Store::new(
            &self.engine,
            PluginState {
                name: Arc::clone(name),
                config: Arc::clone(manifest),
                wasi: wasi.build(),
                table: ResourceTable::new(),
                memory: MemoryCap::new(manifest.memory_bytes),
                last_error_log: None,
                output,
                orchestration: None,
            },
        );
        store.limiter(|state| &mut state.memory);
        store.epoch_deadline_trap();
        Ok(store)
    }
}

/// SHA-256 of a plugin file, hex: its identity in the cache and the API.
pub fn content_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(super) fn root_cause(err: &wasmtime::Error) -> String {
    err.chain()
        .last()
        .map(|cause| cause.to_string())
        .unwrap_or_default()
}

/// A live instance of a plugin of kind `K`, with its typed exports.
pub(super) struct Instance<K: Kind> {
    pub store: Store<PluginState>,
    pub exports: K::Exports,
}

/// Counters of one plugin.
#[derive(Debug, Default)]
pub struct PluginStats {
    pub calls: AtomicU64,
    pub errors: AtomicU64,
    /// Failed calls the request went on without (`on_error = "skip"`).
    pub skips: AtomicU64,
    /// Instances let go past their memory high-water mark
    /// ([`MemoryCap::past_high_water`]).
    pub recycled: AtomicU64,
    pub last_error: parking_lot::Mutex<Option<String>>,
}

/// What every loaded plugin has, whatever its kind: `Plugin<K>` and
/// `AnyPlugin` both dereference to it.
#[derive(Debug)]
pub struct PluginMeta {
    /// The file stem, the name the host knows it by.
    pub name: String,
    pub kind: PluginKind,
    /// What its `describe` answered.
    pub info: PluginInfo,
    pub file_hash: String,
    pub loaded_at: SystemTime,
    pub manifest: Arc<Manifest>,
    pub stats: PluginStats,
}

impl PluginMeta {
    /// A plugin just compiled, before its `describe` has answered.
    pub(super) fn new(
        name: &str,
        kind: PluginKind,
        file_hash: String,
        manifest: Manifest,
    ) -> PluginMeta {
        PluginMeta {
            name: name.to_owned(),
            kind,
            info: PluginInfo::default(),
            file_hash,
            loaded_at: SystemTime::now(),
            manifest: Arc::new(manifest),
            stats: PluginStats::default(),
        }
    }

    /// Its row in a health snapshot.
    pub fn status(&self) -> PluginStatus {
        PluginStatus {
            name: self.name.clone(),
            version: self.info.version.clone(),
            kind: self.kind,
            calls: self.stats.calls.load(Ordering::Relaxed),
            errors: self.stats.errors.load(Ordering::Relaxed),
        }
    }
}

/// A compiled, validated plugin of kind `K` with its pool of warm instances.
/// Only the calls of its kind exist on it (`Plugin<Processor>::process`,
/// `Plugin<Router>::route`, ...).
pub struct Plugin<K: Kind> {
    meta: PluginMeta,
    state_name: Arc<str>,
    pre: K::Pre,
    idle: parking_lot::Mutex<Vec<Instance<K>>>,
}

impl<K: Kind> std::ops::Deref for Plugin<K> {
    type Target = PluginMeta;

    fn deref(&self) -> &PluginMeta {
        &self.meta
    }
}

impl<K: Kind> std::fmt::Debug for Plugin<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("version", &self.info.version)
            .finish()
    }
}

impl<K: Kind> Plugin<K> {
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
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        *self.stats.last_error.lock() = Some(err.to_string());
        tracing::warn!(plugin = %self.name, error = %err, "plugin call failed");
    }
}

/// A host function that panicked during a call, as a trap of that call.
pub(super) fn panicked(panic: &(dyn std::any::Any + Send)) -> CallError {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    CallError::Trap(format!(
        "a host function the guest called panicked: {}",
        what.lines().next().unwrap_or_default()
    ))
}

/// What `describe` answered, once its version is known to be semver.
pub(super) fn described(info: wit::PluginInfo) -> Result<PluginInfo, String> {
    semver::Version::parse(&info.version).map_err(|err| {
        format!(
            "describe() gave version {:?}, not semver: {err}",
            info.version
        )
    })?;
    Ok(PluginInfo {
        name: info.name,
        version: info.version,
        description: info.description,
    })
}

/// The outcome of `init` on a fresh instance: on success its size is
/// marked as its baseline; a refusal or a trap makes the instance unusable.
pub(super) fn initialised(
    outcome: wasmtime::Result<Result<(), wit::PluginError>>,
    store: &mut Store<PluginState>,
    manifest: &Manifest,
) -> Result<(), CallError> {
    match outcome {
        Ok(Ok(())) => {
            store.data_mut().memory.mark_baseline();
            Ok(())
        }
        Ok(Err(err)) => Err(CallError::Instantiate(format!(
            "init() refused: {}",
            CallError::Plugin(plugin_error(err))
        ))),
        Err(err) => Err(CallError::Instantiate(format!(
            "init() {}",
            classify(err, store, manifest)
        ))),
    }
}

pub(super) fn plugin_error(err: wit::PluginError) -> PluginError {
    match err {
        wit::PluginError::InvalidInput(msg) => PluginError::InvalidInput(msg),
        wit::PluginError::Unavailable(msg) => PluginError::Unavailable(msg),
        wit::PluginError::Internal(msg) => PluginError::Internal(msg),
    }
}

/// Turns a failed call into the cause a user can act on. Out-of-memory is
/// the limiter's flag, set when it refused a growth during the call.
pub(super) fn classify(
    err: wasmtime::Error,
    store: &Store<PluginState>,
    manifest: &Manifest,
) -> CallError {
    if store.data().memory.refused().is_some() {
        return CallError::OutOfMemory(manifest.memory_bytes);
    }
    if let Some(trap) = err.downcast_ref::<wasmtime::Trap>()
        && *trap == wasmtime::Trap::Interrupt
    {
        return CallError::Timeout(manifest.deadline);
    }
    // The root cause ("wasm `unreachable` instruction executed"), not the
    // backtrace header.
    let cause = err.root_cause().to_string();
    CallError::Trap(cause.lines().next().unwrap_or_default().to_owned())
}

/// Writes `bytes` to a new file at `path` that only this user can read or
/// write (an artifact is loaded as native code).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 1 << 16;

    #[test]
    fn the_cap_refuses_growth_past_it_and_remembers_the_refusal() {
        let mut cap = MemoryCap::new(2 * PAGE);
        assert!(cap.memory_growing(0, PAGE, None).unwrap());
        assert!(cap.memory_growing(PAGE, 2 * PAGE, Some(10 * PAGE)).unwrap());
        assert_eq!(cap.refused(), None);
        let err = cap.memory_growing(2 * PAGE, 3 * PAGE, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "linear memory growth to 196608 bytes refused: the cap is 131072 bytes"
        );
        assert_eq!(cap.refused(), Some(3 * PAGE));
        cap.clear();
        assert_eq!(cap.refused(), None);
        // Tables have their own cap, which is not an out-of-memory.
        assert!(cap.table_growing(0, MAX_TABLE_ELEMENTS, None).unwrap());
        assert!(cap.table_growing(0, MAX_TABLE_ELEMENTS + 1, None).is_err());
        assert_eq!(cap.refused(), None);
    }

    /// A core module in a real plugin store: `grow(n)` runs `memory.grow`,
    /// `crash()` traps for another reason.
    fn guest(cap: usize, memory: &str) -> (Store<PluginState>, wasmtime::Instance, Manifest) {
        let manifest = Manifest {
            memory_bytes: cap,
            ..Manifest::default()
        };
        let runtime = Runtime::get();
        let mut store = runtime
            .store(&Arc::from("test"), &Arc::new(manifest.clone()))
            .unwrap();
        store.set_epoch_deadline(u64::MAX / 2);
        let module = wasmtime::Module::new(
            &runtime.engine,
            format!(
                r#"(module
                    {memory}
                    (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
                    (func (export "crash") unreachable))"#
            ),
        )
        .unwrap();
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        (store, instance, manifest)
    }

    #[test]
    fn growth_past_the_cap_is_classified_out_of_memory_by_the_flag() {
        let (mut store, instance, manifest) = guest(2 << 20, "(memory 1)");
        let grow = instance
            .get_typed_func::<i32, i32>(&mut store, "grow")
            .unwrap();
        // One page to two: within the cap, `memory.grow` answers the old size.
        assert_eq!(grow.call(&mut store, 1).unwrap(), 1);
        assert_eq!(store.data().memory.refused(), None);
        // To 42 pages, past the 32 of 2 MiB: a trap, and the flag.
        let err = grow.call(&mut store, 40).unwrap_err();
        assert_eq!(store.data().memory.refused(), Some(42 * PAGE));
        let classified = classify(err, &store, &manifest);
        assert!(
            matches!(classified, CallError::OutOfMemory(cap) if cap == 2 << 20),
            "{classified:?}"
        );
        assert_eq!(classified.to_string(), "exceeded its 2 MiB memory cap");
    }

    #[test]
    fn other_failures_are_not_out_of_memory() {
        let (mut store, instance, manifest) = guest(2 << 20, "(memory 1 4)");
        let grow = instance
            .get_typed_func::<i32, i32>(&mut store, "grow")
            .unwrap();
        // Past the memory's own maximum (4 pages) but within the cap: the
        // guest gets -1, as the spec says, and nothing is flagged.
        assert_eq!(grow.call(&mut store, 8).unwrap(), -1);
        assert_eq!(store.data().memory.refused(), None);
        let crash = instance
            .get_typed_func::<(), ()>(&mut store, "crash")
            .unwrap();
        let err = crash.call(&mut store, ()).unwrap_err();
        let classified = classify(err, &store, &manifest);
        assert!(
            matches!(&classified, CallError::Trap(cause) if cause.contains("unreachable")),
            "{classified:?}"
        );
    }
}
