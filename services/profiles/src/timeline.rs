//! PRF-5: the other services' events that belong on a customer's timeline,
//! consumed into profiles' own `timeline_external` table (idempotent by the
//! source's id, and by event id through the kit's inbox). Also applies
//! segmentation's tier to the record (PRF-6 filters by tier) and records
//! PRF-8 erasure confirmations.

use chrono::{DateTime, Utc};
use crm_kit::consumer::{Event, EventHandler, HandlerError};
use crm_proto::common::v1::{ErasureConfirmed, Money};
use crm_proto::feedback::v1 as fb;
use crm_proto::outreach::v1 as out;
use crm_proto::profiles::v1::TimelineEntryKind;
use crm_proto::segmentation::v1 as seg;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::cache::ProfileCache;
use crate::store;

/// The services whose events profiles reads (analytics: its erasure confirmations).
pub const SOURCES: &[&str] = &["outreach", "feedback", "segmentation", "analytics"];

/// One entry for `timeline_external`.
struct Entry<'a> {
    service: &'a str,
    source_id: String,
    customer: &'a str,
    kind: TimelineEntryKind,
    at: Option<&'a prost_types::Timestamp>,
    channel: i32,
    summary: String,
    amount: Option<&'a Money>,
}

/// Applies timeline-relevant events.
#[derive(Clone)]
pub struct TimelineProjector {
    cache: ProfileCache,
}

impl TimelineProjector {
    /// A projector that keeps the cache coherent when it changes a record.
    pub fn new(cache: ProfileCache) -> Self {
        Self { cache }
    }
}

fn when(t: Option<&prost_types::Timestamp>, fallback: DateTime<Utc>) -> DateTime<Utc> {
    t.and_then(store::from_ts).unwrap_or(fallback)
}

async fn add(tx: &mut PgConnection, e: Entry<'_>, received: DateTime<Utc>) -> Result<(), HandlerError> {
    let Ok(id) = Uuid::parse_str(e.customer) else {
        return Err(HandlerError::Permanent(format!("bad customer id {:?}", e.customer)));
    };
    // Events may name an id merged away since: file under the live record.
    let Some(live) = store::resolve(tx, id).await? else {
        // Not a customer of ours (yet): nothing to show.
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO timeline_external (source_service, source_id, customer_id, kind, occurred_at, channel, summary, amount_minor, currency) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9) ON CONFLICT (source_service, source_id) DO NOTHING",
    )
    .bind(e.service)
    .bind(&e.source_id)
    .bind(live)
    .bind(e.kind as i16)
    .bind(when(e.at, received))
    .bind(e.channel as i16)
    .bind(&e.summary)
    .bind(e.amount.map(|m| m.amount_minor))
    .bind(e.amount.map(|m| m.currency.clone()))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

impl EventHandler for TimelineProjector {
    async fn handle(&self, tx: &mut PgConnection, event: &Event) -> Result<(), HandlerError> {
        let received = event.envelope.occurred_at.as_ref().and_then(store::from_ts).unwrap_or_else(Utc::now);
        if let Some(m) = event.payload::<out::MessageSent>()? {
            let Some(msg) = m.message else { return Ok(()) };
            if m.holdout || msg.state == out::MessageState::Suppressed as i32 {
                return Ok(()); // Not a contact the customer experienced.
            }
            let what = if msg.trigger.is_empty() {
                format!("campaign {}", msg.campaign_id)
            } else {
                format!("trigger {}", msg.trigger)
            };
            let summary = format!("Contacted via {} ({what})", channel_name(msg.channel));
            let entry = Entry {
                service: "outreach",
                source_id: msg.message_id.clone(),
                customer: &msg.customer_id,
                kind: TimelineEntryKind::Contact,
                at: msg.send_time.as_ref().or(msg.create_time.as_ref()),
                channel: msg.channel,
                summary,
                amount: None,
            };
            return add(tx, entry, received).await;
        }
        if let Some(o) = event.payload::<out::DeliveryOutcome>()? {
            if o.outcome != out::OutcomeKind::Responded as i32 && o.outcome != out::OutcomeKind::Converted as i32 {
                return Ok(());
            }
            let summary = if o.outcome == out::OutcomeKind::Converted as i32 {
                "Converted after a contact".to_string()
            } else {
                "Responded to a contact".to_string()
            };
            let entry = Entry {
                service: "outreach",
                source_id: format!("{}:{}", o.message_id, o.outcome),
                customer: &o.customer_id,
                kind: TimelineEntryKind::Contact,
                at: o.occurred_at.as_ref(),
                channel: o.channel,
                summary,
                amount: o.revenue.as_ref(),
            };
            return add(tx, entry, received).await;
        }
        if let Some(f) = event.payload::<fb::FeedbackReceived>()? {
            let category = fb::Category::try_from(f.category)
                .map(|c| c.as_str_name().trim_start_matches("CATEGORY_").to_lowercase())
                .unwrap_or_default();
            let summary = format!(
                "Feedback ({category}{}) sentiment {:+.1}",
                if f.urgent { ", urgent" } else { "" },
                f.sentiment
            );
            let entry = Entry {
                service: "feedback",
                source_id: f.feedback_id.clone(),
                customer: &f.customer_id,
                kind: TimelineEntryKind::Feedback,
                at: f.receive_time.as_ref(),
                channel: f.channel,
                summary,
                amount: None,
            };
            return add(tx, entry, received).await;
        }
        if let Some(t) = event.payload::<fb::TicketResolved>()? {
            let entry = Entry {
                service: "feedback",
                source_id: format!("{}:resolved", t.ticket_id),
                customer: &t.customer_id,
                kind: TimelineEntryKind::Feedback,
                at: t.resolve_time.as_ref(),
                channel: 0,
                summary: format!("Ticket {} resolved", t.ticket_id),
                amount: None,
            };
            return add(tx, entry, received).await;
        }
        if let Some(t) = event.payload::<fb::TicketVerified>()? {
            let summary = if t.confirmed {
                format!("Ticket {} confirmed by the customer", t.ticket_id)
            } else {
                format!("Ticket {} reopened by the customer", t.ticket_id)
            };
            let entry = Entry {
                service: "feedback",
                source_id: format!("{}:verified:{}", t.ticket_id, t.confirmed),
                customer: &t.customer_id,
                kind: TimelineEntryKind::Feedback,
                at: t.verify_time.as_ref(),
                channel: 0,
                summary,
                amount: None,
            };
            return add(tx, entry, received).await;
        }
        if let Some(s) = event.payload::<fb::SurveyAnswered>()? {
            let Some(r) = s.response else { return Ok(()) };
            let kind = if r.kind == fb::SurveyKind::Nps as i32 { "NPS" } else { "CSAT" };
            let entry = Entry {
                service: "feedback",
                source_id: r.survey_response_id.clone(),
                customer: &r.customer_id,
                kind: TimelineEntryKind::Feedback,
                at: r.create_time.as_ref(),
                channel: 0,
                summary: format!("Answered {kind} survey: {}", r.score),
                amount: None,
            };
            return add(tx, entry, received).await;
        }
        if let Some(t) = event.payload::<seg::TierChanged>()? {
            let Some(mv) = t.r#move else { return Ok(()) };
            let Ok(id) = Uuid::parse_str(&t.customer_id) else {
                return Err(HandlerError::Permanent("bad customer id".into()));
            };
            if let Some(live) = store::resolve(tx, id).await? {
                let version: Option<i64> = sqlx::query_scalar(
                    "UPDATE customers SET tier = $2, version = version + 1 WHERE customer_id = $1 AND tier <> $2 RETURNING version",
                )
                .bind(live)
                .bind(mv.to_tier as i16)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(v) = version {
                    // Fencing with the new version before commit is safe: no reader can fill an older one.
                    self.cache.invalidate(live, v).await;
                }
            }
            let summary = format!("Tier {} → {}: {}", tier_name(mv.from_tier), tier_name(mv.to_tier), mv.reason);
            let entry = Entry {
                service: "segmentation",
                source_id: event.envelope.event_id.clone(),
                customer: &t.customer_id,
                kind: TimelineEntryKind::TierChange,
                at: mv.move_time.as_ref(),
                channel: 0,
                summary,
                amount: None,
            };
            return add(tx, entry, received).await;
        }
        if let Some(c) = event.payload::<ErasureConfirmed>()? {
            let Ok(id) = Uuid::parse_str(&c.customer_id) else {
                return Err(HandlerError::Permanent("bad customer id".into()));
            };
            sqlx::query(
                "INSERT INTO erasure_confirmations (customer_id, service, confirmed_at) SELECT $1, $2, $3 \
                 WHERE EXISTS (SELECT 1 FROM erasures WHERE customer_id = $1) ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(&c.service)
            .bind(when(c.erase_time.as_ref(), received))
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

fn channel_name(c: i32) -> String {
    crm_proto::common::v1::Channel::try_from(c)
        .map(|c| c.as_str_name().trim_start_matches("CHANNEL_").to_lowercase().replace('_', " "))
        .unwrap_or_default()
}

fn tier_name(t: i32) -> String {
    crm_proto::common::v1::Tier::try_from(t)
        .map(|t| t.as_str_name().trim_start_matches("TIER_").to_string())
        .unwrap_or_default()
}
