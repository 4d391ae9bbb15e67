//! What a plugin's store carries: WASI, the memory limiter that caps the
//! instance, the plugin's config, what the guest logged and printed, and,
//! for an orchestrator, its clock and the request it is answering.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use plinth_core::error::Error;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{wit, wit_host};
use super::guest_log::{GuestOutput, Which};
use super::manifest::Manifest;
use super::types::{RequestView, RunContext};

/// Most elements a table of a plugin instance may grow to.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// Most core instances a component may create in its store.
const MAX_INSTANCES: usize = 64;

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
    pub(super) output: Arc<GuestOutput>,
    /// An orchestrator's clock and the request it is answering; `None` in
    /// the other worlds.
    pub(super) orchestration: Option<Orchestration>,
}

impl PluginState {
    /// The state of a new instance of the plugin `name`: WASI with the
    /// environment, directories and network its manifest grants, output to
    /// the host log, and the manifest's memory cap.
    pub(super) fn new(name: &Arc<str>, manifest: &Arc<Manifest>) -> Result<PluginState, String> {
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
        Ok(PluginState {
            name: Arc::clone(name),
            config: Arc::clone(manifest),
            wasi: wasi.build(),
            table: ResourceTable::new(),
            memory: MemoryCap::new(manifest.memory_bytes),
            last_error_log: None,
            output,
            orchestration: None,
        })
    }
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

/// An orchestrator store's clock and the request it is answering.
pub(crate) struct Orchestration {
    /// The guest's own time allowed per call (the manifest's deadline).
    pub(super) budget: Duration,
    /// When the current call (instantiation, `init` or `run`) started.
    pub(super) started: Instant,
    /// Time the current call has spent waiting for models.
    pub(super) waited: Duration,
    /// The run under way, if any.
    pub(super) scope: Option<(RequestView, RunContext)>,
    /// The last nested call's failure, as the host reported it to the guest.
    pub(super) nested_failure: Option<Error>,
}

impl Orchestration {
    pub(super) fn new(budget: Duration) -> Orchestration {
        Orchestration {
            budget,
            started: Instant::now(),
            waited: Duration::ZERO,
            scope: None,
            nested_failure: None,
        }
    }

    /// The guest time left to the current call, `None` once spent.
    pub(super) fn left(&self) -> Option<Duration> {
        let used = self.started.elapsed().saturating_sub(self.waited);
        self.budget.checked_sub(used).filter(|left| !left.is_zero())
    }
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
}
