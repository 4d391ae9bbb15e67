//! Every error a client can meet: the right code, naming the model or tensor,
//! expected against got. Other models keep serving throughout.

use plinth::grpc::pb;
use plinth_tests::fixtures::{self, BlockedModel};
use plinth_tests::{ModelState, TestServer, compute_request, f32_tensor, f32_values};
use tonic::Code;

fn tensor(name: &str, dtype: pb::DataType, shape: &[i64], n_bytes: usize) -> pb::Tensor {
    pb::Tensor {
        name: name.into(),
        dtype: dtype as i32,
        shape: shape.to_vec(),
        data: vec![0u8; n_bytes].into(),
    }
}

#[tokio::test]
async fn bad_requests_get_precise_errors() {
    let srv = TestServer::start(
        |repo| {
            fixtures::affine(repo, "affine", 4);
            fixtures::scale(repo, "idle", "1", 2.0);
        },
        false,
    )
    .await;
    srv.load("affine").await.unwrap();
    let mut compute = srv.compute().await;
    use pb::DataType::{Float32 as F32, Int64 as I64};
    let cases: Vec<(&str, Vec<pb::Tensor>, Code, &str)> = vec![
        (
            "nope",
            vec![],
            Code::NotFound,
            "model 'nope' is not in the model repository",
        ),
        ("", vec![], Code::InvalidArgument, "field 'model' is empty"),
        (
            "idle",
            vec![],
            Code::Unavailable,
            "model 'idle' is UNAVAILABLE",
        ),
        (
            "affine",
            vec![tensor("x", I64, &[2, 4], 64)],
            Code::InvalidArgument,
            "model 'affine': input 'x': expected dtype f32, got i64",
        ),
        (
            "affine",
            vec![tensor("x", F32, &[2, 5], 40)],
            Code::InvalidArgument,
            "model 'affine': input 'x': expected shape [-1, 4], got [2, 5]",
        ),
        (
            "affine",
            vec![tensor("x", F32, &[4], 16)],
            Code::InvalidArgument,
            "model 'affine': input 'x': expected shape [-1, 4], got [4]",
        ),
        (
            "affine",
            vec![tensor("x", F32, &[2, 4], 28)],
            Code::InvalidArgument,
            "model 'affine': tensor 'x': shape [2, 4] of f32 needs 32 bytes, got 28",
        ),
        (
            "affine",
            vec![tensor("x", F32, &[5, 4], 80)],
            Code::InvalidArgument,
            "model 'affine': input 'x': batch size 5 is outside 1..=4",
        ),
        (
            "affine",
            vec![tensor("x", F32, &[0, 4], 0)],
            Code::InvalidArgument,
            "model 'affine': input 'x': batch size 0 is outside 1..=4",
        ),
        (
            "affine",
            vec![],
            Code::InvalidArgument,
            "model 'affine': missing input 'x' (expected inputs: x)",
        ),
        (
            "affine",
            vec![tensor("x", F32, &[1, 4], 16), tensor("z", F32, &[1], 4)],
            Code::InvalidArgument,
            "model 'affine': unexpected input 'z' (expected inputs: x)",
        ),
        (
            "affine",
            vec![tensor("x", F32, &[1, 4], 16), tensor("x", F32, &[1, 4], 16)],
            Code::InvalidArgument,
            "model 'affine': input 'x' is given twice",
        ),
        (
            "affine",
            vec![tensor("x", F32, &[2, -4], 32)],
            Code::InvalidArgument,
            "model 'affine': tensor 'x': dimension 1 of shape [2, -4] is negative (-4)",
        ),
        (
            "affine",
            vec![tensor("x", F32, &[1 << 40, 1 << 40], 16)],
            Code::InvalidArgument,
            "model 'affine': tensor 'x': shape [1099511627776, 1099511627776] of f32 is too large (element count overflows), got 16 bytes",
        ),
        (
            "affine",
            vec![tensor("x", pb::DataType::Unspecified, &[1, 4], 16)],
            Code::InvalidArgument,
            "model 'affine': tensor 'x': dtype is not set",
        ),
        (
            "affine",
            vec![pb::Tensor {
                dtype: 99,
                ..tensor("x", F32, &[1, 4], 16)
            }],
            Code::InvalidArgument,
            "model 'affine': tensor 'x': unknown dtype value 99",
        ),
        (
            "affine",
            vec![tensor("", F32, &[1, 4], 16)],
            Code::InvalidArgument,
            "model 'affine': a tensor has an empty name",
        ),
    ];
    for (model, inputs, code, message) in cases {
        let err = compute
            .compute(compute_request(model, inputs))
            .await
            .expect_err(message);
        assert_eq!((err.code(), err.message()), (code, message));
    }
    let err = compute
        .compute(pb::ComputeRequest {
            version: "7".into(),
            ..compute_request("affine", vec![f32_tensor("x", &[1, 4], &[0.0; 4])])
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::NotFound,
            "model 'affine' has no ready version '7' (ready: 1)"
        )
    );

    // After all that, the model still answers correctly.
    let ok = compute
        .compute(compute_request(
            "affine",
            vec![f32_tensor("x", &[1, 4], &[1.0, 1.0, 1.0, 1.0])],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        f32_values(&ok.outputs[0]),
        fixtures::affine_expected(&[1.0; 4])
    );

    let mut models = srv.models().await;
    let err = models
        .load_model(pb::LoadModelRequest {
            name: "../etc".into(),
            reload: false,
            wait: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = models
        .load_model(pb::LoadModelRequest {
            name: "absent".into(),
            reload: false,
            wait: true,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::NotFound,
            "model 'absent' is not in the model repository"
        )
    );
    let err = models
        .unload_model(pb::UnloadModelRequest {
            name: "absent".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = models
        .get_model(pb::GetModelRequest {
            name: "absent".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn broken_models_fail_alone_with_file_field_and_reason() {
    let srv = TestServer::start(
        |repo| {
            fixtures::scale(repo, "good", "1", 2.0);
            // A config with an unknown field.
            fixtures::scale(repo, "typo", "1", 2.0);
            fixtures::config()
                .input("x", "f32", &[-1])
                .tensor_field("size", 3)
                .output("y", "f32", &[-1])
                .write(repo, "typo");
            // A config that is not TOML at all.
            fixtures::scale(repo, "garbage_config", "1", 2.0);
            fixtures::write_config(repo, "garbage_config", "\u{0}\u{1}binary junk = = =");
            // A consistent-looking config with a bad value.
            fixtures::scale(repo, "bad_shape", "1", 2.0);
            fixtures::config()
                .input("x", "f32", &[0])
                .output("y", "f32", &[-1])
                .write(repo, "bad_shape");
            // A corrupt TorchScript file.
            fixtures::scale(repo, "corrupt_pt", "1", 2.0);
            std::fs::write(
                plinth_tests::model_file(repo, "corrupt_pt", "1"),
                b"PK\x03\x04 truncated zip",
            )
            .unwrap();
            // A config that disagrees with what the model returns.
            fixtures::scale(repo, "wrong_output", "1", 2.0);
            fixtures::config()
                .input("x", "f32", &[-1])
                .output("y", "f64", &[-1])
                .write(repo, "wrong_output");
            // Two declared outputs, one returned.
            fixtures::scale(repo, "missing_output", "1", 2.0);
            fixtures::scale_config()
                .output("z", "f32", &[-1])
                .write(repo, "missing_output");
            // No version directory.
            fixtures::scale_config().write(repo, "no_versions");
            // A GPU model (fails without a GPU).
            fixtures::scale(repo, "on_gpu", "1", 2.0);
            fixtures::scale_config()
                .device("cuda")
                .write(repo, "on_gpu");
        },
        false,
    )
    .await;
    let repo = srv.repo.path().display().to_string();
    let cases: Vec<(&str, String)> = vec![
        (
            "typo",
            format!(
                "{repo}/typo/config.toml:5:1: unknown field `size`, expected one of `name`, `dtype`, `shape`"
            ),
        ),
        (
            "garbage_config",
            format!("{repo}/garbage_config/config.toml:1:10: key with no value, expected `=`"),
        ),
        (
            "bad_shape",
            format!(
                "{repo}/bad_shape/config.toml: input[0].shape[0]: must be -1 (free) or 1 or more, got 0"
            ),
        ),
        (
            "corrupt_pt",
            format!("{repo}/corrupt_pt/1/model.pt: not a loadable TorchScript archive"),
        ),
        (
            "wrong_output",
            format!(
                "{repo}/wrong_output/1/model.pt: warm-up: output 'y': config declares dtype f64, the model returned f32"
            ),
        ),
        (
            "missing_output",
            format!(
                "{repo}/missing_output/1/model.pt: warm-up: forward returned 1 tensor(s), config declares 2 output(s)"
            ),
        ),
        (
            "no_versions",
            format!("{repo}/no_versions: no version directory holds a model.pt"),
        ),
    ];
    for (model, reason_prefix) in &cases {
        let err = srv.load(model).await.expect_err(model);
        assert_eq!(err.code(), Code::FailedPrecondition, "{model}");
        assert!(
            err.message().starts_with(reason_prefix.as_str()),
            "{model}: {:?} should start with {reason_prefix:?}",
            err.message()
        );
        let status = srv.status(model).await;
        assert_eq!(status.state, ModelState::Failed as i32, "{model}");
        assert_eq!(status.reason, err.message(), "{model}");
        let infer = srv
            .compute()
            .await
            .compute(compute_request(model, vec![f32_tensor("x", &[1], &[1.0])]))
            .await
            .unwrap_err();
        assert_eq!(infer.code(), Code::Unavailable);
        assert_eq!(
            infer.message(),
            format!("model '{model}' is FAILED: {}", status.reason)
        );
    }

    let gpu = srv.load("on_gpu").await;
    if plinth_torch::init_cuda().device_count == 0 {
        let err = gpu.expect_err("cuda without a GPU");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(
            err.message()
                .starts_with("device cuda:0 requested but CUDA is not available"),
            "{}",
            err.message()
        );
    } else {
        eprintln!("note: a GPU is present, so the no-GPU load error is not exercised here");
        gpu.expect("cuda model loads on a GPU machine");
    }

    // The good model is unaffected, and a fixed model loads on retry.
    srv.load("good").await.expect("good model loads");
    fixtures::scale(srv.repo.path(), "corrupt_pt", "1", 5.0);
    srv.load("corrupt_pt")
        .await
        .expect("retry after fixing the file");
    let out = srv
        .compute()
        .await
        .compute(compute_request(
            "corrupt_pt",
            vec![f32_tensor("x", &[1], &[2.0])],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_values(&out.outputs[0]), [10.0]);
}

#[tokio::test]
async fn concurrent_duplicate_loads_load_once() {
    let mut blocked = None;
    let srv = TestServer::start(
        |repo| blocked = Some(BlockedModel::scale(repo, "dup", 4.0)),
        false,
    )
    .await;
    let blocked = blocked.unwrap();
    let mut attempts = Vec::new();
    for _ in 0..8 {
        let mut models = srv.models().await;
        attempts.push(tokio::spawn(async move {
            models
                .load_model(pb::LoadModelRequest {
                    name: "dup".into(),
                    reload: false,
                    wait: false,
                })
                .await
        }));
    }
    let mut accepted = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(response) => {
                accepted += 1;
                assert_eq!(
                    response.into_inner().status.unwrap().state,
                    ModelState::Loading as i32
                );
            }
            Err(err) => assert_eq!(
                (err.code(), err.message()),
                (Code::AlreadyExists, "model 'dup' is already LOADING")
            ),
        }
    }
    assert_eq!(accepted, 1);
    // The file is a pipe that can be read only once: a second load would
    // block or fail, so READY here means exactly one load ran.
    blocked.release().await;
    let status = srv
        .wait_for("dup", |s| s.state != ModelState::Loading as i32)
        .await;
    assert_eq!(status.state, ModelState::Ready as i32, "{}", status.reason);
    let err = srv.load("dup").await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::AlreadyExists, "model 'dup' is already READY")
    );
    let out = srv
        .compute()
        .await
        .compute(compute_request(
            "dup",
            vec![f32_tensor("x", &[2], &[1.0, 2.0])],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_values(&out.outputs[0]), [4.0, 8.0]);
}

#[tokio::test]
async fn unload_lets_in_flight_requests_finish() {
    let srv = TestServer::start(|repo| fixtures::slow(repo, "slow", 400), true).await;
    srv.wait_ready("slow").await;
    let mut compute = srv.compute().await;
    let in_flight = tokio::spawn(async move {
        compute
            .compute(compute_request(
                "slow",
                vec![f32_tensor("x", &[3], &[1.0, 2.0, 3.0])],
            ))
            .await
    });
    srv.wait_for("slow", |s| s.in_flight >= 1).await;
    let unloading = srv
        .models()
        .await
        .unload_model(pb::UnloadModelRequest {
            name: "slow".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(unloading.state, ModelState::Unloading as i32);
    assert_eq!(unloading.in_flight, 1);

    // New requests are refused at once...
    let refused = srv
        .compute()
        .await
        .compute(compute_request("slow", vec![f32_tensor("x", &[1], &[1.0])]))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), refused.message()),
        (Code::Unavailable, "model 'slow' is UNLOADING")
    );
    // ...while the admitted one finishes with the right numbers.
    let finished = in_flight
        .await
        .unwrap()
        .expect("in-flight request completes")
        .into_inner();
    assert_eq!(f32_values(&finished.outputs[0]), [2.0, 4.0, 6.0]);
    srv.wait_for("slow", |s| s.state == ModelState::Unavailable as i32)
        .await;
}

#[tokio::test]
async fn a_full_queue_is_refused_at_once() {
    let srv = TestServer::start(
        |repo| {
            fixtures::slow(repo, "slow", 300);
            fixtures::scale_config()
                .max_queue_size(1)
                .write(repo, "slow");
        },
        true,
    )
    .await;
    srv.wait_ready("slow").await;
    let mut calls = Vec::new();
    for idx in 0..6 {
        let mut compute = srv.compute().await;
        calls.push(tokio::spawn(async move {
            compute
                .compute(compute_request(
                    "slow",
                    vec![f32_tensor("x", &[1], &[idx as f32])],
                ))
                .await
        }));
    }
    let mut n_ok = 0;
    let mut n_refused = 0;
    for (idx, call) in calls.into_iter().enumerate() {
        match call.await.unwrap() {
            Ok(response) => {
                n_ok += 1;
                assert_eq!(
                    f32_values(&response.into_inner().outputs[0]),
                    [2.0 * idx as f32]
                );
            }
            Err(err) => {
                n_refused += 1;
                assert_eq!(
                    (err.code(), err.message()),
                    (
                        Code::ResourceExhausted,
                        "model 'slow:1': queue is full, 1 requests already waiting (max_queue_size = 1)"
                    )
                );
            }
        }
    }
    assert!(
        n_ok >= 1 && n_refused >= 1,
        "ok {n_ok}, refused {n_refused}"
    );
}
