//! The storage boundary of the query service: typed questions in, typed rows out. Handlers never
//! see SQL; [`crate::pg::PgBackend`] answers for PostgreSQL, and an embedded backend can answer
//! the same questions later without touching a handler.

use std::future::Future;
use std::pin::Pin;

use rust_decimal::Decimal;
use time::{OffsetDateTime, PrimitiveDateTime};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::question::{Dimension, Metric, Period};

/// A boxed future, so the trait can be used as `Arc<dyn Backend>`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Buckets of the stored latency histograms (see the `latency_buckets` column).
pub const LATENCY_BUCKETS: usize = 46;

/// The well-known quantity columns of `usage_events` and `usage_rollup_hourly`, in column order.
pub const QUANTITY_NAMES: [&str; 9] = [
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "pages",
    "characters",
    "requests",
    "bytes",
    "duration_ms",
];

/// What the query service needs from a database.
pub trait Backend: Send + Sync + std::fmt::Debug + 'static {
    /// The API key with this SHA-256 hash, with its tenant's state (revoked and expired keys
    /// included: the caller decides).
    fn find_api_key<'a>(
        &'a self,
        key_hash: &'a [u8; 32],
    ) -> BoxFuture<'a, Result<Option<KeyRecord>, BackendError>>;

    /// Whether the database answers.
    fn ping(&self) -> BoxFuture<'_, Result<(), BackendError>>;

    /// Wall-clock times in a time zone, as instants (for dates given without an offset).
    fn resolve_local_times<'a>(
        &'a self,
        time_zone: &'a str,
        times: &'a [PrimitiveDateTime],
    ) -> BoxFuture<'a, Result<Vec<OffsetDateTime>, BackendError>>;

    /// The periods (in the time zone) that overlap a range, in order.
    fn periods<'a>(
        &'a self,
        range: &'a Scope,
        period: Period,
    ) -> BoxFuture<'a, Result<Vec<(OffsetDateTime, OffsetDateTime)>, BackendError>>;

    /// Raw events, newest first. Rows arrive through a bounded channel fed by a task that holds
    /// one database connection; dropping the receiver stops it.
    fn list_events(&self, query: ListQuery) -> mpsc::Receiver<Result<EventRecord, BackendError>>;

    /// How many raw events match a listing's filters (its position, limit and offset ignored):
    /// the listing's total for filters the rollups cannot answer (metadata).
    fn count_events<'a>(&'a self, query: &'a ListQuery) -> BoxFuture<'a, Result<i64, BackendError>>;

    /// Sums over the rollups (and raw events for partial hours; see [`crate::pg`]).
    fn aggregate<'a>(
        &'a self,
        query: &'a AggregateQuery,
    ) -> BoxFuture<'a, Result<Vec<AggregateRow>, BackendError>>;

    /// Custom quantity sums per group of `query` (its order and limit are ignored).
    fn custom_quantities<'a>(
        &'a self,
        query: &'a AggregateQuery,
    ) -> BoxFuture<'a, Result<Vec<CustomQuantityRow>, BackendError>>;

    /// A tenant's price rules as stored, retired versions included (the billing summary builds
    /// the tenant's price book from them exactly as the edge does).
    fn price_rules(&self, tenant_id: Uuid) -> BoxFuture<'_, Result<Vec<PriceRuleRecord>, BackendError>>;
}

/// A row of `price_rules`.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceRuleRecord {
    pub id: Uuid,
    /// `pricing::PriceRuleSpec` JSON, as the admin API accepted it.
    pub definition: serde_json::Value,
    pub effective_from_us: i64,
    pub effective_until_us: Option<i64>,
    pub retired: bool,
}

impl PriceRuleRecord {
    /// The record as the pricing crate reads stored rules.
    pub fn as_stored(&self) -> pricing::StoredRule<'_> {
        pricing::StoredRule {
            id: self.id,
            definition: &self.definition,
            effective_from_us: self.effective_from_us,
            effective_until_us: self.effective_until_us,
            retired: self.retired,
        }
    }
}

/// A storage failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The database cannot be reached or did not answer in time.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Anything else: a bug, a schema problem, a tenant with an unknown time zone.
    #[error("storage error: {0}")]
    Internal(String),
    /// A sum of the tenant's numbers does not fit the type that holds it (a decimal above
    /// `Decimal::MAX`); names the column or measure.
    #[error("{0} overflows")]
    Overflow(String),
    /// The backend cannot answer this question (the embedded one and a time zone its compiled-in
    /// database does not know).
    #[error("{0}")]
    Unsupported(String),
}

/// An API key and its tenant, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: Uuid,
    pub tenant_id: Uuid,
    pub tenant_name: String,
    pub tenant_disabled: bool,
    pub time_zone: String,
    pub scopes: Vec<String>,
    /// Microseconds since the Unix epoch.
    pub expires_at_us: Option<i64>,
    pub revoked: bool,
}

/// Whose data, over which time range, in which time zone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Scope {
    pub tenant_id: Uuid,
    /// Inclusive. Under [`Edges::Hour`], a whole UTC hour.
    pub start: OffsetDateTime,
    /// Exclusive. Under [`Edges::Hour`], a whole UTC hour.
    pub end: OffsetDateTime,
    /// IANA name from `tenants.time_zone`; days, weeks and months are bounded in it.
    pub time_zone: String,
    /// How instants inside a UTC hour (the range's ends, period boundaries) are answered.
    pub edges: Edges,
    /// The range as asked, before [`Edges::Hour`] widened it to whole hours; equal to
    /// `start..end` under [`Edges::Exact`].
    pub requested: (OffsetDateTime, OffsetDateTime),
}

impl Scope {
    /// A scope answered exactly at its ends and period boundaries.
    pub fn exact(tenant_id: Uuid, start: OffsetDateTime, end: OffsetDateTime, time_zone: &str) -> Scope {
        Scope {
            tenant_id,
            start,
            end,
            time_zone: time_zone.to_owned(),
            edges: Edges::Exact,
            requested: (start, end),
        }
    }
}

impl Scope {
    /// The scope whose periods are the buckets of an aggregate of this one: under
    /// [`Edges::Hour`] an hour counts in the period holding its middle, so the periods are those
    /// holding the middle of one of the scope's hours.
    pub fn bucketed(&self) -> Scope {
        match self.edges {
            Edges::Exact => self.clone(),
            Edges::Hour => {
                let half = time::Duration::minutes(30);
                let mut scope = self.clone();
                scope.start = self.start + half;
                scope.end = self.end - half + time::Duration::microseconds(1);
                scope
            }
        }
    }
}

/// How an aggregate answers for instants inside a UTC hour. Rollups are kept per UTC hour, so
/// only whole hours can be read from them; anything finer must be read from raw events, whose
/// number grows with the ingest rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Edges {
    /// The default: the range is widened to the whole UTC hours it touches (`effective_start`,
    /// `effective_end` in the answer), and an hour that a period boundary cuts (time zones such
    /// as Asia/Kolkata, +05:30) is counted in the period holding the hour's middle, that is in
    /// the period holding most of it (the later one on a tie). Answers read rollups only: no
    /// raw event is read, at any ingest rate.
    #[default]
    Hour,
    /// Exact to the microsecond: the partial hours at the range's ends and the hours a period
    /// boundary cuts are read from raw events (at most two hours plus one per boundary).
    Exact,
}

impl Edges {
    pub fn as_str(self) -> &'static str {
        match self {
            Edges::Hour => "hour",
            Edges::Exact => "exact",
        }
    }
}

/// Equality filters; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Filter {
    pub service_type: Option<String>,
    pub service_provider: Option<String>,
    pub user_id: Option<String>,
    /// The empty string matches events without a model.
    pub model: Option<String>,
    pub event_type: Option<String>,
}

/// Success or error, as stored in `usage_events.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum EventStatus {
    Success,
    Error,
}

/// A page of raw events.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub scope: Scope,
    pub filter: Filter,
    pub status: Option<EventStatus>,
    /// Keyset position: only events strictly older than this (time, id) in the listing order.
    pub after: Option<(OffsetDateTime, Uuid)>,
    pub offset: u64,
    /// Rows to return at most.
    pub limit: u32,
    /// Only events whose metadata has this key with this (text) value: a dimension such as a
    /// non-numeric metric (`model_version`). The rollups do not hold it: see
    /// [`Backend::count_events`].
    pub metadata: Option<(String, String)>,
}

/// One stored event.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub event_id: Uuid,
    pub occurred_at: OffsetDateTime,
    pub user_id: String,
    pub service_type: String,
    pub service_provider: String,
    pub event_type: String,
    pub model: Option<String>,
    pub status: EventStatus,
    pub error_code: Option<String>,
    pub latency_us: Option<i64>,
    /// Indexed like [`QUANTITY_NAMES`].
    pub quantities: [Option<Decimal>; 9],
    /// The stored `{"name": number}` object, as JSON text.
    pub custom_quantities: Option<String>,
    /// `None`: no price rule matched (unpriced), never zero.
    pub cost: Option<Decimal>,
    pub metadata: Option<serde_json::Value>,
    pub tags: Vec<String>,
    pub session_id: Option<String>,
    pub request_id: Option<String>,
}

/// Sums over a scope, grouped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct AggregateQuery {
    pub scope: Scope,
    pub filter: Filter,
    /// Buckets in the scope's time zone; required when a grouping set holds [`Dimension::Period`].
    pub period: Option<Period>,
    /// Grouping sets; one set is a plain `GROUP BY`, an empty set a single total row.
    pub grouping_sets: Vec<Vec<Dimension>>,
    pub measures: Measures,
    /// Sort descending by this metric and keep the first `limit` groups (one grouping set only).
    pub top: Option<(Metric, u32)>,
}

/// The costlier sums, computed only when asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Measures {
    /// `count(DISTINCT user_id)` per group.
    pub unique_users: bool,
    /// The summed latency histogram per group.
    pub latency_histogram: bool,
    /// The sum of this custom quantity per group (in [`AggregateRow::custom_metric`]).
    pub custom_metric: Option<String>,
}

/// One group of an aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateRow {
    /// Index into [`AggregateQuery::grouping_sets`].
    pub set: usize,
    pub key: GroupKey,
    pub stats: Stats,
    /// Groups in the set before `top` cut them (only with `top`).
    pub groups_total: Option<i64>,
    /// The ranked metric summed over all groups, before `top` cut them (only with `top`).
    pub metric_total: Option<Decimal>,
    pub custom_metric: Option<Decimal>,
}

/// The dimension values of a group; `None` where the dimension is not grouped on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    pub period_start: Option<OffsetDateTime>,
    pub period_end: Option<OffsetDateTime>,
    pub service_type: Option<String>,
    pub service_provider: Option<String>,
    /// `Some("")` for events without a model.
    pub model: Option<String>,
    pub user_id: Option<String>,
    pub event_type: Option<String>,
}

impl GroupKey {
    /// The value of one dimension.
    pub fn get(&self, dimension: Dimension) -> Option<&str> {
        match dimension {
            Dimension::ServiceType => self.service_type.as_deref(),
            Dimension::ServiceProvider => self.service_provider.as_deref(),
            Dimension::Model => self.model.as_deref(),
            Dimension::UserId => self.user_id.as_deref(),
            Dimension::EventType => self.event_type.as_deref(),
            Dimension::Period => None,
        }
    }
}

/// Sums of one group.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub event_count: i64,
    pub error_count: i64,
    pub unique_users: Option<i64>,
    /// Indexed like [`QUANTITY_NAMES`].
    pub quantities: [Decimal; 9],
    /// Sum over priced events.
    pub cost: Decimal,
    /// Events without a price.
    pub unpriced_count: i64,
    pub latency_count: i64,
    pub latency_sum_us: i64,
    pub latency_max_us: i64,
    pub latency_buckets: Option<Vec<i64>>,
    /// True when the backend knows that no event of the group has custom quantities, so a
    /// [`Backend::custom_quantities`] query can be skipped; false when they exist or it does
    /// not know (the default).
    pub no_custom_quantities: bool,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            event_count: 0,
            error_count: 0,
            unique_users: None,
            quantities: [Decimal::ZERO; 9],
            cost: Decimal::ZERO,
            unpriced_count: 0,
            latency_count: 0,
            latency_sum_us: 0,
            latency_max_us: 0,
            latency_buckets: None,
            no_custom_quantities: false,
        }
    }
}

/// The sum of one custom quantity in one group.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomQuantityRow {
    pub set: usize,
    pub key: GroupKey,
    pub name: String,
    pub value: Decimal,
}
