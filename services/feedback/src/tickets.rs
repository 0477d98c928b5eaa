//! FBK-3 in storage: tickets, their SLA clocks and history. The rules are in
//! [`crate::domain::ticket`] and [`crate::domain::sla`]; this module loads a
//! ticket under its row lock, applies a rule, and writes the result with its
//! events in the caller's transaction. The API and the SLA watcher both go
//! through [`lock`], so a breach is recorded once whoever sees it first.

use chrono::{DateTime, Duration, Utc};
use crm_kit::ApiError;
use crm_kit::outbox::{self, Aggregate};
use crm_proto::feedback::v1 as pb;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::SERVICE;
use crate::desk::Desk;
use crate::domain::classify::Category;
use crate::domain::sla::{Calendar, ClockKind, Counting, SlaClock};
use crate::domain::ticket::{self, ClockEffect, Escalation, State};
use crate::wire::{self, ts, ts_opt};

/// A ticket as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TicketRow {
    /// Id.
    pub ticket_id: Uuid,
    /// The item it came from.
    pub feedback_id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// Category code.
    pub category: i16,
    /// Urgent policy.
    pub urgent: bool,
    /// Queue.
    pub queue: String,
    /// Assignee ('' if none).
    pub assignee: String,
    /// State code.
    pub state: i16,
    /// Topic key.
    pub topic: String,
    /// FBK-4 link.
    pub repeat_of: Option<Uuid>,
    /// Escalation level reached.
    pub escalation_level: i16,
    /// When the next escalation step is due.
    pub next_escalation_at: Option<DateTime<Utc>>,
    /// Times resolved (a reopened ticket is resolved again).
    pub resolutions: i32,
    /// Optimistic-concurrency version.
    pub version: i64,
    /// Opened.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

const TICKET_COLUMNS: &str = "ticket_id, feedback_id, customer_id, category, urgent, queue, assignee, state, topic, repeat_of, \
     escalation_level, next_escalation_at, resolutions, version, created_at, updated_at";

impl TicketRow {
    /// Its state.
    pub fn state(&self) -> State {
        State::from_code(self.state).unwrap_or(State::Open)
    }

    /// Its category.
    pub fn category(&self) -> Category {
        wire::category_of_code(self.category)
    }

    /// Its etag.
    pub fn etag(&self) -> String {
        format!("v{}", self.version)
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct ClockRow {
    ticket_id: Uuid,
    kind: String,
    target_s: i64,
    business_hours: bool,
    elapsed_closed_s: i64,
    running_since: Option<DateTime<Utc>>,
    paused: bool,
    met_at: Option<DateTime<Utc>>,
    breached_at: Option<DateTime<Utc>>,
}

impl ClockRow {
    fn into_domain(self) -> Option<SlaClock> {
        Some(SlaClock {
            kind: ClockKind::from_key(&self.kind)?,
            target: self.target_s,
            counting: if self.business_hours { Counting::BusinessHours } else { Counting::Always },
            elapsed_closed: self.elapsed_closed_s,
            running_since: self.running_since,
            paused: self.paused,
            met_at: self.met_at,
            breached_at: self.breached_at,
        })
    }
}

/// The ticket `id`, locked for the rest of the transaction.
pub async fn lock(conn: &mut PgConnection, id: Uuid) -> Result<TicketRow, ApiError> {
    sqlx::query_as::<_, TicketRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {TICKET_COLUMNS} FROM tickets WHERE ticket_id = $1 FOR UPDATE"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| ApiError::not_found("ticket", id.to_string()))
}

/// The ticket `id` (no lock).
pub async fn get(conn: &mut PgConnection, id: Uuid) -> Result<TicketRow, ApiError> {
    sqlx::query_as::<_, TicketRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {TICKET_COLUMNS} FROM tickets WHERE ticket_id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| ApiError::not_found("ticket", id.to_string()))
}

/// The clocks of a ticket.
pub async fn clocks(conn: &mut PgConnection, id: Uuid) -> Result<Vec<SlaClock>, ApiError> {
    let rows: Vec<ClockRow> = sqlx::query_as(
        "SELECT ticket_id, kind, target_s, business_hours, elapsed_closed_s, running_since, paused, met_at, breached_at \
         FROM sla_clocks WHERE ticket_id = $1 ORDER BY kind",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().filter_map(ClockRow::into_domain).collect())
}

/// Writes the clocks of a ticket and its earliest running deadline.
async fn save_clocks(conn: &mut PgConnection, cal: &Calendar, id: Uuid, clocks: &[SlaClock]) -> Result<(), ApiError> {
    for c in clocks {
        sqlx::query(
            "INSERT INTO sla_clocks (ticket_id, kind, target_s, business_hours, elapsed_closed_s, running_since, paused, met_at, deadline_at, breached_at) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10) ON CONFLICT (ticket_id, kind) DO UPDATE SET \
             target_s = EXCLUDED.target_s, business_hours = EXCLUDED.business_hours, elapsed_closed_s = EXCLUDED.elapsed_closed_s, \
             running_since = EXCLUDED.running_since, paused = EXCLUDED.paused, met_at = EXCLUDED.met_at, \
             deadline_at = EXCLUDED.deadline_at, breached_at = EXCLUDED.breached_at",
        )
        .bind(id)
        .bind(c.kind.key())
        .bind(c.target)
        .bind(c.counting == Counting::BusinessHours)
        .bind(c.elapsed_closed)
        .bind(c.running_since)
        .bind(c.paused)
        .bind(c.met_at)
        .bind(c.deadline(cal))
        .bind(c.breached_at)
        .execute(&mut *conn)
        .await?;
    }
    let next = clocks.iter().filter(|c| c.breached_at.is_none()).filter_map(|c| c.deadline(cal)).min();
    sqlx::query("UPDATE tickets SET next_deadline_at = $2 WHERE ticket_id = $1")
        .bind(id)
        .bind(next)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Appends to a ticket's history.
pub async fn record(
    conn: &mut PgConnection,
    id: Uuid,
    at: DateTime<Utc>,
    actor: &str,
    action: &str,
    states: Option<(State, State)>,
    note: &str,
) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO ticket_history (ticket_id, at, actor, action, from_state, to_state, note) VALUES ($1,$2,$3,$4,$5,$6,$7)",
    )
    .bind(id)
    .bind(at)
    .bind(actor)
    .bind(action)
    .bind(states.map(|s| s.0.code()))
    .bind(states.map(|s| s.1.code()))
    .bind(note)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// What a new ticket is opened from.
#[derive(Debug, Clone)]
pub struct NewTicket {
    /// Its id (chosen by the caller, so the item can name it when it is written).
    pub ticket_id: Uuid,
    /// The item.
    pub feedback_id: Uuid,
    /// The live customer.
    pub customer_id: Uuid,
    /// Category.
    pub category: Category,
    /// Urgent.
    pub urgent: bool,
    /// Topic key.
    pub topic: String,
}

/// Opens a ticket: routing, clocks, the FBK-4 repeat link, history and
/// TicketOpened, written in one statement. The caller holds the customer's
/// intake lock, so two items of one customer cannot both miss each other as
/// repeats. Returns the row and its wire form.
pub async fn open(
    conn: &mut PgConnection,
    desk: &Desk,
    new: &NewTicket,
    request_id: &str,
    now: DateTime<Utc>,
) -> Result<(TicketRow, pb::Ticket), ApiError> {
    let policy = desk.policies.of(new.category, new.urgent);
    let topic = repeat_key(&new.topic, new.category);
    let repeat_of: Option<Uuid> = sqlx::query_scalar(
        "SELECT ticket_id FROM tickets WHERE customer_id = $1 AND topic = $2 AND created_at >= $3 AND created_at <= $4 \
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(new.customer_id)
    .bind(&topic)
    .bind(now - Duration::days(desk.settings.repeat_window_days))
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    let clocks: Vec<SlaClock> = ticket::clock_targets(&policy, &desk.calendar)
        .into_iter()
        .map(|(kind, target)| SlaClock::start(kind, target, policy.counting, now))
        .collect();
    let deadlines: Vec<Option<DateTime<Utc>>> = clocks.iter().map(|c| c.deadline(&desk.calendar)).collect();
    let row = TicketRow {
        ticket_id: new.ticket_id,
        feedback_id: new.feedback_id,
        customer_id: new.customer_id,
        category: wire::category_code(new.category),
        urgent: new.urgent,
        queue: policy.queue.to_string(),
        assignee: String::new(),
        state: State::Open.code(),
        topic,
        repeat_of,
        escalation_level: 0,
        next_escalation_at: None,
        resolutions: 0,
        version: 1,
        created_at: now,
        updated_at: now,
    };
    let note = match repeat_of {
        Some(r) => format!("routed to {}; repeats ticket {r} (FBK-4)", policy.queue),
        None => format!("routed to {}", policy.queue),
    };
    let wire = to_wire(&row, &clocks, &desk.calendar, now, Vec::new());
    let id = row.ticket_id.to_string();
    let event = outbox::Staged::new(
        SERVICE,
        Aggregate { kind: "ticket", id: &id },
        request_id,
        &pb::TicketOpened { ticket: Some(wire.clone()) },
    )?;
    let (event_ids, types, aggregates, envelopes) = outbox::Staged::columns(&[event]);
    sqlx::query(
        "WITH t AS (INSERT INTO tickets (ticket_id, feedback_id, customer_id, category, urgent, queue, state, topic, repeat_of, \
                    next_deadline_at, created_at, updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$11)), \
              c AS (INSERT INTO sla_clocks (ticket_id, kind, target_s, business_hours, running_since, deadline_at) \
                    SELECT $1, k, s, $12, $11, d FROM UNNEST($13::text[], $14::bigint[], $15::timestamptz[]) AS x(k, s, d)), \
              h AS (INSERT INTO ticket_history (ticket_id, at, actor, action, note) VALUES ($1, $11, 'system', 'opened', $16)), \
              f AS (UPDATE feedback SET ticket_id = $1 WHERE feedback_id = $2 AND ticket_id IS DISTINCT FROM $1) \
         INSERT INTO kit_outbox (event_id, event_type, aggregate_id, envelope) \
         SELECT * FROM UNNEST($17::uuid[], $18::text[], $19::text[], $20::bytea[])",
    )
    .bind(row.ticket_id)
    .bind(row.feedback_id)
    .bind(row.customer_id)
    .bind(row.category)
    .bind(row.urgent)
    .bind(&row.queue)
    .bind(row.state)
    .bind(&row.topic)
    .bind(row.repeat_of)
    .bind(deadlines.iter().flatten().min().copied())
    .bind(now)
    .bind(policy.counting == Counting::BusinessHours)
    .bind(clocks.iter().map(|c| c.kind.key().to_string()).collect::<Vec<_>>())
    .bind(clocks.iter().map(|c| c.target).collect::<Vec<_>>())
    .bind(&deadlines)
    .bind(&note)
    .bind(&event_ids)
    .bind(&types)
    .bind(&aggregates)
    .bind(&envelopes)
    .execute(&mut *conn)
    .await?;
    Ok((row, wire))
}

/// FBK-4: the key under which repeats are found. A specific topic
/// ("delivery") links across categories; without one, the category does.
pub fn repeat_key(topic: &str, category: Category) -> String {
    if topic == "general" { format!("general:{}", category.key()) } else { topic.to_string() }
}

/// What a change did, for the caller's response and side effects.
#[derive(Debug, Default)]
pub struct Changed {
    /// SLA breaches recorded by this change.
    pub breaches: usize,
    /// A resolution check to send to the customer (ticket resolved).
    pub resolution_check: bool,
}

/// Moves a ticket from its state to `to` (FBK-3), applying the clock effect,
/// events and history; with `new_category`, re-categorises it first.
#[allow(clippy::too_many_arguments)]
pub async fn transition(
    conn: &mut PgConnection,
    desk: &Desk,
    t: &mut TicketRow,
    to: State,
    note: &str,
    actor: &str,
    request_id: &str,
    now: DateTime<Utc>,
) -> Result<Changed, ApiError> {
    let from = t.state();
    let Some(effect) = ticket::transition(from, to) else {
        let allowed: Vec<&str> = ticket::next_states(from).iter().map(|s| s.name()).collect();
        return Err(ApiError::failed_precondition(
            "ILLEGAL_TRANSITION",
            format!(
                "a ticket cannot go from {} to {}; from {} it can go to {}",
                from.name(),
                to.name(),
                from.name(),
                if allowed.is_empty() { "nothing (final)".to_string() } else { allowed.join(", ") }
            ),
        ));
    };
    let policy = desk.policies.of(t.category(), t.urgent);
    let mut clocks = clocks(conn, t.ticket_id).await?;
    let mut changed = Changed::default();
    // A late response is a breach too, even if the watcher has not seen it yet.
    changed.breaches += breach_due(conn, desk, t, &mut clocks, request_id, now).await?;
    let cal = &desk.calendar;
    for c in clocks.iter_mut() {
        match (effect, c.kind) {
            (ClockEffect::MeetFirstResponse, ClockKind::FirstResponse) => c.meet(cal, now),
            (ClockEffect::MeetResolution, _) => c.meet(cal, now),
            (ClockEffect::Pause, _) if policy.pausable => c.pause(cal, now),
            (ClockEffect::Resume, _) => c.resume(now),
            (ClockEffect::ReopenResolution, ClockKind::Resolution) => c.reopen(now),
            _ => {}
        }
    }
    // The escalation chain stops once every breached clock has been met.
    let escalation_stops = clocks.iter().filter(|c| c.breached_at.is_some()).all(|c| c.met_at.is_some());
    save_clocks(conn, cal, t.ticket_id, &clocks).await?;
    if to == State::Resolved {
        t.resolutions += 1;
        changed.resolution_check = true;
    }
    *t = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE tickets SET state = $2, resolutions = $3, version = version + 1, updated_at = $4, \
         next_escalation_at = CASE WHEN $5 THEN NULL ELSE next_escalation_at END \
         WHERE ticket_id = $1 RETURNING {TICKET_COLUMNS}"
    )))
    .bind(t.ticket_id)
    .bind(to.code())
    .bind(t.resolutions)
    .bind(now)
    .bind(escalation_stops)
    .fetch_one(&mut *conn)
    .await?;
    record(conn, t.ticket_id, now, actor, "transition", Some((from, to)), note).await?;
    let aggregate = t.ticket_id.to_string();
    let agg = Aggregate { kind: "ticket", id: &aggregate };
    match to {
        State::Resolved => {
            let elapsed = |k: ClockKind| clocks.iter().find(|c| c.kind == k).map(|c| c.elapsed(cal, now)).unwrap_or(0);
            let event = pb::TicketResolved {
                ticket_id: aggregate.clone(),
                customer_id: t.customer_id.to_string(),
                category: wire::category_to_pb(t.category()) as i32,
                first_response_seconds: elapsed(ClockKind::FirstResponse),
                resolution_seconds: clocks
                    .iter()
                    .find(|c| c.kind == ClockKind::Resolution)
                    .map(|c| c.elapsed(cal, now))
                    .unwrap_or_else(|| sla_elapsed_since(cal, policy.counting, t.created_at, now)),
                resolve_time: Some(ts(now)),
            };
            outbox::enqueue(conn, SERVICE, agg, request_id, &event).await?;
        }
        State::Verified | State::Reopened => {
            let event = pb::TicketVerified {
                ticket_id: aggregate.clone(),
                customer_id: t.customer_id.to_string(),
                confirmed: to == State::Verified,
                verify_time: Some(ts(now)),
            };
            outbox::enqueue(conn, SERVICE, agg, request_id, &event).await?;
        }
        _ => {}
    }
    Ok(changed)
}

/// Counted time since `from` (resolution time of a policy without a resolution clock).
fn sla_elapsed_since(cal: &Calendar, counting: Counting, from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
    crate::domain::sla::counted(cal, counting, from, to)
}

/// FBK-3: re-categorises a ticket: new policy and queue, with the time already
/// spent carried over to the new targets.
pub async fn recategorise(
    conn: &mut PgConnection,
    desk: &Desk,
    t: &mut TicketRow,
    category: Category,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    if t.category() == category {
        return Ok(());
    }
    let old = t.category();
    let policy = desk.policies.of(category, t.urgent);
    let targets = ticket::clock_targets(&policy, &desk.calendar);
    let mut clocks = clocks(conn, t.ticket_id).await?;
    for c in clocks.iter_mut() {
        if let Some((_, target)) = targets.iter().find(|(k, _)| *k == c.kind) {
            c.retarget(&desk.calendar, *target, policy.counting, now);
        }
    }
    // A clock the new policy has and the old did not starts with the ticket's age.
    for (kind, target) in &targets {
        if !clocks.iter().any(|c| c.kind == *kind) {
            let mut c = SlaClock::start(*kind, *target, policy.counting, t.created_at);
            if !t.state().is_open() {
                c.meet(&desk.calendar, now);
            }
            clocks.push(c);
        }
    }
    save_clocks(conn, &desk.calendar, t.ticket_id, &clocks).await?;
    *t = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE tickets SET category = $2, queue = $3, version = version + 1, updated_at = $4 WHERE ticket_id = $1 RETURNING {TICKET_COLUMNS}"
    )))
    .bind(t.ticket_id)
    .bind(wire::category_code(category))
    .bind(policy.queue)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    let note = format!("{} -> {}, queue {}; time spent carried over", old.key(), category.key(), policy.queue);
    record(conn, t.ticket_id, now, actor, "recategorised", None, &note).await
}

/// Records every clock of `t` that is due at `now` and not yet recorded:
/// SlaBreached once per clock, and one escalation step (FBK-3). Returns how
/// many breaches it recorded. The caller holds the ticket's lock.
pub async fn breach_due(
    conn: &mut PgConnection,
    desk: &Desk,
    t: &mut TicketRow,
    clocks: &mut [SlaClock],
    request_id: &str,
    now: DateTime<Utc>,
) -> Result<usize, ApiError> {
    let mut n = 0;
    for c in clocks.iter_mut() {
        if c.breached_at.is_some() || c.met_at.is_some() || !c.is_breached_at(&desk.calendar, now) {
            continue;
        }
        let deadline = c.deadline(&desk.calendar);
        c.breached_at = Some(now);
        let passed = deadline.map(|d| d.to_rfc3339()).unwrap_or_default();
        record(
            conn,
            t.ticket_id,
            now,
            "system",
            "sla_breached",
            None,
            &format!("{} deadline {passed} passed", c.kind.key()),
        )
        .await?;
        escalate(conn, desk, t, now).await?;
        let event = pb::SlaBreached {
            ticket_id: t.ticket_id.to_string(),
            customer_id: t.customer_id.to_string(),
            clock: c.kind.key().to_string(),
            deadline: ts_opt(deadline),
            category: wire::category_to_pb(t.category()) as i32,
            escalation_level: i32::from(t.escalation_level),
        };
        outbox::enqueue(conn, SERVICE, Aggregate { kind: "ticket", id: &t.ticket_id.to_string() }, request_id, &event)
            .await?;
        desk.metrics.breaches.inc();
        n += 1;
    }
    if n > 0 {
        save_clocks(conn, &desk.calendar, t.ticket_id, clocks).await?;
    }
    Ok(n)
}

/// One step of the escalation chain (notify, reassign to the queue's
/// supervisor, notify the department head); the next is due one
/// `escalation_step` later.
pub async fn escalate(
    conn: &mut PgConnection,
    desk: &Desk,
    t: &mut TicketRow,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let Some(step) = Escalation::after(t.escalation_level) else {
        return Ok(());
    };
    let (supervisor, head): (String, String) = sqlx::query_as("SELECT supervisor, head FROM queues WHERE queue = $1")
        .bind(&t.queue)
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or_else(|| ("supervisor".into(), "head".into()));
    let (assignee, note) = match step {
        Escalation::Notify => (
            t.assignee.clone(),
            format!(
                "notified {} and queue {}",
                if t.assignee.is_empty() { "no assignee" } else { &t.assignee },
                t.queue
            ),
        ),
        Escalation::Reassign => {
            (supervisor.clone(), format!("reassigned from {:?} to supervisor {supervisor}", t.assignee))
        }
        Escalation::NotifyHead => (t.assignee.clone(), format!("notified department head {head}")),
    };
    let next = (step != Escalation::NotifyHead).then(|| now + desk.settings.escalation_step);
    *t = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE tickets SET escalation_level = $2, assignee = $3, next_escalation_at = $4, version = version + 1, updated_at = $5 \
         WHERE ticket_id = $1 RETURNING {TICKET_COLUMNS}"
    )))
    .bind(t.ticket_id)
    .bind(step.level())
    .bind(&assignee)
    .bind(next)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    desk.metrics.escalations.inc();
    tracing::warn!(ticket_id = %t.ticket_id, level = step.level(), queue = %t.queue, %note, "ticket escalated (FBK-3)");
    record(conn, t.ticket_id, now, "system", "escalated", None, &format!("level {}: {note}", step.level())).await
}

/// The wire form of a ticket with its clocks as of `now`.
pub fn to_wire(
    t: &TicketRow,
    clocks: &[SlaClock],
    cal: &Calendar,
    now: DateTime<Utc>,
    history: Vec<pb::TicketHistoryEntry>,
) -> pb::Ticket {
    pb::Ticket {
        ticket_id: t.ticket_id.to_string(),
        customer_id: t.customer_id.to_string(),
        feedback_id: t.feedback_id.to_string(),
        category: wire::category_to_pb(t.category()) as i32,
        urgent: t.urgent,
        queue: t.queue.clone(),
        assignee: t.assignee.clone(),
        state: wire::state_to_pb(t.state()) as i32,
        sla_clocks: clocks
            .iter()
            .map(|c| pb::SlaClock {
                kind: c.kind.key().to_string(),
                deadline: ts_opt(c.deadline(cal)),
                paused: c.paused,
                breached: c.breached_at.is_some() || (c.met_at.is_none() && c.is_breached_at(cal, now)),
                met_time: ts_opt(c.met_at),
                elapsed_seconds: c.elapsed(cal, now),
            })
            .collect(),
        escalation_level: i32::from(t.escalation_level),
        repeat_of_ticket_id: t.repeat_of.map(|r| r.to_string()).unwrap_or_default(),
        topic: t.topic.clone(),
        create_time: Some(ts(t.created_at)),
        update_time: Some(ts(t.updated_at)),
        etag: t.etag(),
        history,
    }
}

#[derive(Debug, sqlx::FromRow)]
struct HistoryRow {
    at: DateTime<Utc>,
    actor: String,
    action: String,
    from_state: Option<i16>,
    to_state: Option<i16>,
    note: String,
}

/// A ticket's history, oldest first.
pub async fn history(conn: &mut PgConnection, id: Uuid) -> Result<Vec<pb::TicketHistoryEntry>, ApiError> {
    let rows: Vec<HistoryRow> = sqlx::query_as(
        "SELECT at, actor, action, from_state, to_state, note FROM ticket_history WHERE ticket_id = $1 ORDER BY id LIMIT 1000",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let state = |s: Option<i16>| s.and_then(State::from_code).map(|s| wire::state_to_pb(s) as i32).unwrap_or(0);
    Ok(rows
        .into_iter()
        .map(|h| pb::TicketHistoryEntry {
            time: Some(ts(h.at)),
            actor: h.actor,
            action: h.action,
            from_state: state(h.from_state),
            to_state: state(h.to_state),
            note: h.note,
        })
        .collect())
}

/// The ticket with clocks (and history when asked) as the API shows it.
pub async fn load_wire(
    conn: &mut PgConnection,
    desk: &Desk,
    t: &TicketRow,
    with_history: bool,
) -> Result<pb::Ticket, ApiError> {
    let clocks = clocks(conn, t.ticket_id).await?;
    let history = if with_history { history(conn, t.ticket_id).await? } else { Vec::new() };
    Ok(to_wire(t, &clocks, &desk.calendar, desk.clock.now(), history))
}

/// Tickets with their clocks (no history), in the order of `ids`.
pub async fn load_many(conn: &mut PgConnection, desk: &Desk, ids: &[Uuid]) -> Result<Vec<pb::Ticket>, ApiError> {
    let rows: Vec<TicketRow> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {TICKET_COLUMNS} FROM tickets WHERE ticket_id = ANY($1)")))
            .bind(ids)
            .fetch_all(&mut *conn)
            .await?;
    let clock_rows: Vec<ClockRow> = sqlx::query_as(
        "SELECT ticket_id, kind, target_s, business_hours, elapsed_closed_s, running_since, paused, met_at, breached_at \
         FROM sla_clocks WHERE ticket_id = ANY($1) ORDER BY ticket_id, kind",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    let now = desk.clock.now();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let Some(t) = rows.iter().find(|t| t.ticket_id == *id) else { continue };
        let clocks: Vec<SlaClock> =
            clock_rows.iter().filter(|c| c.ticket_id == *id).filter_map(|r| r.clone().into_domain()).collect();
        out.push(to_wire(t, &clocks, &desk.calendar, now, Vec::new()));
    }
    Ok(out)
}

/// OUT-5, REL-6: which of `customers` have a complaint ticket not yet
/// resolved or verified, as recorded now.
pub async fn customers_with_open_complaints(
    conn: &mut PgConnection,
    customers: &[Uuid],
) -> Result<Vec<Uuid>, sqlx::Error> {
    let closed: Vec<i16> = State::ALL.into_iter().filter(|s| !s.is_open()).map(State::code).collect();
    sqlx::query_scalar(
        "SELECT DISTINCT customer_id FROM tickets WHERE customer_id = ANY($1) AND category = $2 AND NOT (state = ANY($3))",
    )
    .bind(customers)
    .bind(wire::category_code(Category::ServiceComplaint))
    .bind(&closed)
    .fetch_all(conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_found_by_topic_or_by_category_for_general_ones() {
        assert_eq!(repeat_key("delivery", Category::ServiceComplaint), "delivery");
        assert_eq!(repeat_key("general", Category::ServiceComplaint), "general:complaint");
        assert_ne!(repeat_key("general", Category::FunctionInquiry), repeat_key("general", Category::ServiceComplaint));
    }
}
