//! The threads model loads run on: a fixed set, one per concurrent load
//! the registry allows, alive for the registry's life.
//!
//! Not tokio's blocking pool: libtorch leaves a helper thread behind on the
//! thread that deserialises a large model, and the blocking pool hands each
//! load whichever thread is free, growing and shrinking as it likes, so the
//! helpers piled up (three more every ten 100 MB loads). On a fixed set of
//! threads there is at most one helper per load thread, and the process's
//! thread count is the same after the thousandth load as after the first
//! few.
//!
//! They run at a lower priority than serving ([`LOAD_NICENESS`]): a load
//! deserialising hundreds of megabytes must not take the cores that
//! health checks, listings and other models' requests are waiting for.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

/// How much less CPU weight a load thread has than a serving thread: nice
/// 10 weighs about a tenth of nice 0 in Linux's scheduler. A load still
/// gets whatever cores serving leaves idle, so loads alone run as fast as
/// before; under traffic, serving keeps its cores.
const LOAD_NICENESS: libc::c_int = 10;

/// Lowers the calling thread's scheduling priority to [`LOAD_NICENESS`].
/// On Linux, niceness belongs to each thread, and threads this one starts
/// (libtorch's helpers) inherit it. A failure is only logged.
fn lower_priority() {
    // SAFETY: gettid has no preconditions and returns the caller's thread
    // id; setpriority reads only its three integer arguments.
    let res = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, LOAD_NICENESS)
    };
    if res != 0 {
        tracing::warn!(
            err = %std::io::Error::last_os_error(),
            "could not lower a model load thread's priority"
        );
    }
}

/// Jobs go to the threads in turn, so that `n` loads have visited every
/// thread: each thread's per-thread state exists after the first `n`.
pub(super) struct LoadThreads {
    threads: Vec<Mutex<mpsc::Sender<Job>>>,
    next: AtomicUsize,
}

impl LoadThreads {
    /// Starts `n` threads named `plinth-load-<i>`; they end when this is
    /// dropped.
    pub(super) fn new(n: usize) -> LoadThreads {
        let mut threads = Vec::new();
        for idx in 0..n.max(1) {
            let (tx, rx) = mpsc::channel::<Job>();
            let spawned = std::thread::Builder::new()
                .name(format!("plinth-load-{idx}"))
                .spawn(move || {
                    // Loads deserialise on this thread alone: torch's
                    // intra-op setting is per thread, and at 1 a load takes
                    // one core and never competes with serving for more.
                    plinth_torch::set_intra_op_threads(1);
                    lower_priority();
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                });
            match spawned {
                Ok(_) => threads.push(Mutex::new(tx)),
                Err(err) => tracing::error!(%err, "could not start a model load thread"),
            }
        }
        LoadThreads {
            threads,
            next: AtomicUsize::new(0),
        }
    }

    /// Runs `f` on the next load thread and returns its result; an error if
    /// the job could not run (no thread, or `f` panicked).
    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        if self.threads.is_empty() {
            return Err("no model load thread could be started".to_owned());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(outcome);
        });
        let idx = self.next.fetch_add(1, Ordering::Relaxed) % self.threads.len();
        let sent = self.threads[idx]
            .lock()
            .map_err(|_| "a load thread's queue is poisoned".to_owned())?
            .send(job);
        if sent.is_err() {
            return Err("a load thread has gone".to_owned());
        }
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(panic)) => Err(format!(
                "load task panicked: {}",
                panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default()
            )),
            Err(_) => Err("a load thread ended before answering".to_owned()),
        }
    }
}
