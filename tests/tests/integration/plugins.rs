//! Plugins for real: components built from plugins/ dropped into the plugin
//! directory of a running server, changing its behaviour with no restart.

use plinth::grpc::pb;
use plinth_tests::fixtures::{self, affine_expected};
use plinth_tests::{
    PATIENCE, TestServer, compute_request, eventually, f32_tensor, f32_values, install_plugin,
};
use tonic::Code;

fn i64_values(tensor: &pb::Tensor) -> Vec<i64> {
    tensor
        .data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Fills a repository with the model `affine` (batches of up to 4), its
/// config passed through `chain` (the plugins it runs).
fn affine_through(
    chain: impl FnOnce(fixtures::ModelConfig) -> fixtures::ModelConfig,
) -> impl FnOnce(&std::path::Path) {
    move |repo| {
        fixtures::affine(repo, "affine", 4);
        chain(fixtures::affine_config(4)).write(repo, "affine");
    }
}

fn serving(status: &pb::PluginStatus) -> bool {
    status.serving && status.load_error.is_empty()
}

#[tokio::test]
async fn pre_and_post_chains_run_around_the_model() {
    let srv = TestServer::start(
        |repo| {
            // Per-channel mean of a [3, 2, 2] image: y[c] = mean(x[c]).
            fixtures::config()
                .max_batch_size(4)
                .preprocess(&["normalize"])
                .input("image", "f32", &[3, 2, 2])
                .output("y", "f32", &[3])
                .write(repo, "img");
            fixtures::channel_means_file(&plinth_tests::model_file(repo, "img", "1"));
            fixtures::affine(repo, "affine", 4);
            fixtures::affine_config(4)
                .postprocess(&["topk"])
                .write(repo, "affine");
        },
        true,
    )
    .await;
    install_plugin(
        srv.plugins.path(),
        "normalize",
        "image_normalize",
        Some("[config]\nmean = [1, 2, 3]\nstd = [2, 2, 2]\nscale = 1\n"),
    );
    install_plugin(
        srv.plugins.path(),
        "topk",
        "softmax_topk",
        Some("[config]\nk = 2\nsoftmax = false\n"),
    );
    srv.wait_plugin("normalize", serving).await;
    srv.wait_plugin("topk", serving).await;
    srv.wait_ready("img").await;
    srv.wait_ready("affine").await;

    // u8 HWC [2, 2, 3]: pixel p has channels (p, 10 + p, 20 + p) for p = 1..=4.
    let pixels: Vec<u8> = (1u8..=4).flat_map(|p| [p, 10 + p, 20 + p]).collect();
    let image = pb::Tensor {
        name: "image".into(),
        dtype: pb::DataType::Uint8 as i32,
        shape: vec![2, 2, 3],
        data: pixels.into(),
    };
    let mut compute = srv.compute().await;
    let out = compute
        .compute(compute_request("img", vec![image]))
        .await
        .unwrap()
        .into_inner();
    // Channel means 2.5, 12.5, 22.5, normalised: (2.5-1)/2, (12.5-2)/2, (22.5-3)/2.
    assert_eq!(out.outputs[0].shape, [1, 3]);
    assert_eq!(f32_values(&out.outputs[0]), [0.75, 5.25, 9.75]);

    let rows = [[1.0f32, 2.0, 3.0, 4.0], [4.0, -3.0, 1.0, 0.0]];
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let out = compute
        .compute(compute_request(
            "affine",
            vec![f32_tensor("x", &[2, 4], &flat)],
        ))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = out.outputs.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["topk_indices", "topk_scores"]);
    let mut expected_idx = Vec::new();
    let mut expected_scores = Vec::new();
    for row in &rows {
        let y = affine_expected(row);
        let mut order: Vec<usize> = (0..3).collect();
        order.sort_by(|a, b| y[*b].total_cmp(&y[*a]));
        expected_idx.extend(order[..2].iter().map(|&i| i as i64));
        expected_scores.extend(order[..2].iter().map(|&i| y[i]));
    }
    assert_eq!(out.outputs[0].shape, [2, 2]);
    assert_eq!(i64_values(&out.outputs[0]), expected_idx);
    assert_eq!(f32_values(&out.outputs[1]), expected_scores);

    // A plugin's own refusal reaches the client with the plugin named.
    let bad = pb::Tensor {
        name: "image".into(),
        dtype: pb::DataType::Uint8 as i32,
        shape: vec![2, 2, 2],
        data: vec![0u8; 8].into(),
    };
    let err = compute
        .compute(compute_request("img", vec![bad]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .starts_with("plugin 'normalize' (preprocess) invalid input:"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn the_router_splits_by_weight_and_a_header_pins_the_version() {
    let srv = TestServer::start(
        |repo| {
            fixtures::scale(repo, "scale", "1", 2.0);
            fixtures::scale_file(&plinth_tests::model_file(repo, "scale", "2"), 3.0);
            fixtures::scale_config().all_versions().write(repo, "scale");
        },
        true,
    )
    .await;
    srv.wait_ready("scale").await;
    let mut compute = srv.compute().await;
    let run = |id: &str| pb::ComputeRequest {
        id: id.into(),
        ..compute_request("scale", vec![f32_tensor("x", &[1], &[1.0])])
    };
    // Without a router the newest version answers.
    assert_eq!(
        compute
            .compute(run("a"))
            .await
            .unwrap()
            .into_inner()
            .version,
        "2"
    );

    install_plugin(
        srv.plugins.path(),
        "router",
        "weighted_router",
        Some("[config]\nweights = \"1=100,2=0\"\n"),
    );
    srv.wait_plugin("router", serving).await;
    for idx in 0..20 {
        let out = compute
            .compute(run(&format!("r{idx}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (out.version.as_str(), f32_values(&out.outputs[0])),
            ("1", vec![2.0])
        );
    }
    let mut pinned = tonic::Request::new(run("pinned"));
    pinned
        .metadata_mut()
        .insert("x-plinth-version", "2".parse().unwrap());
    let out = compute.compute(pinned).await.unwrap().into_inner();
    assert_eq!(
        (out.version.as_str(), f32_values(&out.outputs[0])),
        ("2", vec![3.0])
    );

    // An even split sends both versions traffic, deterministically by request id.
    install_plugin(
        srv.plugins.path(),
        "router",
        "weighted_router",
        Some("[config]\nweights = \"1=50,2=50\"\n"),
    );
    srv.wait_plugin("router", |s| serving(s) && s.calls == 0)
        .await;
    let mut seen = std::collections::BTreeSet::new();
    for idx in 0..40 {
        let out = compute
            .compute(run(&format!("split-{idx}")))
            .await
            .unwrap()
            .into_inner();
        let again = compute
            .compute(run(&format!("split-{idx}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            out.version, again.version,
            "the same id routes the same way"
        );
        seen.insert(out.version);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["1", "2"]);
}

#[tokio::test]
async fn plugins_are_added_replaced_and_removed_with_no_restart() {
    let srv = TestServer::start(affine_through(|c| c.postprocess(&["post"])), true).await;
    srv.wait_ready("affine").await;
    let mut compute = srv.compute().await;
    let row = [1.0f32, 2.0, 3.0, 4.0];
    let run = || compute_request("affine", vec![f32_tensor("x", &[1, 4], &row)]);

    let err = compute.compute(run()).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::Unavailable,
            "model 'affine': postprocess plugin 'post' is not loaded (no post.wasm in the plugin directory)"
        )
    );

    // Add.
    install_plugin(
        srv.plugins.path(),
        "post",
        "softmax_topk",
        Some("[config]\nk = 1\nsoftmax = false\n"),
    );
    let first = srv.wait_plugin("post", serving).await;
    assert_eq!(first.world, "processor-plugin");
    let out = compute.compute(run()).await.unwrap().into_inner();
    assert_eq!(out.outputs[0].name, "topk_indices");
    assert_eq!(out.outputs[0].shape, [1, 1]);

    // Replace the manifest: the plugin reloads with the new config.
    install_plugin(
        srv.plugins.path(),
        "post",
        "softmax_topk",
        Some("[config]\nk = 3\nsoftmax = false\n"),
    );
    srv.wait_plugin("post", |s| {
        serving(s) && s.loaded_at_us > first.loaded_at_us
    })
    .await;
    let out = compute.compute(run()).await.unwrap().into_inner();
    assert_eq!(out.outputs[0].shape, [1, 3]);

    // Replace the component with another processor (image-normalize passes f32 outputs through).
    install_plugin(srv.plugins.path(), "post", "image_normalize", None);
    let replaced = srv
        .wait_plugin("post", |s| serving(s) && s.file_hash != first.file_hash)
        .await;
    assert_eq!(replaced.world, "processor-plugin");
    let out = compute.compute(run()).await.unwrap().into_inner();
    assert_eq!(
        (out.outputs[0].name.as_str(), f32_values(&out.outputs[0])),
        ("y", affine_expected(&row).to_vec())
    );

    // Remove.
    std::fs::remove_file(srv.plugins.path().join("post.wasm")).unwrap();
    eventually(PATIENCE, "plugin 'post' to leave the list", async || {
        let listed = srv
            .plugin_api()
            .await
            .list_plugins(pb::ListPluginsRequest {})
            .await
            .unwrap()
            .into_inner();
        let names: Vec<String> = listed.plugins.into_iter().map(|p| p.name).collect();
        if names.iter().all(|name| name != "post") {
            Ok(())
        } else {
            Err(format!("listed: {names:?}"))
        }
    })
    .await;
    let err = compute.compute(run()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
}

#[tokio::test]
async fn hostile_plugins_are_contained_and_reported() {
    let srv = TestServer::start(
        |repo| {
            fixtures::scale(repo, "healthy", "1", 2.0);
            for (model, plugin) in [
                ("m_spin", "spin"),
                ("m_trap", "trap"),
                ("m_bomb", "bomb"),
                ("m_router", "router"),
            ] {
                fixtures::scale(repo, model, "1", 2.0);
                fixtures::scale_config()
                    .preprocess(&[plugin])
                    .write(repo, model);
            }
        },
        true,
    )
    .await;
    let dir = srv.plugins.path();
    install_plugin(
        dir,
        "spin",
        "hostile_spin",
        Some("[limits]\ndeadline_ms = 20\n"),
    );
    install_plugin(dir, "trap", "hostile_trap", None);
    install_plugin(
        dir,
        "bomb",
        "hostile_memory_bomb",
        Some("[limits]\nmemory_mib = 8\n"),
    );
    install_plugin(
        dir,
        "router",
        "weighted_router",
        Some("[config]\nweights.nothing = \"1=1\"\n"),
    );
    install_plugin(dir, "escape", "hostile_wasi_escape", None);
    for name in ["spin", "trap", "bomb", "router", "escape"] {
        srv.wait_plugin(name, serving).await;
    }
    for model in ["healthy", "m_spin", "m_trap", "m_bomb", "m_router"] {
        srv.wait_ready(model).await;
    }
    let mut compute = srv.compute().await;
    let x = || vec![f32_tensor("x", &[2], &[1.0, 2.0])];
    let healthy = |compute: &mut pb::compute_service_client::ComputeServiceClient<
        tonic::transport::Channel,
    >| {
        let mut compute = compute.clone();
        async move {
            let out = compute
                .compute(compute_request(
                    "healthy",
                    vec![f32_tensor("x", &[1], &[4.0])],
                ))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(f32_values(&out.outputs[0]), [8.0]);
        }
    };

    let cases: [(&str, Code, &str); 4] = [
        (
            "m_spin",
            Code::DeadlineExceeded,
            "plugin 'spin' (preprocess) exceeded its 20 ms deadline",
        ),
        (
            "m_trap",
            Code::Internal,
            "internal error: plugin 'trap' (preprocess) trapped: plugin panicked at",
        ),
        (
            "m_bomb",
            Code::ResourceExhausted,
            "plugin 'bomb' (preprocess) exceeded its 8 MiB memory cap",
        ),
        (
            "m_router",
            Code::FailedPrecondition,
            "plugin 'router' implements router-plugin, not processor-plugin",
        ),
    ];
    for (model, code, prefix) in cases {
        // Twice: the instance that failed is discarded and a fresh one fails the same way.
        for _ in 0..2 {
            let err = compute
                .compute(compute_request(model, x()))
                .await
                .unwrap_err();
            assert_eq!(err.code(), code, "{model}: {err:?}");
            assert!(
                err.message().starts_with(prefix),
                "{model}: {:?} should start with {prefix:?}",
                err.message()
            );
            healthy(&mut compute).await;
        }
    }
    let spin = srv.wait_plugin("spin", |_| true).await;
    assert_eq!(spin.errors, 2);
    assert_eq!(spin.last_error, "exceeded its 20 ms deadline");
    // /metrics counts each failure under its cause.
    let metrics = metrics_containing(
        &srv,
        &[
            "plinth_plugin_failures_total{plugin=\"spin\",cause=\"timeout\"} 2\n",
            "plinth_plugin_failures_total{plugin=\"spin\",cause=\"trap\"} 0\n",
            "plinth_plugin_failures_total{plugin=\"bomb\",cause=\"trap\"} 0\n",
        ],
    )
    .await;
    for (plugin, cause) in [("trap", "trap"), ("bomb", "memory")] {
        let series =
            format!("plinth_plugin_failures_total{{plugin=\"{plugin}\",cause=\"{cause}\"}} ");
        let count: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} in\n{metrics}"));
        assert!(count >= 1, "{series}{count}");
    }

    // No WASI capability was granted: every probe of the filesystem, the
    // environment and the network is denied.
    let escape = srv
        .running()
        .plugins
        .get("escape")
        .unwrap()
        .into_kind::<plinth::plugin::kind::Processor>()
        .unwrap();
    let report = tokio::task::spawn_blocking(move || {
        escape.process(
            plinth::plugin::Stage::Pre,
            &plinth::plugin::RequestView::default(),
            Vec::new(),
        )
    })
    .await
    .unwrap()
    .expect("the escape attempt is contained, not a sandbox escape");
    let mut lines = Vec::new();
    let mut data = report[0].data().as_ref();
    while data.len() >= 4 {
        let len = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
        lines.push(String::from_utf8_lossy(&data[4..4 + len]).into_owned());
        data = &data[4 + len..];
    }
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert!(
        lines.iter().all(|line| line.contains(": denied")),
        "{lines:?}"
    );

    // Files that must be refused, each leaving what served before.
    install_plugin(dir, "victim", "softmax_topk", None);
    let before = srv.wait_plugin("victim", serving).await;
    type Refusal<'a> = (&'a str, Box<dyn Fn() + 'a>, &'a str);
    let refusals: [Refusal; 4] = [
        (
            "garbage",
            Box::new(|| {
                std::fs::write(
                    dir.join("victim.wasm"),
                    b"\0asm garbage that is not a component",
                )
                .unwrap()
            }),
            "not a valid WebAssembly component",
        ),
        (
            "truncated",
            Box::new(|| {
                let bytes = std::fs::read(plinth_tests::plugin_wasm("softmax_topk")).unwrap();
                std::fs::write(dir.join("victim.wasm"), &bytes[..bytes.len() / 2]).unwrap();
            }),
            "not a valid WebAssembly component",
        ),
        (
            "wrong world",
            Box::new(|| install_plugin(dir, "victim", "weighted_router", None)),
            "is a router-plugin, but 'victim' is serving as a processor-plugin",
        ),
        (
            "wrong version",
            Box::new(|| install_plugin(dir, "victim", "hostile_version_mismatch", None)),
            "built against plinth:plugin@1.0.0, but this host speaks plinth:plugin@0.1.1",
        ),
    ];
    for (what, write, reason) in refusals {
        write();
        let status = srv
            .wait_plugin("victim", |s| !s.load_error.is_empty())
            .await;
        assert!(
            status.load_error.contains(reason),
            "{what}: {}",
            status.load_error
        );
        assert!(status.serving, "{what}: the previous version keeps serving");
        assert_eq!(status.file_hash, before.file_hash, "{what}");
        healthy(&mut compute).await;
        // Put the good file back, and wait until it is serving again.
        install_plugin(dir, "victim", "softmax_topk", None);
        srv.wait_plugin("victim", |s| s.load_error.is_empty()).await;
    }
    let listed = srv
        .plugin_api()
        .await
        .list_plugins(pb::ListPluginsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.load_failures >= 4, "{}", listed.load_failures);
    let (_, metrics) = srv.metrics().await;
    assert!(
        metrics.contains("plinth_plugin_errors_total{plugin=\"spin\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_plugin_swapped_twenty_times_under_load_fails_no_request() {
    let srv = TestServer::start(affine_through(|c| c.postprocess(&["post"])), true).await;
    install_plugin(
        srv.plugins.path(),
        "post",
        "softmax_topk",
        Some("[config]\nk = 1\n"),
    );
    let mut last = srv.wait_plugin("post", serving).await;
    srv.wait_ready("affine").await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut compute = srv.compute().await;
        let stop = std::sync::Arc::clone(&stop);
        let done = std::sync::Arc::clone(&done);
        clients.push(tokio::spawn(async move {
            let mut n_ok = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = compute
                    .compute(compute_request(
                        "affine",
                        vec![f32_tensor("x", &[1, 4], &[1.0, 2.0, 3.0, 4.0])],
                    ))
                    .await
                    .expect("no request fails during swaps");
                assert_eq!(out.into_inner().outputs[0].name, "topk_indices");
                n_ok += 1;
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            n_ok
        }));
    }
    for swap in 0..20 {
        // Load between every two swaps: one more request finishes first.
        let before = done.load(std::sync::atomic::Ordering::Relaxed);
        eventually(
            PATIENCE,
            "a request to finish before the swap",
            async || {
                let now = done.load(std::sync::atomic::Ordering::Relaxed);
                if now > before {
                    Ok(())
                } else {
                    Err(format!("{now} requests done"))
                }
            },
        )
        .await;
        // Each manifest differs from the one before, so every write is a real swap.
        let k = 2 + swap % 3;
        install_plugin(
            srv.plugins.path(),
            "post",
            "softmax_topk",
            Some(&format!("[config]\nk = {k}\n")),
        );
        last = srv
            .wait_plugin("post", |s| serving(s) && s.loaded_at_us > last.loaded_at_us)
            .await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        total += client.await.expect("client task");
    }
    assert_eq!(total, done.load(std::sync::atomic::Ordering::Relaxed));
    assert!(total >= 20, "{total} requests ran across 20 swaps");
}

#[tokio::test]
async fn metrics_plugins_count_requests_and_keep_counters_across_a_reload() {
    let srv = TestServer::start(|repo| fixtures::scale(repo, "scale", "1", 2.0), true).await;
    install_plugin(srv.plugins.path(), "metrics", "prometheus_metrics", None);
    let first = srv.wait_plugin("metrics", serving).await;
    srv.wait_ready("scale").await;
    let mut compute = srv.compute().await;
    for _ in 0..3 {
        compute
            .compute(compute_request(
                "scale",
                vec![f32_tensor("x", &[1], &[1.0])],
            ))
            .await
            .unwrap();
    }
    // A shape the model refuses: no version was chosen for it.
    let err = compute
        .compute(compute_request(
            "scale",
            vec![f32_tensor("x", &[1, 1], &[1.0])],
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::InvalidArgument,
            "model 'scale': input 'x': expected shape [-1], got [1, 1]"
        )
    );
    let ok_line = "plinth_requests_total{model=\"scale\",version=\"1\",status=\"ok\"} 3";
    let bad_line = "plinth_requests_total{model=\"scale\",version=\"\",status=\"invalid_input\"} 1";
    let metrics = metrics_containing(&srv, &[ok_line, bad_line]).await;
    assert!(
        metrics.contains(
            "plinth_request_duration_seconds_bucket{model=\"scale\",version=\"1\",stage=\"compute\""
        ),
        "{metrics}"
    );

    // Reload the plugin (same file, new manifest): the counters carry over.
    install_plugin(
        srv.plugins.path(),
        "metrics",
        "prometheus_metrics",
        Some("[config]\nprefix = \"plinth\"\n"),
    );
    srv.wait_plugin("metrics", |s| {
        serving(s) && s.loaded_at_us > first.loaded_at_us
    })
    .await;
    compute
        .compute(compute_request(
            "scale",
            vec![f32_tensor("x", &[1], &[1.0])],
        ))
        .await
        .unwrap();
    metrics_containing(
        &srv,
        &["plinth_requests_total{model=\"scale\",version=\"1\",status=\"ok\"} 4"],
    )
    .await;
}

/// Polls /metrics until it holds every one of `lines`, and returns the text.
pub(crate) async fn metrics_containing(srv: &TestServer, lines: &[&str]) -> String {
    let what = format!("/metrics to contain {lines:?}");
    eventually(PATIENCE, &what, async || {
        let (code, text) = srv.metrics().await;
        assert_eq!(code, 200, "{text}");
        if lines.iter().all(|line| text.contains(line)) {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await
}

/// Polls /v2/health/ready until it answers `code`, and returns the body.
pub(crate) async fn readiness_becomes(srv: &TestServer, code: u16) -> String {
    let what = format!("/v2/health/ready to answer {code}");
    eventually(PATIENCE, &what, async || {
        let (got, body) = srv.http_get("/v2/health/ready").await;
        if got == code {
            Ok(body)
        } else {
            Err(format!("{got} {body:?}"))
        }
    })
    .await
}

#[tokio::test]
async fn a_health_plugin_gates_readiness() {
    let srv = TestServer::start(
        |repo| {
            fixtures::scale(repo, "needed", "1", 2.0);
            fixtures::scale(repo, "other", "1", 2.0);
        },
        false,
    )
    .await;
    srv.load("other").await.unwrap();
    // Without health plugins: ready once startup is done.
    readiness_becomes(&srv, 200).await;
    install_plugin(
        srv.plugins.path(),
        "health",
        "basic_health",
        Some("[config]\nmodels = \"needed\"\n"),
    );
    srv.wait_plugin("health", serving).await;
    let body = readiness_becomes(&srv, 503).await;
    assert!(body.starts_with("health: "), "{body}");
    assert!(body.contains("needed"), "{body}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(srv.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );

    // Loading the required model turns readiness on, without waiting for the timer.
    srv.load("needed").await.unwrap();
    readiness_becomes(&srv, 200).await;
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn the_plugin_service_lists_gets_and_reloads() {
    let srv = TestServer::start_with(|_| {}, |config| config.watch_plugins = false).await;
    let mut api = srv.plugin_api().await;
    assert!(
        api.list_plugins(pb::ListPluginsRequest {})
            .await
            .unwrap()
            .into_inner()
            .plugins
            .is_empty()
    );
    // With the watcher off, a new file is picked up by an explicit reload.
    install_plugin(srv.plugins.path(), "topk", "softmax_topk", None);
    let reloaded = api
        .reload_plugins(pb::ReloadPluginsRequest {
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reloaded.plugins.len(), 1);
    let topk = &reloaded.plugins[0];
    assert_eq!(
        (topk.name.as_str(), topk.world.as_str(), topk.serving),
        ("topk", "processor-plugin", true)
    );
    assert_eq!(topk.file_hash.len(), 64);
    assert!(!topk.version.is_empty() && !topk.description.is_empty());
    let got = api
        .get_plugin(pb::GetPluginRequest {
            name: "topk".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.file_hash, topk.file_hash);
    let err = api
        .get_plugin(pb::GetPluginRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::NotFound,
            "plugin 'nope' is not in the plugin directory"
        )
    );
    let err = api
        .reload_plugins(pb::ReloadPluginsRequest {
            name: "../x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// A guest that dies the way a non-Rust one does (its error written to
/// stderr, then an abort, no panic hook): the call fails with a precise
/// error and the host serves on; with `on_error = "skip"` the request goes
/// on without the plugin, and the skip is counted. What it wrote to stdout
/// during the call reaches the log, and its stderr reaches the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guests_stderr_reaches_the_report_and_on_error_skip_fails_open() {
    let srv = TestServer::start(
        |repo| {
            fixtures::affine(repo, "affine", 4);
            fixtures::affine_config(4)
                .preprocess(&["strict"])
                .write(repo, "affine");
            fixtures::affine(repo, "lenient", 4);
            fixtures::affine_config(4)
                .preprocess(&["open"])
                .write(repo, "lenient");
        },
        true,
    )
    .await;
    install_plugin(
        srv.plugins.path(),
        "strict",
        "hostile_trap",
        Some("[config]\ntrap-in = \"abort\"\n"),
    );
    install_plugin(
        srv.plugins.path(),
        "open",
        "hostile_trap",
        Some("on_error = \"skip\"\n[config]\ntrap-in = \"abort\"\n"),
    );
    srv.wait_plugin("strict", serving).await;
    srv.wait_plugin("open", serving).await;
    srv.wait_ready("affine").await;
    srv.wait_ready("lenient").await;
    let mut compute = srv.compute().await;
    let row = [1.0f32, 2.0, 3.0, 4.0];

    let err = compute
        .compute(compute_request(
            "affine",
            vec![f32_tensor("x", &[1, 4], &row)],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        err.message()
            .contains("plugin 'strict' (preprocess) trapped")
            && err.message().contains(
                "the guest's stderr ended: Traceback (most recent call last): | ValueError: hostile-trap: deliberate abort in preprocess"
            ),
        "{err:?}"
    );
    let strict = srv.wait_plugin("strict", |s| s.errors >= 1).await;
    assert!(
        strict.last_error.contains("ValueError: hostile-trap"),
        "{strict:?}"
    );
    assert_eq!(strict.skips, 0);

    let out = compute
        .compute(compute_request(
            "lenient",
            vec![f32_tensor("x", &[1, 4], &row)],
        ))
        .await
        .expect("the failing plugin is skipped")
        .into_inner();
    assert_eq!(f32_values(&out.outputs[0]), affine_expected(&row).to_vec());
    let open = srv.wait_plugin("open", |s| s.skips >= 1).await;
    assert_eq!(open.errors, 1, "{open:?}");
    // Contained: the strict model keeps failing cleanly, others serve.
    let again = compute
        .compute(compute_request(
            "affine",
            vec![f32_tensor("x", &[1, 4], &row)],
        ))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::Internal, "{again:?}");
    srv.stop().await;
}

/// A named pipe: a read of it blocks until the test writes. If the test
/// ends first, dropping it releases a reader still waiting (it reads an
/// empty file), so no blocking thread outlives the test.
struct Fifo(std::path::PathBuf);

impl Fifo {
    fn new(path: std::path::PathBuf) -> Fifo {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo {}", path.display());
        Fifo(path)
    }

    /// Writes `bytes` to the reader (blocking until there is one).
    async fn feed(&self, bytes: Vec<u8>) {
        let path = self.0.clone();
        tokio::time::timeout(
            PATIENCE,
            tokio::task::spawn_blocking(move || std::fs::write(path, bytes)),
        )
        .await
        .expect("a reader takes the bytes within PATIENCE")
        .unwrap()
        .unwrap();
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        use std::os::unix::fs::OpenOptionsExt;
        // Non-blocking: opens only if a reader waits, which then sees EOF.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.0);
    }
}

/// Plugins present at startup load in the background: the server answers
/// while one is still being read (a named pipe holds it there), reports it
/// as compiling, refuses requests that need it (UNAVAILABLE naming it, and
/// a router is never routed around), and turns ready once it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_plugins_load_in_the_background_and_requests_wait_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let post = Fifo::new(dir.path().join("post.wasm"));
    let router = Fifo::new(dir.path().join("router.wasm"));
    std::fs::write(
        dir.path().join("post.toml"),
        "[config]\nk = 1\nsoftmax = false\n",
    )
    .unwrap();
    let plugin_dir = dir.path().to_path_buf();
    let srv = TestServer::start_with(affine_through(|c| c.postprocess(&["post"])), |config| {
        config.plugin_dir = plugin_dir
    })
    .await;
    // start() returned with both files unread: the ports answer.
    srv.wait_ready("affine").await;
    let listed = srv
        .plugin_api()
        .await
        .list_plugins(pb::ListPluginsRequest {})
        .await
        .unwrap()
        .into_inner()
        .plugins;
    let compiling: Vec<&str> = listed
        .iter()
        .filter(|p| p.compiling)
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(compiling, ["post", "router"], "{listed:?}");
    assert_eq!(srv.http_get("/v2/health/ready").await.0, 503);
    let mut compute = srv.compute().await;
    let row = [1.0f32, 2.0, 3.0, 4.0];
    let run = || compute_request("affine", vec![f32_tensor("x", &[1, 4], &row)]);
    let err = compute.compute(run()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("is loading and may be a router"),
        "a plugin that may be a router is not routed around: {err:?}"
    );

    // The router arrives (the weighted router with no weights passes requests on).
    router
        .feed(std::fs::read(plinth_tests::plugin_wasm("weighted_router")).unwrap())
        .await;
    srv.wait_plugin("router", serving).await;
    let err = compute.compute(run()).await.unwrap_err();
    assert!(
        err.message()
            .contains("postprocess plugin 'post' is compiling"),
        "{err:?}"
    );
    assert_eq!(srv.http_get("/v2/health/ready").await.0, 503);

    post.feed(std::fs::read(plinth_tests::plugin_wasm("softmax_topk")).unwrap())
        .await;
    srv.wait_plugin("post", serving).await;
    let out = compute.compute(run()).await.unwrap().into_inner();
    assert_eq!(out.outputs[0].name, "topk_indices");
    eventually(
        PATIENCE,
        "readiness once the startup plugins serve",
        async || {
            let (code, body) = srv.http_get("/v2/health/ready").await;
            if code == 200 {
                Ok(())
            } else {
                Err(format!("{code} {body}"))
            }
        },
    )
    .await;
    let info = srv.info().await;
    assert!(info.plugin_cache_bytes > 0, "{info:?}");
    srv.stop().await;
}

/// The Python example (plugins/image-normalize-py, built with
/// componentize-py) in a running server beside the Rust plugin it ports:
/// the same image through each gives the same bits, and the numbers the
/// test computes itself; its refusal is precise; a new manifest hot-reloads
/// it; and a guest whose heap creeps up over many large calls is recycled
/// below its memory cap rather than failing a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_processor_matches_the_rust_one_bit_for_bit_and_hot_reloads() {
    let identity = |repo: &std::path::Path, model: &str, plugin: &str| {
        fixtures::config()
            .max_batch_size(4)
            .preprocess(&[plugin])
            .input("image", "f32", &[3, -1, -1])
            .output("y", "f32", &[3, -1, -1])
            .write(repo, model);
        plinth_torch::trace::save(
            &plinth_tests::model_file(repo, model, "1"),
            &[plinth_torch::trace::TchTensor::zeros(
                [1, 3, 4, 5],
                (
                    plinth_torch::trace::Kind::Float,
                    plinth_torch::trace::Device::Cpu,
                ),
            )],
            |xs| vec![&xs[0] * 1.0],
        )
        .unwrap();
    };
    let srv = TestServer::start(
        |repo| {
            identity(repo, "py", "norm_py");
            identity(repo, "rs", "norm_rs");
        },
        true,
    )
    .await;
    let config = "[config]\nmean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\n";
    install_plugin(
        srv.plugins.path(),
        "norm_rs",
        "image_normalize",
        Some(config),
    );
    install_plugin(
        srv.plugins.path(),
        "norm_py",
        "image_normalize_py",
        Some(&format!("[limits]\ndeadline_ms = 2000\n{config}")),
    );
    srv.wait_plugin("norm_rs", serving).await;
    srv.wait_plugin("norm_py", serving).await;
    srv.wait_ready("py").await;
    srv.wait_ready("rs").await;

    // Two NHWC images of 4×5 pixels.
    let (n, h, w, c) = (2usize, 4usize, 5usize, 3usize);
    let pixels: Vec<u8> = (0..n * h * w * c).map(|i| (i * 37 % 256) as u8).collect();
    let image = |pixels: &[u8], shape: Vec<i64>| pb::Tensor {
        name: "image".into(),
        dtype: pb::DataType::Uint8 as i32,
        shape,
        data: pixels.to_vec().into(),
    };
    let nhwc = || image(&pixels, vec![n as i64, h as i64, w as i64, c as i64]);
    let mut compute = srv.compute().await;
    let mut run = async |model: &str, tensor: pb::Tensor| {
        compute
            .compute(compute_request(model, vec![tensor]))
            .await
            .map(|r| r.into_inner())
    };
    let py = run("py", nhwc()).await.expect("python").outputs.remove(0);
    let rs = run("rs", nhwc()).await.expect("rust").outputs.remove(0);
    assert_eq!(py.shape, [2, 3, 4, 5]);
    assert_eq!(py.shape, rs.shape);
    assert_eq!(py.data, rs.data, "the same bits from Python and Rust");
    // And the numbers themselves, in single precision as both compute them.
    let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
    let mut expected = Vec::new();
    for img in 0..n {
        for ch in 0..c {
            let gain = (1.0f32 / 255.0) / std[ch];
            let offset = -mean[ch] / std[ch];
            for pixel in 0..h * w {
                let p = pixels[(img * h * w + pixel) * c + ch];
                expected.push(f32::from(p) * gain + offset);
            }
        }
    }
    assert_eq!(f32_values(&py), expected);

    // Its refusal names the tensor, with expected against got.
    let err = run("py", image(&[0u8; 8], vec![1, 2, 2, 2]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        err.message(),
        "plugin 'norm_py' (preprocess) invalid input: tensor `image`: shape [1, 2, 2, 2] has 2 channels, config `mean` has 3 values"
    );

    // A new manifest reloads it: raw pixel values now.
    install_plugin(
        srv.plugins.path(),
        "norm_py",
        "image_normalize_py",
        Some("[limits]\ndeadline_ms = 2000\n[config]\nscale = 1\n"),
    );
    let raw: Vec<f32> = expected
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let (img, rest) = (i / (c * h * w), i % (c * h * w));
            let (ch, pixel) = (rest / (h * w), rest % (h * w));
            f32::from(pixels[(img * h * w + pixel) * c + ch])
        })
        .collect();
    eventually(
        PATIENCE,
        "norm_py reloaded with scale = 1",
        async || match run("py", nhwc()).await {
            Ok(out) if f32_values(&out.outputs[0]) == raw => Ok(()),
            other => Err(format!("{:?}", other.map(|o| o.outputs[0].shape.clone()))),
        },
    )
    .await;

    // ImageNet-sized images, many times: the guest's heap creeps up, and
    // the instance is let go at its high-water mark while every request
    // succeeds.
    let errors_before = srv.wait_plugin("norm_py", |_| true).await.errors;
    let side = 224usize;
    let large: Vec<u8> = (0..side * side * 3).map(|i| (i % 251) as u8).collect();
    let mut calls = 0;
    let recycled = loop {
        calls += 1;
        let out = run("py", image(&large, vec![1, side as i64, side as i64, 3]))
            .await
            .unwrap_or_else(|err| panic!("call {calls} failed: {err:?}"));
        assert_eq!(out.outputs[0].shape, [1, 3, side as i64, side as i64]);
        let status = srv.wait_plugin("norm_py", |_| true).await;
        if status.recycled > 0 || calls == 400 {
            break status.recycled;
        }
    };
    assert!(recycled >= 1, "no instance recycled in {calls} large calls");
    println!("norm_py: an instance recycled after {calls} calls with a 224x224 image");
    let status = srv.wait_plugin("norm_py", |_| true).await;
    assert_eq!(status.errors, errors_before, "no call failed: {status:?}");
}

/// A plugin granted a directory reads it during a call. (wasmtime-wasi runs
/// file system calls through `Handle::block_on`, which a tokio worker
/// refuses; such plugins' calls run in `block_in_place`.) The probe plugin
/// reports what it could do as an error, so that the report reaches the
/// client: the granted file was read, and nothing outside the grant was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_granted_a_directory_reads_it_during_a_call() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("hello.txt"), b"hello").unwrap();
    let srv = TestServer::start(affine_through(|c| c.preprocess(&["granted"])), true).await;
    install_plugin(
        srv.plugins.path(),
        "granted",
        "hostile_wasi_escape",
        Some(&format!(
            "[config]\npath = \"/data/hello.txt\"\n[capabilities]\ndirs = [{{ host = \"{}\", guest = \"/data\", read_only = true }}]\n",
            data.path().display()
        )),
    );
    srv.wait_plugin("granted", serving).await;
    srv.wait_ready("affine").await;
    let mut compute = srv.compute().await;
    // Twice: the first call may make the instance (its `init` too), the
    // second runs on a pooled one.
    for _ in 0..2 {
        let err = compute
            .compute(compute_request(
                "affine",
                vec![f32_tensor("x", &[1, 4], &[1.0, 2.0, 3.0, 4.0])],
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{err:?}");
        let message = err.message();
        assert!(
            message.contains("read file /data/hello.txt: ALLOWED (5 bytes)"),
            "{message}"
        );
        assert!(!message.contains("list directory /: ALLOWED"), "{message}");
        assert!(!message.contains("panicked"), "{message}");
    }
}
