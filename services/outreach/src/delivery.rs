//! OUT-1 delivery: approved messages go to their channel's adapter with the
//! message id as idempotency key.
//!
//! A batch leases its messages (`lease_until`) and commits before calling the
//! adapters, renewing the lease while they work; bookkeeping follows in a
//! second transaction. If the process dies
//! in between, the lease expires, another replica (or the restarted one) calls
//! the adapter again with the same key, and the provider drops the duplicate:
//! nothing is sent twice and nothing is lost (REL-3). Transient failures are
//! retried with exponential backoff, each retry decided by the contact policy
//! again (it may be quiet hours by then); permanent ones, or too many attempts,
//! end in the dead-letter state, where `RetryMessage` can re-queue them.
//!
//! Personal channels (agent call, in-store) are not adapter deliveries: they
//! become agent tasks (OUT-7) for the account managers' queue.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use crm_kit::ApiError;
use crm_kit::outbox;
use crm_proto::common::v1::{Channel, Purpose, Tier};
use crm_proto::outreach::v1 as pb;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use prost::Message;
use sha2::Sha256;
use sqlx::PgPool;
use uuid::Uuid;

use crate::authority::{ComplaintSource, ConsentSource};
use crate::directory::Directory;
use crate::domain::policy::{self, Consent};
use crate::domain::{campaign, channel, template};
use crate::messages::{COLUMNS, MessageRow, state, verdict};
use crate::{SERVICE, privacy};

/// A rendered message on its way to a provider.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outbound {
    /// Idempotency key: the message id. Providers must drop a repeated key.
    pub idempotency_key: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// Channel name, e.g. "CHANNEL_SMS".
    pub channel: &'static str,
    /// Campaign, if any.
    pub campaign_id: Option<Uuid>,
    /// Address on the channel: the phone for SMS, the e-mail for e-mail;
    /// empty where the provider addresses by customer id (push, WeChat,
    /// community) or without a directory.
    pub to: String,
    /// Rendered subject.
    pub subject: String,
    /// Rendered body.
    pub body: String,
}

/// How a delivery failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// Worth retrying (timeout, 5xx, 429, connection refused).
    Transient(String),
    /// Will not succeed (4xx, malformed).
    Permanent(String),
}

/// A channel adapter (OUT-1).
pub trait Adapter: Send + Sync {
    /// Delivers `message`; a repeated idempotency key must not deliver twice.
    fn send<'a>(&'a self, message: &'a Outbound) -> Sending<'a>;

    /// Delivers several messages, a result per message in order. The default
    /// sends them concurrently one by one; adapters with a batch API override it.
    fn send_many<'a>(&'a self, messages: &'a [Outbound]) -> SendingMany<'a> {
        Box::pin(futures_util::future::join_all(messages.iter().map(|m| self.send(m))))
    }
}

/// The future of one delivery.
pub type Sending<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), SendError>> + Send + 'a>>;
/// The future of a batch of deliveries.
pub type SendingMany<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Result<(), SendError>>> + Send + 'a>>;

/// The development adapter: logs the message and records it in
/// `sink_deliveries`, which plays the provider (one row per key; `calls`
/// counts repeated calls). Benchmarks and tests read it as the delivery log.
#[derive(Debug, Clone)]
pub struct Sink {
    pool: PgPool,
}

impl Sink {
    /// A sink writing to `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

impl Adapter for Sink {
    fn send<'a>(&'a self, m: &'a Outbound) -> Sending<'a> {
        Box::pin(async move { self.send_many(std::slice::from_ref(m)).await.pop().unwrap_or(Ok(())) })
    }

    /// One statement for the whole batch.
    fn send_many<'a>(&'a self, ms: &'a [Outbound]) -> SendingMany<'a> {
        Box::pin(async move {
            for m in ms {
                tracing::debug!(message_id = %m.idempotency_key, channel = m.channel, "sink delivery");
            }
            let keys: Vec<Uuid> = ms.iter().map(|m| m.idempotency_key).collect();
            let customers: Vec<Uuid> = ms.iter().map(|m| m.customer_id).collect();
            let channels: Vec<i16> =
                ms.iter().map(|m| Channel::from_str_name(m.channel).map(|c| c as i16).unwrap_or(0)).collect();
            let campaigns: Vec<Option<Uuid>> = ms.iter().map(|m| m.campaign_id).collect();
            let subjects: Vec<&str> = ms.iter().map(|m| m.subject.as_str()).collect();
            let bodies: Vec<&str> = ms.iter().map(|m| m.body.as_str()).collect();
            let done = sqlx::query(
                "INSERT INTO sink_deliveries (idempotency_key, customer_id, channel, campaign_id, subject, body) \
                 SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::smallint[], $4::uuid[], $5::text[], $6::text[]) \
                 ON CONFLICT (idempotency_key) DO UPDATE SET calls = sink_deliveries.calls + 1",
            )
            .bind(&keys)
            .bind(&customers)
            .bind(&channels)
            .bind(&campaigns)
            .bind(&subjects)
            .bind(&bodies)
            .execute(&self.pool)
            .await;
            match done {
                Ok(_) => ms.iter().map(|_| Ok(())).collect(),
                Err(e) => ms.iter().map(|_| Err(SendError::Transient(e.to_string()))).collect(),
            }
        })
    }
}

/// The generic HTTP webhook adapter: POSTs the message as JSON, with an
/// `Idempotency-Key` header and an HMAC-SHA256 signature over
/// `"<timestamp>.<body>"` in `X-CRM-Signature: t=<timestamp>,v1=<hex>`.
/// 2xx is delivered; 408, 429 and 5xx are retried; other 4xx are permanent.
#[derive(Clone)]
pub struct Webhook {
    url: http::Uri,
    secret: Arc<Vec<u8>>,
    timeout: Duration,
    client: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook").field("url", &self.url).field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl Webhook {
    /// A webhook to `url` (http) signing with `secret`.
    pub fn new(url: http::Uri, secret: Vec<u8>, timeout: Duration) -> Self {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
        Self { url, secret: Arc::new(secret), timeout, client }
    }

    /// The signature header value for `body` at unix time `t`.
    pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        format!("t={t},v1={hex}")
    }
}

impl Adapter for Webhook {
    fn send<'a>(&'a self, m: &'a Outbound) -> Sending<'a> {
        Box::pin(async move {
            let body = serde_json::to_vec(m).map_err(|e| SendError::Permanent(e.to_string()))?;
            let t = Utc::now().timestamp();
            let request = http::Request::post(self.url.clone())
                .header("content-type", "application/json")
                .header("idempotency-key", m.idempotency_key.to_string())
                .header("x-crm-signature", Self::signature(&self.secret, t, &body))
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| SendError::Permanent(e.to_string()))?;
            let response = tokio::time::timeout(self.timeout, self.client.request(request))
                .await
                .map_err(|_| SendError::Transient(format!("webhook timed out after {:?}", self.timeout)))?
                .map_err(|e| SendError::Transient(format!("webhook unreachable: {e}")))?;
            let status = response.status();
            // Drain the body so the connection can be reused.
            let _ = tokio::time::timeout(self.timeout, response.into_body().collect()).await;
            if status.is_success() {
                Ok(())
            } else if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
                Err(SendError::Transient(format!("webhook answered {status}")))
            } else {
                Err(SendError::Permanent(format!("webhook answered {status}")))
            }
        })
    }
}

/// Delivery settings.
#[derive(Clone)]
pub struct Deliverer {
    /// The database.
    pub pool: PgPool,
    /// Adapters by name ("log", "webhook").
    pub adapters: HashMap<String, Arc<dyn Adapter>>,
    /// How long a batch owns its messages before another replica may retry them.
    pub lease: Duration,
    /// Attempts before the dead-letter state.
    pub max_attempts: i32,
    /// First retry delay; doubles per attempt.
    pub backoff: Duration,
    /// Names and addresses from profiles; without it messages greet
    /// generically and carry no address.
    pub directory: Option<Arc<dyn Directory>>,
    /// Consent as recorded now, asked at hand-off (REL-6); without it the
    /// decision's event-fed copy is all there is.
    pub consent: Option<Arc<dyn ConsentSource>>,
    /// Open complaints as recorded now, asked at hand-off (REL-6).
    pub complaints: Option<Arc<dyn ComplaintSource>>,
}

/// What the hand-off check made of a batch.
struct HandOff {
    /// Still to be handed over.
    go: Vec<Leased>,
    /// Refused as the owners record it now.
    refused: Vec<(MessageRow, policy::Decision)>,
    /// An owner could not be asked: retried later.
    waiting: Vec<(MessageRow, String)>,
}

/// Exponential backoff for `attempts` so far, capped at an hour.
pub fn retry_delay(first: Duration, attempts: i32) -> Duration {
    let factor = 1u32 << attempts.clamp(1, 16).saturating_sub(1);
    (first * factor).min(Duration::from_secs(3600))
}

/// An adapter with the messages it gets in one call.
type AdapterBatch = (Arc<dyn Adapter>, Vec<MessageRow>, Vec<Outbound>);

struct Leased {
    row: MessageRow,
    adapter: String,
    bodies: Vec<template::Body>,
    values: BTreeMap<String, String>,
}

impl Deliverer {
    /// Delivers up to `limit` approved messages; returns how many it handled.
    pub async fn deliver_due(&self, limit: i64) -> Result<usize, ApiError> {
        let leased = self.lease(limit).await?;
        self.deliver(leased).await
    }

    /// Delivers messages the caller approved and leased to this replica in
    /// the same transaction (the dispatcher's fast path: no second lease).
    pub async fn deliver_approved(&self, ids: &[Uuid]) -> Result<usize, ApiError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        let sql = format!("SELECT {COLUMNS} FROM messages WHERE message_id = ANY($1) AND state = $2");
        let rows: Vec<MessageRow> =
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(ids).bind(state::APPROVED).fetch_all(&mut *tx).await?;
        let leased = self.prepare(&mut tx, rows).await?;
        tx.commit().await?;
        self.deliver(leased).await
    }

    async fn deliver(&self, leased: Vec<Leased>) -> Result<usize, ApiError> {
        if leased.is_empty() {
            return Ok(0);
        }
        // REL-7: the batch stays this replica's for as long as it is being handed over.
        let _lease =
            LeaseKeeper::start(self.pool.clone(), leased.iter().map(|l| l.row.message_id).collect(), self.lease);
        let n = leased.len();
        let mut leased = leased;
        let mut contacts = HashMap::new();
        if let Some(directory) = &self.directory {
            let ids: Vec<Uuid> = leased.iter().map(|l| l.row.customer_id).collect();
            match directory.lookup(&ids).await {
                Ok(found) => contacts = found,
                Err(e) => {
                    // Profiles unreachable: every message of the batch waits for a retry.
                    let results = leased.into_iter().map(|l| (l.row, Err(SendError::Transient(e.clone())))).collect();
                    self.settle(Settled { results, personal: Vec::new(), refused: Vec::new(), handed_at: Utc::now() })
                        .await?;
                    return Ok(n);
                }
            }
            for l in &mut leased {
                match contacts.get(&l.row.customer_id) {
                    Some(c) if !c.name.is_empty() => {
                        l.values.insert("name".into(), c.name.clone());
                    }
                    _ => {}
                }
            }
        }
        // REL-6: the last look, right before the adapters, at what the owners record now.
        let HandOff { go: leased, refused, waiting } = self.hand_off(leased).await;
        let handed_at = Utc::now();
        let mut results: Vec<(MessageRow, Result<(), SendError>)> =
            waiting.into_iter().map(|(row, e)| (row, Err(SendError::Transient(e)))).collect();
        let mut personal = Vec::new();
        let mut pending = Vec::new();
        for l in leased {
            let ch = Channel::try_from(l.row.channel as i32).unwrap_or(Channel::Unspecified);
            if channel::is_personal(ch) {
                personal.push(l);
                continue;
            }
            let rendered = template::pick(&l.bodies, &l.row.locale)
                .ok_or_else(|| SendError::Permanent("the template has no body".into()))
                .and_then(|b| {
                    let subject =
                        b.subject.render(&l.values).map_err(|e| SendError::Permanent(format!("subject {e}")))?;
                    let body = b.body.render(&l.values).map_err(|e| SendError::Permanent(format!("body {e}")))?;
                    Ok((subject, body))
                });
            let adapter = self.adapters.get(&l.adapter).cloned();
            let to = match (ch, contacts.get(&l.row.customer_id)) {
                (Channel::Sms, Some(c)) => c.phone.clone(),
                (Channel::Email, Some(c)) => c.email.clone(),
                _ => String::new(),
            };
            pending.push((l, rendered, adapter, ch, to));
        }
        // Per adapter, one batch call; rendering problems and missing adapters fail at once.
        let mut batches: HashMap<String, AdapterBatch> = HashMap::new();
        for (l, rendered, adapter, ch, to) in pending {
            match (rendered, adapter) {
                (Err(e), _) => results.push((l.row, Err(e))),
                (_, None) => {
                    let e = SendError::Transient(format!("adapter {:?} is not configured", l.adapter));
                    results.push((l.row, Err(e)));
                }
                (Ok((subject, body)), Some(adapter)) => {
                    let out = Outbound {
                        idempotency_key: l.row.message_id,
                        customer_id: l.row.customer_id,
                        channel: ch.as_str_name(),
                        campaign_id: l.row.campaign_id,
                        to,
                        subject,
                        body,
                    };
                    let entry = batches.entry(l.adapter.clone()).or_insert_with(|| (adapter, Vec::new(), Vec::new()));
                    entry.1.push(l.row);
                    entry.2.push(out);
                }
            }
        }
        for (_, (adapter, rows, outs)) in batches {
            let sent = adapter.send_many(&outs).await;
            results.extend(rows.into_iter().zip(sent));
        }
        self.settle(Settled { results, personal, refused, handed_at }).await?;
        Ok(n)
    }

    /// REL-6: asks profiles for consent and feedback for open complaints, as
    /// recorded now, and refuses what they refuse (a complaint stops
    /// marketing only). A source that cannot be asked makes the messages it
    /// concerns wait for a retry; one not configured leaves the decision be.
    async fn hand_off(&self, leased: Vec<Leased>) -> HandOff {
        let mut out = HandOff { go: Vec::with_capacity(leased.len()), refused: Vec::new(), waiting: Vec::new() };
        if leased.is_empty() || (self.consent.is_none() && self.complaints.is_none()) {
            out.go = leased;
            return out;
        }
        let purpose = |l: &Leased| Purpose::try_from(l.row.purpose as i32).unwrap_or(Purpose::Marketing);
        let all: Vec<Uuid> = leased.iter().map(|l| l.row.customer_id).collect();
        let marketing: Vec<Uuid> =
            leased.iter().filter(|l| purpose(l) != Purpose::Service).map(|l| l.row.customer_id).collect();
        let consent = async {
            match &self.consent {
                Some(source) => Some(source.consent(&all).await),
                None => None,
            }
        };
        let complaints = async {
            match &self.complaints {
                Some(source) if !marketing.is_empty() => Some(source.open(&marketing).await),
                _ => None,
            }
        };
        let (consent, complaints) = tokio::join!(consent, complaints);
        for l in leased {
            let p = purpose(&l);
            let now_consent = match &consent {
                None => Consent::Granted,
                Some(Err(e)) => {
                    out.waiting.push((l.row, e.clone()));
                    continue;
                }
                Some(Ok(known)) => {
                    known.get(&(l.row.customer_id, l.row.channel, l.row.purpose)).copied().unwrap_or(Consent::Unknown)
                }
            };
            let open_complaint = match (&complaints, p) {
                (_, Purpose::Service) | (None, _) => false,
                (Some(Err(e)), _) => {
                    out.waiting.push((l.row, e.clone()));
                    continue;
                }
                (Some(Ok(open)), _) => open.contains(&l.row.customer_id),
            };
            let channel = Channel::try_from(l.row.channel as i32).unwrap_or(Channel::Unspecified);
            match policy::check_at_hand_off(now_consent, open_complaint, policy::Attempt { channel, purpose: p }) {
                Some(refused) => out.refused.push((l.row, refused)),
                None => out.go.push(l),
            }
        }
        out
    }

    async fn lease(&self, limit: i64) -> Result<Vec<Leased>, ApiError> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            // `= ANY(ARRAY(...))` keeps the update on the primary key whatever the
            // statistics say (a fresh campaign makes the table grow fast).
            "UPDATE messages SET lease_until = now() + $3 * interval '1 millisecond', attempts = attempts + 1 \
             WHERE message_id = ANY(ARRAY(SELECT message_id FROM messages WHERE state = $1 AND due_at <= now() \
               AND (lease_until IS NULL OR lease_until < now()) ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED)) \
             RETURNING {COLUMNS}"
        );
        let rows: Vec<MessageRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(state::APPROVED)
            .bind(limit)
            .bind(self.lease.as_millis() as f64)
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let leased = self.prepare(&mut tx, rows).await?;
        tx.commit().await?;
        Ok(leased)
    }

    /// What rendering needs: templates, offer values, campaign names, adapters.
    async fn prepare(&self, tx: &mut sqlx::PgConnection, rows: Vec<MessageRow>) -> Result<Vec<Leased>, ApiError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let template_ids: Vec<Uuid> = rows.iter().map(|r| r.template_id).collect();
        let templates: Vec<(Uuid, Vec<u8>)> =
            sqlx::query_as("SELECT template_id, bodies FROM templates WHERE template_id = ANY($1)")
                .bind(&template_ids)
                .fetch_all(&mut *tx)
                .await?;
        let mut parsed: HashMap<Uuid, Vec<template::Body>> = HashMap::new();
        for (id, bytes) in templates {
            let t = pb::Template::decode(bytes.as_slice()).map_err(ApiError::internal)?;
            parsed.insert(id, crate::templates::parse_bodies(&t.bodies, "template.bodies").unwrap_or_default());
        }
        let customers: Vec<Uuid> = rows.iter().map(|r| r.customer_id).collect();
        let profile: Vec<(Uuid, i16, i64)> =
            sqlx::query_as("SELECT customer_id, tier, spend_minor FROM customers WHERE customer_id = ANY($1)")
                .bind(&customers)
                .fetch_all(&mut *tx)
                .await?;
        let profile: HashMap<Uuid, (i16, i64)> = profile.into_iter().map(|(id, t, s)| (id, (t, s))).collect();
        let campaign_ids: Vec<Uuid> = rows.iter().filter_map(|r| r.campaign_id).collect();
        let names: Vec<(Uuid, Vec<u8>)> =
            sqlx::query_as("SELECT campaign_id, spec FROM campaigns WHERE campaign_id = ANY($1)")
                .bind(&campaign_ids)
                .fetch_all(&mut *tx)
                .await?;
        let names: HashMap<Uuid, String> = names
            .into_iter()
            .filter_map(|(id, b)| pb::Campaign::decode(b.as_slice()).ok().map(|c| (id, c.display_name)))
            .collect();
        let channels: HashMap<i16, String> = crate::settings::load_channels(tx)
            .await?
            .into_iter()
            .map(|(ch, _, _, adapter)| (ch as i16, adapter))
            .collect();
        Ok(rows
            .into_iter()
            .map(|row| {
                let (tier, spend) = profile.get(&row.customer_id).copied().unwrap_or((0, 0));
                let mut values =
                    offer_values(Tier::try_from(tier as i32).unwrap_or(Tier::Unspecified), spend, &row.locale);
                if let Some(name) = row.campaign_id.and_then(|c| names.get(&c)) {
                    values.insert("campaign_name".into(), name.clone());
                }
                if let Some(extra) = row.variables.as_object() {
                    // OUT-6: what the rules computed wins over anything stored with the message.
                    for (k, v) in extra.iter().filter(|(k, _)| template::is_free(k)) {
                        values.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                    }
                }
                Leased {
                    adapter: channels.get(&row.channel).cloned().unwrap_or_else(|| "log".into()),
                    bodies: parsed.get(&row.template_id).cloned().unwrap_or_default(),
                    values,
                    row,
                }
            })
            .collect())
    }

    async fn settle(&self, settled: Settled) -> Result<(), ApiError> {
        let Settled { results, personal, refused, handed_at } = settled;
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        let mut sent_ids = Vec::new();
        let mut events = Vec::new();
        let mut retry: Vec<(MessageRow, DateTime<Utc>, String)> = Vec::new();
        let mut dead: Vec<(Uuid, String)> = Vec::new();
        for (row, result) in results {
            match result {
                Ok(()) => {
                    sent_ids.push(row.message_id);
                    let mut m = row;
                    m.state = state::SENT;
                    m.sent_at = Some(handed_at);
                    events.push((
                        m.customer_id.to_string(),
                        pb::MessageSent { message: Some(privacy::message_event(m.to_wire())), holdout: false },
                    ));
                }
                Err(SendError::Transient(e)) if row.attempts < self.max_attempts => {
                    let delay = retry_delay(self.backoff, row.attempts);
                    retry.push((row, now + chrono::Duration::from_std(delay).unwrap_or_default(), e));
                }
                Err(SendError::Transient(e) | SendError::Permanent(e)) => dead.push((row.message_id, e)),
            }
        }
        // OUT-7: personal channels become a task for the account managers' queue.
        for l in personal {
            let reason =
                if l.row.trigger_name.is_empty() { "campaign contact".to_string() } else { l.row.trigger_name.clone() };
            let kind =
                if l.row.channel == Channel::InStore as i16 { pb::TaskKind::Visit } else { pb::TaskKind::CallBack };
            crate::tasks::create_in(
                &mut tx,
                crate::tasks::NewTask {
                    customer_id: l.row.customer_id,
                    kind,
                    owner: crate::tasks::AGENT_QUEUE.into(),
                    due_at: now + chrono::Duration::days(3),
                    reason,
                    dedupe_key: Some(format!("message:{}", l.row.message_id)),
                },
                "",
            )
            .await?;
            sent_ids.push(l.row.message_id);
            let mut m = l.row;
            m.state = state::SENT;
            m.sent_at = Some(handed_at);
            events.push((
                m.customer_id.to_string(),
                pb::MessageSent { message: Some(privacy::message_event(m.to_wire())), holdout: false },
            ));
        }
        // sent_at: when it was handed over, right after the hand-off check (REL-6).
        sqlx::query("UPDATE messages SET state = $2, sent_at = $3, lease_until = NULL, last_error = '' WHERE message_id = ANY($1)")
            .bind(&sent_ids)
            .bind(state::SENT)
            .bind(handed_at)
            .execute(&mut *tx)
            .await?;
        for (row, decision) in refused {
            undo_contact(&mut tx, &row).await?;
            sqlx::query(
                "UPDATE messages SET state = $2, rule = $3, detail = $4, decided_at = $5, lease_until = NULL, cost_minor = 0 \
                 WHERE message_id = $1",
            )
            .bind(row.message_id)
            .bind(state::SUPPRESSED)
            .bind(decision.rule)
            .bind(&decision.detail)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO decisions (customer_id, message_id, verdict, rule, detail, decided_at) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(row.customer_id)
            .bind(row.message_id)
            .bind(verdict::DROPPED)
            .bind(decision.rule)
            .bind(&decision.detail)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let mut m = row;
            m.state = state::SUPPRESSED;
            m.rule = decision.rule.to_string();
            m.detail = decision.detail;
            m.decided_at = Some(now);
            events.push((
                m.customer_id.to_string(),
                pb::MessageSent { message: Some(privacy::message_event(m.to_wire())), holdout: false },
            ));
        }
        // A retry goes back to the contact policy (OUT-5): by then it may be
        // quiet hours or another local day. The approval is undone (the
        // contact, the backoff streak, the spend) and the message is decided
        // again at its retry time, keeping its id as the idempotency key.
        for (row, at, error) in retry {
            undo_contact(&mut tx, &row).await?;
            sqlx::query(
                "UPDATE messages SET state = $2, due_at = $3, lease_until = NULL, last_error = $4, cost_minor = 0 WHERE message_id = $1",
            )
            .bind(row.message_id)
            .bind(state::QUEUED)
            .bind(at)
            .bind(error)
            .execute(&mut *tx)
            .await?;
        }
        for (id, error) in dead {
            tracing::warn!(message_id = %id, %error, "message dead-lettered");
            sqlx::query("UPDATE messages SET state = $2, lease_until = NULL, last_error = $3 WHERE message_id = $1")
                .bind(id)
                .bind(state::DEAD_LETTER)
                .bind(error)
                .execute(&mut *tx)
                .await?;
        }
        outbox::enqueue_many(&mut tx, SERVICE, "customer", "", &events).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Renews the lease of a batch every third of the lease while it is being
/// delivered, so a slow provider or a large batch never lets another replica
/// take the same messages; stops when dropped. If this replica dies, the
/// renewals stop with it and the lease runs out as before.
struct LeaseKeeper(tokio::task::JoinHandle<()>);

impl LeaseKeeper {
    fn start(pool: PgPool, ids: Vec<Uuid>, lease: Duration) -> Self {
        Self(tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                let renewed = sqlx::query(
                    "UPDATE messages SET lease_until = now() + $2 * interval '1 millisecond' \
                     WHERE message_id = ANY($1) AND state = $3",
                )
                .bind(&ids)
                .bind(lease.as_millis() as f64)
                .bind(state::APPROVED)
                .execute(&pool)
                .await;
                if let Err(e) = renewed {
                    tracing::warn!(error = %e, messages = ids.len(), "could not renew a delivery lease");
                }
            }
        }))
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What one delivery round settles in one transaction.
struct Settled {
    results: Vec<(MessageRow, Result<(), SendError>)>,
    personal: Vec<Leased>,
    refused: Vec<(MessageRow, policy::Decision)>,
    handed_at: DateTime<Utc>,
}

/// Takes back what the approval of a message counted: the contact (OUT-5
/// caps), the unanswered streak, the campaign's spend.
async fn undo_contact(tx: &mut sqlx::PgConnection, row: &MessageRow) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM contacts WHERE customer_id = $1 AND message_id = $2")
        .bind(row.customer_id)
        .bind(row.message_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE customers SET unanswered_streak = GREATEST(unanswered_streak - 1, 0) WHERE customer_id = $1")
        .bind(row.customer_id)
        .execute(&mut *tx)
        .await?;
    if let Some(campaign) = row.campaign_id {
        sqlx::query("UPDATE campaigns SET spent_minor = GREATEST(spent_minor - $2, 0) WHERE campaign_id = $1")
            .bind(campaign)
            .bind(row.cost_minor)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// OUT-6 template values of a customer: tier, discount, points, coupon value.
pub fn offer_values(tier: Tier, spend_minor: i64, locale: &str) -> BTreeMap<String, String> {
    let points = campaign::points(spend_minor);
    let coupon = campaign::coupon_value_minor(points);
    let tier_name = match (tier, locale) {
        (Tier::Diamond, "en") => "Diamond",
        (Tier::Gold, "en") => "Gold",
        (Tier::Silver, "en") => "Silver",
        (_, "en") => "Member",
        (Tier::Diamond, _) => "钻石",
        (Tier::Gold, _) => "金卡",
        (Tier::Silver, _) => "银卡",
        _ => "会员",
    };
    let mut v = BTreeMap::new();
    v.insert("tier".into(), tier_name.into());
    v.insert("discount".into(), format!("{}%", campaign::tier_discount(tier)));
    v.insert("points".into(), points.to_string());
    v.insert("coupon_value".into(), format!("{}.{:02} CNY", coupon / 100, coupon % 100));
    v.insert("name".into(), if locale == "en" { "Valued customer".into() } else { "尊敬的客户".into() });
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_an_hour() {
        let first = Duration::from_secs(5);
        assert_eq!(retry_delay(first, 1), Duration::from_secs(5));
        assert_eq!(retry_delay(first, 2), Duration::from_secs(10));
        assert_eq!(retry_delay(first, 4), Duration::from_secs(40));
        assert_eq!(retry_delay(first, 30), Duration::from_secs(3600));
    }

    #[test]
    fn webhook_signatures_are_hmac_sha256_over_time_and_body() {
        // Reference value computed with `printf '1700000000.{}' | openssl dgst -sha256 -hmac secret`.
        let sig = Webhook::signature(b"secret", 1_700_000_000, b"{}");
        assert_eq!(sig, "t=1700000000,v1=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163");
        assert_ne!(sig, Webhook::signature(b"other", 1_700_000_000, b"{}"));
    }

    #[test]
    fn offer_values_follow_the_tier() {
        let v = offer_values(Tier::Gold, 123_456, "zh-CN");
        assert_eq!(v["discount"], "15%");
        assert_eq!(v["points"], "1234");
        assert_eq!(v["coupon_value"], "12.34 CNY");
        assert_eq!(v["tier"], "金卡");
    }
}
