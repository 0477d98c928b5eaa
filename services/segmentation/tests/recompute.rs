//! SEG-7: the set-based recompute over a generated base (DX-4), against real PostgreSQL.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use crm_datagen::{Archetype, Config, Generator};
use crm_kit::testing;
use crm_proto::common::v1::{LifecycleStage, Tier};
use crm_proto::segmentation::v1 as pb;
use crm_segmentation::domain::Thresholds;
use crm_segmentation::{recompute, segments};
use prost::Message;
use sqlx::PgPool;
use uuid::Uuid;

fn time(t: &Option<prost_types::Timestamp>) -> DateTime<Utc> {
    t.as_ref().and_then(|t| DateTime::from_timestamp(t.seconds, 0)).expect("time")
}

/// Loads a generated base straight into the read model (its input).
async fn load(pool: &PgPool, customers: usize) -> (HashMap<Uuid, Archetype>, DateTime<Utc>) {
    let config = Config { customers, seed: 9, ..Default::default() };
    let horizon = config.horizon;
    let mut archetypes = HashMap::new();
    let (mut ids, mut regs) = (vec![], vec![]);
    let (mut t_ids, mut t_owner, mut t_kind, mut t_amount, mut t_at) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut i_ids, mut i_owner, mut i_kind, mut i_at) = (vec![], vec![], vec![], vec![]);
    for g in Generator::new(config) {
        let id = Uuid::from_u128(g.index as u128 + 1);
        archetypes.insert(id, g.archetype);
        ids.push(id);
        regs.push(time(&g.customer.registered_at));
        for t in &g.transactions {
            t_ids.push(t.transaction_id.clone());
            t_owner.push(id);
            t_kind.push(t.kind as i16);
            t_amount.push(t.amount.as_ref().map(|m| m.amount_minor).unwrap_or(0));
            t_at.push(time(&t.occurred_at));
        }
        for x in &g.interactions {
            i_ids.push(x.interaction_id.clone());
            i_owner.push(id);
            i_kind.push(x.kind as i16);
            i_at.push(time(&x.occurred_at));
        }
    }
    sqlx::query(
        "INSERT INTO customers (customer_id, registered_at) SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[])",
    )
    .bind(&ids)
    .bind(&regs)
    .execute(pool)
    .await
    .expect("customers");
    sqlx::query(
        "INSERT INTO transactions (transaction_id, customer_id, kind, amount_minor, currency, occurred_at) \
         SELECT i, c, k, a, 'CNY', t FROM UNNEST($1::text[], $2::uuid[], $3::int2[], $4::int8[], $5::timestamptz[]) AS x(i, c, k, a, t)",
    )
    .bind(&t_ids)
    .bind(&t_owner)
    .bind(&t_kind)
    .bind(&t_amount)
    .bind(&t_at)
    .execute(pool)
    .await
    .expect("transactions");
    sqlx::query(
        "INSERT INTO interactions (interaction_id, customer_id, kind, channel, direction, occurred_at) \
         SELECT i, c, k, 0, 1, t FROM UNNEST($1::text[], $2::uuid[], $3::int2[], $4::timestamptz[]) AS x(i, c, k, t)",
    )
    .bind(&i_ids)
    .bind(&i_owner)
    .bind(&i_kind)
    .bind(&i_at)
    .execute(pool)
    .await
    .expect("interactions");
    crm_segmentation::read_model::rebuild_all(pool).await.expect("facts");
    (archetypes, horizon)
}

#[tokio::test]
async fn a_recompute_scores_every_customer_plausibly_and_a_second_run_changes_nothing() {
    let config = testing::config("segmentation").await;
    let pool = crm_kit::db::pg_pool(&config).expect("pool");
    crm_kit::db::migrate(&pool, &config.database_schema, crm_segmentation::SPEC.migrator).await.expect("migrate");
    let (archetypes, now) = load(&pool, 5000).await;
    let thresholds = Thresholds::default();

    let first = recompute::run(&pool, &thresholds, now).await.expect("recompute");
    assert_eq!(first.customers, 5000);
    assert_eq!(first.tier_moves, 5000, "the first assessment assigns everyone a tier");

    let rows: Vec<(Uuid, i16, i16, i16, Vec<u8>)> =
        sqlx::query_as("SELECT customer_id, tier, lifecycle_stage, churn_level, churn_risk FROM customer_scores")
            .fetch_all(&pool)
            .await
            .expect("scores");
    let mut tiers: HashMap<i16, usize> = HashMap::new();
    for (id, tier, stage, _level, risk) in &rows {
        *tiers.entry(*tier).or_default() += 1;
        let archetype = archetypes[id];
        let stage = LifecycleStage::try_from(*stage as i32).expect("stage");
        match archetype {
            Archetype::Silent => {
                assert_eq!(stage, LifecycleStage::Prospect, "{id}");
                assert_eq!(*tier, Tier::Dormant as i16, "never active is dormant: {id}");
            }
            Archetype::Churning => {
                assert!(
                    matches!(stage, LifecycleStage::Sleeping | LifecycleStage::Churned),
                    "churner {id} is {stage:?}"
                );
                let risk = pb::ChurnRisk::decode(risk.as_slice()).expect("risk");
                assert!(risk.reasons.iter().all(|r| !r.explanation.is_empty()));
            }
            Archetype::New => {
                assert!(matches!(stage, LifecycleStage::New | LifecycleStage::Active), "new {id} is {stage:?}")
            }
            _ => {}
        }
    }
    let count = |t: Tier| tiers.get(&(t as i16)).copied().unwrap_or(0);
    let buyers = archetypes.values().filter(|a| **a != Archetype::Silent).count();
    assert!(count(Tier::Diamond) >= buyers * 4 / 100, "about the top 5 % are diamonds: {tiers:?}");
    assert!(count(Tier::Gold) > count(Tier::Diamond), "{tiers:?}");
    assert!(count(Tier::Dormant) >= archetypes.values().filter(|a| **a == Archetype::Silent).count());

    let moves: i64 = sqlx::query_scalar("SELECT count(*) FROM tier_moves").fetch_one(&pool).await.expect("moves");
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM kit_outbox WHERE event_type = 'crm.segmentation.v1.TierChanged'")
            .fetch_one(&pool)
            .await
            .expect("events");
    assert_eq!((moves, events), (5000, 5000), "every move recorded and emitted");

    let second = recompute::run(&pool, &thresholds, now).await.expect("again");
    assert_eq!((second.customers, second.tier_moves, second.churn_changes), (5000, 0, 0), "nothing new, nothing moves");
}

fn cond(field: &str, op: pb::Operator, values: &[&str]) -> pb::RuleNode {
    pb::RuleNode {
        node: Some(pb::rule_node::Node::Condition(pb::Condition {
            field: field.into(),
            op: op as i32,
            values: values.iter().map(|v| v.to_string()).collect(),
        })),
    }
}

#[tokio::test]
async fn seg6_compiled_rules_of_every_kind_run_and_select_the_right_customers() {
    use crm_segmentation::domain::rules;
    let config = testing::config("segmentation").await;
    let pool = crm_kit::db::pg_pool(&config).expect("pool");
    crm_kit::db::migrate(&pool, &config.database_schema, crm_segmentation::SPEC.migrator).await.expect("migrate");
    let (_, now) = load(&pool, 2000).await;
    // Attributes the rules can use.
    sqlx::query(
        "UPDATE customers SET region = CASE WHEN (hashtext(customer_id::text) % 2) = 0 THEN 'CN-SH' ELSE 'CN-BJ' END, \
         tags = CASE WHEN (hashtext(customer_id::text) % 3) = 0 THEN ARRAY['vip', 'newsletter'] ELSE ARRAY['newsletter'] END, \
         attributes = jsonb_build_object('points', (abs(hashtext(customer_id::text)) % 1000))",
    )
    .execute(&pool)
    .await
    .expect("attributes");
    recompute::run(&pool, &Thresholds::default(), now).await.expect("recompute");
    let mut conn = pool.acquire().await.expect("conn");
    let direct = |sql: &str| {
        let pool = pool.clone();
        let sql = sql.to_string();
        async move { sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql)).fetch_one(&pool).await.expect("direct") }
    };
    use pb::Operator::*;
    let cases: Vec<(pb::RuleNode, String)> = vec![
        (
            cond("tier", In, &["TIER_GOLD", "TIER_DIAMOND"]),
            format!(
                "SELECT count(*) FROM customer_scores WHERE tier IN ({}, {})",
                Tier::Gold as i32,
                Tier::Diamond as i32
            ),
        ),
        (
            cond("days_since_last_purchase", Gt, &["90"]),
            "SELECT count(*) FROM customer_scores WHERE recency_days > 90".into(),
        ),
        (cond("rfm.monetary_score", Ge, &["4"]), "SELECT count(*) FROM customer_scores WHERE m_score >= 4".into()),
        (
            cond("lifecycle_stage", Eq, &["LIFECYCLE_STAGE_CHURNED"]),
            format!("SELECT count(*) FROM customer_scores WHERE lifecycle_stage = {}", LifecycleStage::Churned as i32),
        ),
        (cond("tags", Contains, &["vip"]), "SELECT count(*) FROM customers WHERE tags @> ARRAY['vip']".into()),
        (cond("region", Eq, &["CN-SH"]), "SELECT count(*) FROM customers WHERE region = 'CN-SH'".into()),
        (
            cond("attributes.points", Ge, &["500"]),
            "SELECT count(*) FROM customers WHERE (attributes ->> 'points')::int >= 500".into(),
        ),
        (
            pb::RuleNode {
                node: Some(pb::rule_node::Node::All(pb::RuleList {
                    nodes: vec![
                        cond("region", Eq, &["CN-SH"]),
                        pb::RuleNode {
                            node: Some(pb::rule_node::Node::Not(Box::new(cond("tags", Contains, &["vip"])))),
                        },
                    ],
                })),
            },
            "SELECT count(*) FROM customers WHERE region = 'CN-SH' AND NOT tags @> ARRAY['vip']".into(),
        ),
    ];
    for (rule, check) in cases {
        let compiled = rules::compile(Some(&rule), "rule", 1).expect("valid rule");
        let got = segments::count(&mut conn, &compiled).await.expect("runs");
        let want = direct(&check).await;
        assert_eq!(got, want, "{}", compiled.predicate);
        assert!(want > 0, "the case selects someone: {check}");
        let sample = segments::sample(&mut conn, &compiled, 5).await.expect("sample");
        assert_eq!(sample.len() as i64, want.min(5));
    }

    // SQL-looking values are data (SEC-3): they match exactly what holds them, and run nothing.
    let hostile = "x'); DROP TABLE customers; --";
    // Tags are kept lower-case (as profiles normalises them).
    sqlx::query("UPDATE customers SET region = $1, tags = tags || lower($1) WHERE customer_id = $2")
        .bind(hostile)
        .bind(Uuid::from_u128(7))
        .execute(&pool)
        .await
        .expect("hostile values");
    for rule in
        [cond("region", Eq, &[hostile]), cond("tags", Contains, &[hostile]), cond("attributes.points", Eq, &[hostile])]
    {
        let compiled = rules::compile(Some(&rule), "rule", 1).expect("valid rule");
        let got = segments::sample(&mut conn, &compiled, 5).await.expect("runs as data");
        let want: Vec<Uuid> = if compiled.predicate.contains("attributes") { vec![] } else { vec![Uuid::from_u128(7)] };
        assert_eq!(got, want, "{}", compiled.predicate);
    }
    assert_eq!(direct("SELECT count(*) FROM customers").await, 2000, "the table is still there");
}

#[tokio::test]
async fn seg6_saved_segments_keep_their_membership_and_its_history() {
    use crm_segmentation::segments::SaveError;
    let config = testing::config("segmentation").await;
    let pool = crm_kit::db::pg_pool(&config).expect("pool");
    crm_kit::db::migrate(&pool, &config.database_schema, crm_segmentation::SPEC.migrator).await.expect("migrate");
    let (_, now) = load(&pool, 2000).await;
    recompute::run(&pool, &Thresholds::default(), now).await.expect("recompute");
    let mut conn = pool.acquire().await.expect("conn");

    let lapsing = cond("days_since_last_purchase", pb::Operator::Gt, &["60"]);
    let id = segments::create(&mut conn, "Lapsing buyers", "no purchase for two months", &lapsing)
        .await
        .map_err(|_| "create")
        .expect("saved");
    match segments::create(&mut conn, "lapsing BUYERS", "", &lapsing).await {
        Err(SaveError::NameTaken) => {}
        other => panic!("a second segment with the same name must be refused: {other:?}"),
    }
    match segments::create(&mut conn, "", "", &cond("colour", pb::Operator::Eq, &["red"])).await {
        Err(SaveError::Invalid(v)) => {
            let fields: Vec<_> = v.iter().map(|x| x.field.clone()).collect();
            assert_eq!(fields, ["segment.display_name", "segment.rule.condition.field"]);
        }
        other => panic!("invalid segments are refused: {other:?}"),
    }

    let first = segments::refresh(&mut conn, now, None).await.expect("refresh");
    let joined = first.iter().find(|(s, _)| *s == id).map(|(_, c)| c.joined.len()).unwrap_or(0);
    let expected: i64 = sqlx::query_scalar("SELECT count(*) FROM customer_scores WHERE recency_days > 60")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(joined as i64, expected);
    assert!(
        segments::refresh(&mut conn, now, None).await.expect("again").is_empty(),
        "nothing changed, nothing recorded"
    );

    // Two months later more customers have lapsed; recent buyers of the past who bought again would leave.
    let later = now + chrono::Duration::days(61);
    recompute::run(&pool, &Thresholds::default(), later).await.expect("recompute later");
    let second = segments::refresh(&mut conn, later, None).await.expect("refresh later");
    let changes = &second.iter().find(|(s, _)| *s == id).expect("changes").1;
    assert!(!changes.joined.is_empty(), "more customers lapsed");
    let members: i64 = sqlx::query_scalar("SELECT count(*) FROM segment_members WHERE segment_id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .expect("members");
    let expected: i64 = sqlx::query_scalar("SELECT count(*) FROM customer_scores WHERE recency_days > 60")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(members, expected, "membership equals the rule's selection");
    let history: i64 = sqlx::query_scalar("SELECT count(*) FROM segment_history WHERE segment_id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .expect("history");
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM kit_outbox WHERE event_type = 'crm.segmentation.v1.SegmentMembershipChanged'",
    )
    .fetch_one(&pool)
    .await
    .expect("events");
    assert_eq!(history, (joined + changes.joined.len() + changes.left.len()) as i64);
    assert_eq!(events, history, "every join and leave is emitted");
}

#[tokio::test]
async fn seg7_two_workers_at_once_claim_each_operation_once_and_recompute_one_at_a_time() {
    use crm_proto::segmentation::v1::{OperationState, RecomputeScope};
    use crm_segmentation::jobs;
    let config = testing::config("segmentation").await;
    let pool = crm_kit::db::pg_pool(&config).expect("pool");
    crm_kit::db::migrate(&pool, &config.database_schema, crm_segmentation::SPEC.migrator).await.expect("migrate");
    load(&pool, 1500).await;
    let thresholds = Thresholds::default();

    // Two recomputes at once on an unscored base serialise: each customer's first tier is recorded once.
    let now = chrono::Utc::now();
    let (x, y) = tokio::join!(recompute::run(&pool, &thresholds, now), recompute::run(&pool, &thresholds, now));
    let moved = x.expect("x").tier_moves + y.expect("y").tier_moves;
    assert_eq!(moved, 1500, "the second run waits for the first and finds every tier assigned");
    let moves: i64 = sqlx::query_scalar("SELECT count(*) FROM tier_moves").fetch_one(&pool).await.expect("moves");
    assert_eq!(moves, 1500, "one move per customer, not two");

    // One pending operation, two workers racing for it.
    let op = jobs::request(&pool, RecomputeScope::Full).await.expect("request");
    let (a, b) =
        tokio::join!(jobs::run_one(&pool, "worker-a", &thresholds), jobs::run_one(&pool, "worker-b", &thresholds));
    assert_eq!([a.expect("a"), b.expect("b")].iter().filter(|ran| **ran).count(), 1, "exactly one worker claims it");
    let (state, claimed_by): (i16, String) =
        sqlx::query_as("SELECT state, claimed_by FROM recompute_operations WHERE operation_id = $1")
            .bind(op)
            .fetch_one(&pool)
            .await
            .expect("op");
    assert_eq!(state, OperationState::Succeeded as i16);
    assert!(claimed_by == "worker-a" || claimed_by == "worker-b");
    let moves_after: i64 = sqlx::query_scalar("SELECT count(*) FROM tier_moves").fetch_one(&pool).await.expect("moves");
    assert_eq!(moves_after, 1500, "the operation moved nothing new");
}

#[tokio::test]
async fn rel7_an_operation_whose_runner_stopped_heartbeating_is_taken_over_and_a_live_one_is_not() {
    use crm_proto::segmentation::v1::{OperationState, RecomputeScope};
    use crm_segmentation::jobs;
    let config = testing::config("segmentation").await;
    let pool = crm_kit::db::pg_pool(&config).expect("pool");
    crm_kit::db::migrate(&pool, &config.database_schema, crm_segmentation::SPEC.migrator).await.expect("migrate");
    load(&pool, 200).await;
    let thresholds = Thresholds::default();
    let lease = std::time::Duration::from_secs(3);
    let running = |heartbeat: &'static str, runner: &'static str| {
        let pool = pool.clone();
        async move {
            let op = jobs::request(&pool, RecomputeScope::Full).await.expect("request");
            // Claimed by a runner that is alive (heartbeat now), dead (a minute ago), or from before leases (none).
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE recompute_operations SET state = 2, claimed_by = $2, attempts = 1, heartbeat_at = {heartbeat} \
                 WHERE operation_id = $1"
            )))
            .bind(op)
            .bind(runner)
            .execute(&pool)
            .await
            .expect("claimed");
            op
        }
    };
    let alive = running("now()", "replica-alive").await;
    assert!(
        !jobs::run_one_leased(&pool, "replica-b", &thresholds, lease).await.expect("round"),
        "a live runner keeps it"
    );
    let dead = running("now() - interval '1 minute'", "replica-dead").await;
    let stuck = running("NULL", "replica-old").await;
    for _ in 0..2 {
        assert!(jobs::run_one_leased(&pool, "replica-b", &thresholds, lease).await.expect("round"));
    }
    let state = |op: Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (i16, String, i32, String)>(
                "SELECT state, claimed_by, attempts, step FROM recompute_operations WHERE operation_id = $1",
            )
            .bind(op)
            .fetch_one(&pool)
            .await
            .expect("op")
        }
    };
    for op in [dead, stuck] {
        let (st, by, attempts, step) = state(op).await;
        assert_eq!((st, by.as_str(), attempts), (OperationState::Succeeded as i16, "replica-b", 2), "{step}");
    }
    let (st, by, ..) = state(alive).await;
    assert_eq!((st, by.as_str()), (OperationState::Running as i16, "replica-alive"));
    // Once its heartbeats stop, it is taken over too.
    sqlx::query("UPDATE recompute_operations SET heartbeat_at = now() - interval '1 minute' WHERE operation_id = $1")
        .bind(alive)
        .execute(&pool)
        .await
        .expect("stale");
    assert!(jobs::run_one_leased(&pool, "replica-b", &thresholds, lease).await.expect("round"));
    assert_eq!(state(alive).await.1, "replica-b");
}

fn feedback_event<T: prost::Name + Message>(payload: &T, at: DateTime<Utc>) -> crm_kit::consumer::Event {
    crm_kit::consumer::Event {
        envelope: crm_proto::common::v1::EventEnvelope {
            event_id: Uuid::now_v7().to_string(),
            event_type: T::full_name(),
            source: "feedback".into(),
            occurred_at: Some(prost_types::Timestamp { seconds: at.timestamp(), nanos: 0 }),
            payload: Some(prost_types::Any::from_msg(payload).expect("pack")),
            ..Default::default()
        },
        stream: "crm.feedback.events".into(),
        stream_id: "0-1".into(),
    }
}

async fn churn_rules(pool: &PgPool, id: Uuid) -> Vec<String> {
    let risk: Vec<u8> = sqlx::query_scalar("SELECT churn_risk FROM customer_scores WHERE customer_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("scores");
    pb::ChurnRisk::decode(risk.as_slice()).expect("risk").reasons.into_iter().map(|r| r.rule).collect()
}

#[tokio::test]
async fn seg5_an_open_complaint_and_a_bad_csat_from_feedback_raise_churn_risk_until_resolved() {
    use crm_kit::consumer::EventHandler;
    use crm_proto::feedback::v1 as fb;
    let config = testing::config("segmentation").await;
    let pool = crm_kit::db::pg_pool(&config).expect("pool");
    crm_kit::db::migrate(&pool, &config.database_schema, crm_segmentation::SPEC.migrator).await.expect("migrate");
    let (_, horizon) = load(&pool, 50).await;
    let id = Uuid::from_u128(1);
    let ticket = Uuid::now_v7();
    let opened = fb::TicketOpened {
        ticket: Some(fb::Ticket {
            ticket_id: ticket.to_string(),
            customer_id: id.to_string(),
            category: fb::Category::ServiceComplaint as i32,
            ..Default::default()
        }),
    };
    let csat = fb::SurveyAnswered {
        response: Some(fb::SurveyResponse {
            customer_id: id.to_string(),
            kind: fb::SurveyKind::Csat as i32,
            score: 2,
            ..Default::default()
        }),
    };
    let handler = crm_segmentation::read_model::ReadModel;
    let mut tx = pool.begin().await.unwrap();
    for e in [feedback_event(&opened, horizon), feedback_event(&csat, horizon)] {
        handler.handle(&mut tx, &e).await.expect("applied");
    }
    tx.commit().await.unwrap();
    recompute::run(&pool, &Thresholds::default(), horizon).await.expect("recompute");
    let rules = churn_rules(&pool, id).await;
    assert!(rules.contains(&"UNRESOLVED_COMPLAINT".to_string()), "{rules:?}");
    assert!(rules.contains(&"BAD_SERVICE_EXPERIENCE".to_string()), "{rules:?}");

    // Resolved: the complaint no longer counts; the bad experience does for 90 days.
    let resolved =
        fb::TicketResolved { ticket_id: ticket.to_string(), customer_id: id.to_string(), ..Default::default() };
    let mut tx = pool.begin().await.unwrap();
    handler.handle(&mut tx, &feedback_event(&resolved, horizon)).await.expect("applied");
    tx.commit().await.unwrap();
    recompute::run(&pool, &Thresholds::default(), horizon).await.expect("recompute");
    let rules = churn_rules(&pool, id).await;
    assert!(!rules.contains(&"UNRESOLVED_COMPLAINT".to_string()), "{rules:?}");
    assert!(rules.contains(&"BAD_SERVICE_EXPERIENCE".to_string()));
    recompute::run(&pool, &Thresholds::default(), horizon + chrono::Duration::days(91)).await.expect("recompute");
    assert!(
        !churn_rules(&pool, id).await.contains(&"BAD_SERVICE_EXPERIENCE".to_string()),
        "90 days later it has passed"
    );
}

fn profiles_event<T: prost::Name + Message>(payload: &T, at: DateTime<Utc>) -> crm_kit::consumer::Event {
    let mut e = feedback_event(payload, at);
    e.envelope.source = "profiles".into();
    e.stream = "crm.profiles.events".into();
    e
}

/// Runs incremental batches of `size` until no customer is dirty; returns how many it scored.
async fn drain(pool: &PgPool, now: DateTime<Utc>, size: i64) -> usize {
    let mut scored = 0;
    while let Some(s) = recompute::incremental(pool, &Thresholds::default(), now, size).await.expect("batch") {
        scored += s.customers;
    }
    scored
}

#[tokio::test]
async fn seg7_events_rescore_their_customers_incrementally_on_two_workers_as_a_full_recompute_would() {
    use crm_kit::consumer::EventHandler;
    let config = testing::config("segmentation").await;
    let pool = crm_kit::db::pg_pool(&config).expect("pool");
    crm_kit::db::migrate(&pool, &config.database_schema, crm_segmentation::SPEC.migrator).await.expect("migrate");
    let (_, horizon) = load(&pool, 2000).await;
    let now = horizon;
    assert_eq!(drain(&pool, now, 100).await, 0, "before the first full recompute there is no base to rank against");
    recompute::run(&pool, &Thresholds::default(), now).await.expect("first full recompute");
    let mut conn = pool.acquire().await.expect("conn");
    let diamonds = cond("tier", pb::Operator::In, &["TIER_DIAMOND"]);
    let segment = segments::create(&mut conn, "Diamonds", "", &diamonds).await.expect("segment");
    segments::refresh(&mut conn, now, None).await.expect("refresh");
    drop(conn);
    let moves_before: i64 = sqlx::query_scalar("SELECT count(*) FROM tier_moves").fetch_one(&pool).await.expect("n");

    // 300 customers buy 20 000 CNY each (>= the DIAMOND spend) yesterday.
    let handler = crm_segmentation::read_model::ReadModel;
    let mut tx = pool.begin().await.expect("tx");
    let buyers: Vec<Uuid> = (1..=300u128).map(Uuid::from_u128).collect();
    for (i, id) in buyers.iter().enumerate() {
        let purchase = crm_proto::profiles::v1::TransactionRecorded {
            transaction: Some(crm_proto::profiles::v1::Transaction {
                transaction_id: format!("big-{i}"),
                customer_id: id.to_string(),
                kind: crm_proto::profiles::v1::TransactionKind::Purchase as i32,
                amount: Some(crm_proto::common::v1::Money { amount_minor: 2_000_000, currency: "CNY".into() }),
                occurred_at: Some(prost_types::Timestamp {
                    seconds: (now - chrono::Duration::days(1)).timestamp(),
                    nanos: 0,
                }),
                ..Default::default()
            }),
        };
        handler.handle(&mut tx, &profiles_event(&purchase, now)).await.expect("applied");
    }
    tx.commit().await.expect("commit");
    let dirty: i64 = sqlx::query_scalar("SELECT count(*) FROM dirty_customers").fetch_one(&pool).await.expect("n");
    assert_eq!(dirty, 300, "each buyer waits for the incremental recompute");

    // Two workers at once claim disjoint batches until none is left.
    let (a, b) = tokio::join!(drain(&pool, now, 40), drain(&pool, now, 40));
    assert_eq!(a + b, 300, "every dirty customer scored exactly once ({a} + {b})");
    let tiers: Vec<i16> = sqlx::query_scalar("SELECT tier FROM customer_scores WHERE customer_id = ANY ($1)")
        .bind(&buyers)
        .fetch_all(&pool)
        .await
        .expect("tiers");
    assert!(tiers.iter().all(|t| *t == Tier::Diamond as i16), "every buyer is DIAMOND now: {tiers:?}");
    let doubles: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT customer_id FROM tier_moves WHERE id > $1 GROUP BY customer_id HAVING count(*) > 1) d",
    )
    .bind(moves_before)
    .fetch_one(&pool)
    .await
    .expect("doubles");
    assert_eq!(doubles, 0, "no duplicate history rows");
    let members: i64 =
        sqlx::query_scalar("SELECT count(*) FROM segment_members WHERE segment_id = $1 AND customer_id = ANY ($2)")
            .bind(segment)
            .bind(&buyers)
            .fetch_one(&pool)
            .await
            .expect("members");
    assert_eq!(members, 300, "segment membership follows incrementally");

    // A full recompute now finds nothing to move: the incremental one scored like it.
    let full = recompute::run(&pool, &Thresholds::default(), now).await.expect("full");
    assert_eq!((full.tier_moves, full.churn_changes), (0, 0), "{full:?}");
    assert_eq!(drain(&pool, now, 100).await, 0, "nothing left dirty");
}
