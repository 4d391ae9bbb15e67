//! A byte-level tokenizer: text in, token ids out.
//!
//! Replaces a `bytes` tensor of `N` strings (shape `[N]`) among the request's
//! inputs with an `i64` tensor of shape `[N, max-len]`: each string's bytes
//! as token ids 1..=256 (byte value + 1), cut at `max-len` and padded with 0.
//!
//! Configuration:
//!
//! - `max-len`: tokens per string, at least 1. Default `64`.
//! - `input`: name of the text tensor. Default `text`.
//! - `output`: name of the token tensor. Default `tokens`.
//!
//! The postprocess side passes tensors through unchanged.

use plinth_plugin_sdk::prelude::*;

struct ByteTokenize {
    max_len: usize,
    input: String,
    output: String,
}

impl Plugin for ByteTokenize {
    fn init(config: &Config) -> Result<Self> {
        let max_len: usize = config.parse_or("max-len", 64)?;
        if max_len == 0 {
            return Err(PluginError::unavailable(
                "config key `max-len`: must be at least 1",
            ));
        }
        Ok(ByteTokenize {
            max_len,
            input: config.parse_or("input", "text".to_owned())?,
            output: config.parse_or("output", "tokens".to_owned())?,
        })
    }
}

impl Processor for ByteTokenize {
    fn preprocess(&mut self, _req: &RequestInfo, mut inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let Some(position) = inputs.iter().position(|t| t.name == self.input) else {
            return Err(PluginError::invalid_input(format!(
                "expected a bytes tensor `{}` among the inputs",
                self.input
            )));
        };
        let text = &inputs[position];
        text.expect_dtype(Dtype::Bytes)?;
        let [n] = text.dims_n::<1>()?;
        let mut ids = vec![0i64; n * self.max_len];
        for (row, element) in ids.chunks_mut(self.max_len).zip(text.as_byte_strings()?) {
            for (slot, byte) in row.iter_mut().zip(element) {
                *slot = i64::from(*byte) + 1;
            }
        }
        let shape = [n as i64, self.max_len as i64];
        inputs[position] = Tensor::from_values(self.output.clone(), &shape, &ids)?;
        Ok(inputs)
    }
}

export_processor!(ByteTokenize);
