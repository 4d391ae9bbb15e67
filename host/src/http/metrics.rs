//! The host's own Prometheus text on the metrics port: what every metrics
//! plugin renders, then the host's counters (dropped events, mirrors,
//! plugin calls and failures, model memory and on-demand residency). The
//! pipeline and the registry only count; the text is written here.

use std::sync::atomic::Ordering;

use crate::pipeline::Pipeline;
use crate::plugin::kind;
use crate::registry::Registry;

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
    text.push_str("# HELP plinth_metrics_events_dropped_total Request events dropped because the metrics queue was full.\n");
    text.push_str("# TYPE plinth_metrics_events_dropped_total counter\n");
    text.push_str(&format!(
        "plinth_metrics_events_dropped_total {}\n",
        pipeline.dropped_events()
    ));
    let mirrors = pipeline.mirror_totals();
    text.push_str("# HELP plinth_mirror_requests_total Mirrored runs of routed requests: ok, failed, or dropped because the mirror queue was full.\n");
    text.push_str("# TYPE plinth_mirror_requests_total counter\n");
    for (result, counter) in [
        ("ok", mirrors.ok),
        ("failed", mirrors.failed),
        ("dropped", mirrors.dropped),
    ] {
        text.push_str(&format!(
            "plinth_mirror_requests_total{{result=\"{result}\"}} {}\n",
            counter
        ));
    }
    text.push_str("# HELP plinth_mirror_agreement_total Successful mirrored runs whose outputs agreed with the primary's within the target's tolerance, or not.\n");
    text.push_str("# TYPE plinth_mirror_agreement_total counter\n");
    for (result, counter) in [("agree", mirrors.agreed), ("disagree", mirrors.disagreed)] {
        text.push_str(&format!(
            "plinth_mirror_agreement_total{{result=\"{result}\"}} {}\n",
            counter
        ));
    }
    text.push_str("# HELP plinth_plugin_calls_total Calls into each plugin.\n# TYPE plinth_plugin_calls_total counter\n");
    let reports = pipeline.plugins().list();
    for report in reports.iter().filter_map(|r| r.plugin.as_ref()) {
        text.push_str(&format!(
            "plinth_plugin_calls_total{{plugin=\"{}\"}} {}\n",
            report.name,
            report.stats.calls.load(Ordering::Relaxed)
        ));
    }
    text.push_str("# HELP plinth_plugin_errors_total Failed calls into each plugin (traps, timeouts, memory, plugin errors).\n# TYPE plinth_plugin_errors_total counter\n");
    for report in reports.iter().filter_map(|r| r.plugin.as_ref()) {
        text.push_str(&format!(
            "plinth_plugin_errors_total{{plugin=\"{}\"}} {}\n",
            report.name,
            report.stats.errors.load(Ordering::Relaxed)
        ));
    }
    text.push_str("# HELP plinth_plugin_load_failures_total Plugin files that failed to load.\n# TYPE plinth_plugin_load_failures_total counter\n");
    text.push_str(&format!(
        "plinth_plugin_load_failures_total {}\n",
        pipeline.plugins().load_failures.load(Ordering::Relaxed)
    ));
    render_residency(pipeline.registry(), &mut text);
    text
}

/// Each model's measured memory, the budget, and what on-demand
/// residency did.
fn render_residency(registry: &Registry, text: &mut String) {
    use std::fmt::Write;
    text.push_str("# HELP plinth_model_memory_bytes What each loaded model keeps in its device's memory: the bytes of its tensors, times its instances.\n# TYPE plinth_model_memory_bytes gauge\n");
    for status in registry.list() {
        if let Some(device) = &status.device {
            let _ = writeln!(
                text,
                "plinth_model_memory_bytes{{model=\"{}\",device=\"{device}\"}} {}",
                status.name, status.memory_bytes
            );
        }
    }
    let counts = registry.residency_counts();
    if let Some(budget) = counts.budget_bytes {
        let _ = write!(
            text,
            "# HELP plinth_memory_budget_bytes The memory budget per device (--memory-budget-mib).\n# TYPE plinth_memory_budget_bytes gauge\nplinth_memory_budget_bytes {budget}\n"
        );
    }
    let _ = write!(
        text,
        "# HELP plinth_on_demand_requests_total Requests to on-demand models: found loaded (hit) or waited for a load (miss).\n# TYPE plinth_on_demand_requests_total counter\nplinth_on_demand_requests_total{{result=\"hit\"}} {}\nplinth_on_demand_requests_total{{result=\"miss\"}} {}\n",
        counts.hits, counts.misses
    );
    let _ = write!(
        text,
        "# HELP plinth_on_demand_loads_total Loads of on-demand models started by a request.\n# TYPE plinth_on_demand_loads_total counter\nplinth_on_demand_loads_total {}\n# HELP plinth_on_demand_load_seconds_total Time from the request that started an on-demand load to the model being ready, summed.\n# TYPE plinth_on_demand_load_seconds_total counter\nplinth_on_demand_load_seconds_total {:.6}\n",
        counts.on_demand_loads,
        counts.on_demand_load_time.as_secs_f64()
    );
    let _ = write!(
        text,
        "# HELP plinth_evictions_total Idle on-demand models unloaded to stay within the memory budget.\n# TYPE plinth_evictions_total counter\nplinth_evictions_total {}\n",
        counts.evictions
    );
}
