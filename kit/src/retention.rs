//! Retention of the kit's per-request and per-event records (SPEC 3,
//! REL-5, SEC-5): idempotency keys with their first responses are kept
//! `IDEMPOTENCY_RETENTION_HOURS`, inbox entries `INBOX_RETENTION_HOURS`;
//! older ones are deleted, so neither table grows without bound nor keeps
//! personal data in a stored response longer than promised.
//!
//! Every replica runs the job; one at a time does the work (a
//! transaction-scoped advisory lock per schema), deleting in batches so no
//! statement holds many row locks. `crm_retention_purged_total{table}`
//! counts what went.

use std::time::Duration;

use sqlx::PgPool;

use crate::lifecycle::ShutdownSignal;
use crate::metrics::Metrics;

/// Rows deleted per statement.
const BATCH: i64 = 10_000;

/// What one round deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    /// Idempotency keys past retention.
    pub idempotency: u64,
    /// Inbox entries past retention.
    pub inbox: u64,
}

/// The retention job of one replica.
#[derive(Debug, Clone)]
pub struct Retention {
    pool: PgPool,
    idempotency: Duration,
    inbox: Duration,
    metrics: Metrics,
}

impl Retention {
    /// A job over `pool` keeping idempotency keys for `idempotency` and inbox entries for `inbox`.
    pub fn new(pool: PgPool, idempotency: Duration, inbox: Duration, metrics: Metrics) -> Self {
        Self { pool, idempotency, inbox, metrics }
    }

    /// Deletes what is past retention; `None` when another replica is at it.
    pub async fn run_once(&self) -> Result<Option<Purged>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext('kit_retention:' || current_schema()))")
                .fetch_one(&mut *tx)
                .await?;
        if !locked {
            return Ok(None);
        }
        let purged = Purged {
            idempotency: purge(
                &mut tx,
                "DELETE FROM kit_idempotency WHERE ctid = ANY(ARRAY(SELECT ctid FROM kit_idempotency \
                 WHERE created_at < now() - make_interval(secs => $1) LIMIT $2))",
                self.idempotency,
            )
            .await?,
            inbox: purge(
                &mut tx,
                "DELETE FROM kit_inbox WHERE ctid = ANY(ARRAY(SELECT ctid FROM kit_inbox \
                 WHERE processed_at < now() - make_interval(secs => $1) LIMIT $2))",
                self.inbox,
            )
            .await?,
        };
        tx.commit().await?;
        let count = |table: &str, n: u64| {
            self.metrics.retention_purged.get_or_create(&vec![("table", table.to_string())]).inc_by(n);
        };
        count("kit_idempotency", purged.idempotency);
        count("kit_inbox", purged.inbox);
        Ok(Some(purged))
    }

    /// Runs every `every` until shutdown (the first round right away).
    pub async fn run(self, every: Duration, shutdown: ShutdownSignal) {
        loop {
            match self.run_once().await {
                Ok(Some(p)) if p.idempotency + p.inbox > 0 => {
                    tracing::info!(idempotency = p.idempotency, inbox = p.inbox, "retention: purged expired records")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "retention round failed; retrying later"),
            }
            if !shutdown.sleep(every).await {
                return;
            }
        }
    }
}

/// Runs a batched delete until it deletes less than a batch.
async fn purge(conn: &mut sqlx::PgConnection, sql: &'static str, retention: Duration) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let n = sqlx::query(sql).bind(retention.as_secs_f64()).bind(BATCH).execute(&mut *conn).await?.rows_affected();
        total += n;
        if n < BATCH as u64 {
            return Ok(total);
        }
    }
}
