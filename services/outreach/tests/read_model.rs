//! Outreach's read model of profiles' events under two consumers at once (as
//! two replicas run them): a purchase of a customer applied while another
//! consumer applies that customer's merge ends with the survivor (PRF-3).

use crm_kit::testing::{apply_concurrently, event};
use crm_outreach::read_model::ReadModel;
use crm_proto::common::v1::Money;
use crm_proto::profiles::v1 as pb;
use uuid::Uuid;

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
        let bought = event("profiles", &purchase(loser, 300), 1_750_000_000);
        let merged = event(
            "profiles",
            &pb::CustomerMerged {
                survivor_id: survivor.to_string(),
                loser_id: loser.to_string(),
                merge_id: Uuid::now_v7().to_string(),
            },
            1_750_000_000,
        );
        let (first, second) = if purchase_first { (bought, merged) } else { (merged, bought) };
        apply_concurrently(&pool, ReadModel, &first, second, case).await;

        let spend: i64 = sqlx::query_scalar("SELECT spend_minor FROM customers WHERE customer_id = $1")
            .bind(survivor)
            .fetch_one(&pool)
            .await
            .expect("survivor");
        assert_eq!(spend, 1800, "{case}: the survivor's own 1000, the loser's 500 and the purchase of 300");
    }
}

fn sms_marketing(customer: Uuid, granted: bool, changed_at: i64) -> pb::ConsentChanged {
    pb::ConsentChanged {
        customer_id: customer.to_string(),
        grants: vec![pb::ConsentGrant {
            channel: crm_proto::common::v1::Channel::Sms as i32,
            purpose: crm_proto::common::v1::Purpose::Marketing as i32,
            granted,
            update_time: Some(prost_types::Timestamp { seconds: changed_at, nanos: 0 }),
            ..Default::default()
        }],
    }
}

/// REL-6, OUT-5: a consumer that dies before acknowledging leaves its event
/// to be claimed by another later, after newer events of the same customer
/// were applied. A grant redelivered after the withdrawal that followed it
/// must not bring the consent back.
#[tokio::test]
async fn out5_a_grant_redelivered_after_its_withdrawal_does_not_undo_the_opt_out() {
    use crm_kit::consumer::EventHandler;
    let config = crm_kit::testing::config("outreach").await;
    let pool = crm_kit::db::pg_pool(&config).expect("pool");
    crm_kit::db::migrate(&pool, &config.database_schema, crm_outreach::SPEC.migrator).await.expect("migrate");
    let customer = Uuid::now_v7();
    sqlx::query("INSERT INTO customers (customer_id, timezone) VALUES ($1, 'UTC')")
        .bind(customer)
        .execute(&pool)
        .await
        .expect("customer");
    let granted = event("profiles", &sms_marketing(customer, true, 1_750_000_000), 1_750_000_000);
    let withdrawn = event("profiles", &sms_marketing(customer, false, 1_750_000_060), 1_750_000_060);
    for e in [&withdrawn, &granted] {
        let mut tx = pool.begin().await.expect("tx");
        ReadModel.handle(&mut tx, e).await.expect("applied");
        tx.commit().await.expect("commit");
    }
    let copy: bool = sqlx::query_scalar("SELECT granted FROM consents WHERE customer_id = $1")
        .bind(customer)
        .fetch_one(&pool)
        .await
        .expect("consent copy");
    assert!(!copy, "the older grant, applied last, must not override the newer withdrawal");
}
