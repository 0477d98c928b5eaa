//! The `crm.outreach.v1.OutreachService` handlers (SPEC 4.3): decode and
//! validate, then the domain and the store. Every message goes through the
//! dispatcher ([`crate::dispatch`]) for its contact-policy decision.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use crm_kit::idempotency::{self, Claim};
use crm_kit::privacy::TextMasker;
use crm_kit::{ApiError, Caller, FieldViolations, IntoGrpc, outbox, paging};
use crm_proto::common::v1::{Channel, Purpose, Tier};
use crm_proto::outreach::v1 as pb;
use crm_proto::outreach::v1::outreach_service_server::OutreachService;
use prost::Message;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain::{campaign, channel, task, template};
use crate::messages::{COLUMNS, MessageRow, cny, state, ts};
use crate::tasks::{self, TaskRow};
use crate::{SERVICE, campaigns, dispatch, privacy, settings, templates};

const SVC: &str = "/crm.outreach.v1.OutreachService/";
const MAX_NAME: usize = 200;
const MAX_TEXT: usize = 2000;

type Reply<T> = Result<Response<T>, Status>;

/// id, message_id, verdict, rule, detail, decided_at, deferred_until.
type DecisionRow = (i64, Uuid, i16, String, String, DateTime<Utc>, Option<DateTime<Utc>>);

/// spec, state, spent_minor, version, created_at, updated_at.
type CampaignRow = (Vec<u8>, i16, i64, i64, DateTime<Utc>, DateTime<Utc>);

/// Well-known template used by AcknowledgeFeedback (seeded by a migration, editable).
pub const ACK_TEMPLATE: Uuid = Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0a01);
/// The system template asking a customer to confirm a resolved ticket (FBK-3 closed loop).
pub const VERIFY_TEMPLATE: Uuid = Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0a02);

/// The outreach API.
#[derive(Clone)]
pub struct OutreachApi {
    pg: PgPool,
    default_tz: Tz,
    wake: Arc<Notify>,
    adapters: Vec<String>,
    /// Masks task notes for callers without `pii:read` (SEC-4); None: withheld.
    masker: Option<Arc<dyn TextMasker>>,
}

fn parse_id(field: &str, value: &str) -> Result<Uuid, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| ApiError::invalid(field, "must be an id (UUID)"))
}

fn time(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

fn check_name(v: &mut FieldViolations, field: &str, value: &str) {
    if value.trim().is_empty() {
        v.required(field);
    } else if value.len() > MAX_NAME {
        v.add(field, format!("is longer than {MAX_NAME} bytes"));
    }
}

fn outbound_channel(v: &mut FieldViolations, field: &str, raw: i32, required: bool) -> Option<Channel> {
    match Channel::try_from(raw) {
        Ok(Channel::Unspecified) if !required => None,
        Ok(ch) if channel::is_outbound(ch) => Some(ch),
        _ => {
            let names: Vec<&str> = channel::OUTBOUND.iter().map(|(c, _)| c.as_str_name()).collect();
            v.add(field, format!("must be an outbound channel: {}", names.join(", ")));
            None
        }
    }
}

fn purpose(v: &mut FieldViolations, field: &str, raw: i32, default: Option<Purpose>) -> Purpose {
    match (Purpose::try_from(raw), default) {
        (Ok(Purpose::Unspecified), Some(d)) => d,
        (Ok(p), _) if p != Purpose::Unspecified => p,
        _ => {
            v.add(field, "must be PURPOSE_SERVICE or PURPOSE_MARKETING");
            Purpose::Marketing
        }
    }
}

fn mask_paths(mask: &Option<prost_types::FieldMask>, allowed: &[&str]) -> Result<Vec<String>, ApiError> {
    let paths = mask.as_ref().map(|m| m.paths.clone()).unwrap_or_default();
    if paths.is_empty() {
        return Err(ApiError::invalid("update_mask", format!("is required; fields: {}", allowed.join(", "))));
    }
    for p in &paths {
        if !allowed.contains(&p.as_str()) {
            return Err(ApiError::invalid(
                "update_mask",
                format!("unknown field {p:?}; fields: {}", allowed.join(", ")),
            ));
        }
    }
    Ok(paths)
}

fn check_etag(given: &str, version: i64) -> Result<(), ApiError> {
    if !given.is_empty() && given != format!("v{version}") {
        return Err(ApiError::Aborted(format!("etag {given:?} is stale; the current one is \"v{version}\"")));
    }
    Ok(())
}

impl OutreachApi {
    /// An API over the pool; `wake` tells the delivery worker there is work.
    pub fn new(pg: PgPool, default_tz: Tz, wake: Arc<Notify>, adapters: Vec<String>) -> Self {
        Self { pg, default_tz, wake, adapters, masker: None }
    }

    /// Masks free text for callers without `pii:read` through `masker` (profiles).
    pub fn with_masker(mut self, masker: Option<Arc<dyn TextMasker>>) -> Self {
        self.masker = masker;
        self
    }

    /// A task as `caller` may see it (SEC-4).
    async fn shown(&self, caller: &Caller, mut t: pb::Task) -> Result<pb::Task, ApiError> {
        privacy::tasks(self.masker.as_deref(), caller, std::slice::from_mut(&mut t)).await;
        Ok(t)
    }

    // ---- channels -------------------------------------------------------

    async fn channels(&self) -> Result<Vec<pb::ChannelConfig>, ApiError> {
        let mut conn = self.pg.acquire().await?;
        Ok(settings::load_channels(&mut conn)
            .await?
            .into_iter()
            .map(|(ch, cost, enabled, adapter)| pb::ChannelConfig {
                channel: ch as i32,
                cost_per_contact: Some(cny(cost)),
                enabled,
                adapter,
            })
            .collect())
    }

    async fn update_channel(&self, req: pb::UpdateChannelRequest) -> Result<pb::ChannelConfig, ApiError> {
        let mut v = FieldViolations::new();
        let c = req.channel.clone().unwrap_or_default();
        if req.channel.is_none() {
            v.required("channel");
        }
        let ch = outbound_channel(&mut v, "channel.channel", c.channel, true);
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let paths = mask_paths(&req.update_mask, &["cost_per_contact", "enabled", "adapter"])?;
        let mut v = FieldViolations::new();
        if paths.iter().any(|p| p == "cost_per_contact") {
            match &c.cost_per_contact {
                Some(m) if m.currency == "CNY" && (0..=1_000_000).contains(&m.amount_minor) => {}
                _ => v.add("channel.cost_per_contact", "must be CNY with amount_minor 0..1000000"),
            }
        }
        if paths.iter().any(|p| p == "adapter") {
            let configured = self.adapters.contains(&c.adapter);
            match c.adapter.as_str() {
                "smtp" if ch != Some(Channel::Email) => v.add("channel.adapter", "smtp delivers e-mail only"),
                "log" | "webhook" | "smtp" if configured => {}
                "webhook" => v.add("channel.adapter", "the webhook adapter needs OUTREACH_WEBHOOK_URL on the service"),
                "smtp" => v.add("channel.adapter", "the smtp adapter needs OUTREACH_SMTP_RELAY on the service"),
                _ => v.add("channel.adapter", "must be \"log\", \"webhook\" or \"smtp\""),
            }
        }
        v.into_result()?;
        let ch = ch.unwrap_or(Channel::Sms);
        let mut tx = self.pg.begin().await?;
        let fresh = match idempotency::claim(&mut tx, &format!("{SVC}UpdateChannel"), &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let current = settings::load_channels(&mut tx)
            .await?
            .into_iter()
            .find(|(c, ..)| *c == ch)
            .ok_or_else(|| ApiError::internal("outbound channel without settings"))?;
        let has = |f: &str| paths.iter().any(|p| p == f);
        let cost =
            if has("cost_per_contact") { c.cost_per_contact.map(|m| m.amount_minor).unwrap_or(0) } else { current.1 };
        let enabled = if has("enabled") { c.enabled } else { current.2 };
        let adapter = if has("adapter") { c.adapter.clone() } else { current.3 };
        sqlx::query(
            "INSERT INTO channels (channel, cost_minor, enabled, adapter) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (channel) DO UPDATE SET cost_minor = $2, enabled = $3, adapter = $4",
        )
        .bind(ch as i16)
        .bind(cost)
        .bind(enabled)
        .bind(&adapter)
        .execute(&mut *tx)
        .await?;
        let out = pb::ChannelConfig { channel: ch as i32, cost_per_contact: Some(cny(cost)), enabled, adapter };
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        Ok(out)
    }

    // ---- templates ------------------------------------------------------

    fn check_template(&self, t: &pb::Template, prefix: &str) -> Result<Vec<template::Body>, ApiError> {
        let mut v = FieldViolations::new();
        check_name(&mut v, &format!("{prefix}display_name"), &t.display_name);
        outbound_channel(&mut v, &format!("{prefix}channel"), t.channel, true);
        purpose(&mut v, &format!("{prefix}purpose"), t.purpose, None);
        if pb::ContentType::try_from(t.content_type).is_err() {
            v.add(format!("{prefix}content_type"), "unknown value");
        }
        let bodies = templates::parse_bodies(&t.bodies, &format!("{prefix}bodies"));
        if let Err(ApiError::InvalidArgument(more)) = &bodies {
            for f in more.iter() {
                v.add(f.field.clone(), f.description.clone());
            }
        }
        v.into_result()?;
        bodies
    }

    async fn template_row(&self, conn: &mut PgConnection, id: Uuid) -> Result<(pb::Template, i64), ApiError> {
        let row: Option<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT bodies, version FROM templates WHERE template_id = $1")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?;
        let (bytes, version) = row.ok_or_else(|| ApiError::not_found("template", id.to_string()))?;
        let mut t = pb::Template::decode(bytes.as_slice()).map_err(ApiError::internal)?;
        t.template_id = id.to_string();
        t.etag = format!("v{version}");
        Ok((t, version))
    }

    async fn create_template(&self, req: pb::CreateTemplateRequest) -> Result<pb::Template, ApiError> {
        let mut v = FieldViolations::new();
        if req.template.is_none() {
            v.required("template");
        }
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let mut t = req.template.clone().unwrap_or_default();
        let bodies = self.check_template(&t, "template.")?;
        let mut tx = self.pg.begin().await?;
        let fresh = match idempotency::claim(&mut tx, &format!("{SVC}CreateTemplate"), &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        templates::save(&mut tx, Uuid::now_v7(), &mut t, &bodies, 1, true).await?;
        fresh.complete(&mut tx, &t).await?;
        tx.commit().await?;
        Ok(t)
    }

    async fn update_template(&self, req: pb::UpdateTemplateRequest) -> Result<pb::Template, ApiError> {
        let mut v = FieldViolations::new();
        let given = req.template.clone().unwrap_or_default();
        if req.template.is_none() {
            v.required("template");
        }
        let id = v.check(
            "template.template_id",
            parse_id("template.template_id", &given.template_id).map_err(|e| e.to_string()),
        );
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let id = id.unwrap_or_default();
        let paths = mask_paths(&req.update_mask, &["display_name", "channel", "content_type", "purpose", "bodies"])?;
        let mut tx = self.pg.begin().await?;
        let fresh = match idempotency::claim(&mut tx, &format!("{SVC}UpdateTemplate"), &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let (mut t, version) = self.template_row(&mut tx, id).await?;
        check_etag(&req.etag, version)?;
        for p in &paths {
            match p.as_str() {
                "display_name" => t.display_name = given.display_name.clone(),
                "channel" => t.channel = given.channel,
                "content_type" => t.content_type = given.content_type,
                "purpose" => t.purpose = given.purpose,
                _ => t.bodies = given.bodies.clone(),
            }
        }
        let bodies = self.check_template(&t, "template.")?;
        templates::save(&mut tx, id, &mut t, &bodies, version + 1, true).await?;
        fresh.complete(&mut tx, &t).await?;
        tx.commit().await?;
        Ok(t)
    }

    async fn list_templates(&self, req: pb::ListTemplatesRequest) -> Result<pb::ListTemplatesResponse, ApiError> {
        let size = paging::page_size(req.page_size)?;
        let mut v = FieldViolations::new();
        let ch = outbound_channel(&mut v, "channel", req.channel, false);
        v.into_result()?;
        let filter = paging::filter_hash(&req.channel);
        let after: Option<Uuid> = paging::decode_token(&req.page_token, &filter)?;
        let rows: Vec<(Uuid, Vec<u8>, i64)> = sqlx::query_as(
            "SELECT template_id, bodies, version FROM templates WHERE ($1::smallint IS NULL OR channel = $1) \
             AND ($2::uuid IS NULL OR template_id > $2) ORDER BY template_id LIMIT $3",
        )
        .bind(ch.map(|c| c as i16))
        .bind(after)
        .bind(size as i64 + 1)
        .fetch_all(&self.pg)
        .await?;
        let more = rows.len() > size;
        let mut out = pb::ListTemplatesResponse::default();
        for (id, bytes, version) in rows.into_iter().take(size) {
            let mut t = pb::Template::decode(bytes.as_slice()).map_err(ApiError::internal)?;
            t.template_id = id.to_string();
            t.etag = format!("v{version}");
            if more {
                out.next_page_token = paging::encode_token(&id, &filter);
            }
            out.templates.push(t);
        }
        if !more {
            out.next_page_token.clear();
        }
        Ok(out)
    }

    async fn preview_template(&self, req: pb::PreviewTemplateRequest) -> Result<pb::PreviewTemplateResponse, ApiError> {
        let id = parse_id("template_id", &req.template_id)?;
        let mut conn = self.pg.acquire().await?;
        let (t, _) = self.template_row(&mut conn, id).await?;
        let bodies = templates::parse_bodies(&t.bodies, "template.bodies")?;
        let locale = if req.locale.is_empty() {
            bodies.first().map(|b| b.locale.clone()).unwrap_or_default()
        } else {
            req.locale.clone()
        };
        let body = bodies
            .iter()
            .find(|b| b.locale == locale)
            .ok_or_else(|| ApiError::invalid("locale", format!("the template has no {locale:?} body")))?;
        let mut values = BTreeMap::new();
        if !req.customer_id.is_empty() {
            let customer = parse_id("customer_id", &req.customer_id)?;
            let row: Option<(i16, i64)> =
                sqlx::query_as("SELECT tier, spend_minor FROM customers WHERE customer_id = $1")
                    .bind(customer)
                    .fetch_optional(&mut *conn)
                    .await?;
            let (tier, spend) = row.ok_or_else(|| ApiError::not_found("customer", &req.customer_id))?;
            values =
                crate::delivery::offer_values(Tier::try_from(tier as i32).unwrap_or(Tier::Unspecified), spend, &locale);
        }
        values.extend(req.sample_values.clone());
        let render = |field: &str, text: &template::Text| {
            text.render(&values).map_err(|e| ApiError::invalid(field, format!("{e}; give it in sample_values")))
        };
        Ok(pb::PreviewTemplateResponse {
            subject: render("sample_values", &body.subject)?,
            body: render("sample_values", &body.body)?,
        })
    }

    // ---- contact policy ---------------------------------------------------

    async fn update_policy(&self, req: pb::UpdateContactPolicyRequest) -> Result<pb::ContactPolicy, ApiError> {
        let mut v = FieldViolations::new();
        if req.policy.is_none() {
            v.required("policy");
        }
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let given = req.policy.clone().unwrap_or_default();
        let paths = mask_paths(
            &req.update_mask,
            &[
                "caps",
                "quiet_start",
                "quiet_end",
                "backoff_after_unanswered",
                "backoff_min_days",
                "global_control_percent",
            ],
        )?;
        let mut tx = self.pg.begin().await?;
        let fresh =
            match idempotency::claim(&mut tx, &format!("{SVC}UpdateContactPolicy"), &req.request_id, &req).await? {
                Claim::Replay(r) => return Ok(r),
                Claim::Fresh(f) => f,
            };
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('outreach:policy'))").execute(&mut *tx).await?;
        let mut p = settings::load_policy(&mut tx).await?;
        let version: i64 = p.etag.trim_start_matches('v').parse().unwrap_or(0);
        check_etag(&req.etag, version)?;
        for path in &paths {
            match path.as_str() {
                "caps" => p.caps = given.caps.clone(),
                "quiet_start" => p.quiet_start = given.quiet_start.clone(),
                "quiet_end" => p.quiet_end = given.quiet_end.clone(),
                "backoff_after_unanswered" => p.backoff_after_unanswered = given.backoff_after_unanswered,
                "backoff_min_days" => p.backoff_min_days = given.backoff_min_days,
                _ => p.global_control_percent = given.global_control_percent,
            }
        }
        settings::parse_policy(&p, "policy.")?;
        p.etag.clear();
        sqlx::query(
            "INSERT INTO contact_policy (singleton, policy, version) VALUES (true, $1, $2) \
             ON CONFLICT (singleton) DO UPDATE SET policy = $1, version = $2",
        )
        .bind(p.encode_to_vec())
        .bind(version + 1)
        .execute(&mut *tx)
        .await?;
        p.etag = format!("v{}", version + 1);
        fresh.complete(&mut tx, &p).await?;
        tx.commit().await?;
        Ok(p)
    }

    // ---- messages ---------------------------------------------------------

    async fn message_in(&self, conn: &mut PgConnection, id: Uuid) -> Result<MessageRow, ApiError> {
        let sql = format!("SELECT {COLUMNS} FROM messages WHERE message_id = $1");
        let row: Option<MessageRow> =
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&mut *conn).await?;
        row.ok_or_else(|| ApiError::not_found("message", id.to_string()))
    }

    /// Queues one message and decides it at once (OUT-5), in one transaction
    /// with the idempotency claim.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        scope: &str,
        request: &impl Message,
        request_id: &str,
        customer: Uuid,
        channel: Option<Channel>,
        template_id: Uuid,
        variables: &BTreeMap<String, String>,
        forced_purpose: Option<Purpose>,
        trigger: &str,
        locale: &str,
    ) -> Result<pb::SendMessageResponse, ApiError> {
        let mut tx = self.pg.begin().await?;
        let fresh = match idempotency::claim(&mut tx, &format!("{SVC}{scope}"), request_id, request).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let (t, _) = self.template_row(&mut tx, template_id).await.map_err(|e| match e {
            ApiError::NotFound { .. } => ApiError::invalid("template_id", "no such template"),
            e => e,
        })?;
        // OUT-2: every variable the template needs must be known before it is queued;
        // OUT-6: the caller gives only the free ones it declares.
        let bodies = templates::parse_bodies(&t.bodies, "template.bodies")?;
        let used = template::variables_of(&bodies);
        let mut v = FieldViolations::new();
        // A client's SendMessage names only what the template uses; the
        // acknowledgements pass both feedback and ticket ids to either template.
        for given in variables.keys().filter(|_| scope == "SendMessage") {
            if !used.contains(given) {
                v.add(format!("variables[{given}]"), "is not used by the template");
            }
        }
        for needed in &used {
            if template::is_free(needed) && !variables.contains_key(needed) {
                v.add("variables", format!("the template needs {{{{{needed}}}}}; give it in variables"));
            }
        }
        v.into_result()?;
        let live = crm_kit::db::live_customer(&mut tx, customer).await?.unwrap_or(customer);
        let preferred: Option<i16> =
            sqlx::query_scalar("SELECT preferred_channel FROM customers WHERE customer_id = $1")
                .bind(live)
                .fetch_optional(&mut *tx)
                .await?;
        let ch = channel
            .or_else(|| preferred.and_then(|p| Channel::try_from(p as i32).ok()).filter(|c| channel::is_outbound(*c)))
            .unwrap_or(Channel::try_from(t.channel).unwrap_or(Channel::Sms));
        let purpose = forced_purpose.unwrap_or(Purpose::try_from(t.purpose).unwrap_or(Purpose::Marketing));
        let id = Uuid::now_v7();
        let now = Utc::now();
        let sql = format!(
            "INSERT INTO messages (message_id, customer_id, channel, template_id, trigger_name, purpose, variables, locale, state, due_at, expires_at) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11) RETURNING {COLUMNS}"
        );
        let row: MessageRow = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(live)
            .bind(ch as i16)
            .bind(template_id)
            .bind(trigger)
            .bind(purpose as i16)
            .bind(serde_json::to_value(variables).map_err(ApiError::internal)?)
            .bind(locale)
            .bind(state::QUEUED)
            .bind(now)
            .bind(now + Duration::days(campaigns::MESSAGE_LIFETIME_DAYS))
            .fetch_one(&mut *tx)
            .await?;
        let (tally, _) = dispatch::decide(&mut tx, vec![row], self.default_tz, now, None).await?;
        let row = self.message_in(&mut tx, id).await?;
        let out = pb::SendMessageResponse { message: Some(row.to_wire()) };
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        if tally.approved > 0 {
            self.wake.notify_one();
        }
        Ok(out)
    }

    async fn send_message(&self, req: pb::SendMessageRequest) -> Result<pb::SendMessageResponse, ApiError> {
        let mut v = FieldViolations::new();
        let customer = v.check("customer_id", parse_id("customer_id", &req.customer_id).map_err(|e| e.to_string()));
        let ch = outbound_channel(&mut v, "channel", req.channel, false);
        let template = v.check("template_id", parse_id("template_id", &req.template_id).map_err(|e| e.to_string()));
        check_variables(&mut v, &req.variables);
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let (Some(customer), Some(template)) = (customer, template) else {
            return Err(ApiError::internal("checked above"));
        };
        self.send("SendMessage", &req, &req.request_id, customer, ch, template, &req.variables, None, "", "").await
    }

    async fn acknowledge(&self, req: pb::AcknowledgeFeedbackRequest) -> Result<pb::SendMessageResponse, ApiError> {
        let mut v = FieldViolations::new();
        let customer = v.check("customer_id", parse_id("customer_id", &req.customer_id).map_err(|e| e.to_string()));
        if req.feedback_id.is_empty() {
            v.required("feedback_id");
        } else if req.feedback_id.len() > 128 {
            v.add("feedback_id", "is longer than 128 bytes");
        }
        if req.ticket_id.len() > 128 {
            v.add("ticket_id", "is longer than 128 bytes");
        }
        if !req.locale.is_empty() && !template::LOCALES.contains(&req.locale.as_str()) {
            v.add("locale", format!("must be one of {}", template::LOCALES.join(", ")));
        }
        if Channel::try_from(req.channel).is_err() {
            v.add("channel", "unknown value");
        }
        if pb::AcknowledgementKind::try_from(req.kind).is_err() {
            v.add("kind", "unknown value");
        }
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let customer = customer.ok_or_else(|| ApiError::internal("checked above"))?;
        // The acknowledgement prefers the channel the feedback came in on, if we can send there.
        let ch = Channel::try_from(req.channel).ok().filter(|c| channel::is_outbound(*c) && !channel::is_personal(*c));
        let mut vars = BTreeMap::new();
        vars.insert("feedback_id".to_string(), req.feedback_id.clone());
        vars.insert("ticket_id".to_string(), req.ticket_id.clone());
        let locale = if req.locale.is_empty() { "zh-CN" } else { req.locale.as_str() };
        let (template, trigger) = match pb::AcknowledgementKind::try_from(req.kind) {
            Ok(pb::AcknowledgementKind::ResolutionCheck) => (VERIFY_TEMPLATE, "feedback_verification"),
            _ => (ACK_TEMPLATE, "feedback_acknowledgement"),
        };
        self.send(
            "AcknowledgeFeedback",
            &req,
            &req.request_id,
            customer,
            ch,
            template,
            &vars,
            Some(Purpose::Service),
            trigger,
            locale,
        )
        .await
    }

    async fn list_messages(&self, req: pb::ListMessagesRequest) -> Result<pb::ListMessagesResponse, ApiError> {
        let size = paging::page_size(req.page_size)?;
        let mut v = FieldViolations::new();
        let customer = (!req.customer_id.is_empty())
            .then(|| v.check("customer_id", parse_id("customer_id", &req.customer_id).map_err(|e| e.to_string())))
            .flatten();
        let campaign = (!req.campaign_id.is_empty())
            .then(|| v.check("campaign_id", parse_id("campaign_id", &req.campaign_id).map_err(|e| e.to_string())))
            .flatten();
        let st: Option<Vec<i16>> = match pb::MessageState::try_from(req.state) {
            Ok(pb::MessageState::Unspecified) => None,
            Ok(pb::MessageState::Queued) => Some(vec![state::QUEUED, state::APPROVED]),
            Ok(pb::MessageState::Sent) => Some(vec![state::SENT]),
            Ok(pb::MessageState::Delivered) => Some(vec![state::DELIVERED]),
            Ok(pb::MessageState::Suppressed) => Some(vec![state::SUPPRESSED]),
            Ok(pb::MessageState::DeadLetter) => Some(vec![state::DEAD_LETTER]),
            Err(_) => {
                v.add("state", "unknown value");
                None
            }
        };
        v.into_result()?;
        let filter = paging::filter_hash(&(&req.customer_id, &req.campaign_id, req.state));
        let after: Option<(DateTime<Utc>, Uuid)> = paging::decode_token(&req.page_token, &filter)?;
        let sql = format!(
            "SELECT {COLUMNS} FROM messages WHERE ($1::uuid IS NULL OR customer_id = $1) AND ($2::uuid IS NULL OR campaign_id = $2) \
             AND ($3::smallint[] IS NULL OR state = ANY($3)) AND ($4::timestamptz IS NULL OR (created_at, message_id) < ($4, $5)) \
             ORDER BY created_at DESC, message_id DESC LIMIT $6"
        );
        let rows: Vec<MessageRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(customer)
            .bind(campaign)
            .bind(st)
            .bind(after.map(|a| a.0))
            .bind(after.map(|a| a.1))
            .bind(size as i64 + 1)
            .fetch_all(&self.pg)
            .await?;
        let more = rows.len() > size;
        let rows: Vec<MessageRow> = rows.into_iter().take(size).collect();
        let next =
            if more { rows.last().map(|r| paging::encode_token(&(r.created_at, r.message_id), &filter)) } else { None };
        Ok(pb::ListMessagesResponse {
            messages: rows.iter().map(MessageRow::to_wire).collect(),
            next_page_token: next.unwrap_or_default(),
        })
    }

    async fn retry_message(&self, req: pb::RetryMessageRequest) -> Result<pb::Message, ApiError> {
        let mut v = FieldViolations::new();
        let id = v.check("message_id", parse_id("message_id", &req.message_id).map_err(|e| e.to_string()));
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let id = id.unwrap_or_default();
        let mut tx = self.pg.begin().await?;
        let fresh = match idempotency::claim(&mut tx, &format!("{SVC}RetryMessage"), &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let row = self.message_in(&mut tx, id).await?;
        if row.state != state::DEAD_LETTER {
            return Err(ApiError::failed_precondition(
                "NOT_DEAD_LETTERED",
                "only a dead-lettered message can be retried",
            ));
        }
        // The policy allowed it already and counted the contact: back to the adapter, same idempotency key.
        sqlx::query(
            "UPDATE messages SET state = $2, attempts = 0, due_at = now(), lease_until = NULL WHERE message_id = $1",
        )
        .bind(id)
        .bind(state::APPROVED)
        .execute(&mut *tx)
        .await?;
        let out = self.message_in(&mut tx, id).await?.to_wire();
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        self.wake.notify_one();
        Ok(out)
    }

    async fn record_outcome(&self, req: pb::RecordOutcomeRequest) -> Result<pb::RecordOutcomeResponse, ApiError> {
        let mut v = FieldViolations::new();
        let id = v.check("message_id", parse_id("message_id", &req.message_id).map_err(|e| e.to_string()));
        let outcome = match pb::OutcomeKind::try_from(req.outcome) {
            Ok(pb::OutcomeKind::Unspecified) | Err(_) => {
                v.add("outcome", "must be one of DELIVERED, OPENED, CLICKED, RESPONDED, CONVERTED, FAILED");
                pb::OutcomeKind::Unspecified
            }
            Ok(o) => o,
        };
        let occurred = match &req.occurred_at {
            None => Some(Utc::now()),
            Some(t) => {
                let parsed = time(t);
                if parsed.is_none() {
                    v.add("occurred_at", "is not a valid time");
                }
                parsed
            }
        };
        let revenue = req.revenue.clone().unwrap_or_default();
        if outcome == pb::OutcomeKind::Converted {
            if revenue.currency != "CNY" || revenue.amount_minor < 0 {
                v.add("revenue", "CONVERTED needs revenue in CNY, amount_minor >= 0");
            }
        } else if req.revenue.is_some() {
            v.add("revenue", "is only for CONVERTED");
        }
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let (id, occurred) = (id.unwrap_or_default(), occurred.unwrap_or_else(Utc::now));
        if occurred > Utc::now() + Duration::minutes(5) {
            return Err(ApiError::invalid("occurred_at", "is in the future"));
        }
        let mut tx = self.pg.begin().await?;
        let fresh = match idempotency::claim(&mut tx, &format!("{SVC}RecordOutcome"), &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let row = self.message_in(&mut tx, id).await?;
        let Some(sent) =
            row.sent_at.filter(|_| matches!(row.state, state::SENT | state::DELIVERED | state::DEAD_LETTER))
        else {
            return Err(ApiError::failed_precondition(
                "NOT_SENT",
                "the message was never sent; outcomes need a sent message",
            ));
        };
        // OUT-8: attributed inside the window (default 7 days) after sending.
        let attributed = occurred >= sent && occurred <= sent + Duration::days(ATTRIBUTION_DAYS);
        let inserted = sqlx::query(
            "INSERT INTO outcomes (message_id, outcome, occurred_at, revenue_minor, attributed) VALUES ($1,$2,$3,$4,$5) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(outcome as i16)
        .bind(occurred)
        .bind(revenue.amount_minor)
        .bind(attributed)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(ApiError::AlreadyExists(format!(
                "outcome {} of message {id} was recorded already",
                outcome.as_str_name()
            )));
        }
        if outcome == pb::OutcomeKind::Delivered && row.state == state::SENT {
            sqlx::query("UPDATE messages SET state = $2 WHERE message_id = $1")
                .bind(id)
                .bind(state::DELIVERED)
                .execute(&mut *tx)
                .await?;
        }
        if matches!(outcome, pb::OutcomeKind::Clicked | pb::OutcomeKind::Responded | pb::OutcomeKind::Converted) {
            // OUT-5: a response ends the backoff.
            sqlx::query("UPDATE customers SET unanswered_streak = 0 WHERE customer_id = $1")
                .bind(row.customer_id)
                .execute(&mut *tx)
                .await?;
        }
        let event = pb::DeliveryOutcome {
            message_id: id.to_string(),
            customer_id: row.customer_id.to_string(),
            campaign_id: row.campaign_id.map(|c| c.to_string()).unwrap_or_default(),
            variant: row.variant.clone(),
            channel: row.channel as i32,
            outcome: outcome as i32,
            revenue: (outcome == pb::OutcomeKind::Converted).then(|| revenue.clone()),
            occurred_at: Some(ts(occurred)),
            attributed,
        };
        let cid = row.customer_id.to_string();
        outbox::enqueue(&mut tx, SERVICE, outbox::Aggregate { kind: "customer", id: &cid }, &req.request_id, &event)
            .await?;
        let out = pb::RecordOutcomeResponse { attributed };
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn list_decisions(
        &self,
        req: pb::ListContactDecisionsRequest,
    ) -> Result<pb::ListContactDecisionsResponse, ApiError> {
        let size = paging::page_size(req.page_size)?;
        let customer = parse_id("customer_id", &req.customer_id)?;
        let range = req.time_range.unwrap_or_default();
        let start = range
            .start_time
            .as_ref()
            .map(|t| time(t).ok_or_else(|| ApiError::invalid("time_range.start_time", "is not a valid time")))
            .transpose()?;
        let end = range
            .end_time
            .as_ref()
            .map(|t| time(t).ok_or_else(|| ApiError::invalid("time_range.end_time", "is not a valid time")))
            .transpose()?;
        let filter = paging::filter_hash(&(&req.customer_id, start, end));
        let before: Option<i64> = paging::decode_token(&req.page_token, &filter)?;
        let rows: Vec<DecisionRow> = sqlx::query_as(
            "SELECT id, message_id, verdict, rule, detail, decided_at, deferred_until FROM decisions WHERE customer_id = $1 \
             AND ($2::timestamptz IS NULL OR decided_at >= $2) AND ($3::timestamptz IS NULL OR decided_at < $3) \
             AND ($4::bigint IS NULL OR id < $4) ORDER BY id DESC LIMIT $5",
        )
        .bind(customer)
        .bind(start)
        .bind(end)
        .bind(before)
        .bind(size as i64 + 1)
        .fetch_all(&self.pg)
        .await?;
        let more = rows.len() > size;
        let rows: Vec<_> = rows.into_iter().take(size).collect();
        let next = if more { rows.last().map(|r| paging::encode_token(&r.0, &filter)) } else { None };
        Ok(pb::ListContactDecisionsResponse {
            decisions: rows
                .into_iter()
                .map(|(_, m, verdict, rule, detail, at, until)| pb::ContactDecision {
                    customer_id: customer.to_string(),
                    message_id: m.to_string(),
                    verdict: verdict as i32,
                    rule,
                    detail,
                    decide_time: Some(ts(at)),
                    deferred_until: until.map(ts),
                })
                .collect(),
            next_page_token: next.unwrap_or_default(),
        })
    }

    // ---- offers -----------------------------------------------------------

    async fn offer(&self, req: pb::GetOfferRequest) -> Result<pb::Offer, ApiError> {
        let id = parse_id("customer_id", &req.customer_id)?;
        let mut conn = self.pg.acquire().await?;
        let live = crm_kit::db::live_customer(&mut conn, id)
            .await?
            .ok_or_else(|| ApiError::not_found("customer", &req.customer_id))?;
        let (tier, spend): (i16, i64) =
            sqlx::query_as("SELECT tier, spend_minor FROM customers WHERE customer_id = $1")
                .bind(live)
                .fetch_one(&mut *conn)
                .await?;
        let tier = Tier::try_from(tier as i32).unwrap_or(Tier::Unspecified);
        let points = campaign::points(spend);
        Ok(pb::Offer {
            customer_id: live.to_string(),
            tier: tier as i32,
            discount_percent: campaign::tier_discount(tier) as i32,
            points,
            coupon_value: Some(cny(campaign::coupon_value_minor(points))),
        })
    }

    // ---- campaigns --------------------------------------------------------

    async fn check_campaign(&self, conn: &mut PgConnection, c: &pb::Campaign) -> Result<(), ApiError> {
        let mut v = FieldViolations::new();
        check_name(&mut v, "campaign.display_name", &c.display_name);
        if c.segment_ids.is_empty() || c.segment_ids.len() > 20 {
            v.add("campaign.segment_ids", "1..20 segment ids are required");
        }
        for (i, s) in c.segment_ids.iter().enumerate() {
            if Uuid::parse_str(s).is_err() {
                v.add(format!("campaign.segment_ids[{i}]"), "must be a segment id (UUID)");
            }
        }
        for (i, t) in c.tier_filter.iter().enumerate() {
            if !matches!(Tier::try_from(*t), Ok(t) if t != Tier::Unspecified) {
                v.add(format!("campaign.tier_filter[{i}]"), "must be a tier");
            }
        }
        if c.tag_filter.len() > 20 || c.tag_filter.iter().any(|t| t.is_empty() || t.len() > 64) {
            v.add("campaign.tag_filter", "at most 20 tags of 1..64 bytes");
        }
        if c.variants.is_empty() || c.variants.len() > 5 {
            v.add("campaign.variants", "1..5 variants are required");
        }
        let mut total = 0;
        let mut template_refs = Vec::new();
        for (i, var) in c.variants.iter().enumerate() {
            let f = |n: &str| format!("campaign.variants[{i}].{n}");
            if var.name.is_empty() || var.name.len() > 40 || ["holdout", "global_control"].contains(&var.name.as_str())
            {
                v.add(f("name"), "1..40 bytes, not \"holdout\" or \"global_control\"");
            } else if c.variants[..i].iter().any(|o| o.name == var.name) {
                v.add(f("name"), "appears twice");
            }
            if !(1..=100).contains(&var.traffic_percent) {
                v.add(f("traffic_percent"), "must be 1..100");
            }
            total += var.traffic_percent;
            if var.channel_plan.is_empty() {
                v.add(f("channel_plan"), "at least one plan (tier UNSPECIFIED is the default for all tiers)");
            }
            for (j, plan) in var.channel_plan.iter().enumerate() {
                let pf = |n: &str| format!("campaign.variants[{i}].channel_plan[{j}].{n}");
                if Tier::try_from(plan.tier).is_err() {
                    v.add(pf("tier"), "unknown value");
                } else if var.channel_plan[..j].iter().any(|o| o.tier == plan.tier) {
                    v.add(pf("tier"), "has two plans");
                }
                if plan.channels.is_empty() {
                    v.add(pf("channels"), "at least one channel");
                }
                for (k, ch) in plan.channels.iter().enumerate() {
                    if let Some(ch) = outbound_channel(
                        &mut v,
                        &format!("campaign.variants[{i}].channel_plan[{j}].channels[{k}]"),
                        *ch,
                        true,
                    ) {
                        match plan.template_ids.get(ch.as_str_name()) {
                            None => v.add(pf("template_ids"), format!("needs a template for {}", ch.as_str_name())),
                            Some(t) => match Uuid::parse_str(t) {
                                Ok(t) => template_refs.push((pf("template_ids"), t, ch)),
                                Err(_) => v.add(pf("template_ids"), format!("{}: not a template id", ch.as_str_name())),
                            },
                        }
                    }
                }
            }
        }
        if !c.variants.is_empty() && total != 100 {
            v.add("campaign.variants", format!("traffic_percent must sum to 100, not {total}"));
        }
        if !(0..=50).contains(&c.holdout_percent) {
            v.add("campaign.holdout_percent", "must be 0..50");
        }
        match c.schedule.as_ref().and_then(|s| s.when.as_ref()) {
            None | Some(pb::schedule::When::Now(_)) => {}
            Some(pb::schedule::When::At(t)) => {
                if time(t).is_none() {
                    v.add("campaign.schedule.at", "is not a valid time");
                }
            }
            Some(pb::schedule::When::Cron(_)) => {
                v.add("campaign.schedule.cron", "recurring campaigns are not supported yet; use now or at")
            }
        }
        if let Some(b) = &c.budget
            && (b.currency != "CNY" || b.amount_minor < 0)
        {
            v.add("campaign.budget", "must be CNY with amount_minor >= 0");
        }
        purpose(&mut v, "campaign.purpose", c.purpose, Some(Purpose::Marketing));
        v.into_result()?;
        // Templates must exist and be written for the channel they are planned on.
        let mut v = FieldViolations::new();
        for (field, id, ch) in template_refs {
            let channel: Option<i16> = sqlx::query_scalar("SELECT channel FROM templates WHERE template_id = $1")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?;
            match channel {
                None => v.add(field, format!("template {id} does not exist")),
                Some(c) if c as i32 != ch as i32 => {
                    v.add(field, format!("template {id} is not written for {}", ch.as_str_name()))
                }
                _ => {}
            }
        }
        v.into_result()
    }

    async fn campaign_in(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
        lock: bool,
    ) -> Result<(pb::Campaign, i64), ApiError> {
        let sql = format!(
            "SELECT spec, state, spent_minor, version, created_at, updated_at FROM campaigns WHERE campaign_id = $1{}",
            if lock { " FOR UPDATE" } else { "" }
        );
        let row: Option<CampaignRow> =
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&mut *conn).await?;
        let (spec, st, spent, version, created, updated) =
            row.ok_or_else(|| ApiError::not_found("campaign", id.to_string()))?;
        let mut c = pb::Campaign::decode(spec.as_slice()).map_err(ApiError::internal)?;
        c.campaign_id = id.to_string();
        c.state = st as i32;
        c.spent = Some(cny(spent));
        c.create_time = Some(ts(created));
        c.update_time = Some(ts(updated));
        c.etag = format!("v{version}");
        Ok((c, version))
    }

    async fn store_campaign(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
        c: &pb::Campaign,
        version: i64,
    ) -> Result<(), ApiError> {
        let mut spec = c.clone();
        for f in [&mut spec.campaign_id, &mut spec.etag] {
            f.clear();
        }
        spec.spent = None;
        spec.create_time = None;
        spec.update_time = None;
        if spec.purpose == 0 {
            spec.purpose = Purpose::Marketing as i32;
        }
        sqlx::query(
            "INSERT INTO campaigns (campaign_id, spec, state, budget_minor, version) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (campaign_id) DO UPDATE SET spec = $2, budget_minor = $4, version = $5, updated_at = now()",
        )
        .bind(id)
        .bind(spec.encode_to_vec())
        .bind(pb::CampaignState::Draft as i16)
        .bind(c.budget.as_ref().map(|b| b.amount_minor))
        .bind(version)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    async fn create_campaign(&self, req: pb::CreateCampaignRequest) -> Result<pb::Campaign, ApiError> {
        let mut v = FieldViolations::new();
        if req.campaign.is_none() {
            v.required("campaign");
        }
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let c = req.campaign.clone().unwrap_or_default();
        let mut tx = self.pg.begin().await?;
        self.check_campaign(&mut tx, &c).await?;
        let fresh = match idempotency::claim(&mut tx, &format!("{SVC}CreateCampaign"), &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let id = Uuid::now_v7();
        self.store_campaign(&mut tx, id, &c, 1).await?;
        let (out, _) = self.campaign_in(&mut tx, id, false).await?;
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn update_campaign(&self, req: pb::UpdateCampaignRequest) -> Result<pb::Campaign, ApiError> {
        let mut v = FieldViolations::new();
        let given = req.campaign.clone().unwrap_or_default();
        if req.campaign.is_none() {
            v.required("campaign");
        }
        let id = v.check(
            "campaign.campaign_id",
            parse_id("campaign.campaign_id", &given.campaign_id).map_err(|e| e.to_string()),
        );
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let paths = mask_paths(
            &req.update_mask,
            &[
                "display_name",
                "segment_ids",
                "tier_filter",
                "tag_filter",
                "variants",
                "holdout_percent",
                "schedule",
                "budget",
                "purpose",
            ],
        )?;
        let id = id.unwrap_or_default();
        let mut tx = self.pg.begin().await?;
        let fresh = match idempotency::claim(&mut tx, &format!("{SVC}UpdateCampaign"), &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let (mut c, version) = self.campaign_in(&mut tx, id, true).await?;
        check_etag(&req.etag, version)?;
        if !matches!(pb::CampaignState::try_from(c.state), Ok(pb::CampaignState::Draft | pb::CampaignState::Paused)) {
            return Err(ApiError::failed_precondition("NOT_EDITABLE", "only a DRAFT or PAUSED campaign can be edited"));
        }
        for p in &paths {
            match p.as_str() {
                "display_name" => c.display_name = given.display_name.clone(),
                "segment_ids" => c.segment_ids = given.segment_ids.clone(),
                "tier_filter" => c.tier_filter = given.tier_filter.clone(),
                "tag_filter" => c.tag_filter = given.tag_filter.clone(),
                "variants" => c.variants = given.variants.clone(),
                "holdout_percent" => c.holdout_percent = given.holdout_percent,
                "schedule" => c.schedule = given.schedule.clone(),
                "budget" => c.budget = given.budget.clone(),
                _ => c.purpose = given.purpose,
            }
        }
        self.check_campaign(&mut tx, &c).await?;
        self.store_campaign(&mut tx, id, &c, version + 1).await?;
        let (out, _) = self.campaign_in(&mut tx, id, false).await?;
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn list_campaigns(&self, req: pb::ListCampaignsRequest) -> Result<pb::ListCampaignsResponse, ApiError> {
        let size = paging::page_size(req.page_size)?;
        let st = match pb::CampaignState::try_from(req.state) {
            Ok(pb::CampaignState::Unspecified) => None,
            Ok(s) => Some(s as i16),
            Err(_) => return Err(ApiError::invalid("state", "unknown value")),
        };
        let filter = paging::filter_hash(&req.state);
        let before: Option<Uuid> = paging::decode_token(&req.page_token, &filter)?;
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT campaign_id FROM campaigns WHERE ($1::smallint IS NULL OR state = $1) AND ($2::uuid IS NULL OR campaign_id < $2) \
             ORDER BY campaign_id DESC LIMIT $3",
        )
        .bind(st)
        .bind(before)
        .bind(size as i64 + 1)
        .fetch_all(&self.pg)
        .await?;
        let more = ids.len() > size;
        let mut conn = self.pg.acquire().await?;
        let mut out = pb::ListCampaignsResponse::default();
        for id in ids.iter().take(size) {
            out.campaigns.push(self.campaign_in(&mut conn, *id, false).await?.0);
        }
        if more && let Some(last) = ids.get(size - 1) {
            out.next_page_token = paging::encode_token(last, &filter);
        }
        Ok(out)
    }

    async fn transition(&self, req: pb::TransitionCampaignRequest) -> Result<pb::Campaign, ApiError> {
        let mut v = FieldViolations::new();
        let id = v.check("campaign_id", parse_id("campaign_id", &req.campaign_id).map_err(|e| e.to_string()));
        let target = match pb::CampaignState::try_from(req.target_state) {
            Ok(pb::CampaignState::Unspecified) | Err(_) => {
                v.add("target_state", "must be a campaign state");
                pb::CampaignState::Unspecified
            }
            Ok(s) => s,
        };
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let id = id.unwrap_or_default();
        let mut tx = self.pg.begin().await?;
        let fresh =
            match idempotency::claim(&mut tx, &format!("{SVC}TransitionCampaign"), &req.request_id, &req).await? {
                Claim::Replay(r) => return Ok(r),
                Claim::Fresh(f) => f,
            };
        let (c, _) = self.campaign_in(&mut tx, id, true).await?;
        let from = pb::CampaignState::try_from(c.state).unwrap_or(pb::CampaignState::Unspecified);
        if !campaign::can_transition(from, target) {
            return Err(ApiError::failed_precondition(
                "ILLEGAL_TRANSITION",
                format!("a {} campaign cannot become {}", from.as_str_name(), target.as_str_name()),
            ));
        }
        // SCHEDULED waits for its time. RUNNING is launched (the first time) by
        // the campaign clock of any replica within a second, so that a large
        // audience does not hold this call (OUT-3).
        let at = match c.schedule.as_ref().and_then(|s| s.when.as_ref()) {
            Some(pb::schedule::When::At(t)) => time(t),
            _ => None,
        };
        let now = Utc::now();
        let next_run = match target {
            pb::CampaignState::Scheduled => Some(at.unwrap_or(now)),
            pb::CampaignState::Running => Some(now),
            _ => None,
        };
        sqlx::query("UPDATE campaigns SET state = $2, next_run_at = $3, version = version + 1, updated_at = now() WHERE campaign_id = $1")
            .bind(id)
            .bind(target as i16)
            .bind(next_run)
            .execute(&mut *tx)
            .await?;
        if matches!(target, pb::CampaignState::Cancelled | pb::CampaignState::Completed) {
            let rule = if target == pb::CampaignState::Cancelled { "CAMPAIGN_CANCELLED" } else { "CAMPAIGN_COMPLETED" };
            sqlx::query(
                "UPDATE messages SET state = $2, rule = $3, detail = 'the campaign ended before this message was sent', decided_at = now() \
                 WHERE campaign_id = $1 AND state = $4",
            )
            .bind(id)
            .bind(state::SUPPRESSED)
            .bind(rule)
            .bind(state::QUEUED)
            .execute(&mut *tx)
            .await?;
        }
        let (out, _) = self.campaign_in(&mut tx, id, false).await?;
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        self.wake.notify_one();
        Ok(out)
    }

    // ---- tasks ------------------------------------------------------------

    async fn task_in(&self, conn: &mut PgConnection, id: Uuid, lock: bool) -> Result<TaskRow, ApiError> {
        let sql =
            format!("SELECT {} FROM tasks WHERE task_id = $1{}", tasks::COLUMNS, if lock { " FOR UPDATE" } else { "" });
        let row: Option<TaskRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&mut *conn).await?;
        row.ok_or_else(|| ApiError::not_found("task", id.to_string()))
    }

    async fn create_task(&self, req: pb::CreateTaskRequest) -> Result<pb::Task, ApiError> {
        let mut v = FieldViolations::new();
        let t = req.task.clone().unwrap_or_default();
        if req.task.is_none() {
            v.required("task");
        }
        let customer =
            v.check("task.customer_id", parse_id("task.customer_id", &t.customer_id).map_err(|e| e.to_string()));
        let kind = match pb::TaskKind::try_from(t.kind) {
            Ok(pb::TaskKind::Unspecified) | Err(_) => {
                v.add("task.kind", "must be TASK_KIND_CALL_BACK or TASK_KIND_VISIT");
                pb::TaskKind::CallBack
            }
            Ok(k) => k,
        };
        check_name(&mut v, "task.owner", &t.owner);
        let due = t.due_time.as_ref().and_then(time);
        if due.is_none() {
            v.add("task.due_time", "is required");
        }
        if t.reason.len() > MAX_TEXT {
            v.add("task.reason", format!("is longer than {MAX_TEXT} bytes"));
        }
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let mut tx = self.pg.begin().await?;
        let fresh = match idempotency::claim(&mut tx, &format!("{SVC}CreateTask"), &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let new = tasks::NewTask {
            customer_id: customer.unwrap_or_default(),
            kind,
            owner: t.owner.clone(),
            due_at: due.unwrap_or_else(Utc::now),
            reason: t.reason.clone(),
            dedupe_key: None,
        };
        let out = tasks::create_in(&mut tx, new, &req.request_id).await?.to_wire();
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn update_task(&self, req: pb::UpdateTaskRequest) -> Result<pb::Task, ApiError> {
        let mut v = FieldViolations::new();
        let given = req.task.clone().unwrap_or_default();
        if req.task.is_none() {
            v.required("task");
        }
        let id = v.check("task.task_id", parse_id("task.task_id", &given.task_id).map_err(|e| e.to_string()));
        for (field, value) in [
            ("task.customer_feedback", &given.customer_feedback),
            ("task.problem", &given.problem),
            ("task.next_action", &given.next_action),
        ] {
            if value.len() > MAX_TEXT {
                v.add(field, format!("is longer than {MAX_TEXT} bytes"));
            }
        }
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let paths = mask_paths(
            &req.update_mask,
            &["status", "customer_feedback", "problem", "next_action", "owner", "due_time"],
        )?;
        let id = id.unwrap_or_default();
        let mut tx = self.pg.begin().await?;
        let fresh = match idempotency::claim(&mut tx, &format!("{SVC}UpdateTask"), &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let mut row = self.task_in(&mut tx, id, true).await?;
        check_etag(&req.etag, row.version)?;
        let from = pb::TaskStatus::try_from(row.status as i32).unwrap_or(pb::TaskStatus::Unspecified);
        let mut completed = false;
        for p in &paths {
            match p.as_str() {
                "status" => {
                    let to = pb::TaskStatus::try_from(given.status)
                        .map_err(|_| ApiError::invalid("task.status", "unknown value"))?;
                    if !task::can_move(from, to) {
                        return Err(ApiError::failed_precondition(
                            "ILLEGAL_TRANSITION",
                            format!("a {} task cannot become {}", from.as_str_name(), to.as_str_name()),
                        ));
                    }
                    row.status = to as i16;
                    completed = task::is_final(to);
                }
                "customer_feedback" => row.customer_feedback = given.customer_feedback.clone(),
                "problem" => row.problem = given.problem.clone(),
                "next_action" => row.next_action = given.next_action.clone(),
                "owner" => {
                    if given.owner.trim().is_empty() || given.owner.len() > MAX_NAME {
                        return Err(ApiError::invalid("task.owner", format!("1..{MAX_NAME} bytes")));
                    }
                    row.owner = given.owner.clone();
                }
                _ => {
                    row.due_at = given
                        .due_time
                        .as_ref()
                        .and_then(time)
                        .ok_or_else(|| ApiError::invalid("task.due_time", "is required"))?;
                }
            }
        }
        if row.status == pb::TaskStatus::NotExecuted as i16 && row.problem.trim().is_empty() {
            return Err(ApiError::invalid("task.problem", "a task NOT_EXECUTED needs the reason in problem"));
        }
        if completed {
            row.completed_at = Some(Utc::now());
        }
        let sql = format!(
            "UPDATE tasks SET status = $2, customer_feedback = $3, problem = $4, next_action = $5, owner = $6, due_at = $7, \
             completed_at = $8, version = version + 1 WHERE task_id = $1 RETURNING {}",
            tasks::COLUMNS
        );
        let row: TaskRow = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(row.status)
            .bind(&row.customer_feedback)
            .bind(&row.problem)
            .bind(&row.next_action)
            .bind(&row.owner)
            .bind(row.due_at)
            .bind(row.completed_at)
            .fetch_one(&mut *tx)
            .await?;
        let out = row.to_wire();
        if completed {
            let tid = id.to_string();
            let event = pb::TaskCompleted { task: Some(crate::privacy::task_event(out.clone())) };
            outbox::enqueue(&mut tx, SERVICE, outbox::Aggregate { kind: "task", id: &tid }, &req.request_id, &event)
                .await?;
        }
        fresh.complete(&mut tx, &out).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn list_tasks(&self, req: pb::ListTasksRequest) -> Result<pb::ListTasksResponse, ApiError> {
        let size = paging::page_size(req.page_size)?;
        let mut v = FieldViolations::new();
        let customer = (!req.customer_id.is_empty())
            .then(|| v.check("customer_id", parse_id("customer_id", &req.customer_id).map_err(|e| e.to_string())))
            .flatten();
        let st = match pb::TaskStatus::try_from(req.status) {
            Ok(pb::TaskStatus::Unspecified) => None,
            Ok(s) => Some(s as i16),
            Err(_) => {
                v.add("status", "unknown value");
                None
            }
        };
        if req.owner.len() > MAX_NAME {
            v.add("owner", format!("is longer than {MAX_NAME} bytes"));
        }
        v.into_result()?;
        let filter = paging::filter_hash(&(&req.owner, req.status, &req.customer_id));
        let after: Option<(DateTime<Utc>, Uuid)> = paging::decode_token(&req.page_token, &filter)?;
        let sql = format!(
            "SELECT {} FROM tasks WHERE ($1 = '' OR owner = $1) AND ($2::smallint IS NULL OR status = $2) \
             AND ($3::uuid IS NULL OR customer_id = $3) AND ($4::timestamptz IS NULL OR (due_at, task_id) > ($4, $5)) \
             ORDER BY due_at, task_id LIMIT $6",
            tasks::COLUMNS
        );
        let rows: Vec<TaskRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(&req.owner)
            .bind(st)
            .bind(customer)
            .bind(after.map(|a| a.0))
            .bind(after.map(|a| a.1))
            .bind(size as i64 + 1)
            .fetch_all(&self.pg)
            .await?;
        let more = rows.len() > size;
        let rows: Vec<TaskRow> = rows.into_iter().take(size).collect();
        let next = if more { rows.last().map(|r| paging::encode_token(&(r.due_at, r.task_id), &filter)) } else { None };
        Ok(pb::ListTasksResponse {
            tasks: rows.iter().map(TaskRow::to_wire).collect(),
            next_page_token: next.unwrap_or_default(),
        })
    }
}

/// OUT-8: outcomes count for a campaign within this many days of sending.
pub const ATTRIBUTION_DAYS: i64 = 7;

fn check_variables(v: &mut FieldViolations, vars: &std::collections::BTreeMap<String, String>) {
    if vars.len() > 20 {
        // REL-5: no per-item work on a map over its limit.
        v.add("variables", "at most 20 variables");
        return;
    }
    for (k, value) in vars {
        if template::COMPUTED.contains(&k.as_str()) {
            v.add(format!("variables[{k}]"), "is computed by the offer rules (OUT-6) and cannot be set");
        } else if !template::is_free(k) {
            v.add(format!("variables[{k}]"), "is not a template variable");
        } else if value.len() > 500 {
            v.add(format!("variables[{k}]"), "is longer than 500 bytes");
        }
    }
}

#[tonic::async_trait]
impl OutreachService for OutreachApi {
    async fn list_channels(&self, _r: Request<pb::ListChannelsRequest>) -> Reply<pb::ListChannelsResponse> {
        self.channels().await.map(|channels| pb::ListChannelsResponse { channels }).into_grpc(SERVICE)
    }
    async fn update_channel(&self, r: Request<pb::UpdateChannelRequest>) -> Reply<pb::ChannelConfig> {
        self.update_channel(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn create_template(&self, r: Request<pb::CreateTemplateRequest>) -> Reply<pb::Template> {
        self.create_template(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn get_template(&self, r: Request<pb::GetTemplateRequest>) -> Reply<pb::Template> {
        let work = async {
            let id = parse_id("template_id", &r.get_ref().template_id)?;
            let mut conn = self.pg.acquire().await?;
            Ok(self.template_row(&mut conn, id).await?.0)
        };
        work.await.into_grpc(SERVICE)
    }
    async fn list_templates(&self, r: Request<pb::ListTemplatesRequest>) -> Reply<pb::ListTemplatesResponse> {
        self.list_templates(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn update_template(&self, r: Request<pb::UpdateTemplateRequest>) -> Reply<pb::Template> {
        self.update_template(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn preview_template(&self, r: Request<pb::PreviewTemplateRequest>) -> Reply<pb::PreviewTemplateResponse> {
        self.preview_template(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn create_campaign(&self, r: Request<pb::CreateCampaignRequest>) -> Reply<pb::Campaign> {
        self.create_campaign(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn get_campaign(&self, r: Request<pb::GetCampaignRequest>) -> Reply<pb::Campaign> {
        let work = async {
            let id = parse_id("campaign_id", &r.get_ref().campaign_id)?;
            let mut conn = self.pg.acquire().await?;
            Ok(self.campaign_in(&mut conn, id, false).await?.0)
        };
        work.await.into_grpc(SERVICE)
    }
    async fn list_campaigns(&self, r: Request<pb::ListCampaignsRequest>) -> Reply<pb::ListCampaignsResponse> {
        self.list_campaigns(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn update_campaign(&self, r: Request<pb::UpdateCampaignRequest>) -> Reply<pb::Campaign> {
        self.update_campaign(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn preview_campaign(&self, r: Request<pb::PreviewCampaignRequest>) -> Reply<pb::PreviewCampaignResponse> {
        let work = async {
            let id = parse_id("campaign_id", &r.get_ref().campaign_id)?;
            let mut conn = self.pg.acquire().await?;
            let (c, _) = self.campaign_in(&mut conn, id, false).await?;
            let control = settings::load_policy(&mut conn).await?.global_control_percent;
            campaigns::preview(&mut conn, id, &c, control).await
        };
        work.await.into_grpc(SERVICE)
    }
    async fn transition_campaign(&self, r: Request<pb::TransitionCampaignRequest>) -> Reply<pb::Campaign> {
        self.transition(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn send_message(&self, r: Request<pb::SendMessageRequest>) -> Reply<pb::SendMessageResponse> {
        let caller = Caller::or_nobody(&r);
        let mut out = self.send_message(r.into_inner()).await;
        if let Ok(o) = out.as_mut() {
            privacy::messages(&caller, o.message.as_mut().map(std::slice::from_mut).unwrap_or_default());
        }
        out.into_grpc(SERVICE)
    }
    async fn acknowledge_feedback(&self, r: Request<pb::AcknowledgeFeedbackRequest>) -> Reply<pb::SendMessageResponse> {
        let caller = Caller::or_nobody(&r);
        let mut out = self.acknowledge(r.into_inner()).await;
        if let Ok(o) = out.as_mut() {
            privacy::messages(&caller, o.message.as_mut().map(std::slice::from_mut).unwrap_or_default());
        }
        out.into_grpc(SERVICE)
    }
    async fn get_message(&self, r: Request<pb::GetMessageRequest>) -> Reply<pb::Message> {
        let caller = Caller::or_nobody(&r);
        let work = async {
            let id = parse_id("message_id", &r.get_ref().message_id)?;
            let mut conn = self.pg.acquire().await?;
            let mut m = self.message_in(&mut conn, id).await?.to_wire();
            privacy::messages(&caller, std::slice::from_mut(&mut m));
            Ok(m)
        };
        work.await.into_grpc(SERVICE)
    }
    async fn list_messages(&self, r: Request<pb::ListMessagesRequest>) -> Reply<pb::ListMessagesResponse> {
        let caller = Caller::or_nobody(&r);
        let mut out = self.list_messages(r.into_inner()).await;
        if let Ok(o) = out.as_mut() {
            privacy::messages(&caller, &mut o.messages);
        }
        out.into_grpc(SERVICE)
    }
    async fn retry_message(&self, r: Request<pb::RetryMessageRequest>) -> Reply<pb::Message> {
        let caller = Caller::or_nobody(&r);
        let mut out = self.retry_message(r.into_inner()).await;
        if let Ok(m) = out.as_mut() {
            privacy::messages(&caller, std::slice::from_mut(m));
        }
        out.into_grpc(SERVICE)
    }
    async fn record_outcome(&self, r: Request<pb::RecordOutcomeRequest>) -> Reply<pb::RecordOutcomeResponse> {
        self.record_outcome(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn list_contact_decisions(
        &self,
        r: Request<pb::ListContactDecisionsRequest>,
    ) -> Reply<pb::ListContactDecisionsResponse> {
        self.list_decisions(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn get_contact_policy(&self, _r: Request<pb::GetContactPolicyRequest>) -> Reply<pb::ContactPolicy> {
        let work = async {
            let mut conn = self.pg.acquire().await?;
            settings::load_policy(&mut conn).await
        };
        work.await.into_grpc(SERVICE)
    }
    async fn update_contact_policy(&self, r: Request<pb::UpdateContactPolicyRequest>) -> Reply<pb::ContactPolicy> {
        self.update_policy(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn get_offer(&self, r: Request<pb::GetOfferRequest>) -> Reply<pb::Offer> {
        self.offer(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn create_task(&self, r: Request<pb::CreateTaskRequest>) -> Reply<pb::Task> {
        let caller = Caller::or_nobody(&r);
        let work = async { self.shown(&caller, self.create_task(r.into_inner()).await?).await };
        work.await.into_grpc(SERVICE)
    }
    async fn get_task(&self, r: Request<pb::GetTaskRequest>) -> Reply<pb::Task> {
        let caller = Caller::or_nobody(&r);
        let work = async {
            let id = parse_id("task_id", &r.get_ref().task_id)?;
            let mut conn = self.pg.acquire().await?;
            let t = self.task_in(&mut conn, id, false).await?.to_wire();
            drop(conn);
            self.shown(&caller, t).await
        };
        work.await.into_grpc(SERVICE)
    }
    async fn list_tasks(&self, r: Request<pb::ListTasksRequest>) -> Reply<pb::ListTasksResponse> {
        let caller = Caller::or_nobody(&r);
        let work = async {
            let mut out = self.list_tasks(r.into_inner()).await?;
            privacy::tasks(self.masker.as_deref(), &caller, &mut out.tasks).await;
            Ok(out)
        };
        work.await.into_grpc(SERVICE)
    }
    async fn update_task(&self, r: Request<pb::UpdateTaskRequest>) -> Reply<pb::Task> {
        let caller = Caller::or_nobody(&r);
        let work = async { self.shown(&caller, self.update_task(r.into_inner()).await?).await };
        work.await.into_grpc(SERVICE)
    }
}
