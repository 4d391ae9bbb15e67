//! What a deployment leans on: plugins from a Kubernetes ConfigMap (the
//! `..data` symlink swap, a read-only directory with the compile cache
//! elsewhere), KServe's single-model layout, and a wrong repository
//! stopping the server at once.

use plinth::grpc::pb;
use plinth_tests::{
    PATIENCE, TestServer, compute_request, eventually, f32_tensor, f32_values, fixtures,
    plugin_wasm,
};

fn serving(status: &pb::PluginStatus) -> bool {
    status.serving && status.load_error.is_empty()
}

/// A plugin directory mounted from a ConfigMap: each update swaps `..data`,
/// touching no plugin's own entry; the plugins whose files changed reload.
/// The directory is never written: compiled components go to the cache
/// directory given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_update_reloads_the_plugins_it_changes() {
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().join("compiled");
    let topk = std::fs::read(plugin_wasm("softmax_topk")).unwrap();
    let normalize = std::fs::read(plugin_wasm("image_normalize")).unwrap();
    let srv = TestServer::start_with(
        |repo| {
            fixtures::affine(repo, "affine", 4);
            fixtures::affine_config(4)
                .postprocess(&["post"])
                .write(repo, "affine");
        },
        |config| {
            config.plugin_cache_dir = Some(cache_dir.clone());
            // The plugins arrive after startup, as a ConfigMap mounted late.
        },
    )
    .await;
    let dir = srv.plugins.path();
    fixtures::kubernetes_mount(
        dir,
        1,
        &[
            ("post.wasm", &topk),
            ("post.toml", b"[config]\nk = 1\nsoftmax = false\n"),
        ],
    );
    let first = srv.wait_plugin("post", serving).await;
    srv.wait_ready("affine").await;
    let mut compute = srv.compute().await;
    let row = [1.0f32, 2.0, 3.0, 4.0];
    let run = || compute_request("affine", vec![f32_tensor("x", &[1, 4], &row)]);
    let out = compute.compute(run()).await.unwrap().into_inner();
    assert_eq!(out.outputs[0].shape, [1, 1]);

    // The manifest changes in the next generation; the component does not.
    fixtures::kubernetes_mount(
        dir,
        2,
        &[
            ("post.wasm", &topk),
            ("post.toml", b"[config]\nk = 3\nsoftmax = false\n"),
        ],
    );
    let second = srv
        .wait_plugin("post", |s| {
            serving(s) && s.loaded_at_us > first.loaded_at_us
        })
        .await;
    assert_eq!(second.file_hash, first.file_hash);
    let out = compute.compute(run()).await.unwrap().into_inner();
    assert_eq!(out.outputs[0].shape, [1, 3]);

    // Then the component itself.
    fixtures::kubernetes_mount(dir, 3, &[("post.wasm", &normalize), ("post.toml", b"")]);
    srv.wait_plugin("post", |s| serving(s) && s.file_hash != first.file_hash)
        .await;
    let out = compute.compute(run()).await.unwrap().into_inner();
    assert_eq!(
        f32_values(&out.outputs[0]),
        fixtures::affine_expected(&row).to_vec()
    );

    let compiled: Vec<_> = std::fs::read_dir(&cache_dir)
        .expect("the cache directory was created")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .collect();
    assert_eq!(
        compiled.len(),
        2,
        "one artifact per component: {compiled:?}"
    );
    assert!(
        !dir.join(".cache").exists(),
        "nothing is written into the plugin directory"
    );
    srv.stop().await;
}

/// KServe's storage initializer leaves one model directory at the mount
/// point: served under the name given, its versions from the root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_model_directory_is_served_under_the_name_given() {
    let staging = tempfile::tempdir().unwrap();
    fixtures::scale(staging.path(), "m", "1", 3.0);
    let root = staging.path().join("m");
    let config = {
        let mut config = plinth::ServerConfig::ephemeral(&root, staging.path().join("plugins"));
        config.model_name = Some("sentiment".into());
        config.allow_empty = false;
        config
    };
    std::fs::create_dir_all(&config.plugin_dir).unwrap();
    let server = plinth::start(config)
        .await
        .expect("starts on a single model");
    let srv = TestServer {
        server: Some(server),
        repo: staging,
        plugins: tempfile::tempdir().unwrap(),
    };
    srv.wait_ready("sentiment").await;
    let listed = srv
        .models()
        .await
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["sentiment"]);
    let out = srv
        .compute()
        .await
        .compute(compute_request(
            "sentiment",
            vec![f32_tensor("x", &[2], &[1.0, -2.0])],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_values(&out.outputs[0]), [3.0, -6.0]);
    srv.stop().await;
}

/// A repository that is missing, empty, or a model directory without a
/// name stops the server before it binds, with one line naming the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_repository_stops_the_server_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    fixtures::scale(dir.path(), "m", "1", 2.0);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let cases = [
        (dir.path().join("missing"), None, "missing: cannot read"),
        (empty.clone(), None, "holds no model"),
        (
            dir.path().join("m"),
            None,
            "name the model with --model-name",
        ),
        (dir.path().join("m"), Some("bad/name"), "--model-name"),
    ];
    for (root, name, want) in cases {
        let mut config = plinth::ServerConfig::ephemeral(&root, plugins.path());
        config.allow_empty = false;
        config.model_name = name.map(str::to_owned);
        let err = plinth::start(config)
            .await
            .expect_err("a wrong repository must not serve");
        let line = format!("{err:#}");
        assert!(
            line.contains(want) && !line.contains('\n'),
            "{root:?}: {line}"
        );
    }
    // --allow-empty: an empty repository serves, to be filled later.
    let mut config = plinth::ServerConfig::ephemeral(&empty, plugins.path());
    config.allow_empty = true;
    let server = plinth::start(config).await.expect("allowed empty");
    eventually(PATIENCE, "readiness with no models", async || {
        if server.health.is_ready() {
            Ok(())
        } else {
            Err("not ready")
        }
    })
    .await;
    server.shutdown().await;
}
