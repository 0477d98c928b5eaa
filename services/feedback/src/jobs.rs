//! Background work of a feedback replica, safe with any number of replicas
//! (SPEC 2): the SLA watcher (FBK-3) and the closed-loop worker. Work is
//! claimed with `FOR UPDATE SKIP LOCKED` on the ticket rows, so two watchers
//! never record the same breach; each breach is also guarded by its clock's
//! `breached_at`, set once under that lock.

use std::time::Duration;

use chrono::{DateTime, Utc};
use crm_kit::ApiError;
use crm_kit::lifecycle::ShutdownSignal;
use uuid::Uuid;

use crate::closed_loop;
use crate::desk::Desk;
use crate::tickets;

/// What one watcher round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Watched {
    /// SLA breaches recorded (SlaBreached emitted).
    pub breaches: usize,
    /// Escalation steps taken.
    pub escalations: usize,
}

/// Request id of the watcher's events.
const WATCHER: &str = "sla-watcher";

/// One watcher round at `now`: records the breaches due and takes the
/// escalation steps due, for at most `limit` tickets each.
pub async fn watch_once(desk: &Desk, now: DateTime<Utc>, limit: i64) -> Result<Watched, ApiError> {
    let mut out = Watched::default();
    let mut tx = desk.pool.begin().await?;
    let due: Vec<Uuid> = sqlx::query_scalar(
        "SELECT ticket_id FROM tickets WHERE ticket_id IN \
             (SELECT ticket_id FROM sla_clocks WHERE breached_at IS NULL AND deadline_at <= $1) \
         ORDER BY next_deadline_at LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    for id in due {
        let mut t = tickets::lock(&mut tx, id).await?;
        let mut clocks = tickets::clocks(&mut tx, id).await?;
        out.breaches += tickets::breach_due(&mut tx, desk, &mut t, &mut clocks, WATCHER, now).await?;
    }
    let escalating: Vec<Uuid> = sqlx::query_scalar(
        "SELECT ticket_id FROM tickets WHERE next_escalation_at <= $1 ORDER BY next_escalation_at LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    for id in escalating {
        let mut t = tickets::lock(&mut tx, id).await?;
        tickets::escalate(&mut tx, desk, &mut t, now).await?;
        out.escalations += 1;
    }
    tx.commit().await?;
    Ok(out)
}

/// Runs the watcher and the closed-loop worker every `interval` until shutdown.
pub async fn run(desk: Desk, interval: Duration, shutdown: ShutdownSignal) {
    loop {
        let now = desk.clock.now();
        match watch_once(&desk, now, 200).await {
            Ok(w) if w.breaches + w.escalations > 0 => {
                tracing::info!(breaches = w.breaches, escalations = w.escalations, "SLA watcher round")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "SLA watcher round failed; retrying"),
        }
        if let Err(e) = closed_loop::run_due(&desk, 100).await {
            tracing::warn!(error = %e, "closed-loop round failed; retrying");
        }
        if !shutdown.sleep(interval).await {
            break;
        }
    }
}
