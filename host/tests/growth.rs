//! Memory growth, after Triton's L0_memory_growth: the real `plinth`
//! binary under sustained traffic through the full plugin chain (router,
//! pre- and postprocessor, metrics), then many load/unload cycles of a
//! 100 MB model, then many plugin swaps. Its resident memory (read through
//! GetInfo after the allocator returns what it keeps for reuse), open file
//! descriptors and threads at the end are held against a baseline taken
//! after warm-up.
//!
//! CI runs it short; the full run sets `PLINTH_GROWTH_SECONDS=600`,
//! `PLINTH_GROWTH_CONCURRENCY=64`, `PLINTH_GROWTH_CYCLES=1000` and
//! `PLINTH_GROWTH_SWAPS=500` (docs/RELIABILITY.md).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{CONFIG, Server, f32_request};
use plinth::grpc::pb;
use plinth::grpc::pb::compute_service_client::ComputeServiceClient;
use plinth::grpc::pb::model_service_client::ModelServiceClient;
use plinth_torch::trace::{self, Device, Kind, TchTensor};
use tonic::transport::Channel;

/// A bound on hangs, not a speed assertion.
const PATIENCE: Duration = Duration::from_secs(120);
/// Resident memory the run may add after warm-up.
const MAX_GROWTH_BYTES: i64 = 10 << 20;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `y = 2x`, carrying `n_floats` constant floats in the archive.
fn write_model(dir: &Path, n_floats: i64) {
    std::fs::create_dir_all(dir.join("1")).unwrap();
    let big = TchTensor::ones([n_floats], (Kind::Float, Device::Cpu));
    trace::save(
        &dir.join("1/model.pt"),
        &[TchTensor::zeros([3], (Kind::Float, Device::Cpu))],
        |xs| vec![&xs[0] * 2.0 + big.sum(Kind::Float) * 0.0],
    )
    .unwrap();
}

/// The server's threads by name, counted: what a thread leak is made of.
fn thread_names(pid: u32) -> std::collections::BTreeMap<String, usize> {
    let mut names = std::collections::BTreeMap::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            *names.entry(name.trim().to_owned()).or_default() += 1;
        }
    }
    names
}

async fn eventually<T>(what: &str, attempt: impl AsyncFnMut() -> Result<T, String>) -> T {
    common::eventually_within(PATIENCE, what, attempt).await
}

async fn runtime(channel: &Channel) -> pb::RuntimeCounters {
    ComputeServiceClient::new(channel.clone())
        .get_info(pb::GetInfoRequest {
            trim_allocator: true,
        })
        .await
        .expect("GetInfo")
        .into_inner()
        .runtime
        .expect("runtime counters")
}

/// `concurrency` clients sending `y = 2x` requests for `seconds`; every
/// answer must be right. Returns how many were answered.
async fn traffic(channel: &Channel, concurrency: u64, seconds: u64) -> u64 {
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let mut client = ComputeServiceClient::new(channel.clone());
        clients.push(tokio::spawn(async move {
            let mut answered = 0u64;
            while Instant::now() < until {
                let out = client
                    .compute(f32_request("chained", &[1.0, 2.0, 3.0]))
                    .await
                    .expect("a request under load")
                    .into_inner();
                assert_eq!(out.outputs[0].data.len(), 12);
                answered += 1;
            }
            answered
        }));
    }
    let mut total = 0;
    for client in clients {
        total += client.await.unwrap();
    }
    total
}

async fn cycle(models: &mut ModelServiceClient<Channel>, name: &str) {
    models
        .load_model(pb::LoadModelRequest {
            name: name.into(),
            reload: false,
            wait: true,
        })
        .await
        .expect("load");
    models
        .unload_model(pb::UnloadModelRequest { name: name.into() })
        .await
        .expect("unload");
    // Unload returns before the memory is freed: wait for UNAVAILABLE.
    eventually("the model unloaded", async || {
        let status = models
            .get_model(pb::GetModelRequest { name: name.into() })
            .await
            .map_err(|e| e.to_string())?
            .into_inner()
            .model
            .and_then(|m| m.status)
            .ok_or("no status")?;
        (status.state == pb::ModelState::Unavailable as i32)
            .then_some(())
            .ok_or(format!("{status:?}"))
    })
    .await;
}

fn swap(plugins: &Path, wasm_dir: &Path, n: u64) {
    // Alternate two components under one name, through a rename.
    let component = if n.is_multiple_of(2) {
        "image_normalize"
    } else {
        "softmax_topk"
    };
    let staging = plugins.join(".pre.wasm.partial");
    std::fs::copy(wasm_dir.join(format!("{component}.wasm")), &staging).unwrap();
    std::fs::rename(&staging, plugins.join("pre.wasm")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_descriptors_and_threads_return_to_their_baseline() {
    let seconds = setting("PLINTH_GROWTH_SECONDS", 60);
    let concurrency = setting("PLINTH_GROWTH_CONCURRENCY", 16);
    let cycles = setting("PLINTH_GROWTH_CYCLES", 10);
    let swaps = setting("PLINTH_GROWTH_SWAPS", 10);
    let wasm_dir = std::path::PathBuf::from(
        std::env::var_os("PLINTH_PLUGIN_WASM_DIR")
            .expect("PLINTH_PLUGIN_WASM_DIR is not set: run the tests with `cargo xtask test`"),
    );

    let repo = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let chained = repo.path().join("chained");
    write_model(&chained, 1);
    std::fs::write(
        chained.join("config.toml"),
        format!("preprocess = [\"pre\"]\npostprocess = [\"post\"]\n{CONFIG}"),
    )
    .unwrap();
    // 25M floats: a 100 MB model for the load/unload cycles.
    let big = repo.path().join("big");
    write_model(&big, 25 << 20);
    std::fs::write(big.join("config.toml"), CONFIG).unwrap();
    // The full chain: a router, a processor on each side (both pass f32
    // through), a metrics plugin.
    for (name, component) in [
        ("router", "weighted_router"),
        ("pre", "image_normalize"),
        ("post", "image_normalize"),
        ("metrics", "prometheus_metrics"),
    ] {
        std::fs::copy(
            wasm_dir.join(format!("{component}.wasm")),
            plugins.path().join(format!("{name}.wasm")),
        )
        .unwrap();
    }

    let server = Server::start(
        &[],
        repo.path(),
        plugins.path(),
        &["--no-load", "--max-concurrent-loads", "2"],
    );
    let addr = server.logged("grpc_addr=");
    let channel = eventually("the gRPC port", async || {
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    let mut models = ModelServiceClient::new(channel.clone());
    models
        .load_model(pb::LoadModelRequest {
            name: "chained".into(),
            reload: false,
            wait: true,
        })
        .await
        .expect("load the chained model");
    eventually("the chained model serving", async || {
        ComputeServiceClient::new(channel.clone())
            .compute(f32_request("chained", &[1.0, 2.0, 3.0]))
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await;

    // Warm-up: a share of each phase, so that what is allocated once (and
    // kept) is in the baseline.
    traffic(&channel, concurrency, seconds.div_ceil(6).max(5)).await;
    // Two load threads (`--max-concurrent-loads 2`), each visited twice.
    for _ in 0..4 {
        cycle(&mut models, "big").await;
    }
    swap(plugins.path(), &wasm_dir, 1);
    swap(plugins.path(), &wasm_dir, 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Idle blocking threads leave after 10 s: the baseline is taken at rest.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let baseline = runtime(&channel).await;
    println!("baseline threads: {:?}", thread_names(server.child.id()));

    let started = Instant::now();
    let answered = traffic(&channel, concurrency, seconds).await;
    let after_traffic = runtime(&channel).await;
    for _ in 0..cycles {
        cycle(&mut models, "big").await;
    }
    let after_cycles = runtime(&channel).await;
    for n in 0..swaps {
        swap(plugins.path(), &wasm_dir, n);
        // One swap at a time: the new component serves before the next.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_swaps = runtime(&channel).await;
    let elapsed = started.elapsed();

    // At rest again, as the baseline was.
    let pid = server.child.id();
    let end = eventually(
        "threads and descriptors back at their baseline",
        async || {
            let now = runtime(&channel).await;
            (now.threads <= baseline.threads && now.open_fds <= baseline.open_fds)
                .then_some(now)
                .ok_or(format!(
                    "{now:?} against {baseline:?}; threads now: {:?}",
                    thread_names(pid)
                ))
        },
    )
    .await;
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    println!(
        "memory growth: {answered} requests at c={concurrency} over {seconds} s, {cycles} load/unload cycles of a 100 MB model, {swaps} plugin swaps ({:.0?} in all)",
        elapsed
    );
    for (when, r) in [
        ("baseline", &baseline),
        ("after traffic", &after_traffic),
        ("after cycles", &after_cycles),
        ("after swaps", &after_swaps),
        ("end", &end),
    ] {
        println!(
            "  {when:>13}: RSS {:.1} MiB, {} fds, {} threads, {} tasks",
            mib(r.rss_bytes),
            r.open_fds,
            r.threads,
            r.tasks
        );
    }
    let growth = end.rss_bytes as i64 - baseline.rss_bytes as i64;
    assert!(
        growth <= MAX_GROWTH_BYTES,
        "RSS grew by {:.1} MiB (limit {} MiB): {baseline:?} -> {end:?}",
        growth as f64 / f64::from(1 << 20),
        MAX_GROWTH_BYTES >> 20
    );
    assert_eq!(end.in_flight, 0);
    assert_eq!(end.open_streams, 0);
}
