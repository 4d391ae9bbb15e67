//! Write Plinth plugins in Rust.
//!
//! A Plinth plugin is a WebAssembly component that targets one of the worlds
//! of the `plinth:plugin` WIT package (in `wit/` at the repository root).
//! This crate hides the bindings: implement [`Plugin`] and one of the kind
//! traits, and export the type with the matching macro.
//!
//! | kind | trait | macro |
//! |---|---|---|
//! | request routing | [`Router`] | [`export_router!`] |
//! | tensor pre/post-processing | [`Processor`] | [`export_processor!`] |
//! | metrics | [`Metrics`] | [`export_metrics!`] |
//! | health checks | [`Health`] | [`export_health!`] |
//! | model composition (0.1.1) | [`Orchestrator`] | [`export_orchestrator!`] |
//! | routing with mirrors (0.1.1) | [`MirroringRouter`] | [`export_mirroring_router!`] |
//! | metrics of mirrors and nested calls (0.1.1) | [`MetricsContext`] | [`export_metrics_context!`] |
//!
//! A complete processor that scales every `f32` input by a configured
//! factor:
//!
//! ```
//! use plinth_plugin_sdk::prelude::*;
//!
//! struct Scale {
//!     factor: f32,
//! }
//!
//! impl Plugin for Scale {
//!     fn init(config: &Config) -> Result<Self> {
//!         Ok(Scale { factor: config.parse_or("factor", 1.0)? })
//!     }
//! }
//!
//! impl Processor for Scale {
//!     fn preprocess(&mut self, _req: &RequestInfo, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
//!         let mut outputs = Vec::with_capacity(inputs.len());
//!         for tensor in inputs {
//!             let scaled = tensor.as_f32()?.iter().map(|v| v * self.factor).collect();
//!             outputs.push(Tensor::from_f32(tensor.name, &tensor.shape, scaled)?);
//!         }
//!         Ok(outputs)
//!     }
//! }
//!
//! export_processor!(Scale);
//! # // Plugins are plain Rust values, so they unit-test natively:
//! # let mut scale = Scale::init(&Config::from_pairs([("factor", "2")])).unwrap();
//! # let input = Tensor::from_f32("x", &[2], vec![1.0, 2.5]).unwrap();
//! # let req = RequestInfo { id: "1".into(), model: "m".into(), version: None, metadata: vec![] };
//! # let out = scale.preprocess(&req, vec![input]).unwrap();
//! # assert_eq!(&*out[0].as_f32().unwrap(), &[2.0, 5.0]);
//! ```
//!
//! The plugin's name, version and description (what the host's `describe`
//! call returns) come from the plugin crate's `Cargo.toml`.
//!
//! Build with `cargo build --target wasm32-wasip2 --release`; the component
//! is `target/wasm32-wasip2/release/<crate_name>.wasm`. The crate must be a
//! `cdylib`. See the README for the whole walk-through.

#![warn(missing_docs)]

// Lets the generated bindings name this crate by its public path, which is
// also the path they need when the export macros expand in a plugin crate.
extern crate self as plinth_plugin_sdk;

#[doc(hidden)]
#[allow(missing_docs)]
pub mod bindings;
mod config;
mod error;
#[doc(hidden)]
pub mod export;
pub mod log;
mod models;
mod tensor;
mod traits;

pub use bindings::common::plinth::plugin::host::LogLevel;
pub use bindings::common::plinth::plugin::types::{
    DeviceMemory, Dtype, HealthReport, HealthStatus, HostSnapshot, ModelRef, ModelState,
    ModelStatus, PluginError, PluginInfo, PluginKind, PluginStatus, RequestEvent, RequestInfo,
    RequestStatus, RouteDecision, StageTimings, Tensor,
};
pub use bindings::metrics_context::exports::plinth::plugin::metrics_context::{
    MirrorEvent, NestedEvent,
};
pub use bindings::mirror::exports::plinth::plugin::mirror::MirrorTarget;
pub use config::Config;
pub use models::{InferError, Models};
pub use tensor::{Element, TensorError};
pub use traits::{
    Health, Metrics, MetricsContext, MirroringRouter, Orchestrator, Plugin, Processor, Router,
};

/// The result of a plugin call.
pub type Result<T, E = PluginError> = std::result::Result<T, E>;

/// The names a plugin usually needs: `use plinth_plugin_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Config, Dtype, Health, HealthReport, HealthStatus, HostSnapshot, InferError, Metrics,
        MetricsContext, MirrorEvent, MirrorTarget, MirroringRouter, ModelRef, Models, NestedEvent,
        Orchestrator, Plugin, PluginError, Processor, RequestEvent, RequestInfo, RequestStatus,
        Result, RouteDecision, Router, StageTimings, Tensor, TensorError, export_health,
        export_metrics, export_metrics_context, export_mirroring_router, export_orchestrator,
        export_processor, export_router,
    };
}

/// The type the `export_*!` macros export: described by the plugin
/// crate's Cargo metadata.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_type {
    ($plugin:ty) => {
        struct PlinthExport;

        impl $crate::export::Export for PlinthExport {
            type Plugin = $plugin;

            fn info() -> $crate::PluginInfo {
                $crate::export::info(
                    env!("CARGO_PKG_NAME"),
                    env!("CARGO_PKG_VERSION"),
                    env!("CARGO_PKG_DESCRIPTION"),
                )
            }
        }
    };
}

/// Shared body of the `export_*!` macros.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_plugin {
    ($plugin:ty, $world:ident, $world_macro:ident) => {
        const _: () = {
            $crate::__export_type!($plugin);

            // The component exports exist only in WebAssembly. Natively (unit
            // tests, `cargo build --workspace`) their names, which contain `:`
            // and `/`, break the linker's version script for a cdylib, so
            // there the plugin is only type-checked against the world.
            #[cfg(target_arch = "wasm32")]
            $crate::bindings::$world::$world_macro!(
                PlinthExport with_types_in $crate::bindings::$world
            );

            #[cfg(not(target_arch = "wasm32"))]
            const _: () = {
                const fn exportable<E: $crate::bindings::$world::Guest>() {}
                exportable::<PlinthExport>()
            };
        };
    };
}

/// Exports a [`Router`] as this component's `router-plugin`.
///
/// Use it once, in the crate root of a `cdylib` crate: `export_router!(MyRouter);`.
///
/// A type that does not implement the kind's trait does not compile:
///
/// ```compile_fail
/// use plinth_plugin_sdk::prelude::*;
///
/// struct NotARouter;
///
/// impl Plugin for NotARouter {
///     fn init(_config: &Config) -> Result<Self> {
///         Ok(NotARouter)
///     }
/// }
///
/// impl Processor for NotARouter {}
///
/// export_router!(NotARouter);
/// ```
#[macro_export]
macro_rules! export_router {
    ($plugin:ty) => {
        $crate::__export_plugin!($plugin, router, __plinth_export_router_plugin);
    };
}

/// Exports a [`Processor`] as this component's `processor-plugin`.
///
/// Use it once, in the crate root of a `cdylib` crate:
/// `export_processor!(MyProcessor);`.
#[macro_export]
macro_rules! export_processor {
    ($plugin:ty) => {
        $crate::__export_plugin!($plugin, processor, __plinth_export_processor_plugin);
    };
}

/// Exports a [`Metrics`] plugin as this component's `metrics-plugin`.
///
/// Use it once, in the crate root of a `cdylib` crate:
/// `export_metrics!(MyMetrics);`.
#[macro_export]
macro_rules! export_metrics {
    ($plugin:ty) => {
        $crate::__export_plugin!($plugin, metrics, __plinth_export_metrics_plugin);
    };
}

/// Exports a [`Health`] plugin as this component's `health-plugin`.
///
/// Use it once, in the crate root of a `cdylib` crate:
/// `export_health!(MyHealth);`.
#[macro_export]
macro_rules! export_health {
    ($plugin:ty) => {
        $crate::__export_plugin!($plugin, health, __plinth_export_health_plugin);
    };
}

/// Exports an [`Orchestrator`] as this component's `orchestrator-plugin`.
///
/// Use it once, in the crate root of a `cdylib` crate:
/// `export_orchestrator!(MyOrchestrator);`.
#[macro_export]
macro_rules! export_orchestrator {
    ($plugin:ty) => {
        $crate::__export_plugin!($plugin, orchestrator, __plinth_export_orchestrator_plugin);
    };
}

/// Shared body of the exports of a world plus an optional interface: the
/// type is exported through both sets of bindings, which link into one
/// component.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_plugin_with {
    ($plugin:ty, $world:ident, $world_macro:ident, $extra:ident, $extra_macro:ident, $extra_guest:path) => {
        const _: () = {
            $crate::__export_type!($plugin);

            #[cfg(target_arch = "wasm32")]
            $crate::bindings::$world::$world_macro!(
                PlinthExport with_types_in $crate::bindings::$world
            );
            #[cfg(target_arch = "wasm32")]
            $crate::bindings::$extra::$extra_macro!(
                PlinthExport with_types_in $crate::bindings::$extra
            );

            #[cfg(not(target_arch = "wasm32"))]
            const _: () = {
                const fn exportable<E: $crate::bindings::$world::Guest + $extra_guest>() {}
                exportable::<PlinthExport>()
            };
        };
    };
}

/// Exports a [`MirroringRouter`] as this component's
/// `mirroring-router-plugin`: a router that also names mirror targets.
#[macro_export]
macro_rules! export_mirroring_router {
    ($plugin:ty) => {
        $crate::__export_plugin_with!(
            $plugin,
            router,
            __plinth_export_router_plugin,
            mirror,
            __plinth_export_mirror,
            $crate::bindings::mirror::exports::plinth::plugin::mirror::Guest
        );
    };
}

/// Exports a [`MetricsContext`] plugin as this component's
/// `metrics-context-plugin`: metrics that also count mirrored runs.
#[macro_export]
macro_rules! export_metrics_context {
    ($plugin:ty) => {
        $crate::__export_plugin_with!(
            $plugin,
            metrics,
            __plinth_export_metrics_plugin,
            metrics_context,
            __plinth_export_metrics_context,
            $crate::bindings::metrics_context::exports::plinth::plugin::metrics_context::Guest
        );
    };
}
