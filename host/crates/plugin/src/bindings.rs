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

/// The orchestrator world (0.1.1). Its calls are async: while the guest waits
/// in `models.infer`, the task gives its thread back to the runtime. Only
/// this world is linked that way; the others keep synchronous calls.
pub mod orchestrator {
    wasmtime::component::bindgen!({
        path: "../../../wit",
        world: "orchestrator-plugin",
        imports: {
            "plinth:plugin/models.infer": async,
        },
        exports: {
            default: async,
        },
        with: {
            "plinth:plugin/types": super::processor::plinth::plugin::types,
            "plinth:plugin/host": super::processor::plinth::plugin::host,
        },
    });
}

pub use orchestrator::plinth::plugin::models as wit_models;

/// The `mirroring-router-plugin` world (0.1.1). Only its `mirror` export is
/// used: a router is typed by `router`, and `mirror` is looked up beside it.
pub mod mirroring_router {
    wasmtime::component::bindgen!({
        path: "../../../wit",
        world: "mirroring-router-plugin",
        with: {
            "plinth:plugin/types": super::processor::plinth::plugin::types,
            "plinth:plugin/host": super::processor::plinth::plugin::host,
        },
    });
}

/// The `metrics-context-plugin` world (0.1.1). Only its `metrics-context`
/// export is used, looked up beside `metrics`.
pub mod metrics_context {
    wasmtime::component::bindgen!({
        path: "../../../wit",
        world: "metrics-context-plugin",
        with: {
            "plinth:plugin/types": super::processor::plinth::plugin::types,
            "plinth:plugin/host": super::processor::plinth::plugin::host,
        },
    });
}

pub use metrics_context::exports::plinth::plugin::metrics_context as wit_metrics_context;
pub use mirroring_router::exports::plinth::plugin::mirror as wit_mirror;
