//! `plinth.v1.ComputeService`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::pb::{self, compute_service_server::ComputeService};
use super::{now_micros, status, status_to_pb, tensor_from_pb, tensor_to_pb};
use crate::deadline::queue_timeout;
use crate::error::Error;
use crate::listen::PortCounters;
use crate::pipeline::{Pipeline, PipelineRequest};
use crate::ports::{HostInfo, PortSet};

#[derive(Clone)]
pub struct ComputeApi {
    pipeline: Pipeline,
    health: Arc<crate::health::Health>,
    info: HostInfo,
    shutdown: CancellationToken,
    connections: PortSet<Arc<PortCounters>>,
}

impl ComputeApi {
    pub fn new(
        pipeline: Pipeline,
        health: Arc<crate::health::Health>,
        info: HostInfo,
        shutdown: CancellationToken,
        connections: PortSet<Arc<PortCounters>>,
    ) -> ComputeApi {
        ComputeApi {
            pipeline,
            health,
            info,
            shutdown,
            connections,
        }
    }

    async fn runtime_counters(&self, trim_allocator: bool) -> pb::RuntimeCounters {
        let open = |c: &PortCounters| c.open.load(Ordering::Relaxed);
        let rows = self.pipeline.registry().health_rows();
        let process =
            tokio::task::spawn_blocking(move || crate::health::process_counters(trim_allocator))
                .await
                .unwrap_or_default();
        pb::RuntimeCounters {
            tasks: tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks() as u64,
            open_streams: self.pipeline.open_streams(),
            open_connections: open(&self.connections.grpc)
                + open(&self.connections.http)
                + open(&self.connections.metrics),
            in_flight: rows.iter().map(|row| row.in_flight).sum(),
            queued: rows.iter().map(|row| row.queue_depth as u64).sum(),
            rss_bytes: process.rss_bytes,
            open_fds: process.open_fds,
            threads: process.threads,
        }
    }
}

async fn compute_one(
    pipeline: &Pipeline,
    headers: &tonic::metadata::MetadataMap,
    request: pb::ComputeRequest,
) -> Result<pb::ComputeResponse, Error> {
    if request.model.is_empty() {
        return Err(Error::InvalidArgument("field 'model' is empty".into()));
    }
    let version = (!request.version.is_empty()).then_some(request.version);
    let decoded = request
        .inputs
        .into_iter()
        .map(tensor_from_pb)
        .collect::<Result<Vec<_>, _>>()
        .and_then(|inputs| {
            let timeout = queue_timeout(request.parameters.get("timeout").map(String::as_str))?;
            Ok((inputs, timeout))
        });
    let (inputs, timeout) =
        decoded.map_err(|err| pipeline.reject(&request.model, version.as_deref(), err))?;
    let metadata = super::request_metadata(
        headers,
        request
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    let response = pipeline
        .infer(PipelineRequest {
            id: request.id.clone(),
            model: request.model,
            version,
            inputs,
            metadata,
            timeout,
            protocol: "plinth-v1-grpc",
            ..PipelineRequest::default()
        })
        .await?;
    Ok(pb::ComputeResponse {
        id: request.id,
        model: response.model,
        version: response.version,
        outputs: response.outputs.into_iter().map(tensor_to_pb).collect(),
        error: None,
    })
}

type ResponseStream = super::AnswerStream<pb::ComputeResponse>;

#[tonic::async_trait]
impl ComputeService for ComputeApi {
    async fn compute(
        &self,
        request: Request<pb::ComputeRequest>,
    ) -> Result<Response<pb::ComputeResponse>, Status> {
        let headers = request.metadata().clone();
        let request = request.into_inner();
        let span = tracing::debug_span!("compute", model = %request.model, id = %request.id);
        Ok(Response::new(
            compute_one(&self.pipeline, &headers, request)
                .instrument(span)
                .await
                .map_err(status)?,
        ))
    }

    type StreamComputeStream = ResponseStream;

    async fn stream_compute(
        &self,
        request: Request<Streaming<pb::ComputeRequest>>,
    ) -> Result<Response<Self::StreamComputeStream>, Status> {
        let pipeline = self.pipeline.clone();
        let headers = request.metadata().clone();
        let outbound = super::answer_in_order(
            request.into_inner(),
            &self.shutdown,
            self.pipeline.open_stream(),
            move |request| {
                let pipeline = pipeline.clone();
                let headers = headers.clone();
                async move {
                    let id = request.id.clone();
                    let model = request.model.clone();
                    compute_one(&pipeline, &headers, request)
                        .await
                        .unwrap_or_else(|err| {
                            let status = super::status(err);
                            pb::ComputeResponse {
                                id,
                                model,
                                version: String::new(),
                                outputs: Vec::new(),
                                error: Some(pb::Error {
                                    code: status.code() as i32,
                                    message: status.message().to_owned(),
                                }),
                            }
                        })
                }
            },
        );
        Ok(Response::new(outbound))
    }

    async fn ping(
        &self,
        _request: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        Ok(Response::new(pb::PingResponse {
            server_time_us: now_micros(),
        }))
    }

    async fn get_metrics(
        &self,
        _request: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        let pipeline = self.pipeline.clone();
        let text = tokio::task::spawn_blocking(move || crate::metrics::render(&pipeline))
            .await
            .map_err(|err| Status::internal(format!("rendering the metrics: {err}")))?;
        Ok(Response::new(pb::GetMetricsResponse { text }))
    }

    async fn get_info(
        &self,
        request: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::GetInfoResponse>, Status> {
        let trim = request.get_ref().trim_allocator;
        let runtime = self.runtime_counters(trim).await;
        let budget = self.pipeline.registry().thread_budget();
        let cuda = plinth_torch::init_cuda();
        let cpu = tokio::task::spawn_blocking(crate::health::cpu_memory)
            .await
            .ok()
            .flatten();
        let mut devices = vec![pb::Device {
            name: "cpu".into(),
            memory_total_bytes: cpu.as_ref().map_or(0, |m| m.total_bytes),
            memory_used_bytes: cpu.as_ref().map_or(0, |m| m.used_bytes),
        }];
        devices.extend((0..cuda.device_count).map(|idx| pb::Device {
            name: format!("cuda:{idx}"),
            memory_total_bytes: 0,
            memory_used_bytes: 0,
        }));
        Ok(Response::new(pb::GetInfoResponse {
            version: self.info.version.clone(),
            devices,
            thread_budget: Some(pb::ThreadBudget {
                cores: budget.cores as u32,
                intra_op_threads: budget.intra_op_threads as u32,
                inter_op_threads: budget.inter_op_threads as u32,
                executors: budget.executors as u32,
                torch_threads: budget.torch_threads as u32,
                cores_in_use: budget.cores_in_use as u32,
                cores_peak: budget.cores_peak as u32,
            }),
            models: self
                .pipeline
                .registry()
                .list()
                .into_iter()
                .map(status_to_pb)
                .collect(),
            libtorch_version: self.info.libtorch_version.clone(),
            cuda_available: cuda.device_count > 0,
            plugin_cache_bytes: self.pipeline.plugins().cache_bytes(),
            runtime: Some(runtime),
            residency: Some({
                let counts = self.pipeline.registry().residency_counts();
                pb::Residency {
                    memory_budget_bytes: counts.budget_bytes.unwrap_or(0),
                    hits: counts.hits,
                    misses: counts.misses,
                    on_demand_loads: counts.on_demand_loads,
                    on_demand_load_us_total: u64::try_from(counts.on_demand_load_time.as_micros())
                        .unwrap_or(u64::MAX),
                    evictions: counts.evictions,
                }
            }),
            not_ready_reason: if self.health.is_ready() {
                String::new()
            } else {
                self.health.verdict().message.clone()
            },
        }))
    }
}
