//! The serving series the registry records (with `prometheus-client`):
//! per model and version, queue and compute time and batch rows as
//! histograms, and requests by outcome as a counter. They live for the
//! process, keyed by labels, so that a reload keeps counting where the old
//! versions left off. A version takes its handles once, when it starts;
//! a request then only observes, with no lookup and no allocation.
//!
//! The gauges (requests queued and in flight, load time, threads) are read
//! from the registry when `/metrics` is scraped; `http/metrics.rs` writes
//! them.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A version's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub model: String,
    pub version: String,
}

/// A version's labels and a request's outcome (`success` or `failure`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub model: String,
    pub version: String,
    pub status: String,
}

type HistogramFamily = Family<VersionLabels, Histogram, fn() -> Histogram>;

/// 50 µs to about 3.3 s, doubling: a tiny model's queue wait to a large
/// batch's forward.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 2.0, 17))
}

/// Rows per forward pass: 1, 2, 4, ... 1024.
fn rows() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

/// The process's serving series; clones share them.
#[derive(Clone, Debug)]
pub struct ServingMetrics {
    request_seconds: HistogramFamily,
    queue_seconds: HistogramFamily,
    compute_seconds: HistogramFamily,
    batch_rows: HistogramFamily,
    requests: Family<OutcomeLabels, Counter>,
    /// Off (`--serving-metrics=false`): versions take no handles and
    /// requests record nothing here; the families stay empty.
    enabled: bool,
}

impl Default for ServingMetrics {
    fn default() -> Self {
        ServingMetrics {
            enabled: true,
            request_seconds: Family::new_with_constructor(seconds),
            queue_seconds: Family::new_with_constructor(seconds),
            compute_seconds: Family::new_with_constructor(seconds),
            batch_rows: Family::new_with_constructor(rows),
            requests: Family::default(),
        }
    }
}

impl ServingMetrics {
    /// Series that record nothing (the registry's `serving_series: false`).
    pub fn disabled() -> ServingMetrics {
        ServingMetrics {
            enabled: false,
            ..ServingMetrics::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Adds the series to `registry` (prefix `plinth`), sharing them.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "model_request_duration_seconds",
            "Time from a request entering the pipeline to its answer (router, processors, queue and forward pass), failures included",
            self.request_seconds.clone(),
        );
        registry.register(
            "model_queue_duration_seconds",
            "Time requests waited in a model's queue before their forward pass started",
            self.queue_seconds.clone(),
        );
        registry.register(
            "model_compute_duration_seconds",
            "Time of the forward pass a request ran in, batch assembly and conversions included",
            self.compute_seconds.clone(),
        );
        registry.register(
            "model_batch_rows",
            "Rows of each forward pass (one observation per pass)",
            self.batch_rows.clone(),
        );
        registry.register(
            "model_requests",
            "Requests a model version answered, by outcome (status: success or failure)",
            self.requests.clone(),
        );
    }

    /// The handles of one version, taken when it starts.
    pub fn series(&self, model: &str, version: &str) -> VersionSeries {
        let labels = VersionLabels {
            model: model.to_owned(),
            version: version.to_owned(),
        };
        let outcome = |status: &str| OutcomeLabels {
            model: model.to_owned(),
            version: version.to_owned(),
            status: status.to_owned(),
        };
        // One statement each: `get_or_create` returns a read guard of the
        // family, and a second call for a new label in the same statement
        // would wait for a write lock behind it forever.
        let request = self.request_seconds.get_or_create(&labels).clone();
        let queue = self.queue_seconds.get_or_create(&labels).clone();
        let compute = self.compute_seconds.get_or_create(&labels).clone();
        let batch_rows = self.batch_rows.get_or_create(&labels).clone();
        let success = self.requests.get_or_create(&outcome("success")).clone();
        let failure = self.requests.get_or_create(&outcome("failure")).clone();
        VersionSeries {
            request,
            queue,
            compute,
            batch_rows,
            success,
            failure,
        }
    }
}

/// One version's series.
#[derive(Clone, Debug)]
pub struct VersionSeries {
    request: Histogram,
    queue: Histogram,
    compute: Histogram,
    batch_rows: Histogram,
    success: Counter,
    failure: Counter,
}

impl VersionSeries {
    /// A request answered, successfully or not, after `took`.
    pub(crate) fn count(&self, ok: bool, took: Duration) {
        self.request.observe(took.as_secs_f64());
        if ok {
            self.success.inc();
        } else {
            self.failure.inc();
        }
    }

    /// A request that ran: its wait in the queue and its forward pass.
    pub(crate) fn observe_run(&self, queue: Duration, compute: Duration) {
        self.queue.observe(queue.as_secs_f64());
        self.compute.observe(compute.as_secs_f64());
    }

    /// A forward pass of `rows` rows (observed once per pass).
    pub(crate) fn observe_pass(&self, rows: u64) {
        self.batch_rows.observe(rows as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_records_into_the_process_series_and_a_reload_keeps_counting() {
        let metrics = ServingMetrics::default();
        let mut registry = Registry::with_prefix("plinth");
        metrics.register(&mut registry);
        let series = metrics.series("m", "1");
        series.count(true, Duration::from_micros(1500));
        series.observe_run(Duration::from_micros(120), Duration::from_micros(800));
        series.observe_pass(4);
        // A reload takes the handles again: the same series.
        metrics
            .series("m", "1")
            .count(false, Duration::from_micros(10));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "plinth_model_requests_total{model=\"m\",version=\"1\",status=\"success\"} 1",
            "plinth_model_requests_total{model=\"m\",version=\"1\",status=\"failure\"} 1",
            "plinth_model_queue_duration_seconds_count{model=\"m\",version=\"1\"} 1",
            "plinth_model_queue_duration_seconds_bucket{le=\"0.0002\",model=\"m\",version=\"1\"} 1",
            "plinth_model_batch_rows_bucket{le=\"4.0\",model=\"m\",version=\"1\"} 1",
            "plinth_model_batch_rows_bucket{le=\"2.0\",model=\"m\",version=\"1\"} 0",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
