//! FBK-1: taking feedback in. Shared by SubmitFeedback and by survey answers
//! with a comment (channel SURVEY).
//!
//! The customer rule: profiles is asked who the id stands for. An unknown or
//! erased customer is refused (INVALID_ARGUMENT naming the field); a merged-
//! away id is linked to the survivor. When profiles cannot be reached the item
//! is accepted unconfirmed (`customer_verified = false`) rather than lost, and
//! the closed-loop worker asks again before the customer is acknowledged.

use chrono::{DateTime, Utc};
use crm_kit::ApiError;
use crm_kit::outbox::{self, Aggregate};
use crm_proto::common::v1::Channel;
use crm_proto::feedback::v1 as pb;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::SERVICE;
use crate::closed_loop::{self, LoopKind};
use crate::desk::Desk;
use crate::domain::classify::{Classification, Evidence};
use crate::domain::ticket;
use crate::partners::{CallError, CustomerCheck};
use crate::tickets::{self, NewTicket, TicketRow};
use crate::wire::{self, ts};

/// A checked submission.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The customer id as sent.
    pub customer: Uuid,
    /// Intake channel.
    pub channel: Channel,
    /// Text (1..10 000 characters).
    pub text: String,
    /// Rating 1..5, if given.
    pub rating: Option<u8>,
}

/// Who the submitted id stands for: (live id, confirmed by profiles).
pub async fn check_customer(desk: &Desk, customer: Uuid, field: &str) -> Result<(Uuid, bool), ApiError> {
    let Some(profiles) = desk.profiles.as_ref() else {
        return Ok((customer, false));
    };
    match profiles.check(customer).await {
        Ok(CustomerCheck::Live(live)) => Ok((live, true)),
        Ok(CustomerCheck::Unknown) => Err(ApiError::invalid(field, "no such customer in profiles")),
        Ok(CustomerCheck::Erased) => Err(ApiError::invalid(field, "the customer was erased (PRF-8)")),
        Err(CallError::Permanent(m)) => Err(ApiError::internal(format!("customer check refused: {m}"))),
        Err(CallError::Retry(m)) => {
            tracing::warn!(error = %m, "profiles unreachable: feedback accepted with an unconfirmed customer");
            Ok((customer, false))
        }
    }
}

/// A feedback item as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FeedbackRow {
    /// Id.
    pub feedback_id: Uuid,
    /// Live customer.
    pub customer_id: Uuid,
    /// Confirmed by profiles.
    pub customer_verified: bool,
    /// Channel code.
    pub channel: i16,
    /// Text ('' once erased).
    pub text: String,
    /// Rating.
    pub rating: Option<i16>,
    /// "zh" or "en".
    pub language: String,
    /// Automatic category code.
    pub category: i16,
    /// Confidence.
    pub confidence: f64,
    /// Urgent.
    pub urgent: bool,
    /// Sentiment.
    pub sentiment: f64,
    /// Topic.
    pub topic: String,
    /// Evidence as JSON.
    pub evidence: serde_json::Value,
    /// Manual category code.
    pub manual_category: Option<i16>,
    /// Who re-classified.
    pub reclassified_by: Option<String>,
    /// Ticket.
    pub ticket_id: Option<Uuid>,
    /// Received.
    pub created_at: DateTime<Utc>,
}

/// Columns of [`FeedbackRow`].
pub const FEEDBACK_COLUMNS: &str = "feedback_id, customer_id, customer_verified, channel, text, rating, language, category, \
     confidence, urgent, sentiment, topic, evidence, manual_category, reclassified_by, ticket_id, created_at";

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredEvidence {
    t: String,
    s: String,
    w: f64,
}

impl FeedbackRow {
    /// The wire form.
    pub fn to_wire(&self) -> pb::Feedback {
        let evidence: Vec<StoredEvidence> = serde_json::from_value(self.evidence.clone()).unwrap_or_default();
        pb::Feedback {
            feedback_id: self.feedback_id.to_string(),
            customer_id: self.customer_id.to_string(),
            channel: i32::from(self.channel),
            text: self.text.clone(),
            rating: self.rating.map(i32::from).unwrap_or(0),
            classification: Some(pb::Classification {
                category: wire::category_to_pb(wire::category_of_code(self.category)) as i32,
                confidence: self.confidence,
                urgent: self.urgent,
                sentiment: self.sentiment,
                language: self.language.clone(),
                evidence: evidence.into_iter().map(|e| pb::Evidence { term: e.t, signal: e.s, weight: e.w }).collect(),
                topic: self.topic.clone(),
            }),
            manual_category: self
                .manual_category
                .map(|c| wire::category_to_pb(wire::category_of_code(c)) as i32)
                .unwrap_or(0),
            ticket_id: self.ticket_id.map(|t| t.to_string()).unwrap_or_default(),
            create_time: Some(ts(self.created_at)),
            customer_verified: self.customer_verified,
            reclassified_by: self.reclassified_by.clone().unwrap_or_default(),
        }
    }
}

/// The wire form of a classification (ClassifyText).
pub fn classification_to_wire(c: &Classification) -> pb::Classification {
    pb::Classification {
        category: wire::category_to_pb(c.category) as i32,
        confidence: c.confidence,
        urgent: c.urgent,
        sentiment: c.sentiment,
        language: c.language.code().to_string(),
        evidence: c
            .evidence
            .iter()
            .map(|e| pb::Evidence { term: e.term.clone(), signal: e.signal.clone(), weight: e.weight })
            .collect(),
        topic: c.topic.clone(),
    }
}

fn evidence_json(e: &[Evidence]) -> serde_json::Value {
    serde_json::to_value(
        e.iter().map(|e| StoredEvidence { t: e.term.clone(), s: e.signal.clone(), w: e.weight }).collect::<Vec<_>>(),
    )
    .unwrap_or(serde_json::Value::Array(Vec::new()))
}

/// What an intake stored.
#[derive(Debug)]
pub struct Intake {
    /// The item.
    pub feedback: FeedbackRow,
    /// Its ticket (row and wire form), if it needed one.
    pub ticket: Option<(TicketRow, pb::Ticket)>,
    /// The acknowledgement, when this replica makes it right after commit
    /// (otherwise a worker does, or outreach is not configured).
    pub acknowledgement: Option<closed_loop::Leased>,
}

/// Classifies and stores an item in the caller's transaction: the item with
/// FeedbackReceived and its acknowledgement call (one statement), then its
/// ticket if it needs one (routing, clocks, FBK-4 repeat link, TicketOpened:
/// one more).
pub async fn take_in(
    conn: &mut PgConnection,
    desk: &Desk,
    sub: &Submission,
    customer: (Uuid, bool),
    request_id: &str,
    now: DateTime<Utc>,
) -> Result<Intake, ApiError> {
    let c = desk.classifier.classify(&sub.text, sub.rating);
    let id = Uuid::now_v7();
    let needs_ticket = ticket::needs_ticket(c.category, c.urgent, c.sentiment);
    let ticket_id = needs_ticket.then(Uuid::now_v7);
    let row = FeedbackRow {
        feedback_id: id,
        customer_id: customer.0,
        customer_verified: customer.1,
        channel: sub.channel as i16,
        text: sub.text.clone(),
        rating: sub.rating.map(i16::from),
        language: c.language.code().to_string(),
        category: wire::category_code(c.category),
        confidence: c.confidence,
        urgent: c.urgent,
        sentiment: c.sentiment,
        topic: c.topic.clone(),
        evidence: evidence_json(&c.evidence),
        manual_category: None,
        reclassified_by: None,
        ticket_id,
        created_at: now,
    };
    let received = pb::FeedbackReceived {
        feedback_id: id.to_string(),
        customer_id: customer.0.to_string(),
        channel: sub.channel as i32,
        category: wire::category_to_pb(c.category) as i32,
        urgent: c.urgent,
        sentiment: c.sentiment,
        rating: sub.rating.map(i32::from).unwrap_or(0),
        receive_time: Some(ts(now)),
    };
    let event =
        outbox::Staged::new(SERVICE, Aggregate { kind: "feedback", id: &id.to_string() }, request_id, &received)?;
    let (event_ids, types, aggregates, envelopes) = outbox::Staged::columns(&[event]);
    let ack = closed_loop::LoopCall::new(LoopKind::Acknowledge, id, ticket_id, format!("feedback-ack-{id}"), now);
    let start = closed_loop::Start::choose(desk);
    let (attempts, next_attempt, done, outcome) = start.birth(desk, now);
    // One intake per customer at a time: the ticket's repeat detection (the
    // next statement, with a snapshot taken after this one) must see the
    // other. The lock is taken before the outbox rows are produced.
    sqlx::query(
        "WITH lk AS (SELECT pg_advisory_xact_lock(hashtext('feedback:customer'), hashtext($2::text))), \
              f AS (INSERT INTO feedback (feedback_id, customer_id, submitted_customer_id, customer_verified, channel, text, rating, \
                    language, category, confidence, urgent, sentiment, topic, evidence, ticket_id, created_at) \
                    VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16)), \
              l AS (INSERT INTO loop_calls (call_id, kind, feedback_id, ticket_id, request_id, traceparent, tracestate, \
                    attempts, next_attempt_at, done_at, outcome, created_at) \
                    VALUES ($17,$18,$1,$15,$19,$20,$21,$26,$27,$28,$29,$16)) \
         INSERT INTO kit_outbox (event_id, event_type, aggregate_id, envelope) \
         SELECT u.* FROM lk, UNNEST($22::uuid[], $23::text[], $24::text[], $25::bytea[]) AS u",
    )
    .bind(id)
    .bind(customer.0)
    .bind(sub.customer)
    .bind(customer.1)
    .bind(row.channel)
    .bind(&row.text)
    .bind(row.rating)
    .bind(&row.language)
    .bind(row.category)
    .bind(row.confidence)
    .bind(row.urgent)
    .bind(row.sentiment)
    .bind(&row.topic)
    .bind(&row.evidence)
    .bind(ticket_id)
    .bind(now)
    .bind(ack.call_id)
    .bind(ack.kind.key())
    .bind(&ack.request_id)
    .bind(&ack.traceparent)
    .bind(&ack.tracestate)
    .bind(&event_ids)
    .bind(&types)
    .bind(&aggregates)
    .bind(&envelopes)
    .bind(attempts)
    .bind(next_attempt)
    .bind(done)
    .bind(outcome)
    .execute(&mut *conn)
    .await?;
    let acknowledgement = ack.leased(
        start,
        Some(closed_loop::Item {
            customer_id: customer.0,
            customer_verified: customer.1,
            channel: row.channel,
            language: row.language.clone(),
        }),
    );
    let ticket = match ticket_id {
        Some(ticket_id) => {
            let new = NewTicket {
                ticket_id,
                feedback_id: id,
                customer_id: customer.0,
                category: c.category,
                urgent: c.urgent,
                topic: c.topic.clone(),
            };
            Some(tickets::open(conn, desk, &new, request_id, now).await?)
        }
        None => None,
    };
    Ok(Intake { feedback: row, ticket, acknowledgement })
}

/// Records that profiles confirmed an item's customer (as `live`, following merges).
pub async fn confirm_customer(pool: &sqlx::PgPool, feedback_id: Uuid, live: Uuid) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE feedback SET customer_verified = true, customer_id = $2 WHERE feedback_id = $1")
        .bind(feedback_id)
        .bind(live)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE tickets SET customer_id = $2 WHERE feedback_id = $1")
        .bind(feedback_id)
        .bind(live)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}
