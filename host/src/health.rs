//! Readiness. Health plugins run on a timer and whenever a model changes
//! state, fed a snapshot of the host; the verdict is cached, so a probe reads
//! it without waiting on a load or a plugin. The host is ready once its
//! startup loads have finished and, with strict readiness (the default, as
//! Triton's), every model loaded at startup is READY: a FAILED or still
//! loading one holds readiness back, named in the verdict. Health plugins
//! may judge more strictly still.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::plugin::{
    DeviceMemory, HealthStatus, HostSnapshot, ModelPhase, ModelStatus, PluginHost, kind,
};
use crate::registry::{ModelState, Registry};

/// How often health plugins re-judge the host when nothing changes.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Serving, but a health plugin reports trouble.
    Degraded,
    NotReady,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub readiness: Readiness,
    pub message: String,
}

/// The cached verdict, read by the probes.
#[derive(Debug)]
pub struct Health {
    verdict: ArcSwap<Verdict>,
    startup_done: AtomicBool,
    /// Set by [`Health::begin_drain`]: not ready from then on, whatever
    /// the plugins say.
    draining: AtomicBool,
    /// Wakes the monitor to judge again now.
    wake: Notify,
    /// Whether the models loaded at startup must all be READY.
    strict: bool,
    /// The models the startup asked to load (pinned ones, not on demand).
    startup_models: parking_lot::Mutex<Vec<String>>,
}

impl Default for Health {
    fn default() -> Health {
        Health::new(true)
    }
}

impl Health {
    /// Not ready until the startup loads finish; `strict`: nor while a
    /// model loaded at startup is not READY.
    pub fn new(strict: bool) -> Health {
        Health {
            verdict: ArcSwap::from_pointee(Verdict {
                readiness: Readiness::NotReady,
                message: "startup loads in progress".into(),
            }),
            startup_done: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            wake: Notify::new(),
            strict,
            startup_models: parking_lot::Mutex::new(Vec::new()),
        }
    }
}

impl Health {
    pub fn verdict(&self) -> Arc<Verdict> {
        if self.is_draining() {
            return Arc::new(draining());
        }
        self.verdict.load_full()
    }

    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.verdict.load().readiness != Readiness::NotReady
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The server is going away: readiness turns off now (probes answer
    /// 503, `grpc.health.v1` NOT_SERVING once the monitor has run), so load
    /// balancers stop sending before the drain starts.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.verdict.store(Arc::new(draining()));
        self.wake.notify_one();
    }

    /// The startup loads of `models` have finished: readiness may turn on,
    /// and the monitor judges again at once rather than at its next tick.
    pub fn startup_finished(&self, models: Vec<String>) {
        *self.startup_models.lock() = models;
        self.startup_done.store(true, Ordering::Release);
        // A permit is kept if the monitor is busy judging, so the wake is
        // never lost.
        self.wake.notify_one();
    }
}

/// Builds the snapshot health plugins judge. Cheap: one pass under the
/// registry lock, plus /proc/meminfo for the CPU device.
fn snapshot(registry: &Registry, plugins: &PluginHost, started: Instant) -> HostSnapshot {
    let models = registry
        .health_rows()
        .into_iter()
        .filter_map(|row| {
            let phase = match row.state {
                ModelState::Loading => ModelPhase::Loading,
                ModelState::Ready => ModelPhase::Ready,
                ModelState::Unloading => ModelPhase::Unloading,
                ModelState::Failed => ModelPhase::Failed(row.reason.unwrap_or_default()),
                ModelState::Unavailable => return None,
            };
            Some(ModelStatus {
                name: row.name,
                version: row.version.unwrap_or_default(),
                phase,
                queue_depth: u32::try_from(row.queue_depth).unwrap_or(u32::MAX),
                in_flight: u32::try_from(row.in_flight).unwrap_or(u32::MAX),
                requests: row.requests,
                failures: row.failures,
            })
        })
        .collect();
    let plugin_rows = plugins
        .list()
        .into_iter()
        .filter_map(|report| report.plugin)
        .map(|plugin| plugin.status())
        .collect();
    HostSnapshot {
        uptime: started.elapsed(),
        models,
        plugins: plugin_rows,
        devices: cpu_memory().into_iter().collect(),
    }
}

/// Host memory in use and in total, from /proc/meminfo. Blocking (a tiny read).
pub(crate) fn cpu_memory() -> Option<DeviceMemory> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|kib| kib * 1024)
    };
    let total = field("MemTotal:")?;
    let available = field("MemAvailable:")?;
    Some(DeviceMemory {
        device: "cpu".into(),
        used_bytes: total.saturating_sub(available),
        total_bytes: total,
    })
}

/// The process as /proc sees it; zeros where there is no /proc.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProcessCounters {
    pub rss_bytes: u64,
    pub open_fds: u64,
    pub threads: u64,
}

/// Reads the process's resident memory, descriptors and threads. With
/// `trim_allocator`, glibc's allocator first returns the free memory it
/// keeps for reuse, so that the figure is what is really held. Blocking:
/// call it off the async workers.
pub(crate) fn process_counters(trim_allocator: bool) -> ProcessCounters {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if trim_allocator {
        // SAFETY: malloc_trim takes a pad size and only walks glibc's own
        // arenas under their locks; it is safe to call from any thread.
        unsafe {
            libc::malloc_trim(0);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = trim_allocator;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    ProcessCounters {
        rss_bytes: field("VmRSS:") * 1024,
        threads: field("Threads:"),
        open_fds: std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count() as u64),
    }
}

fn draining() -> Verdict {
    Verdict {
        readiness: Readiness::NotReady,
        message: "draining: the server is shutting down".into(),
    }
}

/// Strict readiness: the models loaded at startup that are not READY (a
/// FAILED or a still loading one), with why; `None` when there are none.
/// A model since unloaded by an operator, or removed from the repository,
/// holds nothing back.
fn held_back(health: &Health, registry: &Registry) -> Option<String> {
    let held: Vec<String> = health
        .startup_models
        .lock()
        .iter()
        .filter_map(|name| {
            let status = registry.status(name).ok()?;
            match status.state {
                ModelState::Failed => Some(format!(
                    "model '{name}' is FAILED: {}",
                    status.reason.as_deref().unwrap_or("no reason given")
                )),
                ModelState::Loading => Some(format!("model '{name}' is LOADING")),
                _ => None,
            }
        })
        .collect();
    (!held.is_empty()).then(|| {
        format!(
            "not ready (strict readiness: every model loaded at startup must be READY): {}",
            held.join("; ")
        )
    })
}

fn judge(health: &Health, registry: &Registry, plugins: &PluginHost, started: Instant) -> Verdict {
    if health.is_draining() {
        return draining();
    }
    if !health.startup_done.load(Ordering::Acquire) {
        return Verdict {
            readiness: Readiness::NotReady,
            message: "startup loads in progress".into(),
        };
    }
    if health.strict
        && let Some(held) = held_back(health, registry)
    {
        return Verdict {
            readiness: Readiness::NotReady,
            message: held,
        };
    }
    let judges = plugins.of_kind::<kind::Health>();
    if judges.is_empty() {
        return Verdict {
            readiness: Readiness::Ready,
            message: String::new(),
        };
    }
    let snapshot = snapshot(registry, plugins, started);
    let mut worst = Verdict {
        readiness: Readiness::Ready,
        message: String::new(),
    };
    for plugin in judges {
        let (readiness, message) = match plugin.check(&snapshot) {
            Ok(report) => (
                match report.status {
                    HealthStatus::Ready => Readiness::Ready,
                    HealthStatus::Degraded => Readiness::Degraded,
                    HealthStatus::NotReady => Readiness::NotReady,
                },
                report.message,
            ),
            // A broken judge is not a verdict on the host: note it, stay as is.
            Err(err) => (Readiness::Degraded, err.to_string()),
        };
        let rank = |r: Readiness| match r {
            Readiness::Ready => 0,
            Readiness::Degraded => 1,
            Readiness::NotReady => 2,
        };
        if rank(readiness) > rank(worst.readiness) {
            worst = Verdict {
                readiness,
                message: format!("{}: {message}", plugin.name),
            };
        }
    }
    worst
}

/// Re-judges every `period`, on every model state change and when the
/// startup loads finish, until `shutdown`.
pub fn spawn_monitor(
    health: Arc<Health>,
    registry: Registry,
    plugins: Arc<PluginHost>,
    reporter: HealthReporter,
    period: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let started = Instant::now();
    let mut events = registry.subscribe();
    tokio::spawn(async move {
        let mut last: Option<Readiness> = None;
        loop {
            let (h, r, p) = (Arc::clone(&health), registry.clone(), Arc::clone(&plugins));
            let verdict = tokio::task::spawn_blocking(move || judge(&h, &r, &p, started))
                .await
                .unwrap_or_else(|err| Verdict {
                    readiness: Readiness::Degraded,
                    message: format!("health check panicked: {err}"),
                });
            let readiness = verdict.readiness;
            health.verdict.store(Arc::new(verdict));
            if last != Some(readiness) {
                let status = if readiness == Readiness::NotReady {
                    ServingStatus::NotServing
                } else {
                    ServingStatus::Serving
                };
                reporter.set_service_status("", status).await;
                last = Some(readiness);
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(period) => {}
                () = health.wake.notified() => {}
                _ = events.recv() => {}
            }
        }
    })
}
