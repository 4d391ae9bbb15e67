//! System benchmarks of the host (issue: host foundation). They report, they
//! do not assert. Run with `cargo xtask bench` (add a section name to run one:
//! `list`, `loads`, `overhead`). Results go to docs/BENCHMARKS.md by hand.
//!
//! - `list`: ListModels latency while three large models load concurrently,
//!   against the same calls with nothing loading.
//! - `loads`: wall time of three equal loads run concurrently against one
//!   after another.
//! - `chain`: the same tiny model with router + preprocess + postprocess +
//!   metrics plugins, against no plugins, in one run.
//! - `reload`: time from a plugin file landing (rename) to the new version
//!   serving.
//! - `oip`: the Open Inference Protocol v2 driven by tools outside this
//!   process: h2load on gRPC ModelInfer (pre-encoded body) at concurrency 1
//!   and 16, wrk on REST infer at 1 and 16; the server's ModelStatistics
//!   check that every request succeeded (h2load cannot read grpc-status).
//! - `overhead`: Compute round trips on a tiny model, against the same
//!   TorchScript module called in-process through tch. Throughput comes from
//!   h2load, a load generator outside this process, with a pre-encoded body.

use std::path::Path;
use std::time::{Duration, Instant};

use plinth::grpc::pb;
use plinth_tests::load::{self, Amount, H2loadRun, grpc_frame, wrk};
use plinth_tests::{ModelState, TestServer, compute_request, f32_tensor, fixtures};

const LARGE_FLOATS: i64 = 75_000_000; // 300 MB of weights per model

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration, Duration, usize) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99), *samples.last().unwrap(), samples.len())
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

#[tokio::main]
async fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| f == name);
    println!(
        "host benchmarks on {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    if wants("list") {
        list_under_load().await;
    }
    if wants("loads") {
        concurrent_loads().await;
    }
    if wants("overhead") {
        overhead().await;
    }
    if wants("oip") {
        oip().await;
    }
    if wants("chain") {
        chain_overhead().await;
    }
    if wants("reload") {
        hot_reload().await;
    }
}

fn large_models(repo: &Path, names: &[&str]) {
    let started = Instant::now();
    for name in names {
        fixtures::large(repo, name, LARGE_FLOATS);
    }
    eprintln!(
        "built {} models of {} MB in {:.1}s",
        names.len(),
        LARGE_FLOATS * 4 / 1_000_000,
        started.elapsed().as_secs_f64()
    );
}

async fn list_under_load() {
    let big = ["big_a", "big_b", "big_c"];
    let srv = TestServer::start(
        |repo| {
            fixtures::scale(repo, "small", "1", 2.0);
            large_models(repo, &big);
        },
        false,
    )
    .await;
    srv.load("small").await.unwrap();
    // Warm the page cache so both runs read from memory.
    for name in big {
        let _ = std::fs::read(plinth_tests::model_file(srv.repo.path(), name, "1")).unwrap();
    }
    let mut models = srv.models().await;
    let mut idle = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        models.list_models(pb::ListModelsRequest {}).await.unwrap();
        idle.push(t.elapsed());
    }

    let loads_started = Instant::now();
    for name in big {
        models
            .load_model(pb::LoadModelRequest {
                name: name.into(),
                reload: false,
                wait: false,
            })
            .await
            .unwrap();
    }
    let mut busy = Vec::new();
    let mut loading_seen = 0usize;
    loop {
        let t = Instant::now();
        let listed = models
            .list_models(pb::ListModelsRequest {})
            .await
            .unwrap()
            .into_inner();
        busy.push(t.elapsed());
        let n_loading = listed
            .models
            .iter()
            .filter(|m| m.state == ModelState::Loading as i32)
            .count();
        if n_loading > 0 {
            loading_seen += 1;
        } else {
            break;
        }
    }
    let load_wall = loads_started.elapsed();
    for name in big {
        assert_eq!(
            srv.status(name).await.state,
            ModelState::Ready as i32,
            "{name} loaded"
        );
    }
    let (i50, i99, imax, n_idle) = percentiles(idle);
    let (b50, b99, bmax, n_busy) = percentiles(busy);
    println!(
        "\n## ListModels latency, 3 x {} MB loads in flight ({:.2}s of loading)",
        LARGE_FLOATS * 4 / 1_000_000,
        load_wall.as_secs_f64()
    );
    println!("| run | calls | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    println!(
        "| nothing loading | {n_idle} | {} | {} | {} |",
        us(i50),
        us(i99),
        us(imax)
    );
    println!(
        "| 3 loads in flight | {n_busy} ({loading_seen} saw LOADING) | {} | {} | {} |",
        us(b50),
        us(b99),
        us(bmax)
    );
    println!(
        "| ratio busy / idle | | {:.2} | {:.2} | |",
        b50.as_secs_f64() / i50.as_secs_f64(),
        b99.as_secs_f64() / i99.as_secs_f64()
    );
}

async fn concurrent_loads() {
    let big = ["big_a", "big_b", "big_c"];
    let srv = TestServer::start(|repo| large_models(repo, &big), false).await;
    for name in big {
        let _ = std::fs::read(plinth_tests::model_file(srv.repo.path(), name, "1")).unwrap();
    }
    let mut models = srv.models().await;
    let unload_all =
        |models: &mut pb::model_service_client::ModelServiceClient<tonic::transport::Channel>| {
            let mut models = models.clone();
            let srv = &srv;
            async move {
                for name in big {
                    models
                        .unload_model(pb::UnloadModelRequest { name: name.into() })
                        .await
                        .unwrap();
                    srv.wait_for(name, |s| s.state == ModelState::Unavailable as i32)
                        .await;
                }
            }
        };
    let mut rows = Vec::new();
    for round in 0..3 {
        let t = Instant::now();
        for name in big {
            srv.load(name).await.unwrap();
        }
        let sequential = t.elapsed();
        unload_all(&mut models).await;

        let t = Instant::now();
        let mut loads = Vec::new();
        for name in big {
            let mut client = models.clone();
            loads.push(tokio::spawn(async move {
                client
                    .load_model(pb::LoadModelRequest {
                        name: name.into(),
                        reload: false,
                        wait: true,
                    })
                    .await
            }));
        }
        for load in loads {
            load.await.unwrap().unwrap();
        }
        let concurrent = t.elapsed();
        unload_all(&mut models).await;
        rows.push((round, sequential, concurrent));
    }
    println!(
        "\n## 3 loads of {} MB: concurrent against sequential",
        LARGE_FLOATS * 4 / 1_000_000
    );
    println!("| round | sequential | concurrent | concurrent / sequential |");
    println!("|---|---|---|---|");
    for (round, sequential, concurrent) in rows {
        println!(
            "| {round} | {:.0} ms | {:.0} ms | {:.2} |",
            sequential.as_secs_f64() * 1e3,
            concurrent.as_secs_f64() * 1e3,
            concurrent.as_secs_f64() / sequential.as_secs_f64()
        );
    }
}

/// h2load with `-n`, on one client thread, as these sections were measured.
fn h2load(url: &str, body: &Path, n: u64, clients: u32, streams: u32) -> H2loadRun {
    load::h2load(url, body, Amount::Requests(n), clients, streams, 1)
}

async fn overhead() {
    let srv = TestServer::start(|repo| fixtures::scale(repo, "tiny", "1", 2.0), false).await;
    srv.load("tiny").await.unwrap();
    let path = plinth_tests::model_file(srv.repo.path(), "tiny", "1");

    // The ceiling: the same module, in this process, through tch, one thread.
    let module = tch::CModule::load(&path).unwrap();
    let input = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]);
    let _guard = tch::no_grad_guard();
    let mut direct = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let t = Instant::now();
        let out = module.forward_ts(&[&input]).unwrap();
        let mut values = [0f32; 4];
        out.copy_data(&mut values, 4);
        direct.push(t.elapsed());
    }
    let direct_total: Duration = direct.iter().sum();
    let direct_rps = direct.len() as f64 / direct_total.as_secs_f64();
    let (d50, d99, _, _) = percentiles(direct);

    // Plinth at concurrency 1: a tonic client, one call after another.
    let mut compute = srv.compute().await;
    let request = compute_request("tiny", vec![f32_tensor("x", &[4], &[1.0, 2.0, 3.0, 4.0])]);
    for _ in 0..500 {
        compute.compute(request.clone()).await.unwrap();
    }
    let mut grpc = Vec::with_capacity(5000);
    for _ in 0..5000 {
        let t = Instant::now();
        compute.compute(request.clone()).await.unwrap();
        grpc.push(t.elapsed());
    }
    let (g50, g99, _, _) = percentiles(grpc);

    // Plinth under h2load, a separate process.
    let body_dir = tempfile::tempdir().unwrap();
    let body = body_dir.path().join("compute.bin");
    std::fs::write(&body, grpc_frame(&request)).unwrap();
    let url = format!("{}/plinth.v1.ComputeService/Compute", srv.grpc_url());
    let counts = |detail: pb::ModelDetail| (detail.success_count, detail.failure_count);
    let mut models = srv.models().await;
    let detail = || {
        let mut models = models.clone();
        async move {
            counts(
                models
                    .get_model(pb::GetModelRequest {
                        name: "tiny".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .model
                    .unwrap(),
            )
        }
    };
    let before = detail().await;
    let c1 = h2load(&url, &body, 20_000, 1, 1);
    let c64 = h2load(&url, &body, 100_000, 4, 16);
    let after = detail().await;
    let _ = &mut models;
    let grpc_ok = after.0 - before.0;
    let grpc_failed = after.1 - before.1;

    println!("\n## Compute overhead on a 4-float model (y = 2x)");
    println!("| path | concurrency | req/s | p50 | p99 | mean | ratio to in-process tch |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| tch in-process (ceiling) | 1 | {:.0} | {} | {} | | 1.00 |",
        direct_rps,
        us(d50),
        us(d99)
    );
    println!(
        "| Plinth, tonic client in-process | 1 | {:.0} | {} | {} | | {:.3} |",
        1.0 / g50.as_secs_f64(),
        us(g50),
        us(g99),
        (1.0 / g50.as_secs_f64()) / direct_rps
    );
    println!(
        "| Plinth, h2load | 1 | {:.0} | | | {:.0} µs | {:.3} |",
        c1.req_per_s,
        c1.mean_us,
        c1.req_per_s / direct_rps
    );
    println!(
        "| Plinth, h2load (-c 4 -m 16) | 64 | {:.0} | | | {:.0} µs | {:.3} |",
        c64.req_per_s,
        c64.mean_us,
        c64.req_per_s / direct_rps
    );
    println!(
        "\nh2load HTTP: {} + {} succeeded, {} + {} failed; server counted {grpc_ok} gRPC successes and {grpc_failed} failures over both runs",
        c1.succeeded, c64.succeeded, c1.failed, c64.failed
    );
}

async fn oip() {
    use plinth::grpc::ipb;
    let srv = TestServer::start(|repo| fixtures::scale(repo, "simple", "1", 2.0), false).await;
    srv.load("simple").await.unwrap();
    let mut client = srv.inference().await;
    let values: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let request = ipb::ModelInferRequest {
        model_name: "simple".into(),
        inputs: vec![ipb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![16],
            ..Default::default()
        }],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    };
    // Sanity: the pre-encoded request is answered correctly.
    let answer = client
        .model_infer(request.clone())
        .await
        .unwrap()
        .into_inner();
    let doubled: Vec<f32> = answer.raw_output_contents[0]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(doubled, values.iter().map(|v| v * 2.0).collect::<Vec<_>>());

    let stats = || {
        let mut client = client.clone();
        async move {
            let s = client
                .model_statistics(ipb::ModelStatisticsRequest {
                    name: "simple".into(),
                    version: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .model_stats
                .remove(0)
                .inference_stats
                .unwrap();
            (s.success.unwrap().count, s.fail.unwrap().count)
        }
    };

    let body_dir = tempfile::tempdir().unwrap();
    let body = body_dir.path().join("infer.bin");
    std::fs::write(&body, grpc_frame(&request)).unwrap();
    let url = format!(
        "{}/inference.GRPCInferenceService/ModelInfer",
        srv.grpc_url()
    );
    // Warm-up.
    h2load(&url, &body, 2_000, 1, 1);
    let rest_url = format!("{}/v2/models/simple/infer", srv.http_url());
    let json_body = format!(
        "{{\"inputs\":[{{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[16],\"data\":[{}]}}]}}",
        values
            .iter()
            .map(|v| format!("{v:.1}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    wrk(&rest_url, &json_body, 1, 2);

    println!("\n## Open Inference Protocol v2, tiny FP32 model (16 floats, y = 2x)");
    println!("| client | protocol | concurrency | infer/s | mean | p50 | p99 | errors |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut all_ok = true;
    for (clients, n) in [(1u32, 20_000u64), (16, 100_000)] {
        let before = stats().await;
        let run = h2load(&url, &body, n, clients, 1);
        let after = stats().await;
        let ok = after.0 - before.0;
        let failed = after.1 - before.1;
        all_ok &= failed == 0 && run.failed == 0 && ok == run.succeeded;
        println!(
            "| h2load | gRPC ModelInfer | {clients} | {:.0} | {:.0} µs | | | {} HTTP, {failed} gRPC (server counted {ok} successes for {} sent) |",
            run.req_per_s, run.mean_us, run.failed, run.succeeded
        );
    }
    for connections in [1u32, 16] {
        let before = stats().await;
        let run = wrk(&rest_url, &json_body, connections, 10);
        let after = stats().await;
        let failed = after.1 - before.1;
        all_ok &= failed == 0 && run.errors == 0;
        println!(
            "| wrk | REST infer (JSON) | {connections} | {:.0} | {:.0} µs | {:.0} µs | {:.0} µs | {} HTTP, {failed} server-side ({} requests) |",
            run.req_per_s, run.mean_us, run.p50_us, run.p99_us, run.errors, run.requests
        );
    }
    println!(
        "\nTriton's published figures at concurrency 1 on its quick-start model: 1407 infer/s at 708 µs (HTTP), 1685 infer/s at 591 µs (gRPC)."
    );
    println!("zero errors in every run: {all_ok}");
}

async fn sequential_latency(srv: &TestServer, model: &str, n: usize) -> Vec<Duration> {
    let mut compute = srv.compute().await;
    let request = compute_request(model, vec![f32_tensor("x", &[4], &[1.0, 2.0, 3.0, 4.0])]);
    for _ in 0..300 {
        compute.compute(request.clone()).await.unwrap();
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        compute.compute(request.clone()).await.unwrap();
        samples.push(t.elapsed());
    }
    samples
}

async fn chain_overhead() {
    let srv = TestServer::start(
        |repo| {
            fixtures::scale(repo, "plain", "1", 2.0);
            fixtures::scale(repo, "chained", "1", 2.0);
            fixtures::scale_config()
                .preprocess(&["pre"])
                .postprocess(&["post"])
                .write(repo, "chained");
        },
        true,
    )
    .await;
    srv.wait_ready("plain").await;
    srv.wait_ready("chained").await;
    // image-normalize passes f32 tensors through: the cost measured is the
    // call and the tensor copies, which every processor pays.
    for (name, component) in [("pre", "image_normalize"), ("post", "image_normalize")] {
        plinth_tests::install_plugin(srv.plugins.path(), name, component, None);
        srv.wait_plugin(name, |s| s.serving).await;
    }
    let body_dir = tempfile::tempdir().unwrap();
    let url = format!("{}/plinth.v1.ComputeService/Compute", srv.grpc_url());
    let mut rows = Vec::new();
    // Alternate plain and chained twice so drift hits both alike. The router
    // and metrics plugins are installed for the chained runs only.
    for round in 0..2 {
        for chained in [false, true] {
            for name in ["router", "metrics"] {
                let _ = std::fs::remove_file(srv.plugins.path().join(format!("{name}.wasm")));
            }
            if chained {
                plinth_tests::install_plugin(srv.plugins.path(), "router", "weighted_router", None);
                plinth_tests::install_plugin(
                    srv.plugins.path(),
                    "metrics",
                    "prometheus_metrics",
                    None,
                );
                srv.wait_plugin("router", |s| s.serving).await;
                srv.wait_plugin("metrics", |s| s.serving).await;
            } else {
                plinth_tests::eventually(
                    plinth_tests::PATIENCE,
                    "the router and metrics plugins to leave the list",
                    async || {
                        let listed = srv
                            .plugin_api()
                            .await
                            .list_plugins(pb::ListPluginsRequest {})
                            .await
                            .unwrap()
                            .into_inner();
                        let names: Vec<String> =
                            listed.plugins.into_iter().map(|p| p.name).collect();
                        if names.iter().all(|n| n != "router" && n != "metrics") {
                            Ok(())
                        } else {
                            Err(format!("listed: {names:?}"))
                        }
                    },
                )
                .await;
            }
            let model = if chained { "chained" } else { "plain" };
            let (p50, p99, _, _) = percentiles(sequential_latency(&srv, model, 4000).await);
            let request =
                compute_request(model, vec![f32_tensor("x", &[4], &[1.0, 2.0, 3.0, 4.0])]);
            let body = body_dir.path().join(format!("{model}.bin"));
            std::fs::write(&body, grpc_frame(&request)).unwrap();
            let c64 = h2load(&url, &body, 60_000, 4, 16);
            rows.push((round, chained, p50, p99, c64.req_per_s, c64.failed));
        }
    }
    println!(
        "\n## Plugin chain overhead: router + preprocess + postprocess + metrics, against no plugins"
    );
    println!("| round | pipeline | p50 (c=1) | p99 (c=1) | req/s (h2load c=64) | HTTP failures |");
    println!("|---|---|---|---|---|---|");
    for (round, chained, p50, p99, rps, failed) in &rows {
        let label = if *chained { "full chain" } else { "no plugins" };
        println!(
            "| {round} | {label} | {} | {} | {rps:.0} | {failed} |",
            us(*p50),
            us(*p99)
        );
    }
    for round in 0..2 {
        let plain = &rows[round * 2];
        let chained = &rows[round * 2 + 1];
        println!(
            "round {round}: added p50 {:.1} µs; chain throughput / plain = {:.3}",
            (chained.2.as_secs_f64() - plain.2.as_secs_f64()) * 1e6,
            chained.4 / plain.4
        );
    }
    let (_, metrics) = srv.metrics().await;
    let dropped = metrics
        .lines()
        .find(|l| l.starts_with("plinth_metrics_events_dropped_total"))
        .unwrap_or("")
        .to_owned();
    println!("{dropped}");
}

async fn hot_reload() {
    let srv = TestServer::start(|_| {}, false).await;
    plinth_tests::install_plugin(
        srv.plugins.path(),
        "topk",
        "softmax_topk",
        Some("[config]\nk = 1\n"),
    );
    let mut last = srv.wait_plugin("topk", |s| s.serving).await;
    let mut samples = Vec::new();
    for round in 0..20 {
        // A new manifest each time; the component itself comes from the artifact cache.
        let text = format!("[config]\nk = {}\n", 2 + round % 3);
        let staging = srv.plugins.path().join(".topk.toml.partial");
        std::fs::write(&staging, text).unwrap();
        let written = Instant::now();
        std::fs::rename(&staging, srv.plugins.path().join("topk.toml")).unwrap();
        last = srv
            .wait_plugin("topk", |s| s.serving && s.loaded_at_us > last.loaded_at_us)
            .await;
        samples.push(written.elapsed());
    }
    let (p50, p99, max, n) = percentiles(samples);
    // A component never seen before: compiled, not taken from the cache.
    let written = Instant::now();
    plinth_tests::install_plugin(srv.plugins.path(), "fresh", "prometheus_metrics", None);
    srv.wait_plugin("fresh", |s| s.serving).await;
    let fresh = written.elapsed();
    println!(
        "\n## Hot reload: file landed (rename) to new version serving (watcher debounce 100 ms)"
    );
    println!("| case | samples | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    println!(
        "| manifest change, cached component | {n} | {:.0} ms | {:.0} ms | {:.0} ms |",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    println!(
        "| new component (compiled) | 1 | {:.0} ms | | |",
        fresh.as_secs_f64() * 1e3
    );
}
