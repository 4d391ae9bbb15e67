//! Executor threads: each instance of a model version is one dedicated OS
//! thread owning its own module copy. They share one bounded queue, so work
//! is spread fairly and a full queue is refused at once instead of growing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::oneshot;

use crate::error::Error;
use crate::tensor::{Tensor, TensorSpec};
use crate::torch::{self, TorchModule};

/// One forward pass to run. The reply side doubles as a cancellation signal:
/// if the caller has gone, the job is skipped.
pub struct Job {
    pub inputs: Vec<Tensor>,
    pub reply: oneshot::Sender<Result<Executed, Error>>,
    pub enqueued: Instant,
}

/// A finished job: the outputs, and where its time went.
#[derive(Debug)]
pub struct Executed {
    pub outputs: Vec<Tensor>,
    /// From `submit` to an executor taking the job.
    pub queue: Duration,
    /// The forward pass, conversions included.
    pub compute: Duration,
}

/// Threads in use over the whole process, for the thread budget report.
#[derive(Debug, Default)]
pub struct ThreadCounters {
    pub executors: AtomicUsize,
    pub torch_threads: AtomicUsize,
}

pub struct ExecutorPool {
    queue: Sender<Job>,
    exited: parking_lot::Mutex<Vec<oneshot::Receiver<()>>>,
    capacity: usize,
}

impl std::fmt::Debug for ExecutorPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorPool")
            .field("queued", &self.queue.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl ExecutorPool {
    /// Starts one thread per module. Threads end, and drop their module (and
    /// its memory), once the pool and every job sender are gone.
    pub fn start(
        label: &str,
        modules: Vec<TorchModule>,
        outputs: Arc<[TensorSpec]>,
        intra_op_threads: usize,
        queue_capacity: usize,
        counters: Arc<ThreadCounters>,
    ) -> std::io::Result<ExecutorPool> {
        let (queue, jobs) = crossbeam_channel::bounded::<Job>(queue_capacity);
        let mut exited = Vec::with_capacity(modules.len());
        for (instance_idx, module) in modules.into_iter().enumerate() {
            let (exit_tx, exit_rx) = oneshot::channel::<()>();
            let jobs = jobs.clone();
            let outputs = Arc::clone(&outputs);
            let counters = Arc::clone(&counters);
            counters.executors.fetch_add(1, Ordering::Relaxed);
            counters
                .torch_threads
                .fetch_add(intra_op_threads, Ordering::Relaxed);
            std::thread::Builder::new()
                .name(format!("exec:{label}#{instance_idx}"))
                .spawn(move || {
                    run_executor(module, jobs, &outputs, intra_op_threads);
                    counters.executors.fetch_sub(1, Ordering::Relaxed);
                    counters
                        .torch_threads
                        .fetch_sub(intra_op_threads, Ordering::Relaxed);
                    drop(exit_tx);
                })?;
            exited.push(exit_rx);
        }
        Ok(ExecutorPool {
            queue,
            exited: parking_lot::Mutex::new(exited),
            capacity: queue_capacity,
        })
    }

    /// Queues a job without waiting: a full queue is refused at once.
    pub fn submit(&self, job: Job) -> Result<(), Error> {
        match self.queue.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(Error::ResourceExhausted(format!(
                "queue is full ({} requests waiting)",
                self.capacity
            ))),
            Err(TrySendError::Disconnected(_)) => {
                Err(Error::Unavailable("executors have stopped".into()))
            }
        }
    }

    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    /// Receivers that complete when each executor thread has ended and freed
    /// its module. Taken once, by whoever unloads the model.
    pub fn take_exit_waiters(&self) -> Vec<oneshot::Receiver<()>> {
        std::mem::take(&mut *self.exited.lock())
    }
}

fn run_executor(
    module: TorchModule,
    jobs: Receiver<Job>,
    outputs: &[TensorSpec],
    intra_op_threads: usize,
) {
    torch::set_intra_op_threads(intra_op_threads);
    for job in jobs.iter() {
        if job.reply.is_closed() {
            // The caller went away while the job was queued: don't compute.
            continue;
        }
        let started = Instant::now();
        let queue = started.duration_since(job.enqueued);
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            module.forward(&job.inputs, outputs)
        }))
        .unwrap_or_else(|_| Err(Error::Internal("forward panicked".into())));
        let compute = started.elapsed();
        let _ = job.reply.send(res.map(|outputs| Executed {
            outputs,
            queue,
            compute,
        }));
    }
    drop(module);
}
