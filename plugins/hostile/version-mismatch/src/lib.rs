//! Test fixture: a well-behaved pass-through processor built against
//! `plinth:plugin@1.0.0` (see `wit/` in this crate). A host at 0.1 must
//! refuse to load it, naming both versions, rather than fail at call time.

wit_bindgen::generate!({
    path: "wit",
    world: "plinth:plugin/processor-plugin@1.0.0",
});

use exports::plinth::plugin::processor::Guest as ProcessorGuest;
use plinth::plugin::host::{LogLevel, log};
use plinth::plugin::types::{RequestInfo, Tensor};

// Natively the export below is compiled out (see the SDK's export macros
// for why), and the type is unused.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
struct VersionMismatch;

impl Guest for VersionMismatch {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: env!("CARGO_PKG_NAME").to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            description: env!("CARGO_PKG_DESCRIPTION").to_owned(),
        }
    }

    fn init() -> Result<(), PluginError> {
        log(
            LogLevel::Warn,
            "hostile-version-mismatch was loaded by a host that should refuse it",
        );
        Ok(())
    }
}

impl ProcessorGuest for VersionMismatch {
    fn preprocess(_req: RequestInfo, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PluginError> {
        Ok(inputs)
    }

    fn postprocess(_req: RequestInfo, outputs: Vec<Tensor>) -> Result<Vec<Tensor>, PluginError> {
        Ok(outputs)
    }
}

#[cfg(target_arch = "wasm32")]
export!(VersionMismatch);
