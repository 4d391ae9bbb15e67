//! `--poll`: watches the model repository and loads, reloads or unloads the
//! models whose directories change. Bursts of file events are debounced, and
//! a reload keeps the old versions serving until the new ones are ready.

use std::collections::BTreeSet;
use std::time::Duration;

use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer, notify};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::registry::{LoadMode, ModelState, ModelStatus, Registry};

/// Stops watching when dropped.
pub struct RepositoryWatcher {
    _debouncer: Debouncer<notify::RecommendedWatcher>,
    _task: tokio::task::JoinHandle<()>,
}

impl RepositoryWatcher {
    pub fn start(registry: Registry, debounce: Duration) -> notify::Result<RepositoryWatcher> {
        let root = registry.repository().root().to_path_buf();
        // The watcher reports absolute paths; the repository may have been
        // given relative to the working directory (`--model-repository
        // models`). Events are mapped back under the root as given.
        let absolute = root.canonicalize().unwrap_or_else(|_| root.clone());
        let under_root = {
            let root = root.clone();
            move |path: &std::path::Path| -> std::path::PathBuf {
                match path.strip_prefix(&absolute) {
                    Ok(rel) if !path.starts_with(&root) => root.join(rel),
                    _ => path.to_path_buf(),
                }
            }
        };
        let (changed_tx, mut changed_rx) = mpsc::unbounded_channel::<BTreeSet<String>>();
        let repository = registry.repository().clone();
        let changed_tx_for_retry = changed_tx.clone();
        let mut debouncer = new_debouncer(debounce, move |res: DebounceEventResult| match res {
            Ok(events) => {
                let names: BTreeSet<String> = events
                    .iter()
                    .filter_map(|event| repository.model_of(&under_root(&event.path)))
                    .collect();
                if !names.is_empty() {
                    let _ = changed_tx.send(names);
                }
            }
            Err(err) => tracing::warn!(%err, "model repository watch error"),
        })?;
        debouncer
            .watcher()
            .watch(&root, notify::RecursiveMode::Recursive)?;
        let requeue = changed_tx_for_retry;
        let task = tokio::spawn(async move {
            while let Some(names) = changed_rx.recv().await {
                for name in names {
                    apply_change(&registry, &name, &requeue).await;
                }
            }
        });
        Ok(RepositoryWatcher {
            _debouncer: debouncer,
            _task: task,
        })
    }
}

async fn apply_change(
    registry: &Registry,
    name: &str,
    requeue: &mpsc::UnboundedSender<BTreeSet<String>>,
) {
    let repository = registry.repository().clone();
    let owned = name.to_owned();
    let on_disk = tokio::task::spawn_blocking(move || repository.contains(&owned))
        .await
        .unwrap_or(false);
    let status = registry.status(name).ok();
    if status.as_ref().is_some_and(ModelStatus::is_busy) {
        apply_once_settled(registry, name, requeue);
        return;
    }
    let action = match (on_disk, status.map(|s| s.state)) {
        (false, Some(ModelState::Ready)) => {
            tracing::info!(model = name, "model directory removed: unloading");
            registry.unload(name).map(drop)
        }
        (false, _) => {
            registry.forget(name);
            Ok(())
        }
        (true, Some(ModelState::Ready)) => {
            tracing::info!(model = name, "model directory changed: reloading");
            registry.load(name, LoadMode::Reload).await.map(drop)
        }
        (true, _) => {
            tracing::info!(model = name, "model directory appeared or changed: loading");
            registry.register_known(&[name.to_owned()]);
            registry.load(name, LoadMode::Load).await.map(drop)
        }
    };
    match action {
        Ok(()) => {}
        // It became busy since we looked: the change waits for it to settle.
        Err(Error::AlreadyExists { .. } | Error::FailedPrecondition(_)) => {
            apply_once_settled(registry, name, requeue);
        }
        Err(err) => tracing::warn!(model = name, %err, "repository change not applied"),
    }
}

/// A change to a busy model (loading, reloading or unloading) is applied
/// once it settles, so that it is never lost.
fn apply_once_settled(
    registry: &Registry,
    name: &str,
    requeue: &mpsc::UnboundedSender<BTreeSet<String>>,
) {
    tracing::info!(
        model = name,
        "model directory changed while the model is busy; applying once it settles"
    );
    let registry = registry.clone();
    let name = name.to_owned();
    let requeue = requeue.clone();
    tokio::spawn(async move {
        match registry.settled(&name).await {
            Ok(_) | Err(Error::ModelNotFound { .. }) => {
                let _ = requeue.send(BTreeSet::from([name]));
            }
            Err(err) => tracing::warn!(model = name, %err, "repository change not applied"),
        }
    });
}
