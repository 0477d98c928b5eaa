//! The shared kit against the real PostgreSQL and Redis, through gRPC
//! (issue "Foundation", SPEC 2, 3, REL-1..4, SEC-1).

mod common;

use std::time::Duration;

use common::pb;
use crm_kit::consumer::{Consumer, ConsumerSettings};
use crm_kit::db::Redis;
use crm_kit::outbox::{OutboxRelay, stream_name};
use crm_kit::testing;
use crm_kit::{Role, telemetry};
use opentelemetry::trace::TraceContextExt;
use tonic::Code;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

fn relay(run: &common::Running, redis_url: &str) -> OutboxRelay {
    let redis = Redis::connect(redis_url, Duration::from_millis(250)).expect("redis url");
    OutboxRelay::new(run.pool.clone(), redis, &run.config.service, run.metrics.clone())
}

fn consumer<H: crm_kit::consumer::EventHandler>(run: &common::Running, name: &str, handler: H) -> Consumer<H> {
    let settings = ConsumerSettings {
        group: format!("{}-reader", run.config.service),
        name: name.to_string(),
        streams: vec![stream_name("crm", &run.config.service)],
        batch_size: 100,
        block: Duration::from_millis(100),
        claim_idle: Duration::from_millis(300),
    };
    Consumer::new(run.pool.clone(), &testing::redis_url(), settings, handler, run.metrics.clone()).expect("consumer")
}

async fn record_notes(run: &common::Running, n: usize) -> Vec<String> {
    let mut client = common::client(&run.url, common::admin()).await;
    let mut ids = Vec::new();
    for i in 0..n {
        let reply = client
            .record_note(pb::RecordNoteRequest { request_id: format!("req-{i}"), note: format!("note {i}") })
            .await
            .expect("record note")
            .into_inner();
        ids.push(reply.event_id);
    }
    ids
}

async fn effect_counts(run: &common::Running) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT event_id) FROM effects").fetch_one(&run.pool).await.expect("count")
}

#[tokio::test]
async fn one_trace_id_runs_from_client_through_server_outbox_and_consumer() {
    let run = common::start(common::test_config().await).await;
    let client_span = tracing::info_span!("test.client", otel.kind = "client");
    let client_trace = client_span.context().span().span_context().trace_id();
    let mut client = common::client(&run.url, common::admin()).await;
    let reply = client
        .record_note(pb::RecordNoteRequest { request_id: "traced-1".into(), note: "hello".into() })
        .instrument(client_span.clone())
        .await
        .expect("record note")
        .into_inner();
    drop(client_span);

    assert_eq!(relay(&run, &testing::redis_url()).publish_once().await.expect("publish"), 1);
    let mut reader = consumer(&run, "c1", common::EffectWriter::default());
    assert_eq!(reader.poll_once().await.expect("consume"), 1);
    assert_eq!(effect_counts(&run).await, (1, 1));

    let spans = common::spans().get_finished_spans().expect("spans");
    let of_trace: Vec<_> = spans.iter().filter(|s| s.span_context.trace_id() == client_trace).collect();
    let names: Vec<String> = of_trace.iter().map(|s| s.name.to_string()).collect();
    assert!(
        names.iter().any(|n| n == "crm.kittest.v1.ProbeService/RecordNote"),
        "server span joins the client's trace: {names:?}"
    );
    assert!(
        names.iter().any(|n| n == "consume crm.kittest.v1.NoteRecorded"),
        "consumer span continues the trace carried by the event {}: {names:?}",
        reply.event_id
    );
    run.shutdown.trigger();
}

#[tokio::test]
async fn outgoing_calls_carry_the_trace_and_a_service_token() {
    let a = common::start(common::test_config().await).await;
    let b = common::start(common::test_config().await).await;
    let span = tracing::info_span!("test.forward");
    let trace = span.context().span().span_context().trace_id();
    let mut client = common::client(&a.url, common::admin()).await;
    let reply = client
        .forward(pb::ForwardRequest { target: b.url.clone(), text: "hop".into() })
        .instrument(span)
        .await
        .expect("forward")
        .into_inner();
    assert_eq!(reply.text, "hop");
    assert_eq!(reply.trace_id, trace.to_string(), "the second server saw the caller's trace id");
    assert!(reply.caller.starts_with("service:"), "the hop authenticated as a service: {}", reply.caller);
    a.shutdown.trigger();
    b.shutdown.trigger();
}

#[tokio::test]
async fn events_written_while_redis_is_down_are_delivered_once_it_is_back() {
    let run = common::start(common::test_config().await).await;
    // A closed port: nothing listens there yet.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = format!("redis://127.0.0.1:{port}");
    let relay = relay(&run, &url);
    let ids = record_notes(&run, 3).await;

    assert!(relay.publish_once().await.is_err(), "publishing fails while Redis is unreachable");
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM kit_outbox WHERE published_at IS NULL")
        .fetch_one(&run.pool)
        .await
        .expect("count");
    assert_eq!(pending, 3, "the events wait in the outbox");

    let mut redis = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server is installed");
    let published =
        common::eventually(Duration::from_secs(10), || async { relay.publish_once().await.is_ok_and(|n| n == 3) })
            .await;
    let entries: redis::RedisResult<Vec<redis::streams::StreamId>> = async {
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream_name("crm", &run.config.service))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await?;
        Ok(reply.ids)
    }
    .await;
    let _ = redis.kill();
    let _ = redis.wait();
    assert!(published, "the relay publishes once Redis is back");
    let delivered: Vec<String> =
        entries.expect("read stream").iter().map(|e| e.get::<String>("event_id").unwrap_or_default()).collect();
    assert_eq!(delivered, ids, "every event arrives, in commit order");
    run.shutdown.trigger();
}

#[tokio::test]
async fn a_consumer_that_crashes_mid_batch_and_restarts_applies_each_event_once() {
    let run = common::start(common::test_config().await).await;
    record_notes(&run, 20).await;
    assert_eq!(relay(&run, &testing::redis_url()).publish_once().await.expect("publish"), 20);

    // The first incarnation reads all 20 in one batch and stalls ("crashes") in the 9th.
    let writer = common::EffectWriter { stall_after: Some(8), ..Default::default() };
    let seen = writer.seen.clone();
    let crashing = consumer(&run, "replica-1", writer);
    let shutdown = crm_kit::lifecycle::Shutdown::new();
    let task = tokio::spawn(crashing.run(shutdown.signal()));
    assert!(
        common::eventually(Duration::from_secs(5), || async { seen.load(std::sync::atomic::Ordering::SeqCst) > 8 })
            .await
    );
    task.abort();
    let _ = task.await;
    assert_eq!(effect_counts(&run).await, (0, 0), "the interrupted batch left nothing half-applied");

    // Restarted under the same name, it resumes its own pending entries.
    let mut restarted = consumer(&run, "replica-1", common::EffectWriter::default());
    while restarted.poll_once().await.expect("round") > 0 {}
    assert_eq!(effect_counts(&run).await, (20, 20), "each event applied exactly once");

    // Redelivery of everything (as after a crash between commit and ack) changes nothing.
    let client = redis::Client::open(testing::redis_url()).expect("url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
    let _: () = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(stream_name("crm", &run.config.service))
        .arg(format!("{}-reader", run.config.service))
        .arg("0")
        .query_async(&mut conn)
        .await
        .expect("rewind");
    let mut settled = 0;
    loop {
        let n = restarted.poll_once().await.expect("round");
        if n == 0 {
            break;
        }
        settled += n;
    }
    assert_eq!(settled, 20, "all 20 were delivered again");
    assert_eq!(effect_counts(&run).await, (20, 20), "duplicates are recognised by event id");
    run.shutdown.trigger();
}

#[tokio::test]
async fn a_set_based_handler_applies_a_batch_at_once_and_a_poison_event_alone_is_dead_lettered() {
    let run = common::start(common::test_config().await).await;
    record_notes(&run, 10).await;
    assert_eq!(relay(&run, &testing::redis_url()).publish_once().await.expect("publish"), 10);
    let writer = common::SetWriter::default();
    let batches = writer.batches.clone();
    let mut c = consumer(&run, "set-1", writer);
    // The batch of 10 fails for good on "note 3": it is applied again one event at a time.
    while c.poll_once().await.expect("round") > 0 {}
    assert_eq!(effect_counts(&run).await, (9, 9), "every event but the poison one applied once");
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM kit_dead_events").fetch_one(&run.pool).await.unwrap();
    assert_eq!(dead, 1);
    assert_eq!(batches.load(std::sync::atomic::Ordering::SeqCst), 11, "one failed batch, then ten one by one");

    // Clean events go through as one batch; redelivered ones are recognised by the inbox.
    record_notes_from(&run, 10, 15).await;
    relay(&run, &testing::redis_url()).publish_once().await.expect("publish");
    let before = batches.load(std::sync::atomic::Ordering::SeqCst);
    while c.poll_once().await.expect("round") > 0 {}
    assert_eq!(batches.load(std::sync::atomic::Ordering::SeqCst), before + 1, "five events, one batch");
    assert_eq!(effect_counts(&run).await, (14, 14));
    let client = redis::Client::open(testing::redis_url()).expect("url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
    let _: () = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(stream_name("crm", &run.config.service))
        .arg(format!("{}-reader", run.config.service))
        .arg("0")
        .query_async(&mut conn)
        .await
        .expect("rewind");
    while c.poll_once().await.expect("round") > 0 {}
    assert_eq!(effect_counts(&run).await, (14, 14), "a replay changes nothing");
    run.shutdown.trigger();
}

async fn record_notes_from(run: &common::Running, from: usize, to: usize) {
    let mut client = common::client(&run.url, common::admin()).await;
    for i in from..to {
        client
            .record_note(pb::RecordNoteRequest { request_id: format!("req-{i}"), note: format!("note {i}") })
            .await
            .expect("record note");
    }
}

#[tokio::test]
async fn another_replica_claims_what_a_dead_consumer_left_pending() {
    let run = common::start(common::test_config().await).await;
    record_notes(&run, 6).await;
    relay(&run, &testing::redis_url()).publish_once().await.expect("publish");
    let writer = common::EffectWriter { stall_after: Some(2), ..Default::default() };
    let seen = writer.seen.clone();
    let dead = consumer(&run, "replica-a", writer);
    let shutdown = crm_kit::lifecycle::Shutdown::new();
    let task = tokio::spawn(dead.run(shutdown.signal()));
    assert!(
        common::eventually(Duration::from_secs(5), || async { seen.load(std::sync::atomic::Ordering::SeqCst) > 2 })
            .await
    );
    task.abort();
    let _ = task.await;

    let mut other = consumer(&run, "replica-b", common::EffectWriter::default());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut done = false;
    while !done && tokio::time::Instant::now() < deadline {
        let _ = other.poll_once().await;
        done = effect_counts(&run).await.0 == 6;
    }
    assert!(done, "replica-b claimed the stale entries after CONSUMER_CLAIM_IDLE_MS");
    assert_eq!(effect_counts(&run).await, (6, 6));
    run.shutdown.trigger();
}

#[tokio::test]
async fn a_replayed_request_id_returns_the_first_result_and_changes_nothing() {
    let run = common::start(common::test_config().await).await;
    let mut client = common::client(&run.url, common::admin()).await;
    let req = pb::RecordNoteRequest { request_id: "same-id".into(), note: "once".into() };
    let first = client.record_note(req.clone()).await.expect("first").into_inner();
    let second = client.record_note(req.clone()).await.expect("retry").into_inner();
    assert_eq!(first, second);

    // Concurrent retries racing each other also converge on the first result.
    let racing = futures_util::future::join_all((0..8).map(|_| {
        let mut c = client.clone();
        let r = pb::RecordNoteRequest { request_id: "raced-id".into(), note: "race".into() };
        async move { c.record_note(r).await.map(|r| r.into_inner().note_id) }
    }))
    .await;
    let ids: std::collections::HashSet<_> = racing.into_iter().map(|r| r.expect("ok")).collect();
    assert_eq!(ids.len(), 1);

    let notes: i64 = sqlx::query_scalar("SELECT count(*) FROM notes").fetch_one(&run.pool).await.expect("count");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM kit_outbox").fetch_one(&run.pool).await.expect("count");
    assert_eq!((notes, events), (2, 2), "one row and one event per request id");

    let reused = client
        .record_note(pb::RecordNoteRequest { request_id: "same-id".into(), note: "different".into() })
        .await
        .expect_err("a request id reused for another request is refused");
    assert_eq!(reused.code(), Code::InvalidArgument);
    use tonic_types::StatusExt;
    let violations = reused.get_error_details().bad_request().expect("field violations").field_violations.clone();
    assert_eq!(violations[0].field, "request_id");

    let missing = client
        .record_note(pb::RecordNoteRequest { request_id: String::new(), note: String::new() })
        .await
        .expect_err("missing fields");
    assert_eq!(missing.code(), Code::InvalidArgument);
    run.shutdown.trigger();
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated_and_wrong_roles_permission_denied() {
    let run = common::start(common::test_config().await).await;
    let echo = || pb::EchoRequest { text: "x".into(), sleep_ms: 0 };

    let missing = common::client(&run.url, None).await.echo(echo()).await.expect_err("no token");
    assert_eq!(missing.code(), Code::Unauthenticated);

    let forged = crm_kit::auth::mint(
        b"not-the-real-secret-not-the-real-secret",
        &crm_kit::auth::TokenRequest {
            subject: "mallory".into(),
            roles: vec![Role::Admin],
            permissions: vec![],
            ttl: Duration::from_secs(60),
            issuer: "crm".into(),
            audience: "crm".into(),
        },
    )
    .expect("mint");
    let err = common::client(&run.url, Some(forged)).await.echo(echo()).await.expect_err("forged");
    assert_eq!(err.code(), Code::Unauthenticated);

    let expired = crm_kit::auth::mint(
        testing::TEST_JWT_SECRET,
        &crm_kit::auth::TokenRequest {
            subject: "late".into(),
            roles: vec![Role::Admin],
            permissions: vec![],
            ttl: Duration::ZERO,
            issuer: "crm".into(),
            audience: "crm".into(),
        },
    )
    .expect("mint");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let err = common::client(&run.url, Some(expired)).await.echo(echo()).await.expect_err("expired");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{}", err.message());

    let garbage = common::client(&run.url, Some("abc.def".into())).await.echo(echo()).await.expect_err("garbage");
    assert_eq!(garbage.code(), Code::Unauthenticated);

    let analyst = Some(testing::token(&[Role::Analyst], false));
    let mut analyst_client = common::client(&run.url, analyst.clone()).await;
    let denied = analyst_client.record_note(pb::RecordNoteRequest { request_id: "r".into(), note: "n".into() });
    assert_eq!(denied.await.expect_err("analysts cannot write").code(), Code::PermissionDenied);

    let ok = common::client(&run.url, analyst).await.echo(echo()).await.expect("analysts may echo").into_inner();
    assert_eq!(ok.caller, "tester");
    common::client(&run.url, common::admin()).await.admin_only(echo()).await.expect("admins may");
    run.shutdown.trigger();
}

#[tokio::test]
async fn deadlines_are_honoured_and_overload_is_shed_at_once() {
    let mut config = common::test_config().await;
    config.max_concurrent_requests = 2;
    config.request_timeout = Duration::from_millis(1500);
    let run = common::start(config).await;
    let client = common::client(&run.url, common::admin()).await;

    // The server's own REQUEST_TIMEOUT_MS applies when the client sets none.
    let err = client
        .clone()
        .echo(pb::EchoRequest { text: "slower".into(), sleep_ms: 5000 })
        .await
        .expect_err("server deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded);

    // The client's grpc-timeout (sent as metadata, so no client-side timer races the server's).
    let mut slow = tonic::Request::new(pb::EchoRequest { text: "slow".into(), sleep_ms: 2000 });
    slow.metadata_mut().insert("grpc-timeout", "150m".parse().expect("ascii"));
    let started = std::time::Instant::now();
    let err = client.clone().echo(slow).await.expect_err("past the client's deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(started.elapsed() < Duration::from_millis(1500));

    let calls = (0..6).map(|_| {
        let mut c = client.clone();
        async move { c.echo(pb::EchoRequest { text: "busy".into(), sleep_ms: 400 }).await.map_err(|s| s.code()) }
    });
    let results = futures_util::future::join_all(calls).await;
    let shed = results.iter().filter(|r| matches!(r, Err(Code::ResourceExhausted))).count();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok + shed, 6, "{results:?}");
    assert!(shed >= 3 && ok >= 1, "beyond 2 in flight requests are shed: {results:?}");
    let text = run.metrics.render();
    assert!(text.contains("crm_grpc_server_shed_total"), "{text}");
    assert!(text.contains("code=\"RESOURCE_EXHAUSTED\""), "{text}");
    assert!(text.contains("code=\"OK\""), "{text}");
    run.shutdown.trigger();
}

#[tokio::test]
async fn health_follows_postgres_and_reflection_speaks_v1_and_v1alpha() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let run = common::start(common::test_config().await).await;
    let channel = crm_kit::client::channel(&run.url).expect("channel");
    let health = HealthClient::new(channel.clone());
    let serving = common::eventually(Duration::from_secs(5), || {
        let mut h = health.clone();
        async move {
            h.check(HealthCheckRequest { service: common::PROBE.into() })
                .await
                .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
        }
    })
    .await;
    assert!(serving, "SERVING once PostgreSQL answers");

    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream =
        reflection.server_reflection_info(tokio_stream::iter([request])).await.expect("v1alpha").into_inner();
    let reply = stream.message().await.expect("reply").expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else { panic!("list reply") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&common::PROBE.to_string()) && names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient as V1Client;
    let mut v1 = V1Client::new(channel.clone());
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                common::PROBE.into(),
            ),
        ),
    };
    let mut stream = v1.server_reflection_info(tokio_stream::iter([request])).await.expect("v1").into_inner();
    assert!(stream.message().await.expect("reply").is_some());

    run.shutdown.trigger();
    let after = common::eventually(Duration::from_secs(5), || {
        let mut h = health.clone();
        async move {
            h.check(HealthCheckRequest { service: String::new() })
                .await
                .is_ok_and(|r| r.into_inner().status == ServingStatus::NotServing as i32)
        }
    })
    .await;
    assert!(after, "NOT_SERVING as soon as draining starts");
}

#[tokio::test]
async fn postgres_unreachable_means_not_serving_and_fast_unavailable() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let mut config = common::test_config().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    config.database_url = format!("postgres://postgres@127.0.0.1:{port}/crm_test");
    config.migrate_on_start = false;
    config.database_acquire_timeout = Duration::from_millis(300);
    let run = common::start(config).await;
    let mut health = HealthClient::new(crm_kit::client::channel(&run.url).expect("channel"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let status = health.check(HealthCheckRequest { service: String::new() }).await.expect("health").into_inner().status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    // Not ready, but alive: Kubernetes must not restart it for the database's outage.
    let live = health
        .check(HealthCheckRequest { service: crm_kit::server::LIVENESS.into() })
        .await
        .expect("liveness")
        .into_inner()
        .status;
    assert_eq!(live, ServingStatus::Serving as i32);

    let started = std::time::Instant::now();
    let err = common::client(&run.url, common::admin())
        .await
        .record_note(pb::RecordNoteRequest { request_id: "r1".into(), note: "n".into() })
        .await
        .expect_err("no database");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(started.elapsed() < Duration::from_secs(2), "fails fast: {:?}", started.elapsed());
    run.shutdown.trigger();
}

#[tokio::test]
async fn log_fields_carry_the_trace_id() {
    common::spans();
    let span = tracing::info_span!("test.ids", trace_id = tracing::field::Empty, span_id = tracing::field::Empty);
    telemetry::record_trace_ids(&span);
    let expected = span.context().span().span_context().trace_id().to_string();
    let seen = span.in_scope(telemetry::current_trace_id);
    assert_eq!(seen, expected);
    assert_eq!(seen.len(), 32);
}

/// OPS-2: replicas that start together (plain manifests, MIGRATE_ON_START)
/// all migrate the same fresh schema without an error.
#[tokio::test]
async fn replicas_migrating_one_fresh_schema_at_once_all_succeed() {
    let config = common::test_config().await;
    let mut runs = Vec::new();
    for _ in 0..4 {
        let pool = crm_kit::db::pg_pool(&config).expect("pool");
        let schema = config.database_schema.clone();
        runs.push(tokio::spawn(async move { crm_kit::db::migrate(&pool, &schema, &common::MIGRATOR).await }));
    }
    for run in runs {
        run.await.expect("task").expect("every replica migrates");
    }
    let pool = crm_kit::db::pg_pool(&config).expect("pool");
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations").fetch_one(&pool).await.expect("migrations table");
    assert_eq!(applied as usize, common::MIGRATOR.iter().count(), "each migration applied once");
}
