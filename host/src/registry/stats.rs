//! Per-version request statistics, in the shape of Triton's model
//! statistics: counters a request adds to without a lock (but for the
//! per-batch-size table).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

/// A count of events and their summed duration.
#[derive(Debug, Default)]
pub struct StatCounter {
    count: AtomicU64,
    nanos: AtomicU64,
}

impl StatCounter {
    fn add(&self, duration: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.nanos.fetch_add(
            u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// `(count, total nanoseconds)`.
    pub fn get(&self) -> (u64, u64) {
        (
            self.count.load(Ordering::Relaxed),
            self.nanos.load(Ordering::Relaxed),
        )
    }
}

/// Per-batch-size timings: compute input, infer and output.
pub type BatchTimings = [(u64, u64); 3];

/// Cumulative statistics of one loaded version, in the shape of Triton's
/// model statistics. They live and die with the loaded version.
#[derive(Debug, Default)]
pub struct VersionStats {
    /// The process-wide Prometheus series of this version, when the
    /// registry gave it some (test models have none).
    pub(crate) series: Option<super::series::VersionSeries>,
    /// Whole requests that succeeded, end to end (plugins included).
    pub success: StatCounter,
    pub fail: StatCounter,
    /// Waiting for an executor.
    pub queue: StatCounter,
    /// The preprocess chain.
    pub compute_input: StatCounter,
    /// The forward pass.
    pub compute_infer: StatCounter,
    /// The postprocess chain.
    pub compute_output: StatCounter,
    /// Inferences; a request with a batch of N counts N.
    pub inference_count: AtomicU64,
    /// Forward passes.
    pub execution_count: AtomicU64,
    /// Milliseconds since the Unix epoch of the last request; 0 if none.
    pub last_inference_ms: AtomicU64,
    batches: Mutex<std::collections::BTreeMap<u64, BatchTimings>>,
}

/// What one request did, for [`ReadyModel::record`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestRecord {
    pub ok: bool,
    /// Whether the forward pass ran.
    pub executed: bool,
    pub total: Duration,
    pub queue: Duration,
    pub compute_input: Duration,
    pub compute_infer: Duration,
    pub compute_output: Duration,
    /// Rows of this request.
    pub batch_size: u64,
    /// Rows of the forward pass it was part of.
    pub executed_rows: u64,
    /// Whether this request counts the forward pass (one per pass).
    pub leader: bool,
}

impl VersionStats {
    pub(crate) fn record(&self, record: &RequestRecord) {
        if let Some(series) = &self.series {
            series.count(record.ok, record.total);
            if record.executed {
                series.observe_run(
                    record.queue,
                    record.compute_input + record.compute_infer + record.compute_output,
                );
                if record.leader {
                    series.observe_pass(record.executed_rows.max(1));
                }
            }
        }
        if record.ok {
            self.success.add(record.total);
        } else {
            self.fail.add(record.total);
        }
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.last_inference_ms.store(now_ms, Ordering::Relaxed);
        if !record.executed {
            return;
        }
        self.queue.add(record.queue);
        self.compute_input.add(record.compute_input);
        self.compute_infer.add(record.compute_infer);
        self.compute_output.add(record.compute_output);
        self.inference_count
            .fetch_add(record.batch_size.max(1), Ordering::Relaxed);
        if !record.leader {
            return;
        }
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let mut batches = self.batches.lock();
        let row = batches.entry(record.executed_rows.max(1)).or_default();
        for (slot, d) in row.iter_mut().zip([
            record.compute_input,
            record.compute_infer,
            record.compute_output,
        ]) {
            slot.0 += 1;
            slot.1 += nanos(d);
        }
    }

    /// `(batch size, [compute input, infer, output])`, smallest batch first.
    pub fn batches(&self) -> Vec<(u64, BatchTimings)> {
        self.batches.lock().iter().map(|(k, v)| (*k, *v)).collect()
    }
}
