//! Request metrics in the Prometheus text exposition format.
//!
//! Metrics (`<prefix>` defaults to `plinth`):
//!
//! - `<prefix>_requests_total{model, version, status}`: counter of finished
//!   requests. `status` is `ok`, `invalid_input`, `not_found`,
//!   `unavailable`, `deadline_exceeded`, `cancelled` or `internal`.
//! - `<prefix>_request_duration_seconds{model, version, stage}`: histogram
//!   of the time spent in each stage (`queue`, `preprocess`, `compute`,
//!   `postprocess`, `total`). Successful requests only, so that fast
//!   failures do not pull the latency percentiles down.
//! - `<prefix>_batch_size{model, version}`: histogram of the batch size each
//!   successful request ran in.
//!
//! - `<prefix>_mirror_requests_total{primary, model, status}`: counter of
//!   mirrored runs (contract 0.1.1): `primary` answered the client, `model`
//!   ran the same request as a mirror, `status` is how the mirror ended.
//! - `<prefix>_mirror_agreement_total{primary, model, result}`: successful
//!   mirrored runs whose outputs agreed with the primary's within the
//!   router's tolerance (`result="agree"`) or not (`"disagree"`).
//! - `<prefix>_nested_requests_total{parent, model, status}`: counter of the
//!   calls orchestrator entries (`parent`) made to models while answering
//!   clients (contract 0.1.1). These requests are also in
//!   `<prefix>_requests_total`, as the called model's traffic.
//!
//! A request that failed before a version was chosen has `version=""`.
//!
//! Configuration:
//!
//! - `prefix`: metric name prefix. Default `plinth`.
//! - `buckets`: latency bucket upper bounds in seconds, comma-separated,
//!   increasing. Default `0.0001,0.00025,0.0005,0.001,0.0025,0.005,0.01,`
//!   `0.025,0.05,0.1,0.25,0.5,1,2.5,5,10`.
//!
//! Counters and histograms survive a hot reload through `save-state` and
//! `restore-state` (format described in `src/state.rs`). When the new version is
//! configured with other latency buckets, the counters and batch-size
//! histograms carry over and the latency histograms start afresh.

use std::collections::BTreeMap;
use std::fmt::Write;

use plinth_plugin_sdk::prelude::*;

mod state;

const DEFAULT_BUCKETS_S: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const BATCH_BUCKETS: [u64; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];
const STAGES: [&str; 5] = ["queue", "preprocess", "compute", "postprocess", "total"];

/// Label values of a counter: model, version, status.
type CounterKey = (String, String, String);
/// Label values of a latency histogram: model, version, stage.
type DurationKey = (String, String, String);
/// Label values of a batch-size histogram: model, version.
type BatchKey = (String, String);

struct PrometheusMetrics {
    prefix: String,
    /// Latency bucket upper bounds in microseconds, increasing.
    bounds_us: Vec<u64>,
    requests: BTreeMap<CounterKey, u64>,
    durations: BTreeMap<DurationKey, Histogram>,
    batch_sizes: BTreeMap<BatchKey, Histogram>,
    /// Mirrored runs: primary model, mirror model, status.
    mirrored: BTreeMap<CounterKey, u64>,
    /// Agreement of successful mirrored runs: primary, mirror, result.
    agreement: BTreeMap<CounterKey, u64>,
    /// Orchestrators' nested calls: parent entry, model, status.
    nested: BTreeMap<CounterKey, u64>,
}

/// A histogram over integer observations.
#[derive(Debug, Clone, PartialEq)]
struct Histogram {
    /// Observations per bucket, not cumulative; the last bucket is `+Inf`.
    counts: Vec<u64>,
    sum: u64,
    count: u64,
}

impl Histogram {
    fn new(n_bounds: usize) -> Histogram {
        Histogram {
            counts: vec![0; n_bounds + 1],
            sum: 0,
            count: 0,
        }
    }

    fn observe(&mut self, bounds: &[u64], value: u64) {
        let bucket_idx = bounds.partition_point(|&bound| bound < value);
        self.counts[bucket_idx] += 1;
        self.sum = self.sum.saturating_add(value);
        self.count += 1;
    }
}

impl Plugin for PrometheusMetrics {
    fn init(config: &Config) -> Result<Self> {
        let prefix = config.parse_or("prefix", "plinth".to_owned())?;
        if !is_metric_name(&prefix) {
            return Err(PluginError::unavailable(format!(
                "config key `prefix`: `{prefix}` is not a valid Prometheus metric name"
            )));
        }
        let buckets_s = config
            .parse_list::<f64>("buckets")?
            .unwrap_or_else(|| DEFAULT_BUCKETS_S.to_vec());
        let bounds_us = bounds_from_seconds(&buckets_s)?;
        Ok(PrometheusMetrics {
            prefix,
            bounds_us,
            requests: BTreeMap::new(),
            durations: BTreeMap::new(),
            batch_sizes: BTreeMap::new(),
            mirrored: BTreeMap::new(),
            agreement: BTreeMap::new(),
            nested: BTreeMap::new(),
        })
    }
}

impl Metrics for PrometheusMetrics {
    fn record(&mut self, events: Vec<RequestEvent>) {
        for event in events {
            let version = event.version.unwrap_or_default();
            let status = status_label(event.status);
            *self
                .requests
                .entry((event.model.clone(), version.clone(), status.to_owned()))
                .or_default() += 1;
            if event.status != RequestStatus::Ok {
                continue;
            }
            let timings = &event.timings;
            let stage_us = [
                timings.queue_us,
                timings.preprocess_us,
                timings.compute_us,
                timings.postprocess_us,
                timings.total_us,
            ];
            for (stage, micros) in STAGES.iter().zip(stage_us) {
                let key = (event.model.clone(), version.clone(), (*stage).to_owned());
                self.durations
                    .entry(key)
                    .or_insert_with(|| Histogram::new(self.bounds_us.len()))
                    .observe(&self.bounds_us, micros);
            }
            self.batch_sizes
                .entry((event.model, version))
                .or_insert_with(|| Histogram::new(BATCH_BUCKETS.len()))
                .observe(&BATCH_BUCKETS, u64::from(event.batch_size));
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let prefix = &self.prefix;

        let name = format!("{prefix}_requests_total");
        if !self.requests.is_empty() {
            out.push_str(&format!(
                "# HELP {name} Finished requests by model, version and status.\n# TYPE {name} counter\n"
            ));
        }
        for ((model, version, status), count) in &self.requests {
            let labels = labels(&[("model", model), ("version", version), ("status", status)]);
            let _ = writeln!(out, "{name}{{{labels}}} {count}");
        }

        let name = format!("{prefix}_request_duration_seconds");
        if !self.durations.is_empty() {
            out.push_str(&format!(
                "# HELP {name} Time successful requests spent per stage.\n# TYPE {name} histogram\n"
            ));
        }
        for ((model, version, stage), histogram) in &self.durations {
            let labels = labels(&[("model", model), ("version", version), ("stage", stage)]);
            write_histogram(
                &mut out,
                &name,
                &labels,
                &self.bounds_us,
                histogram,
                micros_to_seconds,
            );
        }

        let name = format!("{prefix}_batch_size");
        if !self.batch_sizes.is_empty() {
            out.push_str(&format!(
                "# HELP {name} Size of the batch each successful request ran in.\n# TYPE {name} histogram\n"
            ));
        }
        for ((model, version), histogram) in &self.batch_sizes {
            let labels = labels(&[("model", model), ("version", version)]);
            write_histogram(&mut out, &name, &labels, &BATCH_BUCKETS, histogram, |v| {
                v.to_string()
            });
        }

        for (counters, suffix, help, last) in [
            (
                &self.mirrored,
                "mirror_requests_total",
                "Mirrored runs by primary model, mirror model and status.",
                "status",
            ),
            (
                &self.agreement,
                "mirror_agreement_total",
                "Successful mirrored runs whose outputs agreed with the primary's, or not.",
                "result",
            ),
            (
                &self.nested,
                "nested_requests_total",
                "Calls orchestrator entries made to models while answering clients.",
                "status",
            ),
        ] {
            let name = format!("{prefix}_{suffix}");
            if !counters.is_empty() {
                out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            }
            let first = if suffix == "nested_requests_total" {
                "parent"
            } else {
                "primary"
            };
            for ((primary, model, value), count) in counters {
                let labels = labels(&[(first, primary), ("model", model), (last, value)]);
                let _ = writeln!(out, "{name}{{{labels}}} {count}");
            }
        }
        out
    }

    fn save_state(&self) -> Vec<u8> {
        state::encode(self)
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<()> {
        let saved = state::decode(bytes).map_err(|err| {
            PluginError::invalid_input(format!("cannot restore metrics state: {err}"))
        })?;
        self.requests = saved.requests;
        self.batch_sizes = saved.batch_sizes;
        self.mirrored = saved.mirrored;
        self.agreement = saved.agreement;
        self.nested = saved.nested;
        if saved.bounds_us == self.bounds_us {
            self.durations = saved.durations;
        } else {
            self.durations.clear();
            plinth_plugin_sdk::log::warn(
                "latency buckets changed across the reload: latency histograms start afresh",
            );
        }
        Ok(())
    }
}

impl MetricsContext for PrometheusMetrics {
    fn record_mirrors(&mut self, events: Vec<MirrorEvent>) {
        for event in events {
            let status = status_label(event.status);
            *self
                .mirrored
                .entry((
                    event.primary_model.clone(),
                    event.model.clone(),
                    status.to_owned(),
                ))
                .or_default() += 1;
            if let Some(agree) = event.agree {
                let result = if agree { "agree" } else { "disagree" };
                *self
                    .agreement
                    .entry((event.primary_model, event.model, result.to_owned()))
                    .or_default() += 1;
            }
        }
    }

    fn record_nested(&mut self, events: Vec<NestedEvent>) {
        for nested in events {
            let status = status_label(nested.event.status);
            *self
                .nested
                .entry((nested.parent_model, nested.event.model, status.to_owned()))
                .or_default() += 1;
        }
    }
}

fn write_histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: &[u64],
    histogram: &Histogram,
    format_bound: impl Fn(u64) -> String,
) {
    let mut cumulative = 0;
    for (bound, count) in bounds.iter().zip(&histogram.counts) {
        cumulative += count;
        let le = format_bound(*bound);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels},le=\"+Inf\"}} {}",
        histogram.count
    );
    let sum = format_bound(histogram.sum);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", histogram.count);
}

fn bounds_from_seconds(seconds: &[f64]) -> Result<Vec<u64>> {
    let bad = |detail: String| PluginError::unavailable(format!("config key `buckets`: {detail}"));
    if seconds.is_empty() {
        return Err(bad("needs at least one bound".to_owned()));
    }
    let mut bounds_us: Vec<u64> = Vec::with_capacity(seconds.len());
    for &bound_s in seconds {
        if !(bound_s.is_finite() && bound_s > 0.0 && bound_s < 1e9) {
            return Err(bad(format!(
                "bound {bound_s} must be a positive number of seconds below 1e9"
            )));
        }
        let bound_us = (bound_s * 1e6).round() as u64;
        if bounds_us.last().is_some_and(|&last| last >= bound_us) {
            return Err(bad(format!(
                "bounds must increase by at least a microsecond, {bound_s} does not"
            )));
        }
        bounds_us.push(bound_us);
    }
    Ok(bounds_us)
}

fn micros_to_seconds(micros: u64) -> String {
    // Display for f64 prints the shortest exact decimal, never an exponent.
    (micros as f64 / 1e6).to_string()
}

fn status_label(status: RequestStatus) -> &'static str {
    match status {
        RequestStatus::Ok => "ok",
        RequestStatus::InvalidInput => "invalid_input",
        RequestStatus::NotFound => "not_found",
        RequestStatus::Unavailable => "unavailable",
        RequestStatus::DeadlineExceeded => "deadline_exceeded",
        RequestStatus::Cancelled => "cancelled",
        RequestStatus::Internal => "internal",
    }
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (pair_idx, (name, value)) in pairs.iter().enumerate() {
        if pair_idx > 0 {
            out.push(',');
        }
        out.push_str(name);
        out.push_str("=\"");
        for ch in value.chars() {
            match ch {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                _ => out.push(ch),
            }
        }
        out.push('"');
    }
    out
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_' || first == ':')
        && chars.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

export_metrics_context!(PrometheusMetrics);

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn plugin(pairs: &[(&str, &str)]) -> PrometheusMetrics {
        PrometheusMetrics::init(&Config::from_pairs(pairs.iter().copied())).unwrap()
    }

    pub(crate) fn event(
        version: Option<&str>,
        status: RequestStatus,
        total_us: u64,
    ) -> RequestEvent {
        RequestEvent {
            model: "resnet".to_owned(),
            version: version.map(str::to_owned),
            status,
            timings: StageTimings {
                queue_us: 50,
                preprocess_us: 0,
                compute_us: total_us / 2,
                postprocess_us: 0,
                total_us,
            },
            batch_size: 4,
        }
    }

    #[test]
    fn renders_counters_and_histograms() {
        let mut metrics = plugin(&[("buckets", "0.001,0.01")]);
        metrics.record(vec![
            event(Some("1"), RequestStatus::Ok, 500),
            event(Some("1"), RequestStatus::Ok, 5_000),
            event(Some("1"), RequestStatus::Ok, 50_000),
            event(Some("1"), RequestStatus::Internal, 10),
            event(None, RequestStatus::NotFound, 10),
        ]);
        let text = metrics.render();
        let expected_lines = [
            "# TYPE plinth_requests_total counter",
            "plinth_requests_total{model=\"resnet\",version=\"\",status=\"not_found\"} 1",
            "plinth_requests_total{model=\"resnet\",version=\"1\",status=\"internal\"} 1",
            "plinth_requests_total{model=\"resnet\",version=\"1\",status=\"ok\"} 3",
            "# TYPE plinth_request_duration_seconds histogram",
            "plinth_request_duration_seconds_bucket{model=\"resnet\",version=\"1\",stage=\"total\",le=\"0.001\"} 1",
            "plinth_request_duration_seconds_bucket{model=\"resnet\",version=\"1\",stage=\"total\",le=\"0.01\"} 2",
            "plinth_request_duration_seconds_bucket{model=\"resnet\",version=\"1\",stage=\"total\",le=\"+Inf\"} 3",
            "plinth_request_duration_seconds_sum{model=\"resnet\",version=\"1\",stage=\"total\"} 0.0555",
            "plinth_request_duration_seconds_count{model=\"resnet\",version=\"1\",stage=\"total\"} 3",
            "plinth_request_duration_seconds_count{model=\"resnet\",version=\"1\",stage=\"queue\"} 3",
            "plinth_batch_size_bucket{model=\"resnet\",version=\"1\",le=\"4\"} 3",
            "plinth_batch_size_sum{model=\"resnet\",version=\"1\"} 12",
        ];
        for line in expected_lines {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in:\n{text}"
            );
        }
        assert!(text.ends_with('\n'));
        assert_eq!(plugin(&[]).render(), "");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            labels(&[("model", "a\"b\\c\nd")]),
            "model=\"a\\\"b\\\\c\\nd\""
        );
    }

    #[test]
    fn bad_config_is_refused() {
        for (pairs, message) in [
            (
                vec![("prefix", "9bad")],
                "config key `prefix`: `9bad` is not a valid Prometheus metric name",
            ),
            (
                vec![("buckets", "0.1,0.01")],
                "config key `buckets`: bounds must increase by at least a microsecond, 0.01 does not",
            ),
            (
                vec![("buckets", "-1")],
                "config key `buckets`: bound -1 must be a positive number of seconds below 1e9",
            ),
        ] {
            let err = PrometheusMetrics::init(&Config::from_pairs(pairs))
                .err()
                .unwrap();
            assert_eq!(err.message(), message);
        }
    }
}
