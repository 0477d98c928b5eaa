//! PostgreSQL and Redis connections, and migrations (SPEC 2).
//!
//! Each service owns one schema (`DATABASE_SCHEMA`, default its name); every
//! pooled connection has `search_path` set to it, so a service's SQL never
//! names, and cannot reach, another service's tables by accident. The kit's
//! own tables (outbox, inbox, idempotency) live in that schema too, tracked
//! in `_kit_migrations`; the service's migrations in `_sqlx_migrations`.

use std::str::FromStr;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sqlx::PgPool;
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::{ConfigError, KitConfig, is_identifier};

/// Opens the service's pool lazily: the service starts (and reports
/// NOT_SERVING) while PostgreSQL is unreachable, and recovers without restart.
pub fn pg_pool(config: &KitConfig) -> Result<PgPool, ConfigError> {
    let mut options = PgConnectOptions::from_str(&config.database_url)
        .map_err(|e| {
            ConfigError::new("DATABASE_URL", Some(&crate::config::redact_url(&config.database_url)), e.to_string())
        })?
        .application_name(&format!("crm-{}", config.service));
    let mut settings = vec![("search_path".to_string(), config.database_schema.clone())];
    if !config.database_statement_timeout.is_zero() {
        settings.push(("statement_timeout".to_string(), config.database_statement_timeout.as_millis().to_string()));
    }
    options = options.options(settings);
    Ok(PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        .min_connections(0)
        .acquire_timeout(config.database_acquire_timeout)
        .idle_timeout(Some(Duration::from_secs(300)))
        .connect_lazy_with(options))
}

/// Creates the schema if needed and applies the kit's and the service's
/// migrations. Safe to run from several replicas at once (sqlx takes an
/// advisory lock).
pub async fn migrate(pool: &PgPool, schema: &str, service: &Migrator) -> Result<(), MigrateError> {
    if !is_identifier(schema) {
        return Err(MigrateError::Execute(sqlx::Error::Configuration(format!("bad schema name {schema:?}").into())));
    }
    // The name was checked to be a plain identifier above, so quoting it is safe.
    let created =
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))).execute(pool).await;
    if let Err(e) = created {
        // Two replicas starting at once can both pass IF NOT EXISTS; the loser
        // gets a unique violation on pg_namespace although the schema is there.
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(pool)
            .await?;
        if !exists {
            return Err(e.into());
        }
    }
    let mut kit = sqlx::migrate!("./migrations");
    kit.dangerous_set_table_name("_kit_migrations");
    kit.run(pool).await?;
    service.run(pool).await
}

/// PRF-3 across services: the live customer an id stands for, following
/// merges (`merged_into`) in the service's `customers` table — profiles' own
/// records, or a read model that mirrors CustomerMerged. `None` if the id is
/// unknown. Chains longer than 32 merges are not followed further.
pub async fn live_customer(conn: &mut sqlx::PgConnection, id: uuid::Uuid) -> Result<Option<uuid::Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH RECURSIVE chain(id, next, depth) AS ( \
             SELECT customer_id, merged_into, 0 FROM customers WHERE customer_id = $1 \
             UNION ALL SELECT c.customer_id, c.merged_into, chain.depth + 1 FROM customers c JOIN chain ON c.customer_id = chain.next \
             WHERE chain.depth < 32) \
         SELECT id FROM chain WHERE next IS NULL LIMIT 1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// For read models of profiles' events: the live customer `id` stands for,
/// creating an empty `customers` row first for an id not seen yet (facts
/// may arrive before CustomerCreated).
///
/// The row returned stays locked (FOR SHARE) until the transaction ends, and
/// a read model's merge or unmerge locks both of its rows FOR UPDATE first
/// ([`lock_customers`]). So a fact applied by one consumer while another
/// applies a merge of its customer lands either wholly before the merge
/// (which then moves it to the survivor) or wholly after it (and follows the
/// merge here). Without the lock, a fact committed during the merge stayed
/// with the merged-away id. Chains longer than 32 merges are not followed
/// further. (One row at a time, not [`live_customer`]'s recursive query:
/// PostgreSQL cannot lock rows of a recursive CTE.)
pub async fn live_or_new_customer(conn: &mut sqlx::PgConnection, id: uuid::Uuid) -> Result<uuid::Uuid, sqlx::Error> {
    sqlx::query("INSERT INTO customers (customer_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    let mut live = id;
    for _ in 0..32 {
        let next: Option<uuid::Uuid> =
            sqlx::query_scalar("SELECT merged_into FROM customers WHERE customer_id = $1 FOR SHARE")
                .bind(live)
                .fetch_optional(&mut *conn)
                .await?
                .flatten();
        match next {
            Some(n) => live = n,
            None => break,
        }
    }
    Ok(live)
}

/// For read models of profiles' events: the `customers` rows of a merge or
/// unmerge, created if unseen and locked FOR UPDATE in id order until the
/// transaction ends (see [`live_or_new_customer`]).
pub async fn lock_customers(conn: &mut sqlx::PgConnection, ids: &[uuid::Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO customers (customer_id) SELECT DISTINCT unnest($1::uuid[]) ON CONFLICT DO NOTHING")
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    lock_customer_rows(conn, ids).await
}

/// Locks the rows of the service's `customers` table with these ids FOR
/// UPDATE until the transaction ends, in id order, so that two writers
/// locking overlapping sets wait for each other instead of deadlocking.
pub async fn lock_customer_rows(conn: &mut sqlx::PgConnection, ids: &[uuid::Uuid]) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT customer_id FROM customers WHERE customer_id = ANY($1) ORDER BY customer_id FOR UPDATE")
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// PRF-7 across services: applies a ConsentChanged's grants to the service's
/// own `consents` table (customer_id, channel, purpose, granted, expires_at,
/// updated_at), the mirror every consumer of consent keeps. The last grant for
/// a channel and purpose in the event wins; a grant older (by profiles'
/// `update_time`) than the one already copied is ignored: a dead consumer's
/// event claimed by another after newer events of the customer were applied
/// must not bring a withdrawn consent back (REL-6). A grant without a time
/// (an event from before the field was filled) is applied as it comes.
pub async fn mirror_consents(
    conn: &mut sqlx::PgConnection,
    customer: uuid::Uuid,
    grants: &[crm_proto::profiles::v1::ConsentGrant],
) -> Result<(), sqlx::Error> {
    let time = |t: Option<&prost_types::Timestamp>| {
        t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.clamp(0, 999_999_999) as u32))
    };
    let mut latest: std::collections::BTreeMap<(i16, i16), &crm_proto::profiles::v1::ConsentGrant> = Default::default();
    for g in grants {
        latest.insert((g.channel as i16, g.purpose as i16), g);
    }
    let (mut channels, mut purposes, mut granted, mut expires, mut updated) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((channel, purpose), g) in latest {
        channels.push(channel);
        purposes.push(purpose);
        granted.push(g.granted);
        expires.push(time(g.expire_time.as_ref()));
        updated.push(time(g.update_time.as_ref()));
    }
    sqlx::query(
        "INSERT INTO consents (customer_id, channel, purpose, granted, expires_at, updated_at) \
         SELECT $1, * FROM UNNEST($2::smallint[], $3::smallint[], $4::bool[], $5::timestamptz[], $6::timestamptz[]) \
         ON CONFLICT (customer_id, channel, purpose) DO UPDATE \
         SET granted = EXCLUDED.granted, expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at \
         WHERE consents.updated_at IS NULL OR EXCLUDED.updated_at IS NULL OR consents.updated_at <= EXCLUDED.updated_at",
    )
    .bind(customer)
    .bind(&channels)
    .bind(&purposes)
    .bind(&granted)
    .bind(&expires)
    .bind(&updated)
    .execute(conn)
    .await?;
    Ok(())
}

/// Whether PostgreSQL answers within `timeout`.
pub async fn pg_reachable(pool: &PgPool, timeout: Duration) -> bool {
    matches!(tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(pool)).await, Ok(Ok(_)))
}

/// REL-3: the streams Redis must keep every key. A policy that evicts any
/// key under memory pressure (`allkeys-*`) would drop whole streams: start-up
/// is refused, naming `REDIS_STREAMS_URL`. One that keeps nothing on disk
/// loses unconsumed events on a restart: a warning (the relay publishes
/// them again from the outbox when it notices). A Redis that cannot be asked
/// now (down, or CONFIG disabled as on some managed offerings) is not
/// checked: start-up goes on, as the service must start while Redis is down.
pub async fn check_streams_redis(url: &str) -> Result<(), ConfigError> {
    let shown = crate::config::redact_url(url);
    let Ok(client) = redis::Client::open(url) else { return Ok(()) };
    let asked = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let policy: Vec<String> =
            redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy").query_async(&mut conn).await?;
        let aof: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("appendonly").query_async(&mut conn).await?;
        let save: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("save").query_async(&mut conn).await?;
        Ok::<_, redis::RedisError>((policy.get(1).cloned(), aof.get(1).cloned(), save.get(1).cloned()))
    };
    match tokio::time::timeout(Duration::from_secs(2), asked).await {
        Ok(Ok((policy, aof, save))) => {
            if let Some(p) = policy.as_deref().filter(|p| p.starts_with("allkeys-")) {
                return Err(ConfigError::new(
                    "REDIS_STREAMS_URL",
                    Some(&shown),
                    format!(
                        "this Redis evicts any key under memory pressure (maxmemory-policy {p}), which would drop event streams; \
                         give the streams a Redis with noeviction (the cache may keep {p} on REDIS_CACHE_URL)"
                    ),
                ));
            }
            if aof.as_deref() == Some("no") && save.as_deref().is_some_and(|s| s.trim().is_empty()) {
                tracing::warn!(
                    redis = %shown,
                    "the streams Redis keeps nothing on disk: a restart loses the events not yet consumed \
                     (they are published again from the outbox); run it with appendonly yes in production"
                );
            }
        }
        Ok(Err(e)) => {
            tracing::info!(redis = %shown, error = %e, "could not check the streams Redis' eviction and persistence")
        }
        Err(_) => {
            tracing::info!(redis = %shown, "streams Redis not reachable at start; its eviction policy was not checked")
        }
    }
    Ok(())
}

/// A shared, self-reconnecting Redis connection (multiplexed). Commands time
/// out after the configured timeout so a slow or dead Redis never stalls a
/// request (REL-2); callers decide how to fall back.
#[derive(Clone)]
pub struct Redis {
    manager: ConnectionManager,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redis")
    }
}

impl Redis {
    /// Connects lazily to `url` with a per-command `timeout`.
    pub fn connect(url: &str, timeout: Duration) -> Result<Self, ConfigError> {
        let client = redis::Client::open(url)
            .map_err(|e| ConfigError::new("REDIS_URL", Some(&crate::config::redact_url(url)), e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(100))))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| ConfigError::new("REDIS_URL", Some(&crate::config::redact_url(url)), e.to_string()))?;
        Ok(Self { manager })
    }

    /// A handle for commands (cheap to clone).
    pub fn conn(&self) -> ConnectionManager {
        self.manager.clone()
    }
}
