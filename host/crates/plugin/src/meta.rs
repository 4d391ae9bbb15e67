//! What every loaded plugin has, whatever its kind: the name the host knows
//! it by, its world, what its `describe` answered, its file's hash, its
//! manifest and its counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use super::manifest::Manifest;
use super::outcome::CallError;
use super::types::{PluginInfo, PluginKind, PluginStatus};

/// Counters of one plugin.
#[derive(Debug, Default)]
pub struct PluginStats {
    pub calls: AtomicU64,
    pub errors: AtomicU64,
    /// Failed calls the request went on without (`on_error = "skip"`).
    pub skips: AtomicU64,
    /// Instances let go past their memory high-water mark
    /// ([`MemoryCap::past_high_water`](crate::state::MemoryCap::past_high_water)).
    pub recycled: AtomicU64,
    pub last_error: parking_lot::Mutex<Option<String>>,
    /// Failed calls by cause, in the order of [`FailureCause::ALL`].
    pub failures: [AtomicU64; FailureCause::ALL.len()],
}

/// Why a call failed, as the metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCause {
    /// The guest trapped (a panic, an abort, an out-of-bounds access), or a
    /// host function it called panicked.
    Trap,
    /// Past its deadline (the manifest's, or the request's).
    Timeout,
    /// Past its memory cap.
    Memory,
    /// The plugin's own `plugin-error` answer.
    Plugin,
    /// No instance could be made (instantiation or `init` failed).
    Instantiate,
}

impl FailureCause {
    pub const ALL: [FailureCause; 5] = [
        FailureCause::Trap,
        FailureCause::Timeout,
        FailureCause::Memory,
        FailureCause::Plugin,
        FailureCause::Instantiate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureCause::Trap => "trap",
            FailureCause::Timeout => "timeout",
            FailureCause::Memory => "memory",
            FailureCause::Plugin => "plugin",
            FailureCause::Instantiate => "instantiate",
        }
    }

    pub fn of(err: &CallError) -> FailureCause {
        match err {
            CallError::Trap(_) => FailureCause::Trap,
            CallError::Timeout(_) => FailureCause::Timeout,
            CallError::OutOfMemory(_) => FailureCause::Memory,
            CallError::Plugin(_) => FailureCause::Plugin,
            CallError::Instantiate(_) => FailureCause::Instantiate,
        }
    }
}

impl PluginStats {
    /// Counts a failed call (in `errors` and under its cause) and keeps its
    /// message as the last error.
    pub fn record_failure(&self, cause: FailureCause, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let slot = FailureCause::ALL
            .iter()
            .position(|c| *c == cause)
            .unwrap_or_default();
        self.failures[slot].fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock() = Some(message);
    }

    /// Failed calls with `cause`.
    pub fn failures_of(&self, cause: FailureCause) -> u64 {
        FailureCause::ALL
            .iter()
            .position(|c| *c == cause)
            .map_or(0, |slot| self.failures[slot].load(Ordering::Relaxed))
    }
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
