//! The wasmtime side: one shared `Engine` with epoch interruption, compiling
//! with an on-disk cache of precompiled artifacts, checking a component's
//! contract version and world, and calling plugins with a deadline and a
//! memory cap on warm, reused instances.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, InstancePre, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{health, metrics, processor, router, wit, wit_host};
use super::manifest::Manifest;

/// The contract version this host speaks (the `package` line of `wit/`).
pub const WIT_VERSION: &str = "0.1.0";
const WIT_PACKAGE: &str = "plinth:plugin/";

/// How often the epoch advances; deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Warm instances kept per stateless plugin.
const MAX_IDLE_INSTANCES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PluginKind {
    Router,
    Processor,
    Metrics,
    Health,
}

impl PluginKind {
    pub fn world(self) -> &'static str {
        match self {
            PluginKind::Router => "router-plugin",
            PluginKind::Processor => "processor-plugin",
            PluginKind::Metrics => "metrics-plugin",
            PluginKind::Health => "health-plugin",
        }
    }

    fn interface(self) -> &'static str {
        match self {
            PluginKind::Router => "router",
            PluginKind::Processor => "processor",
            PluginKind::Metrics => "metrics",
            PluginKind::Health => "health",
        }
    }

    /// Metrics and health plugins keep state across calls: they get exactly
    /// one instance and calls to them are serialised.
    fn stateful(self) -> bool {
        matches!(self, PluginKind::Metrics | PluginKind::Health)
    }
}

/// Why a plugin call failed. The instance is discarded on every variant but
/// `Plugin`, which is the plugin's own, orderly answer.
#[derive(Debug, Clone)]
pub enum CallError {
    /// The plugin returned a `plugin-error`.
    Plugin(wit::PluginError),
    Timeout(Duration),
    OutOfMemory(usize),
    Trap(String),
    /// A new instance could not be made (instantiation or `init` failed).
    Instantiate(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Plugin(wit::PluginError::InvalidInput(msg)) => {
                write!(f, "invalid input: {msg}")
            }
            CallError::Plugin(wit::PluginError::Unavailable(msg)) => {
                write!(f, "unavailable: {msg}")
            }
            CallError::Plugin(wit::PluginError::Internal(msg)) => {
                write!(f, "internal error: {msg}")
            }
            CallError::Timeout(deadline) => {
                write!(f, "exceeded its {} ms deadline", deadline.as_millis())
            }
            CallError::OutOfMemory(cap) => write!(f, "exceeded its {} MiB memory cap", cap >> 20),
            CallError::Trap(msg) => write!(f, "trapped: {msg}"),
            CallError::Instantiate(msg) => write!(f, "could not be instantiated: {msg}"),
        }
    }
}

/// What a store carries: WASI, the memory limiter and the plugin's config.
pub struct PluginState {
    name: Arc<str>,
    config: Arc<Manifest>,
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    /// The last error the guest logged during the current call: a Rust guest
    /// logs its panic message just before it traps.
    last_error_log: Option<String>,
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

/// The process-wide engine and linker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<PluginState>,
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
        wit_host::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |state| state)?;
        wit::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |state| state)?;
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
        Ok(Runtime { engine, linker })
    }

    /// Compiles `bytes`, or loads the artifact cached under its content hash
    /// in `cache_dir`. Blocking and slow on a miss (tens of milliseconds).
    pub fn compile(&self, bytes: &[u8], cache_dir: &Path) -> Result<(Component, String), String> {
        let hash = content_hash(bytes);
        let cached = cache_dir.join(format!("{hash}.cwasm"));
        if cached.is_file() {
            // SAFETY: files in the cache directory are written only by this
            // function, from `precompile_component` of an engine built with
            // this same configuration; wasmtime also checks the artifact's
            // header against the engine and refuses a mismatch.
            match unsafe { Component::deserialize_file(&self.engine, &cached) } {
                Ok(component) => return Ok((component, hash)),
                Err(err) => {
                    tracing::warn!(file = %cached.display(), %err, "ignoring a stale compiled plugin")
                }
            }
        }
        let artifact = self
            .engine
            .precompile_component(bytes)
            .map_err(|err| format!("not a valid WebAssembly component: {}", root_cause(&err)))?;
        // SAFETY: the artifact was produced just above by this engine.
        let component = unsafe { Component::deserialize(&self.engine, &artifact) }
            .map_err(|err| format!("{err:#}"))?;
        if std::fs::create_dir_all(cache_dir).is_ok() {
            let partial = cache_dir.join(format!("{hash}.partial"));
            if std::fs::write(&partial, &artifact).is_ok() {
                let _ = std::fs::rename(&partial, &cached);
            }
        }
        Ok((component, hash))
    }

    /// Finds the one plugin world the component implements and checks that
    /// every `plinth:plugin` interface it names is at a compatible version.
    pub fn inspect(&self, component: &Component) -> Result<PluginKind, String> {
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
            for kind in [
                PluginKind::Router,
                PluginKind::Processor,
                PluginKind::Metrics,
                PluginKind::Health,
            ] {
                if interface == kind.interface() && ty.exports(&self.engine).any(|(n, _)| n == name)
                {
                    kinds.push(kind);
                }
            }
        }
        match kinds.as_slice() {
            [kind] => Ok(*kind),
            [] => Err("exports none of the plugin interfaces (router, processor, metrics, health) of plinth:plugin".into()),
            _ => Err(format!("exports several plugin interfaces ({kinds:?}); a plugin implements one world")),
        }
    }

    pub fn instance_pre(&self, component: &Component) -> Result<InstancePre<PluginState>, String> {
        self.linker.instantiate_pre(component).map_err(|err| {
            format!(
                "imports something this host does not provide: {}",
                root_cause(&err)
            )
        })
    }

    fn store(
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
        if manifest.stdio {
            wasi.inherit_stdout().inherit_stderr();
        }
        let limits = StoreLimitsBuilder::new()
            .memory_size(manifest.memory_bytes)
            .table_elements(1 << 20)
            .instances(64)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine,
            PluginState {
                name: Arc::clone(name),
                config: Arc::clone(manifest),
                wasi: wasi.build(),
                table: ResourceTable::new(),
                limits,
                last_error_log: None,
            },
        );
        store.limiter(|state| &mut state.limits);
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

fn root_cause(err: &wasmtime::Error) -> String {
    err.chain()
        .last()
        .map(|cause| cause.to_string())
        .unwrap_or_default()
}

/// A live instance and its typed exports.
pub(crate) enum Exports {
    Router(router::RouterPlugin),
    Processor(processor::ProcessorPlugin),
    Metrics(metrics::MetricsPlugin),
    Health(health::HealthPlugin),
}

pub(crate) struct Instance {
    pub store: Store<PluginState>,
    pub exports: Exports,
}

impl Instance {
    fn describe(&mut self) -> wasmtime::Result<wit::PluginInfo> {
        match &self.exports {
            Exports::Router(e) => e.call_describe(&mut self.store),
            Exports::Processor(e) => e.call_describe(&mut self.store),
            Exports::Metrics(e) => e.call_describe(&mut self.store),
            Exports::Health(e) => e.call_describe(&mut self.store),
        }
    }

    fn init(&mut self) -> wasmtime::Result<Result<(), wit::PluginError>> {
        match &self.exports {
            Exports::Router(e) => e.call_init(&mut self.store),
            Exports::Processor(e) => e.call_init(&mut self.store),
            Exports::Metrics(e) => e.call_init(&mut self.store),
            Exports::Health(e) => e.call_init(&mut self.store),
        }
    }
}

/// Counters of one plugin.
#[derive(Debug, Default)]
pub struct PluginStats {
    pub calls: AtomicU64,
    pub errors: AtomicU64,
    pub last_error: parking_lot::Mutex<Option<String>>,
}

/// A compiled, validated plugin with its pool of warm instances.
pub struct Plugin {
    pub name: String,
    pub kind: PluginKind,
    pub info: wit::PluginInfo,
    pub file_hash: String,
    pub loaded_at: SystemTime,
    pub manifest: Arc<Manifest>,
    pub stats: PluginStats,
    state_name: Arc<str>,
    pre: InstancePre<PluginState>,
    idle: parking_lot::Mutex<Vec<Instance>>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("version", &self.info.version)
            .finish()
    }
}

impl Plugin {
    /// Compiles, checks and instantiates the plugin, and calls `describe` and
    /// `init` once, so a plugin that cannot run is refused before it is
    /// swapped in. Blocking.
    pub fn load(
        name: &str,
        bytes: &[u8],
        manifest: Manifest,
        cache_dir: &Path,
    ) -> Result<Plugin, String> {
        let runtime = Runtime::get();
        let (component, file_hash) = runtime.compile(bytes, cache_dir)?;
        let kind = runtime.inspect(&component)?;
        let pre = runtime.instance_pre(&component)?;
        let state_name: Arc<str> = Arc::from(name);
        let mut plugin = Plugin {
            name: name.to_owned(),
            kind,
            info: wit::PluginInfo {
                name: String::new(),
                version: String::new(),
                description: String::new(),
            },
            file_hash,
            loaded_at: SystemTime::now(),
            manifest: Arc::new(manifest),
            stats: PluginStats::default(),
            state_name,
            pre,
            idle: parking_lot::Mutex::new(Vec::new()),
        };
        let mut instance = plugin.instantiate().map_err(|err| err.to_string())?;
        plugin.arm(&mut instance);
        let info = instance
            .describe()
            .map_err(|err| format!("describe() failed: {}", classify(err, &plugin.manifest)))?;
        semver::Version::parse(&info.version).map_err(|err| {
            format!(
                "describe() gave version {:?}, not semver: {err}",
                info.version
            )
        })?;
        plugin.info = info;
        plugin.idle.lock().push(instance);
        Ok(plugin)
    }

    fn instantiate(&self) -> Result<Instance, CallError> {
        let runtime = Runtime::get();
        let mut store = runtime
            .store(&self.state_name, &self.manifest)
            .map_err(CallError::Instantiate)?;
        self.arm_store(&mut store);
        let instantiate_err = |err: wasmtime::Error| {
            CallError::Instantiate(classify(err, &self.manifest).to_string())
        };
        let exports = match self.kind {
            PluginKind::Router => Exports::Router(
                router::RouterPluginPre::new(self.pre.clone())
                    .and_then(|pre| pre.instantiate(&mut store))
                    .map_err(instantiate_err)?,
            ),
            PluginKind::Processor => Exports::Processor(
                processor::ProcessorPluginPre::new(self.pre.clone())
                    .and_then(|pre| pre.instantiate(&mut store))
                    .map_err(instantiate_err)?,
            ),
            PluginKind::Metrics => Exports::Metrics(
                metrics::MetricsPluginPre::new(self.pre.clone())
                    .and_then(|pre| pre.instantiate(&mut store))
                    .map_err(instantiate_err)?,
            ),
            PluginKind::Health => Exports::Health(
                health::HealthPluginPre::new(self.pre.clone())
                    .and_then(|pre| pre.instantiate(&mut store))
                    .map_err(instantiate_err)?,
            ),
        };
        let mut instance = Instance { store, exports };
        self.arm(&mut instance);
        match instance.init() {
            Ok(Ok(())) => Ok(instance),
            Ok(Err(err)) => Err(CallError::Instantiate(format!(
                "init() refused: {}",
                CallError::Plugin(err)
            ))),
            Err(err) => Err(CallError::Instantiate(format!(
                "init() {}",
                classify(err, &self.manifest)
            ))),
        }
    }

    fn arm_store(&self, store: &mut Store<PluginState>) {
        let ticks = self
            .manifest
            .deadline
            .as_millis()
            .div_ceil(EPOCH_TICK.as_millis()) as u64
            + 1;
        store.set_epoch_deadline(ticks);
    }

    /// Sets a fresh deadline before a call.
    fn arm(&self, instance: &mut Instance) {
        self.arm_store(&mut instance.store);
    }

    /// Runs `f` on a warm instance with a deadline and the memory cap. A trap,
    /// timeout or out-of-memory discards the instance; the next call gets a
    /// fresh one. Blocking, bounded by the deadline.
    pub(crate) fn call<R>(
        &self,
        f: impl FnOnce(&mut Instance) -> wasmtime::Result<Result<R, wit::PluginError>>,
    ) -> Result<R, CallError> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        // Stateful plugins keep the lock for the whole call: one instance, in order.
        let mut stateful_guard = self.kind.stateful().then(|| self.idle.lock());
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
        instance.store.data_mut().last_error_log = None;
        let res = f(&mut instance);
        let err = match res {
            Ok(res) => {
                let idle = match &mut stateful_guard {
                    Some(idle) => idle,
                    None => &mut self.idle.lock(),
                };
                if idle.len() < MAX_IDLE_INSTANCES {
                    idle.push(instance);
                }
                match res {
                    Ok(value) => return Ok(value),
                    Err(plugin_error) => CallError::Plugin(plugin_error),
                }
            }
            // The instance is dropped here: after a trap its state is suspect.
            Err(err) => {
                let logged = instance.store.data_mut().last_error_log.take();
                match (classify(err, &self.manifest), logged) {
                    (CallError::Trap(cause), Some(message)) => {
                        CallError::Trap(format!("{message} ({cause})"))
                    }
                    (other, _) => other,
                }
            }
        };
        self.record_error(&err);
        Err(err)
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

    /// Takes the warm instance of a stateful plugin out, for state handoff.
    pub(crate) fn take_instance(&self) -> Option<Instance> {
        self.idle.lock().pop()
    }

    pub(crate) fn put_instance(&self, instance: Instance) {
        self.idle.lock().push(instance);
    }

    pub(crate) fn arm_instance(&self, instance: &mut Instance) {
        self.arm(instance);
    }
}

/// Turns a wasmtime error into the cause a user can act on.
fn classify(err: wasmtime::Error, manifest: &Manifest) -> CallError {
    if let Some(trap) = err.downcast_ref::<wasmtime::Trap>()
        && *trap == wasmtime::Trap::Interrupt
    {
        return CallError::Timeout(manifest.deadline);
    }
    let text = format!("{err:#}");
    if text.contains("exceeds memory limits") || text.contains("forcing trap when growing memory") {
        return CallError::OutOfMemory(manifest.memory_bytes);
    }
    // The root cause ("wasm `unreachable` instruction executed"), not the
    // backtrace header.
    let cause = err.root_cause().to_string();
    CallError::Trap(cause.lines().next().unwrap_or_default().to_owned())
}

/// A directory for compiled artifacts beside the plugins.
pub fn cache_dir(plugin_dir: &Path) -> PathBuf {
    plugin_dir.join(".cache")
}
