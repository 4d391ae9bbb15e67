//! The wire codec: datatype names, tensors built and checked from typed
//! contents (gRPC) or JSON data (REST), tensors rendered as JSON, requested
//! outputs and Triton's classification extension.

use bytes::Bytes;
use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::Error;
use crate::tensor::{DType, Tensor, encode_bytes_elements, numel, shape_str};

const DATATYPES: &str =
    "BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, BF16, FP32, FP64, BYTES";

/// The protocol's name of a dtype.
pub fn datatype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::Bool => "BOOL",
        DType::U8 => "UINT8",
        DType::U16 => "UINT16",
        DType::U32 => "UINT32",
        DType::U64 => "UINT64",
        DType::I8 => "INT8",
        DType::I16 => "INT16",
        DType::I32 => "INT32",
        DType::I64 => "INT64",
        DType::F16 => "FP16",
        DType::BF16 => "BF16",
        DType::F32 => "FP32",
        DType::F64 => "FP64",
        DType::Bytes => "BYTES",
    }
}

/// The model-configuration name of a dtype (`TYPE_FP32`; BYTES is `TYPE_STRING`).
pub fn config_datatype_name(dtype: DType) -> String {
    match dtype {
        DType::Bytes => "TYPE_STRING".to_owned(),
        other => format!("TYPE_{}", datatype_name(other)),
    }
}

/// Parses a protocol datatype string, exactly as the protocol spells it.
pub fn parse_datatype(tensor: &str, text: &str) -> Result<DType, Error> {
    DType::ALL
        .into_iter()
        .find(|dtype| datatype_name(*dtype) == text)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "tensor '{tensor}': unknown datatype {text:?} (expected one of {DATATYPES})"
            ))
        })
}

/// Element count of a declared shape, refusing negative dims and overflow.
/// Computed before any data is looked at, and nothing is allocated for it.
pub fn checked_numel(tensor: &str, shape: &[i64]) -> Result<usize, Error> {
    if let Some((idx, dim)) = shape.iter().enumerate().find(|(_, d)| **d < 0) {
        return Err(Error::InvalidArgument(format!(
            "tensor '{tensor}': dimension {idx} of shape {} is negative ({dim})",
            shape_str(shape)
        )));
    }
    numel(shape).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "tensor '{tensor}': shape {} is too large (element count overflows)",
            shape_str(shape)
        ))
    })
}

fn count_mismatch(tensor: &str, shape: &[i64], expected: usize, got: usize) -> Error {
    Error::InvalidArgument(format!(
        "tensor '{tensor}': shape {} needs {expected} elements, got {got}",
        shape_str(shape)
    ))
}

/// Typed element data as the gRPC `contents` fields carry it.
#[derive(Debug, Clone, Copy)]
pub enum Elements<'a> {
    Bool(&'a [bool]),
    /// INT8, INT16 and INT32 travel as int32.
    Int(&'a [i32]),
    Int64(&'a [i64]),
    /// UINT8, UINT16 and UINT32 travel as uint32.
    Uint(&'a [u32]),
    Uint64(&'a [u64]),
    Fp32(&'a [f32]),
    Fp64(&'a [f64]),
    Bytes(&'a [Bytes]),
}

impl Elements<'_> {
    pub fn len(&self) -> usize {
        match self {
            Elements::Bool(v) => v.len(),
            Elements::Int(v) => v.len(),
            Elements::Int64(v) => v.len(),
            Elements::Uint(v) => v.len(),
            Elements::Uint64(v) => v.len(),
            Elements::Fp32(v) => v.len(),
            Elements::Fp64(v) => v.len(),
            Elements::Bytes(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The gRPC field that carries these elements.
    pub fn field(&self) -> &'static str {
        match self {
            Elements::Bool(_) => "bool_contents",
            Elements::Int(_) => "int_contents",
            Elements::Int64(_) => "int64_contents",
            Elements::Uint(_) => "uint_contents",
            Elements::Uint64(_) => "uint64_contents",
            Elements::Fp32(_) => "fp32_contents",
            Elements::Fp64(_) => "fp64_contents",
            Elements::Bytes(_) => "bytes_contents",
        }
    }
}

/// The typed field a datatype travels in; `None` for FP16 and BF16, which
/// only travel raw.
pub fn contents_field(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::Bool => "bool_contents",
        DType::I8 | DType::I16 | DType::I32 => "int_contents",
        DType::I64 => "int64_contents",
        DType::U8 | DType::U16 | DType::U32 => "uint_contents",
        DType::U64 => "uint64_contents",
        DType::F32 => "fp32_contents",
        DType::F64 => "fp64_contents",
        DType::Bytes => "bytes_contents",
        DType::F16 | DType::BF16 => return None,
    })
}

fn narrow<T: TryFrom<i64>>(tensor: &str, dtype: DType, idx: usize, value: i64) -> Result<T, Error> {
    T::try_from(value).map_err(|_| {
        Error::InvalidArgument(format!(
            "tensor '{tensor}': element {idx} ({value}) does not fit {}",
            datatype_name(dtype)
        ))
    })
}

/// Builds a tensor from typed elements, checking the field against the
/// datatype and the element count against the shape first.
pub fn typed_tensor(
    name: &str,
    dtype: DType,
    shape: Vec<i64>,
    elements: Elements<'_>,
) -> Result<Tensor, Error> {
    let expected = checked_numel(name, &shape)?;
    let Some(field) = contents_field(dtype) else {
        return Err(Error::InvalidArgument(format!(
            "tensor '{name}': {} has no typed contents field; send it in raw_input_contents",
            datatype_name(dtype)
        )));
    };
    if field != elements.field() {
        return Err(Error::InvalidArgument(format!(
            "tensor '{name}': datatype {} takes {field}, got {}",
            datatype_name(dtype),
            elements.field()
        )));
    }
    if elements.len() != expected {
        return Err(count_mismatch(name, &shape, expected, elements.len()));
    }
    let data: Vec<u8> = match elements {
        Elements::Bool(v) => v.iter().map(|b| u8::from(*b)).collect(),
        Elements::Int(v) => {
            let mut out = Vec::with_capacity(v.len() * 4);
            for (idx, x) in v.iter().enumerate() {
                let x = i64::from(*x);
                match dtype {
                    DType::I8 => out.push(narrow::<i8>(name, dtype, idx, x)? as u8),
                    DType::I16 => {
                        out.extend(narrow::<i16>(name, dtype, idx, x)?.to_le_bytes());
                    }
                    _ => out.extend(narrow::<i32>(name, dtype, idx, x)?.to_le_bytes()),
                }
            }
            out
        }
        Elements::Uint(v) => {
            let mut out = Vec::with_capacity(v.len() * 4);
            for (idx, x) in v.iter().enumerate() {
                let x = i64::from(*x);
                match dtype {
                    DType::U8 => out.push(narrow::<u8>(name, dtype, idx, x)?),
                    DType::U16 => {
                        out.extend(narrow::<u16>(name, dtype, idx, x)?.to_le_bytes());
                    }
                    _ => out.extend(narrow::<u32>(name, dtype, idx, x)?.to_le_bytes()),
                }
            }
            out
        }
        Elements::Int64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Elements::Uint64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Elements::Fp32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Elements::Fp64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Elements::Bytes(v) => encode_bytes_elements(v.iter().map(|b| &b[..])),
    };
    Tensor::new(name, dtype, shape, Bytes::from(data))
}

/// Flattens JSON `data` (flat or nested in row-major order) into its leaves.
fn json_leaves<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| json_leaves(item, out)),
        leaf => out.push(leaf),
    }
}

/// Builds a tensor from the REST protocol's JSON `data`.
pub fn json_tensor(
    name: &str,
    dtype: DType,
    shape: Vec<i64>,
    data: &Value,
) -> Result<Tensor, Error> {
    let expected = checked_numel(name, &shape)?;
    let mut leaves = Vec::new();
    json_leaves(data, &mut leaves);
    if leaves.len() != expected {
        return Err(count_mismatch(name, &shape, expected, leaves.len()));
    }
    let bad = |idx: usize, value: &Value| {
        Error::InvalidArgument(format!(
            "tensor '{name}': element {idx} ({value}) is not a {} value",
            datatype_name(dtype)
        ))
    };
    let int = |idx: usize, value: &Value| value.as_i64().ok_or_else(|| bad(idx, value));
    let uint = |idx: usize, value: &Value| value.as_u64().ok_or_else(|| bad(idx, value));
    let float = |idx: usize, value: &Value| value.as_f64().ok_or_else(|| bad(idx, value));
    let size = dtype.fixed_size().unwrap_or(8);
    let mut out: Vec<u8> = Vec::with_capacity(expected.saturating_mul(size));
    for (idx, leaf) in leaves.iter().copied().enumerate() {
        match dtype {
            DType::Bool => out.push(u8::from(leaf.as_bool().ok_or_else(|| bad(idx, leaf))?)),
            DType::U8 => out.push(narrow::<u8>(name, dtype, idx, int(idx, leaf)?)?),
            DType::I8 => out.push(narrow::<i8>(name, dtype, idx, int(idx, leaf)?)? as u8),
            DType::U16 => {
                out.extend(narrow::<u16>(name, dtype, idx, int(idx, leaf)?)?.to_le_bytes())
            }
            DType::I16 => {
                out.extend(narrow::<i16>(name, dtype, idx, int(idx, leaf)?)?.to_le_bytes())
            }
            DType::U32 => {
                out.extend(narrow::<u32>(name, dtype, idx, int(idx, leaf)?)?.to_le_bytes())
            }
            DType::I32 => {
                out.extend(narrow::<i32>(name, dtype, idx, int(idx, leaf)?)?.to_le_bytes())
            }
            DType::U64 => out.extend(uint(idx, leaf)?.to_le_bytes()),
            DType::I64 => out.extend(int(idx, leaf)?.to_le_bytes()),
            DType::F16 => out.extend(half::f16::from_f64(float(idx, leaf)?).to_le_bytes()),
            DType::BF16 => out.extend(half::bf16::from_f64(float(idx, leaf)?).to_le_bytes()),
            DType::F32 => out.extend((float(idx, leaf)? as f32).to_le_bytes()),
            DType::F64 => out.extend(float(idx, leaf)?.to_le_bytes()),
            DType::Bytes => {
                let text = leaf.as_str().ok_or_else(|| bad(idx, leaf))?;
                out.extend(encode_bytes_elements([text.as_bytes()]));
            }
        }
    }
    Tensor::new(name, dtype, shape, Bytes::from(out))
}

/// A tensor's elements as JSON data, once its BYTES elements are known to
/// be UTF-8 (other byte strings have to be fetched as binary data).
pub fn tensor_json_data(tensor: &Tensor) -> Result<JsonData<'_>, Error> {
    if tensor.dtype() == DType::Bytes {
        for (idx, element) in tensor
            .bytes_elements()
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            if std::str::from_utf8(element).is_err() {
                return Err(Error::InvalidArgument(format!(
                    "output '{}': element {idx} is not UTF-8; request it with binary_data",
                    tensor.name()
                )));
            }
        }
    }
    Ok(JsonData(tensor))
}

/// A tensor's elements as a flat sequence, each serialized as its own type
/// straight from the tensor's bytes: no tree of values in between, and an
/// f32 written in the shortest form that reads back as the same f32 (not
/// widened to f64 first). Non-finite floats become `null`, as JSON has no
/// other spelling for them. Made by [`tensor_json_data`].
pub struct JsonData<'a>(&'a Tensor);

impl serde::Serialize for JsonData<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error as _, SerializeSeq};
        let tensor = self.0;
        let data = &tensor.data()[..];
        let mut seq = serializer.serialize_seq(Some(tensor.numel()))?;
        macro_rules! each {
            ($width:literal, $decode:expr) => {
                for chunk in data.chunks_exact($width) {
                    let bytes: [u8; $width] = chunk.try_into().expect("exact chunk");
                    seq.serialize_element(&$decode(bytes))?;
                }
            };
        }
        match tensor.dtype() {
            DType::Bool => each!(1, |b: [u8; 1]| b[0] != 0),
            DType::U8 => each!(1, u8::from_le_bytes),
            DType::I8 => each!(1, i8::from_le_bytes),
            DType::U16 => each!(2, u16::from_le_bytes),
            DType::I16 => each!(2, i16::from_le_bytes),
            DType::U32 => each!(4, u32::from_le_bytes),
            DType::I32 => each!(4, i32::from_le_bytes),
            DType::U64 => each!(8, u64::from_le_bytes),
            DType::I64 => each!(8, i64::from_le_bytes),
            DType::F16 => each!(2, |b| half::f16::from_le_bytes(b).to_f32()),
            DType::BF16 => each!(2, |b| half::bf16::from_le_bytes(b).to_f32()),
            DType::F32 => each!(4, f32::from_le_bytes),
            DType::F64 => each!(8, f64::from_le_bytes),
            DType::Bytes => {
                for element in tensor.bytes_elements().unwrap_or_default() {
                    seq.serialize_element(std::str::from_utf8(element).map_err(S::Error::custom)?)?;
                }
            }
        }
        seq.end()
    }
}

/// One output a request asked for, with its options.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestedOutput {
    pub name: String,
    /// Return the top-k classes instead of the tensor (Triton's classification extension).
    pub classification: Option<usize>,
    /// HTTP only: send this output as binary data after the JSON.
    pub binary: Option<bool>,
    /// Write the output into this shared-memory place instead of the answer.
    pub shared_memory: Option<super::shm::Placement>,
}

/// The outputs to send back, in the order asked for (every output when none
/// is named), with classification applied. `config` is the config of the
/// model that computed `outputs`, named `model`.
pub fn select_outputs(
    model: &str,
    config: &ModelConfig,
    outputs: Vec<Tensor>,
    requested: &[RequestedOutput],
) -> Result<Vec<Tensor>, Error> {
    if requested.is_empty() {
        return Ok(outputs);
    }
    let batched = config.max_batch_size > 0;
    let mut slots: Vec<Option<Tensor>> = outputs.into_iter().map(Some).collect();
    let mut selected = Vec::with_capacity(requested.len());
    for (idx, want) in requested.iter().enumerate() {
        if requested[..idx]
            .iter()
            .any(|earlier| earlier.name == want.name)
        {
            return Err(Error::InvalidArgument(format!(
                "output '{}' is requested twice",
                want.name
            )));
        }
        let Some(slot) = slots
            .iter_mut()
            .find(|slot| slot.as_ref().is_some_and(|t| t.name() == want.name))
        else {
            let available: Vec<&str> = slots.iter().flatten().map(Tensor::name).collect();
            return Err(Error::InvalidArgument(format!(
                "model '{model}': requested output '{}' is not an output (outputs: {})",
                want.name,
                available.join(", ")
            )));
        };
        let tensor = slot.take().expect("found above");
        selected.push(match want.classification {
            Some(k) => classify(&tensor, k, batched)?,
            None => tensor,
        });
    }
    Ok(selected)
}

/// The top `k` entries of each batch row (or of the whole tensor when the
/// model does not batch) as BYTES `"<score>:<index>"`, best first.
pub fn classify(tensor: &Tensor, k: usize, batched: bool) -> Result<Tensor, Error> {
    let name = tensor.name();
    if k == 0 {
        return Err(Error::InvalidArgument(format!(
            "output '{name}': classification count must be at least 1"
        )));
    }
    let Some(values) = tensor.to_f64_lossy() else {
        return Err(Error::InvalidArgument(format!(
            "output '{name}': classification needs a numeric tensor, got BYTES"
        )));
    };
    let rows = match (batched, tensor.shape().first()) {
        (true, Some(&n)) if n > 0 => usize::try_from(n).unwrap_or(1),
        _ => 1,
    };
    let per_row = values.len() / rows.max(1);
    let keep = k.min(per_row);
    let mut labels = Vec::with_capacity(rows * keep);
    for row in values.chunks(per_row.max(1)).take(rows) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|a, b| row[*b].total_cmp(&row[*a]).then(a.cmp(b)));
        labels.extend(
            order
                .into_iter()
                .take(keep)
                .map(|idx| format!("{:.6}:{idx}", row[idx])),
        );
    }
    let shape = if batched && !tensor.shape().is_empty() {
        vec![rows as i64, keep as i64]
    } else {
        vec![keep as i64]
    };
    let data = encode_bytes_elements(labels.iter().map(String::as_bytes));
    Tensor::new(name, DType::Bytes, shape, Bytes::from(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for dtype in DType::ALL {
            assert_eq!(parse_datatype("t", datatype_name(dtype)), Ok(dtype));
        }
        let err = parse_datatype("x", "FLOAT32").unwrap_err().to_string();
        assert!(
            err.contains("tensor 'x'") && err.contains("\"FLOAT32\""),
            "{err}"
        );
        assert_eq!(config_datatype_name(DType::Bytes), "TYPE_STRING");
        assert_eq!(config_datatype_name(DType::F32), "TYPE_FP32");
    }

    #[test]
    fn typed_contents_are_checked_before_use() {
        let t = typed_tensor("x", DType::I16, vec![2], Elements::Int(&[-3, 7])).unwrap();
        assert_eq!(&t.data()[..], &[0xfd, 0xff, 7, 0]);
        let err = typed_tensor("x", DType::I8, vec![1], Elements::Int(&[300])).unwrap_err();
        assert!(
            err.to_string()
                .contains("element 0 (300) does not fit INT8"),
            "{err}"
        );
        let err = typed_tensor("x", DType::F32, vec![2], Elements::Int64(&[1, 2])).unwrap_err();
        assert!(
            err.to_string()
                .contains("FP32 takes fp32_contents, got int64_contents"),
            "{err}"
        );
        let err = typed_tensor("x", DType::F32, vec![2, 2], Elements::Fp32(&[1.0])).unwrap_err();
        assert!(
            err.to_string()
                .contains("shape [2, 2] needs 4 elements, got 1"),
            "{err}"
        );
        let err = typed_tensor("x", DType::F16, vec![1], Elements::Fp32(&[1.0])).unwrap_err();
        assert!(err.to_string().contains("raw_input_contents"), "{err}");
        let err =
            typed_tensor("x", DType::F32, vec![i64::MAX, 4], Elements::Fp32(&[])).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
        let words = [Bytes::from_static(b"hi"), Bytes::from_static(b"")];
        let t = typed_tensor("s", DType::Bytes, vec![2], Elements::Bytes(&words)).unwrap();
        assert_eq!(t.bytes_elements().unwrap(), vec![&b"hi"[..], &b""[..]]);
    }

    #[test]
    fn json_data_flattens_and_checks() {
        let t = json_tensor(
            "x",
            DType::F32,
            vec![2, 2],
            &serde_json::json!([[1, 2.5], [3, 4]]),
        )
        .unwrap();
        assert_eq!(t.to_f32().unwrap(), vec![1.0, 2.5, 3.0, 4.0]);
        let err = json_tensor("x", DType::I64, vec![2], &serde_json::json!([1, "a"])).unwrap_err();
        assert!(
            err.to_string()
                .contains("element 1 (\"a\") is not a INT64 value"),
            "{err}"
        );
        let err = json_tensor("x", DType::U8, vec![1], &serde_json::json!([256])).unwrap_err();
        assert!(err.to_string().contains("does not fit UINT8"), "{err}");
        let t = json_tensor("s", DType::Bytes, vec![1], &serde_json::json!(["héllo"])).unwrap();
        let text = |t: &Tensor| serde_json::to_string(&tensor_json_data(t).unwrap()).unwrap();
        assert_eq!(text(&t), r#"["héllo"]"#);
        let b = json_tensor("b", DType::Bool, vec![2], &serde_json::json!([true, false])).unwrap();
        assert_eq!(text(&b), "[true,false]");
        // f32 in its shortest form (not widened to f64), non-finite as null,
        // integers exact.
        let f = Tensor::from_f32("f", vec![3], &[0.1, f32::NAN, -2.0]).unwrap();
        assert_eq!(text(&f), "[0.1,null,-2.0]");
        let big = u64::MAX - 1;
        let u = Tensor::new(
            "u",
            DType::U64,
            vec![1],
            Bytes::from(big.to_le_bytes().to_vec()),
        );
        assert_eq!(text(&u.unwrap()), format!("[{big}]"));
        let bad = Tensor::new(
            "s",
            DType::Bytes,
            vec![1],
            Bytes::from(encode_bytes_elements([&[0xffu8][..]])),
        );
        let err = tensor_json_data(&bad.unwrap()).err().unwrap().to_string();
        assert!(err.contains("element 0 is not UTF-8"), "{err}");
    }

    #[test]
    fn classification_ranks_each_batch_row() {
        let t = Tensor::from_f32("p", vec![2, 3], &[0.1, 0.7, 0.2, 0.5, 0.25, 0.25]).unwrap();
        let top = classify(&t, 2, true).unwrap();
        assert_eq!(top.shape(), &[2, 2]);
        let labels: Vec<String> = top
            .bytes_elements()
            .unwrap()
            .into_iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect();
        assert_eq!(
            labels,
            ["0.700000:1", "0.200000:2", "0.500000:0", "0.250000:1"]
        );
        let all = classify(&t, 10, false).unwrap();
        assert_eq!(all.shape(), &[6]);
    }
}
