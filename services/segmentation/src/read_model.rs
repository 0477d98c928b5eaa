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

/// The month facts are bucketed by: year * 12 + month - 1, in UTC (the
/// subscript of the month arrays of `customer_facts`, SQL `month_of`).
pub fn month_of(t: DateTime<Utc>) -> i32 {
    use chrono::Datelike;
    t.year() * 12 + t.month0() as i32
}

/// Marks customers for the incremental recompute (SEG-7).
pub async fn mark_dirty(tx: &mut PgConnection, customers: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO dirty_customers (customer_id) SELECT * FROM UNNEST($1::uuid[]) ON CONFLICT DO NOTHING")
        .bind(customers)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Rebuilds these customers' aggregates from their facts (after a merge or
/// an unmerge moved facts between them) and marks them for recompute.
async fn rebuild_facts(tx: &mut PgConnection, customers: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT rebuild_customer_facts($1)").bind(customers).execute(&mut *tx).await?;
    mark_dirty(tx, customers).await
}

/// Rebuilds every customer's aggregates from the stored facts, set-based
/// (for facts loaded straight into the tables: tests, benchmarks, repairs).
pub async fn rebuild_all(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT rebuild_customer_facts(NULL)").execute(pool).await?;
    Ok(())
}

/// Makes sure a customer row exists (facts may arrive before CustomerCreated).
async fn ensure(tx: &mut PgConnection, customer: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO customers (customer_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(customer)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The customer an id stands for now: itself, or the survivor of its merges;
/// its row stays locked until the event is applied, so a concurrent merge of
/// it cannot leave this fact behind (see `crm_kit::db::live_or_new_customer`).
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
    mark_dirty(tx, &[customer]).await
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
            mark_dirty(tx, &[c]).await?;
        }
    } else if let Some(e) = event.payload::<fb::TicketResolved>()? {
        let owner: Vec<Uuid> =
            sqlx::query_scalar("UPDATE complaint_tickets SET open = false WHERE ticket_id = $1 RETURNING customer_id")
                .bind(id(&e.ticket_id)?)
                .fetch_all(&mut *tx)
                .await?;
        mark_dirty(tx, &owner).await?;
    } else if let Some(e) = event.payload::<fb::TicketVerified>()? {
        // Not confirmed by the customer: the complaint is open again.
        let owner: Vec<Uuid> =
            sqlx::query_scalar("UPDATE complaint_tickets SET open = NOT $2 WHERE ticket_id = $1 RETURNING customer_id")
                .bind(id(&e.ticket_id)?)
                .bind(e.confirmed)
                .fetch_all(&mut *tx)
                .await?;
        mark_dirty(tx, &owner).await?;
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
    .await?;
    mark_dirty(tx, &[customer]).await
}

impl EventHandler for ReadModel {
    async fn handle(&self, tx: &mut PgConnection, event: &Event) -> Result<(), HandlerError> {
        let at = time(event.envelope.occurred_at.as_ref());
        if event.envelope.source == "feedback" {
            return feedback(tx, event, at).await;
        }
        if let Some(at) = at {
            sqlx::query(
                "INSERT INTO freshness (slot, newest_event_at) VALUES (pg_backend_pid() % 8, $1) \
                 ON CONFLICT (slot) DO UPDATE SET newest_event_at = GREATEST(freshness.newest_event_at, $1)",
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
            // The fact, its month in the customer's aggregates and the dirty
            // mark in one statement; a redelivered transaction changes nothing.
            sqlx::query(
                "WITH ins AS (INSERT INTO transactions (transaction_id, customer_id, kind, amount_minor, currency, occurred_at, category) \
                   VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT (transaction_id) DO NOTHING RETURNING customer_id), \
                 f AS (INSERT INTO customer_facts AS f (customer_id, spend, purchases, first_purchase, last_purchase) \
                   SELECT customer_id, array_fill($9::bigint, ARRAY[1], ARRAY[$8]), array_fill($10::int, ARRAY[1], ARRAY[$8]), \
                     CASE WHEN $10 = 1 THEN $6::timestamptz END, CASE WHEN $10 = 1 THEN $6::timestamptz END FROM ins \
                   ON CONFLICT (customer_id) DO UPDATE SET spend[$8] = COALESCE(f.spend[$8], 0) + $9, \
                     purchases[$8] = COALESCE(f.purchases[$8], 0) + $10, \
                     first_purchase = LEAST(f.first_purchase, EXCLUDED.first_purchase), \
                     last_purchase = GREATEST(f.last_purchase, EXCLUDED.last_purchase)) \
                 INSERT INTO dirty_customers (customer_id) SELECT customer_id FROM ins ON CONFLICT DO NOTHING",
            )
            .bind(&t.transaction_id)
            .bind(owner)
            .bind(t.kind as i16)
            .bind(amount.amount_minor)
            .bind(&amount.currency)
            .bind(occurred)
            .bind(&t.category)
            .bind(month_of(occurred))
            .bind(if t.kind == 2 { -amount.amount_minor } else { amount.amount_minor })
            .bind(i32::from(t.kind == 1))
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
                "WITH ins AS (INSERT INTO interactions (interaction_id, customer_id, kind, channel, direction, occurred_at) \
                   VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT (interaction_id) DO NOTHING RETURNING customer_id), \
                 f AS (INSERT INTO customer_facts AS f (customer_id, activity, inquiries, last_interaction, last_login, responses, contacts) \
                   SELECT customer_id, array_fill(1, ARRAY[1], ARRAY[$7]), array_fill($8::int, ARRAY[1], ARRAY[$7]), $6, \
                     CASE WHEN $3 = 1 THEN $6::timestamptz END, $9::int, $10::int FROM ins \
                   ON CONFLICT (customer_id) DO UPDATE SET activity[$7] = COALESCE(f.activity[$7], 0) + 1, \
                     inquiries[$7] = COALESCE(f.inquiries[$7], 0) + $8, \
                     last_interaction = GREATEST(f.last_interaction, EXCLUDED.last_interaction), \
                     last_login = GREATEST(f.last_login, EXCLUDED.last_login), \
                     responses = f.responses + EXCLUDED.responses, contacts = f.contacts + EXCLUDED.contacts) \
                 INSERT INTO dirty_customers (customer_id) SELECT customer_id FROM ins ON CONFLICT DO NOTHING",
            )
            .bind(&x.interaction_id)
            .bind(owner)
            .bind(x.kind as i16)
            .bind(x.channel as i16)
            .bind(x.direction as i16)
            .bind(occurred)
            .bind(month_of(occurred))
            .bind(i32::from(x.kind == 3))
            .bind(i32::from(x.kind == 4))
            .bind(i32::from(x.direction == 2))
            .execute(&mut *tx)
            .await?;
        } else if let Some(e) = event.payload::<pb::CustomerMerged>()? {
            let (survivor, loser) = (id(&e.survivor_id)?, id(&e.loser_id)?);
            crm_kit::db::lock_customers(tx, &[survivor, loser]).await?;
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
                "INSERT INTO consents (customer_id, channel, purpose, granted, expires_at, updated_at) \
                 SELECT $2, channel, purpose, granted, expires_at, updated_at FROM consents WHERE customer_id = $1 \
                 ON CONFLICT DO NOTHING",
            )
            .bind(loser)
            .bind(survivor)
            .execute(&mut *tx)
            .await?;
            rebuild_facts(tx, &[survivor, loser]).await?;
        } else if let Some(e) = event.payload::<pb::CustomerUnmerged>()? {
            let (survivor, restored) = (id(&e.survivor_id)?, id(&e.restored_id)?);
            crm_kit::db::lock_customers(tx, &[survivor, restored]).await?;
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
            rebuild_facts(tx, &[survivor, restored]).await?;
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
            mark_dirty(tx, &ids).await?;
            crm_kit::idempotency::forget_customers(tx, &ids).await?;
            confirm_erasure(tx, SERVICE, &e.customer_id, &event.envelope.request_id).await?;
        }
        Ok(())
    }
}

/// Empties the read model and the consumer's inbox, so that replaying the
/// stream from its start rebuilds it (SEG-7 full rebuild).
pub async fn reset(tx: &mut PgConnection, group: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(
        "TRUNCATE customers, transactions, interactions, consents, freshness, customer_facts, dirty_customers",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM kit_inbox WHERE consumer = $1").bind(group).execute(&mut *tx).await?;
    Ok(())
}
