//! AOTInductor packages (`model.pt2`): what `torch.export` followed by
//! `torch._inductor.aoti_compile_and_package` writes. A package is a zip
//! holding a compiled shared library (the model's code, often its weights
//! too), its generated C++ source and a little metadata.
//!
//! [`PackageInfo::read`] reads a package without loading it: the device it
//! was compiled for, the CPU instructions it needs, the libtorch functions
//! its library calls, and each input's dtype and dimension ranges (from the
//! input checks AOTInductor generates into its wrapper source). The loader
//! checks all of it against the host and the model's config before anything
//! is mapped into the process, because a library built for other
//! instructions would die of SIGILL and one handed a shape it was not
//! compiled for reads out of bounds.
//!
//! [`AotiPackage`] is the loaded package, run through a small C++ shim
//! (`shim/aoti.cpp`) over libtorch's `AOTIModelPackageLoader`.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;
use std::ptr::NonNull;

use plinth_core::Error;
use plinth_core::config::DeviceSpec;
use plinth_core::tensor::{Tensor, TensorSpec};

mod info;

pub use info::{Dim, InputSignature, PackageInfo, parse_input_checks};

mod ffi {
    use super::{c_char, c_int, c_void};

    /// The shim's handle: a `torch::inductor::AOTIModelPackageLoader`.
    #[repr(C)]
    pub struct PlinthAoti {
        _private: [u8; 0],
    }

    unsafe extern "C" {
        pub fn plinth_aoti_load(
            path: *const c_char,
            model_name: *const c_char,
            num_runners: usize,
            device_index: c_int,
            error: *mut *mut c_char,
        ) -> *mut PlinthAoti;
        pub fn plinth_aoti_free(package: *mut PlinthAoti);
        pub fn plinth_aoti_run(
            package: *mut PlinthAoti,
            inputs: *const *mut c_void,
            n_inputs: usize,
            outputs: *mut *mut *mut c_void,
            n_outputs: *mut usize,
            error: *mut *mut c_char,
        ) -> bool;
        pub fn plinth_aoti_free_array(array: *mut c_void);
        pub fn plinth_aoti_free_string(text: *mut c_char);
    }
}

/// Loads `libtorch.so` from the directory of the libtorch this process runs
/// on, once. A package's library links it by name (it is a stub whose own
/// dependencies bring in libtorch's real libraries); the binary itself does
/// not, so without this the package's library is not found.
fn load_libtorch_stub() -> Result<(), String> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            let dir = crate::loaded_libtorch_dir()
                .ok_or("libtorch_cpu.so is not mapped into this process")?;
            let path = dir.join("libtorch.so");
            // SAFETY: libtorch.so is the stub of the libtorch this process
            // already runs on: it has no code of its own, and its
            // dependencies are loaded already. It stays loaded for the life
            // of the process; RTLD_GLOBAL lets packages' libraries find it by
            // name.
            let lib = unsafe {
                libloading::os::unix::Library::open(
                    Some(&path),
                    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                )
            }
            .map_err(|err| {
                format!(
                    "cannot load {} (AOTInductor packages link it): {err}",
                    path.display()
                )
            })?;
            std::mem::forget(lib);
            Ok(())
        })
        .clone()
}

/// Takes a string the shim allocated.
///
/// # Safety
/// `text` is null or a NUL-terminated string from the shim, not yet freed.
unsafe fn take_string(text: *mut c_char) -> String {
    if text.is_null() {
        return "unknown error (the shim gave no message)".to_owned();
    }
    // SAFETY: per this function's contract.
    let owned = unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: the shim allocated it with malloc; freed once, here.
    unsafe { ffi::plinth_aoti_free_string(text) };
    owned
}

/// A loaded package: one libtorch `AOTIModelPackageLoader` whose container
/// holds `runners` copies of the model able to run at once. Shared by the
/// model's executor threads.
pub struct AotiPackage {
    handle: NonNull<ffi::PlinthAoti>,
    device: tch::Device,
    runners: usize,
    /// The fewest rows the package was compiled for along the batch
    /// dimension (1 when it does not batch). Export often records 2: a
    /// smaller batch is padded up to it and the outputs cut back.
    min_rows: usize,
}

// SAFETY: the loader is created and freed by its one owner; `run` is safe
// from several threads at once, since the model container hands each call
// one of its runners (waiting while all are busy) and holds its own lock.
unsafe impl Send for AotiPackage {}
// SAFETY: as above; `&self` only ever calls `run`.
unsafe impl Sync for AotiPackage {}

impl std::fmt::Debug for AotiPackage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AotiPackage")
            .field("device", &self.device)
            .field("runners", &self.runners)
            .finish()
    }
}

impl AotiPackage {
    /// Loads the package at `path` with `runners` models in its container,
    /// on `device`. Blocking: libtorch unpacks the package into a new
    /// directory under `/tmp` (it names `/tmp` itself; `TMPDIR` does not
    /// move it), removed when the package is dropped, and maps its library. Check
    /// [`PackageInfo::check`] first: the library is native code.
    /// `batches` says whether dim 0 of every input is the batch.
    pub fn load(
        path: &Path,
        info: &PackageInfo,
        runners: usize,
        device: DeviceSpec,
        batches: bool,
    ) -> Result<AotiPackage, String> {
        let min_rows = if batches {
            info.inputs
                .iter()
                .flatten()
                .filter_map(|input| match input.dims.get(&0) {
                    Some(Dim::Range { min, .. }) => usize::try_from(*min).ok(),
                    _ => None,
                })
                .max()
                .unwrap_or(1)
                .max(1)
        } else {
            1
        };
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| "the path holds a NUL byte".to_owned())?;
        let c_name = CString::new(info.model_name.as_str())
            .map_err(|_| "the model name holds a NUL byte".to_owned())?;
        let device_index = match device {
            DeviceSpec::Cpu => -1,
            DeviceSpec::Cuda(idx) => c_int::try_from(idx).map_err(|_| "device index too large")?,
        };
        load_libtorch_stub()?;
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: both strings are valid NUL-terminated strings for the
        // call; `error` is a valid out-pointer. The shim catches every C++
        // exception.
        let handle = unsafe {
            ffi::plinth_aoti_load(
                c_path.as_ptr(),
                c_name.as_ptr(),
                runners.max(1),
                device_index,
                &raw mut error,
            )
        };
        match NonNull::new(handle) {
            Some(handle) => Ok(AotiPackage {
                handle,
                device: crate::device_of(device),
                runners: runners.max(1),
                min_rows,
            }),
            None => {
                // SAFETY: on failure the shim set `error` (or left it null).
                let message = unsafe { take_string(error) };
                Err(format!(
                    "libtorch could not load the package: {}",
                    first_line(&message)
                ))
            }
        }
    }

    /// How many forward passes may run at once.
    pub fn runners(&self) -> usize {
        self.runners
    }

    /// Runs the package on `inputs` (in the config's order) and names the
    /// outputs after `output_specs`. Blocking: call it from an executor
    /// thread only.
    pub fn forward(
        &self,
        inputs: &[Tensor],
        output_specs: &[TensorSpec],
    ) -> Result<Vec<Tensor>, Error> {
        let rows = inputs
            .first()
            .and_then(|t| t.shape().first())
            .and_then(|&r| usize::try_from(r).ok())
            .unwrap_or(0);
        if self.min_rows > 1 && rows > 0 && rows < self.min_rows {
            let padded = inputs
                .iter()
                .map(|t| pad_rows(t, self.min_rows))
                .collect::<Result<Vec<_>, _>>()?;
            let outputs = self.run(&padded, output_specs)?;
            return outputs
                .iter()
                .map(|t| cut_rows(t, self.min_rows, rows))
                .collect();
        }
        self.run(inputs, output_specs)
    }

    fn run(&self, inputs: &[Tensor], output_specs: &[TensorSpec]) -> Result<Vec<Tensor>, Error> {
        let tensors = crate::to_torch_inputs(inputs, self.device, "a package")?;
        let pointers: Vec<*mut c_void> = tensors
            .iter()
            .map(|t| t.as_ptr().cast_mut().cast::<c_void>())
            .collect();
        let mut outputs: *mut *mut c_void = std::ptr::null_mut();
        let mut n_outputs = 0usize;
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: the handle is live for `&self`; `pointers` holds
        // `at::Tensor*` owned by `tensors`, which outlive the call (the shim
        // copies the tensor handles, not the pointers); the out-pointers are
        // valid. The shim catches every C++ exception.
        let ok = unsafe {
            ffi::plinth_aoti_run(
                self.handle.as_ptr(),
                pointers.as_ptr(),
                pointers.len(),
                &raw mut outputs,
                &raw mut n_outputs,
                &raw mut error,
            )
        };
        if !ok {
            // SAFETY: on failure the shim set `error` (or left it null).
            let message = unsafe { take_string(error) };
            return Err(Error::Internal(format!(
                "forward failed: {}",
                first_line(&message)
            )));
        }
        let mut results = Vec::with_capacity(n_outputs);
        for i in 0..n_outputs {
            // SAFETY: the shim wrote `n_outputs` pointers, each a new
            // `at::Tensor` the caller owns; tch takes each over (and deletes
            // it on drop), exactly once.
            results.push(unsafe { tch::Tensor::from_ptr((*outputs.add(i)).cast()) });
        }
        // SAFETY: the array (not the tensors) was malloc'd by the shim.
        unsafe { ffi::plinth_aoti_free_array(outputs.cast()) };
        crate::from_torch_outputs(results, output_specs)
    }
}

/// `tensor` with its last row repeated until it has `rows` rows.
fn pad_rows(tensor: &Tensor, rows: usize) -> Result<Tensor, Error> {
    let have = tensor.shape().first().copied().unwrap_or(0);
    let have = usize::try_from(have).unwrap_or(0);
    if have == 0 || have >= rows {
        return Ok(tensor.clone());
    }
    let row_bytes = tensor.data().len() / have;
    let last = &tensor.data()[tensor.data().len() - row_bytes..];
    let mut data = Vec::with_capacity(row_bytes * rows);
    data.extend_from_slice(tensor.data());
    for _ in have..rows {
        data.extend_from_slice(last);
    }
    let mut shape = tensor.shape().to_vec();
    shape[0] = rows as i64;
    Tensor::new(tensor.name(), tensor.dtype(), shape, data.into())
}

/// The first `rows` rows of an output computed on `padded` rows; an output
/// without that batch dimension is returned whole.
fn cut_rows(tensor: &Tensor, padded: usize, rows: usize) -> Result<Tensor, Error> {
    if tensor.shape().first() != Some(&(padded as i64)) {
        return Ok(tensor.clone());
    }
    let row_bytes = tensor.data().len() / padded;
    let mut shape = tensor.shape().to_vec();
    shape[0] = rows as i64;
    Tensor::new(
        tensor.name(),
        tensor.dtype(),
        shape,
        tensor.data().slice(..row_bytes * rows),
    )
}

impl Drop for AotiPackage {
    fn drop(&mut self) {
        // SAFETY: the handle came from `plinth_aoti_load` and is freed once;
        // no forward pass runs, as `&mut self` shows.
        unsafe { ffi::plinth_aoti_free(self.handle.as_ptr()) };
    }
}

fn first_line(text: &str) -> &str {
    crate::first_line(text)
}

#[cfg(test)]
mod tests {
    use plinth_core::tensor::DType;

    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../tests/fixtures/pt2")
            .join(name)
    }

    #[test]
    fn a_package_runs_through_the_shim_with_pytorchs_numbers() {
        let path = fixture("tiny/model.pt2");
        let info = PackageInfo::read(&path).unwrap();
        assert_eq!(info.device, "cpu");
        assert_eq!(info.model_name, "model");
        assert!(!info.needed_symbols.is_empty());
        info.check_host(DeviceSpec::Cpu).unwrap();
        let inputs = info.inputs.as_ref().unwrap();
        assert_eq!(inputs.len(), 1);
        assert_eq!(inputs[0].dtype, Some(DType::F32));
        assert_eq!(inputs[0].shape(), "[1..=64, 16]");
        let package = AotiPackage::load(&path, &info, 2, DeviceSpec::Cpu, true).unwrap();
        let x = crate::read_npy(&fixture("tiny/input_b1_0.npy"), "x").unwrap();
        let want = crate::read_npy(&fixture("tiny/expected_b1_0.npy"), "y").unwrap();
        let spec = TensorSpec {
            name: "y".into(),
            dtype: DType::F32,
            shape: vec![16],
        };
        let got = package.forward(&[x], &[spec]).unwrap();
        assert_eq!(got[0].shape(), want.shape());
        assert_eq!(got[0].data(), want.data());
        // An input of the wrong dtype is caught by torch's own checks
        // inside the package only when they are on; here, a count mismatch
        // is the shim's error turned into ours.
        let err = package.forward(&[], &[]).unwrap_err();
        assert!(err.to_string().contains("forward failed"), "{err}");
    }
}
