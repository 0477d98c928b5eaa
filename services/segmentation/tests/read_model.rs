//! Issue 4, deliverable 1: the read model from profiles' events, against
//! real PostgreSQL and Redis Streams. Idempotent by event id; merges, unmerges
//! and erasures are reflected; a replay from the start rebuilds the same state.

use std::time::Duration;

use crm_kit::consumer::{Consumer, ConsumerSettings};
use crm_kit::metrics::Metrics;
use crm_kit::outbox::{self, Aggregate, OutboxRelay};
use crm_kit::testing;
use crm_proto::common::v1::{Channel, Money, Purpose};
use crm_proto::profiles::v1 as pb;
use crm_segmentation::read_model::{self, ReadModel};
use sqlx::PgPool;

static NO_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate::Migrator::DEFAULT;

const A: &str = "0000000a-0000-4000-8000-000000000001";
const B: &str = "0000000b-0000-4000-8000-000000000002";

fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

fn purchase(id: &str, customer: &str, minor: i64, at: i64) -> pb::TransactionRecorded {
    pb::TransactionRecorded {
        transaction: Some(pb::Transaction {
            transaction_id: id.into(),
            customer_id: customer.into(),
            kind: pb::TransactionKind::Purchase as i32,
            amount: Some(Money { amount_minor: minor, currency: "CNY".into() }),
            occurred_at: ts(at),
            category: "shoes".into(),
            ..Default::default()
        }),
    }
}

struct World {
    producer: PgPool,
    reader: PgPool,
    prefix: String,
    group: String,
}

impl World {
    async fn new() -> World {
        let producer_config = testing::config("profiles").await;
        let producer = crm_kit::db::pg_pool(&producer_config).expect("pool");
        crm_kit::db::migrate(&producer, &producer_config.database_schema, &NO_MIGRATIONS)
            .await
            .expect("producer tables");
        let reader_config = testing::config("segmentation").await;
        let reader = crm_kit::db::pg_pool(&reader_config).expect("pool");
        crm_kit::db::migrate(&reader, &reader_config.database_schema, crm_segmentation::SPEC.migrator)
            .await
            .expect("read model");
        World { producer, reader, prefix: testing::unique_name("seg"), group: testing::unique_name("segmentation") }
    }

    async fn emit<T: prost::Name + prost::Message>(&self, customer: &str, payload: T) {
        let mut tx = self.producer.begin().await.expect("tx");
        outbox::enqueue(&mut tx, "profiles", Aggregate { kind: "customer", id: customer }, "r", &payload)
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
    }

    async fn publish(&self) {
        let mut config = testing::config("profiles").await;
        config.event_stream_prefix = self.prefix.clone();
        let redis = crm_kit::db::Redis::connect(&testing::redis_url(), Duration::from_secs(1)).expect("redis");
        let relay = OutboxRelay::new(self.producer.clone(), redis, "profiles", Metrics::new("profiles"))
            .configured(&config, "profiles");
        while relay.publish_once().await.expect("publish") > 0 {}
    }

    fn consumer(&self) -> Consumer<ReadModel> {
        let settings = ConsumerSettings {
            group: self.group.clone(),
            name: "reader-1".into(),
            streams: vec![outbox::stream_name(&self.prefix, "profiles")],
            batch_size: 50,
            block: Duration::from_millis(100),
            claim_idle: Duration::from_secs(30),
        };
        Consumer::new(self.reader.clone(), &testing::redis_url(), settings, ReadModel, Metrics::new("segmentation"))
            .expect("consumer")
    }

    async fn consume_all(&self) -> usize {
        let mut consumer = self.consumer();
        let mut total = 0;
        loop {
            let n = consumer.poll_once().await.expect("consume");
            if n == 0 {
                return total;
            }
            total += n;
        }
    }

    async fn rewind(&self) {
        let client = redis::Client::open(testing::redis_url()).expect("redis");
        let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
        let _: () = redis::cmd("XGROUP")
            .arg("SETID")
            .arg(outbox::stream_name(&self.prefix, "profiles"))
            .arg(&self.group)
            .arg("0")
            .query_async(&mut conn)
            .await
            .expect("rewind");
    }

    /// Everything the read model holds, in a stable order.
    async fn snapshot(&self) -> Vec<String> {
        let mut rows: Vec<String> = sqlx::query_scalar(
            "SELECT 'c ' || customer_id || ' ' || kind || ' ' || region || ' ' || array_to_string(tags, ';') || ' ' || \
                    coalesce(merged_into::text, '-') || ' ' || coalesce(erased_at::text, '-') FROM customers \
             UNION ALL SELECT 't ' || transaction_id || ' ' || customer_id || ' ' || amount_minor FROM transactions \
             UNION ALL SELECT 'i ' || interaction_id || ' ' || customer_id FROM interactions \
             UNION ALL SELECT 'g ' || customer_id || ' ' || channel || ' ' || purpose || ' ' || granted FROM consents \
             UNION ALL SELECT 'f ' || max(newest_event_at) FROM freshness HAVING count(*) > 0 \
             UNION ALL SELECT 'a ' || customer_id || ' ' || spend::text || ' ' || purchases::text || ' ' || \
                    coalesce(first_purchase::text, '-') || ' ' || coalesce(last_purchase::text, '-') || ' ' || activity::text || ' ' || \
                    inquiries::text || ' ' || coalesce(last_interaction::text, '-') || ' ' || coalesce(last_login::text, '-') || ' ' || \
                    responses || ' ' || contacts FROM customer_facts",
        )
        .fetch_all(&self.reader)
        .await
        .expect("snapshot");
        rows.sort();
        rows
    }

    async fn owner_of(&self, transaction: &str) -> String {
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT customer_id FROM transactions WHERE transaction_id = $1")
            .bind(transaction)
            .fetch_one(&self.reader)
            .await
            .expect("transaction")
            .to_string()
    }
}

#[tokio::test]
async fn the_read_model_follows_profiles_events_and_a_replay_rebuilds_it_exactly() {
    let w = World::new().await;
    let created = |customer: &str, region: &str, tag: &str| pb::CustomerCreated {
        customer_id: customer.into(),
        kind: pb::CustomerKind::Person as i32,
        region: region.into(),
        timezone: "Asia/Shanghai".into(),
        tags: vec![tag.into()],
        registered_at: ts(1_700_000_000),
        ..Default::default()
    };
    w.emit(A, created(A, "CN-SH", "vip")).await;
    // A fact that arrives before its customer's CustomerCreated.
    w.emit(B, purchase("t-b1", B, 5_000, 1_750_000_000)).await;
    w.emit(B, created(B, "CN-BJ", "newsletter")).await;
    w.emit(A, purchase("t-a1", A, 19_900, 1_750_000_100)).await;
    w.emit(
        B,
        pb::InteractionRecorded {
            interaction: Some(pb::Interaction {
                interaction_id: "i-b1".into(),
                customer_id: B.into(),
                kind: pb::InteractionKind::Login as i32,
                occurred_at: ts(1_750_000_200),
                ..Default::default()
            }),
        },
    )
    .await;
    w.emit(
        B,
        pb::ConsentChanged {
            customer_id: B.into(),
            grants: vec![pb::ConsentGrant {
                channel: Channel::Sms as i32,
                purpose: Purpose::Marketing as i32,
                granted: true,
                ..Default::default()
            }],
        },
    )
    .await;
    w.emit(A, pb::CustomerMerged { survivor_id: A.into(), loser_id: B.into(), merge_id: "m1".into() }).await;
    // After the merge, a fact for the loser's id belongs to the survivor.
    w.emit(B, purchase("t-b2", B, 700, 1_750_000_300)).await;
    w.publish().await;
    assert_eq!(w.consume_all().await, 8);

    assert_eq!(w.owner_of("t-b1").await, A, "the merge moved the loser's purchase");
    assert_eq!(w.owner_of("t-b2").await, A, "a later fact of the loser's id goes to the survivor");

    w.emit(
        A,
        pb::CustomerUnmerged {
            survivor_id: A.into(),
            restored_id: B.into(),
            merge_id: "m1".into(),
            moved_transaction_ids: vec!["t-b1".into()],
            moved_interaction_ids: vec!["i-b1".into()],
        },
    )
    .await;
    w.emit(A, pb::CustomerErased { customer_id: A.into(), alias_ids: vec![] }).await;
    w.publish().await;
    assert_eq!(w.consume_all().await, 2);

    assert_eq!(w.owner_of("t-b1").await, B, "the unmerge moved it back");
    assert_eq!(w.owner_of("t-b2").await, A);
    let interaction_owner: uuid::Uuid =
        sqlx::query_scalar("SELECT customer_id FROM interactions WHERE interaction_id = 'i-b1'")
            .fetch_one(&w.reader)
            .await
            .expect("i");
    assert_eq!(interaction_owner.to_string(), B);
    let (region, tags, erased): (String, Vec<String>, bool) =
        sqlx::query_as("SELECT region, tags, erased_at IS NOT NULL FROM customers WHERE customer_id = $1::uuid")
            .bind(A)
            .fetch_one(&w.reader)
            .await
            .expect("a");
    assert_eq!((region.as_str(), tags.len(), erased), ("", 0, true), "PRF-8: the person's attributes are gone");
    let purchases_kept: i64 = sqlx::query_scalar("SELECT count(*) FROM transactions WHERE customer_id = $1::uuid")
        .bind(A)
        .fetch_one(&w.reader)
        .await
        .expect("count");
    assert_eq!(purchases_kept, 2, "identity-free facts stay for the aggregates");
    let confirmations: i64 =
        sqlx::query_scalar("SELECT count(*) FROM kit_outbox WHERE event_type = 'crm.common.v1.ErasureConfirmed'")
            .fetch_one(&w.reader)
            .await
            .expect("count");
    assert_eq!(confirmations, 1, "the erasure is confirmed to profiles");

    // Redelivery of everything changes nothing (idempotent by event id).
    let state = w.snapshot().await;
    w.rewind().await;
    assert_eq!(w.consume_all().await, 10, "all events delivered again");
    assert_eq!(w.snapshot().await, state);
    let confirmations_after: i64 =
        sqlx::query_scalar("SELECT count(*) FROM kit_outbox WHERE event_type = 'crm.common.v1.ErasureConfirmed'")
            .fetch_one(&w.reader)
            .await
            .expect("count");
    assert_eq!(confirmations_after, 1);

    // A rebuild: empty the model, replay from the start, get the same state.
    let mut tx = w.reader.begin().await.expect("tx");
    read_model::reset(&mut tx, &w.group).await.expect("reset");
    tx.commit().await.expect("commit");
    assert!(w.snapshot().await.is_empty());
    w.rewind().await;
    w.consume_all().await;
    assert_eq!(w.snapshot().await, state, "a replay from the start rebuilds the same state");

    // The aggregates kept event by event (through a merge and an unmerge) are
    // exactly what a set-based rebuild from the stored facts gives.
    let spend: String = sqlx::query_scalar("SELECT spend::text FROM customer_facts WHERE customer_id = $1::uuid")
        .bind(A)
        .fetch_one(&w.reader)
        .await
        .expect("facts");
    assert_eq!(spend, "[24305:24305]={20600}", "A's June 2025 (2025 * 12 + 5): 199.00 + 7.00 CNY");
    read_model::rebuild_all(&w.reader).await.expect("rebuild");
    assert_eq!(w.snapshot().await, state, "per-event aggregates equal the rebuild");
    let dirty: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dirty_customers WHERE customer_id IN ($1::uuid, $2::uuid)")
            .bind(A)
            .bind(B)
            .fetch_one(&w.reader)
            .await
            .expect("dirty");
    assert_eq!(dirty, 2, "both customers wait for the incremental recompute");
}

/// Two consumers at once (as two replicas run them): one applies a purchase
/// of the loser while the other applies the merge. Whichever transaction
/// starts first, the purchase ends with the survivor, in its transactions and
/// in its monthly aggregates.
#[tokio::test]
async fn seg_read_model_a_fact_applied_during_a_merge_of_its_customer_ends_with_the_survivor() {
    let w = World::new().await;
    let merge = pb::CustomerMerged { survivor_id: A.into(), loser_id: B.into(), merge_id: "m1".into() };
    for (case, fact_first) in [("fact first", true), ("merge first", false)] {
        sqlx::raw_sql("TRUNCATE customers, transactions, customer_facts, dirty_customers CASCADE")
            .execute(&w.reader)
            .await
            .expect("reset");
        // Both customers known before the race, as they are when profiles merges them.
        sqlx::query("INSERT INTO customers (customer_id) VALUES ($1::uuid), ($2::uuid)")
            .bind(A)
            .bind(B)
            .execute(&w.reader)
            .await
            .expect("customers");
        let fact = testing::event("profiles", &purchase(&format!("t-{case}"), B, 900, 1_750_000_100), 1_750_000_000);
        let merged = testing::event("profiles", &merge, 1_750_000_000);
        let (first, second) = if fact_first { (fact, merged) } else { (merged, fact) };
        testing::apply_concurrently(&w.reader, ReadModel, &first, second, case).await;

        assert_eq!(w.owner_of(&format!("t-{case}")).await, A, "{case}: the purchase belongs to the survivor");
        let spend: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
            "SELECT customer_id, coalesce((SELECT sum(s) FROM unnest(spend) s), 0)::int8 FROM customer_facts \
             WHERE customer_id IN ($1::uuid, $2::uuid) ORDER BY 2 DESC",
        )
        .bind(A)
        .bind(B)
        .fetch_all(&w.reader)
        .await
        .expect("facts");
        assert_eq!(spend.first().map(|r| (r.0.to_string(), r.1)), Some((A.to_string(), 900)), "{case}: {spend:?}");
        assert!(spend.iter().skip(1).all(|r| r.1 == 0), "{case}: nothing stays with the loser: {spend:?}");
    }
}
