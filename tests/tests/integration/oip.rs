//! The Open Inference Protocol v2 over gRPC and HTTP: real servers, real
//! models, checked with our own tonic client for what stock clients cannot
//! send (malformed requests), and with the official tritonclient for
//! everything a user's tools would do.

use std::collections::HashMap;

use plinth::grpc::ipb::{self, model_infer_request::InferInputTensor};
use plinth_tests::fixtures::{self, affine_expected};
use plinth_tests::{PATIENCE, TestServer, eventually, install_plugin};
use tonic::Code;

fn f32_bytes(values: &[f32]) -> bytes::Bytes {
    values
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

fn f32_from(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn input(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

fn typed_f32(name: &str, shape: &[i64], values: &[f32]) -> InferInputTensor {
    InferInputTensor {
        contents: Some(ipb::InferTensorContents {
            fp32_contents: values.to_vec(),
            ..Default::default()
        }),
        ..input(name, "FP32", shape)
    }
}

fn request(
    model: &str,
    inputs: Vec<InferInputTensor>,
    raw: Vec<bytes::Bytes>,
) -> ipb::ModelInferRequest {
    ipb::ModelInferRequest {
        model_name: model.into(),
        id: "req-1".into(),
        inputs,
        raw_input_contents: raw,
        ..Default::default()
    }
}

#[tokio::test]
async fn model_infer_runs_the_pipeline_with_typed_and_raw_tensors() {
    let srv = TestServer::start(
        |repo| {
            fixtures::affine(repo, "affine", 8);
            fixtures::dtype_double(repo, "double_u8", "u8", tch::Kind::Uint8);
            fixtures::affine_config(8)
                .postprocess(&["topk"])
                .write(repo, "ranked");
            std::fs::create_dir_all(repo.join("ranked/1")).unwrap();
            std::fs::copy(
                plinth_tests::model_file(repo, "affine", "1"),
                plinth_tests::model_file(repo, "ranked", "1"),
            )
            .unwrap();
        },
        true,
    )
    .await;
    install_plugin(
        srv.plugins.path(),
        "topk",
        "softmax_topk",
        Some("[config]\nk = 1\nsoftmax = false\n"),
    );
    srv.wait_plugin("topk", |s| s.serving).await;
    for model in ["affine", "double_u8", "ranked"] {
        srv.wait_ready(model).await;
    }
    let mut client = srv.inference().await;
    let rows = [1.0f32, 2.0, 3.0, 4.0, 4.0, -3.0, 1.0, 0.0];
    let expected: Vec<f32> = [[1.0, 2.0, 3.0, 4.0], [4.0, -3.0, 1.0, 0.0]]
        .iter()
        .flat_map(affine_expected)
        .collect();

    // Typed contents in, raw contents out (as Triton answers).
    let out = client
        .model_infer(request(
            "affine",
            vec![typed_f32("x", &[2, 4], &rows)],
            vec![],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            out.model_name.as_str(),
            out.model_version.as_str(),
            out.id.as_str()
        ),
        ("affine", "1", "req-1")
    );
    assert_eq!(out.outputs.len(), 1);
    assert_eq!(
        (
            out.outputs[0].name.as_str(),
            out.outputs[0].datatype.as_str()
        ),
        ("y", "FP32")
    );
    assert_eq!(out.outputs[0].shape, [2, 3]);
    assert_eq!(f32_from(&out.raw_output_contents[0]), expected);

    // Raw contents in: the same numbers.
    let out = client
        .model_infer(request(
            "affine",
            vec![input("x", "FP32", &[2, 4])],
            vec![f32_bytes(&rows)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_from(&out.raw_output_contents[0]), expected);

    // UINT8 travels in uint_contents.
    let mut u8_input = input("x", "UINT8", &[3]);
    u8_input.contents = Some(ipb::InferTensorContents {
        uint_contents: vec![1, 20, 100],
        ..Default::default()
    });
    let out = client
        .model_infer(request("double_u8", vec![u8_input], vec![]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&out.raw_output_contents[0][..], &[2u8, 40, 200]);

    // Classification of the requested output: top-2 of each row.
    let mut req = request("affine", vec![typed_f32("x", &[2, 4], &rows)], vec![]);
    req.outputs = vec![ipb::model_infer_request::InferRequestedOutputTensor {
        name: "y".into(),
        parameters: HashMap::from([(
            "classification".to_owned(),
            ipb::InferParameter {
                parameter_choice: Some(ipb::infer_parameter::ParameterChoice::Int64Param(2)),
            },
        )]),
    }];
    let out = client.model_infer(req).await.unwrap().into_inner();
    assert_eq!(out.outputs[0].datatype, "BYTES");
    assert_eq!(out.outputs[0].shape, [2, 2]);
    let tensor = plinth::tensor::Tensor::new(
        "y",
        plinth::tensor::DType::Bytes,
        vec![4],
        out.raw_output_contents[0].clone(),
    )
    .unwrap();
    let labels: Vec<String> = tensor
        .bytes_elements()
        .unwrap()
        .iter()
        .map(|b| String::from_utf8(b.to_vec()).unwrap())
        .collect();
    let mut want = Vec::new();
    for row in expected.chunks(3) {
        let mut order: Vec<usize> = (0..3).collect();
        order.sort_by(|a, b| row[*b].total_cmp(&row[*a]));
        want.extend(order[..2].iter().map(|&i| format!("{:.6}:{i}", row[i])));
    }
    assert_eq!(labels, want);

    // A postprocess plugin runs on ModelInfer as on Compute: top-1 index and score.
    let out = client
        .model_infer(request(
            "ranked",
            vec![typed_f32("x", &[2, 4], &rows)],
            vec![],
        ))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = out.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["topk_indices", "topk_scores"]);
    let best: Vec<f32> = expected
        .chunks(3)
        .map(|row| row.iter().copied().fold(f32::MIN, f32::max))
        .collect();
    assert_eq!(f32_from(&out.raw_output_contents[1]), best);

    // The metadata the clients build requests from.
    let meta = client
        .model_metadata(ipb::ModelMetadataRequest {
            name: "affine".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.versions, ["1"]);
    assert_eq!(meta.inputs[0].shape, [-1, 4]);
    assert_eq!(meta.inputs[0].datatype, "FP32");
    let config = client
        .model_config(ipb::ModelConfigRequest {
            name: "affine".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.max_batch_size, 8);
    assert_eq!(config.input[0].dims, [4]);
    assert_eq!(config.input[0].data_type, ipb::DataType::TypeFp32 as i32);
}

#[tokio::test]
async fn malformed_requests_are_refused_naming_the_tensor() {
    let srv = TestServer::start(
        |repo| {
            fixtures::affine(repo, "affine", 8);
        },
        true,
    )
    .await;
    srv.wait_ready("affine").await;
    let mut client = srv.inference().await;
    let four = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);

    let both = {
        let mut x = typed_f32("x", &[1, 4], &[1.0, 2.0, 3.0, 4.0]);
        x.datatype = "FP32".into();
        request("affine", vec![x], vec![four.clone()])
    };
    let cases: Vec<(&str, ipb::ModelInferRequest, Code, &[&str])> = vec![
        (
            "byte length does not match the shape",
            request(
                "affine",
                vec![input("x", "FP32", &[2, 4])],
                vec![four.clone()],
            ),
            Code::InvalidArgument,
            &["tensor 'x'", "[2, 4]", "needs 32 bytes, got 16"],
        ),
        (
            "typed count does not match the shape",
            request("affine", vec![typed_f32("x", &[2, 4], &[1.0; 5])], vec![]),
            Code::InvalidArgument,
            &["tensor 'x'", "needs 8 elements, got 5"],
        ),
        (
            "contents and raw both set",
            both,
            Code::InvalidArgument,
            &[
                "input 'x'",
                "both contents.fp32_contents and raw_input_contents",
            ],
        ),
        (
            "unknown datatype",
            request(
                "affine",
                vec![input("x", "FLOAT", &[1, 4])],
                vec![four.clone()],
            ),
            Code::InvalidArgument,
            &["tensor 'x'", "unknown datatype \"FLOAT\""],
        ),
        (
            "negative dimension",
            request(
                "affine",
                vec![input("x", "FP32", &[-1, 4])],
                vec![four.clone()],
            ),
            Code::InvalidArgument,
            &["tensor 'x'", "dimension 0", "negative (-1)"],
        ),
        (
            "huge declared shape with little data",
            request(
                "affine",
                vec![input("x", "FP32", &[1 << 40, 1 << 20])],
                vec![four.clone()],
            ),
            Code::InvalidArgument,
            &["tensor 'x'", "got 16"],
        ),
        (
            "overflowing declared shape",
            request(
                "affine",
                vec![input("x", "FP32", &[i64::MAX, i64::MAX])],
                vec![four.clone()],
            ),
            Code::InvalidArgument,
            &["tensor 'x'", "too large"],
        ),
        (
            "raw entries do not match the inputs",
            request(
                "affine",
                vec![input("x", "FP32", &[1, 4])],
                vec![four.clone(), four.clone()],
            ),
            Code::InvalidArgument,
            &["raw_input_contents has 2 entries for 1 inputs"],
        ),
        (
            "typed field of another datatype",
            {
                let mut x = input("x", "FP32", &[1, 4]);
                x.contents = Some(ipb::InferTensorContents {
                    int64_contents: vec![1, 2, 3, 4],
                    ..Default::default()
                });
                request("affine", vec![x], vec![])
            },
            Code::InvalidArgument,
            &["tensor 'x'", "FP32 takes fp32_contents, got int64_contents"],
        ),
        (
            "wrong datatype for the model",
            request(
                "affine",
                vec![input("x", "FP64", &[1, 4])],
                vec![[0u8; 32].to_vec().into()],
            ),
            Code::InvalidArgument,
            &["input 'x'", "expected dtype f32, got f64"],
        ),
        (
            "wrong shape for the model",
            request("affine", vec![input("x", "FP32", &[4])], vec![four.clone()]),
            Code::InvalidArgument,
            &["input 'x'", "expected shape [-1, 4], got [4]"],
        ),
        (
            "missing input",
            request("affine", vec![], vec![]),
            Code::InvalidArgument,
            &["missing input 'x'"],
        ),
        (
            "unknown requested output",
            {
                let mut req = request(
                    "affine",
                    vec![input("x", "FP32", &[1, 4])],
                    vec![four.clone()],
                );
                req.outputs = vec![ipb::model_infer_request::InferRequestedOutputTensor {
                    name: "z".into(),
                    parameters: HashMap::new(),
                }];
                req
            },
            Code::InvalidArgument,
            &["requested output 'z'", "outputs: y"],
        ),
        (
            "unknown model",
            request(
                "nope",
                vec![input("x", "FP32", &[1, 4])],
                vec![four.clone()],
            ),
            Code::NotFound,
            &["model 'nope'"],
        ),
        (
            "unknown version",
            {
                let mut req = request(
                    "affine",
                    vec![input("x", "FP32", &[1, 4])],
                    vec![four.clone()],
                );
                req.model_version = "7".into();
                req
            },
            Code::NotFound,
            &["version '7'", "ready: 1"],
        ),
    ];
    for (what, req, code, needles) in cases {
        let status = client.model_infer(req).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        for needle in needles {
            assert!(
                status.message().contains(needle),
                "{what}: {needle:?} not in {:?}",
                status.message()
            );
        }
    }

    // Nothing above harmed the model.
    let out = client
        .model_infer(request(
            "affine",
            vec![input("x", "FP32", &[1, 4])],
            vec![four],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        f32_from(&out.raw_output_contents[0]),
        affine_expected(&[1.0, 2.0, 3.0, 4.0])
    );
}

#[tokio::test]
async fn messages_over_the_limit_are_refused_and_the_server_goes_on() {
    let srv = TestServer::start_with(
        |repo| fixtures::scale(repo, "scale", "1", 2.0),
        |config| config.max_message_bytes = 1 << 20,
    )
    .await;
    srv.wait_ready("scale").await;
    let mut client = srv.inference().await;
    let big: Vec<f32> = vec![1.0; 512 * 1024]; // 2 MiB
    let status = client
        .model_infer(request(
            "scale",
            vec![input("x", "FP32", &[big.len() as i64])],
            vec![f32_bytes(&big)],
        ))
        .await
        .expect_err("over the limit");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert!(status.message().contains("1048576"), "{}", status.message());

    let body = format!(
        "{{\"inputs\":[{{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[{}],\"data\":[{}]}}]}}",
        big.len(),
        vec!["1.0"; big.len()].join(",")
    );
    let (code, text) = srv
        .http_post(
            "/v2/models/scale/infer",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await;
    assert_eq!(code, 413, "{text}");
    assert!(
        text.contains("\"error\"") && text.contains("1048576"),
        "{text}"
    );

    // Both edges still answer.
    let out = client
        .model_infer(request(
            "scale",
            vec![input("x", "FP32", &[2])],
            vec![f32_bytes(&[1.5, -1.0])],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_from(&out.raw_output_contents[0]), [3.0, -2.0]);
    let (code, text) = srv
        .http_post(
            "/v2/models/scale/infer",
            &[],
            br#"{"inputs":[{"name":"x","datatype":"FP32","shape":[2],"data":[1.5,-1]}]}"#,
        )
        .await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("\"data\":[3.0,-2.0]"), "{text}");
}

#[tokio::test]
async fn stream_infer_answers_in_order_and_reports_errors_in_band() {
    let srv = TestServer::start(|repo| fixtures::scale(repo, "scale", "1", 3.0), true).await;
    srv.wait_ready("scale").await;
    let mut client = srv.inference().await;
    let requests: Vec<ipb::ModelInferRequest> = (0..40)
        .map(|i| {
            let mut req = request(
                "scale",
                vec![input("x", "FP32", &[1])],
                vec![f32_bytes(&[i as f32])],
            );
            req.id = i.to_string();
            if i == 17 {
                req.inputs[0].shape = vec![2];
            }
            req
        })
        .collect();
    let mut responses = client
        .model_stream_infer(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut seen = 0;
    eventually(PATIENCE, "the response stream to end", async || {
        let Some(message) = responses.message().await.unwrap() else {
            return Ok(());
        };
        let response = message.infer_response.unwrap();
        assert_eq!(response.id, seen.to_string());
        if seen == 17 {
            assert!(
                message.error_message.contains("tensor 'x'"),
                "{}",
                message.error_message
            );
        } else {
            assert_eq!(message.error_message, "");
            assert_eq!(
                f32_from(&response.raw_output_contents[0]),
                [3.0 * seen as f32]
            );
        }
        seen += 1;
        Err(format!("{seen} responses so far"))
    })
    .await;
    assert_eq!(seen, 40);
}

#[tokio::test]
async fn statistics_count_requests_stages_and_batches() {
    let srv = TestServer::start(|repo| fixtures::affine(repo, "affine", 8), true).await;
    srv.wait_ready("affine").await;
    let mut client = srv.inference().await;
    for batch in [1i64, 2, 2] {
        let values = vec![0.5f32; batch as usize * 4];
        client
            .model_infer(request(
                "affine",
                vec![input("x", "FP32", &[batch, 4])],
                vec![f32_bytes(&values)],
            ))
            .await
            .unwrap();
    }
    let refused = client
        .model_infer(request(
            "affine",
            vec![input("x", "FP32", &[1, 5])],
            vec![f32_bytes(&[0.0; 5])],
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), refused.message()),
        (
            Code::InvalidArgument,
            "model 'affine': input 'x': expected shape [-1, 4], got [1, 5]"
        )
    );
    let stats = client
        .model_statistics(ipb::ModelStatisticsRequest {
            name: "affine".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .model_stats;
    assert_eq!(stats.len(), 1);
    let s = &stats[0];
    assert_eq!((s.name.as_str(), s.version.as_str()), ("affine", "1"));
    assert_eq!(s.inference_count, 5);
    assert_eq!(s.execution_count, 3);
    assert!(s.last_inference > 0);
    let infer = s.inference_stats.as_ref().unwrap();
    let success = infer.success.unwrap();
    let fail = infer.fail.unwrap();
    assert_eq!((success.count, fail.count), (3, 1));
    assert!(success.ns > 0 && fail.ns > 0);
    for (stage, d) in [
        ("queue", infer.queue.unwrap()),
        ("compute_input", infer.compute_input.unwrap()),
        ("compute_infer", infer.compute_infer.unwrap()),
        ("compute_output", infer.compute_output.unwrap()),
    ] {
        assert_eq!(d.count, 3, "{stage}");
    }
    assert!(infer.compute_infer.unwrap().ns > 0);
    let batches: Vec<(u64, u64)> = s
        .batch_stats
        .iter()
        .map(|b| (b.batch_size, b.compute_infer.unwrap().count))
        .collect();
    assert_eq!(batches, [(1, 1), (2, 2)]);

    // The same numbers over HTTP.
    let (code, text) = srv.http_get("/v2/models/affine/stats").await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("\"inference_count\":5"), "{text}");
    assert!(text.contains("\"fail\":{\"count\":1"), "{text}");

    // Unknown and not-ready models are told apart.
    let status = client
        .model_statistics(ipb::ModelStatisticsRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

/// Runs `tests/python/<script>` with the test venv's Python against `srv`
/// (`PLINTH_GRPC` and `PLINTH_HTTP`, and `env`), off the runtime's workers,
/// and echoes what it printed into the test's output.
pub(crate) async fn run_python_script(
    srv: &TestServer,
    script: &str,
    env: &[(&str, String)],
) -> std::process::Output {
    let python = test_python();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let mut command = std::process::Command::new(python);
    command
        .arg(&script)
        .env("PLINTH_GRPC", srv.running().grpc_addr.to_string())
        .env("PLINTH_HTTP", srv.running().http_addr.to_string());
    for (name, value) in env {
        command.env(name, value);
    }
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("runs python");
    eprintln!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

pub(crate) fn test_python() -> std::ffi::OsString {
    std::env::var_os("PLINTH_PYTHON").unwrap_or_else(|| {
        panic!(
            "PLINTH_PYTHON is not set: run the suite with `cargo xtask test`, which installs tritonclient into a venv"
        )
    })
}

/// proto/inference.proto, compiled, against the descriptors tritonclient
/// itself ships: every name, number, type and label we declare must match.
#[tokio::test]
async fn inference_proto_matches_tritonclient_field_for_field() {
    let python = test_python();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
    let output = std::process::Command::new(python)
        .arg(dir.join("python/check_inference_proto.py"))
        .arg(dir.join("../proto/inference.proto"))
        .arg("--protoc")
        .arg(protoc)
        .arg("--quiet")
        .output()
        .expect("runs python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "mismatches against tritonclient");
    assert!(stdout.contains("\n0 mismatches"), "{stdout}");
}

/// The official Python `tritonclient` (grpc and http), installed by the test
/// command, against a running Plinth: see tests/python/oip_conformance.py.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_conformance() {
    // Fails at once, naming what is missing, without a test venv.
    test_python();
    let srv = TestServer::start(
        |repo| {
            fixtures::affine(repo, "affine", 8);
            fixtures::dtype_double(repo, "double_i64", "i64", tch::Kind::Int64);
            fixtures::scale(repo, "scale", "1", 2.0);
            // Text in through the byte-tokenize plugin: the count of
            // non-padding tokens per string.
            fixtures::config()
                .max_batch_size(4)
                .preprocess(&["tokenize"])
                .input("tokens", "i64", &[8])
                .output("length", "i64", &[1])
                .write(repo, "text_len");
            plinth_torch::trace::save(
                &plinth_tests::model_file(repo, "text_len", "1"),
                &[plinth_torch::trace::TchTensor::ones(
                    [2, 8],
                    (tch::Kind::Int64, tch::Device::Cpu),
                )],
                |xs| {
                    vec![
                        xs[0]
                            .ne(0)
                            .sum_dim_intlist([1i64].as_slice(), true, tch::Kind::Int64),
                    ]
                },
            )
            .unwrap();
        },
        true,
    )
    .await;
    install_plugin(
        srv.plugins.path(),
        "tokenize",
        "byte_tokenize",
        Some("[config]\nmax-len = 8\n"),
    );
    srv.wait_plugin("tokenize", |s| s.serving).await;
    for model in ["affine", "double_i64", "scale", "text_len"] {
        srv.wait_ready(model).await;
    }
    let output = run_python_script(&srv, "oip_conformance.py", &[]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "tritonclient conformance failed");
    // unittest reports how many ran; a suite that ran nothing is a failure.
    assert!(stderr.contains("\nOK"), "no OK in the unittest report");
    let ran: usize = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("unittest summary");
    assert!(ran >= 10, "only {ran} conformance tests ran");
}
