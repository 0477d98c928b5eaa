//! SIGTERM during in-flight requests lets them finish (SPEC 2, OPS-4).
//! Its own test binary: it sends a real SIGTERM to this process.

mod common;

use std::time::Duration;

use common::pb;

#[tokio::test]
async fn sigterm_under_load_lets_in_flight_requests_finish() {
    let mut config = common::test_config().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    config.grpc_addr = format!("127.0.0.1:{port}").parse().expect("addr");
    config.shutdown_drain_delay = Duration::from_millis(300);
    let url = format!("http://127.0.0.1:{port}");
    let name: &'static str = Box::leak(config.service.clone().into_boxed_str());
    let kit = crm_kit::Kit::start(common::spec(name), config).await.expect("start");
    let probe_pool = kit.pg.clone();
    let auth = kit.auth.clone();
    let routes = tonic::service::Routes::new(pb::probe_service_server::ProbeServiceServer::new(common::Probe::new(
        probe_pool, name, auth,
    )));
    let server = tokio::spawn(kit.serve(routes, common::policy()));

    let client = common::client(&url, common::admin()).await;
    assert!(
        common::eventually(Duration::from_secs(5), || {
            let mut c = client.clone();
            async move { c.echo(pb::EchoRequest { text: "up".into(), sleep_ms: 0 }).await.is_ok() }
        })
        .await,
        "server is up"
    );

    // 40 requests in flight, each taking 1 s, spread over 8 connections.
    let mut calls = Vec::new();
    for i in 0..40 {
        let mut c = if i % 5 == 0 { common::client(&url, common::admin()).await } else { client.clone() };
        calls.push(tokio::spawn(async move {
            c.echo(pb::EchoRequest { text: format!("r{i}"), sleep_ms: 1000 }).await.map(|r| r.into_inner().text)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status =
        std::process::Command::new("kill").args(["-TERM", &std::process::id().to_string()]).status().expect("kill");
    assert!(status.success());

    let mut ok = 0;
    for (i, call) in calls.into_iter().enumerate() {
        let text = call.await.expect("task").unwrap_or_else(|s| panic!("request {i} failed during drain: {s:?}"));
        assert_eq!(text, format!("r{i}"));
        ok += 1;
    }
    assert_eq!(ok, 40, "every in-flight request finished");
    let served = tokio::time::timeout(Duration::from_secs(10), server).await.expect("server stops").expect("join");
    assert!(served.is_ok(), "{served:?}");
    let refused =
        common::client(&url, common::admin()).await.echo(pb::EchoRequest { text: "late".into(), sleep_ms: 0 }).await;
    assert!(refused.is_err(), "no longer accepting after shutdown");
}
