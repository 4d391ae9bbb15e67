//! Logging through the host.
//!
//! Messages go to the host's log, tagged with the plugin's name. Outside
//! WebAssembly (in a plugin's native unit tests) they go to standard error.

use crate::LogLevel;

/// Writes `message` to the host's log at `level`.
pub fn log(level: LogLevel, message: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::bindings::common::plinth::plugin::host::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[{}] {message}", level_name(level));
}

/// Writes `message` at the trace level.
pub fn trace(message: &str) {
    log(LogLevel::Trace, message);
}

/// Writes `message` at the debug level.
pub fn debug(message: &str) {
    log(LogLevel::Debug, message);
}

/// Writes `message` at the info level.
pub fn info(message: &str) {
    log(LogLevel::Info, message);
}

/// Writes `message` at the warn level.
pub fn warn(message: &str) {
    log(LogLevel::Warn, message);
}

/// Writes `message` at the error level.
pub fn error(message: &str) {
    log(LogLevel::Error, message);
}

#[cfg(not(target_arch = "wasm32"))]
fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Trace => "trace",
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
    }
}
