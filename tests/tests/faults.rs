//! REL-3, REL-7 with the real binaries under faults: Redis restarted without
//! persistence, a consumer down while its stream is trimmed, `kill -9` of a
//! relay and of a consumer mid-batch, of a segmentation replica mid-recompute
//! and of an outreach replica mid-campaign. Redis faults use a private
//! redis-server; the shared one is never touched.

use std::time::Duration;

use crm_e2e::{ServiceProcess, wait_for};
use crm_kit::Role;
use crm_kit::testing::{Bearer, PrivateRedis};
use crm_proto::common::v1::{Channel, Money, Purpose};
use crm_proto::outreach::v1 as out;
use crm_proto::outreach::v1::outreach_service_client::OutreachServiceClient;
use crm_proto::profiles::v1 as pb;
use crm_proto::profiles::v1::import_records_request::Record;
use crm_proto::profiles::v1::profiles_service_client::ProfilesServiceClient;
use crm_proto::segmentation::v1 as seg;
use crm_proto::segmentation::v1::segmentation_service_client::SegmentationServiceClient;
use uuid::Uuid;

async fn db() -> sqlx::PgPool {
    sqlx::PgPool::connect(&crm_kit::testing::test_database_url().await).await.expect("db")
}

async fn count(db: &sqlx::PgPool, sql: String) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(db).await.unwrap_or(-1)
}

/// Waits up to `secs` seconds for `sql` (a count) to reach `want`, naming `what`.
async fn until(db: &sqlx::PgPool, what: &str, sql: String, want: i64, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let n = count(db, sql.clone()).await;
        if n == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {n}, expected {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn profiles(
    p: &ServiceProcess,
) -> ProfilesServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>> {
    let token = crm_kit::testing::token(&[Role::Admin, Role::Service], true);
    ProfilesServiceClient::with_interceptor(crm_kit::client::channel(&p.url).expect("ch"), Bearer(token))
}

/// Imports `n` customers with one purchase each: 2 n events from profiles.
async fn import(p: &ServiceProcess, n: usize) {
    let tag = crm_kit::testing::unique_name("imp");
    let mut rows = Vec::with_capacity(2 * n);
    for i in 0..n {
        let external = pb::ExternalId { source: "fault".into(), id: format!("{tag}-{i}") };
        rows.push(pb::ImportRecordsRequest {
            record: Some(Record::Customer(pb::Customer {
                name: format!("Fault {i}"),
                timezone: "UTC".into(),
                external_ids: vec![external.clone()],
                ..Default::default()
            })),
            customer_ref: None,
        });
        rows.push(pb::ImportRecordsRequest {
            record: Some(Record::Transaction(pb::Transaction {
                transaction_id: format!("{tag}-t{i}"),
                kind: pb::TransactionKind::Purchase as i32,
                amount: Some(Money { amount_minor: 1000 + i as i64, currency: "CNY".into() }),
                occurred_at: Some(prost_types::Timestamp { seconds: 1_760_000_000 + i as i64, nanos: 0 }),
                ..Default::default()
            })),
            customer_ref: Some(external),
        });
    }
    let r = profiles(p).import_records(tokio_stream::iter(rows)).await.expect("import").into_inner();
    assert_eq!((r.customers_created, r.transactions_recorded), (n as i64, n as i64), "{:?}", r.rejections.first());
}

/// How many of `producer`'s events `process` applied.
fn inbox(process: &ServiceProcess, group: &str, producer: &ServiceProcess) -> String {
    format!(
        "SELECT count(*) FROM {}.kit_inbox i WHERE consumer = '{group}' \
         AND EXISTS (SELECT 1 FROM {}.kit_outbox o WHERE o.event_id = i.event_id)",
        process.schema, producer.schema
    )
}

fn dead(process: &ServiceProcess) -> String {
    format!("SELECT count(*) FROM {}.kit_dead_events", process.schema)
}

#[tokio::test]
async fn rel3_redis_restarted_without_persistence_between_publish_and_consume_loses_nothing() {
    let mut redis = PrivateRedis::start(&[]).await;
    let prefix = crm_kit::testing::unique_name("fault");
    let bus =
        [("EVENT_STREAM_PREFIX", prefix.as_str()), ("REDIS_URL", redis.url.as_str()), ("CONSUMER_BLOCK_MS", "200")];
    let producer = ServiceProcess::start("profiles", &bus).await;
    let mut segmentation = ServiceProcess::start("segmentation", &bus).await;
    let mut analytics = ServiceProcess::start("analytics", &bus).await;
    let db = db().await;
    // The read models are down while the events are published...
    segmentation.kill();
    analytics.kill();
    import(&producer, 40).await;
    until(
        &db,
        "published",
        format!("SELECT count(*) FROM {}.kit_outbox WHERE published_at IS NOT NULL", producer.schema),
        80,
        30,
    )
    .await;
    // ...and Redis restarts empty before they come back.
    redis.restart().await;
    segmentation.restart().await;
    analytics.restart().await;
    until(&db, "segmentation applied every event", inbox(&segmentation, "segmentation", &producer), 80, 60).await;
    until(&db, "analytics applied every event", inbox(&analytics, "analytics", &producer), 80, 60).await;
    assert_eq!(count(&db, format!("SELECT count(*) FROM {}.customers", segmentation.schema)).await, 40);
    assert_eq!(count(&db, format!("SELECT count(*) FROM {}.transactions", segmentation.schema)).await, 40);
    assert_eq!(count(&db, format!("SELECT count(*) FROM {}.purchases", analytics.schema)).await, 40);
    assert_eq!(count(&db, dead(&segmentation)).await + count(&db, dead(&analytics)).await, 0);
}

#[tokio::test]
async fn rel7_a_consumer_down_while_its_stream_is_trimmed_under_load_loses_nothing() {
    let redis = PrivateRedis::start(&[]).await;
    let prefix = crm_kit::testing::unique_name("fault");
    let bus = [
        ("EVENT_STREAM_PREFIX", prefix.as_str()),
        ("REDIS_URL", redis.url.as_str()),
        ("CONSUMER_BLOCK_MS", "200"),
        // What the stream was capped at before: a length, whoever had read what.
        ("EVENT_STREAM_MAXLEN", "1000"),
    ];
    let producer = ServiceProcess::start("profiles", &bus).await;
    let mut segmentation = ServiceProcess::start("segmentation", &bus).await;
    let analytics = ServiceProcess::start("analytics", &bus).await;
    let db = db().await;
    import(&producer, 300).await;
    until(&db, "segmentation caught up", inbox(&segmentation, "segmentation", &producer), 600, 60).await;
    // segmentation dies; 3 000 more events flow while analytics keeps reading and the stream is trimmed.
    segmentation.kill();
    for _ in 0..5 {
        import(&producer, 300).await;
    }
    until(&db, "analytics applied every event", inbox(&analytics, "analytics", &producer), 3600, 120).await;
    let stream = crm_kit::outbox::stream_name(&prefix, "profiles");
    let conn =
        redis::Client::open(redis.url.as_str()).expect("url").get_multiplexed_async_connection().await.expect("redis");
    wait_for("the relay to trim what both groups had read", async || {
        let len: i64 = redis::cmd("XLEN").arg(&stream).query_async(&mut conn.clone()).await.expect("xlen");
        len <= 3000
    })
    .await;
    segmentation.restart().await;
    until(&db, "segmentation applied every event", inbox(&segmentation, "segmentation", &producer), 3600, 120).await;
    assert_eq!(count(&db, format!("SELECT count(*) FROM {}.customers", segmentation.schema)).await, 1800);
    assert_eq!(count(&db, dead(&segmentation)).await, 0, "nothing lost, nothing dead-lettered");
}

#[tokio::test]
async fn rel3_kill_9_of_a_relay_and_of_a_consumer_mid_batch_loses_nothing_and_applies_nothing_twice() {
    let redis = PrivateRedis::start(&[]).await;
    let prefix = crm_kit::testing::unique_name("fault");
    let bus = [
        ("EVENT_STREAM_PREFIX", prefix.as_str()),
        ("REDIS_URL", redis.url.as_str()),
        ("CONSUMER_BLOCK_MS", "200"),
        ("OUTBOX_BATCH_SIZE", "20"),
        ("CONSUMER_BATCH_SIZE", "20"),
        ("CONSUMER_CLAIM_IDLE_MS", "1000"),
    ];
    let mut producer = ServiceProcess::start("profiles", &bus).await;
    let mut segmentation = ServiceProcess::start("segmentation", &bus).await;
    let db = db().await;
    let pending = format!("SELECT count(*) FROM {}.kit_outbox WHERE published_at IS NULL", producer.schema);
    import(&producer, 1000).await;
    // The relay dies while it works through the backlog.
    let mut killed_relay = false;
    for _ in 0..500 {
        let left = count(&db, pending.clone()).await;
        if left > 0 && left < 2000 {
            producer.kill();
            killed_relay = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(killed_relay, "the relay was killed mid-backlog");
    // So does the consumer, in the middle of applying it.
    let applied = inbox(&segmentation, "segmentation", &producer);
    let mut killed_consumer = false;
    producer.restart().await;
    for _ in 0..1000 {
        let n = count(&db, applied.clone()).await;
        if n > 0 && n < 2000 {
            segmentation.kill();
            killed_consumer = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(killed_consumer, "the consumer was killed mid-stream");
    segmentation.restart().await;
    until(&db, "every event applied", applied, 2000, 120).await;
    until(&db, "every event published", pending, 0, 30).await;
    assert_eq!(count(&db, format!("SELECT count(*) FROM {}.customers", segmentation.schema)).await, 1000);
    assert_eq!(count(&db, format!("SELECT count(*) FROM {}.transactions", segmentation.schema)).await, 1000);
    assert_eq!(count(&db, dead(&segmentation)).await, 0);
}

#[tokio::test]
async fn rel7_kill_9_of_the_replica_running_a_recompute_lets_the_other_complete_it() {
    let prefix = crm_kit::testing::unique_name("fault");
    let bus = [("EVENT_STREAM_PREFIX", prefix.as_str()), ("CONSUMER_BLOCK_MS", "200")];
    let producer = ServiceProcess::start("profiles", &bus).await;
    let lease = [("SEGMENTATION_OPERATION_LEASE_SECONDS", "3")];
    let first = ServiceProcess::start("segmentation", &[bus[0], bus[1], lease[0]]).await;
    let schema = first.schema.clone();
    let second =
        ServiceProcess::start("segmentation", &[bus[0], bus[1], lease[0], ("DATABASE_SCHEMA", schema.as_str())]).await;
    let mut replicas = [first, second];
    let db = db().await;
    import(&producer, 2000).await;
    until(&db, "the read model", format!("SELECT count(*) FROM {schema}.customers"), 2000, 120).await;
    let token = crm_kit::testing::token(&[Role::Admin], false);
    let mut killed = None;
    let mut operation = String::new();
    for _ in 0..5 {
        let mut s = SegmentationServiceClient::with_interceptor(
            crm_kit::client::channel(&replicas[0].url).expect("ch"),
            Bearer(token.clone()),
        );
        operation = s
            .start_recompute(seg::StartRecomputeRequest {
                scope: seg::RecomputeScope::Full as i32,
                request_id: crm_kit::testing::unique_name("recompute"),
            })
            .await
            .expect("start")
            .into_inner()
            .operation_id;
        let id = operation.clone();
        // Find the runner the moment it claims the operation, and kill it.
        let claimed =
            format!("SELECT claimed_by FROM {schema}.recompute_operations WHERE operation_id::text = $1 AND state = 2");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            let runner: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(claimed.clone()))
                .bind(&id)
                .fetch_optional(&db)
                .await
                .ok()
                .flatten();
            if let Some(runner) = runner {
                let i = replicas.iter().position(|r| r.consumer_name() == runner).expect("a replica runs it");
                replicas[i].kill();
                killed = Some((i, id.clone()));
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if killed.is_some() {
            break;
        }
    }
    let (dead_one, id) = killed.expect("a runner was killed mid-recompute");
    let survivor = replicas[1 - dead_one].consumer_name();
    let done = format!(
        "SELECT count(*) FROM {schema}.recompute_operations WHERE operation_id::text = '{id}' AND state = 3 AND claimed_by = '{survivor}'"
    );
    until(&db, "the other replica completed the recompute", done, 1, 120).await;
    let _ = operation;
}

#[tokio::test]
async fn rel3_kill_9_of_an_outreach_replica_mid_campaign_contacts_everyone_once() {
    let prefix = crm_kit::testing::unique_name("fault");
    let bus = [("EVENT_STREAM_PREFIX", prefix.as_str()), ("CONSUMER_BLOCK_MS", "200")];
    let profiles_process = ServiceProcess::start("profiles", &bus).await;
    let outreach_env = [
        bus[0],
        bus[1],
        ("OUTREACH_PROFILES_URL", profiles_process.url.as_str()),
        ("OUTREACH_POLL_MS", "50"),
        ("OUTREACH_BATCH", "5"),
        ("OUTREACH_DELIVERY_LEASE_MS", "1500"),
    ];
    let first = ServiceProcess::start("outreach", &outreach_env).await;
    let schema = first.schema.clone();
    let mut shared = outreach_env.to_vec();
    shared.push(("DATABASE_SCHEMA", schema.as_str()));
    let second = ServiceProcess::start("outreach", &shared).await;
    let mut replicas = [first, second];
    let db = db().await;
    let token = crm_kit::testing::token(&[Role::Admin], false);
    let mut o =
        OutreachServiceClient::with_interceptor(crm_kit::client::channel(&replicas[1].url).expect("ch"), Bearer(token));
    o.update_contact_policy(out::UpdateContactPolicyRequest {
        policy: Some(out::ContactPolicy::default()),
        update_mask: Some(prost_types::FieldMask { paths: vec!["quiet_start".into(), "quiet_end".into()] }),
        etag: String::new(),
        request_id: crm_kit::testing::unique_name("policy"),
    })
    .await
    .expect("policy");
    let template = o
        .create_template(out::CreateTemplateRequest {
            template: Some(out::Template {
                display_name: "offer".into(),
                channel: Channel::Sms as i32,
                content_type: out::ContentType::ExclusiveOffer as i32,
                purpose: Purpose::Marketing as i32,
                bodies: vec![out::TemplateBody {
                    locale: "zh-CN".into(),
                    subject: String::new(),
                    body: "{{discount}}".into(),
                }],
                ..Default::default()
            }),
            request_id: crm_kit::testing::unique_name("template"),
        })
        .await
        .expect("template")
        .into_inner()
        .template_id;
    // 150 customers with SMS marketing consent, in profiles and in outreach's copy.
    let mut p = profiles(&profiles_process);
    let mut customers = Vec::new();
    for i in 0..150 {
        let id = p
            .create_customer(pb::CreateCustomerRequest {
                customer: Some(pb::Customer {
                    name: format!("Campaign {i}"),
                    timezone: "UTC".into(),
                    ..Default::default()
                }),
                request_id: crm_kit::testing::unique_name("c"),
            })
            .await
            .expect("create")
            .into_inner()
            .customer
            .expect("customer")
            .customer_id;
        p.update_consent(pb::UpdateConsentRequest {
            customer_id: id.clone(),
            changes: vec![pb::ConsentGrant {
                channel: Channel::Sms as i32,
                purpose: Purpose::Marketing as i32,
                granted: true,
                source: "fault".into(),
                ..Default::default()
            }],
            request_id: crm_kit::testing::unique_name("consent"),
        })
        .await
        .expect("consent");
        customers.push(Uuid::parse_str(&id).expect("id"));
    }
    until(
        &db,
        "outreach's copy of the grants",
        format!("SELECT count(*) FROM {schema}.consents WHERE granted"),
        150,
        60,
    )
    .await;
    let segment = Uuid::now_v7();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {schema}.segment_members (segment_id, customer_id) SELECT $1, * FROM UNNEST($2::uuid[])"
    )))
    .bind(segment)
    .bind(&customers)
    .execute(&db)
    .await
    .expect("members");
    let campaign = o
        .create_campaign(out::CreateCampaignRequest {
            campaign: Some(out::Campaign {
                display_name: "Faulty".into(),
                segment_ids: vec![segment.to_string()],
                variants: vec![out::Variant {
                    name: "A".into(),
                    traffic_percent: 100,
                    channel_plan: vec![out::TierChannelPlan {
                        tier: 0,
                        channels: vec![Channel::Sms as i32],
                        template_ids: [(Channel::Sms.as_str_name().to_string(), template.clone())]
                            .into_iter()
                            .collect(),
                    }],
                }],
                schedule: Some(out::Schedule { when: Some(out::schedule::When::Now(true)), timezone: String::new() }),
                ..Default::default()
            }),
            request_id: crm_kit::testing::unique_name("campaign"),
        })
        .await
        .expect("campaign")
        .into_inner()
        .campaign_id;
    o.transition_campaign(out::TransitionCampaignRequest {
        campaign_id: campaign.clone(),
        target_state: out::CampaignState::Running as i32,
        request_id: crm_kit::testing::unique_name("run"),
    })
    .await
    .expect("run");
    let campaign = Uuid::parse_str(&campaign).expect("id");
    let sent = format!("SELECT count(*) FROM {schema}.sink_deliveries WHERE campaign_id = '{campaign}'");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count(&db, sent.clone()).await < 10 {
        assert!(tokio::time::Instant::now() < deadline, "the campaign started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One replica dies mid-campaign, its leased batch with it.
    replicas[0].kill();
    until(
        &db,
        "every customer reached",
        format!("SELECT count(DISTINCT customer_id) FROM {schema}.sink_deliveries WHERE campaign_id = '{campaign}'"),
        150,
        120,
    )
    .await;
    until(
        &db,
        "every message settled",
        format!("SELECT count(*) FROM {schema}.messages WHERE campaign_id = '{campaign}' AND state IN (1, 2)"),
        0,
        60,
    )
    .await;
    assert_eq!(count(&db, sent).await, 150, "one delivery per customer: none skipped, none twice");
    let twice = format!(
        "SELECT count(*) FROM (SELECT customer_id FROM {schema}.messages WHERE campaign_id = '{campaign}' AND state IN (3, 4) \
         GROUP BY customer_id HAVING count(*) > 1) t"
    );
    assert_eq!(count(&db, twice).await, 0, "no customer has two sent messages");
    let _ = &mut replicas;
}
