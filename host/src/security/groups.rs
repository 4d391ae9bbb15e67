//! The API groups (Triton's names) and which group each gRPC method and HTTP
//! route belongs to. Every route belongs to exactly one group. The gate
//! fails closed: a call it cannot put in a group is refused by the gate
//! itself and never reaches a handler. gRPC calls are classified by their
//! exact method path; HTTP calls by the route template the router matched
//! (`MatchedPath`), so the table and the router cannot disagree. The tests
//! hold the tables against the real routes: every method of the served gRPC
//! services (read from their descriptors) and every route of the HTTP
//! router, in both directions.

use std::fmt;
use std::str::FromStr;

/// One group of calls that access rules name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ApiGroup {
    Health,
    Metadata,
    Inference,
    Statistics,
    ModelRepository,
    Plugins,
    /// Registering shared-memory regions: it maps memory into the server.
    SharedMemory,
}

impl ApiGroup {
    pub const ALL: [ApiGroup; 7] = [
        ApiGroup::Health,
        ApiGroup::Metadata,
        ApiGroup::Inference,
        ApiGroup::Statistics,
        ApiGroup::ModelRepository,
        ApiGroup::Plugins,
        ApiGroup::SharedMemory,
    ];

    /// The name used in the auth config, logs and denials.
    pub fn name(self) -> &'static str {
        match self {
            ApiGroup::Health => "health",
            ApiGroup::Metadata => "metadata",
            ApiGroup::Inference => "inference",
            ApiGroup::Statistics => "statistics",
            ApiGroup::ModelRepository => "model-repository",
            ApiGroup::Plugins => "plugins",
            ApiGroup::SharedMemory => "shared-memory",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for ApiGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ApiGroup {
    type Err = String;

    fn from_str(s: &str) -> Result<ApiGroup, String> {
        ApiGroup::ALL
            .into_iter()
            .find(|g| g.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown API group {s:?}: expected one of {} (or \"all\")",
                    GroupSet::all()
                )
            })
    }
}

/// A set of groups.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupSet(u8);

impl GroupSet {
    pub const fn empty() -> GroupSet {
        GroupSet(0)
    }

    pub fn all() -> GroupSet {
        ApiGroup::ALL.into_iter().collect()
    }

    pub fn contains(self, group: ApiGroup) -> bool {
        self.0 & group.bit() != 0
    }

    pub fn insert(&mut self, group: ApiGroup) {
        self.0 |= group.bit();
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = ApiGroup> {
        ApiGroup::ALL.into_iter().filter(move |g| self.contains(*g))
    }

    /// Parses config names; `"all"` stands for every group.
    pub fn parse(names: &[String]) -> Result<GroupSet, String> {
        let mut set = GroupSet::empty();
        for name in names {
            if name == "all" {
                set = GroupSet::all();
            } else {
                set.insert(name.parse()?);
            }
        }
        Ok(set)
    }
}

impl FromIterator<ApiGroup> for GroupSet {
    fn from_iter<I: IntoIterator<Item = ApiGroup>>(iter: I) -> GroupSet {
        let mut set = GroupSet::empty();
        for group in iter {
            set.insert(group);
        }
        set
    }
}

impl fmt::Display for GroupSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<&str> = self.iter().map(ApiGroup::name).collect();
        f.write_str(&names.join(", "))
    }
}

impl fmt::Debug for GroupSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{self}}}")
    }
}

/// gRPC methods by full path (`/package.Service/Method`).
pub const GRPC_METHODS: &[(&str, ApiGroup)] = {
    use ApiGroup::*;
    &[
        ("/grpc.health.v1.Health/Check", Health),
        ("/grpc.health.v1.Health/Watch", Health),
        ("/inference.GRPCInferenceService/ServerLive", Health),
        ("/inference.GRPCInferenceService/ServerReady", Health),
        ("/inference.GRPCInferenceService/ServerMetadata", Metadata),
        ("/inference.GRPCInferenceService/ModelMetadata", Metadata),
        ("/inference.GRPCInferenceService/ModelReady", Metadata),
        ("/inference.GRPCInferenceService/ModelConfig", Metadata),
        ("/inference.GRPCInferenceService/ModelInfer", Inference),
        (
            "/inference.GRPCInferenceService/ModelStreamInfer",
            Inference,
        ),
        (
            "/inference.GRPCInferenceService/ModelStatistics",
            Statistics,
        ),
        (
            "/inference.GRPCInferenceService/RepositoryIndex",
            ModelRepository,
        ),
        (
            "/inference.GRPCInferenceService/RepositoryModelLoad",
            ModelRepository,
        ),
        (
            "/inference.GRPCInferenceService/RepositoryModelUnload",
            ModelRepository,
        ),
        (
            "/inference.GRPCInferenceService/SystemSharedMemoryStatus",
            SharedMemory,
        ),
        (
            "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
            SharedMemory,
        ),
        (
            "/inference.GRPCInferenceService/SystemSharedMemoryUnregister",
            SharedMemory,
        ),
        (
            "/inference.GRPCInferenceService/CudaSharedMemoryStatus",
            SharedMemory,
        ),
        (
            "/inference.GRPCInferenceService/CudaSharedMemoryRegister",
            SharedMemory,
        ),
        (
            "/inference.GRPCInferenceService/CudaSharedMemoryUnregister",
            SharedMemory,
        ),
        ("/plinth.v1.ComputeService/Ping", Metadata),
        ("/plinth.v1.ComputeService/GetInfo", Metadata),
        ("/plinth.v1.ComputeService/GetMetrics", Statistics),
        ("/plinth.v1.ComputeService/Compute", Inference),
        ("/plinth.v1.ComputeService/StreamCompute", Inference),
        ("/plinth.v1.ModelService/ListModels", Metadata),
        ("/plinth.v1.ModelService/GetModel", Metadata),
        ("/plinth.v1.ModelService/WatchModels", Metadata),
        ("/plinth.v1.ModelService/LoadModel", ModelRepository),
        ("/plinth.v1.ModelService/UnloadModel", ModelRepository),
        ("/plinth.v1.PluginService/ListPlugins", Plugins),
        ("/plinth.v1.PluginService/GetPlugin", Plugins),
        ("/plinth.v1.PluginService/ReloadPlugins", Plugins),
        (
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            Metadata,
        ),
    ]
};

/// HTTP routes as templates (`{name}` matches one path segment), on the
/// HTTP port and (`/metrics`) the metrics port.
pub const HTTP_ROUTES: &[(&str, ApiGroup)] = {
    use ApiGroup::*;
    &[
        ("/v2/health/live", Health),
        ("/v2/health/ready", Health),
        ("/v2", Metadata),
        ("/v2/models/stats", Statistics),
        ("/v2/models/{model}", Metadata),
        ("/v2/models/{model}/ready", Metadata),
        ("/v2/models/{model}/config", Metadata),
        ("/v2/models/{model}/stats", Statistics),
        ("/v2/models/{model}/infer", Inference),
        ("/v2/models/{model}/versions/{version}", Metadata),
        ("/v2/models/{model}/versions/{version}/ready", Metadata),
        ("/v2/models/{model}/versions/{version}/config", Metadata),
        ("/v2/models/{model}/versions/{version}/stats", Statistics),
        ("/v2/models/{model}/versions/{version}/infer", Inference),
        ("/v2/repository/index", ModelRepository),
        ("/v2/repository/models/{model}/load", ModelRepository),
        ("/v2/repository/models/{model}/unload", ModelRepository),
        ("/v2/systemsharedmemory/status", SharedMemory),
        ("/v2/systemsharedmemory/unregister", SharedMemory),
        (
            "/v2/systemsharedmemory/region/{region}/status",
            SharedMemory,
        ),
        (
            "/v2/systemsharedmemory/region/{region}/register",
            SharedMemory,
        ),
        (
            "/v2/systemsharedmemory/region/{region}/unregister",
            SharedMemory,
        ),
        ("/v2/cudasharedmemory/status", SharedMemory),
        ("/v2/cudasharedmemory/unregister", SharedMemory),
        ("/v2/cudasharedmemory/region/{region}/status", SharedMemory),
        (
            "/v2/cudasharedmemory/region/{region}/register",
            SharedMemory,
        ),
        (
            "/v2/cudasharedmemory/region/{region}/unregister",
            SharedMemory,
        ),
        ("/metrics", Statistics),
    ]
};

/// The group of the gRPC method at `path`, by exact match: `None` for
/// anything else, which the gate refuses without calling the router.
pub fn grpc_group(path: &str) -> Option<ApiGroup> {
    GRPC_METHODS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, group)| *group)
}

/// The group of the HTTP route whose template the router matched
/// (`MatchedPath`), by exact match of the template: the gate never parses
/// the request path itself, so it cannot disagree with the router.
pub fn http_group(template: &str) -> Option<ApiGroup> {
    HTTP_ROUTES
        .iter()
        .find(|(t, _)| *t == template)
        .map(|(_, group)| *group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_classified_by_exact_method_or_template() {
        use ApiGroup::*;
        let grpc = [
            ("/plinth.v1.PluginService/ReloadPlugins", Some(Plugins)),
            ("/plinth.v1.ModelService/LoadModel", Some(ModelRepository)),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Some(Metadata),
            ),
            (
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                None,
            ),
            ("/plinth.v1.ComputeService/Compute/", None),
            ("//plinth.v1.ComputeService/Compute", None),
            ("/plinth.v1.PluginService/Unknown", None),
            ("/v2/models/scale/infer", None),
            ("/", None),
        ];
        for (path, want) in grpc {
            assert_eq!(grpc_group(path), want, "{path}");
        }
        let http = [
            ("/v2/health/ready", Some(Health)),
            ("/v2", Some(Metadata)),
            ("/v2/models/stats", Some(Statistics)),
            (
                "/v2/models/{model}/versions/{version}/infer",
                Some(Inference),
            ),
            ("/v2/repository/models/{model}/load", Some(ModelRepository)),
            ("/metrics", Some(Statistics)),
            ("/v2/models/scale/infer", None),
            ("/v2/", None),
            ("/", None),
        ];
        for (template, want) in http {
            assert_eq!(http_group(template), want, "{template}");
        }
    }

    #[test]
    fn group_names_round_trip_and_all_expands() {
        for group in ApiGroup::ALL {
            assert_eq!(group.name().parse::<ApiGroup>(), Ok(group));
        }
        let err = "admin".parse::<ApiGroup>().unwrap_err();
        assert!(
            err.contains("\"admin\"") && err.contains("model-repository"),
            "{err}"
        );
        assert_eq!(GroupSet::parse(&["all".into()]), Ok(GroupSet::all()));
        let set = GroupSet::parse(&["plugins".into(), "health".into()]).unwrap();
        assert_eq!(set.to_string(), "health, plugins");
    }
}
