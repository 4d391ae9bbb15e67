//! Softmax and top-k over classification logits.
//!
//! Replaces an `f32` logits tensor of shape `[N, C]` among the model's
//! outputs with two tensors: the indices of the `k` highest-scoring classes
//! per row (`i64`, `[N, k]`, best first, ties broken by the lower index) and
//! their scores (`f32`, `[N, k]`). `k` larger than `C` is clamped to `C`.
//!
//! Configuration:
//!
//! - `k`: how many classes to keep, at least 1. Default `5`.
//! - `input`: name of the logits tensor. Unset means the first `f32` tensor
//!   of rank 2.
//! - `softmax`: `true` (default) to turn logits into probabilities first;
//!   `false` when the model already outputs scores, which are then ranked
//!   as they are.
//! - `indices-output`, `scores-output`: names of the two new tensors.
//!   Defaults `topk_indices` and `topk_scores`.
//! - `keep-input`: `true` to keep the logits tensor in the response as
//!   well. Default `false`.
//!
//! The preprocess side passes tensors through unchanged.

use std::cmp::Ordering;

use plinth_plugin_sdk::prelude::*;

struct SoftmaxTopK {
    k: usize,
    input: Option<String>,
    softmax: bool,
    indices_output: String,
    scores_output: String,
    keep_input: bool,
}

impl Plugin for SoftmaxTopK {
    fn init(config: &Config) -> Result<Self> {
        let k: usize = config.parse_or("k", 5)?;
        if k == 0 {
            return Err(PluginError::unavailable(
                "config key `k`: must be at least 1",
            ));
        }
        let plugin = SoftmaxTopK {
            k,
            input: config.get("input").map(|name| name.trim().to_owned()),
            softmax: config.parse_or("softmax", true)?,
            indices_output: config.parse_or("indices-output", "topk_indices".to_owned())?,
            scores_output: config.parse_or("scores-output", "topk_scores".to_owned())?,
            keep_input: config.parse_or("keep-input", false)?,
        };
        if plugin.indices_output == plugin.scores_output {
            return Err(PluginError::unavailable(format!(
                "config keys `indices-output` and `scores-output` are both `{}`",
                plugin.indices_output
            )));
        }
        Ok(plugin)
    }
}

impl Processor for SoftmaxTopK {
    fn postprocess(&mut self, _req: &RequestInfo, mut outputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let position = match &self.input {
            Some(name) => outputs.iter().position(|tensor| &tensor.name == name),
            None => outputs
                .iter()
                .position(|tensor| tensor.dtype == Dtype::F32 && tensor.rank() == 2),
        };
        let Some(position) = position else {
            let wanted = match &self.input {
                Some(name) => format!("a logits tensor `{name}`"),
                None => "an f32 logits tensor of rank 2".to_owned(),
            };
            let present: Vec<&str> = outputs.iter().map(|t| t.name.as_str()).collect();
            return Err(PluginError::invalid_input(format!(
                "expected {wanted} among the model outputs, got tensors {present:?}"
            )));
        };
        let (indices, scores) = self.top_k(&outputs[position])?;
        if self.keep_input {
            outputs.splice(position + 1..position + 1, [indices, scores]);
        } else {
            outputs.splice(position..=position, [indices, scores]);
        }
        Ok(outputs)
    }
}

impl SoftmaxTopK {
    fn top_k(&self, logits: &Tensor) -> Result<(Tensor, Tensor)> {
        let [rows, classes] = logits.dims_n::<2>()?;
        let values = logits.as_f32()?;
        if let Some(bad_idx) = values.iter().position(|value| !value.is_finite()) {
            return Err(PluginError::invalid_input(format!(
                "tensor `{}`: element [{}, {}] is {}, expected a finite number",
                logits.name,
                bad_idx / classes,
                bad_idx % classes,
                values[bad_idx]
            )));
        }
        let k = self.k.min(classes);
        let mut top_indices = Vec::with_capacity(rows * k);
        let mut top_scores = Vec::with_capacity(rows * k);
        let mut scores = vec![0f32; classes];
        let mut order: Vec<usize> = Vec::with_capacity(classes);
        for row in values.chunks_exact(classes.max(1)).take(rows) {
            scores.copy_from_slice(row);
            if self.softmax {
                softmax_in_place(&mut scores);
            }
            let best_first = |a: &usize, b: &usize| -> Ordering {
                scores[*b].total_cmp(&scores[*a]).then(a.cmp(b))
            };
            order.clear();
            order.extend(0..classes);
            if k < classes {
                order.select_nth_unstable_by(k, best_first);
                order.truncate(k);
            }
            order.sort_unstable_by(best_first);
            top_indices.extend(order.iter().map(|&class| class as i64));
            top_scores.extend(order.iter().map(|&class| scores[class]));
        }
        let shape = [rows as i64, k as i64];
        Ok((
            Tensor::from_i64(self.indices_output.clone(), &shape, top_indices)?,
            Tensor::from_f32(self.scores_output.clone(), &shape, top_scores)?,
        ))
    }
}

/// Softmax of finite values, shifted by the maximum so `exp` cannot
/// overflow.
fn softmax_in_place(values: &mut [f32]) {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for value in values.iter_mut() {
        *value = (*value - max).exp();
        sum += *value;
    }
    // The maximum contributes exp(0) = 1, so the sum is at least 1.
    for value in values.iter_mut() {
        *value /= sum;
    }
}

export_processor!(SoftmaxTopK);

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RequestInfo {
        RequestInfo {
            id: "1".to_owned(),
            model: "m".to_owned(),
            version: None,
            metadata: Vec::new(),
        }
    }

    fn plugin(pairs: &[(&str, &str)]) -> SoftmaxTopK {
        SoftmaxTopK::init(&Config::from_pairs(pairs.iter().copied())).unwrap()
    }

    #[test]
    fn top_k_with_softmax_scores() {
        let mut plugin = plugin(&[("k", "2")]);
        let logits =
            Tensor::from_f32("logits", &[2, 3], vec![1.0, 3.0, 2.0, 0.0, 0.0, 5.0]).unwrap();
        let out = plugin.postprocess(&request(), vec![logits]).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].name, "topk_indices");
        assert_eq!(out[0].shape, vec![2, 2]);
        assert_eq!(&*out[0].as_i64().unwrap(), &[1, 2, 2, 0]);
        let scores = out[1].as_f32().unwrap();
        let denominator = 1f32.exp() + 3f32.exp() + 2f32.exp();
        assert!((scores[0] - 3f32.exp() / denominator).abs() < 1e-6);
        assert!((scores[1] - 2f32.exp() / denominator).abs() < 1e-6);
        assert!(scores[2] > 0.98);
    }

    #[test]
    fn ties_keep_the_lower_index_and_k_is_clamped() {
        let mut plugin = plugin(&[("k", "10"), ("softmax", "false"), ("keep-input", "true")]);
        let logits = Tensor::from_f32("scores", &[1, 3], vec![0.5, 0.5, 0.1]).unwrap();
        let out = plugin
            .postprocess(&request(), vec![logits.clone()])
            .unwrap();
        assert_eq!(out[0], logits);
        assert_eq!(&*out[1].as_i64().unwrap(), &[0, 1, 2]);
        assert_eq!(&*out[2].as_f32().unwrap(), &[0.5, 0.5, 0.1]);
        assert_eq!(out[2].shape, vec![1, 3]);
    }

    #[test]
    fn other_outputs_keep_their_place() {
        let mut plugin = plugin(&[("k", "1"), ("input", "cls")]);
        let before = Tensor::from_i32("a", &[1], vec![1]).unwrap();
        let logits = Tensor::from_f32("cls", &[1, 2], vec![0.0, 1.0]).unwrap();
        let after = Tensor::from_f32("b", &[1, 2], vec![9.0, 9.0]).unwrap();
        let out = plugin
            .postprocess(&request(), vec![before.clone(), logits, after.clone()])
            .unwrap();
        let names: Vec<&str> = out.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "topk_indices", "topk_scores", "b"]);
        assert_eq!(out[0], before);
        assert_eq!(out[3], after);
    }

    #[test]
    fn precise_errors() {
        let mut plugin = plugin(&[("input", "logits")]);
        let err = plugin.postprocess(&request(), vec![]).unwrap_err();
        assert_eq!(
            err.message(),
            "expected a logits tensor `logits` among the model outputs, got tensors []"
        );
        let wrong = Tensor::from_i64("logits", &[1, 2], vec![1, 2]).unwrap();
        let err = plugin.postprocess(&request(), vec![wrong]).unwrap_err();
        assert_eq!(
            err.message(),
            "tensor `logits`: expected dtype f32, got i64"
        );
        let wrong = Tensor::from_f32("logits", &[2], vec![1.0, 2.0]).unwrap();
        let err = plugin.postprocess(&request(), vec![wrong]).unwrap_err();
        assert_eq!(
            err.message(),
            "tensor `logits`: expected rank 2, got shape [2] (rank 1)"
        );
        let nan = Tensor::from_f32("logits", &[1, 2], vec![1.0, f32::NAN]).unwrap();
        let err = plugin.postprocess(&request(), vec![nan]).unwrap_err();
        assert_eq!(
            err.message(),
            "tensor `logits`: element [0, 1] is NaN, expected a finite number"
        );
        let err = SoftmaxTopK::init(&Config::from_pairs([("k", "0")]))
            .err()
            .unwrap();
        assert_eq!(err.message(), "config key `k`: must be at least 1");
    }

    #[test]
    fn empty_batch_and_zero_classes() {
        let mut plugin = plugin(&[]);
        let logits = Tensor::from_f32("logits", &[0, 4], vec![]).unwrap();
        let out = plugin.postprocess(&request(), vec![logits]).unwrap();
        assert_eq!(out[0].shape, vec![0, 4]);
        let logits = Tensor::from_f32("logits", &[2, 0], vec![]).unwrap();
        let out = plugin.postprocess(&request(), vec![logits]).unwrap();
        assert_eq!(out[0].shape, vec![2, 0]);
        assert_eq!(out[1].numel().unwrap(), 0);
    }
}
