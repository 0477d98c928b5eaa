//! The transactional outbox and its relay to Redis Streams (SPEC 2, REL-3).
//!
//! A service calls [`enqueue`] inside the transaction that changes its state,
//! so the event exists if and only if the change committed. The
//! [`OutboxRelay`] publishes unpublished rows, oldest first, to the stream
//! `crm.<service>.events` and marks them published in the same PostgreSQL
//! transaction. Only one replica publishes at a time (a transaction-scoped
//! advisory lock), which keeps the commit order of each aggregate; the others
//! stand by and take over at once if it dies. If Redis is unreachable the
//! transaction rolls back and the events wait; they flow when Redis returns.
//! A crash between XADD and the commit publishes a batch twice: delivery is
//! at-least-once and consumers deduplicate by event id.

use std::time::{Duration, Instant};

use crm_proto::common::v1::EventEnvelope;
use prost::Message;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::db::Redis;
use crate::error::ApiError;
use crate::lifecycle::ShutdownSignal;
use crate::metrics::Metrics;
use crate::telemetry;

/// The stream a service publishes to: `<prefix>.<service>.events`
/// (`EVENT_STREAM_PREFIX`, default "crm").
pub fn stream_name(prefix: &str, service: &str) -> String {
    format!("{prefix}.{service}.events")
}

/// What identifies an event's subject.
#[derive(Debug, Clone, Copy)]
pub struct Aggregate<'a> {
    /// Kind, e.g. "customer".
    pub kind: &'a str,
    /// Id.
    pub id: &'a str,
}

/// The encoded envelope of one event (schema version 1).
fn encode_envelope<T: prost::Name + Message>(
    event_id: Uuid,
    source: &str,
    aggregate: Aggregate<'_>,
    request_id: &str,
    payload: &T,
    occurred_at: prost_types::Timestamp,
    trace: crm_proto::common::v1::TraceContext,
) -> Result<Vec<u8>, ApiError> {
    let any = prost_types::Any::from_msg(payload).map_err(|e| ApiError::internal(format!("cannot pack event: {e}")))?;
    let envelope = EventEnvelope {
        event_id: event_id.to_string(),
        event_type: T::full_name(),
        source: source.to_string(),
        aggregate_type: aggregate.kind.to_string(),
        aggregate_id: aggregate.id.to_string(),
        occurred_at: Some(occurred_at),
        trace_context: Some(trace),
        request_id: request_id.to_string(),
        payload: Some(any),
        schema_version: 1,
    };
    Ok(envelope.encode_to_vec())
}

/// An event ready for the outbox, for callers that write it inside a
/// statement of their own (one round trip for a change and its events):
/// bind the four columns of [`Staged::columns`] as arrays and
/// `INSERT INTO kit_outbox (event_id, event_type, aggregate_id, envelope)
/// SELECT * FROM UNNEST($a::uuid[], $b::text[], $c::text[], $d::bytea[])`.
#[derive(Debug, Clone)]
pub struct Staged {
    /// Event id.
    pub event_id: Uuid,
    /// Fully-qualified payload type.
    pub event_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Encoded envelope.
    pub envelope: Vec<u8>,
}

impl Staged {
    /// An event of `source` about `aggregate`, carrying the current trace context.
    pub fn new<T: prost::Name + Message>(
        source: &str,
        aggregate: Aggregate<'_>,
        request_id: &str,
        payload: &T,
    ) -> Result<Staged, ApiError> {
        let event_id = Uuid::now_v7();
        let now = prost_types::Timestamp::from(std::time::SystemTime::now());
        let envelope =
            encode_envelope(event_id, source, aggregate, request_id, payload, now, telemetry::event_trace_context())?;
        Ok(Staged { event_id, event_type: T::full_name(), aggregate_id: aggregate.id.to_string(), envelope })
    }

    /// The columns of several staged events, as arrays to bind.
    pub fn columns(events: &[Staged]) -> (Vec<Uuid>, Vec<String>, Vec<String>, Vec<Vec<u8>>) {
        (
            events.iter().map(|e| e.event_id).collect(),
            events.iter().map(|e| e.event_type.clone()).collect(),
            events.iter().map(|e| e.aggregate_id.clone()).collect(),
            events.iter().map(|e| e.envelope.clone()).collect(),
        )
    }
}

/// Writes `payload` as an event of `source` into the outbox, inside the
/// caller's transaction. The envelope carries the current trace context.
pub async fn enqueue<T: prost::Name + Message>(
    conn: &mut PgConnection,
    source: &str,
    aggregate: Aggregate<'_>,
    request_id: &str,
    payload: &T,
) -> Result<Uuid, ApiError> {
    let staged = Staged::new(source, aggregate, request_id, payload)?;
    sqlx::query("INSERT INTO kit_outbox (event_id, event_type, aggregate_id, envelope) VALUES ($1, $2, $3, $4)")
        .bind(staged.event_id)
        .bind(&staged.event_type)
        .bind(&staged.aggregate_id)
        .bind(&staged.envelope)
        .execute(conn)
        .await?;
    Ok(staged.event_id)
}

/// PRF-8 across services: records that `service` has erased `customer_id`
/// (event ErasureConfirmed, which profiles collects), in the caller's transaction.
pub async fn confirm_erasure(
    conn: &mut PgConnection,
    service: &str,
    customer_id: &str,
    request_id: &str,
) -> Result<Uuid, ApiError> {
    let confirmed = crm_proto::common::v1::ErasureConfirmed {
        customer_id: customer_id.to_string(),
        service: service.to_string(),
        erase_time: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
    };
    enqueue(conn, service, Aggregate { kind: "customer", id: customer_id }, request_id, &confirmed).await
}

/// Writes many events of one type in one statement (bulk paths), inside the
/// caller's transaction; they share the current trace context.
pub async fn enqueue_many<T: prost::Name + Message>(
    conn: &mut PgConnection,
    source: &str,
    aggregate_kind: &str,
    request_id: &str,
    events: &[(String, T)],
) -> Result<(), ApiError> {
    if events.is_empty() {
        return Ok(());
    }
    let trace = telemetry::event_trace_context();
    let now = prost_types::Timestamp::from(std::time::SystemTime::now());
    let mut ids = Vec::with_capacity(events.len());
    let mut aggregates = Vec::with_capacity(events.len());
    let mut envelopes = Vec::with_capacity(events.len());
    for (aggregate_id, payload) in events {
        let event_id = Uuid::now_v7();
        let aggregate = Aggregate { kind: aggregate_kind, id: aggregate_id };
        envelopes.push(encode_envelope(event_id, source, aggregate, request_id, payload, now, trace.clone())?);
        ids.push(event_id);
        aggregates.push(aggregate_id.as_str());
    }
    sqlx::query(
        "INSERT INTO kit_outbox (event_id, event_type, aggregate_id, envelope) \
         SELECT id, $2, agg, env FROM UNNEST($1::uuid[], $3::text[], $4::bytea[]) AS t(id, agg, env)",
    )
    .bind(&ids)
    .bind(T::full_name())
    .bind(&aggregates)
    .bind(&envelopes)
    .execute(conn)
    .await?;
    Ok(())
}

/// Why a relay round failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// PostgreSQL.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Redis.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Publishes a service's outbox to its stream.
#[derive(Debug, Clone)]
pub struct OutboxRelay {
    pool: PgPool,
    redis: Redis,
    stream: String,
    batch_size: i64,
    poll_interval: Duration,
    maxlen: u64,
    retention: Duration,
    metrics: Metrics,
}

impl OutboxRelay {
    /// A relay of `service`'s outbox to `crm.<service>.events`.
    pub fn new(pool: PgPool, redis: Redis, service: &str, metrics: Metrics) -> Self {
        Self {
            pool,
            redis,
            stream: stream_name("crm", service),
            batch_size: 500,
            poll_interval: Duration::from_millis(100),
            maxlen: 1_000_000,
            retention: Duration::from_secs(7 * 24 * 3600),
            metrics,
        }
    }

    /// Applies the kit configuration (stream prefix, batch, timings).
    pub fn configured(mut self, config: &crate::config::KitConfig, service: &str) -> Self {
        self.stream = stream_name(&config.event_stream_prefix, service);
        self.batch_size = config.outbox_batch_size;
        self.poll_interval = config.outbox_poll_interval;
        self.maxlen = config.event_stream_maxlen;
        self.retention = config.outbox_retention;
        self
    }

    /// Publishes at most one batch. Returns how many events were published;
    /// 0 when there was nothing to do or another replica holds the lock.
    pub async fn publish_once(&self) -> Result<usize, RelayError> {
        let mut tx = self.pool.begin().await?;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext('kit_outbox:' || current_schema()))")
                .fetch_one(&mut *tx)
                .await?;
        if !locked {
            return Ok(0);
        }
        let rows: Vec<(i64, Uuid, String, Vec<u8>)> = sqlx::query_as(
            "SELECT id, event_id, event_type, envelope FROM kit_outbox WHERE published_at IS NULL ORDER BY id LIMIT $1",
        )
        .bind(self.batch_size)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for (_, event_id, event_type, envelope) in &rows {
            pipe.cmd("XADD")
                .arg(&self.stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.maxlen)
                .arg("*")
                .arg("event_id")
                .arg(event_id.to_string())
                .arg("event_type")
                .arg(event_type)
                .arg("envelope")
                .arg(envelope.as_slice())
                .ignore();
        }
        let mut conn = self.redis.conn();
        pipe.query_async::<()>(&mut conn).await?;
        let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
        sqlx::query("UPDATE kit_outbox SET published_at = now() WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.metrics.outbox_published.inc_by(rows.len() as u64);
        Ok(rows.len())
    }

    /// Refreshes the outbox lag gauges.
    pub async fn observe_lag(&self) -> Result<(), sqlx::Error> {
        let (pending, age): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8 FROM kit_outbox WHERE published_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        self.metrics.outbox_pending.set(pending);
        self.metrics.outbox_lag_seconds.set(age.unwrap_or(0.0) as i64);
        Ok(())
    }

    /// Deletes published rows past retention.
    pub async fn purge(&self) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query(
            "DELETE FROM kit_outbox WHERE id IN (SELECT id FROM kit_outbox WHERE published_at < now() - make_interval(secs => $1) LIMIT 10000)",
        )
        .bind(self.retention.as_secs() as f64)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Runs until shutdown: publishes, backs off on errors (up to 5 s), keeps
    /// the lag gauges fresh and purges old rows.
    pub async fn run(self, shutdown: ShutdownSignal) {
        let mut backoff = self.poll_interval;
        let mut last_housekeeping = Instant::now() - Duration::from_secs(3600);
        let mut last_lag = Instant::now() - Duration::from_secs(60);
        loop {
            if shutdown.is_triggered() {
                break;
            }
            let wait = match self.publish_once().await {
                Ok(n) if n as i64 >= self.batch_size => Duration::ZERO,
                Ok(_) => {
                    backoff = self.poll_interval;
                    self.poll_interval
                }
                Err(e) => {
                    self.metrics.outbox_errors.inc();
                    tracing::warn!(error = %e, stream = %self.stream, "outbox relay round failed; events wait in the outbox");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    backoff
                }
            };
            if last_lag.elapsed() >= Duration::from_secs(1) {
                last_lag = Instant::now();
                let _ = self.observe_lag().await;
            }
            if last_housekeeping.elapsed() >= Duration::from_secs(60) {
                last_housekeeping = Instant::now();
                if let Err(e) = self.purge().await {
                    tracing::debug!(error = %e, "outbox purge failed");
                }
            }
            if !wait.is_zero() && !shutdown.sleep(wait).await {
                break;
            }
        }
        // Publish what is left so a clean shutdown leaves nothing behind.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.publish_once()).await;
    }
}
