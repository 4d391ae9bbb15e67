//! The gRPC edge: the only part of the server that sees `plinth.v1` and
//! `inference` proto types (generated in `plinth-proto`, re-exported here).
//! It decodes and validates, calls the registry, and maps errors to `Status`
//! in one place ([`status`]).

mod compute;
mod inference;
mod models;
mod plugins;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::{Code, Status, Streaming};
use tonic_health::server::HealthReporter;

pub use compute::ComputeApi;
pub use inference::{InferenceApi, decode_infer_request};
pub use models::ModelApi;
pub use plugins::PluginApi;

use crate::error::Error;
use crate::health::Health;
use crate::pipeline::Pipeline;
use crate::ports::HostInfo;
use crate::registry::{ModelState, ModelStatus};
use crate::tensor::{DType, Tensor, TensorSpec};

/// What the gRPC services share.
#[derive(Clone)]
pub struct GrpcState {
    pub pipeline: Pipeline,
    /// The cached readiness verdict.
    pub health: Arc<Health>,
    pub info: HostInfo,
    /// Cancelled at shutdown: the stream RPCs end.
    pub shutdown: CancellationToken,
    /// Largest message accepted or sent (the same limit as HTTP bodies).
    pub max_message_bytes: usize,
    /// Each port's connection counters, for GetInfo.
    pub connections: crate::ports::PortSet<Arc<crate::listen::PortCounters>>,
    /// The system shared-memory regions (shared with the HTTP edge).
    pub shm: Arc<crate::oip::shm::SharedMemory>,
}

/// Every gRPC service on the gRPC port: `plinth.v1` (compute, models,
/// plugins), the Open Inference Protocol, `grpc.health.v1` and server
/// reflection. The health service starts NOT_SERVING; the returned reporter
/// is how the health monitor changes that.
pub fn routes(state: GrpcState) -> Result<(Routes, HealthReporter), Error> {
    let limit = state.max_message_bytes;
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|err| Error::Internal(format!("gRPC reflection: {err}")))?;
    let compute = pb::compute_service_server::ComputeServiceServer::new(ComputeApi::new(
        state.pipeline.clone(),
        Arc::clone(&state.health),
        state.info,
        state.shutdown.clone(),
        state.connections,
    ))
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let models = pb::model_service_server::ModelServiceServer::new(ModelApi::new(
        state.pipeline.registry().clone(),
        state.shutdown.clone(),
    ))
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let plugins = pb::plugin_service_server::PluginServiceServer::new(PluginApi::new(Arc::clone(
        state.pipeline.plugins(),
    )))
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let inference = ipb::grpc_inference_service_server::GrpcInferenceServiceServer::new(
        InferenceApi::new(state.pipeline, state.health, state.shutdown, state.shm),
    )
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let routes = Routes::new(health)
        .add_service(reflection)
        .add_service(compute)
        .add_service(models)
        .add_service(plugins)
        .add_service(inference);
    Ok((routes, reporter))
}

/// How many messages of one stream may be in the pipeline at once.
const STREAM_WINDOW: usize = 16;

/// The response side of a bidirectional stream.
type AnswerStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Answers a bidirectional stream in order: every inbound message goes
/// through `answer`, up to [`STREAM_WINDOW`] of them at a time, and the
/// answers leave in the order the messages came. `answer` reports a bad
/// message in its answer, so the stream goes on; a broken transport ends it.
/// The stream also ends when the server shuts down.
fn answer_in_order<Req, Resp, F, Fut>(
    inbound: Streaming<Req>,
    shutdown: &CancellationToken,
    open: crate::pipeline::OpenStream,
    answer: F,
) -> AnswerStream<Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: Fn(Req) -> Fut + Send + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let outbound = inbound
        .take_until(shutdown.clone().cancelled_owned())
        .map(move |message| {
            // The guard lives as long as the stream: it is dropped with it.
            let _open = &open;
            let pending = message.map(&answer);
            async move {
                match pending {
                    Ok(answer) => Ok(answer.await),
                    Err(status) => Err(status),
                }
            }
        })
        .buffered(STREAM_WINDOW);
    Box::pin(outbound)
}

/// The generated protocol (`plinth.v1` as `pb`, the Open Inference Protocol
/// as `ipb`, and the encoded descriptors for reflection) lives in
/// `plinth-proto`; the edge re-exports it, so the tests and the benches name
/// it as `plinth::grpc::pb`.
pub use plinth_proto::{FILE_DESCRIPTOR_SET, ipb, pb};

/// The one mapping from host errors to gRPC codes.
pub fn status(err: Error) -> Status {
    let code = match &err {
        Error::ModelNotFound { .. } | Error::VersionNotFound { .. } | Error::NotFound(_) => {
            Code::NotFound
        }
        Error::ModelNotReady { .. } | Error::Unavailable(_) => Code::Unavailable,
        Error::AlreadyExists { .. } | Error::Conflict(_) => Code::AlreadyExists,
        Error::Unimplemented(_) => Code::Unimplemented,
        Error::LoadFailed(_) | Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::InvalidArgument(_) => Code::InvalidArgument,
        Error::ResourceExhausted(_) => Code::ResourceExhausted,
        Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
        Error::Cancelled => Code::Cancelled,
        Error::Internal(_) => Code::Internal,
    };
    Status::new(code, err.to_string())
}

pub(crate) fn dtype_from_pb(value: i32, tensor: &str) -> Result<DType, Error> {
    use pb::DataType as P;
    let dtype = match P::try_from(value) {
        Ok(P::Bool) => DType::Bool,
        Ok(P::Uint8) => DType::U8,
        Ok(P::Int8) => DType::I8,
        Ok(P::Int16) => DType::I16,
        Ok(P::Int32) => DType::I32,
        Ok(P::Int64) => DType::I64,
        Ok(P::Float16) => DType::F16,
        Ok(P::Bfloat16) => DType::BF16,
        Ok(P::Float32) => DType::F32,
        Ok(P::Float64) => DType::F64,
        Ok(P::Uint16) => DType::U16,
        Ok(P::Uint32) => DType::U32,
        Ok(P::Uint64) => DType::U64,
        Ok(P::Bytes) => DType::Bytes,
        Ok(P::Unspecified) => {
            return Err(Error::InvalidArgument(format!(
                "tensor '{tensor}': dtype is not set"
            )));
        }
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "tensor '{tensor}': unknown dtype value {value}"
            )));
        }
    };
    Ok(dtype)
}

pub(crate) fn dtype_to_pb(dtype: DType) -> pb::DataType {
    use pb::DataType as P;
    match dtype {
        DType::Bool => P::Bool,
        DType::U8 => P::Uint8,
        DType::I8 => P::Int8,
        DType::I16 => P::Int16,
        DType::I32 => P::Int32,
        DType::I64 => P::Int64,
        DType::F16 => P::Float16,
        DType::BF16 => P::Bfloat16,
        DType::F32 => P::Float32,
        DType::F64 => P::Float64,
        DType::U16 => P::Uint16,
        DType::U32 => P::Uint32,
        DType::U64 => P::Uint64,
        DType::Bytes => P::Bytes,
    }
}

pub fn tensor_from_pb(tensor: pb::Tensor) -> Result<Tensor, Error> {
    if tensor.name.is_empty() {
        return Err(Error::InvalidArgument("a tensor has an empty name".into()));
    }
    let dtype = dtype_from_pb(tensor.dtype, &tensor.name)?;
    Tensor::new(tensor.name, dtype, tensor.shape, tensor.data)
}

pub(crate) fn tensor_to_pb(tensor: Tensor) -> pb::Tensor {
    let dtype = dtype_to_pb(tensor.dtype()) as i32;
    let name = tensor.name().to_owned();
    let shape = tensor.shape().to_vec();
    pb::Tensor {
        name,
        dtype,
        shape,
        data: tensor.into_data(),
    }
}

pub(crate) fn spec_to_pb(spec: &TensorSpec) -> pb::TensorSpec {
    pb::TensorSpec {
        name: spec.name.clone(),
        dtype: dtype_to_pb(spec.dtype) as i32,
        shape: spec.shape.clone(),
    }
}

pub(crate) fn micros_since_epoch(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

pub(crate) fn state_to_pb(state: ModelState) -> pb::ModelState {
    match state {
        ModelState::Unavailable => pb::ModelState::Unavailable,
        ModelState::Loading => pb::ModelState::Loading,
        ModelState::Ready => pb::ModelState::Ready,
        ModelState::Unloading => pb::ModelState::Unloading,
        ModelState::Failed => pb::ModelState::Failed,
    }
}

pub(crate) fn status_to_pb(status: ModelStatus) -> pb::ModelStatus {
    pb::ModelStatus {
        name: status.name,
        state: state_to_pb(status.state) as i32,
        reason: status.reason.unwrap_or_default(),
        state_since_us: micros_since_epoch(status.since),
        load_duration_us: status
            .load_duration
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
        versions: status.versions,
        formats: status.formats,
        device: status.device.unwrap_or_default(),
        in_flight: status.in_flight,
        reloading: status.reloading,
        memory_bytes: status.memory_bytes,
        on_demand: status.on_demand,
    }
}

pub(crate) fn now_micros() -> i64 {
    micros_since_epoch(SystemTime::now())
}

/// A request's metadata as routers and processors see it: the ASCII gRPC
/// metadata (the caller's credentials dropped, `security::is_credential`),
/// then the request's parameters sorted by key. One function for both
/// services, so no edge forgets the credentials.
pub(crate) fn request_metadata(
    headers: &tonic::metadata::MetadataMap,
    parameters: impl Iterator<Item = (String, String)>,
) -> Vec<(String, String)> {
    let mut metadata: Vec<(String, String)> = headers
        .iter()
        .filter_map(|entry| match entry {
            tonic::metadata::KeyAndValueRef::Ascii(key, value)
                if !crate::security::is_credential(key.as_str()) =>
            {
                Some((key.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            }
            _ => None,
        })
        .collect();
    let mut params: Vec<(String, String)> = parameters.collect();
    params.sort();
    metadata.extend(params);
    metadata
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::security::groups::GRPC_METHODS;
    use crate::security::grpc_group;

    /// Every method of every service on the gRPC port belongs to an API
    /// group (a new RPC added to a proto without a group fails here), and
    /// every method in the table is served.
    #[test]
    fn every_served_method_has_an_api_group() {
        let mut methods = Vec::new();
        for set in [FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
            let set = prost_types::FileDescriptorSet::decode(set).unwrap();
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        methods.push(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        methods.push("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".into());
        assert!(methods.len() > 25, "{methods:?}");
        let unclassified: Vec<&String> =
            methods.iter().filter(|m| grpc_group(m).is_none()).collect();
        assert!(
            unclassified.is_empty(),
            "methods without an API group: {unclassified:?}"
        );
        // And the other way: the table names no method that is not served.
        let unserved: Vec<&str> = GRPC_METHODS
            .iter()
            .map(|(path, _)| *path)
            .filter(|path| !methods.iter().any(|m| m == path))
            .collect();
        assert!(
            unserved.is_empty(),
            "the group table names methods no service serves: {unserved:?}"
        );
    }
}
