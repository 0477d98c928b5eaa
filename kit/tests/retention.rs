//! Retention of idempotency keys and inbox entries (SPEC 3, REL-5, SEC-5):
//! purged after their retention, by one replica at a time, and counted.

mod common;

use std::time::Duration;

use crm_kit::retention::{Purged, Retention};

async fn seed(pool: &sqlx::PgPool) {
    for (id, age_hours) in [("old-1", 49), ("old-2", 72), ("fresh", 1)] {
        sqlx::query(
            "INSERT INTO kit_idempotency (scope, request_id, fingerprint, response, created_at) \
             VALUES ('/x/Y', $1, '', 'the first response', now() - make_interval(hours => $2))",
        )
        .bind(id)
        .bind(age_hours)
        .execute(pool)
        .await
        .expect("idempotency row");
    }
    for age_hours in [24 * 8, 24 * 30, 2] {
        sqlx::query(
            "INSERT INTO kit_inbox (consumer, event_id, processed_at) VALUES ('c', $1, now() - make_interval(hours => $2))",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(age_hours)
        .execute(pool)
        .await
        .expect("inbox row");
    }
}

async fn count(pool: &sqlx::PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .expect("count")
}

#[tokio::test]
async fn rel5_expired_idempotency_keys_and_inbox_entries_are_purged_once_across_replicas() {
    // The kit's own job keeps everything here, so only the two replicas below purge.
    let mut config = common::test_config().await;
    config.idempotency_retention = Duration::from_secs(365 * 24 * 3600);
    config.inbox_retention = Duration::from_secs(365 * 24 * 3600);
    let run = common::start(config).await;
    seed(&run.pool).await;
    let replica = |m: &crm_kit::metrics::Metrics| {
        Retention::new(run.pool.clone(), Duration::from_secs(48 * 3600), Duration::from_secs(7 * 24 * 3600), m.clone())
    };
    let (a, b) = (replica(&run.metrics), replica(&run.metrics));
    let (ra, rb) = tokio::join!(a.run_once(), b.run_once());
    let total = [ra.expect("a"), rb.expect("b")].into_iter().flatten().fold(Purged::default(), |t, p| Purged {
        idempotency: t.idempotency + p.idempotency,
        inbox: t.inbox + p.inbox,
    });
    assert_eq!(total, Purged { idempotency: 2, inbox: 2 }, "each expired row deleted once");
    assert_eq!(count(&run.pool, "kit_idempotency").await, 1, "the fresh key stays");
    assert_eq!(count(&run.pool, "kit_inbox").await, 1, "the fresh inbox entry stays");
    let rendered = run.metrics.render();
    assert!(rendered.contains("crm_retention_purged_total{service="), "{rendered}");
    assert!(rendered.lines().any(|l| l.contains("table=\"kit_inbox\"") && l.ends_with(" 2")), "{rendered}");
    run.shutdown.trigger();
}

#[tokio::test]
async fn rel5_every_replica_runs_the_retention_job_without_being_asked() {
    let mut config = common::test_config().await;
    config.retention_interval = Duration::from_millis(200);
    let run = common::start(config).await;
    seed(&run.pool).await;
    let purged = common::eventually(Duration::from_secs(10), || async {
        count(&run.pool, "kit_idempotency").await == 1 && count(&run.pool, "kit_inbox").await == 1
    })
    .await;
    assert!(purged, "the kit's own job purged the expired rows");
    run.shutdown.trigger();
}
