//! Typed calls into each plugin kind: only a world's own calls exist on its
//! `Plugin<K>`. The conversions to and from the WIT types are in
//! `convert.rs`.

use super::bindings::{wit, wit_metrics_context};
use super::convert::{
    event_to_wit, from_wit, health_report_from_wit, micros, request_status_to_wit, snapshot_to_wit,
    to_wit,
};
use super::kind::{Health, Metrics, Processor, Router};
use super::outcome::call_error;
use super::pool::Plugin;
use super::types::{
    HealthReport, HostSnapshot, MirrorEvent, MirrorTarget, ModelChoice, NestedEvent, RequestEvent,
    RequestView, RouteDecision,
};
use plinth_core::error::Error;
use plinth_core::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Pre,
    Post,
}

/// What a router chooses among, converted for the guest once: the host
/// keeps one while the set of ready models stays the same, so a request
/// does not rebuild it.
#[derive(Debug, Default)]
pub struct Candidates(Vec<wit::ModelRef>);

impl Candidates {
    pub fn new<'a>(choices: impl IntoIterator<Item = (&'a str, &'a [String])>) -> Candidates {
        Candidates(
            choices
                .into_iter()
                .map(|(name, versions)| wit::ModelRef {
                    name: name.to_owned(),
                    versions: versions.to_vec(),
                })
                .collect(),
        )
    }
}

impl From<&[ModelChoice]> for Candidates {
    fn from(choices: &[ModelChoice]) -> Candidates {
        Candidates::new(
            choices
                .iter()
                .map(|c| (c.name.as_str(), c.versions.as_slice())),
        )
    }
}

impl Plugin<Processor> {
    /// Runs `preprocess` or `postprocess` over the tensors.
    pub fn process(
        &self,
        stage: Stage,
        request: &RequestView,
        tensors: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, Error> {
        let info = request.to_wit();
        let tensors: Vec<wit::Tensor> = tensors.into_iter().map(to_wit).collect();
        let stage_name = match stage {
            Stage::Pre => "preprocess",
            Stage::Post => "postprocess",
        };
        let out = self
            .call(|exports, store| {
                let processor = exports.base.plinth_plugin_processor();
                match stage {
                    Stage::Pre => processor.call_preprocess(store, &info, &tensors),
                    Stage::Post => processor.call_postprocess(store, &info, &tensors),
                }
            })
            .map_err(|err| call_error(&self.name, stage_name, err))?;
        out.into_iter().map(|t| from_wit(&self.name, t)).collect()
    }
}

impl Plugin<Router> {
    /// Asks the router for a model and version among `candidates`.
    pub fn route(
        &self,
        request: &RequestView,
        candidates: &Candidates,
    ) -> Result<RouteDecision, Error> {
        let info = request.to_wit();
        let decision = self
            .call(|exports, store| {
                exports
                    .base
                    .plinth_plugin_router()
                    .call_route(store, &info, &candidates.0)
            })
            .map_err(|err| call_error(&self.name, "route", err))?;
        Ok(RouteDecision {
            model: decision.model,
            version: decision.version,
        })
    }
}

impl Plugin<Router> {
    /// Whether the router exports `mirror` (0.1.1).
    pub fn mirrors_requests(&self) -> bool {
        self.pre().extra.is_some()
    }

    /// Where `request`, routed to `primary`, also runs: the router's
    /// `mirror` answer, or nothing when it does not export it.
    pub fn mirrors(
        &self,
        request: &RequestView,
        primary: &RouteDecision,
    ) -> Result<Vec<MirrorTarget>, Error> {
        if !self.mirrors_requests() {
            return Ok(Vec::new());
        }
        let info = request.to_wit();
        let primary = wit::RouteDecision {
            model: primary.model.clone(),
            version: primary.version.clone(),
        };
        let targets = self
            .call(|exports, store| match &exports.extra {
                Some(mirror) => mirror.call_mirrors(store, &info, &primary),
                None => Ok(Ok(Vec::new())),
            })
            .map_err(|err| call_error(&self.name, "mirrors", err))?;
        Ok(targets
            .into_iter()
            .map(|t| MirrorTarget {
                model: t.model,
                version: t.version,
                tolerance: t.tolerance,
            })
            .collect())
    }
}

impl Plugin<Metrics> {
    /// Whether the plugin exports `metrics-context` (0.1.1).
    pub fn takes_context(&self) -> bool {
        self.pre().extra.is_some()
    }

    /// Hands orchestrators' nested calls to the plugin, if it takes them.
    pub fn record_nested(&self, events: &[NestedEvent]) -> Result<(), Error> {
        if !self.takes_context() {
            return Ok(());
        }
        let events: Vec<wit_metrics_context::NestedEvent> = events
            .iter()
            .map(|e| wit_metrics_context::NestedEvent {
                parent_id: e.parent_id.clone(),
                parent_model: e.parent_model.clone(),
                depth: e.depth,
                event: event_to_wit(&e.event),
            })
            .collect();
        self.call(|exports, store| match &exports.extra {
            Some(sink) => sink.call_record_nested(store, &events).map(Ok),
            None => Ok(Ok(())),
        })
        .map_err(|err| call_error(&self.name, "record-nested", err))
    }

    /// Hands mirrored runs to the plugin, if it counts them.
    pub fn record_mirrors(&self, events: &[MirrorEvent]) -> Result<(), Error> {
        if !self.takes_context() {
            return Ok(());
        }
        let events: Vec<wit_metrics_context::MirrorEvent> = events
            .iter()
            .map(|e| wit_metrics_context::MirrorEvent {
                primary_model: e.primary_model.clone(),
                primary_version: e.primary_version.clone(),
                model: e.model.clone(),
                version: e.version.clone(),
                status: request_status_to_wit(e.status),
                latency_us: micros(e.latency),
                primary_latency_us: micros(e.primary_latency),
                agree: e.agree,
            })
            .collect();
        self.call(|exports, store| match &exports.extra {
            Some(sink) => sink.call_record_mirrors(store, &events).map(Ok),
            None => Ok(Ok(())),
        })
        .map_err(|err| call_error(&self.name, "record-mirrors", err))
    }

    pub fn record(&self, events: &[RequestEvent]) -> Result<(), Error> {
        let events: Vec<wit::RequestEvent> = events.iter().map(event_to_wit).collect();
        self.call(|exports, store| {
            exports
                .base
                .plinth_plugin_metrics()
                .call_record(store, &events)
                .map(Ok)
        })
        .map_err(|err| call_error(&self.name, "record", err))
    }

    pub fn render(&self) -> Result<String, Error> {
        self.call(|exports, store| {
            exports
                .base
                .plinth_plugin_metrics()
                .call_render(store)
                .map(Ok)
        })
        .map_err(|err| call_error(&self.name, "render", err))
    }

    /// Moves this plugin's state into `next`, its replacement. A failure
    /// leaves `next` fresh and is only logged: losing counters must not stop
    /// a reload.
    pub fn hand_state_to(&self, next: &Plugin<Metrics>) {
        let saved = self.call_idle(|exports, store| {
            exports.base.plinth_plugin_metrics().call_save_state(store)
        });
        let state = match saved {
            // No warm instance (the last one trapped): no state to hand over.
            None => return,
            Some(Ok(state)) => state,
            Some(Err(err)) => {
                tracing::warn!(plugin = %self.name, %err, "save-state failed; the new version starts fresh");
                return;
            }
        };
        let restored = next.call(|exports, store| {
            exports
                .base
                .plinth_plugin_metrics()
                .call_restore_state(store, &state)
        });
        match restored {
            Ok(()) => {
                tracing::info!(plugin = %self.name, bytes = state.len(), "metrics state handed to the new version")
            }
            Err(err) => {
                tracing::warn!(plugin = %self.name, error = %err, "restore-state failed; the new version starts fresh")
            }
        }
    }
}

impl Plugin<Health> {
    pub fn check(&self, snapshot: &HostSnapshot) -> Result<HealthReport, Error> {
        let snapshot = snapshot_to_wit(snapshot);
        self.call(|exports, store| {
            exports
                .base
                .plinth_plugin_health()
                .call_check(store, &snapshot)
                .map(Ok)
        })
        .map(health_report_from_wit)
        .map_err(|err| call_error(&self.name, "check", err))
    }
}
