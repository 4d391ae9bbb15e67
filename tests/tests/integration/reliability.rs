//! Staying up, after Triton's L0_lifecycle and L0_grpc_state_cleanup: many
//! clients changing the model set at once with plugin swaps mixed in, and
//! streams and calls abandoned every way a client can abandon them. Each
//! ends with the server's own counters (GetInfo `runtime`) back at rest.
//!
//! The CI sizes are small; `PLINTH_STRESS_ITERATIONS` sets the lifecycle
//! run's iterations per client (docs/RELIABILITY.md has the full run).

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use plinth::grpc::pb;
use plinth_tests::fixtures::{self, affine_expected};
use plinth_tests::{
    ModelState, PATIENCE, TestServer, compute_request, eventually, f32_tensor, f32_values,
    install_plugin,
};
use tonic::Code;

const CLIENTS: usize = 32;
const MODELS: [&str; 3] = ["a", "b", "c"];

/// A small deterministic generator: each client's interleaving is its own
/// and the same on every run.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn iterations() -> usize {
    std::env::var("PLINTH_STRESS_ITERATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20)
}

/// The codes each action may answer with when other clients are changing
/// the same models at the same moment, as the README documents them.
fn documented(action: &str, status: &tonic::Status) -> bool {
    let code = status.code();
    match action {
        // Already loading or ready; still unloading (load it again later).
        "load" => {
            matches!(code, Code::AlreadyExists | Code::Unavailable)
                || (code == Code::FailedPrecondition && status.message().contains("is UNLOADING"))
        }
        // Not loaded, or already on its way out.
        "unload" => matches!(code, Code::FailedPrecondition | Code::Unavailable),
        // Not ready; or a plugin of the chain still loading after a swap.
        "infer" => code == Code::Unavailable,
        _ => false,
    }
}

/// 32 clients each load, infer and unload the same three models in their
/// own random order, while the preprocessing plugin of model `c` is swapped
/// between two components. Every answer is a success (inferences with the
/// right numbers) or a documented status; afterwards no model is left
/// LOADING or UNLOADING, every model loads and answers again, and nothing
/// is left in flight, queued or streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_clients_changing_the_model_set_leave_the_registry_consistent() {
    let srv = TestServer::start(
        |repo| {
            for model in MODELS {
                fixtures::affine(repo, model, 4);
            }
            fixtures::affine_config(4)
                .preprocess(&["swapped"])
                .write(repo, "c");
        },
        false,
    )
    .await;
    // Both components pass an f32 input through their preprocess side
    // unchanged, so `c`'s numbers do not depend on which one serves.
    install_plugin(srv.plugins.path(), "swapped", "image_normalize", None);
    srv.wait_plugin("swapped", |s| s.serving).await;
    let iterations = iterations();
    let row = [1.0f32, -2.0, 0.5, 4.0];
    let expected = affine_expected(&row).to_vec();

    // Swaps are one at a time (they share a staging file name), as an
    // operator's deploys are; the clients' calls are not.
    let swapping = std::sync::Arc::new(std::sync::Mutex::new(()));
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let swapping = std::sync::Arc::clone(&swapping);
        let models = srv.models().await;
        let compute = srv.compute().await;
        let plugins = srv.plugins.path().to_owned();
        let expected = expected.clone();
        clients.push(tokio::spawn(async move {
            let (mut models, mut compute) = (models, compute);
            let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (client as u64 + 1));
            let mut seen: BTreeMap<String, u64> = BTreeMap::new();
            let mut undocumented = Vec::new();
            for _ in 0..iterations {
                let model = MODELS[rng.below(3) as usize].to_owned();
                let (action, outcome) = match rng.below(10) {
                    0..=2 => (
                        "load",
                        models
                            .load_model(pb::LoadModelRequest {
                                name: model.clone(),
                                reload: false,
                                wait: true,
                            })
                            .await
                            .map(drop),
                    ),
                    3..=4 => (
                        "unload",
                        models
                            .unload_model(pb::UnloadModelRequest {
                                name: model.clone(),
                            })
                            .await
                            .map(drop),
                    ),
                    5 if client % 8 == 0 => {
                        // A plugin swap: a new component under the same name.
                        let component = if rng.below(2) == 0 {
                            "softmax_topk"
                        } else {
                            "image_normalize"
                        };
                        let _one = swapping.lock().unwrap();
                        install_plugin(&plugins, "swapped", component, None);
                        ("swap", Ok(()))
                    }
                    _ => {
                        let answer = compute
                            .compute(compute_request(
                                &model,
                                vec![f32_tensor("x", &[1, 4], &row)],
                            ))
                            .await;
                        (
                            "infer",
                            answer.map(|response| {
                                let y = f32_values(&response.into_inner().outputs[0]);
                                assert_eq!(y, expected, "model {model} answered wrong numbers");
                            }),
                        )
                    }
                };
                let key = match &outcome {
                    Ok(()) => format!("{action}: OK"),
                    Err(status) => format!("{action}: {:?}", status.code()),
                };
                *seen.entry(key).or_default() += 1;
                if let Err(status) = outcome
                    && !documented(action, &status)
                {
                    undocumented.push(format!("{action} {model}: {status:?}"));
                }
            }
            (seen, undocumented)
        }));
    }
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut undocumented = Vec::new();
    for client in clients {
        let (counts, bad) = client.await.expect("a client task panicked");
        for (key, n) in counts {
            *seen.entry(key).or_default() += n;
        }
        undocumented.extend(bad);
    }
    println!("lifecycle stress, {CLIENTS} clients x {iterations} iterations: {seen:?}");
    assert!(
        undocumented.is_empty(),
        "undocumented answers: {undocumented:?}"
    );
    assert!(seen.get("infer: OK").copied().unwrap_or(0) > 0, "{seen:?}");
    assert!(seen.get("load: OK").copied().unwrap_or(0) > 0, "{seen:?}");

    // Settled: no model stays busy.
    for model in MODELS {
        let status = srv
            .wait_for(model, |s| {
                s.state != ModelState::Loading as i32 && s.state != ModelState::Unloading as i32
            })
            .await;
        assert!(
            status.state == ModelState::Ready as i32
                || status.state == ModelState::Unavailable as i32,
            "{model}: {status:?}"
        );
    }
    // Consistent: every model loads (or already is) and answers right.
    srv.wait_plugin("swapped", |s| s.serving && !s.compiling)
        .await;
    let mut compute = srv.compute().await;
    for model in MODELS {
        match srv.load(model).await {
            Ok(_) => {}
            Err(status) if status.code() == Code::AlreadyExists => {}
            Err(status) => panic!("{model} does not load again: {status:?}"),
        }
        srv.wait_ready(model).await;
        let out = compute
            .compute(compute_request(model, vec![f32_tensor("x", &[1, 4], &row)]))
            .await
            .unwrap_or_else(|status| panic!("{model}: {status:?}"))
            .into_inner();
        assert_eq!(f32_values(&out.outputs[0]), expected);
    }
    at_rest(&srv).await;
    srv.stop().await;
}

/// Waits until nothing is in flight, queued or streaming; returns the
/// counters then.
async fn at_rest(srv: &TestServer) -> pb::RuntimeCounters {
    eventually(
        PATIENCE,
        "in-flight, queued and streams back to 0",
        async || {
            let runtime = srv.info().await.runtime.expect("runtime counters");
            if runtime.in_flight == 0 && runtime.queued == 0 && runtime.open_streams == 0 {
                Ok(runtime)
            } else {
                Err(format!("{runtime:?}"))
            }
        },
    )
    .await
}

/// Streams and calls abandoned in every way: a stream dropped with
/// requests in flight, a client that vanishes mid-call, a deadline that
/// passes, an Open Inference stream cancelled. Afterwards in-flight counts,
/// queues and open streams return to zero, the server's task count to its
/// baseline, and the server still answers. Then a shutdown with a stream
/// open ends that stream rather than waiting on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_streams_and_calls_leave_no_state_behind() {
    let srv = TestServer::start(|repo| fixtures::slow(repo, "slow", 400), true).await;
    srv.wait_ready("slow").await;
    let x = || vec![f32_tensor("x", &[3], &[1.0, 2.0, 3.0])];
    // One request end to end before the baseline, so that lazily started
    // machinery is counted in it.
    let mut compute = srv.compute().await;
    compute
        .compute(compute_request("slow", x()))
        .await
        .expect("a first request");
    let baseline = at_rest(&srv).await;
    assert_eq!(baseline.open_streams, 0);

    // 1. A stream with requests in flight, dropped by its client.
    {
        let mut client = srv.compute().await;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        for _ in 0..6 {
            tx.send(compute_request("slow", x())).await.unwrap();
        }
        let mut answers = client
            .stream_compute(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("stream opens")
            .into_inner();
        // Seen open and busy by the server, then abandoned.
        eventually(PATIENCE, "the stream open and in flight", async || {
            let runtime = srv.info().await.runtime.unwrap();
            (runtime.open_streams == 1 && runtime.in_flight > 0)
                .then_some(())
                .ok_or(format!("{runtime:?}"))
        })
        .await;
        let _ = answers.next().await;
        drop(answers);
        drop(tx);
    }

    // 2. A client that vanishes mid-call: its channel and task dropped.
    {
        let client = srv.compute().await;
        let call = tokio::spawn(async move {
            let mut client = client;
            client.compute(compute_request("slow", x())).await
        });
        eventually(PATIENCE, "the vanishing call in flight", async || {
            let runtime = srv.info().await.runtime.unwrap();
            (runtime.in_flight > 0)
                .then_some(())
                .ok_or(format!("{runtime:?}"))
        })
        .await;
        call.abort();
        let _ = call.await;
    }

    // 3. A deadline that passes while the request waits or runs.
    {
        let mut request = tonic::Request::new(compute_request("slow", x()));
        request.set_timeout(Duration::from_millis(1));
        let err = compute.compute(request).await.unwrap_err();
        assert!(
            matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{err:?}"
        );
    }

    // 4. An Open Inference stream cancelled with a request in flight.
    {
        let mut client =
            plinth::grpc::ipb::grpc_inference_service_client::GrpcInferenceServiceClient::new(
                srv.channel().await,
            );
        let input = plinth::grpc::ipb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![3],
            contents: Some(plinth::grpc::ipb::InferTensorContents {
                fp32_contents: vec![1.0, 2.0, 3.0],
                ..Default::default()
            }),
            ..Default::default()
        };
        let request = plinth::grpc::ipb::ModelInferRequest {
            model_name: "slow".into(),
            inputs: vec![input],
            ..Default::default()
        };
        let answers = client
            .model_stream_infer(futures::stream::iter(vec![request.clone(), request]))
            .await
            .expect("stream opens")
            .into_inner();
        eventually(PATIENCE, "the OIP stream open", async || {
            let runtime = srv.info().await.runtime.unwrap();
            (runtime.open_streams == 1)
                .then_some(())
                .ok_or(format!("{runtime:?}"))
        })
        .await;
        drop(answers);
    }

    // Back at rest: nothing in flight, queued or open, and no task left
    // behind (the test's own GetInfo channel is part of the baseline).
    let rest = eventually(
        PATIENCE,
        "the task count back to its baseline",
        async || {
            let runtime = at_rest(&srv).await;
            (runtime.tasks <= baseline.tasks)
                .then_some(runtime)
                .ok_or(format!(
                    "{} tasks, baseline {}",
                    runtime.tasks, baseline.tasks
                ))
        },
    )
    .await;
    println!("state cleanup: baseline {baseline:?}\nafter: {rest:?}");
    compute
        .compute(compute_request("slow", x()))
        .await
        .expect("still serving");

    // 5. A shutdown with a stream open and busy: the stream ends, and the
    // shutdown does not wait on the client.
    let mut client = srv.compute().await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(compute_request("slow", x())).await.unwrap();
    let mut answers = client
        .stream_compute(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream opens")
        .into_inner();
    let stopped = tokio::spawn(srv.stop());
    tokio::time::timeout(PATIENCE, stopped)
        .await
        .expect("shutdown finishes with a stream open")
        .unwrap();
    let ended = tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(_)) = answers.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream ended with the server");
    drop(tx);
}
