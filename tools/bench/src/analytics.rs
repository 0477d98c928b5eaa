//! analytics (issue 7), `make bench-analytics`:
//! - ingestion through the bus: generated events (customers, purchases)
//!   published to a private stream and consumed by the real consumer with the
//!   set-based handler, vs a bare INSERT of the same purchase rows (the floor);
//! - KPI queries through gRPC on a base of N customers (default 1 M) and
//!   their events (about 10 M: customers, purchases, campaign assignments,
//!   messages, outcomes, tickets, surveys), each against the same question
//!   answered by a full-scan SQL query over the facts, in the same run.

use std::time::{Duration, Instant};

use crm_analytics::ingest::Ingest;
use crm_kit::Role;
use crm_kit::consumer::{Event, EventHandler};
use crm_kit::outbox::{Aggregate, Staged};
use crm_proto::analytics::v1 as an;
use crm_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use crm_proto::common::v1::{Channel, EventEnvelope, Money, Tier};
use crm_proto::feedback::v1 as fb;
use crm_proto::outreach::v1 as out;
use crm_proto::profiles::v1 as pf;
use crm_proto::segmentation::v1 as sg;
use prost::Message;

use crate::Bearer;

fn ts(t: chrono::DateTime<chrono::Utc>) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds: t.timestamp(), nanos: 0 })
}

fn staged<T: prost::Name + prost::Message>(source: &str, id: &str, payload: &T) -> Staged {
    Staged::new(source, Aggregate { kind: "customer", id }, "bench", payload).expect("stage")
}

fn event(s: &Staged, source: &str) -> Event {
    Event {
        envelope: EventEnvelope::decode(s.envelope.as_slice()).expect("envelope"),
        stream: source.into(),
        stream_id: "0-0".into(),
    }
}

/// Customer and purchase events of generated customers (DX-4), in customer order.
fn base_events(generated: impl Iterator<Item = crm_datagen::Generated>) -> (Vec<Staged>, Vec<uuid::Uuid>) {
    let mut out = Vec::new();
    let mut ids = Vec::new();
    for g in generated {
        let id = uuid::Uuid::from_u128(g.index as u128 + 1);
        ids.push(id);
        let c = pf::CustomerCreated {
            customer_id: id.to_string(),
            registered_at: g.customer.registered_at,
            ..Default::default()
        };
        out.push(staged("profiles", &id.to_string(), &c));
        for mut t in g.transactions {
            t.customer_id = id.to_string();
            out.push(staged("profiles", &id.to_string(), &pf::TransactionRecorded { transaction: Some(t) }));
        }
    }
    (out, ids)
}

fn generator(customers: usize, seed: u64) -> crm_datagen::Generator {
    crm_datagen::Generator::new(crm_datagen::Config { customers, seed, ..Default::default() })
}

async fn ingestion(customers: usize) {
    let (events, _) = base_events(generator(customers, 5));
    let n = events.len();
    // Floor: the purchase rows as one bare INSERT per 1 000.
    let rows: Vec<(String, uuid::Uuid, chrono::DateTime<chrono::Utc>, i64)> = events
        .iter()
        .filter_map(|s| {
            let e = event(s, "profiles");
            e.payload::<pf::TransactionRecorded>().ok().flatten().and_then(|t| t.transaction).map(|t| {
                let at = t
                    .occurred_at
                    .map(|o| chrono::DateTime::from_timestamp(o.seconds, 0).unwrap_or_default())
                    .unwrap_or_default();
                (
                    t.transaction_id,
                    uuid::Uuid::parse_str(&t.customer_id).unwrap_or_default(),
                    at,
                    t.amount.map(|a| a.amount_minor).unwrap_or(0),
                )
            })
        })
        .collect();
    let schema = async || {
        let mut config = crm_kit::testing::config("analytics").await;
        config.database_statement_timeout = Duration::ZERO;
        let pool = crm_kit::db::pg_pool(&config).expect("pool");
        crm_kit::db::migrate(&pool, &config.database_schema, crm_analytics::SPEC.migrator).await.expect("migrate");
        pool
    };
    let reader = schema().await;
    sqlx::raw_sql("CREATE TABLE floor_purchases (LIKE purchases INCLUDING ALL)").execute(&reader).await.expect("floor");
    let started = Instant::now();
    for chunk in rows.chunks(1000) {
        sqlx::query("INSERT INTO floor_purchases (transaction_id, customer_id, occurred_at, amount_minor, refund) SELECT *, false FROM UNNEST($1::text[], $2::uuid[], $3::timestamptz[], $4::bigint[])")
            .bind(chunk.iter().map(|r| r.0.clone()).collect::<Vec<_>>())
            .bind(chunk.iter().map(|r| r.1).collect::<Vec<_>>())
            .bind(chunk.iter().map(|r| r.2).collect::<Vec<_>>())
            .bind(chunk.iter().map(|r| r.3).collect::<Vec<_>>())
            .execute(&reader)
            .await
            .expect("floor insert");
    }
    let floor = rows.len() as f64 / started.elapsed().as_secs_f64();

    // The same events into an empty schema each time: one consumer, then
    // the service's default (ANALYTICS_CONSUMERS=2: two batches at once).
    let ingest = Ingest { tz: chrono_tz::Asia::Shanghai, window: chrono::Duration::days(7) };
    let mut rates = Vec::new();
    for consumers in [1usize, 2] {
        let pool = if consumers == 1 { reader.clone() } else { schema().await };
        let stream = crate::publish_to_stream(&events).await;
        let rate = crate::consume_all(&pool, &stream, ingest.clone(), 1000, n, consumers).await;
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM purchases").fetch_one(&pool).await.expect("count");
        assert_eq!(stored as usize, rows.len(), "every purchase applied once");
        rates.push((consumers, rate));
    }
    println!(
        "### Event ingestion through the bus ({n} events of {customers} generated customers: CustomerCreated and TransactionRecorded)\n"
    );
    println!("| run | events/s | vs floor |\n|---|---|---|");
    println!(
        "| floor: bare INSERT of the {} purchase rows, 1 000 per statement | {floor:.0} (rows/s) | baseline |",
        rows.len()
    );
    for (consumers, rate) in rates {
        let who = if consumers == 1 {
            "one consumer".to_string()
        } else {
            format!("{consumers} consumers of one group (ANALYTICS_CONSUMERS default)")
        };
        println!(
            "| analytics, {who}: Redis Streams, inbox, facts, per-customer contributions, bitmaps, rollups (batches of 1 000) | {rate:.0} | {:.0} % |",
            100.0 * rate / floor
        );
    }
    println!();
}

/// Campaign and feedback events over the base: a campaign to every fifth
/// customer (10 % holdout) with messages and outcomes, tickets and surveys.
/// The segment of the before/after benchmarks (every third customer).
const BENCH_SEGMENT: uuid::Uuid = uuid::Uuid::from_u128(0x5E6_0000);

fn activity_events(ids: &[uuid::Uuid]) -> Vec<Staged> {
    let mut out = Vec::new();
    let campaign = uuid::Uuid::from_u128(0xCA11);
    let at = chrono::DateTime::from_timestamp(1_761_000_000, 0).unwrap_or_default();
    // A segment of every third customer, for the before/after tests on a segment.
    for c in ids.iter().step_by(3) {
        let change = sg::SegmentMembershipChanged {
            segment_id: BENCH_SEGMENT.to_string(),
            customer_id: c.to_string(),
            joined: true,
            change_time: ts(at),
        };
        out.push(staged("segmentation", &c.to_string(), &change));
    }
    for (i, c) in ids.iter().enumerate().filter(|(i, _)| i % 5 == 0) {
        let grp = if i % 50 == 0 {
            "holdout"
        } else if i % 2 == 0 {
            "A"
        } else {
            "B"
        };
        let cid = c.to_string();
        out.push(staged(
            "outreach",
            &cid,
            &out::CampaignAssignment {
                campaign_id: campaign.to_string(),
                customer_id: cid.clone(),
                group: grp.into(),
                tier: Tier::Gold as i32,
                assign_time: ts(at),
            },
        ));
        if grp == "holdout" {
            continue;
        }
        let m = uuid::Uuid::from_u128(0xBEEF_0000_0000 + i as u128);
        let message = out::Message {
            message_id: m.to_string(),
            customer_id: cid.clone(),
            channel: Channel::Sms as i32,
            campaign_id: campaign.to_string(),
            variant: grp.into(),
            state: out::MessageState::Sent as i32,
            cost: Some(Money { amount_minor: 20, currency: "CNY".into() }),
            send_time: ts(at),
            ..Default::default()
        };
        out.push(staged("outreach", &cid, &out::MessageSent { message: Some(message), holdout: false }));
        for kind in [out::OutcomeKind::Delivered, out::OutcomeKind::Converted] {
            if kind == out::OutcomeKind::Converted && i % 7 != 0 {
                continue;
            }
            out.push(staged(
                "outreach",
                &cid,
                &out::DeliveryOutcome {
                    message_id: m.to_string(),
                    customer_id: cid.clone(),
                    campaign_id: campaign.to_string(),
                    variant: grp.into(),
                    channel: Channel::Sms as i32,
                    outcome: kind as i32,
                    revenue: Some(Money { amount_minor: 30_000, currency: "CNY".into() }),
                    occurred_at: ts(at + chrono::Duration::hours(2)),
                    attributed: true,
                },
            ));
        }
    }
    for (i, c) in ids.iter().enumerate().filter(|(i, _)| i % 20 == 0) {
        let cid = c.to_string();
        let t = uuid::Uuid::from_u128(0x71C0_0000_0000 + i as u128);
        let day = at + chrono::Duration::days((i % 60) as i64);
        let ticket = fb::Ticket {
            ticket_id: t.to_string(),
            customer_id: cid.clone(),
            category: fb::Category::ServiceComplaint as i32,
            create_time: ts(day),
            ..Default::default()
        };
        out.push(staged("feedback", &cid, &fb::TicketOpened { ticket: Some(ticket) }));
        out.push(staged(
            "feedback",
            &cid,
            &fb::TicketResolved {
                ticket_id: t.to_string(),
                first_response_seconds: (i % 7200) as i64,
                resolution_seconds: (i % 40_000) as i64,
                resolve_time: ts(day),
                ..Default::default()
            },
        ));
        let r = fb::SurveyResponse {
            survey_response_id: uuid::Uuid::from_u128(0x5E00_0000_0000 + i as u128).to_string(),
            customer_id: cid.clone(),
            kind: fb::SurveyKind::Nps as i32,
            score: (i % 11) as i32,
            create_time: ts(day),
            ..Default::default()
        };
        out.push(staged("feedback", &cid, &fb::SurveyAnswered { response: Some(r) }));
    }
    out
}

fn p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    (at(0.5), at(0.99))
}

/// Applies `events` through the handler in transactions of 2 000, as the
/// consumer would; returns how many.
async fn apply_in_batches(pool: &sqlx::PgPool, ingest: &Ingest, events: &[Staged], stream: &str) -> usize {
    for chunk in events.chunks(2000) {
        let batch: Vec<Event> = chunk.iter().map(|s| event(s, stream)).collect();
        let mut tx = pool.begin().await.expect("tx");
        ingest.handle_batch(&mut tx, &batch).await.expect("apply");
        tx.commit().await.expect("commit");
    }
    events.len()
}

async fn kpis(customers: usize) {
    let mut config = crm_kit::testing::config("analytics").await;
    config.database_statement_timeout = Duration::ZERO;
    let kit = crm_kit::Kit::start(crm_analytics::SPEC, config).await.expect("kit");
    let pool = kit.pg.clone();
    let ingest = Ingest { tz: chrono_tz::Asia::Shanghai, window: chrono::Duration::days(7) };
    // Build the base through the real handler, in batches, without the bus.
    let started = Instant::now();
    let mut applied = 0usize;
    let mut all_ids = Vec::new();
    let mut generated = generator(customers, 7);
    loop {
        let (events, ids) = base_events(generated.by_ref().take(20_000));
        if ids.is_empty() {
            break;
        }
        all_ids.extend(ids);
        applied += apply_in_batches(&pool, &ingest, &events, "profiles").await;
    }
    applied += apply_in_batches(&pool, &ingest, &activity_events(&all_ids), "outreach").await;
    let build = started.elapsed().as_secs_f64();
    // VACUUM ANALYZE this schema's tables (as autovacuum would after a bulk load;
    // a bare VACUUM walks every schema of the database).
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname = current_schema()",
    )
    .fetch_all(&pool)
    .await
    .expect("tables");
    let vacuumed = Instant::now();
    for t in &tables {
        // Names quoted by format('%I') above.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("VACUUM (ANALYZE) {t}"))).execute(&pool).await.expect("vacuum");
    }
    let vacuum = vacuumed.elapsed().as_secs_f64();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let shutdown = kit.shutdown_handle();
    let api = crm_analytics::api::AnalyticsApi::new(pool.clone(), chrono_tz::Asia::Shanghai);
    tokio::spawn(kit.serve_on(
        listener,
        tonic::service::Routes::new(an::analytics_service_server::AnalyticsServiceServer::new(api)),
        crm_analytics::access_policy(),
    ));
    let token = crm_kit::testing::token(&[Role::Analyst], false);
    let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().expect("ascii");
    let mut c =
        AnalyticsServiceClient::with_interceptor(crm_kit::client::channel(&url).expect("channel"), Bearer(value));
    let campaign = uuid::Uuid::from_u128(0xCA11).to_string();
    let year = Some(crm_proto::common::v1::TimeRange {
        start_time: Some(prost_types::Timestamp { seconds: 1_730_000_000, nanos: 0 }),
        end_time: Some(prost_types::Timestamp { seconds: 1_766_000_000, nanos: 0 }),
    });
    println!("### KPI queries on {customers} customers and {applied} events\n");
    println!(
        "Base built through the set-based handler (without the bus) in {build:.0} s ({:.0} events/s), then VACUUM ANALYZE ({vacuum:.0} s). Each KPI asked through gRPC (n times, one at a time); the full-scan query answers the same question from the facts, in the same run.\n",
        applied as f64 / build
    );
    println!("| KPI | n | p50 ms | p99 ms | full-scan query ms | full scan / KPI p99 |\n|---|---|---|---|---|---|");
    macro_rules! measure {
        ($name:expr, $call:expr, $scan:expr) => {{
            let mut lat = Vec::new();
            let started = Instant::now();
            // 200 samples, or fewer for a slow query (at least 10, about 20 s at most).
            while lat.len() < 200 && (lat.len() < 10 || started.elapsed() < Duration::from_secs(20)) {
                let t = Instant::now();
                $call.await.expect($name);
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let lat_len = lat.len();
            let (p50, p99v) = p99(lat);
            let t = Instant::now();
            sqlx::raw_sql(sqlx::AssertSqlSafe(String::from($scan))).execute(&pool).await.expect("scan");
            let scan = t.elapsed().as_secs_f64() * 1000.0;
            println!("| {} | {} | {p50:.1} | {p99v:.1} | {scan:.0} | {:.0}x |", $name, lat_len, scan / p99v);
        }};
    }
    measure!(
        "GetRetention (cohorts, D1/D7/D30)",
        c.get_retention(an::GetRetentionRequest { cohort_range: year }),
        "SELECT f.cohort, date_trunc('month', p.occurred_at), count(DISTINCT p.customer_id) FROM purchases p \
         JOIN (SELECT customer_id, date_trunc('month', min(occurred_at)) AS cohort FROM purchases WHERE NOT refund GROUP BY 1) f USING (customer_id) \
         WHERE NOT p.refund GROUP BY 1, 2"
    );
    measure!(
        "GetChurnAndRepurchase by tier",
        c.get_churn_and_repurchase(an::GetChurnAndRepurchaseRequest {
            range: year,
            dimension: Some(an::Dimension { by: Some(an::dimension::By::Tier(true)) }),
            ..Default::default()
        }),
        "SELECT m, c.tier, count(*) FROM (SELECT DISTINCT customer_id, date_trunc('month', occurred_at) AS m FROM purchases WHERE NOT refund) a JOIN customers c USING (customer_id) GROUP BY 1, 2"
    );
    measure!(
        "GetCampaignPerformance by variant",
        c.get_campaign_performance(an::GetCampaignPerformanceRequest {
            campaign_id: campaign.clone(),
            group_by: "variant".into(),
            ..Default::default()
        }),
        "SELECT variant, count(*), count(contacted_at), count(delivered_at), count(converted_at), sum(cost_minor), sum(revenue_minor) FROM messages GROUP BY 1"
    );
    measure!(
        "GetLift (campaign vs holdout)",
        c.get_lift(an::GetLiftRequest { campaign_id: campaign.clone(), ..Default::default() }),
        "SELECT grp, count(*), count(p.customer_id) FROM campaign_members m LEFT JOIN LATERAL (SELECT customer_id FROM purchases p \
         WHERE p.customer_id = m.customer_id AND p.occurred_at > m.assigned_at AND p.occurred_at <= m.assigned_at + interval '7 days' LIMIT 1) p ON true GROUP BY 1"
    );
    measure!(
        "GetCustomerValue (LTV, tiers, grid, cohorts)",
        c.get_customer_value(an::GetCustomerValueRequest::default()),
        "SELECT count(*), sum(r), avg(r) FROM (SELECT customer_id, sum(amount_minor) AS r FROM purchases GROUP BY 1) x"
    );
    measure!(
        "GetServiceQuality (NPS, SLA, percentiles)",
        c.get_service_quality(an::GetServiceQualityRequest { range: year, ..Default::default() }),
        "SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY first_response_s), percentile_cont(0.99) WITHIN GROUP (ORDER BY resolution_s), \
         (SELECT avg(score) FROM surveys) FROM tickets"
    );
    // Before/after (ANA-7): the last quarter of the generated history (its horizon
    // is 2026-11-01) against the 90 days before it, as whole days in Shanghai.
    let day = |d: &str| {
        chrono::DateTime::parse_from_rfc3339(&format!("{d}T00:00:00+08:00")).map(|t| t.timestamp()).unwrap_or_default()
    };
    let range = |from: &str, to: &str| {
        Some(crm_proto::common::v1::TimeRange {
            start_time: Some(prost_types::Timestamp { seconds: day(from), nanos: 0 }),
            end_time: Some(prost_types::Timestamp { seconds: day(to), nanos: 0 }),
        })
    };
    let (before, after) = (range("2026-05-04", "2026-08-02"), range("2026-08-02", "2026-11-01"));
    // Full scans of the "after" half with the default horizon (2026-11-01; the
    // quarter starts 2026-08-02), in the reporting zone's days.
    const AFTER: &str = "occurred_at >= '2026-08-02 00:00+08' AND occurred_at < '2026-11-01 00:00+08'";
    let in_segment =
        format!("customer_id IN (SELECT customer_id FROM segment_members WHERE segment_id = '{BENCH_SEGMENT}')");
    let repurchase = |filter: &str| {
        format!(
            "SELECT count(*) FILTER (WHERE bought), count(*) FROM (SELECT customer_id, bool_or({AFTER}) AS bought, \
             min(occurred_at) < '2026-08-02 00:00+08' AS earlier FROM purchases WHERE NOT refund AND {filter} GROUP BY 1) x WHERE earlier"
        )
    };
    let scans = [
        ("repurchase_rate", String::new(), repurchase("true")),
        ("repurchase_rate", BENCH_SEGMENT.to_string(), repurchase(&in_segment)),
        (
            "churn_rate",
            String::new(),
            format!(
                "SELECT count(*) FILTER (WHERE NOT bought), count(*) FROM (SELECT customer_id, bool_or({AFTER}) AS bought, \
                 bool_or(occurred_at >= '2026-05-04 00:00+08' AND occurred_at < '2026-08-02 00:00+08') AS active \
                 FROM purchases WHERE NOT refund GROUP BY 1) x WHERE active"
            ),
        ),
        (
            "average_spend",
            String::new(),
            format!(
                "SELECT count(*), avg(s) FROM (SELECT customer_id, sum(amount_minor) AS s FROM purchases WHERE {AFTER} GROUP BY 1) x"
            ),
        ),
        (
            "average_spend",
            BENCH_SEGMENT.to_string(),
            format!(
                "SELECT count(*), avg(s) FROM (SELECT customer_id, sum(amount_minor) AS s FROM purchases WHERE {AFTER} AND {in_segment} GROUP BY 1) x"
            ),
        ),
    ];
    for (kpi, segment_id, scan) in scans {
        let req = an::CompareKpiRequest {
            kpi: kpi.into(),
            before,
            after,
            segment_id: segment_id.clone(),
            ..Default::default()
        };
        let of = if segment_id.is_empty() { "all customers" } else { "a segment of a third" };
        measure!(&format!("CompareKpi {kpi}, {of} (quarter vs quarter)"), c.compare_kpi(req.clone()), &scan);
    }
    println!();
    shutdown.trigger();
}

/// Runs both analytics benchmarks.
pub async fn run(ingest_customers: usize, kpi_customers: usize) {
    println!("## analytics (issue 7)\n");
    if ingest_customers > 0 {
        ingestion(ingest_customers).await;
    }
    kpis(kpi_customers).await;
}
