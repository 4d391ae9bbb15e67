//! Step two of a load: read the config and the files, deserialise, warm up
//! and validate, and only then start the executor threads. Blocking; runs on
//! the blocking pool with no lock held.

use std::path::Path;
use std::sync::Arc;

use plinth_torch::executor::{ExecutorThreads, ThreadCounters};
use plinth_torch::{AotiPackage, ComputeBudget, Module, PackageInfo, TorchModule};
use tokio_util::sync::CancellationToken;

use super::ready::ReadyModel;
use crate::config::{ModelConfig, ModelFormat, ModelRepository};
use crate::error::Error;
use crate::tensor::{Tensor, shape_str};

/// What step two needs from the registry.
#[derive(Debug, Clone)]
pub(super) struct LoadContext {
    pub(super) budget: Arc<ComputeBudget>,
    pub(super) counters: Arc<ThreadCounters>,
    /// Set when the registry shuts down: a load that sees it starts no threads.
    pub(super) closing: CancellationToken,
    /// Each executor's poll before it parks.
    pub(super) spin: std::time::Duration,
    /// Requests of at most this many input bytes may run their forward
    /// pass on their own thread (`--inline-forward-max-bytes`; 0: never).
    pub(super) inline_max_bytes: usize,
    /// The serving series each started version records into.
    pub(super) metrics: super::series::ServingMetrics,
}

/// A loaded, warmed-up model whose executor threads have not started:
/// calling it starts them. It is called on the registry's side, not on the
/// load thread, because a thread inherits its creator's niceness on Linux:
/// executors started on a load thread (nice 10) would serve at a tenth of a
/// serving thread's weight, and lose their cores to the loads.
pub(super) type Start = Box<dyn FnOnce() -> Result<ReadyModel, String> + Send>;

/// Step two of a load. Blocking: file I/O, deserialisation, warm-up.
pub(super) fn load_model(
    repository: &ModelRepository,
    name: &str,
    context: &LoadContext,
) -> Result<Start, String> {
    let dir = repository.model_dir(name);
    let config = ModelConfig::load(&dir)?;
    if config.orchestrator.is_some() {
        // Nothing to load: the plugin answers, and the plugin host owns it.
        let (name, metrics) = (name.to_owned(), context.metrics.clone());
        return Ok(Box::new(move || {
            Ok(ReadyModel::orchestrated(&name, config).with_series(&metrics))
        }));
    }
    plinth_torch::check_device(config.device)?;
    let chosen = repository.select_versions(name, &config.version_policy)?;
    let intra_op_threads = intra_op_threads(name, &config, &context.budget);

    let mut prepared = Vec::with_capacity(chosen.len());
    let mut memory_bytes = Vec::with_capacity(chosen.len());
    // What each executor computes on: the config's (or the budget's share),
    // raised to what a package's kernels were compiled to use.
    let mut threads = intra_op_threads;
    for (version, file) in chosen {
        let (modules, bytes) = match ModelFormat::of_path(&file) {
            Some(ModelFormat::AotiPackage) => {
                let (modules, bytes, compiled) = load_package(&file, &config)?;
                if let Some(n) = compiled {
                    threads = threads.max(package_threads(
                        name,
                        &file,
                        n,
                        intra_op_threads,
                        &context.budget,
                    )?);
                }
                (modules, bytes)
            }
            _ => load_torchscript(&file, &config)?,
        };
        memory_bytes.push(bytes);
        // The warm-up is torch work too: it runs on the budget.
        let cores = context.budget.acquire(threads);
        let computing = context.counters.computing(threads);
        warm_up_alone(&modules[0], &config, threads)
            .map_err(|err| format!("{}: warm-up: {err}", file.display()))?;
        drop((computing, cores));
        prepared.push((version, modules));
    }
    let threads = ExecutorThreads {
        intra_op_threads: threads,
        budget: Arc::clone(&context.budget),
        counters: Arc::clone(&context.counters),
        spin: context.spin,
    };
    // A pass inline would skip a batch's gathering, so only models that do
    // not wait to gather may take it.
    let inline = context.inline_max_bytes > 0
        && (!config.batching.enabled() || config.batching.max_queue_delay.is_zero());
    let inline_modules: Vec<Module> = if inline {
        prepared
            .iter()
            .map(|(_, modules)| modules[0].clone())
            .collect()
    } else {
        Vec::new()
    };
    let (name, context) = (name.to_owned(), context.clone());
    Ok(Box::new(move || {
        // Every version validated: only now start threads, unless the
        // registry is shutting down (its drain must not race with new
        // executors).
        if context.closing.is_cancelled() {
            return Err("the server is shutting down".into());
        }
        ReadyModel::start(&name, config, prepared, &threads)
            .map(|mut model| {
                model.set_inline(inline_modules, context.inline_max_bytes);
                model
                    .with_memory_bytes(&memory_bytes)
                    .with_series(&context.metrics)
            })
            .map_err(|err| format!("starting executor threads: {err}"))
    }))
}

/// Runs the warm-up on a thread of its own that ends with it, computing on
/// `threads` intra-op threads. libtorch's OpenMP team belongs to the thread
/// that computes and lives as long as that thread: on the load thread it
/// would sit beside the executors' teams for the server's life, and past
/// one OpenMP thread per core libgomp sleeps at barriers instead of
/// spinning, which slowed every pass in the process 3–5× (the `.pt2` rows
/// of docs/BENCHMARKS.md). The load thread itself stays at one intra-op
/// thread, so deserialising never opens a team.
fn warm_up_alone(module: &Module, config: &ModelConfig, threads: usize) -> Result<(), String> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("plinth-warm-up".into())
            .spawn_scoped(scope, || {
                plinth_torch::set_intra_op_threads(threads);
                warm_up(module, config)
            })
            .map_err(|err| format!("starting the warm-up thread: {err}"))?
            .join()
            .unwrap_or_else(|_| Err("the warm-up panicked".into()))
    })
}

/// One TorchScript module per instance, and the bytes they keep in memory.
fn load_torchscript(file: &Path, config: &ModelConfig) -> Result<(Vec<Module>, u64), String> {
    // A regular file is read by libtorch straight into the tensors;
    // anything else (a pipe) is read whole once, then deserialised.
    let regular = std::fs::metadata(file)
        .map_err(|err| format!("{}: cannot read: {err}", file.display()))?
        .is_file();
    let bytes = if regular {
        None
    } else {
        Some(std::fs::read(file).map_err(|err| format!("{}: cannot read: {err}", file.display()))?)
    };
    let mut modules = Vec::with_capacity(config.instances);
    for _ in 0..config.instances {
        let module = match &bytes {
            None => TorchModule::load_file(file, config.device),
            Some(bytes) => TorchModule::load_bytes(bytes, config.device),
        };
        let module = module.map_err(|err| format!("{}: {err}", file.display()))?;
        modules.push(Module::Script(Arc::new(module)));
    }
    let tensor_bytes = match &bytes {
        None => file_tensor_bytes(file)?,
        Some(bytes) => plinth_torch::archive_tensor_bytes(std::io::Cursor::new(bytes))
            .map_err(|err| format!("{}: {err}", file.display()))?,
    };
    Ok((modules, tensor_bytes * config.instances as u64))
}

/// An AOTInductor package, checked against this host and the config before
/// its library is mapped, loaded once with a runner per instance and shared
/// by the instances' executor threads; and the bytes it keeps in memory.
fn load_package(
    file: &Path,
    config: &ModelConfig,
) -> Result<(Vec<Module>, u64, Option<usize>), String> {
    let named = |err: String| format!("{}: {err}", file.display());
    let info = PackageInfo::read(file).map_err(named)?;
    info.check(config).map_err(named)?;
    let batches = config.max_batch_size > 0;
    let package =
        AotiPackage::load(file, &info, config.instances, config.device, batches).map_err(named)?;
    let package = Module::Package(Arc::new(package));
    Ok((
        vec![package; config.instances],
        info.bytes,
        info.compiled_threads,
    ))
}

/// The threads a package's executors compute on: what its kernels were
/// compiled for (`compiled`), which no intra-op setting changes, counted
/// against the budget in full. More than the whole budget fails the load.
fn package_threads(
    name: &str,
    file: &Path,
    compiled: usize,
    configured: usize,
    budget: &ComputeBudget,
) -> Result<usize, String> {
    if compiled > budget.limit() {
        return Err(format!(
            "{}: the package's kernels run on {compiled} threads, fixed when it was compiled (num_threads({compiled})), more than the compute budget of {} cores (--threads); re-export it with torch._inductor.config.cpp.threads = {configured}",
            file.display(),
            budget.limit()
        ));
    }
    if compiled != configured {
        tracing::warn!(
            model = name,
            package = %file.display(),
            compiled,
            configured,
            "the package's kernels were compiled for {compiled} threads and compute on that many whatever intra_op_threads says; its executors count {compiled} against the budget (re-export with torch._inductor.config.cpp.threads to change it)"
        );
    }
    Ok(compiled)
}

/// The bytes of the tensors the archive at `file` (a regular file) holds,
/// with errors named by the file. Blocking.
pub(super) fn file_tensor_bytes(file: &std::path::Path) -> Result<u64, String> {
    std::fs::File::open(file)
        .map_err(|err| format!("cannot read: {err}"))
        .and_then(plinth_torch::archive_tensor_bytes)
        .map_err(|err| format!("{}: {err}", file.display()))
}

/// The intra-op threads of each executor of the model: its config's
/// `intra_op_threads`, else the budget shared among its instances; never more
/// than the whole budget (a larger request is clamped, with a warning).
fn intra_op_threads(name: &str, config: &ModelConfig, budget: &ComputeBudget) -> usize {
    match config.intra_op_threads {
        Some(requested) => {
            let granted = budget.clamp(requested);
            if granted != requested {
                tracing::warn!(
                    model = name,
                    requested,
                    granted,
                    budget = budget.limit(),
                    "intra_op_threads is larger than the compute budget (--threads); clamped"
                );
            }
            granted
        }
        None => budget.clamp(budget.limit() / config.instances.max(1)),
    }
}

/// Runs one forward on zeros shaped by the config (free dims and batch as 1)
/// and checks the outputs against the declared ones.
fn warm_up(module: &Module, config: &ModelConfig) -> Result<(), String> {
    let mut inputs = Vec::with_capacity(config.inputs.len());
    for spec in &config.inputs {
        let shape: Vec<i64> = config
            .full_shape(spec)
            .into_iter()
            .map(|d| d.max(1))
            .collect();
        let n_bytes = crate::tensor::numel(&shape)
            .zip(spec.dtype.fixed_size())
            .and_then(|(n, size)| n.checked_mul(size))
            .ok_or_else(|| {
                format!(
                    "input '{}': shape {} is too large",
                    spec.name,
                    shape_str(&shape)
                )
            })?;
        let tensor = Tensor::new(&spec.name, spec.dtype, shape, vec![0u8; n_bytes].into())
            .map_err(|err| err.to_string())?;
        inputs.push(tensor);
    }
    let outputs = plinth_torch::Forward::forward(module, &inputs, &config.outputs).map_err(
        |err| match err {
            Error::Internal(msg) => msg,
            other => other.to_string(),
        },
    )?;
    for (output, spec) in outputs.iter().zip(&config.outputs) {
        plinth_torch::check_output(output, spec, &config.full_shape(spec))?;
    }
    Ok(())
}
