//! Triton's system shared-memory extension: tritonclient's own calls
//! (`tritonclient.utils.shared_memory`, unmodified) over gRPC and HTTP, the
//! register/unregister stress test that docs/RELIABILITY.md cites, and a
//! client that shrinks a registered object under the server.

use std::collections::HashMap;
use std::fs::File;

use plinth::grpc::ipb::{self, model_infer_request::InferInputTensor};
use plinth_tests::{TestServer, fixtures};
use tonic::Code;

use super::oip::{run_python_script, test_python};

/// The server's mappings of the shared-memory objects whose key starts
/// with `prefix` (the test server runs in this process).
fn mappings(prefix: &str) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    let needle = format!("/dev/shm/{prefix}");
    maps.lines().filter(|line| line.contains(&needle)).count()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("list fds")
        .count()
}

/// A shared-memory object holding `values` as f32, removed when dropped.
struct Object {
    key: String,
}

impl Object {
    fn new(key: String, values: &[f32]) -> Object {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(format!("/dev/shm/{}", key.trim_start_matches('/')), bytes)
            .expect("write the shared-memory object");
        Object { key }
    }

    fn file(&self) -> File {
        File::options()
            .write(true)
            .open(format!("/dev/shm/{}", self.key.trim_start_matches('/')))
            .unwrap()
    }
}

impl Drop for Object {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(format!("/dev/shm/{}", self.key.trim_start_matches('/')));
    }
}

fn params(region: &str, byte_size: i64) -> HashMap<String, ipb::InferParameter> {
    use ipb::infer_parameter::ParameterChoice as P;
    HashMap::from([
        (
            "shared_memory_region".to_owned(),
            ipb::InferParameter {
                parameter_choice: Some(P::StringParam(region.to_owned())),
            },
        ),
        (
            "shared_memory_byte_size".to_owned(),
            ipb::InferParameter {
                parameter_choice: Some(P::Int64Param(byte_size)),
            },
        ),
    ])
}

/// `scale` (y = 2x) on `n` floats read from `region`.
fn infer_from(region: &str, n: i64) -> ipb::ModelInferRequest {
    ipb::ModelInferRequest {
        model_name: "scale".into(),
        inputs: vec![InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![n],
            parameters: params(region, n * 4),
            contents: None,
        }],
        ..Default::default()
    }
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_shared_memory_calls_work_unmodified() {
    test_python();
    let srv = TestServer::start(|repo| fixtures::scale(repo, "scale", "1", 2.0), true).await;
    srv.wait_ready("scale").await;
    let output = run_python_script(&srv, "shm_tritonclient.py", &[]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "tritonclient shared memory failed");
    for tag in ["grpc", "http"] {
        assert!(
            stdout.contains(&format!("{tag}: shared memory ok")),
            "{stdout}"
        );
    }
    // The script unregistered everything: nothing stays mapped.
    assert!(srv.running().shm.status(None).unwrap().is_empty());
    assert_eq!(mappings("plinth_in_"), 0);
    assert_eq!(mappings("plinth_out_"), 0);
}

/// Thousands of register/unregister cycles over gRPC, with inferences
/// reading the region in between: the mappings and open files return to
/// their baseline, and every answer is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_unregister_stress_returns_to_the_baseline() {
    const CYCLES: usize = 2000;
    let srv = TestServer::start(|repo| fixtures::scale(repo, "scale", "1", 2.0), true).await;
    srv.wait_ready("scale").await;
    let prefix = format!("plinth-stress-{}", std::process::id());
    let values: Vec<f32> = (0..1024).map(|i| i as f32 - 100.5).collect();
    let object = Object::new(format!("/{prefix}"), &values);
    let mut client = srv.inference().await;
    let baseline_fds = open_fds();
    assert_eq!(mappings(&prefix), 0);
    for cycle in 0..CYCLES {
        let name = format!("r{}", cycle % 7);
        client
            .system_shared_memory_register(ipb::SystemSharedMemoryRegisterRequest {
                name: name.clone(),
                key: object.key.clone(),
                offset: 0,
                byte_size: 4096,
            })
            .await
            .unwrap_or_else(|err| panic!("cycle {cycle}: register: {err}"));
        if cycle % 100 == 0 {
            assert_eq!(mappings(&prefix), 1, "cycle {cycle}");
            let answer = client
                .model_infer(infer_from(&name, 1024))
                .await
                .unwrap_or_else(|err| panic!("cycle {cycle}: infer: {err}"))
                .into_inner();
            let expected: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
            assert_eq!(floats(&answer.raw_output_contents[0]), expected);
        }
        // Every other cycle unregisters by name, the rest all at once.
        let unregister = if cycle % 2 == 0 { name } else { String::new() };
        client
            .system_shared_memory_unregister(ipb::SystemSharedMemoryUnregisterRequest {
                name: unregister,
            })
            .await
            .unwrap();
    }
    let status = client
        .system_shared_memory_status(ipb::SystemSharedMemoryStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(status.regions.is_empty(), "{status:?}");
    assert_eq!(mappings(&prefix), 0, "mappings left after {CYCLES} cycles");
    // Other tests in this binary open and close files meanwhile; the region
    // cycles must not leave thousands behind.
    let fds = open_fds();
    eprintln!(
        "shm stress: {CYCLES} cycles; mappings {} after; open files {baseline_fds} before, {fds} after",
        mappings(&prefix)
    );
    assert!(
        fds < baseline_fds + 50,
        "{fds} open files after {CYCLES} cycles, {baseline_fds} before"
    );
}

/// A client that truncates its object after registering gets a clean
/// error naming the region; the server and its other requests go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_shrunk_by_its_client_is_an_error_and_the_server_goes_on() {
    let srv = TestServer::start(|repo| fixtures::scale(repo, "scale", "1", 2.0), true).await;
    srv.wait_ready("scale").await;
    let values: Vec<f32> = (0..4096).map(|i| i as f32).collect();
    let object = Object::new(format!("/plinth-shrink-{}", std::process::id()), &values);
    let mut client = srv.inference().await;
    client
        .system_shared_memory_register(ipb::SystemSharedMemoryRegisterRequest {
            name: "shrinking".into(),
            key: object.key.clone(),
            offset: 0,
            byte_size: 4 * 4096,
        })
        .await
        .unwrap();
    let ok = client
        .model_infer(infer_from("shrinking", 4096))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(floats(&ok.raw_output_contents[0])[4095], 8190.0);
    object.file().set_len(100).unwrap();
    let err = client
        .model_infer(infer_from("shrinking", 4096))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("shared memory region 'shrinking'")
            && err.message().contains("holds 100 bytes now"),
        "{}",
        err.message()
    );
    // The same model still answers requests that carry their bytes.
    let plain = client
        .model_infer(ipb::ModelInferRequest {
            model_name: "scale".into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![2],
                ..Default::default()
            }],
            raw_input_contents: vec![[1f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(floats(&plain.raw_output_contents[0]), [2.0, 4.0]);
}
