//! Tally's query service: usage listings, aggregates and analytics over the events and hourly
//! rollups the sink stores, for API keys with the `query` scope, each restricted to its tenant.
//!
//! # Shape
//! - [`api`]: the HTTP endpoints (the older system's paths, parameters and field names), the
//!   OpenAPI document at `/openapi.json` and the offline docs at `/docs`. [`router`] serves all
//!   of them; [`usage_routes`] only `GET /api/v1/usage`, for the edge to mount on its port.
//! - [`api::params`] and [`api::tenant`]: typed parameters per endpoint, and the extractors that
//!   authenticate a request and resolve its time range before a handler runs.
//! - [`backend::Backend`]: the storage boundary. Handlers ask typed questions (made of
//!   [`question`]'s periods, dimensions and metrics); all SQL lives in [`pg`] and [`sqlite`],
//!   which never import [`api`].
//! - [`cache`]: finished answers, in process and optionally in Redis.
//! - [`ui`]: the dashboard at `/ui/` (server-rendered HTML over the same endpoints).
//!
//! # Numbers
//! - Aggregates read the hourly rollups: on PostgreSQL `usage_rollup_service_hourly` (no user)
//!   unless the question needs users, else `usage_rollup_hourly`; only the listing reads
//!   `usage_events` in bulk.
//!   Hours that a range edge or a period boundary cuts are read from raw events, so every sum
//!   is exact, also for time zones with non-whole-hour offsets (see [`pg`]).
//! - Days, weeks (Monday to Sunday) and months are bounded in the tenant's `tenants.time_zone`,
//!   by PostgreSQL's `date_trunc(unit, t, zone)` (on SQLite by [`calendar`], with the same rules
//!   and the IANA database compiled in); DST days last 23 or 25 hours.
//! - `unique_users` is exact: `count(DISTINCT user_id)` over the rollup rows (keyed by user).
//! - Latency percentiles come from the summed 46-bucket histograms: the bucket holding the
//!   nearest rank, reported as its geometric midpoint. A bucket spans a factor of sqrt(2), so a
//!   percentile is within 19% of the true value (under 1 ms: within 0.5 ms).
//! - Money (`total_cost`) is an exact decimal written as a JSON string; quantities are exact
//!   decimals written as JSON numbers. Events without a price are never counted as $0: they are
//!   reported as `unpriced_event_count` (and `total_cost: null` on a listed event).
//! - Bills ([`api::billing`]): per-event costs exactly as stored, graduated and volume charges and
//!   minimums on the month's total units per rule, from the rollups and the tenant's price book.
//!
//! # Freshness
//! An aggregate answer may be served from the cache for `cache_ttl` (default 15 s) after it was
//! computed; listings are never cached (a cursor page may reuse the first page's `total_count`
//! for as long; the cursor itself carries only a position). A key's revocation, its tenant being
//! disabled, or a time zone change takes effect within `key_cache_ttl` (default 30 s).

pub mod api;
pub mod auth;
pub mod backend;
pub mod cache;
pub mod calendar;
pub mod config;
pub mod error;
pub mod pg;
pub mod question;
mod series;
pub mod sqlite;
pub mod stats;
pub mod ui;

use std::sync::Arc;

pub use api::{router, usage_routes};
pub use config::{ConfigError, QueryConfig};

use auth::Authenticator;
use backend::Backend;
use cache::ResponseCache;

/// What every request handler shares.
#[derive(Debug)]
pub struct QueryState {
    pub config: QueryConfig,
    pub backend: Arc<dyn Backend>,
    pub auth: Authenticator,
    pub cache: ResponseCache,
    /// The dashboard's signed-in sessions ([`ui`]).
    pub ui_sessions: ui::Sessions,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Backend(#[from] backend::BackendError),
    #[error("failed to connect to redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl QueryState {
    /// Validates the configuration, opens a lazy PostgreSQL pool and, when `redis_url` is set,
    /// connects to Redis (failing if it cannot be reached).
    pub async fn connect(config: QueryConfig) -> Result<Arc<QueryState>, StartError> {
        config.validate()?;
        let backend = pg::PgBackend::connect_lazy(&config.database_url, &config.pg)?;
        let redis = match &config.redis_url {
            Some(url) => Some(ResponseCache::connect_redis(url).await?),
            None => None,
        };
        Ok(QueryState::with_backend(config, Arc::new(backend), redis))
    }

    /// A state over any backend (the configuration must be valid).
    pub fn with_backend(
        config: QueryConfig,
        backend: Arc<dyn Backend>,
        redis: Option<redis::aio::ConnectionManager>,
    ) -> Arc<QueryState> {
        series::register();
        Arc::new(QueryState {
            auth: Authenticator::new(backend.clone(), config.key_cache_ttl),
            cache: ResponseCache::new(config.cache_ttl, config.cache_memory_bytes_max, redis),
            ui_sessions: ui::Sessions::default(),
            backend,
            config,
        })
    }
}
