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
pub async fn campaign_clock(pool: &PgPool) -> Result<(), crm_kit::ApiError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE campaigns SET state = $2, version = version + 1, updated_at = now() WHERE state = $1 AND next_run_at <= now()",
    )
    .bind(pb::CampaignState::Scheduled as i16)
    .bind(pb::CampaignState::Running as i16)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE campaigns c SET state = $2, version = version + 1, updated_at = now() WHERE state = $1 AND launched_at IS NOT NULL \
         AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.campaign_id = c.campaign_id AND m.state IN (1, 2))",
    )
    .bind(pb::CampaignState::Running as i16)
    .bind(pb::CampaignState::Completed as i16)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Launches the next chunk of a RUNNING campaign not launched yet (OUT-3);
/// returns whether it did any work. Replicas share a launch through its
/// cursor row, claimed with `SKIP LOCKED`.
pub async fn launch_step(pool: &PgPool) -> Result<bool, crm_kit::ApiError> {
    let mut tx = pool.begin().await?;
    // Background work: not bound by the request statement timeout.
    sqlx::query("SET LOCAL statement_timeout = '15min'").execute(&mut *tx).await?;
    let pending: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(
        "SELECT campaign_id, spec FROM campaigns WHERE state = $1 AND launched_at IS NULL AND next_run_at <= now() \
         ORDER BY next_run_at LIMIT 10",
    )
    .bind(pb::CampaignState::Running as i16)
    .fetch_all(&mut *tx)
    .await?;
    for (id, spec) in pending {
        sqlx::query(
            "INSERT INTO campaign_launches (campaign_id, after_customer) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(Uuid::nil())
        .execute(&mut *tx)
        .await?;
        let cursor: Option<(Uuid, i64)> = sqlx::query_as(
            "SELECT after_customer, assigned FROM campaign_launches WHERE campaign_id = $1 AND NOT done FOR UPDATE SKIP LOCKED",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((after, so_far)) = cursor else { continue };
        let spec = pb::Campaign::decode(spec.as_slice()).map_err(crm_kit::ApiError::internal)?;
        let control = settings::load_policy(&mut tx).await?.global_control_percent;
        let (n, last) =
            campaigns::launch_chunk(&mut tx, id, &spec, control, Utc::now(), after, campaigns::LAUNCH_CHUNK).await?;
        let done = n < campaigns::LAUNCH_CHUNK;
        sqlx::query(
            "UPDATE campaign_launches SET after_customer = $2, assigned = $3, done = $4 WHERE campaign_id = $1",
        )
        .bind(id)
        .bind(last.unwrap_or(after))
        .bind(so_far + n)
        .bind(done)
        .execute(&mut *tx)
        .await?;
        if done {
            sqlx::query("UPDATE campaigns SET launched_at = now() WHERE campaign_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tracing::info!(campaign_id = %id, audience = so_far + n, "campaign launched");
        }
        tx.commit().await?;
        if after.is_nil() || done {
            // The queue grows fast: plan its scans with fresh statistics.
            sqlx::raw_sql("ANALYZE messages; ANALYZE campaign_assignments").execute(pool).await?;
        }
        return Ok(true);
    }
    Ok(false)
}

/// The campaign clock, the task watcher and the trigger sweep, until shutdown.
pub async fn clocks(pool: PgPool, default_tz: Tz, wake: Arc<Notify>, every: Duration, signal: ShutdownSignal) {
    let mut ticks = 0u64;
    loop {
        if let Err(e) = campaign_clock(&pool).await {
            tracing::warn!(error = %e, "campaign clock round failed");
        }
        // Launch chunk after chunk; the dispatchers start on each as it commits.
        loop {
            match launch_step(&pool).await {
                Ok(true) if !signal.is_triggered() => wake.notify_one(),
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "campaign launch step failed; retrying");
                    break;
                }
            }
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
