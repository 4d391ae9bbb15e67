//! Orchestrators (WIT 0.1.1): plugins served as models that call other
//! models, through gRPC, REST and `plinth.v1`, with the real `cascade` and
//! `hostile-orchestrator` components; and the 0.1.0 contract still loading.

use plinth::grpc::{ipb, pb};
use plinth_tests::fixtures;
use plinth_tests::{TestServer, compute_request, f32_tensor, f32_values, install_plugin};
use serde_json::{Value, json};

use super::plugins::metrics_containing;
use tonic::Code;

/// Rows of scores whose top is exact in binary: with a threshold of 0.6,
/// rows 1 and 2 are uncertain.
const ROWS: [[f32; 3]; 4] = [
    [0.75, 0.125, 0.125],
    [0.5, 0.25, 0.25],
    [0.25, 0.25, 0.5],
    [0.875, 0.0625, 0.0625],
];

/// What the cascade answers for [`ROWS`]: the small model's rows (y = x)
/// where it is sure, the large model's (y = 4x) where it is not.
const CASCADED: [f32; 12] = [
    0.75, 0.125, 0.125, 2.0, 1.0, 1.0, 1.0, 1.0, 2.0, 0.875, 0.0625, 0.0625,
];

fn serving(status: &pb::PluginStatus) -> bool {
    status.serving && status.load_error.is_empty()
}

fn flat(rows: &[[f32; 3]]) -> Vec<f32> {
    rows.iter().flatten().copied().collect()
}

pub(crate) fn cascade_manifest(threshold: f32) -> String {
    format!("[config]\nsmall = \"small\"\nlarge = \"large\"\nthreshold = {threshold}\n")
}

/// `small` (y = x), `large` (y = 4x) and the `cascade` entry, all batching
/// rows of three f32.
fn cascade_repo(repo: &std::path::Path) {
    fixtures::batched_scale(repo, "small", 1.0);
    fixtures::batched_scale(repo, "large", 4.0);
    fixtures::batched_rows_config()
        .orchestrator("cascade")
        .write(repo, "cascade");
}

async fn start_cascade() -> TestServer {
    let srv = TestServer::start(cascade_repo, true).await;
    install_plugin(
        srv.plugins.path(),
        "cascade",
        "cascade",
        Some(&cascade_manifest(0.6)),
    );
    install_plugin(srv.plugins.path(), "metrics", "prometheus_metrics", None);
    srv.wait_plugin("cascade", serving).await;
    srv.wait_plugin("metrics", serving).await;
    srv.wait_ready("cascade").await;
    srv
}

async fn stats(srv: &TestServer, model: &str) -> (u64, u64) {
    let stats = srv.model_stats(model).await;
    (stats.inference_count, stats.execution_count)
}

async fn compute(
    srv: &TestServer,
    model: &str,
    shape: &[i64],
    x: &[f32],
) -> Result<Vec<f32>, tonic::Status> {
    let mut client = srv.compute().await;
    let response = client
        .compute(compute_request(model, vec![f32_tensor("x", shape, x)]))
        .await?
        .into_inner();
    Ok(f32_values(&response.outputs[0]))
}

#[tokio::test]
async fn a_cascade_sends_only_the_uncertain_rows_to_the_large_model_over_every_api() {
    let srv = start_cascade().await;

    // Served like any model: listed, READY, version 1.
    let status = srv.status("cascade").await;
    assert_eq!(
        (status.state(), status.versions.clone()),
        (pb::ModelState::Ready, vec!["1".to_owned()]),
        "{status:?}"
    );

    // plinth.v1: four rows, two of them uncertain.
    let y = compute(&srv, "cascade", &[4, 3], &flat(&ROWS))
        .await
        .unwrap();
    assert_eq!(y, CASCADED);
    assert_eq!(stats(&srv, "small").await, (4, 1), "small saw every row");
    assert_eq!(
        stats(&srv, "large").await,
        (2, 1),
        "large saw the two uncertain rows"
    );
    assert_eq!(stats(&srv, "cascade").await, (4, 1));

    // Open Inference Protocol over gRPC: the same answer, and the large model
    // is not called when every row is sure.
    let mut oip = srv.inference().await;
    let sure = flat(&[ROWS[0], ROWS[3]]);
    let response = oip
        .model_infer(ipb::ModelInferRequest {
            model_name: "cascade".into(),
            id: "oip-1".into(),
            inputs: vec![ipb::model_infer_request::InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![2, 3],
                contents: Some(ipb::InferTensorContents {
                    fp32_contents: sure.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            response.model_name.as_str(),
            response.model_version.as_str()
        ),
        ("cascade", "1")
    );
    let y: Vec<f32> = response.raw_output_contents[0]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(y, sure);
    assert_eq!(
        stats(&srv, "large").await,
        (2, 1),
        "no uncertain row, no call"
    );

    // REST (OIP JSON): one uncertain row.
    let body = json!({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": ROWS[2]}],
    })
    .to_string();
    let (code, text) = srv
        .http_post("/v2/models/cascade/infer", &[], body.as_bytes())
        .await;
    assert_eq!(code, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["outputs"][0]["data"], json!([1.0, 1.0, 2.0]));
    assert_eq!(stats(&srv, "large").await, (3, 2));

    // Inputs are checked against the entry's declaration before the plugin
    // runs, naming the tensor with expected against got.
    let err = compute(&srv, "cascade", &[2, 4], &[0.0; 8])
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::InvalidArgument,
            "model 'cascade': input 'x': expected shape [-1, 3], got [2, 4]"
        )
    );

    // Hot reload: a new threshold takes effect for the next request.
    let before = srv.wait_plugin("cascade", serving).await;
    install_plugin(
        srv.plugins.path(),
        "cascade",
        "cascade",
        Some(&cascade_manifest(0.4)),
    );
    srv.wait_plugin("cascade", |s| s.loaded_at_us > before.loaded_at_us)
        .await;
    let y = compute(&srv, "cascade", &[4, 3], &flat(&ROWS))
        .await
        .unwrap();
    assert_eq!(y, flat(&ROWS), "no row's top is below 0.4");
    assert_eq!(stats(&srv, "large").await, (3, 2));

    // The metrics plugin heard of every nested call with its parent: four
    // client requests reached the small model, two the large one.
    metrics_containing(
        &srv,
        &[
            "plinth_nested_requests_total{parent=\"cascade\",model=\"small\",status=\"ok\"} 4\n",
            "plinth_nested_requests_total{parent=\"cascade\",model=\"large\",status=\"ok\"} 2\n",
            "plinth_requests_total{model=\"large\",version=\"1\",status=\"ok\"} 2\n",
        ],
    )
    .await;
    srv.stop().await;
}

#[tokio::test]
async fn a_missing_orchestrator_plugin_or_model_is_reported_by_name() {
    let srv = TestServer::start(cascade_repo, true).await;
    // Loaded, but it cannot serve without its plugin: listed UNAVAILABLE,
    // saying why.
    let status = srv.wait_for("cascade", |s| !s.reason.is_empty()).await;
    assert_eq!(
        (status.state(), status.reason.as_str()),
        (
            pb::ModelState::Unavailable,
            "waiting for orchestrator plugin 'cascade' (no cascade.wasm in the plugin directory)"
        )
    );
    let ready = |srv: &TestServer| {
        let url = srv.grpc_url();
        async move {
            let channel = tonic::transport::Channel::from_shared(url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            ipb::grpc_inference_service_client::GrpcInferenceServiceClient::new(channel)
                .model_ready(ipb::ModelReadyRequest {
                    name: "cascade".into(),
                    version: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .ready
        }
    };
    assert!(!ready(&srv).await, "not ready without its plugin");
    let err = compute(&srv, "cascade", &[1, 3], &ROWS[0])
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::Unavailable,
            "model 'cascade': orchestrator plugin 'cascade' is not loaded (no cascade.wasm in the plugin directory)"
        )
    );
    // A cascade whose large model does not exist: the client gets the
    // host's NOT_FOUND, passed on through the plugin.
    install_plugin(
        srv.plugins.path(),
        "cascade",
        "cascade",
        Some("[config]\nsmall = \"small\"\nlarge = \"absent\"\nthreshold = 0.6\n"),
    );
    srv.wait_plugin("cascade", serving).await;
    srv.wait_ready("cascade").await;
    assert!(ready(&srv).await, "ready once its plugin serves");
    let err = compute(&srv, "cascade", &[1, 3], &ROWS[1])
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::NotFound,
            "model 'absent' is not in the model repository"
        )
    );
    // A sure row never reaches the missing model.
    assert_eq!(
        compute(&srv, "cascade", &[1, 3], &ROWS[0]).await.unwrap(),
        ROWS[0]
    );
    srv.stop().await;
}

fn forward_manifest(model: &str) -> String {
    format!("[config]\nmode = \"forward\"\nmodel = \"{model}\"\n")
}

/// `--max-call-depth` other than the default: 0 refuses every nested call,
/// 1 allows one level and refuses the second. (The flag was once ignored:
/// the limit stayed at 4 whatever it said.)
#[tokio::test]
async fn max_call_depth_zero_and_one_are_honoured() {
    for depth in [0u32, 1] {
        let srv = TestServer::start_with(
            |repo| {
                fixtures::scale(repo, "double", "1", 2.0);
                // outer -> forward -> double
                for name in ["forward", "outer"] {
                    fixtures::scale_config()
                        .orchestrator(name)
                        .write(repo, name);
                }
            },
            |config| {
                config.load_all = true;
                config.max_call_depth = depth;
            },
        )
        .await;
        install_plugin(
            srv.plugins.path(),
            "forward",
            "hostile_orchestrator",
            Some(&forward_manifest("double")),
        );
        install_plugin(
            srv.plugins.path(),
            "outer",
            "hostile_orchestrator",
            Some(&forward_manifest("forward")),
        );
        for name in ["forward", "outer"] {
            srv.wait_plugin(name, serving).await;
        }
        let one_level = compute(&srv, "forward", &[3], &[1.0, 2.0, 3.0]).await;
        let two_levels = compute(&srv, "outer", &[1], &[1.0]).await;
        if depth == 0 {
            let err = one_level.unwrap_err();
            assert_eq!(
                (err.code(), err.message()),
                (
                    Code::FailedPrecondition,
                    "model 'double': orchestrator 'forward' would call it at depth 1, past the limit of 0 nested calls (--max-call-depth)"
                )
            );
        } else {
            assert_eq!(one_level.unwrap(), [2.0, 4.0, 6.0]);
            let err = two_levels.unwrap_err();
            assert_eq!(
                (err.code(), err.message()),
                (
                    Code::FailedPrecondition,
                    "model 'forward': model 'double': orchestrator 'forward' would call it at depth 2, past the limit of 1 nested calls (--max-call-depth)"
                )
            );
        }
        srv.stop().await;
    }
}

/// An orchestrator entry counts its requests in flight while it serves
/// them: GetModel shows it, as for a plain model. (It once showed 0, and
/// an on-demand entry looked idle to eviction while serving.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_entry_counts_its_requests_in_flight() {
    let srv = TestServer::start(
        |repo| {
            // `slowly` forwards to `busy`, whose forward takes a while.
            fixtures::slow(repo, "busy", 800);
            fixtures::scale_config()
                .orchestrator("slowly")
                .write(repo, "slowly");
        },
        true,
    )
    .await;
    install_plugin(
        srv.plugins.path(),
        "slowly",
        "hostile_orchestrator",
        Some(&forward_manifest("busy")),
    );
    srv.wait_plugin("slowly", serving).await;
    srv.wait_ready("busy").await;
    let call = {
        let mut client = srv.compute().await;
        let request = compute_request("slowly", vec![f32_tensor("x", &[3], &[1.0, 2.0, 3.0])]);
        tokio::spawn(async move { client.compute(request).await })
    };
    plinth_tests::eventually(plinth_tests::PATIENCE, "the entry in flight", async || {
        let status = srv.status("slowly").await;
        if status.in_flight == 1 {
            Ok(())
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await;
    let answer = call.await.unwrap().unwrap().into_inner();
    assert_eq!(f32_values(&answer.outputs[0]), [2.0, 4.0, 6.0]);
    assert_eq!(srv.status("slowly").await.in_flight, 0);
    srv.stop().await;
}

#[tokio::test]
async fn nested_calls_stop_at_the_depth_limit() {
    let srv = TestServer::start(
        |repo| {
            fixtures::scale(repo, "double", "1", 2.0);
            // `forward` passes its inputs on to `double`; `loop` to itself.
            fixtures::scale_config()
                .orchestrator("forward")
                .write(repo, "forward");
            fixtures::scale_config()
                .orchestrator("loop")
                .write(repo, "loop");
        },
        true,
    )
    .await;
    install_plugin(
        srv.plugins.path(),
        "forward",
        "hostile_orchestrator",
        Some(&forward_manifest("double")),
    );
    install_plugin(
        srv.plugins.path(),
        "loop",
        "hostile_orchestrator",
        Some(&forward_manifest("loop")),
    );
    for name in ["forward", "loop"] {
        srv.wait_plugin(name, serving).await;
    }
    assert_eq!(
        compute(&srv, "forward", &[3], &[1.0, 2.0, 3.0])
            .await
            .unwrap(),
        [2.0, 4.0, 6.0]
    );
    let err = compute(&srv, "loop", &[1], &[1.0]).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::FailedPrecondition,
            "model 'loop': orchestrator 'loop' would call it at depth 5, past the limit of 4 nested calls (--max-call-depth)"
        )
    );
    // The client's request and the four nested ones each count once.
    let loop_stats = srv.model_stats("loop").await;
    assert_eq!(
        (loop_stats.inference_count, loop_stats.execution_count),
        (0, 0),
        "failed requests execute nothing"
    );
    let detail = srv.detail("loop").await;
    assert_eq!((detail.success_count, detail.failure_count), (0, 5));
    srv.stop().await;
}

#[tokio::test]
async fn hostile_orchestrators_fail_their_request_only() {
    let srv = TestServer::start(
        |repo| {
            fixtures::slow(repo, "slow", 1500);
            for name in ["spin", "panic", "waits", "hurried"] {
                fixtures::scale_config()
                    .orchestrator(name)
                    .write(repo, name);
            }
            // The same forwarding plugin, with a request timeout of 1 ms.
            fixtures::scale_config()
                .orchestrator("waits")
                .field("request_timeout_ms", 1)
                .write(repo, "hurried");
        },
        true,
    )
    .await;
    let dir = srv.plugins.path();
    install_plugin(
        dir,
        "spin",
        "hostile_orchestrator",
        Some("[limits]\ndeadline_ms = 20\n[config]\nmode = \"spin\"\n"),
    );
    install_plugin(
        dir,
        "panic",
        "hostile_orchestrator",
        Some("[config]\nmode = \"panic\"\n"),
    );
    // Its deadline is 50 ms of its own time; the slow model it waits for
    // takes longer, which does not count.
    install_plugin(
        dir,
        "waits",
        "hostile_orchestrator",
        Some("[limits]\ndeadline_ms = 50\n[config]\nmode = \"forward\"\nmodel = \"slow\"\n"),
    );
    for name in ["spin", "panic", "waits"] {
        srv.wait_plugin(name, serving).await;
    }
    srv.wait_ready("slow").await;

    let err = compute(&srv, "spin", &[1], &[1.0]).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::DeadlineExceeded,
            "plugin 'spin' (run) exceeded its 20 ms deadline"
        )
    );
    let err = compute(&srv, "panic", &[1], &[1.0]).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        err.message()
            .starts_with("internal error: plugin 'panic' (run) trapped: ")
            && err
                .message()
                .contains("hostile-orchestrator was told to panic"),
        "{err:?}"
    );

    let started = std::time::Instant::now();
    assert_eq!(
        compute(&srv, "waits", &[3], &[1.0, 2.0, 3.0])
            .await
            .unwrap(),
        [2.0, 4.0, 6.0]
    );
    let took = started.elapsed();
    assert!(
        took > std::time::Duration::from_millis(50),
        "the slow model must outlast the plugin's deadline for this test to mean anything ({took:?})"
    );

    // The entry's request timeout bounds the whole call, nested model
    // included.
    let err = compute(&srv, "hurried", &[3], &[1.0, 2.0, 3.0])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    // Whichever runs out first (the nested call's wait in the slow model's
    // queue, or the orchestrator's call as a whole), the message names
    // the model.
    assert!(
        err.message().starts_with("model 'slow': ")
            || err.message().starts_with("model 'hurried': "),
        "{err:?}"
    );

    // Each failure stayed with its request: the plugins still serve.
    let spin = srv.wait_plugin("spin", |_| true).await;
    assert_eq!((spin.calls, spin.errors), (1, 1));
    assert_eq!(compute(&srv, "waits", &[1], &[5.0]).await.unwrap(), [10.0]);
    srv.stop().await;
}

/// A processor built against an unchanged copy of the 0.1.0 WIT loads on
/// this 0.1.1 host and transforms tensors as before.
#[tokio::test]
async fn a_plugin_built_against_wit_0_1_0_keeps_loading() {
    let srv = TestServer::start(
        |repo| {
            fixtures::scale(repo, "double", "1", 2.0);
            fixtures::scale_config()
                .preprocess(&["compat"])
                .write(repo, "double");
        },
        true,
    )
    .await;
    install_plugin(srv.plugins.path(), "compat", "compat_processor_0_1_0", None);
    let status = srv.wait_plugin("compat", serving).await;
    assert_eq!(status.world, "processor-plugin");
    // (x + 10) · 2
    assert_eq!(
        compute(&srv, "double", &[3], &[1.0, 2.0, 3.0])
            .await
            .unwrap(),
        [22.0, 24.0, 26.0]
    );
    srv.stop().await;
}
