//! PRF-9: the Redis hot-profile cache (cache-aside).
//!
//! Correctness: "a reader never sees a profile older than a write that
//! completed before its read began". A write commits to PostgreSQL, then
//! (before answering) raises the key's *fence* to the new version and
//! deletes the cached copy, atomically in one script. A reader that missed
//! fills the cache only if the version it read is not below the fence. So a
//! slow reader holding an old version can never put it back after a write
//! finished; and a fill that slipped in before the fence moved is deleted by
//! that same script.
//!
//! If an invalidation cannot reach Redis, the id is remembered and this
//! replica bypasses the cache until the invalidation succeeds (retried in
//! the background); entries also expire after `PROFILE_CACHE_TTL_SECONDS`.
//! Concurrent misses of one id in a replica share a single database load
//! (stampede protection). Redis errors or timeouts never fail a read: the
//! caller falls back to PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crm_kit::db::Redis;
use crm_kit::metrics::Metrics;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use uuid::Uuid;

const FILL: &str = r"
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) >= fence then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0";

const INVALIDATE: &str = r"
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) > fence then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
redis.call('DEL', KEYS[1])
return 1";

/// The cache of encoded customer records, keyed by customer id.
#[derive(Clone)]
pub struct ProfileCache {
    redis: Option<Redis>,
    ttl: Duration,
    lookups: Family<Vec<(&'static str, String)>, Counter>,
    loads: Counter,
    inflight: Arc<Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>>,
    unflushed: Arc<Mutex<HashSet<(Uuid, i64)>>>,
    fill: redis::Script,
    invalidate: redis::Script,
}

/// What a cache lookup found.
pub enum Lookup {
    /// The encoded record.
    Hit(Vec<u8>),
    /// Not cached (or cache unusable right now).
    Miss,
}

fn data_key(id: Uuid) -> String {
    format!("crm:profiles:customer:{id}")
}

fn fence_key(id: Uuid) -> String {
    format!("crm:profiles:fence:{id}")
}

impl ProfileCache {
    /// A cache over `redis` (None disables caching) with entry lifetime `ttl`.
    pub fn new(redis: Option<Redis>, ttl: Duration, metrics: &Metrics) -> Self {
        let lookups = Family::default();
        metrics.register(
            "profile_cache_lookups",
            "Hot-profile cache lookups by result (hit, miss, error, bypass)",
            lookups.clone(),
        );
        let loads = Counter::default();
        metrics.register(
            "profile_cache_loads",
            "Profiles loaded from PostgreSQL after a cache miss (one per id at a time)",
            loads.clone(),
        );
        Self {
            redis,
            ttl,
            lookups,
            loads,
            inflight: Arc::default(),
            unflushed: Arc::default(),
            fill: redis::Script::new(FILL),
            invalidate: redis::Script::new(INVALIDATE),
        }
    }

    fn count(&self, result: &str) {
        self.lookups.get_or_create(&vec![("result", result.to_string())]).inc();
    }

    fn bypassing(&self) -> bool {
        !self.unflushed.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Looks `id` up; any Redis trouble is a miss.
    pub async fn get(&self, id: Uuid) -> Lookup {
        let Some(redis) = &self.redis else { return Lookup::Miss };
        if self.bypassing() {
            self.count("bypass");
            return Lookup::Miss;
        }
        let mut conn = redis.conn();
        match redis::cmd("GET").arg(data_key(id)).query_async::<Option<Vec<u8>>>(&mut conn).await {
            Ok(Some(bytes)) => {
                self.count("hit");
                Lookup::Hit(bytes)
            }
            Ok(None) => {
                self.count("miss");
                Lookup::Miss
            }
            Err(e) => {
                self.count("error");
                tracing::debug!(error = %e, "profile cache unavailable; reading PostgreSQL");
                Lookup::Miss
            }
        }
    }

    /// The per-id gate that makes concurrent misses share one load.
    pub async fn single_flight(&self, id: Uuid) -> SingleFlight {
        let gate = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(id).or_default().clone()
        };
        let guard = gate.clone().lock_owned().await;
        SingleFlight { _guard: guard, id, map: self.inflight.clone(), gate }
    }

    /// Counts a load from PostgreSQL after a miss.
    pub fn count_load(&self) {
        self.loads.inc();
    }

    /// Stores a record read at `version`, unless a newer write fenced it off.
    pub async fn fill(&self, id: Uuid, version: i64, bytes: &[u8]) {
        let Some(redis) = &self.redis else { return };
        if self.bypassing() {
            return;
        }
        let mut conn = redis.conn();
        let result: Result<i32, _> = self
            .fill
            .key(data_key(id))
            .key(fence_key(id))
            .arg(version)
            .arg(bytes)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "profile cache fill failed");
        }
    }

    /// After a committed write of `id` at `version`: fence and evict. On
    /// failure the replica bypasses the cache until a retry succeeds.
    pub async fn invalidate(&self, id: Uuid, version: i64) {
        let Some(redis) = &self.redis else { return };
        if let Err(e) = self.run_invalidate(redis, id, version).await {
            tracing::warn!(error = %e, customer_id = %id, "cache invalidation failed; bypassing the cache until it succeeds");
            self.unflushed.lock().unwrap_or_else(|p| p.into_inner()).insert((id, version));
        }
    }

    async fn run_invalidate(&self, redis: &Redis, id: Uuid, version: i64) -> redis::RedisResult<()> {
        let mut conn = redis.conn();
        // The fence outlives any entry it guards.
        let fence_ttl = (self.ttl * 2).as_millis() as u64;
        self.invalidate
            .key(data_key(id))
            .key(fence_key(id))
            .arg(version)
            .arg(fence_ttl)
            .invoke_async::<i32>(&mut conn)
            .await
            .map(|_| ())
    }

    /// Retries failed invalidations; returns how many are still pending.
    pub async fn flush_pending(&self) -> usize {
        let Some(redis) = &self.redis else { return 0 };
        let pending: Vec<(Uuid, i64)> =
            self.unflushed.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
        for (id, version) in pending {
            if self.run_invalidate(redis, id, version).await.is_ok() {
                self.unflushed.lock().unwrap_or_else(|p| p.into_inner()).remove(&(id, version));
            }
        }
        self.unflushed.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Held while one task loads an id; dropping it lets the next waiter in.
pub struct SingleFlight {
    _guard: tokio::sync::OwnedMutexGuard<()>,
    id: Uuid,
    map: Arc<Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>>,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for SingleFlight {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map, this guard's gate and our clone hold it: nobody waits.
        if Arc::strong_count(&self.gate) <= 3 {
            map.remove(&self.id);
        }
    }
}
