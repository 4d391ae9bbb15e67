//! The traits a plugin implements, one per plugin kind.

use crate::{
    Config, HealthReport, HostSnapshot, MirrorEvent, MirrorTarget, ModelRef, Models, NestedEvent,
    RequestEvent, RequestInfo, Result, RouteDecision, Tensor,
};

/// What every plugin implements: how to build it from its configuration.
///
/// The host builds one value per WebAssembly instance and keeps it across
/// calls, so fields are a plugin's state. A trap (a panic, say) throws the
/// instance away; the next call builds a fresh value.
pub trait Plugin: Sized + 'static {
    /// Builds the plugin from the operator's configuration. An error makes
    /// the host refuse the plugin and report the message, so check the
    /// configuration here rather than on every call.
    fn init(config: &Config) -> Result<Self>;
}

/// A plugin that chooses the model and version that serve a request.
///
/// Export it with [`export_router!`](crate::export_router).
pub trait Router: Plugin {
    /// Chooses where `req` goes. `candidates` lists every model with a ready
    /// version, each with its ready versions oldest to newest.
    fn route(&mut self, req: &RequestInfo, candidates: &[ModelRef]) -> Result<RouteDecision>;
}

/// A plugin that transforms tensors before or after a model.
///
/// Both functions return their input unchanged unless overridden, so a
/// preprocessor implements only `preprocess` and a postprocessor only
/// `postprocess`. Export it with
/// [`export_processor!`](crate::export_processor).
pub trait Processor: Plugin {
    /// Transforms the request's input tensors before the model runs.
    fn preprocess(&mut self, req: &RequestInfo, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let _ = req;
        Ok(inputs)
    }

    /// Transforms the model's output tensors before they go to the client.
    fn postprocess(&mut self, req: &RequestInfo, outputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let _ = req;
        Ok(outputs)
    }
}

/// A plugin that keeps request metrics and renders them for Prometheus.
///
/// Export it with [`export_metrics!`](crate::export_metrics).
pub trait Metrics: Plugin {
    /// Takes a batch of finished requests, oldest first.
    fn record(&mut self, events: Vec<RequestEvent>);

    /// Renders the metrics in the Prometheus text exposition format.
    fn render(&self) -> String;

    /// Serialises the state that should survive a hot reload. The default
    /// keeps nothing.
    fn save_state(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Replaces the state with one that `save_state` returned, possibly in
    /// an older version of the plugin. The default ignores it.
    fn restore_state(&mut self, state: &[u8]) -> Result<()> {
        let _ = state;
        Ok(())
    }
}

/// A plugin that judges the host's readiness.
///
/// Export it with [`export_health!`](crate::export_health).
pub trait Health: Plugin {
    /// Judges the host's health from `snapshot`.
    fn check(&mut self, snapshot: &HostSnapshot) -> HealthReport;
}

/// A plugin served as a model, which answers a request by calling other
/// models: in sequence, conditionally, or several times.
///
/// A repository entry whose `config.toml` says `orchestrator = "<plugin>"`
/// is served under its own name and answered by `run`. Export it with
/// [`export_orchestrator!`](crate::export_orchestrator).
pub trait Orchestrator: Plugin {
    /// Answers `req`. `inputs` are the client's tensors, already checked
    /// against the entry's declared inputs; the result must match its
    /// declared outputs. `models` calls the host's models.
    fn run(
        &mut self,
        req: &RequestInfo,
        inputs: Vec<Tensor>,
        models: &Models,
    ) -> Result<Vec<Tensor>>;
}

/// A router that also mirrors requests (contract 0.1.1): each routed
/// request also runs on the targets `mirrors` names, off the response path;
/// the client gets the primary's answer only. Export it with
/// [`export_mirroring_router!`](crate::export_mirroring_router).
pub trait MirroringRouter: Router {
    /// Where `req`, which `primary` serves, also runs. Called after
    /// `route`, on the request path: keep it cheap.
    fn mirrors(&mut self, req: &RequestInfo, primary: &RouteDecision) -> Result<Vec<MirrorTarget>>;
}

/// A metrics plugin that also hears of mirrored runs and of the calls
/// orchestrators make (contract 0.1.1). Both have empty defaults: implement
/// what the plugin counts. Export it with
/// [`export_metrics_context!`](crate::export_metrics_context).
pub trait MetricsContext: Metrics {
    /// Takes a batch of mirrored runs, oldest first.
    fn record_mirrors(&mut self, events: Vec<MirrorEvent>) {
        let _ = events;
    }

    /// Takes a batch of nested calls, oldest first. Their events also came
    /// through [`Metrics::record`]; these add the parent request.
    fn record_nested(&mut self, events: Vec<NestedEvent>) {
        let _ = events;
    }
}
