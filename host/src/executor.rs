//! Executor threads: each instance of a model version is one dedicated OS
//! thread owning its own module copy. They share one queue, so work is spread
//! fairly, and a full queue is refused at once instead of growing.
//!
//! When the model batches (`max_batch_size > 0`), an executor that takes a
//! job keeps taking compatible ones (same dtypes, same non-batch dims) until
//! the batch is full, reaches a preferred size with nothing else waiting, or
//! the first job has waited `max_queue_delay`. The inputs are concatenated
//! along dim 0, `forward` runs once, and the outputs are split back by rows.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use tokio::sync::oneshot;

use crate::error::Error;
use crate::tensor::{DType, Tensor, TensorSpec, shape_str};
use crate::torch::{self, TorchModule};

/// One request to run. The reply side doubles as a cancellation signal: if
/// the caller has gone, the job is dropped without running.
pub struct Job {
    /// In the order of the model's config.
    pub inputs: Vec<Tensor>,
    /// Rows along the batch dimension (1 when the model does not batch).
    pub rows: usize,
    pub reply: oneshot::Sender<Result<Executed, Error>>,
    pub enqueued: Instant,
    /// The request's own queue timeout: past it, the job is answered
    /// DEADLINE_EXCEEDED instead of running.
    pub deadline: Option<Instant>,
}

/// A finished job: the outputs, and where its time went.
#[derive(Debug)]
pub struct Executed {
    pub outputs: Vec<Tensor>,
    /// From `submit` to the forward pass starting.
    pub queue: Duration,
    /// The forward pass, conversions and batch assembly included.
    pub compute: Duration,
    /// Rows of the forward pass this job was part of.
    pub batch_rows: usize,
    /// True for exactly one job of each forward pass, so that executions are
    /// counted once.
    pub leader: bool,
}

/// How an executor groups queued jobs.
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
    fn enabled(&self) -> bool {
        self.max_batch_size > 1
    }
}

/// Threads in use over the whole process, for the thread budget report.
#[derive(Debug, Default)]
pub struct ThreadCounters {
    pub executors: AtomicUsize,
    pub torch_threads: AtomicUsize,
}

pub struct ExecutorPool {
    queue: Sender<Job>,
    /// Jobs submitted and not yet started or dropped: in the channel or held
    /// by an executor gathering a batch.
    waiting: Arc<AtomicUsize>,
    exited: parking_lot::Mutex<Vec<oneshot::Receiver<()>>>,
    capacity: usize,
    /// `model:version`, for messages.
    label: String,
}

impl std::fmt::Debug for ExecutorPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorPool")
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// What every executor thread of a pool shares.
struct Shared {
    outputs: Arc<[TensorSpec]>,
    policy: BatchPolicy,
    waiting: Arc<AtomicUsize>,
    intra_op_threads: usize,
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
        policy: BatchPolicy,
        counters: Arc<ThreadCounters>,
    ) -> std::io::Result<ExecutorPool> {
        let (queue, jobs) = crossbeam_channel::bounded::<Job>(queue_capacity);
        let waiting = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            outputs,
            policy,
            waiting: Arc::clone(&waiting),
            intra_op_threads,
        });
        let mut exited = Vec::with_capacity(modules.len());
        for (instance_idx, module) in modules.into_iter().enumerate() {
            let (exit_tx, exit_rx) = oneshot::channel::<()>();
            let jobs = jobs.clone();
            let shared = Arc::clone(&shared);
            let counters = Arc::clone(&counters);
            counters.executors.fetch_add(1, Ordering::Relaxed);
            counters
                .torch_threads
                .fetch_add(intra_op_threads, Ordering::Relaxed);
            std::thread::Builder::new()
                .name(format!("exec:{label}#{instance_idx}"))
                .spawn(move || {
                    run_executor(module, jobs, &shared);
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
            waiting,
            exited: parking_lot::Mutex::new(exited),
            capacity: queue_capacity,
            label: label.to_owned(),
        })
    }

    /// Queues a job without waiting: with `max_queue_size` jobs already
    /// waiting, it is refused at once.
    pub fn submit(&self, job: Job) -> Result<(), Error> {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(self.full());
        }
        match self.queue.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                Err(self.full())
            }
            Err(TrySendError::Disconnected(_)) => {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                Err(Error::Unavailable("executors have stopped".into()))
            }
        }
    }

    fn full(&self) -> Error {
        Error::ResourceExhausted(format!(
            "model '{}': queue is full, {} requests already waiting (max_queue_size = {})",
            self.label, self.capacity, self.capacity
        ))
    }

    /// Requests waiting to run.
    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Receivers that complete when each executor thread has ended and freed
    /// its module. Taken once, by whoever unloads the model.
    pub fn take_exit_waiters(&self) -> Vec<oneshot::Receiver<()>> {
        std::mem::take(&mut *self.exited.lock())
    }
}

impl Shared {
    /// Answers and drops a job that should not run: its caller has gone, or
    /// its deadline has passed. Returns the job if it may run.
    fn admit(&self, job: Job, now: Instant) -> Option<Job> {
        if job.reply.is_closed() {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        if let Some(deadline) = job.deadline
            && deadline <= now
        {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            let waited = now.duration_since(job.enqueued);
            let _ = job.reply.send(Err(Error::DeadlineExceeded(format!(
                "request timed out in the queue after {} µs (its timeout was {} µs)",
                waited.as_micros(),
                deadline.duration_since(job.enqueued).as_micros()
            ))));
            return None;
        }
        Some(job)
    }

    /// Drops from `batch` the jobs that may no longer run.
    fn purge(&self, batch: &mut Vec<Job>, now: Instant) {
        let jobs = std::mem::take(batch);
        batch.extend(jobs.into_iter().filter_map(|job| self.admit(job, now)));
    }
}

fn run_executor(module: TorchModule, jobs: Receiver<Job>, shared: &Shared) {
    torch::set_intra_op_threads(shared.intra_op_threads);
    let policy = &shared.policy;
    // A job taken while gathering a batch that could not join it.
    let mut carried: Option<Job> = None;
    loop {
        let job = match carried.take() {
            Some(job) => job,
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
        };
        let Some(first) = shared.admit(job, Instant::now()) else {
            continue;
        };
        if !policy.enabled() {
            execute(&module, vec![first], shared);
            continue;
        }
        let flush_at = first.enqueued + policy.max_queue_delay;
        let mut rows = first.rows;
        let mut batch = vec![first];
        while rows < policy.max_batch_size {
            if jobs.is_empty() && policy.preferred_batch_sizes.contains(&rows) {
                break;
            }
            let next = match jobs.try_recv() {
                Ok(job) => job,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= flush_at {
                        break;
                    }
                    // Wake for the flush, or for the first deadline in the batch.
                    let wake = batch
                        .iter()
                        .filter_map(|job| job.deadline)
                        .fold(flush_at, Instant::min);
                    match jobs.recv_deadline(wake.max(now)) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout) => {
                            shared.purge(&mut batch, Instant::now());
                            if batch.is_empty() {
                                break;
                            }
                            rows = batch.iter().map(|job| job.rows).sum();
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            let Some(next) = shared.admit(next, Instant::now()) else {
                continue;
            };
            if rows + next.rows > policy.max_batch_size || !batchable(&batch[0], &next) {
                carried = Some(next);
                break;
            }
            rows += next.rows;
            batch.push(next);
        }
        // Callers may have gone while the batch gathered.
        shared.purge(&mut batch, Instant::now());
        if !batch.is_empty() {
            execute(&module, batch, shared);
        }
    }
    if let Some(job) = carried {
        // The queue closed while this job was carried: nobody will run it.
        shared.waiting.fetch_sub(1, Ordering::AcqRel);
        let _ = job
            .reply
            .send(Err(Error::Unavailable("executors have stopped".into())));
    }
    drop(module);
}

/// Whether two jobs may share a forward pass: the same dtypes and the same
/// dims after the batch dimension, input by input.
fn batchable(a: &Job, b: &Job) -> bool {
    a.inputs.len() == b.inputs.len()
        && a.inputs.iter().zip(&b.inputs).all(|(x, y)| {
            x.dtype() == y.dtype()
                && x.dtype() != DType::Bytes
                && x.shape().get(1..) == y.shape().get(1..)
        })
}

/// Runs `batch` (one or more compatible jobs) as one forward pass and
/// answers every job.
fn execute(module: &TorchModule, batch: Vec<Job>, shared: &Shared) {
    let started = Instant::now();
    shared.waiting.fetch_sub(batch.len(), Ordering::AcqRel);
    let rows: usize = batch.iter().map(|job| job.rows).sum();
    let res = if let [job] = &batch[..] {
        forward(module, &job.inputs, &shared.outputs)
    } else {
        concat_inputs(&batch, rows)
            .and_then(|inputs| forward(module, &inputs, &shared.outputs))
            .and_then(|outputs| split_outputs(outputs, &batch, rows))
    };
    let compute = started.elapsed();
    match res {
        Ok(outputs) if batch.len() == 1 => {
            let job = batch.into_iter().next().expect("one job");
            let _ = job.reply.send(Ok(Executed {
                outputs,
                queue: started.duration_since(job.enqueued),
                compute,
                batch_rows: rows,
                leader: true,
            }));
        }
        Ok(outputs) => {
            // `split_outputs` gave each job's outputs in a row, job by job.
            let n_outputs = shared.outputs.len();
            let mut outputs = outputs.into_iter();
            for (idx, job) in batch.into_iter().enumerate() {
                let mine: Vec<Tensor> = outputs.by_ref().take(n_outputs).collect();
                let _ = job.reply.send(Ok(Executed {
                    outputs: mine,
                    queue: started.duration_since(job.enqueued),
                    compute,
                    batch_rows: rows,
                    leader: idx == 0,
                }));
            }
        }
        Err(err) => {
            for job in batch {
                let _ = job.reply.send(Err(err.clone()));
            }
        }
    }
}

fn forward(
    module: &TorchModule,
    inputs: &[Tensor],
    outputs: &[TensorSpec],
) -> Result<Vec<Tensor>, Error> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        module.forward(inputs, outputs)
    }))
    .unwrap_or_else(|_| Err(Error::Internal("forward panicked".into())))
}

/// Concatenates the jobs' inputs along dim 0. Row-major layout makes that a
/// concatenation of the byte buffers.
fn concat_inputs(batch: &[Job], rows: usize) -> Result<Vec<Tensor>, Error> {
    let first = &batch[0];
    (0..first.inputs.len())
        .map(|idx| {
            let template = &first.inputs[idx];
            let total: usize = batch.iter().map(|job| job.inputs[idx].data().len()).sum();
            let mut data = BytesMut::with_capacity(total);
            for job in batch {
                data.extend_from_slice(job.inputs[idx].data());
            }
            let mut shape = template.shape().to_vec();
            shape[0] = i64::try_from(rows).unwrap_or(i64::MAX);
            Tensor::new(template.name(), template.dtype(), shape, data.freeze())
        })
        .collect()
}

/// Splits each output back by the jobs' rows; returns the outputs job by
/// job (all outputs of the first job, then of the second, ...).
fn split_outputs(outputs: Vec<Tensor>, batch: &[Job], rows: usize) -> Result<Vec<Tensor>, Error> {
    let mut parts: Vec<Vec<Tensor>> = (0..batch.len())
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for output in outputs {
        let shape = output.shape();
        if shape.first().copied() != i64::try_from(rows).ok() {
            return Err(Error::Internal(format!(
                "output '{}': a batch of {rows} rows came back with shape {}; a batching model must keep dim 0 as the batch",
                output.name(),
                shape_str(shape)
            )));
        }
        let data: Bytes = output.data().clone();
        let row_bytes = data.len() / rows;
        let mut offset = 0;
        for (part, job) in parts.iter_mut().zip(batch) {
            let len = row_bytes * job.rows;
            let mut job_shape = shape.to_vec();
            job_shape[0] = i64::try_from(job.rows).unwrap_or(i64::MAX);
            part.push(Tensor::new(
                output.name(),
                output.dtype(),
                job_shape,
                data.slice(offset..offset + len),
            )?);
            offset += len;
        }
    }
    Ok(parts.into_iter().flatten().collect())
}
