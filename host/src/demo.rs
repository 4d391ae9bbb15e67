//! The demo model repository `plinth serve` creates when it is given none:
//! small TorchScript models traced from Rust with known weights, so the first
//! request a newcomer sends has an answer they can check by hand.

use std::path::Path;

use anyhow::Context;

use crate::torch::trace::{self, Kind, TchTensor};

const DOUBLE_CONFIG: &str = r#"# y = 2 * x, any length.
[[input]]
name = "x"
dtype = "f32"
shape = [-1]

[[output]]
name = "y"
dtype = "f32"
shape = [-1]
"#;

const AFFINE_CONFIG: &str = r#"# y = x @ W^T + b with W = [[1,0,0,0],[0,1,0,0],[0,0,1,1]], b = [0.5,-0.5,0].
max_batch_size = 8
instances = 1

[[input]]
name = "x"
dtype = "f32"
shape = [4]

[[output]]
name = "y"
dtype = "f32"
shape = [3]
"#;

/// Weights of the `affine` demo model, row-major [3, 4].
pub const AFFINE_WEIGHT: [f32; 12] = [1., 0., 0., 0., 0., 1., 0., 0., 0., 0., 1., 1.];
pub const AFFINE_BIAS: [f32; 3] = [0.5, -0.5, 0.];

/// Writes the demo models into `dir` (which may not exist yet).
pub fn write_demo_repository(dir: &Path) -> anyhow::Result<()> {
    let write_config = |model: &str, text: &str| -> anyhow::Result<()> {
        let model_dir = dir.join(model);
        std::fs::create_dir_all(&model_dir)
            .with_context(|| format!("creating {}", model_dir.display()))?;
        std::fs::write(model_dir.join("config.toml"), text).context("writing config.toml")
    };

    write_config("double", DOUBLE_CONFIG)?;
    trace::save(
        &dir.join("double/1/model.pt"),
        &[TchTensor::zeros([3], (Kind::Float, tch_cpu()))],
        |xs| vec![&xs[0] * 2.0],
    )?;

    write_config("affine", AFFINE_CONFIG)?;
    let weight = TchTensor::from_slice(&AFFINE_WEIGHT).reshape([3, 4]);
    let bias = TchTensor::from_slice(&AFFINE_BIAS);
    trace::save(
        &dir.join("affine/1/model.pt"),
        &[TchTensor::zeros([2, 4], (Kind::Float, tch_cpu()))],
        |xs| vec![xs[0].matmul(&weight.tr()) + &bias],
    )?;
    Ok(())
}

fn tch_cpu() -> trace::Device {
    trace::Device::Cpu
}
