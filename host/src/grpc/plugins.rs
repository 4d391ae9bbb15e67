//! `plinth.v1.PluginService`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tonic::{Request, Response, Status};

use super::pb::{self, plugin_service_server::PluginService};
use super::{micros_since_epoch, status};
use crate::error::Error;
use crate::plugin::{PluginHost, PluginReport};

#[derive(Clone)]
pub struct PluginApi {
    plugins: Arc<PluginHost>,
}

impl PluginApi {
    pub fn new(plugins: Arc<PluginHost>) -> PluginApi {
        PluginApi { plugins }
    }
}

fn report_to_pb(report: PluginReport) -> pb::PluginStatus {
    let mut status = pb::PluginStatus {
        name: report.name,
        load_error: report.failure.map(|f| f.reason).unwrap_or_default(),
        compiling: report.compiling,
        ..Default::default()
    };
    if let Some(plugin) = report.plugin {
        status.world = plugin.kind.world().to_owned();
        status.version = plugin.info.version.clone();
        status.description = plugin.info.description.clone();
        status.file_hash = plugin.file_hash.clone();
        status.loaded_at_us = micros_since_epoch(plugin.loaded_at);
        status.calls = plugin.stats.calls.load(Ordering::Relaxed);
        status.errors = plugin.stats.errors.load(Ordering::Relaxed);
        status.skips = plugin.stats.skips.load(Ordering::Relaxed);
        status.recycled = plugin.stats.recycled.load(Ordering::Relaxed);
        status.last_error = plugin.stats.last_error.lock().clone().unwrap_or_default();
        status.serving = true;
    }
    status
}

impl PluginApi {
    fn find(&self, name: &str) -> Option<pb::PluginStatus> {
        self.plugins
            .list()
            .into_iter()
            .find(|r| r.name == name)
            .map(report_to_pb)
    }
}

#[tonic::async_trait]
impl PluginService for PluginApi {
    async fn list_plugins(
        &self,
        _request: Request<pb::ListPluginsRequest>,
    ) -> Result<Response<pb::ListPluginsResponse>, Status> {
        Ok(Response::new(pb::ListPluginsResponse {
            plugins: self.plugins.list().into_iter().map(report_to_pb).collect(),
            load_failures: self.plugins.load_failures.load(Ordering::Relaxed),
        }))
    }

    async fn get_plugin(
        &self,
        request: Request<pb::GetPluginRequest>,
    ) -> Result<Response<pb::PluginStatus>, Status> {
        let name = request.into_inner().name;
        self.find(&name).map(Response::new).ok_or_else(|| {
            status(Error::NotFound(format!(
                "plugin '{name}' is not in the plugin directory"
            )))
        })
    }

    async fn reload_plugins(
        &self,
        request: Request<pb::ReloadPluginsRequest>,
    ) -> Result<Response<pb::ReloadPluginsResponse>, Status> {
        let name = request.into_inner().name;
        let names: Vec<String> = if name.is_empty() {
            self.plugins
                .rescan()
                .await
                .into_iter()
                .map(|(name, _)| name)
                .collect()
        } else {
            if !crate::config::valid_model_name(&name) {
                return Err(status(Error::InvalidArgument(format!(
                    "'{name}' is not a plugin name"
                ))));
            }
            let _ = self.plugins.load(&name).await;
            vec![name]
        };
        Ok(Response::new(pb::ReloadPluginsResponse {
            plugins: names.iter().filter_map(|n| self.find(n)).collect(),
        }))
    }
}
