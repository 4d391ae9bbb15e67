//! The torch layer: the only crate that sees `tch` types, and the only one
//! that names libtorch.
//!
//! It loads models of both formats onto a device behind one type,
//! [`Module`]: TorchScript archives (`model.pt`, through tch) and
//! AOTInductor packages (`model.pt2`, through [`package`] and its C++ shim).
//! It converts between Plinth's [`Tensor`] and torch tensors, sets the thread
//! counts, and loads the CUDA half of libtorch at run time when it is present
//! (and of the version this binary was built against). [`executor`] runs
//! forward passes on dedicated threads under the process-wide
//! [`budget::ComputeBudget`]; [`models`] writes the demo models.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tch::{CModule, Device, IValue, Kind};

use plinth_core::Error;
use plinth_core::config::{DeviceSpec, ModelFormat};
use plinth_core::tensor::{DType, Tensor, TensorSpec, shape_str};

pub mod budget;
pub mod executor;
pub mod models;
pub mod package;

pub use budget::ComputeBudget;
pub use executor::{ExecutorPool, Forward, InlineForward, TraceTag};
pub use package::{AotiPackage, PackageInfo};

/// The libtorch version this binary was built against, from its headers'
/// `version.h` (`MAJOR.MINOR.PATCH`), or `"unknown"` when they were not found.
pub const LIBTORCH_VERSION: &str = env!("PLINTH_LIBTORCH_VERSION");

/// The torch kind of a dtype; `None` for dtypes libtorch cannot hold here.
pub(crate) fn kind_of(dtype: DType) -> Option<Kind> {
    Some(match dtype {
        DType::Bool => Kind::Bool,
        DType::U8 => Kind::Uint8,
        DType::I8 => Kind::Int8,
        DType::I16 => Kind::Int16,
        DType::I32 => Kind::Int,
        DType::I64 => Kind::Int64,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::F32 => Kind::Float,
        DType::F64 => Kind::Double,
        DType::U16 | DType::U32 | DType::U64 | DType::Bytes => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<DType> {
    Some(match kind {
        Kind::Bool => DType::Bool,
        Kind::Uint8 => DType::U8,
        Kind::Int8 => DType::I8,
        Kind::Int16 => DType::I16,
        Kind::Int => DType::I32,
        Kind::Int64 => DType::I64,
        Kind::Half => DType::F16,
        Kind::BFloat16 => DType::BF16,
        Kind::Float => DType::F32,
        Kind::Double => DType::F64,
        _ => return None,
    })
}

pub(crate) fn device_of(spec: DeviceSpec) -> Device {
    match spec {
        DeviceSpec::Cpu => Device::Cpu,
        DeviceSpec::Cuda(idx) => Device::Cuda(idx),
    }
}

/// What the process found out about CUDA at startup.
#[derive(Debug, Clone)]
pub struct CudaReport {
    /// The `libtorch_cuda.so` that was loaded, if any.
    pub library: Option<PathBuf>,
    pub device_count: usize,
    /// Why CUDA is not in use, when it is not.
    pub note: Option<String>,
}

static CUDA: OnceLock<CudaReport> = OnceLock::new();

/// Loads `libtorch_cuda.so` once, if one can be found, so that a CPU-linked
/// binary can run models on a GPU. Looks at `PLINTH_LIBTORCH_CUDA` (the file
/// or its directory), then each directory of `LD_LIBRARY_PATH`, then the
/// directory of the libtorch this process runs on. A library whose torch
/// version differs from [`LIBTORCH_VERSION`] is refused before it is loaded.
pub fn init_cuda() -> &'static CudaReport {
    CUDA.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(path) = std::env::var_os("PLINTH_LIBTORCH_CUDA").map(PathBuf::from) {
            candidates.push(if path.is_dir() { path.join("libtorch_cuda.so") } else { path });
        }
        if let Some(dirs) = std::env::var_os("LD_LIBRARY_PATH") {
            candidates.extend(std::env::split_paths(&dirs).map(|dir| dir.join("libtorch_cuda.so")));
        }
        if let Some(dir) = loaded_libtorch_dir() {
            candidates.push(dir.join("libtorch_cuda.so"));
        }
        let mut errors = Vec::new();
        for candidate in candidates.into_iter().filter(|path| path.is_file()) {
            if let Err(reason) = check_cuda_library_version(&candidate, LIBTORCH_VERSION) {
                tracing::error!(library = %candidate.display(), %reason, "refusing libtorch_cuda.so");
                errors.push(format!("{}: {reason}", candidate.display()));
                continue;
            }
            // SAFETY: loading libtorch_cuda.so runs its static initialisers, which
            // register the CUDA backend with the already-loaded libtorch_cpu. It
            // is done once, before any model is loaded, and only for a library
            // of the same torch version. RTLD_GLOBAL makes its symbols visible
            // to libraries loaded later, as libtorch expects.
            let lib = unsafe {
                libloading::os::unix::Library::open(
                    Some(&candidate),
                    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                )
            };
            match lib {
                Ok(lib) => {
                    // The library stays loaded for the life of the process.
                    std::mem::forget(lib);
                    let device_count = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
                    let note = (device_count == 0).then(|| "libtorch_cuda.so loaded but no GPU is visible".to_owned());
                    return CudaReport {
                        library: Some(candidate),
                        device_count,
                        note,
                    };
                }
                Err(err) => errors.push(format!("{}: {err}", candidate.display())),
            }
        }
        let tried = if errors.is_empty() {
            "none found".to_owned()
        } else {
            errors.join("; ")
        };
        CudaReport {
            library: None,
            device_count: 0,
            note: Some(format!(
                "no usable CUDA libtorch (set PLINTH_LIBTORCH_CUDA to a libtorch_cuda.so of torch {LIBTORCH_VERSION}): {tried}"
            )),
        }
    })
}

/// The directory of the `libtorch_cpu.so` mapped into this process.
pub(crate) fn loaded_libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .and_then(|path| Path::new(path).parent().map(Path::to_path_buf))
}

/// The torch version a `libtorch_cuda.so` belongs to, read from the files its
/// distribution ships beside it: `../version.py` in a `torch` wheel,
/// `../build-version` in a libtorch archive. `None` when neither is there.
fn cuda_library_version(library: &Path) -> Option<String> {
    let root = library.parent()?.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        return text.lines().find_map(|line| {
            let value = line
                .trim()
                .strip_prefix("__version__")?
                .trim()
                .strip_prefix('=')?;
            Some(value.trim().trim_matches(['\'', '"']).to_owned())
        });
    }
    std::fs::read_to_string(root.join("build-version"))
        .ok()
        .map(|text| text.trim().to_owned())
}

/// Refuses a `libtorch_cuda.so` whose torch version (without its local
/// `+cu130` suffix) differs from `expected`. A library whose version cannot
/// be read is accepted with a warning.
pub fn check_cuda_library_version(library: &Path, expected: &str) -> Result<(), String> {
    let Some(found) = cuda_library_version(library) else {
        tracing::warn!(library = %library.display(), "cannot tell the torch version of this libtorch_cuda.so (no ../version.py or ../build-version); loading it");
        return Ok(());
    };
    let release = found.split('+').next().unwrap_or(&found);
    if expected == "unknown" || release == expected {
        Ok(())
    } else {
        Err(format!(
            "it belongs to torch {found}, this binary is built against libtorch {expected}"
        ))
    }
}

/// Refuses a device the process cannot use, with the reason.
pub fn check_device(spec: DeviceSpec) -> Result<(), String> {
    let DeviceSpec::Cuda(idx) = spec else {
        return Ok(());
    };
    let cuda = init_cuda();
    if idx < cuda.device_count {
        return Ok(());
    }
    let why = match (&cuda.note, cuda.device_count) {
        (Some(note), _) => note.clone(),
        (None, n) => format!("only {n} CUDA device(s) are visible"),
    };
    Err(format!(
        "device {spec} requested but CUDA is not available: {why}"
    ))
}

/// Sets the calling thread's torch intra-op thread count.
///
/// libtorch initialises each thread's count lazily, at the thread's first
/// parallel region, from the value the last `set_num_threads` call in the
/// whole process stored. A thread that set its own count before that first
/// region would get the process's last value back, so the count is read
/// first, which runs the lazy initialisation, and then set.
pub fn set_intra_op_threads(n_threads: usize) {
    let _ = tch::get_num_threads();
    tch::set_num_threads(i32::try_from(n_threads).unwrap_or(i32::MAX).max(1));
}

/// Sets the process-wide inter-op pool size. Must run before any torch work.
pub fn set_inter_op_threads(n_threads: usize) {
    tch::set_num_interop_threads(i32::try_from(n_threads).unwrap_or(i32::MAX).max(1));
}

/// A TorchScript module on its device, ready for `forward`.
pub struct TorchModule {
    module: CModule,
    device: Device,
}

impl std::fmt::Debug for TorchModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchModule")
            .field("device", &self.device)
            .finish()
    }
}

/// The bytes of every tensor a TorchScript archive holds: its parameters
/// and buffers (`<archive>/data/N`) and its tensor constants
/// (`<archive>/constants/N`), each record the raw bytes of one storage.
/// What a loaded copy of the module keeps in its device's memory, read from
/// the archive's directory without deserialising anything.
pub fn archive_tensor_bytes(archive: impl std::io::Read + std::io::Seek) -> Result<u64, String> {
    let mut zip = zip::ZipArchive::new(archive)
        .map_err(|err| format!("not a TorchScript archive (zip): {err}"))?;
    let mut total = 0u64;
    for idx in 0..zip.len() {
        let entry = zip
            .by_index_raw(idx)
            .map_err(|err| format!("not a TorchScript archive (zip entry {idx}): {err}"))?;
        let mut parts = entry.name().split('/');
        let (_root, kind, record) = (parts.next(), parts.next(), parts.next());
        let storage = matches!(kind, Some("data" | "constants"))
            && record.is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
            && parts.next().is_none();
        if storage {
            total += entry.size();
        }
    }
    Ok(total)
}

impl TorchModule {
    /// Deserialises the TorchScript archive at `path`, a regular file, onto
    /// `device` in eval mode. Blocking.
    ///
    /// libtorch reads the file itself, each record straight into its
    /// tensor's storage. Loading a 257 MB archive from bytes in memory
    /// copies it four times over (the file read, tch's buffer, a
    /// `std::string`, an `istringstream`): a gigabyte of page faults and
    /// unmaps that stalls every other thread of the process.
    pub fn load_file(path: &Path, device: DeviceSpec) -> Result<TorchModule, String> {
        // The reader's own message for an unreadable file.
        std::fs::File::open(path).map_err(|err| format!("cannot read: {err}"))?;
        let device = device_of(device);
        let module = CModule::load_on_device(path, device);
        TorchModule::loaded(module, device)
    }

    /// Deserialises a TorchScript archive held in memory, for a model file
    /// that is not a regular file (a pipe cannot be read twice, nor
    /// seeked). Blocking.
    pub fn load_bytes(bytes: &[u8], device: DeviceSpec) -> Result<TorchModule, String> {
        let device = device_of(device);
        let module = CModule::load_data_on_device(&mut std::io::Cursor::new(bytes), device);
        TorchModule::loaded(module, device)
    }

    fn loaded(
        module: Result<CModule, tch::TchError>,
        device: Device,
    ) -> Result<TorchModule, String> {
        let mut module = module.map_err(|err| {
            format!(
                "not a loadable TorchScript archive: {}",
                first_line(&err.to_string())
            )
        })?;
        module.set_eval();
        Ok(TorchModule { module, device })
    }

    /// Runs `forward` under `no_grad`, naming the outputs after `output_specs`.
    /// Blocking: call it from an executor thread only.
    pub fn forward(
        &self,
        inputs: &[Tensor],
        output_specs: &[TensorSpec],
    ) -> Result<Vec<Tensor>, Error> {
        let _guard = tch::no_grad_guard();
        let args: Vec<IValue> = to_torch_inputs(inputs, self.device, "a TorchScript model")?
            .into_iter()
            .map(IValue::Tensor)
            .collect();
        let output = self.module.forward_is(&args).map_err(|err| {
            Error::Internal(format!("forward failed: {}", first_line(&err.to_string())))
        })?;
        let tensors = match output {
            IValue::Tensor(tensor) => vec![tensor],
            IValue::Tuple(items) | IValue::GenericList(items) => items
                .into_iter()
                .map(|item| match item {
                    IValue::Tensor(tensor) => Ok(tensor),
                    other => Err(Error::Internal(format!(
                        "forward returned a non-tensor item: {other:?}"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            IValue::TensorList(items) => items,
            other => {
                return Err(Error::Internal(format!(
                    "forward returned {other:?}, not tensors"
                )));
            }
        };
        from_torch_outputs(tensors, output_specs)
    }
}

/// Plinth tensors as torch tensors on `device`, for a model of `what`.
pub(crate) fn to_torch_inputs(
    inputs: &[Tensor],
    device: Device,
    what: &str,
) -> Result<Vec<tch::Tensor>, Error> {
    let mut args = Vec::with_capacity(inputs.len());
    for input in inputs {
        let kind = kind_of(input.dtype()).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "input '{}': dtype {} cannot enter {what}",
                input.name(),
                input.dtype()
            ))
        })?;
        let tensor = tch::Tensor::f_from_data_size(input.data(), input.shape(), kind)
            .map_err(|err| Error::Internal(format!("input '{}': {err}", input.name())))?;
        let tensor = if device == Device::Cpu {
            tensor
        } else {
            tensor.f_to_device(device).map_err(|err| {
                Error::Internal(format!("input '{}' to {device:?}: {err}", input.name()))
            })?
        };
        args.push(tensor);
    }
    Ok(args)
}

/// A forward pass's tensors as Plinth tensors named after `output_specs`,
/// refusing a count that differs from the config's.
pub(crate) fn from_torch_outputs(
    tensors: Vec<tch::Tensor>,
    output_specs: &[TensorSpec],
) -> Result<Vec<Tensor>, Error> {
    if tensors.len() != output_specs.len() {
        return Err(Error::Internal(format!(
            "forward returned {} tensor(s), config declares {} output(s)",
            tensors.len(),
            output_specs.len()
        )));
    }
    tensors
        .iter()
        .zip(output_specs)
        .map(|(tensor, spec)| to_plinth(tensor, &spec.name))
        .collect()
}

impl Forward for TorchModule {
    fn forward(&self, inputs: &[Tensor], outputs: &[TensorSpec]) -> Result<Vec<Tensor>, Error> {
        TorchModule::forward(self, inputs, outputs)
    }

    fn prepare_thread(&self, intra_op_threads: usize) {
        set_intra_op_threads(intra_op_threads);
    }

    fn format(&self) -> Option<ModelFormat> {
        Some(ModelFormat::TorchScript)
    }
}

/// One loaded copy of a model version, whatever its format: what an
/// executor thread runs. Nothing above this crate knows which it is, beyond
/// [`Module::format`] for reports.
#[derive(Debug, Clone)]
pub enum Module {
    /// One TorchScript module per executor thread.
    Script(Arc<TorchModule>),
    /// One package shared by the version's executor threads, with as many
    /// runners as threads.
    Package(Arc<AotiPackage>),
}

impl Module {
    pub fn format(&self) -> ModelFormat {
        match self {
            Module::Script(_) => ModelFormat::TorchScript,
            Module::Package(_) => ModelFormat::AotiPackage,
        }
    }
}

impl Forward for Module {
    fn forward(&self, inputs: &[Tensor], outputs: &[TensorSpec]) -> Result<Vec<Tensor>, Error> {
        match self {
            Module::Script(module) => module.forward(inputs, outputs),
            Module::Package(package) => package.forward(inputs, outputs),
        }
    }

    fn prepare_thread(&self, intra_op_threads: usize) {
        // TorchScript computes on this thread's intra-op threads, and so
        // do a package's aten calls. A package's own kernels fix their
        // parallel regions' thread count when they are compiled
        // (`PackageInfo::compiled_threads`); the loader counts that many
        // against the budget instead.
        set_intra_op_threads(intra_op_threads);
    }

    fn format(&self) -> Option<ModelFormat> {
        Some(Module::format(self))
    }
}

fn to_plinth(tensor: &tch::Tensor, name: &str) -> Result<Tensor, Error> {
    let internal =
        |what: &str, err: tch::TchError| Error::Internal(format!("output '{name}': {what}: {err}"));
    let kind = tensor.f_kind().map_err(|err| internal("kind", err))?;
    let dtype = dtype_of(kind).ok_or_else(|| {
        Error::Internal(format!("output '{name}': unsupported torch dtype {kind:?}"))
    })?;
    let tensor = tensor
        .f_to_device(Device::Cpu)
        .and_then(|t| t.f_contiguous())
        .map_err(|err| internal("to cpu", err))?;
    let shape = tensor.size();
    let numel = tensor.numel();
    let element_size = dtype.fixed_size().expect("torch dtypes have fixed sizes");
    let mut data = vec![0u8; numel * element_size];
    tensor
        .f_copy_data_u8(&mut data, numel)
        .map_err(|err| internal("copy", err))?;
    Tensor::new(name, dtype, shape, Bytes::from(data))
}

pub(crate) fn first_line(text: &str) -> &str {
    text.lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or(text)
        .trim()
}

/// Reads a NumPy `.npy` file (the package fixtures' inputs and expected
/// outputs) as a tensor named `name`.
pub fn read_npy(path: &Path, name: &str) -> Result<Tensor, String> {
    let tensor = tch::Tensor::read_npy(path).map_err(|err| format!("{}: {err}", path.display()))?;
    to_plinth(&tensor, name).map_err(|err| format!("{}: {err}", path.display()))
}

/// Checks a warm-up output against the config, naming what differs.
pub fn check_output(output: &Tensor, spec: &TensorSpec, full_shape: &[i64]) -> Result<(), String> {
    if output.dtype() != spec.dtype {
        return Err(format!(
            "output '{}': config declares dtype {}, the model returned {}",
            spec.name,
            spec.dtype,
            output.dtype()
        ));
    }
    let fits = full_shape.len() == output.shape().len()
        && full_shape
            .iter()
            .zip(output.shape())
            .all(|(want, got)| *want == -1 || want == got);
    if !fits {
        return Err(format!(
            "output '{}': config declares shape {}, the model returned {}",
            spec.name,
            shape_str(full_shape),
            shape_str(output.shape())
        ));
    }
    Ok(())
}

/// Builds TorchScript files by tracing Rust closures with known weights: the
/// demo repository and the test fixtures are made this way.
pub mod trace {
    use super::*;

    pub use tch::{Device, Kind, Tensor as TchTensor};

    /// Traces `f` on `example_inputs` and saves the TorchScript module to `path`.
    pub fn save(
        path: &Path,
        example_inputs: &[tch::Tensor],
        mut f: impl FnMut(&[tch::Tensor]) -> Vec<tch::Tensor>,
    ) -> Result<(), tch::TchError> {
        let _guard = tch::no_grad_guard();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|err| tch::TchError::FileFormat(err.to_string()))?;
        }
        let module =
            CModule::create_by_tracing("plinth_fixture", "forward", example_inputs, &mut f)?;
        module.save(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_counts_the_bytes_of_every_tensor_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let size = |path: &Path| archive_tensor_bytes(std::fs::File::open(path).unwrap());
        // affine: a [3, 4] weight and a [3] bias, f32.
        let affine = dir.path().join("affine.pt");
        models::write_affine(&affine, &models::AFFINE_WEIGHT, &models::AFFINE_BIAS).unwrap();
        assert_eq!(size(&affine), Ok((12 + 3) * 4));
        // scale holds its factor as a scalar in its code, no tensor.
        let scale = dir.path().join("scale.pt");
        models::write_scale(&scale, 2.0).unwrap();
        assert_eq!(size(&scale), Ok(0));
        // A larger weight, f64: 256 × 128 × 8 bytes.
        let wide = dir.path().join("wide.pt");
        let weight = trace::TchTensor::ones([256, 128], (trace::Kind::Double, trace::Device::Cpu));
        trace::save(
            &wide,
            &[trace::TchTensor::zeros(
                [2, 128],
                (trace::Kind::Double, trace::Device::Cpu),
            )],
            |xs| vec![xs[0].matmul(&weight.tr())],
        )
        .unwrap();
        assert_eq!(size(&wide), Ok(256 * 128 * 8));
        let not_zip = archive_tensor_bytes(std::io::Cursor::new(b"not an archive".to_vec()));
        assert!(
            not_zip
                .as_ref()
                .is_err_and(|e| e.starts_with("not a TorchScript archive")),
            "{not_zip:?}"
        );
    }

    /// A fake distribution: `<root>/lib/libtorch_cuda.so` with `file` at the root.
    fn distribution(file: Option<(&str, String)>) -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let lib = root.path().join("lib");
        std::fs::create_dir_all(&lib).unwrap();
        let library = lib.join("libtorch_cuda.so");
        std::fs::write(&library, b"not loaded by this test").unwrap();
        if let Some((name, text)) = file {
            std::fs::write(root.path().join(name), text).unwrap();
        }
        (root, library)
    }

    fn check(file: Option<(&str, String)>, expected: &str, expect: Result<(), &str>) {
        let (_root, library) = distribution(file);
        let got = check_cuda_library_version(&library, expected);
        assert_eq!(
            got.as_ref().map_err(String::as_str),
            expect.as_ref().map_err(|e| *e)
        );
    }

    #[test]
    fn a_cuda_library_of_another_torch_version_is_refused() {
        let wheel = |v: &str| {
            Some((
                "version.py",
                format!("__version__ = '{v}'\ndebug = False\n"),
            ))
        };
        let archive = |v: &str| Some(("build-version", format!("{v}\n")));
        check(wheel("2.11.0+cu130"), "2.11.0", Ok(()));
        check(
            wheel("2.10.1+cu128"),
            "2.11.0",
            Err("it belongs to torch 2.10.1+cu128, this binary is built against libtorch 2.11.0"),
        );
        check(archive("2.11.0+cu126"), "2.11.0", Ok(()));
        check(
            archive("2.9.0+cu126"),
            "2.11.0",
            Err("it belongs to torch 2.9.0+cu126, this binary is built against libtorch 2.11.0"),
        );
        // Nothing to tell the version by: loaded, with a warning.
        check(None, "2.11.0", Ok(()));
    }

    #[test]
    fn the_build_knows_its_libtorch_version() {
        let parts: Vec<&str> = LIBTORCH_VERSION.split('.').collect();
        assert_eq!(parts.len(), 3, "{LIBTORCH_VERSION}");
        assert!(
            parts.iter().all(|p| p.parse::<u32>().is_ok()),
            "{LIBTORCH_VERSION}"
        );
    }
}
