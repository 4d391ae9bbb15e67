//! `plinth` as a client of a running server: models, inference, plugins,
//! info and health, over gRPC (`plinth.v1` and `grpc.health.v1`), with the
//! security issue's token and TLS settings; and the plugin author's tools
//! that need no server (`plugin check`, `plugin new`, `plugin build`). Every
//! failure is one line ([`CliError`]) and a non-zero exit, never a backtrace.
//!
//! The `plinth` binary puts these commands next to `serve`. This crate does
//! not depend on the server: it speaks the protocol through `plinth-proto`
//! and checks plugins with the loader's own checks from `plinth-plugin`.

pub mod scaffold;
pub mod tensors;
pub mod top;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request, Status};

use plinth_proto::pb;

/// A failure to print as one line.
#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

impl From<Status> for CliError {
    fn from(status: Status) -> CliError {
        let code = match status.code() {
            Code::Unauthenticated => "unauthenticated (give a token: --token-file or PLINTH_TOKEN)",
            Code::PermissionDenied => "permission denied",
            Code::NotFound => "not found",
            Code::InvalidArgument => "invalid argument",
            Code::Unavailable => "unavailable",
            Code::AlreadyExists => "already exists",
            Code::FailedPrecondition => "failed precondition",
            Code::ResourceExhausted => "resource exhausted",
            Code::DeadlineExceeded => "deadline exceeded",
            _ => "error",
        };
        CliError(format!("{code}: {}", status.message()))
    }
}

pub type CliResult<T = ()> = Result<T, CliError>;

fn fail<T>(message: impl Into<String>) -> CliResult<T> {
    Err(CliError(message.into()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// How to reach the server. A token is never taken from the command line
/// (where `ps` shows it): from `--token-file` or the `PLINTH_TOKEN` variable.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// The server's gRPC address (host:port or a URL).
    #[arg(
        long,
        global = true,
        env = "PLINTH_SERVER",
        default_value = "127.0.0.1:8001"
    )]
    pub server: String,
    /// A file holding the bearer token (else the PLINTH_TOKEN variable, if set).
    #[arg(long, global = true, env = "PLINTH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Use TLS, trusting this CA (PEM).
    #[arg(long, global = true, env = "PLINTH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS (PEM), with --tls-key.
    #[arg(long, global = true, env = "PLINTH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, global = true, env = "PLINTH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the server's certificate is for, when it is not the host of --server.
    #[arg(long, global = true)]
    pub tls_server_name: Option<String>,
    /// table (for people) or json (one object, or one per line for streams).
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Subcommand, Debug)]
pub enum ModelsCommand {
    /// The models: state, versions, requests in flight, load time.
    List,
    /// Load (or with --reload replace) a model of the repository.
    Load {
        name: String,
        /// Follow the load to its end, showing progress; exit non-zero if it fails.
        #[arg(long)]
        wait: bool,
        /// Replace a ready model; its versions serve until the new ones are ready.
        #[arg(long)]
        reload: bool,
    },
    /// Unload a model: new requests are refused, those in flight finish.
    Unload { name: String },
    /// Print state changes as they happen (all models, or one), until interrupted.
    Watch { name: Option<String> },
}

#[derive(clap::Args, Debug)]
pub struct InferArgs {
    pub model: String,
    /// NAME=@FILE.npy or NAME=JSON (nested arrays, e.g. x='[[1,2,3,4]]'); repeat per input.
    #[arg(long = "input", short = 'i', required = true)]
    pub inputs: Vec<String>,
    /// A version label; the newest ready version when absent.
    #[arg(long)]
    pub version: Option<String>,
    /// Write every output as DIR/<name>.npy.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
}

/// Refuses a token that cannot be sent: one that is empty, or not a valid
/// header value (a control character or a non-ASCII byte), naming where it
/// came from; never its contents.
fn check_token(token: &str, source: &str) -> CliResult<()> {
    if token.is_empty() {
        return Err(CliError(format!("the token from {source} is empty")));
    }
    if let Some(bad) = token
        .chars()
        .position(|c| !(c.is_ascii_graphic() || c == ' '))
    {
        return Err(CliError(format!(
            "the token from {source} is not a valid header value: character {} is not printable ASCII",
            bad + 1
        )));
    }
    Ok(())
}

/// A connected client.
pub struct Client {
    channel: Channel,
    token: Option<String>,
    pub output: Output,
    /// The address as given, for what the client prints.
    pub server: String,
}

impl Client {
    pub async fn connect(args: &ClientArgs) -> CliResult<Client> {
        let token = match &args.token_file {
            Some(file) => Some(
                std::fs::read_to_string(file)
                    .map_err(|err| CliError(format!("--token-file {}: {err}", file.display())))?
                    .trim()
                    .to_owned(),
            ),
            None => std::env::var("PLINTH_TOKEN")
                .ok()
                .map(|t| t.trim().to_owned()),
        };
        let source = match &args.token_file {
            Some(file) => format!("--token-file {}", file.display()),
            None => "PLINTH_TOKEN".to_owned(),
        };
        if let Some(token) = &token {
            check_token(token, &source)?;
        }
        // Trust comes only from the CA named: TLS options without it would
        // otherwise connect in plaintext, silently.
        if args.tls_ca.is_none() {
            let given: Vec<&str> = [
                (args.tls_cert.is_some(), "--tls-cert"),
                (args.tls_key.is_some(), "--tls-key"),
                (args.tls_server_name.is_some(), "--tls-server-name"),
                (args.server.starts_with("https://"), "an https:// --server"),
            ]
            .into_iter()
            .filter_map(|(set, name)| set.then_some(name))
            .collect();
            if !given.is_empty() {
                return Err(CliError(format!(
                    "{} asks for TLS, which needs --tls-ca (the CA that signed the server's certificate); refusing to connect in plaintext",
                    given.join(" and ")
                )));
            }
        }
        let tls = args.tls_ca.is_some();
        let url = if args.server.contains("://") {
            args.server.clone()
        } else {
            format!("{}://{}", if tls { "https" } else { "http" }, args.server)
        };
        let mut endpoint = Channel::from_shared(url.clone())
            .map_err(|err| CliError(format!("--server {}: {err}", args.server)))?
            .connect_timeout(Duration::from_secs(10));
        if let Some(ca) = &args.tls_ca {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|err| CliError(format!("{}: {err}", path.display())))
            };
            let mut config =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
                config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            if let Some(name) = &args.tls_server_name {
                config = config.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|err| CliError(format!("TLS: {}", chain(&err))))?;
        }
        let channel = endpoint.connect().await.map_err(|err| {
            CliError(format!("cannot reach the server at {url}: {}", chain(&err)))
        })?;
        Ok(Client {
            channel,
            token,
            output: args.output,
            server: args.server.clone(),
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        // Checked by `connect`: a token that is not a header value is refused there.
        if let Some(token) = &self.token
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    fn models(&self) -> pb::model_service_client::ModelServiceClient<Channel> {
        pb::model_service_client::ModelServiceClient::new(self.channel.clone())
    }

    fn compute(&self) -> pb::compute_service_client::ComputeServiceClient<Channel> {
        pb::compute_service_client::ComputeServiceClient::new(self.channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    fn plugins(&self) -> pb::plugin_service_client::PluginServiceClient<Channel> {
        pb::plugin_service_client::PluginServiceClient::new(self.channel.clone())
    }
}

/// An error and its causes, on one line.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn state_name(state: i32) -> &'static str {
    match pb::ModelState::try_from(state).unwrap_or(pb::ModelState::Unspecified) {
        pb::ModelState::Unavailable => "UNAVAILABLE",
        pb::ModelState::Loading => "LOADING",
        pb::ModelState::Ready => "READY",
        pb::ModelState::Unloading => "UNLOADING",
        pb::ModelState::Failed => "FAILED",
        pb::ModelState::Unspecified => "UNSPECIFIED",
    }
}

fn status_json(m: &pb::ModelStatus) -> serde_json::Value {
    json!({
        "name": m.name,
        "state": state_name(m.state),
        "versions": m.versions,
        "formats": m.formats,
        "in_flight": m.in_flight,
        "load_ms": m.load_duration_us as f64 / 1000.0,
        "reloading": m.reloading,
        "memory_bytes": m.memory_bytes,
        "on_demand": m.on_demand,
        "device": m.device,
        "reason": m.reason,
    })
}

fn table(header: &[&str]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_header(header.iter().copied());
    table
}

/// The versions' formats: one word when they agree, else one per version
/// in the order of the versions.
fn formats_cell(formats: &[String]) -> String {
    match formats.first() {
        None => "-".into(),
        Some(first) if formats.iter().all(|f| f == first) => first.clone(),
        Some(_) => formats.join(","),
    }
}

fn load_time(us: i64) -> String {
    if us <= 0 {
        "-".into()
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

pub async fn models(client: &Client, command: ModelsCommand) -> CliResult {
    match command {
        ModelsCommand::List => {
            let models = client
                .models()
                .list_models(client.request(pb::ListModelsRequest {}))
                .await?
                .into_inner()
                .models;
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!(models.iter().map(status_json).collect::<Vec<_>>())
                ),
                Output::Table => {
                    let mut t = table(&[
                        "MODEL",
                        "STATE",
                        "VERSIONS",
                        "FORMAT",
                        "IN FLIGHT",
                        "LOAD TIME",
                        "REASON",
                    ]);
                    for m in &models {
                        t.add_row(vec![
                            m.name.clone(),
                            state_name(m.state).to_owned(),
                            m.versions.join(","),
                            formats_cell(&m.formats),
                            m.in_flight.to_string(),
                            load_time(m.load_duration_us),
                            m.reason.clone(),
                        ]);
                    }
                    println!("{t}");
                }
            }
            Ok(())
        }
        ModelsCommand::Load { name, wait, reload } => load(client, &name, wait, reload).await,
        ModelsCommand::Unload { name } => {
            let status = client
                .models()
                .unload_model(client.request(pb::UnloadModelRequest { name: name.clone() }))
                .await?
                .into_inner()
                .status
                .unwrap_or_default();
            print_status(client, &status);
            Ok(())
        }
        ModelsCommand::Watch { name } => {
            let mut stream = client
                .models()
                .watch_models(client.request(pb::WatchModelsRequest {
                    name: name.unwrap_or_default(),
                }))
                .await?
                .into_inner();
            while let Some(status) = stream.message().await? {
                print_status(client, &status);
            }
            Ok(())
        }
    }
}

fn print_status(client: &Client, m: &pb::ModelStatus) {
    match client.output {
        Output::Json => println!("{}", status_json(m)),
        Output::Table => {
            let versions = if m.versions.is_empty() {
                String::new()
            } else {
                format!(" versions {}", m.versions.join(","))
            };
            let reason = if m.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", m.reason)
            };
            println!("{} {}{versions}{reason}", m.name, state_name(m.state));
        }
    }
}

/// Starts the load; with `wait`, follows WatchModels to READY or FAILED,
/// with a spinner and the elapsed time on a terminal.
async fn load(client: &Client, name: &str, wait: bool, reload: bool) -> CliResult {
    let started = Instant::now();
    // Subscribe first, so no state change between the two calls is missed.
    let mut events = if wait {
        Some(
            client
                .models()
                .watch_models(client.request(pb::WatchModelsRequest { name: name.into() }))
                .await?
                .into_inner(),
        )
    } else {
        None
    };
    let accepted = client
        .models()
        .load_model(client.request(pb::LoadModelRequest {
            name: name.into(),
            reload,
            wait: false,
        }))
        .await?
        .into_inner()
        .status
        .unwrap_or_default();
    let Some(events) = events.as_mut() else {
        print_status(client, &accepted);
        return Ok(());
    };
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    spinner.set_message(format!("loading {name}"));
    spinner.enable_steady_tick(Duration::from_millis(100));
    // The accepted load is LOADING (or, for a reload, READY with `reloading`).
    let mut seen_loading = accepted.state == pb::ModelState::Loading as i32 || accepted.reloading;
    let outcome = loop {
        let Some(status) = events.message().await? else {
            break fail(format!(
                "the server ended the watch of {name} before the load finished"
            ));
        };
        let state = pb::ModelState::try_from(status.state).unwrap_or(pb::ModelState::Unspecified);
        if state == pb::ModelState::Loading || status.reloading {
            seen_loading = true;
            continue;
        }
        if !seen_loading {
            continue; // the snapshot from before the load started
        }
        match state {
            pb::ModelState::Ready => break Ok(status),
            pb::ModelState::Failed => {
                break fail(format!(
                    "{name} FAILED after {:.1} s: {}",
                    started.elapsed().as_secs_f64(),
                    status.reason
                ));
            }
            _ => {}
        }
    };
    spinner.finish_and_clear();
    let status = outcome?;
    match client.output {
        Output::Json => println!("{}", status_json(&status)),
        Output::Table => println!(
            "{name} READY in {:.1} s, versions {}",
            started.elapsed().as_secs_f64(),
            status.versions.join(",")
        ),
    }
    Ok(())
}

pub async fn infer(client: &Client, args: InferArgs) -> CliResult {
    let detail = client
        .models()
        .get_model(client.request(pb::GetModelRequest {
            name: args.model.clone(),
        }))
        .await?
        .into_inner()
        .model
        .unwrap_or_default();
    let mut inputs = Vec::new();
    for spec in &args.inputs {
        inputs.push(tensors::parse_input(spec, &detail.inputs)?);
    }
    let response = client
        .compute()
        .compute(client.request(pb::ComputeRequest {
            id: String::new(),
            model: args.model.clone(),
            version: args.version.clone().unwrap_or_default(),
            inputs,
            parameters: Default::default(),
        }))
        .await?
        .into_inner();
    if let Some(dir) = &args.output_dir {
        std::fs::create_dir_all(dir)
            .map_err(|err| CliError(format!("--output-dir {}: {err}", dir.display())))?;
    }
    let mut printed = Vec::new();
    for tensor in &response.outputs {
        let written = match &args.output_dir {
            Some(dir) => {
                let path = dir.join(format!("{}.npy", tensor.name));
                tensors::write_npy(tensor, &path)?;
                Some(path)
            }
            None => None,
        };
        printed.push(tensors::describe(
            tensor,
            written.as_deref(),
            client.output,
        )?);
    }
    match client.output {
        Output::Json => println!(
            "{}",
            json!({"model": response.model, "version": response.version, "outputs": printed})
        ),
        Output::Table => {
            println!("{} version {}", response.model, response.version);
            for line in printed {
                println!("{}", line.as_str().unwrap_or_default());
            }
        }
    }
    Ok(())
}

#[derive(clap::Subcommand, Debug)]
pub enum PluginCommand {
    /// The plugins of the server's plugin directory.
    List,
    /// Re-read one plugin (or the whole directory) now.
    Reload { name: Option<String> },
    /// Check a component as the loader would, without a server: its world,
    /// the WIT version it targets, and whether this host accepts it.
    Check {
        file: PathBuf,
        /// The plugin's manifest (default: FILE with .toml beside it, if present).
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Create a plugin project that builds as it is: a Rust crate on
    /// plugin-sdk, or a Python app for componentize-py.
    New(scaffold::NewArgs),
    /// Build a plugin project into NAME.wasm, with its manifest beside it.
    Build(scaffold::BuildArgs),
}

pub async fn plugins(client: &Client, command: PluginCommand) -> CliResult {
    let plugins = match command {
        PluginCommand::List => {
            client
                .plugins()
                .list_plugins(client.request(pb::ListPluginsRequest {}))
                .await?
                .into_inner()
                .plugins
        }
        PluginCommand::Reload { name } => {
            let reloaded = client
                .plugins()
                .reload_plugins(client.request(pb::ReloadPluginsRequest {
                    name: name.unwrap_or_default(),
                }))
                .await?
                .into_inner()
                .plugins;
            let failed: Vec<String> = reloaded
                .iter()
                .filter(|p| !p.load_error.is_empty())
                .map(|p| format!("{}: {}", p.name, p.load_error))
                .collect();
            print_plugins(client, &reloaded);
            if !failed.is_empty() {
                return fail(format!("not loaded: {}", failed.join("; ")));
            }
            return Ok(());
        }
        PluginCommand::Check { file, manifest } => {
            return check_plugin(&file, manifest, client.output);
        }
        PluginCommand::New(args) => return scaffold::new(args),
        PluginCommand::Build(args) => return scaffold::build(args),
    };
    print_plugins(client, &plugins);
    Ok(())
}

fn print_plugins(client: &Client, plugins: &[pb::PluginStatus]) {
    match client.output {
        Output::Json => {
            let rows: Vec<serde_json::Value> = plugins
                .iter()
                .map(|p| {
                    json!({
                        "name": p.name, "world": p.world, "version": p.version,
                        "serving": p.serving, "compiling": p.compiling, "calls": p.calls,
                        "errors": p.errors, "skips": p.skips, "recycled": p.recycled,
                        "file_hash": p.file_hash, "last_error": p.last_error, "load_error": p.load_error,
                    })
                })
                .collect();
            println!("{}", json!(rows));
        }
        Output::Table => {
            let mut t = table(&[
                "PLUGIN", "WORLD", "VERSION", "STATE", "CALLS", "ERRORS", "SKIPS", "HASH",
                "PROBLEM",
            ]);
            for p in plugins {
                let problem = if p.load_error.is_empty() {
                    &p.last_error
                } else {
                    &p.load_error
                };
                t.add_row(vec![
                    p.name.clone(),
                    p.world.clone(),
                    p.version.clone(),
                    match (p.serving, p.compiling) {
                        (_, true) => "compiling",
                        (true, false) => "serving",
                        (false, false) => "failed",
                    }
                    .to_owned(),
                    p.calls.to_string(),
                    p.errors.to_string(),
                    p.skips.to_string(),
                    p.file_hash.chars().take(12).collect(),
                    problem.clone(),
                ]);
            }
            println!("{t}");
        }
    }
}

/// `plinth plugin check FILE`: the loader's checks, no server.
pub fn check_plugin(
    file: &std::path::Path,
    manifest: Option<PathBuf>,
    output: Output,
) -> CliResult {
    let bytes =
        std::fs::read(file).map_err(|err| CliError(format!("{}: {err}", file.display())))?;
    let manifest_path = manifest.unwrap_or_else(|| file.with_extension("toml"));
    let manifest = plinth_plugin::Manifest::load(&manifest_path).map_err(CliError)?;
    let name = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin")
        .to_owned();
    let report = plinth_plugin::check_component(&name, &bytes, manifest)
        .map_err(|err| CliError(format!("{}: refused: {err}", file.display())))?;
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "file": file.display().to_string(), "accepted": true, "world": report.world,
                "interfaces": report.interfaces, "name": report.info.name,
                "version": report.info.version, "description": report.info.description,
                "host_wit": report.host_wit,
            })
        ),
        Output::Table => {
            println!(
                "{}: accepted by this host (plinth:plugin@{})",
                file.display(),
                report.host_wit
            );
            println!("world:       {}", report.world);
            println!("interfaces:  {}", report.interfaces.join(", "));
            println!("plugin:      {} {}", report.info.name, report.info.version);
            if !report.info.description.is_empty() {
                println!("description: {}", report.info.description);
            }
        }
    }
    Ok(())
}

pub async fn info(client: &Client) -> CliResult {
    let info = client
        .compute()
        .get_info(client.request(pb::GetInfoRequest::default()))
        .await?
        .into_inner();
    let budget = info.thread_budget.unwrap_or_default();
    match client.output {
        Output::Json => println!(
            "{}",
            json!({
                "version": info.version, "libtorch": info.libtorch_version, "cuda": info.cuda_available,
                "devices": info.devices.iter().map(|d| json!({"name": d.name, "memory_total_bytes": d.memory_total_bytes, "memory_used_bytes": d.memory_used_bytes})).collect::<Vec<_>>(),
                "thread_budget": {"cores": budget.cores, "executors": budget.executors, "torch_threads": budget.torch_threads, "cores_in_use": budget.cores_in_use, "cores_peak": budget.cores_peak},
                "models": info.models.iter().map(status_json).collect::<Vec<_>>(),
            })
        ),
        Output::Table => {
            println!(
                "plinth {} (libtorch {}), CUDA {}",
                info.version,
                info.libtorch_version,
                if info.cuda_available {
                    "available"
                } else {
                    "not available"
                }
            );
            for d in &info.devices {
                println!(
                    "device {}: {} MiB used of {} MiB",
                    d.name,
                    d.memory_used_bytes >> 20,
                    d.memory_total_bytes >> 20
                );
            }
            println!(
                "compute budget: {} cores, {} in use (peak {}), {} executors, {} torch threads",
                budget.cores,
                budget.cores_in_use,
                budget.cores_peak,
                budget.executors,
                budget.torch_threads
            );
            let ready = info
                .models
                .iter()
                .filter(|m| m.state == pb::ModelState::Ready as i32)
                .count();
            println!("models: {} known, {ready} ready", info.models.len());
        }
    }
    Ok(())
}

/// `grpc.health.v1` Check: exit 0 when SERVING, as a probe would.
pub async fn health(client: &Client) -> CliResult {
    let mut health = tonic_health::pb::health_client::HealthClient::new(client.channel.clone());
    let status = health
        .check(client.request(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        }))
        .await?
        .into_inner()
        .status;
    let serving = status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let name = if serving { "SERVING" } else { "NOT_SERVING" };
    match client.output {
        Output::Json => println!("{}", json!({"status": name})),
        Output::Table => println!("{name}"),
    }
    if serving {
        return Ok(());
    }
    // Why, if the server may tell us (GetInfo is in the metadata group).
    let reason = client
        .compute()
        .get_info(client.request(pb::GetInfoRequest::default()))
        .await
        .ok()
        .map(|info| info.into_inner().not_ready_reason)
        .filter(|reason| !reason.is_empty());
    match reason {
        Some(reason) => fail(format!("the server is not ready (NOT_SERVING): {reason}")),
        None => fail("the server is not ready (NOT_SERVING)"),
    }
}
