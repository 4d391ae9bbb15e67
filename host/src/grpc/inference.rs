//! `inference.GRPCInferenceService`: the Open Inference Protocol v2 over gRPC,
//! with Triton's extensions, so tritonclient and other stock clients work.
//! Every inference runs through the same [`Pipeline`] as ComputeService.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::ipb::{self, grpc_inference_service_server::GrpcInferenceService};
use super::status;
use crate::deadline::queue_timeout;
use crate::error::Error;
use crate::health::Health;
use crate::oip::shm::{self, Placement, SharedMemory};
use crate::oip::{self, Elements, RequestedOutput};
use crate::pipeline::{Pipeline, PipelineRequest, PipelineResponse};
use crate::tensor::Tensor;

#[derive(Clone)]
pub struct InferenceApi {
    pipeline: Pipeline,
    health: Arc<Health>,
    shutdown: CancellationToken,
    shm: Arc<SharedMemory>,
}

impl InferenceApi {
    pub fn new(
        pipeline: Pipeline,
        health: Arc<Health>,
        shutdown: CancellationToken,
        shm: Arc<SharedMemory>,
    ) -> Self {
        InferenceApi {
            pipeline,
            health,
            shutdown,
            shm,
        }
    }
}

fn param_text(param: &ipb::InferParameter) -> String {
    use ipb::infer_parameter::ParameterChoice as P;
    match &param.parameter_choice {
        Some(P::BoolParam(v)) => v.to_string(),
        Some(P::Int64Param(v)) => v.to_string(),
        Some(P::StringParam(v)) => v.clone(),
        Some(P::DoubleParam(v)) => v.to_string(),
        Some(P::Uint64Param(v)) => v.to_string(),
        None => String::new(),
    }
}

fn param_count(output: &str, key: &str, param: &ipb::InferParameter) -> Result<usize, Error> {
    use ipb::infer_parameter::ParameterChoice as P;
    let n = match &param.parameter_choice {
        Some(P::Int64Param(v)) => usize::try_from(*v).ok(),
        Some(P::Uint64Param(v)) => usize::try_from(*v).ok(),
        _ => None,
    };
    n.filter(|n| *n > 0).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "output '{output}': parameter '{key}' must be a positive integer, got {:?}",
            param_text(param)
        ))
    })
}

fn param_u64(owner: &str, key: &str, param: &ipb::InferParameter) -> Result<u64, Error> {
    use ipb::infer_parameter::ParameterChoice as P;
    match &param.parameter_choice {
        Some(P::Int64Param(v)) => u64::try_from(*v).ok(),
        Some(P::Uint64Param(v)) => Some(*v),
        _ => None,
    }
    .ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{owner}: parameter '{key}' must be a non-negative integer, got {:?}",
            param_text(param)
        ))
    })
}

/// Where a tensor's parameters place it in shared memory, if they do.
fn shm_placement(
    owner: &str,
    params: &HashMap<String, ipb::InferParameter>,
    shm: &SharedMemory,
) -> Result<Option<Placement>, Error> {
    use ipb::infer_parameter::ParameterChoice as P;
    let region = match params.get(shm::REGION_PARAMETER) {
        None => None,
        Some(ipb::InferParameter {
            parameter_choice: Some(P::StringParam(name)),
        }) => Some(name.as_str()),
        Some(other) => {
            return Err(Error::InvalidArgument(format!(
                "{owner}: parameter '{}' must be a string, got {:?}",
                shm::REGION_PARAMETER,
                param_text(other)
            )));
        }
    };
    let number = |key: &str| {
        params
            .get(key)
            .map(|p| param_u64(owner, key, p))
            .transpose()
    };
    shm.placement(
        owner,
        region,
        number(shm::BYTE_SIZE_PARAMETER)?,
        number(shm::OFFSET_PARAMETER)?,
    )
}

/// The typed contents that are set, with their field names.
fn set_contents(contents: &ipb::InferTensorContents) -> Vec<Elements<'_>> {
    [
        Elements::Bool(&contents.bool_contents),
        Elements::Int(&contents.int_contents),
        Elements::Int64(&contents.int64_contents),
        Elements::Uint(&contents.uint_contents),
        Elements::Uint64(&contents.uint64_contents),
        Elements::Fp32(&contents.fp32_contents),
        Elements::Fp64(&contents.fp64_contents),
        Elements::Bytes(&contents.bytes_contents),
    ]
    .into_iter()
    .filter(|e| !e.is_empty())
    .collect()
}

/// Decodes the inputs: all raw or all typed (but for those in shared
/// memory, which `placed` collects), every one checked against its declared
/// shape before anything is built from it.
pub(crate) fn decode_inputs(
    request: &mut ipb::ModelInferRequest,
    shm: &SharedMemory,
    placed: &mut Vec<Placement>,
) -> Result<Vec<Tensor>, Error> {
    let raw = std::mem::take(&mut request.raw_input_contents);
    let inputs = std::mem::take(&mut request.inputs);
    let in_request = inputs
        .iter()
        .filter(|input| !input.parameters.contains_key(shm::REGION_PARAMETER))
        .count();
    if !raw.is_empty() && raw.len() != in_request {
        return Err(Error::InvalidArgument(format!(
            "raw_input_contents has {} entries for {in_request} inputs not in shared memory; send every such input raw, or none",
            raw.len(),
        )));
    }
    let mut raw = raw.into_iter();
    let mut tensors = Vec::with_capacity(inputs.len());
    for (idx, input) in inputs.into_iter().enumerate() {
        if input.name.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "input {idx} has an empty name"
            )));
        }
        let name = input.name;
        let dtype = oip::parse_datatype(&name, &input.datatype)?;
        let contents = input.contents.unwrap_or_default();
        let set = set_contents(&contents);
        if let Some(place) = shm_placement(&format!("input '{name}'"), &input.parameters, shm)? {
            if let Some(field) = set.first() {
                return Err(Error::InvalidArgument(format!(
                    "input '{name}': both contents.{} and parameter '{}' are set; use one",
                    field.field(),
                    shm::REGION_PARAMETER
                )));
            }
            oip::checked_numel(&name, &input.shape)?;
            tensors.push(Tensor::new(name, dtype, input.shape, place.read()?)?);
            placed.push(place);
            continue;
        }
        let tensor = match raw.next() {
            Some(bytes) => {
                if let Some(field) = set.first() {
                    return Err(Error::InvalidArgument(format!(
                        "input '{name}': both contents.{} and raw_input_contents are set; use one",
                        field.field()
                    )));
                }
                oip::checked_numel(&name, &input.shape)?;
                Tensor::new(name, dtype, input.shape, bytes)?
            }
            None => match set.as_slice() {
                [] => {
                    let field = oip::contents_field(dtype).unwrap_or("raw_input_contents");
                    let n = oip::checked_numel(&name, &input.shape)?;
                    if n > 0 {
                        return Err(Error::InvalidArgument(format!(
                            "input '{name}': no data (set contents.{field} or raw_input_contents)"
                        )));
                    }
                    Tensor::new(name, dtype, input.shape, bytes::Bytes::new())?
                }
                [elements] => oip::typed_tensor(&name, dtype, input.shape, *elements)?,
                [first, second, ..] => {
                    return Err(Error::InvalidArgument(format!(
                        "input '{name}': both contents.{} and contents.{} are set; use the one for {}",
                        first.field(),
                        second.field(),
                        input.datatype
                    )));
                }
            },
        };
        tensors.push(tensor);
    }
    Ok(tensors)
}

fn requested_outputs(
    outputs: &[ipb::model_infer_request::InferRequestedOutputTensor],
    shm: &SharedMemory,
) -> Result<Vec<RequestedOutput>, Error> {
    outputs
        .iter()
        .map(|output| {
            if output.name.is_empty() {
                return Err(Error::InvalidArgument(
                    "a requested output has an empty name".into(),
                ));
            }
            let classification = output
                .parameters
                .get("classification")
                .map(|p| param_count(&output.name, "classification", p))
                .transpose()?;
            let owner = format!("output '{}'", output.name);
            Ok(RequestedOutput {
                name: output.name.clone(),
                classification,
                binary: None,
                shared_memory: shm_placement(&owner, &output.parameters, shm)?,
            })
        })
        .collect()
}

async fn infer_one(
    pipeline: &Pipeline,
    shm: &SharedMemory,
    headers: &tonic::metadata::MetadataMap,
    mut request: ipb::ModelInferRequest,
) -> Result<ipb::ModelInferResponse, Error> {
    if request.model_name.is_empty() {
        return Err(Error::InvalidArgument("field 'model_name' is empty".into()));
    }
    let version = (!request.model_version.is_empty()).then(|| request.model_version.clone());
    let Decoded {
        inputs,
        requested,
        timeout,
        placed,
    } = decode_request(&mut request, shm)
        .map_err(|err| pipeline.reject(&request.model_name, version.as_deref(), err))?;
    let id = request.id.clone();
    let metadata = super::request_metadata(
        headers,
        request
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), param_text(v))),
    );
    pipeline
        .infer_then(
            PipelineRequest {
                id: request.id,
                model: request.model_name,
                version,
                inputs,
                metadata,
                timeout,
                protocol: "kserve-v2-grpc",
                ..PipelineRequest::default()
            },
            |response| infer_response(id, response, &requested, &placed),
        )
        .await
}

/// A request as the pipeline takes it.
struct Decoded {
    inputs: Vec<Tensor>,
    requested: Vec<RequestedOutput>,
    timeout: Option<std::time::Duration>,
    /// The inputs read in place from shared memory.
    placed: Vec<Placement>,
}

/// The input tensors of a gRPC `ModelInferRequest`, decoded and checked as
/// a request is (with its outputs and timeout parameter): what the fuzz
/// targets and their corpus replay drive.
pub fn decode_infer_request(mut request: ipb::ModelInferRequest) -> Result<Vec<Tensor>, Error> {
    decode_request(&mut request, &SharedMemory::default()).map(|decoded| decoded.inputs)
}

/// The inputs, the outputs asked for and the queue timeout of a request.
fn decode_request(
    request: &mut ipb::ModelInferRequest,
    shm: &SharedMemory,
) -> Result<Decoded, Error> {
    let mut placed = Vec::new();
    Ok(Decoded {
        inputs: decode_inputs(request, shm, &mut placed)?,
        requested: requested_outputs(&request.outputs, shm)?,
        timeout: queue_timeout(request.parameters.get("timeout").map(param_text).as_deref())?,
        placed,
    })
}

/// The answer on the wire: the outputs asked for, rendered with the config
/// of the model that computed them. Outputs placed in shared memory are
/// written there, and keep an empty raw entry so that the others' indices
/// hold; then every region the request used is checked once more.
fn infer_response(
    id: String,
    response: PipelineResponse,
    requested: &[RequestedOutput],
    placed: &[Placement],
) -> Result<ipb::ModelInferResponse, Error> {
    let outputs = oip::select_outputs(
        &response.model,
        &response.config,
        response.outputs,
        requested,
    )?;
    let mut raw = Vec::with_capacity(outputs.len());
    let mut described = Vec::with_capacity(outputs.len());
    for (idx, tensor) in outputs.into_iter().enumerate() {
        let mut parameters = HashMap::new();
        let place = requested.get(idx).and_then(|o| o.shared_memory.as_ref());
        let data = match place {
            Some(place) => {
                place.write(&tensor)?;
                parameters.insert(
                    shm::REGION_PARAMETER.to_owned(),
                    string_param(place.region()),
                );
                parameters.insert(
                    shm::BYTE_SIZE_PARAMETER.to_owned(),
                    ipb::InferParameter {
                        parameter_choice: Some(ipb::infer_parameter::ParameterChoice::Int64Param(
                            i64::try_from(tensor.data().len()).unwrap_or(i64::MAX),
                        )),
                    },
                );
                bytes::Bytes::new()
            }
            None => tensor.data().clone(),
        };
        described.push(ipb::model_infer_response::InferOutputTensor {
            name: tensor.name().to_owned(),
            datatype: oip::datatype_name(tensor.dtype()).to_owned(),
            shape: tensor.shape().to_vec(),
            parameters,
            contents: None,
        });
        raw.push(data);
    }
    for place in placed {
        place.check()?;
    }
    Ok(ipb::ModelInferResponse {
        model_name: response.model,
        model_version: response.version,
        id,
        parameters: HashMap::new(),
        outputs: described,
        raw_output_contents: raw,
    })
}

fn string_param(value: &str) -> ipb::InferParameter {
    ipb::InferParameter {
        parameter_choice: Some(ipb::infer_parameter::ParameterChoice::StringParam(
            value.to_owned(),
        )),
    }
}

fn duration(d: oip::StatDuration) -> Option<ipb::StatisticDuration> {
    Some(ipb::StatisticDuration {
        count: d.count,
        ns: d.ns,
    })
}

fn statistics_pb(s: oip::VersionStatistics) -> ipb::ModelStatistics {
    ipb::ModelStatistics {
        name: s.name,
        version: s.version,
        last_inference: s.last_inference,
        inference_count: s.inference_count,
        execution_count: s.execution_count,
        inference_stats: Some(ipb::InferStatistics {
            success: duration(s.success),
            fail: duration(s.fail),
            queue: duration(s.queue),
            compute_input: duration(s.compute_input),
            compute_infer: duration(s.compute_infer),
            compute_output: duration(s.compute_output),
            cache_hit: duration(oip::StatDuration::default()),
            cache_miss: duration(oip::StatDuration::default()),
        }),
        batch_stats: s
            .batches
            .into_iter()
            .map(
                |(batch_size, [input, infer, output])| ipb::InferBatchStatistics {
                    batch_size,
                    compute_input: duration(input),
                    compute_infer: duration(infer),
                    compute_output: duration(output),
                },
            )
            .collect(),
        memory_usage: vec![ipb::MemoryUsage {
            r#type: s.memory.0.to_owned(),
            id: s.memory.1,
            byte_size: s.memory.2,
        }],
        response_stats: HashMap::new(),
    }
}

fn config_dtype(dtype: crate::tensor::DType) -> i32 {
    use crate::tensor::DType as D;
    use ipb::DataType as P;
    (match dtype {
        D::Bool => P::TypeBool,
        D::U8 => P::TypeUint8,
        D::U16 => P::TypeUint16,
        D::U32 => P::TypeUint32,
        D::U64 => P::TypeUint64,
        D::I8 => P::TypeInt8,
        D::I16 => P::TypeInt16,
        D::I32 => P::TypeInt32,
        D::I64 => P::TypeInt64,
        D::F16 => P::TypeFp16,
        D::BF16 => P::TypeBf16,
        D::F32 => P::TypeFp32,
        D::F64 => P::TypeFp64,
        D::Bytes => P::TypeString,
    }) as i32
}

/// The model configuration view in Triton's configuration schema.
pub(crate) fn model_config_pb(view: &oip::ModelConfigView) -> ipb::ModelConfig {
    use ipb::model_version_policy::{All, Latest, PolicyChoice, Specific};
    let policy = match &view.version_policy {
        oip::VersionPolicyView::Latest { num_versions } => PolicyChoice::Latest(Latest {
            num_versions: u32::try_from(*num_versions).unwrap_or(u32::MAX),
        }),
        oip::VersionPolicyView::All => PolicyChoice::All(All {}),
        oip::VersionPolicyView::Specific { .. } => PolicyChoice::Specific(Specific {
            versions: view.version_policy.integer_versions(),
        }),
    };
    let kind = match view.instance_group.kind {
        oip::InstanceKind::Cpu => ipb::model_instance_group::Kind::Cpu,
        oip::InstanceKind::Gpu => ipb::model_instance_group::Kind::Gpu,
    };
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let tensor = |t: &oip::ConfigTensor| (t.name.clone(), config_dtype(t.dtype), t.dims.clone());
    ipb::ModelConfig {
        name: view.name.clone(),
        platform: view.platform.to_owned(),
        backend: view.backend.to_owned(),
        version_policy: Some(ipb::ModelVersionPolicy {
            policy_choice: Some(policy),
        }),
        max_batch_size: count(view.max_batch_size),
        input: view
            .inputs
            .iter()
            .map(tensor)
            .map(|(name, data_type, dims)| ipb::ModelInput {
                name,
                data_type,
                dims,
                ..Default::default()
            })
            .collect(),
        output: view
            .outputs
            .iter()
            .map(tensor)
            .map(|(name, data_type, dims)| ipb::ModelOutput {
                name,
                data_type,
                dims,
                ..Default::default()
            })
            .collect(),
        instance_group: vec![ipb::ModelInstanceGroup {
            name: view.instance_group.name.clone(),
            kind: kind as i32,
            count: count(view.instance_group.count),
            gpus: view.instance_group.gpus.iter().map(|g| count(*g)).collect(),
            ..Default::default()
        }],
        default_model_filename: view.default_model_filename.to_owned(),
        parameters: view
            .parameters
            .iter()
            .map(|(key, value)| {
                (
                    key.clone(),
                    ipb::ModelParameter {
                        string_value: value.clone(),
                    },
                )
            })
            .collect(),
        ..Default::default()
    }
}

fn version_arg(version: &str) -> Option<&str> {
    (!version.is_empty()).then_some(version)
}

type InferStream = super::AnswerStream<ipb::ModelStreamInferResponse>;

#[tonic::async_trait]
impl GrpcInferenceService for InferenceApi {
    async fn server_live(
        &self,
        _request: Request<ipb::ServerLiveRequest>,
    ) -> Result<Response<ipb::ServerLiveResponse>, Status> {
        Ok(Response::new(ipb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: Request<ipb::ServerReadyRequest>,
    ) -> Result<Response<ipb::ServerReadyResponse>, Status> {
        Ok(Response::new(ipb::ServerReadyResponse {
            ready: self.health.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ipb::ModelReadyRequest>,
    ) -> Result<Response<ipb::ModelReadyResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(ipb::ModelReadyResponse {
            ready: oip::model_ready(
                self.pipeline.registry(),
                &request.name,
                version_arg(&request.version),
            ),
        }))
    }

    async fn server_metadata(
        &self,
        _request: Request<ipb::ServerMetadataRequest>,
    ) -> Result<Response<ipb::ServerMetadataResponse>, Status> {
        Ok(Response::new(ipb::ServerMetadataResponse {
            name: oip::SERVER_NAME.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: oip::EXTENSIONS.iter().map(|e| (*e).to_owned()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ipb::ModelMetadataRequest>,
    ) -> Result<Response<ipb::ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let model = oip::ready_model(
            self.pipeline.registry(),
            &request.name,
            version_arg(&request.version),
        )
        .map_err(status)?;
        let (inputs, outputs) = oip::tensor_metadata(&model.config);
        let render = |list: Vec<oip::TensorMetadata>| {
            list.into_iter()
                .map(|t| ipb::model_metadata_response::TensorMetadata {
                    name: t.name,
                    datatype: t.datatype.to_owned(),
                    shape: t.shape,
                })
                .collect()
        };
        Ok(Response::new(ipb::ModelMetadataResponse {
            name: model.name.clone(),
            versions: model.version_labels(),
            platform: model.platform(version_arg(&request.version)).to_owned(),
            inputs: render(inputs),
            outputs: render(outputs),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ipb::ModelInferRequest>,
    ) -> Result<Response<ipb::ModelInferResponse>, Status> {
        let headers = request.metadata().clone();
        Ok(Response::new(
            infer_one(&self.pipeline, &self.shm, &headers, request.into_inner())
                .await
                .map_err(status)?,
        ))
    }

    type ModelStreamInferStream = InferStream;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ipb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let pipeline = self.pipeline.clone();
        let shm = Arc::clone(&self.shm);
        let headers = request.metadata().clone();
        let outbound = super::answer_in_order(
            request.into_inner(),
            &self.shutdown,
            self.pipeline.open_stream(),
            move |request| {
                let pipeline = pipeline.clone();
                let shm = Arc::clone(&shm);
                let headers = headers.clone();
                async move {
                    let id = request.id.clone();
                    let model_name = request.model_name.clone();
                    match infer_one(&pipeline, &shm, &headers, request).await {
                        Ok(response) => ipb::ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(response),
                        },
                        Err(err) => ipb::ModelStreamInferResponse {
                            error_message: err.to_string(),
                            infer_response: Some(ipb::ModelInferResponse {
                                model_name,
                                id,
                                ..Default::default()
                            }),
                        },
                    }
                }
            },
        );
        Ok(Response::new(outbound))
    }

    async fn model_config(
        &self,
        request: Request<ipb::ModelConfigRequest>,
    ) -> Result<Response<ipb::ModelConfigResponse>, Status> {
        let request = request.into_inner();
        let model = oip::ready_model(
            self.pipeline.registry(),
            &request.name,
            version_arg(&request.version),
        )
        .map_err(status)?;
        Ok(Response::new(ipb::ModelConfigResponse {
            config: Some(model_config_pb(&oip::ready_model_config(
                &model,
                version_arg(&request.version),
            ))),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<ipb::ModelStatisticsRequest>,
    ) -> Result<Response<ipb::ModelStatisticsResponse>, Status> {
        let request = request.into_inner();
        let model_stats = oip::statistics(
            self.pipeline.registry(),
            &request.name,
            version_arg(&request.version),
        )
        .map_err(status)?
        .into_iter()
        .map(statistics_pb)
        .collect();
        Ok(Response::new(ipb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        request: Request<ipb::RepositoryIndexRequest>,
    ) -> Result<Response<ipb::RepositoryIndexResponse>, Status> {
        let request = request.into_inner();
        let models = oip::repository_index(self.pipeline.registry(), request.ready)
            .into_iter()
            .map(|row| ipb::repository_index_response::ModelIndex {
                name: row.name,
                version: row.version,
                state: row.state.to_owned(),
                reason: row.reason,
            })
            .collect();
        Ok(Response::new(ipb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<ipb::RepositoryModelLoadRequest>,
    ) -> Result<Response<ipb::RepositoryModelLoadResponse>, Status> {
        let request = request.into_inner();
        if let Some(key) = request.parameters.keys().next() {
            return Err(status(Error::InvalidArgument(format!(
                "load parameter '{key}' is not supported: models load from the repository as they are on disk"
            ))));
        }
        oip::repository_load(self.pipeline.registry(), &request.model_name)
            .await
            .map_err(status)?;
        Ok(Response::new(ipb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<ipb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<ipb::RepositoryModelUnloadResponse>, Status> {
        let request = request.into_inner();
        oip::repository_unload(self.pipeline.registry(), &request.model_name)
            .await
            .map_err(status)?;
        Ok(Response::new(ipb::RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        request: Request<ipb::SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<ipb::SystemSharedMemoryStatusResponse>, Status> {
        use ipb::system_shared_memory_status_response::RegionStatus;
        let name = request.into_inner().name;
        let regions = self
            .shm
            .status(version_arg(&name))
            .map_err(status)?
            .into_iter()
            .map(|region| {
                (
                    region.name.clone(),
                    RegionStatus {
                        name: region.name,
                        key: region.key,
                        offset: region.offset,
                        byte_size: region.byte_size,
                    },
                )
            })
            .collect();
        Ok(Response::new(ipb::SystemSharedMemoryStatusResponse {
            regions,
        }))
    }

    async fn system_shared_memory_register(
        &self,
        request: Request<ipb::SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<ipb::SystemSharedMemoryRegisterResponse>, Status> {
        let request = request.into_inner();
        self.shm
            .register(
                &request.name,
                &request.key,
                request.offset,
                request.byte_size,
            )
            .map_err(status)?;
        Ok(Response::new(ipb::SystemSharedMemoryRegisterResponse {}))
    }

    async fn system_shared_memory_unregister(
        &self,
        request: Request<ipb::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<ipb::SystemSharedMemoryUnregisterResponse>, Status> {
        let name = request.into_inner().name;
        self.shm.unregister(version_arg(&name));
        Ok(Response::new(ipb::SystemSharedMemoryUnregisterResponse {}))
    }

    async fn cuda_shared_memory_status(
        &self,
        _request: Request<ipb::CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<ipb::CudaSharedMemoryStatusResponse>, Status> {
        Err(Status::unimplemented(shm::CUDA_UNIMPLEMENTED))
    }

    async fn cuda_shared_memory_register(
        &self,
        _request: Request<ipb::CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<ipb::CudaSharedMemoryRegisterResponse>, Status> {
        Err(Status::unimplemented(shm::CUDA_UNIMPLEMENTED))
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _request: Request<ipb::CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<ipb::CudaSharedMemoryUnregisterResponse>, Status> {
        Err(Status::unimplemented(shm::CUDA_UNIMPLEMENTED))
    }
}
