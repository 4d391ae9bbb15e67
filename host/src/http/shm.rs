//! Triton's shared-memory endpoints over REST: register, unregister and
//! status of system shared-memory regions (`/v2/systemsharedmemory/...`),
//! and the CUDA ones (`/v2/cudasharedmemory/...`), which answer 501 until
//! the server runs on a GPU. The regions themselves are `oip::shm`'s.

use std::collections::HashMap;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::HttpState;
use super::v2::{ApiError, Params, count_param, optional_object, string_field};
use crate::error::Error;
use crate::oip::shm::{CUDA_UNIMPLEMENTED, RegionStatus};

fn region_json(region: RegionStatus) -> Value {
    json!({
        "name": region.name,
        "key": region.key,
        "offset": region.offset,
        "byte_size": region.byte_size,
    })
}

fn region_param(params: &HashMap<String, String>) -> Option<&str> {
    params.get("region").map(String::as_str)
}

/// `GET .../status` and `GET .../region/{region}/status`: a JSON array.
pub async fn status(
    State(state): State<HttpState>,
    params: Option<Params>,
) -> Result<Json<Value>, ApiError> {
    let params = params.map(|Path(p)| p).unwrap_or_default();
    let regions = state.shm.status(region_param(&params))?;
    Ok(Json(Value::Array(
        regions.into_iter().map(region_json).collect(),
    )))
}

/// `POST .../region/{region}/register` with `{"key", "offset", "byte_size"}`.
pub async fn register(
    State(state): State<HttpState>,
    Path(params): Params,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let name = region_param(&params).unwrap_or_default();
    let request = optional_object(body, state.max_body_bytes).await?;
    let owner = format!("shared memory region '{name}'");
    let key = string_field(&request, "key", &owner)?;
    let number = |field: &str| count_param(Some(&request), field, &owner);
    let byte_size = number("byte_size")?
        .ok_or_else(|| Error::InvalidArgument(format!("{owner}: field 'byte_size' is missing")))?;
    state
        .shm
        .register(name, key, number("offset")?.unwrap_or(0), byte_size)?;
    Ok(StatusCode::OK)
}

/// `POST .../unregister` (every region) and `POST .../region/{region}/unregister`.
pub async fn unregister(
    State(state): State<HttpState>,
    params: Option<Params>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    optional_object(body, state.max_body_bytes).await?;
    let params = params.map(|Path(p)| p).unwrap_or_default();
    state.shm.unregister(region_param(&params));
    Ok(StatusCode::OK)
}

/// Every CUDA shared-memory endpoint.
pub async fn cuda() -> ApiError {
    ApiError::from(Error::Unimplemented(CUDA_UNIMPLEMENTED.to_owned()))
}
