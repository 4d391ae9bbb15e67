//! Throughput side by side (issue: throughput). One command,
//! `cargo xtask bench --bench peers`, drives in turn, with the same client
//! (h2load over gRPC, a pre-encoded Open Inference Protocol v2 ModelInfer
//! body), the same payload (16 floats) and the same concurrency levels:
//!
//! 1. a bare tonic server that echoes the input (the ceiling for a Rust gRPC
//!    server on this machine);
//! 2. Plinth with a tiny TorchScript model (`y = 2x`): the plain pipeline,
//!    then the full plugin chain (router, preprocess, postprocess, metrics);
//! 3. MLServer serving the same computation;
//! 4. PyTriton (Triton server 2.51 through its Python binding), the same.
//!
//! Every server gets a tritonclient correctness check before and after its
//! runs, because h2load does not read grpc-status. Then, on Plinth only: a
//! small CNN image classifier at batch 1 and 32, dynamic batching on against
//! off at concurrency 64, and 500 connections held for 60 s.
//!
//! Sections: `servers`, `cnn`, `batching`, `connections` (default: all).
//! The peers' virtual environments come from `cargo xtask bench`
//! (`PLINTH_PEERS_DIR`); without them the peers are skipped, saying so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plinth_tests::load::{Amount, H2loadRun, h2load, infer_request, triton_check, write_body};
use plinth_tests::{TestServer, echo, fixtures};

const CONCURRENCY: [u32; 3] = [1, 8, 64];

#[tokio::main]
async fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| f == name);
    println!(
        "peer benchmarks on {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    if wants("servers") {
        servers().await;
    }
    if wants("cnn") {
        cnn().await;
    }
    if wants("batching") {
        batching().await;
    }
    if wants("connections") {
        connections().await;
    }
}

// ---------------------------------------------------------------------------
// The peers, as child processes.

struct Peer {
    name: &'static str,
    child: Child,
    grpc: String,
}

impl Drop for Peer {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our own child's process group; no memory is touched.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // SAFETY: as above.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

fn peers_dir() -> Option<PathBuf> {
    std::env::var_os("PLINTH_PEERS_DIR").map(PathBuf::from)
}

fn bench_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/peers")
}

/// Starts a peer in its own process group and waits for its HTTP readiness.
async fn start_peer(name: &'static str, mut cmd: Command, http: u16, grpc: u16) -> Option<Peer> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(err) => {
            println!("\n{name}: not started ({err}); skipped");
            return None;
        }
    };
    let mut peer = Peer {
        name,
        child,
        grpc: format!("127.0.0.1:{grpc}"),
    };
    let started = Instant::now();
    // A safety net for a peer that never comes up, not a measurement.
    while started.elapsed() < Duration::from_secs(180) {
        if let Ok(Some(status)) = peer.child.try_wait() {
            println!("\n{name}: exited during startup ({status}); skipped");
            return None;
        }
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], http).into();
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            let (code, _) =
                plinth_tests::http_request(addr, "GET", "/v2/health/ready", &[], b"").await;
            if code == 200 && triton_check(&peer.grpc, "double") != Some(false) {
                println!(
                    "\n{name}: ready after {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                return Some(peer);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("\n{name}: not ready after 180 s; skipped");
    None
}

async fn mlserver() -> Option<Peer> {
    let venv = peers_dir()?.join("mlserver");
    let mut cmd = Command::new(venv.join("bin/mlserver"));
    cmd.arg("start")
        .arg(".")
        .current_dir(bench_dir().join("mlserver"))
        .env("MLSERVER_HTTP_PORT", "9100")
        .env("MLSERVER_GRPC_PORT", "9101")
        .env("MLSERVER_METRICS_PORT", "9102");
    start_peer("MLServer", cmd, 9100, 9101).await
}

async fn pytriton() -> Option<Peer> {
    let venv = peers_dir()?.join("pytriton");
    let mut cmd = Command::new(venv.join("bin/python"));
    cmd.arg(bench_dir().join("pytriton_double.py")).args([
        "--http-port",
        "9200",
        "--grpc-port",
        "9201",
        "--metrics-port",
        "9202",
    ]);
    start_peer("PyTriton", cmd, 9200, 9201).await
}

// ---------------------------------------------------------------------------
// Sections.

const MODEL_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

fn tiny_values() -> Vec<f32> {
    (0..16).map(|i| i as f32).collect()
}

/// h2load against ModelInfer on `addr` (host:port), on two client threads.
fn load(addr: &str, body: &Path, amount: Amount, clients: u32, streams: u32) -> H2loadRun {
    h2load(
        &format!("http://{addr}{MODEL_PATH}"),
        body,
        amount,
        clients,
        streams,
        2,
    )
}

/// Runs the three concurrency levels against one server; returns its rows.
fn sweep(label: &str, addr: &str, body: &Path) -> Vec<(String, u32, H2loadRun)> {
    // Warm-up.
    load(addr, body, Amount::Requests(2_000), 4, 1);
    CONCURRENCY
        .iter()
        .map(|&c| {
            // Concurrency c: c connections with one stream each, as
            // concurrent clients would be, for 10 s.
            let run = load(addr, body, Amount::Seconds(10), c, 1);
            (label.to_owned(), c, run)
        })
        .collect()
}

async fn servers() {
    let dir = tempfile::tempdir().unwrap();
    let body = write_body(
        dir.path(),
        "double",
        &infer_request("double", &[16], &tiny_values()),
    );
    let chain_body = write_body(
        dir.path(),
        "chained",
        &infer_request("chained", &[16], &tiny_values()),
    );
    let mut rows: Vec<(String, u32, H2loadRun)> = Vec::new();
    let mut checks: Vec<String> = Vec::new();

    let echo = echo::start_tonic(4 << 20).await;
    rows.extend(sweep("bare tonic echo (ceiling)", &echo, &body));

    let srv = TestServer::start(
        |repo| {
            fixtures::scale(repo, "double", "1", 2.0);
            fixtures::chained(repo, "chained", 2.0);
        },
        true,
    )
    .await;
    for model in ["double", "chained"] {
        srv.wait_ready(model).await;
    }
    let plinth_addr = srv.running().grpc_addr.to_string();
    let check = |addr: &str, model: &str, when: &str| {
        let verdict = match triton_check(addr, model) {
            Some(true) => "ok",
            Some(false) => "FAILED",
            None => "not run (no PLINTH_PYTHON)",
        };
        format!("{model} at {addr}, {when}: {verdict}")
    };
    checks.push(check(&plinth_addr, "double", "before"));
    rows.extend(sweep("Plinth, plain pipeline", &plinth_addr, &body));
    checks.push(check(&plinth_addr, "double", "after"));
    let plugins = srv.plugins.path();
    // image-normalize passes f32 tensors through unchanged: the cost is the
    // calls and the tensor copies every processor pays.
    for (name, component) in fixtures::CHAIN_PLUGINS {
        plinth_tests::install_plugin(plugins, name, component, None);
    }
    for (name, _) in fixtures::CHAIN_PLUGINS {
        srv.wait_plugin(name, |s| s.serving).await;
    }
    checks.push(check(&plinth_addr, "chained", "before"));
    rows.extend(sweep(
        "Plinth, full plugin chain",
        &plinth_addr,
        &chain_body,
    ));
    checks.push(check(&plinth_addr, "chained", "after"));
    srv.stop().await;

    if peers_dir().is_none() {
        println!(
            "\nPLINTH_PEERS_DIR is not set: MLServer and PyTriton skipped (run through `cargo xtask bench`)"
        );
    }
    for which in ["MLServer", "PyTriton"] {
        let peer = if which == "MLServer" {
            mlserver().await
        } else {
            pytriton().await
        };
        let Some(peer) = peer else {
            continue;
        };
        checks.push(check(&peer.grpc, "double", "before"));
        rows.extend(sweep(peer.name, &peer.grpc, &body));
        checks.push(check(&peer.grpc, "double", "after"));
    }

    println!("\n## Servers side by side: y = 2x over 16 floats, h2load, 10 s per cell");
    println!("| server | concurrency | req/s | p50 | p99 | failed | req/s ÷ Plinth plain |");
    println!("|---|---|---|---|---|---|---|");
    let plain = |c: u32| {
        rows.iter()
            .find(|(label, cc, _)| label == "Plinth, plain pipeline" && *cc == c)
            .map(|(_, _, run)| run.req_per_s)
    };
    for (label, c, run) in &rows {
        let ratio = plain(*c).map_or(f64::NAN, |p| run.req_per_s / p);
        println!(
            "| {label} | {c} | {:.0} | {:.0} µs | {:.0} µs | {} of {} | {ratio:.2} |",
            run.req_per_s,
            run.p50_us,
            run.p99_us,
            run.failed,
            run.succeeded + run.failed
        );
    }
    println!("\ncorrectness checks (tritonclient):");
    for line in checks {
        println!("- {line}");
    }
}

async fn cnn() {
    let srv = TestServer::start(
        |repo| fixtures::cnn(repo, "cnn", |c| c.dynamic_batching(false)),
        true,
    )
    .await;
    srv.wait_ready("cnn").await;
    let addr = srv.running().grpc_addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    println!("\n## CNN classifier (3x32x32 → 10), Plinth, no dynamic batching, h2load 10 s");
    println!("| request batch | concurrency | req/s | images/s | p50 | p99 | failed |");
    println!("|---|---|---|---|---|---|---|");
    for batch in [1usize, 32] {
        let body = write_body(
            dir.path(),
            &format!("cnn{batch}"),
            &infer_request("cnn", &[batch as i64, 3, 32, 32], &fixtures::images(batch)),
        );
        load(&addr, &body, Amount::Requests(50), 1, 1);
        for c in [1u32, 8] {
            let run = load(&addr, &body, Amount::Seconds(10), c, 1);
            println!(
                "| {batch} | {c} | {:.0} | {:.0} | {:.0} µs | {:.0} µs | {} |",
                run.req_per_s,
                run.req_per_s * batch as f64,
                run.p50_us,
                run.p99_us,
                run.failed
            );
        }
    }
    srv.stop().await;
}

async fn batching() {
    let srv = TestServer::start(
        |repo| {
            fixtures::cnn(repo, "cnn_off", |c| c.dynamic_batching(false));
            fixtures::cnn(repo, "cnn_on", |c| {
                c.dynamic_batching(true)
                    .max_queue_delay_us(2000)
                    .preferred_batch_sizes(&[16, 32])
            });
        },
        true,
    )
    .await;
    for model in ["cnn_off", "cnn_on"] {
        srv.wait_ready(model).await;
    }
    let addr = srv.running().grpc_addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    println!("\n## Dynamic batching on the CNN: batch-1 requests at concurrency 64, h2load 15 s");
    println!("| model config | req/s | p50 | p99 | failed | forward passes | mean rows per pass |");
    println!("|---|---|---|---|---|---|---|");
    let mut results = Vec::new();
    for round in 0..2 {
        for model in ["cnn_off", "cnn_on"] {
            let body = write_body(
                dir.path(),
                model,
                &infer_request(model, &[1, 3, 32, 32], &fixtures::images(1)),
            );
            let before = exec_counts(&srv, model).await;
            let run = load(&addr, &body, Amount::Seconds(15), 64, 1);
            let after = exec_counts(&srv, model).await;
            let passes = after.1 - before.1;
            let rows = (after.0 - before.0) as f64 / passes.max(1) as f64;
            println!(
                "| {model} (round {round}) | {:.0} | {:.0} µs | {:.0} µs | {} | {passes} | {rows:.1} |",
                run.req_per_s, run.p50_us, run.p99_us, run.failed
            );
            results.push((model, run.req_per_s));
        }
    }
    let mean = |m: &str| {
        let v: Vec<f64> = results.iter().filter(|r| r.0 == m).map(|r| r.1).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    println!(
        "\nbatching on ÷ off: {:.2}",
        mean("cnn_on") / mean("cnn_off")
    );
    srv.stop().await;
}

/// `(inference_count, execution_count)` from ModelStatistics.
async fn exec_counts(srv: &TestServer, model: &str) -> (u64, u64) {
    let stats = srv.model_stats(model).await;
    (stats.inference_count, stats.execution_count)
}

async fn connections() {
    let srv = TestServer::start(|repo| fixtures::scale(repo, "double", "1", 2.0), true).await;
    srv.wait_ready("double").await;
    let addr = srv.running().grpc_addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let body = write_body(
        dir.path(),
        "double",
        &infer_request("double", &[16], &tiny_values()),
    );
    let before = exec_counts(&srv, "double").await;
    let run = load(&addr, &body, Amount::Seconds(60), 500, 1);
    let after = exec_counts(&srv, "double").await;
    let check = match triton_check(&addr, "double") {
        Some(true) => "ok",
        Some(false) => "FAILED",
        None => "not run (no PLINTH_PYTHON)",
    };
    println!("\n## 500 concurrent connections for 60 s (h2load -c 500 -m 1 -D 60), Plinth, y = 2x");
    println!(
        "| req/s | p50 | p99 | HTTP failures | requests the server ran | tritonclient check after |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {:.0} | {:.0} µs | {:.0} µs | {} of {} | {} | {check} |",
        run.req_per_s,
        run.p50_us,
        run.p99_us,
        run.failed,
        run.succeeded + run.failed,
        after.0 - before.0
    );
    srv.stop().await;
}
