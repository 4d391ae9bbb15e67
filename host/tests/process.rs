//! The `plinth` binary as a user runs it: SIGHUP reloads the plugin
//! directory; SIGTERM drains in-flight requests, then the process exits
//! cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use plinth::grpc::pb;
use plinth::grpc::pb::compute_service_client::ComputeServiceClient;
use plinth::grpc::pb::model_service_client::ModelServiceClient;
use plinth_torch::trace::{self, Device, Kind, TchTensor};

const CONFIG: &str = "[[input]]\nname = \"x\"\ndtype = \"f32\"\nshape = [-1]\n[[output]]\nname = \"y\"\ndtype = \"f32\"\nshape = [-1]\n";

/// `y = 2x` after a long input-dependent matmul chain whose result is discarded.
fn write_slow_model(repo: &std::path::Path) {
    std::fs::create_dir_all(repo.join("slow/1")).unwrap();
    std::fs::write(repo.join("slow/config.toml"), CONFIG).unwrap();
    let weight = TchTensor::full([256, 256], 1.0 / 256.0, (Kind::Float, Device::Cpu));
    trace::save(
        &repo.join("slow/1/model.pt"),
        &[TchTensor::zeros([3], (Kind::Float, Device::Cpu))],
        |xs| {
            let step = &weight + xs[0].sum(Kind::Float) * 0.0;
            let mut acc = step.shallow_clone();
            for _ in 0..600 {
                acc = acc.matmul(&step);
            }
            vec![&xs[0] * 2.0 + acc.sum(Kind::Float) * 0.0]
        },
    )
    .unwrap();
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test]
async fn sighup_reloads_plugins_and_sigterm_drains_then_exits() {
    let repo = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    write_slow_model(repo.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--metrics-port",
            "0",
        ])
        .arg("--model-repository")
        .arg(repo.path())
        .arg("--plugin-dir")
        .arg(plugins.path())
        .arg("--no-plugin-watch")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("plinth starts");

    // The log names the bound address; everything after it is collected for the end.
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let stdout = child.stdout.take().unwrap();
    let log_reader = std::thread::spawn(move || {
        let mut addr_tx = Some(addr_tx);
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = strip_ansi(&line.unwrap());
            if let (Some(tx), Some(pos)) = (addr_tx.as_ref(), line.find("grpc_addr=")) {
                let _ = tx;
                let addr = line[pos + "grpc_addr=".len()..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .to_owned();
                addr_tx.take().unwrap().send(addr).unwrap();
            }
            lines.push(line);
        }
        lines
    });
    let stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map(|l| strip_ansi(&l.unwrap()))
            .collect::<Vec<_>>()
    });
    let addr = match addr_rx.await {
        Ok(addr) => addr,
        Err(_) => {
            let status = child.wait();
            let stderr = err_reader.join().unwrap_or_default();
            panic!(
                "plinth exited ({status:?}) before logging its gRPC address; stderr:\n{}",
                stderr.join("\n")
            );
        }
    };
    let url = format!("http://{addr}");

    let mut models = ModelServiceClient::connect(url.clone()).await.unwrap();
    loop {
        let status = models
            .get_model(pb::GetModelRequest {
                name: "slow".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .model
            .unwrap()
            .status
            .unwrap();
        if status.state == pb::ModelState::Ready as i32 {
            break;
        }
        assert_ne!(
            status.state,
            pb::ModelState::Failed as i32,
            "{}",
            status.reason
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    // With the watcher off, a new plugin file is picked up on SIGHUP only.
    let wasm_dir = std::env::var_os("PLINTH_PLUGIN_WASM_DIR")
        .expect("PLINTH_PLUGIN_WASM_DIR is not set: run the tests with `cargo xtask test`");
    let component = std::path::Path::new(&wasm_dir).join("softmax_topk.wasm");
    std::fs::copy(&component, plugins.path().join("topk.wasm")).expect("copy the plugin");
    let mut plugin_api = pb::plugin_service_client::PluginServiceClient::connect(url.clone())
        .await
        .unwrap();
    let listed = plugin_api
        .list_plugins(pb::ListPluginsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.plugins.is_empty(), "{listed:?}");
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    loop {
        let listed = plugin_api
            .list_plugins(pb::ListPluginsRequest {})
            .await
            .unwrap()
            .into_inner();
        if let Some(topk) = listed.plugins.iter().find(|p| p.name == "topk") {
            assert!(topk.serving, "{topk:?}");
            assert_eq!(topk.world, "processor-plugin");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    let mut compute = ComputeServiceClient::connect(url.clone()).await.unwrap();
    let in_flight = tokio::spawn(async move {
        compute
            .compute(pb::ComputeRequest {
                model: "slow".into(),
                inputs: vec![pb::Tensor {
                    name: "x".into(),
                    dtype: pb::DataType::Float32 as i32,
                    shape: vec![2],
                    data: [3.0f32, -1.0]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect::<Vec<u8>>()
                        .into(),
                }],
                ..Default::default()
            })
            .await
    });
    loop {
        let status = models
            .get_model(pb::GetModelRequest {
                name: "slow".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .model
            .unwrap()
            .status
            .unwrap();
        if status.in_flight >= 1 {
            break;
        }
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request is drained, not dropped")
        .into_inner();
    let y: Vec<f32> = response.outputs[0]
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(y, [6.0, -2.0]);
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "plinth exited with {exit}");
    let mut log = log_reader.join().unwrap();
    log.extend(err_reader.join().unwrap());
    let log = log.join("\n");
    assert!(
        log.contains("shutting down: draining in-flight requests"),
        "{log}"
    );
    assert!(log.contains("stopped"), "{log}");
    assert!(
        log.contains("SIGHUP: reloading the plugin directory"),
        "{log}"
    );
}
