//! Typed calls into each plugin kind, and the conversions between Plinth's
//! `Tensor` and the WIT tensor.

use bytes::Bytes;

use super::bindings::wit;
use super::runtime::{CallError, Exports, Plugin, PluginKind};
use crate::error::Error;
use crate::tensor::{DType, Tensor};

pub fn dtype_to_wit(dtype: DType) -> wit::Dtype {
    match dtype {
        DType::Bool => wit::Dtype::Bool,
        DType::U8 => wit::Dtype::U8,
        DType::U16 => wit::Dtype::U16,
        DType::U32 => wit::Dtype::U32,
        DType::U64 => wit::Dtype::U64,
        DType::I8 => wit::Dtype::I8,
        DType::I16 => wit::Dtype::I16,
        DType::I32 => wit::Dtype::I32,
        DType::I64 => wit::Dtype::I64,
        DType::F16 => wit::Dtype::F16,
        DType::BF16 => wit::Dtype::Bf16,
        DType::F32 => wit::Dtype::F32,
        DType::F64 => wit::Dtype::F64,
        DType::Bytes => wit::Dtype::Bytes,
    }
}

pub fn dtype_from_wit(dtype: wit::Dtype) -> DType {
    match dtype {
        wit::Dtype::Bool => DType::Bool,
        wit::Dtype::U8 => DType::U8,
        wit::Dtype::U16 => DType::U16,
        wit::Dtype::U32 => DType::U32,
        wit::Dtype::U64 => DType::U64,
        wit::Dtype::I8 => DType::I8,
        wit::Dtype::I16 => DType::I16,
        wit::Dtype::I32 => DType::I32,
        wit::Dtype::I64 => DType::I64,
        wit::Dtype::F16 => DType::F16,
        wit::Dtype::Bf16 => DType::BF16,
        wit::Dtype::F32 => DType::F32,
        wit::Dtype::F64 => DType::F64,
        wit::Dtype::Bytes => DType::Bytes,
    }
}

fn to_wit(tensor: Tensor) -> wit::Tensor {
    wit::Tensor {
        name: tensor.name().to_owned(),
        dtype: dtype_to_wit(tensor.dtype()),
        shape: tensor.shape().to_vec(),
        data: tensor.into_data().to_vec(),
    }
}

/// A plugin's output is checked like any client input, and blamed on the plugin.
fn from_wit(plugin: &str, tensor: wit::Tensor) -> Result<Tensor, Error> {
    Tensor::new(
        tensor.name,
        dtype_from_wit(tensor.dtype),
        tensor.shape,
        Bytes::from(tensor.data),
    )
    .map_err(|err| {
        Error::Internal(format!(
            "plugin '{plugin}' returned a malformed tensor: {err}"
        ))
    })
}

/// The host error for a failed call, naming the plugin and the cause.
pub fn call_error(plugin: &str, stage: &str, err: CallError) -> Error {
    let what = format!("plugin '{plugin}' ({stage}) {err}");
    match err {
        CallError::Plugin(wit::PluginError::InvalidInput(_)) => Error::InvalidArgument(what),
        CallError::Plugin(wit::PluginError::Unavailable(_)) => Error::Unavailable(what),
        CallError::Plugin(wit::PluginError::Internal(_))
        | CallError::Trap(_)
        | CallError::Instantiate(_) => Error::Internal(what),
        CallError::Timeout(_) => Error::DeadlineExceeded(what),
        CallError::OutOfMemory(_) => Error::ResourceExhausted(what),
    }
}

fn wrong_kind(plugin: &Plugin, want: PluginKind) -> Error {
    Error::FailedPrecondition(format!(
        "plugin '{}' implements {}, not {}",
        plugin.name,
        plugin.kind.world(),
        want.world()
    ))
}

/// The request as a plugin sees it.
#[derive(Debug, Clone, Default)]
pub struct RequestView {
    pub id: String,
    pub model: String,
    pub version: Option<String>,
    pub metadata: Vec<(String, String)>,
}

impl RequestView {
    fn to_wit(&self) -> wit::RequestInfo {
        wit::RequestInfo {
            id: self.id.clone(),
            model: self.model.clone(),
            version: self.version.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Pre,
    Post,
}

impl Plugin {
    /// Runs `preprocess` or `postprocess` over the tensors.
    pub fn process(
        &self,
        stage: Stage,
        request: &RequestView,
        tensors: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, Error> {
        if self.kind != PluginKind::Processor {
            return Err(wrong_kind(self, PluginKind::Processor));
        }
        let info = request.to_wit();
        let tensors: Vec<wit::Tensor> = tensors.into_iter().map(to_wit).collect();
        let stage_name = match stage {
            Stage::Pre => "preprocess",
            Stage::Post => "postprocess",
        };
        let out = self
            .call(|instance| {
                let Exports::Processor(exports) = &instance.exports else {
                    unreachable!("kind checked above");
                };
                let processor = exports.plinth_plugin_processor();
                match stage {
                    Stage::Pre => processor.call_preprocess(&mut instance.store, &info, &tensors),
                    Stage::Post => processor.call_postprocess(&mut instance.store, &info, &tensors),
                }
            })
            .map_err(|err| call_error(&self.name, stage_name, err))?;
        out.into_iter().map(|t| from_wit(&self.name, t)).collect()
    }

    /// Asks the router for a model and version.
    pub fn route(
        &self,
        request: &RequestView,
        candidates: &[wit::ModelRef],
    ) -> Result<wit::RouteDecision, Error> {
        if self.kind != PluginKind::Router {
            return Err(wrong_kind(self, PluginKind::Router));
        }
        let info = request.to_wit();
        self.call(|instance| {
            let Exports::Router(exports) = &instance.exports else {
                unreachable!("kind checked above");
            };
            exports
                .plinth_plugin_router()
                .call_route(&mut instance.store, &info, candidates)
        })
        .map_err(|err| call_error(&self.name, "route", err))
    }

    pub fn record(&self, events: &[wit::RequestEvent]) -> Result<(), Error> {
        if self.kind != PluginKind::Metrics {
            return Err(wrong_kind(self, PluginKind::Metrics));
        }
        self.call(|instance| {
            let Exports::Metrics(exports) = &instance.exports else {
                unreachable!("kind checked above");
            };
            exports
                .plinth_plugin_metrics()
                .call_record(&mut instance.store, events)
                .map(Ok)
        })
        .map_err(|err| call_error(&self.name, "record", err))
    }

    pub fn render(&self) -> Result<String, Error> {
        if self.kind != PluginKind::Metrics {
            return Err(wrong_kind(self, PluginKind::Metrics));
        }
        self.call(|instance| {
            let Exports::Metrics(exports) = &instance.exports else {
                unreachable!("kind checked above");
            };
            exports
                .plinth_plugin_metrics()
                .call_render(&mut instance.store)
                .map(Ok)
        })
        .map_err(|err| call_error(&self.name, "render", err))
    }

    pub fn check(&self, snapshot: &wit::HostSnapshot) -> Result<wit::HealthReport, Error> {
        if self.kind != PluginKind::Health {
            return Err(wrong_kind(self, PluginKind::Health));
        }
        self.call(|instance| {
            let Exports::Health(exports) = &instance.exports else {
                unreachable!("kind checked above");
            };
            exports
                .plinth_plugin_health()
                .call_check(&mut instance.store, snapshot)
                .map(Ok)
        })
        .map_err(|err| call_error(&self.name, "check", err))
    }

    /// Moves a metrics plugin's state into `next`, its replacement. A failure
    /// leaves `next` fresh and is only logged: losing counters must not stop
    /// a reload.
    pub fn hand_state_to(&self, next: &Plugin) {
        if self.kind != PluginKind::Metrics || next.kind != PluginKind::Metrics {
            return;
        }
        let Some(mut old) = self.take_instance() else {
            return;
        };
        self.arm_instance(&mut old);
        let saved = match &old.exports {
            Exports::Metrics(exports) => exports
                .plinth_plugin_metrics()
                .call_save_state(&mut old.store),
            _ => return,
        };
        self.put_instance(old);
        let state = match saved {
            Ok(state) => state,
            Err(err) => {
                tracing::warn!(plugin = %self.name, %err, "save-state failed; the new version starts fresh");
                return;
            }
        };
        let restored = next.call(|instance| match &instance.exports {
            Exports::Metrics(exports) => exports
                .plinth_plugin_metrics()
                .call_restore_state(&mut instance.store, &state),
            _ => Ok(Ok(())),
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
