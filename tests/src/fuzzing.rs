//! The fuzz targets' bodies: each takes arbitrary bytes, drives one of the
//! host's decoders the way a request (or a guest's answer) does, and
//! checks what it accepted. `fuzz/fuzz_targets/` calls these under
//! libFuzzer; `tests/tests/integration/fuzz_corpus.rs` replays the
//! committed corpora through them in every test run.
//!
//! A panic here is a finding: the decoders must answer any input with a
//! value or a precise error.

use std::path::Path;

use bytes::Bytes;
use plinth::grpc::{ipb, pb};
use plinth::tensor::{DType, Tensor};
use prost::Message;

/// A target's body: the bytes in, how many things it accepted out.
pub type Target = fn(&[u8]) -> usize;

/// Every target, by the name of its corpus directory. Each returns how
/// many things it accepted (tensors, or 1 for a config), so that a replay
/// can tell a seed that decodes from one that is refused.
pub const TARGETS: &[(&str, Target)] = &[
    ("rest_infer", rest_infer),
    ("grpc_infer", grpc_infer),
    ("compute_request", compute_request),
    ("model_config", model_config),
    ("plugin_manifest", plugin_manifest),
    ("guest_tensor", guest_tensor),
    ("grpc_timeout", grpc_timeout),
];

/// What an accepted tensor must be: as many bytes as its shape and dtype
/// say, and for BYTES, elements that walk to the end exactly.
fn check(tensor: &Tensor) {
    let numel = plinth::tensor::numel(tensor.shape()).expect("an accepted shape has a count");
    match tensor.dtype().fixed_size() {
        Some(size) => assert_eq!(
            tensor.data().len(),
            numel * size,
            "tensor '{}' accepted with the wrong byte count",
            tensor.name()
        ),
        None => {
            let elements = tensor
                .bytes_elements()
                .expect("an accepted BYTES tensor walks");
            assert_eq!(elements.len(), numel, "BYTES element count");
        }
    }
    // Rendering it back as the REST API does must not fail on what was
    // accepted, except for the dtypes JSON cannot carry.
    let _ = plinth::oip::tensor_json_data(tensor);
}

/// A REST infer body. The first byte says whether the binary extension is
/// used; if so the next two give the JSON header's length.
pub fn rest_infer(data: &[u8]) -> usize {
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    let mut headers = http::HeaderMap::new();
    let body = if mode & 1 == 1 && rest.len() >= 2 {
        let json_len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        headers.insert(
            "inference-header-content-length",
            json_len.to_string().parse().unwrap(),
        );
        &rest[2..]
    } else {
        rest
    };
    accepted(plinth::http::v2::decode_infer_body(
        &headers,
        Bytes::copy_from_slice(body),
    ))
}

fn accepted<E>(tensors: Result<Vec<Tensor>, E>) -> usize {
    match tensors {
        Ok(tensors) => {
            tensors.iter().for_each(check);
            tensors.len()
        }
        Err(_) => 0,
    }
}

/// A gRPC `ModelInferRequest` (protobuf bytes).
pub fn grpc_infer(data: &[u8]) -> usize {
    let Ok(request) = ipb::ModelInferRequest::decode(data) else {
        return 0;
    };
    accepted(plinth::grpc::decode_infer_request(request))
}

/// A `plinth.v1` `ComputeRequest` (protobuf bytes), its tensors decoded.
pub fn compute_request(data: &[u8]) -> usize {
    let Ok(request) = pb::ComputeRequest::decode(data) else {
        return 0;
    };
    accepted(
        request
            .inputs
            .into_iter()
            .map(plinth::grpc::tensor_from_pb)
            .collect::<Result<Vec<_>, _>>(),
    )
}

/// A model's `config.toml`.
pub fn model_config(data: &[u8]) -> usize {
    std::str::from_utf8(data).map_or(0, |text| {
        usize::from(plinth::config::ModelConfig::parse(Path::new("fuzz/config.toml"), text).is_ok())
    })
}

/// A plugin manifest.
pub fn plugin_manifest(data: &[u8]) -> usize {
    std::str::from_utf8(data).map_or(0, |text| {
        usize::from(plinth::plugin::Manifest::parse(Path::new("fuzz/plugin.toml"), text).is_ok())
    })
}

/// A tensor as a guest hands it back: a dtype, a shape of up to four
/// dimensions (any i64, negative and huge included) and data, checked by
/// the same constructor the host uses on a plugin's output.
pub fn guest_tensor(data: &[u8]) -> usize {
    let Some((&head, rest)) = data.split_first() else {
        return 0;
    };
    let dtype = DType::ALL[usize::from(head) % DType::ALL.len()];
    let rank = usize::from(head >> 4) % 5;
    if rest.len() < rank * 8 {
        return 0;
    }
    let (dims, payload) = rest.split_at(rank * 8);
    let shape: Vec<i64> = dims
        .chunks_exact(8)
        .map(|d| i64::from_le_bytes(d.try_into().unwrap()))
        .collect();
    accepted(Tensor::new("guest", dtype, shape, Bytes::copy_from_slice(payload)).map(|t| vec![t]))
}

/// A `grpc-timeout` header value (any bytes that are a header value): read
/// by the gRPC grammar and turned into a deadline, which must saturate.
pub fn grpc_timeout(data: &[u8]) -> usize {
    let Ok(text) = std::str::from_utf8(data) else {
        return 0;
    };
    match plinth::deadline::parse_grpc_timeout(text) {
        Some(budget) => {
            let now = std::time::Instant::now();
            let deadline = plinth::deadline::deadline_after(now, budget);
            assert!(deadline >= now, "a deadline before now");
            1
        }
        None => 0,
    }
}
