//! REL-7: a delivery batch stays its replica's for as long as its adapter
//! works on it, however long that takes; a replica that dies lets it go.

use std::sync::Arc;
use std::time::Duration;

use crm_outreach::delivery::{Adapter, Deliverer, Outbound, Sending, SendingMany, Sink};
use crm_outreach::messages::state;
use uuid::Uuid;

/// A provider that takes `delay` for every batch, then records it in the sink.
struct Slow {
    sink: Sink,
    delay: Duration,
}

impl Adapter for Slow {
    fn send<'a>(&'a self, m: &'a Outbound) -> Sending<'a> {
        Box::pin(async move { self.send_many(std::slice::from_ref(m)).await.pop().unwrap_or(Ok(())) })
    }

    fn send_many<'a>(&'a self, ms: &'a [Outbound]) -> SendingMany<'a> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.sink.send_many(ms).await
        })
    }
}

fn replica(pool: &sqlx::PgPool, delay: Duration, lease: Duration) -> Deliverer {
    let slow: Arc<dyn Adapter> = Arc::new(Slow { sink: Sink::new(pool.clone()), delay });
    Deliverer {
        pool: pool.clone(),
        adapters: [("log".to_string(), slow)].into_iter().collect(),
        lease,
        max_attempts: 5,
        backoff: Duration::from_millis(100),
        directory: None,
        consent: None,
        complaints: None,
    }
}

#[tokio::test]
async fn rel7_a_slow_batch_keeps_its_lease_and_no_other_replica_sends_it_again() {
    let config = crm_kit::testing::config("outreach").await;
    let kit = crm_kit::Kit::start(crm_outreach::SPEC, config).await.expect("kit");
    crm_outreach::templates::seed(&kit.pg).await.expect("templates");
    let pool = kit.pg.clone();
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    sqlx::query(
        "INSERT INTO messages (message_id, customer_id, channel, template_id, purpose, state, due_at, expires_at, locale, variables) \
         SELECT id, gen_random_uuid(), 1, $2, 1, $3, now(), now() + interval '1 day', 'en', '{\"feedback_id\": \"F\"}' \
         FROM UNNEST($1::uuid[]) AS t(id)",
    )
    .bind(&ids)
    .bind(crm_outreach::api::ACK_TEMPLATE)
    .bind(state::APPROVED)
    .execute(&pool)
    .await
    .expect("messages");
    let lease = Duration::from_millis(600);
    // Replica A's provider takes five leases' time; replica B keeps looking for due messages meanwhile.
    let a = replica(&pool, Duration::from_secs(3), lease);
    let b = replica(&pool, Duration::ZERO, lease);
    let slow = tokio::spawn(async move { a.deliver_due(100).await });
    let mut taken_by_b = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(3300);
    tokio::time::sleep(Duration::from_millis(100)).await;
    while tokio::time::Instant::now() < until {
        taken_by_b += b.deliver_due(100).await.expect("b");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(slow.await.expect("a").expect("a's round"), 20);
    assert_eq!(taken_by_b, 0, "the lease was renewed while A's provider worked");
    let (rows, calls): (i64, i64) = sqlx::query_as("SELECT count(*), sum(calls)::bigint FROM sink_deliveries")
        .fetch_one(&pool)
        .await
        .expect("sink");
    assert_eq!((rows, calls), (20, 20), "each message handed over once");
    let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE state = $1")
        .bind(state::SENT)
        .fetch_one(&pool)
        .await
        .expect("sent");
    assert_eq!(sent, 20);
}
