//! The response cache: finished JSON bodies, in process (moka) and, when configured, in Redis
//! shared by every query server.
//!
//! A key is `tally:query:v2:<tenant id>:<endpoint>:<sha256 of the normalised question>`, where the
//! question holds the resolved time range (defaults rounded to the minute, so repeated default
//! requests hit), the tenant's time zone and every parameter. The tenant id comes from the API
//! key, never from the request, so an entry cannot be served to another tenant. Entries live
//! `ttl` in both levels and are never refreshed in place: an answer is at most `ttl` older than
//! the data it was computed from (plus the time the computation took). Each entry keeps the
//! instant its computation started (8 bytes before the body), so every answer can say how old
//! its data is ([`Cached::computed_at_us`]).

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use sha2::Digest;
use uuid::Uuid;

/// Where an answer came from, reported in the `X-Cache` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheLevel {
    Miss,
    Memory,
    Redis,
}

impl CacheLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheLevel::Miss => "miss",
            CacheLevel::Memory => "memory",
            CacheLevel::Redis => "redis",
        }
    }
}

/// An answer found in the cache.
#[derive(Debug, Clone)]
pub struct Cached {
    pub body: Bytes,
    pub level: CacheLevel,
    /// When its computation started (microseconds since the Unix epoch): it counts everything
    /// acknowledged before then.
    pub computed_at_us: i64,
}

/// The stored form of an entry: its computation's start, then the body.
fn entry(computed_at_us: i64, body: &[u8]) -> Bytes {
    let mut stored = Vec::with_capacity(8 + body.len());
    stored.extend_from_slice(&computed_at_us.to_be_bytes());
    stored.extend_from_slice(body);
    Bytes::from(stored)
}

/// Splits a stored entry; `None` for anything too short to be one.
fn split_entry(stored: Bytes) -> Option<(i64, Bytes)> {
    let stamp: [u8; 8] = stored.get(..8)?.try_into().ok()?;
    Some((i64::from_be_bytes(stamp), stored.slice(8..)))
}

/// Longest wait for Redis before the cache level is skipped for that request.
const REDIS_TIMEOUT: Duration = Duration::from_millis(100);

/// Both cache levels; either may be off.
#[derive(Clone)]
pub struct ResponseCache {
    memory: Option<moka::sync::Cache<String, Bytes>>,
    redis: Option<redis::aio::ConnectionManager>,
    ttl: Duration,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("memory", &self.memory.is_some())
            .field("redis", &self.redis.is_some())
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl ResponseCache {
    /// `ttl` zero turns both levels off. `memory_bytes_max` bounds the in-process level.
    pub fn new(ttl: Duration, memory_bytes_max: u64, redis: Option<redis::aio::ConnectionManager>) -> Self {
        if ttl.is_zero() {
            return ResponseCache { memory: None, redis: None, ttl };
        }
        let memory = moka::sync::Cache::builder()
            .max_capacity(memory_bytes_max)
            .weigher(|key: &String, value: &Bytes| (key.len() + value.len()).try_into().unwrap_or(u32::MAX))
            .time_to_live(ttl)
            .build();
        ResponseCache { memory: Some(memory), redis, ttl }
    }

    /// Connects to Redis once, with bounded connect and response times.
    pub async fn connect_redis(url: &str) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1);
        client.get_connection_manager_with_config(config).await
    }

    /// The shared Redis cache's state for `/health`: `not_configured`, `healthy` (it answered a
    /// PING within a second) or `unhealthy`.
    pub async fn redis_state(&self) -> &'static str {
        let Some(mut redis) = self.redis.clone() else { return "not_configured" };
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut redis);
        match tokio::time::timeout(Duration::from_secs(1), ping).await {
            Ok(Ok(_)) => "healthy",
            _ => "unhealthy",
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The key of a question asked by a tenant of one endpoint.
    pub fn key(tenant_id: Uuid, endpoint: &str, question: &impl Serialize) -> String {
        let canonical = serde_json::to_vec(question).unwrap_or_default();
        let digest = sha2::Sha256::digest(&canonical);
        let mut key = format!("tally:query:v2:{tenant_id}:{endpoint}:");
        for byte in digest {
            use std::fmt::Write as _;
            let _ = write!(key, "{byte:02x}");
        }
        key
    }

    pub async fn get(&self, key: &str) -> Option<Cached> {
        if let Some(stored) = self.memory.as_ref().and_then(|memory| memory.get(key)) {
            let (computed_at_us, body) = split_entry(stored)?;
            return Some(Cached { body, level: CacheLevel::Memory, computed_at_us });
        }
        let mut redis = self.redis.clone()?;
        let found = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("GET").arg(key).query_async::<Option<Vec<u8>>>(&mut redis),
        )
        .await;
        match found {
            Ok(Ok(Some(stored))) => {
                let stored = Bytes::from(stored);
                if let Some(memory) = &self.memory {
                    memory.insert(key.to_owned(), stored.clone());
                }
                let (computed_at_us, body) = split_entry(stored)?;
                Some(Cached { body, level: CacheLevel::Redis, computed_at_us })
            }
            Ok(Ok(None)) => None,
            Ok(Err(error)) => {
                tracing::debug!(%error, "redis cache read failed; computing the answer");
                metrics::counter!("tally_query_cache_errors_total").increment(1);
                None
            }
            Err(_) => {
                metrics::counter!("tally_query_cache_errors_total").increment(1);
                None
            }
        }
    }

    /// Stores `body`, computed from data read at `computed_at_us` or later.
    pub async fn put(&self, key: &str, computed_at_us: i64, body: &[u8]) {
        let body = entry(computed_at_us, body);
        if let Some(memory) = &self.memory {
            memory.insert(key.to_owned(), body.clone());
        }
        let Some(mut redis) = self.redis.clone() else { return };
        let ttl_ms = self.ttl.as_millis() as u64;
        let stored = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("SET").arg(key).arg(&body[..]).arg("PX").arg(ttl_ms).query_async::<()>(&mut redis),
        )
        .await;
        if !matches!(stored, Ok(Ok(()))) {
            tracing::debug!("redis cache write failed or timed out");
            metrics::counter!("tally_query_cache_errors_total").increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_the_tenant_and_differ_by_question() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let key_a = ResponseCache::key(a, "aggregate", &("day", 1));
        assert!(key_a.starts_with(&format!("tally:query:v2:{a}:aggregate:")));
        assert_ne!(key_a, ResponseCache::key(b, "aggregate", &("day", 1)));
        assert_ne!(key_a, ResponseCache::key(a, "aggregate", &("day", 2)));
        assert_eq!(key_a, ResponseCache::key(a, "aggregate", &("day", 1)));
    }

    #[tokio::test]
    async fn entries_keep_when_they_were_computed() {
        let cache = ResponseCache::new(Duration::from_secs(60), 1 << 20, None);
        cache.put("k", 1_234_567, b"{}").await;
        let found = cache.get("k").await.expect("cached");
        assert_eq!(
            (&found.body[..], found.computed_at_us, found.level),
            (&b"{}"[..], 1_234_567, CacheLevel::Memory)
        );
        assert!(split_entry(Bytes::from_static(b"short")).is_none());
    }
}
