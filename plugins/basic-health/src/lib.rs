//! Readiness from model states, error rates and device memory.
//!
//! The verdict is the worst of:
//!
//! - **not-ready** while a required model has no ready version (the message
//!   names it, with the failure reason when its load failed);
//! - **degraded** when, since the previous check, a model version or a
//!   plugin failed more than `max-error-rate` of at least `min-requests`
//!   requests or calls;
//! - **degraded** when a device uses more than `max-memory-fraction` of its
//!   memory.
//!
//! Configuration:
//!
//! - `models`: comma-separated required models, each `name` (any version)
//!   or `name@version` (that version). Unset means at least one model
//!   version must be ready, whichever it is.
//! - `max-error-rate`: fraction between 0 and 1. Default `0.05`.
//! - `min-requests`: fewest requests (or plugin calls) in the window for the
//!   rate to count. Default `20`.
//! - `max-memory-fraction`: fraction between 0 and 1. Default `0.95`.
//!
//! The window is the time since the previous check of this instance; the
//! first check of an instance looks at the counts since the host started.

use std::collections::BTreeMap;

use plinth_plugin_sdk::prelude::*;
use plinth_plugin_sdk::{ModelState, ModelStatus};

struct BasicHealth {
    required: Option<Vec<Requirement>>,
    max_error_rate: f64,
    min_requests: u64,
    max_memory_fraction: f64,
    /// Cumulative (requests, failures) per `model@version` at the previous
    /// check.
    previous_models: BTreeMap<String, (u64, u64)>,
    /// Cumulative (calls, errors) per plugin name at the previous check.
    previous_plugins: BTreeMap<String, (u64, u64)>,
}

/// A model that must have a ready version.
#[derive(Debug, PartialEq)]
struct Requirement {
    model: String,
    version: Option<String>,
}

impl Plugin for BasicHealth {
    fn init(config: &Config) -> Result<Self> {
        let required = config.parse_list::<String>("models")?.map(|entries| {
            entries
                .iter()
                .map(|entry| Requirement::parse(entry))
                .collect()
        });
        let max_error_rate = fraction(config, "max-error-rate", 0.05)?;
        let max_memory_fraction = fraction(config, "max-memory-fraction", 0.95)?;
        Ok(BasicHealth {
            required,
            max_error_rate,
            min_requests: config.parse_or("min-requests", 20)?,
            max_memory_fraction,
            previous_models: BTreeMap::new(),
            previous_plugins: BTreeMap::new(),
        })
    }
}

impl Health for BasicHealth {
    fn check(&mut self, snapshot: &HostSnapshot) -> HealthReport {
        let not_ready = self.readiness_problems(&snapshot.models);
        let mut degraded = self.error_rate_problems(snapshot);
        degraded.extend(self.memory_problems(snapshot));
        let (status, problems) = if !not_ready.is_empty() {
            (HealthStatus::NotReady, not_ready)
        } else if !degraded.is_empty() {
            (HealthStatus::Degraded, degraded)
        } else {
            (HealthStatus::Ready, Vec::new())
        };
        HealthReport {
            status,
            message: problems.join("; "),
        }
    }
}

impl BasicHealth {
    fn readiness_problems(&self, models: &[ModelStatus]) -> Vec<String> {
        let is_ready = |status: &&ModelStatus| status.state == ModelState::Ready;
        let Some(required) = &self.required else {
            if models.iter().any(|status| is_ready(&status)) {
                return Vec::new();
            }
            return vec!["no model version is ready".to_owned()];
        };
        let mut problems = Vec::new();
        for requirement in required {
            let matching: Vec<&ModelStatus> = models
                .iter()
                .filter(|status| requirement.matches(status))
                .collect();
            if matching.iter().any(is_ready) {
                continue;
            }
            let states: Vec<String> = matching
                .iter()
                .map(|status| format!("{} is {}", status.version, state_text(&status.state)))
                .collect();
            let detail = if states.is_empty() {
                "not loaded".to_owned()
            } else {
                states.join(", ")
            };
            problems.push(format!(
                "model `{}` not ready: {detail}",
                requirement.label()
            ));
        }
        problems
    }

    fn error_rate_problems(&mut self, snapshot: &HostSnapshot) -> Vec<String> {
        let mut problems = Vec::new();
        let mut current_models = BTreeMap::new();
        for status in &snapshot.models {
            let key = format!("{}@{}", status.name, status.version);
            let counts = (status.requests, status.failures);
            let window = window(self.previous_models.get(&key), counts);
            if let Some(rate) = self.excessive_rate(window) {
                problems.push(format!(
                    "model `{key}`: {:.1}% of {} requests failed",
                    rate * 100.0,
                    window.0
                ));
            }
            current_models.insert(key, counts);
        }
        let mut current_plugins = BTreeMap::new();
        for plugin in &snapshot.plugins {
            let counts = (plugin.calls, plugin.errors);
            let window = window(self.previous_plugins.get(&plugin.name), counts);
            if let Some(rate) = self.excessive_rate(window) {
                problems.push(format!(
                    "plugin `{}`: {:.1}% of {} calls failed",
                    plugin.name,
                    rate * 100.0,
                    window.0
                ));
            }
            current_plugins.insert(plugin.name.clone(), counts);
        }
        self.previous_models = current_models;
        self.previous_plugins = current_plugins;
        problems
    }

    /// The failure rate of `(total, failed)` when it counts and is too high.
    fn excessive_rate(&self, (total, failed): (u64, u64)) -> Option<f64> {
        if total == 0 || total < self.min_requests {
            return None;
        }
        let rate = failed as f64 / total as f64;
        (rate > self.max_error_rate).then_some(rate)
    }

    fn memory_problems(&self, snapshot: &HostSnapshot) -> Vec<String> {
        snapshot
            .devices
            .iter()
            .filter(|device| device.total_bytes > 0)
            .filter_map(|device| {
                let used = device.used_bytes as f64 / device.total_bytes as f64;
                (used > self.max_memory_fraction).then(|| {
                    format!(
                        "device `{}`: {:.1}% of memory in use",
                        device.device,
                        used * 100.0
                    )
                })
            })
            .collect()
    }
}

impl Requirement {
    fn parse(entry: &str) -> Requirement {
        match entry.split_once('@') {
            Some((model, version)) => Requirement {
                model: model.trim().to_owned(),
                version: Some(version.trim().to_owned()),
            },
            None => Requirement {
                model: entry.to_owned(),
                version: None,
            },
        }
    }

    fn matches(&self, status: &ModelStatus) -> bool {
        status.name == self.model
            && self
                .version
                .as_ref()
                .is_none_or(|version| &status.version == version)
    }

    fn label(&self) -> String {
        match &self.version {
            Some(version) => format!("{}@{version}", self.model),
            None => self.model.clone(),
        }
    }
}

/// Counts since the previous check; when the counters went down (the
/// version was reloaded and they restarted), counts since the restart.
fn window(previous: Option<&(u64, u64)>, current: (u64, u64)) -> (u64, u64) {
    match previous {
        Some(&(total, failed)) if total <= current.0 && failed <= current.1 => {
            (current.0 - total, current.1 - failed)
        }
        _ => current,
    }
}

fn state_text(state: &ModelState) -> String {
    match state {
        ModelState::Loading => "loading".to_owned(),
        ModelState::Ready => "ready".to_owned(),
        ModelState::Unloading => "unloading".to_owned(),
        ModelState::Failed(reason) => format!("failed ({reason})"),
    }
}

fn fraction(config: &Config, key: &str, default: f64) -> Result<f64> {
    let value: f64 = config.parse_or(key, default)?;
    if !(0.0..=1.0).contains(&value) {
        return Err(PluginError::unavailable(format!(
            "config key `{key}`: must be between 0 and 1, got {value}"
        )));
    }
    Ok(value)
}

export_health!(BasicHealth);

#[cfg(test)]
mod tests {
    use plinth_plugin_sdk::{DeviceMemory, PluginKind, PluginStatus};

    use super::*;

    fn plugin(pairs: &[(&str, &str)]) -> BasicHealth {
        BasicHealth::init(&Config::from_pairs(pairs.iter().copied())).unwrap()
    }

    fn model(
        name: &str,
        version: &str,
        state: ModelState,
        requests: u64,
        failures: u64,
    ) -> ModelStatus {
        ModelStatus {
            name: name.to_owned(),
            version: version.to_owned(),
            state,
            queue_depth: 0,
            in_flight: 0,
            requests,
            failures,
        }
    }

    fn snapshot(models: Vec<ModelStatus>) -> HostSnapshot {
        HostSnapshot {
            uptime_ms: 1,
            models,
            plugins: Vec::new(),
            devices: Vec::new(),
        }
    }

    #[test]
    fn not_ready_until_required_models_are_ready() {
        let mut health = plugin(&[("models", "a, b@2")]);
        let report = health.check(&snapshot(vec![
            model("a", "1", ModelState::Loading, 0, 0),
            model("b", "1", ModelState::Ready, 0, 0),
            model("b", "2", ModelState::Failed("bad weights".to_owned()), 0, 0),
        ]));
        assert_eq!(report.status, HealthStatus::NotReady);
        assert_eq!(
            report.message,
            "model `a` not ready: 1 is loading; model `b@2` not ready: 2 is failed (bad weights)"
        );
        let report = health.check(&snapshot(vec![
            model("a", "1", ModelState::Ready, 0, 0),
            model("b", "2", ModelState::Ready, 0, 0),
        ]));
        assert_eq!(report.status, HealthStatus::Ready);
        assert_eq!(report.message, "");
        let report = health.check(&snapshot(vec![]));
        assert_eq!(
            report.message,
            "model `a` not ready: not loaded; model `b@2` not ready: not loaded"
        );
    }

    #[test]
    fn without_models_config_any_ready_version_will_do() {
        let mut health = plugin(&[]);
        assert_eq!(
            health.check(&snapshot(vec![])).status,
            HealthStatus::NotReady
        );
        let ready = snapshot(vec![model("x", "1", ModelState::Ready, 0, 0)]);
        assert_eq!(health.check(&ready).status, HealthStatus::Ready);
    }

    #[test]
    fn degraded_on_error_rate_within_the_window() {
        let mut health = plugin(&[("max-error-rate", "0.1"), ("min-requests", "10")]);
        let ready = |requests, failures| {
            snapshot(vec![model("m", "1", ModelState::Ready, requests, failures)])
        };
        assert_eq!(health.check(&ready(100, 5)).status, HealthStatus::Ready);
        // 20 more requests, 5 of them failed: 25% in this window.
        let report = health.check(&ready(120, 10));
        assert_eq!(report.status, HealthStatus::Degraded);
        assert_eq!(report.message, "model `m@1`: 25.0% of 20 requests failed");
        // Too few requests to judge.
        assert_eq!(health.check(&ready(125, 15)).status, HealthStatus::Ready);
        // Counters restarted after a reload: the window is since the restart.
        assert_eq!(health.check(&ready(50, 1)).status, HealthStatus::Ready);
    }

    #[test]
    fn degraded_on_plugin_errors_and_memory() {
        let mut health = plugin(&[("min-requests", "1")]);
        let mut snapshot = snapshot(vec![model("m", "1", ModelState::Ready, 0, 0)]);
        snapshot.plugins.push(PluginStatus {
            name: "softmax-topk".to_owned(),
            version: "0.1.0".to_owned(),
            kind: PluginKind::Processor,
            calls: 10,
            errors: 5,
        });
        snapshot.devices.push(DeviceMemory {
            device: "cuda:0".to_owned(),
            used_bytes: 99,
            total_bytes: 100,
        });
        let report = health.check(&snapshot);
        assert_eq!(report.status, HealthStatus::Degraded);
        assert_eq!(
            report.message,
            "plugin `softmax-topk`: 50.0% of 10 calls failed; device `cuda:0`: 99.0% of memory in use"
        );
    }

    #[test]
    fn bad_config_is_refused() {
        let err = BasicHealth::init(&Config::from_pairs([("max-error-rate", "5")]))
            .err()
            .unwrap();
        assert_eq!(
            err.message(),
            "config key `max-error-rate`: must be between 0 and 1, got 5"
        );
    }
}
