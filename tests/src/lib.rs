//! Shared pieces of the integration tests and benchmarks: a real server on
//! ephemeral loopback ports, tonic clients, and TorchScript fixtures traced
//! from Rust with known weights.

use std::path::{Path, PathBuf};
use std::time::Duration;

use plinth::grpc::pb;
use plinth::grpc::pb::compute_service_client::ComputeServiceClient;
use plinth::grpc::pb::model_service_client::ModelServiceClient;
use tonic::transport::Channel;

pub use plinth::grpc::pb::{DataType, ModelState};

pub mod fixtures;

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

    pub fn running(&self) -> &plinth::RunningServer {
        self.server.as_ref().expect("server is running")
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.running().grpc_addr)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.running().http_addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.grpc_url())
            .expect("valid url")
            .connect()
            .await
            .expect("connects to the gRPC port")
    }

    pub async fn compute(&self) -> ComputeServiceClient<Channel> {
        ComputeServiceClient::new(self.channel().await).max_decoding_message_size(usize::MAX)
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

    pub async fn status(&self, name: &str) -> pb::ModelStatus {
        let response = self
            .models()
            .await
            .get_model(pb::GetModelRequest { name: name.into() })
            .await
            .expect("GetModel");
        response
            .into_inner()
            .model
            .expect("detail")
            .status
            .expect("status")
    }

    /// Polls GetModel until `pred` holds. Tests bound it by an event count,
    /// not by time: a stuck server fails through the test harness timeout.
    pub async fn wait_for(
        &self,
        name: &str,
        pred: impl Fn(&pb::ModelStatus) -> bool,
    ) -> pb::ModelStatus {
        loop {
            let status = self.status(name).await;
            if pred(&status) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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
