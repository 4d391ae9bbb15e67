//! The `plinth` binary as a user runs it: SIGHUP reloads the plugin
//! directory; SIGTERM drains in-flight requests, then the process exits
//! cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use plinth::grpc::pb;
use plinth::grpc::pb::compute_service_client::ComputeServiceClient;
use plinth::grpc::pb::model_service_client::ModelServiceClient;
use plinth_torch::trace::{self, Device, Kind, TchTensor};

const CONFIG: &str = "[[input]]\nname = \"x\"\ndtype = \"f32\"\nshape = [-1]\n[[output]]\nname = \"y\"\ndtype = \"f32\"\nshape = [-1]\n";

/// `y = 2x` after a long input-dependent matmul chain whose result is discarded.
fn write_slow_model(repo: &std::path::Path) {
    std::fs::create_dir_all(repo.join("slow/1")).unwrap();
    std::fs::write(repo.join("slow/config.toml"), CONFIG).unwrap();
    let weight = TchTensor::full([256, 256], 1.0 / 256.0, (Kind::Float, Device::Cpu));
    trace::save(
        &repo.join("slow/1/model.pt"),
        &[TchTensor::zeros([3], (Kind::Float, Device::Cpu))],
        |xs| {
            let step = &weight + xs[0].sum(Kind::Float) * 0.0;
            let mut acc = step.shallow_clone();
            for _ in 0..600 {
                acc = acc.matmul(&step);
            }
            vec![&xs[0] * 2.0 + acc.sum(Kind::Float) * 0.0]
        },
    )
    .unwrap();
}

/// How long a wait on the process may take: a bound on hangs, not a speed
/// assertion.
const PATIENCE: Duration = Duration::from_secs(60);

/// Runs `attempt` until it returns `Ok`, pausing 10 ms between attempts;
/// panics after [`PATIENCE`] (counting an attempt still pending) with `what`
/// and the last `Err` seen. The same contract as `plinth_tests::eventually`,
/// which this package cannot use: `plinth-tests` depends on `plinth`.
async fn eventually<T>(what: &str, mut attempt: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut last = String::from("nothing (no attempt finished)");
    loop {
        match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(observed)) => last = observed,
            Err(_) => panic!(
                "timed out after {PATIENCE:?} waiting for {what}: an attempt was still pending; last observed: {last}"
            ),
        }
        if tokio::time::Instant::now() + Duration::from_millis(10) >= deadline {
            panic!("timed out after {PATIENCE:?} waiting for {what}; last observed: {last}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The server process, killed if the test ends (or fails) while it runs.
struct Server(Child);

impl Server {
    /// Waits (bounded by [`PATIENCE`]) for the process to exit; its status.
    async fn exited(&mut self, what: &str) -> std::process::ExitStatus {
        eventually(what, async || {
            self.0
                .try_wait()
                .unwrap()
                .ok_or_else(|| "still running".to_owned())
        })
        .await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test]
async fn sighup_reloads_plugins_and_sigterm_drains_then_exits() {
    let repo = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    write_slow_model(repo.path());
    let child = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--metrics-port",
            "0",
        ])
        .arg("--model-repository")
        .arg(repo.path())
        .arg("--plugin-dir")
        .arg(plugins.path())
        .arg("--no-plugin-watch")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("plinth starts");
    let mut child = Server(child);

    // The log names the bound address; everything after it is collected for the end.
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let stdout = child.0.stdout.take().unwrap();
    let log_reader = std::thread::spawn(move || {
        let mut addr_tx = Some(addr_tx);
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = strip_ansi(&line.unwrap());
            if addr_tx.is_some()
                && let Some(pos) = line.find("grpc_addr=")
            {
                let addr = line[pos + "grpc_addr=".len()..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .to_owned();
                addr_tx.take().unwrap().send(addr).unwrap();
            }
            lines.push(line);
        }
        lines
    });
    let stderr = child.0.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map(|l| strip_ansi(&l.unwrap()))
            .collect::<Vec<_>>()
    });
    let mut addr_rx = addr_rx;
    let logged = eventually("the gRPC address in the log", async || {
        Ok((&mut addr_rx).await)
    })
    .await;
    let addr = match logged {
        Ok(addr) => addr,
        Err(_) => {
            let status = child.0.wait();
            let stderr = err_reader.join().unwrap_or_default();
            panic!(
                "plinth exited ({status:?}) before logging its gRPC address; stderr:\n{}",
                stderr.join("\n")
            );
        }
    };
    let url = format!("http://{addr}");

    let mut models = ModelServiceClient::connect(url.clone()).await.unwrap();
    let mut slow_status = async || {
        models
            .get_model(pb::GetModelRequest {
                name: "slow".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .model
            .unwrap()
            .status
            .unwrap()
    };
    eventually("model 'slow' READY", async || {
        let status = slow_status().await;
        assert_ne!(
            status.state,
            pb::ModelState::Failed as i32,
            "{}",
            status.reason
        );
        if status.state == pb::ModelState::Ready as i32 {
            Ok(())
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await;

    // With the watcher off, a new plugin file is picked up on SIGHUP only.
    let wasm_dir = std::env::var_os("PLINTH_PLUGIN_WASM_DIR")
        .expect("PLINTH_PLUGIN_WASM_DIR is not set: run the tests with `cargo xtask test`");
    let component = std::path::Path::new(&wasm_dir).join("softmax_topk.wasm");
    std::fs::copy(&component, plugins.path().join("topk.wasm")).expect("copy the plugin");
    let mut plugin_api = pb::plugin_service_client::PluginServiceClient::connect(url.clone())
        .await
        .unwrap();
    let listed = plugin_api
        .list_plugins(pb::ListPluginsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.plugins.is_empty(), "{listed:?}");
    let hup = Command::new("kill")
        .args(["-HUP", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let topk = eventually("plugin 'topk' serving after SIGHUP", async || {
        let listed = plugin_api
            .list_plugins(pb::ListPluginsRequest {})
            .await
            .unwrap()
            .into_inner();
        // Listed as compiling first, then serving.
        let topk = listed
            .plugins
            .iter()
            .find(|p| p.name == "topk" && !p.compiling);
        topk.cloned().ok_or_else(|| format!("{listed:?}"))
    })
    .await;
    assert!(topk.serving, "{topk:?}");
    assert_eq!(topk.world, "processor-plugin");

    let mut compute = ComputeServiceClient::connect(url.clone()).await.unwrap();
    let in_flight = tokio::spawn(async move {
        compute
            .compute(pb::ComputeRequest {
                model: "slow".into(),
                inputs: vec![pb::Tensor {
                    name: "x".into(),
                    dtype: pb::DataType::Float32 as i32,
                    shape: vec![2],
                    data: [3.0f32, -1.0]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect::<Vec<u8>>()
                        .into(),
                }],
                ..Default::default()
            })
            .await
    });
    eventually("the request in flight on 'slow'", async || {
        let status = slow_status().await;
        if status.in_flight >= 1 {
            Ok(())
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await;
    let killed = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let mut in_flight = in_flight;
    let response = eventually("the drained response", async || Ok((&mut in_flight).await))
        .await
        .unwrap()
        .expect("the in-flight request is drained, not dropped")
        .into_inner();
    let y: Vec<f32> = response.outputs[0]
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(y, [6.0, -2.0]);
    let exit = child.exited("plinth to exit after SIGTERM").await;
    assert!(exit.success(), "plinth exited with {exit}");
    let mut log = log_reader.join().unwrap();
    log.extend(err_reader.join().unwrap());
    let log = log.join("\n");
    assert!(
        log.contains("shutting down: draining in-flight requests"),
        "{log}"
    );
    assert!(log.contains("stopped"), "{log}");
    assert!(
        log.contains("SIGHUP: rescanning the plugin directory and reloading the security files"),
        "{log}"
    );
    // Who may call what is logged once at startup, group by group.
    assert!(
        log.contains("group=\"plugins\" open_to=loopback peers"),
        "{log}"
    );
}

/// One HTTP/1.1 GET on a fresh connection: the status code.
async fn http_status(addr: &str, path: &str) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: plinth\r\nconnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))
}

/// The value of `key=` in the first log line that has it.
fn logged(lines: &std::sync::mpsc::Receiver<String>, key: &str) -> String {
    let deadline = std::time::Instant::now() + PATIENCE;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let Ok(line) = lines.recv_timeout(left) else {
            break;
        };
        if let Some(pos) = line.find(key) {
            return line[pos + key.len()..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned();
        }
    }
    panic!("no `{key}` logged within {PATIENCE:?}");
}

/// A rollout-safe SIGTERM: readiness turns 503 at once while the server
/// still answers (so endpoints can be updated), for --drain-delay-s; a
/// second signal cuts the delay short; then the drain and a clean exit.
#[tokio::test]
async fn sigterm_turns_readiness_off_at_once_and_serves_through_the_drain_delay() {
    let repo = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    write_slow_model(repo.path());
    let child = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args(["serve", "--host", "127.0.0.1"])
        .args([
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--metrics-port",
            "0",
        ])
        // Far longer than the test needs: the second signal ends it.
        .args(["--drain-delay-s", "600", "--drain-timeout-s", "20"])
        .arg("--model-repository")
        .arg(repo.path())
        .arg("--plugin-dir")
        .arg(plugins.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("plinth starts");
    let mut child = Server(child);
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(strip_ansi(&line));
        }
    });
    let http = logged(&lines, "http_addr=");
    eventually("readiness 200", async || {
        match http_status(&http, "/v2/health/ready").await {
            Ok(200) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let pid = child.0.id().to_string();
    let signal = |name: &str| {
        let sent = Command::new("kill").args([name, &pid]).status().unwrap();
        assert!(sent.success());
    };
    signal("-TERM");
    eventually("readiness 503 after SIGTERM", async || {
        match http_status(&http, "/v2/health/ready").await {
            Ok(503) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // Still serving: the process runs, liveness and models answer.
    assert!(
        matches!(child.0.try_wait(), Ok(None)),
        "exited before its drain delay"
    );
    assert_eq!(http_status(&http, "/v2/health/live").await, Ok(200));
    assert_eq!(http_status(&http, "/v2/models/slow/ready").await, Ok(200));
    signal("-TERM");
    let exit = child
        .exited("plinth to exit after the second SIGTERM")
        .await;
    assert!(exit.success(), "plinth exited with {exit}");
}

/// What a guest prints during a call reaches the operator's log, one JSON
/// object per line with the plugin and the stream named, and the call runs
/// on: the guest's `println!` and `eprintln!` (WASI blocking writes) run on
/// the request's tokio worker without refusing. The plugin then aborts, and
/// with `on_error = "skip"` the request is served without it.
#[tokio::test]
async fn a_guests_output_during_a_call_reaches_the_json_log() {
    let repo = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(repo.path().join("double/1")).unwrap();
    std::fs::write(
        repo.path().join("double/config.toml"),
        format!("preprocess = [\"talker\"]\n{CONFIG}"),
    )
    .unwrap();
    trace::save(
        &repo.path().join("double/1/model.pt"),
        &[TchTensor::zeros([3], (Kind::Float, Device::Cpu))],
        |xs| vec![&xs[0] * 2.0],
    )
    .unwrap();
    let wasm_dir = std::env::var_os("PLINTH_PLUGIN_WASM_DIR")
        .expect("PLINTH_PLUGIN_WASM_DIR is not set: run the tests with `cargo xtask test`");
    std::fs::write(
        plugins.path().join("talker.toml"),
        "on_error = \"skip\"\n[config]\ntrap-in = \"abort\"\n",
    )
    .unwrap();
    std::fs::copy(
        std::path::Path::new(&wasm_dir).join("hostile_trap.wasm"),
        plugins.path().join("talker.wasm"),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args(["--log-format", "json", "serve", "--host", "127.0.0.1"])
        .args([
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--metrics-port",
            "0",
        ])
        .arg("--model-repository")
        .arg(repo.path())
        .arg("--plugin-dir")
        .arg(plugins.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("plinth starts");
    let mut child = Server(child);
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Every line is a JSON object; the address is a field of one of them.
    let grpc = loop {
        let line = lines.recv_timeout(PATIENCE).expect("a log line");
        let event: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|err| panic!("a log line that is not JSON ({err}): {line}"));
        if let Some(addr) = event["fields"]["grpc_addr"].as_str() {
            break addr.to_owned();
        }
    };
    let mut compute = eventually("the gRPC port", async || {
        ComputeServiceClient::connect(format!("http://{grpc}"))
            .await
            .map_err(|err| err.to_string())
    })
    .await;
    let request = pb::ComputeRequest {
        model: "double".into(),
        inputs: vec![pb::Tensor {
            name: "x".into(),
            dtype: pb::DataType::Float32 as i32,
            shape: vec![3],
            data: [1.0f32, 2.0, 3.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        }],
        ..Default::default()
    };
    let out = eventually("the model served", async || {
        compute
            .compute(request.clone())
            .await
            .map_err(|err| err.to_string())
    })
    .await
    .into_inner();
    let y: Vec<f32> = out.outputs[0]
        .data
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(y, [2.0, 4.0, 6.0], "served without the skipped plugin");

    // The guest's stdout at info, its stderr at warn, tagged with the
    // plugin and the stream; then the skip, naming the stderr tail.
    let mut wanted = vec![
        ("INFO", "stdout", "hostile-trap: preprocess called"),
        ("WARN", "stderr", "Traceback (most recent call last):"),
        (
            "WARN",
            "stderr",
            "ValueError: hostile-trap: deliberate abort in preprocess",
        ),
    ];
    let deadline = std::time::Instant::now() + PATIENCE;
    while !wanted.is_empty() {
        let left = deadline
            .checked_duration_since(std::time::Instant::now())
            .unwrap_or_else(|| panic!("never logged: {wanted:?}"));
        let Ok(line) = lines.recv_timeout(left) else {
            panic!("never logged: {wanted:?}");
        };
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        let fields = &event["fields"];
        wanted.retain(|(level, stream, message)| {
            !(event["level"] == *level
                && fields["plugin"] == "talker"
                && fields["stream"] == *stream
                && fields["message"] == *message)
        });
    }
}

/// The drain timeout counts from the signal, never from startup: a server
/// with a 1 s drain timeout still serves well after its first second.
/// (It once exited `drain_timeout` after starting.)
#[tokio::test]
async fn the_drain_timeout_does_not_end_a_server_that_was_never_signalled() {
    let repo = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    write_slow_model(repo.path());
    let child = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args(["serve", "--host", "127.0.0.1"])
        .args([
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--metrics-port",
            "0",
        ])
        .args(["--drain-timeout-s", "1"])
        .arg("--model-repository")
        .arg(repo.path())
        .arg("--plugin-dir")
        .arg(plugins.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("plinth starts");
    let mut child = Server(child);
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(strip_ansi(&line));
        }
    });
    let http = logged(&lines, "http_addr=");
    eventually("readiness 200", async || {
        match http_status(&http, "/v2/health/ready").await {
            Ok(200) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // Three drain timeouts later, still running and still answering.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        matches!(child.0.try_wait(), Ok(None)),
        "plinth exited with no signal"
    );
    assert_eq!(http_status(&http, "/v2/models/slow/ready").await, Ok(200));
    // And a signal still drains it within the timeout.
    let sent = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let exit = child.exited("plinth to exit after SIGTERM").await;
    assert!(exit.success(), "plinth exited with {exit}");
}
