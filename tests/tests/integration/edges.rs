//! What both edges must agree on: the model configuration they report, the
//! config an answer is rendered with (the one the request ran on, not
//! whatever the registry holds by then), and how a refused request is
//! counted and named, whichever edge refused it.

use std::collections::HashMap;
use std::path::Path;

use plinth::grpc::ipb::{self, model_infer_request::InferInputTensor};
use plinth::grpc::pb;
use plinth_tests::fixtures::{self, affine_expected};
use plinth_tests::{TestServer, compute_request, install_plugin};
use serde_json::{Value, json};
use tonic::Code;

const SCALE_IO: &str = "[[input]]\nname = \"x\"\ndtype = \"f32\"\nshape = [-1]\n[[output]]\nname = \"y\"\ndtype = \"f32\"\nshape = [-1]\n";

fn json_body(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("{err}: {text}"))
}

#[tokio::test]
async fn both_edges_report_the_same_semver_version_labels() {
    let srv = TestServer::start(
        |repo| {
            fixtures::scale(repo, "semver", "1.2.0", 2.0);
            fixtures::scale_file(&plinth_tests::model_file(repo, "semver", "2"), 3.0);
            fixtures::write_config(
                repo,
                "semver",
                &format!("version_policy = {{ specific = [\"1.2.0\", 2] }}\n{SCALE_IO}"),
            );
        },
        true,
    )
    .await;
    srv.wait_ready("semver").await;
    let labels = ["1.2.0", "2"];

    // Metadata: the loaded versions, oldest first, on both edges.
    let (code, text) = srv.http_get("/v2/models/semver").await;
    assert_eq!(code, 200, "{text}");
    assert_eq!(json_body(&text)["versions"], json!(labels));
    let mut client = srv.inference().await;
    let metadata = client
        .model_metadata(ipb::ModelMetadataRequest {
            name: "semver".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metadata.versions, labels);

    // Configuration: REST lists the labels; gRPC's schema has integers only,
    // so it carries the integer labels there and every label as a parameter.
    let (code, text) = srv.http_get("/v2/models/semver/config").await;
    assert_eq!(code, 200, "{text}");
    let rest = json_body(&text);
    assert_eq!(
        rest["version_policy"],
        json!({"specific": {"versions": labels}})
    );
    assert_eq!(
        rest["parameters"],
        json!({"version_policy.specific": {"string_value": "1.2.0,2"}})
    );
    let grpc = client
        .model_config(ipb::ModelConfigRequest {
            name: "semver".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    let grpc_labels: Vec<&str> = grpc
        .parameters
        .get("version_policy.specific")
        .map(|p| p.string_value.split(',').collect())
        .unwrap_or_default();
    assert_eq!(grpc_labels, labels, "gRPC ModelConfig: {grpc:?}");
    assert_eq!(
        grpc.version_policy.unwrap().policy_choice,
        Some(ipb::model_version_policy::PolicyChoice::Specific(
            ipb::model_version_policy::Specific { versions: vec![2] }
        ))
    );
    // The rest of the view is the same on both edges.
    assert_eq!(rest["name"], json!(grpc.name));
    assert_eq!(rest["platform"], json!(grpc.platform));
    assert_eq!(rest["backend"], json!(grpc.backend));
    assert_eq!(rest["max_batch_size"], json!(grpc.max_batch_size));
    assert_eq!(rest["input"][0]["name"], json!(grpc.input[0].name));
    assert_eq!(rest["input"][0]["dims"], json!(grpc.input[0].dims));
    assert_eq!(
        rest["instance_group"][0]["count"],
        json!(grpc.instance_group[0].count)
    );
    srv.stop().await;
}

/// `affine` (y = x W^T + b, [batch, 4] -> [batch, 3]) batching up to 4 rows,
/// whose first request of a batch waits `delay_us` for others.
fn waiting_affine(repo: &Path, model: &str, delay_us: u64) {
    fixtures::affine(repo, model, 4);
    fixtures::write_config(
        repo,
        model,
        &format!(
            "max_batch_size = 4\nmax_queue_delay_us = {delay_us}\n[[input]]\nname = \"x\"\ndtype = \"f32\"\nshape = [4]\n[[output]]\nname = \"y\"\ndtype = \"f32\"\nshape = [3]\n"
        ),
    );
}

#[tokio::test]
async fn an_answer_is_rendered_with_the_config_its_request_ran_on() {
    // Two requests (one per edge) wait in a batch; the model is unloaded
    // under them; then the batch runs. Each edge must render the answer
    // (here: top-1 classification of `y`) with the model the request ran on,
    // which the registry no longer holds.
    const DELAY_US: u64 = 5_000_000;
    let srv = TestServer::start(|repo| waiting_affine(repo, "m", DELAY_US), true).await;
    srv.wait_ready("m").await;
    let row = [1.0f32, 2.0, 3.0, 4.0];
    let expected = affine_expected(&row);
    let best = (0..3)
        .max_by(|a, b| expected[*a].total_cmp(&expected[*b]))
        .unwrap();
    let label = format!("{:.6}:{best}", expected[best]);

    let http = {
        let addr = srv.running().http_addr;
        let body = json!({
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": row}],
            "outputs": [{"name": "y", "parameters": {"classification": 1}}],
        })
        .to_string();
        tokio::spawn(async move {
            plinth_tests::http_request(addr, "POST", "/v2/models/m/infer", &[], body.as_bytes())
                .await
        })
    };
    let grpc = {
        let mut client = srv.inference().await;
        let mut parameters = HashMap::new();
        parameters.insert(
            "classification".to_owned(),
            ipb::InferParameter {
                parameter_choice: Some(ipb::infer_parameter::ParameterChoice::Int64Param(1)),
            },
        );
        let request = ipb::ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![1, 4],
                ..Default::default()
            }],
            raw_input_contents: vec![row.iter().flat_map(|v| v.to_le_bytes()).collect()],
            outputs: vec![ipb::model_infer_request::InferRequestedOutputTensor {
                name: "y".into(),
                parameters,
            }],
            ..Default::default()
        };
        tokio::spawn(async move { client.model_infer(request).await })
    };
    // Both are queued (in flight), waiting for the batch to fill or the delay.
    srv.wait_for("m", |s| s.in_flight == 2).await;
    let unloaded = srv
        .models()
        .await
        .unload_model(pb::UnloadModelRequest { name: "m".into() })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(unloaded.state, pb::ModelState::Unloading as i32);
    assert!(
        !http.is_finished() && !grpc.is_finished(),
        "precondition: both requests must still be waiting in the batch when the unload returns \
         (the batch delay is {DELAY_US} us)"
    );

    let (code, text) = http.await.unwrap();
    assert_eq!(code, 200, "{text}");
    let answer = json_body(&text);
    assert_eq!(
        answer["outputs"],
        json!([{"name": "y", "datatype": "BYTES", "shape": [1, 1], "data": [label]}]),
        "{text}"
    );
    let answer = grpc.await.unwrap().unwrap().into_inner();
    assert_eq!(answer.outputs.len(), 1, "{answer:?}");
    assert_eq!(
        (
            answer.outputs[0].datatype.as_str(),
            &answer.outputs[0].shape[..]
        ),
        ("BYTES", &[1i64, 1][..])
    );
    let mut want = (label.len() as u32).to_le_bytes().to_vec();
    want.extend_from_slice(label.as_bytes());
    assert_eq!(&answer.raw_output_contents[0][..], &want[..]);
    srv.wait_for("m", |s| s.state == pb::ModelState::Unavailable as i32)
        .await;
    srv.stop().await;
}

/// GetModel's failure count and the protocol statistics' `fail` count.
async fn failure_counts(srv: &TestServer, model: &str) -> (u64, u64) {
    let detail = srv.detail(model).await;
    let stats = srv.model_stats(model).await;
    let fail = stats.inference_stats.unwrap().fail.unwrap().count;
    (detail.failure_count, fail)
}

#[tokio::test]
async fn a_request_refused_while_decoding_counts_against_its_model_and_names_it() {
    let srv = TestServer::start(|repo| fixtures::affine(repo, "affine", 4), true).await;
    srv.wait_ready("affine").await;
    let message = "model 'affine': tensor 'x': shape [1, 4] of f32 needs 16 bytes, got 15";
    let mut expected = failure_counts(&srv, "affine").await;
    assert_eq!(expected, (0, 0));

    // The Open Inference Protocol over gRPC.
    let err = srv
        .inference()
        .await
        .model_infer(ipb::ModelInferRequest {
            model_name: "affine".into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![1, 4],
                ..Default::default()
            }],
            raw_input_contents: vec![vec![0u8; 15].into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, message)
    );
    expected = (expected.0 + 1, expected.1 + 1);
    assert_eq!(failure_counts(&srv, "affine").await, expected, "ModelInfer");

    // plinth.v1 Compute.
    let err = srv
        .compute()
        .await
        .compute(compute_request(
            "affine",
            vec![pb::Tensor {
                name: "x".into(),
                dtype: pb::DataType::Float32 as i32,
                shape: vec![1, 4],
                data: vec![0u8; 15].into(),
            }],
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, message)
    );
    expected = (expected.0 + 1, expected.1 + 1);
    assert_eq!(failure_counts(&srv, "affine").await, expected, "Compute");

    // REST, with the binary tensor data extension.
    let header = json!({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                    "parameters": {"binary_data_size": 15}}],
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&[0u8; 15]);
    let length = header.len().to_string();
    let (code, text) = srv
        .http_post(
            "/v2/models/affine/infer",
            &[("Inference-Header-Content-Length", &length)],
            &body,
        )
        .await;
    assert_eq!((code, json_body(&text)), (400, json!({"error": message})));
    expected = (expected.0 + 1, expected.1 + 1);
    assert_eq!(failure_counts(&srv, "affine").await, expected, "REST infer");

    // REST, JSON data of the wrong element count.
    let body = json!({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3]}],
    })
    .to_string();
    let (code, text) = srv
        .http_post("/v2/models/affine/infer", &[], body.as_bytes())
        .await;
    assert_eq!(
        (code, json_body(&text)),
        (
            400,
            json!({"error": "model 'affine': tensor 'x': shape [1, 4] needs 4 elements, got 3"})
        )
    );
    expected = (expected.0 + 1, expected.1 + 1);
    assert_eq!(failure_counts(&srv, "affine").await, expected, "REST JSON");

    // A good request is a success on both counts, and not a failure.
    let (code, text) = srv
        .http_post(
            "/v2/models/affine/infer",
            &[],
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
                .to_string()
                .as_bytes(),
        )
        .await;
    assert_eq!(code, 200, "{text}");
    assert_eq!(failure_counts(&srv, "affine").await, expected);
    srv.stop().await;
}

#[tokio::test]
async fn a_failing_plugin_chain_counts_the_same_in_get_model_and_the_statistics() {
    let srv = TestServer::start(
        |repo| {
            fixtures::scale(repo, "m_trap", "1", 2.0);
            fixtures::write_config(
                repo,
                "m_trap",
                &format!("preprocess = [\"trap\"]\n{SCALE_IO}"),
            );
        },
        true,
    )
    .await;
    install_plugin(srv.plugins.path(), "trap", "hostile_trap", None);
    srv.wait_plugin("trap", |s| s.serving).await;
    srv.wait_ready("m_trap").await;
    let err = srv
        .compute()
        .await
        .compute(compute_request(
            "m_trap",
            vec![plinth_tests::f32_tensor("x", &[2], &[1.0, 2.0])],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        err.message().contains("plugin 'trap' (preprocess) trapped"),
        "{err:?}"
    );
    assert_eq!(failure_counts(&srv, "m_trap").await, (1, 1));
    srv.stop().await;
}
