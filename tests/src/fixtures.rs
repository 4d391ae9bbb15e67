//! TorchScript fixtures, traced from Rust closures with known weights, so
//! tests can assert the exact numbers that come out.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::PATIENCE;
use plinth_torch::trace::{self, Device, Kind, TchTensor};

/// Writes `<repo>/<model>/config.toml` as given. Fixture configs come from
/// [`ModelConfig`]; raw text is for files that are not a config at all.
pub fn write_config(repo: &Path, model: &str, text: &str) {
    let dir = repo.join(model);
    std::fs::create_dir_all(&dir).expect("model dir");
    std::fs::write(dir.join("config.toml"), text).expect("config.toml");
}

/// A model's `config.toml`, built field by field: every fixture config in
/// the tests comes from here, starting from [`config`], [`scale_config`] or
/// [`affine_config`].
///
/// Top-level fields come out first, in the order they were first set (a
/// field set twice keeps its place and takes the new value), then the
/// `[[input]]` tables, then the `[[output]]` tables, one line per field and
/// no blank lines, so a test can name the line of a field in an error.
#[derive(Clone, Debug, Default)]
pub struct ModelConfig {
    fields: Vec<(String, String)>,
    inputs: Vec<TensorTable>,
    outputs: Vec<TensorTable>,
    /// Where [`ModelConfig::tensor_field`] adds: the last tensor declared.
    last: Option<(Io, usize)>,
}

#[derive(Clone, Copy, Debug)]
enum Io {
    Input,
    Output,
}

#[derive(Clone, Debug)]
struct TensorTable {
    name: String,
    dtype: String,
    shape: Vec<i64>,
    extra: Vec<(String, String)>,
}

/// An empty config: no fields, no tensors.
pub fn config() -> ModelConfig {
    ModelConfig::default()
}

/// The config most fixtures share: `x` f32 [-1] in, `y` f32 [-1] out.
pub fn scale_config() -> ModelConfig {
    config().input("x", "f32", &[-1]).output("y", "f32", &[-1])
}

/// The config of [`affine`]: batching up to `max_batch_size` rows of `x`
/// f32 [4] into rows of `y` f32 [3].
pub fn affine_config(max_batch_size: i64) -> ModelConfig {
    config()
        .max_batch_size(max_batch_size)
        .input("x", "f32", &[4])
        .output("y", "f32", &[3])
}

impl ModelConfig {
    /// Declares an input tensor.
    pub fn input(mut self, name: &str, dtype: &str, shape: &[i64]) -> Self {
        self.inputs.push(TensorTable::new(name, dtype, shape));
        self.last = Some((Io::Input, self.inputs.len() - 1));
        self
    }

    /// Declares an output tensor.
    pub fn output(mut self, name: &str, dtype: &str, shape: &[i64]) -> Self {
        self.outputs.push(TensorTable::new(name, dtype, shape));
        self.last = Some((Io::Output, self.outputs.len() - 1));
        self
    }

    pub fn max_batch_size(self, rows: i64) -> Self {
        self.field("max_batch_size", rows)
    }

    pub fn max_queue_delay_us(self, us: i64) -> Self {
        self.field("max_queue_delay_us", us)
    }

    pub fn max_queue_size(self, jobs: i64) -> Self {
        self.field("max_queue_size", jobs)
    }

    pub fn instances(self, n: i64) -> Self {
        self.field("instances", n)
    }

    pub fn dynamic_batching(self, on: bool) -> Self {
        self.field("dynamic_batching", on)
    }

    pub fn preferred_batch_sizes(self, sizes: &[i64]) -> Self {
        self.field("preferred_batch_sizes", list(sizes.iter()))
    }

    pub fn device(self, device: &str) -> Self {
        self.field("device", quoted(device))
    }

    /// `version_policy = { all = true }`: every version directory serves.
    pub fn all_versions(self) -> Self {
        self.field("version_policy", "{ all = true }")
    }

    pub fn preprocess(self, plugins: &[&str]) -> Self {
        self.field("preprocess", list(plugins.iter().map(|p| quoted(p))))
    }

    /// `residency = "on-demand"` (or `"pinned"`).
    pub fn residency(self, residency: &str) -> Self {
        self.field("residency", quoted(residency))
    }

    pub fn postprocess(self, plugins: &[&str]) -> Self {
        self.field("postprocess", list(plugins.iter().map(|p| quoted(p))))
    }

    /// Makes the entry an orchestrator's: `orchestrator = "<plugin>"`.
    pub fn orchestrator(self, plugin: &str) -> Self {
        self.field("orchestrator", quoted(plugin))
    }

    /// Sets a top-level field to `value`, written as TOML as it is (so a
    /// test may write a value the host must refuse).
    pub fn field(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        let value = value.to_string();
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some((_, old)) => *old = value,
            None => self.fields.push((key.to_owned(), value)),
        }
        self
    }

    /// Adds a field, written as TOML as it is, to the tensor declared last
    /// (for tests of what the host refuses in a tensor table).
    pub fn tensor_field(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        let table = match self.last {
            Some((Io::Input, idx)) => &mut self.inputs[idx],
            Some((Io::Output, idx)) => &mut self.outputs[idx],
            None => panic!("tensor_field({key:?}) before any input or output"),
        };
        table.extra.push((key.to_owned(), value.to_string()));
        self
    }

    /// The `config.toml` text.
    pub fn toml(&self) -> String {
        let mut out = String::new();
        for (key, value) in &self.fields {
            out.push_str(&format!("{key} = {value}\n"));
        }
        for (header, tables) in [("input", &self.inputs), ("output", &self.outputs)] {
            for table in tables {
                out.push_str(&format!(
                    "[[{header}]]\nname = {}\ndtype = {}\nshape = {}\n",
                    quoted(&table.name),
                    quoted(&table.dtype),
                    list(table.shape.iter())
                ));
                for (key, value) in &table.extra {
                    out.push_str(&format!("{key} = {value}\n"));
                }
            }
        }
        out
    }

    /// Writes `<repo>/<model>/config.toml`.
    pub fn write(&self, repo: &Path, model: &str) {
        write_config(repo, model, &self.toml());
    }
}

impl TensorTable {
    fn new(name: &str, dtype: &str, shape: &[i64]) -> TensorTable {
        TensorTable {
            name: name.to_owned(),
            dtype: dtype.to_owned(),
            shape: shape.to_vec(),
            extra: Vec::new(),
        }
    }
}

/// A TOML basic string.
fn quoted(text: &str) -> String {
    format!("{text:?}")
}

/// A TOML array of already-written values.
fn list<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    let items: Vec<String> = items.map(|item| item.to_string()).collect();
    format!("[{}]", items.join(", "))
}

fn save(path: &Path, examples: &[TchTensor], f: impl FnMut(&[TchTensor]) -> Vec<TchTensor>) {
    trace::save(path, examples, f)
        .unwrap_or_else(|err| panic!("tracing {}: {err}", path.display()));
}

/// `y = factor * x` over any length, saved as `<model>/<version>/model.pt`.
pub fn scale(repo: &Path, model: &str, version: &str, factor: f64) {
    scale_config().write(repo, model);
    scale_file(&crate::model_file(repo, model, version), factor);
}

/// A [`scale`] model (y = factor·x) that also holds `weight_floats` f32
/// of weights it does not use for its answer, so that its size in memory
/// is known: `weight_floats × 4` bytes per instance.
pub fn weighted(repo: &Path, model: &str, factor: f64, weight_floats: i64) {
    scale_config().write(repo, model);
    weighted_file(&crate::model_file(repo, model, "1"), factor, weight_floats);
}

/// Only the model file of [`weighted`].
pub fn weighted_file(path: &Path, factor: f64, weight_floats: i64) {
    let weight = TchTensor::ones([weight_floats], (Kind::Float, Device::Cpu));
    trace::save(
        path,
        &[TchTensor::zeros([3], (Kind::Float, Device::Cpu))],
        |xs| vec![&xs[0] * factor + weight.sum(Kind::Float) * 0.0],
    )
    .expect("trace and save the weighted model");
}

/// Only the model file of [`scale`].
pub fn scale_file(path: &Path, factor: f64) {
    // The demo's `double` is this model with factor 2: one definition.
    plinth_torch::models::write_scale(path, factor).expect("trace and save the scale model");
}

/// A model file taking an f32 image [N, 3, H, W] to its per-channel means
/// [N, 3] (the processor tests put `image-normalize` before it).
pub fn channel_means_file(path: &Path) {
    use plinth_torch::trace::{Device, Kind, TchTensor, save};
    save(
        path,
        &[TchTensor::zeros([1, 3, 2, 2], (Kind::Float, Device::Cpu))],
        |xs| vec![xs[0].mean_dim([2i64, 3].as_slice(), false, Kind::Float)],
    )
    .expect("trace and save the channel-means model");
}

/// `y = factor * x` batching up to 8 rows of `x` f32 [3] into rows of `y`
/// f32 [3].
pub fn batched_scale(repo: &Path, model: &str, factor: f64) {
    batched_rows_config().write(repo, model);
    scale_file(&crate::model_file(repo, model, "1"), factor);
}

/// The config of [`batched_scale`], for entries that take the same tensors.
pub fn batched_rows_config() -> ModelConfig {
    config()
        .max_batch_size(8)
        .input("x", "f32", &[3])
        .output("y", "f32", &[3])
}

/// Publishes version `version` of a [`scale`] model by writing it beside the
/// repository's models and renaming it in, as a careful deployment does, so
/// a `--poll` watcher never sees half a file.
pub fn publish_scale(repo: &Path, model: &str, version: &str, factor: f64) {
    let staging = repo.join(format!(".staging-{model}-{version}"));
    scale_file(&staging.join("model.pt"), factor);
    std::fs::create_dir_all(repo.join(model)).expect("model dir");
    std::fs::rename(&staging, repo.join(model).join(version)).expect("rename the version in");
}

/// Weights of [`affine`]: `y = x @ W^T + b`.
pub const AFFINE_W: [f32; 12] = [1., 2., 0., 0., 0., 0., 1., -1., 0.5, 0.5, 0.5, 0.5];
pub const AFFINE_B: [f32; 3] = [0.25, -1., 10.];

/// Expected output of [`affine`] for one row.
pub fn affine_expected(row: &[f32; 4]) -> [f32; 3] {
    plinth_torch::models::affine_output(&AFFINE_W, &AFFINE_B, row)
}

/// A batching linear layer: input `x` f32 [batch, 4], output `y` f32 [batch, 3].
pub fn affine(repo: &Path, model: &str, max_batch_size: usize) {
    affine_config(i64::try_from(max_batch_size).expect("max_batch_size fits i64"))
        .write(repo, model);
    // The demo's `affine` with other weights: one definition.
    plinth_torch::models::write_affine(&crate::model_file(repo, model, "1"), &AFFINE_W, &AFFINE_B)
        .expect("trace and save the affine model");
}

/// Two inputs of different dtypes: `y = f64(a) - 2 * f64(b)`, for checking
/// that inputs are matched by name, not position. (tch's tracer cannot save
/// a module with several outputs, so the fixture has one.)
pub fn two_io(repo: &Path, model: &str) {
    config()
        .input("a", "f32", &[3])
        .input("b", "i64", &[3])
        .output("y", "f64", &[3])
        .write(repo, model);
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
    config()
        .input("x", dtype, &[-1])
        .output("y", dtype, &[-1])
        .write(repo, model);
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
    scale_config().write(repo, model);
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
    scale_config().write(repo, model);
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
        // The config last: a `--poll` watcher takes the directory for a model
        // only once it has one, and by then the version is in place, so the
        // first load it starts is the one that blocks on the pipe.
        write_config(repo, model, config);
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
            &scale_config().toml(),
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
            &scale_config().toml(),
            std::fs::read(path).expect("traced file"),
        )
    }

    /// Writes the model bytes into the pipe, letting the load go on.
    ///
    /// A load must open the pipe: the wait for it is bounded by
    /// [`PATIENCE`], so a test whose load never reads the pipe fails instead
    /// of hanging.
    pub async fn release(mut self) {
        let fifo = self.fifo.clone();
        let bytes = self.bytes.take().expect("released once");
        let path = fifo.clone();
        // Opening for writing waits for the load to open the pipe for reading.
        let mut writer = tokio::task::spawn_blocking(move || {
            let mut pipe = std::fs::OpenOptions::new().write(true).open(&path)?;
            pipe.write_all(&bytes)
        });
        match tokio::time::timeout(PATIENCE, &mut writer).await {
            Ok(written) => written
                .expect("writer task")
                .expect("write the model bytes into the pipe"),
            Err(_) => {
                // No load ever read the pipe: open its read end so the
                // writer's open returns (and its write then fails), and fail
                // the test rather than hang it.
                let _ = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&fifo);
                let _ = writer.await;
                panic!(
                    "no model load opened {} within {PATIENCE:?}",
                    fifo.display()
                );
            }
        }
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

/// Writes `files` into `dir` the way Kubernetes updates a mounted Secret or
/// ConfigMap: a new timestamped directory, then a `..data` symlink renamed
/// over the old one; each file is a link through `..data`, made once.
pub fn kubernetes_mount(dir: &Path, generation: u32, files: &[(&str, &[u8])]) {
    use std::os::unix::fs::symlink;
    let data = dir.join(format!("..2026_11_30_{generation}"));
    std::fs::create_dir(&data).unwrap();
    for (name, bytes) in files {
        std::fs::write(data.join(name), bytes).unwrap();
    }
    let tmp = dir.join("..data_tmp");
    symlink(data.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(Path::new("..data").join(name), &link).unwrap();
        }
    }
}

/// The plugins of the full chain the benchmarks measure, by the name each
/// is installed under and the component it is: weighted-router, a
/// pass-through processor (image-normalize passes f32 through untouched)
/// before and after the model, prometheus-metrics.
pub const CHAIN_PLUGINS: [(&str, &str); 4] = [
    ("pre", "image_normalize"),
    ("post", "image_normalize"),
    ("router", "weighted_router"),
    ("metrics", "prometheus_metrics"),
];

/// `model`: the [`scale`] model (y = factor·x) with the chain's `pre` and
/// `post` processors around it.
pub fn chained(repo: &Path, model: &str, factor: f64) {
    scale(repo, model, "1", factor);
    scale_config()
        .preprocess(&["pre"])
        .postprocess(&["post"])
        .write(repo, model);
}

/// A small CNN classifier: 3×32×32 → conv 32 → pool → conv 64 → pool →
/// conv 64 → global average → 10 logits. Weights are fixed by a seed.
pub fn cnn_file(path: &Path) {
    tch::manual_seed(7);
    let opts = (Kind::Float, Device::Cpu);
    let w1 = TchTensor::randn([32, 3, 3, 3], opts) * 0.2;
    let w2 = TchTensor::randn([64, 32, 3, 3], opts) * 0.05;
    let w3 = TchTensor::randn([64, 64, 3, 3], opts) * 0.05;
    let fc = TchTensor::randn([10, 64], opts) * 0.1;
    let none: Option<&TchTensor> = None;
    trace::save(path, &[TchTensor::zeros([2, 3, 32, 32], opts)], |xs| {
        let x = xs[0]
            .conv2d(&w1, none, [1, 1], [1, 1], [1, 1], 1)
            .relu()
            .max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
        let x = x
            .conv2d(&w2, none, [1, 1], [1, 1], [1, 1], 1)
            .relu()
            .max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
        let x = x.conv2d(&w3, none, [1, 1], [1, 1], [1, 1], 1).relu();
        let x = x.mean_dim(&[2i64, 3][..], false, Kind::Float);
        vec![x.matmul(&fc.tr())]
    })
    .expect("tracing the CNN");
}

/// The CNN's config with `batching` applied: 32 images of [3, 32, 32] in,
/// 10 logits each out.
pub fn cnn(repo: &Path, model: &str, batching: impl FnOnce(ModelConfig) -> ModelConfig) {
    batching(
        config()
            .max_batch_size(32)
            .input("x", "f32", &[3, 32, 32])
            .output("logits", "f32", &[10]),
    )
    .write(repo, model);
    cnn_file(&crate::model_file(repo, model, "1"));
}

/// `n` images of 3×32×32, deterministic values in [0, 1].
pub fn images(n: usize) -> Vec<f32> {
    (0..n * 3 * 32 * 32)
        .map(|i| ((i * 37) % 255) as f32 / 255.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_is_fields_then_inputs_then_outputs_one_line_each() {
        let text = scale_config()
            .max_batch_size(4)
            .preprocess(&["norm"])
            .max_batch_size(8)
            .all_versions()
            .input("z", "i64", &[2, 3])
            .tensor_field("size", 3)
            .toml();
        assert_eq!(
            text,
            "max_batch_size = 8\npreprocess = [\"norm\"]\nversion_policy = { all = true }\n\
             [[input]]\nname = \"x\"\ndtype = \"f32\"\nshape = [-1]\n\
             [[input]]\nname = \"z\"\ndtype = \"i64\"\nshape = [2, 3]\nsize = 3\n\
             [[output]]\nname = \"y\"\ndtype = \"f32\"\nshape = [-1]\n"
        );
    }
}
