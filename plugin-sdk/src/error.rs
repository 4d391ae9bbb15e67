//! Helpers on [`PluginError`], the error every plugin call can return.

use crate::PluginError;

impl PluginError {
    /// The request is wrong: a missing tensor, a wrong dtype or shape, a bad
    /// header. The host answers INVALID_ARGUMENT.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        PluginError::InvalidInput(message.into())
    }

    /// The request cannot be served now, or the configuration is unusable.
    /// The host answers UNAVAILABLE.
    pub fn unavailable(message: impl Into<String>) -> Self {
        PluginError::Unavailable(message.into())
    }

    /// A bug or a broken invariant in the plugin. The host answers INTERNAL.
    pub fn internal(message: impl Into<String>) -> Self {
        PluginError::Internal(message.into())
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        match self {
            PluginError::InvalidInput(message)
            | PluginError::Unavailable(message)
            | PluginError::Internal(message) => message,
        }
    }
}
