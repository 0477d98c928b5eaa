//! Outreach's background work, safe with any number of replicas: every loop
//! claims its rows in PostgreSQL (`FOR UPDATE SKIP LOCKED`), so replicas share
//! the work and never do the same piece twice.
//!
//! - the dispatcher decides due messages (OUT-5, [`crate::dispatch`]);
//! - the deliverer hands approved ones to their adapters (OUT-1, [`crate::delivery`]);
//! - the campaign clock starts SCHEDULED campaigns and completes finished ones (OUT-3);
//! - the task watcher escalates overdue tasks (OUT-7);
//! - the trigger sweep queues lifecycle messages and silent-customer call-backs (OUT-4).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use chrono_tz::Tz;
use crm_kit::lifecycle::ShutdownSignal;
use crm_proto::outreach::v1 as pb;
use prost::Message;
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::delivery::Deliverer;
use crate::{campaigns, dispatch, settings, tasks, triggers};

/// How the loops pace themselves.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Messages per dispatcher or delivery batch.
    pub batch: i64,
    /// Sleep when there was nothing to do.
    pub idle: Duration,
}

async fn idle(signal: &ShutdownSignal, wake: &Notify, d: Duration) -> bool {
    tokio::select! {
        alive = signal.sleep(d) => alive,
        _ = wake.notified() => !signal.is_triggered(),
    }
}

/// Decides due messages until shutdown and delivers the approved ones at once
/// (they are leased to this replica in the deciding transaction).
pub async fn dispatcher(
    pool: PgPool,
    tz: Tz,
    pace: Pace,
    deliverer: Deliverer,
    wake: Arc<Notify>,
    signal: ShutdownSignal,
) {
    loop {
        let round = async {
            let mut tx = pool.begin().await?;
            let (tally, approved) =
                dispatch::decide_due(&mut tx, tz, pace.batch, Utc::now(), Some(deliverer.lease)).await?;
            tx.commit().await?;
            deliverer.deliver_approved(&approved).await?;
            Ok::<_, crm_kit::ApiError>(tally)
        };
        let busy = match round.await {
            Ok(t) => t.total() as i64 >= pace.batch,
            Err(e) => {
                tracing::warn!(error = %e, "dispatch round failed; retrying");
                false
            }
        };
        if signal.is_triggered() || (!busy && !idle(&signal, &wake, pace.idle).await) {
            return;
        }
    }
}

/// Delivers approved messages until shutdown.
pub async fn deliverer(d: Deliverer, pace: Pace, wake: Arc<Notify>, signal: ShutdownSignal) {
    loop {
        let busy = match d.deliver_due(pace.batch).await {
            Ok(n) => n as i64 >= pace.batch,
            Err(e) => {
                tracing::warn!(error = %e, "delivery round failed; retrying");
                false
            }
        };
        if signal.is_triggered() || (!busy && !idle(&signal, &wake, pace.idle).await) {
            return;
        }
    }
}

/// Starts SCHEDULED campaigns whose time has come and completes RUNNING ones
/// with nothing left to send.
pub async fn campaign_clock(pool: &PgPool, wake: &Notify) -> Result<(), crm_kit::ApiError> {
    let mut tx = pool.begin().await?;
    // Launching a large audience is background work: not bound by the request statement timeout.
    sqlx::query("SET LOCAL statement_timeout = '15min'").execute(&mut *tx).await?;
    // SCHEDULED ones whose time has come, and RUNNING ones not launched yet.
    let due: Vec<(Uuid, Vec<u8>, Option<chrono::DateTime<Utc>>)> = sqlx::query_as(
        "SELECT campaign_id, spec, launched_at FROM campaigns WHERE next_run_at <= now() \
         AND (state = $1 OR (state = $2 AND launched_at IS NULL)) FOR UPDATE SKIP LOCKED LIMIT 10",
    )
    .bind(pb::CampaignState::Scheduled as i16)
    .bind(pb::CampaignState::Running as i16)
    .fetch_all(&mut *tx)
    .await?;
    let control = settings::load_policy(&mut tx).await?.global_control_percent;
    for (id, spec, launched) in &due {
        let spec = pb::Campaign::decode(spec.as_slice()).map_err(crm_kit::ApiError::internal)?;
        sqlx::query(
            "UPDATE campaigns SET state = $2, next_run_at = NULL, version = version + 1, updated_at = now() WHERE campaign_id = $1",
        )
        .bind(id)
        .bind(pb::CampaignState::Running as i16)
        .execute(&mut *tx)
        .await?;
        if launched.is_none() {
            let started = std::time::Instant::now();
            let n = campaigns::launch(&mut tx, *id, &spec, control, Utc::now()).await?;
            tracing::info!(campaign_id = %id, audience = n, seconds = started.elapsed().as_secs_f64(), "campaign launched");
        }
    }
    sqlx::query(
        "UPDATE campaigns c SET state = $2, version = version + 1, updated_at = now() WHERE state = $1 AND launched_at IS NOT NULL \
         AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.campaign_id = c.campaign_id AND m.state IN (1, 2))",
    )
    .bind(pb::CampaignState::Running as i16)
    .bind(pb::CampaignState::Completed as i16)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    if due.iter().any(|(_, _, launched)| launched.is_none()) {
        // A launch can add a million rows at once: plan the queue scans with fresh statistics.
        sqlx::raw_sql("ANALYZE messages; ANALYZE campaign_assignments").execute(pool).await?;
    }
    if !due.is_empty() {
        wake.notify_one();
    }
    Ok(())
}

/// The campaign clock, the task watcher and the trigger sweep, until shutdown.
pub async fn clocks(pool: PgPool, default_tz: Tz, wake: Arc<Notify>, every: Duration, signal: ShutdownSignal) {
    let mut ticks = 0u64;
    loop {
        if let Err(e) = campaign_clock(&pool, &wake).await {
            tracing::warn!(error = %e, "campaign clock round failed");
        }
        if ticks.is_multiple_of(300) {
            // OUT-4 date triggers and silent-customer call-backs, every 5 minutes (idempotent).
            let round = async {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext('outreach:triggers'))").execute(&mut *tx).await?;
                let queued = triggers::sweep(&mut tx, default_tz, Utc::now()).await?;
                let tasks = triggers::silent_callbacks(&mut tx, Utc::now()).await?;
                tx.commit().await?;
                Ok::<_, crm_kit::ApiError>((queued, tasks))
            };
            match round.await {
                Ok((0, 0)) => {}
                Ok((queued, tasks)) => {
                    tracing::info!(queued, tasks, "lifecycle triggers fired");
                    wake.notify_one();
                }
                Err(e) => tracing::warn!(error = %e, "trigger sweep failed"),
            }
        }
        if ticks.is_multiple_of(30) {
            let round = async {
                let mut tx = pool.begin().await?;
                let n = tasks::escalate_overdue(&mut tx, Utc::now()).await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(n)
            };
            if let Err(e) = round.await {
                tracing::warn!(error = %e, "task watcher round failed");
            }
        }
        ticks += 1;
        if !signal.sleep(every).await {
            return;
        }
    }
}
