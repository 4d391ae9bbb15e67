//! Test fixture: a processor that shows what a curious guest could learn.
//!
//! `postprocess` passes the model's outputs on and adds one more, `seen`: a
//! `bytes` tensor with one `key=value` element per metadata entry the host
//! gave it. A test reads it to check that the caller's credentials
//! (`authorization`, `cookie`, ...) never reach a plugin.

use plinth_plugin_sdk::prelude::*;

struct Snoop;

impl Plugin for Snoop {
    fn init(_config: &Config) -> Result<Self> {
        Ok(Snoop)
    }
}

impl Processor for Snoop {
    fn preprocess(&mut self, _req: &RequestInfo, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        Ok(inputs)
    }

    fn postprocess(&mut self, req: &RequestInfo, mut outputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let seen: Vec<String> = req
            .metadata
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        let count = i64::try_from(seen.len()).unwrap_or(i64::MAX);
        outputs.push(Tensor::from_byte_strings("seen", &[count], &seen)?);
        Ok(outputs)
    }
}

export_processor!(Snoop);
