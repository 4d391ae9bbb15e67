//! One model's entry and its state machine. Every transition of a load or an
//! unload is a method here: a few field writes, run under the registry's
//! lock, never any I/O. The registry (`mod.rs`) does the rest: the lock, the
//! broadcast, the tasks.
//!
//! ```text
//!              begin_load                 finish_load(Ok)
//! UNAVAILABLE ───────────▶ LOADING ─────────────────────▶ READY ──┐
//! FAILED      ◀──────────────┘ finish_load(Err)             │  ▲  │ begin_load(Reload):
//!    ▲                                          begin_unload │  └──┘ READY + reloading
//!    └── (a new load may be tried)   UNAVAILABLE ◀── UNLOADING ◀┘ finish_unload
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::ready::ReadyModel;
use super::{LoadMode, ModelStatus};
use crate::config::{DeviceSpec, Residency};
use crate::error::Error;
use crate::registry::ModelState;

pub(super) struct Entry {
    pub(super) state: ModelState,
    pub(super) reason: Option<String>,
    since: SystemTime,
    load_duration: Option<Duration>,
    pub(super) serving: Option<Arc<ReadyModel>>,
    /// READY, with a replacement loading while the current versions serve.
    pub(super) reloading: bool,
    /// Bumped by every load and unload, so a finishing task only touches the
    /// entry it started from.
    generation: u64,
    /// Pinned, or loaded on demand and evictable (from its config).
    pub(super) residency: Residency,
    /// When a request last took the serving model: the eviction order.
    pub(super) last_used: Instant,
    /// The size a load under way reserved on its device (the budget).
    pub(super) reserved: Option<(DeviceSpec, u64)>,
    /// Unloads whose executors have not exited yet (generation, device,
    /// bytes): their memory is not free, so the budget still counts it.
    pub(super) draining: Vec<(u64, DeviceSpec, u64)>,
}

/// Why a load did not produce a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum LoadFailure {
    /// The model is broken (its config, its archive, its warm-up): FAILED
    /// until someone loads it again.
    Broken(String),
    /// The memory budget has no room for it now (the other models are
    /// pinned or busy at this instant). Not a broken model: the entry goes
    /// back to UNAVAILABLE, and the next request tries again.
    NoRoom(String),
}

/// What step three did.
pub(super) struct LoadFinished {
    pub(super) outcome: Result<(), Error>,
    /// The versions a reload replaced: dropped outside the lock, they go when
    /// their last in-flight request finishes.
    pub(super) replaced: Option<Arc<ReadyModel>>,
}

impl Entry {
    pub(super) fn new() -> Entry {
        Entry {
            state: ModelState::Unavailable,
            reason: None,
            since: SystemTime::now(),
            load_duration: None,
            serving: None,
            reloading: false,
            generation: 0,
            residency: Residency::Pinned,
            last_used: Instant::now(),
            reserved: None,
            draining: Vec::new(),
        }
    }

    fn enter(&mut self, state: ModelState) {
        self.state = state;
        self.since = SystemTime::now();
    }

    pub(super) fn status(&self, name: &str) -> ModelStatus {
        let serving = self.serving.as_deref();
        ModelStatus {
            name: name.to_owned(),
            state: self.state,
            reason: self.reason.clone(),
            since: self.since,
            load_duration: self.load_duration,
            versions: serving.map(ReadyModel::version_labels).unwrap_or_default(),
            formats: serving.map(ReadyModel::version_formats).unwrap_or_default(),
            device: serving.map(|m| m.config.device.to_string()),
            in_flight: serving.map_or(0, ReadyModel::in_flight),
            reloading: self.reloading,
            memory_bytes: serving.map_or(0, |m| m.memory_bytes),
            on_demand: self.residency == Residency::OnDemand,
        }
    }

    /// Step one of a load: the placeholder. Returns the load's generation.
    pub(super) fn begin_load(&mut self, name: &str, mode: LoadMode) -> Result<u64, Error> {
        let already = |state| Error::AlreadyExists {
            model: name.to_owned(),
            state,
        };
        match (self.state, mode) {
            (ModelState::Loading, _) => return Err(already(ModelState::Loading)),
            (ModelState::Ready, LoadMode::Load) => return Err(already(ModelState::Ready)),
            (ModelState::Ready, LoadMode::Reload) if self.reloading => {
                return Err(already(ModelState::Loading));
            }
            (ModelState::Unloading, _) => {
                return Err(Error::FailedPrecondition(format!(
                    "model '{name}' is UNLOADING; load it again once it is UNAVAILABLE"
                )));
            }
            (ModelState::Ready, LoadMode::Reload) => self.reloading = true,
            (ModelState::Unavailable | ModelState::Failed, _) => {
                self.enter(ModelState::Loading);
                self.reason = None;
            }
        }
        self.generation += 1;
        Ok(self.generation)
    }

    /// Step three of a load: the swap. `None` when the load was superseded
    /// (an unload or another load started since), and the entry is left alone.
    pub(super) fn finish_load(
        &mut self,
        generation: u64,
        loaded: Result<ReadyModel, LoadFailure>,
        elapsed: Duration,
    ) -> Option<LoadFinished> {
        if self.generation != generation {
            return None;
        }
        let reloading = std::mem::take(&mut self.reloading);
        let mut replaced = None;
        let outcome = match loaded {
            Ok(model) => {
                replaced = self.serving.replace(Arc::new(model));
                self.enter(ModelState::Ready);
                self.reason = None;
                self.load_duration = Some(elapsed);
                Ok(())
            }
            Err(LoadFailure::Broken(reason)) if reloading => {
                self.reason = Some(format!(
                    "reload failed, previous versions keep serving: {reason}"
                ));
                Err(Error::LoadFailed(reason))
            }
            Err(LoadFailure::NoRoom(reason)) if reloading => {
                self.reason = Some(format!(
                    "reload postponed, previous versions keep serving: {reason}"
                ));
                Err(Error::Unavailable(reason))
            }
            Err(LoadFailure::Broken(reason)) => {
                self.enter(ModelState::Failed);
                self.reason = Some(reason.clone());
                self.load_duration = Some(elapsed);
                Err(Error::LoadFailed(reason))
            }
            Err(LoadFailure::NoRoom(reason)) => {
                self.enter(ModelState::Unavailable);
                self.reason = Some(reason.clone());
                Err(Error::Unavailable(reason))
            }
        };
        Some(LoadFinished { outcome, replaced })
    }

    /// The first half of an unload: takes the serving model out (the caller
    /// drops it outside the lock) and returns the unload's generation.
    /// `Ok(None)` when there is nothing to unload.
    pub(super) fn begin_unload(
        &mut self,
        name: &str,
    ) -> Result<Option<(Arc<ReadyModel>, u64)>, Error> {
        match self.state {
            ModelState::Ready => {}
            ModelState::Loading => {
                return Err(Error::FailedPrecondition(format!(
                    "model '{name}' is LOADING; unload it once the load finishes"
                )));
            }
            // Already on its way out, or not loaded: nothing to do.
            ModelState::Unloading | ModelState::Unavailable | ModelState::Failed => {
                return Ok(None);
            }
        }
        let Some(model) = self.serving.take() else {
            return Err(Error::Internal(format!(
                "model '{name}' is READY without a serving model"
            )));
        };
        self.enter(ModelState::Unloading);
        self.reloading = false;
        self.generation += 1;
        Ok(Some((model, self.generation)))
    }

    /// The second half, once every executor has ended. False when another
    /// load or unload has taken over the entry since.
    pub(super) fn finish_unload(&mut self, generation: u64) -> bool {
        if self.generation != generation || self.state != ModelState::Unloading {
            return false;
        }
        self.enter(ModelState::Unavailable);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ready::test_model;

    /// One step of a scenario.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        Load(LoadMode),
        /// Finish the newest load, with a model or with a failure.
        LoadOk,
        LoadErr,
        /// Finish a load that an earlier generation started.
        StaleLoadOk,
        Unload,
        UnloadDone,
        StaleUnloadDone,
    }

    fn render(entry: &Entry) -> String {
        let mut text = entry.state.to_string();
        if entry.reloading {
            text.push_str(" reloading");
        }
        if let Some(model) = &entry.serving {
            text.push_str(&format!(" serving={}", model.version_labels().join(",")));
        }
        if let Some(reason) = &entry.reason {
            text.push_str(&format!(" reason={reason:?}"));
        }
        text
    }

    fn apply(entry: &mut Entry, step: Step) -> String {
        let name = "m";
        let newest = entry.generation;
        match step {
            Step::Load(mode) => match entry.begin_load(name, mode) {
                Ok(_) => "ok".into(),
                Err(err) => format!("err: {err}"),
            },
            Step::LoadOk | Step::LoadErr | Step::StaleLoadOk => {
                let generation = if matches!(step, Step::StaleLoadOk) {
                    newest - 1
                } else {
                    newest
                };
                let loaded = match step {
                    Step::LoadErr => Err(LoadFailure::Broken("corrupt file".to_owned())),
                    _ => Ok(test_model(name, &["1"], |inputs| Ok(inputs.to_vec()))),
                };
                match entry.finish_load(generation, loaded, Duration::ZERO) {
                    None => "superseded".into(),
                    Some(LoadFinished {
                        outcome: Ok(()),
                        replaced,
                    }) => {
                        format!("ok replaced={}", replaced.is_some())
                    }
                    Some(LoadFinished {
                        outcome: Err(err), ..
                    }) => format!("err: {err}"),
                }
            }
            Step::Unload => match entry.begin_unload(name) {
                Ok(Some(_)) => "ok".into(),
                Ok(None) => "nothing to unload".into(),
                Err(err) => format!("err: {err}"),
            },
            Step::UnloadDone => entry.finish_unload(newest).to_string(),
            Step::StaleUnloadDone => entry.finish_unload(newest - 1).to_string(),
        }
    }

    /// Runs `steps` on a new entry; the last step's answer and the entry after it.
    fn check(steps: &[Step], expect: &str) {
        let mut entry = Entry::new();
        let mut answer = String::new();
        for step in steps {
            answer = apply(&mut entry, *step);
        }
        assert_eq!(
            format!("{answer} => {}", render(&entry)),
            expect,
            "steps: {steps:?}"
        );
    }

    use Step::*;

    const LOAD: Step = Step::Load(LoadMode::Load);
    const RELOAD: Step = Step::Load(LoadMode::Reload);

    #[test]
    fn loads() {
        check(&[LOAD], "ok => LOADING");
        check(&[LOAD, LoadOk], "ok replaced=false => READY serving=1");
        check(
            &[LOAD, LoadErr],
            "err: corrupt file => FAILED reason=\"corrupt file\"",
        );
        check(&[LOAD, LoadErr, LOAD], "ok => LOADING");
        check(
            &[LOAD, LOAD],
            "err: model 'm' is already LOADING => LOADING",
        );
        check(
            &[LOAD, LoadOk, LOAD],
            "err: model 'm' is already READY => READY serving=1",
        );
        check(&[RELOAD], "ok => LOADING");
    }

    #[test]
    fn reloads_keep_serving() {
        check(&[LOAD, LoadOk, RELOAD], "ok => READY reloading serving=1");
        check(
            &[LOAD, LoadOk, RELOAD, RELOAD],
            "err: model 'm' is already LOADING => READY reloading serving=1",
        );
        check(
            &[LOAD, LoadOk, RELOAD, LoadOk],
            "ok replaced=true => READY serving=1",
        );
        check(
            &[LOAD, LoadOk, RELOAD, LoadErr],
            "err: corrupt file => READY serving=1 reason=\"reload failed, previous versions keep serving: corrupt file\"",
        );
    }

    #[test]
    fn unloads() {
        check(&[Unload], "nothing to unload => UNAVAILABLE");
        check(
            &[LOAD, Unload],
            "err: model 'm' is LOADING; unload it once the load finishes => LOADING",
        );
        check(&[LOAD, LoadOk, Unload], "ok => UNLOADING");
        check(
            &[LOAD, LoadOk, Unload, Unload],
            "nothing to unload => UNLOADING",
        );
        check(&[LOAD, LoadOk, Unload, UnloadDone], "true => UNAVAILABLE");
        check(
            &[LOAD, LoadOk, Unload, LOAD],
            "err: model 'm' is UNLOADING; load it again once it is UNAVAILABLE => UNLOADING",
        );
        // An unload during a reload ends the reload.
        check(&[LOAD, LoadOk, RELOAD, Unload], "ok => UNLOADING");
    }

    #[test]
    fn a_finishing_task_only_touches_its_own_generation() {
        // The reload was overtaken by an unload: its result is dropped.
        check(
            &[LOAD, LoadOk, RELOAD, Unload, StaleLoadOk],
            "superseded => UNLOADING",
        );
        // An unload overtaken by a new load does not turn it UNAVAILABLE.
        check(
            &[LOAD, LoadOk, Unload, UnloadDone, LOAD, StaleUnloadDone],
            "false => LOADING",
        );
    }

    /// "No room now" is not a broken model: UNAVAILABLE with the reason,
    /// loadable again; a broken archive is FAILED. A reload that finds no
    /// room keeps the serving versions.
    #[test]
    fn no_room_leaves_the_model_unavailable_not_failed() {
        let mut entry = Entry::new();
        let generation = entry.begin_load("m", LoadMode::Load).unwrap();
        let finished = entry
            .finish_load(
                generation,
                Err(LoadFailure::NoRoom("memory budget of 1.0 MiB".into())),
                Duration::ZERO,
            )
            .unwrap();
        assert!(matches!(finished.outcome, Err(Error::Unavailable(ref m)) if m.contains("budget")));
        assert_eq!(entry.state, ModelState::Unavailable);
        assert_eq!(entry.reason.as_deref(), Some("memory budget of 1.0 MiB"));
        // The next load may start.
        let generation = entry.begin_load("m", LoadMode::Load).unwrap();
        let finished = entry
            .finish_load(
                generation,
                Err(LoadFailure::Broken("not a zip archive".into())),
                Duration::ZERO,
            )
            .unwrap();
        assert!(matches!(finished.outcome, Err(Error::LoadFailed(_))));
        assert_eq!(entry.state, ModelState::Failed);
    }
}
