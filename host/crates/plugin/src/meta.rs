//! What every loaded plugin has, whatever its kind: the name the host knows
//! it by, its world, what its `describe` answered, its file's hash, its
//! manifest and its counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use super::manifest::Manifest;
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
