//! Changes that land while the registry is busy: `--poll` changes to a model
//! that is loading or reloading, readiness once the startup loads finish,
//! and a shutdown while loads are in flight. Each waits on a load held open
//! by a named pipe (`BlockedModel`), so "while it is busy" is a fact, not a
//! matter of timing.

use std::time::Duration;

use super::plugins::readiness_becomes;
use plinth_tests::fixtures::{self, BlockedModel};
use plinth_tests::{
    ModelState, PATIENCE, TestServer, compute_request, eventually, f32_tensor, f32_values,
};

/// Longer than the `--poll` watcher's 250 ms debounce: by then it has seen a
/// change. A slower watcher would only make the tests below pass without
/// exercising the busy path, never fail them.
const WATCHER_SETTLES: Duration = Duration::from_millis(1000);

async fn answer(srv: &TestServer, model: &str) -> Vec<f32> {
    let request = compute_request(model, vec![f32_tensor("x", &[1], &[5.0])]);
    f32_values(
        &srv.compute()
            .await
            .compute(request)
            .await
            .unwrap()
            .into_inner()
            .outputs[0],
    )
}

/// Waits until `model` serves exactly `versions` and nothing is under way.
async fn wait_serving(srv: &TestServer, model: &str, versions: &[&str]) {
    eventually(
        PATIENCE,
        &format!("{model} to serve {versions:?}"),
        async || {
            let status = srv.listed(model).await?;
            (status.state == ModelState::Ready as i32
                && !status.reloading
                && status.versions == versions)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn poll_applies_a_change_that_lands_during_a_reload() {
    let srv = TestServer::start_with(
        |repo| fixtures::scale(repo, "live", "1", 2.0),
        |config| config.poll = true,
    )
    .await;
    let repo = srv.repo.path().to_path_buf();
    srv.wait_ready("live").await;

    // Version 2 appears as a pipe: the reload it starts blocks on reading it.
    let blocked = BlockedModel::scale_version(&repo, "live", "2", 3.0);
    eventually(PATIENCE, "the reload to start", async || {
        srv.listed("live").await?.reloading.then_some(())
    })
    .await;
    // Version 3 lands while the reload is under way, and the watcher sees it
    // (its debounce is 250 ms) before the reload is let go.
    fixtures::publish_scale(&repo, "live", "3", 4.0);
    tokio::time::sleep(WATCHER_SETTLES).await;
    // The old version serves throughout.
    assert_eq!(answer(&srv, "live").await, [10.0]);
    blocked.release().await;

    // The reload finishes with version 2, and the change that landed during
    // it is applied after: version 3 serves.
    wait_serving(&srv, "live", &["3"]).await;
    assert_eq!(answer(&srv, "live").await, [20.0]);
    srv.stop().await;
}

#[tokio::test]
async fn poll_applies_a_change_even_when_its_watch_of_the_registry_lags() {
    // Room for one state change only: the watcher waiting on `live` falls
    // behind as soon as two other changes are broadcast before it runs.
    let srv = TestServer::start_with(
        |repo| {
            fixtures::scale(repo, "a", "1", 1.0);
            fixtures::scale(repo, "b", "1", 1.0);
        },
        |config| {
            config.poll = true;
            config.state_events_capacity = 1;
        },
    )
    .await;
    let repo = srv.repo.path().to_path_buf();
    srv.wait_ready("a").await;
    srv.wait_ready("b").await;

    // `live` appears with a version whose load blocks.
    let blocked = BlockedModel::scale(&repo, "live", 2.0);
    eventually(PATIENCE, "live to be loading", async || {
        (srv.listed("live").await?.state == ModelState::Loading as i32).then_some(())
    })
    .await;
    // Version 2 lands while the first load is under way: the watcher waits
    // for `live` to settle...
    fixtures::publish_scale(&repo, "live", "2", 3.0);
    tokio::time::sleep(WATCHER_SETTLES).await;
    // ... and misses changes: this test's runtime is single-threaded, so the
    // two unloads are broadcast back to back before the watcher runs again.
    let registry = srv.running().registry.clone();
    registry.unload("a").unwrap();
    registry.unload("b").unwrap();
    blocked.release().await;

    // The first load ends with version 1; the change is applied after it.
    wait_serving(&srv, "live", &["2"]).await;
    assert_eq!(answer(&srv, "live").await, [15.0]);
    srv.stop().await;
}

#[tokio::test]
async fn readiness_follows_the_startup_loads_not_the_health_timer() {
    // The health monitor's timer would first fire in an hour: readiness must
    // come from the startup loads finishing.
    let mut blocked = None;
    let srv = TestServer::start_with(
        |repo| {
            fixtures::scale(repo, "quick", "1", 2.0);
            blocked = Some(BlockedModel::scale(repo, "slow", 2.0));
        },
        |config| config.health_period = Duration::from_secs(3600),
    )
    .await;
    let blocked = blocked.unwrap();
    let channel = srv.channel().await;
    let serving = async || {
        tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    };
    srv.wait_ready("quick").await;
    // One startup load is still under way: not ready.
    assert!(!serving().await);
    assert!(!srv.running().health.is_ready());
    blocked.release().await;
    srv.wait_ready("slow").await;
    eventually(PATIENCE, "the server to turn ready", async || {
        serving().await.then_some(())
    })
    .await;
    assert!(srv.running().health.is_ready());
    srv.stop().await;
}

#[tokio::test]
async fn a_shutdown_waits_for_loads_in_flight_and_starts_no_executor_after_its_drain() {
    let mut blocked = None;
    let mut srv = TestServer::start_with(
        |repo| {
            fixtures::scale(repo, "early", "1", 2.0);
            blocked = Some(BlockedModel::scale(repo, "late", 2.0));
        },
        |_| {},
    )
    .await;
    let blocked = blocked.unwrap();
    srv.wait_ready("early").await;
    assert_eq!(
        srv.listed("late").await.unwrap().state,
        ModelState::Loading as i32
    );

    let server = srv.server.take().unwrap();
    let registry = server.registry.clone();
    server.trigger().cancel();
    let drained = tokio::spawn(server.wait());
    eventually(PATIENCE, "the registry to close", async || {
        registry.is_closing().then_some(())
    })
    .await;
    // A load asked for after the drain began is refused.
    let refused = registry
        .load("early", plinth::registry::LoadMode::Reload)
        .await
        .unwrap_err();
    assert_eq!(refused.to_string(), "the server is shutting down");
    // The load in flight finishes its read only now.
    blocked.release().await;
    drained.await.unwrap();

    // `wait` returned after that load: it started no executor, and every
    // executor of `early` has ended.
    let late = registry.status("late").unwrap();
    assert_ne!(late.state, plinth::registry::ModelState::Loading);
    assert_ne!(late.state, plinth::registry::ModelState::Ready);
    assert_eq!(late.reason.as_deref(), Some("the server is shutting down"));
    assert_eq!(
        registry.status("early").unwrap().state,
        plinth::registry::ModelState::Unavailable
    );
    let budget = registry.thread_budget();
    assert_eq!((budget.executors, budget.torch_threads), (0, 0));
}

/// Whether `grpc.health.v1` says SERVING.
async fn grpc_serving(srv: &TestServer) -> bool {
    tonic_health::pb::health_client::HealthClient::new(srv.channel().await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok_and(|answer| {
            answer.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        })
}

/// A broken `broken` beside a good `halves`.
fn good_and_broken(repo: &std::path::Path) {
    fixtures::scale(repo, "halves", "1", 0.5);
    fixtures::scale_config().write(repo, "broken");
    std::fs::create_dir_all(repo.join("broken/1")).unwrap();
    std::fs::write(repo.join("broken/1/model.pt"), b"not a TorchScript archive").unwrap();
}

/// Strict readiness (the default, as Triton's): a model that FAILED at
/// startup keeps the server not ready, named in the 503, in GetInfo and in
/// `grpc.health.v1`; a fixed version published under `--poll` makes it
/// ready. (A server with a FAILED model once reported ready, and a bad
/// revision passed its readiness probe.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_failed_at_startup_holds_readiness_back_until_it_is_fixed() {
    let srv = TestServer::start_with(good_and_broken, |config| {
        config.load_all = true;
        config.poll = true;
    })
    .await;
    eventually(PATIENCE, "a 503 naming the broken model", async || {
        let (code, body) = srv.http_get("/v2/health/ready").await;
        if code == 503 && body.contains("model 'broken' is FAILED") {
            Ok(())
        } else {
            Err(format!("{code} {body}"))
        }
    })
    .await;
    assert_eq!(srv.status("halves").await.state(), ModelState::Ready);
    assert!(!grpc_serving(&srv).await);
    let reason = srv.info().await.not_ready_reason;
    assert!(
        reason.contains("model 'broken' is FAILED") && !reason.contains("halves"),
        "{reason}"
    );
    fixtures::publish_scale(srv.repo.path(), "broken", "2", 2.0);
    readiness_becomes(&srv, 200).await;
    eventually(PATIENCE, "SERVING", async || {
        if grpc_serving(&srv).await {
            Ok(())
        } else {
            Err("NOT_SERVING".to_owned())
        }
    })
    .await;
    assert!(srv.info().await.not_ready_reason.is_empty());
    srv.stop().await;
}

/// `--strict-readiness=false`: ready once the startup loads have finished,
/// whatever became of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_readiness_is_ready_once_the_startup_loads_finish() {
    let srv = TestServer::start_with(good_and_broken, |config| {
        config.load_all = true;
        config.strict_readiness = false;
    })
    .await;
    readiness_becomes(&srv, 200).await;
    assert_eq!(srv.status("broken").await.state(), ModelState::Failed);
    srv.stop().await;
}
