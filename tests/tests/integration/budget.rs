//! The process-wide compute budget and what GetInfo reports about the build.

use plinth::grpc::pb;
use plinth_tests::fixtures;
use plinth_tests::{TestServer, compute_request, f32_tensor};

#[tokio::test]
async fn four_models_under_load_never_exceed_the_budget() {
    under_load_within_the_budget(0).await;
}

/// The same with forward passes allowed on the requests' own threads: they
/// take their cores from the same budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_passes_stay_within_the_budget_too() {
    under_load_within_the_budget(1024).await;
}

async fn under_load_within_the_budget(inline_forward_max_bytes: usize) {
    let srv = TestServer::start_with(
        |repo| {
            for name in ["m1", "m2", "m3"] {
                fixtures::slow(repo, name, 8);
            }
            // Asks for more intra-op threads than the whole budget.
            fixtures::slow(repo, "greedy", 8);
            fixtures::scale_config()
                .field("intra_op_threads", 8)
                .write(repo, "greedy");
        },
        |config| {
            config.threads = Some(2);
            config.inline_forward_max_bytes = inline_forward_max_bytes;
        },
    )
    .await;
    for name in ["m1", "m2", "m3", "greedy"] {
        srv.wait_ready(name).await;
    }
    let mut models = srv.models().await;
    let greedy = models
        .get_model(pb::GetModelRequest {
            name: "greedy".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .model
        .unwrap();
    assert_eq!(greedy.intra_op_threads, 2, "clamped to the budget");

    // Eight clients per model, all at once.
    let mut calls = Vec::new();
    for name in ["m1", "m2", "m3", "greedy"] {
        for _ in 0..8 {
            let mut compute = srv.compute().await;
            let request = compute_request(name, vec![f32_tensor("x", &[4], &[1.0; 4])]);
            calls.push(tokio::spawn(async move { compute.compute(request).await }));
        }
    }
    for call in calls {
        let outputs = call.await.unwrap().unwrap().into_inner().outputs;
        assert_eq!(outputs.len(), 1);
    }

    let info = srv.info().await;
    let budget = info.thread_budget.unwrap();
    assert_eq!(budget.cores, 2);
    // Work ran, and never more than two cores' worth at once.
    assert_eq!(budget.cores_peak, 2);
    assert_eq!(budget.cores_in_use, 0);
    // Four executors of two intra-op threads exist; only one computes at a time.
    assert_eq!((budget.executors, budget.torch_threads), (4, 8));
    srv.stop().await;
}

#[tokio::test]
async fn get_info_reports_the_libtorch_the_binary_was_built_against() {
    let srv = TestServer::start(|_| {}, false).await;
    let info = srv.info().await;
    // xtask builds against libtorch 2.11.0 (its TORCH_VERSION).
    assert_eq!(info.libtorch_version, "2.11.0");
    srv.stop().await;
}

/// Executor threads serve at nice 0. They used to be started on the load
/// thread and inherit its nice 10, which gave them a tenth of a runtime
/// worker's weight and lost their cores to loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executors_serve_at_normal_priority_while_loads_run_niced() {
    let srv = TestServer::start(|repo| fixtures::scale(repo, "prio", "1", 2.0), true).await;
    srv.wait_ready("prio").await;
    let nice_of = |task: &std::path::Path| -> Option<(String, i32)> {
        let comm = std::fs::read_to_string(task.join("comm")).ok()?;
        let stat = std::fs::read_to_string(task.join("stat")).ok()?;
        // After the parenthesised name, field 3 (state) comes first; the
        // nice value is field 19.
        let rest = &stat[stat.rfind(')')? + 2..];
        let nice = rest.split(' ').nth(16)?.parse().ok()?;
        Some((comm.trim().to_owned(), nice))
    };
    let threads: Vec<(String, i32)> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| nice_of(&task.ok()?.path()))
        .collect();
    let executors: Vec<&(String, i32)> = threads
        .iter()
        .filter(|(name, _)| name.starts_with("exec:prio"))
        .collect();
    assert!(
        !executors.is_empty(),
        "no executor thread of 'prio' in {threads:?}"
    );
    for (name, nice) in &executors {
        assert_eq!(*nice, 0, "{name} serves at nice {nice}");
    }
    // The loads do run niced, so the check above can tell the difference.
    assert!(
        threads
            .iter()
            .any(|(name, nice)| name.starts_with("plinth-load") && *nice == 10),
        "{threads:?}"
    );
    srv.stop().await;
}
