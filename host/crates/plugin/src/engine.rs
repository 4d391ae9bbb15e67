//! The wasmtime engine: one shared `Engine` with epoch interruption and its
//! two linkers, compiling with an on-disk cache of precompiled artifacts,
//! checking a component's contract version and world, and making the stores
//! plugins run in, each with a deadline and a memory cap.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, InstancePre, Linker};
use wasmtime::{Config, Engine, Store};

use super::bindings::{wit, wit_host, wit_models};
use super::manifest::Manifest;
use super::outcome::root_cause;
use super::state::PluginState;
use super::types::PluginKind;

/// The contract version this host speaks (the `package` line of `wit/`).
pub const WIT_VERSION: &str = "0.1.1";
const WIT_PACKAGE: &str = "plinth:plugin/";

/// How often the epoch advances; deadlines are counted in these ticks.
pub(super) const EPOCH_TICK: Duration = Duration::from_millis(1);

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
        // Orchestrators' async calls reuse fiber stacks instead of mapping
        // a new one per call.
        config.with_host_stack(Arc::new(crate::stacks::StackCache::new()));
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
        wit_models::add_to_linker::<PluginState, HasSelf<PluginState>>(
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
        let mut store = Store::new(&self.engine, PluginState::new(name, manifest)?);
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
    use crate::outcome::{CallError, classify};

    const PAGE: usize = 1 << 16;

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
