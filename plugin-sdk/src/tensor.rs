//! Typed views of [`Tensor`] data and constructors from typed values.
//!
//! A [`Tensor`] carries its elements as little-endian bytes. The functions
//! here check the dtype and the length against the shape, then give the
//! elements as a typed slice (without a copy when the bytes happen to be
//! aligned, which they usually are), and build tensors back from typed
//! vectors.

use std::borrow::Cow;
use std::fmt;

use crate::{Dtype, PluginError, Tensor};

// The wire format is little-endian and views reinterpret bytes in place.
#[cfg(target_endian = "big")]
compile_error!("plinth-plugin-sdk supports little-endian targets only");

mod sealed {
    pub trait Sealed {}
}

/// A Rust type that is the element type of a [`Dtype`]: `u8`, `u16`, `u32`,
/// `u64`, `i8`, `i16`, `i32`, `i64`, `f32` or `f64`.
///
/// `bool`, `f16`, `bf16` and `bytes` tensors have their own functions:
/// [`Tensor::as_bool`], [`Tensor::to_f32_lossy`] and
/// [`Tensor::as_byte_strings`].
pub trait Element: bytemuck::Pod + sealed::Sealed {
    /// The dtype whose elements are this type.
    const DTYPE: Dtype;
}

macro_rules! elements {
    ($($ty:ty => $dtype:ident, $as_fn:ident, $from_fn:ident;)*) => {
        $(
            impl sealed::Sealed for $ty {}
            impl Element for $ty {
                const DTYPE: Dtype = Dtype::$dtype;
            }
        )*

        impl Tensor {
            $(
                #[doc = concat!("The elements as `", stringify!($ty), "`; an error unless the dtype is `", stringify!($ty), "` and the data matches the shape.")]
                pub fn $as_fn(&self) -> Result<Cow<'_, [$ty]>, TensorError> {
                    self.view::<$ty>()
                }

                #[doc = concat!("A `", stringify!($ty), "` tensor; an error when `values` does not have as many elements as `shape` says.")]
                pub fn $from_fn(
                    name: impl Into<String>,
                    shape: &[i64],
                    values: Vec<$ty>,
                ) -> Result<Tensor, TensorError> {
                    Tensor::from_values(name, shape, &values)
                }
            )*
        }
    };
}

elements! {
    u8 => U8, as_u8, from_u8;
    u16 => U16, as_u16, from_u16;
    u32 => U32, as_u32, from_u32;
    u64 => U64, as_u64, from_u64;
    i8 => I8, as_i8, from_i8;
    i16 => I16, as_i16, from_i16;
    i32 => I32, as_i32, from_i32;
    i64 => I64, as_i64, from_i64;
    f32 => F32, as_f32, from_f32;
    f64 => F64, as_f64, from_f64;
}

impl Dtype {
    /// Bytes per element, or `None` for `bytes`, whose elements vary in
    /// length.
    pub fn size_bytes(self) -> Option<usize> {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 => Some(1),
            Dtype::U16 | Dtype::I16 | Dtype::F16 | Dtype::Bf16 => Some(2),
            Dtype::U32 | Dtype::I32 | Dtype::F32 => Some(4),
            Dtype::U64 | Dtype::I64 | Dtype::F64 => Some(8),
            Dtype::Bytes => None,
        }
    }

    /// The name used in the WIT and in error messages: `f32`, `bf16`, ...
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "bool",
            Dtype::U8 => "u8",
            Dtype::U16 => "u16",
            Dtype::U32 => "u32",
            Dtype::U64 => "u64",
            Dtype::I8 => "i8",
            Dtype::I16 => "i16",
            Dtype::I32 => "i32",
            Dtype::I64 => "i64",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::F32 => "f32",
            Dtype::F64 => "f64",
            Dtype::Bytes => "bytes",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Tensor {
    /// A tensor from raw little-endian bytes; an error when `data` does not
    /// match `shape` and `dtype` (for `bytes`, when it is not a sequence of
    /// as many length-prefixed elements as `shape` says).
    pub fn new(
        name: impl Into<String>,
        dtype: Dtype,
        shape: &[i64],
        data: Vec<u8>,
    ) -> Result<Tensor, TensorError> {
        let tensor = Tensor {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            data,
        };
        tensor.validate()?;
        Ok(tensor)
    }

    /// A tensor of any [`Element`] type; an error when `values` does not
    /// have as many elements as `shape` says.
    pub fn from_values<T: Element>(
        name: impl Into<String>,
        shape: &[i64],
        values: &[T],
    ) -> Result<Tensor, TensorError> {
        let name = name.into();
        let numel = numel_of(&name, shape)?;
        if values.len() != numel {
            return Err(TensorError::ElementCount {
                tensor: name,
                shape: shape.to_vec(),
                expected: numel,
                actual: values.len(),
            });
        }
        Ok(Tensor {
            name,
            dtype: T::DTYPE,
            shape: shape.to_vec(),
            data: bytemuck::cast_slice(values).to_vec(),
        })
    }

    /// A `bool` tensor; an error when `values` does not have as many
    /// elements as `shape` says.
    pub fn from_bool(
        name: impl Into<String>,
        shape: &[i64],
        values: Vec<bool>,
    ) -> Result<Tensor, TensorError> {
        let bytes: Vec<u8> = values.iter().map(|&value| u8::from(value)).collect();
        let mut tensor = Tensor::from_values(name, shape, &bytes)?;
        tensor.dtype = Dtype::Bool;
        Ok(tensor)
    }

    /// A `bytes` tensor of variable-length elements, such as strings; an
    /// error when `elements` does not have as many elements as `shape` says
    /// or one is longer than `u32::MAX` bytes.
    pub fn from_byte_strings<B: AsRef<[u8]>>(
        name: impl Into<String>,
        shape: &[i64],
        elements: &[B],
    ) -> Result<Tensor, TensorError> {
        let name = name.into();
        let numel = numel_of(&name, shape)?;
        if elements.len() != numel {
            return Err(TensorError::ElementCount {
                tensor: name,
                shape: shape.to_vec(),
                expected: numel,
                actual: elements.len(),
            });
        }
        let total: usize = elements
            .iter()
            .map(|element| 4 + element.as_ref().len())
            .sum();
        let mut data = Vec::with_capacity(total);
        for (element_idx, element) in elements.iter().enumerate() {
            let element = element.as_ref();
            let Ok(len) = u32::try_from(element.len()) else {
                return Err(TensorError::MalformedBytes {
                    tensor: name,
                    detail: format!("element {element_idx} is longer than u32::MAX bytes"),
                });
            };
            data.extend_from_slice(&len.to_le_bytes());
            data.extend_from_slice(element);
        }
        Ok(Tensor {
            name,
            dtype: Dtype::Bytes,
            shape: shape.to_vec(),
            data,
        })
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The dimensions as `usize`; an error when one is negative.
    pub fn dims(&self) -> Result<Vec<usize>, TensorError> {
        self.shape
            .iter()
            .map(|&dim| usize::try_from(dim).map_err(|_| self.bad_shape("a dimension is negative")))
            .collect()
    }

    /// The dimensions of a tensor of rank `N`, e.g. `let [n, c] =
    /// t.dims_n::<2>()?;`; an error when the rank is not `N` or a dimension
    /// is negative.
    pub fn dims_n<const N: usize>(&self) -> Result<[usize; N], TensorError> {
        let dims = self.dims()?;
        dims.try_into().map_err(|_| TensorError::Rank {
            tensor: self.name.clone(),
            expected: format!("{N}"),
            shape: self.shape.clone(),
        })
    }

    /// The element count: the product of the dimensions, 1 for a scalar; an
    /// error when a dimension is negative or the product overflows.
    pub fn numel(&self) -> Result<usize, TensorError> {
        numel_of(&self.name, &self.shape)
    }

    /// An error unless the dtype is `expected`.
    pub fn expect_dtype(&self, expected: Dtype) -> Result<(), TensorError> {
        if self.dtype == expected {
            return Ok(());
        }
        Err(TensorError::Dtype {
            tensor: self.name.clone(),
            expected: expected.name().to_owned(),
            actual: self.dtype,
        })
    }

    /// Checks that the data matches the dtype and the shape.
    pub fn validate(&self) -> Result<(), TensorError> {
        match self.dtype.size_bytes() {
            Some(size) => self.check_len(size),
            None => self.as_byte_strings().map(drop),
        }
    }

    /// The elements as `T`, borrowed when the bytes are aligned for `T` and
    /// copied otherwise; an error unless the dtype is `T`'s and the data
    /// matches the shape.
    pub fn view<T: Element>(&self) -> Result<Cow<'_, [T]>, TensorError> {
        self.expect_dtype(T::DTYPE)?;
        self.check_len(size_of::<T>())?;
        Ok(cast_or_copy(&self.data))
    }

    /// The elements of a `bool` tensor; any non-zero byte reads as `true`.
    pub fn as_bool(&self) -> Result<Vec<bool>, TensorError> {
        self.expect_dtype(Dtype::Bool)?;
        self.check_len(1)?;
        Ok(self.data.iter().map(|&byte| byte != 0).collect())
    }

    /// The elements of a `bytes` tensor, each without its length prefix; an
    /// error when the data is not as many length-prefixed elements as the
    /// shape says.
    pub fn as_byte_strings(&self) -> Result<Vec<&[u8]>, TensorError> {
        self.expect_dtype(Dtype::Bytes)?;
        let numel = self.numel()?;
        let mut elements = Vec::with_capacity(numel.min(self.data.len() / 4));
        let mut rest = self.data.as_slice();
        while !rest.is_empty() {
            let malformed = |detail: String| TensorError::MalformedBytes {
                tensor: self.name.clone(),
                detail,
            };
            let element_idx = elements.len();
            let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                return Err(malformed(format!(
                    "element {element_idx}: {} bytes left, too few for a length prefix",
                    rest.len()
                )));
            };
            let len = u32::from_le_bytes(*len) as usize;
            if tail.len() < len {
                return Err(malformed(format!(
                    "element {element_idx}: length prefix says {len} bytes, {} left",
                    tail.len()
                )));
            }
            let (element, tail) = tail.split_at(len);
            elements.push(element);
            rest = tail;
        }
        if elements.len() != numel {
            return Err(TensorError::ElementCount {
                tensor: self.name.clone(),
                shape: self.shape.clone(),
                expected: numel,
                actual: elements.len(),
            });
        }
        Ok(elements)
    }

    /// The elements of any numeric or `bool` tensor converted to `f32`:
    /// exact for `bool`, `u8`, `i8`, `u16`, `i16`, `f16`, `bf16` and `f32`,
    /// rounded to the nearest `f32` for wider types. An error for `bytes`.
    pub fn to_f32_lossy(&self) -> Result<Vec<f32>, TensorError> {
        Ok(match self.dtype {
            Dtype::Bool => self.as_bool()?.into_iter().map(f32::from).collect(),
            Dtype::U8 => self.as_u8()?.iter().map(|&v| f32::from(v)).collect(),
            Dtype::U16 => self.as_u16()?.iter().map(|&v| f32::from(v)).collect(),
            Dtype::U32 => self.as_u32()?.iter().map(|&v| v as f32).collect(),
            Dtype::U64 => self.as_u64()?.iter().map(|&v| v as f32).collect(),
            Dtype::I8 => self.as_i8()?.iter().map(|&v| f32::from(v)).collect(),
            Dtype::I16 => self.as_i16()?.iter().map(|&v| f32::from(v)).collect(),
            Dtype::I32 => self.as_i32()?.iter().map(|&v| v as f32).collect(),
            Dtype::I64 => self.as_i64()?.iter().map(|&v| v as f32).collect(),
            Dtype::F16 => self.half_bits()?.map(f16_to_f32).collect(),
            Dtype::Bf16 => self.half_bits()?.map(bf16_to_f32).collect(),
            Dtype::F32 => self.as_f32()?.into_owned(),
            Dtype::F64 => self.as_f64()?.iter().map(|&v| v as f32).collect(),
            Dtype::Bytes => {
                return Err(TensorError::Dtype {
                    tensor: self.name.clone(),
                    expected: "a numeric dtype".to_owned(),
                    actual: Dtype::Bytes,
                });
            }
        })
    }

    fn half_bits(&self) -> Result<impl Iterator<Item = u16> + '_, TensorError> {
        self.check_len(2)?;
        Ok(self
            .data
            .chunks_exact(2)
            .map(|pair| u16::from_le_bytes([pair[0], pair[1]])))
    }

    fn check_len(&self, element_size: usize) -> Result<(), TensorError> {
        let numel = self.numel()?;
        let expected = numel
            .checked_mul(element_size)
            .ok_or_else(|| self.bad_shape("the byte length overflows usize"))?;
        if self.data.len() == expected {
            return Ok(());
        }
        Err(TensorError::DataLength {
            tensor: self.name.clone(),
            dtype: self.dtype,
            shape: self.shape.clone(),
            expected,
            actual: self.data.len(),
        })
    }

    fn bad_shape(&self, detail: &str) -> TensorError {
        TensorError::Shape {
            tensor: self.name.clone(),
            shape: self.shape.clone(),
            detail: detail.to_owned(),
        }
    }
}

/// `bytes` as a `[T]`, borrowed when aligned for `T`, copied otherwise. The
/// length must be a multiple of `T`'s size.
fn cast_or_copy<T: Element>(bytes: &[u8]) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(values) => Cow::Borrowed(values),
        Err(_) => {
            let mut values = vec![T::zeroed(); bytes.len() / size_of::<T>()];
            bytemuck::cast_slice_mut(&mut values).copy_from_slice(bytes);
            Cow::Owned(values)
        }
    }
}

fn numel_of(name: &str, shape: &[i64]) -> Result<usize, TensorError> {
    let bad_shape = |detail: &str| TensorError::Shape {
        tensor: name.to_owned(),
        shape: shape.to_vec(),
        detail: detail.to_owned(),
    };
    shape.iter().try_fold(1usize, |acc, &dim| {
        let dim = usize::try_from(dim).map_err(|_| bad_shape("a dimension is negative"))?;
        acc.checked_mul(dim)
            .ok_or_else(|| bad_shape("the element count overflows usize"))
    })
}

/// Converts IEEE 754 binary16 bits to `f32`, exactly.
fn f16_to_f32(bits: u16) -> f32 {
    let negative = bits & 0x8000 != 0;
    let exponent = u32::from((bits >> 10) & 0x1f);
    let mantissa = u32::from(bits & 0x3ff);
    let sign = u32::from(negative) << 31;
    match exponent {
        0 => {
            // Zero or subnormal: mantissa × 2^-24, exact in f32.
            let magnitude = mantissa as f32 * f32::from_bits(0x3380_0000);
            if negative { -magnitude } else { magnitude }
        }
        0x1f => f32::from_bits(sign | 0x7f80_0000 | (mantissa << 13)),
        _ => f32::from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13)),
    }
}

/// Converts bfloat16 bits to `f32`, exactly.
fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Why a tensor does not have the dtype, shape or data a plugin expects.
///
/// Converts into [`PluginError::InvalidInput`] with `?`; the message names
/// the tensor and what was expected against what was got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorError {
    /// The dtype is not the expected one.
    Dtype {
        /// Tensor name.
        tensor: String,
        /// What was expected, e.g. `f32` or `u8 or f32`.
        expected: String,
        /// The tensor's dtype.
        actual: Dtype,
    },
    /// The rank is not the expected one.
    Rank {
        /// Tensor name.
        tensor: String,
        /// What was expected, e.g. `2` or `3 or 4`.
        expected: String,
        /// The tensor's shape.
        shape: Vec<i64>,
    },
    /// The shape is unusable: a negative dimension or an overflowing size.
    Shape {
        /// Tensor name.
        tensor: String,
        /// The tensor's shape.
        shape: Vec<i64>,
        /// What is wrong with it.
        detail: String,
    },
    /// The data length does not match the shape and dtype.
    DataLength {
        /// Tensor name.
        tensor: String,
        /// The tensor's dtype.
        dtype: Dtype,
        /// The tensor's shape.
        shape: Vec<i64>,
        /// The byte length the shape and dtype call for.
        expected: usize,
        /// The byte length of the data.
        actual: usize,
    },
    /// The number of elements does not match the shape.
    ElementCount {
        /// Tensor name.
        tensor: String,
        /// The shape.
        shape: Vec<i64>,
        /// The element count the shape calls for.
        expected: usize,
        /// The element count given.
        actual: usize,
    },
    /// The data of a `bytes` tensor is not a sequence of length-prefixed
    /// elements.
    MalformedBytes {
        /// Tensor name.
        tensor: String,
        /// What is wrong with it.
        detail: String,
    },
}

impl fmt::Display for TensorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorError::Dtype {
                tensor,
                expected,
                actual,
            } => write!(
                f,
                "tensor `{tensor}`: expected dtype {expected}, got {actual}"
            ),
            TensorError::Rank {
                tensor,
                expected,
                shape,
            } => write!(
                f,
                "tensor `{tensor}`: expected rank {expected}, got shape {shape:?} (rank {})",
                shape.len()
            ),
            TensorError::Shape {
                tensor,
                shape,
                detail,
            } => write!(f, "tensor `{tensor}`: bad shape {shape:?}: {detail}"),
            TensorError::DataLength {
                tensor,
                dtype,
                shape,
                expected,
                actual,
            } => write!(
                f,
                "tensor `{tensor}`: shape {shape:?} of {dtype} needs {expected} bytes of data, got {actual}"
            ),
            TensorError::ElementCount {
                tensor,
                shape,
                expected,
                actual,
            } => write!(
                f,
                "tensor `{tensor}`: shape {shape:?} needs {expected} elements, got {actual}"
            ),
            TensorError::MalformedBytes { tensor, detail } => {
                write!(f, "tensor `{tensor}`: malformed bytes data: {detail}")
            }
        }
    }
}

impl std::error::Error for TensorError {}

impl From<TensorError> for PluginError {
    fn from(err: TensorError) -> Self {
        PluginError::InvalidInput(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(dtype: Dtype, shape: &[i64], data: Vec<u8>) -> Tensor {
        Tensor {
            name: "x".to_owned(),
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }

    #[test]
    fn f32_round_trip() {
        let tensor = Tensor::from_f32("x", &[2, 2], vec![1.0, -2.5, 3.25, 0.0]).unwrap();
        assert_eq!(tensor.dtype, Dtype::F32);
        assert_eq!(tensor.data.len(), 16);
        assert_eq!(&tensor.data[4..8], &(-2.5f32).to_le_bytes());
        assert_eq!(&*tensor.as_f32().unwrap(), &[1.0, -2.5, 3.25, 0.0]);
        assert_eq!(tensor.numel().unwrap(), 4);
        assert_eq!(tensor.dims_n::<2>().unwrap(), [2, 2]);
    }

    #[test]
    fn typed_views_of_every_element_type() {
        let tensor = Tensor::from_i64("x", &[3], vec![-1, 0, i64::MAX]).unwrap();
        assert_eq!(&*tensor.as_i64().unwrap(), &[-1, 0, i64::MAX]);
        let tensor = Tensor::from_u8("x", &[2], vec![7, 255]).unwrap();
        assert_eq!(&*tensor.as_u8().unwrap(), &[7, 255]);
        let tensor = Tensor::from_i8("x", &[1], vec![-128]).unwrap();
        assert_eq!(&*tensor.as_i8().unwrap(), &[-128]);
        let tensor = Tensor::from_u16("x", &[1], vec![65535]).unwrap();
        assert_eq!(tensor.data, vec![0xff, 0xff]);
        let tensor = Tensor::from_f64("x", &[], vec![0.5]).unwrap();
        assert_eq!(&*tensor.as_f64().unwrap(), &[0.5]);
    }

    #[test]
    fn views_borrow_aligned_data_and_copy_misaligned_data() {
        let values = [1.5f32, -4.0];
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(bytemuck::cast_slice(&values));
        // The allocation is at least 8-aligned, so offset 1 is misaligned
        // for f32 and offset 1 + 4 (after the copy below) is aligned.
        let misaligned = cast_or_copy::<f32>(&bytes[1..]);
        assert!(matches!(misaligned, Cow::Owned(_)));
        assert_eq!(&*misaligned, &values);
        let aligned: Vec<u8> = bytes[1..].to_vec();
        let aligned = cast_or_copy::<f32>(&aligned);
        assert!(matches!(aligned, Cow::Borrowed(_)));
        assert_eq!(&*aligned, &values);
    }

    #[test]
    fn dtype_mismatch_names_tensor_and_both_dtypes() {
        let tensor = Tensor::from_u8("pixels", &[1], vec![1]).unwrap();
        let err = tensor.as_f32().unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor `pixels`: expected dtype f32, got u8"
        );
        let err: PluginError = err.into();
        assert!(matches!(err, PluginError::InvalidInput(_)));
    }

    #[test]
    fn data_length_and_shape_errors() {
        let tensor = raw(Dtype::F32, &[2, 3], vec![0; 20]);
        assert_eq!(
            tensor.as_f32().unwrap_err().to_string(),
            "tensor `x`: shape [2, 3] of f32 needs 24 bytes of data, got 20"
        );
        let tensor = raw(Dtype::F32, &[2, -1], vec![]);
        assert_eq!(
            tensor.numel().unwrap_err().to_string(),
            "tensor `x`: bad shape [2, -1]: a dimension is negative"
        );
        let tensor = raw(Dtype::U8, &[i64::MAX, i64::MAX], vec![]);
        assert!(matches!(tensor.numel(), Err(TensorError::Shape { .. })));
        let err = Tensor::from_f32("y", &[2, 2], vec![1.0]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor `y`: shape [2, 2] needs 4 elements, got 1"
        );
        let tensor = Tensor::from_f32("z", &[4], vec![0.0; 4]).unwrap();
        assert_eq!(
            tensor.dims_n::<2>().unwrap_err().to_string(),
            "tensor `z`: expected rank 2, got shape [4] (rank 1)"
        );
    }

    #[test]
    fn scalar_has_one_element() {
        let tensor = Tensor::from_i32("s", &[], vec![42]).unwrap();
        assert_eq!(tensor.numel().unwrap(), 1);
        assert_eq!(tensor.rank(), 0);
        let tensor = Tensor::from_i32("e", &[0, 5], vec![]).unwrap();
        assert_eq!(tensor.numel().unwrap(), 0);
    }

    #[test]
    fn bool_tensors() {
        let tensor = Tensor::from_bool("b", &[3], vec![true, false, true]).unwrap();
        assert_eq!(tensor.dtype, Dtype::Bool);
        assert_eq!(tensor.data, vec![1, 0, 1]);
        assert_eq!(tensor.as_bool().unwrap(), vec![true, false, true]);
        assert_eq!(tensor.to_f32_lossy().unwrap(), vec![1.0, 0.0, 1.0]);
        assert!(tensor.as_u8().is_err());
    }

    #[test]
    fn byte_strings_round_trip_and_reject_garbage() {
        let tensor = Tensor::from_byte_strings("s", &[2], &["hi", ""]).unwrap();
        assert_eq!(tensor.data, vec![2, 0, 0, 0, b'h', b'i', 0, 0, 0, 0]);
        assert_eq!(
            tensor.as_byte_strings().unwrap(),
            vec![&b"hi"[..], &b""[..]]
        );
        tensor.validate().unwrap();

        let truncated = raw(Dtype::Bytes, &[1], vec![5, 0, 0, 0, b'a']);
        assert_eq!(
            truncated.as_byte_strings().unwrap_err().to_string(),
            "tensor `x`: malformed bytes data: element 0: length prefix says 5 bytes, 1 left"
        );
        let short_prefix = raw(Dtype::Bytes, &[1], vec![5, 0]);
        assert!(short_prefix.validate().is_err());
        let too_many = Tensor::from_byte_strings("s", &[2], &["a", "b"]).unwrap();
        let too_many = raw(Dtype::Bytes, &[1], too_many.data);
        assert_eq!(
            too_many.validate().unwrap_err().to_string(),
            "tensor `x`: shape [1] needs 1 elements, got 2"
        );
    }

    #[test]
    fn half_precision_widening() {
        // 1.0, -2.0, 65504 (max), smallest subnormal, +inf.
        let f16_bits: [u16; 5] = [0x3c00, 0xc000, 0x7bff, 0x0001, 0x7c00];
        let data = f16_bits
            .iter()
            .flat_map(|bits| bits.to_le_bytes())
            .collect();
        let tensor = raw(Dtype::F16, &[5], data);
        let values = tensor.to_f32_lossy().unwrap();
        assert_eq!(values[..3], [1.0, -2.0, 65504.0]);
        assert_eq!(values[3], 2f32.powi(-24));
        assert_eq!(values[4], f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());

        let bf16_bits: [u16; 2] = [0x3f80, 0xc040];
        let data = bf16_bits
            .iter()
            .flat_map(|bits| bits.to_le_bytes())
            .collect();
        let tensor = raw(Dtype::Bf16, &[2], data);
        assert_eq!(tensor.to_f32_lossy().unwrap(), vec![1.0, -3.0]);
    }

    #[test]
    fn new_validates() {
        assert!(Tensor::new("x", Dtype::I32, &[2], vec![0; 8]).is_ok());
        assert!(Tensor::new("x", Dtype::I32, &[2], vec![0; 7]).is_err());
        assert!(Tensor::new("x", Dtype::Bytes, &[1], vec![0; 4]).is_ok());
    }
}
