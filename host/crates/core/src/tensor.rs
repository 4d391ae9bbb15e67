//! Plinth's own tensor type. Only the edges convert to and from proto types,
//! and only `torch` converts to and from `tch` types.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

use crate::error::Error;

/// Element type of a tensor. Data is row-major and little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    BF16,
    F32,
    F64,
    /// Variable-length byte strings: each element is a u32 little-endian
    /// length followed by that many bytes (the Open Inference Protocol layout).
    /// Plugins read and write them; TorchScript models cannot take them.
    Bytes,
}

impl DType {
    pub const ALL: [DType; 14] = [
        DType::Bool,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::Bytes,
    ];

    /// Bytes per element; `None` for [`DType::Bytes`], whose elements vary.
    pub fn fixed_size(self) -> Option<usize> {
        Some(match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::U16 | DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 => 8,
            DType::Bytes => return None,
        })
    }

    /// The name used in config files and error messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "u8",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::Bytes => "bytes",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = String;

    /// Accepts Plinth's short names and the common long spellings
    /// (`float32`, `FP32`, `TYPE_FP32`, `int64`, ...), case-insensitively.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let lower = text.to_ascii_lowercase();
        let lower = lower.strip_prefix("type_").unwrap_or(&lower);
        let dtype = match lower {
            "bool" => DType::Bool,
            "u8" | "uint8" => DType::U8,
            "u16" | "uint16" => DType::U16,
            "u32" | "uint32" => DType::U32,
            "u64" | "uint64" => DType::U64,
            "i8" | "int8" => DType::I8,
            "i16" | "int16" => DType::I16,
            "i32" | "int32" => DType::I32,
            "i64" | "int64" => DType::I64,
            "f16" | "fp16" | "float16" | "half" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            "f32" | "fp32" | "float32" | "float" => DType::F32,
            "f64" | "fp64" | "float64" | "double" => DType::F64,
            "bytes" | "string" => DType::Bytes,
            _ => {
                return Err(format!(
                    "unknown dtype {text:?}; expected one of bool, u8, u16, u32, u64, i8, i16, i32, i64, f16, bf16, f32, f64, bytes"
                ));
            }
        };
        Ok(dtype)
    }
}

/// Formats a shape as `[2, 3]`.
pub fn shape_str(shape: &[i64]) -> String {
    let dims: Vec<String> = shape.iter().map(i64::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// Number of elements of a concrete shape, or `None` if a dim is negative or
/// the product overflows.
pub fn numel(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &dim| {
        let dim = usize::try_from(dim).ok()?;
        acc.checked_mul(dim)
    })
}

/// A dense tensor whose byte length has been checked against its shape and dtype.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    name: String,
    dtype: DType,
    shape: Vec<i64>,
    data: Bytes,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

impl Tensor {
    /// Checks that `shape` is concrete and that `data` holds exactly
    /// `numel(shape) * dtype.size()` bytes. Nothing is allocated in proportion
    /// to the declared shape before that check.
    pub fn new(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<i64>,
        data: Bytes,
    ) -> Result<Tensor, Error> {
        let name = name.into();
        if let Some((dim_idx, dim)) = shape.iter().enumerate().find(|(_, dim)| **dim < 0) {
            return Err(Error::InvalidArgument(format!(
                "tensor '{name}': dimension {dim_idx} of shape {} is negative ({dim})",
                shape_str(&shape)
            )));
        }
        let Some(n_elements) = numel(&shape) else {
            return Err(Error::InvalidArgument(format!(
                "tensor '{name}': shape {} of {dtype} is too large (element count overflows), got {} bytes",
                shape_str(&shape),
                data.len()
            )));
        };
        let Some(element_size) = dtype.fixed_size() else {
            check_bytes_elements(&name, &shape, n_elements, &data)?;
            return Ok(Tensor {
                name,
                dtype,
                shape,
                data,
            });
        };
        match n_elements.checked_mul(element_size) {
            Some(expected) if expected == data.len() => Ok(Tensor {
                name,
                dtype,
                shape,
                data,
            }),
            Some(expected) => Err(Error::InvalidArgument(format!(
                "tensor '{name}': shape {} of {dtype} needs {expected} bytes, got {}",
                shape_str(&shape),
                data.len()
            ))),
            None => Err(Error::InvalidArgument(format!(
                "tensor '{name}': shape {} of {dtype} is too large (byte length overflows), got {} bytes",
                shape_str(&shape),
                data.len()
            ))),
        }
    }

    /// A tensor of little-endian `f32` values.
    pub fn from_f32(
        name: impl Into<String>,
        shape: Vec<i64>,
        values: &[f32],
    ) -> Result<Tensor, Error> {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new(name, DType::F32, shape, Bytes::from(data))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[i64] {
        &self.shape
    }

    pub fn data(&self) -> &Bytes {
        &self.data
    }

    pub fn into_data(self) -> Bytes {
        self.data
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape).expect("checked at construction")
    }

    pub fn with_name(mut self, name: impl Into<String>) -> Tensor {
        self.name = name.into();
        self
    }

    /// The values as `f32`, if the dtype is f32.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.dtype == DType::F32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        })
    }

    /// The values as `i64`, if the dtype is i64.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        (self.dtype == DType::I64).then(|| {
            self.data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("chunks of 8")))
                .collect()
        })
    }
}

impl Tensor {
    /// Every element widened to `f64`, for any numeric dtype (bool reads as
    /// 0 or 1); `None` for [`DType::Bytes`].
    pub fn to_f64_lossy(&self) -> Option<Vec<f64>> {
        fn each<const N: usize>(data: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
            data.chunks_exact(N)
                .map(|b| f(b.try_into().expect("chunk of N")))
                .collect()
        }
        let data = &self.data[..];
        Some(match self.dtype {
            DType::Bool | DType::U8 => data.iter().map(|b| f64::from(*b)).collect(),
            DType::I8 => data.iter().map(|b| f64::from(*b as i8)).collect(),
            DType::U16 => each(data, |b| f64::from(u16::from_le_bytes(b))),
            DType::I16 => each(data, |b| f64::from(i16::from_le_bytes(b))),
            DType::F16 => each(data, |b| half::f16::from_le_bytes(b).to_f64()),
            DType::BF16 => each(data, |b| half::bf16::from_le_bytes(b).to_f64()),
            DType::U32 => each(data, |b| f64::from(u32::from_le_bytes(b))),
            DType::I32 => each(data, |b| f64::from(i32::from_le_bytes(b))),
            DType::F32 => each(data, |b| f64::from(f32::from_le_bytes(b))),
            DType::U64 => each(data, |b| u64::from_le_bytes(b) as f64),
            DType::I64 => each(data, |b| i64::from_le_bytes(b) as f64),
            DType::F64 => each(data, f64::from_le_bytes),
            DType::Bytes => return None,
        })
    }

    /// The elements of a [`DType::Bytes`] tensor, without their length prefixes.
    pub fn bytes_elements(&self) -> Option<Vec<&[u8]>> {
        if self.dtype != DType::Bytes {
            return None;
        }
        let mut out = Vec::new();
        let mut rest = &self.data[..];
        while let Some((prefix, tail)) = rest.split_first_chunk::<4>() {
            let len = u32::from_le_bytes(*prefix) as usize;
            out.push(&tail[..len]);
            rest = &tail[len..];
        }
        Some(out)
    }
}

/// Encodes byte strings in the [`DType::Bytes`] layout.
pub fn encode_bytes_elements<'a>(elements: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for element in elements {
        let len = u32::try_from(element.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(element);
    }
    out
}

/// Checks that `data` is exactly `n_elements` length-prefixed byte strings.
/// Walks the prefixes only; nothing is allocated.
fn check_bytes_elements(
    name: &str,
    shape: &[i64],
    n_elements: usize,
    data: &[u8],
) -> Result<(), Error> {
    let mut offset = 0usize;
    for element_idx in 0..n_elements {
        let Some(prefix) = data.get(offset..offset + 4) else {
            return Err(Error::InvalidArgument(format!(
                "tensor '{name}': shape {} of bytes needs {n_elements} length-prefixed elements, data ends after {element_idx}",
                shape_str(shape)
            )));
        };
        let len = u32::from_le_bytes(prefix.try_into().expect("4 bytes")) as usize;
        offset += 4;
        if data.len() - offset < len {
            return Err(Error::InvalidArgument(format!(
                "tensor '{name}': bytes element {element_idx} declares {len} bytes, only {} remain",
                data.len() - offset
            )));
        }
        offset += len;
    }
    if offset != data.len() {
        return Err(Error::InvalidArgument(format!(
            "tensor '{name}': shape {} of bytes holds {n_elements} elements in {offset} bytes, got {} bytes",
            shape_str(shape),
            data.len()
        )));
    }
    Ok(())
}

/// A declared input or output of a model: `-1` marks a free dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    /// Whether a concrete shape fits this spec (free dims match anything).
    pub fn shape_matches(&self, shape: &[i64]) -> bool {
        self.shape.len() == shape.len()
            && self
                .shape
                .iter()
                .zip(shape)
                .all(|(want, got)| *want == -1 || want == got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_length_is_checked_against_shape() {
        let cases: &[(&[i64], usize, Option<&str>)] = &[
            (&[2, 3], 24, None),
            (
                &[2, 3],
                20,
                Some("tensor 'x': shape [2, 3] of f32 needs 24 bytes, got 20"),
            ),
            (&[0, 3], 0, None),
            (
                &[2, -1],
                8,
                Some("tensor 'x': dimension 1 of shape [2, -1] is negative (-1)"),
            ),
            (
                &[i64::MAX, i64::MAX],
                4,
                Some(
                    "tensor 'x': shape [9223372036854775807, 9223372036854775807] of f32 is too large (element count overflows), got 4 bytes",
                ),
            ),
            (
                &[1 << 62],
                4,
                Some(
                    "tensor 'x': shape [4611686018427387904] of f32 is too large (byte length overflows), got 4 bytes",
                ),
            ),
        ];
        for (shape, n_bytes, expect) in cases {
            let res = Tensor::new(
                "x",
                DType::F32,
                shape.to_vec(),
                Bytes::from(vec![0u8; *n_bytes]),
            );
            match (res, expect) {
                (Ok(_), None) => {}
                (Err(err), Some(msg)) => assert_eq!(err.to_string(), *msg),
                (res, expect) => panic!("shape {shape:?}: got {res:?}, expected {expect:?}"),
            }
        }
    }

    #[test]
    fn bytes_elements_are_walked_not_trusted() {
        let two = [&3u32.to_le_bytes()[..], b"abc", &0u32.to_le_bytes()[..]].concat();
        assert!(Tensor::new("s", DType::Bytes, vec![2], Bytes::from(two.clone())).is_ok());
        let cases: &[(&[i64], Vec<u8>, &str)] = &[
            (
                &[3],
                two.clone(),
                "tensor 's': shape [3] of bytes needs 3 length-prefixed elements, data ends after 2",
            ),
            (
                &[1],
                two.clone(),
                "tensor 's': shape [1] of bytes holds 1 elements in 7 bytes, got 11 bytes",
            ),
            (
                &[1],
                [&u32::MAX.to_le_bytes()[..], b"x"].concat(),
                "tensor 's': bytes element 0 declares 4294967295 bytes, only 1 remain",
            ),
        ];
        for (shape, data, msg) in cases {
            let err = Tensor::new("s", DType::Bytes, shape.to_vec(), Bytes::from(data.clone()))
                .unwrap_err();
            assert_eq!(err.to_string(), *msg);
        }
    }

    #[test]
    fn dtype_names_round_trip() {
        for dtype in DType::ALL {
            assert_eq!(dtype.name().parse::<DType>(), Ok(dtype));
        }
        assert_eq!("TYPE_FP32".parse::<DType>(), Ok(DType::F32));
        assert_eq!("Float64".parse::<DType>(), Ok(DType::F64));
        assert!(
            "complex64"
                .parse::<DType>()
                .unwrap_err()
                .contains("unknown dtype \"complex64\"")
        );
    }

    #[test]
    fn free_dims_match_anything() {
        let spec = TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![-1, 4],
        };
        assert!(spec.shape_matches(&[7, 4]));
        assert!(!spec.shape_matches(&[7, 5]));
        assert!(!spec.shape_matches(&[4]));
    }
}
