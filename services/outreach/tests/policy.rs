//! OUT-5 and OUT-1 under concurrency and crashes, against real PostgreSQL:
//! caps hold exactly across two service instances; a sender killed between
//! the provider call and its bookkeeping neither double-sends nor loses a
//! message; an opt-out between scheduling and sending suppresses.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crm_kit::Role;
use crm_kit::testing::Bearer;
use crm_outreach::delivery::{Adapter, Deliverer, Outbound, Sink};
use crm_proto::outreach::v1 as pb;
use crm_proto::outreach::v1::outreach_service_client::OutreachServiceClient;
use uuid::Uuid;

struct Instance {
    url: String,
    shutdown: crm_kit::lifecycle::Shutdown,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// One outreach replica (API and background loops) on `config`'s schema.
async fn instance(config: crm_kit::config::KitConfig) -> (Instance, sqlx::PgPool) {
    let mut kit = crm_kit::Kit::start(crm_outreach::SPEC, config).await.expect("kit");
    crm_outreach::templates::seed(&kit.pg).await.expect("seed");
    let env = crm_kit::config::Env::from_pairs([("OUTREACH_POLL_MS", "20"), ("OUTREACH_BATCH", "50")]);
    let oc = crm_outreach::OutreachConfig::load(&env).expect("config");
    let parts = crm_outreach::build(&kit, &oc);
    crm_outreach::spawn_workers(&mut kit, &oc, &parts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let pool = kit.pg.clone();
    let shutdown = kit.shutdown_handle();
    let routes = tonic::service::Routes::new(pb::outreach_service_server::OutreachServiceServer::new(parts.api));
    tokio::spawn(kit.serve_on(listener, routes, crm_outreach::access_policy()));
    (Instance { url, shutdown }, pool)
}

type Client = OutreachServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>>;

fn client(url: &str, roles: &[Role]) -> Client {
    OutreachServiceClient::with_interceptor(
        crm_kit::client::channel(url).expect("channel"),
        Bearer::minted(roles, false),
    )
}

/// Customers in the read model with marketing consent on SMS.
async fn customers(pool: &sqlx::PgPool, n: usize) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    sqlx::query(
        "INSERT INTO customers (customer_id, timezone) SELECT id, 'Asia/Shanghai' FROM UNNEST($1::uuid[]) AS t(id)",
    )
    .bind(&ids)
    .execute(pool)
    .await
    .expect("customers");
    sqlx::query("INSERT INTO consents (customer_id, channel, purpose, granted) SELECT id, 1, 2, true FROM UNNEST($1::uuid[]) AS t(id)")
        .bind(&ids)
        .execute(pool)
        .await
        .expect("consents");
    ids
}

async fn sms_template(c: &mut Client) -> String {
    c.create_template(pb::CreateTemplateRequest {
        template: Some(pb::Template {
            display_name: "Autumn offer".into(),
            channel: crm_proto::common::v1::Channel::Sms as i32,
            content_type: pb::ContentType::ExclusiveOffer as i32,
            purpose: crm_proto::common::v1::Purpose::Marketing as i32,
            bodies: vec![pb::TemplateBody {
                locale: "zh-CN".into(),
                subject: String::new(),
                body: "{{name}}，{{tier}}专享{{discount}}优惠".into(),
            }],
            ..Default::default()
        }),
        request_id: Uuid::now_v7().to_string(),
    })
    .await
    .expect("template")
    .into_inner()
    .template_id
}

/// Quiet hours off, so the test does not depend on the time of day.
async fn no_quiet_hours(c: &mut Client) {
    c.update_contact_policy(pb::UpdateContactPolicyRequest {
        policy: Some(pb::ContactPolicy::default()),
        update_mask: Some(prost_types::FieldMask { paths: vec!["quiet_start".into(), "quiet_end".into()] }),
        etag: String::new(),
        request_id: Uuid::now_v7().to_string(),
    })
    .await
    .expect("policy");
}

#[tokio::test]
async fn the_daily_cap_holds_exactly_with_many_senders_on_two_instances() {
    let config = crm_kit::testing::config("outreach").await;
    let (a, pool) = instance(config.clone()).await;
    let (b, _) = instance(config).await;
    let mut admin = client(&a.url, &[Role::Admin]);
    no_quiet_hours(&mut admin).await;
    let template = sms_template(&mut admin).await;
    let ids = customers(&pool, 10).await;

    // 10 customers x 8 concurrent sends, alternating between the instances.
    let mut sends = Vec::new();
    for round in 0..8 {
        for (i, id) in ids.iter().enumerate() {
            let mut c = client(if (round + i) % 2 == 0 { &a.url } else { &b.url }, &[Role::Agent]);
            let request = pb::SendMessageRequest {
                customer_id: id.to_string(),
                channel: 0,
                template_id: template.clone(),
                variables: Default::default(),
                request_id: format!("r{round}-{i}"),
            };
            sends.push(tokio::spawn(async move { c.send_message(request).await.map(|r| r.into_inner()) }));
        }
    }
    let mut verdicts = std::collections::HashMap::<(String, i32), usize>::new();
    for s in sends {
        let m = s.await.expect("join").expect("send").message.expect("message");
        let d = m.decision.expect("decided at once");
        *verdicts.entry((m.customer_id, d.verdict)).or_default() += 1;
        if d.verdict == pb::Verdict::Deferred as i32 {
            assert_eq!(d.rule, "DAILY_CAP", "{d:?}");
            assert!(d.deferred_until.is_some());
        }
    }
    for id in &ids {
        assert_eq!(verdicts.get(&(id.to_string(), pb::Verdict::Sent as i32)), Some(&2), "customer {id}: {verdicts:?}");
        assert_eq!(verdicts.get(&(id.to_string(), pb::Verdict::Deferred as i32)), Some(&6));
    }

    // Queued messages decided by both instances' dispatchers at once: still two a day.
    let more = customers(&pool, 10).await;
    sqlx::query(
        "INSERT INTO messages (message_id, customer_id, channel, template_id, purpose, state, due_at, expires_at) \
         SELECT gen_random_uuid(), c, 1, $2::uuid, 2, 1, now(), now() + interval '7 days' FROM UNNEST($1::uuid[]) AS t(c), generate_series(1, 6)",
    )
    .bind(&more)
    .bind(Uuid::parse_str(&template).expect("id"))
    .execute(&pool)
    .await
    .expect("queue");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let undecided: i64 =
            sqlx::query_scalar("SELECT count(*) FROM messages WHERE customer_id = ANY($1) AND decided_at IS NULL")
                .bind(&more)
                .fetch_one(&pool)
                .await
                .expect("count");
        if undecided == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{undecided} messages still undecided");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let per_customer: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FROM contacts WHERE customer_id = ANY($1) GROUP BY customer_id ORDER BY customer_id",
    )
    .bind(&more)
    .fetch_all(&pool)
    .await
    .expect("contacts");
    assert_eq!(per_customer, vec![2; 10]);
    // Every decision is recorded with its rule: 2 ALLOWED and 4 DAILY_CAP each.
    let rules: Vec<(String, i64)> =
        sqlx::query_as("SELECT rule, count(*) FROM decisions WHERE customer_id = ANY($1) GROUP BY rule ORDER BY rule")
            .bind(&more)
            .fetch_all(&pool)
            .await
            .expect("decisions");
    assert_eq!(rules, vec![("ALLOWED".to_string(), 20), ("DAILY_CAP".to_string(), 40)]);
    drop(b);
}

/// Calls the real sink, then "dies": the future never completes, like a
/// process killed after the provider accepted and before bookkeeping.
struct DiesAfterProviderCall {
    sink: Sink,
    calls: Arc<AtomicUsize>,
}

impl Adapter for DiesAfterProviderCall {
    fn send<'a>(&'a self, m: &'a Outbound) -> crm_outreach::delivery::Sending<'a> {
        Box::pin(async move {
            self.sink.send(m).await?;
            self.calls.fetch_add(1, Ordering::SeqCst);
            std::future::pending().await
        })
    }
}

#[tokio::test]
async fn a_sender_killed_after_the_provider_call_neither_double_sends_nor_loses() {
    let config = crm_kit::testing::config("outreach").await;
    let kit = crm_kit::Kit::start(crm_outreach::SPEC, config).await.expect("kit");
    let pool = kit.pg.clone();
    crm_outreach::templates::seed(&pool).await.expect("seed");
    let ids = customers(&pool, 25).await;
    // 25 approved messages waiting for the adapter.
    sqlx::query(
        "INSERT INTO messages (message_id, customer_id, channel, template_id, purpose, state, due_at, expires_at, locale, variables) \
         SELECT gen_random_uuid(), c, 1, $2, 1, 2, now(), now() + interval '7 days', 'en', '{\"feedback_id\": \"f-1\"}' \
         FROM UNNEST($1::uuid[]) AS t(c)",
    )
    .bind(&ids)
    .bind(crm_outreach::api::ACK_TEMPLATE)
    .execute(&pool)
    .await
    .expect("queue");

    let calls = Arc::new(AtomicUsize::new(0));
    let dying: Arc<dyn Adapter> =
        Arc::new(DiesAfterProviderCall { sink: Sink::new(pool.clone()), calls: calls.clone() });
    let deliverer = |adapter: Arc<dyn Adapter>| Deliverer {
        pool: pool.clone(),
        adapters: [("log".to_string(), adapter)].into_iter().collect(),
        lease: Duration::from_millis(500),
        max_attempts: 5,
        backoff: Duration::from_millis(10),
        directory: None,
        consent: None,
        complaints: None,
    };
    let first = deliverer(dying);
    let crashed = tokio::spawn(async move { first.deliver_due(100).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while calls.load(Ordering::SeqCst) < ids.len() {
        assert!(tokio::time::Instant::now() < deadline, "the provider was not called for every message");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    crashed.abort();
    let _ = crashed.await;
    let unsettled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM messages WHERE state = 2").fetch_one(&pool).await.expect("count");
    assert_eq!(unsettled, 25, "the crash happened before bookkeeping");

    // The restarted sender waits out the lease, then retries with the same keys.
    let restarted = deliverer(Arc::new(Sink::new(pool.clone())));
    assert_eq!(restarted.deliver_due(100).await.expect("deliver"), 0, "leased messages are not taken early");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(restarted.deliver_due(100).await.expect("deliver"), 25);

    let (rows, calls_total, distinct): (i64, i64, i64) =
        sqlx::query_as("SELECT count(*), sum(calls)::bigint, count(DISTINCT idempotency_key) FROM sink_deliveries")
            .fetch_one(&pool)
            .await
            .expect("sink");
    assert_eq!((rows, distinct), (25, 25), "each message reached the provider's log exactly once");
    assert_eq!(calls_total, 50, "every message was offered twice; the idempotency key dropped the repeat");
    let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE state = 3 AND attempts = 2")
        .fetch_one(&pool)
        .await
        .expect("sent");
    assert_eq!(sent, 25, "nothing lost");
    let body: String =
        sqlx::query_scalar("SELECT body FROM sink_deliveries LIMIT 1").fetch_one(&pool).await.expect("body");
    assert!(body.contains("f-1") && body.starts_with("Valued customer"), "{body}");
    kit.shutdown_handle().trigger();
}

#[tokio::test]
async fn an_opt_out_between_scheduling_and_sending_suppresses_the_queued_message() {
    use crm_kit::consumer::{Event, EventHandler};
    let config = crm_kit::testing::config("outreach").await;
    let kit = crm_kit::Kit::start(crm_outreach::SPEC, config).await.expect("kit");
    let pool = kit.pg.clone();
    let ids = customers(&pool, 2).await;
    let template = Uuid::now_v7();
    sqlx::query("INSERT INTO templates (template_id, display_name, channel, content_type, purpose, bodies) VALUES ($1, 't', 1, 4, 2, '')")
        .bind(template)
        .execute(&pool)
        .await
        .expect("template");
    sqlx::query(
        "INSERT INTO messages (message_id, customer_id, channel, template_id, purpose, state, due_at, expires_at) \
         SELECT gen_random_uuid(), c, 1, $2, 2, 1, now(), now() + interval '7 days' FROM UNNEST($1::uuid[]) AS t(c)",
    )
    .bind(&ids)
    .bind(template)
    .execute(&pool)
    .await
    .expect("queue");

    // The first customer opts out of marketing SMS after the message was queued.
    let revoke = crm_proto::profiles::v1::ConsentChanged {
        customer_id: ids[0].to_string(),
        grants: vec![crm_proto::profiles::v1::ConsentGrant {
            channel: crm_proto::common::v1::Channel::Sms as i32,
            purpose: crm_proto::common::v1::Purpose::Marketing as i32,
            granted: false,
            ..Default::default()
        }],
    };
    let envelope = crm_proto::common::v1::EventEnvelope {
        event_id: Uuid::now_v7().to_string(),
        event_type: <crm_proto::profiles::v1::ConsentChanged as prost::Name>::full_name(),
        payload: Some(prost_types::Any::from_msg(&revoke).expect("pack")),
        ..Default::default()
    };
    let event = Event { envelope, stream: "crm.profiles.events".into(), stream_id: "1-0".into() };
    let mut tx = pool.begin().await.expect("tx");
    crm_outreach::read_model::ReadModel.handle(&mut tx, &event).await.expect("apply");
    tx.commit().await.expect("commit");

    // Decided at noon Shanghai time, outside quiet hours.
    let noon = chrono::DateTime::parse_from_rfc3339("2030-01-02T04:00:00Z").expect("time").to_utc();
    sqlx::query("UPDATE messages SET due_at = $1 - interval '1 minute'").bind(noon).execute(&pool).await.expect("due");
    let mut tx = pool.begin().await.expect("tx");
    let (tally, _) =
        crm_outreach::dispatch::decide_due(&mut tx, chrono_tz::Asia::Shanghai, 100, noon, None).await.expect("decide");
    tx.commit().await.expect("commit");
    assert_eq!((tally.approved, tally.dropped), (1, 1));
    let rules: Vec<(Uuid, i16, String)> =
        sqlx::query_as("SELECT customer_id, state, rule FROM messages ORDER BY customer_id")
            .fetch_all(&pool)
            .await
            .expect("messages");
    let of = |id: Uuid| rules.iter().find(|r| r.0 == id).map(|r| (r.1, r.2.clone())).expect("message");
    assert_eq!(of(ids[0]), (5, "OPTED_OUT".to_string()));
    assert_eq!(of(ids[1]), (2, "ALLOWED".to_string()));
    kit.shutdown_handle().trigger();
}

#[tokio::test]
async fn campaign_groups_in_sql_match_the_domain_assignment() {
    let config = crm_kit::testing::config("outreach").await;
    let kit = crm_kit::Kit::start(crm_outreach::SPEC, config).await.expect("kit");
    let pool = kit.pg.clone();
    let ids = customers(&pool, 400).await;
    let segment = Uuid::now_v7();
    sqlx::query("INSERT INTO segment_members (segment_id, customer_id) SELECT $1, c FROM UNNEST($2::uuid[]) AS t(c)")
        .bind(segment)
        .bind(&ids)
        .execute(&pool)
        .await
        .expect("members");
    let template = Uuid::now_v7();
    let plan = |tier: i32| pb::TierChannelPlan {
        tier,
        channels: vec![crm_proto::common::v1::Channel::Sms as i32],
        template_ids: [("CHANNEL_SMS".to_string(), template.to_string())].into_iter().collect(),
    };
    let spec = pb::Campaign {
        display_name: "win-back".into(),
        segment_ids: vec![segment.to_string()],
        variants: vec![
            pb::Variant { name: "A".into(), traffic_percent: 30, channel_plan: vec![plan(0)] },
            pb::Variant { name: "B".into(), traffic_percent: 70, channel_plan: vec![plan(0)] },
        ],
        holdout_percent: 20,
        ..Default::default()
    };
    let campaign = Uuid::now_v7();
    sqlx::query("INSERT INTO campaigns (campaign_id, spec, state) VALUES ($1, '', 3)")
        .bind(campaign)
        .execute(&pool)
        .await
        .expect("campaign");
    let mut tx = pool.begin().await.expect("tx");
    let n = crm_outreach::campaigns::launch(&mut tx, campaign, &spec, 0, chrono::Utc::now()).await.expect("launch");
    tx.commit().await.expect("commit");
    assert_eq!(n, 400);
    let groups: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT customer_id, grp FROM campaign_assignments WHERE campaign_id = $1")
            .bind(campaign)
            .fetch_all(&pool)
            .await
            .expect("groups");
    use crm_outreach::domain::campaign::{Group, assign};
    for (customer, grp) in &groups {
        let expected = match assign(campaign, *customer, 20, &[30, 70]) {
            Group::Holdout => "holdout",
            Group::Variant(0) => "A",
            Group::Variant(_) => "B",
        };
        assert_eq!(grp, expected, "customer {customer}");
    }
    // The stored global-control bucket is the domain's.
    let buckets: Vec<(Uuid, i32)> =
        sqlx::query_as("SELECT customer_id, control_bucket FROM customers").fetch_all(&pool).await.expect("buckets");
    for (customer, b) in &buckets {
        for percent in [1, 5, 20] {
            let stored = *b < percent as i32 * 100;
            assert_eq!(stored, crm_outreach::domain::campaign::in_global_control(*customer, percent), "{customer}");
        }
    }
    // The holdout is recorded but never queued for contact.
    let (queued, held): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 1), count(*) FILTER (WHERE state = 5 AND rule = 'HOLDOUT') FROM messages WHERE campaign_id = $1",
    )
    .bind(campaign)
    .fetch_one(&pool)
    .await
    .expect("messages");
    let holdout = groups.iter().filter(|g| g.1 == "holdout").count() as i64;
    assert!(holdout > 40 && holdout < 120, "{holdout}");
    assert_eq!((queued, held), (400 - holdout, holdout));
    kit.shutdown_handle().trigger();
}

#[tokio::test]
async fn a_launch_in_committed_chunks_covers_everyone_once() {
    let config = crm_kit::testing::config("outreach").await;
    let kit = crm_kit::Kit::start(crm_outreach::SPEC, config).await.expect("kit");
    let pool = kit.pg.clone();
    let ids = customers(&pool, 400).await;
    let segment = Uuid::now_v7();
    sqlx::query("INSERT INTO segment_members (segment_id, customer_id) SELECT $1, c FROM UNNEST($2::uuid[]) AS t(c)")
        .bind(segment)
        .bind(&ids)
        .execute(&pool)
        .await
        .expect("members");
    let template = Uuid::now_v7().to_string();
    let spec = pb::Campaign {
        display_name: "chunks".into(),
        segment_ids: vec![segment.to_string()],
        variants: vec![pb::Variant {
            name: "A".into(),
            traffic_percent: 100,
            channel_plan: vec![pb::TierChannelPlan {
                tier: 0,
                channels: vec![crm_proto::common::v1::Channel::Sms as i32],
                template_ids: [("CHANNEL_SMS".to_string(), template)].into_iter().collect(),
            }],
        }],
        holdout_percent: 10,
        ..Default::default()
    };
    let campaign = Uuid::now_v7();
    let mut after = Uuid::nil();
    let mut chunks = 0;
    let mut total = 0;
    loop {
        // Each chunk commits on its own, as on the campaign clock (any replica may take the next).
        let mut tx = pool.begin().await.expect("tx");
        let (n, last) =
            crm_outreach::campaigns::launch_chunk(&mut tx, campaign, &spec, 0, chrono::Utc::now(), after, 150)
                .await
                .expect("chunk");
        tx.commit().await.expect("commit");
        chunks += 1;
        total += n;
        match last {
            Some(last) if n == 150 => after = last,
            _ => break,
        }
    }
    assert_eq!((chunks, total), (3, 400));
    let (messages, customers, events): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM messages), (SELECT count(DISTINCT customer_id) FROM messages), \
                (SELECT count(*) FROM kit_outbox WHERE event_type = 'crm.outreach.v1.CampaignAssignment')",
    )
    .fetch_one(&pool)
    .await
    .expect("counts");
    assert_eq!((messages, customers, events), (400, 400, 400));
    kit.shutdown_handle().trigger();
}

#[tokio::test]
async fn a_plan_falls_back_to_its_next_channel_when_the_first_is_refused_for_consent() {
    let config = crm_kit::testing::config("outreach").await;
    let kit = crm_kit::Kit::start(crm_outreach::SPEC, config).await.expect("kit");
    let pool = kit.pg.clone();
    // Marketing consent on SMS only (see customers()); the second customer opted out of SMS but allows WeChat.
    let ids = customers(&pool, 2).await;
    sqlx::query("UPDATE consents SET granted = false WHERE customer_id = $1")
        .bind(ids[1])
        .execute(&pool)
        .await
        .expect("opt out");
    sqlx::query("INSERT INTO consents (customer_id, channel, purpose, granted) VALUES ($1, 4, 2, true)")
        .bind(ids[1])
        .execute(&pool)
        .await
        .expect("wechat consent");
    let segment = Uuid::now_v7();
    sqlx::query("INSERT INTO segment_members (segment_id, customer_id) SELECT $1, c FROM UNNEST($2::uuid[]) AS t(c)")
        .bind(segment)
        .bind(&ids)
        .execute(&pool)
        .await
        .expect("members");
    let (sms, wechat) = (Uuid::now_v7(), Uuid::now_v7());
    let spec = pb::Campaign {
        display_name: "sms then wechat".into(),
        segment_ids: vec![segment.to_string()],
        variants: vec![pb::Variant {
            name: "A".into(),
            traffic_percent: 100,
            channel_plan: vec![pb::TierChannelPlan {
                tier: 0,
                channels: vec![
                    crm_proto::common::v1::Channel::Sms as i32,
                    crm_proto::common::v1::Channel::Wechat as i32,
                ],
                template_ids: [
                    ("CHANNEL_SMS".to_string(), sms.to_string()),
                    ("CHANNEL_WECHAT".to_string(), wechat.to_string()),
                ]
                .into_iter()
                .collect(),
            }],
        }],
        ..Default::default()
    };
    let campaign = Uuid::now_v7();
    sqlx::query("INSERT INTO campaigns (campaign_id, spec, state) VALUES ($1, '', 3)")
        .bind(campaign)
        .execute(&pool)
        .await
        .expect("c");
    let noon = chrono::DateTime::parse_from_rfc3339("2030-01-02T04:00:00Z").expect("time").to_utc();
    let mut tx = pool.begin().await.expect("tx");
    crm_outreach::campaigns::launch(&mut tx, campaign, &spec, 0, noon).await.expect("launch");
    let (tally, _) =
        crm_outreach::dispatch::decide_due(&mut tx, chrono_tz::Asia::Shanghai, 10, noon, None).await.expect("decide");
    tx.commit().await.expect("commit");
    assert_eq!(tally.approved, 2);
    let rows: Vec<(Uuid, i16, Uuid, String, String)> =
        sqlx::query_as("SELECT customer_id, channel, template_id, rule, detail FROM messages")
            .fetch_all(&pool)
            .await
            .expect("rows");
    let of = |id: Uuid| rows.iter().find(|r| r.0 == id).cloned().expect("message");
    let first = of(ids[0]);
    assert_eq!((first.1, first.2, first.3.as_str()), (1, sms, "ALLOWED"));
    let second = of(ids[1]);
    assert_eq!((second.1, second.2, second.3.as_str()), (4, wechat, "ALLOWED"));
    assert!(second.4.starts_with("after CHANNEL_SMS: OPTED_OUT"), "{}", second.4);
    let contacts: Vec<(Uuid, i16)> =
        sqlx::query_as("SELECT customer_id, channel FROM contacts").fetch_all(&pool).await.expect("contacts");
    assert!(contacts.contains(&(ids[1], 4)), "the contact counts on the channel used: {contacts:?}");
    kit.shutdown_handle().trigger();
}

/// A provider that is down.
struct Down;

impl Adapter for Down {
    fn send<'a>(&'a self, _m: &'a Outbound) -> crm_outreach::delivery::Sending<'a> {
        Box::pin(async { Err(crm_outreach::delivery::SendError::Transient("provider down".into())) })
    }
}

#[tokio::test]
async fn a_failed_delivery_is_not_a_contact_and_goes_back_to_the_policy() {
    let config = crm_kit::testing::config("outreach").await;
    let kit = crm_kit::Kit::start(crm_outreach::SPEC, config).await.expect("kit");
    let pool = kit.pg.clone();
    crm_outreach::templates::seed(&pool).await.expect("seed");
    let ids = customers(&pool, 1).await;
    sqlx::query(
        "INSERT INTO messages (message_id, customer_id, channel, template_id, purpose, state, due_at, expires_at, locale, variables) \
         VALUES (gen_random_uuid(), $1, 1, $2, 1, 1, now(), now() + interval '7 days', 'en', '{\"feedback_id\": \"F\"}')",
    )
    .bind(ids[0])
    .bind(crm_outreach::api::ACK_TEMPLATE)
    .execute(&pool)
    .await
    .expect("queue");
    // Decided at noon Shanghai time (approved and leased), then the provider is down.
    let noon = chrono::DateTime::parse_from_rfc3339("2030-01-02T04:00:00Z").expect("time").to_utc();
    sqlx::query("UPDATE messages SET due_at = $1")
        .bind(noon - chrono::Duration::minutes(1))
        .execute(&pool)
        .await
        .expect("due");
    let mut tx = pool.begin().await.expect("tx");
    let (tally, approved) =
        crm_outreach::dispatch::decide_due(&mut tx, chrono_tz::Asia::Shanghai, 10, noon, Some(Duration::from_secs(60)))
            .await
            .expect("decide");
    tx.commit().await.expect("commit");
    assert_eq!(tally.approved, 1);
    let counted = || async {
        sqlx::query_as::<_, (i64, i32)>(
            "SELECT (SELECT count(*) FROM contacts), (SELECT unanswered_streak FROM customers)",
        )
        .fetch_one(&pool)
        .await
        .expect("counts")
    };
    assert_eq!(counted().await, (1, 1));
    let deliverer = Deliverer {
        pool: pool.clone(),
        adapters: [("log".to_string(), Arc::new(Down) as Arc<dyn Adapter>)].into_iter().collect(),
        lease: Duration::from_secs(60),
        max_attempts: 5,
        backoff: Duration::from_secs(30),
        directory: None,
        consent: None,
        complaints: None,
    };
    deliverer.deliver_approved(&approved).await.expect("deliver");
    assert_eq!(counted().await, (0, 0), "the failed attempt is not a contact");
    let (state, attempts, error): (i16, i32, String) =
        sqlx::query_as("SELECT state, attempts, last_error FROM messages").fetch_one(&pool).await.expect("message");
    assert_eq!((state, attempts, error.as_str()), (1, 1, "provider down"), "queued again for the policy");
    kit.shutdown_handle().trigger();
}
