//! Orchestrator entries: a model served by a plugin that calls other
//! models through this pipeline (`ModelCaller`), bounded by the client's
//! deadline and the call depth, its outputs checked against the entry's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::types::{Nesting, Pipeline, PipelineRequest};
use crate::error::Error;
use crate::plugin::{BoxFuture, ModelCaller, NestedCall, RequestView, RunContext};
use crate::registry::ReadyModel;
use crate::telemetry::{Origin, SpanScope};
use crate::tensor::Tensor;

impl Pipeline {
    /// Answers a request to an orchestrator entry: its inputs checked
    /// against the entry's, its plugin run with this pipeline as the way to
    /// the models, and what the plugin returns checked against the entry's
    /// outputs. The request's deadline is the client's (`timeout`, else
    /// `grpc-timeout`), else the entry's `request_timeout_ms`; a nested one
    /// keeps its parent's.
    pub(super) async fn orchestrate(
        &self,
        model: &ReadyModel,
        view: &RequestView,
        inputs: Vec<Tensor>,
        timeout: Option<Duration>,
        nested: Option<Nesting>,
        span: Option<&SpanScope>,
    ) -> Result<Vec<Tensor>, Error> {
        let plugin = model.config.orchestrator.as_deref().ok_or_else(|| {
            Error::Internal(format!("model '{}' has no orchestrator", model.name))
        })?;
        model.pick_version(view.version.as_deref())?;
        let orchestrator = self
            .inner
            .plugins
            .get(plugin)
            .ok_or_else(|| {
                Error::Unavailable(if self.inner.plugins.is_compiling(plugin) {
                    format!(
                        "model '{}': orchestrator plugin '{plugin}' is compiling; it serves once loaded",
                        model.name
                    )
                } else {
                    format!(
                        "model '{}': orchestrator plugin '{plugin}' is not loaded (no {plugin}.wasm in the plugin directory)",
                        model.name
                    )
                })
            })?
            .into_orchestrator()
            .map_err(|err| err.with_model(&model.name))?;
        let inputs = model.arrange_inputs(inputs)?;
        let (depth, deadline) = match nested {
            Some(nesting) => (nesting.depth, nesting.deadline),
            None => {
                let budget = timeout.unwrap_or(model.config.request_timeout);
                (
                    0,
                    plinth_core::deadline::deadline_after(Instant::now(), budget),
                )
            }
        };
        let context = RunContext {
            caller: Arc::new(NestedCaller {
                pipeline: self.clone(),
                // Untraced calls stay untraced: the client's request was
                // not sampled, or tracing is off.
                trace: span.map_or(Origin::Untraced, |span| Origin::ChildOf(span.context())),
            }),
            depth,
            max_depth: self.inner.max_call_depth,
            deadline,
        };
        let outputs = orchestrator.run(view, inputs, context).await?;
        declared_outputs(model, plugin, outputs)
    }
}

/// What an orchestrator returned, checked against its entry's declared
/// outputs and put in their order. A mismatch is the plugin's fault.
fn declared_outputs(
    model: &ReadyModel,
    plugin: &str,
    mut outputs: Vec<Tensor>,
) -> Result<Vec<Tensor>, Error> {
    let config = &model.config;
    let blame = |what: String| {
        Error::Internal(format!(
            "model '{}': orchestrator plugin '{plugin}' {what}",
            model.name
        ))
    };
    if let Some(extra) = outputs
        .iter()
        .find(|t| !config.outputs.iter().any(|spec| spec.name == t.name()))
    {
        return Err(blame(format!(
            "returned an undeclared output '{}' (declared: {})",
            extra.name(),
            config
                .outputs
                .iter()
                .map(|spec| spec.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut ordered = Vec::with_capacity(config.outputs.len());
    for spec in &config.outputs {
        let Some(pos) = outputs.iter().position(|t| t.name() == spec.name) else {
            return Err(blame(format!("returned no output '{}'", spec.name)));
        };
        let tensor = outputs.swap_remove(pos);
        plinth_torch::check_output(&tensor, spec, &config.full_shape(spec)).map_err(blame)?;
        ordered.push(tensor);
    }
    Ok(ordered)
}

/// The way one orchestrator run calls models: a nested request through the
/// whole pipeline but the router, bounded by the client's deadline, its
/// span a child of the run's.
struct NestedCaller {
    pipeline: Pipeline,
    trace: Origin,
}

impl ModelCaller for NestedCaller {
    fn infer(&self, call: NestedCall) -> BoxFuture<Result<Vec<Tensor>, Error>> {
        let pipeline = self.pipeline.clone();
        let trace = self.trace.clone();
        Box::pin(async move {
            let left = call.deadline.saturating_duration_since(Instant::now());
            let model = call.model.clone();
            let ran_out = || {
                Error::DeadlineExceeded(format!(
                    "model '{model}': the request's time ran out before the orchestrator's call to it finished"
                ))
            };
            if left.is_zero() {
                return Err(ran_out());
            }
            let request = PipelineRequest {
                id: call.parent.id.clone(),
                model: call.model,
                version: call.version,
                inputs: call.inputs,
                metadata: call.parent.metadata.clone(),
                timeout: Some(left),
                nested: Some(Nesting {
                    depth: call.depth,
                    deadline: call.deadline,
                    parent: Some((call.parent.id.clone(), call.parent.model.clone())),
                }),
                protocol: "orchestrator",
                trace,
            };
            match tokio::time::timeout(left, pipeline.infer(request)).await {
                Ok(answer) => answer
                    .map(|response| response.outputs)
                    .map_err(|err| err.with_model(&model)),
                Err(_) => Err(ran_out()),
            }
        })
    }
}
