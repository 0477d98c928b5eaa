//! Outreach's read model of profiles' events under two consumers at once (as
//! two replicas run them): a purchase of a customer applied while another
//! consumer applies that customer's merge ends with the survivor (PRF-3).

use std::time::Duration;

use crm_kit::consumer::{Event, EventHandler};
use crm_outreach::read_model::ReadModel;
use crm_proto::common::v1::Money;
use crm_proto::profiles::v1 as pb;
use uuid::Uuid;

fn event<T: prost::Name + prost::Message>(payload: &T) -> Event {
    let envelope = crm_proto::common::v1::EventEnvelope {
        event_id: Uuid::now_v7().to_string(),
        event_type: T::full_name(),
        source: "profiles".into(),
        occurred_at: Some(prost_types::Timestamp { seconds: 1_750_000_000, nanos: 0 }),
        payload: Some(prost_types::Any::from_msg(payload).expect("pack")),
        ..Default::default()
    };
    Event { envelope, stream: "crm.profiles.events".into(), stream_id: "1-0".into() }
}

fn purchase(customer: Uuid, minor: i64) -> pb::TransactionRecorded {
    pb::TransactionRecorded {
        transaction: Some(pb::Transaction {
            transaction_id: Uuid::now_v7().to_string(),
            customer_id: customer.to_string(),
            kind: pb::TransactionKind::Purchase as i32,
            amount: Some(Money { amount_minor: minor, currency: "CNY".into() }),
            occurred_at: Some(prost_types::Timestamp { seconds: 1_750_000_000, nanos: 0 }),
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn a_purchase_applied_during_a_merge_of_its_customer_counts_for_the_survivor() {
    let config = crm_kit::testing::config("outreach").await;
    let pool = crm_kit::db::pg_pool(&config).expect("pool");
    crm_kit::db::migrate(&pool, &config.database_schema, crm_outreach::SPEC.migrator).await.expect("migrate");
    for (case, purchase_first) in [("purchase first", true), ("merge first", false)] {
        let (survivor, loser) = (Uuid::now_v7(), Uuid::now_v7());
        // Both known, with some spend, before the race.
        sqlx::query(
            "INSERT INTO customers (customer_id, timezone, spend_minor) VALUES ($1, 'UTC', 1000), ($2, 'UTC', 500)",
        )
        .bind(survivor)
        .bind(loser)
        .execute(&pool)
        .await
        .expect("customers");
        let bought = event(&purchase(loser, 300));
        let merged = event(&pb::CustomerMerged {
            survivor_id: survivor.to_string(),
            loser_id: loser.to_string(),
            merge_id: Uuid::now_v7().to_string(),
        });
        let (first, second) = if purchase_first { (bought, merged) } else { (merged, bought) };
        // The first event's transaction stays open while the second starts.
        let mut open = pool.begin().await.expect("tx");
        ReadModel.handle(&mut open, &first).await.expect("first applied");
        let other_pool = pool.clone();
        let other = tokio::spawn(async move {
            let mut tx = other_pool.begin().await.expect("tx");
            ReadModel.handle(&mut tx, &second).await.expect("second applied");
            tx.commit().await.expect("second committed");
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!other.is_finished(), "{case}: the second event waits for the first's customer rows");
        open.commit().await.expect("first committed");
        other.await.expect("second task");

        let spend: i64 = sqlx::query_scalar("SELECT spend_minor FROM customers WHERE customer_id = $1")
            .bind(survivor)
            .fetch_one(&pool)
            .await
            .expect("survivor");
        assert_eq!(spend, 1800, "{case}: the survivor's own 1000, the loser's 500 and the purchase of 300");
    }
}
