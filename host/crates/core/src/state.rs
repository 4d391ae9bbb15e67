//! A model's lifecycle state, as the registry keeps it and every API reports it.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelState {
    /// In the repository, not loaded.
    Unavailable,
    Loading,
    Ready,
    Unloading,
    /// The last load failed; the reason is kept and a new load may be tried.
    Failed,
}

impl fmt::Display for ModelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelState::Unavailable => "UNAVAILABLE",
            ModelState::Loading => "LOADING",
            ModelState::Ready => "READY",
            ModelState::Unloading => "UNLOADING",
            ModelState::Failed => "FAILED",
        })
    }
}
