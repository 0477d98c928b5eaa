//! Outreach (issue 5): a campaign to N customers through the sink adapter with
//! every policy check on, two outreach replicas sharing the work, against a
//! bare INSERT of the same number of delivery-log rows (the floor). Afterwards
//! a checker written here, in SQL over the delivery log and the seeded facts,
//! counts policy violations; it shares no code with the dispatcher.

use std::time::{Duration, Instant};

use crm_kit::Role;
use crm_proto::outreach::v1 as pb;
use crm_proto::outreach::v1::outreach_service_client::OutreachServiceClient;

/// Zones whose local time is outside 21:00-08:00 now ("awake") and inside ("asleep").
fn zones() -> (Vec<&'static str>, Vec<&'static str>) {
    use chrono::Timelike;
    let candidates = [
        "Asia/Shanghai",
        "Asia/Tokyo",
        "Asia/Singapore",
        "Australia/Sydney",
        "Europe/London",
        "Europe/Berlin",
        "America/New_York",
        "America/Los_Angeles",
        "Pacific/Honolulu",
        "Asia/Kolkata",
        "America/Sao_Paulo",
        "Asia/Dubai",
    ];
    let now = chrono::Utc::now();
    let (mut awake, mut asleep) = (Vec::new(), Vec::new());
    for z in candidates {
        let tz: chrono_tz::Tz = z.parse().expect("zone");
        // A margin of an hour, so no zone crosses 08:00 or 21:00 during the run.
        let h = now.with_timezone(&tz).hour();
        if (9..20).contains(&h) {
            awake.push(z);
        } else if !(7..=21).contains(&h) {
            asleep.push(z);
        }
    }
    (awake, asleep)
}

async fn replica(config: crm_kit::config::KitConfig) -> (crm_kit::Kit, crm_outreach::Parts) {
    let mut kit = crm_kit::Kit::start(crm_outreach::SPEC, config).await.expect("kit");
    let env = crm_kit::config::Env::process();
    let oc = crm_outreach::OutreachConfig::load(&env).expect("OUTREACH_* configuration");
    let parts = crm_outreach::build(&kit, &oc);
    crm_outreach::spawn_workers(&mut kit, &oc, &parts);
    (kit, parts)
}

async fn count(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

/// Runs the benchmark and prints its Markdown section.
pub async fn campaign(customers: usize) {
    let mut config = crm_kit::testing::config("outreach").await;
    config.database_statement_timeout = Duration::ZERO;
    config.database_max_connections = 8;
    let (awake, asleep) = zones();
    assert!(!awake.is_empty(), "no candidate zone is in daytime now");

    // Replica A serves the API; both run the dispatcher, the deliverer and the clocks.
    let (kit_a, parts_a) = replica(config.clone()).await;
    let pool = kit_a.pg.clone();
    crm_outreach::templates::seed(&pool).await.expect("seed");
    let stop_a = kit_a.shutdown_handle();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let routes = tonic::service::Routes::new(pb::outreach_service_server::OutreachServiceServer::new(parts_a.api));
    tokio::spawn(kit_a.serve_on(listener, routes, crm_outreach::access_policy()));
    let (kit_b, _parts_b) = replica(config.clone()).await;
    let stop_b = kit_b.shutdown_handle();

    // The read model: 90 % in zones where it is day, 10 % where it is night;
    // 8 % without consent, 2 % opted out, 1 % with an open complaint, 5 % with
    // two contacts already today, 3 % in backoff after three unanswered contacts.
    let started = Instant::now();
    let mut zone_list: Vec<&str> = Vec::new();
    for i in 0..100 {
        zone_list.push(if i < 90 || asleep.is_empty() { awake[i % awake.len()] } else { asleep[i % asleep.len()] });
    }
    let segment = uuid::Uuid::now_v7();
    sqlx::raw_sql("CREATE TABLE bench_prior (customer_id UUID, at TIMESTAMPTZ)").execute(&pool).await.expect("prior");
    sqlx::query(
        "INSERT INTO customers (customer_id, timezone, tier, spend_minor, open_complaints, unanswered_streak) \
         SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, ($2::text[])[1 + i % 100], 1 + i % 3, (i % 5000) * 100, \
                CASE WHEN i % 100 = 7 THEN 1 ELSE 0 END, CASE WHEN i % 100 IN (20, 21, 22) THEN 3 ELSE 0 END \
         FROM generate_series(1, $1) AS i",
    )
    .bind(customers as i64)
    .bind(&zone_list)
    .execute(&pool)
    .await
    .expect("customers");
    // Customer n (the hex tail of its id) falls in these groups by n % 100.
    sqlx::raw_sql(
        "INSERT INTO consents (customer_id, channel, purpose, granted) \
         SELECT customer_id, 1, 2, n % 100 NOT IN (50, 51) FROM (SELECT customer_id, ('x' || right(customer_id::text, 12))::bit(48)::bigint AS n FROM customers) c \
         WHERE n % 100 NOT BETWEEN 60 AND 67; \
         INSERT INTO bench_prior SELECT customer_id, now() - interval '90 seconds' FROM (SELECT customer_id, ('x' || right(customer_id::text, 12))::bit(48)::bigint AS n FROM customers) c WHERE n % 100 BETWEEN 10 AND 14; \
         INSERT INTO bench_prior SELECT customer_id, now() - interval '60 seconds' FROM (SELECT customer_id, ('x' || right(customer_id::text, 12))::bit(48)::bigint AS n FROM customers) c WHERE n % 100 BETWEEN 10 AND 14; \
         INSERT INTO bench_prior SELECT customer_id, now() - interval '1 day' FROM (SELECT customer_id, ('x' || right(customer_id::text, 12))::bit(48)::bigint AS n FROM customers) c WHERE n % 100 IN (20, 21, 22); \
         INSERT INTO contacts (customer_id, at, channel, message_id) SELECT customer_id, at, 1, gen_random_uuid() FROM bench_prior;",
    )
    .execute(&pool)
    .await
    .expect("consents and prior contacts");
    sqlx::query("INSERT INTO segment_members (segment_id, customer_id) SELECT $1, customer_id FROM customers")
        .bind(segment)
        .execute(&pool)
        .await
        .expect("segment");
    sqlx::raw_sql("ANALYZE").execute(&pool).await.expect("analyze");
    let loaded = started.elapsed().as_secs_f64();

    // The floor: a bare INSERT of N delivery-log rows.
    sqlx::raw_sql("CREATE TABLE bench_floor (LIKE sink_deliveries INCLUDING ALL)").execute(&pool).await.expect("floor");
    let t = Instant::now();
    sqlx::query(
        "INSERT INTO bench_floor (idempotency_key, customer_id, channel, campaign_id, subject, body) \
         SELECT gen_random_uuid(), customer_id, 1, $1, '', '尊敬的客户，好久不见！金卡会员专享15%优惠，积分 123 可抵 1.23 CNY。' FROM customers",
    )
    .bind(segment)
    .execute(&pool)
    .await
    .expect("floor insert");
    let floor = t.elapsed().as_secs_f64();

    let bearer = format!("Bearer {}", crm_kit::testing::token(&[Role::Admin], false));
    let channel = crm_kit::client::channel(&url).expect("channel");
    let mut client = OutreachServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", bearer.parse().expect("ascii"));
        Ok(req)
    });
    let template = client
        .create_template(pb::CreateTemplateRequest {
            template: Some(pb::Template {
                display_name: "bench".into(),
                channel: crm_proto::common::v1::Channel::Sms as i32,
                content_type: pb::ContentType::ExclusiveOffer as i32,
                purpose: crm_proto::common::v1::Purpose::Marketing as i32,
                bodies: vec![pb::TemplateBody {
                    locale: "zh-CN".into(),
                    subject: String::new(),
                    body:
                        "{{name}}，好久不见！{{tier}}会员专享{{discount}}优惠，积分 {{points}} 可抵 {{coupon_value}}。"
                            .into(),
                }],
                ..Default::default()
            }),
            request_id: "bench-template".into(),
        })
        .await
        .expect("template")
        .into_inner();
    let plan = pb::TierChannelPlan {
        tier: 0,
        channels: vec![crm_proto::common::v1::Channel::Sms as i32],
        template_ids: [("CHANNEL_SMS".to_string(), template.template_id.clone())].into_iter().collect(),
    };
    let campaign = client
        .create_campaign(pb::CreateCampaignRequest {
            campaign: Some(pb::Campaign {
                display_name: "bench win-back".into(),
                segment_ids: vec![segment.to_string()],
                variants: vec![
                    pb::Variant { name: "A".into(), traffic_percent: 50, channel_plan: vec![plan.clone()] },
                    pb::Variant { name: "B".into(), traffic_percent: 50, channel_plan: vec![plan] },
                ],
                holdout_percent: 10,
                ..Default::default()
            }),
            request_id: "bench-campaign".into(),
        })
        .await
        .expect("campaign")
        .into_inner();
    let t0 = Instant::now();
    client
        .transition_campaign(pb::TransitionCampaignRequest {
            campaign_id: campaign.campaign_id.clone(),
            target_state: pb::CampaignState::Running as i32,
            request_id: "bench-run".into(),
        })
        .await
        .expect("run");
    let mut launch = None;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if launch.is_none() && count(&pool, "SELECT count(*) FROM campaigns WHERE launched_at IS NOT NULL").await > 0 {
            launch = Some(t0.elapsed().as_secs_f64());
        }
        if launch.is_some()
            && count(&pool, "SELECT count(*) FROM messages WHERE (state = 1 AND due_at <= now()) OR state = 2").await
                == 0
        {
            break;
        }
    }
    let total = t0.elapsed().as_secs_f64();
    let launch = launch.unwrap_or(0.0);
    stop_a.trigger();
    stop_b.trigger();

    let messages = count(&pool, "SELECT count(*) FROM messages").await;
    let delivered = count(&pool, "SELECT count(*) FROM sink_deliveries").await;
    let by_rule: Vec<(String, i64)> =
        sqlx::query_as("SELECT rule, count(*) FROM messages GROUP BY rule ORDER BY count(*) DESC")
            .fetch_all(&pool)
            .await
            .expect("rules");

    // The checker: reads the delivery log and the seeded facts only.
    let checks: [(&str, &str); 7] = [
        (
            "more than 2 contacts on a local day (deliveries plus earlier contacts)",
            "SELECT count(*) FROM (SELECT t.customer_id, (t.at AT TIME ZONE c.timezone)::date AS day, count(*) AS n \
               FROM (SELECT customer_id, received_at AS at FROM sink_deliveries UNION ALL SELECT customer_id, at FROM bench_prior) t \
               JOIN customers c USING (customer_id) GROUP BY 1, 2) x WHERE n > 2",
        ),
        (
            "delivered in the customer's quiet hours (21:00-08:00 local)",
            "SELECT count(*) FROM sink_deliveries d JOIN customers c USING (customer_id) \
             WHERE (d.received_at AT TIME ZONE c.timezone)::time >= '21:00' OR (d.received_at AT TIME ZONE c.timezone)::time < '08:00'",
        ),
        (
            "delivered without marketing consent on SMS, or after an opt-out",
            "SELECT count(*) FROM sink_deliveries d WHERE NOT EXISTS \
             (SELECT 1 FROM consents k WHERE k.customer_id = d.customer_id AND k.channel = 1 AND k.purpose = 2 AND k.granted)",
        ),
        (
            "delivered to the holdout",
            "SELECT count(*) FROM sink_deliveries d JOIN campaign_assignments a ON a.customer_id = d.customer_id \
             WHERE a.grp IN ('holdout', 'global_control')",
        ),
        (
            "contacted twice by the campaign",
            "SELECT count(*) FROM (SELECT customer_id FROM sink_deliveries GROUP BY campaign_id, customer_id HAVING count(*) > 1) x",
        ),
        (
            "marketing while a complaint is open",
            "SELECT count(*) FROM sink_deliveries d JOIN customers c USING (customer_id) WHERE c.open_complaints > 0",
        ),
        (
            "contacted during backoff (3 unanswered, last contact < 7 days ago)",
            "SELECT count(*) FROM sink_deliveries d JOIN bench_prior p USING (customer_id) \
             WHERE p.at < now() - interval '12 hours' AND p.at > d.received_at - interval '7 days'",
        ),
    ];
    let mut violations = Vec::new();
    for (what, sql) in checks {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&pool).await.expect(what);
        violations.push((what, n));
    }
    let split: Vec<(String, i64)> =
        sqlx::query_as("SELECT grp, count(*) FROM campaign_assignments GROUP BY grp ORDER BY grp")
            .fetch_all(&pool)
            .await
            .expect("split");

    println!(
        "# outreach campaign ({customers} customers, 2 replicas in one process, {} cores; read model loaded in {loaded:.0} s)\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("Zones in daytime now: {}; at night: {}.\n", awake.join(", "), asleep.join(", "));
    println!("| run | seconds | messages/s | vs floor |");
    println!("|---|---|---|---|");
    println!(
        "| bare INSERT of {customers} delivery-log rows (floor) | {floor:.1} | {:.0} | baseline |",
        customers as f64 / floor
    );
    println!(
        "| campaign: launch, policy decision for every message, sink delivery, events (launch alone {launch:.1} s) | {total:.1} | {:.0} | {:.1}x the floor's time |",
        messages as f64 / total,
        total / floor
    );
    println!("\n{messages} messages, {delivered} delivered through the sink. Decisions by rule:\n");
    println!("| rule | messages |");
    println!("|---|---|");
    for (rule, n) in &by_rule {
        println!("| {} | {n} |", if rule.is_empty() { "(undecided: deferred past the run)" } else { rule });
    }
    println!("\nAssignment (holdout 10 %, variants 50/50 of the rest):\n");
    println!("| group | customers | share |");
    println!("|---|---|---|");
    for (g, n) in &split {
        println!("| {g} | {n} | {:.2} % |", 100.0 * *n as f64 / customers as f64);
    }
    println!("\nChecker over the delivery log (violations, must all be 0):\n");
    println!("| rule | violations |");
    println!("|---|---|");
    for (what, n) in &violations {
        println!("| {what} | {n} |");
    }
    let total_violations: i64 = violations.iter().map(|v| v.1).sum();
    if total_violations > 0 {
        println!("\n**{total_violations} policy violations.**");
        std::process::exit(1);
    }
}
