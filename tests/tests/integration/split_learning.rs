//! Split learning end to end (docs/SPLIT_LEARNING.md): a CNN cut in two, the
//! client half run in-process with libtorch, its activations streamed to the
//! server half on a real Plinth over `StreamCompute`, and the logits checked
//! against the uncut model's.

use std::path::Path;

use futures::StreamExt;
use plinth::grpc::pb;
use plinth_tests::{TestServer, compute_request, f32_tensor, f32_values, fixtures};
use plinth_torch::trace::{self, Device, Kind, TchTensor};

/// How far the served logits may be from the uncut model's (max abs diff).
const TOLERANCE: f32 = 1e-5;

/// The cut: the client half turns an image of `IMAGE` into an activation of
/// `ACTIVATION`; the server half turns that into `N_CLASSES` logits.
const IMAGE: [i64; 3] = [3, 32, 32];
const ACTIVATION: [i64; 3] = [16, 16, 16];
const N_CLASSES: i64 = 10;

/// The weights of the CNN of docs/examples/split_learning_export.py:
/// conv(3→16) relu pool | conv(16→32) relu pool, conv(32→32) relu, global
/// average, linear(32→10). They come from a fixed generator, not from
/// torch's global one, so tests running beside this one cannot change them.
struct Cnn {
    conv1: (TchTensor, TchTensor),
    conv2: (TchTensor, TchTensor),
    conv3: (TchTensor, TchTensor),
    linear: (TchTensor, TchTensor),
}

/// Values uniform in [-bound, bound) from a fixed xorshift sequence, shaped `shape`.
fn uniform(shape: &[i64], seed: u64, bound: f32) -> TchTensor {
    let n: i64 = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * unit - 1.0) * bound
        })
        .collect();
    TchTensor::from_slice(&values).view(shape)
}

impl Cnn {
    /// PyTorch's default initialisation bounds (1/sqrt(fan_in)), fixed seeds.
    fn new() -> Cnn {
        let layer = |shape: &[i64], seed: u64| {
            let fan_in: i64 = shape[1..].iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            (
                uniform(shape, seed, bound),
                uniform(&shape[..1], seed + 100, bound),
            )
        };
        Cnn {
            conv1: layer(&[16, 3, 3, 3], 1),
            conv2: layer(&[32, 16, 3, 3], 2),
            conv3: layer(&[32, 32, 3, 3], 3),
            linear: layer(&[N_CLASSES, 32], 4),
        }
    }

    fn conv(x: &TchTensor, (weight, bias): &(TchTensor, TchTensor)) -> TchTensor {
        x.conv2d(weight, Some(bias), [1, 1], [1, 1], [1, 1], 1)
            .relu()
    }

    fn pool(x: &TchTensor) -> TchTensor {
        x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)
    }

    /// Layers 0..3: image → activation.
    fn client_half(&self, image: &TchTensor) -> TchTensor {
        Cnn::pool(&Cnn::conv(image, &self.conv1))
    }

    /// Layers 3..: activation → logits.
    fn server_half(&self, activation: &TchTensor) -> TchTensor {
        let x = Cnn::pool(&Cnn::conv(activation, &self.conv2));
        let x = Cnn::conv(&x, &self.conv3).mean_dim(&[2i64, 3][..], false, Kind::Float);
        let (weight, bias) = &self.linear;
        x.linear(weight, Some(bias))
    }

    /// Traces `part` on a batch of two `input_shape` examples into `path`.
    fn trace(
        &self,
        path: &Path,
        input_shape: [i64; 3],
        part: impl Fn(&Cnn, &TchTensor) -> TchTensor,
    ) {
        let example = TchTensor::zeros(
            [2, input_shape[0], input_shape[1], input_shape[2]],
            (Kind::Float, Device::Cpu),
        );
        trace::save(path, &[example], |xs| vec![part(self, &xs[0])])
            .unwrap_or_else(|err| panic!("tracing {}: {err}", path.display()));
    }
}

/// Batch `batch_idx` of `n` deterministic images, values in [-1, 1].
fn images(batch_idx: usize, n: i64) -> TchTensor {
    let len = n * IMAGE.iter().product::<i64>();
    let values: Vec<f32> = (0..len)
        .map(|i| (i as f32 * 0.0137 + batch_idx as f32 * 0.71).sin())
        .collect();
    TchTensor::from_slice(&values).view([n, IMAGE[0], IMAGE[1], IMAGE[2]])
}

fn forward(module: &tch::CModule, input: &TchTensor) -> TchTensor {
    let _guard = tch::no_grad_guard();
    module.forward_ts(&[input]).expect("forward")
}

fn values(tensor: &TchTensor) -> Vec<f32> {
    Vec::<f32>::try_from(tensor.contiguous().view([-1])).expect("f32 values")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[tokio::test]
async fn split_cnn_streams_activations_and_matches_the_uncut_model() {
    let cnn = Cnn::new();
    let client_dir = tempfile::tempdir().expect("client dir");
    let client_file = client_dir.path().join("client_half.pt");
    let uncut_file = client_dir.path().join("uncut.pt");
    cnn.trace(&client_file, IMAGE, Cnn::client_half);
    cnn.trace(&uncut_file, IMAGE, |cnn, image| {
        cnn.server_half(&cnn.client_half(image))
    });
    // Only the server half is served.
    let srv = TestServer::start(
        |repo| {
            fixtures::config()
                .max_batch_size(8)
                .input("activation", "f32", &ACTIVATION)
                .output("logits", "f32", &[N_CLASSES])
                .write(repo, "cnn_server");
            cnn.trace(
                &plinth_tests::model_file(repo, "cnn_server", "1"),
                ACTIVATION,
                Cnn::server_half,
            );
        },
        true,
    )
    .await;
    srv.wait_ready("cnn_server").await;

    // The client's side, in this process, from the TorchScript files.
    let client_half = tch::CModule::load(&client_file).expect("client half loads");
    let uncut = tch::CModule::load(&uncut_file).expect("uncut model loads");
    let batch_sizes = [1i64, 4, 8, 3];
    let mut requests = Vec::new();
    let mut expected = Vec::new();
    for (batch_idx, &n) in batch_sizes.iter().enumerate() {
        let image = images(batch_idx, n);
        let activation = forward(&client_half, &image);
        assert_eq!(
            activation.size(),
            [n, ACTIVATION[0], ACTIVATION[1], ACTIVATION[2]]
        );
        let mut shape = vec![n];
        shape.extend(ACTIVATION);
        requests.push(pb::ComputeRequest {
            id: format!("batch-{batch_idx}"),
            ..compute_request(
                "cnn_server",
                vec![f32_tensor("activation", &shape, &values(&activation))],
            )
        });
        expected.push((
            format!("batch-{batch_idx}"),
            n,
            values(&forward(&uncut, &image)),
        ));
    }
    // A client that forgot to run its half sends the images themselves: that
    // message alone fails, in band, and the stream goes on.
    let raw_image = images(9, 2);
    requests.insert(
        2,
        pb::ComputeRequest {
            id: "raw-image".into(),
            ..compute_request(
                "cnn_server",
                vec![f32_tensor(
                    "activation",
                    &[2, 3, 32, 32],
                    &values(&raw_image),
                )],
            )
        },
    );

    let responses: Vec<pb::ComputeResponse> = srv
        .compute()
        .await
        .stream_compute(futures::stream::iter(requests))
        .await
        .expect("stream opens")
        .into_inner()
        .map(|r| r.expect("stream item"))
        .collect()
        .await;

    let ids: Vec<&str> = responses.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        ["batch-0", "batch-1", "raw-image", "batch-2", "batch-3"]
    );
    let error = responses[2].error.as_ref().expect("in-band error");
    assert_eq!(error.code, tonic::Code::InvalidArgument as i32);
    assert_eq!(
        error.message,
        "model 'cnn_server': input 'activation': expected shape [-1, 16, 16, 16], got [2, 3, 32, 32]"
    );
    assert!(responses[2].outputs.is_empty());

    let answered = responses.iter().filter(|r| r.id != "raw-image");
    let mut worst = 0.0f32;
    for (response, (id, n, uncut_logits)) in answered.zip(&expected) {
        assert_eq!(&response.id, id);
        assert!(response.error.is_none(), "{id}: {:?}", response.error);
        assert_eq!(response.outputs.len(), 1, "{id}");
        let logits = &response.outputs[0];
        assert_eq!(logits.name, "logits", "{id}");
        assert_eq!(logits.shape, [*n, N_CLASSES], "{id}");
        let diff = max_abs_diff(&f32_values(logits), uncut_logits);
        assert!(
            diff <= TOLERANCE,
            "{id}: logits differ from the uncut model's by {diff}"
        );
        worst = worst.max(diff);
    }
    println!("split learning: max abs diff from the uncut model {worst:e}");

    // The comparison means something only if the logits tell images apart:
    // every image's logits differ from the next one's by far more than the tolerance.
    for (id, n, logits) in &expected {
        let rows: Vec<&[f32]> = logits.chunks(N_CLASSES as usize).collect();
        assert_eq!(rows.len(), *n as usize);
        for pair in rows.windows(2) {
            assert!(
                max_abs_diff(pair[0], pair[1]) > 100.0 * TOLERANCE,
                "{id}: {pair:?}"
            );
        }
    }
    let first_rows: Vec<&[f32]> = expected.iter().map(|(_, _, l)| &l[..10]).collect();
    for pair in first_rows.windows(2) {
        assert!(
            max_abs_diff(pair[0], pair[1]) > 100.0 * TOLERANCE,
            "{pair:?}"
        );
    }
    srv.stop().await;
}
