//! A model cascade, served as a model: every row goes through a small model,
//! and only the rows whose top score is below a threshold go on to a large
//! one, whose answers replace the small model's for those rows.
//!
//! Configuration (the plugin's manifest, `[config]`):
//! - `small`, `large`: the two models' names (required);
//! - `threshold`: a row is uncertain when its highest score is below it
//!   (required);
//! - `scores`: which of the small model's outputs holds the scores, shaped
//!   `[rows, classes]` (default: its first output).
//!
//! Both models take the cascade's inputs, batched on their first dimension,
//! and answer with outputs of the same names and row sizes. The repository
//! entry that serves the cascade declares those inputs and outputs and says
//! `orchestrator = "cascade"`.

use plinth_plugin_sdk::prelude::*;

struct Cascade {
    small: String,
    large: String,
    threshold: f32,
    scores: Option<String>,
}

impl Plugin for Cascade {
    fn init(config: &Config) -> Result<Self> {
        let threshold: f32 = config.require("threshold")?;
        if !threshold.is_finite() {
            return Err(PluginError::internal(format!(
                "config threshold: expected a finite number, got {threshold}"
            )));
        }
        Ok(Cascade {
            small: config.require("small")?,
            large: config.require("large")?,
            threshold,
            scores: config.get("scores"),
        })
    }
}

impl Orchestrator for Cascade {
    fn run(
        &mut self,
        _req: &RequestInfo,
        inputs: Vec<Tensor>,
        models: &Models,
    ) -> Result<Vec<Tensor>> {
        let rows = batch_rows(&inputs)?;
        let mut answer = models.infer(&self.small, inputs.clone())?;
        let scores = match &self.scores {
            Some(name) => answer.iter().find(|t| &t.name == name).ok_or_else(|| {
                PluginError::internal(format!(
                    "model '{}' gave no output '{name}' (config scores)",
                    self.small
                ))
            })?,
            None => answer.first().ok_or_else(|| {
                PluginError::internal(format!("model '{}' gave no outputs", self.small))
            })?,
        };
        let uncertain = uncertain_rows(scores, rows, self.threshold)?;
        if uncertain.is_empty() {
            return Ok(answer);
        }
        let subset = inputs
            .iter()
            .map(|tensor| gather(tensor, &uncertain))
            .collect::<Result<Vec<_>>>()?;
        let better = models.infer(&self.large, subset)?;
        for tensor in &mut answer {
            let replacement = better
                .iter()
                .find(|t| t.name == tensor.name)
                .ok_or_else(|| {
                    PluginError::internal(format!(
                        "model '{}' gave no output '{}', which model '{}' gives",
                        self.large, tensor.name, self.small
                    ))
                })?;
            scatter(tensor, replacement, &uncertain)?;
        }
        Ok(answer)
    }
}

/// The rows of the batch: every input's first dimension, which must agree.
fn batch_rows(inputs: &[Tensor]) -> Result<usize> {
    let mut rows = None;
    for tensor in inputs {
        let n = tensor.dims()?.first().copied().ok_or_else(|| {
            PluginError::invalid_input(format!(
                "input '{}': expected a batch dimension, got a scalar",
                tensor.name
            ))
        })?;
        match rows {
            None => rows = Some(n),
            Some(first) if first != n => {
                return Err(PluginError::invalid_input(format!(
                    "input '{}': {n} rows, but the first input has {first}",
                    tensor.name
                )));
            }
            Some(_) => {}
        }
    }
    rows.ok_or_else(|| PluginError::invalid_input("no inputs"))
}

/// The indices of the rows whose highest score is below `threshold`.
fn uncertain_rows(scores: &Tensor, rows: usize, threshold: f32) -> Result<Vec<usize>> {
    let [n, classes] = scores.dims_n::<2>()?;
    if n != rows || classes == 0 {
        return Err(PluginError::internal(format!(
            "scores '{}': expected [{rows}, classes], got {:?}",
            scores.name, scores.shape
        )));
    }
    let values = scores.to_f32_lossy()?;
    Ok(values
        .chunks_exact(classes)
        .enumerate()
        .filter(|(_, row)| row.iter().copied().fold(f32::NEG_INFINITY, f32::max) < threshold)
        .map(|(idx, _)| idx)
        .collect())
}

/// The bytes of one row of `tensor`.
fn row_bytes(tensor: &Tensor) -> Result<usize> {
    if tensor.dtype.size_bytes().is_none() {
        return Err(PluginError::invalid_input(format!(
            "tensor '{}': {} rows cannot be split",
            tensor.name, tensor.dtype
        )));
    }
    let rows = tensor.dims()?.first().copied().unwrap_or(0);
    Ok(tensor.data.len().checked_div(rows).unwrap_or(0))
}

/// `tensor` with only the rows `picked`, in that order.
fn gather(tensor: &Tensor, picked: &[usize]) -> Result<Tensor> {
    let size = row_bytes(tensor)?;
    let mut data = Vec::with_capacity(size * picked.len());
    for &row in picked {
        data.extend_from_slice(&tensor.data[row * size..(row + 1) * size]);
    }
    let mut shape = tensor.shape.clone();
    shape[0] = picked.len() as i64;
    Ok(Tensor {
        name: tensor.name.clone(),
        dtype: tensor.dtype,
        shape,
        data,
    })
}

/// Writes the rows of `replacement` over the rows `picked` of `tensor`.
fn scatter(tensor: &mut Tensor, replacement: &Tensor, picked: &[usize]) -> Result<()> {
    let size = row_bytes(tensor)?;
    let fits = replacement.dtype == tensor.dtype
        && replacement.shape.first() == Some(&(picked.len() as i64))
        && replacement.shape[1..] == tensor.shape[1..];
    if !fits {
        return Err(PluginError::internal(format!(
            "output '{}': the large model's {} {:?} does not fit the small model's {} {:?}",
            tensor.name, replacement.dtype, replacement.shape, tensor.dtype, tensor.shape
        )));
    }
    for (source, &row) in picked.iter().enumerate() {
        tensor.data[row * size..(row + 1) * size]
            .copy_from_slice(&replacement.data[source * size..(source + 1) * size]);
    }
    Ok(())
}

export_orchestrator!(Cascade);

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(rows: &[[f32; 3]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_f32("y", &[rows.len() as i64, 3], flat).unwrap()
    }

    #[test]
    fn rows_below_the_threshold_are_uncertain() {
        let s = scores(&[[0.75, 0.125, 0.125], [0.5, 0.25, 0.25], [0.25, 0.25, 0.5]]);
        assert_eq!(uncertain_rows(&s, 3, 0.6).unwrap(), vec![1, 2]);
        assert_eq!(uncertain_rows(&s, 3, 0.5).unwrap(), Vec::<usize>::new());
    }

    #[test]
    fn gathered_rows_scatter_back_in_place() {
        let mut s = scores(&[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]);
        let picked = gather(&s, &[0, 2]).unwrap();
        assert_eq!(picked.shape, vec![2, 3]);
        assert_eq!(&*picked.as_f32().unwrap(), &[1.0, 2.0, 3.0, 7.0, 8.0, 9.0]);
        let better = scores(&[[10.0, 20.0, 30.0], [70.0, 80.0, 90.0]]);
        scatter(&mut s, &better, &[0, 2]).unwrap();
        assert_eq!(
            &*s.as_f32().unwrap(),
            &[10.0, 20.0, 30.0, 4.0, 5.0, 6.0, 70.0, 80.0, 90.0]
        );
        // A replacement of another row size is refused.
        let wrong = Tensor::from_f32("y", &[2, 2], vec![0.0; 4]).unwrap();
        assert!(scatter(&mut s, &wrong, &[0, 2]).is_err());
    }

    #[test]
    fn configuration_is_checked_at_init() {
        let err = Cascade::init(&Config::from_pairs([("small", "s"), ("large", "l")]))
            .err()
            .unwrap();
        assert!(err.message().contains("threshold"), "{err:?}");
    }
}
