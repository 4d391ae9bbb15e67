//! TorchScript fixtures, traced from Rust closures with known weights, so
//! tests can assert the exact numbers that come out.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use plinth_torch::trace::{self, Device, Kind, TchTensor};

pub fn write_config(repo: &Path, model: &str, text: &str) {
    let dir = repo.join(model);
    std::fs::create_dir_all(&dir).expect("model dir");
    std::fs::write(dir.join("config.toml"), text).expect("config.toml");
}

fn save(path: &Path, examples: &[TchTensor], f: impl FnMut(&[TchTensor]) -> Vec<TchTensor>) {
    trace::save(path, examples, f)
        .unwrap_or_else(|err| panic!("tracing {}: {err}", path.display()));
}

const SCALE_CONFIG: &str = r#"
[[input]]
name = "x"
dtype = "f32"
shape = [-1]

[[output]]
name = "y"
dtype = "f32"
shape = [-1]
"#;

/// `y = factor * x` over any length, saved as `<model>/<version>/model.pt`.
pub fn scale(repo: &Path, model: &str, version: &str, factor: f64) {
    write_config(repo, model, SCALE_CONFIG);
    scale_file(&crate::model_file(repo, model, version), factor);
}

/// Only the model file of [`scale`].
pub fn scale_file(path: &Path, factor: f64) {
    save(
        path,
        &[TchTensor::zeros([3], (Kind::Float, Device::Cpu))],
        |xs| vec![&xs[0] * factor],
    );
}

/// Weights of [`affine`]: `y = x @ W^T + b`.
pub const AFFINE_W: [f32; 12] = [1., 2., 0., 0., 0., 0., 1., -1., 0.5, 0.5, 0.5, 0.5];
pub const AFFINE_B: [f32; 3] = [0.25, -1., 10.];

/// Expected output of [`affine`] for one row.
pub fn affine_expected(row: &[f32; 4]) -> [f32; 3] {
    let mut out = AFFINE_B;
    for (o, w) in out.iter_mut().zip(AFFINE_W.chunks_exact(4)) {
        *o += w.iter().zip(row).map(|(w, x)| w * x).sum::<f32>();
    }
    out
}

/// A batching linear layer: input `x` f32 [batch, 4], output `y` f32 [batch, 3].
pub fn affine(repo: &Path, model: &str, max_batch_size: usize) {
    write_config(
        repo,
        model,
        &format!(
            "max_batch_size = {max_batch_size}\n[[input]]\nname = \"x\"\ndtype = \"f32\"\nshape = [4]\n\n[[output]]\nname = \"y\"\ndtype = \"f32\"\nshape = [3]\n"
        ),
    );
    let weight = TchTensor::from_slice(&AFFINE_W).reshape([3, 4]);
    let bias = TchTensor::from_slice(&AFFINE_B);
    save(
        &crate::model_file(repo, model, "1"),
        &[TchTensor::zeros([2, 4], (Kind::Float, Device::Cpu))],
        |xs| vec![xs[0].matmul(&weight.tr()) + &bias],
    );
}

/// Two inputs of different dtypes: `y = f64(a) - 2 * f64(b)`, for checking
/// that inputs are matched by name, not position. (tch's tracer cannot save
/// a module with several outputs, so the fixture has one.)
pub fn two_io(repo: &Path, model: &str) {
    write_config(
        repo,
        model,
        r#"
[[input]]
name = "a"
dtype = "f32"
shape = [3]
[[input]]
name = "b"
dtype = "i64"
shape = [3]

[[output]]
name = "y"
dtype = "f64"
shape = [3]
"#,
    );
    save(
        &crate::model_file(repo, model, "1"),
        &[
            TchTensor::zeros([3], (Kind::Float, Device::Cpu)),
            TchTensor::zeros([3], (Kind::Int64, Device::Cpu)),
        ],
        |xs| vec![xs[0].to_kind(Kind::Double) - xs[1].to_kind(Kind::Double) * 2.0],
    );
}

/// `y = 2 * x` (for bool: `y = !x`) in the given dtype, shape [-1].
pub fn dtype_double(repo: &Path, model: &str, dtype: &str, kind: Kind) {
    write_config(
        repo,
        model,
        &format!(
            "[[input]]\nname = \"x\"\ndtype = \"{dtype}\"\nshape = [-1]\n[[output]]\nname = \"y\"\ndtype = \"{dtype}\"\nshape = [-1]\n"
        ),
    );
    save(
        &crate::model_file(repo, model, "1"),
        &[TchTensor::zeros([3], (kind, Device::Cpu))],
        |xs| {
            if kind == Kind::Bool {
                vec![xs[0].logical_not()]
            } else {
                vec![&xs[0] + &xs[0]]
            }
        },
    );
}

/// `y = 2 * x` for `x` f32 [-1], after `n_matmuls` multiplications of a
/// 256x256 matrix whose result is discarded: a forward that takes a while.
/// The matrix depends on the input, so TorchScript cannot fold the chain
/// into a constant at the first run.
pub fn slow(repo: &Path, model: &str, n_matmuls: usize) {
    write_config(repo, model, SCALE_CONFIG);
    let weight = TchTensor::full([256, 256], 1.0 / 256.0, (Kind::Float, Device::Cpu));
    save(
        &crate::model_file(repo, model, "1"),
        &[TchTensor::zeros([3], (Kind::Float, Device::Cpu))],
        |xs| {
            let step = &weight + xs[0].sum(Kind::Float) * 0.0;
            let mut acc = step.shallow_clone();
            for _ in 0..n_matmuls {
                acc = acc.matmul(&step);
            }
            // acc stays finite (rows sum to one), so this adds exactly zero.
            vec![&xs[0] * 2.0 + acc.sum(Kind::Float) * 0.0]
        },
    );
}

/// `y = 2 * x` carrying an `n_floats` constant in the archive: a large model.
pub fn large(repo: &Path, model: &str, n_floats: i64) {
    write_config(repo, model, SCALE_CONFIG);
    large_file(&crate::model_file(repo, model, "1"), n_floats);
}

pub fn large_file(path: &Path, n_floats: i64) {
    let payload = TchTensor::ones([n_floats], (Kind::Float, Device::Cpu));
    save(
        path,
        &[TchTensor::zeros([3], (Kind::Float, Device::Cpu))],
        |xs| vec![&xs[0] * 2.0 + payload.get(0) * 0.0],
    );
}

/// A model whose file is a named pipe: its load blocks on reading the file
/// until [`BlockedModel::release`] writes the real bytes, as a load from a
/// slow disk would. This makes "while a load is in flight" deterministic.
pub struct BlockedModel {
    fifo: PathBuf,
    bytes: Option<Vec<u8>>,
    /// Holds the pipe itself. The model file is a symlink to it, so that
    /// writing the bytes makes no file event inside the repository (a
    /// `--poll` watcher would take it for a change of the model).
    _pipe_dir: tempfile::TempDir,
}

impl BlockedModel {
    /// Prepares `<repo>/<model>/1/model.pt` as a pipe that will deliver `bytes`.
    pub fn new(repo: &Path, model: &str, config: &str, bytes: Vec<u8>) -> BlockedModel {
        BlockedModel::at_version(repo, model, "1", config, bytes)
    }

    /// [`BlockedModel::new`] for another version directory.
    pub fn at_version(
        repo: &Path,
        model: &str,
        version: &str,
        config: &str,
        bytes: Vec<u8>,
    ) -> BlockedModel {
        write_config(repo, model, config);
        let pipe_dir = tempfile::tempdir().expect("pipe dir");
        let fifo = pipe_dir.path().join("model.pt");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(status.success(), "mkfifo {}", fifo.display());
        let file = crate::model_file(repo, model, version);
        std::fs::create_dir_all(file.parent().expect("version dir")).expect("version dir");
        std::os::unix::fs::symlink(&fifo, &file).expect("symlink to the pipe");
        BlockedModel {
            fifo,
            bytes: Some(bytes),
            _pipe_dir: pipe_dir,
        }
    }

    /// A `scale` model (y = factor * x) whose load blocks until released.
    pub fn scale(repo: &Path, model: &str, factor: f64) -> BlockedModel {
        BlockedModel::scale_version(repo, model, "1", factor)
    }

    /// Version `version` of a `scale` model, whose load blocks until released.
    pub fn scale_version(repo: &Path, model: &str, version: &str, factor: f64) -> BlockedModel {
        let staging = tempfile::tempdir().expect("staging dir");
        let path = staging.path().join("model.pt");
        scale_file(&path, factor);
        BlockedModel::at_version(
            repo,
            model,
            version,
            SCALE_CONFIG,
            std::fs::read(path).expect("traced file"),
        )
    }

    /// A large model (`n_floats` constant) whose load blocks until released.
    pub fn large(repo: &Path, model: &str, n_floats: i64) -> BlockedModel {
        let staging = tempfile::tempdir().expect("staging dir");
        let path = staging.path().join("model.pt");
        large_file(&path, n_floats);
        BlockedModel::new(
            repo,
            model,
            SCALE_CONFIG,
            std::fs::read(path).expect("traced file"),
        )
    }

    /// Writes the model bytes into the pipe, letting the load go on.
    pub async fn release(mut self) {
        let fifo = self.fifo.clone();
        let bytes = self.bytes.take().expect("released once");
        tokio::task::spawn_blocking(move || {
            let mut pipe = std::fs::OpenOptions::new()
                .write(true)
                .open(&fifo)
                .expect("open pipe for writing");
            pipe.write_all(&bytes).expect("write model bytes");
        })
        .await
        .expect("writer task");
    }
}

impl Drop for BlockedModel {
    fn drop(&mut self) {
        if self.bytes.is_some() {
            // Never released (a failing test): open and close the pipe so a
            // reader blocked on it sees end-of-file instead of hanging.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.fifo);
        }
    }
}
