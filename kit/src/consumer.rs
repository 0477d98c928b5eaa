//! Idempotent event consumption from Redis Streams (SPEC 2, REL-3).
//!
//! A [`Consumer`] reads one or more services' streams in a consumer group
//! named after the consuming service. It applies each batch in one
//! PostgreSQL transaction: per event, under a savepoint, it records the event
//! id in `kit_inbox` (a duplicate is skipped) and runs the [`EventHandler`];
//! then it commits and acknowledges the batch's stream entries. So effects happen exactly once even though
//! delivery is at-least-once; progress survives restarts (the inbox in
//! PostgreSQL, pending entries in Redis):
//!
//! - after a crash, a consumer with the same name re-reads its own pending
//!   entries first;
//! - entries pending at a consumer that never came back are claimed by
//!   another after `CONSUMER_CLAIM_IDLE_MS`;
//! - a transient failure stops the round (keeping order) and retries with
//!   backoff; a permanent one moves the event to `kit_dead_events`;
//! - a pending entry that is gone from the stream (deleted by hand: the
//!   relay trims only what every group is past) is a dead letter too,
//!   counted as `lost`, never acknowledged silently.
//!
//! Each event is handled in a span whose parent is the trace context the
//! event carries, so a trace continues across the bus.

use std::future::Future;
use std::time::Duration;

use crm_proto::common::v1::EventEnvelope;
use prost::Message;
use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use sqlx::{PgConnection, PgPool};
use tracing::Instrument;
use uuid::Uuid;

use crate::lifecycle::ShutdownSignal;
use crate::metrics::Metrics;
use crate::telemetry;

/// An event as a handler sees it.
#[derive(Debug, Clone)]
pub struct Event {
    /// The envelope.
    pub envelope: EventEnvelope,
    /// Stream it came from.
    pub stream: String,
    /// Entry id in the stream.
    pub stream_id: String,
}

impl Event {
    /// The payload as `T` if the event is of that type.
    pub fn payload<T: prost::Name + Message + Default>(&self) -> Result<Option<T>, HandlerError> {
        if self.envelope.event_type != T::full_name() {
            return Ok(None);
        }
        let any =
            self.envelope.payload.as_ref().ok_or_else(|| HandlerError::Permanent("event has no payload".into()))?;
        any.to_msg::<T>().map(Some).map_err(|e| HandlerError::Permanent(format!("undecodable {}: {e}", T::full_name())))
    }
}

/// An id field of an event's payload; a malformed one is a permanent failure.
pub fn payload_id(s: &str) -> Result<Uuid, HandlerError> {
    Uuid::parse_str(s).map_err(|_| HandlerError::Permanent(format!("not an id: {s:?}")))
}

/// PRF-8: every id a CustomerErased covers (the customer and the ids merged into it).
pub fn erased_ids(e: &crm_proto::profiles::v1::CustomerErased) -> Result<Vec<Uuid>, HandlerError> {
    std::iter::once(&e.customer_id).chain(&e.alias_ids).map(|s| payload_id(s)).collect()
}

/// PRF-8: tells profiles this service has erased `customer_id` (ErasureConfirmed
/// through the outbox, in the handler's transaction); failing to write it is transient.
pub async fn confirm_erasure(
    tx: &mut PgConnection,
    service: &str,
    customer_id: &str,
    request_id: &str,
) -> Result<(), HandlerError> {
    crate::outbox::confirm_erasure(tx, service, customer_id, request_id)
        .await
        .map(drop)
        .map_err(|e| HandlerError::Transient(e.to_string()))
}

/// A payload timestamp as UTC, if set and valid.
pub fn payload_time(t: Option<&prost_types::Timestamp>) -> Option<chrono::DateTime<chrono::Utc>> {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.clamp(0, 999_999_999) as u32))
}

/// How a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying (database or dependency unavailable).
    #[error("transient: {0}")]
    Transient(String),
    /// Will never succeed (bad payload, violated invariant): dead-lettered.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            // Data exceptions (22xxx) and integrity violations (23xxx) will not heal by retrying.
            sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("22") || c.starts_with("23")) => {
                HandlerError::Permanent(e.to_string())
            }
            _ => HandlerError::Transient(e.to_string()),
        }
    }
}

/// Applies events to a service's own tables.
pub trait EventHandler: Send + Sync + 'static {
    /// Applies `event` inside `tx`; the inbox row is in the same transaction.
    /// Unknown event types should be ignored (return `Ok`).
    fn handle(&self, tx: &mut PgConnection, event: &Event) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Whether [`EventHandler::handle_batch`] applies whole batches
    /// (set-based handlers: one statement per kind of event, not per event).
    fn set_based(&self) -> bool {
        false
    }

    /// Applies every event of a batch (already deduplicated by the inbox, in
    /// stream order) inside `tx`. A permanent failure makes the consumer
    /// apply that batch again one event at a time, so only the bad event is
    /// dead-lettered. Only called when [`EventHandler::set_based`].
    fn handle_batch(
        &self,
        _tx: &mut PgConnection,
        _events: &[Event],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async { Err(HandlerError::Permanent("this handler is not set-based".into())) }
    }
}

/// Why a consumer round failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// Redis unreachable or refused a command.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// PostgreSQL unreachable.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A handler failed transiently; the event stays pending.
    #[error("handler: {0}")]
    Handler(String),
}

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Group name: the consuming service, e.g. "segmentation".
    pub group: String,
    /// This replica's name in the group.
    pub name: String,
    /// Streams to read, e.g. ["crm.profiles.events"].
    pub streams: Vec<String>,
    /// Entries per read.
    pub batch_size: usize,
    /// Block time waiting for new entries.
    pub block: Duration,
    /// Idle time after which another consumer's pending entries are claimed.
    pub claim_idle: Duration,
}

impl ConsumerSettings {
    /// Settings from the kit configuration.
    pub fn from_config(config: &crate::config::KitConfig, streams: Vec<String>) -> Self {
        Self {
            group: config.service.clone(),
            name: config.consumer_name.clone(),
            streams,
            batch_size: config.consumer_batch_size,
            block: config.consumer_block,
            claim_idle: config.consumer_claim_idle,
        }
    }
}

/// Consumes streams into a handler.
pub struct Consumer<H> {
    pool: PgPool,
    redis: ConnectionManager,
    settings: ConsumerSettings,
    handler: H,
    metrics: Metrics,
    groups_ready: bool,
}

impl<H: EventHandler> Consumer<H> {
    /// Creates a consumer; it uses its own Redis connection because its reads block.
    pub fn new(
        pool: PgPool,
        redis_url: &str,
        settings: ConsumerSettings,
        handler: H,
        metrics: Metrics,
    ) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(redis_url)?;
        let cfg = ConnectionManagerConfig::new()
            .set_response_timeout(Some(settings.block + Duration::from_secs(2)))
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1);
        let redis = ConnectionManager::new_lazy_with_config(client, cfg)?;
        Ok(Self { pool, redis, settings, handler, metrics, groups_ready: false })
    }

    fn labels(&self, outcome: &str) -> Vec<(&'static str, String)> {
        vec![("consumer", self.settings.group.clone()), ("outcome", outcome.to_string())]
    }

    async fn ensure_groups(&mut self) -> Result<(), redis::RedisError> {
        if self.groups_ready {
            return Ok(());
        }
        for stream in &self.settings.streams {
            // "0": a new group starts from the beginning, so a new read model
            // is built from every event still in the stream.
            let created: Result<(), _> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(&self.settings.group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut self.redis)
                .await;
            if let Err(e) = created
                && e.code() != Some("BUSYGROUP")
            {
                return Err(e);
            }
        }
        self.groups_ready = true;
        Ok(())
    }

    async fn read(
        &mut self,
        start: &str,
        block: Option<Duration>,
    ) -> Result<Vec<(String, StreamId)>, redis::RedisError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(&self.settings.group).arg(&self.settings.name).arg("COUNT").arg(self.settings.batch_size);
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis() as u64);
        }
        cmd.arg("STREAMS");
        for s in &self.settings.streams {
            cmd.arg(s);
        }
        for _ in &self.settings.streams {
            cmd.arg(start);
        }
        let reply: Option<StreamReadReply> = cmd.query_async(&mut self.redis).await?;
        Ok(reply
            .map(|r| {
                r.keys
                    .into_iter()
                    .flat_map(|k| {
                        let key = k.key;
                        k.ids.into_iter().map(move |id| (key.clone(), id))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn claim_stale(&mut self) -> Result<Vec<(String, StreamId)>, redis::RedisError> {
        let mut out = Vec::new();
        for stream in self.settings.streams.clone() {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&stream)
                .arg(&self.settings.group)
                .arg(&self.settings.name)
                .arg(self.settings.claim_idle.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(self.settings.batch_size)
                .query_async(&mut self.redis)
                .await?;
            out.extend(reply.claimed.into_iter().map(|id| (stream.clone(), id)));
        }
        Ok(out)
    }

    /// One round: own pending entries, else stale ones of others, else new
    /// ones (blocking up to `block`). Returns how many entries were settled.
    pub async fn poll_once(&mut self) -> Result<usize, ConsumerError> {
        self.ensure_groups().await?;
        let mut entries = self.read("0", None).await?;
        if entries.is_empty() {
            entries = self.claim_stale().await?;
        }
        if entries.is_empty() {
            entries = self.read(">", Some(self.settings.block)).await?;
        }
        self.settle_batch(entries).await
    }

    /// Applies a batch in one PostgreSQL transaction, each event under its own
    /// savepoint: a permanently failing event is dead-lettered without losing
    /// the others; a transient failure commits what was applied before it and
    /// leaves the rest pending (order kept). Then one XACK per stream.
    async fn settle_batch(&mut self, entries: Vec<(String, StreamId)>) -> Result<usize, ConsumerError> {
        use sqlx::Connection;
        if entries.is_empty() {
            return Ok(0);
        }
        if self.handler.set_based()
            && let Some(settled) = self.settle_set_based(&entries).await?
        {
            return Ok(settled);
        }
        let mut tx = self.pool.begin().await?;
        let mut acks: Vec<(String, String)> = Vec::new();
        let mut counts: Vec<&'static str> = Vec::new();
        let mut failure: Option<ConsumerError> = None;
        for (stream, entry) in entries {
            if entry.map.is_empty() {
                // REL-7: gone from the stream before it was applied (trimmed or
                // deleted by hand): a dead letter to look into, never a silent ack.
                tracing::error!(stream = %stream, entry = %entry.id, group = %self.settings.group,
                    "an event was removed from the stream before this consumer applied it");
                let why = "lost: removed from the stream before it was applied; replay the producer's outbox";
                self.dead_letter(&mut tx, &stream, &entry.id, None, &[], why).await?;
                counts.push("lost");
                acks.push((stream, entry.id));
                continue;
            }
            let raw = match entry.map.get("envelope") {
                Some(Value::BulkString(b)) => b.clone(),
                _ => Vec::new(),
            };
            let decoded =
                EventEnvelope::decode(raw.as_slice()).map_err(|e| format!("undecodable envelope: {e}")).and_then(
                    |env| Uuid::parse_str(&env.event_id).map(|id| (env, id)).map_err(|e| format!("bad event id: {e}")),
                );
            let (envelope, event_id) = match decoded {
                Ok(v) => v,
                Err(why) => {
                    self.dead_letter(&mut tx, &stream, &entry.id, None, &raw, &why).await?;
                    counts.push("dead_letter");
                    acks.push((stream, entry.id));
                    continue;
                }
            };
            let event = Event { envelope, stream: stream.clone(), stream_id: entry.id.clone() };
            let span = tracing::info_span!(
                "event.consume",
                otel.name = %format!("consume {}", event.envelope.event_type),
                otel.kind = "consumer",
                messaging.system = "redis_streams",
                messaging.destination.name = %stream,
                messaging.message.id = %event.envelope.event_id,
                messaging.consumer.group.name = %self.settings.group,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
            );
            telemetry::adopt_parent(&span, telemetry::context_from_event(event.envelope.trace_context.as_ref()));
            let mut savepoint = tx.begin().await?;
            let fresh =
                sqlx::query("INSERT INTO kit_inbox (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                    .bind(&self.settings.group)
                    .bind(event_id)
                    .execute(&mut *savepoint)
                    .await?
                    .rows_affected()
                    == 1;
            if !fresh {
                savepoint.commit().await?;
                counts.push("duplicate");
                acks.push((stream, entry.id));
                continue;
            }
            match self.handler.handle(&mut savepoint, &event).instrument(span.clone()).await {
                Ok(()) => {
                    savepoint.commit().await?;
                    counts.push("applied");
                    acks.push((stream, entry.id));
                }
                Err(HandlerError::Permanent(why)) => {
                    savepoint.rollback().await?;
                    let _enter = span.enter();
                    tracing::error!(event_id = %event_id, event_type = %event.envelope.event_type, error = %why, "event dead-lettered");
                    drop(_enter);
                    self.dead_letter(&mut tx, &stream, &entry.id, Some(&event), &raw, &why).await?;
                    counts.push("dead_letter");
                    acks.push((stream, entry.id));
                }
                Err(HandlerError::Transient(why)) => {
                    savepoint.rollback().await?;
                    failure = Some(ConsumerError::Handler(why));
                    break;
                }
            }
        }
        tx.commit().await?;
        for kind in &counts {
            self.metrics.events_consumed.get_or_create(&self.labels(kind)).inc();
        }
        let settled = acks.len();
        let mut by_stream: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
        for (stream, id) in acks {
            by_stream.entry(stream).or_default().push(id);
        }
        for (stream, ids) in by_stream {
            redis::cmd("XACK")
                .arg(&stream)
                .arg(&self.settings.group)
                .arg(&ids)
                .query_async::<()>(&mut self.redis)
                .await?;
        }
        match failure {
            Some(e) => {
                self.metrics.consumer_errors.get_or_create(&vec![("consumer", self.settings.group.clone())]).inc();
                Err(e)
            }
            None => Ok(settled),
        }
    }

    /// The set-based path: one inbox statement for the batch, the handler's
    /// `handle_batch`, one commit. Returns None when the batch must be
    /// applied one event at a time instead (an undecodable entry, or a
    /// permanent failure of the handler).
    async fn settle_set_based(&mut self, entries: &[(String, StreamId)]) -> Result<Option<usize>, ConsumerError> {
        let mut events = Vec::with_capacity(entries.len());
        for (stream, entry) in entries {
            // An entry gone from the stream is dead-lettered one at a time.
            let Some(Value::BulkString(raw)) = entry.map.get("envelope") else { return Ok(None) };
            let Ok(envelope) = EventEnvelope::decode(raw.as_slice()) else { return Ok(None) };
            let Ok(id) = Uuid::parse_str(&envelope.event_id) else { return Ok(None) };
            events.push((id, Event { envelope, stream: stream.clone(), stream_id: entry.id.clone() }));
        }
        let mut tx = self.pool.begin().await?;
        let ids: Vec<Uuid> = events.iter().map(|(id, _)| *id).collect();
        let fresh: std::collections::HashSet<Uuid> = sqlx::query_scalar(
            "INSERT INTO kit_inbox (consumer, event_id) SELECT $1, id FROM UNNEST($2::uuid[]) AS t(id) \
             ON CONFLICT DO NOTHING RETURNING event_id",
        )
        .bind(&self.settings.group)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let mut batch = Vec::with_capacity(fresh.len());
        let mut seen = std::collections::HashSet::new();
        for (id, event) in events {
            // A batch may hold one event twice (re-read and claimed); apply it once.
            if fresh.contains(&id) && seen.insert(id) {
                // Each event continues its own trace in the consumer, even when applied in a batch.
                let span = tracing::info_span!(
                    "event.consume",
                    otel.name = %format!("consume {}", event.envelope.event_type),
                    otel.kind = "consumer",
                    messaging.system = "redis_streams",
                    messaging.destination.name = %event.stream,
                    messaging.message.id = %event.envelope.event_id,
                    messaging.consumer.group.name = %self.settings.group,
                    messaging.batch.message_count = fresh.len(),
                    trace_id = tracing::field::Empty,
                    span_id = tracing::field::Empty,
                );
                telemetry::adopt_parent(&span, telemetry::context_from_event(event.envelope.trace_context.as_ref()));
                drop(span);
                batch.push(event);
            }
        }
        let applied = batch.len();
        let span = tracing::info_span!("event.consume_batch", messaging.consumer.group.name = %self.settings.group, events = applied);
        match self.handler.handle_batch(&mut tx, &batch).instrument(span).await {
            Ok(()) => {}
            Err(HandlerError::Transient(why)) => {
                tx.rollback().await?;
                self.metrics.consumer_errors.get_or_create(&vec![("consumer", self.settings.group.clone())]).inc();
                return Err(ConsumerError::Handler(why));
            }
            Err(HandlerError::Permanent(why)) => {
                tx.rollback().await?;
                tracing::warn!(group = %self.settings.group, error = %why, "set-based batch failed; applying it one event at a time");
                return Ok(None);
            }
        }
        tx.commit().await?;
        self.metrics.events_consumed.get_or_create(&self.labels("applied")).inc_by(applied as u64);
        self.metrics.events_consumed.get_or_create(&self.labels("duplicate")).inc_by((entries.len() - applied) as u64);
        let mut by_stream: std::collections::BTreeMap<&str, Vec<&str>> = std::collections::BTreeMap::new();
        for (stream, entry) in entries {
            by_stream.entry(stream.as_str()).or_default().push(entry.id.as_str());
        }
        for (stream, ids) in by_stream {
            redis::cmd("XACK")
                .arg(stream)
                .arg(&self.settings.group)
                .arg(&ids)
                .query_async::<()>(&mut self.redis)
                .await?;
        }
        Ok(Some(entries.len()))
    }

    async fn dead_letter(
        &self,
        tx: &mut sqlx::PgConnection,
        stream: &str,
        stream_id: &str,
        event: Option<&Event>,
        raw: &[u8],
        why: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO kit_dead_events (consumer, stream, stream_id, event_id, event_type, envelope, error) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(&self.settings.group)
        .bind(stream)
        .bind(stream_id)
        .bind(event.map(|e| e.envelope.event_id.clone()).unwrap_or_default())
        .bind(event.map(|e| e.envelope.event_type.clone()).unwrap_or_default())
        .bind(raw)
        .bind(why)
        .execute(&mut *tx)
        .await?;
        if let Some(id) = event.and_then(|e| Uuid::parse_str(&e.envelope.event_id).ok()) {
            sqlx::query("INSERT INTO kit_inbox (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(&self.settings.group)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }

    /// Runs until shutdown, backing off (up to 5 s) while Redis, PostgreSQL
    /// or a handler fails.
    pub async fn run(mut self, shutdown: ShutdownSignal) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_triggered() {
            let round = tokio::select! {
                r = self.poll_once() => r,
                _ = shutdown.clone().wait() => break,
            };
            match round {
                Ok(_) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, group = %self.settings.group, "consumer round failed; retrying");
                    if e.to_string().contains("NOGROUP") {
                        self.groups_ready = false;
                    }
                    if !shutdown.sleep(backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
