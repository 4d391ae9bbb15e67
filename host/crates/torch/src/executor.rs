//! Executor threads: each instance of a model version is one dedicated OS
//! thread owning its own module copy. They share one queue, so work is spread
//! fairly, and a full queue is refused at once instead of growing.
//!
//! When the model batches (`max_batch_size > 0`), an executor that takes a
//! job keeps taking compatible ones (same dtypes, same non-batch dims) until
//! the batch is full, reaches a preferred size with nothing else waiting, or
//! the first job has waited `max_queue_delay`. The inputs are concatenated
//! along dim 0, `forward` runs once, and the outputs are split back by rows.
//!
//! Every forward pass first takes its cores from the process-wide
//! [`ComputeBudget`], so the number of torch threads computing at once never
//! exceeds the budget, however many models are loaded.
//!
//! The executor is generic over [`Forward`], so its queueing, batching and
//! deadline logic is tested with closures standing in for a model.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use tokio::sync::oneshot;

use plinth_core::tensor::{DType, Tensor, TensorSpec, shape_str};
use plinth_core::{BatchPolicy, Error};

use crate::budget::ComputeBudget;

/// One forward pass of a loaded model. [`crate::TorchModule`] is the real
/// one; tests use closures.
pub trait Forward: Send + 'static {
    /// Runs the model on `inputs` (in the config's order) and names the
    /// outputs after `outputs`. Blocking.
    fn forward(&self, inputs: &[Tensor], outputs: &[TensorSpec]) -> Result<Vec<Tensor>, Error>;

    /// Called once on the executor thread before its first pass.
    fn prepare_thread(&self, _intra_op_threads: usize) {}

    /// The model file's format, for reports; `None` for stand-ins.
    fn format(&self) -> Option<plinth_core::config::ModelFormat> {
        None
    }
}

impl<F> Forward for F
where
    F: Fn(&[Tensor]) -> Result<Vec<Tensor>, Error> + Send + 'static,
{
    fn forward(&self, inputs: &[Tensor], _outputs: &[TensorSpec]) -> Result<Vec<Tensor>, Error> {
        self(inputs)
    }
}

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
    /// What the caller traces the request by, opaque here; `None` when it
    /// is not traced. The first traced job of a forward pass gets every
    /// traced job's tag back ([`Executed::traced_with`]), to record the one
    /// pass linked to each request.
    pub trace: Option<TraceTag>,
}

/// A model's forward pass that may also run on a caller's thread
/// ([`ExecutorPool::try_inline`]): shared by every caller, so `Sync`.
pub type InlineForward =
    Arc<dyn Fn(&[Tensor], &[TensorSpec]) -> Result<Vec<Tensor>, Error> + Send + Sync>;

/// An opaque tag a traced job carries through the executor.
pub type TraceTag = Arc<dyn std::any::Any + Send + Sync>;

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
    /// When the forward pass started (the end of the queue wait).
    pub started: Instant,
    /// For the first traced job of the pass: the tags of every traced job
    /// merged into it, its own first. Empty for every other job.
    pub traced_with: Vec<TraceTag>,
}

/// Threads in use over the whole process, for the thread budget report.
#[derive(Debug, Default)]
pub struct ThreadCounters {
    pub executors: AtomicUsize,
    pub torch_threads: AtomicUsize,
    /// Intra-op threads of the forward passes (and warm-ups) running now,
    /// counted where they run, independently of the budget that limits them.
    computing: AtomicUsize,
    computing_peak: AtomicUsize,
}

/// Counts `n` threads as computing until dropped.
#[derive(Debug)]
pub struct Computing<'a> {
    counters: &'a ThreadCounters,
    n: usize,
}

impl ThreadCounters {
    /// Marks `n` torch threads as computing for the guard's life.
    pub fn computing(&self, n: usize) -> Computing<'_> {
        let now = self.computing.fetch_add(n, Ordering::AcqRel) + n;
        self.computing_peak.fetch_max(now, Ordering::AcqRel);
        Computing { counters: self, n }
    }

    /// `(threads computing now, the most ever computing at once)`.
    pub fn computing_now_and_peak(&self) -> (usize, usize) {
        (
            self.computing.load(Ordering::Acquire),
            self.computing_peak.load(Ordering::Acquire),
        )
    }
}

impl Drop for Computing<'_> {
    fn drop(&mut self) {
        self.counters.computing.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// How a pool's threads run: their intra-op thread count (already clamped
/// to the budget), the budget they draw cores from, the process counters.
#[derive(Debug, Clone)]
pub struct ExecutorThreads {
    pub intra_op_threads: usize,
    pub budget: Arc<ComputeBudget>,
    pub counters: Arc<ThreadCounters>,
    /// How long an idle executor polls its queue before it parks
    /// (`--executor-spin-us`): a job that comes within it starts without a
    /// wake-up of the thread. Zero parks at once.
    pub spin: Duration,
}

pub struct ExecutorPool {
    queue: Sender<Job>,
    shared: Arc<Shared>,
    /// Small requests' forward passes may run on the caller's thread: the
    /// pass, and the most input bytes a request may carry for it.
    inline: Option<(InlineForward, usize)>,
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
    budget: Arc<ComputeBudget>,
    counters: Arc<ThreadCounters>,
    spin: Duration,
}

impl ExecutorPool {
    /// Jobs submitted and not yet started (or answered without running).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Starts one thread per module. Threads end, and drop their module (and
    /// its memory), once the pool and every job sender are gone.
    pub fn start<M: Forward>(
        label: &str,
        modules: Vec<M>,
        outputs: Arc<[TensorSpec]>,
        queue_capacity: usize,
        policy: BatchPolicy,
        threads: &ExecutorThreads,
    ) -> std::io::Result<ExecutorPool> {
        let intra_op_threads = threads.intra_op_threads;
        let (queue, jobs) = crossbeam_channel::bounded::<Job>(queue_capacity);
        let waiting = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            outputs,
            policy,
            waiting: Arc::clone(&waiting),
            intra_op_threads,
            budget: Arc::clone(&threads.budget),
            counters: Arc::clone(&threads.counters),
            spin: threads.spin,
        });
        let mut exited = Vec::with_capacity(modules.len());
        for (instance_idx, module) in modules.into_iter().enumerate() {
            let shared_for_thread = Arc::clone(&shared);
            let (exit_tx, exit_rx) = oneshot::channel::<()>();
            let jobs = jobs.clone();
            let shared = shared_for_thread;
            let counters = Arc::clone(&threads.counters);
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
            shared,
            inline: None,
            waiting,
            exited: parking_lot::Mutex::new(exited),
            capacity: queue_capacity,
            label: label.to_owned(),
        })
    }

    /// Lets requests of at most `max_bytes` input bytes run `forward` on
    /// their own thread ([`ExecutorPool::try_inline`]).
    pub fn set_inline(&mut self, forward: InlineForward, max_bytes: usize) {
        self.inline = Some((forward, max_bytes));
    }

    /// Runs a request's forward pass on the calling thread, without the hop
    /// to an executor and back, when all of these hold: inline passes are
    /// on for this pool, the inputs are no larger than its bound, nothing
    /// waits in the queue (so nobody is overtaken), and the budget has the
    /// pass's cores free now (so the process never computes on more cores
    /// than the budget, as on the executors). Otherwise hands the inputs
    /// and trace tag back, to be queued as usual.
    #[allow(clippy::result_large_err)]
    pub fn try_inline(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        enqueued: Instant,
        trace: Option<TraceTag>,
    ) -> Result<Result<Executed, Error>, (Vec<Tensor>, Option<TraceTag>)> {
        let Some((forward, max_bytes)) = &self.inline else {
            return Err((inputs, trace));
        };
        let bytes: usize = inputs.iter().map(|t| t.data().len()).sum();
        if bytes > *max_bytes || self.waiting.load(Ordering::Acquire) != 0 {
            return Err((inputs, trace));
        }
        let shared = &self.shared;
        let Some(cores) = shared.budget.try_acquire(shared.intra_op_threads) else {
            return Err((inputs, trace));
        };
        let computing = shared.counters.computing(shared.intra_op_threads);
        let started = Instant::now();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            forward(&inputs, &shared.outputs)
        }))
        .unwrap_or_else(|_| Err(Error::Internal("forward panicked".into())));
        let compute = started.elapsed();
        drop((computing, cores));
        Ok(res.map(|outputs| Executed {
            outputs,
            queue: started.duration_since(enqueued),
            compute,
            batch_rows: rows,
            leader: true,
            started,
            traced_with: trace.into_iter().collect(),
        }))
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

fn run_executor<M: Forward>(module: M, jobs: Receiver<Job>, shared: &Shared) {
    module.prepare_thread(shared.intra_op_threads);
    let policy = &shared.policy;
    // A job taken while gathering a batch that could not join it.
    let mut carried: Option<Job> = None;
    loop {
        let job = match carried.take() {
            Some(job) => job,
            None => match next_job(&jobs, shared.spin) {
                Some(job) => job,
                None => break,
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

/// The next job, or `None` once the queue has closed: polled for up to
/// `spin` first, then waited for parked.
fn next_job(jobs: &Receiver<Job>, spin: Duration) -> Option<Job> {
    if !spin.is_zero() {
        let until = Instant::now() + spin;
        while Instant::now() < until {
            match jobs.try_recv() {
                Ok(job) => return Some(job),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => std::hint::spin_loop(),
            }
        }
    }
    jobs.recv().ok()
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
fn execute<M: Forward>(module: &M, batch: Vec<Job>, shared: &Shared) {
    // Waiting for cores is waiting in the queue; the pass starts once it has them.
    let cores = shared.budget.acquire(shared.intra_op_threads);
    let computing = shared.counters.computing(shared.intra_op_threads);
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
    // The cores go back before anyone is answered: a caller that has its
    // answer sees them free.
    drop((computing, cores));
    // The first traced job records the pass for all of them.
    let mut traced: Vec<TraceTag> = batch.iter().filter_map(|job| job.trace.clone()).collect();
    let trace_leader = batch.iter().position(|job| job.trace.is_some());
    match res {
        Ok(outputs) if batch.len() == 1 => {
            let job = batch.into_iter().next().expect("one job");
            let _ = job.reply.send(Ok(Executed {
                outputs,
                queue: started.duration_since(job.enqueued),
                compute,
                batch_rows: rows,
                leader: true,
                started,
                traced_with: traced,
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
                    started,
                    traced_with: if Some(idx) == trace_leader {
                        std::mem::take(&mut traced)
                    } else {
                        Vec::new()
                    },
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

fn forward<M: Forward>(
    module: &M,
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

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use parking_lot::Mutex;

    use super::*;

    /// What a scenario's model saw: one line per forward pass, the first
    /// value of each row it ran.
    #[derive(Default)]
    struct Seen {
        passes: Mutex<Vec<String>>,
        /// The first pass waits here until every other job is queued.
        gate: Mutex<Option<mpsc::Receiver<()>>>,
    }

    /// One job of a scenario: its first value (which names it) and its rows.
    /// `width` is the size of the non-batch dim: jobs of different widths
    /// cannot share a pass.
    #[derive(Clone, Copy)]
    struct Spec {
        id: f32,
        rows: usize,
        width: usize,
        /// Past its queue deadline already when it is submitted.
        expired: bool,
        /// Its caller has gone before it runs.
        abandoned: bool,
    }

    fn job(id: f32, rows: usize) -> Spec {
        Spec {
            id,
            rows,
            width: 1,
            expired: false,
            abandoned: false,
        }
    }

    fn input(spec: Spec) -> Tensor {
        let values = vec![spec.id; spec.rows * spec.width];
        Tensor::from_f32("x", vec![spec.rows as i64, spec.width as i64], &values)
            .expect("a valid tensor")
    }

    /// Queues one job of one row, no deadline, untraced; its answer.
    fn submit_one(
        pool: &ExecutorPool,
        inputs: Vec<Tensor>,
    ) -> oneshot::Receiver<Result<Executed, Error>> {
        let (reply, answer) = oneshot::channel();
        pool.submit(Job {
            inputs,
            rows: 1,
            reply,
            enqueued: Instant::now(),
            deadline: None,
            trace: None,
        })
        .expect("queued");
        answer
    }

    fn outputs() -> Arc<[TensorSpec]> {
        vec![TensorSpec {
            name: "y".into(),
            dtype: DType::F32,
            shape: vec![-1],
        }]
        .into()
    }

    /// Runs job 0 (the gate) and, while it holds the only executor, queues
    /// `jobs`; then lets everything run. Returns the passes the model saw and
    /// each job's answer, one line each.
    fn run(policy: BatchPolicy, capacity: usize, jobs: &[Spec]) -> String {
        run_spinning(policy, capacity, jobs, Duration::ZERO)
    }

    /// [`run`] with executors that poll their queue for `spin` before parking.
    fn run_spinning(policy: BatchPolicy, capacity: usize, jobs: &[Spec], spin: Duration) -> String {
        let policy_rows = policy.max_batch_size.max(1);
        let seen = Arc::new(Seen::default());
        let (open_gate, gate) = mpsc::channel();
        *seen.gate.lock() = Some(gate);
        let model = {
            let seen = Arc::clone(&seen);
            move |inputs: &[Tensor]| -> Result<Vec<Tensor>, Error> {
                let x = &inputs[0];
                let values = x.to_f32().expect("f32 input");
                let width = x.shape()[1] as usize;
                // The jobs of the pass, in order: each row starts with its job's id.
                let mut firsts: Vec<String> =
                    values.chunks(width).map(|row| row[0].to_string()).collect();
                firsts.dedup();
                if let Some(gate) = seen.gate.lock().take() {
                    gate.recv().expect("the gate opens");
                }
                seen.passes.lock().push(firsts.join(" "));
                Ok(vec![Tensor::new(
                    "y",
                    DType::F32,
                    x.shape().to_vec(),
                    x.data().clone(),
                )?])
            }
        };
        let threads = ExecutorThreads {
            intra_op_threads: 1,
            budget: Arc::new(ComputeBudget::new(1)),
            counters: Arc::default(),
            spin,
        };
        let pool = ExecutorPool::start("m:1", vec![model], outputs(), capacity, policy, &threads)
            .expect("threads start");
        let submit = |spec: Spec| {
            let (reply, answer) = oneshot::channel();
            let enqueued = Instant::now();
            let deadline = spec.expired.then(|| enqueued - Duration::from_millis(1));
            let submitted = pool.submit(Job {
                inputs: vec![input(spec)],
                rows: spec.rows,
                reply,
                enqueued,
                deadline,
                trace: None,
            });
            (spec, submitted, answer)
        };
        // The gate fills a whole batch, so it runs at once rather than
        // gathering the jobs queued behind it.
        let (_, first, first_answer) = submit(job(0., policy_rows));
        first.expect("the gate job is queued");
        // The gate job holds the executor once the queue is empty again.
        while pool.queue_depth() > 0 {
            std::thread::yield_now();
        }
        let mut answers = vec![];
        for spec in jobs {
            let (spec, submitted, answer) = submit(*spec);
            answers.push(match submitted {
                Err(err) => Err(format!("{}: refused: {err}", spec.id)),
                Ok(()) if spec.abandoned => {
                    drop(answer);
                    Err(format!("{}: abandoned", spec.id))
                }
                Ok(()) => Ok((spec, answer)),
            });
        }
        open_gate.send(()).expect("the gate job waits");
        first_answer
            .blocking_recv()
            .expect("answered")
            .expect("ran");
        let answers: Vec<String> = answers
            .into_iter()
            .map(|answer| match answer {
                Err(line) => line,
                Ok((spec, answer)) => match answer.blocking_recv() {
                    Ok(Ok(executed)) => format!(
                        "{}: ok rows={} pass_rows={} leader={}",
                        spec.id,
                        executed.outputs[0].shape()[0],
                        executed.batch_rows,
                        executed.leader
                    ),
                    Ok(Err(err)) => format!("{}: {err}", spec.id),
                    Err(_) => format!("{}: dropped", spec.id),
                },
            })
            .collect();
        // Every executor has ended once the pool is gone and its waiters fire.
        let waiters = pool.take_exit_waiters();
        drop(pool);
        for waiter in waiters {
            let _ = waiter.blocking_recv();
        }
        let passes = seen.passes.lock().join(" | ");
        format!("passes: {passes}\n{}", answers.join("\n"))
    }

    fn check(policy: BatchPolicy, capacity: usize, jobs: &[Spec], expect: &str) {
        assert_eq!(run(policy, capacity, jobs), expect.trim());
    }

    fn batching(max_batch_size: usize) -> BatchPolicy {
        BatchPolicy {
            max_batch_size,
            // Long enough that only the queue running dry or a full batch ends one.
            max_queue_delay: Duration::from_secs(60),
            preferred_batch_sizes: vec![],
        }
    }

    #[test]
    fn a_spinning_executor_answers_as_a_parked_one_does_and_exits_with_its_pool() {
        // With a spin far longer than the test, the executor must still take
        // every job, batch as before, and end when the pool is dropped.
        let jobs = [job(1., 1), job(2., 2), job(3., 1)];
        for policy in [BatchPolicy::default(), batching(4)] {
            assert_eq!(
                run_spinning(policy.clone(), 8, &jobs, Duration::from_secs(3600)),
                run(policy, 8, &jobs)
            );
        }
    }

    #[test]
    fn without_batching_every_job_is_its_own_pass() {
        check(
            BatchPolicy::default(),
            8,
            &[job(1., 1), job(2., 2)],
            "
passes: 0 | 1 | 2
1: ok rows=1 pass_rows=1 leader=true
2: ok rows=2 pass_rows=2 leader=true",
        );
    }

    #[test]
    fn queued_jobs_merge_into_one_pass_and_split_back() {
        check(
            batching(4),
            8,
            &[job(1., 1), job(2., 2), job(3., 1)],
            "
passes: 0 | 1 2 3
1: ok rows=1 pass_rows=4 leader=true
2: ok rows=2 pass_rows=4 leader=false
3: ok rows=1 pass_rows=4 leader=false",
        );
    }

    #[test]
    fn a_full_batch_runs_and_the_rest_waits_for_the_next() {
        let mut preferred = batching(3);
        preferred.max_queue_delay = Duration::ZERO;
        check(
            preferred,
            8,
            &[job(1., 2), job(2., 2)],
            "
passes: 0 | 1 | 2
1: ok rows=2 pass_rows=2 leader=true
2: ok rows=2 pass_rows=2 leader=true",
        );
    }

    #[test]
    fn jobs_of_other_shapes_are_never_merged() {
        let wide = Spec {
            width: 2,
            ..job(2., 1)
        };
        let mut no_wait = batching(8);
        no_wait.max_queue_delay = Duration::ZERO;
        check(
            no_wait,
            8,
            &[job(1., 1), wide, job(3., 1)],
            "
passes: 0 | 1 | 2 | 3
1: ok rows=1 pass_rows=1 leader=true
2: ok rows=1 pass_rows=1 leader=true
3: ok rows=1 pass_rows=1 leader=true",
        );
    }

    #[test]
    fn a_full_queue_refuses_at_once() {
        check(
            BatchPolicy::default(),
            2,
            &[job(1., 1), job(2., 1), job(3., 1)],
            "
passes: 0 | 1 | 2
1: ok rows=1 pass_rows=1 leader=true
2: ok rows=1 pass_rows=1 leader=true
3: refused: model 'm:1': queue is full, 2 requests already waiting (max_queue_size = 2)",
        );
    }

    #[test]
    fn expired_and_abandoned_jobs_never_run() {
        let expired = Spec {
            expired: true,
            ..job(1., 1)
        };
        let abandoned = Spec {
            abandoned: true,
            ..job(2., 1)
        };
        let answer = run(BatchPolicy::default(), 8, &[expired, abandoned, job(3., 1)]);
        let (passes, rest) = answer.split_once('\n').unwrap();
        assert_eq!(passes, "passes: 0 | 3");
        let lines: Vec<&str> = rest.lines().collect();
        assert!(
            lines[0].starts_with("1: request timed out in the queue after"),
            "{}",
            lines[0]
        );
        assert_eq!(
            &lines[1..],
            ["2: abandoned", "3: ok rows=1 pass_rows=1 leader=true"]
        );
    }

    #[test]
    fn a_failing_pass_answers_every_job_of_the_batch() {
        let threads = ExecutorThreads {
            intra_op_threads: 1,
            budget: Arc::new(ComputeBudget::new(1)),
            counters: Arc::default(),
            spin: Duration::ZERO,
        };
        let failing =
            |_: &[Tensor]| -> Result<Vec<Tensor>, Error> { Err(Error::Internal("boom".into())) };
        let pool = ExecutorPool::start(
            "m:1",
            vec![failing],
            outputs(),
            4,
            BatchPolicy::default(),
            &threads,
        )
        .unwrap();
        let answer = submit_one(&pool, vec![input(job(1., 1))]);
        let err = answer.blocking_recv().unwrap().unwrap_err();
        assert_eq!(err, Error::Internal("boom".into()));
        assert_eq!(threads.counters.executors.load(Ordering::Relaxed), 1);
        let waiters = pool.take_exit_waiters();
        drop(pool);
        for waiter in waiters {
            // Completes (closed) once the thread has ended and dropped its module.
            let _ = waiter.blocking_recv();
        }
        assert_eq!(threads.counters.executors.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn passes_of_every_pool_stay_within_the_budget() {
        // Four single-executor pools, each asking for two cores, on a budget
        // of two: never more than one pass at a time.
        let budget = Arc::new(ComputeBudget::new(2));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads = ExecutorThreads {
            intra_op_threads: 2,
            budget: Arc::clone(&budget),
            counters: Arc::default(),
            spin: Duration::ZERO,
        };
        let pools: Vec<ExecutorPool> = (0..4)
            .map(|idx| {
                let (running, most) = (Arc::clone(&running), Arc::clone(&most));
                let model = move |inputs: &[Tensor]| -> Result<Vec<Tensor>, Error> {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(2));
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(inputs.to_vec())
                };
                ExecutorPool::start(
                    &format!("m{idx}:1"),
                    vec![model],
                    outputs(),
                    64,
                    BatchPolicy::default(),
                    &threads,
                )
                .unwrap()
            })
            .collect();
        let mut answers = vec![];
        for _ in 0..16 {
            for pool in &pools {
                answers.push(submit_one(pool, vec![input(job(1., 1))]));
            }
        }
        for answer in answers {
            answer.blocking_recv().unwrap().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 1);
        // Counted where the passes ran, independently of the budget.
        assert_eq!(threads.counters.computing_now_and_peak(), (0, 2));
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn small_requests_run_inline_only_when_nothing_waits_and_a_core_is_free() {
        let budget = Arc::new(ComputeBudget::new(1));
        let threads = ExecutorThreads {
            intra_op_threads: 1,
            budget: Arc::clone(&budget),
            counters: Arc::default(),
            spin: Duration::ZERO,
        };
        // The executor's module blocks until released, so the queue can be
        // held non-empty.
        let (release, released) = crossbeam_channel::unbounded::<()>();
        let executor_module = move |inputs: &[Tensor]| -> Result<Vec<Tensor>, Error> {
            let _ = released.recv();
            Ok(vec![inputs[0].clone().with_name("y")])
        };
        let mut pool = ExecutorPool::start(
            "m:1",
            vec![executor_module],
            outputs(),
            4,
            BatchPolicy::default(),
            &threads,
        )
        .unwrap();
        let ran_on = Arc::new(parking_lot::Mutex::new(None));
        let seen = Arc::clone(&ran_on);
        pool.set_inline(
            Arc::new(move |inputs: &[Tensor], _: &[TensorSpec]| {
                *seen.lock() = Some(std::thread::current().id());
                Ok(vec![inputs[0].clone().with_name("y")])
            }),
            8,
        );
        let small = || vec![Tensor::from_f32("x", vec![2], &[1.0, 2.0]).unwrap()];
        // Nothing queued, a core free, 8 bytes: inline, on this thread.
        let Ok(executed) = pool.try_inline(small(), 1, Instant::now(), None) else {
            panic!("a small request with nothing queued must run inline");
        };
        let executed = executed.unwrap();
        assert_eq!(executed.outputs[0].to_f32().unwrap(), [1.0, 2.0]);
        assert!(executed.leader);
        assert_eq!(*ran_on.lock(), Some(std::thread::current().id()));
        assert_eq!(budget.in_use(), 0);
        // Too large: handed back untouched.
        let large = vec![Tensor::from_f32("x", vec![3], &[1.0, 2.0, 3.0]).unwrap()];
        let (back, _) = pool
            .try_inline(large, 1, Instant::now(), None)
            .err()
            .unwrap();
        assert_eq!(back[0].numel(), 3);
        // The budget's only core held: handed back.
        let held = budget.acquire(1);
        assert!(pool.try_inline(small(), 1, Instant::now(), None).is_err());
        drop(held);
        // A job waiting in the queue: handed back, so nobody is overtaken.
        let answer = submit_one(&pool, small());
        assert!(pool.try_inline(small(), 1, Instant::now(), None).is_err());
        release.send(()).unwrap();
        assert_eq!(
            answer.blocking_recv().unwrap().unwrap().outputs[0].numel(),
            2
        );
        drop(release);
    }
}
