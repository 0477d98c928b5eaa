//! PRF-8, SEC-5 across the five real processes: one customer is seeded
//! through every service (a merge, purchases, an interaction note, consent,
//! feedback and a survey comment that give their phone and e-mail, a
//! message rendered with their name, a task about them), then erased. Once
//! all five services have confirmed, every text, JSON, array and bytea
//! column of every table of their schemas, every Redis key and every stream
//! entry is searched for the phone numbers, e-mails and names: zero hits.

use std::time::Duration;

use crm_e2e::{ServiceProcess, daytime_zone, wait_for};
use crm_kit::Role;
use crm_kit::testing::Bearer;
use crm_proto::common::v1::{Channel, Money, Purpose};
use crm_proto::feedback::v1 as fb;
use crm_proto::feedback::v1::feedback_service_client::FeedbackServiceClient;
use crm_proto::outreach::v1 as out;
use crm_proto::outreach::v1::outreach_service_client::OutreachServiceClient;
use crm_proto::profiles::v1 as pb;
use crm_proto::profiles::v1::profiles_service_client::ProfilesServiceClient;

/// The columns that can hold text, of every table of `schemas`.
async fn columns(db: &sqlx::PgPool, schemas: &[String]) -> Vec<(String, String, String, String)> {
    sqlx::query_as(
        "SELECT c.table_schema::text, c.table_name::text, c.column_name::text, c.data_type::text \
         FROM information_schema.columns c JOIN information_schema.tables t \
           ON t.table_schema = c.table_schema AND t.table_name = c.table_name AND t.table_type = 'BASE TABLE' \
         WHERE c.table_schema = ANY($1) \
           AND c.data_type IN ('text', 'character varying', 'character', 'bytea', 'json', 'jsonb', 'ARRAY')",
    )
    .bind(schemas)
    .fetch_all(db)
    .await
    .expect("columns")
}

/// `schema.table.column ∋ needle` for every column holding one of `needles`.
async fn database_hits(db: &sqlx::PgPool, schemas: &[String], needles: &[String]) -> Vec<String> {
    let mut hits = Vec::new();
    let cols = columns(db, schemas).await;
    assert!(cols.len() > 50, "the sweep sees the services' tables: {}", cols.len());
    for (schema, table, column, kind) in cols {
        let value =
            if kind == "bytea" { format!("\"{column}\"") } else { format!("convert_to(\"{column}\"::text, 'UTF8')") };
        // Names come from information_schema of the test's own schemas.
        let sql = format!(
            "SELECT count(*) FROM \"{schema}\".\"{table}\" WHERE position(convert_to($1, 'UTF8') IN {value}) > 0"
        );
        for needle in needles {
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
                .bind(needle)
                .fetch_one(db)
                .await
                .unwrap_or_else(|e| panic!("{schema}.{table}.{column}: {e}"));
            if n > 0 {
                hits.push(format!("{schema}.{table}.{column} ∋ {needle:?} ({n} rows)"));
            }
        }
    }
    hits
}

fn flatten(v: redis::Value, out: &mut Vec<Vec<u8>>) {
    match v {
        redis::Value::BulkString(b) => out.push(b),
        redis::Value::SimpleString(s) => out.push(s.into_bytes()),
        redis::Value::Array(items) | redis::Value::Set(items) => items.into_iter().for_each(|i| flatten(i, out)),
        redis::Value::Map(pairs) => pairs.into_iter().for_each(|(k, v)| {
            flatten(k, out);
            flatten(v, out);
        }),
        _ => {}
    }
}

/// `key ∋ needle` for every Redis key (of any type: cache entries, streams
/// and their entries) holding one of `needles`.
async fn redis_hits(needles: &[String]) -> Vec<String> {
    let client = redis::Client::open(crm_kit::testing::redis_url()).expect("redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
    let mut hits = Vec::new();
    let mut cursor = 0u64;
    let mut seen = 0usize;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) =
            redis::cmd("SCAN").arg(cursor).arg("COUNT").arg(1000).query_async(&mut conn).await.expect("scan");
        for key in keys {
            seen += 1;
            let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await.expect("type");
            let mut cmd = match kind.as_str() {
                "string" => redis::cmd("GET"),
                "hash" => redis::cmd("HGETALL"),
                "list" => redis::cmd("LRANGE"),
                "set" => redis::cmd("SMEMBERS"),
                "zset" => redis::cmd("ZRANGE"),
                "stream" => redis::cmd("XRANGE"),
                _ => continue,
            };
            cmd.arg(&key);
            match kind.as_str() {
                "list" | "zset" => {
                    cmd.arg(0).arg(-1);
                }
                "stream" => {
                    cmd.arg("-").arg("+");
                }
                _ => {}
            }
            let value: redis::Value = match cmd.query_async(&mut conn).await {
                Ok(v) => v,
                Err(_) => continue, // gone meanwhile (another test's key)
            };
            let mut parts = vec![key.clone()];
            flatten(value, &mut parts);
            for needle in needles {
                let n = needle.as_bytes();
                if parts.iter().any(|p| p.windows(n.len()).any(|w| w == n)) {
                    hits.push(format!("{} ∋ {needle:?}", String::from_utf8_lossy(&key)));
                }
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    assert!(seen > 0, "the sweep sees Redis keys");
    hits
}

fn random_letters(n: usize) -> String {
    uuid::Uuid::new_v4().simple().to_string().chars().filter(|c| c.is_ascii_alphabetic()).take(n).collect()
}

#[tokio::test]
async fn sec5_after_erasure_no_service_table_redis_key_or_event_holds_the_person() {
    let prefix = crm_kit::testing::unique_name("e2e");
    let bus = [("EVENT_STREAM_PREFIX", prefix.as_str()), ("CONSUMER_BLOCK_MS", "200")];
    let mut profiles = ServiceProcess::start("profiles", &bus).await;
    let mut segmentation = ServiceProcess::start("segmentation", &bus).await;
    let mut analytics = ServiceProcess::start("analytics", &bus).await;
    let mut env = bus.to_vec();
    env.extend([("OUTREACH_PROFILES_URL", profiles.url.as_str()), ("OUTREACH_POLL_MS", "50")]);
    let mut outreach = ServiceProcess::start("outreach", &env).await;
    let mut env = bus.to_vec();
    env.extend([
        ("FEEDBACK_PROFILES_URL", profiles.url.as_str()),
        ("FEEDBACK_OUTREACH_URL", outreach.url.as_str()),
        ("FEEDBACK_WATCH_INTERVAL_MS", "200"),
    ]);
    let mut feedback = ServiceProcess::start("feedback", &env).await;
    let db = sqlx::PgPool::connect(&crm_kit::testing::test_database_url().await).await.expect("db");
    let schemas: Vec<String> =
        [&profiles, &segmentation, &analytics, &outreach, &feedback].iter().map(|p| p.schema.clone()).collect();

    // The person: names and numbers no other test uses.
    let (given, surname) = (format!("Zorva{}", random_letters(6)), format!("Quill{}", random_letters(6)));
    let name = format!("{given} {surname}");
    let digits = |n: u128| format!("139{:08}", n % 100_000_000);
    let (phone, other_phone) = (digits(uuid::Uuid::new_v4().as_u128()), digits(uuid::Uuid::new_v4().as_u128()));
    let (email, other_email) =
        (format!("{}@example.com", given.to_lowercase()), format!("{}@example.org", surname.to_lowercase()));
    let needles = vec![
        name.clone(),
        given.clone(),
        surname.clone(),
        phone.clone(),
        other_phone.clone(),
        email.clone(),
        other_email.clone(),
    ];

    let admin = crm_kit::testing::token(&[Role::Admin, Role::Service], true);
    let mut p = ProfilesServiceClient::with_interceptor(
        crm_kit::client::channel(&profiles.url).expect("ch"),
        Bearer(admin.clone()),
    );
    let create = |phone: &str, email: &str| pb::CreateCustomerRequest {
        customer: Some(pb::Customer {
            name: name.clone(),
            phone: format!("+86{phone}"),
            email: email.into(),
            timezone: daytime_zone().into(),
            preferred_channel: Channel::Sms as i32,
            tags: vec!["vip".into()],
            address: Some(pb::Address {
                line1: format!("{surname} House"),
                city: "Shanghai".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        request_id: crm_kit::testing::unique_name("create"),
    };
    let a = p.create_customer(create(&phone, &email)).await.expect("a").into_inner().customer.expect("a").customer_id;
    let b = p.create_customer(create(&other_phone, &other_email)).await.expect("b").into_inner().customer.expect("b");
    p.merge_customers(pb::MergeCustomersRequest {
        survivor_id: a.clone(),
        loser_id: b.customer_id.clone(),
        reason: format!("{name} twice, also on {other_phone}"),
        take_from_loser: None,
        request_id: crm_kit::testing::unique_name("merge"),
    })
    .await
    .expect("merge");
    p.batch_record_transactions(pb::BatchRecordTransactionsRequest {
        transactions: vec![pb::Transaction {
            transaction_id: crm_kit::testing::unique_name("tx"),
            customer_id: a.clone(),
            kind: pb::TransactionKind::Purchase as i32,
            amount: Some(Money { amount_minor: 12_900, currency: "CNY".into() }),
            occurred_at: Some(prost_types::Timestamp { seconds: 1_760_000_000, nanos: 0 }),
            ..Default::default()
        }],
        request_id: crm_kit::testing::unique_name("txs"),
    })
    .await
    .expect("transactions");
    p.batch_record_interactions(pb::BatchRecordInteractionsRequest {
        interactions: vec![pb::Interaction {
            interaction_id: crm_kit::testing::unique_name("int"),
            customer_id: a.clone(),
            kind: pb::InteractionKind::Inquiry as i32,
            occurred_at: Some(prost_types::Timestamp { seconds: 1_760_000_100, nanos: 0 }),
            note: format!("{name} asked to be called on {phone}"),
            ..Default::default()
        }],
        request_id: crm_kit::testing::unique_name("ints"),
    })
    .await
    .expect("interactions");
    p.update_consent(pb::UpdateConsentRequest {
        customer_id: a.clone(),
        changes: vec![pb::ConsentGrant {
            channel: Channel::Sms as i32,
            purpose: Purpose::Marketing as i32,
            granted: true,
            source: "signup form".into(),
            ..Default::default()
        }],
        request_id: crm_kit::testing::unique_name("consent"),
    })
    .await
    .expect("consent");
    p.get_customer(pb::GetCustomerRequest { customer_id: a.clone(), purpose: format!("call back {phone}") })
        .await
        .expect("an audited read");

    // Feedback giving the phone and e-mail; a complaint, so a ticket and an acknowledgement by name.
    let agent = crm_kit::testing::token(&[Role::Agent], true);
    let mut f = FeedbackServiceClient::with_interceptor(
        crm_kit::client::channel(&feedback.url).expect("ch"),
        Bearer(agent.clone()),
    );
    let submitted = f
        .submit_feedback(fb::SubmitFeedbackRequest {
            feedback: Some(fb::Feedback {
                customer_id: a.clone(),
                channel: Channel::Hotline as i32,
                text: format!("我是{name}，快递丢件了，太失望了！请打{phone}或写信到{email}"),
                ..Default::default()
            }),
            request_id: crm_kit::testing::unique_name("fb"),
        })
        .await
        .expect("feedback")
        .into_inner();
    let ticket = submitted.ticket.expect("a complaint ticket");
    f.transition_ticket(fb::TransitionTicketRequest {
        ticket_id: ticket.ticket_id.clone(),
        target_state: fb::TicketState::Acknowledged as i32,
        note: format!("called {name} back on {phone}"),
        request_id: crm_kit::testing::unique_name("ack"),
        ..Default::default()
    })
    .await
    .expect("ticket note");
    f.submit_survey_response(fb::SubmitSurveyResponseRequest {
        response: Some(fb::SurveyResponse {
            customer_id: a.clone(),
            kind: fb::SurveyKind::Nps as i32,
            score: 3,
            comment: format!("{given} here, mail me at {other_email}"),
            ..Default::default()
        }),
        request_id: crm_kit::testing::unique_name("survey"),
    })
    .await
    .expect("survey");
    let mut o = OutreachServiceClient::with_interceptor(
        crm_kit::client::channel(&outreach.url).expect("ch"),
        Bearer(admin.clone()),
    );
    o.create_task(out::CreateTaskRequest {
        task: Some(out::Task {
            customer_id: a.clone(),
            kind: out::TaskKind::CallBack as i32,
            owner: "agent-7".into(),
            due_time: Some(prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() + 3600, nanos: 0 }),
            reason: format!("{name} wants a call on {phone}"),
            ..Default::default()
        }),
        request_id: crm_kit::testing::unique_name("task"),
    })
    .await
    .expect("task");
    // The acknowledgement, rendered with the name read from profiles at send time.
    let sink = format!("SELECT count(*) FROM {}.sink_deliveries WHERE body LIKE '%' || $1 || '%'", outreach.schema);
    wait_for("the acknowledgement greeting them by name", async || {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sink.clone())).bind(&name).fetch_one(&db).await.unwrap_or(0)
            > 0
    })
    .await;
    let before = database_hits(&db, &schemas, &needles).await;
    for place in
        [".customers.name", ".merges.survivor_before", ".feedback.text", ".sink_deliveries.body", ".tasks.reason"]
    {
        assert!(before.iter().any(|h| h.contains(place)), "the sweep finds the person in {place} before: {before:#?}");
    }

    // The erasure, and the five confirmations.
    let erased = p
        .erase_customer(pb::EraseCustomerRequest {
            customer_id: a.clone(),
            reason: format!("data subject request of {name}, {email}"),
            request_id: crm_kit::testing::unique_name("erase"),
        })
        .await
        .expect("erase")
        .into_inner();
    assert!(erased.status.is_some());
    let mut status = pb::ErasureStatus::default();
    wait_for("all five services to confirm the erasure", async || {
        status = p
            .get_erasure_status(pb::GetErasureStatusRequest { customer_id: a.clone() })
            .await
            .expect("status")
            .into_inner();
        status.pending.is_empty()
    })
    .await;
    let mut confirmed: Vec<&String> = status.confirmed.keys().collect();
    confirmed.sort();
    assert_eq!(confirmed, ["analytics", "feedback", "outreach", "profiles", "segmentation"]);
    // Whatever a consumer still had in flight has settled.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let left = database_hits(&db, &schemas, &needles).await;
    assert!(left.is_empty(), "personal data left in the database after the erasure: {left:#?}");
    let cached = redis_hits(&needles).await;
    assert!(cached.is_empty(), "personal data left in Redis (cache, streams) after the erasure: {cached:#?}");

    for process in [&mut feedback, &mut outreach, &mut analytics, &mut segmentation, &mut profiles] {
        process.terminate().await;
    }
}
