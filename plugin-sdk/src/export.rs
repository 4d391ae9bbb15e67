//! Glue between the traits and the generated bindings. Used by the
//! `export_*!` macros only; not a stable API.

use std::any::Any;
use std::cell::RefCell;
use std::sync::Once;

use crate::bindings::{health, metrics, metrics_context, mirror, orchestrator, processor, router};
use crate::{
    Config, Health, HealthReport, HealthStatus, HostSnapshot, Metrics, MetricsContext, MirrorEvent,
    MirrorTarget, MirroringRouter, ModelRef, Models, NestedEvent, Orchestrator, Plugin,
    PluginError, PluginInfo, Processor, RequestEvent, RequestInfo, Result, RouteDecision, Router,
    Tensor,
};

/// Implemented by the `export_*!` macros on a type private to the plugin
/// crate, so that the plugin crate's Cargo metadata describes the plugin.
pub trait Export: 'static {
    /// The plugin type.
    type Plugin: Plugin;

    /// The plugin's description, from its Cargo metadata.
    fn info() -> PluginInfo;
}

/// Builds a [`PluginInfo`]; called by the macros with `env!` values.
pub fn info(name: &str, version: &str, description: &str) -> PluginInfo {
    PluginInfo {
        name: name.to_owned(),
        version: version.to_owned(),
        description: description.to_owned(),
    }
}

/// The one plugin value of this instance. A component holds exactly one
/// plugin, so one slot is enough; `Any` lets the slot live in this crate
/// while the type lives in the plugin crate.
enum Instance {
    Empty,
    Ready(Box<dyn Any>),
    Failed(PluginError),
}

thread_local! {
    static INSTANCE: RefCell<Instance> = const { RefCell::new(Instance::Empty) };
}

/// Sends panic messages to the host log before the panic traps the
/// instance, so the operator sees why a plugin trapped without the plugin
/// being granted stderr.
fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|panic| {
            let message = panic.payload_as_str().unwrap_or("(no message)");
            let message = match panic.location() {
                Some(location) => format!("plugin panicked at {location}: {message}"),
                None => format!("plugin panicked: {message}"),
            };
            crate::log::error(&message);
        }));
    });
}

fn build<P: Plugin>() -> Instance {
    install_panic_hook();
    match P::init(&Config::host()) {
        Ok(plugin) => Instance::Ready(Box::new(plugin)),
        Err(err) => Instance::Failed(err),
    }
}

/// Builds the plugin from the host configuration, replacing any previous
/// value.
fn init<P: Plugin>() -> Result<()> {
    INSTANCE.with_borrow_mut(|instance| {
        *instance = build::<P>();
        match instance {
            Instance::Failed(err) => Err(err.clone()),
            _ => Ok(()),
        }
    })
}

/// Runs `f` on the plugin, building it first if the host did not call
/// `init`. An error when building failed.
fn with_plugin<P: Plugin, R>(f: impl FnOnce(&mut P) -> R) -> Result<R> {
    INSTANCE.with_borrow_mut(|instance| {
        if matches!(instance, Instance::Empty) {
            *instance = build::<P>();
        }
        match instance {
            Instance::Ready(plugin) => plugin.downcast_mut::<P>().map(f).ok_or_else(|| {
                PluginError::internal("plugin instance has an unexpected type (SDK bug)")
            }),
            Instance::Failed(err) => Err(err.clone()),
            Instance::Empty => Err(PluginError::internal("plugin was not built (SDK bug)")),
        }
    })
}

fn init_failed(err: &PluginError) -> String {
    format!("plugin failed to initialise: {}", err.message())
}

macro_rules! world_guest {
    ($world:ident, $bound:ident) => {
        impl<E: Export> $world::Guest for E
        where
            E::Plugin: $bound,
        {
            fn describe() -> PluginInfo {
                E::info()
            }

            fn init() -> Result<()> {
                init::<E::Plugin>()
            }
        }
    };
}

world_guest!(router, Router);
world_guest!(processor, Processor);
world_guest!(metrics, Metrics);
world_guest!(health, Health);
world_guest!(orchestrator, Orchestrator);

impl<E: Export> router::exports::plinth::plugin::router::Guest for E
where
    E::Plugin: Router,
{
    fn route(req: RequestInfo, candidates: Vec<ModelRef>) -> Result<RouteDecision> {
        with_plugin(|plugin: &mut E::Plugin| plugin.route(&req, &candidates))?
    }
}

impl<E: Export> processor::exports::plinth::plugin::processor::Guest for E
where
    E::Plugin: Processor,
{
    fn preprocess(req: RequestInfo, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        with_plugin(|plugin: &mut E::Plugin| plugin.preprocess(&req, inputs))?
    }

    fn postprocess(req: RequestInfo, outputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        with_plugin(|plugin: &mut E::Plugin| plugin.postprocess(&req, outputs))?
    }
}

impl<E: Export> metrics::exports::plinth::plugin::metrics::Guest for E
where
    E::Plugin: Metrics,
{
    fn record(events: Vec<RequestEvent>) {
        // A plugin that failed to build has already reported why from
        // `init`; dropping events here keeps the request path quiet.
        let _ = with_plugin(|plugin: &mut E::Plugin| plugin.record(events));
    }

    fn render() -> String {
        with_plugin(|plugin: &mut E::Plugin| plugin.render())
            .unwrap_or_else(|err| format!("# {}\n", init_failed(&err).replace('\n', " ")))
    }

    fn save_state() -> Vec<u8> {
        with_plugin(|plugin: &mut E::Plugin| plugin.save_state()).unwrap_or_default()
    }

    fn restore_state(state: Vec<u8>) -> Result<()> {
        with_plugin(|plugin: &mut E::Plugin| plugin.restore_state(&state))?
    }
}

impl<E: Export> health::exports::plinth::plugin::health::Guest for E
where
    E::Plugin: Health,
{
    fn check(snapshot: HostSnapshot) -> HealthReport {
        with_plugin(|plugin: &mut E::Plugin| plugin.check(&snapshot)).unwrap_or_else(|err| {
            HealthReport {
                status: HealthStatus::NotReady,
                message: init_failed(&err),
            }
        })
    }
}

impl<E: Export> orchestrator::exports::plinth::plugin::orchestrator::Guest for E
where
    E::Plugin: Orchestrator,
{
    fn run(req: RequestInfo, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        // The plugin stays borrowed while it waits for the models it calls:
        // the host runs one call at a time on an instance.
        with_plugin(|plugin: &mut E::Plugin| plugin.run(&req, inputs, &Models::new()))?
    }
}

impl<E: Export> mirror::exports::plinth::plugin::mirror::Guest for E
where
    E::Plugin: MirroringRouter,
{
    fn mirrors(req: RequestInfo, primary: RouteDecision) -> Result<Vec<MirrorTarget>> {
        with_plugin(|plugin: &mut E::Plugin| plugin.mirrors(&req, &primary))?
    }
}

impl<E: Export> metrics_context::exports::plinth::plugin::metrics_context::Guest for E
where
    E::Plugin: MetricsContext,
{
    fn record_mirrors(events: Vec<MirrorEvent>) {
        let _ = with_plugin(|plugin: &mut E::Plugin| plugin.record_mirrors(events));
    }

    fn record_nested(events: Vec<NestedEvent>) {
        let _ = with_plugin(|plugin: &mut E::Plugin| plugin.record_nested(events));
    }
}
