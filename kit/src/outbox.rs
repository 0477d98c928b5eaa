//! The transactional outbox and its relay to Redis Streams (SPEC 2, REL-3,
//! REL-7).
//!
//! A service calls [`enqueue`] inside the transaction that changes its state,
//! so the event exists if and only if the change committed. The
//! [`OutboxRelay`] publishes unpublished rows, oldest first, to the stream
//! `crm.<service>.events` and records, in the same PostgreSQL transaction,
//! where each landed in the stream. Only one replica publishes at a time (a
//! transaction-scoped advisory lock), which keeps the commit order of each
//! aggregate; the others stand by and take over at once if it dies. If Redis
//! is unreachable the transaction rolls back and the events wait; they flow
//! when Redis returns. Delivery is at-least-once; consumers deduplicate by
//! event id. Nothing is lost:
//!
//! - the stream is trimmed only below the oldest entry a consumer group
//!   still needs (pending, or not yet delivered), never by length;
//! - published rows are kept `OUTBOX_RETENTION_HOURS`; when the stream is
//!   behind what the outbox recorded (Redis restarted without persistence,
//!   a failover to a replica that lagged), the relay publishes again what
//!   the stream lost: checked in Redis atomically with every append (a new
//!   entry would otherwise hide the loss) and every second while idle;
//! - after a round that failed once Redis may have appended its entries (a
//!   timeout, a failed commit), the next round looks for them at the tail of
//!   the stream instead of appending them twice.

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

/// Marks the events written since `since` for publishing again (the
/// `replay` subcommand): the relay of a running replica publishes them in
/// their order, and consumers, which apply each event once, skip those they
/// have. For an operator who knows a stream lost entries the relay could not
/// see, or a new read model that needs the past. Returns how many.
pub async fn replay(pool: &PgPool, since: chrono::DateTime<chrono::Utc>) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE kit_outbox SET published_at = NULL, stream_ms = NULL, stream_seq = NULL \
         WHERE created_at >= $1 AND published_at IS NOT NULL",
    )
    .bind(since)
    .execute(pool)
    .await?
    .rows_affected())
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

/// A position in a stream: the two numbers of an entry id `<ms>-<seq>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct StreamPosition {
    /// Milliseconds part.
    pub ms: i64,
    /// Sequence part.
    pub seq: i64,
}

impl StreamPosition {
    /// Parses `<ms>-<seq>`.
    pub fn parse(id: &str) -> Option<Self> {
        let (ms, seq) = id.split_once('-')?;
        Some(Self { ms: ms.parse().ok()?, seq: seq.parse().ok()? })
    }

    /// The id right after this one (for `XTRIM MINID`).
    pub fn next(self) -> Self {
        Self { ms: self.ms, seq: self.seq + 1 }
    }

    /// As an entry id.
    pub fn id(self) -> String {
        format!("{}-{}", self.ms, self.seq)
    }
}

/// Publishes a service's outbox to its stream.
#[derive(Debug, Clone)]
pub struct OutboxRelay {
    pool: PgPool,
    redis: Redis,
    stream: String,
    batch_size: i64,
    poll_interval: Duration,
    retention: Duration,
    metrics: Metrics,
    /// Set when a round failed after Redis may have appended its batch.
    suspect: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// The advisory lock of a schema's relay.
const RELAY_LOCK: &str = "SELECT pg_try_advisory_xact_lock(hashtext('kit_outbox:' || current_schema()))";

/// Appends a batch unless the stream is behind what the outbox recorded,
/// atomically in Redis: a stream that Redis restarted empty (or a replica
/// that lagged took over) gets new entry ids after the ones it lost, so a
/// check made after the next append could no longer see the loss.
/// KEYS[1] the stream; ARGV[1] the last position the outbox recorded
/// (`<ms>-<seq>`, empty if none); then event_id, event_type, envelope of each
/// entry. Returns the new entry ids, or `{"behind", <last id>}`.
const APPEND: &str = r"
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
if ARGV[1] ~= '' then
  local last = '0-0'
  if redis.call('EXISTS', KEYS[1]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[1])
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then last = info[i + 1] end
    end
  end
  if before(last, ARGV[1]) then return {'behind', last} end
end
local ids = {}
for i = 2, #ARGV, 3 do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'event_id', ARGV[i], 'event_type', ARGV[i + 1], 'envelope', ARGV[i + 2])
end
return ids
";

static APPEND_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| redis::Script::new(APPEND));

/// The last stream position the outbox recorded (the relay lock held).
async fn recorded_position(conn: &mut PgConnection) -> Result<Option<StreamPosition>, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT stream_ms, stream_seq FROM kit_outbox WHERE published_at IS NOT NULL AND stream_ms IS NOT NULL \
         ORDER BY stream_ms DESC, stream_seq DESC LIMIT 1",
    )
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(ms, seq)| StreamPosition { ms, seq }))
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
            retention: Duration::from_secs(7 * 24 * 3600),
            metrics,
            suspect: Default::default(),
        }
    }

    /// Applies the kit configuration (stream prefix, batch, timings).
    pub fn configured(mut self, config: &crate::config::KitConfig, service: &str) -> Self {
        self.stream = stream_name(&config.event_stream_prefix, service);
        self.batch_size = config.outbox_batch_size;
        self.poll_interval = config.outbox_poll_interval;
        self.retention = config.outbox_retention;
        self
    }

    /// The stream it publishes to.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Publishes at most one batch. Returns how many events were published;
    /// 0 when there was nothing to do or another replica holds the lock.
    pub async fn publish_once(&self) -> Result<usize, RelayError> {
        use std::sync::atomic::Ordering;
        let mut tx = self.pool.begin().await?;
        let locked: bool = sqlx::query_scalar(RELAY_LOCK).fetch_one(&mut *tx).await?;
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
            self.suspect.store(false, Ordering::SeqCst);
            return Ok(0);
        }
        let mut conn = self.redis.conn();
        // A failed round may have left its entries in the stream: find them instead of appending them again.
        let mut landed: std::collections::HashMap<Uuid, StreamPosition> = Default::default();
        if self.suspect.load(Ordering::SeqCst) {
            landed = self.tail(&mut conn, self.batch_size as usize).await?;
            landed.retain(|id, _| rows.iter().any(|r| r.1 == *id));
        }
        let fresh: Vec<&(i64, Uuid, String, Vec<u8>)> = rows.iter().filter(|r| !landed.contains_key(&r.1)).collect();
        let mut ids: Vec<String> = Vec::new();
        if !fresh.is_empty() {
            let recorded = recorded_position(&mut tx).await?;
            let mut call = APPEND_SCRIPT.key(&self.stream);
            call.arg(recorded.map(StreamPosition::id).unwrap_or_default());
            for (_, event_id, event_type, envelope) in &fresh {
                call.arg(event_id.to_string()).arg(event_type).arg(envelope.as_slice());
            }
            ids = match call.invoke_async(&mut conn).await {
                Ok(ids) => ids,
                Err(e) => {
                    // A timeout may come after Redis appended them.
                    self.suspect.store(true, Ordering::SeqCst);
                    return Err(e.into());
                }
            };
            if let [flag, last] = ids.as_slice()
                && flag == "behind"
            {
                let last = StreamPosition::parse(last).unwrap_or_default();
                self.refill(tx, last, recorded.unwrap_or_default()).await?;
                return Ok(0);
            }
        }
        let mut positions: Vec<(i64, StreamPosition)> =
            rows.iter().filter_map(|r| landed.get(&r.1).map(|p| (r.0, *p))).collect();
        for ((id, ..), entry) in fresh.iter().zip(&ids) {
            positions.push((*id, StreamPosition::parse(entry).unwrap_or_default()));
        }
        let (row_ids, ms, seq): (Vec<i64>, Vec<i64>, Vec<i64>) =
            positions.iter().fold((Vec::new(), Vec::new(), Vec::new()), |mut acc, (id, p)| {
                acc.0.push(*id);
                acc.1.push(p.ms);
                acc.2.push(p.seq);
                acc
            });
        let recorded = async {
            sqlx::query(
                "UPDATE kit_outbox o SET published_at = now(), stream_ms = t.ms, stream_seq = t.seq \
                 FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[]) AS t(id, ms, seq) WHERE o.id = t.id",
            )
            .bind(&row_ids)
            .bind(&ms)
            .bind(&seq)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        };
        if let Err(e) = recorded.await {
            self.suspect.store(true, Ordering::SeqCst);
            return Err(e.into());
        }
        self.suspect.store(false, Ordering::SeqCst);
        self.metrics.outbox_published.inc_by(fresh.len() as u64);
        if !landed.is_empty() {
            self.metrics.outbox_duplicates_avoided.inc_by(landed.len() as u64);
            tracing::info!(stream = %self.stream, events = landed.len(), "events a failed round had appended were recorded, not appended again");
        }
        Ok(rows.len())
    }

    /// The event ids among the last `n` entries of the stream.
    async fn tail(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        n: usize,
    ) -> Result<std::collections::HashMap<Uuid, StreamPosition>, RelayError> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(&self.stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(n.max(1))
            .query_async(conn)
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .filter_map(|e| {
                let id: String = e.get("event_id")?;
                Some((Uuid::parse_str(&id).ok()?, StreamPosition::parse(&e.id)?))
            })
            .collect())
    }

    /// The last id the stream generated; `None` if the stream does not exist.
    async fn last_generated(
        &self,
        conn: &mut redis::aio::ConnectionManager,
    ) -> Result<Option<StreamPosition>, RelayError> {
        let reply: Result<redis::Value, redis::RedisError> =
            redis::cmd("XINFO").arg("STREAM").arg(&self.stream).query_async(conn).await;
        let value = match reply {
            Ok(v) => v,
            Err(e) if e.to_string().contains("no such key") => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let fields: Vec<(String, redis::Value)> = match value {
            redis::Value::Map(pairs) => pairs
                .into_iter()
                .filter_map(|(k, v)| redis::from_redis_value::<String>(k).ok().map(|k| (k, v)))
                .collect(),
            redis::Value::Array(items) => items
                .chunks(2)
                .filter_map(|kv| match kv {
                    [k, v] => redis::from_redis_value::<String>(k.clone()).ok().map(|k| (k, v.clone())),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Ok(fields
            .into_iter()
            .find(|(k, _)| k == "last-generated-id")
            .and_then(|(_, v)| redis::from_redis_value::<String>(v).ok())
            .and_then(|id| StreamPosition::parse(&id)))
    }

    /// REL-3, REL-7: if the stream is behind the last position the outbox
    /// recorded, it lost entries (a Redis restart without persistence, a
    /// failover to a replica that lagged): the rows it lost are marked for
    /// publishing again, in their order. Consumers apply each event once, so
    /// publishing one again is safe. Returns how many rows were marked; None
    /// when another replica's relay holds the lock.
    pub async fn repair(&self) -> Result<Option<u64>, RelayError> {
        let mut tx = self.pool.begin().await?;
        let locked: bool = sqlx::query_scalar(RELAY_LOCK).fetch_one(&mut *tx).await?;
        if !locked {
            return Ok(None);
        }
        let Some(recorded) = recorded_position(&mut tx).await? else { return Ok(Some(0)) };
        let mut conn = self.redis.conn();
        let last = self.last_generated(&mut conn).await?.unwrap_or_default();
        if last >= recorded {
            return Ok(Some(0));
        }
        Ok(Some(self.refill(tx, last, recorded).await?))
    }

    /// Marks the rows published after `last` (where the stream now ends) for
    /// publishing again, in their order, and commits.
    async fn refill(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        last: StreamPosition,
        recorded: StreamPosition,
    ) -> Result<u64, RelayError> {
        let marked = sqlx::query(
            "UPDATE kit_outbox SET published_at = NULL, stream_ms = NULL, stream_seq = NULL \
             WHERE published_at IS NOT NULL AND (stream_ms, stream_seq) > ($1, $2)",
        )
        .bind(last.ms)
        .bind(last.seq)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        self.metrics.stream_losses.inc();
        self.metrics.outbox_republished.inc_by(marked);
        tracing::warn!(
            stream = %self.stream,
            stream_last = %last.id(),
            outbox_last = %recorded.id(),
            events = marked,
            "the stream lost entries (Redis restarted without persistence, or failed over to a replica that lagged): publishing them again from the outbox"
        );
        Ok(marked)
    }

    /// REL-7: trims the stream below the oldest entry a consumer group still
    /// needs (its oldest pending entry, else the one after the last it was
    /// delivered). Nothing is trimmed while no group reads the stream.
    /// Returns how many entries went.
    pub async fn trim(&self) -> Result<u64, RelayError> {
        let mut conn = self.redis.conn();
        let groups: redis::streams::StreamInfoGroupsReply =
            match redis::cmd("XINFO").arg("GROUPS").arg(&self.stream).query_async(&mut conn).await {
                Ok(g) => g,
                Err(e) if e.to_string().contains("no such key") => return Ok(0),
                Err(e) => return Err(e.into()),
            };
        let mut floor: Option<StreamPosition> = None;
        for group in &groups.groups {
            let needed = if group.pending > 0 {
                let pending: redis::streams::StreamPendingReply =
                    redis::cmd("XPENDING").arg(&self.stream).arg(&group.name).query_async(&mut conn).await?;
                match pending {
                    redis::streams::StreamPendingReply::Data(d) => StreamPosition::parse(&d.start_id),
                    // Acknowledged meanwhile: keep all, the next round sees more.
                    _ => None,
                }
            } else {
                StreamPosition::parse(&group.last_delivered_id).map(StreamPosition::next)
            };
            let Some(needed) = needed else { return Ok(0) };
            floor = Some(floor.map_or(needed, |f| f.min(needed)));
        }
        let Some(floor) = floor else { return Ok(0) };
        let trimmed: u64 =
            redis::cmd("XTRIM").arg(&self.stream).arg("MINID").arg(floor.id()).query_async(&mut conn).await?;
        self.metrics.stream_trimmed.inc_by(trimmed);
        Ok(trimmed)
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
    /// the lag gauges fresh, checks the stream for losses every second, trims
    /// it every ten and purges old rows every minute.
    pub async fn run(self, shutdown: ShutdownSignal) {
        let mut backoff = self.poll_interval;
        let long_ago = Instant::now() - Duration::from_secs(3600);
        let (mut last_purge, mut last_trim, mut last_second) = (long_ago, long_ago, long_ago);
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
            if last_second.elapsed() >= Duration::from_secs(1) {
                last_second = Instant::now();
                let _ = self.observe_lag().await;
                if let Err(e) = self.repair().await {
                    tracing::debug!(error = %e, "stream loss check failed");
                }
            }
            if last_trim.elapsed() >= Duration::from_secs(10) {
                last_trim = Instant::now();
                if let Err(e) = self.trim().await {
                    tracing::debug!(error = %e, "stream trim failed");
                }
            }
            if last_purge.elapsed() >= Duration::from_secs(60) {
                last_purge = Instant::now();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_positions_order_as_redis_does() {
        let p = |s| StreamPosition::parse(s).expect(s);
        assert!(p("10-0") > p("9-5"));
        assert!(p("10-1") > p("10-0"));
        assert_eq!(p("10-1").next().id(), "10-2");
        assert_eq!(StreamPosition::parse("nope"), None);
        assert_eq!(StreamPosition::default().id(), "0-0");
    }
}
