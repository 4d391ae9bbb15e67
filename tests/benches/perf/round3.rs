//! `round3`: the goals of performance round three, on the real `plinth
//! serve` binary (xtask builds it and names it in `PLINTH_PERF_BIN`), side
//! by side in one run, each configuration alternated [`ROUNDS`] times:
//!
//! - y = 2x over 16 floats, gRPC, h2load at c = 1, 8 and 64: the bare tonic
//!   echo, the plain pipeline (a server with no plugin), the full plugin
//!   chain (router, processors before and after, metrics; a server of its
//!   own), and both with forward passes inline (`--inline-forward-max-bytes`);
//! - 1 MiB and 16 MiB f32, h2load c=8: the echo against the plain pipeline,
//!   and 16 MiB through system shared memory (input and output in regions
//!   registered with the server) against the same over gRPC;
//! - REST (JSON, 16 floats), wrk c=16: a bare axum echo against the plain
//!   pipeline, inline off and on.
//!
//! Every cell is checked against the server's own success and failure
//! counts, and tritonclient checks the answers before and after.

use super::*;

/// Inline passes for requests up to this many input bytes.
const INLINE_BYTES: &str = "65536";

/// The shared-memory objects of the `shm` cells, removed when dropped.
struct Regions {
    input: String,
    output: String,
}

impl Drop for Regions {
    fn drop(&mut self) {
        for key in [&self.input, &self.output] {
            let _ = std::fs::remove_file(format!("/dev/shm/{key}"));
        }
    }
}

/// Creates the objects, fills the input, and registers both with the server.
async fn register_regions(addr: &str, values: &[f32]) -> Regions {
    let pid = std::process::id();
    let regions = Regions {
        input: format!("plinth-bench-in-{pid}"),
        output: format!("plinth-bench-out-{pid}"),
    };
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(format!("/dev/shm/{}", regions.input), &bytes).unwrap();
    std::fs::write(
        format!("/dev/shm/{}", regions.output),
        vec![0u8; bytes.len()],
    )
    .unwrap();
    let mut client = ipb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(
        format!("http://{addr}"),
    )
    .await
    .expect("connect to register");
    for (name, key) in [("in", &regions.input), ("out", &regions.output)] {
        client
            .system_shared_memory_register(ipb::SystemSharedMemoryRegisterRequest {
                name: name.into(),
                key: format!("/{key}"),
                offset: 0,
                byte_size: bytes.len() as u64,
            })
            .await
            .expect("register a region");
    }
    regions
}

fn shm_params(
    region: &str,
    byte_size: usize,
) -> std::collections::HashMap<String, ipb::InferParameter> {
    use ipb::infer_parameter::ParameterChoice as P;
    [
        ("shared_memory_region", P::StringParam(region.into())),
        ("shared_memory_byte_size", P::Int64Param(byte_size as i64)),
    ]
    .into_iter()
    .map(|(key, value)| {
        (
            key.to_owned(),
            ipb::InferParameter {
                parameter_choice: Some(value),
            },
        )
    })
    .collect()
}

/// `double` on `floats` f32 read from region `in`, its output written to `out`.
fn shm_request(floats: usize) -> ipb::ModelInferRequest {
    ipb::ModelInferRequest {
        model_name: "double".into(),
        inputs: vec![ipb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![floats as i64],
            parameters: shm_params("in", floats * 4),
            contents: None,
        }],
        outputs: vec![ipb::model_infer_request::InferRequestedOutputTensor {
            name: "y".into(),
            parameters: shm_params("out", floats * 4),
        }],
        ..Default::default()
    }
}

/// A configuration of h2load cells: its name, the server's gRPC address
/// and the model it counts (none for the echo), and the body it sends.
type Config<'a> = (&'static str, (&'a str, Option<&'a str>), &'a Path);

/// One measured cell: h2load (or wrk) and the server's own counts.
struct Row {
    part: &'static str,
    round: usize,
    config: &'static str,
    c: u32,
    req_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    failed: u64,
    counted: String,
}

async fn h2load_cell(
    part: &'static str,
    round: usize,
    config: &'static str,
    target: (&str, Option<&str>),
    body: &Path,
    c: u32,
) -> Row {
    let (addr, model) = target;
    let (run, counted) =
        counted_while(addr, model, drive(addr, body, c, Amount::Seconds(SECONDS))).await;
    let row = Row {
        part,
        round,
        config,
        c,
        req_per_s: run.req_per_s,
        p50_us: run.p50_us,
        p99_us: run.p99_us,
        failed: run.failed,
        counted,
    };
    show(&row);
    row
}

/// One row of the table, printed as soon as it is measured too (so a run
/// that stops halfway still shows what it measured).
fn show(row: &Row) {
    println!(
        "| {} | {} | {} | {} | {:.0} | {:.0} µs | {:.0} µs | {} | {} |",
        row.part,
        row.round,
        row.config,
        row.c,
        row.req_per_s,
        row.p50_us,
        row.p99_us,
        row.failed,
        row.counted
    );
}

pub(super) async fn round3(goals: &mut Vec<Goal>) {
    let Some(bin) = std::env::var_os("PLINTH_PERF_BIN").map(PathBuf::from) else {
        println!(
            "\n## Round three: skipped (PLINTH_PERF_BIN is not set; `cargo xtask bench --bench perf -- round3` builds the binary)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let inline_flags = ["--inline-forward-max-bytes", INLINE_BYTES];
    let plain = serve_binary("plain", &bin, dir.path(), &[], false).await;
    let inline = serve_binary("plain-inline", &bin, dir.path(), &inline_flags, false).await;
    let chain = serve_binary("chain", &bin, dir.path(), &[], true).await;
    let chain_inline = serve_binary("chain-inline", &bin, dir.path(), &inline_flags, true).await;
    let echo = echo::start_tonic(64 << 20).await;
    let axum = echo::start_axum().await;
    let mut checks = Vec::new();
    let models = [
        (&plain, "double"),
        (&inline, "double"),
        (&chain, "chained"),
        (&chain_inline, "chained"),
    ];
    for (served, model) in models {
        checks.push(check(
            &served.grpc,
            model,
            &format!("{}, before", served.name),
        ));
    }

    // Small requests over gRPC.
    let values: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let double = write_body(
        dir.path(),
        "double",
        &infer_request("double", &[16], &values),
    );
    let chained = write_body(
        dir.path(),
        "chained",
        &infer_request("chained", &[16], &values),
    );
    let small: [Config; 5] = [
        ("echo", (&echo, None), &double),
        ("plain", (&plain.grpc, Some("double")), &double),
        ("plain, inline", (&inline.grpc, Some("double")), &double),
        ("chain", (&chain.grpc, Some("chained")), &chained),
        (
            "chain, inline",
            (&chain_inline.grpc, Some("chained")),
            &chained,
        ),
    ];
    for (_, (addr, _), body) in &small {
        drive(addr, body, 4, Amount::Requests(3_000)).await;
    }
    let mut rows = Vec::new();
    for round in 1..=ROUNDS {
        for (config, target, body) in &small {
            for c in CONCURRENCY {
                rows.push(h2load_cell("small", round, config, *target, body, c).await);
            }
        }
    }

    // Large tensors, and 16 MiB through shared memory.
    const LARGE_CLIENTS: u32 = 8;
    let mib16 = 1usize << 22;
    let big: Vec<f32> = (0..mib16).map(|i| (i % 1000) as f32).collect();
    let regions = register_regions(&plain.grpc, &big).await;
    let large_1 = write_body(
        dir.path(),
        "large-1",
        &infer_request("double", &[1 << 18], &big[..1 << 18]),
    );
    let large_16 = write_body(
        dir.path(),
        "large-16",
        &infer_request("double", &[mib16 as i64], &big),
    );
    let shm_16 = write_body(dir.path(), "shm-16", &shm_request(mib16));
    let large: [Config; 5] = [
        ("1 MiB echo", (&echo, None), &large_1),
        ("1 MiB plain", (&plain.grpc, Some("double")), &large_1),
        ("16 MiB echo", (&echo, None), &large_16),
        ("16 MiB plain", (&plain.grpc, Some("double")), &large_16),
        (
            "16 MiB shared memory",
            (&plain.grpc, Some("double")),
            &shm_16,
        ),
    ];
    for (_, (addr, _), body) in &large {
        drive(addr, body, LARGE_CLIENTS, Amount::Requests(40)).await;
    }
    // The shared-memory answer is in the output region: 2x, exactly.
    let out = std::fs::read(format!("/dev/shm/{}", regions.output)).unwrap();
    let doubled = out
        .chunks_exact(4)
        .zip(&big)
        .all(|(b, v)| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) == v * 2.0);
    checks.push(format!(
        "16 MiB through shared memory: the output region holds 2x: {}",
        if doubled { "ok" } else { "FAILED" }
    ));
    for round in 1..=ROUNDS {
        for (config, target, body) in &large {
            rows.push(h2load_cell("large", round, config, *target, body, LARGE_CLIENTS).await);
        }
    }
    drop(regions);

    // REST.
    const CONNECTIONS: u32 = 16;
    let json: Vec<String> = values.iter().map(|v| format!("{v:.1}")).collect();
    let rest_body = format!(
        "{{\"inputs\":[{{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[16],\"data\":[{}]}}]}}",
        json.join(",")
    );
    let rest: [(&str, &str, Option<&str>); 3] = [
        ("axum echo", &axum, None),
        ("plain", &plain.http, Some(&plain.grpc)),
        ("plain, inline", &inline.http, Some(&inline.grpc)),
    ];
    for round in 1..=ROUNDS {
        for (config, base, grpc) in rest {
            let url = format!("{base}/v2/models/double/infer");
            let body = rest_body.clone();
            // Lazy: wrk starts only once the counts before it are read.
            let wrk_run = async move {
                tokio::task::spawn_blocking(move || wrk(&url, &body, CONNECTIONS, SECONDS))
                    .await
                    .unwrap()
            };
            let (run, counted) =
                counted_while(grpc.unwrap_or_default(), grpc.map(|_| "double"), wrk_run).await;
            let row = Row {
                part: "rest",
                round,
                config,
                c: CONNECTIONS,
                req_per_s: run.req_per_s,
                p50_us: run.p50_us,
                p99_us: run.p99_us,
                failed: run.errors,
                counted,
            };
            show(&row);
            rows.push(row);
        }
    }
    for (served, model) in models {
        checks.push(check(
            &served.grpc,
            model,
            &format!("{}, after", served.name),
        ));
    }

    println!(
        "\n## Round three: `plinth serve` (release), {SECONDS} s per cell, {ROUNDS} rounds alternated"
    );
    println!(
        "| part | round | configuration | c | req/s | p50 | p99 | failed (client) | server counted |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for row in &rows {
        show(row);
    }
    let find = |part: &str, round: usize, config: &str, c: u32| {
        rows.iter()
            .find(|r| r.part == part && r.round == round && r.config == config && r.c == c)
            .expect("cell")
    };
    let per_round = |f: &dyn Fn(usize) -> f64| (1..=ROUNDS).map(f).collect::<Vec<f64>>();
    // Throughput of configuration `a` over `b`, round by round.
    let ratio = |part: &str, a: &str, b: &str, c: u32| {
        ratios(&per_round(&|r| {
            find(part, r, a, c).req_per_s / find(part, r, b, c).req_per_s
        }))
    };
    for config in ["plain", "plain, inline"] {
        for c in [8, 64] {
            goals.push(Goal {
                measure: format!("{config} ÷ bare tonic echo, throughput, c={c} (rounds)"),
                value: ratio("small", config, "echo", c),
                goal: "≥ 0.75",
            });
        }
        goals.push(Goal {
            measure: format!("{config} p50 ÷ echo p50, c=1 (rounds)"),
            value: ratios(&per_round(&|r| {
                find("small", r, config, 1).p50_us / find("small", r, "echo", 1).p50_us
            })),
            goal: "≤ 1.5×",
        });
    }
    for (chain, base) in [("chain", "plain"), ("chain, inline", "plain, inline")] {
        for c in CONCURRENCY {
            goals.push(Goal {
                measure: format!("{chain} ÷ {base}, throughput, c={c} (rounds)"),
                value: ratio("small", chain, base, c),
                goal: "≥ 0.92",
            });
        }
    }
    for c in CONCURRENCY {
        goals.push(Goal {
            measure: format!("plain, inline ÷ plain, throughput, c={c} (rounds)"),
            value: ratio("small", "plain, inline", "plain", c),
            goal: "> 1 to keep it",
        });
    }
    for size in ["1 MiB", "16 MiB"] {
        goals.push(Goal {
            measure: format!("{size} f32 over gRPC, plain ÷ echo, c={LARGE_CLIENTS} (rounds)"),
            value: ratio(
                "large",
                &format!("{size} plain"),
                &format!("{size} echo"),
                LARGE_CLIENTS,
            ),
            goal: "≥ 0.85",
        });
    }
    goals.push(Goal {
        measure: format!(
            "16 MiB f32 through system shared memory ÷ over gRPC, c={LARGE_CLIENTS} (rounds)"
        ),
        value: ratio(
            "large",
            "16 MiB shared memory",
            "16 MiB plain",
            LARGE_CLIENTS,
        ),
        goal: "≥ 2×",
    });
    for config in ["plain", "plain, inline"] {
        goals.push(Goal {
            measure: format!(
                "REST infer ({config}, wrk, JSON, c={CONNECTIONS}) ÷ bare axum echo (rounds)"
            ),
            value: ratio("rest", config, "axum echo", CONNECTIONS),
            goal: "≥ 0.6",
        });
    }
    println!("\ncorrectness checks:");
    for line in checks {
        println!("- {line}");
    }
}
