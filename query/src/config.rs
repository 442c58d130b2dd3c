//! The query service's configuration: every address and limit with its default, validated once
//! at start-up. The binary fills it from flags and environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use crate::pg::PgOptions;

/// Everything the query service needs to know.
#[derive(Debug, Clone)]
pub struct QueryConfig {
    /// HTTP listener. Default `0.0.0.0:8002` (the older system's query port).
    pub addr: SocketAddr,
    /// PostgreSQL URL (the database the edge writes).
    pub database_url: String,
    /// Redis URL for the shared response cache; `None` keeps the cache in process only.
    pub redis_url: Option<String>,
    /// PostgreSQL pool and statement timeout.
    pub pg: PgOptions,
    /// Longest time range a request may cover, in days. Default 400.
    pub max_range_days: u32,
    /// The range when `start_date` is not given, in days before `end_date`. Default 30.
    pub default_range_days: u32,
    /// How long a computed answer is served from the cache: the staleness bound. Default 15 s;
    /// zero turns the response cache off.
    pub cache_ttl: Duration,
    /// Bytes of answers kept in process at most. Default 64 MiB.
    pub cache_memory_bytes_max: u64,
    /// How long a looked-up API key is trusted before it is checked again. Default 30 s.
    pub key_cache_ttl: Duration,
    /// Whether the dashboard's session cookie is always marked `Secure` (browsers then send it
    /// over HTTPS only). Default false: it is marked so only when a request says it came over
    /// HTTPS (`X-Forwarded-Proto: https` or `Forwarded: proto=https`, as a TLS-terminating
    /// proxy sends). Set it when the service itself serves TLS or sits behind HTTPS.
    pub secure_cookies: bool,
    /// The process's Prometheus recorder, rendered on `GET /metrics`; installed by the binary
    /// (`telemetry::install_metrics`), never by this library. Unset: `/metrics` answers 404.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl QueryConfig {
    /// Defaults for everything but the database.
    pub fn new(database_url: impl Into<String>) -> QueryConfig {
        QueryConfig {
            addr: SocketAddr::from(([0, 0, 0, 0], 8002)),
            database_url: database_url.into(),
            redis_url: None,
            pg: PgOptions::default(),
            max_range_days: 400,
            default_range_days: 30,
            cache_ttl: Duration::from_secs(15),
            cache_memory_bytes_max: 64 * 1024 * 1024,
            key_cache_ttl: Duration::from_secs(30),
            secure_cookies: false,
            metrics: None,
        }
    }

    /// Checks every value and the relations between them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |field, problem: String| Err(ConfigError { field, problem });
        if self.database_url.trim().is_empty() {
            return fail("database_url", "is empty: set DATABASE_URL".into());
        }
        if self.max_range_days == 0 || self.max_range_days > 3660 {
            return fail("max_range_days", format!("must be from 1 to 3,660, got {}", self.max_range_days));
        }
        if self.default_range_days == 0 || self.default_range_days > self.max_range_days {
            return fail(
                "default_range_days",
                format!(
                    "must be from 1 to max_range_days ({}), got {}",
                    self.max_range_days, self.default_range_days
                ),
            );
        }
        if self.cache_ttl > Duration::from_secs(300) {
            return fail("cache_ttl", format!("must be at most 300 s, got {:?}", self.cache_ttl));
        }
        if self.key_cache_ttl.is_zero() || self.key_cache_ttl > Duration::from_secs(300) {
            return fail(
                "key_cache_ttl",
                format!("must be from 1 ms to 300 s, got {:?}", self.key_cache_ttl),
            );
        }
        if self.pg.max_connections == 0 || self.pg.max_connections > 256 {
            return fail("pg_pool_size", format!("must be from 1 to 256, got {}", self.pg.max_connections));
        }
        if self.pg.statement_timeout < Duration::from_millis(100) {
            return fail("statement_timeout", "must be at least 100 ms".into());
        }
        if let Some(url) = &self.redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://"))
        {
            return fail("redis_url", "must start with redis://, rediss:// or unix://".into());
        }
        Ok(())
    }
}

/// A configuration value that cannot work, and how to fix it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid configuration: {field} {problem}")]
pub struct ConfigError {
    pub field: &'static str,
    pub problem: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        let config = QueryConfig::new("postgres://tally@127.0.0.1/tally");
        assert!(config.validate().is_ok());
        assert_eq!(config.addr.port(), 8002);
        let bad = QueryConfig { max_range_days: 0, ..config.clone() };
        assert_eq!(bad.validate().expect_err("invalid").field, "max_range_days");
        let bad = QueryConfig { redis_url: Some("localhost:6379".into()), ..config };
        assert_eq!(bad.validate().expect_err("invalid").field, "redis_url");
    }
}
