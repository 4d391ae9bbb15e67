//! The plugin platform, host side: WebAssembly components behind the WIT in
//! `wit/`, loaded from a directory and hot-reloaded.
//!
//! A `<name>.wasm` (with an optional `<name>.toml` manifest) is compiled off
//! the tokio workers, checked (contract version, world), instantiated, and its
//! `describe` and `init` called, and only then swapped in atomically. Calls in
//! flight finish on the version they started with, since they hold its `Arc`.
//! A file that fails any step leaves the previous version serving and is
//! reported through the log, `PluginHost::list` and a counter.
//!
//! This crate is the plugin layer: it depends on `plinth-core` and on nothing
//! of the torch layer, so it (and its tests) build without libtorch. No WIT
//! type leaves it: `bindings` is private and callers use the host-side types
//! of `types.rs`.

mod bindings;
pub mod cache;
mod calls;
mod convert;
mod engine;
mod guest_log;
pub mod kind;
pub mod manifest;
mod meta;
mod orchestrator;
mod outcome;
mod pool;
mod stacks;
mod state;
mod sync_io;
mod types;

/// Where compiled components are cached unless told otherwise: outside the
/// plugin directory, per user ([`cache`]).
pub use cache::default_dir as default_cache_dir;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

pub use calls::{Candidates, Stage};
pub use engine::WIT_VERSION;
pub use kind::{AnyPlugin, Kind};
pub use manifest::{Manifest, OnError};
pub use meta::{FailureCause, PluginMeta, PluginStats};
pub use orchestrator::{DEFAULT_MAX_DEPTH, Orchestrator};
pub use outcome::CallError;
pub use pool::Plugin;
pub use types::{
    BoxFuture, DeviceMemory, HealthReport, HealthStatus, HostSnapshot, MirrorEvent, MirrorTarget,
    ModelCaller, ModelChoice, ModelPhase, ModelStatus, NestedCall, NestedEvent, PluginError,
    PluginInfo, PluginKind, PluginStatus, RequestEvent, RequestStatus, RequestView, RouteDecision,
    RunContext, StageTimings,
};

/// A file that failed to load, as reported by `list`.
#[derive(Debug, Clone, PartialEq)]
pub struct FileFailure {
    pub name: String,
    pub reason: String,
    pub at: SystemTime,
}

/// One row of `list`: a serving plugin, a file that failed, or both (a
/// failed replacement of a serving plugin).
#[derive(Debug, Clone)]
pub struct PluginReport {
    pub name: String,
    pub plugin: Option<AnyPlugin>,
    pub failure: Option<FileFailure>,
    /// A load of this name is under way (reading, compiling, instantiating).
    pub compiling: bool,
}

/// A load under way. The newest load of a name wins: an older one that
/// finishes later is dropped rather than swapped in.
#[derive(Debug, Clone)]
struct Pending {
    ticket: u64,
    /// Whether it is a router: known from the plugin it replaces, then
    /// from its bytes (the router interface's name) before compiling;
    /// `None` while a new file is being read. A router (or what may be one)
    /// being loaded is never routed around.
    router: Option<bool>,
}

/// What `plinth plugin check` reports of a component this host accepts.
#[derive(Debug, Clone)]
pub struct ComponentReport {
    /// The world it implements (`processor-plugin`, ...).
    pub world: &'static str,
    /// The `plinth:plugin` interfaces it names, with the versions it was built against.
    pub interfaces: Vec<String>,
    /// What its `describe` says.
    pub info: PluginInfo,
    /// The WIT version this host speaks.
    pub host_wit: &'static str,
}

/// Runs on `bytes` every check the loader runs (a valid component, one
/// plugin world at a compatible version, instantiation under `manifest`'s
/// limits and capabilities, `describe` and `init`) without a server.
/// Blocking. Compiled artifacts go to a private temporary directory.
pub fn check_component(
    name: &str,
    bytes: &[u8],
    manifest: Manifest,
) -> Result<ComponentReport, String> {
    let cache = std::env::temp_dir().join(format!("plinth-check-{}", std::process::id()));
    let result = AnyPlugin::load(name, bytes, manifest, &cache).and_then(|plugin| {
        let (component, _) = engine::Runtime::get().compile(bytes, &cache)?;
        Ok(ComponentReport {
            world: plugin.kind.world(),
            interfaces: engine::Runtime::get().plugin_interfaces(&component),
            info: plugin.info.clone(),
            host_wit: WIT_VERSION,
        })
    });
    let _ = std::fs::remove_dir_all(&cache);
    result
}

/// Compiled artifacts kept beyond those of the loaded plugins.
pub const CACHE_SPARE: usize = 8;

/// The router interface's name as a component spells it.
const ROUTER_NAME: &[u8] = b"plinth:plugin/router@";

/// The loaded plugins, by file stem.
pub struct PluginHost {
    dir: PathBuf,
    /// Where compiled components are cached (outside `dir` by default).
    cache_dir: PathBuf,
    plugins: ArcSwap<BTreeMap<String, AnyPlugin>>,
    failures: parking_lot::Mutex<BTreeMap<String, FileFailure>>,
    /// Loads that failed since startup.
    pub load_failures: AtomicU64,
    /// Serialises swaps (held for the swap only, never across a compile).
    swap_lock: tokio::sync::Mutex<()>,
    /// Loads under way, by name.
    pending: parking_lot::Mutex<BTreeMap<String, Pending>>,
    tickets: AtomicU64,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("dir", &self.dir)
            .finish()
    }
}

fn stem_of(path: &Path, ext: &str) -> Option<String> {
    if path.extension()? != ext {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    plinth_core::config::valid_model_name(stem).then(|| stem.to_owned())
}

impl PluginHost {
    pub fn new(dir: impl Into<PathBuf>) -> PluginHost {
        let dir = dir.into();
        let cache_dir = cache::default_dir(&dir);
        PluginHost::with_cache_dir(dir, cache_dir)
    }

    /// A host whose compiled components are cached in `cache_dir`: for a
    /// plugin directory that cannot be written (a mounted ConfigMap).
    pub fn with_cache_dir(dir: impl Into<PathBuf>, cache_dir: impl Into<PathBuf>) -> PluginHost {
        PluginHost {
            dir: dir.into(),
            cache_dir: cache_dir.into(),
            plugins: ArcSwap::from_pointee(BTreeMap::new()),
            failures: parking_lot::Mutex::new(BTreeMap::new()),
            load_failures: AtomicU64::new(0),
            swap_lock: tokio::sync::Mutex::new(()),
            pending: parking_lot::Mutex::new(BTreeMap::new()),
            tickets: AtomicU64::new(0),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The plugin serving under `name`, of whichever kind; `into_kind`
    /// gives the typed handle.
    pub fn get(&self, name: &str) -> Option<AnyPlugin> {
        self.plugins.load().get(name).cloned()
    }

    /// The plugins of kind `K`, by name.
    pub fn of_kind<K: Kind>(&self) -> Vec<Arc<Plugin<K>>> {
        self.plugins
            .load()
            .values()
            .filter_map(|p| p.get::<K>())
            .cloned()
            .collect()
    }

    /// The active router: the first router plugin by name, if any.
    pub fn router(&self) -> Option<Arc<Plugin<kind::Router>>> {
        self.plugins
            .load()
            .values()
            .find_map(|p| p.get::<kind::Router>())
            .cloned()
    }

    pub fn list(&self) -> Vec<PluginReport> {
        let plugins = self.plugins.load();
        let failures = self.failures.lock().clone();
        let pending = self.pending.lock().clone();
        let names: BTreeSet<&String> = plugins
            .keys()
            .chain(failures.keys())
            .chain(pending.keys())
            .collect();
        names
            .into_iter()
            .map(|name| PluginReport {
                name: name.clone(),
                plugin: plugins.get(name).cloned(),
                failure: failures.get(name).cloned(),
                compiling: pending.contains_key(name),
            })
            .collect()
    }

    /// Bytes of compiled components in the cache directory. Blocking.
    pub fn cache_bytes(&self) -> u64 {
        std::fs::read_dir(&self.cache_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    }

    /// Keeps the artifacts of the plugins loaded now plus the
    /// [`CACHE_SPARE`] most recently used others; deletes the rest (each
    /// rebuild of a non-reproducible component would otherwise add one
    /// forever). Blocking.
    pub fn evict_cache(&self) {
        evict(&self.cache_dir, &self.cache_keep());
    }

    /// The artifact names of the plugins loaded now.
    fn cache_keep(&self) -> BTreeSet<String> {
        self.plugins
            .load()
            .values()
            .map(|p| format!("{}.cwasm", p.file_hash))
            .collect()
    }
}

fn evict(cache_dir: &Path, keep: &BTreeSet<String>) {
    {
        let Ok(entries) = std::fs::read_dir(cache_dir) else {
            return;
        };
        let mut others: Vec<(SystemTime, PathBuf)> = entries
            .flatten()
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.ends_with(".cwasm") && !keep.contains(&name)
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        others.sort_by_key(|other| std::cmp::Reverse(other.0));
        for (_, path) in others.into_iter().skip(CACHE_SPARE) {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::debug!(file = %path.display(), "evicted from the plugin cache"),
                Err(err) => tracing::debug!(file = %path.display(), %err, "cannot evict"),
            }
        }
    }
}

impl PluginHost {
    /// Whether a load of `name` is under way.
    pub fn is_compiling(&self, name: &str) -> bool {
        self.pending.lock().contains_key(name)
    }

    /// A router (or a new file not yet read, which may be one) being
    /// loaded: requests must not be routed around it. The name, and
    /// whether it is known to be a router.
    pub fn router_compiling(&self) -> Option<(String, bool)> {
        self.pending
            .lock()
            .iter()
            .find(|(_, p)| p.router != Some(false))
            .map(|(name, p)| (name.clone(), p.router == Some(true)))
    }

    fn begin(&self, name: &str) -> u64 {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed) + 1;
        let router = self
            .get(name)
            .map(|current| current.kind == PluginKind::Router);
        self.pending
            .lock()
            .insert(name.to_owned(), Pending { ticket, router });
        ticket
    }

    fn is_latest(&self, name: &str, ticket: u64) -> bool {
        self.pending
            .lock()
            .get(name)
            .is_none_or(|p| p.ticket == ticket)
    }

    /// Ends the load `ticket` of `name`; false if a newer load has begun.
    fn finish(&self, name: &str, ticket: u64) -> bool {
        let mut pending = self.pending.lock();
        match pending.get(name) {
            Some(p) if p.ticket == ticket => {
                pending.remove(name);
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    fn fail(&self, name: &str, reason: String) -> String {
        self.load_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(plugin = name, %reason, "plugin not loaded; the previous version (if any) keeps serving");
        self.failures.lock().insert(
            name.to_owned(),
            FileFailure {
                name: name.to_owned(),
                reason: reason.clone(),
                at: SystemTime::now(),
            },
        );
        reason
    }

    /// Loads or replaces the plugin `<dir>/<name>.wasm`. The file is read
    /// and compiled with no lock held (several compile at once); only the
    /// swap is serialised. While it runs, the name is reported as compiling.
    pub async fn load(&self, name: &str) -> Result<AnyPlugin, String> {
        let ticket = self.begin(name);
        let wasm = self.dir.join(format!("{name}.wasm"));
        let manifest_path = self.dir.join(format!("{name}.toml"));
        let current = self.get(name);
        let read =
            tokio::task::spawn_blocking(move || -> Result<Option<(Vec<u8>, Manifest)>, String> {
                let bytes = std::fs::read(&wasm)
                    .map_err(|err| format!("{}: cannot read: {err}", wasm.display()))?;
                let manifest = Manifest::load(&manifest_path)?;
                // The same bytes under the same manifest: a duplicate event, not a change.
                if let Some(current) = &current
                    && engine::content_hash(&bytes) == current.file_hash
                    && *current.manifest == manifest
                {
                    return Ok(None);
                }
                Ok(Some((bytes, manifest)))
            })
            .await
            .unwrap_or_else(|err| Err(format!("plugin load panicked: {err}")));
        let (bytes, manifest) = match read {
            Ok(Some(read)) => read,
            Ok(None) => {
                let current = self.get(name);
                if self.finish(name, ticket) {
                    self.failures.lock().remove(name);
                }
                return current.ok_or_else(|| format!("plugin '{name}' was removed meanwhile"));
            }
            Err(reason) => {
                return if self.finish(name, ticket) {
                    Err(self.fail(name, reason))
                } else {
                    Err(format!("superseded by a newer load: {reason}"))
                };
            }
        };
        // The kind is known only once compiled; the router's interface name
        // in the bytes says early enough that requests must wait for it.
        let router = bytes.windows(ROUTER_NAME.len()).any(|w| w == ROUTER_NAME);
        if let Some(p) = self.pending.lock().get_mut(name)
            && p.ticket == ticket
        {
            p.router = Some(router);
        }
        let cache = self.cache_dir.clone();
        let owned = name.to_owned();
        let built =
            tokio::task::spawn_blocking(move || AnyPlugin::load(&owned, &bytes, manifest, &cache))
                .await
                .unwrap_or_else(|err| Err(format!("plugin load panicked: {err}")));
        let _swap = self.swap_lock.lock().await;
        if !self.is_latest(name, ticket) {
            return Err("superseded by a newer load of the same file".into());
        }
        // Reported as compiling until swapped in or failed: never a moment
        // when it is neither.
        let plugin = match built {
            Ok(plugin) => plugin,
            Err(err) => {
                let reason = format!("{}: {err}", self.dir.join(format!("{name}.wasm")).display());
                self.finish(name, ticket);
                return Err(self.fail(name, reason));
            }
        };
        let previous = self.get(name);
        if let Some(previous) = &previous
            && previous.kind != plugin.kind
        {
            let reason = format!(
                "{}: is a {}, but '{name}' is serving as a {}; remove the old file first to change its kind",
                self.dir.join(format!("{name}.wasm")).display(),
                plugin.kind.world(),
                previous.kind.world()
            );
            self.finish(name, ticket);
            return Err(self.fail(name, reason));
        }
        if let (Some(AnyPlugin::Metrics(previous)), AnyPlugin::Metrics(next)) = (&previous, &plugin)
        {
            let (previous, next) = (Arc::clone(previous), Arc::clone(next));
            let _ = tokio::task::spawn_blocking(move || previous.hand_state_to(&next)).await;
        }
        self.plugins.rcu(|current| {
            let mut next = (**current).clone();
            next.insert(name.to_owned(), plugin.clone());
            next
        });
        self.finish(name, ticket);
        self.failures.lock().remove(name);
        // Off the swap: a directory listing and a few deletions.
        let host_cache = self.cache_dir.clone();
        let keep = self.cache_keep();
        tokio::task::spawn_blocking(move || evict(&host_cache, &keep));
        tracing::info!(
            plugin = name,
            world = plugin.kind.world(),
            version = %plugin.info.version,
            hash = %&plugin.file_hash[..12],
            "plugin serving"
        );
        Ok(plugin)
    }

    /// Removes a plugin whose file is gone. Calls in flight finish on it.
    pub fn remove(&self, name: &str) {
        let mut removed = false;
        self.plugins.rcu(|current| {
            let mut next = (**current).clone();
            removed = next.remove(name).is_some();
            next
        });
        self.failures.lock().remove(name);
        if removed {
            tracing::info!(plugin = name, "plugin removed");
        }
    }

    /// Makes the loaded set match the directory: loads every `.wasm`, removes
    /// plugins whose file is gone. Returns the per-file outcomes.
    pub async fn rescan(&self) -> Vec<(String, Result<(), String>)> {
        let dir = self.dir.clone();
        let names = tokio::task::spawn_blocking(move || -> Vec<String> {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                return Vec::new();
            };
            let mut names: Vec<String> = entries
                .flatten()
                .filter_map(|entry| stem_of(&entry.path(), "wasm"))
                .collect();
            names.sort();
            names
        })
        .await
        .unwrap_or_default();
        let loaded: Vec<String> = self.plugins.load().keys().cloned().collect();
        for gone in loaded.iter().filter(|name| !names.contains(name)) {
            self.remove(gone);
        }
        // Every file at once: a big component compiling holds up no other.
        let loads = names.iter().map(|name| self.load(name));
        let results = futures::future::join_all(loads).await;
        names
            .into_iter()
            .zip(results)
            .map(|(name, res)| (name, res.map(|_| ())))
            .collect()
    }

    /// Applies a burst of file events: a changed `.wasm` or `.toml` reloads
    /// its plugin, a deleted `.wasm` removes it.
    async fn apply(&self, names: BTreeSet<String>) {
        for name in names {
            let wasm = self.dir.join(format!("{name}.wasm"));
            let exists = tokio::task::spawn_blocking(move || wasm.is_file())
                .await
                .unwrap_or(false);
            if exists {
                let _ = self.load(&name).await;
            } else {
                self.remove(&name);
            }
        }
    }
}

/// Watches the plugin directory; stops when dropped. Entries are compared
/// by content and followed through symlinks ([`plinth_watch::DirWatch`]),
/// so a file rewritten in place, one renamed in, and a Kubernetes ConfigMap
/// update (the `..data` symlink swap, which touches no plugin's own entry)
/// each reload exactly the plugins whose `.wasm` or `.toml` changed.
pub struct PluginWatcher {
    _watch: plinth_watch::DirWatch,
    _task: tokio::task::JoinHandle<()>,
}

impl PluginWatcher {
    /// Bursts of events within `debounce` are applied together, so a file
    /// being copied is read once it has settled.
    pub fn start(host: Arc<PluginHost>, debounce: Duration) -> std::io::Result<PluginWatcher> {
        let (tx, mut rx) = mpsc::unbounded_channel::<BTreeSet<String>>();
        let wanted = |name: &str| {
            let path = Path::new(name);
            stem_of(path, "wasm")
                .or_else(|| stem_of(path, "toml"))
                .is_some()
        };
        let watch = plinth_watch::DirWatch::start(host.dir(), debounce, wanted, move |changed| {
            let names: BTreeSet<String> = changed
                .iter()
                .filter_map(|name| {
                    let path = Path::new(name);
                    stem_of(path, "wasm").or_else(|| stem_of(path, "toml"))
                })
                .collect();
            if !names.is_empty() {
                let _ = tx.send(names);
            }
        })
        .map_err(std::io::Error::other)?;
        let task = tokio::spawn(async move {
            while let Some(names) = rx.recv().await {
                host.apply(names).await;
            }
        });
        Ok(PluginWatcher {
            _watch: watch,
            _task: task,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache keeps the loaded plugins' artifacts and the CACHE_SPARE
    /// most recently used others, whatever their age.
    #[test]
    fn eviction_keeps_the_loaded_and_the_most_recent() {
        let dir = std::env::temp_dir().join(format!("plinth-evict-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for i in 0..14u64 {
            let path = dir.join(format!("{i:02}.cwasm"));
            std::fs::write(&path, b"x").unwrap();
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(base + Duration::from_secs(i))
                .unwrap();
        }
        std::fs::write(dir.join("notes.txt"), b"not an artifact").unwrap();
        // 00 and 01 are the oldest but loaded.
        let keep: BTreeSet<String> = ["00.cwasm".to_owned(), "01.cwasm".to_owned()].into();
        evict(&dir, &keep);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want: Vec<String> = ["00", "01", "06", "07", "08", "09", "10", "11", "12", "13"]
            .iter()
            .map(|n| format!("{n}.cwasm"))
            .collect();
        want.push("notes.txt".into());
        assert_eq!(left, want);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
