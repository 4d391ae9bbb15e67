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

    /// Something other than a model already exists under that name (a
    /// shared-memory region, say).
    #[error("{0}")]
    Conflict(String),

    /// A call this server does not serve (yet), with why.
    #[error("{0}")]
    Unimplemented(String),

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

impl Error {
    /// The gRPC code's name this error answers with (`grpc::status` maps
    /// the same way), for traces and logs.
    pub fn code_name(&self) -> &'static str {
        match self {
            Error::ModelNotFound { .. } | Error::VersionNotFound { .. } | Error::NotFound(_) => {
                "NOT_FOUND"
            }
            Error::ModelNotReady { .. } | Error::Unavailable(_) => "UNAVAILABLE",
            Error::AlreadyExists { .. } | Error::Conflict(_) => "ALREADY_EXISTS",
            Error::Unimplemented(_) => "UNIMPLEMENTED",
            Error::LoadFailed(_) | Error::FailedPrecondition(_) => "FAILED_PRECONDITION",
            Error::InvalidArgument(_) => "INVALID_ARGUMENT",
            Error::ResourceExhausted(_) => "RESOURCE_EXHAUSTED",
            Error::DeadlineExceeded(_) => "DEADLINE_EXCEEDED",
            Error::Cancelled => "CANCELLED",
            Error::Internal(_) => "INTERNAL",
        }
    }

    /// This error with the model named, for errors raised before anything
    /// knew the model (a tensor that did not decode, say). Errors that name
    /// it already are left alone.
    pub fn with_model(self, model: &str) -> Error {
        let named = |message: String| {
            if model.is_empty()
                || message.contains(&format!("model '{model}'"))
                || message.contains(&format!("model '{model}:"))
            {
                message
            } else {
                format!("model '{model}': {message}")
            }
        };
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(named(m)),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(named(m)),
            Error::ResourceExhausted(m) => Error::ResourceExhausted(named(m)),
            Error::Unavailable(m) => Error::Unavailable(named(m)),
            Error::DeadlineExceeded(m) => Error::DeadlineExceeded(named(m)),
            Error::LoadFailed(m) => Error::LoadFailed(named(m)),
            Error::NotFound(m) => Error::NotFound(named(m)),
            Error::Conflict(m) => Error::Conflict(named(m)),
            Error::Unimplemented(m) => Error::Unimplemented(named(m)),
            Error::Internal(m) => Error::Internal(named(m)),
            named_already @ (Error::ModelNotFound { .. }
            | Error::VersionNotFound { .. }
            | Error::ModelNotReady { .. }
            | Error::AlreadyExists { .. }
            | Error::Cancelled) => named_already,
        }
    }
}
