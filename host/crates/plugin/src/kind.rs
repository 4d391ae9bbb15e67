//! Plugin kinds as types. `Plugin<K>` is a plugin of one world, and only that
//! world's calls exist on it: routing a request through a processor does not
//! compile. `AnyPlugin` is what the host keeps by name; a caller gets a typed
//! handle from it with `get::<K>()` or `into_kind::<K>()`.
//!
//! The first example compiles; the second, which differs only in the kind,
//! does not (no `route` on a processor):
//!
//! ```
//! use plinth_plugin::{Candidates, Plugin, RequestView, kind};
//! fn route(plugin: &Plugin<kind::Router>, request: &RequestView) {
//!     let _ = plugin.route(request, &Candidates::default());
//! }
//! ```
//!
//! ```compile_fail,E0599
//! use plinth_plugin::{Candidates, Plugin, RequestView, kind};
//! fn route(plugin: &Plugin<kind::Processor>, request: &RequestView) {
//!     let _ = plugin.route(request, &Candidates::default());
//! }
//! ```

use std::path::Path;
use std::sync::Arc;

use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::bindings::{health, metrics, processor, router, wit, wit_metrics_context, wit_mirror};
use super::engine::Runtime;
use super::manifest::Manifest;
use super::meta::PluginMeta;
use super::orchestrator::Orchestrator;
use super::pool::{Plugin, World};
use super::state::PluginState;
use super::types::PluginKind;
use plinth_core::error::Error;

pub(super) mod sealed {
    use super::*;

    /// Where a world's plugins sit in [`AnyPlugin`]. What the pool needs of
    /// a world is its supertrait, `World`. Sealed: the four worlds are the
    /// only kinds.
    pub trait Variant: World {
        fn wrap(plugin: Arc<Plugin<Self>>) -> AnyPlugin;
        fn unwrap(any: &AnyPlugin) -> Option<&Arc<Plugin<Self>>>;
    }

    /// An interface a plugin of a world may export beside the world's own
    /// (0.1.1's `mirror` for routers, `metrics-context` for metrics plugins),
    /// looked up when the component is linked.
    pub trait Optional: Send + Sync + 'static {
        type Indices: Send + Sync + 'static;
        type Guest: Send + Sync + 'static;
        /// `None` when the component does not export it.
        fn indices(pre: &InstancePre<PluginState>) -> Option<Self::Indices>;
        fn load(
            indices: &Self::Indices,
            store: &mut Store<PluginState>,
            instance: &wasmtime::component::Instance,
        ) -> wasmtime::Result<Self::Guest>;
    }
}

/// No optional interface.
pub enum NoExtra {}

impl sealed::Optional for NoExtra {
    type Indices = ();
    type Guest = ();

    fn indices(_pre: &InstancePre<PluginState>) -> Option<()> {
        None
    }

    fn load(
        _indices: &(),
        _store: &mut Store<PluginState>,
        _instance: &wasmtime::component::Instance,
    ) -> wasmtime::Result<()> {
        Ok(())
    }
}

/// An optional interface whose bindgen module is `$module`.
macro_rules! optional {
    ($(#[$doc:meta])* $name:ident, $module:ident) => {
        $(#[$doc])*
        pub enum $name {}

        impl sealed::Optional for $name {
            type Indices = $module::GuestIndices;
            type Guest = $module::Guest;

            fn indices(pre: &InstancePre<PluginState>) -> Option<Self::Indices> {
                $module::GuestIndices::new(pre).ok()
            }

            fn load(
                indices: &Self::Indices,
                store: &mut Store<PluginState>,
                instance: &wasmtime::component::Instance,
            ) -> wasmtime::Result<Self::Guest> {
                indices.load(store, instance)
            }
        }
    };
}

optional!(
    /// The `mirror` interface a router may export (0.1.1).
    Mirror, wit_mirror
);
optional!(
    /// The `metrics-context` interface a metrics plugin may export (0.1.1).
    MetricsContext, wit_metrics_context
);

/// A world's pre-linked component, with the indices of its optional
/// interface when the component exports it.
pub struct PreWith<P, X: sealed::Optional> {
    pub(super) base: P,
    pub(super) extra: Option<X::Indices>,
}

/// An instance's exports: the world's, and its optional interface's.
pub struct ExportsWith<E, X: sealed::Optional> {
    pub(super) base: E,
    pub(super) extra: Option<X::Guest>,
}

/// A plugin world: `Router`, `Processor`, `Metrics` or `Health`.
pub trait Kind: sealed::Variant {}

impl<W: sealed::Variant> Kind for W {}

macro_rules! world {
    ($(#[$doc:meta])* $kind:ident, $variant:ident, $module:ident, $pre:ident, $exports:ident, $extra:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $kind {}

        impl World for $kind {
            const KIND: PluginKind = PluginKind::$variant;
            type Pre = PreWith<$module::$pre<PluginState>, $extra>;
            type Exports = ExportsWith<$module::$exports, $extra>;

            fn pre(pre: InstancePre<PluginState>) -> wasmtime::Result<Self::Pre> {
                let extra = <$extra as sealed::Optional>::indices(&pre);
                Ok(PreWith {
                    base: $module::$pre::new(pre)?,
                    extra,
                })
            }

            fn instantiate(
                pre: &Self::Pre,
                store: &mut Store<PluginState>,
            ) -> wasmtime::Result<Self::Exports> {
                let instance = pre.base.instance_pre().instantiate(&mut *store)?;
                let base = $module::$exports::new(&mut *store, &instance)?;
                let extra = match &pre.extra {
                    Some(indices) => Some(<$extra as sealed::Optional>::load(
                        indices, store, &instance,
                    )?),
                    None => None,
                };
                Ok(ExportsWith { base, extra })
            }

            fn describe(
                exports: &Self::Exports,
                store: &mut Store<PluginState>,
            ) -> wasmtime::Result<wit::PluginInfo> {
                exports.base.call_describe(store)
            }

            fn init(
                exports: &Self::Exports,
                store: &mut Store<PluginState>,
            ) -> wasmtime::Result<Result<(), wit::PluginError>> {
                exports.base.call_init(store)
            }
        }

        impl sealed::Variant for $kind {
            fn wrap(plugin: Arc<Plugin<Self>>) -> AnyPlugin {
                AnyPlugin::$variant(plugin)
            }

            fn unwrap(any: &AnyPlugin) -> Option<&Arc<Plugin<Self>>> {
                match any {
                    AnyPlugin::$variant(plugin) => Some(plugin),
                    _ => None,
                }
            }
        }
    };
}

world!(
    /// The `router-plugin` world: picks the model and version of a request
    /// (and, exporting `mirror`, where it also runs).
    Router, Router, router, RouterPluginPre, RouterPlugin, Mirror
);
world!(
    /// The `processor-plugin` world: transforms tensors before and after a model.
    Processor, Processor, processor, ProcessorPluginPre, ProcessorPlugin, NoExtra
);
world!(
    /// The `metrics-plugin` world: stateful, fed request events, renders text
    /// (and, exporting `metrics-context`, mirrored runs).
    Metrics, Metrics, metrics, MetricsPluginPre, MetricsPlugin, MetricsContext
);
world!(
    /// The `health-plugin` world: stateful, judges host snapshots.
    Health, Health, health, HealthPluginPre, HealthPlugin, NoExtra
);

/// A loaded plugin of whichever kind its component turned out to be.
/// Dereferences to what every plugin has (`name`, `kind`, `info`, `stats`).
#[derive(Debug, Clone)]
pub enum AnyPlugin {
    Router(Arc<Plugin<Router>>),
    Processor(Arc<Plugin<Processor>>),
    Metrics(Arc<Plugin<Metrics>>),
    Health(Arc<Plugin<Health>>),
    /// Not a [`Kind`]: its calls are async ([`Orchestrator::run`]).
    Orchestrator(Arc<Orchestrator>),
}

impl std::ops::Deref for AnyPlugin {
    type Target = PluginMeta;

    fn deref(&self) -> &PluginMeta {
        match self {
            AnyPlugin::Router(plugin) => plugin,
            AnyPlugin::Processor(plugin) => plugin,
            AnyPlugin::Metrics(plugin) => plugin,
            AnyPlugin::Health(plugin) => plugin,
            AnyPlugin::Orchestrator(plugin) => plugin,
        }
    }
}

impl AnyPlugin {
    /// Compiles and checks the component, finds its world, instantiates it
    /// and calls `describe` and `init` once. Blocking.
    pub fn load(
        name: &str,
        bytes: &[u8],
        manifest: Manifest,
        cache_dir: &Path,
    ) -> Result<AnyPlugin, String> {
        let runtime = Runtime::get();
        let (component, hash) = runtime.compile(bytes, cache_dir)?;
        let kind = runtime.inspect(&component)?;
        fn typed<K: Kind>(
            name: &str,
            component: &wasmtime::component::Component,
            hash: String,
            manifest: Manifest,
        ) -> Result<AnyPlugin, String> {
            Plugin::<K>::from_component(name, component, hash, manifest)
                .map(|plugin| K::wrap(Arc::new(plugin)))
        }
        match kind {
            PluginKind::Router => typed::<Router>(name, &component, hash, manifest),
            PluginKind::Processor => typed::<Processor>(name, &component, hash, manifest),
            PluginKind::Metrics => typed::<Metrics>(name, &component, hash, manifest),
            PluginKind::Health => typed::<Health>(name, &component, hash, manifest),
            PluginKind::Orchestrator => {
                Orchestrator::from_component(name, &component, hash, manifest)
                    .map(|plugin| AnyPlugin::Orchestrator(Arc::new(plugin)))
            }
        }
    }

    /// The orchestrator, or an error naming the plugin and its world.
    pub fn into_orchestrator(self) -> Result<Arc<Orchestrator>, Error> {
        match self {
            AnyPlugin::Orchestrator(plugin) => Ok(plugin),
            other => Err(Error::FailedPrecondition(format!(
                "plugin '{}' implements {}, not orchestrator-plugin",
                other.name,
                other.kind.world()
            ))),
        }
    }

    /// The typed handle, if the plugin is of kind `K`.
    pub fn get<K: Kind>(&self) -> Option<&Arc<Plugin<K>>> {
        K::unwrap(self)
    }

    /// The typed handle, or an error naming the plugin, its world and the
    /// world the caller needed (e.g. a router named in a processor chain).
    pub fn into_kind<K: Kind>(self) -> Result<Arc<Plugin<K>>, Error> {
        K::unwrap(&self).cloned().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "plugin '{}' implements {}, not {}",
                self.name,
                self.kind.world(),
                K::KIND.world()
            ))
        })
    }
}
