//! The response cache: finished JSON bodies, in process (moka) and, when configured, in Redis
//! shared by every query server.
//!
//! A key is `tally:query:v1:<tenant id>:<endpoint>:<sha256 of the normalised question>`, where the
//! question holds the resolved time range (defaults rounded to the minute, so repeated default
//! requests hit), the tenant's time zone and every parameter. The tenant id comes from the API
//! key, never from the request, so an entry cannot be served to another tenant. Entries live
//! `ttl` in both levels and are never refreshed in place: an answer is at most `ttl` older than
//! the data it was computed from (plus the time the computation took).

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
        let mut key = format!("tally:query:v1:{tenant_id}:{endpoint}:");
        for byte in digest {
            use std::fmt::Write as _;
            let _ = write!(key, "{byte:02x}");
        }
        key
    }

    pub async fn get(&self, key: &str) -> Option<(Bytes, CacheLevel)> {
        if let Some(body) = self.memory.as_ref().and_then(|memory| memory.get(key)) {
            return Some((body, CacheLevel::Memory));
        }
        let mut redis = self.redis.clone()?;
        let found = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("GET").arg(key).query_async::<Option<Vec<u8>>>(&mut redis),
        )
        .await;
        match found {
            Ok(Ok(Some(body))) => {
                let body = Bytes::from(body);
                if let Some(memory) = &self.memory {
                    memory.insert(key.to_owned(), body.clone());
                }
                Some((body, CacheLevel::Redis))
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

    pub async fn put(&self, key: &str, body: Bytes) {
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
        assert!(key_a.starts_with(&format!("tally:query:v1:{a}:aggregate:")));
        assert_ne!(key_a, ResponseCache::key(b, "aggregate", &("day", 1)));
        assert_ne!(key_a, ResponseCache::key(a, "aggregate", &("day", 2)));
        assert_eq!(key_a, ResponseCache::key(a, "aggregate", &("day", 1)));
    }
}
