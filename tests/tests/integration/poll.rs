//! `--poll`: the repository is watched, and models load, reload and unload as
//! their directories change, with the old version serving during a reload.

use plinth::grpc::pb;
use plinth_tests::fixtures;
use plinth_tests::{
    ModelState, PATIENCE, TestServer, compute_request, eventually, f32_tensor, f32_values,
};

/// Polls ListModels until `name` is listed in `state`, not reloading, and
/// `pred` holds for its status.
async fn wait_listed(
    srv: &TestServer,
    name: &str,
    state: ModelState,
    pred: impl Fn(&pb::ModelStatus) -> bool,
) -> pb::ModelStatus {
    let what = format!("model '{name}' to be listed {state:?}, settled");
    eventually(PATIENCE, &what, async || match srv.listed(name).await {
        Some(status) if status.state == state as i32 && !status.reloading && pred(&status) => {
            Ok(status)
        }
        other => Err(format!("{other:?}")),
    })
    .await
}

#[tokio::test]
async fn a_watched_repository_loads_reloads_and_unloads() {
    let srv = TestServer::start_with(|_| {}, |config| config.poll = true).await;
    let repo = srv.repo.path().to_path_buf();

    // A new model directory appears: it loads.
    fixtures::scale_config().write(&repo, "live");
    fixtures::publish_scale(&repo, "live", "1", 2.0);
    let status = wait_listed(&srv, "live", ModelState::Ready, |_| true).await;
    assert_eq!(status.versions, ["1"]);
    let mut compute = srv.compute().await;
    let run = || compute_request("live", vec![f32_tensor("x", &[1], &[5.0])]);
    assert_eq!(
        f32_values(&compute.compute(run()).await.unwrap().into_inner().outputs[0]),
        [10.0]
    );

    // A new version lands: the model reloads and serves it.
    fixtures::publish_scale(&repo, "live", "2", 3.0);
    wait_listed(&srv, "live", ModelState::Ready, |s| s.versions == ["2"]).await;
    let out = compute.compute(run()).await.unwrap().into_inner();
    assert_eq!(
        (out.version.as_str(), f32_values(&out.outputs[0])),
        ("2", vec![15.0])
    );

    // The directory goes away: the model unloads and leaves the list.
    std::fs::remove_dir_all(repo.join("live")).unwrap();
    eventually(
        PATIENCE,
        "model 'live' to unload or leave the list",
        async || match srv.listed("live").await {
            None => Ok(()),
            Some(m) if m.state == ModelState::Unavailable as i32 => Ok(()),
            Some(m) => Err(format!("{m:?}")),
        },
    )
    .await;
    let err = compute.compute(run()).await.unwrap_err();
    assert!(
        matches!(err.code(), tonic::Code::Unavailable | tonic::Code::NotFound),
        "{err:?}"
    );
}
