//! The process-wide compute budget and what GetInfo reports about the build.

use plinth::grpc::pb;
use plinth_tests::fixtures;
use plinth_tests::{TestServer, compute_request, f32_tensor};

#[tokio::test]
async fn four_models_under_load_never_exceed_the_budget() {
    let srv = TestServer::start_with(
        |repo| {
            for name in ["m1", "m2", "m3"] {
                fixtures::slow(repo, name, 8);
            }
            // Asks for more intra-op threads than the whole budget.
            fixtures::slow(repo, "greedy", 8);
            fixtures::scale_config()
                .field("intra_op_threads", 8)
                .write(repo, "greedy");
        },
        |config| config.threads = Some(2),
    )
    .await;
    for name in ["m1", "m2", "m3", "greedy"] {
        srv.wait_ready(name).await;
    }
    let mut models = srv.models().await;
    let greedy = models
        .get_model(pb::GetModelRequest {
            name: "greedy".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .model
        .unwrap();
    assert_eq!(greedy.intra_op_threads, 2, "clamped to the budget");

    // Eight clients per model, all at once.
    let mut calls = Vec::new();
    for name in ["m1", "m2", "m3", "greedy"] {
        for _ in 0..8 {
            let mut compute = srv.compute().await;
            let request = compute_request(name, vec![f32_tensor("x", &[4], &[1.0; 4])]);
            calls.push(tokio::spawn(async move { compute.compute(request).await }));
        }
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }

    let info = srv.info().await;
    let budget = info.thread_budget.unwrap();
    assert_eq!(budget.cores, 2);
    // Work ran, and never more than two cores' worth at once.
    assert_eq!(budget.cores_peak, 2);
    assert_eq!(budget.cores_in_use, 0);
    // Four executors of two intra-op threads exist; only one computes at a time.
    assert_eq!((budget.executors, budget.torch_threads), (4, 8));
    srv.stop().await;
}

#[tokio::test]
async fn get_info_reports_the_libtorch_the_binary_was_built_against() {
    let srv = TestServer::start(|_| {}, false).await;
    let info = srv.info().await;
    // xtask builds against libtorch 2.11.0 (its TORCH_VERSION).
    assert_eq!(info.libtorch_version, "2.11.0");
    srv.stop().await;
}
