//! Calls from an orchestrator into the host's models.

use crate::{PluginError, Tensor};

pub use crate::bindings::orchestrator::plinth::plugin::models::InferError;

/// The host's models, as an [`Orchestrator`](crate::Orchestrator) sees
/// them. Each call runs as a client request would, with routing left out:
/// the model's preprocess plugins, the model, its postprocess plugins and its
/// statistics. While the model runs, the host gives the thread to other
/// requests; the plugin's deadline does not count that time.
///
/// `Models::default()` is for unit tests: outside WebAssembly there is no
/// host, and every call answers [`InferError::Unavailable`].
#[derive(Debug, Default)]
pub struct Models {
    _private: (),
}

impl Models {
    /// The handle the SDK passes to `run`.
    pub(crate) const fn new() -> Models {
        Models { _private: () }
    }

    /// Runs `inputs` through the newest ready version of `model`.
    pub fn infer(&self, model: &str, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, InferError> {
        self.infer_version(model, "", inputs)
    }

    /// Runs `inputs` through `version` of `model` (empty: the newest ready
    /// version).
    pub fn infer_version(
        &self,
        model: &str,
        version: &str,
        inputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, InferError> {
        infer(model, version, inputs)
    }
}

#[cfg(target_arch = "wasm32")]
fn infer(model: &str, version: &str, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, InferError> {
    crate::bindings::orchestrator::plinth::plugin::models::infer(model, version, &inputs)
}

/// Natively there is no host: unit tests of an orchestrator call its own
/// functions, and a call to a model says so.
#[cfg(not(target_arch = "wasm32"))]
fn infer(model: &str, _version: &str, _inputs: Vec<Tensor>) -> Result<Vec<Tensor>, InferError> {
    Err(InferError::Unavailable(format!(
        "model '{model}': no host to call outside WebAssembly"
    )))
}

impl InferError {
    /// The host's message.
    pub fn message(&self) -> &str {
        match self {
            InferError::NotFound(m)
            | InferError::InvalidInput(m)
            | InferError::Unavailable(m)
            | InferError::DeadlineExceeded(m)
            | InferError::TooDeep(m)
            | InferError::Internal(m) => m,
        }
    }
}

/// A failed model call fails the orchestrator's request with the nearest
/// status: bad inputs stay the client's fault, a model that is not ready
/// or out of time is unavailable, and the rest (a missing model, calls too
/// deep, a failing model) is the orchestrator's.
impl From<InferError> for PluginError {
    fn from(err: InferError) -> PluginError {
        match err {
            InferError::InvalidInput(m) => PluginError::InvalidInput(m),
            InferError::Unavailable(m) | InferError::DeadlineExceeded(m) => {
                PluginError::Unavailable(m)
            }
            InferError::NotFound(m) | InferError::TooDeep(m) | InferError::Internal(m) => {
                PluginError::Internal(m)
            }
        }
    }
}
