//! Tensors on the command line: `NAME=@FILE.npy` and `NAME=JSON` inputs,
//! checked against the model's declared inputs, and outputs printed inline
//! when small or written as `.npy`.

use std::path::Path;

use serde_json::{Value, json};

use super::{CliError, CliResult, Output};
use plinth_proto::pb;

/// The element types the command line reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    Bool,
    U8,
    I8,
    I16,
    I32,
    I64,
    U16,
    U32,
    U64,
    F16,
    Bf16,
    F32,
    F64,
    Bytes,
}

impl Elem {
    fn of(dtype: i32) -> Option<Elem> {
        use pb::DataType as D;
        Some(match D::try_from(dtype).ok()? {
            D::Bool => Elem::Bool,
            D::Uint8 => Elem::U8,
            D::Int8 => Elem::I8,
            D::Int16 => Elem::I16,
            D::Int32 => Elem::I32,
            D::Int64 => Elem::I64,
            D::Uint16 => Elem::U16,
            D::Uint32 => Elem::U32,
            D::Uint64 => Elem::U64,
            D::Float16 => Elem::F16,
            D::Bfloat16 => Elem::Bf16,
            D::Float32 => Elem::F32,
            D::Float64 => Elem::F64,
            D::Bytes => Elem::Bytes,
            D::Unspecified => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Elem::Bool => "bool",
            Elem::U8 => "u8",
            Elem::I8 => "i8",
            Elem::I16 => "i16",
            Elem::I32 => "i32",
            Elem::I64 => "i64",
            Elem::U16 => "u16",
            Elem::U32 => "u32",
            Elem::U64 => "u64",
            Elem::F16 => "f16",
            Elem::Bf16 => "bf16",
            Elem::F32 => "f32",
            Elem::F64 => "f64",
            Elem::Bytes => "bytes",
        }
    }

    fn size(self) -> usize {
        match self {
            Elem::Bool | Elem::U8 | Elem::I8 => 1,
            Elem::I16 | Elem::U16 | Elem::F16 | Elem::Bf16 => 2,
            Elem::I32 | Elem::U32 | Elem::F32 => 4,
            Elem::I64 | Elem::U64 | Elem::F64 => 8,
            Elem::Bytes => 0,
        }
    }
}

/// One `NAME=...` argument as a tensor of the model's declared input.
pub fn parse_input(arg: &str, declared: &[pb::TensorSpec]) -> CliResult<pb::Tensor> {
    let Some((name, value)) = arg.split_once('=') else {
        return Err(CliError(format!(
            "--input {arg:?}: expected NAME=@FILE.npy or NAME=JSON"
        )));
    };
    let Some(spec) = declared.iter().find(|s| s.name == name) else {
        let names: Vec<&str> = declared.iter().map(|s| s.name.as_str()).collect();
        return Err(CliError(format!(
            "--input {name}: the model has no input {name:?} (its inputs: {})",
            names.join(", ")
        )));
    };
    if let Some(file) = value.strip_prefix('@') {
        return read_npy(name, Path::new(file));
    }
    let elem = Elem::of(spec.dtype)
        .ok_or_else(|| CliError(format!("--input {name}: the model declares no dtype")))?;
    let json: Value = serde_json::from_str(value)
        .map_err(|err| CliError(format!("--input {name}: not JSON: {err}")))?;
    let mut shape = Vec::new();
    let mut flat = Vec::new();
    flatten(&json, 0, &mut shape, &mut flat)
        .map_err(|why| CliError(format!("--input {name}: {why}")))?;
    let data = encode(elem, &flat).map_err(|why| CliError(format!("--input {name}: {why}")))?;
    Ok(pb::Tensor {
        name: name.to_owned(),
        dtype: spec.dtype,
        shape,
        data: data.into(),
    })
}

/// Nested arrays into a shape and the leaves, checking that they are
/// rectangular.
fn flatten(
    value: &Value,
    depth: usize,
    shape: &mut Vec<i64>,
    out: &mut Vec<Value>,
) -> Result<(), String> {
    match value {
        Value::Array(items) => {
            let len = items.len() as i64;
            match shape.get(depth) {
                None => shape.push(len),
                Some(&want) if want != len => {
                    return Err(format!(
                        "ragged array: dimension {depth} has {want} elements in one place and {len} in another"
                    ));
                }
                Some(_) => {}
            }
            for item in items {
                flatten(item, depth + 1, shape, out)?;
            }
            Ok(())
        }
        leaf => {
            if depth < shape.len() {
                return Err(format!(
                    "ragged array: a scalar where dimension {depth} should be"
                ));
            }
            out.push(leaf.clone());
            Ok(())
        }
    }
}

fn encode(elem: Elem, values: &[Value]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(values.len() * elem.size().max(4));
    for (i, v) in values.iter().enumerate() {
        let bad = || format!("element {i} ({v}) is not a {}", elem.name());
        let int = || v.as_i64().ok_or_else(bad);
        let uint = || v.as_u64().ok_or_else(bad);
        let float = || v.as_f64().ok_or_else(bad);
        let range = |ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "element {i} ({v}) is out of range for {}",
                    elem.name()
                ))
            }
        };
        match elem {
            Elem::Bool => out.push(u8::from(v.as_bool().ok_or_else(bad)?)),
            Elem::U8 => {
                let x = uint()?;
                range(x <= u8::MAX.into())?;
                out.push(x as u8)
            }
            Elem::I8 => {
                let x = int()?;
                range(i8::try_from(x).is_ok())?;
                out.extend((x as i8).to_le_bytes())
            }
            Elem::I16 => {
                let x = int()?;
                range(i16::try_from(x).is_ok())?;
                out.extend((x as i16).to_le_bytes())
            }
            Elem::I32 => {
                let x = int()?;
                range(i32::try_from(x).is_ok())?;
                out.extend((x as i32).to_le_bytes())
            }
            Elem::I64 => out.extend(int()?.to_le_bytes()),
            Elem::U16 => {
                let x = uint()?;
                range(u16::try_from(x).is_ok())?;
                out.extend((x as u16).to_le_bytes())
            }
            Elem::U32 => {
                let x = uint()?;
                range(u32::try_from(x).is_ok())?;
                out.extend((x as u32).to_le_bytes())
            }
            Elem::U64 => out.extend(uint()?.to_le_bytes()),
            Elem::F16 => out.extend(half::f16::from_f64(float()?).to_le_bytes()),
            Elem::Bf16 => out.extend(half::bf16::from_f64(float()?).to_le_bytes()),
            Elem::F32 => out.extend((float()? as f32).to_le_bytes()),
            Elem::F64 => out.extend(float()?.to_le_bytes()),
            Elem::Bytes => {
                let s = v.as_str().ok_or_else(bad)?;
                out.extend((s.len() as u32).to_le_bytes());
                out.extend(s.as_bytes());
            }
        }
    }
    Ok(out)
}

/// The values of a tensor as JSON numbers (or strings, for BYTES).
fn values(tensor: &pb::Tensor) -> CliResult<(Elem, Vec<Value>)> {
    let elem = Elem::of(tensor.dtype)
        .ok_or_else(|| CliError(format!("output {}: no dtype", tensor.name)))?;
    let d = &tensor.data[..];
    let chunks = |n: usize| d.chunks_exact(n);
    let vals: Vec<Value> = match elem {
        Elem::Bool => d.iter().map(|b| json!(*b != 0)).collect(),
        Elem::U8 => d.iter().map(|b| json!(b)).collect(),
        Elem::I8 => d.iter().map(|b| json!(*b as i8)).collect(),
        Elem::I16 => chunks(2)
            .map(|c| json!(i16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Elem::U16 => chunks(2)
            .map(|c| json!(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Elem::F16 => chunks(2)
            .map(|c| json!(half::f16::from_le_bytes([c[0], c[1]]).to_f32()))
            .collect(),
        Elem::Bf16 => chunks(2)
            .map(|c| json!(half::bf16::from_le_bytes([c[0], c[1]]).to_f32()))
            .collect(),
        Elem::I32 => chunks(4)
            .map(|c| json!(i32::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        Elem::U32 => chunks(4)
            .map(|c| json!(u32::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        Elem::F32 => chunks(4)
            .map(|c| json!(f32::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        Elem::I64 => chunks(8)
            .map(|c| json!(i64::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        Elem::U64 => chunks(8)
            .map(|c| json!(u64::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        Elem::F64 => chunks(8)
            .map(|c| json!(f64::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        Elem::Bytes => {
            let mut out = Vec::new();
            let mut rest = d;
            while rest.len() >= 4 {
                let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
                let Some(item) = rest.get(4..4 + len) else {
                    break;
                };
                out.push(json!(String::from_utf8_lossy(item)));
                rest = &rest[4 + len..];
            }
            out
        }
    };
    Ok((elem, vals))
}

/// Leaves back into nested arrays of `shape`.
fn nest(shape: &[i64], leaves: &[Value]) -> Value {
    match shape.split_first() {
        None => leaves.first().cloned().unwrap_or(Value::Null),
        Some((&n, rest)) => {
            let n = n.max(0) as usize;
            let step = leaves.len().checked_div(n).unwrap_or(0);
            Value::Array(
                (0..n)
                    .map(|i| nest(rest, &leaves[i * step..(i + 1) * step]))
                    .collect(),
            )
        }
    }
}

/// Outputs of at most this many elements are printed in full.
const INLINE: usize = 64;

/// One output for the terminal or as JSON.
pub fn describe(tensor: &pb::Tensor, written: Option<&Path>, output: Output) -> CliResult<Value> {
    let (elem, vals) = values(tensor)?;
    let shape = &tensor.shape;
    let inline = vals.len() <= INLINE;
    Ok(match output {
        Output::Json => {
            let mut row = json!({"name": tensor.name, "dtype": elem.name(), "shape": shape});
            if inline {
                row["data"] = nest(shape, &vals);
            }
            if let Some(path) = written {
                row["file"] = json!(path.display().to_string());
            }
            row
        }
        Output::Table => {
            let shown = if inline {
                nest(shape, &vals).to_string()
            } else {
                let head: Vec<String> = vals.iter().take(8).map(Value::to_string).collect();
                format!("[{}, ...] ({} elements)", head.join(", "), vals.len())
            };
            let file = match written {
                Some(path) => format!(" -> {}", path.display()),
                None if !inline => " (use --output-dir to write it all as .npy)".to_owned(),
                None => String::new(),
            };
            json!(format!(
                "{} {} {:?} = {shown}{file}",
                tensor.name,
                elem.name(),
                shape
            ))
        }
    })
}

fn read_npy(name: &str, path: &Path) -> CliResult<pb::Tensor> {
    let bad = |err: &dyn std::fmt::Display| {
        CliError(format!("--input {name}: {}: {err}", path.display()))
    };
    let bytes = std::fs::read(path).map_err(|e| bad(&e))?;
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| bad(&e))?;
    let shape: Vec<i64> = npy.shape().iter().map(|&d| d as i64).collect();
    if npy.order() == npyz::Order::Fortran {
        return Err(bad(
            &"Fortran-ordered arrays are not supported; save it C-ordered",
        ));
    }
    let descr = match npy.dtype() {
        npyz::DType::Plain(ty) => ty.to_string(),
        other => return Err(bad(&format!("unsupported dtype {other:?}"))),
    };
    use pb::DataType as D;
    macro_rules! read {
        ($t:ty, $dtype:expr) => {{
            let data: Vec<$t> = npy.into_vec().map_err(|e| bad(&e))?;
            (
                data.iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
                $dtype,
            )
        }};
    }
    let (data, dtype) = match &descr[1..] {
        "f4" => read!(f32, D::Float32),
        "f8" => read!(f64, D::Float64),
        "i8" => read!(i64, D::Int64),
        "i4" => read!(i32, D::Int32),
        "i2" => read!(i16, D::Int16),
        "i1" => read!(i8, D::Int8),
        "u1" => read!(u8, D::Uint8),
        "u2" => read!(u16, D::Uint16),
        "u4" => read!(u32, D::Uint32),
        "u8" => read!(u64, D::Uint64),
        "b1" => {
            let data: Vec<bool> = npy.into_vec().map_err(|e| bad(&e))?;
            (data.into_iter().map(u8::from).collect(), D::Bool)
        }
        _ => return Err(bad(&format!("unsupported dtype {descr}"))),
    };
    Ok(pb::Tensor {
        name: name.to_owned(),
        dtype: dtype as i32,
        shape,
        data: data.into(),
    })
}

/// Writes a tensor as `.npy` (f16 and bf16 widened to f32; BYTES refused).
pub fn write_npy(tensor: &pb::Tensor, path: &Path) -> CliResult {
    use npyz::WriterBuilder;
    let (elem, vals) = values(tensor)?;
    let bad = |err: &dyn std::fmt::Display| CliError(format!("{}: {err}", path.display()));
    let shape: Vec<u64> = tensor.shape.iter().map(|&d| d.max(0) as u64).collect();
    let file = std::fs::File::create(path).map_err(|e| bad(&e))?;
    let writer = std::io::BufWriter::new(file);
    macro_rules! write {
        ($t:ty, $get:expr) => {{
            let mut w = npyz::WriteOptions::new()
                .default_dtype()
                .shape(&shape)
                .writer(writer)
                .begin_nd()
                .map_err(|e| bad(&e))?;
            for v in &vals {
                let x: $t = $get(v);
                w.push(&x).map_err(|e| bad(&e))?;
            }
            w.finish().map_err(|e| bad(&e))?;
        }};
    }
    match elem {
        Elem::Bool => write!(bool, |v: &Value| v.as_bool().unwrap_or_default()),
        Elem::U8 => write!(u8, |v: &Value| v.as_u64().unwrap_or_default() as u8),
        Elem::I8 => write!(i8, |v: &Value| v.as_i64().unwrap_or_default() as i8),
        Elem::I16 => write!(i16, |v: &Value| v.as_i64().unwrap_or_default() as i16),
        Elem::U16 => write!(u16, |v: &Value| v.as_u64().unwrap_or_default() as u16),
        Elem::I32 => write!(i32, |v: &Value| v.as_i64().unwrap_or_default() as i32),
        Elem::U32 => write!(u32, |v: &Value| v.as_u64().unwrap_or_default() as u32),
        Elem::I64 => write!(i64, |v: &Value| v.as_i64().unwrap_or_default()),
        Elem::U64 => write!(u64, |v: &Value| v.as_u64().unwrap_or_default()),
        Elem::F16 | Elem::Bf16 | Elem::F32 => {
            write!(f32, |v: &Value| v.as_f64().unwrap_or_default() as f32)
        }
        Elem::F64 => write!(f64, |v: &Value| v.as_f64().unwrap_or_default()),
        Elem::Bytes => return Err(bad(&"BYTES outputs cannot be written as .npy")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dtype: pb::DataType) -> pb::TensorSpec {
        pb::TensorSpec {
            name: name.into(),
            dtype: dtype as i32,
            shape: vec![-1],
        }
    }

    #[test]
    fn json_inputs_become_tensors_of_the_declared_dtype_or_a_precise_error() {
        let declared = [
            spec("x", pb::DataType::Float32),
            spec("n", pb::DataType::Int8),
        ];
        let t = parse_input("x=[[1,2],[3,4.5]]", &declared).unwrap();
        assert_eq!(t.shape, [2, 2]);
        assert_eq!(t.data.len(), 16);
        let cases = [
            ("y=[1]", "no input \"y\" (its inputs: x, n)"),
            ("x", "expected NAME=@FILE.npy or NAME=JSON"),
            ("x=[[1,2],[3]]", "ragged array"),
            ("x=[1,\"a\"]", "element 1 (\"a\") is not a f32"),
            ("n=[300]", "element 0 (300) is out of range for i8"),
            ("x=[1,", "not JSON"),
        ];
        for (arg, want) in cases {
            let err = parse_input(arg, &declared).unwrap_err().0;
            assert!(err.contains(want), "{arg}: {err}");
        }
    }

    #[test]
    fn npy_round_trips_through_write_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let declared = [spec("x", pb::DataType::Float32)];
        let t = parse_input("x=[[1.5,-2],[3,4]]", &declared).unwrap();
        let path = dir.path().join("x.npy");
        write_npy(&t, &path).unwrap();
        let back = parse_input(&format!("x=@{}", path.display()), &declared).unwrap();
        assert_eq!((back.shape, back.data), (t.shape, t.data));
    }
}
