//! Dynamic batching, backpressure, queue timeouts and cancellation, on a real
//! server with a real TorchScript model. Orderings are made deterministic by
//! a long `max_queue_delay_us`: a batch then runs only once it is full, so
//! the tests never depend on how fast this machine is.

use std::collections::HashMap;
use std::time::Duration;

use plinth::grpc::ipb::{self, model_infer_request::InferInputTensor};
use plinth_tests::fixtures::{self, ModelConfig, scale_config};
use plinth_tests::{PATIENCE, TestServer, eventually};
use tonic::Code;

/// `y = 3x` on `[batch, n]` (n free), batching up to `max_batch_size` rows:
/// `batching` is the batching policy set on [`fixtures::scale_config`].
pub(crate) fn batching_scale(repo: &std::path::Path, model: &str, batching: ModelConfig) {
    batching.write(repo, model);
    fixtures::scale_file(&plinth_tests::model_file(repo, model, "1"), 3.0);
}

fn rows_request(model: &str, rows: &[Vec<f32>]) -> ipb::ModelInferRequest {
    let width = rows[0].len();
    let raw: Vec<u8> = rows
        .iter()
        .flatten()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    ipb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![rows.len() as i64, width as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    }
}

fn with_timeout_us(mut req: ipb::ModelInferRequest, us: i64) -> ipb::ModelInferRequest {
    req.parameters.insert(
        "timeout".into(),
        ipb::InferParameter {
            parameter_choice: Some(ipb::infer_parameter::ParameterChoice::Int64Param(us)),
        },
    );
    req
}

fn output_values(response: &ipb::ModelInferResponse) -> (Vec<i64>, Vec<f32>) {
    let values = response.raw_output_contents[0]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (response.outputs[0].shape.clone(), values)
}

/// A ready `scale` model that batches up to `rows` rows and waits up to a
/// minute to gather them: a batch runs when it is full, so a test decides
/// exactly which requests share it.
pub(crate) async fn gathering_scale(rows: i64) -> TestServer {
    let srv = TestServer::start(
        |repo| {
            batching_scale(
                repo,
                "scale",
                scale_config()
                    .max_batch_size(rows)
                    .max_queue_delay_us(60_000_000),
            )
        },
        true,
    )
    .await;
    srv.wait_ready("scale").await;
    srv
}

#[tokio::test]
async fn concurrent_requests_run_as_one_forward_pass_and_get_their_own_rows() {
    // The batch runs only when 8 rows are queued, so all 8 requests must
    // share one forward pass.
    let srv = gathering_scale(8).await;
    let client = srv.inference().await;
    let calls = (0..8).map(|i| {
        let mut client = client.clone();
        async move {
            let row = vec![i as f32, -(i as f32), 0.5 * i as f32];
            let response = client
                .model_infer(rows_request("scale", std::slice::from_ref(&row)))
                .await
                .unwrap()
                .into_inner();
            (row, output_values(&response))
        }
    });
    for (row, (shape, values)) in futures::future::join_all(calls).await {
        assert_eq!(shape, [1, 3]);
        assert_eq!(values, row.iter().map(|v| v * 3.0).collect::<Vec<_>>());
    }
    let stats = srv.model_stats("scale").await;
    assert_eq!(stats.inference_count, 8);
    assert_eq!(stats.execution_count, 1);
    assert_eq!(stats.batch_stats.len(), 1, "{:?}", stats.batch_stats);
    assert_eq!(stats.batch_stats[0].batch_size, 8);
    assert_eq!(
        stats.batch_stats[0].compute_infer.as_ref().unwrap().count,
        1
    );
}

#[tokio::test]
async fn requests_of_different_widths_are_never_merged() {
    // "racing": without a delay, whatever is queued together may merge;
    // widths 3 and 5 must never share a pass (a merge would fail or mix up
    // numbers). "gathered": with a long delay a pass runs only once it is
    // full or a job of another width arrives, so the order in which the
    // test queues jobs fixes every pass.
    let srv = TestServer::start(
        |repo| {
            batching_scale(
                repo,
                "racing",
                scale_config().max_batch_size(16).instances(1),
            );
            batching_scale(
                repo,
                "gathered",
                scale_config()
                    .max_batch_size(16)
                    .instances(1)
                    .max_queue_delay_us(60_000_000),
            );
        },
        true,
    )
    .await;
    srv.wait_ready("racing").await;
    srv.wait_ready("gathered").await;
    let client = srv.inference().await;
    let calls = (0..48).map(|i| {
        let mut client = client.clone();
        async move {
            let width = if i % 2 == 0 { 3 } else { 5 };
            let rows = width_rows(width, 1 + i % 3, i * 100);
            let response = client
                .model_infer(rows_request("racing", &rows))
                .await
                .unwrap_or_else(|status| panic!("request {i}: {status:?}"))
                .into_inner();
            (rows, output_values(&response))
        }
    });
    for (rows, (shape, values)) in futures::future::join_all(calls).await {
        assert_rows_tripled(&rows, shape, values);
    }
    let stats = srv.model_stats("racing").await;
    let n_rows = (0..48).map(|i| 1 + i % 3).sum::<u64>();
    assert_eq!(stats.inference_count, n_rows);
    // How many passes ran depends on timing; what cannot vary: every row ran
    // in exactly one pass of at most 16 rows, and no request was split.
    let passes: u64 = stats
        .batch_stats
        .iter()
        .map(|b| b.compute_infer.as_ref().unwrap().count)
        .sum();
    let rows_run: u64 = stats
        .batch_stats
        .iter()
        .map(|b| b.batch_size * b.compute_infer.as_ref().unwrap().count)
        .sum();
    assert_eq!((passes, rows_run), (stats.execution_count, n_rows));
    assert!(
        stats.batch_stats.iter().all(|b| b.batch_size <= 16),
        "{:?}",
        stats.batch_stats
    );
    assert!(
        (n_rows / 16..=48).contains(&stats.execution_count),
        "{}",
        stats.execution_count
    );

    // Six requests, each sent once the one before is queued (or answered).
    let send = |width: usize, n: usize, base: usize| {
        let mut client = client.clone();
        let rows = width_rows(width, n, base);
        tokio::spawn(async move {
            let response = client
                .model_infer(rows_request("gathered", &rows))
                .await
                .unwrap()
                .into_inner();
            let (shape, values) = output_values(&response);
            assert_rows_tripled(&rows, shape, values);
        })
    };
    let queued = |n: u64| srv.wait_for("gathered", move |s| s.in_flight == n);
    let a = send(3, 1, 0);
    queued(1).await;
    let b = send(3, 2, 100);
    queued(2).await;
    // A width-5 job ends the width-3 pass of a and b (3 rows).
    let c = send(5, 1, 200);
    a.await.unwrap();
    b.await.unwrap();
    queued(1).await;
    let d = send(5, 3, 300);
    queued(2).await;
    // A width-3 job ends the width-5 pass of c and d (4 rows).
    let e = send(3, 3, 400);
    c.await.unwrap();
    d.await.unwrap();
    queued(1).await;
    // Thirteen rows fill the pass of e to 16.
    let f = send(3, 13, 500);
    e.await.unwrap();
    f.await.unwrap();
    let stats = srv.model_stats("gathered").await;
    assert_eq!((stats.inference_count, stats.execution_count), (23, 3));
    let sizes: HashMap<u64, u64> = stats
        .batch_stats
        .iter()
        .map(|b| (b.batch_size, b.compute_infer.as_ref().unwrap().count))
        .collect();
    assert_eq!(sizes, HashMap::from([(3, 1), (4, 1), (16, 1)]));
}

/// `n` rows of `width` distinct values from `base` on.
fn width_rows(width: usize, n: usize, base: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|r| (0..width).map(|c| (base + r * 10 + c) as f32).collect())
        .collect()
}

/// `y = 3x`, row for row.
fn assert_rows_tripled(rows: &[Vec<f32>], shape: Vec<i64>, values: Vec<f32>) {
    assert_eq!(shape, [rows.len() as i64, rows[0].len() as i64]);
    let want: Vec<f32> = rows.iter().flatten().map(|v| v * 3.0).collect();
    assert_eq!(values, want);
}

#[tokio::test]
async fn a_stream_through_a_batching_model_answers_in_order() {
    let srv = TestServer::start(
        |repo| {
            batching_scale(
                repo,
                "scale",
                scale_config().max_batch_size(4).max_queue_delay_us(20000),
            )
        },
        true,
    )
    .await;
    srv.wait_ready("scale").await;
    let requests: Vec<ipb::ModelInferRequest> = (0..60)
        .map(|i| {
            let mut req = rows_request("scale", &[vec![i as f32, 1.0]]);
            req.id = i.to_string();
            req
        })
        .collect();
    let mut responses = srv
        .inference()
        .await
        .model_stream_infer(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut seen = 0;
    eventually(PATIENCE, "the response stream to end", async || {
        let Some(message) = responses.message().await.unwrap() else {
            return Ok(());
        };
        assert_eq!(message.error_message, "");
        let response = message.infer_response.unwrap();
        assert_eq!(response.id, seen.to_string());
        assert_eq!(output_values(&response).1, [3.0 * seen as f32, 3.0]);
        seen += 1;
        Err(format!("{seen} responses so far"))
    })
    .await;
    assert_eq!(seen, 60);
    let stats = srv.model_stats("scale").await;
    assert_eq!(stats.inference_count, 60);
    // The stream keeps up to 16 requests in flight, so passes were shared.
    assert!(stats.execution_count < 60, "{}", stats.execution_count);
}

#[tokio::test]
async fn a_full_queue_is_refused_at_once_and_queue_timeouts_are_honoured() {
    let srv = TestServer::start(
        |repo| {
            batching_scale(
                repo,
                "scale",
                scale_config()
                    .max_batch_size(8)
                    .max_queue_delay_us(60_000_000)
                    .max_queue_size(2),
            )
        },
        true,
    )
    .await;
    srv.wait_ready("scale").await;
    let client = srv.inference().await;
    // Two requests wait for a batch that will not fill; each may wait 2 s.
    let waiting: Vec<_> = (0..2)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .model_infer(with_timeout_us(
                        rows_request("scale", &[vec![i as f32]]),
                        2_000_000,
                    ))
                    .await
            })
        })
        .collect();
    srv.wait_for("scale", |s| s.in_flight == 2).await;

    // The queue holds two: a third is refused at once, on both protocols.
    let refused = client
        .clone()
        .model_infer(rows_request("scale", &[vec![9.0]]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("queue is full")
            && refused.message().contains("max_queue_size = 2"),
        "{}",
        refused.message()
    );
    let (code, text) = srv
        .http_post(
            "/v2/models/scale/infer",
            &[],
            br#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1,1],"data":[9]}]}"#,
        )
        .await;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("queue is full"), "{text}");

    // The two waiting requests time out in the queue, with the reason.
    for task in waiting {
        let status = task.await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(
            status.message().contains("timed out in the queue")
                && status.message().contains("2000000 µs"),
            "{}",
            status.message()
        );
    }
    // The queue is free again: a full batch runs at once.
    let rows: Vec<Vec<f32>> = (0..8).map(|i| vec![i as f32]).collect();
    let response = client
        .clone()
        .model_infer(rows_request("scale", &rows))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        output_values(&response).1,
        (0..8).map(|i| 3.0 * i as f32).collect::<Vec<_>>()
    );
    let stats = srv.model_stats("scale").await;
    assert_eq!(stats.inference_count, 8, "timed-out requests never ran");
    assert_eq!(stats.execution_count, 1);

    // A timeout that is not a number is refused, naming the parameter.
    let mut bad = rows_request("scale", &[vec![1.0]]);
    bad.parameters.insert(
        "timeout".into(),
        ipb::InferParameter {
            parameter_choice: Some(ipb::infer_parameter::ParameterChoice::StringParam(
                "soon".into(),
            )),
        },
    );
    let status = client.clone().model_infer(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("parameter 'timeout'") && status.message().contains("\"soon\""),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_request_whose_client_has_gone_is_not_executed() {
    let srv = gathering_scale(4).await;
    let client = srv.inference().await;
    // A one-row request waits for a batch; its client gives up after 200 ms
    // by dropping the call (the stream is reset). No `grpc-timeout` is
    // sent: that would be a queue deadline, which takes the job out of the
    // queue by itself (`a_request_past_its_grpc_timeout_leaves_the_queue`).
    let mut giving_up = client.clone();
    let gone = giving_up.model_infer(rows_request("scale", &[vec![100.0]]));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), gone)
            .await
            .is_err(),
        "a one-row request cannot complete a batch of four"
    );
    // The server has let go of it (its handler was dropped)...
    srv.wait_for("scale", |s| s.in_flight == 0).await;
    // ...but its job still sits in the batch being gathered. Three more rows
    // complete the batch; the abandoned row must not run with them.
    let rows = vec![vec![1.0], vec![2.0], vec![3.0]];
    let response = client
        .clone()
        .model_infer(rows_request("scale", &rows))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(output_values(&response), (vec![3, 1], vec![3.0, 6.0, 9.0]));
    let stats = srv.model_stats("scale").await;
    assert_eq!(stats.inference_count, 3, "the abandoned request ran");
    assert_eq!(stats.execution_count, 1);
    let sizes: HashMap<u64, u64> = stats
        .batch_stats
        .iter()
        .map(|b| (b.batch_size, b.compute_infer.as_ref().unwrap().count))
        .collect();
    assert_eq!(sizes, HashMap::from([(3, 1)]));
}

/// `grpc-timeout` is a plain model's queue deadline, as Triton's `timeout`
/// parameter is: a request still waiting for its batch when it passes is
/// answered DEADLINE_EXCEEDED and never runs. (It was once honoured only
/// by orchestrator entries.)
#[tokio::test]
async fn a_request_past_its_grpc_timeout_leaves_the_queue() {
    let srv = gathering_scale(4).await;
    let client = srv.inference().await;
    // The header alone, over a raw HTTP/2 stream: tonic's client would
    // enforce the same deadline itself and race the server's answer.
    let status = raw_grpc_status(
        srv.running().grpc_addr,
        "/inference.GRPCInferenceService/ModelInfer",
        &[("grpc-timeout", "200m")],
        &rows_request("scale", &[vec![100.0]]),
    )
    .await;
    assert_eq!(status.0, Code::DeadlineExceeded as i32, "{status:?}");
    assert!(status.1.contains("timeout"), "{status:?}");
    // The server answered it (its deadline, not the client's): counted as
    // a failure of the model, with nothing executed.
    srv.wait_for("scale", |s| s.in_flight == 0).await;
    let stats = srv.model_stats("scale").await;
    assert_eq!((stats.inference_count, stats.execution_count), (0, 0));
    // Four rows make a batch at once; the expired row is not among them.
    let rows = vec![vec![1.0], vec![2.0], vec![3.0], vec![4.0]];
    let response = client
        .clone()
        .model_infer(rows_request("scale", &rows))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        output_values(&response),
        (vec![4, 1], vec![3.0, 6.0, 9.0, 12.0])
    );
}

/// One unary gRPC call over a raw HTTP/2 stream, with `headers` added:
/// the `grpc-status` and `grpc-message` the server answered with.
async fn raw_grpc_status(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    message: &impl prost::Message,
) -> (i32, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, mut body) = h2.send_request(request.body(()).unwrap(), false).unwrap();
    let encoded = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(encoded.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&encoded);
    body.send_data(frame.into(), true).unwrap();
    let response = tokio::time::timeout(plinth_tests::PATIENCE, response)
        .await
        .expect("an answer within PATIENCE")
        .unwrap();
    let (head, mut body) = response.into_parts();
    // Trailers-only answers carry the status in the headers.
    let fields = match head.headers.get("grpc-status") {
        Some(_) => head.headers,
        None => {
            while body.data().await.is_some() {}
            body.trailers().await.unwrap().unwrap_or_default()
        }
    };
    let read = |name: &str| {
        fields
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    (
        read("grpc-status").parse().unwrap_or(-1),
        read("grpc-message"),
    )
}
