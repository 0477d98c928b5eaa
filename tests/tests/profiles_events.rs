//! The real crm-profiles process: a client's trace continues through the
//! server, the outbox relay inside the binary and Redis Streams into a
//! consumer in another process (SPEC 2), and SIGTERM ends it cleanly.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crm_e2e::ServiceProcess;
use crm_kit::consumer::{Consumer, ConsumerSettings, Event, EventHandler, HandlerError};
use crm_kit::metrics::Metrics;
use crm_kit::testing;
use crm_proto::common::v1::Money;
use crm_proto::profiles::v1 as pb;
use crm_proto::profiles::v1::profiles_service_client::ProfilesServiceClient;
use opentelemetry::trace::TraceContextExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static NO_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate::Migrator::DEFAULT;

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, String)>>>);

impl EventHandler for Seen {
    async fn handle(&self, _tx: &mut sqlx::PgConnection, event: &Event) -> Result<(), HandlerError> {
        let traceparent = event.envelope.trace_context.as_ref().map(|t| t.traceparent.clone()).unwrap_or_default();
        self.0
            .lock()
            .map_err(|e| HandlerError::Transient(e.to_string()))?
            .push((event.envelope.event_type.clone(), traceparent));
        Ok(())
    }
}

#[tokio::test]
async fn a_trace_crosses_the_profiles_process_and_the_event_bus() {
    let exporter = testing::telemetry();
    let mut profiles = ServiceProcess::start("profiles", &[]).await;
    // The process publishes to its own stream; this test's group reads it from the start.
    let stream = crm_kit::outbox::stream_name(&profiles.prefix, "profiles");
    let group = testing::unique_name("e2e_reader");
    let channel = crm_kit::client::channel(&profiles.url).expect("channel");
    let token = testing::token(&[crm_kit::Role::Admin], false);
    let mut client = ProfilesServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        use tonic::service::Interceptor;
        req = crm_kit::client::Outgoing::trace_only().call(req)?;
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
        Ok(req)
    });

    let root = tracing::info_span!("e2e.client");
    let trace_id = root.context().span().span_context().trace_id();
    let phone = format!("+86139{:08}", uuid::Uuid::new_v4().as_u128() % 100_000_000);
    let created = async {
        let c = client
            .create_customer(pb::CreateCustomerRequest {
                customer: Some(pb::Customer { name: "Trace Me".into(), phone: phone.clone(), ..Default::default() }),
                request_id: uuid::Uuid::new_v4().to_string(),
            })
            .await
            .expect("create")
            .into_inner()
            .customer
            .expect("customer");
        client
            .batch_record_transactions(pb::BatchRecordTransactionsRequest {
                transactions: vec![pb::Transaction {
                    transaction_id: uuid::Uuid::new_v4().to_string(),
                    customer_id: c.customer_id.clone(),
                    kind: pb::TransactionKind::Purchase as i32,
                    amount: Some(Money { amount_minor: 1999, currency: "CNY".into() }),
                    occurred_at: Some(prost_types::Timestamp { seconds: 1_760_000_000, nanos: 0 }),
                    ..Default::default()
                }],
                request_id: uuid::Uuid::new_v4().to_string(),
            })
            .await
            .expect("transactions");
        c
    }
    .instrument(root.clone())
    .await;
    drop(root);
    assert!(!created.customer_id.is_empty());

    // A consumer in this process, with its own schema for its inbox.
    let mut config = testing::config("e2e").await;
    config.migrate_on_start = true;
    let pool = crm_kit::db::pg_pool(&config).expect("pool");
    crm_kit::db::migrate(&pool, &config.database_schema, &NO_MIGRATIONS).await.expect("kit tables");
    let seen = Seen::default();
    let settings = ConsumerSettings {
        group,
        name: "e2e".into(),
        streams: vec![stream.clone()],
        batch_size: 100,
        block: Duration::from_millis(200),
        claim_idle: Duration::from_secs(30),
    };
    let mut consumer =
        Consumer::new(pool, &testing::redis_url(), settings, seen.clone(), Metrics::new("e2e")).expect("consumer");
    let want = ["crm.profiles.v1.CustomerCreated", "crm.profiles.v1.TransactionRecorded"];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        consumer.poll_once().await.expect("consume");
        let got = seen.0.lock().expect("lock").clone();
        let ours: Vec<_> =
            got.iter().filter(|(_, tp)| tp.contains(&trace_id.to_string())).map(|(t, _)| t.as_str()).collect();
        if want.iter().all(|w| ours.contains(w)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "events with the client's trace id did not arrive: {got:?}");
    }
    let spans = exporter.get_finished_spans().expect("spans");
    let consumed: Vec<_> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace_id && s.name.starts_with("consume crm.profiles.v1."))
        .map(|s| s.name.to_string())
        .collect();
    assert!(consumed.len() >= 2, "consumer spans continue the client's trace: {consumed:?}");

    assert_eq!(profiles.terminate().await, Some(0), "SIGTERM ends the process cleanly");
}
