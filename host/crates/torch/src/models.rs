//! Small TorchScript models with known weights, traced from Rust: the demo
//! repository `plinth serve` creates, and the same models in the tests, so
//! both use one definition.

use std::path::Path;

use tch::{Device, Kind, Tensor as TchTensor};

use crate::trace;

/// Weights of the `affine` model, row-major `[3, 4]`.
pub const AFFINE_WEIGHT: [f32; 12] = [1., 0., 0., 0., 0., 1., 0., 0., 0., 0., 1., 1.];
/// Bias of the `affine` model.
pub const AFFINE_BIAS: [f32; 3] = [0.5, -0.5, 0.];

/// What an affine model with `weight` (row-major `[3, 4]`) and `bias`
/// answers for one row: `x·Wᵀ + b`.
pub fn affine_output(weight: &[f32; 12], bias: &[f32; 3], row: &[f32; 4]) -> [f32; 3] {
    let mut out = *bias;
    for (o, w) in out.iter_mut().zip(weight.chunks_exact(4)) {
        *o += w.iter().zip(row).map(|(w, x)| w * x).sum::<f32>();
    }
    out
}

/// `y = factor · x`, f32, any shape: saved to `path`.
pub fn write_scale(path: &Path, factor: f64) -> Result<(), tch::TchError> {
    trace::save(
        path,
        &[TchTensor::zeros([3], (Kind::Float, Device::Cpu))],
        |xs| vec![&xs[0] * factor],
    )
}

/// `y = x·Wᵀ + b` with `weight` (row-major `[3, 4]`) and `bias`, input
/// `[N, 4]`, output `[N, 3]`: saved to `path`. The demo's `affine` uses
/// [`AFFINE_WEIGHT`] and [`AFFINE_BIAS`].
pub fn write_affine(path: &Path, weight: &[f32; 12], bias: &[f32; 3]) -> Result<(), tch::TchError> {
    let weight = TchTensor::from_slice(weight).reshape([3, 4]);
    let bias = TchTensor::from_slice(bias);
    trace::save(
        path,
        &[TchTensor::zeros([2, 4], (Kind::Float, Device::Cpu))],
        |xs| vec![xs[0].matmul(&weight.tr()) + &bias],
    )
}
