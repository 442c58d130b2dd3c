//! The storage boundary: everything the edge needs from a database, as one small trait, so a
//! backend (PostgreSQL now, an embedded one later) plugs in without touching the edge.

use std::future::Future;
use std::pin::Pin;

use uuid::Uuid;

use crate::row::{EventRow, Outcome};

/// A boxed future, so the trait can be used as `Arc<dyn Store>`. One allocation per call is
/// nothing next to a database round trip.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A storage backend.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Stores rows in one transaction: new rows are inserted, rows whose dedup key is stored
    /// already are skipped, and the hourly rollups grow by exactly the inserted rows. Returns one
    /// outcome per row, in order, only after the commit. On error nothing was stored.
    fn commit<'a>(&'a self, rows: &'a [EventRow]) -> BoxFuture<'a, Result<Vec<Outcome>, StoreError>>;

    /// The API key with this SHA-256 hash, if one exists (revoked and expired ones included:
    /// the caller decides).
    fn find_api_key<'a>(
        &'a self,
        key_hash: &'a [u8; 32],
    ) -> BoxFuture<'a, Result<Option<ApiKey>, StoreError>>;

    /// Creates a tenant; its name must be new.
    fn create_tenant<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Tenant, StoreError>>;

    /// The tenant with this name or id.
    fn find_tenant<'a>(&'a self, name_or_id: &'a str) -> BoxFuture<'a, Result<Option<Tenant>, StoreError>>;

    /// Stores a new key's hash. The plaintext key never reaches storage.
    fn create_api_key<'a>(&'a self, key: &'a NewApiKey) -> BoxFuture<'a, Result<ApiKey, StoreError>>;

    /// Whether the database answers.
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Creates time partitions ahead and drops raw events (and rollups, if a retention is set)
    /// past retention. Safe to run from several processes at once.
    fn maintain<'a>(&'a self, retention: &'a Retention) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Every tenant.
    fn list_tenants(&self) -> BoxFuture<'_, Result<Vec<Tenant>, StoreError>>;

    /// Disables or enables a tenant; false when there is no such tenant.
    fn set_tenant_disabled(&self, tenant_id: Uuid, disabled: bool)
    -> BoxFuture<'_, Result<bool, StoreError>>;

    /// A tenant's settings; `None` when there is no such tenant.
    fn tenant_settings(&self, tenant_id: Uuid) -> BoxFuture<'_, Result<Option<TenantSettings>, StoreError>>;

    /// Replaces a tenant's settings.
    fn update_tenant_settings<'a>(
        &'a self,
        tenant_id: Uuid,
        settings: &'a TenantSettings,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// A tenant's keys, newest first (never the keys themselves).
    fn list_api_keys(&self, tenant_id: Uuid) -> BoxFuture<'_, Result<Vec<ApiKeyInfo>, StoreError>>;

    /// Revokes a key of a tenant; false when the tenant has no such key.
    fn revoke_api_key(&self, tenant_id: Uuid, key_id: Uuid) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// A tenant's custom service types.
    fn list_services(&self, tenant_id: Uuid) -> BoxFuture<'_, Result<Vec<ServiceRecord>, StoreError>>;

    /// Creates or replaces a custom service type; true when it was created.
    fn put_service<'a>(
        &'a self,
        tenant_id: Uuid,
        service: &'a ServiceRecord,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Deletes a custom service type; false when there was none.
    fn delete_service<'a>(
        &'a self,
        tenant_id: Uuid,
        service_type: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// A tenant's price rules, retired versions included.
    fn list_price_rules(&self, tenant_id: Uuid) -> BoxFuture<'_, Result<Vec<StoredPriceRule>, StoreError>>;

    /// Stores a new price rule version.
    fn insert_price_rule<'a>(&'a self, rule: &'a StoredPriceRule) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Ends a rule version at `at_us` and marks it retired (kept for history). A rule retired at or
    /// before its start never applies. False when there is no such rule.
    fn retire_price_rule(
        &self,
        tenant_id: Uuid,
        rule_id: Uuid,
        at_us: i64,
    ) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Retires rule versions (each at its time, as [`Store::retire_price_rule`]) and inserts new
    /// ones, all in one transaction: a tenant's price book changes whole or not at all.
    fn change_price_rules<'a>(
        &'a self,
        tenant_id: Uuid,
        retire: &'a [(Uuid, i64)],
        insert: &'a [StoredPriceRule],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Events stored and their cost in the tenant's current month (in its time zone), from the
    /// rollups.
    fn month_usage(&self, tenant_id: Uuid)
    -> BoxFuture<'_, Result<(i64, rust_decimal::Decimal), StoreError>>;

    /// Re-prices up to `limit` events of a tenant in `[start_us, end_us)` after `after` (a
    /// keyset position), in one transaction that also moves the rollups by the cost difference.
    fn rerate_batch<'a>(
        &'a self,
        request: &'a RerateRequest,
        after: Option<(i64, Uuid)>,
        reprice: &'a (dyn Fn(&wire::Event) -> Repriced + Send + Sync),
    ) -> BoxFuture<'a, Result<RerateBatch, StoreError>>;

    /// Records a finished re-rate.
    fn record_rerate<'a>(&'a self, run: &'a RerateRun) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Writes a re-rate's audit row before it starts, with status running, unless another
    /// re-rate of the tenant is running: then nothing is written and that run's id is returned.
    /// A running row not updated since `stale_before_us` was left by a stopped process: it is
    /// marked interrupted and does not block the new run.
    fn start_rerate<'a>(
        &'a self,
        run: &'a RerateRun,
        stale_before_us: i64,
    ) -> BoxFuture<'a, Result<RerateStart, StoreError>>;

    /// Writes a running re-rate's progress (its figures so far), or its end when `status` is not
    /// running, with a public `error` message for a failed or interrupted run.
    fn update_rerate<'a>(
        &'a self,
        run: &'a RerateRun,
        status: RerateStatus,
        error: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// One of the tenant's re-rates; `None` when the tenant has no run with this id.
    fn find_rerate(
        &self,
        tenant_id: Uuid,
        id: Uuid,
    ) -> BoxFuture<'_, Result<Option<RerateRecord>, StoreError>>;

    /// The tenant's latest re-rates, newest first, at most `limit`.
    fn list_rerates(
        &self,
        tenant_id: Uuid,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<RerateRecord>, StoreError>>;

    /// Folds committed, not yet folded rollup deltas into the rollups, at most `max_entries`
    /// of them in one transaction that also removes them, so none is folded twice or skipped,
    /// even with several processes folding. A backend that grows its rollups in the commit
    /// itself has nothing to fold.
    fn fold_rollups(&self, max_entries: usize) -> BoxFuture<'_, Result<FoldReport, StoreError>> {
        let _ = max_entries;
        Box::pin(async { Ok(FoldReport::default()) })
    }
}

/// What one [`Store::fold_rollups`] did, and what it left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FoldReport {
    /// Entries folded and removed.
    pub folded: u64,
    /// Entries still waiting after this fold.
    pub pending: u64,
    /// Commit time (microseconds since the Unix epoch) of the oldest entry still waiting.
    pub oldest_pending_us: Option<i64>,
}

/// A tenant's settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TenantSettings {
    /// IANA time zone that bounds the tenant's days, weeks and months.
    pub time_zone: String,
    pub rate_limit_per_second: Option<u32>,
    pub rate_limit_burst: Option<u32>,
    pub monthly_event_quota: Option<i64>,
    pub monthly_cost_quota: Option<rust_decimal::Decimal>,
    /// `reject` or `flag`.
    pub quota_policy: String,
    pub late_window_seconds: u32,
    pub future_window_seconds: u32,
    /// Refuse events of service types that are neither built in nor registered (default: take
    /// them as custom events, as the older system did).
    #[serde(default)]
    pub require_registered_services: bool,
}

impl Default for TenantSettings {
    fn default() -> Self {
        TenantSettings {
            time_zone: "UTC".into(),
            rate_limit_per_second: None,
            rate_limit_burst: None,
            monthly_event_quota: None,
            monthly_cost_quota: None,
            quota_policy: "reject".into(),
            late_window_seconds: 35 * 86_400,
            future_window_seconds: 300,
            require_registered_services: false,
        }
    }
}

/// A stored key, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyInfo {
    pub id: Uuid,
    pub prefix: String,
    pub scopes: Vec<Scope>,
    pub label: Option<String>,
    pub created_at_us: i64,
    pub expires_at_us: Option<i64>,
    pub revoked: bool,
}

/// A custom service type; JSON fields are interpreted by the edge's registry.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRecord {
    pub service_type: String,
    pub service_name: String,
    pub description: Option<String>,
    pub providers: Vec<String>,
    pub required_fields: serde_json::Value,
    pub optional_fields: serde_json::Value,
    pub billing_config: Option<serde_json::Value>,
}

/// A price rule version as stored; `definition` is interpreted by the `pricing` crate.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPriceRule {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub definition: serde_json::Value,
    pub effective_from_us: i64,
    pub effective_until_us: Option<i64>,
    /// Retired through the API: it applies only within `[effective_from, effective_until)`, and
    /// not at all when `effective_until` is `None`.
    pub retired: bool,
}

/// What to re-rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RerateRequest {
    pub tenant_id: Uuid,
    pub start_us: i64,
    pub end_us: i64,
    pub batch_events: u32,
}

/// The new price of one event.
#[derive(Debug, Clone, PartialEq)]
pub struct Repriced {
    pub cost: Option<rust_decimal::Decimal>,
    pub rule_ids: Vec<Uuid>,
}

/// What one re-rate batch did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RerateBatch {
    /// Keyset position of the last event scanned; `None` when the range is done.
    pub last: Option<(i64, Uuid)>,
    pub scanned: i64,
    pub changed: i64,
    pub cost_before: rust_decimal::Decimal,
    pub cost_after: rust_decimal::Decimal,
}

/// The audit record of a re-rate.
#[derive(Debug, Clone, PartialEq)]
pub struct RerateRun {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub start_us: i64,
    pub end_us: i64,
    pub started_at_us: i64,
    pub events_scanned: i64,
    pub events_changed: i64,
    pub cost_before: rust_decimal::Decimal,
    pub cost_after: rust_decimal::Decimal,
    pub requested_by: Option<Uuid>,
}

/// Where a re-rate is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RerateStatus {
    Running,
    Finished,
    /// Stopped by an error; the events re-rated before it keep their new prices.
    Failed,
    /// Stopped by a shutdown, or found abandoned by a stopped process.
    Interrupted,
}

impl RerateStatus {
    /// The name stored and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RerateStatus::Running => "running",
            RerateStatus::Finished => "finished",
            RerateStatus::Failed => "failed",
            RerateStatus::Interrupted => "interrupted",
        }
    }

    /// The status of a stored name.
    pub fn parse(name: &str) -> Result<RerateStatus, StoreError> {
        Ok(match name {
            "running" => RerateStatus::Running,
            "finished" => RerateStatus::Finished,
            "failed" => RerateStatus::Failed,
            "interrupted" => RerateStatus::Interrupted,
            other => return Err(StoreError::Internal(format!("unknown re-rate status {other:?}"))),
        })
    }
}

/// What [`Store::start_rerate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RerateStart {
    /// The audit row is written; the run may start.
    Started,
    /// Another re-rate of the tenant is running: this one.
    AlreadyRunning(Uuid),
}

/// A re-rate's audit row as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RerateRecord {
    pub run: RerateRun,
    pub status: RerateStatus,
    pub finished_at_us: Option<i64>,
    /// Last progress written; a running row that stops moving was left by a stopped process.
    pub updated_at_us: i64,
    /// A public message, for a failed or interrupted run.
    pub error: Option<String>,
}

/// How long data is kept, and how far partitions are created around today.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Raw events older than this many days are dropped, a whole day at a time.
    pub event_retention_days: u32,
    /// Rollups older than this many days are deleted; `None` keeps them.
    pub aggregate_retention_days: Option<u32>,
    /// Days before today for which partitions exist (the late-event window, plus one).
    pub partitions_behind_days: u32,
    /// Days after today for which partitions exist.
    pub partitions_ahead_days: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            event_retention_days: 365,
            aggregate_retention_days: None,
            partitions_behind_days: 36,
            partitions_ahead_days: 3,
        }
    }
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: Uuid,
    pub name: String,
    pub disabled: bool,
}

/// What an API key allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Ingest,
    Query,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Query => "query",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "ingest" => Some(Scope::Ingest),
            "query" => Some(Scope::Query),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// A stored API key (its hash, never the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub tenant_name: String,
    pub tenant_disabled: bool,
    pub scopes: Vec<Scope>,
    pub label: Option<String>,
    /// Microseconds since the Unix epoch.
    pub expires_at_us: Option<i64>,
    pub revoked: bool,
}

/// A key to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApiKey {
    pub tenant_id: Uuid,
    pub key_hash: [u8; 32],
    /// The first characters of the key, to recognise it in listings.
    pub prefix: String,
    pub scopes: Vec<Scope>,
    pub label: Option<String>,
    pub expires_at_us: Option<i64>,
}

/// A storage failure. Whether to retry is decided by [`StoreError::is_retryable`] alone.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or the transaction did not finish; nothing was stored.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A conflict between concurrent transactions (deadlock, serialization); nothing was stored.
    #[error("transaction conflict: {0}")]
    Conflict(String),
    /// The request itself is wrong (e.g. a tenant name taken).
    #[error("{0}")]
    Invalid(String),
    /// Anything else; a bug or a schema problem.
    #[error("storage error: {0}")]
    Internal(String),
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Conflict(_))
    }

    /// The protocol code that reports this error.
    pub fn code(&self) -> wire::ErrorCode {
        match self {
            StoreError::Unavailable(_) | StoreError::Conflict(_) => wire::ErrorCode::Unavailable,
            StoreError::Invalid(_) => wire::ErrorCode::InvalidEvent,
            StoreError::Internal(_) => wire::ErrorCode::Internal,
        }
    }
}

/// A sum of money, checked: past the decimal range it is an error of the request that asked for
/// it, never a panic or a wrapped value.
pub fn add_money(
    sum: rust_decimal::Decimal,
    value: rust_decimal::Decimal,
) -> Result<rust_decimal::Decimal, StoreError> {
    sum.checked_add(value).ok_or_else(|| StoreError::Invalid("a sum of money is out of range".into()))
}

/// SHA-256 of an API key, the form in which keys are stored and looked up.
pub fn hash_api_key(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}
