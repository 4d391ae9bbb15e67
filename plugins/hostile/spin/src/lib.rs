//! Test fixture: a processor whose calls never return.
//!
//! `preprocess` and `postprocess` spin forever, so the host must stop them
//! with its per-call deadline (epoch interruption). `init` and `describe`
//! behave, so the plugin loads.

use std::hint::black_box;

use plinth_plugin_sdk::prelude::*;

struct Spin;

impl Plugin for Spin {
    fn init(_config: &Config) -> Result<Self> {
        Ok(Spin)
    }
}

impl Processor for Spin {
    fn preprocess(&mut self, _req: &RequestInfo, _inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        spin()
    }

    fn postprocess(&mut self, _req: &RequestInfo, _outputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        spin()
    }
}

fn spin() -> ! {
    let mut counter: u64 = 0;
    loop {
        // black_box keeps the optimiser from proving the loop useless.
        counter = black_box(counter.wrapping_add(1));
    }
}

export_processor!(Spin);
