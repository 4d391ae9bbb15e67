//! The model repository on disk: `<repo>/<model>/config.toml` plus
//! `<repo>/<model>/<version>/model.pt` (TorchScript) or `model.pt2` (an
//! AOTInductor package), and the parsing and validation of `config.toml`.
//! Every error names the file, the field and the reason.

use std::cmp::Ordering;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::batch::BatchPolicy;
use crate::tensor::{DType, TensorSpec};

pub const CONFIG_FILE: &str = "config.toml";
/// A TorchScript version's file.
pub const MODEL_FILE: &str = "model.pt";
/// An AOTInductor package version's file.
pub const PACKAGE_FILE: &str = "model.pt2";

/// The format of one version's model file, known from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFormat {
    /// `model.pt`: a TorchScript archive, run by libtorch's interpreter.
    TorchScript,
    /// `model.pt2`: a `torch.export` program compiled by AOTInductor into
    /// a package holding a native library and the weights.
    AotiPackage,
}

impl ModelFormat {
    /// Every format, in the order a version directory is searched.
    pub const ALL: [ModelFormat; 2] = [ModelFormat::TorchScript, ModelFormat::AotiPackage];

    /// The file a version directory holds in this format.
    pub fn file_name(self) -> &'static str {
        match self {
            ModelFormat::TorchScript => MODEL_FILE,
            ModelFormat::AotiPackage => PACKAGE_FILE,
        }
    }

    /// The format's name in the APIs and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFormat::TorchScript => "torchscript",
            ModelFormat::AotiPackage => "aoti-package",
        }
    }

    /// The format of a model file, by its name.
    pub fn of_path(path: &Path) -> Option<ModelFormat> {
        let name = path.file_name()?.to_str()?;
        ModelFormat::ALL.into_iter().find(|f| f.file_name() == name)
    }
}

impl fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(idx) => write!(f, "cuda:{idx}"),
        }
    }
}

impl DeviceSpec {
    fn parse(text: &str) -> Result<DeviceSpec, String> {
        match text {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|idx| idx.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("expected \"cpu\", \"cuda\" or \"cuda:N\", got {text:?}")),
        }
    }
}

/// Whether a model stays loaded or comes and goes with its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residency {
    /// Loaded at startup and never evicted (the default).
    #[default]
    Pinned,
    /// Listed but not loaded until its first request; the least recently
    /// used idle one is unloaded when a load would pass the memory budget.
    OnDemand,
}

impl Residency {
    pub fn parse(text: &str) -> Result<Residency, String> {
        match text {
            "pinned" => Ok(Residency::Pinned),
            "on-demand" => Ok(Residency::OnDemand),
            other => Err(format!(
                "expected \"pinned\" or \"on-demand\", got {other:?}"
            )),
        }
    }
}

/// Which versions of a model are loaded, as Triton's version policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionPolicy {
    /// The newest N versions.
    Latest(usize),
    All,
    Specific(Vec<String>),
}

/// A version directory's label ("3" or "1.2.0") with its ordering key.
/// Integer labels order as `N.0.0`, so integers and semver mix sensibly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelVersion {
    pub label: String,
    key: semver::Version,
}

impl ModelVersion {
    pub fn parse(label: &str) -> Option<ModelVersion> {
        let key = match label.parse::<u64>() {
            Ok(n) => semver::Version::new(n, 0, 0),
            Err(_) => semver::Version::parse(label).ok()?,
        };
        Some(ModelVersion {
            label: label.to_owned(),
            key,
        })
    }

    /// Whether a requested label names this version ("1" names "1.0.0" too).
    pub fn answers_to(&self, requested: &str) -> bool {
        self.label == requested || ModelVersion::parse(requested).is_some_and(|v| v.key == self.key)
    }
}

impl Ord for ModelVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key
            .cmp(&other.key)
            .then_with(|| self.label.cmp(&other.label))
    }
}

impl PartialOrd for ModelVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ModelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// A validated `config.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub device: DeviceSpec,
    /// 0: no batch dimension. N > 0: every input and output has a leading
    /// batch dimension of at most N that the specs do not list (as Triton).
    pub max_batch_size: usize,
    /// Dynamic batching: how requests queued for this model are merged into
    /// one forward pass. Off (`max_batch_size == 0`) unless the model batches.
    pub batching: BatchPolicy,
    /// Executor threads, each with its own copy of the module.
    pub instances: usize,
    /// Torch intra-op threads per executor; `None` derives it from the budget.
    pub intra_op_threads: Option<usize>,
    /// Requests that may wait for an executor before new ones are refused.
    pub max_queue_size: usize,
    pub version_policy: VersionPolicy,
    pub preprocess: Vec<String>,
    pub postprocess: Vec<String>,
    pub residency: Residency,
    /// The orchestrator plugin that answers requests to this entry, which
    /// then has no `model.pt`: it is served as version 1.
    pub orchestrator: Option<String>,
    /// The longest a request to an orchestrator entry may take in all, its
    /// nested calls included, when the client sets no timeout.
    pub request_timeout: Duration,
}

/// [`ModelConfig::request_timeout`] unless the config says otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    platform: Option<String>,
    #[serde(default = "default_device")]
    device: String,
    #[serde(default)]
    max_batch_size: i64,
    #[serde(default)]
    dynamic_batching: Option<bool>,
    #[serde(default)]
    max_queue_delay_us: i64,
    #[serde(default)]
    preferred_batch_sizes: Vec<i64>,
    #[serde(default = "default_instances")]
    instances: i64,
    #[serde(default)]
    intra_op_threads: Option<i64>,
    #[serde(default = "default_max_queue_size")]
    max_queue_size: i64,
    #[serde(default)]
    version_policy: Option<RawVersionPolicy>,
    #[serde(default)]
    preprocess: Vec<String>,
    #[serde(default)]
    postprocess: Vec<String>,
    #[serde(default)]
    residency: Option<String>,
    #[serde(default)]
    orchestrator: Option<String>,
    #[serde(default)]
    request_timeout_ms: Option<i64>,
    #[serde(default)]
    input: Vec<RawTensor>,
    #[serde(default)]
    output: Vec<RawTensor>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVersionPolicy {
    latest: Option<i64>,
    all: Option<bool>,
    specific: Option<Vec<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    name: String,
    dtype: String,
    shape: Vec<i64>,
}

fn default_device() -> String {
    "cpu".to_owned()
}
fn default_instances() -> i64 {
    1
}
fn default_max_queue_size() -> i64 {
    1024
}

/// A config error: `<file>: <field>: <reason>`.
fn field_error(path: &Path, field: &str, reason: impl fmt::Display) -> String {
    format!("{}: {field}: {reason}", path.display())
}

impl ModelConfig {
    /// Reads and validates `<model_dir>/config.toml`. Blocking file I/O.
    pub fn load(model_dir: &Path) -> Result<ModelConfig, String> {
        let path = model_dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|err| format!("{}: cannot read: {err}", path.display()))?;
        ModelConfig::parse(&path, &text)
    }

    /// Parses `text` as the config at `path` (the path is only used in messages).
    pub fn parse(path: &Path, text: &str) -> Result<ModelConfig, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|err| {
            let reason = err.message().to_owned();
            match err.span().map(|span| line_col(text, span.start)) {
                Some((line, col)) => format!("{}:{line}:{col}: {reason}", path.display()),
                None => format!("{}: {reason}", path.display()),
            }
        })?;
        if let Some(platform) = raw.platform.as_deref()
            && platform != "torchscript"
        {
            return Err(field_error(
                path,
                "platform",
                format!("only \"torchscript\" is served, got {platform:?}"),
            ));
        }
        let device =
            DeviceSpec::parse(&raw.device).map_err(|reason| field_error(path, "device", reason))?;
        let max_batch_size = usize::try_from(raw.max_batch_size).map_err(|_| {
            field_error(
                path,
                "max_batch_size",
                format!("must be 0 or more, got {}", raw.max_batch_size),
            )
        })?;
        let batching = batch_policy(path, &raw, max_batch_size)?;
        let instances = positive(path, "instances", raw.instances)?;
        let intra_op_threads = raw
            .intra_op_threads
            .map(|n| positive(path, "intra_op_threads", n))
            .transpose()?;
        let max_queue_size = positive(path, "max_queue_size", raw.max_queue_size)?;
        let inputs = tensor_specs(path, "input", raw.input)?;
        let outputs = tensor_specs(path, "output", raw.output)?;
        let version_policy = match raw.version_policy {
            None => VersionPolicy::Latest(1),
            Some(policy) => version_policy(path, policy)?,
        };
        for (field, names) in [
            ("preprocess", &raw.preprocess),
            ("postprocess", &raw.postprocess),
        ] {
            if let Some(idx) = names.iter().position(|name| name.trim().is_empty()) {
                return Err(field_error(
                    path,
                    &format!("{field}[{idx}]"),
                    "plugin name is empty",
                ));
            }
        }
        let residency = raw
            .residency
            .as_deref()
            .map(Residency::parse)
            .transpose()
            .map_err(|reason| field_error(path, "residency", reason))?
            .unwrap_or_default();
        if let Some(plugin) = &raw.orchestrator
            && !valid_model_name(plugin)
        {
            return Err(field_error(
                path,
                "orchestrator",
                format!("expected a plugin's file stem, got {plugin:?}"),
            ));
        }
        let request_timeout = match raw.request_timeout_ms {
            None => DEFAULT_REQUEST_TIMEOUT,
            Some(ms) if raw.orchestrator.is_none() => {
                return Err(field_error(
                    path,
                    "request_timeout_ms",
                    format!("only an orchestrator entry takes a request timeout, got {ms}"),
                ));
            }
            Some(ms) => Duration::from_millis(positive(path, "request_timeout_ms", ms)? as u64),
        };
        Ok(ModelConfig {
            inputs,
            outputs,
            device,
            max_batch_size,
            batching,
            instances,
            intra_op_threads,
            max_queue_size,
            version_policy,
            preprocess: raw.preprocess,
            postprocess: raw.postprocess,
            residency,
            orchestrator: raw.orchestrator,
            request_timeout,
        })
    }

    /// The shape of a tensor as it crosses the wire: the spec with the batch
    /// dimension in front when the model batches.
    pub fn full_shape(&self, spec: &TensorSpec) -> Vec<i64> {
        let mut shape = Vec::with_capacity(spec.shape.len() + 1);
        if self.max_batch_size > 0 {
            shape.push(-1);
        }
        shape.extend_from_slice(&spec.shape);
        shape
    }
}

/// `dynamic_batching` (default: on when `max_batch_size > 0`),
/// `max_queue_delay_us` (default 0: merge only what is already queued) and
/// `preferred_batch_sizes`.
fn batch_policy(
    path: &Path,
    raw: &RawConfig,
    max_batch_size: usize,
) -> Result<BatchPolicy, String> {
    let delay_us = u64::try_from(raw.max_queue_delay_us).map_err(|_| {
        field_error(
            path,
            "max_queue_delay_us",
            format!("must be 0 or more, got {}", raw.max_queue_delay_us),
        )
    })?;
    let mut preferred = Vec::with_capacity(raw.preferred_batch_sizes.len());
    for (idx, size) in raw.preferred_batch_sizes.iter().enumerate() {
        match usize::try_from(*size) {
            Ok(n) if n >= 1 && n <= max_batch_size => preferred.push(n),
            _ => {
                return Err(field_error(
                    path,
                    &format!("preferred_batch_sizes[{idx}]"),
                    format!("must be in 1..={max_batch_size} (max_batch_size), got {size}"),
                ));
            }
        }
    }
    let enabled = raw.dynamic_batching.unwrap_or(max_batch_size > 0);
    if enabled && max_batch_size == 0 {
        return Err(field_error(
            path,
            "dynamic_batching",
            "needs max_batch_size > 0 (the model must take a batch dimension)",
        ));
    }
    preferred.sort_unstable();
    preferred.dedup();
    Ok(BatchPolicy {
        max_batch_size: if enabled { max_batch_size } else { 0 },
        max_queue_delay: Duration::from_micros(delay_us),
        preferred_batch_sizes: preferred,
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |idx| idx + 1) + 1;
    (line, col)
}

fn positive(path: &Path, field: &str, value: i64) -> Result<usize, String> {
    usize::try_from(value)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| field_error(path, field, format!("must be 1 or more, got {value}")))
}

fn tensor_specs(path: &Path, field: &str, raw: Vec<RawTensor>) -> Result<Vec<TensorSpec>, String> {
    if raw.is_empty() {
        return Err(field_error(
            path,
            field,
            format!("at least one [[{field}]] is required"),
        ));
    }
    let mut specs: Vec<TensorSpec> = Vec::with_capacity(raw.len());
    for (idx, tensor) in raw.into_iter().enumerate() {
        let at = |sub: &str| format!("{field}[{idx}].{sub}");
        if tensor.name.is_empty() {
            return Err(field_error(path, &at("name"), "is empty"));
        }
        if specs.iter().any(|spec| spec.name == tensor.name) {
            return Err(field_error(
                path,
                &at("name"),
                format!("duplicate name '{}'", tensor.name),
            ));
        }
        let dtype: DType = tensor
            .dtype
            .parse()
            .map_err(|reason| field_error(path, &at("dtype"), reason))?;
        if let Some((dim_idx, dim)) = tensor
            .shape
            .iter()
            .enumerate()
            .find(|(_, dim)| **dim < -1 || **dim == 0)
        {
            return Err(field_error(
                path,
                &format!("{field}[{idx}].shape[{dim_idx}]"),
                format!("must be -1 (free) or 1 or more, got {dim}"),
            ));
        }
        specs.push(TensorSpec {
            name: tensor.name,
            dtype,
            shape: tensor.shape,
        });
    }
    Ok(specs)
}

fn version_policy(path: &Path, raw: RawVersionPolicy) -> Result<VersionPolicy, String> {
    let field = "version_policy";
    match (raw.latest, raw.all, raw.specific) {
        (Some(n), None, None) => Ok(VersionPolicy::Latest(positive(
            path,
            "version_policy.latest",
            n,
        )?)),
        (None, Some(true), None) => Ok(VersionPolicy::All),
        (None, Some(false), None) => Err(field_error(
            path,
            "version_policy.all",
            "only `all = true` is meaningful",
        )),
        (None, None, Some(list)) => {
            if list.is_empty() {
                return Err(field_error(
                    path,
                    "version_policy.specific",
                    "lists no versions",
                ));
            }
            let mut labels = Vec::with_capacity(list.len());
            for (idx, value) in list.iter().enumerate() {
                let label = match value {
                    toml::Value::Integer(n) if *n >= 0 => n.to_string(),
                    toml::Value::String(s) if ModelVersion::parse(s).is_some() => s.clone(),
                    other => {
                        return Err(field_error(
                            path,
                            &format!("version_policy.specific[{idx}]"),
                            format!("expected a version number or semver string, got {other}"),
                        ));
                    }
                };
                labels.push(label);
            }
            Ok(VersionPolicy::Specific(labels))
        }
        _ => Err(field_error(
            path,
            field,
            "set exactly one of `latest`, `all` or `specific`",
        )),
    }
}

/// Model names are directory names; refusing anything else keeps requests
/// from reaching outside the repository.
pub fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// The model repository directory: a directory of model directories, or
/// (as KServe's storage initializer leaves a single model at `/mnt/models`)
/// one model directory, `config.toml` and versions at the root, served
/// under a name given to it.
#[derive(Debug, Clone)]
pub struct ModelRepository {
    root: PathBuf,
    /// The name of the one model at the root, for the single-model layout.
    single: Option<String>,
}

impl ModelRepository {
    pub fn new(root: impl Into<PathBuf>) -> ModelRepository {
        ModelRepository {
            root: root.into(),
            single: None,
        }
    }

    /// The single-model layout: `root` is the model directory of `name`.
    pub fn single(root: impl Into<PathBuf>, name: impl Into<String>) -> ModelRepository {
        ModelRepository {
            root: root.into(),
            single: Some(name.into()),
        }
    }

    /// Whether `root` is itself a model directory (holds a config.toml).
    pub fn is_model_dir(root: &Path) -> bool {
        root.join(CONFIG_FILE).is_file()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The name of the one model of the single-model layout.
    pub fn single_model(&self) -> Option<&str> {
        self.single.as_deref()
    }

    pub fn model_dir(&self, name: &str) -> PathBuf {
        match &self.single {
            Some(single) if single == name => self.root.clone(),
            // No other name has a directory: one under the root would be
            // a version directory of the single model.
            Some(_) => self.root.join(".no-such-model").join(name),
            None => self.root.join(name),
        }
    }

    /// The model a changed path under the root belongs to, if any.
    pub fn model_of(&self, path: &Path) -> Option<String> {
        let rel = path.strip_prefix(&self.root).ok()?;
        if let Some(single) = &self.single {
            return Some(single.clone());
        }
        match rel.components().next()? {
            std::path::Component::Normal(name) => name.to_str().map(str::to_owned),
            _ => None,
        }
    }

    /// Names of the model directories (those holding a config.toml). Blocking.
    pub fn scan(&self) -> std::io::Result<Vec<String>> {
        if let Some(single) = &self.single {
            std::fs::read_dir(&self.root)?;
            return Ok(if Self::is_model_dir(&self.root) {
                vec![single.clone()]
            } else {
                Vec::new()
            });
        }
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if valid_model_name(&name) && entry.path().join(CONFIG_FILE).is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Whether `name` is a model directory. Blocking.
    pub fn contains(&self, name: &str) -> bool {
        valid_model_name(name) && self.model_dir(name).join(CONFIG_FILE).is_file()
    }

    /// The versions on disk chosen by the policy, oldest first. Blocking.
    pub fn select_versions(
        &self,
        name: &str,
        policy: &VersionPolicy,
    ) -> Result<Vec<(ModelVersion, PathBuf)>, String> {
        let dir = self.model_dir(name);
        let mut found = Vec::new();
        let entries = std::fs::read_dir(&dir)
            .map_err(|err| format!("{}: cannot read: {err}", dir.display()))?;
        for entry in entries.flatten() {
            let Some(label) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Some(version) = ModelVersion::parse(&label) else {
                continue;
            };
            // Not `is_file()`: a model may sit behind a symlink or a pipe.
            let files: Vec<PathBuf> = ModelFormat::ALL
                .iter()
                .map(|format| entry.path().join(format.file_name()))
                .filter(|file| file.exists() && !file.is_dir())
                .collect();
            match files.as_slice() {
                [] => {}
                [file] => found.push((version, file.clone())),
                _ => {
                    return Err(format!(
                        "{}: holds both {MODEL_FILE} and {PACKAGE_FILE}; a version has one model file",
                        entry.path().display()
                    ));
                }
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        if found.is_empty() {
            return Err(format!(
                "{}: no version directory holds a {MODEL_FILE} or a {PACKAGE_FILE} (expected <version>/{MODEL_FILE} or <version>/{PACKAGE_FILE}, version an integer or semver)",
                dir.display()
            ));
        }
        match policy {
            VersionPolicy::All => Ok(found),
            VersionPolicy::Latest(n) => {
                let skip = found.len().saturating_sub(*n);
                Ok(found.into_iter().skip(skip).collect())
            }
            VersionPolicy::Specific(labels) => {
                let mut chosen = Vec::with_capacity(labels.len());
                for label in labels {
                    let hit = found.iter().find(|(version, _)| version.answers_to(label));
                    let Some(hit) = hit else {
                        let on_disk: Vec<&str> =
                            found.iter().map(|(v, _)| v.label.as_str()).collect();
                        return Err(format!(
                            "{}: version_policy.specific: version {label} has no {MODEL_FILE} or {PACKAGE_FILE} (on disk: {})",
                            dir.join(CONFIG_FILE).display(),
                            on_disk.join(", ")
                        ));
                    };
                    chosen.push(hit.clone());
                }
                chosen.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(chosen)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expect: Result<(), &str>) {
        let res = ModelConfig::parse(Path::new("m/config.toml"), text);
        match (res, expect) {
            (Ok(_), Ok(())) => {}
            (Err(err), Err(want)) => assert_eq!(err, want, "config:\n{text}"),
            (res, expect) => panic!("config:\n{text}\ngot {res:?}, expected {expect:?}"),
        }
    }

    const IO: &str = "[[input]]\nname = \"x\"\ndtype = \"f32\"\nshape = [4]\n[[output]]\nname = \"y\"\ndtype = \"f32\"\nshape = [-1]\n";

    #[test]
    fn batching_follows_max_batch_size_unless_turned_off() {
        let parse = |text: &str| ModelConfig::parse(Path::new("m/config.toml"), text).unwrap();
        assert_eq!(parse(IO).batching, BatchPolicy::default());
        let on = parse(&format!(
            "max_batch_size = 16\nmax_queue_delay_us = 500\npreferred_batch_sizes = [8, 4, 8]\n{IO}"
        ));
        assert_eq!(
            on.batching,
            BatchPolicy {
                max_batch_size: 16,
                max_queue_delay: Duration::from_micros(500),
                preferred_batch_sizes: vec![4, 8],
            }
        );
        let off = parse(&format!(
            "max_batch_size = 16\ndynamic_batching = false\n{IO}"
        ));
        assert_eq!(off.max_batch_size, 16);
        assert_eq!(off.batching.max_batch_size, 0);
    }

    #[test]
    fn config_errors_name_file_field_and_reason() {
        check(IO, Ok(()));
        check(
            &format!("max_batch_size = 8\ninstances = 2\ndevice = \"cuda:1\"\n{IO}"),
            Ok(()),
        );
        check(
            &format!("devise = \"cpu\"\n{IO}"),
            Err(
                "m/config.toml:1:1: unknown field `devise`, expected one of `platform`, `device`, `max_batch_size`, `dynamic_batching`, `max_queue_delay_us`, `preferred_batch_sizes`, `instances`, `intra_op_threads`, `max_queue_size`, `version_policy`, `preprocess`, `postprocess`, `residency`, `orchestrator`, `request_timeout_ms`, `input`, `output`",
            ),
        );
        check(
            &format!("residency = \"lazy\"\n{IO}"),
            Err("m/config.toml: residency: expected \"pinned\" or \"on-demand\", got \"lazy\""),
        );
        check(
            &format!("device = \"tpu\"\n{IO}"),
            Err("m/config.toml: device: expected \"cpu\", \"cuda\" or \"cuda:N\", got \"tpu\""),
        );
        check(
            &format!("instances = 0\n{IO}"),
            Err("m/config.toml: instances: must be 1 or more, got 0"),
        );
        check(
            &format!("max_batch_size = -2\n{IO}"),
            Err("m/config.toml: max_batch_size: must be 0 or more, got -2"),
        );
        check(
            &format!("max_batch_size = 8\npreferred_batch_sizes = [4, 9]\n{IO}"),
            Err(
                "m/config.toml: preferred_batch_sizes[1]: must be in 1..=8 (max_batch_size), got 9",
            ),
        );
        check(
            &format!("max_batch_size = 8\nmax_queue_delay_us = -1\n{IO}"),
            Err("m/config.toml: max_queue_delay_us: must be 0 or more, got -1"),
        );
        check(
            &format!("dynamic_batching = true\n{IO}"),
            Err(
                "m/config.toml: dynamic_batching: needs max_batch_size > 0 (the model must take a batch dimension)",
            ),
        );
        check(
            "[[input]]\nname = \"x\"\ndtype = \"f32\"\nshape = [4, -3]\n",
            Err("m/config.toml: input[0].shape[1]: must be -1 (free) or 1 or more, got -3"),
        );
        check(
            "[[input]]\nname = \"x\"\ndtype = \"complex\"\nshape = [4]\n",
            Err(
                "m/config.toml: input[0].dtype: unknown dtype \"complex\"; expected one of bool, u8, u16, u32, u64, i8, i16, i32, i64, f16, bf16, f32, f64, bytes",
            ),
        );
        check(
            "[[input]]\nname = \"x\"\ndtype = \"f32\"\nshape = [4]\n",
            Err("m/config.toml: output: at least one [[output]] is required"),
        );
        check(
            &format!("{IO}[[input]]\nname = \"x\"\ndtype = \"f32\"\nshape = [4]\n"),
            Err("m/config.toml: input[1].name: duplicate name 'x'"),
        );
        check(
            &format!("version_policy = {{ latest = 2, all = true }}\n{IO}"),
            Err("m/config.toml: version_policy: set exactly one of `latest`, `all` or `specific`"),
        );
        check(
            &format!("version_policy = {{ specific = [1, \"x\"] }}\n{IO}"),
            Err(
                "m/config.toml: version_policy.specific[1]: expected a version number or semver string, got \"x\"",
            ),
        );
        check(
            "this is not toml",
            Err("m/config.toml:1:6: key with no value, expected `=`"),
        );
    }

    #[test]
    fn residency_is_pinned_unless_the_config_says_on_demand() {
        let parse = |text: &str| ModelConfig::parse(Path::new("m/config.toml"), text).unwrap();
        assert_eq!(parse(IO).residency, Residency::Pinned);
        assert_eq!(
            parse(&format!("residency = \"pinned\"\n{IO}")).residency,
            Residency::Pinned
        );
        assert_eq!(
            parse(&format!("residency = \"on-demand\"\n{IO}")).residency,
            Residency::OnDemand
        );
    }

    #[test]
    fn versions_order_numerically_and_by_semver() {
        let mut versions: Vec<ModelVersion> = ["10", "2", "1.5.0", "1"]
            .iter()
            .map(|l| ModelVersion::parse(l).unwrap())
            .collect();
        versions.sort();
        let labels: Vec<&str> = versions.iter().map(|v| v.label.as_str()).collect();
        assert_eq!(labels, ["1", "1.5.0", "2", "10"]);
        assert!(ModelVersion::parse("2.0.0").unwrap().answers_to("2"));
        assert!(ModelVersion::parse("nope").is_none());
    }

    #[test]
    fn model_names_cannot_escape_the_repository() {
        for bad in ["", "..", ".hidden", "a/b", "../etc", "a b"] {
            assert!(!valid_model_name(bad), "{bad:?}");
        }
        for good in ["resnet50", "my-model_v2", "a.b"] {
            assert!(valid_model_name(good), "{good:?}");
        }
    }
}
