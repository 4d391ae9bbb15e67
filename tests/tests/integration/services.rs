//! Ping, GetInfo, WatchModels, the standard health and reflection services,
//! message size limits, and draining on shutdown.

use futures::StreamExt;
use plinth::grpc::pb;
use plinth_tests::fixtures;
use plinth_tests::{
    ModelState, PATIENCE, TestServer, compute_request, eventually, f32_tensor, f32_values,
};
use tonic::Code;

#[tokio::test]
async fn ping_and_info_report_the_host() {
    let srv = TestServer::start_with(
        |repo| {
            fixtures::scale(repo, "two_instances", "1", 2.0);
            fixtures::scale_config()
                .instances(2)
                .write(repo, "two_instances");
        },
        |config| {
            config.load_all = false;
            config.threads = Some(4);
        },
    )
    .await;
    let mut compute = srv.compute().await;
    let ping = compute.ping(pb::PingRequest {}).await.unwrap().into_inner();
    assert!(
        ping.server_time_us > 1_700_000_000_000_000,
        "{}",
        ping.server_time_us
    );

    let before = compute
        .get_info(pb::GetInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    let budget = before.thread_budget.unwrap();
    assert_eq!(
        (budget.cores, budget.executors, budget.torch_threads),
        (4, 0, 0)
    );
    assert_eq!(before.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(before.devices[0].name, "cpu");
    let cpu = &before.devices[0];
    assert!(
        cpu.memory_total_bytes > 0 && cpu.memory_used_bytes <= cpu.memory_total_bytes,
        "{cpu:?}"
    );

    srv.load("two_instances").await.unwrap();
    let after = compute
        .get_info(pb::GetInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    let budget = after.thread_budget.unwrap();
    // Two executors share the four cores: two intra-op threads each.
    assert_eq!((budget.executors, budget.torch_threads), (2, 4));
    let model = &after.models[0];
    assert_eq!(
        (model.name.as_str(), model.state),
        ("two_instances", ModelState::Ready as i32)
    );

    srv.models()
        .await
        .unload_model(pb::UnloadModelRequest {
            name: "two_instances".into(),
        })
        .await
        .unwrap();
    srv.wait_for("two_instances", |s| {
        s.state == ModelState::Unavailable as i32
    })
    .await;
    // Unavailable means the executor threads have ended and freed their modules.
    let unloaded = compute
        .get_info(pb::GetInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    let budget = unloaded.thread_budget.unwrap();
    assert_eq!((budget.executors, budget.torch_threads), (0, 0));
}

#[tokio::test]
async fn watch_models_follows_a_load_and_an_unload() {
    let srv = TestServer::start(|repo| fixtures::scale(repo, "m", "1", 2.0), false).await;
    let mut watch = srv
        .models()
        .await
        .watch_models(pb::WatchModelsRequest { name: "m".into() })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(
        (first.name.as_str(), first.state),
        ("m", ModelState::Unavailable as i32)
    );
    srv.load("m").await.unwrap();
    srv.models()
        .await
        .unload_model(pb::UnloadModelRequest { name: "m".into() })
        .await
        .unwrap();
    let mut states = Vec::new();
    eventually(
        PATIENCE,
        "WatchModels to report 'm' UNAVAILABLE",
        async || {
            let event = watch.next().await.expect("watch stream open").unwrap();
            states.push(ModelState::try_from(event.state).unwrap());
            if states.last() == Some(&ModelState::Unavailable) {
                Ok(())
            } else {
                Err(format!("states so far: {states:?}"))
            }
        },
    )
    .await;
    assert_eq!(
        states,
        [
            ModelState::Loading,
            ModelState::Ready,
            ModelState::Unloading,
            ModelState::Unavailable
        ]
    );
}

#[tokio::test]
async fn health_and_reflection_services_answer() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let srv = TestServer::start(|repo| fixtures::scale(repo, "m", "1", 2.0), true).await;
    // Not ready until the startup loads finish, then serving.
    srv.wait_ready("m").await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(srv.channel().await);
    let mut statuses = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    eventually(PATIENCE, "the health watch to report SERVING", async || {
        let status = statuses.next().await.expect("watch open").unwrap().status;
        if status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    })
    .await;

    let mut reflection = ServerReflectionClient::new(srv.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "plinth.v1.ComputeService",
        "plinth.v1.ModelService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
}

#[tokio::test]
async fn oversized_messages_are_refused_at_the_configured_limit() {
    let srv = TestServer::start_with(
        |repo| fixtures::scale(repo, "m", "1", 2.0),
        |config| config.max_message_bytes = 4096,
    )
    .await;
    srv.wait_ready("m").await;
    let mut compute = srv.compute().await;
    let small = compute
        .compute(compute_request(
            "m",
            vec![f32_tensor("x", &[512], &[1.0; 512])],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32_values(&small.outputs[0]), vec![2.0; 512]);
    let err = compute
        .compute(compute_request(
            "m",
            vec![f32_tensor("x", &[2048], &[1.0; 2048])],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("4096"), "{}", err.message());
    // The server is unharmed.
    compute
        .compute(compute_request("m", vec![f32_tensor("x", &[1], &[1.0])]))
        .await
        .unwrap();
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let mut srv = TestServer::start(|repo| fixtures::slow(repo, "slow", 400), true).await;
    srv.wait_ready("slow").await;
    let mut compute = srv.compute().await;
    let in_flight = tokio::spawn(async move {
        compute
            .compute(compute_request(
                "slow",
                vec![f32_tensor("x", &[2], &[1.0, 5.0])],
            ))
            .await
    });
    srv.wait_for("slow", |s| s.in_flight >= 1).await;
    let addr = srv.running().grpc_addr;
    let server = srv.server.take().unwrap();
    let stopped = tokio::spawn(server.shutdown());
    let finished = in_flight
        .await
        .unwrap()
        .expect("drained, not dropped")
        .into_inner();
    assert_eq!(f32_values(&finished.outputs[0]), [2.0, 10.0]);
    stopped.await.unwrap();
    // The port is closed once the drain is done.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
