//! Plinth: a model-serving host. See ARCHITECTURE.md for the map.
//!
//! This crate is the top of the host: the registry, the pipeline, the edges
//! (gRPC and HTTP), the listeners and the access gate, and the server
//! assembly. The vocabulary below it lives in
//! `plinth-core` (re-exported here as `config`, `error` and `tensor`), the
//! torch layer in `plinth-torch`, the plugin layer in `plinth-plugin`
//! (re-exported as `plugin`), and the generated protocol in `plinth-proto`
//! (re-exported by `grpc`). The client side of the `plinth` command is
//! `plinth-client`, which the binary uses and this library does not.

pub use plinth_core::{config, deadline, error, tensor};
pub use plinth_plugin as plugin;

pub mod demo;
pub mod grpc;
pub mod health;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod oip;
pub mod pipeline;
pub mod ports;
pub mod registry;
pub mod security;
pub mod server;
pub mod telemetry;
pub mod watch;

pub use error::Error;
pub use server::{RunningServer, ServerConfig, start};

/// `Pipeline::infer` is the one way into a model: the registry's ready
/// models cannot be called around it (which would skip plugins and
/// statistics).
///
/// ```compile_fail
/// async fn around(model: &plinth::registry::ReadyModel) {
///     let _ = model.infer(None, Vec::new(), None).await;
/// }
/// ```
///
/// ```compile_fail
/// async fn around(registry: &plinth::registry::Registry) {
///     let request = plinth::registry::InferRequest {
///         model: "m".into(),
///         version: None,
///         inputs: Vec::new(),
///     };
///     let _ = registry.infer(request).await;
/// }
/// ```
///
/// ```no_run
/// // What the two above call is reachable only through the pipeline.
/// async fn through(pipeline: &plinth::pipeline::Pipeline) {
///     let _ = pipeline.infer(plinth::pipeline::PipelineRequest::default()).await;
/// }
/// ```
#[doc(hidden)]
pub mod one_way_in {}
