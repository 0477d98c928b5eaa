//! `crm.feedback.v1.FeedbackService`: decode and check the request, call the
//! domain and storage, encode the answer (SPEC 4.4). Every mutation is
//! idempotent by `request_id`; bad input is INVALID_ARGUMENT naming every bad
//! field and changes nothing.

use chrono::{DateTime, Utc};
use crm_kit::fields::{self, parse_id};
use crm_kit::idempotency::{self, Claim};
use crm_kit::outbox::{self, Aggregate};
use crm_kit::{ApiError, Caller, FieldViolations, IntoGrpc, paging};
use crm_proto::common::v1::Channel;
use crm_proto::feedback::v1 as pb;
use crm_proto::feedback::v1::feedback_service_server::FeedbackService;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::SERVICE;
use crate::closed_loop::{self, LoopKind};
use crate::desk::Desk;
use crate::domain::classify::MAX_TEXT_CHARS;
use crate::domain::survey::Survey;
use crate::domain::ticket::{self, State};
use crate::intake::{self, FEEDBACK_COLUMNS, FeedbackRow, Submission};
use crate::privacy;
use crate::tickets::{self, TicketRow};
use crate::wire::{self, ts};

type Reply<T> = Result<Response<T>, Status>;

/// Longest id-like strings accepted (assignee, campaign id, queue).
const MAX_NAME: usize = 128;

/// The gRPC API over a [`Desk`].
#[derive(Debug, Clone)]
pub struct FeedbackApi {
    desk: Desk,
}

impl FeedbackApi {
    /// An API over the desk.
    pub fn new(desk: Desk) -> Self {
        Self { desk }
    }

    fn now(&self) -> DateTime<Utc> {
        self.desk.clock.now()
    }
}

fn actor<T>(r: &Request<T>) -> String {
    Caller::of(r).map(|c| c.subject.clone()).unwrap_or_else(|_| "unknown".into())
}

/// FBK-1: checks a submission's fields (prefix "feedback." or "response.").
fn check_submission(
    v: &mut FieldViolations,
    prefix: &str,
    customer: &str,
    channel: i32,
    text: &str,
    rating: i32,
) -> Option<Submission> {
    let customer = v.check(&format!("{prefix}customer_id"), parse_id("customer_id", customer).map_err(|e| reason(&e)));
    let channel = match Channel::try_from(channel) {
        Ok(Channel::Unspecified) => {
            v.required(&format!("{prefix}channel"));
            None
        }
        Ok(c) if wire::INTAKE_CHANNELS.contains(&c) => Some(c),
        Ok(c) => {
            v.add(format!("{prefix}channel"), format!("{} is not a feedback intake channel", c.as_str_name()));
            None
        }
        Err(_) => {
            v.add(format!("{prefix}channel"), "unknown value");
            None
        }
    };
    let text = fields::text(v, &format!("{prefix}text"), text, MAX_TEXT_CHARS, true);
    let rating = match rating {
        0 => None,
        1..=5 => Some(rating as u8),
        _ => {
            v.add(format!("{prefix}rating"), "must be 1..5, or 0 for none");
            None
        }
    };
    Some(Submission { customer: customer?, channel: channel?, text, rating })
}

/// The description of a single-field INVALID_ARGUMENT.
fn reason(e: &ApiError) -> String {
    match e {
        ApiError::InvalidArgument(v) => v.iter().map(|f| f.description.clone()).collect::<Vec<_>>().join("; "),
        other => other.to_string(),
    }
}

fn category_field(
    v: &mut FieldViolations,
    field: &str,
    raw: i32,
    required: bool,
) -> Option<crate::domain::classify::Category> {
    match pb::Category::try_from(raw) {
        Ok(pb::Category::Unspecified) => {
            if required {
                v.required(field);
            }
            None
        }
        Ok(c) => wire::category_from_pb(c),
        Err(_) => {
            v.add(field, "unknown value");
            None
        }
    }
}

impl FeedbackApi {
    // ---- FBK-1/FBK-2 intake -------------------------------------------------

    async fn submit(&self, req: pb::SubmitFeedbackRequest) -> Result<pb::SubmitFeedbackResponse, ApiError> {
        let mut v = FieldViolations::new();
        let f = req.feedback.clone().unwrap_or_default();
        if req.feedback.is_none() {
            v.required("feedback");
        }
        let sub = check_submission(&mut v, "feedback.", &f.customer_id, f.channel, &f.text, f.rating);
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let sub = sub.ok_or_else(|| ApiError::internal("checked above"))?;
        // Ask profiles before opening the transaction: no connection is held
        // over the network call (a retried request asks again; that is cheap).
        let customer = intake::check_customer(&self.desk, sub.customer, "feedback.customer_id").await?;
        let mut tx = self.desk.pool.begin().await?;
        let fresh = match idempotency::claim(&mut tx, "feedback.SubmitFeedback", &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let now = self.now();
        let taken = intake::take_in(&mut tx, &self.desk, &sub, customer, &req.request_id, now).await?;
        let ticket = taken.ticket.as_ref().map(|(_, wire)| wire.clone());
        let out = pb::SubmitFeedbackResponse {
            feedback: Some(taken.feedback.to_wire()),
            repeat_of_ticket_id: ticket.as_ref().map(|t| t.repeat_of_ticket_id.clone()).unwrap_or_default(),
            ticket,
        };
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        if let Some(ack) = taken.acknowledgement {
            closed_loop::make_leased(&self.desk, ack);
        }
        Ok(out)
    }

    /// A ticket as `caller` may see it (SEC-4).
    async fn shown(&self, caller: &Caller, mut t: pb::Ticket) -> Result<pb::Ticket, ApiError> {
        privacy::tickets(&self.desk, caller, std::slice::from_mut(&mut t)).await;
        Ok(t)
    }

    /// OUT-5, REL-6: which of the asked customers have a complaint open now.
    async fn open_complaints(
        &self,
        req: pb::CheckOpenComplaintsRequest,
    ) -> Result<pb::CheckOpenComplaintsResponse, ApiError> {
        let ids = fields::id_list("customer_ids", &req.customer_ids, 1000)?;
        let mut conn = self.desk.pool.acquire().await?;
        let open = tickets::customers_with_open_complaints(&mut conn, &ids).await?;
        Ok(pb::CheckOpenComplaintsResponse { customer_ids: open.into_iter().map(|id| id.to_string()).collect() })
    }

    async fn feedback_row(&self, conn: &mut sqlx::PgConnection, id: Uuid) -> Result<FeedbackRow, ApiError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {FEEDBACK_COLUMNS} FROM feedback WHERE feedback_id = $1")))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| ApiError::not_found("feedback", id.to_string()))
    }

    async fn list_feedback(&self, req: pb::ListFeedbackRequest) -> Result<pb::ListFeedbackResponse, ApiError> {
        let size = paging::page_size(req.page_size)?;
        let mut v = FieldViolations::new();
        let customer = fields::optional_id(&mut v, "customer_id", &req.customer_id);
        let category = category_field(&mut v, "category", req.category, false);
        let (from, to) = fields::time_range(&mut v, "time_range", req.time_range.as_ref());
        v.into_result()?;
        let filter = paging::filter_hash(&(&req.customer_id, req.category, from, to));
        let after: Option<(DateTime<Utc>, Uuid)> = paging::decode_token(&req.page_token, &filter)?;
        let rows: Vec<FeedbackRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {FEEDBACK_COLUMNS} FROM feedback WHERE ($1::uuid IS NULL OR customer_id = $1) \
             AND ($2::smallint IS NULL OR COALESCE(manual_category, category) = $2) \
             AND ($3::timestamptz IS NULL OR created_at >= $3) AND ($4::timestamptz IS NULL OR created_at < $4) \
             AND ($5::timestamptz IS NULL OR (created_at, feedback_id) < ($5, $6)) \
             ORDER BY created_at DESC, feedback_id DESC LIMIT $7"
        )))
        .bind(customer)
        .bind(category.map(wire::category_code))
        .bind(from)
        .bind(to)
        .bind(after.map(|a| a.0))
        .bind(after.map(|a| a.1))
        .bind(size as i64 + 1)
        .fetch_all(&self.desk.pool)
        .await?;
        let more = rows.len() > size;
        let page: Vec<&FeedbackRow> = rows.iter().take(size).collect();
        let next = match (more, page.last()) {
            (true, Some(last)) => paging::encode_token(&(last.created_at, last.feedback_id), &filter),
            _ => String::new(),
        };
        Ok(pb::ListFeedbackResponse {
            feedback: page.into_iter().map(FeedbackRow::to_wire).collect(),
            next_page_token: next,
        })
    }

    async fn reclassify(&self, who: String, req: pb::ReclassifyFeedbackRequest) -> Result<pb::Feedback, ApiError> {
        let mut v = FieldViolations::new();
        let id = v.check("feedback_id", parse_id("feedback_id", &req.feedback_id).map_err(|e| reason(&e)));
        let category = category_field(&mut v, "category", req.category, true);
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let (id, category) = id.zip(category).ok_or_else(|| ApiError::internal("checked above"))?;
        let mut tx = self.desk.pool.begin().await?;
        let fresh = match idempotency::claim(&mut tx, "feedback.ReclassifyFeedback", &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let now = self.now();
        let row = self.feedback_row(&mut tx, id).await?;
        sqlx::query("UPDATE feedback SET manual_category = $2, reclassified_by = $3, reclassified_at = $4 WHERE feedback_id = $1")
            .bind(id)
            .bind(wire::category_code(category))
            .bind(&who)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        match row.ticket_id {
            // FBK-3: the ticket follows, with the time already spent carried over.
            Some(ticket_id) => {
                let mut t = tickets::lock(&mut tx, ticket_id).await?;
                tickets::recategorise(&mut tx, &self.desk, &mut t, category, &who, now).await?;
            }
            None if ticket::needs_ticket(category, row.urgent, row.sentiment) => {
                let new = tickets::NewTicket {
                    ticket_id: Uuid::now_v7(),
                    feedback_id: id,
                    customer_id: row.customer_id,
                    category,
                    urgent: row.urgent,
                    topic: row.topic.clone(),
                };
                tickets::open(&mut tx, &self.desk, &new, &req.request_id, now).await?;
            }
            None => {}
        }
        let out = self.feedback_row(&mut tx, id).await?.to_wire();
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn classification_stats(
        &self,
        req: pb::GetClassificationStatsRequest,
    ) -> Result<pb::ClassificationStats, ApiError> {
        let mut v = FieldViolations::new();
        let (from, to) = fields::time_range(&mut v, "time_range", req.time_range.as_ref());
        v.into_result()?;
        let rows: Vec<(i16, Option<i16>, i64)> = sqlx::query_as(
            "SELECT category, manual_category, count(*) FROM feedback \
             WHERE ($1::timestamptz IS NULL OR created_at >= $1) AND ($2::timestamptz IS NULL OR created_at < $2) \
             GROUP BY category, manual_category ORDER BY 1, 2",
        )
        .bind(from)
        .bind(to)
        .fetch_all(&self.desk.pool)
        .await?;
        let total: i64 = rows.iter().map(|r| r.2).sum();
        let changed: Vec<&(i16, Option<i16>, i64)> =
            rows.iter().filter(|(a, m, _)| m.is_some_and(|m| m != *a)).collect();
        let reclassified: i64 = changed.iter().map(|r| r.2).sum();
        let to_pb = |c: i16| wire::category_to_pb(wire::category_of_code(c)) as i32;
        Ok(pb::ClassificationStats {
            total,
            reclassified,
            reclassified_share: if total == 0 { 0.0 } else { reclassified as f64 / total as f64 },
            reclassifications: changed
                .into_iter()
                .map(|(a, m, n)| pb::Reclassification {
                    automatic: to_pb(*a),
                    manual: to_pb(m.unwrap_or(*a)),
                    count: *n,
                })
                .collect(),
        })
    }

    // ---- FBK-3 tickets ----------------------------------------------------

    async fn list_tickets(&self, req: pb::ListTicketsRequest) -> Result<pb::ListTicketsResponse, ApiError> {
        let size = paging::page_size(req.page_size)?;
        let mut v = FieldViolations::new();
        let customer = fields::optional_id(&mut v, "customer_id", &req.customer_id);
        let state = match req.state {
            0 => None,
            s => {
                let parsed = wire::state_from_pb(s);
                if parsed.is_none() {
                    v.add("state", "unknown value");
                }
                parsed
            }
        };
        if req.queue.len() > MAX_NAME {
            v.add("queue", format!("is longer than {MAX_NAME} bytes"));
        }
        if req.assignee.len() > MAX_NAME {
            v.add("assignee", format!("is longer than {MAX_NAME} bytes"));
        }
        v.into_result()?;
        let filter = paging::filter_hash(&(&req.queue, req.state, &req.assignee, &req.customer_id, req.breached_only));
        // Oldest deadline first; tickets without a running clock last.
        let after: Option<(DateTime<Utc>, Uuid)> = paging::decode_token(&req.page_token, &filter)?;
        let page: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(
            "SELECT ticket_id, COALESCE(next_deadline_at, '9999-12-31Z'::timestamptz) FROM tickets t \
             WHERE ($1 = '' OR queue = $1) AND ($2::smallint IS NULL OR state = $2) \
             AND ($3 = '' OR assignee = $3) AND ($4::uuid IS NULL OR customer_id = $4) \
             AND (NOT $5 OR EXISTS (SELECT 1 FROM sla_clocks c WHERE c.ticket_id = t.ticket_id AND c.breached_at IS NOT NULL)) \
             AND ($6::timestamptz IS NULL OR (COALESCE(next_deadline_at, '9999-12-31Z'::timestamptz), ticket_id) > ($6, $7)) \
             ORDER BY COALESCE(next_deadline_at, '9999-12-31Z'::timestamptz), ticket_id LIMIT $8",
        )
        .bind(&req.queue)
        .bind(state.map(State::code))
        .bind(&req.assignee)
        .bind(customer)
        .bind(req.breached_only)
        .bind(after.map(|a| a.0))
        .bind(after.map(|a| a.1))
        .bind(size as i64 + 1)
        .fetch_all(&self.desk.pool)
        .await?;
        let more = page.len() > size;
        let page = &page[..page.len().min(size)];
        let ids: Vec<Uuid> = page.iter().map(|(id, _)| *id).collect();
        let mut conn = self.desk.pool.acquire().await?;
        let out = tickets::load_many(&mut conn, &self.desk, &ids).await?;
        let next = match (more, page.last()) {
            (true, Some((id, key))) => paging::encode_token(&(*key, *id), &filter),
            _ => String::new(),
        };
        Ok(pb::ListTicketsResponse { tickets: out, next_page_token: next })
    }

    async fn assign(&self, who: String, req: pb::AssignTicketRequest) -> Result<pb::Ticket, ApiError> {
        let mut v = FieldViolations::new();
        let id = v.check("ticket_id", parse_id("ticket_id", &req.ticket_id).map_err(|e| reason(&e)));
        let assignee = fields::text(&mut v, "assignee", &req.assignee, MAX_NAME, true);
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let id = id.ok_or_else(|| ApiError::internal("checked above"))?;
        let mut tx = self.desk.pool.begin().await?;
        let fresh = match idempotency::claim(&mut tx, "feedback.AssignTicket", &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let now = self.now();
        let mut t = tickets::lock(&mut tx, id).await?;
        let before = t.assignee.clone();
        t = sqlx::query_as(
            "UPDATE tickets SET assignee = $2, version = version + 1, updated_at = $3 WHERE ticket_id = $1 \
             RETURNING ticket_id, feedback_id, customer_id, category, urgent, queue, assignee, state, topic, repeat_of, \
             escalation_level, next_escalation_at, resolutions, version, created_at, updated_at",
        )
        .bind(id)
        .bind(&assignee)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let note = if before.is_empty() { format!("to {assignee}") } else { format!("from {before} to {assignee}") };
        tickets::record(&mut tx, id, now, &who, "assigned", None, &note).await?;
        let out = tickets::load_wire(&mut tx, &self.desk, &t, false).await?;
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn transition(&self, who: String, req: pb::TransitionTicketRequest) -> Result<pb::Ticket, ApiError> {
        let mut v = FieldViolations::new();
        let id = v.check("ticket_id", parse_id("ticket_id", &req.ticket_id).map_err(|e| reason(&e)));
        let to = match pb::TicketState::try_from(req.target_state) {
            Ok(pb::TicketState::Unspecified) => {
                v.required("target_state");
                None
            }
            Ok(s) => wire::state_from_pb(s as i32),
            Err(_) => {
                v.add("target_state", "unknown value");
                None
            }
        };
        let category = category_field(&mut v, "new_category", req.new_category, false);
        let note = fields::text(&mut v, "note", &req.note, 2000, false);
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let (id, to) = id.zip(to).ok_or_else(|| ApiError::internal("checked above"))?;
        let mut tx = self.desk.pool.begin().await?;
        let fresh = match idempotency::claim(&mut tx, "feedback.TransitionTicket", &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let now = self.now();
        let mut t = tickets::lock(&mut tx, id).await?;
        fields::check_etag(&req.etag, t.version)?;
        if let Some(c) = category {
            tickets::recategorise(&mut tx, &self.desk, &mut t, c, &who, now).await?;
        }
        let changed = tickets::transition(&mut tx, &self.desk, &mut t, to, &note, &who, &req.request_id, now).await?;
        let call = self.resolution_check(&mut tx, &t, changed.resolution_check, now).await?;
        let out = tickets::load_wire(&mut tx, &self.desk, &t, false).await?;
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        if let Some(call) = call {
            closed_loop::make_leased(&self.desk, call);
        }
        Ok(out)
    }

    /// On resolution: ask the customer to confirm (FBK-3 closed loop).
    async fn resolution_check(
        &self,
        tx: &mut sqlx::PgConnection,
        t: &TicketRow,
        resolved: bool,
        now: DateTime<Utc>,
    ) -> Result<Option<closed_loop::Leased>, ApiError> {
        if !resolved {
            return Ok(None);
        }
        let request_id = format!("feedback-check-{}-{}", t.ticket_id, t.resolutions);
        let call = closed_loop::enqueue(
            tx,
            &self.desk,
            LoopKind::ResolutionCheck,
            t.feedback_id,
            Some(t.ticket_id),
            &request_id,
            now,
        )
        .await?;
        tickets::record(tx, t.ticket_id, now, "system", "verification_requested", None, "").await?;
        Ok(call)
    }

    async fn verification(&self, req: pb::RecordVerificationRequest) -> Result<pb::Ticket, ApiError> {
        let mut v = FieldViolations::new();
        let id = v.check("ticket_id", parse_id("ticket_id", &req.ticket_id).map_err(|e| reason(&e)));
        let comment = fields::text(&mut v, "comment", &req.comment, 2000, false);
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let id = id.ok_or_else(|| ApiError::internal("checked above"))?;
        let mut tx = self.desk.pool.begin().await?;
        let fresh = match idempotency::claim(&mut tx, "feedback.RecordVerification", &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let now = self.now();
        let mut t = tickets::lock(&mut tx, id).await?;
        if t.state() != State::Resolved {
            return Err(ApiError::failed_precondition(
                "NOT_AWAITING_VERIFICATION",
                format!("ticket is {}; only a RESOLVED ticket awaits the customer's verification", t.state().name()),
            ));
        }
        let to = if req.confirmed { State::Verified } else { State::Reopened };
        tickets::transition(&mut tx, &self.desk, &mut t, to, &comment, "customer", &req.request_id, now).await?;
        let action = if req.confirmed { "verified" } else { "rejected" };
        tickets::record(&mut tx, id, now, "customer", action, None, &comment).await?;
        let out = tickets::load_wire(&mut tx, &self.desk, &t, false).await?;
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        Ok(out)
    }

    // ---- FBK-5 surveys ----------------------------------------------------

    async fn survey(&self, req: pb::SubmitSurveyResponseRequest) -> Result<pb::SurveyResponse, ApiError> {
        let mut v = FieldViolations::new();
        let r = req.response.clone().unwrap_or_default();
        if req.response.is_none() {
            v.required("response");
        }
        let customer = v.check("response.customer_id", parse_id("customer_id", &r.customer_id).map_err(|e| reason(&e)));
        let kind = match pb::SurveyKind::try_from(r.kind) {
            Ok(pb::SurveyKind::Nps) => Some(Survey::Nps),
            Ok(pb::SurveyKind::Csat) => Some(Survey::Csat),
            Ok(pb::SurveyKind::Unspecified) => {
                v.required("response.kind");
                None
            }
            Err(_) => {
                v.add("response.kind", "unknown value");
                None
            }
        };
        if let Some(k) = kind {
            v.check("response.score", k.check(r.score));
        }
        let ticket = fields::optional_id(&mut v, "response.ticket_id", &r.ticket_id);
        let campaign = fields::text(&mut v, "response.campaign_id", &r.campaign_id, MAX_NAME, false);
        let comment = fields::text(&mut v, "response.comment", &r.comment, MAX_TEXT_CHARS, false);
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let (customer, kind) = customer.zip(kind).ok_or_else(|| ApiError::internal("checked above"))?;
        let live = intake::check_customer(&self.desk, customer, "response.customer_id").await?;
        let mut tx = self.desk.pool.begin().await?;
        let fresh = match idempotency::claim(&mut tx, "feedback.SubmitSurveyResponse", &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        if let Some(t) = ticket {
            let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tickets WHERE ticket_id = $1)")
                .bind(t)
                .fetch_one(&mut *tx)
                .await?;
            if !exists {
                return Err(ApiError::invalid("response.ticket_id", "no such ticket"));
            }
        }
        let now = self.now();
        // A comment is feedback too (FBK-1 "survey" channel).
        let taken = if comment.is_empty() {
            None
        } else {
            let sub = Submission {
                customer,
                channel: Channel::Survey,
                text: comment.clone(),
                rating: (kind == Survey::Csat).then_some(r.score as u8),
            };
            Some(intake::take_in(&mut tx, &self.desk, &sub, live, &req.request_id, now).await?)
        };
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO survey_responses (survey_response_id, customer_id, submitted_customer_id, kind, score, ticket_id, campaign_id, comment, feedback_id, created_at) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
        )
        .bind(id)
        .bind(live.0)
        .bind(customer)
        .bind(r.kind as i16)
        .bind(r.score as i16)
        .bind(ticket)
        .bind(&campaign)
        .bind(&comment)
        .bind(taken.as_ref().map(|t| t.feedback.feedback_id))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let out = pb::SurveyResponse {
            survey_response_id: id.to_string(),
            customer_id: live.0.to_string(),
            kind: r.kind,
            score: r.score,
            ticket_id: ticket.map(|t| t.to_string()).unwrap_or_default(),
            campaign_id: campaign,
            comment,
            create_time: Some(ts(now)),
            feedback_id: taken.as_ref().map(|t| t.feedback.feedback_id.to_string()).unwrap_or_default(),
        };
        outbox::enqueue(
            &mut tx,
            SERVICE,
            Aggregate { kind: "survey_response", id: &id.to_string() },
            &req.request_id,
            // SEC-5: events carry ids and scores, not the customer's words.
            &pb::SurveyAnswered { response: Some(pb::SurveyResponse { comment: String::new(), ..out.clone() }) },
        )
        .await?;
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        if let Some(ack) = taken.and_then(|t| t.acknowledgement) {
            closed_loop::make_leased(&self.desk, ack);
        }
        Ok(out)
    }

    // ---- FBK-6 improvement actions ----------------------------------------

    async fn action_wire(&self, conn: &mut sqlx::PgConnection, id: Uuid) -> Result<pb::ImprovementAction, ApiError> {
        let row: Option<(String, String, DateTime<Utc>, String, i16, i64)> = sqlx::query_as(
            "SELECT title, owner_department, deadline, success_measure, status, version FROM improvement_actions WHERE action_id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
        let (title, owner_department, deadline, success_measure, status, version) =
            row.ok_or_else(|| ApiError::not_found("improvement action", id.to_string()))?;
        let ticket_ids: Vec<Uuid> =
            sqlx::query_scalar("SELECT ticket_id FROM action_tickets WHERE action_id = $1 ORDER BY ticket_id")
                .bind(id)
                .fetch_all(&mut *conn)
                .await?;
        Ok(pb::ImprovementAction {
            action_id: id.to_string(),
            title,
            owner_department,
            deadline: Some(ts(deadline)),
            success_measure,
            status: i32::from(status),
            ticket_ids: ticket_ids.iter().map(Uuid::to_string).collect(),
            etag: fields::etag(version),
        })
    }

    /// Checks the fields of an action named in `paths` (all of them on create).
    fn check_action(v: &mut FieldViolations, a: &pb::ImprovementAction, paths: &[&str]) -> CheckedAction {
        let has = |p: &str| paths.contains(&p);
        let mut out = CheckedAction::default();
        if has("title") {
            out.title = fields::text(v, "action.title", &a.title, 200, true);
        }
        if has("owner_department") {
            out.owner_department = fields::text(v, "action.owner_department", &a.owner_department, 100, true);
        }
        if has("success_measure") {
            out.success_measure = fields::text(v, "action.success_measure", &a.success_measure, 1000, true);
        }
        if has("deadline") {
            match a.deadline.as_ref() {
                None => v.required("action.deadline"),
                Some(t) => match fields::timestamp(t) {
                    Some(d) => out.deadline = Some(d),
                    None => v.add("action.deadline", "is not a valid time"),
                },
            }
        }
        if has("status") {
            match pb::ActionStatus::try_from(a.status) {
                Ok(pb::ActionStatus::Unspecified) => out.status = pb::ActionStatus::Plan as i16,
                Ok(s) => out.status = s as i16,
                Err(_) => v.add("action.status", "unknown value"),
            }
        }
        if has("ticket_ids") {
            let over = a.ticket_ids.len() > 1000;
            if over {
                // REL-5: no per-item work on a list over its limit.
                v.add("action.ticket_ids", "at most 1000 tickets");
            }
            for (i, t) in a.ticket_ids.iter().enumerate().take(if over { 0 } else { 1000 }) {
                if let Some(id) =
                    v.check(&format!("action.ticket_ids[{i}]"), Uuid::parse_str(t).map_err(|_| "must be an id (UUID)"))
                {
                    out.ticket_ids.push(id);
                }
            }
            out.ticket_ids.sort();
            out.ticket_ids.dedup();
        }
        out
    }

    async fn link_tickets(&self, tx: &mut sqlx::PgConnection, id: Uuid, tickets: &[Uuid]) -> Result<(), ApiError> {
        let known: Vec<Uuid> = sqlx::query_scalar("SELECT ticket_id FROM tickets WHERE ticket_id = ANY($1)")
            .bind(tickets)
            .fetch_all(&mut *tx)
            .await?;
        if let Some(missing) = tickets.iter().find(|t| !known.contains(t)) {
            return Err(ApiError::invalid("action.ticket_ids", format!("no such ticket {missing}")));
        }
        sqlx::query("DELETE FROM action_tickets WHERE action_id = $1").bind(id).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO action_tickets (action_id, ticket_id) SELECT $1, t FROM UNNEST($2::uuid[]) AS t")
            .bind(id)
            .bind(tickets)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    async fn create_action(&self, req: pb::CreateImprovementActionRequest) -> Result<pb::ImprovementAction, ApiError> {
        let mut v = FieldViolations::new();
        let a = req.action.clone().unwrap_or_default();
        if req.action.is_none() {
            v.required("action");
        }
        let c = Self::check_action(&mut v, &a, ACTION_FIELDS);
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let mut tx = self.desk.pool.begin().await?;
        let fresh = match idempotency::claim(&mut tx, "feedback.CreateImprovementAction", &req.request_id, &req).await?
        {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let id = Uuid::now_v7();
        let now = self.now();
        sqlx::query(
            "INSERT INTO improvement_actions (action_id, title, owner_department, deadline, success_measure, status, created_at, updated_at) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$7)",
        )
        .bind(id)
        .bind(&c.title)
        .bind(&c.owner_department)
        .bind(c.deadline)
        .bind(&c.success_measure)
        .bind(c.status)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        self.link_tickets(&mut tx, id, &c.ticket_ids).await?;
        let out = self.action_wire(&mut tx, id).await?;
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn update_action(&self, req: pb::UpdateImprovementActionRequest) -> Result<pb::ImprovementAction, ApiError> {
        let mut v = FieldViolations::new();
        let a = req.action.clone().unwrap_or_default();
        if req.action.is_none() {
            v.required("action");
        }
        let id = v.check("action.action_id", parse_id("action_id", &a.action_id).map_err(|e| reason(&e)));
        let paths = match fields::update_mask(&req.update_mask, ACTION_FIELDS) {
            Ok(p) => p,
            Err(e) => {
                v.absorb(Err(e));
                Vec::new()
            }
        };
        let path_refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        let c = Self::check_action(&mut v, &a, &path_refs);
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let id = id.ok_or_else(|| ApiError::internal("checked above"))?;
        let mut tx = self.desk.pool.begin().await?;
        let fresh = match idempotency::claim(&mut tx, "feedback.UpdateImprovementAction", &req.request_id, &req).await?
        {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let version: Option<i64> =
            sqlx::query_scalar("SELECT version FROM improvement_actions WHERE action_id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let version = version.ok_or_else(|| ApiError::not_found("improvement action", id.to_string()))?;
        fields::check_etag(&req.etag, version)?;
        let has = |p: &str| path_refs.contains(&p);
        sqlx::query(
            "UPDATE improvement_actions SET \
             title = CASE WHEN $2 THEN $3 ELSE title END, \
             owner_department = CASE WHEN $4 THEN $5 ELSE owner_department END, \
             deadline = CASE WHEN $6 THEN $7 ELSE deadline END, \
             success_measure = CASE WHEN $8 THEN $9 ELSE success_measure END, \
             status = CASE WHEN $10 THEN $11 ELSE status END, \
             version = version + 1, updated_at = $12 WHERE action_id = $1",
        )
        .bind(id)
        .bind(has("title"))
        .bind(&c.title)
        .bind(has("owner_department"))
        .bind(&c.owner_department)
        .bind(has("deadline"))
        .bind(c.deadline)
        .bind(has("success_measure"))
        .bind(&c.success_measure)
        .bind(has("status"))
        .bind(c.status)
        .bind(self.now())
        .execute(&mut *tx)
        .await?;
        if has("ticket_ids") {
            self.link_tickets(&mut tx, id, &c.ticket_ids).await?;
        }
        let out = self.action_wire(&mut tx, id).await?;
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn list_actions(
        &self,
        req: pb::ListImprovementActionsRequest,
    ) -> Result<pb::ListImprovementActionsResponse, ApiError> {
        let size = paging::page_size(req.page_size)?;
        let status = match pb::ActionStatus::try_from(req.status) {
            Ok(pb::ActionStatus::Unspecified) => None,
            Ok(s) => Some(s as i16),
            Err(_) => return Err(ApiError::invalid("status", "unknown value")),
        };
        let filter = paging::filter_hash(&req.status);
        let after: Option<(DateTime<Utc>, Uuid)> = paging::decode_token(&req.page_token, &filter)?;
        let ids: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(
            "SELECT action_id, deadline FROM improvement_actions WHERE ($1::smallint IS NULL OR status = $1) \
             AND ($2::timestamptz IS NULL OR (deadline, action_id) > ($2, $3)) ORDER BY deadline, action_id LIMIT $4",
        )
        .bind(status)
        .bind(after.map(|a| a.0))
        .bind(after.map(|a| a.1))
        .bind(size as i64 + 1)
        .fetch_all(&self.desk.pool)
        .await?;
        let more = ids.len() > size;
        let mut conn = self.desk.pool.acquire().await?;
        let mut actions = Vec::new();
        for (id, _) in ids.iter().take(size) {
            actions.push(self.action_wire(&mut conn, *id).await?);
        }
        let next = match (more, ids.get(size.saturating_sub(1))) {
            (true, Some((id, deadline))) => paging::encode_token(&(*deadline, *id), &filter),
            _ => String::new(),
        };
        Ok(pb::ListImprovementActionsResponse { actions, next_page_token: next })
    }

    fn policies(&self) -> pb::ListSlaPoliciesResponse {
        let cal = &self.desk.calendar;
        let policies = self
            .desk
            .policies
            .all()
            .iter()
            .map(|p| {
                let targets = ticket::clock_targets(p, cal);
                let of = |k| targets.iter().find(|(kind, _)| *kind == k).map(|(_, s)| *s).unwrap_or(0);
                pb::SlaPolicy {
                    category: wire::category_to_pb(p.category) as i32,
                    urgent: p.urgent,
                    first_response_seconds: of(crate::domain::sla::ClockKind::FirstResponse),
                    resolution_seconds: of(crate::domain::sla::ClockKind::Resolution),
                    business_hours: p.counting == crate::domain::sla::Counting::BusinessHours,
                    queue: p.queue.to_string(),
                    pausable: p.pausable,
                }
            })
            .collect();
        let days: Vec<&str> = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
            .into_iter()
            .zip(cal.workdays)
            .filter(|(_, on)| *on)
            .map(|(d, _)| d)
            .collect();
        let calendar = format!(
            "{} {}-{} {}, {} holidays, {} extra working days",
            days.join(","),
            cal.open.format("%H:%M"),
            cal.close.format("%H:%M"),
            cal.tz.name(),
            cal.holidays.len(),
            cal.extra_workdays.len()
        );
        pb::ListSlaPoliciesResponse { policies, calendar }
    }
}

/// Fields of an improvement action a client sets.
const ACTION_FIELDS: &[&str] = &["title", "owner_department", "deadline", "success_measure", "status", "ticket_ids"];

#[derive(Debug, Default)]
struct CheckedAction {
    title: String,
    owner_department: String,
    deadline: Option<DateTime<Utc>>,
    success_measure: String,
    status: i16,
    ticket_ids: Vec<Uuid>,
}

#[tonic::async_trait]
impl FeedbackService for FeedbackApi {
    async fn submit_feedback(&self, r: Request<pb::SubmitFeedbackRequest>) -> Reply<pb::SubmitFeedbackResponse> {
        let caller = Caller::or_nobody(&r);
        let work = async {
            let mut out = self.submit(r.into_inner()).await?;
            privacy::submitted(&self.desk, &caller, &mut out).await;
            Ok(out)
        };
        work.await.into_grpc(SERVICE)
    }
    async fn get_feedback(&self, r: Request<pb::GetFeedbackRequest>) -> Reply<pb::Feedback> {
        let caller = Caller::or_nobody(&r);
        let work = async {
            let id = parse_id("feedback_id", &r.get_ref().feedback_id)?;
            let mut conn = self.desk.pool.acquire().await?;
            let mut f = self.feedback_row(&mut conn, id).await?.to_wire();
            drop(conn);
            privacy::feedback(&self.desk, &caller, std::slice::from_mut(&mut f)).await;
            Ok(f)
        };
        work.await.into_grpc(SERVICE)
    }
    async fn list_feedback(&self, r: Request<pb::ListFeedbackRequest>) -> Reply<pb::ListFeedbackResponse> {
        let caller = Caller::or_nobody(&r);
        let work = async {
            let mut out = self.list_feedback(r.into_inner()).await?;
            privacy::feedback(&self.desk, &caller, &mut out.feedback).await;
            Ok(out)
        };
        work.await.into_grpc(SERVICE)
    }
    async fn reclassify_feedback(&self, r: Request<pb::ReclassifyFeedbackRequest>) -> Reply<pb::Feedback> {
        let caller = Caller::or_nobody(&r);
        let work = async {
            let mut f = self.reclassify(caller.subject.clone(), r.into_inner()).await?;
            privacy::feedback(&self.desk, &caller, std::slice::from_mut(&mut f)).await;
            Ok(f)
        };
        work.await.into_grpc(SERVICE)
    }
    async fn classify_text(&self, r: Request<pb::ClassifyTextRequest>) -> Reply<pb::Classification> {
        let work = async {
            let mut v = FieldViolations::new();
            let text = fields::text(&mut v, "text", &r.get_ref().text, MAX_TEXT_CHARS, true);
            v.into_result()?;
            Ok(intake::classification_to_wire(&self.desk.classifier.classify(&text, None)))
        };
        work.await.into_grpc(SERVICE)
    }
    async fn get_ticket(&self, r: Request<pb::GetTicketRequest>) -> Reply<pb::Ticket> {
        let caller = Caller::or_nobody(&r);
        let work = async {
            let id = parse_id("ticket_id", &r.get_ref().ticket_id)?;
            let mut conn = self.desk.pool.acquire().await?;
            let t = tickets::get(&mut conn, id).await?;
            let wire = tickets::load_wire(&mut conn, &self.desk, &t, true).await?;
            drop(conn);
            self.shown(&caller, wire).await
        };
        work.await.into_grpc(SERVICE)
    }
    async fn list_tickets(&self, r: Request<pb::ListTicketsRequest>) -> Reply<pb::ListTicketsResponse> {
        let caller = Caller::or_nobody(&r);
        let work = async {
            let mut out = self.list_tickets(r.into_inner()).await?;
            privacy::tickets(&self.desk, &caller, &mut out.tickets).await;
            Ok(out)
        };
        work.await.into_grpc(SERVICE)
    }
    async fn assign_ticket(&self, r: Request<pb::AssignTicketRequest>) -> Reply<pb::Ticket> {
        let caller = Caller::or_nobody(&r);
        let work = async { self.shown(&caller, self.assign(actor(&r), r.into_inner()).await?).await };
        work.await.into_grpc(SERVICE)
    }
    async fn transition_ticket(&self, r: Request<pb::TransitionTicketRequest>) -> Reply<pb::Ticket> {
        let caller = Caller::or_nobody(&r);
        let work = async { self.shown(&caller, self.transition(actor(&r), r.into_inner()).await?).await };
        work.await.into_grpc(SERVICE)
    }
    async fn record_verification(&self, r: Request<pb::RecordVerificationRequest>) -> Reply<pb::Ticket> {
        let caller = Caller::or_nobody(&r);
        let work = async { self.shown(&caller, self.verification(r.into_inner()).await?).await };
        work.await.into_grpc(SERVICE)
    }
    async fn submit_survey_response(&self, r: Request<pb::SubmitSurveyResponseRequest>) -> Reply<pb::SurveyResponse> {
        let caller = Caller::or_nobody(&r);
        let work = async {
            let mut out = self.survey(r.into_inner()).await?;
            privacy::survey(&self.desk, &caller, &mut out).await;
            Ok(out)
        };
        work.await.into_grpc(SERVICE)
    }
    async fn create_improvement_action(
        &self,
        r: Request<pb::CreateImprovementActionRequest>,
    ) -> Reply<pb::ImprovementAction> {
        self.create_action(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn update_improvement_action(
        &self,
        r: Request<pb::UpdateImprovementActionRequest>,
    ) -> Reply<pb::ImprovementAction> {
        self.update_action(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn list_improvement_actions(
        &self,
        r: Request<pb::ListImprovementActionsRequest>,
    ) -> Reply<pb::ListImprovementActionsResponse> {
        self.list_actions(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn list_sla_policies(&self, _r: Request<pb::ListSlaPoliciesRequest>) -> Reply<pb::ListSlaPoliciesResponse> {
        Ok(Response::new(self.policies()))
    }
    async fn get_classification_stats(
        &self,
        r: Request<pb::GetClassificationStatsRequest>,
    ) -> Reply<pb::ClassificationStats> {
        self.classification_stats(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn check_open_complaints(
        &self,
        r: Request<pb::CheckOpenComplaintsRequest>,
    ) -> Reply<pb::CheckOpenComplaintsResponse> {
        self.open_complaints(r.into_inner()).await.into_grpc(SERVICE)
    }
}
