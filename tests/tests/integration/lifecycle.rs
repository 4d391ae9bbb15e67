//! Load, infer, stream, unload, reload.

use futures::StreamExt;
use plinth::grpc::pb;
use plinth_tests::fixtures::{self, affine_expected};
use plinth_tests::{ModelState, TestServer, compute_request, f32_tensor, f32_values};

#[tokio::test]
async fn load_infer_unload_reload() {
    let srv = TestServer::start(|repo| fixtures::affine(repo, "affine", 4), false).await;
    let mut models = srv.models().await;

    let listed = models
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let states: Vec<(String, i32)> = listed
        .models
        .iter()
        .map(|m| (m.name.clone(), m.state))
        .collect();
    assert_eq!(
        states,
        [("affine".to_owned(), ModelState::Unavailable as i32)]
    );

    let status = srv.load("affine").await.expect("load");
    assert_eq!(status.state, ModelState::Ready as i32);
    assert_eq!(status.versions, ["1"]);
    assert!(status.load_duration_us > 0);

    let rows = [[1.0f32, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 8.0]];
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let response = srv
        .compute()
        .await
        .compute(pb::ComputeRequest {
            id: "req-1".into(),
            ..compute_request("affine", vec![f32_tensor("x", &[2, 4], &flat)])
        })
        .await
        .expect("compute")
        .into_inner();
    assert_eq!(response.id, "req-1");
    assert_eq!(response.version, "1");
    assert_eq!(response.outputs.len(), 1);
    let y = &response.outputs[0];
    assert_eq!(y.name, "y");
    assert_eq!(y.shape, [2, 3]);
    let expected: Vec<f32> = rows.iter().flat_map(affine_expected).collect();
    assert_eq!(f32_values(y), expected);

    let detail = models
        .get_model(pb::GetModelRequest {
            name: "affine".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .model
        .unwrap();
    assert_eq!(detail.max_batch_size, 4);
    assert_eq!(detail.success_count, 1);
    assert_eq!(detail.inputs[0].shape, [4]);

    let unloaded = models
        .unload_model(pb::UnloadModelRequest {
            name: "affine".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(unloaded.state, ModelState::Unloading as i32);
    srv.wait_for("affine", |s| s.state == ModelState::Unavailable as i32)
        .await;
    let err = srv
        .compute()
        .await
        .compute(compute_request(
            "affine",
            vec![f32_tensor("x", &[1, 4], &rows[0])],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(err.message(), "model 'affine' is UNAVAILABLE");

    // Loading again after an unload works and serves the same numbers.
    srv.load("affine").await.expect("second load");
    let again = srv
        .compute()
        .await
        .compute(compute_request(
            "affine",
            vec![f32_tensor("x", &[1, 4], &rows[0])],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_values(&again.outputs[0]), affine_expected(&rows[0]));
}

#[tokio::test]
async fn reload_swaps_versions_and_version_policy_is_honoured() {
    let srv = TestServer::start(|repo| fixtures::scale(repo, "scale", "1", 2.0), false).await;
    srv.load("scale").await.expect("load v1");
    let mut compute = srv.compute().await;
    let run = |version: &str| pb::ComputeRequest {
        version: version.into(),
        ..compute_request("scale", vec![f32_tensor("x", &[2], &[1.5, -4.0])])
    };
    let out = compute.compute(run("")).await.unwrap().into_inner();
    assert_eq!(
        (out.version.as_str(), f32_values(&out.outputs[0])),
        ("1", vec![3.0, -8.0])
    );

    // A new version lands; the default policy (latest 1) serves only it after a reload.
    fixtures::scale_file(
        &plinth_tests::model_file(srv.repo.path(), "scale", "2"),
        3.0,
    );
    let mut models = srv.models().await;
    let started = models
        .load_model(pb::LoadModelRequest {
            name: "scale".into(),
            reload: false,
            wait: true,
        })
        .await
        .unwrap_err();
    assert_eq!(started.code(), tonic::Code::AlreadyExists);
    assert_eq!(started.message(), "model 'scale' is already READY");
    let reloaded = models
        .load_model(pb::LoadModelRequest {
            name: "scale".into(),
            reload: true,
            wait: true,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(reloaded.versions, ["2"]);
    let out = compute.compute(run("")).await.unwrap().into_inner();
    assert_eq!(
        (out.version.as_str(), f32_values(&out.outputs[0])),
        ("2", vec![4.5, -12.0])
    );
    let gone = compute.compute(run("1")).await.unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    assert_eq!(
        gone.message(),
        "model 'scale' has no ready version '1' (ready: 2)"
    );

    // Policy `all` serves both; the newest is the default, the older one by name.
    fixtures::scale_config()
        .all_versions()
        .write(srv.repo.path(), "scale");
    let reloaded = srv
        .models()
        .await
        .load_model(pb::LoadModelRequest {
            name: "scale".into(),
            reload: true,
            wait: true,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(reloaded.versions, ["1", "2"]);
    let v1 = compute.compute(run("1")).await.unwrap().into_inner();
    assert_eq!(f32_values(&v1.outputs[0]), [3.0, -8.0]);
    let latest = compute.compute(run("")).await.unwrap().into_inner();
    assert_eq!(latest.version, "2");

    // A reload that fails leaves the old versions serving and says why.
    std::fs::write(
        plinth_tests::model_file(srv.repo.path(), "scale", "2"),
        b"not a model",
    )
    .unwrap();
    let failed = srv
        .models()
        .await
        .load_model(pb::LoadModelRequest {
            name: "scale".into(),
            reload: true,
            wait: true,
        })
        .await
        .unwrap_err();
    assert_eq!(failed.code(), tonic::Code::FailedPrecondition);
    assert!(
        failed
            .message()
            .contains("scale/2/model.pt: not a loadable TorchScript archive"),
        "{}",
        failed.message()
    );
    let status = srv.status("scale").await;
    assert_eq!(status.state, ModelState::Ready as i32);
    assert!(
        status
            .reason
            .starts_with("reload failed, previous versions keep serving"),
        "{}",
        status.reason
    );
    let still = compute.compute(run("")).await.unwrap().into_inner();
    assert_eq!(
        (still.version.as_str(), f32_values(&still.outputs[0])),
        ("2", vec![4.5, -12.0])
    );
}

#[tokio::test]
async fn stream_compute_answers_in_order_and_survives_bad_messages() {
    let srv = TestServer::start(
        |repo| {
            fixtures::scale(repo, "scale", "1", 2.0);
            fixtures::slow(repo, "slow", 40);
        },
        true,
    )
    .await;
    srv.wait_ready("slow").await;
    srv.wait_ready("scale").await;

    // Alternate a slow model and a fast one: answers must still come back in order.
    let mut requests = Vec::new();
    for idx in 0..12 {
        let model = if idx % 2 == 0 { "slow" } else { "scale" };
        let value = idx as f32;
        requests.push(pb::ComputeRequest {
            id: format!("m{idx}"),
            ..compute_request(model, vec![f32_tensor("x", &[1], &[value])])
        });
    }
    // One bad message in the middle gets an in-band error; the stream goes on.
    requests.insert(
        5,
        pb::ComputeRequest {
            id: "bad".into(),
            ..compute_request("scale", vec![f32_tensor("x", &[2], &[1.0])])
        },
    );
    let n_requests = requests.len();
    let responses: Vec<pb::ComputeResponse> = srv
        .compute()
        .await
        .stream_compute(futures::stream::iter(requests))
        .await
        .expect("stream opens")
        .into_inner()
        .map(|r| r.expect("stream item"))
        .collect()
        .await;
    assert_eq!(responses.len(), n_requests);
    let mut expected_idx = 0;
    for response in &responses {
        if response.id == "bad" {
            let error = response.error.as_ref().expect("in-band error");
            assert_eq!(error.code, tonic::Code::InvalidArgument as i32);
            assert_eq!(
                error.message,
                "model 'scale': tensor 'x': shape [2] of f32 needs 8 bytes, got 4"
            );
            continue;
        }
        assert_eq!(response.id, format!("m{expected_idx}"));
        assert_eq!(
            f32_values(&response.outputs[0]),
            [2.0 * expected_idx as f32]
        );
        expected_idx += 1;
    }
    assert_eq!(expected_idx, 12);
}

#[tokio::test]
async fn every_dtype_round_trips_through_torch() {
    use plinth_torch::trace::Kind;
    let cases: [(&str, Kind, pb::DataType, usize); 10] = [
        ("bool", Kind::Bool, pb::DataType::Bool, 1),
        ("u8", Kind::Uint8, pb::DataType::Uint8, 1),
        ("i8", Kind::Int8, pb::DataType::Int8, 1),
        ("i16", Kind::Int16, pb::DataType::Int16, 2),
        ("i32", Kind::Int, pb::DataType::Int32, 4),
        ("i64", Kind::Int64, pb::DataType::Int64, 8),
        ("f16", Kind::Half, pb::DataType::Float16, 2),
        ("bf16", Kind::BFloat16, pb::DataType::Bfloat16, 2),
        ("f32", Kind::Float, pb::DataType::Float32, 4),
        ("f64", Kind::Double, pb::DataType::Float64, 8),
    ];
    let srv = TestServer::start(
        |repo| {
            for (name, kind, _, _) in cases {
                fixtures::dtype_double(repo, &format!("dt_{name}"), name, kind);
            }
        },
        true,
    )
    .await;
    let mut compute = srv.compute().await;
    for (name, _, dtype, size) in cases {
        let model = format!("dt_{name}");
        srv.wait_ready(&model).await;
        // Little-endian encodings of [1, 3, 0] (bool: [true, true, false]) and of the doubled values.
        let (input, expected): (Vec<u8>, Vec<u8>) = match name {
            "bool" => (vec![1, 1, 0], vec![0, 0, 1]),
            "f16" => (
                [1.0f32, 3.0, 0.0]
                    .iter()
                    .flat_map(|v| f16_bits(*v).to_le_bytes())
                    .collect(),
                [2.0f32, 6.0, 0.0]
                    .iter()
                    .flat_map(|v| f16_bits(*v).to_le_bytes())
                    .collect(),
            ),
            "bf16" => (
                [1.0f32, 3.0, 0.0]
                    .iter()
                    .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
                    .collect(),
                [2.0f32, 6.0, 0.0]
                    .iter()
                    .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
                    .collect(),
            ),
            "f32" => (
                [1.0f32, 3.0, 0.0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                [2.0f32, 6.0, 0.0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            "f64" => (
                [1.0f64, 3.0, 0.0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                [2.0f64, 6.0, 0.0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            _ => (int_bytes(&[1, 3, 0], size), int_bytes(&[2, 6, 0], size)),
        };
        let response = compute
            .compute(compute_request(
                &model,
                vec![pb::Tensor {
                    name: "x".into(),
                    dtype: dtype as i32,
                    shape: vec![3],
                    data: input.into(),
                }],
            ))
            .await
            .unwrap_or_else(|err| panic!("{model}: {err}"))
            .into_inner();
        let y = &response.outputs[0];
        assert_eq!(y.dtype, dtype as i32, "{model}");
        assert_eq!(y.shape, [3], "{model}");
        assert_eq!(y.data.as_ref(), expected.as_slice(), "{model}");
    }
}

fn int_bytes(values: &[i64], size: usize) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| v.to_le_bytes()[..size].to_vec())
        .collect()
}

/// IEEE half-precision bits of small integers (exact).
fn f16_bits(value: f32) -> u16 {
    if value == 0.0 {
        return 0;
    }
    let bits = value.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    let mantissa = (bits >> 13) & 0x3ff;
    ((exp as u32) << 10 | mantissa) as u16
}

#[tokio::test]
async fn inputs_are_matched_by_name_not_position() {
    let srv = TestServer::start(|repo| fixtures::two_io(repo, "two"), true).await;
    srv.wait_ready("two").await;
    let b = pb::Tensor {
        name: "b".into(),
        dtype: pb::DataType::Int64 as i32,
        shape: vec![3],
        data: [5i64, -6, 7]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
    };
    let a = f32_tensor("a", &[3], &[0.5, 1.5, -2.0]);
    let response = srv
        .compute()
        .await
        .compute(compute_request("two", vec![b, a]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.outputs.len(), 1);
    assert_eq!(response.outputs[0].name, "y");
    let y: Vec<f64> = response.outputs[0]
        .data
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(y, [0.5 - 10.0, 1.5 + 12.0, -2.0 - 14.0]);
}
