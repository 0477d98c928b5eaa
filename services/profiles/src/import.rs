//! PRF-4: ImportRecords, the client-streaming bulk import.
//!
//! Rows arrive as a stream and are handled in chunks of up to 5 000, each in
//! one transaction: customers first (under the exclusive identity lock, so
//! single creates wait at most one chunk; validated, identity-resolved against
//! the base and within the chunk, inserted with one statement, events
//! written in bulk), then transactions and interactions (owners found by id
//! or by external id, duplicates skipped by id). While a chunk is written the
//! next one is being received. Every rejected row is reported with its
//! index, field and reason (the first 10 000), and re-running an import is
//! safe: customers match, transactions and interactions deduplicate by id.

use std::collections::HashMap;

use chrono::Utc;
use crm_kit::outbox;
use crm_kit::{ApiError, FieldViolations};
use crm_proto::profiles::v1 as pb;
use crm_proto::profiles::v1::import_records_request::Record;
use tonic::Streaming;
use uuid::Uuid;

use crate::SERVICE;
use crate::api::ProfilesApi;
use crate::domain::customer::identity_keys;
use crate::domain::{customer as rules, records};
use crate::store;

const CHUNK: usize = 5000;
const MAX_REJECTIONS: usize = 10_000;

#[derive(Default)]
struct Tally {
    response: pb::ImportRecordsResponse,
}

impl Tally {
    fn reject(&mut self, index: i64, field: &str, reason: &str) {
        self.response.rejected += 1;
        if self.response.rejections.len() < MAX_REJECTIONS {
            self.response.rejections.push(pb::RowRejection {
                index,
                field: field.to_string(),
                reason: reason.to_string(),
            });
        }
    }

    fn add(&mut self, other: Tally) {
        let r = other.response;
        self.response.customers_created += r.customers_created;
        self.response.customers_matched += r.customers_matched;
        self.response.transactions_recorded += r.transactions_recorded;
        self.response.interactions_recorded += r.interactions_recorded;
        self.response.duplicates += r.duplicates;
        self.response.rejected += r.rejected;
        let room = MAX_REJECTIONS.saturating_sub(self.response.rejections.len());
        self.response.rejections.extend(r.rejections.into_iter().take(room));
    }
}

impl ProfilesApi {
    pub(crate) async fn import(
        &self,
        mut stream: Streaming<pb::ImportRecordsRequest>,
    ) -> Result<pb::ImportRecordsResponse, ApiError> {
        let mut total = Tally::default();
        let mut chunk = Vec::with_capacity(CHUNK);
        let mut index = 0i64;
        let mut in_flight: Option<tokio::task::JoinHandle<Result<Tally, ApiError>>> = None;
        loop {
            let message = stream.message().await.map_err(|s| {
                ApiError::invalid("stream", format!("could not read the import stream: {}", s.message()))
            })?;
            let done = message.is_none();
            if let Some(m) = message {
                chunk.push((index, m));
                index += 1;
            }
            if chunk.len() >= CHUNK || (done && !chunk.is_empty()) {
                if let Some(previous) = in_flight.take() {
                    total.add(previous.await.map_err(|e| ApiError::internal(format!("import task: {e}")))??);
                }
                let rows = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                let api = self.clone();
                in_flight = Some(tokio::spawn(async move { api.import_chunk(rows).await }));
            }
            if done {
                break;
            }
        }
        if let Some(previous) = in_flight.take() {
            total.add(previous.await.map_err(|e| ApiError::internal(format!("import task: {e}")))??);
        }
        Ok(total.response)
    }

    async fn import_chunk(&self, rows: Vec<(i64, pb::ImportRecordsRequest)>) -> Result<Tally, ApiError> {
        let mut tally = Tally::default();
        let mut customers: Vec<(i64, pb::Customer)> = Vec::new();
        let mut transactions: Vec<(i64, pb::Transaction, Option<pb::ExternalId>)> = Vec::new();
        let mut interactions: Vec<(i64, pb::Interaction, Option<pb::ExternalId>)> = Vec::new();
        for (index, row) in rows {
            match row.record {
                None => tally.reject(index, "record", "one of customer, transaction or interaction is required"),
                Some(Record::Customer(mut c)) => {
                    let mut v = FieldViolations::new();
                    rules::normalise(&mut c, "customer.", &mut v);
                    match v.iter().next() {
                        Some(first) => tally.reject(index, &first.field, &first.description),
                        None => customers.push((index, c)),
                    }
                }
                Some(Record::Transaction(t)) => transactions.push((index, t, row.customer_ref)),
                Some(Record::Interaction(x)) => interactions.push((index, x, row.customer_ref)),
            }
        }

        let now = Utc::now();
        let mut tx = self.pg.begin().await?;
        // Customers: identity resolution against the base and within the chunk (PRF-3).
        if !customers.is_empty() {
            store::lock_identities_bulk(&mut tx).await?;
        }
        let phones: Vec<String> =
            customers.iter().filter(|(_, c)| !c.phone.is_empty()).map(|(_, c)| c.phone.clone()).collect();
        let emails: Vec<String> =
            customers.iter().filter(|(_, c)| !c.email.is_empty()).map(|(_, c)| c.email.clone()).collect();
        let exts: Vec<(String, String)> = customers
            .iter()
            .flat_map(|(_, c)| c.external_ids.iter().map(|x| (x.source.clone(), x.id.clone())))
            .collect();
        let mut owner_of: HashMap<String, Uuid> =
            store::holders(&mut tx, &phones, &emails, &exts).await?.into_iter().collect();
        let mut new_rows: Vec<(Uuid, pb::Customer)> = Vec::new();
        let mut enriched = Vec::new();
        for (_, c) in customers {
            let keys = identity_keys(&c);
            let existing = keys.iter().find_map(|k| owner_of.get(k).copied());
            match existing {
                Some(id) if new_rows.iter().any(|(n, _)| *n == id) => {
                    // Matches a row created earlier in this chunk.
                    tally.response.customers_matched += 1;
                }
                Some(id) => {
                    self.enrich(&mut tx, id, &c, now, "").await?;
                    enriched.push(id);
                    tally.response.customers_matched += 1;
                }
                None => {
                    let id = Uuid::now_v7();
                    for k in keys {
                        owner_of.insert(k, id);
                    }
                    new_rows.push((id, c));
                }
            }
        }
        store::insert_customers(&mut tx, &new_rows, now).await?;
        let created: Vec<(String, pb::CustomerCreated)> = new_rows
            .iter()
            .map(|(id, c)| {
                (
                    id.to_string(),
                    pb::CustomerCreated {
                        customer_id: id.to_string(),
                        kind: c.kind,
                        region: c.region.clone(),
                        timezone: c.timezone.clone(),
                        tags: c.tags.clone(),
                        registered_at: Some(c.registered_at.unwrap_or_else(|| store::ts(now))),
                        birthday: c.birthday.map(|d| crm_proto::common::v1::Date { year: 0, ..d }),
                        preferred_channel: c.preferred_channel,
                        attributes: c.attributes.clone(),
                    },
                )
            })
            .collect();
        outbox::enqueue_many(&mut tx, SERVICE, "customer", "", &created).await?;
        tally.response.customers_created += new_rows.len() as i64;

        // Owners of transactions and interactions: by id (resolving aliases) or by external id.
        let mut refs: Vec<(String, String)> = Vec::new();
        let mut by_id: Vec<Uuid> = Vec::new();
        for r in transactions
            .iter()
            .map(|t| (&t.1.customer_id, &t.2))
            .chain(interactions.iter().map(|x| (&x.1.customer_id, &x.2)))
        {
            match r {
                (_, Some(ext)) => refs.push((ext.source.trim().to_lowercase(), ext.id.trim().to_string())),
                (id, None) => {
                    if let Ok(u) = Uuid::parse_str(id) {
                        by_id.push(u);
                    }
                }
            }
        }
        let mut owners: HashMap<String, Uuid> = store::holders(&mut tx, &[], &[], &refs).await?.into_iter().collect();
        by_id.sort_unstable();
        by_id.dedup();
        let live: Vec<(Uuid, Option<Uuid>, bool)> = sqlx::query_as(
            "SELECT customer_id, merged_into, erased_at IS NOT NULL FROM customers WHERE customer_id = ANY($1)",
        )
        .bind(&by_id)
        .fetch_all(&mut *tx)
        .await?;
        for (id, merged, erased) in live {
            if erased {
                continue;
            }
            let target = match merged {
                None => id,
                Some(_) => store::resolve(&mut tx, id).await?.unwrap_or(id),
            };
            owners.insert(id.to_string(), target);
        }
        let owner = |customer_id: &str, customer_ref: &Option<pb::ExternalId>| -> Option<Uuid> {
            match customer_ref {
                Some(x) => owners.get(&format!("ext:{}:{}", x.source.trim().to_lowercase(), x.id.trim())).copied(),
                None => owners.get(customer_id).copied(),
            }
        };

        let mut tx_rows = Vec::new();
        for (index, t, customer_ref) in &transactions {
            let mut t = t.clone();
            if customer_ref.is_some() && t.customer_id.is_empty() {
                t.customer_id = "by-ref".into();
            }
            if let Err((field, reason)) = records::check_transaction(&t) {
                tally.reject(*index, &field, &reason);
                continue;
            }
            match owner(&t.customer_id, customer_ref) {
                Some(id) => tx_rows.push((id, pb::Transaction { customer_id: id.to_string(), ..t })),
                None => tally.reject(
                    *index,
                    if customer_ref.is_some() { "customer_ref" } else { "customer_id" },
                    "no such customer",
                ),
            }
        }
        tx_rows.sort_by(|a, b| a.1.transaction_id.cmp(&b.1.transaction_id));
        let before = tx_rows.len();
        tx_rows.dedup_by(|a, b| a.1.transaction_id == b.1.transaction_id);
        tally.response.duplicates += (before - tx_rows.len()) as i64;
        let inserted: std::collections::HashSet<String> =
            store::insert_transactions(&mut tx, &tx_rows).await?.into_iter().collect();
        tally.response.duplicates += (tx_rows.len() - inserted.len()) as i64;
        tally.response.transactions_recorded += inserted.len() as i64;
        let tx_events: Vec<(String, pb::TransactionRecorded)> = tx_rows
            .into_iter()
            .filter(|(_, t)| inserted.contains(&t.transaction_id))
            .map(|(id, t)| (id.to_string(), pb::TransactionRecorded { transaction: Some(t) }))
            .collect();
        outbox::enqueue_many(&mut tx, SERVICE, "customer", "", &tx_events).await?;

        let mut int_rows = Vec::new();
        for (index, x, customer_ref) in &interactions {
            let mut x = x.clone();
            if customer_ref.is_some() && x.customer_id.is_empty() {
                x.customer_id = "by-ref".into();
            }
            if x.interaction_id.is_empty() {
                tally.reject(*index, "interaction_id", "is required in an import (it makes re-imports safe)");
                continue;
            }
            if let Err((field, reason)) = records::check_interaction(&x) {
                tally.reject(*index, &field, &reason);
                continue;
            }
            if x.direction == 0 {
                x.direction = pb::Direction::Inbound as i32;
            }
            match owner(&x.customer_id, customer_ref) {
                Some(id) => int_rows.push((id, pb::Interaction { customer_id: id.to_string(), ..x })),
                None => tally.reject(
                    *index,
                    if customer_ref.is_some() { "customer_ref" } else { "customer_id" },
                    "no such customer",
                ),
            }
        }
        int_rows.sort_by(|a, b| a.1.interaction_id.cmp(&b.1.interaction_id));
        let before = int_rows.len();
        int_rows.dedup_by(|a, b| a.1.interaction_id == b.1.interaction_id);
        tally.response.duplicates += (before - int_rows.len()) as i64;
        let inserted: std::collections::HashSet<String> =
            store::insert_interactions(&mut tx, &int_rows).await?.into_iter().collect();
        tally.response.duplicates += (int_rows.len() - inserted.len()) as i64;
        tally.response.interactions_recorded += inserted.len() as i64;
        let int_events: Vec<(String, pb::InteractionRecorded)> = int_rows
            .into_iter()
            .filter(|(_, x)| inserted.contains(&x.interaction_id))
            .map(|(id, x)| {
                (
                    id.to_string(),
                    pb::InteractionRecorded { interaction: Some(pb::Interaction { note: String::new(), ..x }) },
                )
            })
            .collect();
        outbox::enqueue_many(&mut tx, SERVICE, "customer", "", &int_events).await?;
        tx.commit().await?;
        // Report rejections in stream order (chunks are settled in order).
        tally.response.rejections.sort_by_key(|r| r.index);
        for id in enriched {
            if let Ok(v) = sqlx::query_scalar::<_, i64>("SELECT version FROM customers WHERE customer_id = $1")
                .bind(id)
                .fetch_one(&self.pg)
                .await
            {
                self.cache.invalidate(id, v).await;
            }
        }
        Ok(tally)
    }
}
