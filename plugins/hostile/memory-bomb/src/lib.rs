//! Test fixture: a processor that allocates until memory runs out.
//!
//! `preprocess` and `postprocess` keep allocating and touching 1 MiB blocks.
//! Under the host's memory cap, `memory.grow` fails, the allocator reports
//! out of memory and the instance traps. Without a cap the instance grows
//! to the 4 GiB limit of 32-bit linear memory and traps there.

use std::hint::black_box;

use plinth_plugin_sdk::prelude::*;

const BLOCK_BYTES: usize = 1 << 20;

struct MemoryBomb;

impl Plugin for MemoryBomb {
    fn init(_config: &Config) -> Result<Self> {
        Ok(MemoryBomb)
    }
}

impl Processor for MemoryBomb {
    fn preprocess(&mut self, _req: &RequestInfo, _inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        explode()
    }

    fn postprocess(&mut self, _req: &RequestInfo, _outputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        explode()
    }
}

fn explode() -> ! {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        // Writing every byte makes the pages real, not just reserved.
        blocks.push(black_box(vec![0xa5; BLOCK_BYTES]));
    }
}

export_processor!(MemoryBomb);
