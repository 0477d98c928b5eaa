//! OUT-5 enforcement point: every message, whatever its source, gets its
//! contact-policy decision here, at send time (so an opt-out between
//! scheduling and sending suppresses it).
//!
//! Correct across replicas: a batch claims due messages with `SKIP LOCKED`,
//! then locks their customers' rows (in id order, so two batches cannot
//! deadlock) and decides with the contacts committed so far. Two replicas
//! deciding for one customer therefore take turns, and the caps hold exactly.
//! PostgreSQL is the only source of truth here: with Redis down nothing changes.
//! The decision, the counted contact, the campaign's spend and the events are
//! written in the one transaction.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use crm_kit::ApiError;
use crm_kit::outbox;
use crm_proto::common::v1::{Channel, Purpose};
use crm_proto::outreach::v1 as pb;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::SERVICE;
use crate::domain::campaign::in_global_control;
use crate::domain::policy::{self, Attempt, Consent, Contact, ContactPolicy, Recipient, Verdict};
use crate::messages::{COLUMNS, MessageRow, state, verdict};
use crate::settings;

/// How far back contacts are read: longer than any cap window (31 days or 744 h).
const HISTORY_DAYS: i64 = 32;

/// What one batch decided.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Allowed, now waiting for the adapter.
    pub approved: usize,
    /// Deferred to a later time.
    pub deferred: usize,
    /// Dropped.
    pub dropped: usize,
}

impl Tally {
    /// Messages decided.
    pub fn total(&self) -> usize {
        self.approved + self.deferred + self.dropped
    }
}

/// customer_id, channel, purpose, granted, expires_at.
type ConsentRow = (Uuid, i16, i16, bool, Option<DateTime<Utc>>);

struct CustomerState {
    timezone: Tz,
    streak: i32,
    open_complaints: i32,
    erased: bool,
    contacts: Vec<Contact>,
}

/// Claims up to `limit` messages due at `now` and decides them.
pub async fn decide_due(
    tx: &mut PgConnection,
    default_tz: Tz,
    limit: i64,
    now: DateTime<Utc>,
    lease: Option<std::time::Duration>,
) -> Result<(Tally, Vec<Uuid>), ApiError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM messages m WHERE state = $1 AND due_at <= $2 \
         AND (campaign_id IS NULL OR EXISTS (SELECT 1 FROM campaigns c WHERE c.campaign_id = m.campaign_id AND c.state = 3)) \
         ORDER BY due_at LIMIT $3 FOR UPDATE SKIP LOCKED"
    );
    let rows: Vec<MessageRow> =
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(state::QUEUED).bind(now).bind(limit).fetch_all(&mut *tx).await?;
    decide(tx, rows, default_tz, now, lease).await
}

/// Decides the given queued messages (already locked by the caller, or new
/// in its transaction). Returns the tally and the ids of approved messages.
/// With `lease`, approved messages are leased to the caller for delivery
/// (another replica retries them only after it expires).
pub async fn decide(
    tx: &mut PgConnection,
    mut rows: Vec<MessageRow>,
    default_tz: Tz,
    now: DateTime<Utc>,
    lease: Option<std::time::Duration>,
) -> Result<(Tally, Vec<Uuid>), ApiError> {
    let mut tally = Tally::default();
    if rows.is_empty() {
        return Ok((tally, Vec::new()));
    }
    rows.sort_by_key(|r| (r.due_at, r.created_at));
    let wire_policy = settings::load_policy(tx).await?;
    let policy: ContactPolicy = settings::parse_policy(&wire_policy, "")?;
    let channels: HashMap<i16, (i64, bool)> = settings::load_channels(tx)
        .await?
        .into_iter()
        .map(|(ch, cost, enabled, _)| (ch as i16, (cost, enabled)))
        .collect();

    let mut ids: Vec<Uuid> = rows.iter().map(|r| r.customer_id).collect();
    ids.sort();
    ids.dedup();
    // A message may name a customer whose events have not arrived yet.
    sqlx::query("INSERT INTO customers (customer_id) SELECT * FROM UNNEST($1::uuid[]) ON CONFLICT DO NOTHING")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    let locked: Vec<(Uuid, String, i32, i32, bool)> = sqlx::query_as(
        "SELECT customer_id, timezone, unanswered_streak, open_complaints, erased_at IS NOT NULL FROM customers \
         WHERE customer_id = ANY($1) ORDER BY customer_id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut customers: HashMap<Uuid, CustomerState> = locked
        .into_iter()
        .map(|(id, tz, streak, complaints, erased)| {
            let state = CustomerState {
                timezone: policy::zone(&tz, default_tz),
                streak,
                open_complaints: complaints,
                erased,
                contacts: Vec::new(),
            };
            (id, state)
        })
        .collect();
    let history: Vec<(Uuid, DateTime<Utc>, i16)> =
        sqlx::query_as("SELECT customer_id, at, channel FROM contacts WHERE customer_id = ANY($1) AND at > $2")
            .bind(&ids)
            .bind(now - Duration::days(HISTORY_DAYS))
            .fetch_all(&mut *tx)
            .await?;
    for (id, at, ch) in history {
        if let Some(c) = customers.get_mut(&id) {
            c.contacts.push(Contact { at, channel: Channel::try_from(ch as i32).unwrap_or(Channel::Unspecified) });
        }
    }
    let consent_rows: Vec<ConsentRow> = sqlx::query_as(
        "SELECT customer_id, channel, purpose, granted, expires_at FROM consents WHERE customer_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let consents: HashMap<(Uuid, i16, i16), Consent> = consent_rows
        .into_iter()
        .map(|(id, ch, p, granted, expires)| {
            let consent = match (granted, expires) {
                (false, _) => Consent::Revoked,
                (true, Some(e)) if e <= now => Consent::Unknown,
                (true, _) => Consent::Granted,
            };
            ((id, ch, p), consent)
        })
        .collect();
    let mut campaign_ids: Vec<Uuid> = rows.iter().filter_map(|r| r.campaign_id).collect();
    campaign_ids.sort();
    campaign_ids.dedup();
    let budgets: Vec<(Uuid, Option<i64>, i64)> = sqlx::query_as(
        "SELECT campaign_id, budget_minor, spent_minor FROM campaigns WHERE campaign_id = ANY($1) ORDER BY campaign_id FOR UPDATE",
    )
    .bind(&campaign_ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut budgets: HashMap<Uuid, (Option<i64>, i64, i64)> =
        budgets.into_iter().map(|(id, budget, spent)| (id, (budget, spent, 0))).collect();

    let mut out = Decided::default();
    for row in &rows {
        let Some(customer) = customers.get_mut(&row.customer_id) else { continue };
        let purpose = Purpose::try_from(row.purpose as i32).unwrap_or(Purpose::Marketing);
        // OUT-3: the plan's channels in order; the next one is tried when this
        // one is refused for a reason of the channel itself.
        let steps: Vec<(i16, Uuid)> = std::iter::once((row.channel, row.template_id))
            .chain(row.fallback_channels.iter().copied().zip(row.fallback_templates.iter().copied()))
            .collect();
        let mut refused: Vec<String> = Vec::new();
        let mut chosen = steps[0];
        let mut decision = policy::Decision { verdict: Verdict::Drop, rule: "ERASED", detail: String::new() };
        for (i, step) in steps.iter().enumerate() {
            chosen = *step;
            let channel = Channel::try_from(step.0 as i32).unwrap_or(Channel::Unspecified);
            let (_, enabled) = channels.get(&step.0).copied().unwrap_or((0, false));
            decision = if customer.erased {
                policy::Decision {
                    verdict: Verdict::Drop,
                    rule: "ERASED",
                    detail: "the customer was erased (PRF-8)".into(),
                }
            } else if !enabled {
                policy::Decision {
                    verdict: Verdict::Drop,
                    rule: "CHANNEL_DISABLED",
                    detail: format!("channel {} is disabled", channel.as_str_name()),
                }
            } else {
                let consent =
                    consents.get(&(row.customer_id, step.0, row.purpose)).copied().unwrap_or(Consent::Unknown);
                let recipient = Recipient {
                    timezone: customer.timezone,
                    contacts: &customer.contacts,
                    unanswered_streak: customer.streak.max(0) as u32,
                    consent,
                    open_complaint: customer.open_complaints > 0,
                    in_global_control: in_global_control(row.customer_id, policy.global_control_percent),
                    already_in_campaign: false,
                };
                policy::check_contact(&policy, &recipient, Attempt { channel, purpose }, now)
            };
            let channel_refused = matches!(decision.rule, "NO_CONSENT" | "OPTED_OUT" | "CHANNEL_DISABLED");
            if !(channel_refused && i + 1 < steps.len()) {
                break;
            }
            refused.push(format!("{}: {}", channel.as_str_name(), decision.rule));
        }
        if !refused.is_empty() {
            decision.detail = format!("after {}; {}", refused.join(", "), decision.detail);
        }
        let channel = Channel::try_from(chosen.0 as i32).unwrap_or(Channel::Unspecified);
        let (cost, _) = channels.get(&chosen.0).copied().unwrap_or((0, false));
        let decision = match decision.verdict {
            Verdict::Send => match row.campaign_id.and_then(|c| budgets.get_mut(&c)) {
                Some((Some(budget), spent, added)) if *spent + *added + cost > *budget => policy::Decision {
                    verdict: Verdict::Drop,
                    rule: "BUDGET_EXHAUSTED",
                    detail: format!("campaign budget {budget} fen reached"),
                },
                Some((_, _, added)) => {
                    *added += cost;
                    decision
                }
                None => decision,
            },
            Verdict::Defer(until) if until > row.expires_at => policy::Decision {
                verdict: Verdict::Drop,
                rule: "EXPIRED",
                detail: format!("{} until {}, after the message expires", decision.rule, until.to_rfc3339()),
            },
            _ => decision,
        };
        out.push(row, chosen, &decision, cost, now);
        match decision.verdict {
            Verdict::Send => {
                tally.approved += 1;
                customer.contacts.push(Contact { at: now, channel });
                customer.streak += 1;
            }
            Verdict::Defer(_) => tally.deferred += 1,
            Verdict::Drop => tally.dropped += 1,
        }
    }
    let approved = out.approved.clone();
    out.write(tx, &budgets, now, lease).await?;
    Ok((tally, approved))
}

/// Column vectors of one batch's results, written with UNNEST.
#[derive(Default)]
struct Decided {
    ids: Vec<Uuid>,
    customers: Vec<Uuid>,
    channels: Vec<i16>,
    templates: Vec<Uuid>,
    states: Vec<i16>,
    due: Vec<DateTime<Utc>>,
    verdicts: Vec<i16>,
    rules: Vec<String>,
    details: Vec<String>,
    costs: Vec<i64>,
    deferred_until: Vec<Option<DateTime<Utc>>>,
    approved: Vec<Uuid>,
    contact_customers: Vec<Uuid>,
    contact_channels: Vec<i16>,
    suppressed: Vec<(String, pb::MessageSent)>,
}

impl Decided {
    fn push(
        &mut self,
        row: &MessageRow,
        (channel, template): (i16, Uuid),
        d: &policy::Decision,
        cost: i64,
        now: DateTime<Utc>,
    ) {
        let (st, due, v, until) = match d.verdict {
            Verdict::Send => (state::APPROVED, now, verdict::SENT, None),
            Verdict::Defer(t) => (state::QUEUED, t, verdict::DEFERRED, Some(t)),
            Verdict::Drop => (state::SUPPRESSED, row.due_at, verdict::DROPPED, None),
        };
        self.ids.push(row.message_id);
        self.customers.push(row.customer_id);
        self.channels.push(channel);
        self.templates.push(template);
        self.states.push(st);
        self.due.push(due);
        self.verdicts.push(v);
        self.rules.push(d.rule.to_string());
        self.details.push(d.detail.clone());
        self.costs.push(if st == state::APPROVED { cost } else { 0 });
        self.deferred_until.push(until);
        if st == state::APPROVED {
            self.approved.push(row.message_id);
            self.contact_customers.push(row.customer_id);
            self.contact_channels.push(channel);
        }
        if st == state::SUPPRESSED {
            let mut m = row.clone();
            m.channel = channel;
            m.template_id = template;
            m.state = st;
            m.rule = d.rule.to_string();
            m.detail = d.detail.clone();
            m.decided_at = Some(now);
            self.suppressed.push((
                row.customer_id.to_string(),
                pb::MessageSent { message: Some(crate::privacy::message_event(m.to_wire())), holdout: false },
            ));
        }
    }

    async fn write(
        self,
        tx: &mut PgConnection,
        budgets: &HashMap<Uuid, (Option<i64>, i64, i64)>,
        now: DateTime<Utc>,
        lease: Option<std::time::Duration>,
    ) -> Result<(), ApiError> {
        sqlx::query(
            "UPDATE messages m SET state = t.state, due_at = t.due, rule = t.rule, detail = t.detail, cost_minor = t.cost, decided_at = $7, \
             lease_until = CASE WHEN t.state = 2 THEN $8::timestamptz END, channel = t.channel, template_id = t.template, \
             attempts = attempts + CASE WHEN t.state = 2 AND $8::timestamptz IS NOT NULL THEN 1 ELSE 0 END \
             FROM UNNEST($1::uuid[], $2::smallint[], $3::timestamptz[], $4::text[], $5::text[], $6::bigint[], $9::smallint[], $10::uuid[]) \
               AS t(id, state, due, rule, detail, cost, channel, template) WHERE m.message_id = t.id",
        )
        .bind(&self.ids)
        .bind(&self.states)
        .bind(&self.due)
        .bind(&self.rules)
        .bind(&self.details)
        .bind(&self.costs)
        .bind(now)
        .bind(lease.map(|l| now + chrono::Duration::from_std(l).unwrap_or_default()))
        .bind(&self.channels)
        .bind(&self.templates)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO decisions (customer_id, message_id, verdict, rule, detail, decided_at, deferred_until) \
             SELECT c, m, v, r, d, $6, u FROM UNNEST($1::uuid[], $2::uuid[], $3::smallint[], $4::text[], $5::text[], $7::timestamptz[]) AS t(c, m, v, r, d, u)",
        )
        .bind(&self.customers)
        .bind(&self.ids)
        .bind(&self.verdicts)
        .bind(&self.rules)
        .bind(&self.details)
        .bind(now)
        .bind(&self.deferred_until)
        .execute(&mut *tx)
        .await?;
        if !self.approved.is_empty() {
            sqlx::query(
                "INSERT INTO contacts (customer_id, at, channel, message_id) \
                 SELECT c, $4, ch, m FROM UNNEST($1::uuid[], $2::smallint[], $3::uuid[]) AS t(c, ch, m)",
            )
            .bind(&self.contact_customers)
            .bind(&self.contact_channels)
            .bind(&self.approved)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            // OUT-5 backoff: every contact extends the unanswered streak until a response resets it.
            sqlx::query(
                "UPDATE customers c SET unanswered_streak = unanswered_streak + t.n \
                 FROM (SELECT id, count(*)::int AS n FROM UNNEST($1::uuid[]) AS u(id) GROUP BY id) t WHERE c.customer_id = t.id",
            )
            .bind(&self.contact_customers)
            .execute(&mut *tx)
            .await?;
        }
        let (campaigns, added): (Vec<Uuid>, Vec<i64>) =
            budgets.iter().filter(|(_, (_, _, a))| *a > 0).map(|(id, (_, _, a))| (*id, *a)).unzip();
        if !campaigns.is_empty() {
            sqlx::query(
                "UPDATE campaigns c SET spent_minor = spent_minor + t.a FROM UNNEST($1::uuid[], $2::bigint[]) AS t(id, a) \
                 WHERE c.campaign_id = t.id",
            )
            .bind(&campaigns)
            .bind(&added)
            .execute(&mut *tx)
            .await?;
        }
        outbox::enqueue_many(tx, SERVICE, "customer", "", &self.suppressed).await?;
        Ok(())
    }
}
