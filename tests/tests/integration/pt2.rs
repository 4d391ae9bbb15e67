//! AOTInductor packages (`model.pt2`) served beside TorchScript, with the
//! packages, inputs and expected outputs PyTorch 2.11 made
//! (`tests/fixtures/pt2/make.py`): exact numbers over `plinth.v1`, OIP gRPC
//! and REST, batching, bad packages, a TorchScript version replaced by a
//! package under `--poll`, and packages behind processors and orchestrators.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use plinth::grpc::{ipb, pb};
use plinth::tensor::{DType, Tensor};
use plinth_tests::fixtures::{self, ModelConfig};
use plinth_tests::{TestServer, compute_request, f32_tensor, f32_values, install_plugin};
use serde_json::{Value, json};
use tonic::Code;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/pt2")
        .join(name)
}

/// A fixture's `.npy` file as a tensor named `name`. NumPy has no
/// bfloat16: make.py saves a bf16 tensor's bit patterns as int16, so an
/// int16 file is read back as bf16 (no fixture has int16 tensors).
fn npy(fixture_name: &str, file: &str, name: &str) -> Tensor {
    let tensor = plinth_torch::read_npy(&fixture(fixture_name).join(file), name).unwrap();
    if tensor.dtype() == DType::I16 {
        return Tensor::new(
            name,
            DType::BF16,
            tensor.shape().to_vec(),
            tensor.data().clone(),
        )
        .unwrap();
    }
    tensor
}

/// Copies a fixture's package into `<repo>/<model>/<version>/model.pt2`.
fn install_package(repo: &Path, model: &str, version: &str, fixture_name: &str) {
    let dir = repo.join(model).join(version);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixture(fixture_name).join("model.pt2"),
        dir.join("model.pt2"),
    )
    .unwrap();
}

/// [N, 3, 16, 16] f32 images -> [N, 10] logits; compiled for 2..=15 rows.
fn cnn_config() -> ModelConfig {
    fixtures::config()
        .max_batch_size(15)
        .input("image", "f32", &[3, 16, 16])
        .output("logits", "f32", &[10])
}

/// [N, 4] f32 -> ([N, 4] f32, [N] i64) through torch.cond; 2..=16 rows.
fn branch_config() -> ModelConfig {
    fixtures::config()
        .max_batch_size(16)
        .input("x", "f32", &[4])
        .output("y", "f32", &[4])
        .output("index", "i64", &[])
}

/// [N, 8] f16 -> [N, 4] f32; 1..=8 rows.
fn half_config() -> ModelConfig {
    fixtures::config()
        .max_batch_size(8)
        .input("x", "f16", &[8])
        .output("y", "f32", &[4])
}

/// y = 2x over [N, 16] f32; 1..=64 rows (a TorchScript twin sits beside it).
fn tiny_config() -> ModelConfig {
    fixtures::config()
        .max_batch_size(64)
        .input("x", "f32", &[16])
        .output("y", "f32", &[16])
}

/// [N, 4] bf16 -> ([N, 4] bool, [N, 4] bf16); up to 8 rows.
fn mixed_config() -> ModelConfig {
    fixtures::config()
        .max_batch_size(8)
        .input("x", "bf16", &[4])
        .output("positive", "bool", &[4])
        .output("double", "bf16", &[4])
}

fn packages_repo(repo: &Path) {
    mixed_config().write(repo, "mixed");
    install_package(repo, "mixed", "1", "mixed");
    cnn_config().write(repo, "cnn");
    install_package(repo, "cnn", "1", "cnn");
    branch_config().write(repo, "branch");
    install_package(repo, "branch", "1", "branch");
    half_config().write(repo, "half");
    install_package(repo, "half", "1", "half");
}

/// Every (model, input files, expected files) case of the fixtures, with
/// the config's tensor names.
struct Case {
    model: &'static str,
    fixture: &'static str,
    label: &'static str,
    inputs: &'static [&'static str],
    outputs: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        model: "cnn",
        fixture: "cnn",
        label: "b1",
        inputs: &["image"],
        outputs: &["logits"],
    },
    Case {
        model: "cnn",
        fixture: "cnn",
        label: "b15",
        inputs: &["image"],
        outputs: &["logits"],
    },
    Case {
        model: "branch",
        fixture: "branch",
        label: "pos",
        inputs: &["x"],
        outputs: &["y", "index"],
    },
    Case {
        model: "branch",
        fixture: "branch",
        label: "neg",
        inputs: &["x"],
        outputs: &["y", "index"],
    },
    Case {
        model: "branch",
        fixture: "branch",
        label: "b16",
        inputs: &["x"],
        outputs: &["y", "index"],
    },
    Case {
        model: "half",
        fixture: "half",
        label: "b1",
        inputs: &["x"],
        outputs: &["y"],
    },
    Case {
        model: "half",
        fixture: "half",
        label: "b8",
        inputs: &["x"],
        outputs: &["y"],
    },
    Case {
        model: "mixed",
        fixture: "mixed",
        label: "b3",
        inputs: &["x"],
        outputs: &["positive", "double"],
    },
];

impl Case {
    fn inputs(&self) -> Vec<Tensor> {
        self.inputs
            .iter()
            .enumerate()
            .map(|(i, name)| npy(self.fixture, &format!("input_{}_{i}.npy", self.label), name))
            .collect()
    }

    fn expected(&self) -> Vec<Tensor> {
        self.outputs
            .iter()
            .enumerate()
            .map(|(i, name)| {
                npy(
                    self.fixture,
                    &format!("expected_{}_{i}.npy", self.label),
                    name,
                )
            })
            .collect()
    }

    fn what(&self) -> String {
        format!("{} {}", self.model, self.label)
    }
}

fn pb_dtype(dtype: DType) -> pb::DataType {
    match dtype {
        DType::F32 => pb::DataType::Float32,
        DType::F16 => pb::DataType::Float16,
        DType::I64 => pb::DataType::Int64,
        DType::Bool => pb::DataType::Bool,
        DType::BF16 => pb::DataType::Bfloat16,
        other => panic!("no fixture uses {other}"),
    }
}

fn oip_datatype(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "FP32",
        DType::F16 => "FP16",
        DType::I64 => "INT64",
        DType::Bool => "BOOL",
        DType::BF16 => "BF16",
        other => panic!("no fixture uses {other}"),
    }
}

fn to_pb(tensor: &Tensor) -> pb::Tensor {
    pb::Tensor {
        name: tensor.name().to_owned(),
        dtype: pb_dtype(tensor.dtype()) as i32,
        shape: tensor.shape().to_vec(),
        data: tensor.data().clone(),
    }
}

/// Asserts an answer (name, shape, bytes) equals PyTorch's, bit for bit.
fn assert_exact(what: &str, got: (&str, &[i64], &[u8]), want: &Tensor) {
    assert_eq!(got.0, want.name(), "{what}: output name");
    assert_eq!(
        got.1,
        want.shape(),
        "{what}: output '{}' shape",
        want.name()
    );
    assert!(
        got.2 == &want.data()[..],
        "{what}: output '{}' differs from PyTorch's",
        want.name()
    );
}

/// `model` answers the fixture's batch-1 input over plinth.v1 with
/// PyTorch's output, bit for bit.
async fn assert_serves_fixture(
    srv: &TestServer,
    model: &str,
    fixture: &str,
    input: &str,
    output: &str,
) {
    let x = npy(fixture, "input_b1_0.npy", input);
    let want = npy(fixture, "expected_b1_0.npy", output);
    let answer = srv
        .compute()
        .await
        .compute(compute_request(model, vec![to_pb(&x)]))
        .await
        .unwrap()
        .into_inner();
    let got = &answer.outputs[0];
    assert_exact(model, (&got.name, &got.shape, &got.data), &want);
}

/// The little-endian bytes of a JSON `data` array of `dtype`.
fn json_bytes(dtype: DType, data: &Value) -> Vec<u8> {
    let values = data.as_array().expect("data is an array");
    let mut out = Vec::new();
    for v in values {
        match dtype {
            DType::F32 => out.extend((v.as_f64().unwrap() as f32).to_le_bytes()),
            DType::I64 => out.extend(v.as_i64().unwrap().to_le_bytes()),
            DType::Bool => out.push(u8::from(v.as_bool().unwrap())),
            DType::BF16 => out.extend(half::bf16::from_f64(v.as_f64().unwrap()).to_le_bytes()),
            other => panic!("no fixture answers {other}"),
        }
    }
    out
}

/// A JSON `data` array of a tensor's values.
fn json_data(tensor: &Tensor) -> Value {
    let data = tensor.data();
    match tensor.dtype() {
        DType::F32 => json!(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>()
        ),
        DType::F16 => json!(
            data.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect::<Vec<_>>()
        ),
        DType::BF16 => json!(
            data.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect::<Vec<_>>()
        ),
        other => panic!("no fixture sends {other}"),
    }
}

async fn start_packages() -> TestServer {
    let srv = TestServer::start(packages_repo, true).await;
    for model in ["cnn", "branch", "half", "mixed"] {
        srv.wait_ready(model).await;
    }
    srv
}

#[tokio::test]
async fn packages_answer_pytorchs_numbers_over_every_api() {
    let srv = start_packages().await;
    let mut compute = srv.compute().await;
    let mut oip = srv.inference().await;
    let http = reqwest::Client::new();
    for case in CASES {
        let what = case.what();
        let inputs = case.inputs();
        let expected = case.expected();

        // plinth.v1
        let answer = compute
            .compute(compute_request(
                case.model,
                inputs.iter().map(to_pb).collect(),
            ))
            .await
            .unwrap_or_else(|e| panic!("{what}: plinth.v1: {e}"))
            .into_inner();
        assert_eq!(answer.outputs.len(), expected.len(), "{what}");
        for (got, want) in answer.outputs.iter().zip(&expected) {
            assert_eq!(got.dtype, pb_dtype(want.dtype()) as i32, "{what}");
            assert_exact(
                &format!("{what} plinth.v1"),
                (&got.name, &got.shape, &got.data),
                want,
            );
        }

        // OIP over gRPC, raw contents.
        let request = ipb::ModelInferRequest {
            model_name: case.model.into(),
            inputs: inputs
                .iter()
                .map(|t| ipb::model_infer_request::InferInputTensor {
                    name: t.name().into(),
                    datatype: oip_datatype(t.dtype()).into(),
                    shape: t.shape().to_vec(),
                    ..Default::default()
                })
                .collect(),
            raw_input_contents: inputs.iter().map(|t| t.data().clone()).collect(),
            ..Default::default()
        };
        let answer = oip
            .model_infer(request)
            .await
            .unwrap_or_else(|e| panic!("{what}: OIP gRPC: {e}"))
            .into_inner();
        for ((meta, raw), want) in answer
            .outputs
            .iter()
            .zip(&answer.raw_output_contents)
            .zip(&expected)
        {
            assert_eq!(meta.datatype, oip_datatype(want.dtype()), "{what}");
            assert_exact(
                &format!("{what} OIP gRPC"),
                (&meta.name, &meta.shape, raw),
                want,
            );
        }

        // OIP over REST, JSON.
        let body = json!({
            "inputs": inputs.iter().map(|t| json!({
                "name": t.name(),
                "shape": t.shape(),
                "datatype": oip_datatype(t.dtype()),
                "data": json_data(t),
            })).collect::<Vec<_>>()
        });
        let response = http
            .post(format!("{}/v2/models/{}/infer", srv.http_url(), case.model))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{what}: REST");
        let answer: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        let outputs = answer["outputs"].as_array().unwrap();
        for (got, want) in outputs.iter().zip(&expected) {
            let shape: Vec<i64> = serde_json::from_value(got["shape"].clone()).unwrap();
            let bytes = json_bytes(want.dtype(), &got["data"]);
            assert_exact(
                &format!("{what} REST"),
                (got["name"].as_str().unwrap(), &shape, &bytes),
                want,
            );
        }
    }

    // One row more than the package's maximum: refused, naming it.
    let rows16 = f32_tensor("image", &[16, 3, 16, 16], &vec![0.5; 16 * 768]);
    let err = compute
        .compute(compute_request("cnn", vec![rows16]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("'image'") && err.message().contains("16"),
        "{err:?}"
    );

    // Every API says which format each version is.
    let status = srv.status("cnn").await;
    assert_eq!(status.formats, ["aoti-package"], "{status:?}");
    let metadata = oip
        .model_metadata(ipb::ModelMetadataRequest {
            name: "half".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metadata.platform, "pytorch_aoti");
    let rest = http
        .get(format!("{}/v2/models/branch", srv.http_url()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let rest: Value = serde_json::from_slice(&rest).unwrap();
    assert_eq!(rest["platform"], "pytorch_aoti", "{rest}");
    srv.stop().await;
}

#[tokio::test]
async fn concurrent_rows_are_batched_into_one_package_run() {
    // 15 single-row requests, gathered for up to a minute: they run as one
    // batch of the package's maximum, and each answer is its row of
    // PyTorch's batch-15 output.
    let srv = TestServer::start(
        |repo| {
            cnn_config()
                .max_queue_delay_us(60_000_000)
                .write(repo, "cnn");
            install_package(repo, "cnn", "1", "cnn");
        },
        true,
    )
    .await;
    srv.wait_ready("cnn").await;
    let images = npy("cnn", "input_b15_0.npy", "image");
    let logits = npy("cnn", "expected_b15_0.npy", "logits");
    let (image_bytes, logit_bytes) = (3 * 16 * 16 * 4, 10 * 4);
    let mut calls = Vec::new();
    for row in 0..15 {
        let image = images
            .data()
            .slice(row * image_bytes..(row + 1) * image_bytes);
        let request = compute_request(
            "cnn",
            vec![pb::Tensor {
                name: "image".into(),
                dtype: pb::DataType::Float32 as i32,
                shape: vec![1, 3, 16, 16],
                data: image,
            }],
        );
        let mut client = srv.compute().await;
        calls.push(tokio::spawn(
            async move { (row, client.compute(request).await) },
        ));
    }
    for call in calls {
        let (row, answer) = call.await.unwrap();
        let answer = answer.unwrap().into_inner();
        assert_eq!(answer.outputs[0].shape, [1, 10]);
        assert!(
            answer.outputs[0].data == logits.data()[row * logit_bytes..(row + 1) * logit_bytes],
            "row {row} differs from PyTorch's"
        );
    }
    let stats = srv.model_stats("cnn").await;
    assert_eq!(stats.inference_count, 15);
    assert_eq!(
        stats.execution_count, 1,
        "the rows ran as one batch: {stats:?}"
    );
    srv.stop().await;
}

/// Rewrites a package, passing each entry through `edit` (`None` drops it).
fn rewrite_package(from: &Path, to: &Path, edit: impl Fn(&str, Vec<u8>) -> Option<Vec<u8>>) {
    let mut input = zip::ZipArchive::new(std::fs::File::open(from).unwrap()).unwrap();
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    let mut output = zip::ZipWriter::new(std::fs::File::create(to).unwrap());
    let options =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..input.len() {
        let mut entry = input.by_index(i).unwrap();
        let name = entry.name().to_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        if let Some(data) = edit(&name, data) {
            output.start_file(name, options).unwrap();
            output.write_all(&data).unwrap();
        }
    }
    output.finish().unwrap();
}

/// `needle` replaced by `with` (same length) wherever it occurs.
fn replace_bytes(mut data: Vec<u8>, needle: &[u8], with: &[u8]) -> Vec<u8> {
    assert_eq!(needle.len(), with.len());
    let mut found = false;
    let mut i = 0;
    while i + needle.len() <= data.len() {
        if &data[i..i + needle.len()] == needle {
            data[i..i + needle.len()].copy_from_slice(with);
            found = true;
            i += needle.len();
        } else {
            i += 1;
        }
    }
    assert!(found, "{} not found", String::from_utf8_lossy(needle));
    data
}

#[tokio::test]
async fn bad_packages_fail_with_their_reason_and_the_rest_serve() {
    let tiny = fixture("tiny/model.pt2");
    let srv = TestServer::start(
        |repo| {
            let model = |name: &str| {
                tiny_config().write(repo, name);
                repo.join(name).join("1/model.pt2")
            };
            install_package(repo, "good", "1", "tiny");
            tiny_config().write(repo, "good");
            // Not a zip at all, and a real package cut in half.
            let path = model("not_zip");
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"this is not a package").unwrap();
            let bytes = std::fs::read(&tiny).unwrap();
            let path = model("truncated");
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
            // Without its compiled library.
            rewrite_package(&tiny, &model("no_library"), |name, data| {
                (!name.ends_with(".so")).then_some(data)
            });
            // Compiled for CUDA: the metadata a CUDA export writes.
            rewrite_package(&tiny, &model("cuda_package"), |name, data| {
                Some(if name.ends_with("_metadata.json") {
                    let text = String::from_utf8(data).unwrap();
                    let cuda = text.replace(
                        "\"AOTI_DEVICE_KEY\": \"cpu\"",
                        "\"AOTI_DEVICE_KEY\": \"cuda\"",
                    );
                    assert_ne!(cuda, text, "the metadata names its device");
                    cuda.into_bytes()
                } else {
                    data
                })
            });
            // Built by another torch: its library calls a libtorch
            // function this libtorch does not have (one renamed in the
            // library's dynamic symbol table, as a newer torch's would be).
            rewrite_package(&tiny, &model("other_torch"), |name, data| {
                Some(if name.ends_with(".so") {
                    replace_bytes(
                        data,
                        b"aoti_torch_empty_strided\0",
                        b"aoti_torch_empty_stridez\0",
                    )
                } else {
                    data
                })
            });
            // A max_batch_size beyond the package's compiled maximum.
            cnn_config().max_batch_size(32).write(repo, "too_wide");
            install_package(repo, "too_wide", "1", "cnn");
            // A config whose input dtype is not the package's.
            fixtures::config()
                .max_batch_size(64)
                .input("x", "f64", &[16])
                .output("y", "f32", &[16])
                .write(repo, "wrong_dtype");
            install_package(repo, "wrong_dtype", "1", "tiny");
        },
        true,
    )
    .await;
    srv.wait_ready("good").await;
    let cases: &[(&str, &[&str])] = &[
        ("not_zip", &["not a readable .pt2 package"]),
        ("truncated", &["not a readable .pt2 package"]),
        ("no_library", &["holds no compiled library"]),
        ("cuda_package", &["compiled for CUDA"]),
        (
            "other_torch",
            &["aoti_torch_empty_stridez", "another torch version"],
        ),
        (
            "too_wide",
            &["max_batch_size = 32", "at most 15", "input 'image'"],
        ),
        (
            "wrong_dtype",
            &["input 'x'", "declares dtype f64", "package takes f32"],
        ),
    ];
    for (model, words) in cases {
        let status = srv
            .wait_for(model, |s| s.state == pb::ModelState::Failed as i32)
            .await;
        for word in *words {
            assert!(
                status.reason.contains(word),
                "{model}: reason lacks {word:?}: {}",
                status.reason
            );
        }
        assert!(status.reason.contains("model.pt2"), "{}", status.reason);
    }
    // The good package serves, its numbers PyTorch's.
    assert_serves_fixture(&srv, "good", "tiny", "x", "y").await;
    srv.stop().await;
}

#[tokio::test]
async fn a_torchscript_version_is_replaced_by_a_package_under_poll_with_no_failed_request() {
    let srv = TestServer::start_with(
        |repo| {
            tiny_config().write(repo, "tiny");
            let dir = repo.join("tiny/1");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(fixture("tiny/model.pt"), dir.join("model.pt")).unwrap();
        },
        |config| {
            config.load_all = true;
            config.poll = true;
        },
    )
    .await;
    let status = srv.wait_ready("tiny").await;
    assert_eq!(status.formats, ["torchscript"]);
    let x = npy("tiny", "input_b1_0.npy", "x");
    let want = npy("tiny", "expected_b1_0.npy", "y");

    // Load: requests back to back from four clients, through the swap.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut client = srv.compute().await;
        let (x, want, stop) = (x.clone(), want.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut served = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let answer = client
                    .compute(compute_request("tiny", vec![to_pb(&x)]))
                    .await
                    .expect("no request fails while the format changes")
                    .into_inner();
                assert!(answer.outputs[0].data == want.data()[..], "wrong answer");
                served += 1;
            }
            served
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Version 2: the same model, exported and compiled as a package.
    let staging = srv.repo.path().join("tiny/.2.partial");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::copy(fixture("tiny/model.pt2"), staging.join("model.pt2")).unwrap();
    std::fs::rename(&staging, srv.repo.path().join("tiny/2")).unwrap();
    let status = srv
        .wait_for("tiny", |s| s.versions == ["2"] && !s.reloading)
        .await;
    assert_eq!(status.formats, ["aoti-package"], "{status:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let mut served = 0;
    for client in clients {
        served += client.await.unwrap();
    }
    assert!(served > 0);
    srv.stop().await;
}

#[tokio::test]
async fn one_model_serves_torchscript_and_package_versions_side_by_side() {
    let srv = TestServer::start(
        |repo| {
            tiny_config().all_versions().write(repo, "tiny");
            let dir = repo.join("tiny/1");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(fixture("tiny/model.pt"), dir.join("model.pt")).unwrap();
            install_package(repo, "tiny", "2", "tiny");
        },
        true,
    )
    .await;
    let status = srv.wait_ready("tiny").await;
    assert_eq!(status.versions, ["1", "2"]);
    assert_eq!(status.formats, ["torchscript", "aoti-package"]);
    let x = npy("tiny", "input_b1_0.npy", "x");
    let want = npy("tiny", "expected_b1_0.npy", "y");
    let mut oip = srv.inference().await;
    for (version, platform) in [("1", "pytorch_libtorch"), ("2", "pytorch_aoti")] {
        let mut request = compute_request("tiny", vec![to_pb(&x)]);
        request.version = version.into();
        let answer = srv
            .compute()
            .await
            .compute(request)
            .await
            .unwrap()
            .into_inner();
        assert!(
            answer.outputs[0].data == want.data()[..],
            "version {version}"
        );
        let metadata = oip
            .model_metadata(ipb::ModelMetadataRequest {
                name: "tiny".into(),
                version: version.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(metadata.platform, platform, "version {version}");
        let config = oip
            .model_config(ipb::ModelConfigRequest {
                name: "tiny".into(),
                version: version.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .config
            .unwrap();
        let file = if version == "1" {
            "model.pt"
        } else {
            "model.pt2"
        };
        assert_eq!(
            (
                config.platform.as_str(),
                config.default_model_filename.as_str()
            ),
            (platform, file),
            "version {version}"
        );
    }
    srv.stop().await;
}

#[tokio::test]
async fn a_processor_feeds_a_package_and_the_cascade_calls_one() {
    let srv = TestServer::start(
        |repo| {
            // u8 NHWC images normalised into the CNN's f32 NCHW input.
            cnn_config()
                .preprocess(&["normalize"])
                .write(repo, "vision");
            install_package(repo, "vision", "1", "cnn");
            cnn_config().write(repo, "cnn");
            install_package(repo, "cnn", "1", "cnn");
            // The cascade: small is TorchScript (y = x), large the package
            // y = 4x over rows of three.
            fixtures::batched_scale(repo, "small", 1.0);
            fixtures::batched_rows_config()
                .max_batch_size(64)
                .write(repo, "large");
            install_package(repo, "large", "1", "scale4");
            fixtures::batched_rows_config()
                .orchestrator("cascade")
                .write(repo, "cascade");
        },
        true,
    )
    .await;
    install_plugin(
        srv.plugins.path(),
        "normalize",
        "image_normalize",
        Some("[config]\nmean = [0.5]\nstd = [0.25]\n"),
    );
    install_plugin(
        srv.plugins.path(),
        "cascade",
        "cascade",
        Some(&super::orchestrator::cascade_manifest(0.6)),
    );
    for plugin in ["normalize", "cascade"] {
        srv.wait_plugin(plugin, |s| s.serving && s.load_error.is_empty())
            .await;
    }
    for model in ["vision", "cnn", "small", "large", "cascade"] {
        srv.wait_ready(model).await;
    }
    let mut compute = srv.compute().await;

    // Two u8 NHWC images; the processor gives (p / 255 - 0.5) / 0.25 in
    // NCHW, as p * gain + offset: computed here the same way, then run on
    // the package directly.
    let gain = (1.0f32 / 255.0) / 0.25;
    let offset = -0.5f32 / 0.25;
    let pixels: Vec<u8> = (0..2 * 16 * 16 * 3).map(|i| (i * 37 % 256) as u8).collect();
    let mut nchw = vec![0f32; 2 * 3 * 16 * 16];
    for n in 0..2 {
        for y in 0..16 {
            for x in 0..16 {
                for c in 0..3 {
                    let p = f32::from(pixels[((n * 16 + y) * 16 + x) * 3 + c]);
                    nchw[((n * 3 + c) * 16 + y) * 16 + x] = p * gain + offset;
                }
            }
        }
    }
    let via_processor = compute
        .compute(compute_request(
            "vision",
            vec![pb::Tensor {
                name: "image".into(),
                dtype: pb::DataType::Uint8 as i32,
                shape: vec![2, 16, 16, 3],
                data: pixels.into(),
            }],
        ))
        .await
        .unwrap()
        .into_inner();
    let direct = compute
        .compute(compute_request(
            "cnn",
            vec![f32_tensor("image", &[2, 3, 16, 16], &nchw)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(via_processor.outputs[0].shape, [2, 10]);
    assert_eq!(
        f32_values(&via_processor.outputs[0]),
        f32_values(&direct.outputs[0])
    );

    // The cascade: rows 1 and 2 are uncertain and go to the package.
    let rows = [
        0.75f32, 0.125, 0.125, 0.5, 0.25, 0.25, 0.25, 0.25, 0.5, 0.875, 0.0625, 0.0625,
    ];
    let answer = compute
        .compute(compute_request(
            "cascade",
            vec![f32_tensor("x", &[4, 3], &rows)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        f32_values(&answer.outputs[0]),
        [
            0.75, 0.125, 0.125, 2.0, 1.0, 1.0, 1.0, 1.0, 2.0, 0.875, 0.0625, 0.0625
        ]
    );
    let large = srv.model_stats("large").await;
    assert_eq!(
        (large.inference_count, large.execution_count),
        (2, 1),
        "the package ran the two uncertain rows once"
    );
    srv.stop().await;
}

/// tritonclient, gRPC and HTTP, at batch 1 and at each package's maximum:
/// see tests/python/pt2_tritonclient.py.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_gets_pytorchs_numbers_from_packages() {
    let srv = start_packages().await;
    let output = super::oip::run_python_script(
        &srv,
        "pt2_tritonclient.py",
        &[("PLINTH_FIXTURES", fixture("").display().to_string())],
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "tritonclient against packages failed"
    );
    assert_eq!(
        stdout.matches("ok ").count(),
        2 * (2 + 2 * 3 + 2) + 2,
        "{stdout}"
    );
    srv.stop().await;
}

/// Packages run on the executor threads under the process-wide budget:
/// two instances of one intra-op thread each (two runners in the package's
/// container), eight clients at once, never more than the budget's cores.
#[tokio::test]
async fn packages_compute_under_the_thread_budget() {
    let srv = TestServer::start_with(
        |repo| {
            tiny_config()
                .instances(2)
                .field("intra_op_threads", 1)
                .write(repo, "tiny");
            install_package(repo, "tiny", "1", "tiny");
        },
        |config| {
            config.threads = Some(2);
            config.load_all = true;
        },
    )
    .await;
    srv.wait_ready("tiny").await;
    let x = npy("tiny", "input_b1_0.npy", "x");
    let want = npy("tiny", "expected_b1_0.npy", "y");
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut compute = srv.compute().await;
        let request = compute_request("tiny", vec![to_pb(&x)]);
        calls.push(tokio::spawn(async move { compute.compute(request).await }));
    }
    for call in calls {
        let answer = call.await.unwrap().unwrap().into_inner();
        assert!(answer.outputs[0].data == want.data()[..]);
    }
    let detail = srv.detail("tiny").await;
    assert_eq!((detail.instances, detail.intra_op_threads), (2, 1));
    let budget = srv.info().await.thread_budget.unwrap();
    assert_eq!((budget.executors, budget.torch_threads), (2, 2));
    assert!(
        (1..=2).contains(&budget.cores_peak),
        "cores peak {} outside the budget",
        budget.cores_peak
    );
    assert_eq!(budget.cores_in_use, 0);
    srv.stop().await;
}

/// A package compiled for CUDA, on a GPU. CI has none: the test says so
/// and why, and runs where a GPU and the CUDA fixture (made by make.py on
/// a GPU machine) are present.
#[tokio::test]
async fn a_cuda_package_runs_on_the_gpu() {
    let cuda = plinth_torch::init_cuda();
    if cuda.device_count == 0 {
        eprintln!(
            "SKIPPED a_cuda_package_runs_on_the_gpu: no GPU here ({})",
            cuda.note.as_deref().unwrap_or("no CUDA device")
        );
        return;
    }
    if !fixture("cnn_cuda/model.pt2").is_file() {
        eprintln!(
            "SKIPPED a_cuda_package_runs_on_the_gpu: no CUDA package; make it with `python tests/fixtures/pt2/make.py cnn_cuda` on a machine with a GPU"
        );
        return;
    }
    let srv = TestServer::start(
        |repo| {
            cnn_config().device("cuda").write(repo, "cnn_cuda");
            install_package(repo, "cnn_cuda", "1", "cnn_cuda");
        },
        true,
    )
    .await;
    let status = srv.wait_ready("cnn_cuda").await;
    assert_eq!(status.device, "cuda:0");
    assert_serves_fixture(&srv, "cnn_cuda", "cnn_cuda", "image", "logits").await;
    srv.stop().await;
}

/// The CNN package's kernels were compiled for two threads
/// (`num_threads(2)`, the exporting machine's cores): asked for one, its
/// executor still computes on two, and counts two against the budget; a
/// budget of one core cannot run it, and the load says why.
#[tokio::test]
async fn a_package_computes_on_the_threads_it_was_compiled_for() {
    let repo = |repo: &Path| {
        cnn_config().field("intra_op_threads", 1).write(repo, "cnn");
        install_package(repo, "cnn", "1", "cnn");
    };
    let srv = TestServer::start_with(repo, |config| {
        config.threads = Some(2);
        config.load_all = true;
    })
    .await;
    srv.wait_ready("cnn").await;
    let detail = srv.detail("cnn").await;
    assert_eq!(
        detail.intra_op_threads, 2,
        "the compiled count, not the config's 1"
    );
    let x = npy("cnn", "input_b15_0.npy", "image");
    srv.compute()
        .await
        .compute(compute_request("cnn", vec![to_pb(&x)]))
        .await
        .unwrap();
    let budget = srv.info().await.thread_budget.unwrap();
    assert_eq!(
        (budget.executors, budget.torch_threads, budget.cores_peak),
        (1, 2, 2)
    );
    srv.stop().await;

    let srv = TestServer::start_with(repo, |config| {
        config.threads = Some(1);
        config.load_all = true;
    })
    .await;
    let status = srv
        .wait_for("cnn", |s| s.state == pb::ModelState::Failed as i32)
        .await;
    for word in ["num_threads(2)", "compute budget of 1", "cpp.threads"] {
        assert!(status.reason.contains(word), "{}", status.reason);
    }
    srv.stop().await;
}
