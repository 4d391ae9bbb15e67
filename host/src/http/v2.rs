//! The Open Inference Protocol v2 over HTTP/REST: JSON tensors plus Triton's
//! binary tensor data extension, model metadata, configuration, statistics
//! and the model repository. Errors are `{"error": "..."}` with the status
//! code from [`http_status`].

use std::collections::HashMap;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::HttpState;
use crate::deadline::queue_timeout;
use crate::error::Error;
use crate::oip::shm::{self, Placement, SharedMemory};
use crate::oip::{self, RequestedOutput};
use crate::pipeline::{PipelineRequest, PipelineResponse};
use crate::tensor::Tensor;

/// The binary tensor data extension's header: the JSON's length in the body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The one mapping from host errors to HTTP status codes.
pub fn http_status(err: &Error) -> StatusCode {
    match err {
        Error::ModelNotFound { .. } | Error::VersionNotFound { .. } | Error::NotFound(_) => {
            StatusCode::NOT_FOUND
        }
        Error::ModelNotReady { .. }
        | Error::Unavailable(_)
        | Error::ResourceExhausted(_)
        | Error::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
        Error::AlreadyExists { .. } | Error::Conflict(_) => StatusCode::CONFLICT,
        Error::Unimplemented(_) => StatusCode::NOT_IMPLEMENTED,
        Error::InvalidArgument(_) | Error::LoadFailed(_) | Error::FailedPrecondition(_) => {
            StatusCode::BAD_REQUEST
        }
        Error::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
        Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error answered as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl From<Error> for ApiError {
    fn from(err: Error) -> ApiError {
        ApiError(http_status(&err), err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

pub(super) fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

pub(super) type Params = Path<HashMap<String, String>>;

fn model_param(params: &HashMap<String, String>) -> &str {
    params.get("model").map_or("", String::as_str)
}

fn version_param(params: &HashMap<String, String>) -> Option<&str> {
    params
        .get("version")
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

pub async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": oip::SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": oip::EXTENSIONS,
    }))
}

pub async fn model_metadata(
    State(state): State<HttpState>,
    Path(params): Params,
) -> Result<Json<Value>, ApiError> {
    let model = oip::ready_model(
        state.pipeline.registry(),
        model_param(&params),
        version_param(&params),
    )?;
    let (inputs, outputs) = oip::tensor_metadata(&model.config);
    let render = |list: Vec<oip::TensorMetadata>| {
        list.into_iter()
            .map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
            .collect::<Vec<_>>()
    };
    Ok(Json(json!({
        "name": model.name,
        "versions": model.version_labels(),
        "platform": model.platform(version_param(&params)),
        "inputs": render(inputs),
        "outputs": render(outputs),
    })))
}

pub async fn model_ready(
    State(state): State<HttpState>,
    Path(params): Params,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let name = model_param(&params);
    let registry = state.pipeline.registry();
    // Unknown models are an error; known ones answer ready or not.
    registry.status(name)?;
    let ready = oip::model_ready(registry, name, version_param(&params));
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((code, Json(json!({"name": name, "ready": ready}))))
}

/// The model configuration view in Triton's JSON configuration schema.
pub fn config_json(view: &oip::ModelConfigView) -> Value {
    let tensors = |specs: &[oip::ConfigTensor]| {
        specs
            .iter()
            .map(|s| json!({"name": s.name, "data_type": s.data_type, "dims": s.dims}))
            .collect::<Vec<_>>()
    };
    let policy = match &view.version_policy {
        oip::VersionPolicyView::Latest { num_versions } => {
            json!({"latest": {"num_versions": num_versions}})
        }
        oip::VersionPolicyView::All => json!({"all": {}}),
        oip::VersionPolicyView::Specific { labels } => {
            json!({"specific": {"versions": labels}})
        }
    };
    let group = &view.instance_group;
    let parameters: Map<String, Value> = view
        .parameters
        .iter()
        .map(|(key, value)| (key.clone(), json!({"string_value": value})))
        .collect();
    json!({
        "name": view.name,
        "platform": view.platform,
        "backend": view.backend,
        "version_policy": policy,
        "max_batch_size": view.max_batch_size,
        "input": tensors(&view.inputs),
        "output": tensors(&view.outputs),
        "instance_group": [{
            "name": group.name,
            "kind": group.kind.name(),
            "count": group.count,
            "gpus": group.gpus,
        }],
        "default_model_filename": view.default_model_filename,
        "parameters": parameters,
    })
}

pub async fn model_config(
    State(state): State<HttpState>,
    Path(params): Params,
) -> Result<Json<Value>, ApiError> {
    let model = oip::ready_model(
        state.pipeline.registry(),
        model_param(&params),
        version_param(&params),
    )?;
    Ok(Json(config_json(&oip::ready_model_config(
        &model,
        version_param(&params),
    ))))
}

fn duration_json(d: oip::StatDuration) -> Value {
    json!({"count": d.count, "ns": d.ns})
}

pub async fn all_statistics(State(state): State<HttpState>) -> Result<Json<Value>, ApiError> {
    statistics_json(&state, "", None)
}

pub async fn model_statistics(
    State(state): State<HttpState>,
    Path(params): Params,
) -> Result<Json<Value>, ApiError> {
    statistics_json(&state, model_param(&params), version_param(&params))
}

fn statistics_json(
    state: &HttpState,
    model: &str,
    version: Option<&str>,
) -> Result<Json<Value>, ApiError> {
    let stats = oip::statistics(state.pipeline.registry(), model, version)?;
    let model_stats: Vec<Value> = stats
        .into_iter()
        .map(|s| {
            json!({
                "name": s.name,
                "version": s.version,
                "last_inference": s.last_inference,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {
                    "success": duration_json(s.success),
                    "fail": duration_json(s.fail),
                    "queue": duration_json(s.queue),
                    "compute_input": duration_json(s.compute_input),
                    "compute_infer": duration_json(s.compute_infer),
                    "compute_output": duration_json(s.compute_output),
                    "cache_hit": duration_json(oip::StatDuration::default()),
                    "cache_miss": duration_json(oip::StatDuration::default()),
                },
                "batch_stats": s.batches.into_iter().map(|(size, [input, infer, output])| json!({
                    "batch_size": size,
                    "compute_input": duration_json(input),
                    "compute_infer": duration_json(infer),
                    "compute_output": duration_json(output),
                })).collect::<Vec<_>>(),
                "memory_usage": [{
                    "type": s.memory.0,
                    "id": s.memory.1,
                    "byte_size": s.memory.2,
                }],
            })
        })
        .collect();
    Ok(Json(json!({ "model_stats": model_stats })))
}

/// Reads a whole body, refusing more than `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|err| {
        let too_large =
            std::iter::successors(Some(&err as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .any(|e| e.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is larger than the limit of {limit} bytes"),
            )
        } else {
            invalid(format!("reading the request body: {err}")).into()
        }
    })
}

fn parse_json_object(text: &[u8], what: &str) -> Result<Map<String, Value>, Error> {
    match serde_json::from_slice::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(invalid(format!(
            "{what} must be a JSON object, got {}",
            json_kind(&other)
        ))),
        Err(err) => Err(invalid(format!("{what} is not valid JSON: {err}"))),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON parameter value as the router and processors see it.
fn param_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(super) fn object_field<'a>(
    object: &'a Map<String, Value>,
    field: &str,
    owner: &str,
) -> Result<Option<&'a Map<String, Value>>, Error> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(other) => Err(invalid(format!(
            "{owner}: field '{field}' must be an object, got {}",
            json_kind(other)
        ))),
    }
}

pub(super) fn string_field<'a>(
    object: &'a Map<String, Value>,
    field: &str,
    owner: &str,
) -> Result<&'a str, Error> {
    match object.get(field) {
        Some(Value::String(s)) => Ok(s),
        None => Err(invalid(format!("{owner}: field '{field}' is missing"))),
        Some(other) => Err(invalid(format!(
            "{owner}: field '{field}' must be a string, got {}",
            json_kind(other)
        ))),
    }
}

fn bool_param(
    params: Option<&Map<String, Value>>,
    key: &str,
    owner: &str,
) -> Result<Option<bool>, Error> {
    match params.and_then(|p| p.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(invalid(format!(
            "{owner}: parameter '{key}' must be a boolean, got {other}"
        ))),
    }
}

pub(super) fn count_param(
    params: Option<&Map<String, Value>>,
    key: &str,
    owner: &str,
) -> Result<Option<u64>, Error> {
    match params.and_then(|p| p.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value.as_u64().map(Some).ok_or_else(|| {
            invalid(format!(
                "{owner}: parameter '{key}' must be a non-negative integer, got {value}"
            ))
        }),
    }
}

/// A decoded REST inference request.
struct RestRequest {
    id: Option<String>,
    inputs: Vec<Tensor>,
    /// The inputs read in place from shared memory.
    placed: Vec<Placement>,
    outputs: Vec<RequestedOutput>,
    binary_output_default: bool,
    parameters: Vec<(String, String)>,
}

/// The input tensors of a REST inference body (JSON, or JSON then binary
/// data with `Inference-Header-Content-Length`), decoded and checked as a
/// request is: what the fuzz targets and their corpus replay drive.
pub fn decode_infer_body(headers: &HeaderMap, body: Bytes) -> Result<Vec<Tensor>, Error> {
    decode_request(headers, body, &SharedMemory::default()).map(|request| request.inputs)
}

/// Decodes an inference request: the JSON object, then its id, parameters,
/// inputs (claiming the binary parts) and requested outputs.
fn decode_request(
    headers: &HeaderMap,
    body: Bytes,
    shm: &SharedMemory,
) -> Result<RestRequest, Error> {
    let (request, mut binary) = split_body(headers, body)?;
    let id = request_id(&request)?;
    let params = object_field(&request, "parameters", "request")?;
    let binary_output_default =
        bool_param(params, "binary_data_output", "request")?.unwrap_or(false);
    let mut placed = Vec::new();
    Ok(RestRequest {
        id,
        inputs: decode_inputs(&request, &mut binary, shm, &mut placed)?,
        placed,
        outputs: requested_outputs(&request, shm)?,
        binary_output_default,
        parameters: params.map(parameter_texts).unwrap_or_default(),
    })
}

/// Splits the body into the request's JSON object and the binary data after
/// it (the binary tensor data extension); without the length header the
/// whole body is JSON.
fn split_body(headers: &HeaderMap, body: Bytes) -> Result<(Map<String, Value>, Bytes), Error> {
    let json_len = match headers.get(HEADER_LENGTH) {
        None => body.len(),
        Some(value) => {
            let len = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    invalid(format!(
                        "header '{HEADER_LENGTH}' must be a byte count, got {value:?}"
                    ))
                })?;
            if len > body.len() {
                return Err(invalid(format!(
                    "header '{HEADER_LENGTH}' is {len} but the body has only {} bytes",
                    body.len()
                )));
            }
            len
        }
    };
    let request = parse_json_object(&body[..json_len], "the inference request")?;
    Ok((request, body.slice(json_len..)))
}

fn request_id(request: &Map<String, Value>) -> Result<Option<String>, Error> {
    match request.get("id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(format!(
            "field 'id' must be a string, got {}",
            json_kind(other)
        ))),
    }
}

/// The request's parameters as the router and processors see them.
fn parameter_texts(params: &Map<String, Value>) -> Vec<(String, String)> {
    params
        .iter()
        .map(|(k, v)| (k.clone(), param_text(v)))
        .collect()
}

/// An array field; `None` when absent.
fn array_field<'a>(
    object: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a [Value]>, Error> {
    match object.get(field) {
        None => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(other) => Err(invalid(format!(
            "field '{field}' must be an array, got {}",
            json_kind(other)
        ))),
    }
}

/// Every input, in order. Each binary part is claimed by exactly one input;
/// binary data left over afterwards is refused.
fn decode_inputs(
    request: &Map<String, Value>,
    binary: &mut Bytes,
    shm: &SharedMemory,
    placed: &mut Vec<Placement>,
) -> Result<Vec<Tensor>, Error> {
    let items =
        array_field(request, "inputs")?.ok_or_else(|| invalid("field 'inputs' is missing"))?;
    let inputs = items
        .iter()
        .enumerate()
        .map(|(idx, input)| decode_input(idx, input, binary, shm, placed))
        .collect::<Result<Vec<_>, _>>()?;
    if !binary.is_empty() {
        return Err(invalid(format!(
            "{} bytes of binary data after the JSON are not claimed by any input's binary_data_size",
            binary.len()
        )));
    }
    Ok(inputs)
}

/// One input, its data from JSON `data` or from the next binary part,
/// checked against its declared shape and datatype.
fn decode_input(
    idx: usize,
    input: &Value,
    binary: &mut Bytes,
    shm: &SharedMemory,
    placed: &mut Vec<Placement>,
) -> Result<Tensor, Error> {
    let Value::Object(input) = input else {
        return Err(invalid(format!("inputs[{idx}] must be an object")));
    };
    let name = string_field(input, "name", &format!("inputs[{idx}]"))?;
    let owner = format!("input '{name}'");
    let dtype = oip::parse_datatype(name, string_field(input, "datatype", &owner)?)?;
    let shape = input_shape(input, &owner)?;
    let numel = oip::checked_numel(name, &shape)?;
    let params = object_field(input, "parameters", &owner)?;
    if let Some(place) = shm_placement(&owner, params, shm)? {
        if input.contains_key("data") || params.is_some_and(|p| p.contains_key("binary_data_size"))
        {
            return Err(invalid(format!(
                "{owner}: 'data' or 'binary_data_size' is set beside parameter '{}'; use one",
                shm::REGION_PARAMETER
            )));
        }
        let tensor = Tensor::new(name, dtype, shape, place.read()?)?;
        placed.push(place);
        return Ok(tensor);
    }
    let binary_size = count_param(params, "binary_data_size", &owner)?;
    match (binary_size, input.get("data")) {
        (Some(_), Some(_)) => Err(invalid(format!(
            "{owner}: both 'data' and parameter 'binary_data_size' are set; use one"
        ))),
        (Some(size), None) => Tensor::new(name, dtype, shape, claim_binary(&owner, size, binary)?),
        (None, Some(data)) => oip::json_tensor(name, dtype, shape, data),
        (None, None) if numel > 0 => Err(invalid(format!(
            "{owner}: no data (set 'data' or parameter 'binary_data_size')"
        ))),
        (None, None) => Tensor::new(name, dtype, shape, Bytes::new()),
    }
}

fn input_shape(input: &Map<String, Value>, owner: &str) -> Result<Vec<i64>, Error> {
    match input.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .map(Value::as_i64)
            .collect::<Option<_>>()
            .ok_or_else(|| {
                invalid(format!(
                    "{owner}: field 'shape' must be an array of integers"
                ))
            }),
        None => Err(invalid(format!("{owner}: field 'shape' is missing"))),
        Some(other) => Err(invalid(format!(
            "{owner}: field 'shape' must be an array, got {}",
            json_kind(other)
        ))),
    }
}

/// Where a tensor's parameters place it in shared memory, if they do.
fn shm_placement(
    owner: &str,
    params: Option<&Map<String, Value>>,
    shm: &SharedMemory,
) -> Result<Option<Placement>, Error> {
    let region = match params.and_then(|p| p.get(shm::REGION_PARAMETER)) {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(name.as_str()),
        Some(other) => {
            return Err(invalid(format!(
                "{owner}: parameter '{}' must be a string, got {}",
                shm::REGION_PARAMETER,
                json_kind(other)
            )));
        }
    };
    shm.placement(
        owner,
        region,
        count_param(params, shm::BYTE_SIZE_PARAMETER, owner)?,
        count_param(params, shm::OFFSET_PARAMETER, owner)?,
    )
}

/// Takes the next `size` bytes of binary data for one input.
fn claim_binary(owner: &str, size: u64, binary: &mut Bytes) -> Result<Bytes, Error> {
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    if size > binary.len() {
        return Err(invalid(format!(
            "{owner}: binary_data_size is {size} but only {} bytes of binary data remain",
            binary.len()
        )));
    }
    Ok(binary.split_to(size))
}

/// The outputs asked for, with their options; empty asks for every output.
fn requested_outputs(
    request: &Map<String, Value>,
    shm: &SharedMemory,
) -> Result<Vec<RequestedOutput>, Error> {
    if request.get("outputs") == Some(&Value::Null) {
        return Ok(Vec::new());
    }
    array_field(request, "outputs")?
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(idx, output)| requested_output(idx, output, shm))
        .collect()
}

fn requested_output(
    idx: usize,
    output: &Value,
    shm: &SharedMemory,
) -> Result<RequestedOutput, Error> {
    let Value::Object(output) = output else {
        return Err(invalid(format!("outputs[{idx}] must be an object")));
    };
    let name = string_field(output, "name", &format!("outputs[{idx}]"))?;
    let owner = format!("output '{name}'");
    let params = object_field(output, "parameters", &owner)?;
    let classification = count_param(params, "classification", &owner)?
        .map(|k| usize::try_from(k).unwrap_or(usize::MAX));
    Ok(RequestedOutput {
        name: name.to_owned(),
        classification,
        binary: bool_param(params, "binary_data", &owner)?,
        shared_memory: shm_placement(&owner, params, shm)?,
    })
}

fn header_metadata(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| {
            !matches!(
                name.as_str(),
                HEADER_LENGTH | "content-length" | "content-type"
            ) && !crate::security::is_credential(name.as_str())
        })
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect()
}

pub async fn infer(
    State(state): State<HttpState>,
    Path(params): Params,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let model = model_param(&params);
    let version = version_param(&params);
    // Every refusal of a request to a model counts against the model.
    let body = match read_body(body, state.max_body_bytes).await {
        Ok(body) => body,
        Err(ApiError(code, message)) => {
            let err = state
                .pipeline
                .reject(model, version, Error::InvalidArgument(message));
            return Err(ApiError(code, err.to_string()));
        }
    };
    let (request, timeout) = decode_request(&headers, body, &state.shm)
        .and_then(|request| {
            let timeout = queue_timeout(
                request
                    .parameters
                    .iter()
                    .find(|(key, _)| key == "timeout")
                    .map(|(_, value)| value.as_str()),
            )?;
            Ok((request, timeout))
        })
        .map_err(|err| state.pipeline.reject(model, version, err))?;
    let RestRequest {
        id,
        inputs,
        placed,
        outputs,
        binary_output_default,
        parameters,
    } = request;
    let mut metadata = header_metadata(&headers);
    metadata.extend(parameters);
    let answer = state
        .pipeline
        .infer_then(
            PipelineRequest {
                id: id.clone().unwrap_or_default(),
                model: model.to_owned(),
                version: version.map(str::to_owned),
                inputs,
                metadata,
                timeout,
                protocol: "kserve-v2-http",
                ..PipelineRequest::default()
            },
            |response| infer_response(id, response, &outputs, &placed, binary_output_default),
        )
        .await?;
    Ok(answer)
}

/// An inference answer's JSON, serialized straight from the tensors.
#[derive(serde::Serialize)]
struct AnswerJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    model_name: &'a str,
    model_version: &'a str,
    outputs: Vec<OutputJson<'a>>,
}

#[derive(serde::Serialize)]
struct OutputJson<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<OutputParameters<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<oip::JsonData<'a>>,
}

/// Where an output's bytes went, when not into the JSON.
#[derive(serde::Serialize, Default)]
struct OutputParameters<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    binary_data_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shared_memory_region: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shared_memory_byte_size: Option<usize>,
}

impl OutputParameters<'_> {
    fn is_empty(&self) -> bool {
        self.binary_data_size.is_none() && self.shared_memory_region.is_none()
    }
}

/// The answer on the wire: JSON, then the outputs sent as binary data, each
/// output rendered with the config of the model that computed it.
fn infer_response(
    id: Option<String>,
    response: PipelineResponse,
    requested: &[RequestedOutput],
    placed: &[Placement],
    binary_output_default: bool,
) -> Result<Response, Error> {
    let outputs = oip::select_outputs(
        &response.model,
        &response.config,
        response.outputs,
        requested,
    )?;
    let mut binary: Vec<Bytes> = Vec::new();
    // What each output becomes: its data in the JSON, its size for the
    // binary part after it, or its place in shared memory.
    let mut kinds = Vec::with_capacity(outputs.len());
    for (idx, tensor) in outputs.iter().enumerate() {
        let asked = requested.get(idx);
        if let Some(place) = asked.and_then(|o| o.shared_memory.as_ref()) {
            place.write(tensor)?;
            kinds.push(OutputParameters {
                shared_memory_region: Some(place.region()),
                shared_memory_byte_size: Some(tensor.data().len()),
                ..OutputParameters::default()
            });
        } else if asked
            .and_then(|o| o.binary)
            .unwrap_or(binary_output_default)
        {
            binary.push(tensor.data().clone());
            kinds.push(OutputParameters {
                binary_data_size: Some(tensor.data().len()),
                ..OutputParameters::default()
            });
        } else {
            kinds.push(OutputParameters::default());
        }
    }
    for place in placed {
        place.check()?;
    }
    let rendered = outputs
        .iter()
        .zip(kinds)
        .map(|(tensor, parameters)| {
            let inline = parameters.is_empty();
            Ok(OutputJson {
                name: tensor.name(),
                datatype: oip::datatype_name(tensor.dtype()),
                shape: tensor.shape(),
                data: if inline {
                    Some(oip::tensor_json_data(tensor)?)
                } else {
                    None
                },
                parameters: (!inline).then_some(parameters),
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let answer = AnswerJson {
        id: id.as_deref(),
        model_name: &response.model,
        model_version: &response.version,
        outputs: rendered,
    };
    let text = serde_json::to_vec(&answer).map_err(|err| Error::Internal(err.to_string()))?;
    if binary.is_empty() {
        return Ok((
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            text,
        )
            .into_response());
    }
    let json_len = text.len();
    let mut body = text;
    for part in &binary {
        body.extend_from_slice(part);
    }
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(HEADER_LENGTH),
                HeaderValue::from(json_len),
            ),
        ],
        body,
    )
        .into_response())
}

/// The optional JSON body of the repository endpoints; empty is `{}`.
pub(super) async fn optional_object(
    body: Body,
    limit: usize,
) -> Result<Map<String, Value>, ApiError> {
    let body = read_body(body, limit).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    Ok(parse_json_object(&body, "the request body")?)
}

pub async fn repository_index(
    State(state): State<HttpState>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let request = optional_object(body, state.max_body_bytes).await?;
    let ready = match request.get("ready") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(invalid(format!(
                "field 'ready' must be a boolean, got {}",
                json_kind(other)
            ))
            .into());
        }
    };
    let rows: Vec<Value> = oip::repository_index(state.pipeline.registry(), ready)
        .into_iter()
        .map(|row| {
            let mut entry = json!({"name": row.name, "state": row.state});
            if !row.version.is_empty() {
                entry["version"] = Value::String(row.version);
            }
            if !row.reason.is_empty() {
                entry["reason"] = Value::String(row.reason);
            }
            entry
        })
        .collect();
    Ok(Json(Value::Array(rows)))
}

pub async fn repository_load(
    State(state): State<HttpState>,
    Path(params): Params,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let request = optional_object(body, state.max_body_bytes).await?;
    if let Some(params) = object_field(&request, "parameters", "request")?
        && let Some(key) = params.keys().next()
    {
        return Err(invalid(format!(
            "load parameter '{key}' is not supported: models load from the repository as they are on disk"
        ))
        .into());
    }
    oip::repository_load(state.pipeline.registry(), model_param(&params)).await?;
    Ok(StatusCode::OK)
}

pub async fn repository_unload(
    State(state): State<HttpState>,
    Path(params): Params,
    body: Body,
) -> Result<StatusCode, ApiError> {
    optional_object(body, state.max_body_bytes).await?;
    oip::repository_unload(state.pipeline.registry(), model_param(&params)).await?;
    Ok(StatusCode::OK)
}

/// Any path the protocol does not define.
pub async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such endpoint".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `json` followed by `binary` (with the length header when
    /// there is binary data): the decoded inputs' names and byte lengths, or
    /// the error message.
    fn check(json: Value, binary: &[u8], expect: Result<&[(&str, usize)], &str>) {
        let text = json.to_string();
        let mut headers = HeaderMap::new();
        if !binary.is_empty() {
            headers.insert(HEADER_LENGTH, HeaderValue::from(text.len()));
        }
        let mut body = text.into_bytes();
        body.extend_from_slice(binary);
        let got =
            decode_request(&headers, Bytes::from(body), &SharedMemory::default()).map(|request| {
                request
                    .inputs
                    .iter()
                    .map(|t| (t.name().to_owned(), t.data().len()))
                    .collect::<Vec<_>>()
            });
        match (got, expect) {
            (Ok(inputs), Ok(want)) => {
                let want: Vec<(String, usize)> = want
                    .iter()
                    .map(|(n, len)| ((*n).to_owned(), *len))
                    .collect();
                assert_eq!(inputs, want);
            }
            (Err(err), Err(want)) => assert_eq!(err.to_string(), want),
            (got, want) => panic!("got {got:?}, expected {want:?}"),
        }
    }

    fn binary_input(name: &str, shape: &[i64], size: usize) -> Value {
        json!({"name": name, "datatype": "FP32", "shape": shape,
               "parameters": {"binary_data_size": size}})
    }

    #[test]
    fn binary_parts_are_claimed_in_order_exactly_once() {
        check(
            json!({"inputs": [binary_input("a", &[2], 8), binary_input("b", &[1], 4)]}),
            &[0; 12],
            Ok(&[("a", 8), ("b", 4)]),
        );
        check(
            json!({"inputs": [binary_input("a", &[2], 8)]}),
            &[0; 12],
            Err(
                "4 bytes of binary data after the JSON are not claimed by any input's binary_data_size",
            ),
        );
        check(
            json!({"inputs": [binary_input("a", &[2], 8), binary_input("b", &[2], 8)]}),
            &[0; 12],
            Err("input 'b': binary_data_size is 8 but only 4 bytes of binary data remain"),
        );
        check(
            json!({"inputs": [binary_input("a", &[3], 8)]}),
            &[0; 8],
            Err("tensor 'a': shape [3] of f32 needs 12 bytes, got 8"),
        );
    }

    #[test]
    fn each_field_is_checked_by_name() {
        check(json!({}), b"", Err("field 'inputs' is missing"));
        check(
            json!({"inputs": null}),
            b"",
            Err("field 'inputs' must be an array, got null"),
        );
        check(
            json!({"id": 3, "inputs": []}),
            b"",
            Err("field 'id' must be a string, got a number"),
        );
        check(
            json!({"inputs": [{"name": "x", "datatype": "FP32"}]}),
            b"",
            Err("input 'x': field 'shape' is missing"),
        );
        check(
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}),
            b"",
            Err("input 'x': no data (set 'data' or parameter 'binary_data_size')"),
        );
        check(
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [0]}]}),
            b"",
            Ok(&[("x", 0)]),
        );
        check(
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1],
                               "parameters": {"binary_data_size": 4}}]}),
            b"",
            Err("input 'x': both 'data' and parameter 'binary_data_size' are set; use one"),
        );
        check(
            json!({"inputs": [], "outputs": [{"name": "y", "parameters": {"classification": -1}}]}),
            b"",
            Err("output 'y': parameter 'classification' must be a non-negative integer, got -1"),
        );
    }
}
