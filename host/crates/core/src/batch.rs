//! How a model's executors group queued requests into one forward pass.

use std::time::Duration;

/// Dynamic batching, from the model's `config.toml`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchPolicy {
    /// Most rows one forward pass takes; 0 turns batching off.
    pub max_batch_size: usize,
    /// How long the first job of a batch may wait for others.
    pub max_queue_delay: Duration,
    /// Batch sizes worth running at once when nothing else is waiting.
    pub preferred_batch_sizes: Vec<usize>,
}

impl BatchPolicy {
    /// Whether requests are merged at all.
    pub fn enabled(&self) -> bool {
        self.max_batch_size > 1
    }
}
