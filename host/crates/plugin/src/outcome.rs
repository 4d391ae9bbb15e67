//! How a plugin call ended. A failed call is told apart as the plugin's own
//! error, a timeout, running out of memory or another trap, and turned into
//! the host error a client gets; `describe` and `init` are judged here too.

use std::time::Duration;

use plinth_core::error::Error;
use wasmtime::Store;

use super::bindings::wit;
use super::manifest::Manifest;
use super::state::PluginState;
use super::types::{PluginError, PluginInfo};

/// Why a plugin call failed. The instance is discarded on every variant but
/// `Plugin`, which is the plugin's own, orderly answer.
#[derive(Debug, Clone)]
pub enum CallError {
    /// The plugin returned a `plugin-error`.
    Plugin(PluginError),
    Timeout(Duration),
    OutOfMemory(usize),
    Trap(String),
    /// A new instance could not be made (instantiation or `init` failed).
    Instantiate(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Plugin(err) => write!(f, "{err}"),
            CallError::Timeout(deadline) => {
                write!(f, "exceeded its {} ms deadline", deadline.as_millis())
            }
            CallError::OutOfMemory(cap) => write!(f, "exceeded its {} MiB memory cap", cap >> 20),
            CallError::Trap(msg) => write!(f, "trapped: {msg}"),
            CallError::Instantiate(msg) => write!(f, "could not be instantiated: {msg}"),
        }
    }
}

/// The host error for a failed call, naming the plugin and the cause.
pub(super) fn call_error(plugin: &str, stage: &str, err: CallError) -> Error {
    let what = format!("plugin '{plugin}' ({stage}) {err}");
    match err {
        CallError::Plugin(PluginError::InvalidInput(_)) => Error::InvalidArgument(what),
        CallError::Plugin(PluginError::Unavailable(_)) => Error::Unavailable(what),
        CallError::Plugin(PluginError::Internal(_))
        | CallError::Trap(_)
        | CallError::Instantiate(_) => Error::Internal(what),
        CallError::Timeout(_) => Error::DeadlineExceeded(what),
        CallError::OutOfMemory(_) => Error::ResourceExhausted(what),
    }
}

/// A host function that panicked during a call, as a trap of that call.
pub(super) fn panicked(panic: &(dyn std::any::Any + Send)) -> CallError {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    CallError::Trap(format!(
        "a host function the guest called panicked: {}",
        what.lines().next().unwrap_or_default()
    ))
}

/// What `describe` answered, once its version is known to be semver.
pub(super) fn described(info: wit::PluginInfo) -> Result<PluginInfo, String> {
    semver::Version::parse(&info.version).map_err(|err| {
        format!(
            "describe() gave version {:?}, not semver: {err}",
            info.version
        )
    })?;
    Ok(PluginInfo {
        name: info.name,
        version: info.version,
        description: info.description,
    })
}

/// The outcome of `init` on a fresh instance: on success its size is
/// marked as its baseline; a refusal or a trap makes the instance unusable.
pub(super) fn initialised(
    outcome: wasmtime::Result<Result<(), wit::PluginError>>,
    store: &mut Store<PluginState>,
    manifest: &Manifest,
) -> Result<(), CallError> {
    match outcome {
        Ok(Ok(())) => {
            store.data_mut().memory.mark_baseline();
            Ok(())
        }
        Ok(Err(err)) => Err(CallError::Instantiate(format!(
            "init() refused: {}",
            CallError::Plugin(plugin_error(err))
        ))),
        Err(err) => Err(CallError::Instantiate(format!(
            "init() {}",
            classify(err, store, manifest)
        ))),
    }
}

pub(super) fn plugin_error(err: wit::PluginError) -> PluginError {
    match err {
        wit::PluginError::InvalidInput(msg) => PluginError::InvalidInput(msg),
        wit::PluginError::Unavailable(msg) => PluginError::Unavailable(msg),
        wit::PluginError::Internal(msg) => PluginError::Internal(msg),
    }
}

/// Turns a failed call into the cause a user can act on. Out-of-memory is
/// the limiter's flag, set when it refused a growth during the call.
pub(super) fn classify(
    err: wasmtime::Error,
    store: &Store<PluginState>,
    manifest: &Manifest,
) -> CallError {
    if store.data().memory.refused().is_some() {
        return CallError::OutOfMemory(manifest.memory_bytes);
    }
    if let Some(trap) = err.downcast_ref::<wasmtime::Trap>()
        && *trap == wasmtime::Trap::Interrupt
    {
        return CallError::Timeout(manifest.deadline);
    }
    // The root cause ("wasm `unreachable` instruction executed"), not the
    // backtrace header.
    let cause = err.root_cause().to_string();
    CallError::Trap(cause.lines().next().unwrap_or_default().to_owned())
}

/// The innermost cause of a wasmtime error, without the context wrapped
/// around it.
pub(super) fn root_cause(err: &wasmtime::Error) -> String {
    err.chain()
        .last()
        .map(|cause| cause.to_string())
        .unwrap_or_default()
}
