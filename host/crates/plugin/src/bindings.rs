//! Host-side bindings of the four plugin worlds in `wit/`. The processor
//! world owns the shared `types` and `host` interfaces; the other worlds reuse
//! them, so a tensor is the same Rust type whichever world it crosses.

pub mod processor {
    wasmtime::component::bindgen!({
        path: "../../../wit",
        world: "processor-plugin",
    });
}

pub mod router {
    wasmtime::component::bindgen!({
        path: "../../../wit",
        world: "router-plugin",
        with: {
            "plinth:plugin/types": super::processor::plinth::plugin::types,
            "plinth:plugin/host": super::processor::plinth::plugin::host,
        },
    });
}

pub mod metrics {
    wasmtime::component::bindgen!({
        path: "../../../wit",
        world: "metrics-plugin",
        with: {
            "plinth:plugin/types": super::processor::plinth::plugin::types,
            "plinth:plugin/host": super::processor::plinth::plugin::host,
        },
    });
}

pub mod health {
    wasmtime::component::bindgen!({
        path: "../../../wit",
        world: "health-plugin",
        with: {
            "plinth:plugin/types": super::processor::plinth::plugin::types,
            "plinth:plugin/host": super::processor::plinth::plugin::host,
        },
    });
}

pub use processor::plinth::plugin::host as wit_host;
pub use processor::plinth::plugin::types as wit;
