//! Performance, round two: every goal of the issue measured as a ratio,
//! side by side in one run, each configuration alternated twice so that
//! drift hits them alike. It reports, it does not assert.
//!
//! `cargo xtask bench --bench perf [-- SECTION...]`, sections:
//!
//! - `servers`: a bare tonic echo, Plinth's plain pipeline (also with its
//!   executors spinning 50 µs before they park), and the full plugin chain
//!   (router, preprocess, postprocess, metrics), 16 floats, h2load at
//!   concurrency 1, 8 and 64;
//! - `large`: 1 MiB and 16 MiB f32 tensors, the echo against the plain
//!   pipeline against one pass-through processor plugin;
//! - `rest`: REST infer (JSON) under wrk at 16 connections, against a bare
//!   axum server that parses and writes the same JSON;
//! - `cnn`: the CNN at batch 32 through the server, against the same
//!   TorchScript run in this process with the server's thread count;
//! - `pt2`: the CNN as an AOTInductor package (`model.pt2`) at batch 15
//!   through the server, against the same package run through
//!   `AotiPackage` in this process and in a process of its own, and against
//!   the same module as TorchScript (images/s at batch 15, p50 at batch 1);
//!   and y = 2x over 16 floats, p50 at batch 1, package against
//!   TorchScript;
//! - `loads`: ListModels and Compute latency while three ~257 MB models
//!   load, from clients in processes of their own, against the same with
//!   nothing loading; and three loads at once against one after another;
//! - `residency`: the CNN as an on-demand model, its first request after
//!   an unload (which loads it) against its requests once loaded;
//! - `alloc`: the real `plinth serve` binary built with the system
//!   allocator, mimalloc and jemalloc (xtask builds the three and names them
//!   in `PLINTH_PERF_BINS`), plain and chain at c = 8 and 64;
//! - `round3`: round three's goals on the real release binary
//!   (`perf/round3.rs`).
//!
//! The in-process cost of the chain (no network) is the criterion group
//! `pipeline_chain` of the `plugin_calls` bench. Every h2load run is checked
//! against the server's own success and failure counts, and tritonclient
//! checks the answers before and after (with `PLINTH_PYTHON`).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use plinth::config::DeviceSpec;
use plinth::grpc::{ipb, pb};
use plinth::tensor::{DType, Tensor, TensorSpec};
use plinth_tests::load::{Amount, H2loadRun, h2load, infer_request, triton_check, write_body, wrk};
use plinth_tests::{
    ModelState, TestServer, compute_request, echo, f32_tensor, f32_values, fixtures,
};
use plinth_torch::{AotiPackage, PackageInfo};

#[path = "perf/round3.rs"]
mod round3;

const CONCURRENCY: [u32; 3] = [1, 8, 64];
const SECONDS: u64 = 10;
const ROUNDS: usize = 2;
/// The executor spin the `servers` section tries against none.
const SPIN: Duration = Duration::from_micros(50);
const MODEL_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";
/// Set in a child process of this bench: it is a client, not the bench.
const CLIENT_ROLE: &str = "PLINTH_PERF_CLIENT";
/// ~257 MB of weights per model, as the issue measured.
const LOAD_FLOATS: i64 = 64_250_000;

/// One line of the goals table.
struct Goal {
    measure: String,
    value: String,
    goal: &'static str,
}

#[tokio::main]
async fn main() {
    if let Ok(role) = std::env::var(CLIENT_ROLE) {
        match role.strip_prefix("pt2-") {
            Some(format) => pt2_own_process(format),
            None => client(&role).await,
        }
        return;
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| f == name);
    println!(
        "performance round two on {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut goals = Vec::new();
    if wants("servers") {
        servers(&mut goals).await;
    }
    if wants("large") {
        large(&mut goals).await;
    }
    if wants("rest") {
        rest(&mut goals).await;
    }
    if wants("cnn") {
        cnn(&mut goals).await;
    }
    if wants("pt2") {
        pt2(&mut goals).await;
    }
    if wants("loads") {
        loads(&mut goals).await;
    }
    if wants("residency") {
        residency(&mut goals).await;
    }
    if wants("alloc") {
        alloc(&mut goals).await;
    }
    if wants("traces") {
        traces(&mut goals).await;
    }
    if wants("round3") {
        round3::round3(&mut goals).await;
    }
    println!("\n## Goals");
    println!("| measure | measured | goal |");
    println!("|---|---|---|");
    for goal in goals {
        println!("| {} | {} | {} |", goal.measure, goal.value, goal.goal);
    }
}

// ---------------------------------------------------------------------------
// Servers and load.

/// Plinth with no plugin in any request's way: `double` (y = 2x), and
/// `passed`, the same model behind one pass-through processor (`pass`,
/// image-normalize, which passes f32 through untouched).
async fn plain_server() -> TestServer {
    plain_server_spinning(Duration::ZERO).await
}

/// [`plain_server`] whose executors poll their queue for `spin` before
/// parking (`--executor-spin-us`).
async fn plain_server_spinning(spin: Duration) -> TestServer {
    let srv = TestServer::start_with(
        |repo| {
            fixtures::scale(repo, "double", "1", 2.0);
            fixtures::scale(repo, "passed", "1", 2.0);
            fixtures::scale_config()
                .preprocess(&["pass"])
                .write(repo, "passed");
        },
        |config| config.executor_spin = spin,
    )
    .await;
    plinth_tests::install_plugin(srv.plugins.path(), "pass", "image_normalize", None);
    srv.wait_plugin("pass", |s| s.serving).await;
    for model in ["double", "passed"] {
        srv.wait_ready(model).await;
    }
    srv
}

/// Plinth with the full chain: weighted-router, a pass-through processor
/// before and after the model, prometheus-metrics.
async fn chain_server() -> TestServer {
    chain_server_with(|_| {}).await
}

/// [`chain_server`], its config tweaked.
async fn chain_server_with(tweak: impl FnOnce(&mut plinth::ServerConfig)) -> TestServer {
    let srv = TestServer::start_with(
        |repo| {
            fixtures::chained(repo, "chained", 2.0);
        },
        tweak,
    )
    .await;
    let plugins = srv.plugins.path();
    for (name, component) in fixtures::CHAIN_PLUGINS {
        plinth_tests::install_plugin(plugins, name, component, None);
    }
    for (name, _) in fixtures::CHAIN_PLUGINS {
        srv.wait_plugin(name, |s| s.serving).await;
    }
    srv.wait_ready("chained").await;
    srv
}

/// What a server counted for `model` (successes, failures), or nothing for
/// the echo, which counts nothing.
async fn counts(srv: Option<&TestServer>, model: &str) -> Option<(u64, u64)> {
    let stats = srv?.model_stats(model).await.inference_stats?;
    Some((stats.success?.count, stats.fail?.count))
}

/// One h2load run of `seconds` against ModelInfer at `addr`, `clients`
/// connections of one stream each, off the runtime's workers (the servers
/// under test share this process's runtime).
async fn drive(addr: &str, body: &Path, clients: u32, amount: Amount) -> H2loadRun {
    let url = format!("http://{addr}{MODEL_PATH}");
    let body = body.to_owned();
    tokio::task::spawn_blocking(move || h2load(&url, &body, amount, clients, 1, 2))
        .await
        .expect("h2load thread")
}

/// A measured cell: the h2load run and what the server counted meanwhile.
struct Cell {
    run: H2loadRun,
    server_ok: Option<u64>,
    server_failed: Option<u64>,
}

async fn cell(
    srv: Option<&TestServer>,
    addr: &str,
    model: &str,
    body: &Path,
    clients: u32,
) -> Cell {
    cell_for(srv, addr, model, body, clients, SECONDS).await
}

/// [`cell`] of `seconds`.
async fn cell_for(
    srv: Option<&TestServer>,
    addr: &str,
    model: &str,
    body: &Path,
    clients: u32,
    seconds: u64,
) -> Cell {
    let before = counts(srv, model).await;
    let run = drive(addr, body, clients, Amount::Seconds(seconds)).await;
    let after = counts(srv, model).await;
    let (server_ok, server_failed) = match (before, after) {
        (Some(b), Some(a)) => (Some(a.0 - b.0), Some(a.1 - b.1)),
        _ => (None, None),
    };
    Cell {
        run,
        server_ok,
        server_failed,
    }
}

fn server_counted(cell: &Cell) -> String {
    match (cell.server_ok, cell.server_failed) {
        (Some(ok), Some(failed)) => format!("{ok} ok, {failed} failed"),
        _ => "(echo)".to_owned(),
    }
}

fn check(addr: &str, model: &str, when: &str) -> String {
    let verdict = match triton_check(addr, model) {
        Some(true) => "ok",
        Some(false) => "FAILED",
        None => "not run (no PLINTH_PYTHON)",
    };
    format!("{model} at {addr}, {when}: {verdict}")
}

fn ratios(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.2}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

// ---------------------------------------------------------------------------
// `servers`: echo, plain, chain at c = 1, 8, 64.

async fn servers(goals: &mut Vec<Goal>) {
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let bodies = [
        ("echo", "double"),
        ("plain", "double"),
        ("spin", "double"),
        ("chain", "chained"),
    ]
    .map(|(config, model)| {
        (
            config,
            model,
            write_body(dir.path(), model, &infer_request(model, &[16], &values)),
        )
    });
    let echo = echo::start_tonic(4 << 20).await;
    let plain = plain_server().await;
    let spin = plain_server_spinning(SPIN).await;
    let chain = chain_server().await;
    let plain_addr = plain.running().grpc_addr.to_string();
    let spin_addr = spin.running().grpc_addr.to_string();
    let chain_addr = chain.running().grpc_addr.to_string();
    let mut checks = vec![
        check(&plain_addr, "double", "before"),
        check(&chain_addr, "chained", "before"),
    ];
    let target = |config: &str| -> (Option<&TestServer>, String) {
        match config {
            "echo" => (None, echo.clone()),
            "plain" => (Some(&plain), plain_addr.clone()),
            "spin" => (Some(&spin), spin_addr.clone()),
            _ => (Some(&chain), chain_addr.clone()),
        }
    };
    for (config, _, body) in &bodies {
        let (_, addr) = target(config);
        drive(&addr, body, 4, Amount::Requests(3_000)).await;
    }
    // cells[(round, config, c)]
    let mut cells: Vec<(usize, &str, u32, Cell)> = Vec::new();
    for round in 1..=ROUNDS {
        for (config, model, body) in &bodies {
            let (srv, addr) = target(config);
            for c in CONCURRENCY {
                let measured = cell(srv, &addr, model, body, c).await;
                cells.push((round, config, c, measured));
            }
        }
    }
    checks.push(check(&plain_addr, "double", "after"));
    checks.push(check(&chain_addr, "chained", "after"));

    println!("\n## Servers: y = 2x over 16 floats, gRPC ModelInfer, h2load {SECONDS} s per cell");
    println!(
        "| round | configuration | concurrency | req/s | p50 | p99 | HTTP failed | server counted |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (round, config, c, cell) in &cells {
        println!(
            "| {round} | {config} | {c} | {:.0} | {:.0} µs | {:.0} µs | {} | {} |",
            cell.run.req_per_s,
            cell.run.p50_us,
            cell.run.p99_us,
            cell.run.failed,
            server_counted(cell)
        );
    }
    let get = |round: usize, config: &str, c: u32| {
        &cells
            .iter()
            .find(|(r, k, cc, _)| *r == round && *k == config && *cc == c)
            .expect("cell")
            .3
            .run
    };
    let per_round = |f: &dyn Fn(usize) -> f64| (1..=ROUNDS).map(f).collect::<Vec<f64>>();
    for c in [8, 64] {
        let r =
            per_round(&|round| get(round, "plain", c).req_per_s / get(round, "echo", c).req_per_s);
        goals.push(Goal {
            measure: format!("plain ÷ bare tonic echo, throughput, c={c} (rounds)"),
            value: ratios(&r),
            goal: "≥ 0.85",
        });
    }
    let r = per_round(&|round| get(round, "plain", 1).p50_us / get(round, "echo", 1).p50_us);
    goals.push(Goal {
        measure: "plain p50 ÷ bare tonic p50, c=1 (rounds)".into(),
        value: ratios(&r),
        goal: "≤ 1.15×",
    });
    for c in CONCURRENCY {
        let r =
            per_round(&|round| get(round, "chain", c).req_per_s / get(round, "plain", c).req_per_s);
        goals.push(Goal {
            measure: format!("full chain ÷ plain, throughput, c={c} (rounds)"),
            value: ratios(&r),
            goal: "≥ 0.92",
        });
    }
    for c in CONCURRENCY {
        let r =
            per_round(&|round| get(round, "spin", c).req_per_s / get(round, "plain", c).req_per_s);
        goals.push(Goal {
            measure: format!(
                "plain with a {} µs executor spin ÷ plain, throughput, c={c} (rounds)",
                SPIN.as_micros()
            ),
            value: ratios(&r),
            goal: "> 1 to keep it",
        });
    }
    let r = per_round(&|round| get(round, "spin", 1).p50_us / get(round, "plain", 1).p50_us);
    goals.push(Goal {
        measure: format!(
            "plain with a {} µs executor spin, p50 ÷ plain p50, c=1 (rounds)",
            SPIN.as_micros()
        ),
        value: ratios(&r),
        goal: "< 1 to keep it",
    });
    let added = per_round(&|round| get(round, "chain", 1).p50_us - get(round, "plain", 1).p50_us);
    goals.push(Goal {
        measure: "chain's added p50 at c=1 (rounds)".into(),
        value: added
            .iter()
            .map(|v| format!("{v:.0} µs"))
            .collect::<Vec<_>>()
            .join(" / "),
        goal: "≤ 8 µs",
    });
    println!("\ncorrectness checks (tritonclient):");
    for line in checks {
        println!("- {line}");
    }
    plain.stop().await;
    spin.stop().await;
    chain.stop().await;
}

// ---------------------------------------------------------------------------
// `large`: 1 MiB and 16 MiB tensors.

async fn large(goals: &mut Vec<Goal>) {
    let dir = tempfile::tempdir().unwrap();
    let echo = echo::start_tonic(64 << 20).await;
    let plain = plain_server().await;
    let plain_addr = plain.running().grpc_addr.to_string();
    const CLIENTS: u32 = 8;
    let mut rows = Vec::new();
    for (label, floats) in [("1 MiB", 1usize << 18), ("16 MiB", 1 << 22)] {
        let values: Vec<f32> = (0..floats).map(|i| (i % 1000) as f32).collect();
        let configs = [
            ("echo", "double"),
            ("plain", "double"),
            ("pass-through", "passed"),
        ];
        let bodies = configs.map(|(config, model)| {
            let body = write_body(
                dir.path(),
                &format!("{model}-{floats}"),
                &infer_request(model, &[floats as i64], &values),
            );
            (config, model, body)
        });
        for (config, _, body) in &bodies {
            let addr = if *config == "echo" {
                &echo
            } else {
                &plain_addr
            };
            drive(addr, body, CLIENTS, Amount::Requests(50)).await;
        }
        for round in 1..=ROUNDS {
            for (config, model, body) in &bodies {
                let (srv, addr) = if *config == "echo" {
                    (None, &echo)
                } else {
                    (Some(&plain), &plain_addr)
                };
                let measured = cell(srv, addr, model, body, CLIENTS).await;
                rows.push((label, round, *config, measured));
            }
        }
    }
    println!(
        "\n## Large tensors: y = 2x, gRPC ModelInfer raw contents, h2load c={CLIENTS}, {SECONDS} s per cell"
    );
    println!(
        "| payload | round | configuration | req/s | MiB/s in | p50 | p99 | HTTP failed | server counted |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (label, round, config, cell) in &rows {
        let mib = if *label == "1 MiB" { 1.0 } else { 16.0 };
        println!(
            "| {label} | {round} | {config} | {:.0} | {:.0} | {:.0} µs | {:.0} µs | {} | {} |",
            cell.run.req_per_s,
            cell.run.req_per_s * mib,
            cell.run.p50_us,
            cell.run.p99_us,
            cell.run.failed,
            server_counted(cell)
        );
    }
    let get = |label: &str, round: usize, config: &str| {
        rows.iter()
            .find(|(l, r, c, _)| *l == label && *r == round && *c == config)
            .expect("cell")
            .3
            .run
            .req_per_s
    };
    for label in ["1 MiB", "16 MiB"] {
        let r: Vec<f64> = (1..=ROUNDS)
            .map(|round| get(label, round, "plain") / get(label, round, "echo"))
            .collect();
        goals.push(Goal {
            measure: format!("{label} f32, plain ÷ tonic echo (rounds)"),
            value: ratios(&r),
            goal: "≥ 0.8",
        });
    }
    for label in ["1 MiB", "16 MiB"] {
        let r: Vec<f64> = (1..=ROUNDS)
            .map(|round| get(label, round, "pass-through") / get(label, round, "plain"))
            .collect();
        goals.push(Goal {
            measure: format!("{label} f32, one pass-through processor ÷ plain (rounds)"),
            value: ratios(&r),
            goal: if label == "1 MiB" {
                "≥ 0.7"
            } else {
                "(no goal)"
            },
        });
    }
    plain.stop().await;
}

// ---------------------------------------------------------------------------
// `rest`: wrk on REST infer against a bare axum echo.

async fn rest(goals: &mut Vec<Goal>) {
    const CONNECTIONS: u32 = 16;
    let axum = echo::start_axum().await;
    let plain = plain_server().await;
    let values: Vec<String> = (0..16).map(|i| format!("{i}.0")).collect();
    let body = format!(
        "{{\"inputs\":[{{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[16],\"data\":[{}]}}]}}",
        values.join(",")
    );
    // Both answer the body correctly before anything is timed.
    let client = reqwest::Client::new();
    for base in [&axum, &plain.http_url()] {
        let text = client
            .post(format!("{base}/v2/models/double/infer"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
        let data = &answer["outputs"][0]["data"];
        assert_eq!(data.as_array().map(Vec::len), Some(16), "{base}: {answer}");
    }
    let mut rows = Vec::new();
    for round in 1..=ROUNDS {
        for (config, base) in [("axum echo", axum.clone()), ("Plinth", plain.http_url())] {
            let srv = (config == "Plinth").then_some(&plain);
            let before = counts(srv, "double").await;
            let url = format!("{base}/v2/models/double/infer");
            let body = body.clone();
            let run = tokio::task::spawn_blocking(move || wrk(&url, &body, CONNECTIONS, SECONDS))
                .await
                .unwrap();
            let after = counts(srv, "double").await;
            let counted = match (before, after) {
                (Some(b), Some(a)) => format!("{} ok, {} failed", a.0 - b.0, a.1 - b.1),
                _ => "(echo)".to_owned(),
            };
            rows.push((round, config, run, counted));
        }
    }
    println!("\n## REST infer, JSON, 16 floats, wrk -c {CONNECTIONS}, {SECONDS} s per cell");
    println!("| round | server | req/s | p50 | p99 | requests | errors | server counted |");
    println!("|---|---|---|---|---|---|---|---|");
    for (round, config, run, counted) in &rows {
        println!(
            "| {round} | {config} | {:.0} | {:.0} µs | {:.0} µs | {} | {} | {counted} |",
            run.req_per_s, run.p50_us, run.p99_us, run.requests, run.errors
        );
    }
    let r: Vec<f64> = (1..=ROUNDS)
        .map(|round| {
            let rps = |config: &str| {
                rows.iter()
                    .find(|(r, c, _, _)| *r == round && *c == config)
                    .unwrap()
                    .2
                    .req_per_s
            };
            rps("Plinth") / rps("axum echo")
        })
        .collect();
    goals.push(Goal {
        measure: format!("REST infer (wrk, JSON, c={CONNECTIONS}) ÷ bare axum echo (rounds)"),
        value: ratios(&r),
        goal: "≥ 0.7",
    });
    plain.stop().await;
}

// ---------------------------------------------------------------------------
// `cnn`: the CNN at batch 32 against the same TorchScript in-process.

async fn cnn(goals: &mut Vec<Goal>) {
    const BATCH: usize = 32;
    let srv = TestServer::start(
        |repo| fixtures::cnn(repo, "cnn", |c| c.dynamic_batching(false)),
        true,
    )
    .await;
    srv.wait_ready("cnn").await;
    let threads = srv
        .info()
        .await
        .thread_budget
        .map_or(1, |b| b.intra_op_threads as usize)
        .max(1);
    let addr = srv.running().grpc_addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let pixels = fixtures::images(BATCH);
    let body = write_body(
        dir.path(),
        "cnn32",
        &infer_request("cnn", &[BATCH as i64, 3, 32, 32], &pixels),
    );
    let model_path = plinth_tests::model_file(srv.repo.path(), "cnn", "1");
    // The same module, in this process, on a thread of its own with the
    // executor's intra-op thread count, one batch after another.
    let in_process = move |seconds: u64| -> f64 {
        let model_path = model_path.clone();
        let pixels = fixtures::images(BATCH);
        script_images_per_s(
            model_path,
            pixels,
            [BATCH as i64, 3, 32, 32],
            threads,
            seconds,
        )
    };
    drive(&addr, &body, 1, Amount::Requests(50)).await;
    let mut rows = Vec::new();
    for round in 1..=ROUNDS {
        let direct = tokio::task::spawn_blocking({
            let in_process = in_process.clone();
            move || in_process(SECONDS)
        })
        .await
        .unwrap();
        rows.push((round, "in-process tch".to_owned(), direct, String::new()));
        for c in [1u32, 2] {
            let measured = cell(Some(&srv), &addr, "cnn", &body, c).await;
            rows.push((
                round,
                format!("Plinth, h2load c={c}"),
                measured.run.req_per_s * BATCH as f64,
                format!(
                    "p50 {:.0} µs, p99 {:.0} µs; {}",
                    measured.run.p50_us,
                    measured.run.p99_us,
                    server_counted(&measured)
                ),
            ));
        }
    }
    println!(
        "\n## CNN (3x32x32 → 10) at batch {BATCH}: the server against the same TorchScript in-process, {threads} intra-op threads, {SECONDS} s per cell"
    );
    println!("| round | path | images/s | detail |");
    println!("|---|---|---|---|");
    for (round, path, images, detail) in &rows {
        println!("| {round} | {path} | {images:.0} | {detail} |");
    }
    for c in [1u32, 2] {
        let r: Vec<f64> = (1..=ROUNDS)
            .map(|round| {
                let at = |path: &str| {
                    rows.iter()
                        .find(|(r, p, _, _)| *r == round && p == path)
                        .unwrap()
                        .2
                };
                at(&format!("Plinth, h2load c={c}")) / at("in-process tch")
            })
            .collect();
        goals.push(Goal {
            measure: format!(
                "CNN batch {BATCH}, images/s ÷ in-process ({threads} threads), h2load c={c} (rounds)"
            ),
            value: ratios(&r),
            goal: "≥ 0.9",
        });
    }
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// `pt2`: AOTInductor packages against TorchScript, the same modules.

/// Seconds per `pt2` cell: twelve cells a round keep the section near two
/// minutes.
const PT2_SECONDS: u64 = 5;
/// The CNN package's largest batch: exported for 1..=32 rows, inductor
/// compiled its convolutions for 2..=15 (`tests/fixtures/pt2/make.py`).
const PT2_BATCH: usize = 15;

fn pt2_fixture(name: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/pt2")
        .join(name)
        .join(file)
}

/// Version 1 of `model`: the fixture's `file` (`model.pt2` or `model.pt`).
fn install_pt2(repo: &Path, model: &str, fixture: &str, file: &str) {
    let dir = repo.join(model).join("1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(pt2_fixture(fixture, file), dir.join(file)).unwrap();
}

/// A fixture's `.npy` input or expected output, as a tensor named `name`.
fn pt2_npy(fixture: &str, file: &str, name: &str) -> Tensor {
    plinth_torch::read_npy(&pt2_fixture(fixture, file), name).unwrap()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// An OIP request for `model` carrying `tensor` (f32) under its own name.
fn tensor_request(model: &str, tensor: &Tensor) -> ipb::ModelInferRequest {
    let mut request = infer_request(model, tensor.shape(), &f32s(tensor.data()));
    request.inputs[0].name = tensor.name().to_owned();
    request
}

/// One Compute call of `model` on a fixture's input against the answer
/// PyTorch's package gave (`expected_<label>_0.npy`): the largest absolute
/// difference, 0 when bit for bit.
async fn pt2_check(srv: &TestServer, model: &str, fixture: &str, label: &str) -> String {
    let (input, output) = if fixture == "cnn" {
        ("image", "logits")
    } else {
        ("x", "y")
    };
    let x = pt2_npy(fixture, &format!("input_{label}_0.npy"), input);
    let want = pt2_npy(fixture, &format!("expected_{label}_0.npy"), output);
    let answer = srv
        .compute()
        .await
        .compute(compute_request(
            model,
            vec![f32_tensor(input, x.shape(), &f32s(x.data()))],
        ))
        .await;
    let verdict = match answer {
        Err(status) => format!("FAILED: {status}"),
        Ok(answer) => {
            let answer = answer.into_inner();
            let got = &answer.outputs[0];
            if got.shape != want.shape() {
                format!("FAILED: shape {:?}, want {:?}", got.shape, want.shape())
            } else {
                let most = f32_values(got)
                    .iter()
                    .zip(f32s(want.data()))
                    .map(|(g, w)| (g - w).abs())
                    .fold(0f32, f32::max);
                if most == 0.0 {
                    "bit for bit".to_owned()
                } else if most < 1e-4 {
                    format!("max |Δ| {most:.1e}")
                } else {
                    format!("FAILED: max |Δ| {most:.1e}")
                }
            }
        }
    };
    format!("{model} on {fixture} {label} against PyTorch's package: {verdict}")
}

/// The CNN package at batch 15 in this process, through [`AotiPackage`] as
/// an executor runs it (bytes in, bytes out), on a thread of its own with
/// `threads` intra-op threads, one batch after another: images/s.
fn package_in_process(path: PathBuf, threads: usize, seconds: u64) -> f64 {
    std::thread::spawn(move || {
        plinth_torch::set_intra_op_threads(threads);
        let info = PackageInfo::read(&path).unwrap();
        let package = AotiPackage::load(&path, &info, 1, DeviceSpec::Cpu, true).unwrap();
        let input = pt2_npy("cnn", "input_b15_0.npy", "image");
        let outputs = [TensorSpec {
            name: "logits".into(),
            dtype: DType::F32,
            shape: vec![-1, 10],
        }];
        let inputs = [input];
        for _ in 0..20 {
            package.forward(&inputs, &outputs).unwrap();
        }
        let started = Instant::now();
        let mut batches = 0u64;
        while started.elapsed() < Duration::from_secs(seconds) {
            let out = package.forward(&inputs, &outputs).unwrap();
            std::hint::black_box(&out);
            batches += 1;
        }
        (batches as usize * PT2_BATCH) as f64 / started.elapsed().as_secs_f64()
    })
    .join()
    .unwrap()
}

/// The CNN's TorchScript twin at batch 15 in this process, the same way.
fn script_in_process(path: PathBuf, threads: usize, seconds: u64) -> f64 {
    let pixels = f32s(pt2_npy("cnn", "input_b15_0.npy", "image").data());
    script_images_per_s(
        path,
        pixels,
        [PT2_BATCH as i64, 3, 16, 16],
        threads,
        seconds,
    )
}

/// Images per second of the TorchScript classifier at `path` (10 logits an
/// image) on a thread of its own with `threads` intra-op threads: a batch
/// of `pixels` shaped `shape`, 20 warm-up passes, then `seconds` of passes,
/// each output copied out as a server would.
fn script_images_per_s(
    path: PathBuf,
    pixels: Vec<f32>,
    shape: [i64; 4],
    threads: usize,
    seconds: u64,
) -> f64 {
    let batch = usize::try_from(shape[0]).expect("a batch size");
    std::thread::spawn(move || {
        plinth_torch::set_intra_op_threads(threads);
        let module = tch::CModule::load(&path).unwrap();
        let input = tch::Tensor::from_slice(&pixels).reshape(shape);
        let _guard = tch::no_grad_guard();
        for _ in 0..20 {
            let _ = module.forward_ts(&[&input]).unwrap();
        }
        let started = Instant::now();
        let mut batches = 0u64;
        while started.elapsed() < Duration::from_secs(seconds) {
            let out = module.forward_ts(&[&input]).unwrap();
            let mut logits = vec![0f32; batch * 10];
            out.copy_data(&mut logits, batch * 10);
            std::hint::black_box(&logits);
            batches += 1;
        }
        (batches as usize * batch) as f64 / started.elapsed().as_secs_f64()
    })
    .join()
    .unwrap()
}

/// The child side of a `pt2` "own process" cell: [`package_in_process`]
/// or [`script_in_process`] (`format`) on the file and thread count the
/// bench passes, in a process holding no other OpenMP thread; prints
/// images/s.
fn pt2_own_process(format: &str) {
    let path = PathBuf::from(std::env::var_os("PLINTH_PERF_PT2_FILE").expect("the model file"));
    let threads = std::env::var("PLINTH_PERF_PT2_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let images = match format {
        "package" => package_in_process(path, threads, PT2_SECONDS),
        _ => script_in_process(path, threads, PT2_SECONDS),
    };
    println!("{images}");
}

/// Runs [`pt2_own_process`] in a child process of this bench: images/s.
fn in_own_process(format: &str, path: &Path, threads: usize) -> f64 {
    let out = Command::new(std::env::current_exe().expect("this bench's path"))
        .env(CLIENT_ROLE, format!("pt2-{format}"))
        .env("PLINTH_PERF_PT2_FILE", path)
        .env("PLINTH_PERF_PT2_THREADS", threads.to_string())
        .stderr(Stdio::inherit())
        .output()
        .expect("a child process");
    assert!(out.status.success(), "the {format} child failed");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("images/s from the child")
}

/// One measured `pt2` row.
struct Pt2Row {
    round: usize,
    /// `cnn b15`, `cnn b1` or `tiny b1`.
    load: &'static str,
    /// `package` or `TorchScript`.
    format: &'static str,
    /// `in-process`, `own process` or `Plinth c=N`.
    path: String,
    /// Images/s (rows/s): requests/s × batch through Plinth.
    rows_per_s: f64,
    p50_us: Option<f64>,
    detail: String,
}

/// Unloads the model `loaded` names (waiting until its executor threads,
/// and their OpenMP teams, are gone), then loads `want` and warms it with
/// `warm`: each cell runs with only its own model in the server, as a
/// one-model deployment would, and nothing loaded during the in-process
/// cells.
async fn serve_only(
    srv: &TestServer,
    loaded: &mut Option<&'static str>,
    want: Option<(&'static str, &Path, u64)>,
) {
    if *loaded == want.map(|(model, _, _)| model) {
        return;
    }
    if let Some(model) = loaded.take() {
        srv.models()
            .await
            .unload_model(pb::UnloadModelRequest { name: model.into() })
            .await
            .unwrap();
        srv.wait_for(model, |s| s.state == ModelState::Unavailable as i32)
            .await;
    }
    if let Some((model, body, warm)) = want {
        let status = srv.load(model).await.unwrap();
        assert_eq!(
            status.state,
            ModelState::Ready as i32,
            "{model}: {status:?}"
        );
        let addr = srv.running().grpc_addr.to_string();
        drive(&addr, body, 1, Amount::Requests(warm)).await;
        *loaded = Some(model);
    }
}

async fn pt2(goals: &mut Vec<Goal>) {
    // The CNN and the tiny model, each as a package and as TorchScript, in
    // one server that loads one at a time; the same config for both
    // formats, whole requests straight to the model (no dynamic batching),
    // as the `cnn` section serves.
    let srv = TestServer::start(
        |repo| {
            let cnn = fixtures::config()
                .max_batch_size(PT2_BATCH as i64)
                .dynamic_batching(false)
                .input("image", "f32", &[3, 16, 16])
                .output("logits", "f32", &[10]);
            let tiny = fixtures::config()
                .max_batch_size(64)
                .dynamic_batching(false)
                .input("x", "f32", &[16])
                .output("y", "f32", &[16]);
            for (model, config, fixture, file) in [
                ("cnn_pt2", &cnn, "cnn", "model.pt2"),
                ("cnn_pt", &cnn, "cnn", "model.pt"),
                ("tiny_pt2", &tiny, "tiny", "model.pt2"),
                ("tiny_pt", &tiny, "tiny", "model.pt"),
            ] {
                config.write(repo, model);
                install_pt2(repo, model, fixture, file);
            }
        },
        false,
    )
    .await;
    let addr = srv.running().grpc_addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let b15 = pt2_npy("cnn", "input_b15_0.npy", "image");
    let b1 = pt2_npy("cnn", "input_b1_0.npy", "image");
    let x1 = pt2_npy("tiny", "input_b1_0.npy", "x");
    // (load, format, model, rows per request, request body)
    let served = [
        ("cnn b15", "package", "cnn_pt2", PT2_BATCH, &b15),
        ("cnn b15", "TorchScript", "cnn_pt", PT2_BATCH, &b15),
        ("cnn b1", "package", "cnn_pt2", 1, &b1),
        ("cnn b1", "TorchScript", "cnn_pt", 1, &b1),
        ("tiny b1", "package", "tiny_pt2", 1, &x1),
        ("tiny b1", "TorchScript", "tiny_pt", 1, &x1),
    ]
    .map(|(load, format, model, batch, input)| {
        let name = format!("{model}-{}", load.replace(' ', "-"));
        let body = write_body(dir.path(), &name, &tensor_request(model, input));
        (load, format, model, batch, body)
    });
    let warm = |rows: usize| if rows == 1 { 2_000 } else { 200 };

    // Each model once: what it loaded as, its executor's intra-op threads
    // (the in-process runs use the package's) and its answers.
    let mut loaded = None;
    let mut described = Vec::new();
    let mut checks = Vec::new();
    let mut cnn_threads = 1;
    for (model, fixture, labels) in [
        ("cnn_pt2", "cnn", &["b15", "b1"][..]),
        ("cnn_pt", "cnn", &["b15", "b1"]),
        ("tiny_pt2", "tiny", &["b1"]),
        ("tiny_pt", "tiny", &["b1"]),
    ] {
        let (_, _, _, rows, body) = served.iter().find(|s| s.2 == model).unwrap();
        serve_only(&srv, &mut loaded, Some((model, body, warm(*rows)))).await;
        let detail = srv.detail(model).await;
        let formats = detail
            .status
            .as_ref()
            .map_or(String::new(), |s| s.formats.join(", "));
        described.push(format!(
            "{model}: {formats} ({} intra-op threads)",
            detail.intra_op_threads
        ));
        if model == "cnn_pt2" {
            cnn_threads = (detail.intra_op_threads as usize).max(1);
        }
        for label in labels {
            checks.push(format!(
                "before: {}",
                pt2_check(&srv, model, fixture, label).await
            ));
        }
    }
    let package_path = srv.repo.path().join("cnn_pt2/1/model.pt2");
    let script_path = srv.repo.path().join("cnn_pt/1/model.pt");

    let mut rows: Vec<Pt2Row> = Vec::new();
    for round in 1..=ROUNDS {
        // Each pair package / TorchScript side by side, the order swapped
        // every other round so that drift within a pair hits both alike.
        let swap = round % 2 == 0;
        let ordered = |pair: [&'static str; 2]| {
            if swap { [pair[1], pair[0]] } else { pair }
        };
        serve_only(&srv, &mut loaded, None).await;
        for format in ordered(["package", "TorchScript"]) {
            let (package_path, script_path) = (package_path.clone(), script_path.clone());
            let images = tokio::task::spawn_blocking(move || {
                if format == "package" {
                    package_in_process(package_path, cnn_threads, PT2_SECONDS)
                } else {
                    script_in_process(script_path, cnn_threads, PT2_SECONDS)
                }
            })
            .await
            .unwrap();
            rows.push(Pt2Row {
                round,
                load: "cnn b15",
                format,
                path: "in-process".into(),
                rows_per_s: images,
                p50_us: None,
                detail: "this process, beside the idle server".into(),
            });
        }
        // The same in a process of its own, where the forward's OpenMP team
        // is the only one: libgomp spins at its barriers there, while in a
        // process holding more OpenMP threads than cores (the server's
        // executors and loaders) it spins briefly and sleeps.
        for format in ordered(["package", "TorchScript"]) {
            let path = if format == "package" {
                package_path.clone()
            } else {
                script_path.clone()
            };
            let images =
                tokio::task::spawn_blocking(move || in_own_process(format, &path, cnn_threads))
                    .await
                    .unwrap();
            rows.push(Pt2Row {
                round,
                load: "cnn b15",
                format,
                path: "own process".into(),
                rows_per_s: images,
                p50_us: None,
                detail: "a child process, no server".into(),
            });
        }
        for (load, concurrencies) in [
            ("cnn b15", &[1u32, 2][..]),
            ("cnn b1", &[1]),
            ("tiny b1", &[1]),
        ] {
            for &c in concurrencies {
                for format in ordered(["package", "TorchScript"]) {
                    let (_, _, model, batch, body) = served
                        .iter()
                        .find(|s| s.0 == load && s.1 == format)
                        .expect("a served configuration");
                    serve_only(&srv, &mut loaded, Some((model, body, warm(*batch)))).await;
                    let measured = cell_for(Some(&srv), &addr, model, body, c, PT2_SECONDS).await;
                    rows.push(Pt2Row {
                        round,
                        load,
                        format,
                        path: format!("Plinth c={c}"),
                        rows_per_s: measured.run.req_per_s * *batch as f64,
                        p50_us: Some(measured.run.p50_us),
                        detail: format!(
                            "{:.0} req/s, p99 {:.0} µs; HTTP failed {}; {}",
                            measured.run.req_per_s,
                            measured.run.p99_us,
                            measured.run.failed,
                            server_counted(&measured)
                        ),
                    });
                }
            }
        }
    }
    for (model, fixture, label) in [
        ("cnn_pt2", "cnn", "b15"),
        ("cnn_pt", "cnn", "b15"),
        ("tiny_pt2", "tiny", "b1"),
        ("tiny_pt", "tiny", "b1"),
    ] {
        let (_, _, _, rows, body) = served.iter().find(|s| s.2 == model).unwrap();
        serve_only(&srv, &mut loaded, Some((model, body, warm(*rows)))).await;
        checks.push(format!(
            "after: {}",
            pt2_check(&srv, model, fixture, label).await
        ));
    }

    println!(
        "\n## AOTInductor package against TorchScript, the same modules: CNN (3x16x16 → 10) at batch {PT2_BATCH} and 1, y = 2x over 16 floats at batch 1; {cnn_threads} intra-op threads in-process, one model loaded at a time, {PT2_SECONDS} s per cell"
    );
    println!("| round | load | format | path | rows/s | p50 | detail |");
    println!("|---|---|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {} | {} | {} | {:.0} | {} | {} |",
            row.round,
            row.load,
            row.format,
            row.path,
            row.rows_per_s,
            row.p50_us.map_or(String::new(), |p| format!("{p:.0} µs")),
            row.detail
        );
    }
    println!("\nmodels served, one at a time:");
    for line in described {
        println!("- {line}");
    }
    println!("\ncorrectness (Compute against PyTorch's package outputs):");
    for line in checks {
        println!("- {line}");
    }

    let get = |round: usize, load: &str, format: &str, path: &str| {
        rows.iter()
            .find(|r| r.round == round && r.load == load && r.format == format && r.path == path)
            .expect("a measured row")
    };
    let per_round = |f: &dyn Fn(usize) -> f64| (1..=ROUNDS).map(f).collect::<Vec<f64>>();
    for c in [1u32, 2] {
        let path = format!("Plinth c={c}");
        let r = per_round(&|round| {
            get(round, "cnn b15", "package", &path).rows_per_s
                / get(round, "cnn b15", "package", "in-process").rows_per_s
        });
        goals.push(Goal {
            measure: format!(
                "CNN package batch {PT2_BATCH}, images/s through Plinth ÷ AotiPackage in-process ({cnn_threads} threads), h2load c={c} (rounds)"
            ),
            value: ratios(&r),
            goal: "≥ 0.9",
        });
    }
    for c in [1u32, 2] {
        let path = format!("Plinth c={c}");
        let r = per_round(&|round| {
            get(round, "cnn b15", "package", &path).rows_per_s
                / get(round, "cnn b15", "TorchScript", &path).rows_per_s
        });
        goals.push(Goal {
            measure: format!(
                "CNN batch {PT2_BATCH}, images/s through Plinth, package ÷ TorchScript, h2load c={c} (rounds)"
            ),
            value: ratios(&r),
            goal: "report (≥ 1: a package should not lose)",
        });
    }
    for c in [1u32, 2] {
        let path = format!("Plinth c={c}");
        let r = per_round(&|round| {
            get(round, "cnn b15", "package", &path).rows_per_s
                / get(round, "cnn b15", "package", "own process").rows_per_s
        });
        goals.push(Goal {
            measure: format!(
                "CNN package batch {PT2_BATCH}, images/s through Plinth ÷ AotiPackage in a process of its own, h2load c={c} (rounds)"
            ),
            value: ratios(&r),
            goal: "(no goal)",
        });
    }
    for (path, what) in [
        ("in-process", "in-process beside the server"),
        ("own process", "in a process of its own"),
    ] {
        let r = per_round(&|round| {
            get(round, "cnn b15", "package", path).rows_per_s
                / get(round, "cnn b15", "TorchScript", path).rows_per_s
        });
        goals.push(Goal {
            measure: format!(
                "CNN batch {PT2_BATCH}, images/s {what}, package ÷ TorchScript (rounds)"
            ),
            value: ratios(&r),
            goal: "(no goal)",
        });
    }
    for (load, what) in [
        ("cnn b1", "CNN batch 1"),
        ("tiny b1", "y = 2x, 16 floats, batch 1"),
    ] {
        let r = per_round(&|round| {
            get(round, load, "package", "Plinth c=1").p50_us.unwrap()
                / get(round, load, "TorchScript", "Plinth c=1")
                    .p50_us
                    .unwrap()
        });
        let pairs: Vec<String> = (1..=ROUNDS)
            .map(|round| {
                format!(
                    "{:.0} vs {:.0} µs",
                    get(round, load, "package", "Plinth c=1").p50_us.unwrap(),
                    get(round, load, "TorchScript", "Plinth c=1")
                        .p50_us
                        .unwrap()
                )
            })
            .collect();
        goals.push(Goal {
            measure: format!("{what}, p50 through Plinth at c=1, package ÷ TorchScript (rounds)"),
            value: format!("{} ({})", ratios(&r), pairs.join(", ")),
            goal: if load == "cnn b1" {
                "report (≤ 1: a package should not lose)"
            } else {
                "report"
            },
        });
    }
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// `loads`: latency while large models load, from clients in their own
// processes.

/// The client side of `loads`, in a child process: calls `role` (`list` or
/// `compute`) against the server at `PLINTH_PERF_ADDR` one after another
/// until its stdin closes, then prints each call's latency in µs, one per
/// line. The first 100 calls warm up and are not printed.
async fn client(role: &str) {
    let addr = std::env::var("PLINTH_PERF_ADDR").expect("PLINTH_PERF_ADDR");
    let channel = tonic::transport::Endpoint::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut sink = String::new();
            while std::io::stdin().lock().read_line(&mut sink).unwrap_or(0) > 0 {}
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let mut models = pb::model_service_client::ModelServiceClient::new(channel.clone());
    let mut compute = pb::compute_service_client::ComputeServiceClient::new(channel);
    let request = compute_request("small", vec![f32_tensor("x", &[4], &[1.0, 2.0, 3.0, 4.0])]);
    let mut latencies = Vec::new();
    let mut calls = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let t = Instant::now();
        match role {
            "list" => {
                models.list_models(pb::ListModelsRequest {}).await.unwrap();
            }
            _ => {
                let out = compute.compute(request.clone()).await.unwrap().into_inner();
                assert_eq!(out.outputs.len(), 1);
            }
        }
        calls += 1;
        if calls > 100 {
            latencies.push(t.elapsed().as_micros() as u64);
        }
    }
    let mut out = std::io::stdout().lock();
    for us in latencies {
        writeln!(out, "{us}").unwrap();
    }
}

struct Clients {
    children: Vec<(&'static str, std::process::Child)>,
}

impl Clients {
    fn start(addr: &str) -> Clients {
        let exe = std::env::current_exe().expect("this bench's path");
        let children = ["list", "compute"]
            .map(|role| {
                let child = Command::new(&exe)
                    .env(CLIENT_ROLE, role)
                    .env("PLINTH_PERF_ADDR", addr)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("a client process");
                (role, child)
            })
            .into();
        Clients { children }
    }

    /// Closes the clients' stdin and collects their latencies, by role.
    fn finish(self) -> Vec<(&'static str, Vec<Duration>)> {
        self.children
            .into_iter()
            .map(|(role, mut child)| {
                drop(child.stdin.take());
                let out = child.wait_with_output().expect("client output");
                let latencies = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| l.parse().ok())
                    .map(Duration::from_micros)
                    .collect();
                (role, latencies)
            })
            .collect()
    }
}

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64, f64, usize) {
    samples.sort();
    if samples.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN, 0);
    }
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (
        ms(at(0.5)),
        ms(at(0.99)),
        ms(*samples.last().unwrap()),
        samples.len(),
    )
}

async fn loads(goals: &mut Vec<Goal>) {
    let big = ["big_a", "big_b", "big_c"];
    let srv = TestServer::start(
        |repo| {
            fixtures::scale(repo, "small", "1", 2.0);
            for name in big {
                fixtures::large(repo, name, LOAD_FLOATS);
            }
        },
        false,
    )
    .await;
    srv.load("small").await.unwrap();
    let size = std::fs::metadata(plinth_tests::model_file(srv.repo.path(), "big_a", "1"))
        .unwrap()
        .len();
    // The page cache holds the files in every run alike.
    for name in big {
        let _ = std::fs::read(plinth_tests::model_file(srv.repo.path(), name, "1")).unwrap();
    }
    let addr = srv.grpc_url();
    let mut models = srv.models().await;
    let unload_all = async |models: &mut pb::model_service_client::ModelServiceClient<_>| {
        for name in big {
            models
                .unload_model(pb::UnloadModelRequest { name: name.into() })
                .await
                .unwrap();
            srv.wait_for(name, |s| s.state == ModelState::Unavailable as i32)
                .await;
        }
    };
    let mut rows = Vec::new();
    for round in 1..=ROUNDS {
        // Nothing loading, as long as the loads take below.
        let clients = Clients::start(&addr);
        tokio::time::sleep(Duration::from_secs(5)).await;
        for (role, latencies) in clients.finish() {
            rows.push((round, "idle", role, percentiles(latencies)));
        }
        // Three loads at once.
        let clients = Clients::start(&addr);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = Instant::now();
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
        for name in big {
            srv.wait_ready(name).await;
        }
        let wall = started.elapsed();
        for (role, latencies) in clients.finish() {
            rows.push((round, "3 loads", role, percentiles(latencies)));
        }
        println!(
            "round {round}: three loads took {:.2} s",
            wall.as_secs_f64()
        );
        unload_all(&mut models).await;
    }
    // Three loads at once against one after another, nothing else running.
    let mut load_rows = Vec::new();
    for round in 1..=ROUNDS {
        let t = Instant::now();
        for name in big {
            srv.load(name).await.unwrap();
        }
        let sequential = t.elapsed();
        unload_all(&mut models).await;
        let t = Instant::now();
        let mut waits = Vec::new();
        for name in big {
            let mut client = models.clone();
            waits.push(tokio::spawn(async move {
                client
                    .load_model(pb::LoadModelRequest {
                        name: name.into(),
                        reload: false,
                        wait: true,
                    })
                    .await
            }));
        }
        for wait in waits {
            wait.await.unwrap().unwrap();
        }
        let concurrent = t.elapsed();
        unload_all(&mut models).await;
        load_rows.push((round, sequential, concurrent));
    }
    println!(
        "\n## While three {} MB models load: latency from clients in their own processes",
        size / 1_000_000
    );
    println!("| round | phase | call | calls | p50 | p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    for (round, phase, role, (p50, p99, max, n)) in &rows {
        println!("| {round} | {phase} | {role} | {n} | {p50:.2} ms | {p99:.2} ms | {max:.2} ms |");
    }
    println!(
        "\n| round | 3 loads one after another | 3 loads at once | at once ÷ one after another |"
    );
    println!("|---|---|---|---|");
    for (round, sequential, concurrent) in &load_rows {
        println!(
            "| {round} | {:.0} ms | {:.0} ms | {:.2} |",
            sequential.as_secs_f64() * 1e3,
            concurrent.as_secs_f64() * 1e3,
            concurrent.as_secs_f64() / sequential.as_secs_f64()
        );
    }
    let p99 = |round: usize, phase: &str, role: &str| {
        rows.iter()
            .find(|(r, p, c, _)| *r == round && *p == phase && *c == role)
            .unwrap()
            .3
            .1
    };
    let list: Vec<f64> = (1..=ROUNDS).map(|r| p99(r, "3 loads", "list")).collect();
    goals.push(Goal {
        measure: "ListModels p99 during 3 concurrent loads, ms (rounds)".into(),
        value: ratios(&list),
        goal: "≤ 1 ms",
    });
    let compute: Vec<f64> = (1..=ROUNDS)
        .map(|r| p99(r, "3 loads", "compute") / p99(r, "idle", "compute"))
        .collect();
    goals.push(Goal {
        measure: "Compute p99 on a ready model during the loads ÷ idle (rounds)".into(),
        value: ratios(&compute),
        goal: "≤ 2×",
    });
    let ratio: Vec<f64> = load_rows
        .iter()
        .map(|(_, s, c)| c.as_secs_f64() / s.as_secs_f64())
        .collect();
    goals.push(Goal {
        measure: "3 concurrent loads ÷ sequential, wall time (rounds)".into(),
        value: ratios(&ratio),
        goal: "≤ 0.6",
    });
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// `residency`: an on-demand model's cold start against its warm latency.

async fn residency(goals: &mut Vec<Goal>) {
    const BATCH: i64 = 8;
    const COLD: usize = 10;
    const WARM_PER_COLD: usize = 20;
    let srv = TestServer::start(
        |repo| {
            fixtures::cnn(repo, "cnn", |c| {
                c.dynamic_batching(false).residency("on-demand")
            })
        },
        true,
    )
    .await;
    let pixels = fixtures::images(BATCH as usize);
    let request = || {
        plinth_tests::compute_request(
            "cnn",
            vec![plinth_tests::f32_tensor("x", &[BATCH, 3, 32, 32], &pixels)],
        )
    };
    let mut compute = srv.compute().await;
    let mut models = srv.models().await;
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..COLD {
        if srv.status("cnn").await.state() == pb::ModelState::Ready {
            models
                .unload_model(pb::UnloadModelRequest { name: "cnn".into() })
                .await
                .expect("unload");
            srv.wait_for("cnn", |s| s.state() == pb::ModelState::Unavailable)
                .await;
        }
        let started = Instant::now();
        compute.compute(request()).await.expect("cold request");
        cold.push(started.elapsed());
        for _ in 0..WARM_PER_COLD {
            let started = Instant::now();
            compute.compute(request()).await.expect("warm request");
            warm.push(started.elapsed());
        }
    }
    let counts = srv.info().await.residency.expect("residency counts");
    let median = |mut samples: Vec<Duration>| {
        samples.sort();
        samples[samples.len() / 2].as_secs_f64() * 1e3
    };
    let (cold_ms, warm_ms) = (median(cold.clone()), median(warm.clone()));
    println!(
        "\n## On-demand residency: the CNN at batch {BATCH}, first request after an unload against requests once loaded"
    );
    println!("| requests | median | max |");
    println!("|---|---|---|");
    for (what, samples) in [("cold (loads the model)", &cold), ("warm", &warm)] {
        println!(
            "| {} {what} | {:.2} ms | {:.2} ms |",
            samples.len(),
            median(samples.clone()),
            samples.iter().max().unwrap().as_secs_f64() * 1e3
        );
    }
    println!(
        "server: {} on-demand loads, {:.1} ms each on average from the request to READY; {} hits, {} misses",
        counts.on_demand_loads,
        counts.on_demand_load_us_total as f64 / 1e3 / counts.on_demand_loads.max(1) as f64,
        counts.hits,
        counts.misses
    );
    goals.push(Goal {
        measure: format!(
            "on-demand CNN, cold first request ÷ warm request, median (batch {BATCH})"
        ),
        value: format!(
            "{:.1}× ({cold_ms:.1} ms vs {warm_ms:.2} ms)",
            cold_ms / warm_ms
        ),
        goal: "(reported)",
    });
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// `alloc`: the real binary with each global allocator.

/// A `plinth serve` process of one of the allocator builds.
struct Served {
    name: String,
    child: std::process::Child,
    grpc: String,
    /// The REST base URL, `http://127.0.0.1:<port>`.
    http: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Starts `bin` on a repository and plugin directory of its own (the same
/// models and plugins for every build), with `extra` flags, and waits until
/// it is ready. Without `chain`, it serves `double` alone and no plugin: the
/// router and metrics plugins of the chain see every request.
async fn serve_binary(name: &str, bin: &Path, dir: &Path, extra: &[&str], chain: bool) -> Served {
    let repo = dir.join(name).join("models");
    let plugins = dir.join(name).join("plugins");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::create_dir_all(&plugins).unwrap();
    fixtures::scale(&repo, "double", "1", 2.0);
    if chain {
        fixtures::chained(&repo, "chained", 2.0);
        for (plugin, component) in fixtures::CHAIN_PLUGINS {
            plinth_tests::install_plugin(&plugins, plugin, component, None);
        }
    }
    let (grpc, http, metrics) = (free_port(), free_port(), free_port());
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(bin)
        .args(["serve", "--host", "127.0.0.1"])
        .arg("--model-repository")
        .arg(&repo)
        .arg("--plugin-dir")
        .arg(&plugins)
        .args(["--grpc-port", &grpc.to_string()])
        .args(["--http-port", &http.to_string()])
        .args(["--metrics-port", &metrics.to_string()])
        .args(extra)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|err| panic!("starting {}: {err}", bin.display()));
    let served = Served {
        name: name.to_owned(),
        child,
        grpc: format!("127.0.0.1:{grpc}"),
        http: format!("http://127.0.0.1:{http}"),
    };
    let ready = format!("http://127.0.0.1:{http}/v2/health/ready");
    let client = reqwest::Client::new();
    let what = format!(
        "{name} ready (log: {})",
        dir.join(format!("{name}.log")).display()
    );
    plinth_tests::eventually(Duration::from_secs(120), &what, async || {
        match client.get(&ready).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(r.status().to_string()),
            Err(err) => Err(err.to_string()),
        }
    })
    .await;
    served
}

/// `run`, and what a `plinth serve` process at `addr` counted for `model`
/// meanwhile (`"N ok, M failed"`); `"(echo)"` without a model.
async fn counted_while<T>(
    addr: &str,
    model: Option<&str>,
    run: impl Future<Output = T>,
) -> (T, String) {
    let Some(model) = model else {
        return (run.await, "(echo)".to_owned());
    };
    let before = binary_counts(addr, model).await;
    let out = run.await;
    let after = binary_counts(addr, model).await;
    let counted = format!("{} ok, {} failed", after.0 - before.0, after.1 - before.1);
    (out, counted)
}

/// A server's own (successes, failures) for `model`, over gRPC.
async fn binary_counts(addr: &str, model: &str) -> (u64, u64) {
    use plinth::grpc::ipb;
    let client = ipb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(format!(
        "http://{addr}"
    ))
    .await
    .expect("connect for statistics");
    let stats = plinth_tests::model_stats_via(client, model)
        .await
        .inference_stats
        .expect("inference stats");
    (
        stats.success.map_or(0, |s| s.count),
        stats.fail.map_or(0, |s| s.count),
    )
}

async fn alloc(goals: &mut Vec<Goal>) {
    let Ok(list) = std::env::var("PLINTH_PERF_BINS") else {
        println!(
            "\n## Allocators: skipped (PLINTH_PERF_BINS is not set; `cargo xtask bench --bench perf -- alloc` builds the binaries)"
        );
        return;
    };
    let bins: Vec<(String, std::path::PathBuf)> = list
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, path)| (name.to_owned(), path.into()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let models = ["double", "chained"];
    let bodies =
        models.map(|model| write_body(dir.path(), model, &infer_request(model, &[16], &values)));
    let mut servers = Vec::new();
    for (name, bin) in &bins {
        servers.push(serve_binary(name, bin, dir.path(), &[], true).await);
    }
    let mut checks = Vec::new();
    for served in &servers {
        for (model, body) in models.iter().zip(&bodies) {
            checks.push(check(
                &served.grpc,
                model,
                &format!("{}, before", served.name),
            ));
            drive(&served.grpc, body, 4, Amount::Requests(2_000)).await;
        }
    }
    // rows: (round, build, model, c, run, server counted)
    let mut rows = Vec::new();
    for round in 1..=ROUNDS {
        for served in &servers {
            for (model, body) in models.iter().zip(&bodies) {
                for c in [8u32, 64] {
                    let (run, counted) = counted_while(
                        &served.grpc,
                        Some(model),
                        drive(&served.grpc, body, c, Amount::Seconds(SECONDS)),
                    )
                    .await;
                    rows.push((round, served.name.clone(), *model, c, run, counted));
                }
            }
        }
    }
    for served in &servers {
        for model in models {
            checks.push(check(
                &served.grpc,
                model,
                &format!("{}, after", served.name),
            ));
        }
    }
    println!(
        "\n## Allocators: `plinth serve` built with each, y = 2x over 16 floats, h2load {SECONDS} s per cell"
    );
    println!(
        "| round | allocator | model | concurrency | req/s | p50 | p99 | HTTP failed | server counted |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (round, name, model, c, run, counted) in &rows {
        println!(
            "| {round} | {name} | {model} | {c} | {:.0} | {:.0} µs | {:.0} µs | {} | {counted} |",
            run.req_per_s, run.p50_us, run.p99_us, run.failed
        );
    }
    let rps = |round: usize, name: &str, model: &str, c: u32| {
        rows.iter()
            .find(|(r, n, m, cc, _, _)| *r == round && n == name && *m == model && *cc == c)
            .map(|row| row.4.req_per_s)
            .expect("cell")
    };
    for (name, _) in bins.iter().filter(|(name, _)| name != "system") {
        for model in models {
            for c in [8u32, 64] {
                let r: Vec<f64> = (1..=ROUNDS)
                    .map(|round| rps(round, name, model, c) / rps(round, "system", model, c))
                    .collect();
                goals.push(Goal {
                    measure: format!("{name} ÷ system allocator, {model}, c={c} (rounds)"),
                    value: ratios(&r),
                    goal: "> 1 to keep it",
                });
            }
        }
    }
    println!("\ncorrectness checks (tritonclient):");
    for line in checks {
        println!("- {line}");
    }
}

// ---------------------------------------------------------------------------
// `traces`: what OpenTelemetry tracing and the host's serving series cost.

/// The full chain (router, a processor before and after, the metrics
/// plugin: six spans a traced request) at c=8, five servers side by side:
/// tracing off; every request traced to an OTLP collector in this process
/// (gRPC, decoding every export and counting the spans); every request
/// traced to a collector that answers without decoding (the sender's cost
/// alone, as with a collector on another machine); 1% sampled; and tracing
/// off with the serving series off (`--serving-metrics=false`).
/// Rounds of the `traces` section: five configurations, each first once.
const TRACES_ROUNDS: usize = 5;

async fn traces(goals: &mut Vec<Goal>) {
    use plinth::telemetry::{SamplerChoice, TracingConfig};
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let body = write_body(
        dir.path(),
        "chained",
        &infer_request("chained", &[16], &values),
    );
    let collector = plinth_tests::otlp::OtlpReceiver::start_counting().await;
    let sink = plinth_tests::otlp::OtlpReceiver::start_sink().await;
    let traced_to = |sampler: SamplerChoice, endpoint: String| TracingConfig {
        sampler,
        // The SDK's defaults (a 2048-span queue, every 5 s) would drop most
        // spans at these rates; an operator tracing everything sizes the
        // queue for it.
        max_queue: 65_536,
        schedule_delay: Duration::from_millis(200),
        ..TracingConfig::grpc(endpoint)
    };
    let off = chain_server().await;
    let traced = {
        let config = traced_to(SamplerChoice::AlwaysOn, collector.endpoint());
        chain_server_with(|c| c.tracing = Some(config)).await
    };
    let to_sink = {
        let config = traced_to(SamplerChoice::AlwaysOn, sink.endpoint());
        chain_server_with(|c| c.tracing = Some(config)).await
    };
    let sampled = {
        let config = traced_to(SamplerChoice::Ratio(0.01), collector.endpoint());
        chain_server_with(|c| c.tracing = Some(config)).await
    };
    let bare = chain_server_with(|c| c.serving_metrics = false).await;
    let configs: [(&str, &TestServer); 5] = [
        ("off", &off),
        ("traced", &traced),
        ("traced-sink", &to_sink),
        ("sampled", &sampled),
        ("no-series", &bare),
    ];
    let addr = |srv: &TestServer| srv.running().grpc_addr.to_string();
    let mut checks = Vec::new();
    for (name, srv) in configs {
        checks.push(check(&addr(srv), "chained", &format!("{name}, before")));
        drive(&addr(srv), &body, 4, Amount::Requests(3_000)).await;
    }
    let c = 8;
    let mut cells: Vec<(usize, &str, Cell)> = Vec::new();
    for round in 1..=TRACES_ROUNDS {
        // Each round in another order, so that no configuration always
        // follows the same one.
        let mut order = configs.to_vec();
        order.rotate_left(round - 1);
        for (name, srv) in order {
            let measured = cell(Some(srv), &addr(srv), "chained", &body, c).await;
            cells.push((round, name, measured));
            // The exporter finishes its backlog (every span exported or
            // dropped) before the next cell, so that its work is not
            // counted against the next configuration.
            if let Some(traces) = srv.running().pipeline.traces() {
                let traces = std::sync::Arc::clone(traces);
                plinth_tests::eventually(
                    plinth_tests::PATIENCE,
                    "every span exported or dropped",
                    async || {
                        let counts = traces.counts();
                        let settled = counts.exported() + counts.dropped();
                        if settled == counts.ended() {
                            Ok(())
                        } else {
                            Err(format!("{settled} of {} spans settled", counts.ended()))
                        }
                    },
                )
                .await;
            }
        }
    }
    for (name, srv) in configs {
        checks.push(check(&addr(srv), "chained", &format!("{name}, after")));
    }
    // What was exported has arrived once the queues have drained.
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "\n## Traces and serving series: the full chain, gRPC ModelInfer, h2load c={c}, {SECONDS} s per cell"
    );
    println!("| round | configuration | req/s | p50 | p99 | HTTP failed | server counted |");
    println!("|---|---|---|---|---|---|---|");
    for (round, name, cell) in &cells {
        println!(
            "| {round} | {name} | {:.0} | {:.0} µs | {:.0} µs | {} | {} |",
            cell.run.req_per_s,
            cell.run.p50_us,
            cell.run.p99_us,
            cell.run.failed,
            server_counted(cell)
        );
    }
    for (name, srv) in [
        ("traced", &traced),
        ("traced-sink", &to_sink),
        ("sampled", &sampled),
    ] {
        let counts = srv
            .running()
            .pipeline
            .traces()
            .expect("tracing on")
            .counts();
        println!(
            "- {name}: {} spans ended, {} exported, {} dropped",
            counts.ended(),
            counts.exported(),
            counts.dropped()
        );
    }
    println!("- the collector received {} spans", collector.received());
    let get = |round: usize, name: &str| {
        cells
            .iter()
            .find(|(r, n, _)| *r == round && *n == name)
            .expect("cell")
            .2
            .run
            .req_per_s
    };
    let per_round = |a: &str, b: &str| {
        (1..=TRACES_ROUNDS)
            .map(|round| get(round, a) / get(round, b))
            .collect::<Vec<f64>>()
    };
    goals.push(Goal {
        measure: format!("every request traced ÷ tracing off, throughput, c={c} (rounds)"),
        value: ratios(&per_round("traced", "off")),
        goal: "≥ 0.9",
    });
    goals.push(Goal {
        measure: format!(
            "every request traced to a collector that costs this machine nothing ÷ tracing off, c={c} (rounds)"
        ),
        value: ratios(&per_round("traced-sink", "off")),
        goal: "≥ 0.9",
    });
    goals.push(Goal {
        measure: format!("1% sampled ÷ tracing off, throughput, c={c} (rounds)"),
        value: ratios(&per_round("sampled", "off")),
        goal: "≥ 0.98",
    });
    goals.push(Goal {
        measure: format!("serving series on ÷ off, throughput, c={c} (rounds)"),
        value: ratios(&per_round("off", "no-series")),
        goal: "≥ 0.98",
    });
    println!("\ncorrectness checks (tritonclient):");
    for line in checks {
        println!("- {line}");
    }
    for srv in [off, traced, to_sink, sampled, bare] {
        srv.stop().await;
    }
}
