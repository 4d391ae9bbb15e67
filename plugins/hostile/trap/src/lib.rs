//! Test fixture: a processor that traps.
//!
//! `preprocess` and `postprocess` panic, which is a WebAssembly trap
//! (`unreachable`) in a component. With config `trap-in = "init"`, `init`
//! traps instead, so that the host's load-time validation sees it; the
//! default `trap-in = "call"` traps on calls only. `trap-in = "abort"`
//! writes a traceback-like message to stderr and aborts (no panic hook
//! runs), as a guest written in another language dies.

use plinth_plugin_sdk::prelude::*;

struct Trap {
    abort: bool,
}

impl Plugin for Trap {
    fn init(config: &Config) -> Result<Self> {
        let trap_in = config.parse_or("trap-in", "call".to_owned())?;
        match trap_in.as_str() {
            "call" => Ok(Trap { abort: false }),
            "abort" => Ok(Trap { abort: true }),
            "init" => panic!("hostile-trap: deliberate trap in init"),
            other => Err(PluginError::unavailable(format!(
                "config key `trap-in`: expected `call`, `init` or `abort`, got `{other}`"
            ))),
        }
    }
}

impl Processor for Trap {
    fn preprocess(&mut self, _req: &RequestInfo, _inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if self.abort {
            println!("hostile-trap: preprocess called");
            eprintln!("Traceback (most recent call last):");
            eprintln!("ValueError: hostile-trap: deliberate abort in preprocess");
            std::process::abort();
        }
        panic!("hostile-trap: deliberate trap in preprocess")
    }

    fn postprocess(&mut self, _req: &RequestInfo, _outputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        panic!("hostile-trap: deliberate trap in postprocess")
    }
}

export_processor!(Trap);
