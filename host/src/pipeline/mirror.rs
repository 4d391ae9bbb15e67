//! Traffic mirroring: a routed request's mirror targets run the whole
//! pipeline but the router, after the primary has answered, through a
//! bounded queue and a few at a time. A mirrored run never loads a model on
//! demand, is bounded by the mirror timeout whatever its target, and is
//! counted as a mirror (here, and for plugins that take `metrics-context`),
//! never as a client request of its target. Its outputs are compared with
//! the primary's within the target's tolerance.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::types::{
    Inner, MirrorJob, MirrorPlan, MirrorTotals, Nesting, Pipeline, PipelineRequest,
    PipelineResponse,
};
use crate::error::Error;
use crate::plugin::{MirrorEvent, RequestStatus, RequestView, kind};
use crate::telemetry::Origin;
use crate::tensor::Tensor;
use opentelemetry::trace::SpanContext;

/// Mirrored runs in flight at once.
const MIRROR_CONCURRENCY: usize = 4;

impl Pipeline {
    /// How the mirrored runs went since startup.
    pub fn mirror_totals(&self) -> MirrorTotals {
        self.inner.mirror_counts.totals()
    }

    /// Queues a mirrored run per target of `plan`; what does not fit is
    /// dropped and counted. Never waits.
    pub(super) fn enqueue_mirrors(
        &self,
        plan: MirrorPlan,
        view: &RequestView,
        primary: &PipelineResponse,
        primary_latency: Duration,
        primary_span: Option<SpanContext>,
    ) {
        for target in plan.targets {
            let job = MirrorJob {
                target,
                id: view.id.clone(),
                metadata: view.metadata.clone(),
                inputs: plan.inputs.clone(),
                primary_model: primary.model.clone(),
                primary_version: primary.version.clone(),
                primary_outputs: primary.outputs.clone(),
                primary_latency,
                primary_span: primary_span.clone(),
            };
            if self.inner.mirrors.try_send(job).is_err() {
                self.inner
                    .mirror_counts
                    .dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Runs one mirrored request (the whole pipeline but the router) and
    /// tells the metrics plugins that count mirrors how it went.
    async fn mirror(&self, job: MirrorJob) {
        let started = Instant::now();
        // The mirror's deadline bounds every target, plain models too: a
        // stuck one gives its slot back when it runs out.
        let run = self.infer(PipelineRequest {
            id: job.id,
            model: job.target.model.clone(),
            version: job.target.version.clone(),
            inputs: job.inputs,
            metadata: job.metadata,
            timeout: Some(self.inner.mirror_timeout),
            nested: Some(Nesting {
                depth: 1,
                deadline: plinth_core::deadline::deadline_after(started, self.inner.mirror_timeout),
                parent: None,
            }),
            protocol: "mirror",
            // A trace of its own, linked to the primary's request.
            trace: job.primary_span.map_or(Origin::Untraced, Origin::LinkedTo),
        });
        let res = match tokio::time::timeout(self.inner.mirror_timeout, run).await {
            Ok(res) => res,
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "model '{}': the mirrored run did not finish within {} ms",
                job.target.model,
                self.inner.mirror_timeout.as_millis()
            ))),
        };
        let latency = started.elapsed();
        let counts = &self.inner.mirror_counts;
        let (status, version, agree) = match &res {
            Ok(response) => {
                counts.ok.fetch_add(1, Ordering::Relaxed);
                let agree = outputs_agree(
                    &job.primary_outputs,
                    &response.outputs,
                    job.target.tolerance,
                );
                let counter = if agree {
                    &counts.agreed
                } else {
                    &counts.disagreed
                };
                counter.fetch_add(1, Ordering::Relaxed);
                (
                    RequestStatus::Ok,
                    Some(response.version.clone()),
                    Some(agree),
                )
            }
            Err(err) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(model = %job.target.model, %err, "mirrored run failed");
                (RequestStatus::of_error(err), None, None)
            }
        };
        let event = MirrorEvent {
            primary_model: job.primary_model,
            primary_version: Some(job.primary_version),
            model: job.target.model,
            version: version.or(job.target.version),
            status,
            latency,
            primary_latency: job.primary_latency,
            agree,
        };
        let sinks: Vec<_> = self
            .inner
            .plugins
            .of_kind::<kind::Metrics>()
            .into_iter()
            .filter(|p| p.takes_context())
            .collect();
        if !sinks.is_empty() {
            let _ = tokio::task::spawn_blocking(move || {
                for sink in sinks {
                    let _ = sink.record_mirrors(std::slice::from_ref(&event));
                }
            })
            .await;
        }
    }
}

/// Whether `mirror` answers what `primary` did: the same output names,
/// dtypes and shapes, and numbers within `tolerance` of each other (byte
/// strings equal).
pub(super) fn outputs_agree(primary: &[Tensor], mirror: &[Tensor], tolerance: f64) -> bool {
    primary.len() == mirror.len()
        && primary.iter().all(|p| {
            mirror.iter().any(|m| {
                m.name() == p.name()
                    && m.dtype() == p.dtype()
                    && m.shape() == p.shape()
                    && match (p.to_f64_lossy(), m.to_f64_lossy()) {
                        (Some(a), Some(b)) => a
                            .iter()
                            .zip(&b)
                            .all(|(x, y)| (x - y).abs() <= tolerance || x == y),
                        _ => p.data() == m.data(),
                    }
            })
        })
}

impl Pipeline {
    /// Starts mirrored runs as they are queued, at most
    /// [`MIRROR_CONCURRENCY`] at once. Ends with the pipeline.
    pub(super) async fn run_mirrors(
        inner: std::sync::Weak<Inner>,
        mut rx: mpsc::Receiver<MirrorJob>,
    ) {
        let permits = Arc::new(tokio::sync::Semaphore::new(MIRROR_CONCURRENCY));
        while let Some(job) = rx.recv().await {
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                return;
            };
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let pipeline = Pipeline { inner };
            tokio::spawn(async move {
                pipeline.mirror(job).await;
                drop(permit);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_agree_within_the_tolerance_and_only_like_for_like() {
        let t = |name: &str, values: &[f32]| {
            Tensor::from_f32(name, vec![values.len() as i64], values).unwrap()
        };
        let primary = [t("y", &[1.0, 2.0])];
        assert!(outputs_agree(&primary, &[t("y", &[1.0005, 2.0])], 0.001));
        assert!(!outputs_agree(&primary, &[t("y", &[1.01, 2.0])], 0.001));
        assert!(
            !outputs_agree(&primary, &[t("z", &[1.0, 2.0])], 0.001),
            "other name"
        );
        assert!(
            !outputs_agree(&primary, &[t("y", &[1.0])], 0.001),
            "other shape"
        );
        assert!(!outputs_agree(&primary, &[], 0.001), "missing output");
        assert!(
            outputs_agree(&primary, &[t("y", &[1.0, 2.0])], 0.0),
            "exact"
        );
    }
}
