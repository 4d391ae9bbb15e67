//! `plinth` as a client: each subcommand against a real server, checked on
//! its output and exit status, with tokens and TLS as an operator uses them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// A bound on hangs, not a speed assertion.
const PATIENCE: Duration = Duration::from_secs(60);

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ok={} stdout:\n{}\nstderr:\n{}",
            self.ok, self.stdout, self.stderr
        )
    }
}

/// Runs `plinth ARGS` against `server` (with extra environment) and waits.
async fn plinth(server: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_plinth"));
    cmd.args(args)
        .env("PLINTH_SERVER", server)
        .env_remove("PLINTH_TOKEN")
        .env_remove("PLINTH_TOKEN_FILE")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out: Output =
        tokio::time::timeout(PATIENCE, tokio::task::spawn_blocking(move || cmd.output()))
            .await
            .expect("the command ends within PATIENCE")
            .unwrap()
            .unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A failure: exit status non-zero, exactly one line on stderr, no backtrace.
fn one_line_failure(run: &Run, needle: &str) {
    assert!(!run.ok, "expected a failure: {run:?}");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {run:?}");
    assert!(
        lines[0].starts_with("plinth: ") && lines[0].contains(needle),
        "{run:?}"
    );
    assert!(!run.stderr.contains("backtrace"), "{run:?}");
}

struct Server {
    running: Option<plinth::RunningServer>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Server {
    fn grpc(&self) -> String {
        self.running.as_ref().unwrap().grpc_addr.to_string()
    }

    async fn stop(mut self) {
        self.running.take().unwrap().shutdown().await;
    }
}

/// The demo repository plus a model whose file is not TorchScript.
async fn start(tweak: impl FnOnce(&mut plinth::ServerConfig)) -> Server {
    let repo = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    plinth::demo::write_demo_repository(repo.path()).unwrap();
    let broken = repo.path().join("broken");
    std::fs::create_dir_all(broken.join("1")).unwrap();
    std::fs::copy(
        repo.path().join("double/config.toml"),
        broken.join("config.toml"),
    )
    .unwrap();
    std::fs::write(broken.join("1/model.pt"), b"not a model").unwrap();
    let wasm_dir = std::env::var_os("PLINTH_PLUGIN_WASM_DIR")
        .expect("PLINTH_PLUGIN_WASM_DIR is not set: run the tests with `cargo xtask test`");
    std::fs::copy(
        Path::new(&wasm_dir).join("prometheus_metrics.wasm"),
        plugins.path().join("metrics.wasm"),
    )
    .unwrap();
    let mut config = plinth::ServerConfig::ephemeral(repo.path(), plugins.path());
    // `broken` fails at startup: relaxed readiness, unless a test asks.
    config.strict_readiness = false;
    tweak(&mut config);
    let running = plinth::start(config).await.expect("server starts");
    let server = Server {
        running: Some(running),
        _dirs: vec![repo, plugins],
    };
    // Judged once the startup loads (broken fails) and the plugin are done.
    let health = std::sync::Arc::clone(&server.running.as_ref().unwrap().health);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while health.verdict().message == "startup loads in progress" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server was not ready within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subcommand_answers_with_its_output_and_exit_status() {
    let srv = start(|_| {}).await;
    let s = srv.grpc();

    let list = plinth(&s, &["models", "list"], &[]).await;
    assert!(list.ok, "{list:?}");
    let affine = list
        .stdout
        .lines()
        .find(|l| l.contains("affine"))
        .expect("affine listed");
    assert!(
        affine.contains("READY") && affine.contains(" 1 "),
        "{list:?}"
    );
    let broken = list
        .stdout
        .lines()
        .find(|l| l.contains("broken"))
        .expect("broken listed");
    assert!(broken.contains("FAILED"), "{list:?}");
    let json = plinth(&s, &["models", "list", "--output", "json"], &[]).await;
    let rows: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON");
    assert_eq!(rows.as_array().unwrap().len(), 3, "{json:?}");

    let unload = plinth(&s, &["models", "unload", "double"], &[]).await;
    assert!(unload.ok && unload.stdout.contains("double"), "{unload:?}");
    let load = plinth(&s, &["models", "load", "double", "--wait"], &[]).await;
    assert!(
        load.ok && load.stdout.contains("double READY in"),
        "{load:?}"
    );
    let failed = plinth(&s, &["models", "load", "broken", "--wait", "--reload"], &[]).await;
    one_line_failure(&failed, "broken FAILED after");
    let unknown = plinth(&s, &["models", "load", "nope"], &[]).await;
    one_line_failure(&unknown, "not found: model 'nope'");

    // Inference: numbers inline, then through .npy both ways.
    let infer = plinth(
        &s,
        &["infer", "affine", "-i", "x=[[1,2,3,4],[0,0,0,0]]"],
        &[],
    )
    .await;
    assert!(infer.ok, "{infer:?}");
    assert!(
        infer
            .stdout
            .contains("y f32 [2, 3] = [[1.5,1.5,7.0],[0.5,-0.5,0.0]]"),
        "{infer:?}"
    );
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let to_npy = plinth(
        &s,
        &["infer", "double", "-i", "x=[1,2.5,-3]", "--output-dir", dir],
        &[],
    )
    .await;
    assert!(
        to_npy.ok && out.path().join("y.npy").is_file(),
        "{to_npy:?}"
    );
    let npy = format!("x=@{}", out.path().join("y.npy").display());
    let from_npy = plinth(
        &s,
        &["infer", "double", "-i", &npy, "--output", "json"],
        &[],
    )
    .await;
    let answer: serde_json::Value = serde_json::from_str(&from_npy.stdout).expect("JSON");
    assert_eq!(
        answer["outputs"][0]["data"],
        serde_json::json!([4.0, 10.0, -12.0]),
        "{from_npy:?}"
    );
    one_line_failure(
        &plinth(&s, &["infer", "affine", "-i", "w=[1]"], &[]).await,
        "no input \"w\" (its inputs: x)",
    );
    one_line_failure(
        &plinth(&s, &["infer", "affine", "-i", "x=[[1,2,3]]"], &[]).await,
        "invalid argument: model 'affine': input 'x'",
    );

    let plugins = plinth(&s, &["plugin", "list"], &[]).await;
    let row = plugins
        .stdout
        .lines()
        .find(|l| l.contains("metrics"))
        .unwrap_or_default();
    assert!(
        plugins.ok && row.contains("metrics-plugin") && row.contains("serving"),
        "{plugins:?}"
    );
    let header: Vec<&str> = plugins
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "PLUGIN", "WORLD", "VERSION", "STATE", "CALLS", "ERRORS", "SKIPS", "HASH", "PROBLEM"
        ],
        "{plugins:?}"
    );
    let reload = plinth(&s, &["plugin", "reload", "metrics"], &[]).await;
    assert!(reload.ok && reload.stdout.contains("metrics"), "{reload:?}");

    let info = plinth(&s, &["info"], &[]).await;
    assert!(
        info.ok
            && info.stdout.contains("libtorch 2.11")
            && info.stdout.contains("models: 3 known, 2 ready"),
        "{info:?}"
    );
    let health = plinth(&s, &["health"], &[]).await;
    assert!(health.ok && health.stdout.trim() == "SERVING", "{health:?}");

    // watch: the snapshot, then a change made while it runs.
    let watch_server = s.clone();
    let watch = tokio::spawn(async move {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"));
        cmd.args(["models", "watch", "double"])
            .env("PLINTH_SERVER", &watch_server)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        let mut seen = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push(line);
            if seen
                .iter()
                .any(|l| l.contains("UNLOADING") || l.contains("UNAVAILABLE"))
            {
                break;
            }
        }
        seen
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(plinth(&s, &["models", "unload", "double"], &[]).await.ok);
    let seen = tokio::time::timeout(PATIENCE, watch)
        .await
        .expect("watch saw the unload")
        .unwrap();
    assert!(seen[0].starts_with("double READY"), "{seen:?}");

    srv.stop().await;
    // The server is gone: one line, non-zero.
    one_line_failure(
        &plinth(&s, &["models", "list"], &[]).await,
        "cannot reach the server at http://",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_check_says_what_the_loader_would_without_a_server() {
    let wasm_dir = PathBuf::from(std::env::var_os("PLINTH_PLUGIN_WASM_DIR").unwrap());
    let good = wasm_dir.join("softmax_topk.wasm");
    let run = plinth(
        "127.0.0.1:1",
        &["plugin", "check", good.to_str().unwrap()],
        &[],
    )
    .await;
    assert!(run.ok, "{run:?}");
    assert!(
        run.stdout.contains("world:       processor-plugin"),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("plinth:plugin/processor@0.1.1"),
        "{run:?}"
    );
    let future = wasm_dir.join("hostile_version_mismatch.wasm");
    one_line_failure(
        &plinth(
            "127.0.0.1:1",
            &["plugin", "check", future.to_str().unwrap()],
            &[],
        )
        .await,
        "built against plinth:plugin@1.0.0, but this host speaks plinth:plugin@0.1.1",
    );
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, "junk").unwrap();
    one_line_failure(
        &plinth(
            "127.0.0.1:1",
            &["plugin", "check", junk.to_str().unwrap()],
            &[],
        )
        .await,
        "not a valid WebAssembly component",
    );
}

/// Tokens from a file or the environment, never the command line; TLS
/// with the CA (and a client certificate for mutual TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_tls_as_an_operator_gives_them() {
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("ops.token");
    std::fs::write(&token, "ops-0123456789abcdef\n").unwrap();
    let auth = secrets.path().join("auth.toml");
    std::fs::write(
        &auth,
        "[[tokens]]\nname = \"ops\"\nfile = \"ops.token\"\ngroups = [\"all\"]\n",
    )
    .unwrap();
    // A CA, a server certificate for 127.0.0.1, a client certificate.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let issue = |sans: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose, name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca).unwrap();
        let (c, k) = (
            secrets.path().join(format!("{name}.crt")),
            secrets.path().join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    };
    let (server_crt, server_key) = issue(
        vec!["127.0.0.1".into(), "localhost".into()],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        "server",
    );
    let (client_crt, client_key) = issue(
        Vec::new(),
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        "client",
    );
    let ca_file = secrets.path().join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let srv = start(|c| {
        c.security.auth_config = Some(auth.clone());
        c.security.tls = Some(plinth::security::TlsFiles {
            cert: server_crt.clone(),
            key: server_key.clone(),
            client_ca: Some(ca_file.clone()),
        });
    })
    .await;
    let s = srv.grpc();
    let (ca, crt, key, tok) = (
        ca_file.to_str().unwrap(),
        client_crt.to_str().unwrap(),
        client_key.to_str().unwrap(),
        token.to_str().unwrap(),
    );
    let tls = [
        "--tls-ca",
        ca,
        "--tls-cert",
        crt,
        "--tls-key",
        key,
        "--tls-server-name",
        "localhost",
    ];
    let mut with_file = vec!["models", "list", "--token-file", tok];
    with_file.extend(tls);
    let run = plinth(&s, &with_file, &[]).await;
    assert!(run.ok && run.stdout.contains("affine"), "{run:?}");
    let mut with_env = vec!["info"];
    with_env.extend(tls);
    let run = plinth(&s, &with_env, &[("PLINTH_TOKEN", "ops-0123456789abcdef")]).await;
    assert!(run.ok && run.stdout.contains("libtorch"), "{run:?}");
    let run = plinth(&s, &with_env, &[]).await;
    one_line_failure(&run, "unauthenticated");
    let mut no_client_cert = vec!["health", "--tls-ca", ca, "--tls-server-name", "localhost"];
    no_client_cert.extend(["--token-file", tok]);
    let run = plinth(&s, &no_client_cert, &[]).await;
    assert!(
        !run.ok,
        "mutual TLS refuses a client without a certificate: {run:?}"
    );
    let run = plinth(&s, &["health", "--token-file", tok], &[]).await;
    assert!(!run.ok, "plaintext to a TLS port fails: {run:?}");
    // A client certificate without --tls-ca once connected in plaintext:
    // now it is refused in one line before any connection.
    let run = plinth(
        &s,
        &[
            "health",
            "--token-file",
            tok,
            "--tls-cert",
            crt,
            "--tls-key",
            key,
        ],
        &[],
    )
    .await;
    one_line_failure(
        &run,
        "--tls-cert and --tls-key asks for TLS, which needs --tls-ca",
    );
    let https = format!("https://{s}");
    let run = plinth(&https, &["health", "--token-file", tok], &[]).await;
    one_line_failure(
        &run,
        "an https:// --server asks for TLS, which needs --tls-ca",
    );
    // A token that is not a header value was once dropped silently.
    let bad = secrets.path().join("bad.token");
    std::fs::write(&bad, "ops-01234\u{7f}56789\n").unwrap();
    let mut bad_token = vec!["info", "--token-file", bad.to_str().unwrap()];
    bad_token.extend(tls);
    let run = plinth(&s, &bad_token, &[]).await;
    one_line_failure(&run, "is not a valid header value: character 10");
    let run = plinth(&s, &with_env, &[("PLINTH_TOKEN", "caf\u{e9}")]).await;
    one_line_failure(
        &run,
        "the token from PLINTH_TOKEN is not a valid header value",
    );
    srv.stop().await;
}

/// With strict readiness a FAILED startup model keeps the server
/// NOT_SERVING, and `plinth health` says which model and why, in one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plinth_health_names_the_model_that_holds_readiness_back() {
    let srv = start(|c| c.strict_readiness = true).await;
    let run = plinth(&srv.grpc(), &["health"], &[]).await;
    one_line_failure(&run, "NOT_SERVING): not ready (strict readiness");
    assert!(run.stderr.contains("model 'broken' is FAILED"), "{run:?}");
    assert!(!run.stderr.contains("affine"), "{run:?}");
    srv.stop().await;
}

/// `plinth serve --check` reads each `.pt2` package without loading it (no
/// library is unpacked under /tmp) and reports each problem in one line.
#[test]
fn serve_check_reads_packages_without_loading_them() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/pt2");
    let repo = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let model = |name: &str, max_batch_size: u32, fixture: &str, shape: &str, out: &str| {
        let dir = repo.path().join(name);
        std::fs::create_dir_all(dir.join("1")).unwrap();
        std::fs::write(
            dir.join("config.toml"),
            format!("max_batch_size = {max_batch_size}\n[[input]]\nname = \"x\"\ndtype = \"f32\"\nshape = {shape}\n[[output]]\nname = \"y\"\ndtype = \"f32\"\nshape = {out}\n"),
        )
        .unwrap();
        std::fs::copy(
            fixtures.join(fixture).join("model.pt2"),
            dir.join("1/model.pt2"),
        )
        .unwrap();
        dir.join("1/model.pt2")
    };
    model("good", 64, "tiny", "[16]", "[16]");
    model("too_wide", 32, "cnn", "[3, 16, 16]", "[10]");
    let truncated = model("truncated", 64, "tiny", "[16]", "[16]");
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();

    let check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_plinth"))
            .args(["serve", "--check", "--model-repository"])
            .arg(repo.path())
            .arg("--plugin-dir")
            .arg(plugins.path())
            .output()
            .unwrap()
    };
    let before = unpacked_under_tmp();
    let output = check();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(!output.status.success(), "{stdout}{stderr}");
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("plinth: ") && l.contains("model.pt2"))
        .collect();
    assert_eq!(problems.len(), 2, "{stderr}");
    assert!(
        problems.iter().any(|l| l.contains("too_wide/1/model.pt2")
            && l.contains("max_batch_size = 32")
            && l.contains("at most 15")),
        "{stderr}"
    );
    assert!(
        problems
            .iter()
            .any(|l| l.contains("truncated/1/model.pt2")
                && l.contains("not a readable .pt2 package")),
        "{stderr}"
    );
    assert!(stderr.contains("found 2 problem(s)"), "{stderr}");
    // With the bad ones gone, the good package passes and is named.
    std::fs::remove_dir_all(repo.path().join("too_wide")).unwrap();
    std::fs::remove_dir_all(repo.path().join("truncated")).unwrap();
    let output = check();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("model good: 1 version(s) to load (aoti-package)")
            && stdout.contains("temporary directory /tmp: writable"),
        "{stdout}"
    );
    assert_eq!(
        unpacked_under_tmp(),
        before,
        "--check unpacked a package under /tmp"
    );
}

/// The packages libtorch has unpacked under /tmp (`/tmp/XXXXXX/<archive>/data/aotinductor`).
fn unpacked_under_tmp() -> std::collections::BTreeSet<std::path::PathBuf> {
    std::fs::read_dir("/tmp")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    std::fs::read_dir(p)
                        .map(|inner| {
                            inner
                                .flatten()
                                .any(|i| i.path().join("data/aotinductor").is_dir())
                        })
                        .unwrap_or(false)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `plinth top --once --output json`: the models and the plugin, with the
/// rates of the requests served between its two reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_reports_rates_queues_and_plugins() {
    let srv = start(|_| {}).await;
    let s = srv.grpc();
    let load = keep_calling_affine(&s);
    let run = plinth(
        &s,
        &["top", "--once", "--interval", "0.5", "--output", "json"],
        &[],
    )
    .await;
    load.abort();
    assert!(run.ok, "{run:?}");
    let frame: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("one JSON frame");
    let affine = frame["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == "affine")
        .unwrap_or_else(|| panic!("affine in {frame}"));
    assert!(
        affine["requests_per_second"].as_f64().unwrap() > 0.0,
        "{frame}"
    );
    assert!(affine["p50_seconds"].as_f64().unwrap() > 0.0, "{frame}");
    assert!(affine["memory_bytes"].as_f64().unwrap() > 0.0, "{frame}");
    let metrics = frame["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["plugin"] == "metrics")
        .unwrap_or_else(|| panic!("the metrics plugin in {frame}"));
    assert!(metrics["calls"].as_f64().unwrap() > 0.0, "{frame}");
    // --interval must be a positive number of seconds.
    one_line_failure(
        &plinth(&s, &["top", "--once", "--interval", "0"], &[]).await,
        "--interval",
    );
    srv.stop().await;
}

/// Calls `affine` over and over until aborted (or for [`PATIENCE`] at most).
fn keep_calling_affine(server: &str) -> tokio::task::JoinHandle<()> {
    let url = format!("http://{server}");
    let started = std::time::Instant::now();
    tokio::spawn(async move {
        let mut client =
            plinth::grpc::pb::compute_service_client::ComputeServiceClient::connect(url)
                .await
                .unwrap();
        while started.elapsed() < PATIENCE {
            let request = plinth::grpc::pb::ComputeRequest {
                model: "affine".into(),
                inputs: vec![plinth::grpc::pb::Tensor {
                    name: "x".into(),
                    dtype: plinth::grpc::pb::DataType::Float32 as i32,
                    shape: vec![1, 4],
                    data: [1.0f32, 2.0, 3.0, 4.0]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect::<Vec<u8>>()
                        .into(),
                }],
                ..Default::default()
            };
            let _ = client.compute(request).await;
        }
    })
}

/// `plinth top` as a person runs it: in a terminal (tmux), against a server
/// under load, refreshing; two captures of the pane a refresh apart show
/// the affine row with requests per second and numbers that move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_in_a_terminal_shows_the_numbers_move_under_load() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("SKIPPED top_in_a_terminal_shows_the_numbers_move_under_load: no tmux here");
        return;
    }
    let srv = start(|_| {}).await;
    let s = srv.grpc();
    let load = keep_calling_affine(&s);
    let session = format!("plinth-top-{}", std::process::id());
    let command = format!(
        "PLINTH_SERVER={s} {} top --interval 0.5",
        env!("CARGO_BIN_EXE_plinth")
    );
    let tmux = |args: &[&str]| Command::new("tmux").args(args).output().expect("tmux runs");
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "160",
        "-y",
        "40",
        &command,
    ]);
    assert!(started.status.success(), "{started:?}");
    let capture = || {
        let out = tmux(&["capture-pane", "-p", "-t", &session]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let affine_row = |screen: &str| {
        screen
            .lines()
            .find(|l| l.trim_start().starts_with("affine"))
            .map(str::to_owned)
    };
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut rows = Vec::new();
    while rows.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "plinth top did not show two different affine rows: {rows:?}\n{}",
            capture()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let screen = capture();
        if let Some(row) = affine_row(&screen) {
            let rps: f64 = row
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            if rps > 0.0 && rows.last() != Some(&row) {
                assert!(
                    screen.contains("REQ/S") && screen.contains("PLUGIN"),
                    "{screen}"
                );
                rows.push(row);
            }
        }
    }
    tmux(&["send-keys", "-t", &session, "C-c", ""]);
    tmux(&["kill-session", "-t", &session]);
    load.abort();
    srv.stop().await;
}
