//! The `plinth` binary: a thin command line over the server library
//! (`serve`, `demo-repo`) and the client crate, `plinth-client` (every other
//! command).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use plinth_client as cli;
use tracing_subscriber::EnvFilter;

// The global allocator: the system's, unless a feature chooses mimalloc or
// jemalloc (see host/Cargo.toml and the perf bench's `-- alloc`).
#[cfg(all(feature = "mimalloc", feature = "jemalloc"))]
compile_error!("features `mimalloc` and `jemalloc` each choose the global allocator: pick one");
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "plinth",
    version,
    about = "Model-serving host: TorchScript models, gRPC and HTTP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// text (plain, coloured only on a terminal) or json (one object per
    /// line, for log collectors).
    #[arg(long, global = true, value_enum, env = "PLINTH_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model repository over gRPC and HTTP.
    Serve(Box<ServeArgs>),
    /// Write the demo model repository into DIR.
    DemoRepo { dir: PathBuf },
    /// List, load, unload and watch the models of a running server.
    Models {
        #[command(subcommand)]
        command: cli::ModelsCommand,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Run one inference: plinth infer MODEL --input x='[[1,2,3,4]]' [--output-dir DIR].
    Infer {
        #[command(flatten)]
        args: cli::InferArgs,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// The plugins of a running server, and checking a component without one.
    Plugin {
        #[command(subcommand)]
        command: cli::PluginCommand,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// The server's version, devices, compute budget and models.
    Info {
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// grpc.health.v1: prints SERVING and exits 0, or NOT_SERVING and exits 1.
    Health {
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// A live view of a running server: per model requests per second, p50
    /// and p99, queue and in flight, memory; per plugin calls and failures.
    Top {
        #[command(flatten)]
        args: cli::top::TopArgs,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
}

#[derive(Parser)]
struct ServeArgs {
    /// Model repository: <repo>/<model>/config.toml and <repo>/<model>/<version>/model.pt (TorchScript) or model.pt2 (an AOTInductor package).
    /// Without it, ./.plinth/models is used and filled with demo models if absent.
    /// A directory that holds config.toml itself is one model, named by --model-name.
    #[arg(long, env = "PLINTH_MODEL_REPOSITORY")]
    model_repository: Option<PathBuf>,
    /// The model's name when the repository is a single model directory
    /// (config.toml at its root, as KServe's storage initializer leaves it).
    #[arg(long, env = "PLINTH_MODEL_NAME")]
    model_name: Option<String>,
    /// Start even when the repository holds no model (fill it later under
    /// --poll); without it an empty repository is an error.
    #[arg(long)]
    allow_empty: bool,
    /// Plugin directory (created if absent).
    #[arg(long, env = "PLINTH_PLUGIN_DIR", default_value = ".plinth/plugins")]
    plugin_dir: PathBuf,
    /// Where compiled plugins are cached (default: per user, outside the
    /// plugin directory: ~/.cache/plinth/plugins/<key>). Only this user may
    /// be able to write it: a cache others can write is refused.
    #[arg(long, env = "PLINTH_PLUGIN_CACHE_DIR")]
    plugin_cache_dir: Option<PathBuf>,
    /// Validate the flags, the repository, the model configs, the plugin
    /// directory, the auth config and the TLS files, print what was found,
    /// and exit (0: all good) without serving.
    #[arg(long)]
    check: bool,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    host: IpAddr,
    #[arg(long, default_value_t = 8001)]
    grpc_port: u16,
    #[arg(long, default_value_t = 8000)]
    http_port: u16,
    /// Prometheus /metrics.
    #[arg(long, default_value_t = 8002)]
    metrics_port: u16,
    /// The compute budget: cores' worth of torch work that may run at once,
    /// over every model (default: all available cores). Kubernetes can set
    /// it from the container's CPU limit with the downward API.
    #[arg(long, env = "PLINTH_THREADS")]
    threads: Option<usize>,
    /// Model loads that may run at once.
    #[arg(long, default_value_t = 4)]
    max_concurrent_loads: usize,
    /// Microseconds an idle model executor polls its queue before it sleeps:
    /// a request that comes within it skips the thread's wake-up, at the
    /// price of a core kept busy meanwhile (0: sleep at once).
    #[arg(long, default_value_t = 0)]
    executor_spin_us: u64,
    /// Requests whose inputs hold at most this many bytes run the model's
    /// forward pass on the request's own thread, skipping the hop to an
    /// executor thread and back, when nothing is queued for the model and
    /// the compute budget has a core free now. Models that gather batches
    /// with a queue delay never do (0: never).
    #[arg(long, default_value_t = 0)]
    inline_forward_max_bytes: usize,
    /// Memory budget per device, in MiB: before a load would pass it, the
    /// least recently used idle models with `residency = "on-demand"` are
    /// unloaded; a model that cannot fit fails its load, naming the sizes.
    /// Pinned models are never evicted. Without it, no budget.
    #[arg(long)]
    memory_budget_mib: Option<u64>,
    /// How deep orchestrator plugins' model calls may nest: a call past it
    /// (an orchestrator calling itself, say) fails with a message naming
    /// the limit.
    #[arg(long, default_value_t = plinth::plugin::DEFAULT_MAX_DEPTH)]
    max_call_depth: u32,
    /// Seconds a mirrored run may take on its target before it is given up
    /// (counted as a failed mirror); a stuck target then holds no slot.
    #[arg(long, default_value_t = 30.0)]
    mirror_timeout_s: f64,
    /// Largest gRPC message accepted or sent, and largest HTTP request body, in MiB.
    #[arg(long, default_value_t = 64)]
    max_message_mib: usize,
    /// Watch the repository: load, reload and unload models as their directories change.
    #[arg(long)]
    poll: bool,
    /// Don't load the repository's models at startup (load them with LoadModel).
    #[arg(long)]
    no_load: bool,
    /// Don't watch the plugin directory (reload with SIGHUP or ReloadPlugins).
    #[arg(long)]
    no_plugin_watch: bool,
    /// Readiness does not wait for the plugins present at startup to load
    /// (they load in the background either way).
    #[arg(long)]
    no_wait_plugins: bool,
    /// Seconds between health-plugin checks when nothing changes (they also
    /// run on every model state change and when the startup loads finish).
    #[arg(long, default_value_t = 1.0)]
    health_period_s: f64,
    /// Ready only when every model loaded at startup is READY (a FAILED
    /// one holds readiness back, named in the 503 and in `plinth health`);
    /// `--strict-readiness=false`: ready once the startup loads finish.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    strict_readiness: bool,

    /// Who may call what: a TOML file of tokens (each read from a file or an
    /// env var) and the API groups each opens (see the README's security
    /// section). Without it, model-repository and plugins calls answer
    /// loopback peers only. Reloaded on SIGHUP and when it or a token file changes.
    #[arg(long, env = "PLINTH_AUTH_CONFIG", help_heading = "Security")]
    auth_config: Option<PathBuf>,
    /// TLS on every port: the certificate chain (PEM, leaf first). Needs --tls-key.
    #[arg(
        long,
        env = "PLINTH_TLS_CERT",
        requires = "tls_key",
        help_heading = "Security"
    )]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(
        long,
        env = "PLINTH_TLS_KEY",
        requires = "tls_cert",
        help_heading = "Security"
    )]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(
        long,
        env = "PLINTH_TLS_CLIENT_CA",
        requires = "tls_cert",
        help_heading = "Security"
    )]
    tls_client_ca: Option<PathBuf>,
    /// Don't reload the auth config, tokens and certificates when their
    /// files change (SIGHUP still reloads them).
    #[arg(long, help_heading = "Security")]
    no_security_watch: bool,

    /// Seconds a new connection has to send its first request headers (TLS
    /// handshake included), and an HTTP/1.1 request its headers.
    #[arg(long, default_value_t = 10.0, help_heading = "Limits")]
    header_timeout_s: f64,
    /// Largest request head, in KiB (HTTP/1.1 headers or an HTTP/2 header list).
    #[arg(long, default_value_t = 64, help_heading = "Limits")]
    max_header_kib: usize,
    /// HTTP/2 streams (concurrent calls) per connection.
    #[arg(long, default_value_t = 1024, help_heading = "Limits")]
    max_concurrent_streams: u32,
    /// Connections open at once per port; more are closed as they arrive.
    #[arg(long, default_value_t = 4096, help_heading = "Limits")]
    max_connections: usize,
    /// Seconds a connection may stay open with no request in flight before
    /// it is closed (HTTP/1.1 and HTTP/2 alike; a stream in progress is
    /// not idle).
    #[arg(long, default_value_t = 300.0, help_heading = "Limits")]
    idle_timeout_s: f64,
    /// Seconds between HTTP/2 keep-alive pings; a peer that does not
    /// answer one within as long is dropped.
    #[arg(long, default_value_t = 60.0, help_heading = "Limits")]
    keepalive_s: f64,

    /// On SIGTERM, readiness turns 503 at once and the server keeps serving
    /// this many seconds (so endpoints are updated) before it drains.
    #[arg(long, default_value_t = 0.0, help_heading = "Shutdown")]
    drain_delay_s: f64,
    /// How long the drain (requests in flight, then model unloads) may take
    /// before the process exits anyway.
    #[arg(long, default_value_t = 30.0, help_heading = "Shutdown")]
    drain_timeout_s: f64,

    /// Export OpenTelemetry traces of requests to this OTLP collector
    /// (`http://host:4318` over HTTP, `http://host:4317` over gRPC); off
    /// when unset. `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
    /// `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*` and the other standard
    /// variables are read too.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        help_heading = "Observability"
    )]
    otlp_endpoint: Option<String>,
    /// `grpc` or `http/protobuf` (the default).
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_PROTOCOL",
        help_heading = "Observability"
    )]
    otlp_protocol: Option<String>,
    /// Which requests are traced: `parentbased_always_on` (the default:
    /// all, unless a client's `traceparent` says not sampled),
    /// `parentbased_traceidratio`, `traceidratio`, `always_on`, `always_off`, ….
    #[arg(long, env = "OTEL_TRACES_SAMPLER", help_heading = "Observability")]
    trace_sampler: Option<String>,
    /// The ratio of the `*traceidratio` samplers, 0 to 1.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", help_heading = "Observability")]
    trace_sampler_arg: Option<String>,
    /// The service name spans carry (default `plinth`).
    #[arg(long, env = "OTEL_SERVICE_NAME", help_heading = "Observability")]
    otel_service_name: Option<String>,
    /// Record the per-model serving series (`plinth_model_*` on /metrics).
    /// Off only to measure what they cost.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, help_heading = "Observability")]
    serving_metrics: bool,
}

fn at_least_one<T: PartialOrd + From<u8> + std::fmt::Display>(
    flag: &str,
    value: T,
) -> anyhow::Result<T> {
    if value < T::from(1) {
        anyhow::bail!("{flag}: expected at least 1, got {value}");
    }
    Ok(value)
}

fn positive_seconds(flag: &str, value: f64) -> anyhow::Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(value)
        .ok()
        .filter(|period| !period.is_zero())
        .with_context(|| format!("{flag}: expected a positive number of seconds, got {value}"))
}

/// libgomp, libtorch's OpenMP runtime, reads its wait policy once, when it
/// is loaded, which is before `main`. Its default has every idle OpenMP
/// thread spin after a parallel region. On a server the cores those threads
/// spin on are the ones the runtime's workers need to decode and answer
/// requests. With `PASSIVE` they sleep: the CNN at batch 32 served 1.7×
/// more and 16 MiB tensors 1.3× more on two cores (docs/BENCHMARKS.md,
/// round three). So `plinth serve` restarts itself once with
/// `OMP_WAIT_POLICY=PASSIVE` (same process id, same arguments), unless the
/// environment already says how OpenMP should wait.
fn sleep_openmp_threads_when_idle() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("OMP_WAIT_POLICY").is_some() || std::env::var_os("GOMP_SPINCOUNT").is_some()
    {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .exec();
    eprintln!(
        "plinth: could not restart with OMP_WAIT_POLICY=PASSIVE ({err}); idle OpenMP threads will spin"
    );
}

fn main() -> std::process::ExitCode {
    let parsed = Cli::parse();
    if matches!(parsed.command, Command::Serve(_)) {
        sleep_openmp_threads_when_idle();
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match parsed.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            // A traced request's lines carry its `trace_id` and `span_id`
            // (the pipeline's `request` span); no other span is at info.
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt()
            // No colour codes in a log that is not a terminal (a file, a collector).
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .with_env_filter(filter)
            .init(),
    }
    let result = match parsed.command {
        Command::DemoRepo { dir } => plinth::demo::write_demo_repository(&dir),
        Command::Serve(args) => serve(*args),
        Command::Plugin {
            command: cli::PluginCommand::Check { file, manifest },
            client,
        } => cli::check_plugin(&file, manifest, client.output).map_err(anyhow::Error::from),
        // Authoring needs no server.
        Command::Plugin {
            command: cli::PluginCommand::New(args),
            ..
        } => cli::scaffold::new(args).map_err(anyhow::Error::from),
        Command::Plugin {
            command: cli::PluginCommand::Build(args),
            ..
        } => cli::scaffold::build(args).map_err(anyhow::Error::from),
        Command::Models { command, client } => {
            client_call(client, async |c| cli::models(c, command).await)
        }
        Command::Infer { args, client } => client_call(client, async |c| cli::infer(c, args).await),
        Command::Plugin { command, client } => {
            client_call(client, async |c| cli::plugins(c, command).await)
        }
        Command::Info { client } => client_call(client, async |c| cli::info(c).await),
        Command::Health { client } => client_call(client, async |c| cli::health(c).await),
        Command::Top { args, client } => {
            client_call(client, async |c| cli::top::top(c, args).await)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line, the causes joined: what a person or a pod's last
            // log line needs, never a backtrace.
            eprintln!("plinth: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs one client command on a small runtime of its own.
fn client_call(
    args: cli::ClientArgs,
    call: impl AsyncFnOnce(&cli::Client) -> cli::CliResult,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = cli::Client::connect(&args).await?;
        call(&client).await?;
        anyhow::Ok(())
    })
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let check = args.check;
    let model_repository = match args.model_repository {
        Some(dir) => dir,
        None => {
            let dir = PathBuf::from(".plinth/models");
            if !dir.exists() && !check {
                plinth::demo::write_demo_repository(&dir)
                    .context("creating the demo model repository")?;
                tracing::info!(dir = %dir.display(), "created the demo model repository");
            }
            dir
        }
    };
    if !check {
        std::fs::create_dir_all(&args.plugin_dir).with_context(|| {
            format!(
                "creating the plugin directory {}",
                args.plugin_dir.display()
            )
        })?;
    }
    if let Some(threads) = args.threads {
        at_least_one("--threads", threads)?;
    }
    let config = plinth::ServerConfig {
        model_repository,
        model_name: args.model_name,
        allow_empty: args.allow_empty,
        plugin_dir: args.plugin_dir,
        plugin_cache_dir: args.plugin_cache_dir,
        grpc_addr: SocketAddr::new(args.host, args.grpc_port),
        http_addr: SocketAddr::new(args.host, args.http_port),
        metrics_addr: SocketAddr::new(args.host, args.metrics_port),
        threads: args.threads,
        max_concurrent_loads: at_least_one("--max-concurrent-loads", args.max_concurrent_loads)?,
        executor_spin: std::time::Duration::from_micros(args.executor_spin_us),
        inline_forward_max_bytes: args.inline_forward_max_bytes,
        max_call_depth: args.max_call_depth,
        mirror_timeout: positive_seconds("--mirror-timeout-s", args.mirror_timeout_s)?,
        memory_budget: args
            .memory_budget_mib
            .map(|mib| {
                at_least_one("--memory-budget-mib", mib)?
                    .checked_mul(1 << 20)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "--memory-budget-mib: {mib} MiB is more bytes than fit in 64 bits"
                        )
                    })
            })
            .transpose()?,
        max_message_bytes: at_least_one("--max-message-mib", args.max_message_mib)? << 20,
        poll: args.poll,
        load_all: !args.no_load,
        watch_plugins: !args.no_plugin_watch,
        wait_for_plugins: !args.no_wait_plugins,
        state_events_capacity: 1024,
        health_period: positive_seconds("--health-period-s", args.health_period_s)?,
        strict_readiness: args.strict_readiness,
        security: plinth::security::SecurityConfig {
            auth_config: args.auth_config,
            tls: args
                .tls_cert
                .zip(args.tls_key)
                .map(|(cert, key)| plinth::security::TlsFiles {
                    cert,
                    key,
                    client_ca: args.tls_client_ca,
                }),
            watch_files: !args.no_security_watch,
        },
        limits: plinth::listen::ConnectionLimits {
            header_timeout: positive_seconds("--header-timeout-s", args.header_timeout_s)?,
            max_header_bytes: at_least_one("--max-header-kib", args.max_header_kib)? << 10,
            max_concurrent_streams: at_least_one(
                "--max-concurrent-streams",
                args.max_concurrent_streams,
            )?,
            max_connections: at_least_one("--max-connections", args.max_connections)?,
            idle_timeout: positive_seconds("--idle-timeout-s", args.idle_timeout_s)?,
            keepalive_interval: positive_seconds("--keepalive-s", args.keepalive_s)?,
        },
        reload_on_sighup: true,
        drain_timeout: positive_seconds("--drain-timeout-s", args.drain_timeout_s)?,
        tracing: plinth::telemetry::TracingConfig::from_vars(|name| match name {
            // The flags, which clap fills from these variables too.
            "OTEL_EXPORTER_OTLP_ENDPOINT" => args.otlp_endpoint.clone(),
            "OTEL_EXPORTER_OTLP_PROTOCOL" => args.otlp_protocol.clone(),
            "OTEL_TRACES_SAMPLER" => args.trace_sampler.clone(),
            "OTEL_TRACES_SAMPLER_ARG" => args.trace_sampler_arg.clone(),
            "OTEL_SERVICE_NAME" => args.otel_service_name.clone(),
            other => std::env::var(other).ok(),
        })
        .map_err(anyhow::Error::msg)?,
        serving_metrics: args.serving_metrics,
    };
    let drain_delay = std::time::Duration::try_from_secs_f64(args.drain_delay_s)
        .ok()
        .with_context(|| {
            format!(
                "--drain-delay-s: expected zero or more seconds, got {}",
                args.drain_delay_s
            )
        })?;
    if check {
        return match plinth::server::check(&config) {
            Ok(facts) => {
                for fact in facts {
                    println!("{fact}");
                }
                println!("plinth serve --check: ok");
                Ok(())
            }
            Err(problems) => {
                for problem in &problems {
                    eprintln!("plinth: {problem}");
                }
                anyhow::bail!("--check found {} problem(s)", problems.len())
            }
        };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("plinth-io")
        .build()?;
    runtime.block_on(async {
        let server = plinth::start(config).await?;
        let trigger = server.trigger();
        let health = std::sync::Arc::clone(&server.health);
        tokio::spawn(async move {
            plinth::server::shutdown_signal().await;
            // Readiness off first, so endpoints stop sending, while the
            // server still answers whatever is sent meanwhile.
            health.begin_drain();
            if !drain_delay.is_zero() {
                tracing::info!(
                    delay_s = drain_delay.as_secs_f64(),
                    "shutting down: readiness is off; serving on until endpoints are updated (a second signal skips the wait)"
                );
                tokio::select! {
                    () = tokio::time::sleep(drain_delay) => {}
                    () = plinth::server::shutdown_signal() => {}
                }
            }
            tracing::info!("shutting down: draining in-flight requests");
            trigger.cancel();
        });
        server.wait().await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}
