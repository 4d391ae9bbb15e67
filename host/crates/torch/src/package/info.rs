//! What a package holds, read from its zip without loading it: the device
//! and CPU instruction sets of its metadata, the libtorch functions its
//! library calls, the threads its kernels were compiled for, and each
//! input's dtype and dimension ranges (parsed from the input checks
//! AOTInductor generates into its wrapper source); and the checks of all
//! of it against the host and the model's config.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::io::Read;
use std::path::Path;

use plinth_core::config::{DeviceSpec, ModelConfig};
use plinth_core::tensor::{DType, shape_str};

use crate::LIBTORCH_VERSION;

/// One dimension of an input as the package was compiled for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// A static size.
    Fixed(i64),
    /// A dynamic size within `min..=max` (`max` `None`: unbounded).
    Range { min: i64, max: Option<i64> },
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Range {
                min,
                max: Some(max),
            } => write!(f, "{min}..={max}"),
            Dim::Range { min, max: None } => write!(f, "{min}.."),
        }
    }
}

/// One input as the package's generated checks describe it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputSignature {
    pub dtype: Option<DType>,
    /// By dimension index; a dimension no check mentions is absent.
    pub dims: BTreeMap<usize, Dim>,
}

impl InputSignature {
    fn rank(&self) -> Option<usize> {
        self.dims.keys().next_back().map(|last| last + 1)
    }

    /// The shape as the package takes it, e.g. `[1..=32, 8]` (`?` for a
    /// dimension no check names).
    pub fn shape(&self) -> String {
        let Some(rank) = self.rank() else {
            return "[]".to_owned();
        };
        let dims: Vec<String> = (0..rank)
            .map(|d| self.dims.get(&d).map_or("?".to_owned(), Dim::to_string))
            .collect();
        format!("[{}]", dims.join(", "))
    }
}

/// What a package holds, read from its zip without loading anything.
#[derive(Debug, Clone)]
pub struct PackageInfo {
    /// The model's name inside the package (`data/aotinductor/<name>/`).
    pub model_name: String,
    /// `cpu` or `cuda`: where the compiled code runs.
    pub device: String,
    /// The vector instruction sets the CPU code was compiled for
    /// (`AOTI_CPU_ISA`, e.g. `AVX2`, `AVX512 AVX512_VNNI`).
    pub cpu_isa: Vec<String>,
    /// The compiled library's entry in the zip.
    pub library: String,
    /// The library and any weights files: what a load maps or reads into
    /// memory, once however many runners it has.
    pub bytes: u64,
    /// The libtorch functions (`aoti_*`) the library calls.
    pub needed_symbols: Vec<String>,
    /// The inputs, in order, from the generated source; `None` when the
    /// package carries no wrapper source to read them from.
    pub inputs: Option<Vec<InputSignature>>,
    /// The threads its CPU kernels' parallel regions run on, fixed when it
    /// was compiled (`#pragma omp parallel num_threads(N)`, inductor's
    /// `cpp.threads`, by default the cores of the machine that exported
    /// it): the most any region asks for; `None` with no parallel region.
    /// The executor's intra-op setting does not change it.
    pub compiled_threads: Option<usize>,
}

fn zip_error(err: zip::result::ZipError) -> String {
    format!("not a readable .pt2 package (a zip archive; truncated or not a package?): {err}")
}

impl PackageInfo {
    /// Reads the package at `path`. Blocking. Fails, naming what is
    /// missing, for a file that is not a zip, a truncated one, or a package
    /// without its compiled library.
    pub fn read(path: &Path) -> Result<PackageInfo, String> {
        let file = std::fs::File::open(path).map_err(|err| format!("cannot read: {err}"))?;
        PackageInfo::from_reader(std::io::BufReader::new(file))
    }

    /// [`PackageInfo::read`] from any seekable reader.
    pub fn from_reader(reader: impl Read + std::io::Seek) -> Result<PackageInfo, String> {
        let mut zip = zip::ZipArchive::new(reader).map_err(zip_error)?;
        let names: Vec<String> = zip.file_names().map(str::to_owned).collect();
        // `<archive>/data/aotinductor/<model>/<file>`
        let mut models: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for name in &names {
            let parts: Vec<&str> = name.split('/').collect();
            if let [_, "data", "aotinductor", model, file] = parts.as_slice()
                && !file.is_empty()
            {
                models
                    .entry((*model).to_owned())
                    .or_default()
                    .push(name.clone());
            }
        }
        let model_name = if models.contains_key("model") {
            "model".to_owned()
        } else {
            match models.keys().next() {
                Some(only) if models.len() == 1 => only.clone(),
                Some(_) => {
                    let found: Vec<&str> = models.keys().map(String::as_str).collect();
                    return Err(format!(
                        "the package holds several models ({}) and none is named 'model'",
                        found.join(", ")
                    ));
                }
                None => {
                    return Err(
                        "not an AOTInductor package: no data/aotinductor/<model>/ in the zip (was it written by torch._inductor.aoti_compile_and_package?)"
                            .to_owned(),
                    );
                }
            }
        };
        let entries = &models[&model_name];
        let Some(library) = entries.iter().find(|name| name.ends_with(".so")).cloned() else {
            return Err(format!(
                "the package holds no compiled library (data/aotinductor/{model_name}/*.so): it was packaged without it"
            ));
        };
        let mut bytes = 0u64;
        for name in entries {
            let sources = [".cpp", ".h", ".json", ".py"];
            if !sources.iter().any(|ext| name.ends_with(ext)) {
                bytes += zip.by_name(name).map_err(zip_error)?.size();
            }
        }
        for name in &names {
            if name.split('/').nth(1) == Some("data") && name.contains("/constants/") {
                bytes += zip.by_name(name).map_err(zip_error)?.size();
            }
        }
        let read = |zip: &mut zip::ZipArchive<_>, name: &str| -> Result<Vec<u8>, String> {
            let mut entry = zip.by_name(name).map_err(zip_error)?;
            let mut data = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
            entry
                .read_to_end(&mut data)
                .map_err(|err| format!("reading {name} from the package: {err}"))?;
            Ok(data)
        };
        // The wrapper's metadata, else any.
        let metadata_name = entries
            .iter()
            .find(|name| name.ends_with(".wrapper_metadata.json"))
            .or_else(|| entries.iter().find(|name| name.ends_with("_metadata.json")));
        let metadata: serde_json::Map<String, serde_json::Value> = match metadata_name {
            Some(name) => serde_json::from_slice(&read(&mut zip, name)?)
                .map_err(|err| format!("{name}: not JSON metadata: {err}"))?,
            None => serde_json::Map::new(),
        };
        let text = |key: &str| metadata.get(key).and_then(|v| v.as_str()).unwrap_or("");
        let device = match text("AOTI_DEVICE_KEY") {
            "" => "cpu".to_owned(),
            key => key.to_owned(),
        };
        let cpu_isa = text("AOTI_CPU_ISA")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let needed_symbols = needed_symbols(&read(&mut zip, &library)?)
            .map_err(|err| format!("{library}: not a shared library: {err}"))?;
        // Every generated source once: the kernels' thread counts, and the
        // wrapper's input checks.
        let mut compiled_threads: Option<usize> = None;
        let mut inputs = None;
        for name in entries.iter().filter(|name| name.ends_with(".cpp")) {
            let source = String::from_utf8_lossy(&read(&mut zip, name)?).into_owned();
            if let Some(n) = parallel_threads(&source) {
                compiled_threads = Some(compiled_threads.map_or(n, |m| m.max(n)));
            }
            if inputs.is_none() && name.ends_with(".wrapper.cpp") {
                inputs = Some(parse_input_checks(&source));
            }
        }
        Ok(PackageInfo {
            model_name,
            device,
            cpu_isa,
            library,
            bytes,
            needed_symbols,
            inputs,
            compiled_threads,
        })
    }

    /// Refuses a package this host cannot run on `device`: compiled for
    /// another device, for CPU instructions this machine lacks, or calling
    /// libtorch functions this libtorch does not have (another torch
    /// version).
    /// [`Self::check_host`] on the config's device, then
    /// [`Self::check_config`]: everything checked before a load.
    pub fn check(&self, config: &ModelConfig) -> Result<(), String> {
        self.check_host(config.device)?;
        self.check_config(config)
    }

    pub fn check_host(&self, device: DeviceSpec) -> Result<(), String> {
        match (self.device.as_str(), device) {
            ("cpu", DeviceSpec::Cpu) | ("cuda", DeviceSpec::Cuda(_)) => {}
            ("cuda", DeviceSpec::Cpu) => {
                let why = crate::check_device(DeviceSpec::Cuda(0))
                    .err()
                    .map(|why| format!(" ({why})"))
                    .unwrap_or_default();
                return Err(format!(
                    "the package is compiled for CUDA, and the config runs the model on the CPU{why}; set device = \"cuda\" on a host with a GPU, or export the model for the CPU"
                ));
            }
            (compiled, wanted) => {
                return Err(format!(
                    "the package is compiled for device '{compiled}', the config runs the model on {wanted}"
                ));
            }
        }
        if self.device == "cpu" {
            let flags = cpu_flags();
            for isa in &self.cpu_isa {
                let Some(needs) = isa_flags(isa) else {
                    tracing::warn!(isa = %isa, "unknown CPU instruction set in a package's metadata; not checked");
                    continue;
                };
                let missing: Vec<&str> = needs
                    .iter()
                    .copied()
                    .filter(|flag| !flags.iter().any(|have| have == flag))
                    .collect();
                if !missing.is_empty() {
                    return Err(format!(
                        "the package is compiled for {isa} and this CPU lacks {}; export it on (or for) a machine like this one",
                        missing.join(", ")
                    ));
                }
            }
        }
        let missing: Vec<&str> = self
            .needed_symbols
            .iter()
            .map(String::as_str)
            .filter(|name| !process_has_symbol(name))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "the package's library calls {} that libtorch {LIBTORCH_VERSION} does not have: it was built by another torch version (export it with torch {LIBTORCH_VERSION})",
                list_some(&missing)
            ));
        }
        Ok(())
    }

    /// Checks the package's inputs against the config: their number, each
    /// dtype and rank, each static size, and the batch dimension's exported
    /// range against `max_batch_size`.
    pub fn check_config(&self, config: &ModelConfig) -> Result<(), String> {
        let Some(inputs) = &self.inputs else {
            return Err(format!(
                "the package holds no wrapper source (data/aotinductor/{}/*.wrapper.cpp) to read its inputs from, so they cannot be checked against the config",
                self.model_name
            ));
        };
        if inputs.len() != config.inputs.len() {
            return Err(format!(
                "the config declares {} input(s), the package takes {}",
                config.inputs.len(),
                inputs.len()
            ));
        }
        for (idx, (spec, found)) in config.inputs.iter().zip(inputs).enumerate() {
            let name = &spec.name;
            if let Some(dtype) = found.dtype
                && dtype != spec.dtype
            {
                return Err(format!(
                    "input '{name}' (#{idx}): the config declares dtype {}, the package takes {dtype}",
                    spec.dtype
                ));
            }
            let want = config.full_shape(spec);
            if let Some(rank) = found.rank()
                && rank != want.len()
            {
                return Err(format!(
                    "input '{name}' (#{idx}): the config declares shape {} (rank {}), the package takes {} (rank {rank})",
                    shape_str(&want),
                    want.len(),
                    found.shape()
                ));
            }
            for (dim, &size) in want.iter().enumerate() {
                let batch = config.max_batch_size > 0 && dim == 0;
                let got = found.dims.get(&dim).copied();
                let mismatch = |what: String| {
                    Err(format!(
                        "input '{name}' (#{idx}): {what} (config shape {}, package shape {})",
                        shape_str(&want),
                        found.shape()
                    ))
                };
                match (batch, size, got) {
                    (_, _, None) => {}
                    (true, _, Some(Dim::Fixed(n))) => {
                        return mismatch(format!(
                            "max_batch_size = {} needs a dynamic batch dimension, the package fixes dim 0 at {n} (export with dynamic_shapes={{0: Dim(\"batch\", max=...)}})",
                            config.max_batch_size
                        ));
                    }
                    (true, _, Some(Dim::Range { min, max })) => {
                        if let Some(max) = max
                            && (max as u64) < config.max_batch_size as u64
                        {
                            return mismatch(format!(
                                "max_batch_size = {}, but the package was compiled for batches of at most {max} (its generated input checks; inductor can narrow the range given to torch.export)",
                                config.max_batch_size
                            ));
                        }
                        if min > 1 {
                            tracing::info!(input = %name, min, "the package was compiled for batches of at least {min}; smaller ones are padded up to it and their outputs cut back");
                        }
                    }
                    (false, -1, Some(Dim::Fixed(n))) => {
                        return mismatch(format!(
                            "dim {dim} is variable (-1) in the config, the package fixes it at {n}"
                        ));
                    }
                    (false, -1, Some(Dim::Range { .. })) => {}
                    (false, want, Some(Dim::Fixed(n))) if want != n => {
                        return mismatch(format!(
                            "dim {dim}: the config declares {want}, the package takes {n}"
                        ));
                    }
                    (false, want, Some(Dim::Range { min, max }))
                        if want < min || max.is_some_and(|max| want > max) =>
                    {
                        return mismatch(format!(
                            "dim {dim}: the config declares {want}, outside the package's exported range {}",
                            Dim::Range { min, max }
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

fn list_some(names: &[&str]) -> String {
    const SHOWN: usize = 3;
    let mut text = names
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

/// The CPU flags of `/proc/cpuinfo` (empty when unreadable).
fn cpu_flags() -> Vec<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("flags"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, flags)| flags.split_whitespace().map(str::to_owned).collect())
        })
        .unwrap_or_default()
}

/// The `/proc/cpuinfo` flags an inductor ISA name needs.
fn isa_flags(isa: &str) -> Option<&'static [&'static str]> {
    Some(match isa {
        "AVX2" => &["avx2", "fma"],
        "AVX512" => &["avx512f", "avx512dq", "avx512vl", "avx512bw"],
        "AVX512_VNNI" => &["avx512_vnni"],
        "AVX512_BF16" => &["avx512_bf16"],
        "AMX_TILE" | "AMX" => &["amx_tile"],
        "AMX_BF16" => &["amx_bf16"],
        "AMX_INT8" => &["amx_int8"],
        "AVX512_FP16" => &["avx512_fp16"],
        "NEON" | "SVE" | "SVE256" | "VSX" | "ZVECTOR" | "RVV" | "DEFAULT" => {
            return (std::env::consts::ARCH != "x86_64").then_some(&[]);
        }
        _ => return None,
    })
}

/// The undefined `aoti_*` symbols of an ELF shared library: the libtorch C
/// functions the compiled model calls.
fn needed_symbols(library: &[u8]) -> Result<Vec<String>, object::Error> {
    use object::{Object, ObjectSymbol};
    let file = object::File::parse(library)?;
    let mut names: Vec<String> = file
        .dynamic_symbols()
        .filter(|symbol| symbol.is_undefined())
        .filter_map(|symbol| symbol.name().ok())
        .filter(|name| name.starts_with("aoti_"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Whether `name` resolves in this process's global symbol scope (where
/// libtorch is).
fn process_has_symbol(name: &str) -> bool {
    let this = libloading::os::unix::Library::this();
    // SAFETY: the symbol is only looked up, never called or read; the
    // pointer type is irrelevant.
    unsafe { this.get::<*const c_void>(name.as_bytes()) }.is_ok()
}

/// The most threads any `#pragma omp parallel num_threads(N)` of `source`
/// asks for.
fn parallel_threads(source: &str) -> Option<usize> {
    const MARK: &str = "num_threads(";
    source
        .match_indices(MARK)
        .filter_map(|(at, _)| {
            let rest = &source[at + MARK.len()..];
            rest[..rest.find(')')?].trim().parse::<usize>().ok()
        })
        .max()
}

/// The inputs the generated `check_input_N` functions describe, in order:
/// each error message they would throw names the input, the dimension and
/// the expected value, e.g. `"input_handles[0]: dim value is too large at 0,
/// " << "expected to be <= 32, "`.
pub fn parse_input_checks(source: &str) -> Vec<InputSignature> {
    let mut inputs: BTreeMap<usize, InputSignature> = BTreeMap::new();
    let mut rest = source;
    const MARK: &str = "\"input_handles[";
    while let Some(at) = rest.find(MARK) {
        rest = &rest[at + MARK.len()..];
        let Some(close) = rest.find(']') else { break };
        let Ok(index) = rest[..close].parse::<usize>() else {
            continue;
        };
        // The message runs to the `throw`.
        let end = rest.find("throw").unwrap_or(rest.len());
        let message = &rest[close..end];
        let input = inputs.entry(index).or_default();
        let after = |text: &str, key: &str| -> Option<i64> {
            let start = text.find(key)? + key.len();
            let digits: String = text[start..]
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '-')
                .collect();
            digits.parse().ok()
        };
        let dim_at = |key: &str| -> Option<usize> {
            after(message, key).and_then(|d| usize::try_from(d).ok())
        };
        if message.contains("unmatched dtype") {
            input.dtype = message
                .find("(at::k")
                .map(|i| &message[i + 6..])
                .and_then(|t| t.split(')').next())
                .and_then(dtype_of_aten_name);
        } else if let Some(dim) = dim_at("unmatched dim value at ") {
            if let Some(n) = after(message, "expected: ") {
                input.dims.insert(dim, Dim::Fixed(n));
            }
        } else if let Some(dim) = dim_at("dim value is too small at ") {
            if let Some(n) = after(message, "expected it to be >= ") {
                match input
                    .dims
                    .entry(dim)
                    .or_insert(Dim::Range { min: 0, max: None })
                {
                    Dim::Range { min, .. } => *min = n,
                    Dim::Fixed(_) => {}
                }
            }
        } else if let Some(dim) = dim_at("dim value is too large at ")
            && let Some(n) = after(message, "expected to be <= ")
        {
            match input
                .dims
                .entry(dim)
                .or_insert(Dim::Range { min: 0, max: None })
            {
                Dim::Range { max, .. } => *max = Some(n),
                Dim::Fixed(_) => {}
            }
        }
        rest = &rest[end..];
    }
    // Inputs no check mentions (possible for an input with no constraint)
    // still count: fill the gaps up to the highest index.
    let count = inputs.keys().next_back().map_or(0, |last| last + 1);
    (0..count)
        .map(|i| inputs.remove(&i).unwrap_or_default())
        .collect()
}

fn dtype_of_aten_name(name: &str) -> Option<DType> {
    Some(match name {
        "Bool" => DType::Bool,
        "Byte" => DType::U8,
        "Char" => DType::I8,
        "Short" => DType::I16,
        "Int" => DType::I32,
        "Long" => DType::I64,
        "Half" => DType::F16,
        "BFloat16" => DType::BF16,
        "Float" => DType::F32,
        "Double" => DType::F64,
        "UInt16" => DType::U16,
        "UInt32" => DType::U32,
        "UInt64" => DType::U64,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECKS: &str = r#"
    if (arg0_1_expected_dtype != arg0_1_dtype) {
        ss << "input_handles[0]: unmatched dtype, "
           << "expected: " << arg0_1_expected_dtype << "(at::kHalf), "
           << "but got: " << arg0_1_dtype << "\n";
        throw std::runtime_error(ss.str());
    }
    if (arg0_1_size[0] < 1) {
        ss << "input_handles[0]: dim value is too small at 0, "
           << "expected it to be >= 1, " << "but got: "
        throw std::runtime_error(ss.str());
    }
    if (arg0_1_size[0] > 32) {
        ss << "input_handles[0]: dim value is too large at 0, "
           << "expected to be <= 32, " << "but got: "
        throw std::runtime_error(ss.str());
    }
    if (8 != arg0_1_size[1]) {
        ss << "input_handles[0]: unmatched dim value at 1, "
           << "expected: 8, " << "but got: " << arg0_1_size[1]
        throw std::runtime_error(ss.str());
    }
    if (arg1_1_expected_dtype != arg1_1_dtype) {
        ss << "input_handles[1]: unmatched dtype, "
           << "expected: " << arg1_1_expected_dtype << "(at::kLong), "
        throw std::runtime_error(ss.str());
    }
    "#;

    #[test]
    fn the_generated_input_checks_give_dtypes_and_ranges() {
        let inputs = parse_input_checks(CHECKS);
        assert_eq!(inputs.len(), 2);
        assert_eq!(inputs[0].dtype, Some(DType::F16));
        assert_eq!(
            inputs[0].dims[&0],
            Dim::Range {
                min: 1,
                max: Some(32)
            }
        );
        assert_eq!(inputs[0].dims[&1], Dim::Fixed(8));
        assert_eq!(inputs[0].shape(), "[1..=32, 8]");
        assert_eq!(inputs[1].dtype, Some(DType::I64));
        assert!(inputs[1].dims.is_empty());
        assert!(parse_input_checks("no checks here").is_empty());
        let kernel =
            "#pragma omp parallel num_threads(2)\n{}\n#pragma omp parallel num_threads(8)\n";
        assert_eq!(parallel_threads(kernel), Some(8));
        assert_eq!(parallel_threads("#pragma omp simd\n"), None);
    }

    #[test]
    fn not_a_package_is_named_for_what_it_is() {
        let err =
            PackageInfo::from_reader(std::io::Cursor::new(b"not a zip".to_vec())).unwrap_err();
        assert!(err.starts_with("not a readable .pt2 package"), "{err}");
        // A zip, but not of a package.
        let mut buffer = std::io::Cursor::new(Vec::new());
        {
            let mut zip = zip::ZipWriter::new(&mut buffer);
            zip.start_file(
                "model/data/other.txt",
                zip::write::FileOptions::default()
                    .compression_method(zip::CompressionMethod::Stored),
            )
            .unwrap();
            std::io::Write::write_all(&mut zip, b"x").unwrap();
            zip.finish().unwrap();
        }
        buffer.set_position(0);
        let err = PackageInfo::from_reader(buffer).unwrap_err();
        assert!(err.starts_with("not an AOTInductor package"), "{err}");
    }

    #[test]
    fn isa_names_map_to_cpu_flags() {
        assert_eq!(isa_flags("AVX2"), Some(&["avx2", "fma"][..]));
        assert!(isa_flags("AVX512").unwrap().contains(&"avx512f"));
        assert_eq!(isa_flags("SOMETHING_NEW"), None);
    }
}
