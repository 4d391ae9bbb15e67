//! On-demand residency and the memory budget: models loaded by their first
//! request, evicted least recently used when a load would pass the budget,
//! pinned models never evicted, and sizes measured from the archives.

use plinth::grpc::pb;
use plinth_tests::fixtures;
use plinth_tests::{TestServer, compute_request, f32_tensor, f32_values};

/// 1 MiB of f32 weights.
const MIB_FLOATS: i64 = 1 << 18;
const MIB: u64 = 1 << 20;

async fn compute(srv: &TestServer, model: &str, x: &[f32]) -> Result<Vec<f32>, tonic::Status> {
    let mut client = srv.compute().await;
    let request = compute_request(model, vec![f32_tensor("x", &[x.len() as i64], x)]);
    let response = client.compute(request).await?.into_inner();
    Ok(f32_values(&response.outputs[0]))
}

fn residency(info: &pb::GetInfoResponse) -> pb::Residency {
    info.residency.expect("GetInfo reports residency")
}

#[tokio::test]
async fn a_budget_for_two_of_three_models_serves_them_all_and_never_evicts_a_pinned_one() {
    let srv = TestServer::start_with(
        |repo| {
            for (name, factor) in [("a", 2.0), ("b", 3.0), ("c", 4.0)] {
                fixtures::weighted(repo, name, factor, MIB_FLOATS);
                fixtures::scale_config()
                    .residency("on-demand")
                    .write(repo, name);
            }
            fixtures::weighted(repo, "p", 5.0, MIB_FLOATS);
        },
        // The pinned model and two on-demand ones fit; three do not.
        |config| config.memory_budget = Some(3 * MIB + MIB / 2),
    )
    .await;
    srv.wait_ready("p").await;
    let pinned_since = srv.status("p").await.state_since_us;
    for name in ["a", "b", "c"] {
        let status = srv.status(name).await;
        assert_eq!(
            (status.state(), status.on_demand, status.memory_bytes),
            (pb::ModelState::Unavailable, true, 0),
            "{name} is listed, not loaded"
        );
    }

    // Round robin: every on-demand request after the first two finds its
    // model evicted by the one before.
    for _ in 0..3 {
        for (name, factor) in [("a", 2.0), ("b", 3.0), ("c", 4.0), ("p", 5.0)] {
            let y = compute(&srv, name, &[1.0, 2.0, 3.0])
                .await
                .unwrap_or_else(|err| panic!("{name}: {err}"));
            assert_eq!(y, [factor, 2.0 * factor, 3.0 * factor], "{name}");
        }
    }

    let counts = residency(&srv.info().await);
    assert_eq!(counts.memory_budget_bytes, 3 * MIB + MIB / 2);
    assert_eq!(
        (
            counts.on_demand_loads,
            counts.misses,
            counts.hits,
            counts.evictions
        ),
        (9, 9, 0, 7),
        "{counts:?}"
    );
    // The two most recently used on-demand models are loaded, each with its
    // measured size; the pinned one never left.
    let loaded: Vec<(String, u64)> = srv
        .models()
        .await
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models
        .into_iter()
        .filter(|m| m.state() == pb::ModelState::Ready)
        .map(|m| (m.name, m.memory_bytes))
        .collect();
    assert_eq!(
        loaded,
        [
            ("b".to_owned(), MIB),
            ("c".to_owned(), MIB),
            ("p".to_owned(), MIB)
        ]
    );
    let pinned = srv.status("p").await;
    assert!(!pinned.on_demand);
    assert_eq!(pinned.state_since_us, pinned_since, "p was never unloaded");

    // The metrics say the same.
    let (_, metrics) = srv.metrics().await;
    for line in [
        "plinth_model_memory_bytes{model=\"p\",device=\"cpu\"} 1048576",
        "plinth_evictions_total 7",
        "plinth_on_demand_loads_total 9",
        "plinth_on_demand_requests_total{result=\"miss\"} 9",
        "plinth_memory_budget_bytes 3670016",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in:\n{metrics}"
        );
    }
    srv.stop().await;
}

#[tokio::test]
async fn concurrent_first_requests_load_an_on_demand_model_once() {
    let srv = TestServer::start(
        |repo| {
            fixtures::weighted(repo, "lazy", 2.0, 1024);
            fixtures::scale_config()
                .residency("on-demand")
                .instances(2)
                .write(repo, "lazy");
        },
        true,
    )
    .await;
    let mut calls = Vec::new();
    for i in 0..16 {
        let mut client = srv.compute().await;
        let request = compute_request("lazy", vec![f32_tensor("x", &[1], &[i as f32])]);
        calls.push(tokio::spawn(async move {
            let response = client.compute(request).await.map(|r| r.into_inner());
            (i, response)
        }));
    }
    for call in calls {
        let (i, response) = call.await.unwrap();
        let response = response.unwrap_or_else(|err| panic!("request {i}: {err}"));
        assert_eq!(f32_values(&response.outputs[0]), [2.0 * i as f32]);
    }
    let counts = residency(&srv.info().await);
    assert_eq!(
        (counts.on_demand_loads, counts.misses + counts.hits),
        (1, 16),
        "{counts:?}"
    );
    // Two instances of 1024 floats each.
    assert_eq!(srv.status("lazy").await.memory_bytes, 2 * 1024 * 4);
    let stats = srv.model_stats("lazy").await;
    assert_eq!(
        stats
            .memory_usage
            .iter()
            .map(|m| (m.r#type.as_str(), m.id, m.byte_size))
            .collect::<Vec<_>>(),
        [("CPU", 0, 2 * 1024 * 4)]
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_model_that_cannot_fit_fails_naming_the_budget_and_evicts_nothing() {
    let srv = TestServer::start_with(
        |repo| {
            fixtures::weighted(repo, "small", 2.0, MIB_FLOATS / 4);
            fixtures::weighted(repo, "big", 2.0, 2 * MIB_FLOATS);
            for name in ["small", "big"] {
                fixtures::scale_config()
                    .residency("on-demand")
                    .write(repo, name);
            }
        },
        |config| config.memory_budget = Some(MIB),
    )
    .await;
    compute(&srv, "small", &[1.0]).await.unwrap();
    let err = compute(&srv, "big", &[1.0]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .contains("memory budget of 1.0 MiB on cpu: model 'big' needs 2.0 MiB, and with every idle on-demand model evicted 0.0 MiB would stay in use"),
        "{}",
        err.message()
    );
    // No room is not a broken model: listed UNAVAILABLE with the reason.
    let big = srv.status("big").await;
    assert_eq!(big.state(), pb::ModelState::Unavailable);
    assert!(big.reason.contains("memory budget"), "{}", big.reason);
    // Nothing was evicted for a load that could not fit anyway.
    assert_eq!(srv.status("small").await.state(), pb::ModelState::Ready);
    assert_eq!(residency(&srv.info().await).evictions, 0);
    srv.stop().await;
}

#[tokio::test]
async fn an_on_demand_model_loads_for_a_rest_or_an_open_inference_grpc_request_too() {
    let srv = TestServer::start(
        |repo| {
            for name in ["over_rest", "over_grpc"] {
                fixtures::weighted(repo, name, 3.0, 16);
                fixtures::scale_config()
                    .residency("on-demand")
                    .write(repo, name);
            }
        },
        true,
    )
    .await;
    // Not ready until asked for: the readiness endpoint says so.
    let (code, _) = srv.http_get("/v2/models/over_rest/ready").await;
    assert_eq!(code, 503, "an on-demand model not loaded is not ready");
    let (code, body) = srv
        .http_post(
            "/v2/models/over_rest/infer",
            &[("content-type", "application/json")],
            br#"{"inputs":[{"name":"x","datatype":"FP32","shape":[2],"data":[1.0,2.0]}]}"#,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["outputs"][0]["data"], serde_json::json!([3.0, 6.0]));
    let response = srv
        .inference()
        .await
        .model_infer(plinth_tests::load::infer_request(
            "over_grpc",
            &[2],
            &[1.0, 2.0],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.raw_output_contents[0].len(), 8);
    let y: Vec<f32> = response.raw_output_contents[0]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(y, [3.0, 6.0]);
    assert_eq!(residency(&srv.info().await).on_demand_loads, 2);
    srv.stop().await;
}

/// An on-demand model refused for lack of room while the others are busy
/// is not broken: the request that hit it gets UNAVAILABLE (503 over REST)
/// naming the budget, the model stays UNAVAILABLE (not FAILED), and the
/// next request, once the other model is idle, loads it. (It once stayed
/// FAILED until someone loaded it by hand.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_refused_while_others_are_busy_loads_on_the_next_request() {
    let srv = TestServer::start_with(
        |repo| {
            // `busy`: 256 KiB of weights and a long forward; `big`: 1 MiB.
            fixtures::slow(repo, "busy", 800);
            fixtures::weighted(repo, "big", 2.0, MIB_FLOATS);
            for name in ["busy", "big"] {
                fixtures::scale_config()
                    .residency("on-demand")
                    .write(repo, name);
            }
        },
        // Either fits alone; both do not.
        |config| config.memory_budget = Some(MIB + MIB / 8),
    )
    .await;
    let slow_call = {
        let mut client = srv.compute().await;
        let request = compute_request("busy", vec![f32_tensor("x", &[3], &[1.0, 2.0, 3.0])]);
        tokio::spawn(async move { client.compute(request).await })
    };
    plinth_tests::eventually(plinth_tests::PATIENCE, "busy computing", async || {
        let status = srv.status("busy").await;
        if status.in_flight > 0 {
            Ok(())
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await;
    let err = compute(&srv, "big", &[1.0]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .contains("memory budget of 1.1 MiB on cpu: model 'big' needs 1.0 MiB"),
        "{}",
        err.message()
    );
    // Over REST, the same refusal is a 503 naming the budget.
    let (code, text) = srv
        .http_post(
            "/v2/models/big/infer",
            &[],
            br#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}]}"#,
        )
        .await;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("memory budget"), "{text}");
    let big = srv.status("big").await;
    assert_eq!(big.state(), pb::ModelState::Unavailable, "{big:?}");
    assert!(big.reason.contains("memory budget"), "{}", big.reason);
    // The busy model answers, then is idle and may be evicted.
    let answer = slow_call.await.unwrap().unwrap().into_inner();
    assert_eq!(f32_values(&answer.outputs[0]), [2.0, 4.0, 6.0]);
    assert_eq!(compute(&srv, "big", &[1.0]).await.unwrap(), [2.0]);
    assert_eq!(
        srv.status("busy").await.state(),
        pb::ModelState::Unavailable
    );
    srv.stop().await;
}
