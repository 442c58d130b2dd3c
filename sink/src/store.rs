//! The storage boundary: everything Tally needs from a database, as one [`Store`] over the two
//! backends, PostgreSQL ([`PgStore`]) and an embedded SQLite file ([`SqliteStore`]).
//!
//! Its methods come in two halves, each in its own module: the event path (`events.rs`: commit,
//! fold, ping), which the ingest hot path calls for every batch, and the control plane
//! (`control.rs`: tenants, keys, services, price rules, settings, re-rates, usage, retention),
//! which serves the admin API, the caches in front of the hot path, and background jobs. Each
//! method is a plain `async fn` that matches on the backend and awaits the backend's own
//! method: no boxed future, no forwarder per method.

mod control;
mod events;

use std::sync::Arc;

use uuid::Uuid;

use crate::pg::PgStore;
use crate::sqlite::SqliteStore;

/// A storage backend. Callers share one as `Arc<Store>`; its pools are shared handles.
#[derive(Debug, Clone)]
pub enum Store {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

impl From<PgStore> for Store {
    fn from(store: PgStore) -> Store {
        Store::Postgres(store)
    }
}

impl From<SqliteStore> for Store {
    fn from(store: SqliteStore) -> Store {
        Store::Sqlite(store)
    }
}

/// What one [`Store::fold_rollups`] did, and what it left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FoldReport {
    /// Entries folded and removed.
    pub folded: u64,
    /// Entries still waiting after this fold, as of the fold's snapshot: entries committed while
    /// it ran are not counted (the next fold takes them).
    pub pending: u64,
    /// Commit time (microseconds since the Unix epoch) of the oldest entry still waiting, as of
    /// the fold's snapshot.
    pub oldest_pending_us: Option<i64>,
    /// Another process was folding, so this one neither folded nor measured anything.
    pub skipped: bool,
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
            other => return Err(StoreError::internal(format!("unknown re-rate status {other:?}"))),
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
    /// TimescaleDB only (`usage_events` a hypertable): raw-event chunks older than this many days
    /// are compressed by TimescaleDB's compression policy; `None` sets no policy. Ignored on
    /// native partitions and SQLite.
    pub event_compress_after_days: Option<u32>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            event_retention_days: 365,
            aggregate_retention_days: None,
            partitions_behind_days: 36,
            partitions_ahead_days: 3,
            event_compress_after_days: Some(7),
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

/// The error beneath a [`StoreError`], shared because one failed commit is answered to every
/// submitter of its batch (so the error must be `Clone`).
pub type ErrorSource = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// A storage failure: what was being done, and the error that stopped it ([`source`]). Whether
/// to retry is decided by [`StoreError::is_retryable`] alone.
///
/// Its text names the cause too ("storage unavailable: commit a batch: pool timed out ..."), so
/// one log line of it says everything, as sqlx's own errors do; [`source`] gives the cause
/// itself to callers that inspect it.
///
/// [`source`]: std::error::Error::source
#[derive(Debug, Clone)]
pub enum StoreError {
    /// The database could not be reached or the transaction did not finish; nothing was stored.
    Unavailable { message: String, source: Option<ErrorSource> },
    /// A conflict between concurrent transactions (deadlock, serialization); nothing was stored.
    Conflict { message: String, source: Option<ErrorSource> },
    /// The request itself is wrong (e.g. a tenant name taken). The message is written for the
    /// client and is the whole text of the error.
    Invalid { message: String, source: Option<ErrorSource> },
    /// Anything else; a bug or a schema problem.
    Internal { message: String, source: Option<ErrorSource> },
}

impl StoreError {
    pub fn unavailable(message: impl Into<String>) -> StoreError {
        StoreError::Unavailable { message: message.into(), source: None }
    }

    pub fn conflict(message: impl Into<String>) -> StoreError {
        StoreError::Conflict { message: message.into(), source: None }
    }

    pub fn invalid(message: impl Into<String>) -> StoreError {
        StoreError::Invalid { message: message.into(), source: None }
    }

    pub fn internal(message: impl Into<String>) -> StoreError {
        StoreError::Internal { message: message.into(), source: None }
    }

    /// The same error, caused by `source`.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> StoreError {
        *self.parts_mut().1 = Some(Arc::new(source));
        self
    }

    /// The same error, its message prefixed with what was being done ("commit a batch"). An
    /// invalid request's message is for the client and stays as it is.
    pub(crate) fn doing(mut self, what: &str) -> StoreError {
        if let StoreError::Invalid { .. } = self {
            return self;
        }
        let message = self.parts_mut().0;
        *message = if message.is_empty() { what.to_owned() } else { format!("{what}: {message}") };
        self
    }

    /// What was being done, or (for [`StoreError::Invalid`]) what is wrong with the request.
    pub fn message(&self) -> &str {
        match self {
            StoreError::Unavailable { message, .. }
            | StoreError::Conflict { message, .. }
            | StoreError::Invalid { message, .. }
            | StoreError::Internal { message, .. } => message,
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. } | StoreError::Conflict { .. })
    }

    /// The protocol code that reports this error.
    pub fn code(&self) -> wire::ErrorCode {
        match self {
            StoreError::Unavailable { .. } | StoreError::Conflict { .. } => wire::ErrorCode::Unavailable,
            StoreError::Invalid { .. } => wire::ErrorCode::InvalidEvent,
            StoreError::Internal { .. } => wire::ErrorCode::Internal,
        }
    }

    fn parts_mut(&mut self) -> (&mut String, &mut Option<ErrorSource>) {
        match self {
            StoreError::Unavailable { message, source }
            | StoreError::Conflict { message, source }
            | StoreError::Invalid { message, source }
            | StoreError::Internal { message, source } => (message, source),
        }
    }

    fn source_ref(&self) -> Option<&ErrorSource> {
        match self {
            StoreError::Unavailable { source, .. }
            | StoreError::Conflict { source, .. }
            | StoreError::Invalid { source, .. }
            | StoreError::Internal { source, .. } => source.as_ref(),
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            StoreError::Invalid { message, .. } => return f.write_str(message),
            StoreError::Unavailable { .. } => "storage unavailable",
            StoreError::Conflict { .. } => "transaction conflict",
            StoreError::Internal { .. } => "storage error",
        };
        f.write_str(kind)?;
        let message = self.message();
        if !message.is_empty() {
            write!(f, ": {message}")?;
        }
        match self.source_ref() {
            Some(source) => write!(f, ": {source}"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for StoreError {
    /// The error itself, not the `Arc` around it, so that callers can downcast it.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source_ref().map(|source| &**source as &(dyn std::error::Error + 'static))
    }
}

/// A sum of money, checked: past the decimal range it is an error of the request that asked for
/// it, never a panic or a wrapped value.
pub fn add_money(
    sum: rust_decimal::Decimal,
    value: rust_decimal::Decimal,
) -> Result<rust_decimal::Decimal, StoreError> {
    sum.checked_add(value).ok_or_else(|| StoreError::invalid("a sum of money is out of range"))
}

/// SHA-256 of an API key, the form in which keys are stored and looked up.
pub fn hash_api_key(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::StoreError;

    #[derive(Debug, thiserror::Error)]
    #[error("connection reset")]
    struct Reset;

    #[test]
    fn the_source_is_the_cause_itself_and_survives_clones() {
        let error = StoreError::unavailable(String::new()).with_source(Reset).doing("commit a batch");
        assert_eq!(error.to_string(), "storage unavailable: commit a batch: connection reset");
        let copy = error.clone();
        assert!(copy.source().is_some_and(|source| source.is::<Reset>()), "downcasts to the cause");
        assert!(copy.is_retryable());
        assert_eq!(copy.code(), wire::ErrorCode::Unavailable);
    }

    #[test]
    fn kinds_keep_their_retry_rule_and_code() {
        let cases = [
            (StoreError::unavailable("x"), true, wire::ErrorCode::Unavailable),
            (StoreError::conflict("x"), true, wire::ErrorCode::Unavailable),
            (StoreError::invalid("x"), false, wire::ErrorCode::InvalidEvent),
            (StoreError::internal("x"), false, wire::ErrorCode::Internal),
        ];
        for (error, retryable, code) in cases {
            assert_eq!(error.is_retryable(), retryable, "{error:?}");
            assert_eq!(error.code(), code, "{error:?}");
        }
    }

    #[test]
    fn an_invalid_request_reads_as_its_message_alone() {
        let error = StoreError::invalid("a tenant named \"acme\" exists already").with_source(Reset);
        let error = error.doing("create a tenant");
        assert_eq!(error.to_string(), "a tenant named \"acme\" exists already");
        assert_eq!(error.message(), "a tenant named \"acme\" exists already");
        assert!(error.source().is_some());
    }
}
