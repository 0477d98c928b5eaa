//! OUT-4 lifecycle triggers against real PostgreSQL: each fires on the
//! customer's local day, once per occurrence however often the sweep runs.

use chrono::{Datelike, Duration, TimeZone, Utc};
use crm_kit::consumer::{Event, EventHandler};
use crm_outreach::triggers;
use crm_proto::common::v1::Tier;
use uuid::Uuid;

async fn start() -> (crm_kit::Kit, sqlx::PgPool) {
    let config = crm_kit::testing::config("outreach").await;
    let kit = crm_kit::Kit::start(crm_outreach::SPEC, config).await.expect("kit");
    crm_outreach::templates::seed(&kit.pg).await.expect("seed");
    let pool = kit.pg.clone();
    (kit, pool)
}

async fn customer(pool: &sqlx::PgPool, set: &str) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO customers (customer_id, timezone) VALUES ($1, 'Asia/Shanghai')")
        .bind(id)
        .execute(pool)
        .await
        .expect("customer");
    if !set.is_empty() {
        let sql = format!("UPDATE customers SET {set} WHERE customer_id = $1");
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).execute(pool).await.expect("set");
    }
    id
}

async fn fired(pool: &sqlx::PgPool, id: Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT trigger_name FROM messages WHERE customer_id = $1 ORDER BY trigger_name")
        .bind(id)
        .fetch_all(pool)
        .await
        .expect("messages")
}

#[tokio::test]
async fn date_triggers_fire_on_the_customers_local_day_once() {
    let (kit, pool) = start().await;
    // 2026-11-22 17:00 UTC is already the 23rd in Shanghai (01:00).
    let now = Utc.with_ymd_and_hms(2026, 11, 22, 17, 0, 0).unwrap();
    let shanghai_today = now.with_timezone(&chrono_tz::Asia::Shanghai).date_naive();
    assert_eq!(shanghai_today.day(), 23);
    let birthday = customer(&pool, "birth_month = 11, birth_day = 23").await;
    let utc_birthday = customer(&pool, "birth_month = 11, birth_day = 22, timezone = 'UTC'").await;
    let not_yet = customer(&pool, "birth_month = 11, birth_day = 24").await;
    let anniversary = customer(&pool, "registered_at = '2024-11-23 10:00+08'").await;
    let joined_this_year = customer(&pool, "registered_at = '2026-01-05 10:00+08'").await;
    let after_30 =
        customer(&pool, "last_purchase_at = '2026-10-24 12:00+08', first_purchase_at = '2025-01-01 12:00+08'").await;
    let after_90 =
        customer(&pool, "last_purchase_at = '2026-08-25 12:00+08', first_purchase_at = '2025-01-01 12:00+08'").await;
    let new_buyer =
        customer(&pool, "last_purchase_at = '2026-11-22 20:00+08', first_purchase_at = '2026-11-22 20:00+08'").await;
    let bad_zone = customer(&pool, "birth_month = 11, birth_day = 23, timezone = 'Mars/Olympus'").await;
    let erased = customer(&pool, "birth_month = 11, birth_day = 23, erased_at = now()").await;

    let mut tx = pool.begin().await.expect("tx");
    let queued = triggers::sweep(&mut tx, chrono_tz::Asia::Shanghai, now).await.expect("sweep");
    tx.commit().await.expect("commit");
    assert_eq!(queued, 7);
    assert_eq!(fired(&pool, birthday).await, ["birthday"]);
    assert_eq!(fired(&pool, utc_birthday).await, ["birthday"], "still the 22nd in UTC");
    assert!(fired(&pool, not_yet).await.is_empty());
    assert_eq!(fired(&pool, anniversary).await, ["anniversary"]);
    assert!(fired(&pool, joined_this_year).await.is_empty());
    assert_eq!(fired(&pool, after_30).await, ["purchase_30d"]);
    assert_eq!(fired(&pool, after_90).await, ["purchase_90d"]);
    assert_eq!(fired(&pool, new_buyer).await, ["welcome"]);
    assert_eq!(fired(&pool, bad_zone).await, ["birthday"], "an unknown zone falls back to the default");
    assert!(fired(&pool, erased).await.is_empty());

    // A birthday greeting expires at the end of the customer's local day.
    let expires: chrono::DateTime<Utc> = sqlx::query_scalar("SELECT expires_at FROM messages WHERE customer_id = $1")
        .bind(birthday)
        .fetch_one(&pool)
        .await
        .expect("expiry");
    assert_eq!(expires, Utc.with_ymd_and_hms(2026, 11, 23, 16, 0, 0).unwrap());

    // Running the sweep again (another replica, an hour later) fires nothing new.
    let mut tx = pool.begin().await.expect("tx");
    let again = triggers::sweep(&mut tx, chrono_tz::Asia::Shanghai, now + Duration::hours(1)).await.expect("sweep");
    tx.commit().await.expect("commit");
    assert_eq!(again, 0);
    kit.shutdown_handle().trigger();
}

fn tier_changed(customer: Uuid, from: Tier, to: Tier, event_id: Uuid) -> Event {
    let payload = crm_proto::segmentation::v1::TierChanged {
        customer_id: customer.to_string(),
        r#move: Some(crm_proto::segmentation::v1::TierMove {
            from_tier: from as i32,
            to_tier: to as i32,
            reason: "test".into(),
            move_time: None,
        }),
    };
    let envelope = crm_proto::common::v1::EventEnvelope {
        event_id: event_id.to_string(),
        event_type: <crm_proto::segmentation::v1::TierChanged as prost::Name>::full_name(),
        payload: Some(prost_types::Any::from_msg(&payload).expect("pack")),
        ..Default::default()
    };
    Event { envelope, stream: "crm.segmentation.events".into(), stream_id: "1-0".into() }
}

#[tokio::test]
async fn tier_moves_send_a_notice_or_a_win_back_but_the_first_scoring_is_silent() {
    let (kit, pool) = start().await;
    let first = customer(&pool, "").await;
    let upgraded = customer(&pool, "").await;
    let dormant = customer(&pool, "").await;
    let cases = [
        (first, Tier::Unspecified, Tier::Gold),
        (upgraded, Tier::Gold, Tier::Diamond),
        (dormant, Tier::Silver, Tier::Dormant),
    ];
    for (id, from, to) in cases {
        let event = tier_changed(id, from, to, Uuid::now_v7());
        for _ in 0..2 {
            // Applied twice (a redelivery that bypassed the inbox): still one message.
            let mut tx = pool.begin().await.expect("tx");
            crm_outreach::read_model::ReadModel.handle(&mut tx, &event).await.expect("apply");
            tx.commit().await.expect("commit");
        }
    }
    assert!(fired(&pool, first).await.is_empty());
    assert_eq!(fired(&pool, upgraded).await, ["tier_change"]);
    assert_eq!(fired(&pool, dormant).await, ["win_back"]);
    let tier: i16 = sqlx::query_scalar("SELECT tier FROM customers WHERE customer_id = $1")
        .bind(upgraded)
        .fetch_one(&pool)
        .await
        .expect("tier");
    assert_eq!(tier, Tier::Diamond as i16);
    kit.shutdown_handle().trigger();
}

#[tokio::test]
async fn six_silent_months_create_one_personal_call_back() {
    let (kit, pool) = start().await;
    let now = Utc::now();
    let silent = customer(&pool, "last_activity_at = now() - interval '200 days'").await;
    let active = customer(&pool, "last_activity_at = now() - interval '20 days'").await;
    for _ in 0..2 {
        let mut tx = pool.begin().await.expect("tx");
        triggers::silent_callbacks(&mut tx, now).await.expect("sweep");
        tx.commit().await.expect("commit");
    }
    let tasks: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT customer_id, reason FROM tasks").fetch_all(&pool).await.expect("tasks");
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0].0, silent);
    assert!(tasks[0].1.starts_with("6 months silent"), "{}", tasks[0].1);
    assert!(tasks.iter().all(|t| t.0 != active));
    kit.shutdown_handle().trigger();
}

fn feedback_event<T: prost::Name>(payload: &T, at: chrono::DateTime<Utc>) -> Event {
    let envelope = crm_proto::common::v1::EventEnvelope {
        event_id: Uuid::now_v7().to_string(),
        event_type: T::full_name(),
        source: "feedback".into(),
        occurred_at: Some(prost_types::Timestamp { seconds: at.timestamp(), nanos: 0 }),
        payload: Some(prost_types::Any::from_msg(payload).expect("pack")),
        ..Default::default()
    };
    Event { envelope, stream: "crm.feedback.events".into(), stream_id: "1-0".into() }
}

#[tokio::test]
async fn open_complaint_tickets_from_feedback_count_in_any_order() {
    use crm_proto::feedback::v1 as fb;
    let (kit, pool) = start().await;
    let c = customer(&pool, "").await;
    let t0 = Utc::now() - Duration::minutes(10);
    let opened = |ticket: &str, category: fb::Category| fb::TicketOpened {
        ticket: Some(fb::Ticket {
            ticket_id: ticket.into(),
            customer_id: c.to_string(),
            category: category as i32,
            ..Default::default()
        }),
    };
    let resolved = |ticket: &str| fb::TicketResolved {
        ticket_id: ticket.into(),
        customer_id: c.to_string(),
        category: fb::Category::ServiceComplaint as i32,
        ..Default::default()
    };
    let apply = |event: Event| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.expect("tx");
            crm_outreach::read_model::ReadModel.handle(&mut tx, &event).await.expect("apply");
            tx.commit().await.expect("commit");
            sqlx::query_scalar::<_, i32>("SELECT open_complaints FROM customers WHERE customer_id = $1")
                .bind(c)
                .fetch_one(&pool)
                .await
                .expect("count")
        }
    };
    assert_eq!(apply(feedback_event(&opened("T1", fb::Category::ServiceComplaint), t0)).await, 1);
    assert_eq!(
        apply(feedback_event(&opened("T2", fb::Category::FunctionInquiry), t0)).await,
        1,
        "only complaints count"
    );
    assert_eq!(apply(feedback_event(&resolved("T1"), t0 + Duration::minutes(1))).await, 0);
    // Not confirmed by the customer: reopened.
    let verified =
        fb::TicketVerified { ticket_id: "T1".into(), customer_id: c.to_string(), confirmed: false, verify_time: None };
    assert_eq!(apply(feedback_event(&verified, t0 + Duration::minutes(2))).await, 1);
    // A replica applying an older event late changes nothing.
    assert_eq!(apply(feedback_event(&resolved("T1"), t0 + Duration::seconds(30))).await, 1);
    assert_eq!(apply(feedback_event(&resolved("T1"), t0 + Duration::minutes(3))).await, 0);
    kit.shutdown_handle().trigger();
}
