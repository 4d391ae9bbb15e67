//! Assembles the host: registry, startup loads, gRPC and HTTP servers, the
//! repository watcher, and shutdown with draining. Tests start it in-process
//! on ephemeral ports through [`start`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::config::ModelRepository;
use crate::grpc;
use crate::health::Health;
use crate::listen::{ConnectionLimits, Port, PortCounters};
use crate::pipeline::Pipeline;
use crate::plugin::{PluginHost, PluginWatcher};
pub use crate::ports::{HostInfo, PortSet};
use crate::registry::{LoadMode, Registry, RegistrySettings};
use crate::security::{Classify, PortProtocols, ReloadHandle, Security, SecurityConfig};

/// Everything `plinth serve` can be told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A repository of model directories, or one model directory (then
    /// named by `model_name`).
    pub model_repository: PathBuf,
    /// The name of the model when `model_repository` is itself a model
    /// directory (KServe's single-model layout); ignored otherwise.
    pub model_name: Option<String>,
    /// Start even when the repository holds no model (to be filled later
    /// under `--poll`); otherwise an empty repository is an error.
    pub allow_empty: bool,
    pub plugin_dir: PathBuf,
    /// Where compiled plugins are cached; `None`: outside the plugin
    /// directory, per user (`plugin::cache::default_dir`).
    pub plugin_cache_dir: Option<PathBuf>,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// Prometheus `/metrics`.
    pub metrics_addr: SocketAddr,
    /// The compute budget: cores' worth of torch work that may run at once
    /// over every model; `None` uses every available core.
    pub threads: Option<usize>,
    pub max_concurrent_loads: usize,
    /// How long an idle model executor polls its queue before it parks.
    pub executor_spin: Duration,
    /// Requests of at most this many input bytes may run their forward
    /// pass on their own thread (0: never).
    pub inline_forward_max_bytes: usize,
    /// The memory budget per device, in bytes: before a load would pass
    /// it, idle on-demand models are evicted, least recently used first.
    pub memory_budget: Option<u64>,
    /// How deep orchestrators' model calls may nest.
    pub max_call_depth: u32,
    /// The longest a mirrored run may take (`--mirror-timeout-s`).
    pub mirror_timeout: Duration,
    /// Largest gRPC message accepted or sent, and largest HTTP request body.
    pub max_message_bytes: usize,
    /// Watch the repository and load, reload or unload on change.
    pub poll: bool,
    /// Load every model of the repository at startup.
    pub load_all: bool,
    /// Watch the plugin directory and hot-reload plugins as files change.
    pub watch_plugins: bool,
    /// Readiness waits until every plugin file present at startup has
    /// loaded or failed (they load in the background either way).
    pub wait_for_plugins: bool,
    /// How often health plugins re-judge the host when nothing changes.
    /// Ready only when every model loaded at startup is READY (Triton's
    /// `--strict-readiness`, on by default); off: once the startup loads
    /// have finished, whatever became of them.
    pub strict_readiness: bool,
    pub health_period: Duration,
    /// Room in the broadcast of model state changes (WatchModels, the
    /// `--poll` watcher, the health monitor). A subscriber that falls further
    /// behind resyncs from the registry.
    pub state_events_capacity: usize,
    /// The auth config and TLS files.
    pub security: SecurityConfig,
    /// Bounds on each client's connections, headers and streams.
    pub limits: ConnectionLimits,
    /// On SIGHUP, rescan the plugin directory and reload the auth config,
    /// the tokens and the TLS files. The binary sets it; a library user
    /// that owns its signals leaves it off and calls
    /// [`RunningServer::reload_security`].
    pub reload_on_sighup: bool,
    /// After the servers stop accepting: how long the drain (requests in
    /// flight, then model unloads) may take before the process exits anyway.
    pub drain_timeout: Duration,
    /// OpenTelemetry traces of requests; `None`: off.
    pub tracing: Option<crate::telemetry::TracingConfig>,
    /// The per-model serving series on `/metrics` (on unless measuring
    /// what they cost).
    pub serving_metrics: bool,
}

impl ServerConfig {
    /// Loopback, ephemeral ports: what tests use. The compile cache sits
    /// in the (private, temporary) plugin directory, so that it goes with
    /// it instead of piling up in the user's cache.
    pub fn ephemeral(
        model_repository: impl Into<PathBuf>,
        plugin_dir: impl Into<PathBuf>,
    ) -> ServerConfig {
        let plugin_dir = plugin_dir.into();
        ServerConfig {
            model_repository: model_repository.into(),
            model_name: None,
            allow_empty: true,
            plugin_cache_dir: Some(plugin_dir.join(".cache")),
            plugin_dir,
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            threads: None,
            max_concurrent_loads: 4,
            executor_spin: Duration::ZERO,
            inline_forward_max_bytes: 0,
            memory_budget: None,
            max_call_depth: crate::plugin::DEFAULT_MAX_DEPTH,
            mirror_timeout: Duration::from_secs(30),
            max_message_bytes: 64 << 20,
            poll: false,
            load_all: true,
            watch_plugins: true,
            wait_for_plugins: true,
            health_period: crate::health::DEFAULT_PERIOD,
            strict_readiness: true,
            state_events_capacity: 1024,
            security: SecurityConfig {
                watch_files: true,
                ..SecurityConfig::default()
            },
            limits: ConnectionLimits::default(),
            reload_on_sighup: false,
            drain_timeout: Duration::from_secs(30),
            tracing: None,
            serving_metrics: true,
        }
    }
}

/// A started host.
#[derive(Debug)]
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub registry: Registry,
    pub pipeline: Pipeline,
    pub plugins: Arc<PluginHost>,
    pub health: Arc<Health>,
    /// The live auth policy and TLS configuration.
    pub security: Arc<Security>,
    /// Connection counts per port: gRPC, HTTP, metrics.
    pub connections: PortSet<Arc<PortCounters>>,
    /// The system shared-memory regions clients registered; all are
    /// unregistered (and unmapped) when the server stops.
    pub shm: Arc<crate::oip::shm::SharedMemory>,
    reloader: ReloadHandle,
    drain_timeout: Duration,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// Stops accepting, lets in-flight requests finish, then returns.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.wait().await;
    }

    /// Serves until the drain is triggered ([`RunningServer::trigger`]) or
    /// every server has ended on its own; then returns once the servers
    /// have drained and every model has been unloaded, its executor threads
    /// ended, or once the drain timeout has passed since the drain began.
    pub async fn wait(self) {
        let registry = self.registry.clone();
        let shm = Arc::clone(&self.shm);
        let traces = self.pipeline.traces().cloned();
        let mut servers = futures::future::join_all(self.tasks);
        // The drain timeout counts from the trigger, never from startup.
        let ended = tokio::select! {
            () = self.shutdown.cancelled() => false,
            _ = &mut servers => true,
        };
        let drain = async move {
            if !ended {
                servers.await;
            }
            // The servers have drained, so nothing holds a model any more,
            // nor a shared-memory region.
            shm.unregister(None);
            registry.unload_all().await;
            // What the last requests traced goes out, within a bound.
            if let Some(traces) = traces {
                let _ = tokio::task::spawn_blocking(move || {
                    traces.shutdown(Duration::from_secs(5));
                })
                .await;
            }
        };
        if tokio::time::timeout(self.drain_timeout, drain)
            .await
            .is_err()
        {
            tracing::warn!(
                timeout_s = self.drain_timeout.as_secs_f64(),
                "the drain did not finish within the drain timeout; exiting anyway"
            );
        }
    }

    /// Turns readiness off at once (HTTP 503, `grpc.health.v1`
    /// NOT_SERVING) while still serving: the first step of a rollout-safe
    /// shutdown, before [`RunningServer::trigger`] starts the drain.
    pub fn begin_drain(&self) {
        self.health.begin_drain();
    }

    /// The token that starts the drain when cancelled.
    pub fn trigger(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Re-reads the auth config, the token files and the TLS files, as
    /// SIGHUP does; returns once done. A failure keeps what was serving
    /// and shows in `security.status()`.
    pub async fn reload_security(&self) {
        self.reloader.reload().await;
    }

    /// Whether the ports speak TLS.
    pub fn tls(&self) -> bool {
        self.security.tls().is_some()
    }
}

fn init_torch_threads() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Requests never fan out across inter-op threads: one is enough, and
        // it keeps the thread count at executors x intra-op.
        let res = std::panic::catch_unwind(|| plinth_torch::set_inter_op_threads(1));
        if res.is_err() {
            tracing::warn!("torch inter-op threads were already fixed");
        }
    });
}

/// Binds both ports, starts loading the repository and serves until the
/// returned server's token is cancelled.
pub async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
    init_torch_threads();
    // Before anything binds or loads: a server asked to be secure never
    // serves without it.
    let security =
        Arc::new(Security::load(config.security.clone()).map_err(|err| anyhow::anyhow!(err))?);
    let cores = config
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let cuda = plinth_torch::init_cuda();
    match &cuda.library {
        Some(lib) => {
            tracing::info!(library = %lib.display(), devices = cuda.device_count, "CUDA libtorch loaded")
        }
        None => tracing::info!(
            note = cuda.note.as_deref().unwrap_or(""),
            "running on CPU only"
        ),
    }
    tracing::info!(
        cores,
        inter_op_threads = 1,
        intra_op_threads_per_executor =
            "cores / instances, unless the model sets intra_op_threads (clamped to cores)",
        libtorch = plinth_torch::LIBTORCH_VERSION,
        "compute budget: at most `cores` torch threads compute at once, over every model"
    );

    let repository = open_repository(&config.model_repository, config.model_name.as_deref())?;
    // The scan is quick and done before serving, so the first ListModels
    // already shows every model; a repository that cannot be read or holds
    // nothing to serve stops the server here, with one clear line.
    let scan_repo = repository.clone();
    let names = tokio::task::spawn_blocking(move || scan_repo.scan())
        .await?
        .with_context(|| {
            format!(
                "model repository {}: cannot read",
                repository.root().display()
            )
        })?;
    if names.is_empty() && !config.allow_empty {
        anyhow::bail!(
            "model repository {}: holds no model (no <model>/config.toml): nothing to serve; pass --allow-empty to start empty and fill it later under --poll",
            repository.root().display()
        );
    }
    std::fs::read_dir(&config.plugin_dir).with_context(|| {
        format!(
            "plugin directory {}: cannot read",
            config.plugin_dir.display()
        )
    })?;
    let registry = Registry::new(RegistrySettings {
        max_concurrent_loads: config.max_concurrent_loads,
        event_capacity: config.state_events_capacity,
        executor_spin: config.executor_spin,
        inline_forward_max_bytes: config.inline_forward_max_bytes,
        memory_budget: config.memory_budget,
        serving_series: config.serving_metrics,
        ..RegistrySettings::new(repository.clone(), cores)
    });
    let shutdown = CancellationToken::new();
    let health = Arc::new(Health::new(config.strict_readiness));

    // The plugins the directory holds load in the background, all at once:
    // the ports answer meanwhile (a request that needs one still compiling
    // gets UNAVAILABLE naming it), and readiness waits for them unless
    // told not to.
    // A cache directory the operator named must be one only this user can
    // write: its artifacts are loaded as native code.
    // (One that cannot be created is only logged: plugins then compile at
    // every load, as the runtime says once.)
    if let Some(cache) = &config.plugin_cache_dir
        && let Err(why) = crate::plugin::cache::prepare(cache)
        && cache.is_dir()
    {
        anyhow::bail!("--plugin-cache-dir: {why}");
    }
    let plugins = Arc::new(match &config.plugin_cache_dir {
        Some(cache) => PluginHost::with_cache_dir(&config.plugin_dir, cache),
        None => PluginHost::new(&config.plugin_dir),
    });
    let startup_plugins = {
        let plugins = Arc::clone(&plugins);
        tokio::spawn(async move {
            for (name, outcome) in plugins.rescan().await {
                if let Err(reason) = outcome {
                    tracing::warn!(plugin = name, %reason, "plugin refused at startup");
                }
            }
            tracing::info!("startup plugin loads finished");
        })
    };
    let wait_for_plugins = config.wait_for_plugins;
    // An orchestrator entry serves only while its plugin does.
    let gate_plugins = Arc::clone(&plugins);
    registry.set_serving_gate(move |config| {
        let plugin = config.orchestrator.as_deref()?;
        match gate_plugins.get(plugin) {
            Some(loaded) if loaded.kind == crate::plugin::PluginKind::Orchestrator => None,
            Some(loaded) => Some(format!(
                "plugin '{plugin}' implements {}, not orchestrator-plugin",
                loaded.kind.world()
            )),
            None if gate_plugins.is_compiling(plugin) => {
                Some(format!("waiting for orchestrator plugin '{plugin}', which is compiling"))
            }
            None => Some(format!(
                "waiting for orchestrator plugin '{plugin}' (no {plugin}.wasm in the plugin directory)"
            )),
        }
    });
    let traces = match &config.tracing {
        Some(tracing) => Some(Arc::new(
            crate::telemetry::Traces::start(tracing).context("tracing")?,
        )),
        None => None,
    };
    let pipeline = Pipeline::new(
        registry.clone(),
        Arc::clone(&plugins),
        crate::pipeline::PipelineSettings {
            max_call_depth: config.max_call_depth,
            mirror_timeout: config.mirror_timeout,
            traces: traces.clone(),
        },
    );

    let grpc_listener = TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("binding gRPC to {}", config.grpc_addr))?;
    let http_listener = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding HTTP to {}", config.http_addr))?;
    let metrics_listener = TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("binding metrics to {}", config.metrics_addr))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;

    let limit = config.max_message_bytes;
    let connections = PortSet::<Arc<PortCounters>>::default();
    let shm = Arc::new(crate::oip::shm::SharedMemory::default());
    let (grpc_routes, health_reporter) = grpc::routes(grpc::GrpcState {
        pipeline: pipeline.clone(),
        health: Arc::clone(&health),
        info: HostInfo::current(),
        shutdown: shutdown.clone(),
        max_message_bytes: limit,
        connections: connections.clone(),
        shm: Arc::clone(&shm),
    })?;
    health_reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;

    let http_state = crate::http::HttpState {
        pipeline: pipeline.clone(),
        health: Arc::clone(&health),
        max_body_bytes: limit,
        shm: Arc::clone(&shm),
    };
    let tls = security.tls();
    let ports = [
        (
            Port {
                name: "gRPC",
                listener: grpc_listener,
                protocols: PortProtocols::Grpc,
                router: grpc_routes.into_axum_router(),
                tls: tls.clone(),
                limits: config.limits,
            },
            &connections.grpc,
        ),
        (
            Port {
                name: "HTTP",
                listener: http_listener,
                protocols: PortProtocols::Http,
                router: crate::http::router(http_state.clone()),
                tls: tls.clone(),
                limits: config.limits,
            },
            &connections.http,
        ),
        (
            Port {
                name: "metrics",
                listener: metrics_listener,
                protocols: PortProtocols::Http,
                router: crate::http::metrics_router(http_state),
                tls,
                limits: config.limits,
            },
            &connections.metrics,
        ),
    ];
    let mut tasks = Vec::new();
    for (mut port, counters) in ports {
        // The one gate every call passes, on every port. It fails closed:
        // on gRPC it wraps the router and knows each method exactly; on
        // HTTP it runs after routing, on the template the router matched,
        // and only the 404 fallback is outside it.
        port.router = match port.protocols {
            PortProtocols::Grpc => port.router.layer(security.layer(Classify::GrpcMethod)),
            PortProtocols::Http => port
                .router
                .route_layer(security.layer(Classify::MatchedRoute)),
        };
        tasks.push(tokio::spawn(crate::listen::serve(
            port,
            Arc::clone(counters),
            shutdown.clone(),
        )));
    }
    let (reloader, reload_task) =
        crate::security::spawn_reloader(Arc::clone(&security), shutdown.clone());
    tasks.push(reload_task);
    if config.reload_on_sighup {
        tasks.push(spawn_hangup_handler(
            Arc::clone(&plugins),
            reloader.clone(),
            shutdown.clone(),
        )?);
    }

    // The loads run in the background: the ports answer at once, and
    // readiness turns on when they have finished.
    registry.register_known(&names);
    // On-demand models are listed, not loaded: their first request loads
    // them. Marked before `start` returns (a config read each).
    let on_demand = {
        let registry = registry.clone();
        let names = names.clone();
        tokio::task::spawn_blocking(move || registry.mark_residencies(&names))
            .await
            .unwrap_or_default()
    };
    let startup_registry = registry.clone();
    let startup_health = Arc::clone(&health);
    let load_all = config.load_all;
    tokio::spawn(async move {
        let mut asked = Vec::new();
        if load_all {
            let mut tickets = Vec::new();
            for name in names.iter().filter(|name| !on_demand.contains(*name)) {
                asked.push(name.clone());
                match startup_registry.load(name, LoadMode::Load).await {
                    Ok(ticket) => tickets.push(ticket),
                    Err(err) => tracing::warn!(model = name, %err, "startup load refused"),
                }
            }
            for ticket in tickets {
                let _ = ticket.finished().await;
            }
        }
        if wait_for_plugins {
            let _ = startup_plugins.await;
        }
        startup_health.startup_finished(asked);
        tracing::info!(models = names.len(), "startup loads finished");
    });
    tasks.push(crate::health::spawn_monitor(
        Arc::clone(&health),
        registry.clone(),
        Arc::clone(&plugins),
        health_reporter,
        config.health_period,
        shutdown.clone(),
    ));

    if config.watch_plugins {
        let watcher = PluginWatcher::start(Arc::clone(&plugins), Duration::from_millis(100))
            .context("watching the plugin directory")?;
        let watch_shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            watch_shutdown.cancelled().await;
            drop(watcher);
        }));
    }

    if config.poll {
        let watcher =
            crate::watch::RepositoryWatcher::start(registry.clone(), Duration::from_millis(250))
                .context("watching the model repository")?;
        let watch_shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            watch_shutdown.cancelled().await;
            drop(watcher);
        }));
    }

    let scheme = if security.tls().is_some() {
        "TLS"
    } else {
        "plaintext"
    };
    tracing::info!(%grpc_addr, %http_addr, %metrics_addr, scheme, repository = %config.model_repository.display(), "plinth serving");
    Ok(RunningServer {
        grpc_addr,
        http_addr,
        metrics_addr,
        registry,
        pipeline,
        plugins,
        health,
        security,
        connections,
        shm,
        reloader,
        drain_timeout: config.drain_timeout,
        shutdown,
        tasks,
    })
}

/// The repository at `root`: a directory of model directories, or (when
/// `root` holds a config.toml) one model directory, which must then be
/// named. Errors are one line naming the path.
pub fn open_repository(root: &Path, model_name: Option<&str>) -> anyhow::Result<ModelRepository> {
    let meta = std::fs::metadata(root)
        .with_context(|| format!("model repository {}: cannot read", root.display()))?;
    if !meta.is_dir() {
        anyhow::bail!("model repository {}: not a directory", root.display());
    }
    std::fs::read_dir(root)
        .with_context(|| format!("model repository {}: cannot read", root.display()))?;
    if !ModelRepository::is_model_dir(root) {
        if let Some(name) = model_name {
            tracing::info!(
                name,
                "--model-name applies only when the repository root is itself a model directory: serving the repository's models under their own names"
            );
        }
        return Ok(ModelRepository::new(root));
    }
    let Some(name) = model_name else {
        anyhow::bail!(
            "model repository {}: holds a config.toml, so it is one model directory: name the model with --model-name",
            root.display()
        );
    };
    if !crate::config::valid_model_name(name) {
        anyhow::bail!(
            "--model-name: expected letters, digits, '_', '-' or '.' (not first), at most 128, got {name:?}"
        );
    }
    Ok(ModelRepository::single(root, name))
}

/// `plinth serve --check`: everything `start` would read, read and
/// validated, nothing bound or loaded. `Ok` holds a summary, one line per
/// fact; `Err` one line per problem.
pub fn check(config: &ServerConfig) -> Result<Vec<String>, Vec<String>> {
    let mut facts = Vec::new();
    let mut problems = Vec::new();
    match Security::load(config.security.clone()) {
        Ok(security) => {
            let auth = config.security.auth_config.as_ref().map_or_else(
                || "built-in default".to_owned(),
                |p| p.display().to_string(),
            );
            facts.push(format!("auth: {auth}"));
            facts.push(format!(
                "TLS: {}",
                if security.tls().is_some() {
                    "on every port"
                } else {
                    "off"
                }
            ));
        }
        Err(err) => problems.push(err),
    }
    match open_repository(&config.model_repository, config.model_name.as_deref()) {
        Err(err) => problems.push(format!("{err:#}")),
        Ok(repository) => match repository.scan() {
            Err(err) => problems.push(format!(
                "model repository {}: cannot read: {err}",
                repository.root().display()
            )),
            Ok(names) if names.is_empty() && !config.allow_empty => problems.push(format!(
                "model repository {}: holds no model (no <model>/config.toml): nothing to serve; pass --allow-empty to start empty",
                repository.root().display()
            )),
            Ok(names) => {
                let mut packages = 0;
                for name in &names {
                    let dir = repository.model_dir(name);
                    let checked = crate::config::ModelConfig::load(&dir).and_then(|model| {
                        if model.orchestrator.is_some() {
                            return Ok("an orchestrator".to_owned());
                        }
                        let versions = repository.select_versions(name, &model.version_policy)?;
                        let mut formats = Vec::new();
                        let mut wrong = Vec::new();
                        for (_, file) in &versions {
                            let format = crate::config::ModelFormat::of_path(file);
                            if format == Some(crate::config::ModelFormat::AotiPackage) {
                                packages += 1;
                                // Read, never loaded: its library is not mapped.
                                let read = plinth_torch::PackageInfo::read(file).and_then(|info| {
                                    info.check(&model)
                                });
                                if let Err(err) = read {
                                    wrong.push(format!("{}: {err}", file.display()));
                                }
                            }
                            formats.extend(format.map(|f| f.as_str()));
                        }
                        formats.dedup();
                        if !wrong.is_empty() {
                            return Err(wrong.join("\n"));
                        }
                        Ok(format!("{} version(s) to load ({})", versions.len(), formats.join(", ")))
                    });
                    match checked {
                        Ok(what) => facts.push(format!("model {name}: {what}")),
                        Err(err) => problems.extend(err.lines().map(str::to_owned)),
                    }
                }
                if packages > 0 {
                    // libtorch 2.11 unpacks each package into a new
                    // directory under /tmp, a path it names itself.
                    let tmp = std::path::PathBuf::from("/tmp");
                    let probe = tmp.join(format!(".plinth-check-{}", std::process::id()));
                    match std::fs::create_dir(&probe).and_then(|()| std::fs::remove_dir(&probe)) {
                        Ok(()) => facts.push(format!(
                            "temporary directory {}: writable ({packages} package(s) unpack there)",
                            tmp.display()
                        )),
                        Err(err) => problems.push(format!(
                            "temporary directory {}: not writable ({err}): libtorch unpacks AOTInductor packages there when they load (mount a writable volume there)",
                            tmp.display()
                        )),
                    }
                }
                if names.is_empty() {
                    facts.push("models: none yet (--allow-empty)".into());
                }
            }
        },
    }
    match std::fs::read_dir(&config.plugin_dir) {
        Err(err) => problems.push(format!(
            "plugin directory {}: cannot read: {err}",
            config.plugin_dir.display()
        )),
        Ok(entries) => {
            let components = entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "wasm"))
                .count();
            facts.push(format!(
                "plugin directory {}: {components} component(s)",
                config.plugin_dir.display()
            ));
        }
    }
    let cache = config
        .plugin_cache_dir
        .clone()
        .unwrap_or_else(|| crate::plugin::default_cache_dir(&config.plugin_dir));
    let probe = cache.join(".plinth-check");
    let prepared = crate::plugin::cache::prepare(&cache);
    if let Err(why) = &prepared
        && cache.is_dir()
    {
        problems.push(why.clone());
    }
    match prepared.and_then(|()| std::fs::write(&probe, b"").map_err(|err| err.to_string())) {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            facts.push(format!("plugin cache {}: writable", cache.display()));
        }
        // Not fatal (plugins are compiled at every start instead), but said.
        Err(err) => facts.push(format!(
            "warning: plugin cache {}: not writable ({err}): plugins will be compiled at every start",
            cache.display()
        )),
    }
    if problems.is_empty() {
        Ok(facts)
    } else {
        Err(problems)
    }
}

/// SIGHUP: rescan the plugin directory and reload the security files.
fn spawn_hangup_handler(
    plugins: Arc<PluginHost>,
    reloader: ReloadHandle,
    shutdown: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP")?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                signal = hangups.recv() => if signal.is_none() { break },
            }
            tracing::info!(
                "SIGHUP: rescanning the plugin directory and reloading the security files"
            );
            plugins.rescan().await;
            reloader.reload().await;
        }
    }))
}

/// Resolves on SIGTERM or ctrl-c.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
