//! The events profiles emits through its outbox (SPEC 2).

use crm_kit::ApiError;
use crm_kit::outbox::{self, Aggregate};
use crm_proto::common::v1::Date;
use crm_proto::profiles::v1 as pb;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::SERVICE;

fn birthday_without_year(c: &pb::Customer) -> Option<Date> {
    c.birthday.map(|d| Date { year: 0, ..d })
}

async fn emit<T: prost::Name + prost::Message>(
    tx: &mut PgConnection,
    customer_id: &str,
    request_id: &str,
    payload: &T,
) -> Result<(), ApiError> {
    outbox::enqueue(tx, SERVICE, Aggregate { kind: "customer", id: customer_id }, request_id, payload).await.map(|_| ())
}

/// CustomerCreated.
pub async fn customer_created(tx: &mut PgConnection, c: &pb::Customer, request_id: &str) -> Result<(), ApiError> {
    let e = pb::CustomerCreated {
        customer_id: c.customer_id.clone(),
        kind: c.kind,
        region: c.region.clone(),
        timezone: c.timezone.clone(),
        tags: c.tags.clone(),
        registered_at: c.registered_at,
        birthday: birthday_without_year(c),
        preferred_channel: c.preferred_channel,
        attributes: c.attributes.clone(),
    };
    emit(tx, &c.customer_id, request_id, &e).await
}

/// CustomerUpdated.
pub async fn customer_updated(
    tx: &mut PgConnection,
    c: &pb::Customer,
    changed: &[String],
    request_id: &str,
) -> Result<(), ApiError> {
    let e = pb::CustomerUpdated {
        customer_id: c.customer_id.clone(),
        changed_fields: changed.to_vec(),
        region: c.region.clone(),
        timezone: c.timezone.clone(),
        tags: c.tags.clone(),
        birthday: birthday_without_year(c),
        preferred_channel: c.preferred_channel,
        attributes: c.attributes.clone(),
    };
    emit(tx, &c.customer_id, request_id, &e).await
}

/// TransactionRecorded.
pub async fn transaction_recorded(
    tx: &mut PgConnection,
    t: &pb::Transaction,
    request_id: &str,
) -> Result<(), ApiError> {
    emit(tx, &t.customer_id, request_id, &pb::TransactionRecorded { transaction: Some(t.clone()) }).await
}

/// InteractionRecorded (the free-text note stays in profiles).
pub async fn interaction_recorded(
    tx: &mut PgConnection,
    x: &pb::Interaction,
    request_id: &str,
) -> Result<(), ApiError> {
    let x = pb::Interaction { note: String::new(), ..x.clone() };
    emit(tx, &x.customer_id.clone(), request_id, &pb::InteractionRecorded { interaction: Some(x) }).await
}

/// ConsentChanged.
pub async fn consent_changed(
    tx: &mut PgConnection,
    id: Uuid,
    grants: Vec<pb::ConsentGrant>,
    request_id: &str,
) -> Result<(), ApiError> {
    emit(tx, &id.to_string(), request_id, &pb::ConsentChanged { customer_id: id.to_string(), grants }).await
}

/// CustomerErased.
pub async fn customer_erased(tx: &mut PgConnection, id: Uuid, all: &[Uuid], request_id: &str) -> Result<(), ApiError> {
    let e = pb::CustomerErased {
        customer_id: id.to_string(),
        alias_ids: all.iter().filter(|x| **x != id).map(|x| x.to_string()).collect(),
    };
    emit(tx, &id.to_string(), request_id, &e).await
}
