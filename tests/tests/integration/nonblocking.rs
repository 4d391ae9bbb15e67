//! The registry never blocks: listing, health and inference on a ready model
//! answer while large loads are in flight. Loads are held in flight by model
//! files that are pipes, so the test asserts ordering, not wall-clock bounds.

use futures::StreamExt;
use plinth::grpc::pb;
use plinth_tests::fixtures::{self, BlockedModel};
use plinth_tests::{
    ModelState, PATIENCE, TestServer, compute_request, eventually, f32_tensor, f32_values,
};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const LARGE_FLOATS: i64 = 8 << 20; // 32 MiB of weights per model

#[tokio::test]
async fn list_health_and_inference_answer_while_three_large_loads_are_in_flight() {
    let mut blocked = Vec::new();
    let srv = TestServer::start(
        |repo| {
            fixtures::scale(repo, "ready", "1", 2.0);
            for name in ["big_a", "big_b", "big_c"] {
                blocked.push(BlockedModel::large(repo, name, LARGE_FLOATS));
            }
        },
        false,
    )
    .await;
    srv.load("ready").await.unwrap();
    let mut watch = srv
        .models()
        .await
        .watch_models(pb::WatchModelsRequest {
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();

    let mut models = srv.models().await;
    for name in ["big_a", "big_b", "big_c"] {
        let started = models
            .load_model(pb::LoadModelRequest {
                name: name.into(),
                reload: false,
                wait: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(started.status.unwrap().state, ModelState::Loading as i32);
    }

    // All three loads are now blocked reading their files. Everything else answers.
    let listed = models
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let states: Vec<(&str, i32)> = listed
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.state))
        .collect();
    let loading = ModelState::Loading as i32;
    assert_eq!(
        states,
        [
            ("big_a", loading),
            ("big_b", loading),
            ("big_c", loading),
            ("ready", ModelState::Ready as i32)
        ]
    );

    let health = HealthClient::new(srv.channel().await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);
    let (live, _) = srv.http_get("/v2/health/live").await;
    assert_eq!(live, 200);

    let out = srv
        .compute()
        .await
        .compute(compute_request(
            "ready",
            vec![f32_tensor("x", &[2], &[1.0, -1.0])],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_values(&out.outputs[0]), [2.0, -2.0]);

    // Inference on a loading model is refused with its state, not queued behind the load.
    let err = srv
        .compute()
        .await
        .compute(compute_request(
            "big_b",
            vec![f32_tensor("x", &[1], &[1.0])],
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (tonic::Code::Unavailable, "model 'big_b' is LOADING")
    );

    // Still loading after all of that: nothing above waited for them.
    for name in ["big_a", "big_b", "big_c"] {
        assert_eq!(srv.status(name).await.state, loading, "{name}");
    }

    for model in blocked {
        model.release().await;
    }
    let mut ready = std::collections::BTreeSet::new();
    let mut seen_loading = std::collections::BTreeSet::new();
    eventually(
        PATIENCE,
        "WatchModels to report the three big models READY",
        async || {
            let event = watch.next().await.expect("watch stream open").unwrap();
            if event.name.starts_with("big_") {
                if event.state == loading {
                    seen_loading.insert(event.name.clone());
                }
                if event.state == ModelState::Ready as i32 {
                    assert!(
                        seen_loading.contains(&event.name),
                        "{} READY before LOADING",
                        event.name
                    );
                    ready.insert(event.name.clone());
                }
                assert_ne!(event.state, ModelState::Failed as i32, "{}", event.reason);
            }
            if ready.len() == 3 {
                Ok(())
            } else {
                Err(format!("READY so far: {ready:?}"))
            }
        },
    )
    .await;
    let out = srv
        .compute()
        .await
        .compute(compute_request(
            "big_c",
            vec![f32_tensor("x", &[1], &[3.0])],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_values(&out.outputs[0]), [6.0]);
}

#[tokio::test]
async fn the_load_bound_holds_back_extra_loads() {
    let mut blocked = None;
    let srv = TestServer::start_with(
        |repo| {
            blocked = Some(BlockedModel::scale(repo, "slow_disk", 2.0));
            fixtures::scale(repo, "quick", "1", 3.0);
        },
        |config| {
            config.load_all = false;
            config.max_concurrent_loads = 1;
        },
    )
    .await;
    let mut watch = srv
        .models()
        .await
        .watch_models(pb::WatchModelsRequest {
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut models = srv.models().await;
    for name in ["slow_disk", "quick"] {
        models
            .load_model(pb::LoadModelRequest {
                name: name.into(),
                reload: false,
                wait: false,
            })
            .await
            .unwrap();
    }
    // Give `quick` every chance to finish if the bound were broken. This pause
    // can only hide a bug on a very slow machine, never fail a correct build.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        srv.status("quick").await.state,
        ModelState::Loading as i32,
        "quick loaded while the only slot was taken"
    );
    blocked.take().unwrap().release().await;
    let mut order = Vec::new();
    eventually(
        PATIENCE,
        "WatchModels to report both models READY",
        async || {
            let event = watch.next().await.expect("watch open").unwrap();
            if event.state == ModelState::Ready as i32 {
                order.push(event.name);
            }
            if order.len() == 2 {
                Ok(())
            } else {
                Err(format!("READY so far: {order:?}"))
            }
        },
    )
    .await;
    assert_eq!(order, ["slow_disk", "quick"]);
}
