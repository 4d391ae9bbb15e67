//! The host's own serving series on `/metrics`: queue and in-flight gauges
//! that autoscalers scale on, and the histograms and counters of what ran.
//! Names never collide with a metrics plugin's.

use std::collections::BTreeSet;

use plinth_tests::{PATIENCE, compute_request, eventually, f32_tensor, install_plugin};

use super::batching::gathering_scale;
use super::plugins::metrics_containing;

/// The value of the sample `series` (name and labels, exactly) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_gauges_rise_while_requests_wait_and_fall_after() {
    // A batch of four runs only once it is full: three requests wait.
    let srv = gathering_scale(4).await;
    let request = || compute_request("scale", vec![f32_tensor("x", &[1, 2], &[1.0, 2.0])]);
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let mut client = srv.compute().await;
        let request = request();
        waiting.push(tokio::spawn(async move { client.compute(request).await }));
    }
    let queued = "plinth_model_queue_requests{model=\"scale\",version=\"1\"}";
    let in_flight = "plinth_model_inflight_requests{model=\"scale\"}";
    eventually(
        PATIENCE,
        "three requests counted as queued and in flight",
        async || {
            let (_, text) = srv.metrics().await;
            match (sample(&text, queued), sample(&text, in_flight)) {
                (Some(3.0), Some(3.0)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    // The fourth fills the batch; all four run as one forward pass.
    srv.compute().await.compute(request()).await.unwrap();
    for call in waiting {
        call.await.unwrap().unwrap();
    }
    let text = metrics_containing(
        &srv,
        &[
            "plinth_model_queue_requests{model=\"scale\",version=\"1\"} 0",
            "plinth_model_inflight_requests{model=\"scale\"} 0",
        ],
    )
    .await;
    let labels = "{model=\"scale\",version=\"1\"}";
    for (series, want) in [
        (
            format!("plinth_model_queue_duration_seconds_count{labels}"),
            4.0,
        ),
        (
            format!("plinth_model_compute_duration_seconds_count{labels}"),
            4.0,
        ),
        // One pass, of four rows.
        (format!("plinth_model_batch_rows_count{labels}"), 1.0),
        (format!("plinth_model_batch_rows_sum{labels}"), 4.0),
        (
            "plinth_model_requests_total{model=\"scale\",version=\"1\",status=\"success\"}".into(),
            4.0,
        ),
    ] {
        assert_eq!(sample(&text, &series), Some(want), "{series} in\n{text}");
    }
    assert!(
        sample(
            &text,
            "plinth_model_batch_rows_bucket{le=\"2.0\",model=\"scale\",version=\"1\"}"
        ) == Some(0.0)
            && sample(
                &text,
                "plinth_model_batch_rows_bucket{le=\"4.0\",model=\"scale\",version=\"1\"}"
            ) == Some(1.0),
        "{text}"
    );
    srv.stop().await;
}

/// The names of the series (without a histogram's or counter's suffixes)
/// that `text` declares with `# TYPE`.
fn declared(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(|name| name.trim_end_matches("_total").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hosts_series_never_collide_with_the_metrics_plugins() {
    let srv = gathering_scale(1).await;
    install_plugin(srv.plugins.path(), "metrics", "prometheus_metrics", None);
    srv.wait_plugin("metrics", |s| s.serving && s.load_error.is_empty())
        .await;
    srv.compute()
        .await
        .compute(compute_request(
            "scale",
            vec![f32_tensor("x", &[1, 2], &[1.0, 2.0])],
        ))
        .await
        .unwrap();
    // The plugin's own text, and the host's, each declared once.
    let text = metrics_containing(
        &srv,
        &["plinth_requests_total{", "plinth_model_requests_total{"],
    )
    .await;
    let host_start = text
        .find("# HELP plinth_model_queue_duration_seconds")
        .expect("the host's series follow the plugins'");
    let (plugins, host) = text.split_at(host_start);
    let (plugin_names, host_names) = (declared(plugins), declared(host));
    assert!(!plugin_names.is_empty() && !host_names.is_empty(), "{text}");
    let both: Vec<&String> = plugin_names.intersection(&host_names).collect();
    assert!(
        both.is_empty(),
        "declared by the plugin and the host: {both:?}"
    );
    assert_no_name_declared_twice(&text);
    srv.stop().await;
}

/// No series name (a counter's without `_total`) is declared twice in a
/// whole `/metrics` text: the plugins' and the host's never collide.
pub(crate) fn assert_no_name_declared_twice(text: &str) {
    let mut seen = BTreeSet::new();
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        let name = name.trim_end_matches("_total").to_owned();
        assert!(
            seen.insert(name.clone()),
            "{name} declared twice in\n{text}"
        );
    }
}
