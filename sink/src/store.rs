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

/// SHA-256 of an API key, the form in which keys are stored and looked up.
pub fn hash_api_key(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}
