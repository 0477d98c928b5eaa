//! FBK-3/FBK-4 closed loop with the customer, through outreach: an
//! acknowledgement when feedback arrives, a resolution check when its ticket
//! is resolved (the answer comes back as RecordVerification).
//!
//! A call is written to `loop_calls` in the same transaction as the change
//! that causes it, then made at once (after commit) and, if outreach cannot
//! be reached, again with backoff by whichever replica finds it due. A call
//! is written already leased to the replica that makes it at once
//! ([`Start`]), so making it costs no write of its own to claim it. Each
//! call has a fixed outreach `request_id`, so a retry, or two replicas making
//! the same call, send one message. The call continues the trace of the
//! request that caused it. Before acknowledging an item whose customer could
//! not be checked at intake, profiles is asked again (FBK-1).

use chrono::{DateTime, Duration, Utc};
use crm_kit::ApiError;
use crm_kit::telemetry;
use crm_proto::common::v1::TraceContext;
use crm_proto::outreach::v1 as outreach;
use futures_util::StreamExt;
use sqlx::PgConnection;
use tracing::Instrument;
use uuid::Uuid;

use crate::desk::Desk;
use crate::partners::{CallError, CustomerCheck};

/// Calls the worker makes at the same time.
const WORKER_CONCURRENCY: usize = 8;

/// What a call tells the customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopKind {
    /// "We received your feedback."
    Acknowledge,
    /// "Your ticket was resolved: is it?"
    ResolutionCheck,
}

/// A call to make, with the trace context of the request that causes it.
#[derive(Debug, Clone)]
pub struct LoopCall {
    /// Id.
    pub call_id: Uuid,
    /// What it says.
    pub kind: LoopKind,
    /// The item.
    pub feedback_id: Uuid,
    /// Its ticket.
    pub ticket_id: Option<Uuid>,
    /// outreach's idempotency key: one message whatever the retries.
    pub request_id: String,
    /// W3C trace context.
    pub traceparent: String,
    /// W3C trace state.
    pub tracestate: String,
    /// When it is first due.
    pub due: DateTime<Utc>,
}

impl LoopCall {
    /// A call in the current trace, due at `now`.
    pub fn new(
        kind: LoopKind,
        feedback_id: Uuid,
        ticket_id: Option<Uuid>,
        request_id: String,
        now: DateTime<Utc>,
    ) -> Self {
        let tc = telemetry::event_trace_context();
        LoopCall {
            call_id: Uuid::now_v7(),
            kind,
            feedback_id,
            ticket_id,
            request_id,
            traceparent: tc.traceparent,
            tracestate: tc.tracestate,
            due: now,
        }
    }
}

impl LoopKind {
    /// As stored.
    pub fn key(self) -> &'static str {
        match self {
            LoopKind::Acknowledge => "acknowledge",
            LoopKind::ResolutionCheck => "resolution_check",
        }
    }
}

/// Records a call to make, in the caller's transaction, with the current
/// trace context ([`Start`] decides how it is first made); returns it when
/// this replica makes it after commit. A call already recorded under
/// `request_id` is left as it is.
pub async fn enqueue(
    conn: &mut PgConnection,
    desk: &Desk,
    kind: LoopKind,
    feedback_id: Uuid,
    ticket_id: Option<Uuid>,
    request_id: &str,
    now: DateTime<Utc>,
) -> Result<Option<Leased>, ApiError> {
    let call = LoopCall::new(kind, feedback_id, ticket_id, request_id.to_string(), now);
    let start = Start::choose(desk);
    let (attempts, next_attempt, done, outcome) = start.birth(desk, now);
    let recorded: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO loop_calls (call_id, kind, feedback_id, ticket_id, request_id, traceparent, tracestate, \
                                 attempts, next_attempt_at, done_at, outcome, created_at) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12) ON CONFLICT (request_id) DO NOTHING RETURNING call_id",
    )
    .bind(call.call_id)
    .bind(kind.key())
    .bind(feedback_id)
    .bind(ticket_id)
    .bind(&call.request_id)
    .bind(&call.traceparent)
    .bind(&call.tracestate)
    .bind(attempts)
    .bind(next_attempt)
    .bind(done)
    .bind(outcome)
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(recorded.and_then(|_| call.leased(start, None)))
}

#[derive(Debug, sqlx::FromRow)]
struct Due {
    call_id: Uuid,
    kind: String,
    feedback_id: Uuid,
    ticket_id: Option<Uuid>,
    request_id: String,
    traceparent: String,
    tracestate: String,
    attempts: i32,
}

const RETURNING: &str =
    "RETURNING call_id, kind, feedback_id, ticket_id, request_id, traceparent, tracestate, attempts";

/// How a call recorded with the change that causes it is first made.
#[derive(Debug)]
pub enum Start {
    /// By this replica right after commit: the row is written already
    /// leased (attempt 1), so neither a worker nor another replica makes it
    /// meanwhile, and no second write is needed to claim it.
    Now(tokio::sync::OwnedSemaphorePermit),
    /// By whichever worker finds it due (every slot for immediate calls is busy).
    Later,
    /// Never: outreach is not configured, so the row is written settled.
    Skipped,
}

/// What the call's row says at birth: attempts, next attempt, done, outcome.
pub type Birth = (i32, DateTime<Utc>, Option<DateTime<Utc>>, &'static str);

const SKIPPED: &str = "skipped: FEEDBACK_OUTREACH_URL is not set";

impl Start {
    /// Chooses, taking a slot for an immediate call when one is free.
    pub fn choose(desk: &Desk) -> Start {
        if desk.outreach.is_none() {
            return Start::Skipped;
        }
        match desk.calls_in_flight.clone().try_acquire_owned() {
            Ok(permit) => Start::Now(permit),
            Err(_) => Start::Later,
        }
    }

    /// The row's columns at `now`.
    pub fn birth(&self, desk: &Desk, now: DateTime<Utc>) -> Birth {
        match self {
            Start::Now(_) => (1, now + desk.settings.call_lease, None, ""),
            Start::Later => (0, now, None, ""),
            Start::Skipped => (0, now, Some(now), SKIPPED),
        }
    }
}

/// A call written leased at birth ([`Start::Now`]), with what it needs of its item.
#[derive(Debug)]
pub struct Leased {
    permit: tokio::sync::OwnedSemaphorePermit,
    due: Due,
    item: Option<Item>,
}

impl LoopCall {
    /// The call as made right after commit, when `start` leased it at birth;
    /// `item` is what the caller knows of the item (read when needed otherwise).
    pub fn leased(&self, start: Start, item: Option<Item>) -> Option<Leased> {
        let Start::Now(permit) = start else { return None };
        Some(Leased {
            permit,
            due: Due {
                call_id: self.call_id,
                kind: self.kind.key().to_string(),
                feedback_id: self.feedback_id,
                ticket_id: self.ticket_id,
                request_id: self.request_id.clone(),
                traceparent: self.traceparent.clone(),
                tracestate: self.tracestate.clone(),
                attempts: 1,
            },
            item,
        })
    }
}

/// Makes a call leased at birth, after the commit that recorded it, in the
/// current span. If this replica stops first, the lease runs out and a
/// worker makes it (same request id: one message).
pub fn make_leased(desk: &Desk, call: Leased) {
    let desk = desk.clone();
    let span = tracing::info_span!("feedback.closed_loop", call_id = %call.due.call_id);
    tokio::spawn(
        async move {
            let _permit = call.permit;
            let now = desk.clock.now();
            make(&desk, call.due, call.item, now).await;
        }
        .instrument(span),
    );
}

/// Makes up to `limit` due calls (the background worker); returns how many it tried.
pub async fn run_due(desk: &Desk, limit: i64) -> Result<usize, sqlx::Error> {
    let now = desk.clock.now();
    let due: Vec<Due> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE loop_calls SET attempts = attempts + 1, next_attempt_at = $2 WHERE call_id IN ( \
             SELECT call_id FROM loop_calls WHERE done_at IS NULL AND next_attempt_at <= $1 \
             ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED) {RETURNING}"
    )))
    .bind(now)
    .bind(now + desk.settings.call_lease)
    .bind(limit)
    .fetch_all(&desk.pool)
    .await?;
    let n = due.len();
    let calls = due.into_iter().map(|d| {
        // Continue the trace of the request that caused the call.
        let span = tracing::info_span!("feedback.closed_loop", call_id = %d.call_id, attempt = d.attempts,
            trace_id = tracing::field::Empty, span_id = tracing::field::Empty);
        let tc = TraceContext { traceparent: d.traceparent.clone(), tracestate: d.tracestate.clone() };
        telemetry::adopt_parent(&span, telemetry::context_from_event(Some(&tc)));
        make(desk, d, None, now).instrument(span)
    });
    // A few at a time: a backlog drains without flooding outreach.
    futures_util::stream::iter(calls).buffer_unordered(WORKER_CONCURRENCY).collect::<Vec<()>>().await;
    Ok(n)
}

/// What a call needs of its item.
#[derive(Debug, sqlx::FromRow)]
pub struct Item {
    /// The customer.
    pub customer_id: Uuid,
    /// Confirmed by profiles.
    pub customer_verified: bool,
    /// Channel code.
    pub channel: i16,
    /// "zh" or "en".
    pub language: String,
}

async fn make(desk: &Desk, due: Due, item: Option<Item>, now: DateTime<Utc>) {
    let outcome = call(desk, &due, item).await;
    let (done, text) = match &outcome {
        Ok(text) => (true, text.clone()),
        Err(CallError::Permanent(m)) => (true, format!("gave up: {m}")),
        Err(CallError::Retry(m)) => (false, m.clone()),
    };
    if !done {
        desk.metrics.loop_retries.inc();
        tracing::warn!(call_id = %due.call_id, attempt = due.attempts, error = %text, "closed-loop call failed; will retry");
    }
    let backoff = Duration::seconds(2i64.saturating_pow(due.attempts.clamp(1, 10) as u32).min(600));
    let settled = sqlx::query(
        "UPDATE loop_calls SET done_at = CASE WHEN $2 THEN $3 ELSE NULL END, outcome = $4, \
         next_attempt_at = CASE WHEN $2 THEN next_attempt_at ELSE $5 END WHERE call_id = $1",
    )
    .bind(due.call_id)
    .bind(done)
    .bind(now)
    .bind(&text)
    .bind(now + backoff)
    .execute(&desk.pool)
    .await;
    if let Err(e) = settled {
        // The lease runs out and the call is made again (same request id: no second message).
        tracing::warn!(call_id = %due.call_id, error = %e, "could not record a closed-loop call's outcome");
    }
}

/// Makes one call; `item` is what the caller already knows of the item (read otherwise).
async fn call(desk: &Desk, due: &Due, item: Option<Item>) -> Result<String, CallError> {
    let Some(outreach) = desk.outreach.as_ref() else {
        return Ok(SKIPPED.into());
    };
    let retry = |e: sqlx::Error| CallError::Retry(format!("database: {e}"));
    let item: Item = match item {
        Some(item) => item,
        None => sqlx::query_as(
            "SELECT customer_id, customer_verified, channel, language FROM feedback WHERE feedback_id = $1",
        )
        .bind(due.feedback_id)
        .fetch_one(&desk.pool)
        .await
        .map_err(retry)?,
    };
    let mut customer = item.customer_id;
    if !item.customer_verified
        && let Some(profiles) = desk.profiles.as_ref()
    {
        match profiles.check(customer).await? {
            CustomerCheck::Live(live) => {
                crate::intake::confirm_customer(&desk.pool, due.feedback_id, live).await.map_err(retry)?;
                customer = live;
            }
            CustomerCheck::Unknown => return Err(CallError::Permanent("profiles does not know the customer".into())),
            CustomerCheck::Erased => return Err(CallError::Permanent("the customer was erased".into())),
        }
    }
    let kind = match due.kind.as_str() {
        "resolution_check" => outreach::AcknowledgementKind::ResolutionCheck,
        _ => outreach::AcknowledgementKind::Received,
    };
    let request = outreach::AcknowledgeFeedbackRequest {
        customer_id: customer.to_string(),
        feedback_id: due.feedback_id.to_string(),
        ticket_id: due.ticket_id.map(|t| t.to_string()).unwrap_or_default(),
        channel: i32::from(item.channel),
        locale: if item.language == "en" { "en".into() } else { "zh-CN".into() },
        request_id: due.request_id.clone(),
        kind: kind as i32,
    };
    outreach.acknowledge(request).await
}
