//! Traffic mirroring (WIT 0.1.1): the real `weighted-router` names shadow
//! models, the host runs each routed request on them off the response path,
//! and the real `prometheus-metrics` counts how the mirrors went and
//! whether they agreed with the primary.

use plinth::grpc::{ipb, pb};
use plinth_tests::fixtures;
use plinth_tests::{TestServer, compute_request, f32_tensor, f32_values, install_plugin};
use serde_json::json;

use super::plugins::metrics_containing;

fn serving(status: &pb::PluginStatus) -> bool {
    status.serving && status.load_error.is_empty()
}

#[tokio::test]
async fn routed_requests_run_on_their_mirrors_and_agreement_is_counted() {
    let srv = TestServer::start(
        |repo| {
            fixtures::scale(repo, "m", "1", 2.0);
            // Agrees with `m`; disagrees by a quarter of each element.
            fixtures::scale(repo, "shadow", "1", 2.0);
            fixtures::scale(repo, "drift", "1", 2.5);
        },
        true,
    )
    .await;
    // `absent` does not exist: its mirrored runs fail, the primary's never.
    install_plugin(
        srv.plugins.path(),
        "router",
        "weighted_router",
        Some("[config]\nmirror.m = \"shadow, drift, absent\"\nmirror-tolerance = 0.001\n"),
    );
    install_plugin(srv.plugins.path(), "metrics", "prometheus_metrics", None);
    for name in ["router", "metrics"] {
        srv.wait_plugin(name, serving).await;
    }
    for model in ["m", "shadow", "drift"] {
        srv.wait_ready(model).await;
    }

    // One request over each API; each answers with the primary's outputs.
    let mut compute = srv.compute().await;
    let response = compute
        .compute(compute_request(
            "m",
            vec![f32_tensor("x", &[3], &[1.0, 2.0, 3.0])],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_values(&response.outputs[0]), [2.0, 4.0, 6.0]);

    let response = srv
        .inference()
        .await
        .model_infer(ipb::ModelInferRequest {
            model_name: "m".into(),
            id: "oip-1".into(),
            inputs: vec![ipb::model_infer_request::InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![1],
                contents: Some(ipb::InferTensorContents {
                    fp32_contents: vec![4.0],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.model_name, "m");
    assert_eq!(response.raw_output_contents[0].as_ref(), 8f32.to_le_bytes());

    let body =
        json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [0.5, 1.0]}]})
            .to_string();
    let (code, text) = srv
        .http_post("/v2/models/m/infer", &[], body.as_bytes())
        .await;
    assert_eq!(code, 200, "{text}");
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["outputs"][0]["data"], json!([1.0, 2.0]));

    // The plugin's counters and the host's agree: three mirrored runs per
    // target, the shadow agreeing, the drifting model not, the absent one
    // failing with NOT_FOUND.
    let metrics = metrics_containing(
        &srv,
        &[
            "plinth_mirror_requests_total{primary=\"m\",model=\"shadow\",status=\"ok\"} 3\n",
            "plinth_mirror_requests_total{primary=\"m\",model=\"drift\",status=\"ok\"} 3\n",
            "plinth_mirror_requests_total{primary=\"m\",model=\"absent\",status=\"not_found\"} 3\n",
            "plinth_mirror_agreement_total{primary=\"m\",model=\"shadow\",result=\"agree\"} 3\n",
            "plinth_mirror_agreement_total{primary=\"m\",model=\"drift\",result=\"disagree\"} 3\n",
            "plinth_mirror_runs_total{result=\"ok\"} 6\n",
            "plinth_mirror_runs_total{result=\"failed\"} 3\n",
            "plinth_mirror_runs_total{result=\"dropped\"} 0\n",
            "plinth_mirror_comparisons_total{result=\"agree\"} 3\n",
            "plinth_mirror_comparisons_total{result=\"disagree\"} 3\n",
        ],
    )
    .await;
    // The plugin's series and the host's, both present: no name twice.
    super::serving_metrics::assert_no_name_declared_twice(&metrics);
    assert!(
        !metrics.contains("model=\"absent\",result="),
        "a failed mirror neither agrees nor disagrees:\n{metrics}"
    );
    // The request counters count client requests only: the primary's
    // three, and no mirrored run as a request of its target (those are the
    // mirror counters above). (Mirrored runs were once counted as client
    // requests of the target.)
    let metrics = metrics_containing(
        &srv,
        &["plinth_requests_total{model=\"m\",version=\"1\",status=\"ok\"} 3\n"],
    )
    .await;
    for target in ["shadow", "drift", "absent"] {
        assert!(
            !metrics.contains(&format!("plinth_requests_total{{model=\"{target}\"")),
            "mirrored runs of {target} counted as client requests:\n{metrics}"
        );
    }
    // Mirrored runs are real work of the shadow models, in their own
    // OIP statistics; the primary counts only the clients' three.
    assert_eq!(srv.model_stats("shadow").await.inference_count, 3);
    assert_eq!(srv.model_stats("drift").await.inference_count, 3);
    assert_eq!(srv.model_stats("m").await.inference_count, 3);
    srv.stop().await;
}

/// The mirror's deadline bounds plain models too (a stuck target gives its
/// slot back: the run fails as DEADLINE_EXCEEDED), and a mirrored run never
/// loads an on-demand model, so it cannot evict the primary's idle models.
/// (A stuck plain target once held a slot with no deadline, and mirrors
/// loaded on-demand targets.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_are_bounded_and_never_load_on_demand_models() {
    let srv = TestServer::start_with(
        |repo| {
            fixtures::scale(repo, "m", "1", 2.0);
            // Takes far longer than the mirror timeout below.
            fixtures::slow(repo, "stuck", 800);
            fixtures::scale(repo, "lazy", "1", 3.0);
            fixtures::scale_config()
                .residency("on-demand")
                .write(repo, "lazy");
        },
        |config| {
            config.load_all = true;
            config.mirror_timeout = std::time::Duration::from_millis(50);
        },
    )
    .await;
    install_plugin(
        srv.plugins.path(),
        "router",
        "weighted_router",
        Some("[config]\nmirror.m = \"stuck, lazy\"\n"),
    );
    install_plugin(srv.plugins.path(), "metrics", "prometheus_metrics", None);
    for name in ["router", "metrics"] {
        srv.wait_plugin(name, serving).await;
    }
    for model in ["m", "stuck"] {
        srv.wait_ready(model).await;
    }
    let mut compute = srv.compute().await;
    let response = compute
        .compute(compute_request(
            "m",
            vec![f32_tensor("x", &[3], &[1.0, 2.0, 3.0])],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_values(&response.outputs[0]), [2.0, 4.0, 6.0]);
    metrics_containing(
        &srv,
        &[
            "plinth_mirror_requests_total{primary=\"m\",model=\"stuck\",status=\"deadline_exceeded\"} 1\n",
            "plinth_mirror_requests_total{primary=\"m\",model=\"lazy\",status=\"unavailable\"} 1\n",
            "plinth_mirror_runs_total{result=\"failed\"} 2\n",
            "plinth_mirror_runs_total{result=\"ok\"} 0\n",
        ],
    )
    .await;
    // The on-demand target was not loaded for a mirror.
    let lazy = srv.status("lazy").await;
    assert_eq!(lazy.state(), pb::ModelState::Unavailable, "{lazy:?}");
    let residency = srv.info().await.residency.unwrap();
    assert_eq!(residency.on_demand_loads, 0, "{residency:?}");
    srv.stop().await;
}
