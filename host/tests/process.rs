//! The `plinth` binary as a user runs it: SIGHUP reloads the plugin
//! directory; SIGTERM drains in-flight requests, then the process exits
//! cleanly.

mod common;

use std::time::Duration;

use common::{CONFIG, Server, eventually, f32_request, f32_values, http_status, readiness_becomes};
use plinth::grpc::pb;
use plinth::grpc::pb::compute_service_client::ComputeServiceClient;
use plinth::grpc::pb::model_service_client::ModelServiceClient;
use plinth_torch::trace::{self, Device, Kind, TchTensor};

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

#[tokio::test]
async fn sighup_reloads_plugins_and_sigterm_drains_then_exits() {
    let repo = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    write_slow_model(repo.path());
    // With the watcher off, a plugin file is picked up on SIGHUP only.
    let mut child = Server::start(&[], repo.path(), plugins.path(), &["--no-plugin-watch"]);
    let addr = child.logged("grpc_addr=");
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
    child.signal("-HUP");
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
    let in_flight =
        tokio::spawn(async move { compute.compute(f32_request("slow", &[3.0, -1.0])).await });
    eventually("the request in flight on 'slow'", async || {
        let status = slow_status().await;
        if status.in_flight >= 1 {
            Ok(())
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await;
    child.signal("-TERM");

    let mut in_flight = in_flight;
    let response = eventually("the drained response", async || Ok((&mut in_flight).await))
        .await
        .unwrap()
        .expect("the in-flight request is drained, not dropped")
        .into_inner();
    assert_eq!(f32_values(&response.outputs[0]), [6.0, -2.0]);
    let exit = child.exited("plinth to exit after SIGTERM").await;
    assert!(exit.success(), "plinth exited with {exit}");
    let log = eventually("the last log line", async || {
        let log = child.log();
        log.contains("stopped")
            .then_some(log)
            .ok_or_else(String::new)
    })
    .await;
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

/// A server over the slow model started with `args`, once it is ready: the
/// process, its HTTP address, and the repository and plugin directories.
async fn ready_slow_server(args: &[&str]) -> (Server, String, [tempfile::TempDir; 2]) {
    let repo = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    write_slow_model(repo.path());
    let child = Server::start(&[], repo.path(), plugins.path(), args);
    let http = child.logged("http_addr=");
    readiness_becomes(&http, 200).await;
    (child, http, [repo, plugins])
}

/// A rollout-safe SIGTERM: readiness turns 503 at once while the server
/// still answers (so endpoints can be updated), for --drain-delay-s; a
/// second signal cuts the delay short; then the drain and a clean exit.
#[tokio::test]
async fn sigterm_turns_readiness_off_at_once_and_serves_through_the_drain_delay() {
    // A drain delay far longer than the test needs: the second signal ends it.
    let (mut child, http, _dirs) =
        ready_slow_server(&["--drain-delay-s", "600", "--drain-timeout-s", "20"]).await;
    child.signal("-TERM");
    readiness_becomes(&http, 503).await;
    // Still serving: the process runs, liveness and models answer.
    assert!(child.running(), "exited before its drain delay");
    assert_eq!(http_status(&http, "/v2/health/live").await, Ok(200));
    assert_eq!(http_status(&http, "/v2/models/slow/ready").await, Ok(200));
    child.signal("-TERM");
    let exit = child
        .exited("plinth to exit after the second SIGTERM")
        .await;
    assert!(exit.success(), "plinth exited with {exit}");
}

/// What a guest prints during a call reaches the operator's log, one JSON
/// object per line with the plugin and the stream named, and the call runs
/// on: the guest's `println!` and `eprintln!` (WASI blocking writes) run on
/// the request's tokio worker without refusing. The plugin then aborts, and
/// with `on_error = "skip"` the request is served without it. The request
/// is traced: each of its lines carries its `trace_id` and `span_id`.
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
    // Traced, to a collector that is not there: the request's lines carry
    // its trace and span ids, and nothing fails.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let collector = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let child = Server::start(
        &["--log-format", "json"],
        repo.path(),
        plugins.path(),
        &["--otlp-endpoint", &collector, "--otlp-protocol", "grpc"],
    );
    let lines = &child.lines;
    // Every line is a JSON object; the address is a field of one of them.
    let grpc = loop {
        let line = lines.recv_timeout(common::PATIENCE).expect("a log line");
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
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let request = f32_request("double", &[1.0, 2.0, 3.0]);
    let out = eventually("the model served", async || {
        let mut traced = tonic::Request::new(request.clone());
        traced.metadata_mut().insert(
            "traceparent",
            format!("00-{trace_id}-00f067aa0ba902b7-01")
                .parse()
                .unwrap(),
        );
        compute.compute(traced).await.map_err(|err| err.to_string())
    })
    .await
    .into_inner();
    assert_eq!(
        f32_values(&out.outputs[0]),
        [2.0, 4.0, 6.0],
        "served without the skipped plugin"
    );

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
    let deadline = std::time::Instant::now() + common::PATIENCE;
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
                && fields["message"] == *message
                && event["span"]["trace_id"] == trace_id
                && event["span"]["span_id"]
                    .as_str()
                    .is_some_and(|id| id.len() == 16 && id != "00f067aa0ba902b7"))
        });
    }
}

/// The drain timeout counts from the signal, never from startup: a server
/// with a 1 s drain timeout still serves well after its first second.
/// (It once exited `drain_timeout` after starting.)
#[tokio::test]
async fn the_drain_timeout_does_not_end_a_server_that_was_never_signalled() {
    let (mut child, http, _dirs) = ready_slow_server(&["--drain-timeout-s", "1"]).await;
    // Three drain timeouts later, still running and still answering.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(child.running(), "plinth exited with no signal");
    assert_eq!(http_status(&http, "/v2/models/slow/ready").await, Ok(200));
    // And a signal still drains it within the timeout.
    child.signal("-TERM");
    let exit = child.exited("plinth to exit after SIGTERM").await;
    assert!(exit.success(), "plinth exited with {exit}");
}
