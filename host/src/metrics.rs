//! The host's own Prometheus text on the metrics port: what every metrics
//! plugin renders, then the host's series, encoded by `prometheus-client`
//! (OpenMetrics style: a counter's samples end in `_total`): per model and
//! version the queue, in flight, queue and compute time, batch rows,
//! requests by outcome, load time and memory; for the server its threads,
//! dropped events, mirrors, plugin calls and failures and on-demand
//! residency. The pipeline and the registry only count; the text is
//! written here. Every host series is named `plinth_…` and none is a name
//! the shipped metrics plugin writes.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode_registry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::pipeline::Pipeline;
use crate::plugin::FailureCause;
use crate::plugin::kind;

/// Prometheus text of every metrics plugin, then the host's own counters
/// about plugins. Blocking: call it off the tokio workers.
pub fn render(pipeline: &Pipeline) -> String {
    let mut text = String::new();
    for plugin in pipeline.plugins().of_kind::<kind::Metrics>() {
        match plugin.render() {
            Ok(rendered) => {
                text.push_str(&rendered);
                if !rendered.ends_with('\n') {
                    text.push('\n');
                }
            }
            Err(err) => text.push_str(&format!(
                "# plugin '{}' failed to render: {err}\n",
                plugin.name
            )),
        }
    }
    let mut registry = prometheus_client::registry::Registry::with_prefix("plinth");
    host_series(pipeline, &mut registry);
    if let Err(err) = encode_registry(&mut text, &registry) {
        text.push_str(&format!("# the host's series failed to encode: {err}\n"));
    }
    text
}

/// A counter holding `value`: the host keeps its own atomics and hands a
/// snapshot to each scrape.
fn counter(value: u64) -> Counter {
    let counter = Counter::default();
    counter.inc_by(value);
    counter
}

/// A count as a gauge's value (saturating: a gauge is an i64).
fn as_i64(value: impl TryInto<i64>) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

fn gauge(value: impl TryInto<i64>) -> Gauge {
    let gauge = Gauge::default();
    gauge.set(as_i64(value));
    gauge
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Every series of the host (none of them a plugin's), into `registry`.
fn host_series(pipeline: &Pipeline, registry: &mut prometheus_client::registry::Registry) {
    let models = pipeline.registry();
    models.serving_metrics().register(registry);

    // Per model and version, read now: what autoscalers scale on.
    let queued: Family<Vec<(String, String)>, Gauge> = Family::default();
    let in_flight: Family<Vec<(String, String)>, Gauge> = Family::default();
    for (name, model) in models.serving_models() {
        for (version, waiting) in model.queued() {
            queued
                .get_or_create(&labels(&[("model", &name), ("version", version)]))
                .set(as_i64(waiting));
        }
        in_flight
            .get_or_create(&labels(&[("model", &name)]))
            .set(as_i64(model.in_flight()));
    }
    registry.register(
        "model_queue_requests",
        "Requests waiting in a model version's queue for a forward pass",
        queued,
    );
    registry.register(
        "model_inflight_requests",
        "Requests admitted to a model and not yet answered",
        in_flight,
    );
    let load_seconds: Family<Vec<(String, String)>, Gauge<f64, AtomicU64>> = Family::default();
    let memory: Family<Vec<(String, String)>, Gauge> = Family::default();
    for status in models.list() {
        if let Some(took) = status.load_duration {
            load_seconds
                .get_or_create(&labels(&[("model", &status.name)]))
                .set(took.as_secs_f64());
        }
        if let Some(device) = &status.device {
            memory
                .get_or_create(&labels(&[("model", &status.name), ("device", device)]))
                .set(as_i64(status.memory_bytes));
        }
    }
    registry.register(
        "model_load_duration_seconds",
        "How long each model's last finished load took",
        load_seconds,
    );
    registry.register(
        "model_memory_bytes",
        "What each loaded model keeps in its device's memory: the bytes of its tensors (or its package), times its instances",
        memory,
    );

    let budget = models.thread_budget();
    registry.register(
        "executor_threads",
        "Executor threads of every loaded model version",
        gauge(budget.executors),
    );
    registry.register(
        "torch_threads",
        "Intra-op threads of those executors",
        gauge(budget.torch_threads),
    );
    registry.register(
        "torch_threads_computing",
        "Intra-op threads of the forward passes running now",
        gauge(budget.cores_in_use),
    );
    registry.register(
        "compute_budget_cores",
        "The compute budget (--threads)",
        gauge(budget.cores),
    );

    registry.register(
        "metrics_events_dropped",
        "Request events dropped because the metrics queue was full",
        counter(pipeline.dropped_events()),
    );
    let spans = pipeline.traces().map(|traces| traces.counts());
    registry.register(
        "trace_spans_exported",
        "Spans the OTLP collector accepted (0 while tracing is off)",
        counter(spans.map_or(0, |counts| counts.exported())),
    );
    registry.register(
        "trace_spans_dropped",
        "Spans lost: the exporter's queue was full, or the collector failed or timed out their export",
        counter(spans.map_or(0, |counts| counts.dropped())),
    );
    let mirrors = pipeline.mirror_totals();
    let mirror_runs: Family<Vec<(String, String)>, Counter> = Family::default();
    for (result, value) in [
        ("ok", mirrors.ok),
        ("failed", mirrors.failed),
        ("dropped", mirrors.dropped),
    ] {
        mirror_runs
            .get_or_create(&labels(&[("result", result)]))
            .inc_by(value);
    }
    registry.register(
        "mirror_runs",
        "Mirrored runs of routed requests, all targets: ok, failed, or dropped because the mirror queue was full",
        mirror_runs,
    );
    let agreement: Family<Vec<(String, String)>, Counter> = Family::default();
    for (result, value) in [("agree", mirrors.agreed), ("disagree", mirrors.disagreed)] {
        agreement
            .get_or_create(&labels(&[("result", result)]))
            .inc_by(value);
    }
    registry.register(
        "mirror_comparisons",
        "Successful mirrored runs, all targets, whose outputs agreed with the primary's within the target's tolerance, or not",
        agreement,
    );

    let calls: Family<Vec<(String, String)>, Counter> = Family::default();
    let errors: Family<Vec<(String, String)>, Counter> = Family::default();
    let failures: Family<Vec<(String, String)>, Counter> = Family::default();
    for report in pipeline.plugins().list() {
        if let Some(plugin) = &report.plugin {
            let labels = labels(&[("plugin", &plugin.name)]);
            calls
                .get_or_create(&labels)
                .inc_by(plugin.stats.calls.load(Ordering::Relaxed));
            errors
                .get_or_create(&labels)
                .inc_by(plugin.stats.errors.load(Ordering::Relaxed));
            for cause in FailureCause::ALL {
                let count = plugin.stats.failures_of(cause);
                failures
                    .get_or_create(&self::labels(&[
                        ("plugin", &plugin.name),
                        ("cause", cause.as_str()),
                    ]))
                    .inc_by(count);
            }
        }
    }
    registry.register("plugin_calls", "Calls into each plugin", calls);
    registry.register(
        "plugin_errors",
        "Failed calls into each plugin (traps, timeouts, memory, plugin errors)",
        errors,
    );
    registry.register(
        "plugin_failures",
        "Failed calls into each plugin by cause: trap, timeout, memory, plugin (its own error), instantiate",
        failures,
    );
    registry.register(
        "plugin_load_failures",
        "Plugin files that failed to load",
        counter(pipeline.plugins().load_failures.load(Ordering::Relaxed)),
    );

    let counts = models.residency_counts();
    if let Some(bytes) = counts.budget_bytes {
        registry.register(
            "memory_budget_bytes",
            "The memory budget per device (--memory-budget-mib)",
            gauge(bytes),
        );
    }
    let on_demand: Family<Vec<(String, String)>, Counter> = Family::default();
    on_demand
        .get_or_create(&labels(&[("result", "hit")]))
        .inc_by(counts.hits);
    on_demand
        .get_or_create(&labels(&[("result", "miss")]))
        .inc_by(counts.misses);
    registry.register(
        "on_demand_requests",
        "Requests to on-demand models: found loaded (hit) or waited for a load (miss)",
        on_demand,
    );
    registry.register(
        "on_demand_loads",
        "Loads of on-demand models started by a request",
        counter(counts.on_demand_loads),
    );
    let load_time: Counter<f64, AtomicU64> = Counter::default();
    load_time.inc_by(counts.on_demand_load_time.as_secs_f64());
    registry.register(
        "on_demand_load_seconds",
        "Time from the request that started an on-demand load to the model being ready, summed",
        load_time,
    );
    registry.register(
        "evictions",
        "Idle on-demand models unloaded to stay within the memory budget",
        counter(counts.evictions),
    );
}
