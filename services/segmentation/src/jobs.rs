//! SEG-7 background work, safe with any number of replicas: recompute
//! operations are claimed with `FOR UPDATE SKIP LOCKED` and stay their
//! runner's while it heartbeats; one whose runner stopped heartbeating for a
//! lease (`SEGMENTATION_OPERATION_LEASE_SECONDS`) is taken over and run again
//! by another replica (REL-7; a recompute run twice ends the same); the schedule
//! inserts at most one operation per hour, and a calibration when the month
//! has none yet, under an advisory lock; a full recompute runs one at a time
//! (its own advisory lock); the incremental recompute claims dirty customers
//! in batches (see [`crate::recompute`]).

use std::time::Duration;

use chrono::Utc;
use crm_kit::lifecycle::ShutdownSignal;
use crm_proto::segmentation::v1::{OperationState, RecomputeScope};
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::Thresholds;
use crate::{recompute, segments};

/// Queues a recompute; returns its id.
pub async fn request(pool: &PgPool, scope: RecomputeScope) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO recompute_operations (operation_id, scope, state) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(scope as i16)
        .bind(OperationState::Pending as i16)
        .execute(pool)
        .await?;
    Ok(id)
}

/// Queues this month's calibration unless it ran (or was queued in the last
/// day), and the hourly recompute unless one was queued in the last hour.
pub async fn schedule(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('segmentation:schedule'))").execute(&mut *tx).await?;
    sqlx::query(
        "INSERT INTO recompute_operations (operation_id, scope, state) SELECT $1, $2, $3 \
         WHERE NOT EXISTS (SELECT 1 FROM calibration WHERE tiers_at >= date_trunc('month', now(), 'UTC')) \
           AND NOT EXISTS (SELECT 1 FROM recompute_operations WHERE scope = $2 AND created_at > now() - interval '1 day')",
    )
    .bind(Uuid::now_v7())
    .bind(RecomputeScope::Calibration as i16)
    .bind(OperationState::Pending as i16)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO recompute_operations (operation_id, scope, state) SELECT $1, $2, $3 \
         WHERE NOT EXISTS (SELECT 1 FROM recompute_operations WHERE created_at > now() - interval '1 hour')",
    )
    .bind(Uuid::now_v7())
    .bind(RecomputeScope::Full as i16)
    .bind(OperationState::Pending as i16)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// How long a claimed operation stays its runner's without a heartbeat.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Records progress, as long as `worker` still holds the operation.
async fn set(
    pool: &PgPool,
    id: Uuid,
    worker: &str,
    state: OperationState,
    progress: i16,
    step: &str,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE recompute_operations SET state = $2, progress = $3, step = $4, error = $5, heartbeat_at = now(), \
         ended_at = CASE WHEN $2 IN (3, 4) THEN now() ELSE ended_at END WHERE operation_id = $1 AND claimed_by = $6",
    )
    .bind(id)
    .bind(state as i16)
    .bind(progress)
    .bind(step)
    .bind(error)
    .bind(worker)
    .execute(pool)
    .await?;
    Ok(())
}

/// Claims and runs the oldest pending operation, or one whose runner stopped
/// heartbeating for [`DEFAULT_LEASE`]. Returns whether one ran.
pub async fn run_one(pool: &PgPool, worker: &str, thresholds: &Thresholds) -> Result<bool, sqlx::Error> {
    run_one_leased(pool, worker, thresholds, DEFAULT_LEASE).await
}

/// [`run_one`] with a lease of `lease`: the runner heartbeats every third of it.
pub async fn run_one_leased(
    pool: &PgPool,
    worker: &str,
    thresholds: &Thresholds,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let claimed: Option<(Uuid, i16, i16, Option<String>)> = sqlx::query_as(
        "SELECT operation_id, scope, state, claimed_by FROM recompute_operations \
         WHERE state = 1 OR (state = 2 AND (heartbeat_at IS NULL OR heartbeat_at < now() - make_interval(secs => $1))) \
         ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED",
    )
    .bind(lease.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    let Some((id, scope, was, before)) = claimed else { return Ok(false) };
    let step = match (was, before) {
        (2, Some(dead)) => {
            tracing::warn!(operation = %id, runner = %dead, "taking over a recompute whose runner stopped heartbeating");
            format!("taken over from {dead}")
        }
        _ => "starting".to_string(),
    };
    sqlx::query(
        "UPDATE recompute_operations SET state = 2, claimed_by = $2, step = $3, heartbeat_at = now(), attempts = attempts + 1 \
         WHERE operation_id = $1",
    )
    .bind(id)
    .bind(worker)
    .bind(step)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let heartbeat = tokio::spawn(heartbeat(pool.clone(), id, worker.to_string(), lease / 3));
    let now = Utc::now();
    let result = async {
        let mode = match RecomputeScope::try_from(i32::from(scope)) {
            Ok(RecomputeScope::Segments) => None,
            Ok(RecomputeScope::Calibration) => Some(recompute::Mode::Calibration),
            _ => Some(recompute::Mode::Full),
        };
        if let Some(mode) = mode {
            let step = match mode {
                recompute::Mode::Calibration => "calibration and scores (RFM, tiers, grid, lifecycle, churn)",
                recompute::Mode::Full => "scores (RFM, tiers, grid, lifecycle, churn)",
            };
            set(pool, id, worker, OperationState::Running, 10, step, "").await?;
            recompute::run_mode(pool, thresholds, now, mode).await.map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        }
        set(pool, id, worker, OperationState::Running, 70, "segment membership", "").await?;
        let mut conn = pool.acquire().await?;
        segments::refresh(&mut conn, now, None).await.map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        Ok::<_, sqlx::Error>(())
    }
    .await;
    heartbeat.abort();
    match result {
        Ok(()) => set(pool, id, worker, OperationState::Succeeded, 100, "done", "").await?,
        Err(e) => {
            tracing::error!(operation = %id, error = %e, "recompute failed");
            set(pool, id, worker, OperationState::Failed, 100, "failed", &e.to_string()).await?;
        }
    }
    Ok(true)
}

/// Keeps a claimed operation its runner's until aborted or taken over.
async fn heartbeat(pool: PgPool, id: Uuid, worker: String, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let kept = sqlx::query(
            "UPDATE recompute_operations SET heartbeat_at = now() WHERE operation_id = $1 AND claimed_by = $2 AND state = 2",
        )
        .bind(id)
        .bind(&worker)
        .execute(&pool)
        .await;
        match kept {
            Ok(r) if r.rows_affected() == 0 => {
                tracing::warn!(operation = %id, "another replica took the operation over: its result will count");
                return;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(operation = %id, error = %e, "operation heartbeat failed"),
        }
    }
}

/// Runs until shutdown: schedules and works off pending operations (and
/// ones whose runner stopped heartbeating for `lease`).
pub async fn run(pool: PgPool, worker: String, thresholds: Thresholds, lease: Duration, shutdown: ShutdownSignal) {
    let mut last_schedule = std::time::Instant::now() - Duration::from_secs(3600);
    loop {
        if last_schedule.elapsed() >= Duration::from_secs(60) {
            last_schedule = std::time::Instant::now();
            if let Err(e) = schedule(&pool).await {
                tracing::warn!(error = %e, "could not schedule the recompute");
            }
        }
        let ran = match run_one_leased(&pool, &worker, &thresholds, lease).await {
            Ok(ran) => ran,
            Err(e) => {
                tracing::warn!(error = %e, "recompute worker round failed");
                false
            }
        };
        if !ran && !shutdown.sleep(Duration::from_secs(1)).await {
            break;
        }
        if shutdown.is_triggered() {
            break;
        }
    }
}

/// Customers the incremental recompute claims per batch.
pub const INCREMENTAL_BATCH: i64 = 2000;

/// Runs the incremental recompute until shutdown: batch after batch while
/// customers are dirty, then a pause of `idle`.
pub async fn run_incremental(pool: PgPool, thresholds: Thresholds, idle: Duration, shutdown: ShutdownSignal) {
    loop {
        let busy = match recompute::incremental(&pool, &thresholds, Utc::now(), INCREMENTAL_BATCH).await {
            Ok(done) => done.is_some(),
            Err(e) => {
                tracing::warn!(error = %e, "incremental recompute batch failed");
                false
            }
        };
        if shutdown.is_triggered() || (!busy && !shutdown.sleep(idle).await) {
            break;
        }
    }
}
