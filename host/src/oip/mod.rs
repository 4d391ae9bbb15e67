//! The Open Inference Protocol v2 (KServe's, with Triton's extensions), apart
//! from any transport. `grpc::inference` and `http::v2` only translate their
//! wire formats to and from what is here:
//!
//! - [`codec`]: datatype names, checked tensors from typed or JSON data,
//!   tensors as JSON, requested outputs and classification;
//! - [`views`]: model readiness, metadata, configuration, the repository
//!   index and statistics, as both edges report them;
//! - [`repository`]: load and unload with Triton's semantics;
//! - [`shm`]: the system shared-memory regions clients register, which
//!   requests name in place of tensor bytes.

pub mod codec;
pub mod repository;
pub mod shm;
pub mod views;

pub use codec::{
    Elements, JsonData, RequestedOutput, checked_numel, classify, config_datatype_name,
    contents_field, datatype_name, json_tensor, parse_datatype, select_outputs, tensor_json_data,
    typed_tensor,
};
pub use repository::{repository_load, repository_unload};
pub use views::{
    BACKEND, ConfigTensor, IndexRow, InstanceGroupView, InstanceKind, ModelConfigView, PLATFORM,
    SPECIFIC_VERSIONS_PARAMETER, StatDuration, TensorMetadata, VersionPolicyView,
    VersionStatistics, model_config, model_ready, ready_model, ready_model_config,
    repository_index, state_name, statistics, tensor_metadata,
};

/// The name the server reports in its metadata.
pub const SERVER_NAME: &str = "plinth";

/// The protocol extensions served, as ServerMetadata lists them.
pub const EXTENSIONS: &[&str] = &[
    "classification",
    "binary_tensor_data",
    "model_repository",
    "model_configuration",
    "statistics",
    "system_shared_memory",
];
