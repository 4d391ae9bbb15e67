//! Views of the registry as the protocol reports them, apart from any
//! transport: model readiness, metadata, the model configuration, the
//! repository index and statistics. Each edge renders these; neither looks
//! at a `ModelConfig` or the registry's counters itself.

use std::sync::Arc;

use crate::config::{DeviceSpec, MODEL_FILE, ModelConfig, VersionPolicy};
use crate::error::Error;
use crate::registry::{ModelState, ReadyModel, Registry};
use crate::tensor::{DType, TensorSpec};

use super::codec::{config_datatype_name, datatype_name};

/// What ModelMetadata and ModelConfig call a TorchScript model.
pub const PLATFORM: &str = "pytorch_libtorch";
pub const BACKEND: &str = "pytorch";

/// The ready model, checking that `version` (if any) is loaded.
pub fn ready_model(
    registry: &Registry,
    name: &str,
    version: Option<&str>,
) -> Result<Arc<ReadyModel>, Error> {
    let model = registry.get_ready(name)?;
    model.pick_version(version)?;
    Ok(model)
}

/// Whether `name` (at `version`, if given) can serve requests now: loaded,
/// and not held back by the host (an orchestrator entry whose plugin is not
/// loaded is listed UNAVAILABLE).
pub fn model_ready(registry: &Registry, name: &str, version: Option<&str>) -> bool {
    ready_model(registry, name, version).is_ok()
        && registry
            .status(name)
            .is_ok_and(|status| status.state == ModelState::Ready)
}

/// A tensor signature as model metadata reports it: the wire shape, with the
/// batch dimension as -1 when the model batches.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

pub fn tensor_metadata(config: &ModelConfig) -> (Vec<TensorMetadata>, Vec<TensorMetadata>) {
    let render = |specs: &[TensorSpec]| {
        specs
            .iter()
            .map(|spec| TensorMetadata {
                name: spec.name.clone(),
                datatype: datatype_name(spec.dtype),
                shape: config.full_shape(spec),
            })
            .collect()
    };
    (render(&config.inputs), render(&config.outputs))
}

/// The model configuration in Triton's schema, apart from any transport: the
/// one view both `ModelConfig` answers (gRPC and REST) render.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfigView {
    pub name: String,
    pub platform: &'static str,
    pub backend: &'static str,
    pub version_policy: VersionPolicyView,
    pub max_batch_size: usize,
    pub inputs: Vec<ConfigTensor>,
    pub outputs: Vec<ConfigTensor>,
    pub instance_group: InstanceGroupView,
    pub default_model_filename: &'static str,
    /// Triton's free-form `parameters` (string values), sorted by key.
    pub parameters: Vec<(String, String)>,
}

/// The parameter that carries a `specific` version policy's labels exactly
/// as config.toml lists them ("1.2.0" included), comma-separated. Triton's
/// gRPC schema has only integers for those versions.
pub const SPECIFIC_VERSIONS_PARAMETER: &str = "version_policy.specific";

#[derive(Debug, Clone, PartialEq)]
pub enum VersionPolicyView {
    Latest {
        num_versions: usize,
    },
    All,
    /// The labels as config.toml lists them: integers or semver.
    Specific {
        labels: Vec<String>,
    },
}

impl VersionPolicyView {
    /// The `specific` labels that Triton's integer version field can carry
    /// exactly: plain integers. Every label, semver included, is in the
    /// [`SPECIFIC_VERSIONS_PARAMETER`] parameter.
    pub fn integer_versions(&self) -> Vec<i64> {
        match self {
            VersionPolicyView::Specific { labels } => {
                labels.iter().filter_map(|l| l.parse().ok()).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// One input or output of the configuration: dims without the batch dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigTensor {
    pub name: String,
    pub dtype: DType,
    /// `TYPE_FP32` and so on (BYTES is `TYPE_STRING`).
    pub data_type: String,
    pub dims: Vec<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceKind {
    Cpu,
    Gpu,
}

impl InstanceKind {
    /// Triton's name of the kind.
    pub fn name(self) -> &'static str {
        match self {
            InstanceKind::Cpu => "KIND_CPU",
            InstanceKind::Gpu => "KIND_GPU",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct InstanceGroupView {
    pub name: String,
    pub kind: InstanceKind,
    pub count: usize,
    pub gpus: Vec<usize>,
}

/// [`model_config`] of a loaded model, its platform and file those of
/// `version` (the newest when `None`).
pub fn ready_model_config(
    model: &crate::registry::ReadyModel,
    version: Option<&str>,
) -> ModelConfigView {
    let mut view = model_config(&model.name, &model.config);
    view.platform = model.platform(version);
    if let Some(format) = model.format(version) {
        view.default_model_filename = format.file_name();
    }
    view
}

/// The configuration of model `name` as ModelConfig reports it.
pub fn model_config(name: &str, config: &ModelConfig) -> ModelConfigView {
    let tensors = |specs: &[TensorSpec]| {
        specs
            .iter()
            .map(|spec| ConfigTensor {
                name: spec.name.clone(),
                dtype: spec.dtype,
                data_type: config_datatype_name(spec.dtype),
                dims: spec.shape.clone(),
            })
            .collect()
    };
    let mut parameters = Vec::new();
    let version_policy = match &config.version_policy {
        VersionPolicy::Latest(n) => VersionPolicyView::Latest { num_versions: *n },
        VersionPolicy::All => VersionPolicyView::All,
        VersionPolicy::Specific(labels) => {
            parameters.push((SPECIFIC_VERSIONS_PARAMETER.to_owned(), labels.join(",")));
            VersionPolicyView::Specific {
                labels: labels.clone(),
            }
        }
    };
    let (kind, gpus) = match config.device {
        DeviceSpec::Cpu => (InstanceKind::Cpu, Vec::new()),
        DeviceSpec::Cuda(idx) => (InstanceKind::Gpu, vec![idx]),
    };
    parameters.sort();
    ModelConfigView {
        name: name.to_owned(),
        platform: PLATFORM,
        backend: BACKEND,
        version_policy,
        max_batch_size: config.max_batch_size,
        inputs: tensors(&config.inputs),
        outputs: tensors(&config.outputs),
        instance_group: InstanceGroupView {
            name: format!("{name}_0"),
            kind,
            count: config.instances,
            gpus,
        },
        default_model_filename: MODEL_FILE,
        parameters,
    }
}

/// One row of the repository index.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexRow {
    pub name: String,
    pub version: String,
    pub state: &'static str,
    pub reason: String,
}

/// Triton's name of a model state. A failed load is UNAVAILABLE with its reason.
pub fn state_name(state: ModelState) -> &'static str {
    match state {
        ModelState::Ready => "READY",
        ModelState::Loading => "LOADING",
        ModelState::Unloading => "UNLOADING",
        ModelState::Unavailable | ModelState::Failed => "UNAVAILABLE",
    }
}

/// Every model the registry knows: one row per loaded version, or one row
/// without a version for a model that has none loaded.
pub fn repository_index(registry: &Registry, ready_only: bool) -> Vec<IndexRow> {
    let mut rows = Vec::new();
    for status in registry.list() {
        if ready_only && status.state != ModelState::Ready {
            continue;
        }
        let state = state_name(status.state);
        let reason = status.reason.clone().unwrap_or_default();
        if status.versions.is_empty() {
            rows.push(IndexRow {
                name: status.name.clone(),
                version: String::new(),
                state,
                reason: reason.clone(),
            });
        }
        for version in &status.versions {
            rows.push(IndexRow {
                name: status.name.clone(),
                version: version.clone(),
                state,
                reason: reason.clone(),
            });
        }
    }
    rows
}

/// One statistics accumulator as the statistics extension reports it: how
/// many events, and their summed duration in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatDuration {
    pub count: u64,
    pub ns: u64,
}

impl From<(u64, u64)> for StatDuration {
    fn from((count, ns): (u64, u64)) -> StatDuration {
        StatDuration { count, ns }
    }
}

/// Statistics of one loaded version, as the statistics extension reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionStatistics {
    pub name: String,
    pub version: String,
    /// Milliseconds since the Unix epoch; 0 if never used.
    pub last_inference: u64,
    pub inference_count: u64,
    pub execution_count: u64,
    pub success: StatDuration,
    pub fail: StatDuration,
    pub queue: StatDuration,
    pub compute_input: StatDuration,
    pub compute_infer: StatDuration,
    pub compute_output: StatDuration,
    /// Per batch size: compute input, infer, output.
    pub batches: Vec<(u64, [StatDuration; 3])>,
    /// The version's memory: its kind ("CPU" or "GPU"), device id, bytes.
    pub memory: (&'static str, i64, u64),
}

fn version_statistics(model: &ReadyModel, version: Option<&str>) -> Vec<VersionStatistics> {
    use std::sync::atomic::Ordering::Relaxed;
    model
        .versions()
        .iter()
        .filter(|v| version.is_none_or(|want| v.version.answers_to(want)))
        .map(|v| {
            let s = &v.stats;
            VersionStatistics {
                name: model.name.clone(),
                version: v.version.label.clone(),
                last_inference: s.last_inference_ms.load(Relaxed),
                inference_count: s.inference_count.load(Relaxed),
                execution_count: s.execution_count.load(Relaxed),
                success: s.success.get().into(),
                fail: s.fail.get().into(),
                queue: s.queue.get().into(),
                compute_input: s.compute_input.get().into(),
                compute_infer: s.compute_infer.get().into(),
                compute_output: s.compute_output.get().into(),
                batches: s
                    .batches()
                    .into_iter()
                    .map(|(size, timings)| (size, timings.map(StatDuration::from)))
                    .collect(),
                memory: match model.config.device {
                    plinth_core::config::DeviceSpec::Cpu => ("CPU", 0, v.memory_bytes),
                    plinth_core::config::DeviceSpec::Cuda(id) => {
                        ("GPU", i64::try_from(id).unwrap_or(i64::MAX), v.memory_bytes)
                    }
                },
            }
        })
        .collect()
}

/// Statistics of every loaded version of every model (empty `name`), or of
/// one model, which must then be ready (and have `version`, if given).
pub fn statistics(
    registry: &Registry,
    name: &str,
    version: Option<&str>,
) -> Result<Vec<VersionStatistics>, Error> {
    if name.is_empty() {
        return Ok(registry
            .list()
            .into_iter()
            .filter_map(|status| registry.serving(&status.name))
            .flat_map(|model| version_statistics(&model, version))
            .collect());
    }
    let model = ready_model(registry, name, version)?;
    Ok(version_statistics(&model, version))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(text: &str) -> ModelConfig {
        ModelConfig::parse(Path::new("m/config.toml"), text).unwrap()
    }

    const IO: &str = "[[input]]\nname = \"x\"\ndtype = \"f32\"\nshape = [4]\n[[output]]\nname = \"y\"\ndtype = \"bytes\"\nshape = [-1]\n";

    #[test]
    fn config_view_keeps_every_specific_label() {
        let view = model_config(
            "m",
            &parse(&format!(
                "max_batch_size = 8\ninstances = 2\nversion_policy = {{ specific = [\"1.2.0\", 2] }}\n{IO}"
            )),
        );
        assert_eq!(
            view.version_policy,
            VersionPolicyView::Specific {
                labels: vec!["1.2.0".into(), "2".into()]
            }
        );
        assert_eq!(view.version_policy.integer_versions(), [2]);
        assert_eq!(
            view.parameters,
            [(SPECIFIC_VERSIONS_PARAMETER.to_owned(), "1.2.0,2".to_owned())]
        );
        assert_eq!(view.max_batch_size, 8);
        assert_eq!(
            view.instance_group,
            InstanceGroupView {
                name: "m_0".into(),
                kind: InstanceKind::Cpu,
                count: 2,
                gpus: Vec::new(),
            }
        );
        assert_eq!(view.inputs[0].data_type, "TYPE_FP32");
        assert_eq!(view.inputs[0].dims, [4]);
        assert_eq!(view.outputs[0].data_type, "TYPE_STRING");
    }

    #[test]
    fn config_view_of_other_policies_has_no_parameters() {
        let latest = model_config("m", &parse(IO));
        assert_eq!(
            latest.version_policy,
            VersionPolicyView::Latest { num_versions: 1 }
        );
        assert!(latest.parameters.is_empty());
        assert!(latest.version_policy.integer_versions().is_empty());
        let all = model_config(
            "m",
            &parse(&format!("version_policy = {{ all = true }}\n{IO}")),
        );
        assert_eq!(all.version_policy, VersionPolicyView::All);
    }
}
