//! Repository control with Triton's semantics: `repository_load` reloads a
//! ready model and waits for a load already under way rather than starting
//! it twice; `repository_unload` returns once the executors have ended.

use crate::error::Error;
use crate::registry::{LoadMode, ModelState, Registry};

/// Waits until `name` is not busy (`ModelStatus::is_busy`, the registry's
/// one definition) and returns its state then.
async fn settled(registry: &Registry, name: &str) -> Result<ModelState, Error> {
    registry.settled(name).await.map(|status| status.state)
}

/// Loads `name` and returns once it is ready, as Triton's repository load:
/// a model that is already ready is reloaded (the old versions serve until
/// the new ones are ready), and a load already under way is waited for
/// rather than started twice.
pub async fn repository_load(registry: &Registry, name: &str) -> Result<(), Error> {
    let ticket = match registry.load(name, LoadMode::Load).await {
        Ok(ticket) => Some(ticket),
        Err(Error::AlreadyExists {
            state: ModelState::Ready,
            ..
        }) => match registry.load(name, LoadMode::Reload).await {
            Ok(ticket) => Some(ticket),
            Err(Error::AlreadyExists { .. }) => None,
            Err(err) => return Err(err),
        },
        Err(Error::AlreadyExists { .. }) => None,
        Err(err) => return Err(err),
    };
    if let Some(ticket) = ticket {
        return ticket.finished().await.map(drop);
    }
    match settled(registry, name).await? {
        ModelState::Ready => Ok(()),
        _ => {
            let status = registry.status(name)?;
            Err(Error::LoadFailed(format!(
                "model '{name}' did not load: {}",
                status.reason.unwrap_or_else(|| status.state.to_string())
            )))
        }
    }
}

/// Unloads `name` and returns once its executors have ended. Unloading a
/// model that is not loaded succeeds, as Triton's.
pub async fn repository_unload(registry: &Registry, name: &str) -> Result<(), Error> {
    registry.unload(name)?;
    settled(registry, name).await.map(drop)
}
