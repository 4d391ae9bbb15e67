//! The ceilings the benchmarks hold Plinth against: servers that do only
//! what any server on the same stack must do, and nothing else.
//!
//! - [`start_tonic`]: a bare tonic server answering Open Inference Protocol
//!   v2 `ModelInfer` by echoing the input as the output (decode, encode, no
//!   model): the ceiling for a Rust gRPC server on this machine.
//! - [`start_axum`]: a bare axum server answering the REST infer route the
//!   same way: it parses the JSON request into typed tensors and writes the
//!   same data back as the output, as a JSON server must.

use std::pin::Pin;

use futures::Stream;
use plinth::grpc::ipb;
use plinth::grpc::ipb::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use tonic::{Request, Response, Status};

struct Echo;

type EchoStream = Pin<Box<dyn Stream<Item = Result<ipb::ModelStreamInferResponse, Status>> + Send>>;

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented(
        "the echo server answers ModelInfer only",
    ))
}

#[tonic::async_trait]
impl GrpcInferenceService for Echo {
    async fn server_live(
        &self,
        _: Request<ipb::ServerLiveRequest>,
    ) -> Result<Response<ipb::ServerLiveResponse>, Status> {
        Ok(Response::new(ipb::ServerLiveResponse { live: true }))
    }
    async fn server_ready(
        &self,
        _: Request<ipb::ServerReadyRequest>,
    ) -> Result<Response<ipb::ServerReadyResponse>, Status> {
        Ok(Response::new(ipb::ServerReadyResponse { ready: true }))
    }
    async fn model_ready(
        &self,
        _: Request<ipb::ModelReadyRequest>,
    ) -> Result<Response<ipb::ModelReadyResponse>, Status> {
        Ok(Response::new(ipb::ModelReadyResponse { ready: true }))
    }
    async fn server_metadata(
        &self,
        _: Request<ipb::ServerMetadataRequest>,
    ) -> Result<Response<ipb::ServerMetadataResponse>, Status> {
        unimplemented()
    }
    async fn model_metadata(
        &self,
        _: Request<ipb::ModelMetadataRequest>,
    ) -> Result<Response<ipb::ModelMetadataResponse>, Status> {
        unimplemented()
    }
    async fn model_infer(
        &self,
        request: Request<ipb::ModelInferRequest>,
    ) -> Result<Response<ipb::ModelInferResponse>, Status> {
        let request = request.into_inner();
        let outputs = request
            .inputs
            .iter()
            .map(|input| ipb::model_infer_response::InferOutputTensor {
                name: "y".into(),
                datatype: input.datatype.clone(),
                shape: input.shape.clone(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(ipb::ModelInferResponse {
            model_name: request.model_name,
            model_version: "1".into(),
            id: request.id,
            outputs,
            raw_output_contents: request.raw_input_contents,
            ..Default::default()
        }))
    }
    type ModelStreamInferStream = EchoStream;
    async fn model_stream_infer(
        &self,
        _: Request<tonic::Streaming<ipb::ModelInferRequest>>,
    ) -> Result<Response<EchoStream>, Status> {
        unimplemented()
    }
    async fn model_config(
        &self,
        _: Request<ipb::ModelConfigRequest>,
    ) -> Result<Response<ipb::ModelConfigResponse>, Status> {
        unimplemented()
    }
    async fn model_statistics(
        &self,
        _: Request<ipb::ModelStatisticsRequest>,
    ) -> Result<Response<ipb::ModelStatisticsResponse>, Status> {
        unimplemented()
    }
    async fn repository_index(
        &self,
        _: Request<ipb::RepositoryIndexRequest>,
    ) -> Result<Response<ipb::RepositoryIndexResponse>, Status> {
        unimplemented()
    }
    async fn repository_model_load(
        &self,
        _: Request<ipb::RepositoryModelLoadRequest>,
    ) -> Result<Response<ipb::RepositoryModelLoadResponse>, Status> {
        unimplemented()
    }
    async fn repository_model_unload(
        &self,
        _: Request<ipb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<ipb::RepositoryModelUnloadResponse>, Status> {
        unimplemented()
    }

    async fn system_shared_memory_status(
        &self,
        _: Request<ipb::SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<ipb::SystemSharedMemoryStatusResponse>, Status> {
        unimplemented()
    }

    async fn system_shared_memory_register(
        &self,
        _: Request<ipb::SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<ipb::SystemSharedMemoryRegisterResponse>, Status> {
        unimplemented()
    }

    async fn system_shared_memory_unregister(
        &self,
        _: Request<ipb::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<ipb::SystemSharedMemoryUnregisterResponse>, Status> {
        unimplemented()
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<ipb::CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<ipb::CudaSharedMemoryStatusResponse>, Status> {
        unimplemented()
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<ipb::CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<ipb::CudaSharedMemoryRegisterResponse>, Status> {
        unimplemented()
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<ipb::CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<ipb::CudaSharedMemoryUnregisterResponse>, Status> {
        unimplemented()
    }
}

/// Starts the tonic echo on an ephemeral loopback port; returns host:port.
/// Messages up to `max_message_bytes` pass, as on the server it is held
/// against.
pub async fn start_tonic(max_message_bytes: usize) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                GrpcInferenceServiceServer::new(Echo)
                    .max_decoding_message_size(max_message_bytes)
                    .max_encoding_message_size(max_message_bytes),
            )
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    );
    addr.to_string()
}

#[derive(serde::Deserialize)]
struct RestInput {
    name: String,
    datatype: String,
    shape: Vec<i64>,
    data: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct RestRequest {
    inputs: Vec<RestInput>,
}

#[derive(serde::Serialize)]
struct RestOutput {
    name: String,
    datatype: String,
    shape: Vec<i64>,
    data: Vec<f32>,
}

#[derive(serde::Serialize)]
struct RestResponse {
    model_name: String,
    model_version: &'static str,
    outputs: Vec<RestOutput>,
}

async fn rest_echo(
    axum::extract::Path(model): axum::extract::Path<String>,
    axum::Json(request): axum::Json<RestRequest>,
) -> axum::Json<RestResponse> {
    axum::Json(RestResponse {
        model_name: model,
        model_version: "1",
        outputs: request
            .inputs
            .into_iter()
            .map(|input| RestOutput {
                name: format!("{}_out", input.name),
                datatype: input.datatype,
                shape: input.shape,
                data: input.data,
            })
            .collect(),
    })
}

/// Starts the axum echo of `POST /v2/models/{model}/infer` (FP32 `data`
/// arrays) on an ephemeral loopback port; returns its base URL.
pub async fn start_axum() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/v2/models/{model}/infer", axum::routing::post(rest_echo));
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}
