//! The demo model repository `plinth serve` creates when it is given none:
//! small TorchScript models traced from Rust with known weights, so the first
//! request a newcomer sends has an answer they can check by hand.

use std::path::Path;

use anyhow::Context;

use plinth_torch::models::{self, AFFINE_BIAS, AFFINE_WEIGHT};

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

/// Writes the demo models into `dir` (which may not exist yet).
pub fn write_demo_repository(dir: &Path) -> anyhow::Result<()> {
    let write_config = |model: &str, text: &str| -> anyhow::Result<()> {
        let model_dir = dir.join(model);
        std::fs::create_dir_all(&model_dir)
            .with_context(|| format!("creating {}", model_dir.display()))?;
        std::fs::write(model_dir.join("config.toml"), text).context("writing config.toml")
    };

    write_config("double", DOUBLE_CONFIG)?;
    models::write_scale(&dir.join("double/1/model.pt"), 2.0)?;
    write_config("affine", AFFINE_CONFIG)?;
    models::write_affine(&dir.join("affine/1/model.pt"), &AFFINE_WEIGHT, &AFFINE_BIAS)?;
    Ok(())
}
