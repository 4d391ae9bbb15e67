//! `--poll`: watches the model repository and loads, reloads or unloads the
//! models whose directories change. Bursts of file events are debounced, and
//! a reload keeps the old versions serving until the new ones are ready.

use std::collections::BTreeSet;
use std::path::{Component, Path};
use std::time::Duration;

use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer, notify};
use tokio::sync::mpsc;

use crate::registry::{LoadMode, ModelState, Registry};

/// Stops watching when dropped.
pub struct RepositoryWatcher {
    _debouncer: Debouncer<notify::RecommendedWatcher>,
    _task: tokio::task::JoinHandle<()>,
}

impl RepositoryWatcher {
    pub fn start(registry: Registry, debounce: Duration) -> notify::Result<RepositoryWatcher> {
        let root = registry.repository().root().to_path_buf();
        let (changed_tx, mut changed_rx) = mpsc::unbounded_channel::<BTreeSet<String>>();
        let event_root = root.clone();
        let changed_tx_for_retry = changed_tx.clone();
        let mut debouncer = new_debouncer(debounce, move |res: DebounceEventResult| match res {
            Ok(events) => {
                let names: BTreeSet<String> = events
                    .iter()
                    .filter_map(|event| model_of(&event_root, &event.path))
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

/// The model directory a changed path belongs to.
fn model_of(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    match rel.components().next()? {
        Component::Normal(name) => name.to_str().map(str::to_owned),
        _ => None,
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
    let state = registry.status(name).ok().map(|s| s.state);
    let action = match (on_disk, state) {
        (false, Some(ModelState::Ready)) => {
            let res = registry.unload(name).map(|_| ());
            tracing::info!(model = name, "model directory removed: unloading");
            res
        }
        (false, _) => {
            registry.forget(name);
            Ok(())
        }
        (true, Some(ModelState::Ready)) => {
            tracing::info!(model = name, "model directory changed: reloading");
            registry.load(name, LoadMode::Reload).await.map(|_| ())
        }
        (true, Some(ModelState::Loading | ModelState::Unloading)) => {
            // Busy: look again once it settles, so a change is never lost.
            tracing::info!(
                model = name,
                "model directory changed while it is busy; applying once it settles"
            );
            let registry = registry.clone();
            let name = name.to_owned();
            let requeue = requeue.clone();
            let mut events = registry.subscribe();
            tokio::spawn(async move {
                loop {
                    let settled = registry.status(&name).map_or(true, |s| {
                        !matches!(s.state, ModelState::Loading | ModelState::Unloading)
                    });
                    if settled {
                        break;
                    }
                    if events.recv().await.is_err() {
                        return;
                    }
                }
                let _ = requeue.send(BTreeSet::from([name]));
            });
            Ok(())
        }
        (true, _) => {
            tracing::info!(model = name, "model directory appeared or changed: loading");
            registry.register_known(&[name.to_owned()]);
            registry.load(name, LoadMode::Load).await.map(|_| ())
        }
    };
    if let Err(err) = action {
        tracing::warn!(model = name, %err, "repository change not applied");
    }
}
