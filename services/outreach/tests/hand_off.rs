//! REL-6 at the enforcement point: right before a message reaches its
//! adapter, consent and complaints are read from their owners (here stand-
//! ins for profiles and feedback) and win over the event-fed copies the
//! decision used. End to end with real processes: tests/tests/opt_out.rs.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crm_outreach::authority::{Asking, ComplaintSource, ConsentNow, ConsentSource};
use crm_outreach::delivery::{Deliverer, Sink};
use crm_outreach::domain::policy::Consent;
use crm_outreach::messages::state;
use uuid::Uuid;

const SMS: i16 = 1;
const SERVICE: i16 = 1;
const MARKETING: i16 = 2;

struct Owners {
    consent: ConsentNow,
    complaints: HashSet<Uuid>,
    feedback_down: AtomicBool,
}

impl ConsentSource for Owners {
    fn consent<'a>(&'a self, _ids: &'a [Uuid]) -> Asking<'a, ConsentNow> {
        Box::pin(async move { Ok(self.consent.clone()) })
    }
}

impl ComplaintSource for Owners {
    fn open<'a>(&'a self, _ids: &'a [Uuid]) -> Asking<'a, HashSet<Uuid>> {
        Box::pin(async move {
            if self.feedback_down.load(Ordering::SeqCst) {
                return Err("feedback unreachable (test)".into());
            }
            Ok(self.complaints.clone())
        })
    }
}

/// An approved message, counted as a contact, as the decision leaves it.
async fn approved(pool: &sqlx::PgPool, customer: Uuid, purpose: i16) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO messages (message_id, customer_id, channel, template_id, purpose, state, due_at, expires_at, locale, variables, decided_at) \
         VALUES ($1, $2, $3, $4, $5, $6, now(), now() + interval '1 day', 'en', '{\"feedback_id\": \"F\"}', now())",
    )
    .bind(id)
    .bind(customer)
    .bind(SMS)
    .bind(crm_outreach::api::ACK_TEMPLATE)
    .bind(purpose)
    .bind(state::APPROVED)
    .execute(pool)
    .await
    .expect("message");
    sqlx::query("INSERT INTO contacts (customer_id, at, channel, message_id) VALUES ($1, now(), $2, $3)")
        .bind(customer)
        .bind(SMS)
        .bind(id)
        .execute(pool)
        .await
        .expect("contact");
    id
}

async fn outcome(pool: &sqlx::PgPool, id: Uuid) -> (i16, String) {
    sqlx::query_as("SELECT state, rule FROM messages WHERE message_id = $1").bind(id).fetch_one(pool).await.expect("m")
}

async fn delivered(pool: &sqlx::PgPool, id: Uuid) -> bool {
    sqlx::query_scalar("SELECT count(*) = 1 FROM sink_deliveries WHERE idempotency_key = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("sink")
}

#[tokio::test]
async fn rel6_a_withdrawal_or_a_complaint_recorded_now_stops_the_message_at_hand_off() {
    let config = crm_kit::testing::config("outreach").await;
    let kit = crm_kit::Kit::start(crm_outreach::SPEC, config).await.expect("kit");
    crm_outreach::templates::seed(&kit.pg).await.expect("templates");
    let pool = kit.pg.clone();
    let (withdrawn, complaining, fine) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let mut consent = ConsentNow::new();
    consent.insert((withdrawn, SMS, MARKETING), Consent::Revoked);
    consent.insert((complaining, SMS, MARKETING), Consent::Granted);
    consent.insert((fine, SMS, MARKETING), Consent::Granted);
    let owners = Arc::new(Owners {
        consent,
        complaints: [complaining].into_iter().collect(),
        feedback_down: AtomicBool::new(false),
    });
    let deliverer = Deliverer {
        pool: pool.clone(),
        adapters: [("log".to_string(), Arc::new(Sink::new(pool.clone())) as Arc<dyn crm_outreach::delivery::Adapter>)]
            .into_iter()
            .collect(),
        lease: Duration::from_secs(30),
        max_attempts: 5,
        backoff: Duration::from_millis(100),
        directory: None,
        consent: Some(owners.clone()),
        complaints: Some(owners.clone()),
    };
    let to_withdrawn = approved(&pool, withdrawn, MARKETING).await;
    let to_complaining = approved(&pool, complaining, MARKETING).await;
    let service_to_complaining = approved(&pool, complaining, SERVICE).await;
    let to_fine = approved(&pool, fine, MARKETING).await;
    assert_eq!(deliverer.deliver_due(10).await.expect("round"), 4);

    assert_eq!(outcome(&pool, to_withdrawn).await, (state::SUPPRESSED, "OPTED_OUT".into()));
    assert_eq!(outcome(&pool, to_complaining).await, (state::SUPPRESSED, "OPEN_COMPLAINT".into()));
    assert_eq!(outcome(&pool, service_to_complaining).await.0, state::SENT, "a complaint stops marketing only");
    assert_eq!(outcome(&pool, to_fine).await.0, state::SENT);
    for (id, want) in [(to_withdrawn, false), (to_complaining, false), (service_to_complaining, true), (to_fine, true)]
    {
        assert_eq!(delivered(&pool, id).await, want, "{id}");
    }
    let (contacts, decisions): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM contacts WHERE message_id = ANY($1)), \
                (SELECT count(*) FROM decisions WHERE message_id = ANY($1) AND detail LIKE '%at hand-off%')",
    )
    .bind(vec![to_withdrawn, to_complaining])
    .fetch_one(&pool)
    .await
    .expect("counts");
    assert_eq!((contacts, decisions), (0, 2), "the refused contacts are not counted; the refusals are recorded");

    // feedback unreachable: marketing waits for a retry instead of going out unchecked.
    owners.feedback_down.store(true, Ordering::SeqCst);
    let waits = approved(&pool, fine, MARKETING).await;
    let service = approved(&pool, fine, SERVICE).await;
    deliverer.deliver_due(10).await.expect("round");
    let (st, _) = outcome(&pool, waits).await;
    assert_eq!(st, state::QUEUED, "back in the queue, to be decided again");
    assert!(!delivered(&pool, waits).await);
    assert!(delivered(&pool, service).await, "service messages do not depend on complaints");
}
