//! Test fixture: a processor built against `wit/` in this crate, a copy of
//! the contract as it was released at `plinth:plugin@0.1.0` and never to be
//! edited. It adds 10 to every f32 before the model and nothing after, so a
//! test can tell that it ran. A 0.1.x host must keep loading it.

wit_bindgen::generate!({
    path: "wit",
    world: "plinth:plugin/processor-plugin@0.1.0",
});

use exports::plinth::plugin::processor::Guest as ProcessorGuest;
use plinth::plugin::types::{Dtype, RequestInfo, Tensor};

// Natively the export below is compiled out, and the type is unused.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
struct Compat;

impl Guest for Compat {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: env!("CARGO_PKG_NAME").to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            description: env!("CARGO_PKG_DESCRIPTION").to_owned(),
        }
    }

    fn init() -> Result<(), PluginError> {
        Ok(())
    }
}

impl ProcessorGuest for Compat {
    fn preprocess(_req: RequestInfo, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PluginError> {
        inputs
            .into_iter()
            .map(|mut tensor| {
                if tensor.dtype != Dtype::F32 {
                    return Err(PluginError::InvalidInput(format!(
                        "input '{}': expected f32",
                        tensor.name
                    )));
                }
                for chunk in tensor.data.chunks_exact_mut(4) {
                    let value = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                    chunk.copy_from_slice(&(value + 10.0).to_le_bytes());
                }
                Ok(tensor)
            })
            .collect()
    }

    fn postprocess(_req: RequestInfo, outputs: Vec<Tensor>) -> Result<Vec<Tensor>, PluginError> {
        Ok(outputs)
    }
}

#[cfg(target_arch = "wasm32")]
export!(Compat);
