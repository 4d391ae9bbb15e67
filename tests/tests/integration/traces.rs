//! OpenTelemetry traces, received by a real OTLP collector in the test
//! process (`plinth_tests::otlp`): the spans of a request through router,
//! processors, queue and forward; an orchestrator's nested calls; one
//! forward span for a batch, linked to each request; sampling; and a dead
//! collector, which fails nothing and is counted.

use std::collections::BTreeSet;
use std::time::Duration;

use plinth::grpc::pb;
use plinth::telemetry::{SamplerChoice, TracingConfig};
use plinth_tests::otlp::{OtlpReceiver, Span, tracing_to};
use plinth_tests::{
    PATIENCE, TestServer, compute_request, eventually, f32_tensor, f32_values, fixtures,
    install_plugin,
};

use super::batching::batching_scale;
use super::plugins::metrics_containing;

fn serving(status: &pb::PluginStatus) -> bool {
    status.serving && status.load_error.is_empty()
}

/// A compute request carrying `traceparent` for `trace_id` (sampled).
fn traced<T>(message: T, trace_id: &str, parent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent}-01").parse().unwrap(),
    );
    request
}

fn one<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one '{name}' span in {spans:#?}");
    found[0]
}

fn children<'a>(spans: &'a [Span], parent: &Span) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.parent_span_id == parent.span_id)
        .collect()
}

/// The model `img` (a u8 image through `normalize`, the channel means, then
/// `topk`) behind the `router`, traced to `receiver`.
async fn start_chain(receiver: &OtlpReceiver) -> TestServer {
    let tracing = tracing_to(receiver);
    let srv = TestServer::start_with(
        |repo| {
            fixtures::config()
                .max_batch_size(4)
                .preprocess(&["normalize"])
                .postprocess(&["topk"])
                .input("image", "f32", &[3, 2, 2])
                .output("y", "f32", &[3])
                .write(repo, "img");
            fixtures::channel_means_file(&plinth_tests::model_file(repo, "img", "1"));
        },
        |config| config.tracing = Some(tracing),
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
    install_plugin(
        srv.plugins.path(),
        "router",
        "weighted_router",
        Some("[config]\nweights = \"1=100\"\n"),
    );
    for plugin in ["normalize", "topk", "router"] {
        srv.wait_plugin(plugin, serving).await;
    }
    srv.wait_ready("img").await;
    srv
}

/// Asserts the spans of one request to `img`: the request's span, child of
/// the client's span, and under it the router, both plugin calls, the
/// queue wait and the forward pass, in that order, with their attributes.
fn assert_chain_trace(spans: &[Span], client_parent: &str, protocol: &str) {
    let infer = one(spans, "infer");
    assert_eq!(infer.parent_span_id, client_parent, "{infer:#?}");
    assert_eq!(infer.kind, 2, "a server span: {infer:#?}");
    assert_eq!(infer.attr("plinth.protocol"), Some(protocol));
    assert_eq!(infer.attr("plinth.model"), Some("img"));
    assert_eq!(infer.attr("plinth.model.version"), Some("1"));
    assert_eq!(infer.attr("plinth.status"), Some("OK"));
    assert!(
        infer
            .attr("plinth.request.id")
            .is_some_and(|id| id.starts_with("traced-")),
        "{infer:#?}"
    );
    assert_eq!(
        infer.resource.get("service.name").map(String::as_str),
        Some("plinth")
    );
    let mut under: Vec<&Span> = children(spans, infer);
    under.sort_by_key(|s| s.start_unix_nano);
    let names: Vec<&str> = under.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["route", "preprocess", "queue", "forward", "postprocess"],
        "{spans:#?}"
    );
    let plugin = |name: &str| under.iter().find(|s| s.name == name).unwrap();
    assert_eq!(plugin("route").attr("plinth.plugin.name"), Some("router"));
    assert_eq!(
        plugin("preprocess").attr("plinth.plugin.name"),
        Some("normalize")
    );
    assert_eq!(
        plugin("postprocess").attr("plinth.plugin.name"),
        Some("topk")
    );
    for name in ["route", "preprocess", "postprocess"] {
        let version = plugin(name).attr("plinth.plugin.version").unwrap_or("");
        assert!(
            semver_like(version),
            "{name} names its plugin's version: {:#?}",
            plugin(name)
        );
    }
    assert_eq!(plugin("forward").attr("plinth.batch.rows"), Some("1"));
    assert_eq!(plugin("forward").attr("plinth.model.version"), Some("1"));
    // Each child lies within the request's span, and the queue wait ends
    // where the forward pass starts.
    for span in &under {
        assert!(
            span.start_unix_nano >= infer.start_unix_nano
                && span.end_unix_nano <= infer.end_unix_nano
                && span.start_unix_nano <= span.end_unix_nano,
            "{span:#?} within {infer:#?}"
        );
    }
    assert_eq!(
        plugin("queue").end_unix_nano,
        plugin("forward").start_unix_nano
    );
}

fn semver_like(version: &str) -> bool {
    version.split('.').count() == 3 && version.split('.').all(|p| p.parse::<u64>().is_ok())
}

/// tritonclient over gRPC and HTTP, each request sent with a known
/// `traceparent`: the collector gets its trace, a child of the client's span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tritonclient_request_is_traced_through_router_plugins_queue_and_forward() {
    let receiver = OtlpReceiver::start().await;
    let srv = start_chain(&receiver).await;
    let grpc_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let http_trace = "0af7651916cd43dd8448eb211c80319c";
    let parent = "00f067aa0ba902b7";
    let output = super::oip::run_python_script(
        &srv,
        "traced_tritonclient.py",
        &[
            ("PLINTH_TRACE_GRPC", grpc_trace.to_owned()),
            ("PLINTH_TRACE_HTTP", http_trace.to_owned()),
            ("PLINTH_PARENT_SPAN", parent.to_owned()),
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "tritonclient failed");
    // Channel means 2.5, 12.5, 22.5, normalised: 0.75, 5.25, 9.75; top two.
    for client in ["tritonclient.grpc", "tritonclient.http"] {
        assert!(
            stdout.contains(&format!("{client} indices=[[2, 1]] scores=[[9.75, 5.25]]")),
            "{stdout}"
        );
    }
    for (trace, protocol) in [
        (grpc_trace, "kserve-v2-grpc"),
        (http_trace, "kserve-v2-http"),
    ] {
        let spans = receiver.wait_trace(trace, 6).await;
        assert_chain_trace(&spans, parent, protocol);
    }
    srv.stop().await;
}

/// A cascade: the entry's span, its orchestrator's span, and under it each
/// model call as a request of its own at depth 1, with its queue and forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrators_calls_are_nested_spans_at_their_depth() {
    let receiver = OtlpReceiver::start().await;
    let tracing = tracing_to(&receiver);
    let srv = TestServer::start_with(
        |repo| {
            fixtures::batched_scale(repo, "small", 1.0);
            fixtures::batched_scale(repo, "large", 4.0);
            fixtures::batched_rows_config()
                .orchestrator("cascade")
                .write(repo, "cascade");
        },
        |config| config.tracing = Some(tracing),
    )
    .await;
    install_plugin(
        srv.plugins.path(),
        "cascade",
        "cascade",
        Some(&super::orchestrator::cascade_manifest(0.6)),
    );
    srv.wait_plugin("cascade", serving).await;
    srv.wait_ready("cascade").await;
    // Row 0 is confident (0.9 > 0.6); row 1 is not and goes to `large`.
    let trace = "5b8efff798038103d269b633813fc60c";
    let parent = "eee19b7ec3c1b174";
    let rows = [0.9f32, 0.05, 0.05, 0.4, 0.3, 0.3];
    let answer = srv
        .compute()
        .await
        .compute(traced(
            compute_request("cascade", vec![f32_tensor("x", &[2, 3], &rows)]),
            trace,
            parent,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        f32_values(&answer.outputs[0]),
        [0.9, 0.05, 0.05, 1.6, 1.2, 1.2]
    );
    // cascade: infer + orchestrate; small and large: infer + queue + forward.
    let spans = receiver.wait_trace(trace, 8).await;
    let entry = spans
        .iter()
        .find(|s| s.name == "infer" && s.attr("plinth.model") == Some("cascade"))
        .expect("the entry's span");
    assert_eq!(entry.parent_span_id, parent);
    assert_eq!(entry.attr("plinth.call.depth"), None);
    let orchestrate = one(&spans, "orchestrate");
    assert_eq!(orchestrate.parent_span_id, entry.span_id);
    assert_eq!(orchestrate.attr("plinth.plugin.name"), Some("cascade"));
    let nested: Vec<&Span> = children(&spans, orchestrate);
    let models: BTreeSet<&str> = nested
        .iter()
        .map(|s| {
            assert_eq!(s.name, "infer", "{s:#?}");
            assert_eq!(s.attr("plinth.call.depth"), Some("1"), "{s:#?}");
            assert_eq!(s.attr("plinth.protocol"), Some("orchestrator"));
            assert_eq!(s.kind, 1, "an internal span: {s:#?}");
            s.attr("plinth.model").unwrap()
        })
        .collect();
    assert_eq!(models, BTreeSet::from(["large", "small"]), "{spans:#?}");
    for call in nested {
        let mut names: Vec<&str> = children(&spans, call)
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        names.sort_unstable();
        assert_eq!(names, ["forward", "queue"], "{spans:#?}");
    }
    srv.stop().await;
}

/// Four requests, each of its own trace, run as one forward pass of four
/// rows: one `forward` span, in the first request's trace, links to all four.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_forward_is_one_span_linked_to_every_request_in_it() {
    let receiver = OtlpReceiver::start().await;
    let tracing = tracing_to(&receiver);
    let srv = TestServer::start_with(
        |repo| {
            batching_scale(
                repo,
                "scale",
                fixtures::scale_config()
                    .max_batch_size(4)
                    .max_queue_delay_us(60_000_000),
            )
        },
        |config| config.tracing = Some(tracing),
    )
    .await;
    srv.wait_ready("scale").await;
    let traces: Vec<String> = (0..4).map(|i| format!("{:032x}", 0xabc0 + i)).collect();
    let calls: Vec<_> = traces
        .iter()
        .map(|trace| {
            let srv_compute = srv.compute();
            let trace = trace.clone();
            async move {
                let mut client = srv_compute.await;
                client
                    .compute(traced(
                        compute_request("scale", vec![f32_tensor("x", &[1, 2], &[1.0, 2.0])]),
                        &trace,
                        "1111111111111111",
                    ))
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .collect();
    for answer in futures::future::join_all(calls).await {
        let answer = answer.unwrap();
        assert_eq!(answer.outputs.len(), 1);
    }
    let mut requests = Vec::new();
    let mut forwards = Vec::new();
    for trace in &traces {
        // Each request has its span and its queue wait; one has the pass.
        let spans = receiver.wait_trace(trace, 2).await;
        let infer = one(&spans, "infer").clone();
        let queue = one(&spans, "queue");
        assert_eq!(queue.parent_span_id, infer.span_id);
        forwards.extend(spans.iter().filter(|s| s.name == "forward").cloned());
        requests.push((infer.trace_id.clone(), infer.span_id.clone()));
    }
    // The forward span is ended with its request; give it the same wait.
    let forward = eventually(PATIENCE, "one forward span", async || {
        let all: Vec<Span> = receiver
            .spans()
            .into_iter()
            .filter(|s| s.name == "forward")
            .collect();
        match all.as_slice() {
            [one] => Ok(one.clone()),
            other => Err(format!("{other:#?}")),
        }
    })
    .await;
    assert!(forwards.len() <= 1, "{forwards:#?}");
    assert_eq!(forward.attr("plinth.batch.rows"), Some("4"));
    assert_eq!(forward.attr("plinth.batch.traced_requests"), Some("4"));
    let linked: BTreeSet<(String, String)> = forward.links.iter().cloned().collect();
    assert_eq!(
        linked,
        requests.iter().cloned().collect::<BTreeSet<_>>(),
        "{forward:#?}"
    );
    srv.stop().await;
}

async fn scale_server(tracing: TracingConfig) -> TestServer {
    let srv = TestServer::start_with(
        |repo| fixtures::scale(repo, "scale", "1", 2.0),
        |config| config.tracing = Some(tracing),
    )
    .await;
    srv.wait_ready("scale").await;
    srv
}

async fn ask(srv: &TestServer, traceparent: Option<&str>) {
    let mut request = tonic::Request::new(compute_request(
        "scale",
        vec![f32_tensor("x", &[1], &[3.0])],
    ));
    if let Some(traceparent) = traceparent {
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
    }
    let answer = srv.compute().await.compute(request).await.unwrap();
    assert_eq!(f32_values(&answer.into_inner().outputs[0]), [6.0]);
}

/// Ratio 0 exports nothing, even for a sampled `traceparent`; the
/// parent-based sampler at ratio 0 traces exactly the requests whose
/// `traceparent` is sampled. The server's shutdown flushes what it holds,
/// so the collector has everything once it has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_at_ratio_zero_exports_nothing_and_a_parent_based_sampler_honours_the_parent() {
    let sampled = "00-11111111111111111111111111111111-2222222222222222-01";
    let unsampled = "00-33333333333333333333333333333333-4444444444444444-00";

    let receiver = OtlpReceiver::start().await;
    let srv = scale_server(TracingConfig {
        sampler: SamplerChoice::Ratio(0.0),
        ..tracing_to(&receiver)
    })
    .await;
    for traceparent in [None, Some(sampled), Some(unsampled)] {
        ask(&srv, traceparent).await;
    }
    srv.stop().await;
    assert_eq!(receiver.spans(), Vec::new());

    let receiver = OtlpReceiver::start().await;
    let srv = scale_server(TracingConfig {
        sampler: SamplerChoice::ParentBased(Box::new(SamplerChoice::Ratio(0.0))),
        ..tracing_to(&receiver)
    })
    .await;
    for traceparent in [None, Some(sampled), Some(unsampled), None] {
        ask(&srv, traceparent).await;
    }
    srv.stop().await;
    let traces: BTreeSet<String> = receiver.spans().into_iter().map(|s| s.trace_id).collect();
    assert_eq!(
        traces,
        BTreeSet::from(["11111111111111111111111111111111".to_owned()])
    );
    let spans = receiver.trace("11111111111111111111111111111111");
    let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["infer", "queue", "forward"]));
}

/// A collector that is not there: every request succeeds, and every span
/// is counted as dropped once the bounded exporter gives up on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_fails_no_request_and_its_spans_are_counted_as_dropped() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let srv = scale_server(TracingConfig {
        schedule_delay: Duration::from_millis(50),
        export_timeout: Duration::from_millis(300),
        max_queue: 16,
        ..TracingConfig::grpc(format!("http://127.0.0.1:{port}"))
    })
    .await;
    let n = 40;
    for _ in 0..n {
        ask(&srv, None).await;
    }
    // Three spans a request (infer, queue, forward): each is lost to the
    // full queue or to a failed export, and counted either way.
    metrics_containing(
        &srv,
        &[
            &format!("plinth_trace_spans_dropped_total {}", 3 * n),
            "plinth_trace_spans_exported_total 0",
        ],
    )
    .await;
    srv.stop().await;
}

/// A mirrored run is a trace of its own (it answers no client), linked to
/// the primary request's span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrored_run_is_its_own_trace_linked_to_the_primary() {
    let receiver = OtlpReceiver::start().await;
    let tracing = tracing_to(&receiver);
    let srv = TestServer::start_with(
        |repo| {
            fixtures::scale(repo, "m", "1", 2.0);
            fixtures::scale(repo, "shadow", "1", 2.0);
        },
        |config| config.tracing = Some(tracing),
    )
    .await;
    install_plugin(
        srv.plugins.path(),
        "router",
        "weighted_router",
        Some("[config]\nmirror.m = \"shadow\"\n"),
    );
    srv.wait_plugin("router", serving).await;
    srv.wait_ready("m").await;
    srv.wait_ready("shadow").await;
    let trace = "6e0c63257de34c926f9efcd03899adf2";
    let answer = srv
        .compute()
        .await
        .compute(traced(
            compute_request("m", vec![f32_tensor("x", &[1], &[1.5])]),
            trace,
            "2222222222222222",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_values(&answer.outputs[0]), [3.0]);
    let primary = receiver.wait_trace(trace, 4).await;
    let primary = one(&primary, "infer").clone();
    assert_eq!(primary.attr("plinth.model"), Some("m"));
    let mirror = eventually(PATIENCE, "the mirrored run's span", async || {
        receiver
            .spans()
            .into_iter()
            .find(|s| s.name == "infer" && s.attr("plinth.model") == Some("shadow"))
            .ok_or_else(|| "not yet".to_owned())
    })
    .await;
    assert_ne!(mirror.trace_id, trace, "{mirror:#?}");
    assert_eq!(mirror.parent_span_id, "", "a root: {mirror:#?}");
    assert_eq!(mirror.attr("plinth.protocol"), Some("mirror"));
    assert_eq!(
        mirror.links,
        [(primary.trace_id.clone(), primary.span_id.clone())]
    );
    srv.stop().await;
}

/// OTLP over HTTP with protobuf bodies (the specification's default
/// protocol), configured as an operator does: the standard variables, the
/// generic endpoint joined with `/v1/traces`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_http_collector_configured_by_the_standard_variables() {
    let receiver = OtlpReceiver::start_http().await;
    let endpoint = receiver.endpoint();
    let config = TracingConfig::from_vars(|name| match name {
        "OTEL_EXPORTER_OTLP_ENDPOINT" => Some(endpoint.clone()),
        "OTEL_SERVICE_NAME" => Some("edge-west".into()),
        "OTEL_RESOURCE_ATTRIBUTES" => Some("deployment.environment=test".into()),
        "OTEL_BSP_SCHEDULE_DELAY" => Some("50".into()),
        _ => None,
    })
    .unwrap()
    .expect("tracing is on");
    let srv = scale_server(config).await;
    let trace = "7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a";
    ask(&srv, Some(&format!("00-{trace}-1212121212121212-01"))).await;
    let spans = receiver.wait_trace(trace, 3).await;
    let infer = one(&spans, "infer");
    assert_eq!(infer.parent_span_id, "1212121212121212");
    assert_eq!(
        infer.resource.get("service.name").map(String::as_str),
        Some("edge-west")
    );
    assert_eq!(
        infer
            .resource
            .get("deployment.environment")
            .map(String::as_str),
        Some("test")
    );
    srv.stop().await;
}
