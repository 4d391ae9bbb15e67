//! On-demand residency and the memory budget. A model whose config says
//! `residency = "on-demand"` is listed but not loaded until a request needs
//! it; with `--memory-budget-mib`, a load that would pass the budget of its
//! device first unloads the least recently used idle on-demand models.
//! Pinned models are never evicted.
//!
//! Sizes are measured, not guessed: a model's memory is the bytes of the
//! tensors its archives hold (`plinth_torch::archive_tensor_bytes`), times
//! its instances. A load reserves its size under the entries lock before
//! step two, so that loads running at once cannot together pass the budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use plinth_core::config::{DeviceSpec, ModelConfig, ModelRepository, Residency};

use super::{LoadFailure, LoadMode, ModelState, ReadyModel, Registry};
use crate::error::Error;

/// What on-demand residency did, for GetInfo and `/metrics`.
#[derive(Debug, Default)]
pub(super) struct ResidencyStats {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    loads: AtomicU64,
    load_us: AtomicU64,
}

/// A snapshot of [`ResidencyStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResidencyCounts {
    /// Requests to an on-demand model that found it loaded.
    pub hits: u64,
    /// Requests to an on-demand model that had to wait for its load (or for
    /// a load another request started).
    pub misses: u64,
    /// Idle on-demand models unloaded to make room under the budget.
    pub evictions: u64,
    /// Loads of on-demand models started by requests, and their summed time
    /// from the request to READY.
    pub on_demand_loads: u64,
    pub on_demand_load_time: Duration,
    /// The budget per device, if any.
    pub budget_bytes: Option<u64>,
}

impl ResidencyStats {
    fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a load of `name` will take: its device and the bytes of the tensors
/// of the versions its policy chooses, times its instances. A version behind
/// something other than a regular file (a pipe) cannot be read twice and is
/// sized only once loaded. Blocking.
pub(super) fn estimate(
    repository: &ModelRepository,
    name: &str,
) -> Result<(DeviceSpec, u64), String> {
    let config = ModelConfig::load(&repository.model_dir(name))?;
    let mut bytes = 0u64;
    if config.orchestrator.is_some() {
        return Ok((config.device, 0));
    }
    for (_, file) in repository.select_versions(name, &config.version_policy)? {
        let regular = std::fs::metadata(&file).is_ok_and(|m| m.is_file());
        if !regular {
            continue;
        }
        bytes += super::load::file_tensor_bytes(&file)? * config.instances as u64;
    }
    Ok((config.device, bytes))
}

/// The residency a model's config asks for; a config that does not read is
/// pinned here, and its load reports the error. Blocking.
pub(super) fn configured_residency(repository: &ModelRepository, name: &str) -> Residency {
    ModelConfig::load(&repository.model_dir(name)).map_or(Residency::Pinned, |c| c.residency)
}

/// How many times a request waits for an on-demand model to settle (a load,
/// or an eviction draining and then a load) before it gives up.
const WAIT_ROUNDS: usize = 4;

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

impl Registry {
    /// Marks `name` pinned or on demand (from its config, before any load).
    pub fn set_residency(&self, name: &str, residency: Residency) {
        if let Some(entry) = self.inner.entries.lock().get_mut(name) {
            entry.residency = residency;
        }
    }

    /// Reads the residency of each of `names` from its config and marks it;
    /// returns the on-demand ones. Blocking.
    pub fn mark_residencies(&self, names: &[String]) -> Vec<String> {
        let repository = &self.inner.settings.repository;
        let mut on_demand = Vec::new();
        for name in names {
            let residency = configured_residency(repository, name);
            self.set_residency(name, residency);
            if residency == Residency::OnDemand {
                on_demand.push(name.clone());
            }
        }
        on_demand
    }

    pub fn residency_counts(&self) -> ResidencyCounts {
        let stats = &self.inner.residency;
        ResidencyCounts {
            hits: stats.hits.load(Ordering::Relaxed),
            misses: stats.misses.load(Ordering::Relaxed),
            evictions: stats.evictions.load(Ordering::Relaxed),
            on_demand_loads: stats.loads.load(Ordering::Relaxed),
            on_demand_load_time: Duration::from_micros(stats.load_us.load(Ordering::Relaxed)),
            budget_bytes: self.inner.settings.memory_budget,
        }
    }

    /// The ready model for a request. An on-demand model that is not loaded
    /// is loaded now (once, however many requests ask at the same time),
    /// and the request waits for it for at most `patience`. One that is
    /// being evicted is waited for, then loaded again.
    pub async fn ready_for_request(
        &self,
        name: &str,
        patience: Option<Duration>,
    ) -> Result<Arc<ReadyModel>, Error> {
        enum Next {
            Load,
            Wait,
        }
        let deadline = patience.map(|p| tokio::time::Instant::now() + p);
        let stats = &self.inner.residency;
        let mut missed = false;
        for _ in 0..WAIT_ROUNDS {
            let next = {
                let mut entries = self.inner.entries.lock();
                let entry = entries.get_mut(name).ok_or_else(|| Error::ModelNotFound {
                    model: name.to_owned(),
                })?;
                let on_demand = entry.residency == Residency::OnDemand;
                match (&entry.serving, entry.state) {
                    (Some(model), ModelState::Ready) => {
                        entry.last_used = Instant::now();
                        if on_demand && !missed {
                            stats.hit();
                        }
                        return Ok(Arc::clone(model));
                    }
                    (_, ModelState::Unavailable) if on_demand => Next::Load,
                    (_, ModelState::Loading | ModelState::Unloading) if on_demand => Next::Wait,
                    (_, state) => {
                        return Err(Error::ModelNotReady {
                            model: name.to_owned(),
                            state,
                            reason: entry.reason.clone(),
                        });
                    }
                }
            };
            if !missed {
                missed = true;
                stats.misses.fetch_add(1, Ordering::Relaxed);
            }
            let mut started = None;
            let mut ticket = None;
            if let Next::Load = next {
                match self.load(name, LoadMode::Load).await {
                    Ok(started_load) => {
                        stats.loads.fetch_add(1, Ordering::Relaxed);
                        started = Some(Instant::now());
                        ticket = Some(started_load);
                        tracing::info!(model = name, "loading on demand for a request");
                    }
                    // Another request started it first, or its eviction
                    // is still draining: wait, then look again.
                    Err(Error::AlreadyExists { .. } | Error::FailedPrecondition(_)) => {}
                    Err(err) => return Err(err),
                }
            }
            // The load this request started tells it why it did not serve:
            // no room in the budget now is UNAVAILABLE for this request
            // (the model is not broken, and the next request tries again).
            let settled = async {
                match ticket {
                    Some(ticket) => match ticket.finished().await {
                        Err(err @ Error::Unavailable(_)) => Err(err),
                        _ => Ok(()),
                    },
                    None => self.settled(name).await.map(|_| ()),
                }
            };
            match deadline {
                None => settled.await?,
                Some(deadline) => tokio::time::timeout_at(deadline, settled)
                    .await
                    .map_err(|_| {
                        Error::DeadlineExceeded(format!(
                            "model '{name}' is loading on demand and was not ready within the request's timeout ({} ms)",
                            patience.unwrap_or_default().as_millis()
                        ))
                    })??,
            };
            if let Some(started) = started {
                let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                stats.load_us.fetch_add(took, Ordering::Relaxed);
            }
        }
        Err(Error::Unavailable(format!(
            "model '{name}' was evicted again each time it loaded for this request ({WAIT_ROUNDS} times): the memory budget is too small for the models in use"
        )))
    }

    /// Before step two of a load of `name` under a budget: reserves its
    /// size on its device, unloading the least recently used idle on-demand
    /// models first if it would not fit, and returns once their executors
    /// have exited and their memory is free. Nothing is unloaded when even
    /// that would not make room: the load is postponed
    /// ([`LoadFailure::NoRoom`]), naming the budget and the sizes.
    ///
    /// Memory still held counts: the models serving, the sizes other loads
    /// reserved, and the models whose unload is draining. Victims are
    /// chosen and their unloads begun under one hold of the entries lock,
    /// so two loads never claim the same victim.
    pub(super) async fn make_room(&self, name: &str) -> Result<(), LoadFailure> {
        let Some(budget) = self.inner.settings.memory_budget else {
            return Ok(());
        };
        let repository = self.inner.settings.repository.clone();
        let owned = name.to_owned();
        let (device, need) = tokio::task::spawn_blocking(move || estimate(&repository, &owned))
            .await
            .map_err(|err| LoadFailure::Broken(format!("sizing the model: {err}")))?
            .map_err(LoadFailure::Broken)?;
        let drains = {
            let mut entries = self.inner.entries.lock();
            let on_device = |m: &ReadyModel| m.config.device == device;
            let mut used = 0u64;
            let mut candidates = Vec::new();
            for (other, entry) in entries.iter() {
                if let Some((reserved_on, bytes)) = entry.reserved
                    && reserved_on == device
                {
                    used += bytes;
                }
                used += entry
                    .draining
                    .iter()
                    .filter(|(_, on, _)| *on == device)
                    .map(|(_, _, bytes)| bytes)
                    .sum::<u64>();
                let Some(model) = entry.serving.as_deref().filter(|m| on_device(m)) else {
                    continue;
                };
                used += model.memory_bytes;
                let idle = model.in_flight() == 0 && model.queue_depth() == 0;
                if other != name
                    && entry.residency == Residency::OnDemand
                    && entry.state == ModelState::Ready
                    && !entry.reloading
                    && idle
                {
                    candidates.push((entry.last_used, other.clone(), model.memory_bytes));
                }
            }
            candidates.sort();
            let mut victims = Vec::new();
            let mut after = used;
            for (_, victim, bytes) in candidates {
                if after + need <= budget {
                    break;
                }
                after -= bytes;
                victims.push(victim);
            }
            if after + need > budget {
                return Err(LoadFailure::NoRoom(format!(
                    "memory budget of {} on {device}: model '{name}' needs {}, and with every idle on-demand model evicted {} would stay in use (pinned, busy, loading or still unloading models); nothing was evicted, a later request tries again",
                    mib(budget),
                    mib(need),
                    mib(after),
                )));
            }
            if let Some(entry) = entries.get_mut(name) {
                entry.reserved = Some((device, need));
            }
            // Begun here, under the same hold of the lock: no other load
            // can pick these victims, and their bytes count as draining.
            let mut drains = Vec::new();
            for victim in victims {
                match self.begin_unload_locked(&mut entries, &victim) {
                    Ok(Some(drain)) => {
                        self.inner
                            .residency
                            .evictions
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(model = %victim, to_load = name, "evicted (least recently used, idle) to stay within the memory budget");
                        drains.push(drain);
                    }
                    Ok(None) => {}
                    Err(err) => tracing::warn!(model = %victim, %err, "eviction refused"),
                }
            }
            drains
        };
        // The load starts once the victims' memory is free: on a GPU,
        // starting before their executors exit would run out of memory.
        let freed: Vec<_> = drains.into_iter().map(|d| self.spawn_drain(d)).collect();
        for done in freed {
            let _ = done.await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::registry::RegistrySettings;
    use crate::registry::ready::test_model_with;

    const UNIT: u64 = 4096;

    /// An on-demand model `name` in `repo` whose archive holds `UNIT`
    /// bytes of tensor storage (all the budget's estimate reads).
    fn on_demand_model(repo: &std::path::Path, name: &str) {
        let dir = repo.join(name);
        std::fs::create_dir_all(dir.join("1")).unwrap();
        std::fs::write(
            dir.join("config.toml"),
            "residency = \"on-demand\"\n[[input]]\nname = \"x\"\ndtype = \"f32\"\nshape = [-1]\n[[output]]\nname = \"y\"\ndtype = \"f32\"\nshape = [-1]\n",
        )
        .unwrap();
        let file = std::fs::File::create(dir.join("1/model.pt")).unwrap();
        let mut zip = zip::ZipWriter::new(file);
        let stored =
            zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file("m/data/0", stored).unwrap();
        zip.write_all(&[0u8; UNIT as usize]).unwrap();
        zip.finish().unwrap();
    }

    /// A ready, idle model of `UNIT` bytes, on demand or pinned.
    fn resident(registry: &Registry, name: &str, residency: &str) {
        let model = test_model_with(
            name,
            &format!("residency = \"{residency}\""),
            &["1"],
            |inputs| Ok(inputs.to_vec()),
        )
        .with_memory_bytes(&[UNIT]);
        registry.insert_ready(model);
        registry.set_residency(
            name,
            if residency == "on-demand" {
                Residency::OnDemand
            } else {
                Residency::Pinned
            },
        );
    }

    /// A victim's bytes count until its executors have exited: a load that
    /// would fit only by ignoring an unload still draining is postponed
    /// (NoRoom), not started. (The budget once stopped counting a victim
    /// the moment its unload began.)
    #[tokio::test]
    async fn memory_of_an_unload_still_draining_counts_against_the_budget() {
        let repo = tempfile::tempdir().unwrap();
        for name in ["new1", "new2"] {
            on_demand_model(repo.path(), name);
        }
        let mut settings = RegistrySettings::new(ModelRepository::new(repo.path()), 1);
        settings.memory_budget = Some(3 * UNIT);
        let registry = Registry::new(settings);
        registry.register_known(&["new1".into(), "new2".into()]);
        resident(&registry, "p", "pinned");
        resident(&registry, "a", "on-demand");
        resident(&registry, "b", "on-demand");
        // `a`'s unload has begun and its executors have not exited yet.
        {
            let mut entries = registry.inner.entries.lock();
            let entry = entries.get_mut("a").unwrap();
            let (model, generation) = entry.begin_unload("a").unwrap().unwrap();
            entry.draining.push((generation, DeviceSpec::Cpu, UNIT));
            // Held, as an executor still running would hold its memory.
            std::mem::forget(model);
        }
        // p, a (draining) and b fill the budget: new1 evicts b, the only
        // idle on-demand model left, and waits for it to drain.
        registry.make_room("new1").await.unwrap();
        assert_eq!(registry.residency_counts().evictions, 1);
        assert_eq!(
            registry.status("b").unwrap().state,
            ModelState::Unavailable,
            "the victim drained before make_room returned"
        );
        // p, a (still draining) and new1's reservation fill it again:
        // nothing is left to evict, so new2 must wait for a later request.
        let err = registry.make_room("new2").await.unwrap_err();
        match err {
            LoadFailure::NoRoom(reason) => assert!(
                reason.contains("on cpu: model 'new2' needs") && reason.contains("still unloading"),
                "{reason}"
            ),
            other => panic!("expected NoRoom, got {other:?}"),
        }
        // Once `a` has drained, there is room.
        registry
            .inner
            .entries
            .lock()
            .get_mut("a")
            .unwrap()
            .draining
            .clear();
        registry.make_room("new2").await.unwrap();
    }

    /// Loads asking at once never claim the same victim: each eviction is
    /// of a different model, and the evictions counted are the unloads
    /// that happened.
    #[tokio::test]
    async fn concurrent_loads_claim_different_victims() {
        let repo = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..4).map(|i| format!("new{i}")).collect();
        for name in &names {
            on_demand_model(repo.path(), name);
        }
        let mut settings = RegistrySettings::new(ModelRepository::new(repo.path()), 1);
        settings.memory_budget = Some(4 * UNIT);
        let registry = Registry::new(settings);
        registry.register_known(&names);
        for victim in ["v0", "v1", "v2", "v3"] {
            resident(&registry, victim, "on-demand");
        }
        let mut changes = registry.subscribe();
        let results = futures::future::join_all(names.iter().map(|n| registry.make_room(n))).await;
        let made = results.iter().filter(|r| r.is_ok()).count();
        let mut unloads = Vec::new();
        while let Ok(change) = changes.try_recv() {
            if change.state == ModelState::Unloading {
                unloads.push(change.name);
            }
        }
        let distinct: std::collections::BTreeSet<&String> = unloads.iter().collect();
        assert_eq!(
            distinct.len(),
            unloads.len(),
            "a victim was claimed twice: {unloads:?}"
        );
        assert_eq!(registry.residency_counts().evictions, unloads.len() as u64);
        assert!(
            made >= 1 && unloads.len() >= made,
            "{results:?} {unloads:?}"
        );
    }
}
