//! The host's error type. The edges map it to gRPC and HTTP status codes in
//! one place each (`grpc::status`, `http`); nothing else knows about codes.

use crate::state::ModelState;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("model '{model}' is not in the model repository")]
    ModelNotFound { model: String },

    #[error("model '{model}' has no ready version '{version}' (ready: {available})")]
    VersionNotFound {
        model: String,
        version: String,
        available: String,
    },

    #[error("model '{model}' is {state}{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    ModelNotReady {
        model: String,
        state: ModelState,
        reason: Option<String>,
    },

    /// Something other than a model is missing (a plugin, say).
    #[error("{0}")]
    NotFound(String),

    #[error("model '{model}' is already {state}")]
    AlreadyExists { model: String, state: ModelState },

    /// A load was refused or failed: bad config, corrupt file, validation.
    #[error("{0}")]
    LoadFailed(String),

    #[error("{0}")]
    InvalidArgument(String),

    #[error("{0}")]
    FailedPrecondition(String),

    #[error("{0}")]
    ResourceExhausted(String),

    #[error("{0}")]
    Unavailable(String),

    #[error("{0}")]
    DeadlineExceeded(String),

    #[error("request cancelled")]
    Cancelled,

    #[error("internal error: {0}")]
    Internal(String),
}
