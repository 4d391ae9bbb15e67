//! Conversions between the host's types (`Tensor`, the records of
//! `types.rs`) and the WIT types, which stay private to the plugin layer.

use std::time::Duration;

use bytes::Bytes;

use super::bindings::wit;
use super::types::{
    HealthReport, HealthStatus, HostSnapshot, ModelPhase, PluginKind, RequestEvent, RequestStatus,
    RequestView,
};
use plinth_core::error::Error;
use plinth_core::tensor::{DType, Tensor};

fn dtype_to_wit(dtype: DType) -> wit::Dtype {
    match dtype {
        DType::Bool => wit::Dtype::Bool,
        DType::U8 => wit::Dtype::U8,
        DType::U16 => wit::Dtype::U16,
        DType::U32 => wit::Dtype::U32,
        DType::U64 => wit::Dtype::U64,
        DType::I8 => wit::Dtype::I8,
        DType::I16 => wit::Dtype::I16,
        DType::I32 => wit::Dtype::I32,
        DType::I64 => wit::Dtype::I64,
        DType::F16 => wit::Dtype::F16,
        DType::BF16 => wit::Dtype::Bf16,
        DType::F32 => wit::Dtype::F32,
        DType::F64 => wit::Dtype::F64,
        DType::Bytes => wit::Dtype::Bytes,
    }
}

fn dtype_from_wit(dtype: wit::Dtype) -> DType {
    match dtype {
        wit::Dtype::Bool => DType::Bool,
        wit::Dtype::U8 => DType::U8,
        wit::Dtype::U16 => DType::U16,
        wit::Dtype::U32 => DType::U32,
        wit::Dtype::U64 => DType::U64,
        wit::Dtype::I8 => DType::I8,
        wit::Dtype::I16 => DType::I16,
        wit::Dtype::I32 => DType::I32,
        wit::Dtype::I64 => DType::I64,
        wit::Dtype::F16 => DType::F16,
        wit::Dtype::Bf16 => DType::BF16,
        wit::Dtype::F32 => DType::F32,
        wit::Dtype::F64 => DType::F64,
        wit::Dtype::Bytes => DType::Bytes,
    }
}

pub(super) fn to_wit(tensor: Tensor) -> wit::Tensor {
    wit::Tensor {
        name: tensor.name().to_owned(),
        dtype: dtype_to_wit(tensor.dtype()),
        shape: tensor.shape().to_vec(),
        // No copy when the tensor owns its whole buffer (a model's output, a
        // plugin's): `Bytes` hands its vector over. A view into a request's
        // message is copied.
        data: Vec::from(tensor.into_data()),
    }
}

/// A plugin's output is checked like any client input, and blamed on the plugin.
pub(super) fn from_wit(plugin: &str, tensor: wit::Tensor) -> Result<Tensor, Error> {
    Tensor::new(
        tensor.name,
        dtype_from_wit(tensor.dtype),
        tensor.shape,
        Bytes::from(tensor.data),
    )
    .map_err(|err| {
        Error::Internal(format!(
            "plugin '{plugin}' returned a malformed tensor: {err}"
        ))
    })
}

impl RequestView {
    /// The request as the WIT `request-info` record.
    pub(super) fn to_wit(&self) -> wit::RequestInfo {
        wit::RequestInfo {
            id: self.id.clone(),
            model: self.model.clone(),
            version: self.version.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

/// Whole microseconds, saturating.
pub(super) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn request_status_to_wit(status: RequestStatus) -> wit::RequestStatus {
    match status {
        RequestStatus::Ok => wit::RequestStatus::Ok,
        RequestStatus::InvalidInput => wit::RequestStatus::InvalidInput,
        RequestStatus::NotFound => wit::RequestStatus::NotFound,
        RequestStatus::Unavailable => wit::RequestStatus::Unavailable,
        RequestStatus::DeadlineExceeded => wit::RequestStatus::DeadlineExceeded,
        RequestStatus::Cancelled => wit::RequestStatus::Cancelled,
        RequestStatus::Internal => wit::RequestStatus::Internal,
    }
}

pub(super) fn event_to_wit(event: &RequestEvent) -> wit::RequestEvent {
    wit::RequestEvent {
        model: event.model.clone(),
        version: event.version.clone(),
        status: request_status_to_wit(event.status),
        timings: wit::StageTimings {
            queue_us: micros(event.timings.queue),
            preprocess_us: micros(event.timings.preprocess),
            compute_us: micros(event.timings.compute),
            postprocess_us: micros(event.timings.postprocess),
            total_us: micros(event.timings.total),
        },
        batch_size: event.batch_size,
    }
}

/// `None` for a kind added after 0.1.0: the `plugin-kind` enum of a 0.1.0
/// health plugin cannot name it, so the snapshot leaves such plugins out.
fn plugin_kind_to_wit(kind: PluginKind) -> Option<wit::PluginKind> {
    match kind {
        PluginKind::Router => Some(wit::PluginKind::Router),
        PluginKind::Processor => Some(wit::PluginKind::Processor),
        PluginKind::Metrics => Some(wit::PluginKind::Metrics),
        PluginKind::Health => Some(wit::PluginKind::Health),
        PluginKind::Orchestrator => None,
    }
}

pub(super) fn snapshot_to_wit(snapshot: &HostSnapshot) -> wit::HostSnapshot {
    wit::HostSnapshot {
        uptime_ms: millis(snapshot.uptime),
        models: snapshot
            .models
            .iter()
            .map(|model| wit::ModelStatus {
                name: model.name.clone(),
                version: model.version.clone(),
                state: match &model.phase {
                    ModelPhase::Loading => wit::ModelState::Loading,
                    ModelPhase::Ready => wit::ModelState::Ready,
                    ModelPhase::Unloading => wit::ModelState::Unloading,
                    ModelPhase::Failed(reason) => wit::ModelState::Failed(reason.clone()),
                },
                queue_depth: model.queue_depth,
                in_flight: model.in_flight,
                requests: model.requests,
                failures: model.failures,
            })
            .collect(),
        plugins: snapshot
            .plugins
            .iter()
            .filter_map(|plugin| {
                Some(wit::PluginStatus {
                    name: plugin.name.clone(),
                    version: plugin.version.clone(),
                    kind: plugin_kind_to_wit(plugin.kind)?,
                    calls: plugin.calls,
                    errors: plugin.errors,
                })
            })
            .collect(),
        devices: snapshot
            .devices
            .iter()
            .map(|device| wit::DeviceMemory {
                device: device.device.clone(),
                used_bytes: device.used_bytes,
                total_bytes: device.total_bytes,
            })
            .collect(),
    }
}

pub(super) fn health_report_from_wit(report: wit::HealthReport) -> HealthReport {
    HealthReport {
        status: match report.status {
            wit::HealthStatus::Ready => HealthStatus::Ready,
            wit::HealthStatus::Degraded => HealthStatus::Degraded,
            wit::HealthStatus::NotReady => HealthStatus::NotReady,
        },
        message: report.message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{DeviceMemory, ModelStatus, PluginStatus, StageTimings};

    #[test]
    fn a_tensor_that_owns_its_buffer_is_handed_to_the_guest_form_without_a_copy() {
        let data = vec![0u8; 64];
        let at = data.as_ptr();
        let owned = Tensor::new("x", DType::F32, vec![16], Bytes::from(data)).unwrap();
        assert_eq!(to_wit(owned).data.as_ptr(), at);
        // A view into a larger message is copied, and only its own bytes.
        let message = Bytes::from(vec![1u8; 128]);
        let view = Tensor::new("x", DType::F32, vec![16], message.slice(64..)).unwrap();
        let wit = to_wit(view);
        assert_eq!(wit.data, vec![1u8; 64]);
        assert_ne!(wit.data.as_ptr(), message[64..].as_ptr());
    }

    #[test]
    fn events_reach_plugins_in_whole_microseconds() {
        let event = RequestEvent {
            model: "m".into(),
            version: Some("2".into()),
            status: RequestStatus::DeadlineExceeded,
            timings: StageTimings {
                queue: Duration::from_nanos(1_999),
                preprocess: Duration::from_micros(7),
                compute: Duration::from_millis(3),
                postprocess: Duration::ZERO,
                total: Duration::MAX,
            },
            batch_size: 4,
        };
        let wit = event_to_wit(&event);
        assert_eq!(
            (wit.model.as_str(), wit.version.as_deref(), wit.batch_size),
            ("m", Some("2"), 4)
        );
        assert!(matches!(wit.status, wit::RequestStatus::DeadlineExceeded));
        let t = wit.timings;
        assert_eq!(
            [
                t.queue_us,
                t.preprocess_us,
                t.compute_us,
                t.postprocess_us,
                t.total_us
            ],
            [1, 7, 3_000, 0, u64::MAX]
        );
    }

    #[test]
    fn snapshots_and_verdicts_cross_field_by_field() {
        let snapshot = HostSnapshot {
            uptime: Duration::from_micros(2_500),
            models: vec![ModelStatus {
                name: "m".into(),
                version: "1".into(),
                phase: ModelPhase::Failed("bad file".into()),
                queue_depth: 3,
                in_flight: 2,
                requests: 10,
                failures: 1,
            }],
            plugins: vec![PluginStatus {
                name: "p".into(),
                version: "0.1.0".into(),
                kind: PluginKind::Metrics,
                calls: 5,
                errors: 4,
            }],
            devices: vec![DeviceMemory {
                device: "cpu".into(),
                used_bytes: 6,
                total_bytes: 8,
            }],
        };
        let wit = snapshot_to_wit(&snapshot);
        assert_eq!(wit.uptime_ms, 2);
        let model = &wit.models[0];
        assert!(matches!(&model.state, wit::ModelState::Failed(reason) if reason == "bad file"));
        assert_eq!(
            (
                model.queue_depth,
                model.in_flight,
                model.requests,
                model.failures
            ),
            (3, 2, 10, 1)
        );
        let plugin = &wit.plugins[0];
        assert!(matches!(plugin.kind, wit::PluginKind::Metrics));
        assert_eq!((plugin.calls, plugin.errors), (5, 4));
        assert_eq!(
            (
                wit.devices[0].device.as_str(),
                wit.devices[0].used_bytes,
                wit.devices[0].total_bytes
            ),
            ("cpu", 6, 8)
        );
        let report = health_report_from_wit(wit::HealthReport {
            status: wit::HealthStatus::Degraded,
            message: "slow".into(),
        });
        assert_eq!(
            report,
            HealthReport {
                status: HealthStatus::Degraded,
                message: "slow".into()
            }
        );
    }
}
