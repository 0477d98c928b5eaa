//! Segmentation's read model, built only from other services' events (SPEC
//! 2, issue 4 deliverable 1): from profiles, customers with the attributes
//! segment rules use, their transactions, interactions and consent; from
//! feedback (SEG-5), open complaint tickets and bad service experiences (an
//! SLA breach on a ticket, a CSAT of 1-2).
//!
//! - Idempotent: the kit's inbox applies each event once; rows are keyed by
//!   their natural ids as well.
//! - Order-tolerant: several replicas may apply one customer's events out of
//!   order. Facts are attributed to the customer an id resolves to *now*
//!   (after a merge, the survivor); profile attributes only move forward in
//!   time (`profile_as_of`); a fact for a customer not seen yet creates it.
//! - Merges move the loser's facts to the survivor; an unmerge moves back the
//!   facts the event lists. An erasure removes the attributes that describe a
//!   person and confirms with ErasureConfirmed (PRF-8); the facts, without
//!   identity, stay for the aggregates.
//! - Replaying the stream from the start into an empty model rebuilds the
//!   same state ([`reset`]).

use chrono::{DateTime, Utc};
use crm_kit::consumer::{Event, EventHandler, HandlerError, confirm_erasure, erased_ids};
use crm_proto::profiles::v1 as pb;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::SERVICE;

/// Custom attributes as a JSON object, so segment rules can filter on them
/// (numbers stay numbers; times become RFC 3339 text).
pub fn attributes_json(attributes: &std::collections::BTreeMap<String, pb::AttributeValue>) -> serde_json::Value {
    use pb::attribute_value::Kind;
    use serde_json::Value;
    let map = attributes
        .iter()
        .map(|(k, v)| {
            let value = match &v.kind {
                Some(Kind::StringValue(s)) => Value::from(s.as_str()),
                Some(Kind::IntValue(n)) => Value::from(*n),
                Some(Kind::DoubleValue(d)) => {
                    serde_json::Number::from_f64(*d).map(Value::Number).unwrap_or(Value::Null)
                }
                Some(Kind::BoolValue(b)) => Value::from(*b),
                Some(Kind::TimeValue(t)) => DateTime::from_timestamp(t.seconds, t.nanos.clamp(0, 999_999_999) as u32)
                    .map(|d| Value::from(d.to_rfc3339()))
                    .unwrap_or(Value::Null),
                None => Value::Null,
            };
            (k.clone(), value)
        })
        .collect();
    Value::Object(map)
}

/// Applies profiles' events to the read model.
#[derive(Debug, Clone, Default)]
pub struct ReadModel;

fn id(s: &str) -> Result<Uuid, HandlerError> {
    crm_kit::consumer::payload_id(s)
}

fn time(t: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    crm_kit::consumer::payload_time(t)
}

/// Makes sure a customer row exists (facts may arrive before CustomerCreated).
async fn ensure(tx: &mut PgConnection, customer: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO customers (customer_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(customer)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The customer an id stands for now: itself, or the survivor of its merges.
async fn live(tx: &mut PgConnection, customer: Uuid) -> Result<Uuid, sqlx::Error> {
    crm_kit::db::live_or_new_customer(tx, customer).await
}

#[allow(clippy::too_many_arguments)]
async fn apply_profile(
    tx: &mut PgConnection,
    customer: Uuid,
    at: Option<DateTime<Utc>>,
    kind: Option<i32>,
    region: &str,
    timezone: &str,
    tags: &[String],
    attributes: &std::collections::BTreeMap<String, pb::AttributeValue>,
    preferred_channel: i32,
    registered_at: Option<DateTime<Utc>>,
    birthday: Option<&crm_proto::common::v1::Date>,
) -> Result<(), sqlx::Error> {
    ensure(tx, customer).await?;
    let encoded = attributes_json(attributes);
    sqlx::query(
        "UPDATE customers SET kind = COALESCE($3, kind), region = $4, timezone = $5, tags = $6, attributes = $7, \
         preferred_channel = $8, registered_at = COALESCE($9, registered_at), birth_month = $10, birth_day = $11, profile_as_of = $2 \
         WHERE customer_id = $1 AND erased_at IS NULL AND (profile_as_of IS NULL OR $2::timestamptz IS NULL OR profile_as_of <= $2)",
    )
    .bind(customer)
    .bind(at)
    .bind(kind.map(|k| k as i16))
    .bind(region)
    .bind(timezone)
    .bind(tags)
    .bind(encoded)
    .bind(preferred_channel as i16)
    .bind(registered_at)
    .bind(birthday.map(|d| d.month as i16))
    .bind(birthday.map(|d| d.day as i16))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// SEG-5 from feedback's events: complaint tickets open and close; SLA
/// breaches and CSAT answers of 1-2 are bad experiences. Facts follow merges.
async fn feedback(tx: &mut PgConnection, event: &Event, at: Option<DateTime<Utc>>) -> Result<(), HandlerError> {
    use crm_proto::feedback::v1 as fb;
    let complaint = |c: i32| c == fb::Category::ServiceComplaint as i32;
    let when = at.unwrap_or_else(Utc::now);
    if let Some(e) = event.payload::<fb::TicketOpened>()? {
        let t = e.ticket.ok_or_else(|| HandlerError::Permanent("TicketOpened without a ticket".into()))?;
        if complaint(t.category) {
            let c = live(tx, id(&t.customer_id)?).await?;
            sqlx::query("INSERT INTO complaint_tickets (ticket_id, customer_id, open) VALUES ($1, $2, true) ON CONFLICT DO NOTHING")
                .bind(id(&t.ticket_id)?)
                .bind(c)
                .execute(&mut *tx)
                .await?;
        }
    } else if let Some(e) = event.payload::<fb::TicketResolved>()? {
        sqlx::query("UPDATE complaint_tickets SET open = false WHERE ticket_id = $1")
            .bind(id(&e.ticket_id)?)
            .execute(&mut *tx)
            .await?;
    } else if let Some(e) = event.payload::<fb::TicketVerified>()? {
        // Not confirmed by the customer: the complaint is open again.
        sqlx::query("UPDATE complaint_tickets SET open = NOT $2 WHERE ticket_id = $1")
            .bind(id(&e.ticket_id)?)
            .bind(e.confirmed)
            .execute(&mut *tx)
            .await?;
    } else if let Some(e) = event.payload::<fb::SlaBreached>()? {
        let c = live(tx, id(&e.customer_id)?).await?;
        bad_experience(tx, c, when).await?;
    } else if let Some(e) = event.payload::<fb::SurveyAnswered>()? {
        let r = e.response.unwrap_or_default();
        if r.kind == fb::SurveyKind::Csat as i32 && (1..=2).contains(&r.score) {
            let c = live(tx, id(&r.customer_id)?).await?;
            bad_experience(tx, c, when).await?;
        }
    }
    Ok(())
}

async fn bad_experience(tx: &mut PgConnection, customer: Uuid, at: DateTime<Utc>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO bad_experiences (customer_id, last_at) VALUES ($1, $2) \
         ON CONFLICT (customer_id) DO UPDATE SET last_at = GREATEST(bad_experiences.last_at, $2)",
    )
    .bind(customer)
    .bind(at)
    .execute(&mut *tx)
    .await
    .map(|_| ())
}

impl EventHandler for ReadModel {
    async fn handle(&self, tx: &mut PgConnection, event: &Event) -> Result<(), HandlerError> {
        let at = time(event.envelope.occurred_at.as_ref());
        if event.envelope.source == "feedback" {
            return feedback(tx, event, at).await;
        }
        if let Some(at) = at {
            sqlx::query(
                "INSERT INTO freshness (singleton, newest_event_at) VALUES (true, $1) \
                 ON CONFLICT (singleton) DO UPDATE SET newest_event_at = GREATEST(freshness.newest_event_at, $1)",
            )
            .bind(at)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(e) = event.payload::<pb::CustomerCreated>()? {
            let c = id(&e.customer_id)?;
            let registered = time(e.registered_at.as_ref());
            apply_profile(
                tx,
                c,
                at,
                Some(e.kind),
                &e.region,
                &e.timezone,
                &e.tags,
                &e.attributes,
                e.preferred_channel,
                registered,
                e.birthday.as_ref(),
            )
            .await?;
        } else if let Some(e) = event.payload::<pb::CustomerUpdated>()? {
            let c = id(&e.customer_id)?;
            apply_profile(
                tx,
                c,
                at,
                None,
                &e.region,
                &e.timezone,
                &e.tags,
                &e.attributes,
                e.preferred_channel,
                None,
                e.birthday.as_ref(),
            )
            .await?;
        } else if let Some(e) = event.payload::<pb::TransactionRecorded>()? {
            let Some(t) = e.transaction else {
                return Err(HandlerError::Permanent("TransactionRecorded without a transaction".into()));
            };
            let owner = live(tx, id(&t.customer_id)?).await?;
            let amount = t.amount.unwrap_or_default();
            let occurred = time(t.occurred_at.as_ref())
                .ok_or_else(|| HandlerError::Permanent("transaction without a time".into()))?;
            sqlx::query(
                "INSERT INTO transactions (transaction_id, customer_id, kind, amount_minor, currency, occurred_at, category) \
                 VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT (transaction_id) DO NOTHING",
            )
            .bind(&t.transaction_id)
            .bind(owner)
            .bind(t.kind as i16)
            .bind(amount.amount_minor)
            .bind(&amount.currency)
            .bind(occurred)
            .bind(&t.category)
            .execute(&mut *tx)
            .await?;
        } else if let Some(e) = event.payload::<pb::InteractionRecorded>()? {
            let Some(x) = e.interaction else {
                return Err(HandlerError::Permanent("InteractionRecorded without an interaction".into()));
            };
            let owner = live(tx, id(&x.customer_id)?).await?;
            let occurred = time(x.occurred_at.as_ref())
                .ok_or_else(|| HandlerError::Permanent("interaction without a time".into()))?;
            sqlx::query(
                "INSERT INTO interactions (interaction_id, customer_id, kind, channel, direction, occurred_at) \
                 VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT (interaction_id) DO NOTHING",
            )
            .bind(&x.interaction_id)
            .bind(owner)
            .bind(x.kind as i16)
            .bind(x.channel as i16)
            .bind(x.direction as i16)
            .bind(occurred)
            .execute(&mut *tx)
            .await?;
        } else if let Some(e) = event.payload::<pb::CustomerMerged>()? {
            let (survivor, loser) = (id(&e.survivor_id)?, id(&e.loser_id)?);
            ensure(tx, survivor).await?;
            ensure(tx, loser).await?;
            sqlx::query("UPDATE customers SET merged_into = $2 WHERE customer_id = $1")
                .bind(loser)
                .bind(survivor)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO bad_experiences (customer_id, last_at) SELECT $2, last_at FROM bad_experiences WHERE customer_id = $1 \
                 ON CONFLICT (customer_id) DO UPDATE SET last_at = GREATEST(bad_experiences.last_at, EXCLUDED.last_at)",
            )
            .bind(loser)
            .bind(survivor)
            .execute(&mut *tx)
            .await?;
            for table in ["transactions", "interactions", "complaint_tickets"] {
                // Table names are constants of this module.
                let sql = format!("UPDATE {table} SET customer_id = $2 WHERE customer_id = $1");
                sqlx::query(sqlx::AssertSqlSafe(sql)).bind(loser).bind(survivor).execute(&mut *tx).await?;
            }
            sqlx::query(
                "INSERT INTO consents (customer_id, channel, purpose, granted, expires_at) \
                 SELECT $2, channel, purpose, granted, expires_at FROM consents WHERE customer_id = $1 ON CONFLICT DO NOTHING",
            )
            .bind(loser)
            .bind(survivor)
            .execute(&mut *tx)
            .await?;
        } else if let Some(e) = event.payload::<pb::CustomerUnmerged>()? {
            let (survivor, restored) = (id(&e.survivor_id)?, id(&e.restored_id)?);
            ensure(tx, restored).await?;
            sqlx::query("UPDATE customers SET merged_into = NULL WHERE customer_id = $1")
                .bind(restored)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE transactions SET customer_id = $2 WHERE customer_id = $1 AND transaction_id = ANY($3)")
                .bind(survivor)
                .bind(restored)
                .bind(&e.moved_transaction_ids)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE interactions SET customer_id = $2 WHERE customer_id = $1 AND interaction_id = ANY($3)")
                .bind(survivor)
                .bind(restored)
                .bind(&e.moved_interaction_ids)
                .execute(&mut *tx)
                .await?;
        } else if let Some(e) = event.payload::<pb::ConsentChanged>()? {
            let owner = live(tx, id(&e.customer_id)?).await?;
            crm_kit::db::mirror_consents(tx, owner, &e.grants).await?;
        } else if let Some(e) = event.payload::<pb::CustomerErased>()? {
            let ids = erased_ids(&e)?;
            for x in &ids {
                ensure(tx, *x).await?;
            }
            // PRF-8: what describes the person goes; identity-free facts stay for aggregates.
            sqlx::query(
                "UPDATE customers SET region = '', timezone = '', tags = '{}', attributes = '{}', birth_month = NULL, birth_day = NULL, \
                 erased_at = COALESCE(erased_at, $2, now()) WHERE customer_id = ANY($1)",
            )
            .bind(&ids)
            .bind(at)
            .execute(&mut *tx)
            .await?;
            confirm_erasure(tx, SERVICE, &e.customer_id, &event.envelope.request_id).await?;
        }
        Ok(())
    }
}

/// Empties the read model and the consumer's inbox, so that replaying the
/// stream from its start rebuilds it (SEG-7 full rebuild).
pub async fn reset(tx: &mut PgConnection, group: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("TRUNCATE customers, transactions, interactions, consents, freshness").execute(&mut *tx).await?;
    sqlx::query("DELETE FROM kit_inbox WHERE consumer = $1").bind(group).execute(&mut *tx).await?;
    Ok(())
}
