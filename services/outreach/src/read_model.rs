//! Outreach's read model, built only from other services' events (SPEC 2):
//! what the contact policy and the campaigns need to know about a customer.
//!
//! - profiles: time zone, preferred channel, tags, birthday, registration,
//!   consent (an opt-out applies to queued messages at once, because the
//!   policy is checked at send time), spend for points (OUT-6), first and
//!   last purchase, responses (which end a backoff, OUT-5), merges and erasure.
//! - segmentation: tier, churn level, segment membership. A churn risk that
//!   turns HIGH creates a call-back task due within 3 days (OUT-4).
//! - feedback: open complaint tickets, which stop marketing (OUT-5).
//!
//! Idempotent through the kit's inbox; facts follow merges to the survivor.

use chrono::{DateTime, Utc};
use crm_kit::consumer::{Event, EventHandler, HandlerError, confirm_erasure, erased_ids};
use crm_proto::common::v1::{ChurnRiskLevel, Tier};
use crm_proto::profiles::v1 as profiles;
use crm_proto::segmentation::v1 as segmentation;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::SERVICE;
use crate::tasks::{self, NewTask};
use crate::triggers;

/// Applies profiles' and segmentation's events.
#[derive(Debug, Clone, Default)]
pub struct ReadModel;

fn id(s: &str) -> Result<Uuid, HandlerError> {
    crm_kit::consumer::payload_id(s)
}

fn time(t: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    crm_kit::consumer::payload_time(t)
}

/// The customer an id stands for now (creating an empty row for one not seen
/// yet); its row stays locked until the event is applied, so a concurrent
/// merge of it cannot leave this fact behind.
async fn live(tx: &mut PgConnection, customer: Uuid) -> Result<Uuid, sqlx::Error> {
    crm_kit::db::live_or_new_customer(tx, customer).await
}

#[allow(clippy::too_many_arguments)]
async fn apply_profile(
    tx: &mut PgConnection,
    customer: Uuid,
    at: Option<DateTime<Utc>>,
    timezone: &str,
    tags: &[String],
    preferred_channel: i32,
    registered_at: Option<DateTime<Utc>>,
    birthday: Option<&crm_proto::common::v1::Date>,
) -> Result<(), sqlx::Error> {
    live(tx, customer).await?;
    sqlx::query(
        "UPDATE customers SET timezone = $3, tags = $4, preferred_channel = $5, registered_at = COALESCE($6, registered_at), \
         birth_month = $7, birth_day = $8, profile_as_of = $2 \
         WHERE customer_id = $1 AND erased_at IS NULL AND (profile_as_of IS NULL OR $2::timestamptz IS NULL OR profile_as_of <= $2)",
    )
    .bind(customer)
    .bind(at)
    .bind(timezone)
    .bind(tags)
    .bind(preferred_channel as i16)
    .bind(registered_at)
    .bind(birthday.map(|d| d.month as i16))
    .bind(birthday.map(|d| d.day as i16))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

impl ReadModel {
    async fn profiles(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        at: Option<DateTime<Utc>>,
    ) -> Result<bool, HandlerError> {
        if let Some(e) = event.payload::<profiles::CustomerCreated>()? {
            let registered = time(e.registered_at.as_ref());
            let c = id(&e.customer_id)?;
            apply_profile(tx, c, at, &e.timezone, &e.tags, e.preferred_channel, registered, e.birthday.as_ref())
                .await?;
        } else if let Some(e) = event.payload::<profiles::CustomerUpdated>()? {
            let c = id(&e.customer_id)?;
            apply_profile(tx, c, at, &e.timezone, &e.tags, e.preferred_channel, None, e.birthday.as_ref()).await?;
        } else if let Some(e) = event.payload::<profiles::TransactionRecorded>()? {
            let Some(t) = e.transaction else {
                return Err(HandlerError::Permanent("TransactionRecorded without a transaction".into()));
            };
            let owner = live(tx, id(&t.customer_id)?).await?;
            let amount = t.amount.map(|m| m.amount_minor).unwrap_or(0);
            let signed = if t.kind == profiles::TransactionKind::Refund as i32 { -amount.abs() } else { amount };
            let occurred = time(t.occurred_at.as_ref());
            let purchase = t.kind == profiles::TransactionKind::Purchase as i32;
            sqlx::query(
                "UPDATE customers SET spend_minor = spend_minor + $2, \
                 first_purchase_at = CASE WHEN $4 THEN LEAST(first_purchase_at, $3) ELSE first_purchase_at END, \
                 last_purchase_at = CASE WHEN $4 THEN GREATEST(last_purchase_at, $3) ELSE last_purchase_at END, \
                 last_activity_at = GREATEST(last_activity_at, $3) WHERE customer_id = $1",
            )
            .bind(owner)
            .bind(signed)
            .bind(occurred)
            .bind(purchase)
            .execute(&mut *tx)
            .await?;
        } else if let Some(e) = event.payload::<profiles::InteractionRecorded>()? {
            let Some(x) = e.interaction else {
                return Err(HandlerError::Permanent("InteractionRecorded without an interaction".into()));
            };
            if x.direction != profiles::Direction::Outbound as i32 {
                let owner = live(tx, id(&x.customer_id)?).await?;
                // OUT-5: a response ends the backoff. OUT-4: any inbound activity ends a silence.
                let response = x.kind == profiles::InteractionKind::ContactResponse as i32;
                sqlx::query(
                    "UPDATE customers SET unanswered_streak = CASE WHEN $3 THEN 0 ELSE unanswered_streak END, \
                     last_activity_at = GREATEST(last_activity_at, $2) WHERE customer_id = $1",
                )
                .bind(owner)
                .bind(time(x.occurred_at.as_ref()))
                .bind(response)
                .execute(&mut *tx)
                .await?;
            }
        } else if let Some(e) = event.payload::<profiles::ConsentChanged>()? {
            let owner = live(tx, id(&e.customer_id)?).await?;
            crm_kit::db::mirror_consents(tx, owner, &e.grants).await?;
        } else if let Some(e) = event.payload::<profiles::CustomerMerged>()? {
            let (survivor, loser) = (id(&e.survivor_id)?, id(&e.loser_id)?);
            // Facts of either customer applied meanwhile land wholly before or after (see `live`).
            crm_kit::db::lock_customers(tx, &[survivor, loser]).await?;
            sqlx::query(
                "UPDATE customers s SET spend_minor = s.spend_minor + l.spend_minor, \
                 first_purchase_at = LEAST(s.first_purchase_at, l.first_purchase_at), \
                 last_purchase_at = GREATEST(s.last_purchase_at, l.last_purchase_at) \
                 FROM customers l WHERE s.customer_id = $2 AND l.customer_id = $1",
            )
            .bind(loser)
            .bind(survivor)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE customers SET merged_into = $2, spend_minor = 0 WHERE customer_id = $1")
                .bind(loser)
                .bind(survivor)
                .execute(&mut *tx)
                .await?;
            // Contacts count for the person, whichever id they were sent to (OUT-5).
            sqlx::query("UPDATE contacts SET customer_id = $2 WHERE customer_id = $1")
                .bind(loser)
                .bind(survivor)
                .execute(&mut *tx)
                .await?;
            // The stricter consent wins: a revocation on either record stays.
            sqlx::query(
                "INSERT INTO consents (customer_id, channel, purpose, granted, expires_at, updated_at) \
                 SELECT $2, channel, purpose, granted, expires_at, updated_at FROM consents WHERE customer_id = $1 \
                 ON CONFLICT (customer_id, channel, purpose) DO UPDATE SET granted = consents.granted AND EXCLUDED.granted, \
                   updated_at = GREATEST(consents.updated_at, EXCLUDED.updated_at)",
            )
            .bind(loser)
            .bind(survivor)
            .execute(&mut *tx)
            .await?;
        } else if let Some(e) = event.payload::<profiles::CustomerUnmerged>()? {
            let restored = id(&e.restored_id)?;
            crm_kit::db::lock_customers(tx, &[id(&e.survivor_id)?, restored]).await?;
            sqlx::query("UPDATE customers SET merged_into = NULL WHERE customer_id = $1")
                .bind(restored)
                .execute(&mut *tx)
                .await?;
        } else if let Some(e) = event.payload::<profiles::CustomerErased>()? {
            let ids = erased_ids(&e)?;
            for x in &ids {
                live(tx, *x).await?;
            }
            // PRF-8: what describes the person goes; queued messages are dropped by the policy (ERASED).
            sqlx::query(
                "UPDATE customers SET timezone = '', tags = '{}', birth_month = NULL, birth_day = NULL, \
                 erased_at = COALESCE(erased_at, $2, now()) WHERE customer_id = ANY($1)",
            )
            .bind(&ids)
            .bind(at)
            .execute(&mut *tx)
            .await?;
            // SEC-5: every copy of what was said to or about them: variables,
            // errors echoing an address, task notes, rendered messages kept
            // by the sink, stored first responses.
            sqlx::query("UPDATE messages SET variables = '{}', last_error = '' WHERE customer_id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE tasks SET reason = '', customer_feedback = '', problem = '', next_action = '' WHERE customer_id = ANY($1)",
            )
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE sink_deliveries SET subject = '', body = '' WHERE customer_id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
            crm_kit::idempotency::forget_customers(tx, &ids).await?;
            confirm_erasure(tx, SERVICE, &e.customer_id, &event.envelope.request_id).await?;
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    async fn segmentation(&self, tx: &mut PgConnection, event: &Event) -> Result<(), HandlerError> {
        if let Some(e) = event.payload::<segmentation::TierChanged>()? {
            let owner = live(tx, id(&e.customer_id)?).await?;
            let (from, tier) = e.r#move.as_ref().map(|m| (m.from_tier, m.to_tier)).unwrap_or((0, 0));
            sqlx::query("UPDATE customers SET tier = $2 WHERE customer_id = $1")
                .bind(owner)
                .bind(tier as i16)
                .execute(&mut *tx)
                .await?;
            // OUT-4: a tier change notice, or a win-back message for a customer turning DORMANT.
            let tier_of = |t: i32| Tier::try_from(t).unwrap_or(Tier::Unspecified);
            triggers::on_tier_change(tx, owner, tier_of(from), tier_of(tier), &event.envelope.event_id, Utc::now())
                .await
                .map_err(|e| HandlerError::Transient(e.to_string()))?;
        } else if let Some(e) = event.payload::<segmentation::ChurnRiskChanged>()? {
            let owner = live(tx, id(&e.customer_id)?).await?;
            let level = e.risk.as_ref().map(|r| r.level).unwrap_or(0);
            sqlx::query("UPDATE customers SET churn_level = $2 WHERE customer_id = $1")
                .bind(owner)
                .bind(level as i16)
                .execute(&mut *tx)
                .await?;
            // OUT-4: churn risk high -> a call-back task for the account manager within 3 days.
            if level == ChurnRiskLevel::High as i32 && e.previous_level != ChurnRiskLevel::High as i32 {
                let at = time(event.envelope.occurred_at.as_ref()).unwrap_or_else(Utc::now);
                tasks::create_in(
                    tx,
                    NewTask {
                        customer_id: owner,
                        kind: crm_proto::outreach::v1::TaskKind::CallBack,
                        owner: tasks::AGENT_QUEUE.into(),
                        due_at: at + chrono::Duration::days(3),
                        reason: "churn risk high".into(),
                        dedupe_key: Some(format!("churn-high:{}", event.envelope.event_id)),
                    },
                    &event.envelope.request_id,
                )
                .await
                .map_err(|e| HandlerError::Transient(e.to_string()))?;
            }
        } else if let Some(e) = event.payload::<segmentation::SegmentMembershipChanged>()? {
            let segment = id(&e.segment_id)?;
            let owner = live(tx, id(&e.customer_id)?).await?;
            let sql = if e.joined {
                "INSERT INTO segment_members (segment_id, customer_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
            } else {
                "DELETE FROM segment_members WHERE segment_id = $1 AND customer_id = $2"
            };
            sqlx::query(sql).bind(segment).bind(owner).execute(&mut *tx).await?;
        }
        Ok(())
    }
}

/// Records whether a complaint ticket is open as of `at` (newer events win)
/// and refreshes the customer's count of open complaints.
async fn complaint(
    tx: &mut PgConnection,
    ticket: &str,
    customer: Uuid,
    open: bool,
    at: DateTime<Utc>,
) -> Result<(), HandlerError> {
    let owner = live(tx, customer).await?;
    sqlx::query(
        "INSERT INTO complaint_tickets (ticket_id, customer_id, open, as_of) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (ticket_id) DO UPDATE SET open = $3, as_of = $4 WHERE complaint_tickets.as_of <= $4",
    )
    .bind(ticket)
    .bind(owner)
    .bind(open)
    .bind(at)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE customers SET open_complaints = (SELECT count(*) FROM complaint_tickets WHERE customer_id = $1 AND open) \
         WHERE customer_id = $1",
    )
    .bind(owner)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

impl ReadModel {
    /// feedback: complaint tickets open and close (OUT-5).
    async fn feedback(&self, tx: &mut PgConnection, event: &Event, at: DateTime<Utc>) -> Result<(), HandlerError> {
        use crm_proto::feedback::v1 as fb;
        if let Some(e) = event.payload::<fb::TicketOpened>()? {
            let t = e.ticket.ok_or_else(|| HandlerError::Permanent("TicketOpened without a ticket".into()))?;
            if t.category == fb::Category::ServiceComplaint as i32 {
                complaint(tx, &t.ticket_id, id(&t.customer_id)?, true, at).await?;
            }
        } else if let Some(e) = event.payload::<fb::TicketResolved>()? {
            if e.category == fb::Category::ServiceComplaint as i32 {
                complaint(tx, &e.ticket_id, id(&e.customer_id)?, false, at).await?;
            }
        } else if let Some(e) = event.payload::<fb::TicketVerified>()? {
            // Not confirmed by the customer: the ticket is reopened. Only complaints are tracked.
            let known: Option<bool> = sqlx::query_scalar("SELECT open FROM complaint_tickets WHERE ticket_id = $1")
                .bind(&e.ticket_id)
                .fetch_optional(&mut *tx)
                .await?;
            if known.is_some() {
                complaint(tx, &e.ticket_id, id(&e.customer_id)?, !e.confirmed, at).await?;
            }
        }
        Ok(())
    }
}

impl EventHandler for ReadModel {
    async fn handle(&self, tx: &mut PgConnection, event: &Event) -> Result<(), HandlerError> {
        let at = time(event.envelope.occurred_at.as_ref());
        if event.envelope.source == "feedback" {
            return self.feedback(tx, event, at.unwrap_or_else(Utc::now)).await;
        }
        if !self.profiles(tx, event, at).await? {
            self.segmentation(tx, event).await?;
        }
        Ok(())
    }
}
