//! OUT-7 agent tasks: storage, events and the overdue watcher.

use chrono::{DateTime, Utc};
use crm_kit::{ApiError, outbox};
use crm_proto::outreach::v1 as pb;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::SERVICE;
use crate::domain::task;
use crate::messages::ts;

/// Owner of tasks no agent has taken yet (triggers, personal-channel contacts).
pub const AGENT_QUEUE: &str = "queue:account-managers";

/// Columns every task read selects.
pub const COLUMNS: &str = "task_id, customer_id, kind, owner, due_at, status, reason, customer_feedback, problem, next_action, \
     escalation_level, version, created_at, completed_at";

/// A stored task.
#[derive(Debug, Clone, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct TaskRow {
    pub task_id: Uuid,
    pub customer_id: Uuid,
    pub kind: i16,
    pub owner: String,
    pub due_at: DateTime<Utc>,
    pub status: i16,
    pub reason: String,
    pub customer_feedback: String,
    pub problem: String,
    pub next_action: String,
    pub escalation_level: i32,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl TaskRow {
    /// The wire form.
    pub fn to_wire(&self) -> pb::Task {
        pb::Task {
            task_id: self.task_id.to_string(),
            customer_id: self.customer_id.to_string(),
            kind: self.kind as i32,
            owner: self.owner.clone(),
            due_time: Some(ts(self.due_at)),
            status: self.status as i32,
            reason: self.reason.clone(),
            customer_feedback: self.customer_feedback.clone(),
            problem: self.problem.clone(),
            next_action: self.next_action.clone(),
            escalation_level: self.escalation_level,
            create_time: Some(ts(self.created_at)),
            complete_time: self.completed_at.map(ts),
            etag: format!("v{}", self.version),
        }
    }
}

/// A task to create.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Customer.
    pub customer_id: Uuid,
    /// Kind.
    pub kind: pb::TaskKind,
    /// Owner.
    pub owner: String,
    /// Due.
    pub due_at: DateTime<Utc>,
    /// Why.
    pub reason: String,
    /// Triggers create a task once per key.
    pub dedupe_key: Option<String>,
}

/// Creates a task (or returns the one with the same dedupe key) and emits
/// TaskCreated, in the caller's transaction.
pub async fn create_in(tx: &mut PgConnection, t: NewTask, request_id: &str) -> Result<TaskRow, ApiError> {
    let sql = format!(
        "INSERT INTO tasks (task_id, customer_id, kind, owner, due_at, status, reason, dedupe_key) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (dedupe_key) DO NOTHING RETURNING {COLUMNS}"
    );
    let created: Option<TaskRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(Uuid::now_v7())
        .bind(t.customer_id)
        .bind(t.kind as i16)
        .bind(&t.owner)
        .bind(t.due_at)
        .bind(pb::TaskStatus::Planned as i16)
        .bind(&t.reason)
        .bind(&t.dedupe_key)
        .fetch_optional(&mut *tx)
        .await?;
    match created {
        Some(row) => {
            let event = pb::TaskCreated { task: Some(crate::privacy::task_event(row.to_wire())) };
            let id = row.task_id.to_string();
            outbox::enqueue(tx, SERVICE, outbox::Aggregate { kind: "task", id: &id }, request_id, &event).await?;
            Ok(row)
        }
        None => {
            let sql = format!("SELECT {COLUMNS} FROM tasks WHERE dedupe_key = $1");
            Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(&t.dedupe_key).fetch_one(&mut *tx).await?)
        }
    }
}

/// OUT-7: marks open tasks past their due time OVERDUE and raises their
/// escalation level; returns how many changed. Safe on any number of
/// replicas: the update is idempotent and row-locked.
pub async fn escalate_overdue(tx: &mut PgConnection, now: DateTime<Utc>) -> Result<u64, sqlx::Error> {
    let open: Vec<(Uuid, DateTime<Utc>, i32)> = sqlx::query_as(
        "SELECT task_id, due_at, escalation_level FROM tasks WHERE status IN (1, 2, 5) AND due_at <= $1 \
         ORDER BY due_at LIMIT 1000 FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    let (ids, levels): (Vec<Uuid>, Vec<i32>) = open
        .into_iter()
        .filter_map(|(id, due, level)| {
            let next = task::escalation_level(due, now);
            (next > level).then_some((id, next))
        })
        .unzip();
    if ids.is_empty() {
        return Ok(0);
    }
    for (id, level) in ids.iter().zip(&levels) {
        tracing::warn!(task_id = %id, escalation_level = level, "task overdue: escalated");
    }
    let done = sqlx::query(
        "UPDATE tasks t SET status = 5, escalation_level = u.level, version = version + 1 \
         FROM UNNEST($1::uuid[], $2::int[]) AS u(id, level) WHERE t.task_id = u.id",
    )
    .bind(&ids)
    .bind(&levels)
    .execute(&mut *tx)
    .await?;
    Ok(done.rows_affected())
}
