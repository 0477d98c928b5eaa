//! Real crm-profiles and crm-outreach processes on one event bus (SPEC 2,
//! issue 5): a customer created in profiles reaches outreach's read model; an
//! acknowledgement sent by outreach greets them by the name it reads from
//! profiles at send time (an audited read); the contact shows in the
//! customer's timeline in profiles.

use crm_e2e::{ServiceProcess, daytime_zone, wait_for};
use crm_kit::Role;
use crm_kit::testing::Bearer;
use crm_proto::outreach::v1 as out;
use crm_proto::outreach::v1::outreach_service_client::OutreachServiceClient;
use crm_proto::profiles::v1 as pb;
use crm_proto::profiles::v1::profiles_service_client::ProfilesServiceClient;

#[tokio::test]
async fn an_acknowledgement_greets_by_name_and_shows_in_the_profiles_timeline() {
    let prefix = crm_kit::testing::unique_name("e2e");
    let bus = [("EVENT_STREAM_PREFIX", prefix.as_str()), ("CONSUMER_BLOCK_MS", "200")];
    let mut profiles = ServiceProcess::start("profiles", &bus).await;
    let profiles_url = profiles.url.clone();
    let outreach_env = [bus[0], bus[1], ("OUTREACH_PROFILES_URL", profiles_url.as_str()), ("OUTREACH_POLL_MS", "50")];
    let mut outreach = ServiceProcess::start("outreach", &outreach_env).await;
    let db = sqlx::PgPool::connect(&crm_kit::testing::test_database_url().await).await.expect("db");

    let token = crm_kit::testing::token(&[Role::Admin], true);
    let mut p = ProfilesServiceClient::with_interceptor(
        crm_kit::client::channel(&profiles.url).expect("ch"),
        Bearer(token.clone()),
    );
    let zone = daytime_zone();
    let customer = p
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(pb::Customer {
                name: "李雷".into(),
                phone: "+8613900001111".into(),
                timezone: zone.into(),
                preferred_channel: crm_proto::common::v1::Channel::Sms as i32,
                ..Default::default()
            }),
            request_id: crm_kit::testing::unique_name("create"),
        })
        .await
        .expect("create")
        .into_inner()
        .customer
        .expect("customer")
        .customer_id;
    let id = uuid::Uuid::parse_str(&customer).expect("id");

    // CustomerCreated reaches outreach's read model through the bus.
    let known = format!("SELECT count(*) FROM {}.customers WHERE customer_id = $1 AND timezone = $2", outreach.schema);
    wait_for("the customer in outreach's read model", async || {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(known.clone()))
            .bind(id)
            .bind(zone)
            .fetch_one(&db)
            .await
            .unwrap_or(0)
            == 1
    })
    .await;

    let service = crm_kit::testing::token(&[Role::Service], false);
    let mut o =
        OutreachServiceClient::with_interceptor(crm_kit::client::channel(&outreach.url).expect("ch"), Bearer(service));
    let ack = o
        .acknowledge_feedback(out::AcknowledgeFeedbackRequest {
            customer_id: customer.clone(),
            feedback_id: "FB-7".into(),
            ticket_id: String::new(),
            channel: crm_proto::common::v1::Channel::Sms as i32,
            locale: "zh-CN".into(),
            request_id: crm_kit::testing::unique_name("ack"),
            kind: out::AcknowledgementKind::Received as i32,
        })
        .await
        .expect("ack")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(ack.decision.as_ref().map(|d| d.rule.as_str()), Some("ALLOWED"), "{ack:?}");

    // Delivered through the sink, greeting by the name read from profiles.
    let sink = format!("SELECT body FROM {}.sink_deliveries WHERE customer_id = $1", outreach.schema);
    let mut body = String::new();
    wait_for("the delivery", async || {
        body = sqlx::query_scalar(sqlx::AssertSqlSafe(sink.clone()))
            .bind(id)
            .fetch_optional(&db)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        !body.is_empty()
    })
    .await;
    assert!(body.starts_with("李雷，您好") && body.contains("FB-7"), "{body}");
    let audit = format!(
        "SELECT count(*) FROM {}.access_audit WHERE customer_id = $1 AND purpose = 'outreach delivery' AND subject = 'service:outreach'",
        profiles.schema
    );
    let audited: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(audit)).bind(id).fetch_one(&db).await.expect("audit");
    assert_eq!(audited, 1, "the unmasked read is in profiles' access audit");

    // MessageSent reaches the profiles timeline.
    wait_for("the contact in the timeline", async || {
        let t = p
            .list_timeline(pb::ListTimelineRequest {
                customer_id: customer.clone(),
                page_size: 10,
                ..Default::default()
            })
            .await
            .expect("timeline")
            .into_inner();
        t.entries.iter().any(|e| e.source_service == "outreach" && e.source_id == ack.message_id)
    })
    .await;

    outreach.terminate().await;
    profiles.terminate().await;
    if let Ok(client) = redis::Client::open(crm_kit::testing::redis_url())
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        for s in ["profiles", "outreach"] {
            let _: Result<(), _> =
                redis::cmd("DEL").arg(crm_kit::outbox::stream_name(&prefix, s)).query_async(&mut conn).await;
        }
    }
}
