//! `plinth.v1.ModelService`.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::pb::{self, model_service_server::ModelService};
use super::{spec_to_pb, status, status_to_pb};
use crate::config::ModelConfig;
use crate::error::Error;
use crate::registry::{LoadMode, Registry};

#[derive(Clone)]
pub struct ModelApi {
    registry: Registry,
    shutdown: CancellationToken,
}

impl ModelApi {
    pub fn new(registry: Registry, shutdown: CancellationToken) -> ModelApi {
        ModelApi { registry, shutdown }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::ModelStatus, Status>> + Send>>;

#[tonic::async_trait]
impl ModelService for ModelApi {
    async fn load_model(
        &self,
        request: Request<pb::LoadModelRequest>,
    ) -> Result<Response<pb::LoadModelResponse>, Status> {
        let request = request.into_inner();
        let mode = if request.reload {
            LoadMode::Reload
        } else {
            LoadMode::Load
        };
        let ticket = self
            .registry
            .load(&request.name, mode)
            .await
            .map_err(status)?;
        let status = if request.wait {
            ticket.finished().await.map_err(status)?
        } else {
            ticket.status
        };
        Ok(Response::new(pb::LoadModelResponse {
            status: Some(status_to_pb(status)),
        }))
    }

    async fn unload_model(
        &self,
        request: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        let status = self
            .registry
            .unload(&request.into_inner().name)
            .map_err(status)?;
        Ok(Response::new(pb::UnloadModelResponse {
            status: Some(status_to_pb(status)),
        }))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = self.registry.list().into_iter().map(status_to_pb).collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::GetModelResponse>, Status> {
        let name = request.into_inner().name;
        let status = self.registry.status(&name).map_err(status)?;
        let serving = self.registry.serving(&name);
        // A model that is not loaded still shows its declared config when it parses.
        let config = match &serving {
            Some(model) => Some((*model.config).clone()),
            None => {
                let dir = self.registry.repository().model_dir(&name);
                tokio::task::spawn_blocking(move || ModelConfig::load(&dir).ok())
                    .await
                    .map_err(|err| super::status(Error::Internal(err.to_string())))?
            }
        };
        let (success_count, failure_count) = serving.as_ref().map_or((0, 0), |m| m.counts());
        let mut detail = pb::ModelDetail {
            status: Some(status_to_pb(status)),
            success_count,
            failure_count,
            intra_op_threads: serving.as_ref().map_or(0, |m| m.intra_op_threads as u32),
            ..Default::default()
        };
        if let Some(config) = config {
            detail.inputs = config.inputs.iter().map(spec_to_pb).collect();
            detail.outputs = config.outputs.iter().map(spec_to_pb).collect();
            detail.max_batch_size = config.max_batch_size as u32;
            detail.instances = config.instances as u32;
            detail.preprocess = config.preprocess;
            detail.postprocess = config.postprocess;
        }
        Ok(Response::new(pb::GetModelResponse {
            model: Some(detail),
        }))
    }

    type WatchModelsStream = WatchStream;

    async fn watch_models(
        &self,
        request: Request<pb::WatchModelsRequest>,
    ) -> Result<Response<Self::WatchModelsStream>, Status> {
        let filter = request.into_inner().name;
        // Subscribe before taking the snapshot so no change falls between them.
        let events = self.registry.subscribe();
        let registry = self.registry.clone();
        let matches = move |name: &str| filter.is_empty() || filter == name;
        let snapshot =
            |registry: &Registry, matches: &dyn Fn(&str) -> bool| -> Vec<pb::ModelStatus> {
                registry
                    .list()
                    .into_iter()
                    .filter(|s| matches(&s.name))
                    .map(status_to_pb)
                    .collect()
            };
        let initial = snapshot(&registry, &matches);
        let changes = futures::stream::unfold(
            (events, registry, matches),
            move |(mut events, registry, matches)| async move {
                loop {
                    match events.recv().await {
                        Ok(status) if matches(&status.name) => {
                            return Some((vec![status_to_pb(status)], (events, registry, matches)));
                        }
                        Ok(_) => continue,
                        // Fell behind: send the whole current picture instead of the missed changes.
                        Err(RecvError::Lagged(_)) => {
                            let all = snapshot(&registry, &matches);
                            return Some((all, (events, registry, matches)));
                        }
                        Err(RecvError::Closed) => return None,
                    }
                }
            },
        )
        .flat_map(futures::stream::iter);
        let stream = futures::stream::iter(initial)
            .chain(changes)
            .map(Ok)
            .take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }
}
