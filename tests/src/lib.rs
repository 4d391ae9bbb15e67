//! Shared pieces of the integration tests and benchmarks: a real server on
//! ephemeral loopback ports, tonic clients, and TorchScript fixtures traced
//! from Rust with known weights.

use std::path::{Path, PathBuf};

use plinth::grpc::pb;
use plinth::grpc::pb::compute_service_client::ComputeServiceClient;
use plinth::grpc::pb::model_service_client::ModelServiceClient;
use tonic::transport::Channel;

pub use plinth::grpc::pb::{DataType, ModelState};

pub mod echo;
mod eventually;
pub mod fixtures;
pub mod fuzzing;
pub mod load;
pub mod otlp;
pub mod pki;

pub use eventually::{Attempt, PATIENCE, eventually};

/// A running host over a temporary model repository.
pub struct TestServer {
    pub server: Option<plinth::RunningServer>,
    pub repo: tempfile::TempDir,
    pub plugins: tempfile::TempDir,
}

impl TestServer {
    /// Starts a host over a repository prepared by `fill`; nothing is loaded
    /// at startup unless `load_all` is set.
    pub async fn start(fill: impl FnOnce(&Path), load_all: bool) -> TestServer {
        TestServer::start_with(fill, |config| config.load_all = load_all).await
    }

    pub async fn start_with(
        fill: impl FnOnce(&Path),
        tweak: impl FnOnce(&mut plinth::ServerConfig),
    ) -> TestServer {
        let repo = tempfile::tempdir().expect("temp repo");
        let plugins = tempfile::tempdir().expect("temp plugin dir");
        fill(repo.path());
        let mut config = plinth::ServerConfig::ephemeral(repo.path(), plugins.path());
        tweak(&mut config);
        let server = plinth::start(config).await.expect("server starts");
        TestServer {
            server: Some(server),
            repo,
            plugins,
        }
    }

    /// Drains and stops the server, returning once every model is unloaded
    /// and its executor threads have ended.
    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }

    pub fn running(&self) -> &plinth::RunningServer {
        self.server.as_ref().expect("server is running")
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.running().grpc_addr)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.running().http_addr)
    }

    /// A channel whose every call is bounded by [`PATIENCE`] (until the
    /// response headers, so a stream's messages are not), so that an RPC
    /// the server never answers fails the test instead of hanging it.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.grpc_url())
            .expect("valid url")
            .timeout(PATIENCE)
            .connect()
            .await
            .expect("connects to the gRPC port")
    }

    pub async fn compute(&self) -> ComputeServiceClient<Channel> {
        ComputeServiceClient::new(self.channel().await).max_decoding_message_size(usize::MAX)
    }

    /// A client of the Open Inference Protocol's `GRPCInferenceService`.
    pub async fn inference(
        &self,
    ) -> plinth::grpc::ipb::grpc_inference_service_client::GrpcInferenceServiceClient<Channel> {
        plinth::grpc::ipb::grpc_inference_service_client::GrpcInferenceServiceClient::new(
            self.channel().await,
        )
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
    }

    pub async fn models(&self) -> ModelServiceClient<Channel> {
        ModelServiceClient::new(self.channel().await)
    }

    /// Loads a model and waits for the outcome.
    pub async fn load(&self, name: &str) -> Result<pb::ModelStatus, tonic::Status> {
        let response = self
            .models()
            .await
            .load_model(pb::LoadModelRequest {
                name: name.into(),
                reload: false,
                wait: true,
            })
            .await?;
        Ok(response.into_inner().status.expect("status"))
    }

    /// GetModel's answer for `name`.
    pub async fn detail(&self, name: &str) -> pb::ModelDetail {
        self.models()
            .await
            .get_model(pb::GetModelRequest { name: name.into() })
            .await
            .expect("GetModel")
            .into_inner()
            .model
            .expect("detail")
    }

    pub async fn status(&self, name: &str) -> pb::ModelStatus {
        self.detail(name).await.status.expect("status")
    }

    /// `name` as ListModels shows it, if it is listed.
    pub async fn listed(&self, name: &str) -> Option<pb::ModelStatus> {
        self.models()
            .await
            .list_models(pb::ListModelsRequest {})
            .await
            .expect("ListModels answers")
            .into_inner()
            .models
            .into_iter()
            .find(|m| m.name == name)
    }

    /// GetInfo's answer.
    pub async fn info(&self) -> pb::GetInfoResponse {
        self.compute()
            .await
            .get_info(pb::GetInfoRequest::default())
            .await
            .expect("GetInfo answers")
            .into_inner()
    }

    /// Waits until `name` is READY (see [`TestServer::wait_for`]).
    pub async fn wait_ready(&self, name: &str) -> pb::ModelStatus {
        self.wait_for(name, |s| s.state == ModelState::Ready as i32)
            .await
    }

    /// The Open Inference Protocol statistics of `name`, all versions.
    pub async fn model_stats(&self, name: &str) -> plinth::grpc::ipb::ModelStatistics {
        model_stats_via(self.inference().await, name).await
    }

    /// Polls GetModel until `pred` holds (bounded by [`PATIENCE`]).
    pub async fn wait_for(
        &self,
        name: &str,
        pred: impl Fn(&pb::ModelStatus) -> bool,
    ) -> pb::ModelStatus {
        let what = format!("model '{name}' to reach the expected state");
        eventually(PATIENCE, &what, async || {
            let status = self.status(name).await;
            if pred(&status) {
                Ok(status)
            } else {
                Err(format!("{status:?}"))
            }
        })
        .await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(server) = &self.server {
            server.trigger().cancel();
        }
    }
}

/// An f32 tensor message.
pub fn f32_tensor(name: &str, shape: &[i64], values: &[f32]) -> pb::Tensor {
    pb::Tensor {
        name: name.into(),
        dtype: DataType::Float32 as i32,
        shape: shape.to_vec(),
        data: values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
    }
}

/// The values of an f32 tensor message.
pub fn f32_values(tensor: &pb::Tensor) -> Vec<f32> {
    assert_eq!(
        tensor.dtype,
        DataType::Float32 as i32,
        "tensor '{}' is not f32",
        tensor.name
    );
    tensor
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

pub fn compute_request(model: &str, inputs: Vec<pb::Tensor>) -> pb::ComputeRequest {
    pb::ComputeRequest {
        id: String::new(),
        model: model.into(),
        version: String::new(),
        inputs,
        parameters: Default::default(),
    }
}

/// Path of a model's version file in a repository.
pub fn model_file(repo: &Path, model: &str, version: &str) -> PathBuf {
    repo.join(model).join(version).join("model.pt")
}

/// A plugin component built by `cargo xtask plugins` (`cargo xtask test` builds them first).
pub fn plugin_wasm(file_stem: &str) -> PathBuf {
    let dir = std::env::var_os("PLINTH_PLUGIN_WASM_DIR").unwrap_or_else(|| {
        panic!("PLINTH_PLUGIN_WASM_DIR is not set: run the tests with `cargo xtask test`, which builds the plugins first")
    });
    let path = PathBuf::from(dir).join(format!("{file_stem}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask plugins`",
        path.display()
    );
    path
}

/// Drops a plugin into a plugin directory as `<name>.wasm` the way a careful
/// deployment does (write beside, rename in), with an optional manifest.
pub fn install_plugin(dir: &Path, name: &str, component: &str, manifest: Option<&str>) {
    if let Some(text) = manifest {
        let staging = dir.join(format!(".{name}.toml.partial"));
        std::fs::write(&staging, text).expect("write manifest");
        std::fs::rename(&staging, dir.join(format!("{name}.toml"))).expect("rename manifest");
    }
    let staging = dir.join(format!(".{name}.wasm.partial"));
    std::fs::copy(plugin_wasm(component), &staging).expect("copy component");
    std::fs::rename(&staging, dir.join(format!("{name}.wasm"))).expect("rename component");
}

/// The Open Inference Protocol statistics of `name`, all versions, from
/// whichever server `client` talks to (an in-process one, or a `plinth
/// serve` process).
pub async fn model_stats_via(
    mut client: plinth::grpc::ipb::grpc_inference_service_client::GrpcInferenceServiceClient<
        Channel,
    >,
    name: &str,
) -> plinth::grpc::ipb::ModelStatistics {
    client
        .model_statistics(plinth::grpc::ipb::ModelStatisticsRequest {
            name: name.into(),
            version: String::new(),
        })
        .await
        .expect("ModelStatistics")
        .into_inner()
        .model_stats
        .remove(0)
}

impl TestServer {
    pub async fn plugin_api(&self) -> pb::plugin_service_client::PluginServiceClient<Channel> {
        pb::plugin_service_client::PluginServiceClient::new(self.channel().await)
    }

    /// Polls GetPlugin until `pred` holds (bounded by [`PATIENCE`]).
    pub async fn wait_plugin(
        &self,
        name: &str,
        pred: impl Fn(&pb::PluginStatus) -> bool,
    ) -> pb::PluginStatus {
        let mut api = self.plugin_api().await;
        let what = format!("plugin '{name}' to reach the expected state");
        eventually(PATIENCE, &what, async || {
            // NotFound until the watcher has seen the file: that is "not yet".
            let status = api
                .get_plugin(pb::GetPluginRequest { name: name.into() })
                .await
                .map_err(|err| format!("GetPlugin: {err}"))?
                .into_inner();
            if pred(&status) {
                Ok(status)
            } else {
                Err(format!("{status:?}"))
            }
        })
        .await
    }

    /// GET on the HTTP port: status code and body (text).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        self.http(reqwest::Method::GET, path, &[], Vec::new())
            .await
            .status_and_text()
    }

    /// POST on the HTTP port: status code and body (text).
    pub async fn http_post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String) {
        self.http(reqwest::Method::POST, path, headers, body.to_vec())
            .await
            .status_and_text()
    }

    /// Any request on the HTTP port, answered with the raw body and the
    /// headers (for binary bodies, such as the binary tensor extension).
    pub async fn http(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> HttpResponse {
        http_send(self.running().http_addr, method, path, headers, body).await
    }

    /// GET /metrics on the metrics port: status code and body.
    pub async fn metrics(&self) -> (u16, String) {
        http_send(
            self.running().metrics_addr,
            reqwest::Method::GET,
            "/metrics",
            &[],
            Vec::new(),
        )
        .await
        .status_and_text()
    }
}

/// An HTTP answer: status, headers and the body as sent.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: bytes::Bytes,
}

impl HttpResponse {
    /// The status and the body as text; panics, naming the status, on a
    /// body that is not UTF-8 (read [`HttpResponse::body`] for those).
    pub fn status_and_text(self) -> (u16, String) {
        let text = String::from_utf8(self.body.to_vec()).unwrap_or_else(|err| {
            panic!(
                "HTTP {} body is not UTF-8 ({err}): read HttpResponse::body",
                self.status
            )
        });
        (self.status, text)
    }
}

/// One HTTP request to a server on this machine: status code and body
/// (text). Kept for callers that hold an address, not a [`TestServer`].
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let method = reqwest::Method::from_bytes(method.as_bytes())
        .unwrap_or_else(|err| panic!("HTTP method {method:?}: {err}"));
    http_send(addr, method, path, headers, body.to_vec())
        .await
        .status_and_text()
}

/// Sends one request with a client of its own (a test's runtime ends with
/// the test, so no pooled connection may outlive it), bounded by
/// [`PATIENCE`] so that a server that never answers fails the test.
async fn http_send(
    addr: std::net::SocketAddr,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> HttpResponse {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(PATIENCE)
        .build()
        .expect("HTTP client");
    let url = format!("http://{addr}{path}");
    let mut request = client.request(method.clone(), &url).body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|err| panic!("{method} {url}: {err:?}"));
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .bytes()
        .await
        .unwrap_or_else(|err| panic!("{method} {url}: reading the body: {err:?}"));
    HttpResponse {
        status,
        headers,
        body,
    }
}
