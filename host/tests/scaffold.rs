//! `plinth plugin new` and `plinth plugin build` as a plugin author uses
//! them: each kind scaffolded in Rust, and the processor in Python, built
//! as they come (with only their config changed), dropped into a running
//! server's plugin directory, and seen acting on real requests.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{f32_request, f32_values};
use plinth::grpc::pb;
use plinth::grpc::pb::compute_service_client::ComputeServiceClient;
use tonic::Code;

/// A bound on hangs, not a speed assertion. Generous: a Python component
/// compiles for several seconds on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(180);

use common::CONFIG;

/// Runs `plinth ARGS` and returns its stdout; panics with both streams on a
/// non-zero exit.
fn plinth(args: &[&str], cwd: &Path) -> String {
    // One target directory for every scaffold build, kept between runs.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("scaffold-target");
    let out = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args(args)
        .current_dir(cwd)
        .env("CARGO_TARGET_DIR", target)
        .output()
        .expect("plinth runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "plinth {args:?} failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Replaces `from` (which must be there) with `to` in `file`.
fn edit(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(
        text.contains(from),
        "{} lacks {from:?}:\n{text}",
        file.display()
    );
    std::fs::write(file, text.replace(from, to)).unwrap();
}

async fn eventually<T>(what: &str, attempt: impl AsyncFnMut() -> Result<T, String>) -> T {
    common::eventually_within(PATIENCE, what, attempt).await
}

/// A GET over HTTP/1.1: the status and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    common::http_get(&addr.to_string(), path)
        .await
        .unwrap_or_else(|err| panic!("GET {path}: {err}"))
}

fn request(model: &str, route_to: Option<&str>) -> tonic::Request<pb::ComputeRequest> {
    let mut request = tonic::Request::new(f32_request(model, &[1.0, 2.0, 3.0]));
    if let Some(to) = route_to {
        request
            .metadata_mut()
            .insert("x-route", to.parse().unwrap());
    }
    request
}

fn values(response: &pb::ComputeResponse) -> Vec<f32> {
    f32_values(&response.outputs[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaffolded_plugins_of_every_kind_build_and_act_in_a_running_server() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    for kind in ["router", "processor", "metrics", "health", "orchestrator"] {
        let said = plinth(&["plugin", "new", kind, &format!("my-{kind}")], w);
        assert!(
            said.contains(&format!("created {kind} `my-{kind}` (Rust)")),
            "{said}"
        );
    }
    for kind in ["router", "processor", "metrics", "health"] {
        let name = if kind == "processor" {
            "py-scale".to_owned()
        } else {
            format!("py-{kind}")
        };
        let said = plinth(&["plugin", "new", kind, &name, "--lang", "python"], w);
        assert!(
            said.contains(&format!("created {kind} `{name}` (Python)")),
            "{said}"
        );
    }
    // Orchestrators are Rust only, and say so.
    let python_orchestrator = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args([
            "plugin",
            "new",
            "orchestrator",
            "py-orch",
            "--lang",
            "python",
        ])
        .current_dir(w)
        .output()
        .unwrap();
    assert!(!python_orchestrator.status.success());
    assert!(
        String::from_utf8_lossy(&python_orchestrator.stderr)
            .contains("orchestrator plugins are Rust only"),
        "{python_orchestrator:?}"
    );
    // A name that is not one, and a directory already there: refused.
    let refused = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args(["plugin", "new", "router", "My_Router"])
        .current_dir(w)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("plugin name `My_Router`"),
        "{refused:?}"
    );
    let again = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args(["plugin", "new", "router", "my-router"])
        .current_dir(w)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists and is not an empty directory"),
        "{again:?}"
    );

    // Only the config changes: the code is the template's.
    edit(
        &w.join("my-processor/my-processor.toml"),
        "factor = 1.0",
        "factor = 10.0",
    );
    edit(
        &w.join("py-scale/py-scale.toml"),
        "factor = 1.0",
        "factor = 3.0",
    );
    edit(
        &w.join("my-router/my-router.toml"),
        "header = \"route-to\"",
        "header = \"x-route\"",
    );
    edit(
        &w.join("my-health/my-health.toml"),
        "min-ready = 1",
        "min-ready = 99",
    );

    edit(
        &w.join("my-orchestrator/my-orchestrator.toml"),
        "model = \"my-model\"",
        "model = \"plain\"",
    );
    edit(
        &w.join("my-orchestrator/my-orchestrator.toml"),
        "# then = \"my-head\"",
        "then = \"scaled\"",
    );
    edit(
        &w.join("my-orchestrator/my-orchestrator.toml"),
        "# then-input = \"x\"",
        "then-input = \"x\"",
    );

    let repo = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    // Served by the orchestrator: no model file of its own.
    std::fs::create_dir_all(repo.path().join("composed")).unwrap();
    std::fs::write(
        repo.path().join("composed/config.toml"),
        format!("orchestrator = \"my-orchestrator\"\n{CONFIG}"),
    )
    .unwrap();
    for (model, post) in [
        ("scaled", "postprocess = [\"my-processor\"]\n"),
        ("pyscaled", "postprocess = [\"py-scale\"]\n"),
        ("plain", ""),
    ] {
        std::fs::create_dir_all(repo.path().join(model).join("1")).unwrap();
        std::fs::write(
            repo.path().join(model).join("config.toml"),
            format!("{post}{CONFIG}"),
        )
        .unwrap();
        plinth_torch::models::write_scale(&repo.path().join(model).join("1/model.pt"), 2.0)
            .unwrap();
    }
    let running = plinth::start(plinth::ServerConfig::ephemeral(repo.path(), plugins.path()))
        .await
        .expect("server starts");
    let out = plugins.path().to_str().unwrap().to_owned();
    let mut compute = ComputeServiceClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap();

    // Processors, Rust then Python: built straight into the live directory.
    for (project, model, want) in [
        ("my-processor", "scaled", [20.0f32, 40.0, 60.0]),
        ("py-scale", "pyscaled", [6.0, 12.0, 18.0]),
    ] {
        let said = plinth(&["plugin", "build", project, "--out", &out], w);
        assert!(
            said.contains(&format!("built {out}/{project}.wasm")),
            "{said}"
        );
        let got = eventually(&format!("{model} through {project}"), async || {
            let response = compute
                .compute(request(model, None))
                .await
                .map_err(|err| err.to_string())?
                .into_inner();
            let got = values(&response);
            if got == want {
                Ok(got)
            } else {
                Err(format!("{got:?}"))
            }
        })
        .await;
        assert_eq!(got, want);
    }

    // The router: the header sends `scaled` to `plain`; an unknown name is
    // the router's precise refusal.
    plinth(&["plugin", "build", "my-router", "--out", &out], w);
    eventually("the router acting", async || {
        match compute.compute(request("scaled", Some("plain"))).await {
            Ok(response) if values(response.get_ref()) == [2.0, 4.0, 6.0] => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let plain = compute.compute(request("scaled", None)).await.unwrap();
    assert_eq!(values(plain.get_ref()), [20.0, 40.0, 60.0]);
    let err = compute
        .compute(request("scaled", Some("nope")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("x-route: no ready model named `nope`"),
        "{err:?}"
    );

    // Metrics: the counts of what went before, on /metrics.
    plinth(&["plugin", "build", "my-metrics", "--out", &out], w);
    eventually("my_metrics_requests_total on /metrics", async || {
        // Requests after the plugin loaded are the ones it counts.
        let _ = compute.compute(request("plain", None)).await;
        let (status, body) = http_get(running.metrics_addr, "/metrics").await;
        let counted = body.lines().any(|line| {
            line.starts_with("my_metrics_requests_total{model=\"plain\",status=\"ok\"} ")
        });
        if status == 200 && counted {
            Ok(())
        } else {
            Err(format!("{status}: {body}"))
        }
    })
    .await;

    // The orchestrator: `plain` (2x), then `scaled` (2x, then ×10 by
    // my-processor): the nested calls run their models' processors.
    plinth(&["plugin", "build", "my-orchestrator", "--out", &out], w);
    let got = eventually("composed through my-orchestrator", async || {
        let response = compute
            .compute(request("composed", None))
            .await
            .map_err(|err| err.to_string())?
            .into_inner();
        let got = values(&response);
        if got == [40.0, 80.0, 120.0] {
            Ok(got)
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await;
    assert_eq!(got, [40.0, 80.0, 120.0]);

    // The other Python kinds build as they come, and the loader's checks
    // (world, version, instantiate, `init`) accept them.
    let checked = w.join("checked");
    for kind in ["router", "metrics", "health"] {
        let project = format!("py-{kind}");
        plinth(
            &[
                "plugin",
                "build",
                &project,
                "--out",
                checked.to_str().unwrap(),
            ],
            w,
        );
        let wasm = checked.join(format!("{project}.wasm"));
        let said = plinth(&["plugin", "check", wasm.to_str().unwrap()], w);
        assert!(
            said.contains("accepted by this host")
                && said.contains(&format!("world:       {kind}-plugin"))
                && said.contains(&format!("plugin:      {project} 0.1.0")),
            "{said}"
        );
    }

    // Health: 99 ready models wanted, 3 there: readiness turns 503 with the
    // plugin's message.
    let (status, _) = http_get(running.http_addr, "/v2/health/ready").await;
    assert_eq!(status, 200);
    plinth(&["plugin", "build", "my-health", "--out", &out], w);
    eventually(
        "readiness 503 from the health plugin",
        async || match http_get(running.http_addr, "/v2/health/ready").await {
            (503, body) if body.contains("4 models ready, 99 wanted") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    running.shutdown().await;
}
