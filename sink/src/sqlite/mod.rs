//! The embedded backend: one SQLite file in WAL mode, so Tally runs with nothing else installed.
//!
//! The same guarantees as [`crate::pg::PgStore`]: a batch is one transaction that inserts the new
//! rows (dedup on tenant, timestamp and event id), grows the hourly rollups by exactly those rows,
//! and commits before anything is acknowledged. What differs, all of it because of SQLite:
//!
//! - **One writer.** SQLite lets one connection write at a time, so every write goes through a
//!   single dedicated connection (a pool of one) and callers queue for it instead of failing with
//!   `SQLITE_BUSY`; reads use a separate pool and never wait for the writer (WAL).
//! - **Durability.** `synchronous=FULL` by default: with WAL, each commit is fsynced before it
//!   returns, so an ack survives a power loss. [`Synchronous::Normal`] skips that fsync (commits
//!   reach the disk at the next checkpoint): it survives a crash of the process, not of the
//!   machine, and so must not back `durable` acks.
//! - **Exact decimals as text.** SQLite has no decimal type; quantities and money are stored as
//!   the decimal's text and every sum (rollups, month usage, re-rating) is made in Rust with
//!   `rust_decimal`, never with SQLite's floating point.
//! - **UTC quota months.** There is no time zone database in the process: month-to-date usage
//!   for quotas counts from the start of the UTC month, whatever the tenant's time zone, and a
//!   time zone is only checked for its shape (`UTC`, `Area/Location`).
//! - **Retention by delete.** There are no partitions: [`crate::Store::maintain`] deletes raw events
//!   and rollups past retention in chunks of [`DELETE_CHUNK_ROWS`]. Freed pages are reused by
//!   later inserts; the file does not shrink.

mod control;
mod ingest;
mod rerate;
mod rerate_jobs;
mod rollups;
mod values;

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::store::{Retention, StoreError};

/// Raw events or rollups deleted per statement by retention, so that the writer is never held
/// for long and ingest goes on between chunks.
pub const DELETE_CHUNK_ROWS: u32 = 10_000;

/// The file name of the database inside a data directory.
pub const DATABASE_FILE_NAME: &str = "tally.db";

/// When a commit reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// Every commit is fsynced before it returns: an ack survives a power loss. The default.
    Full,
    /// Commits are fsynced at checkpoints only: an ack survives a crash of the process, but a
    /// power loss or kernel crash may lose the last commits (the file stays consistent).
    Normal,
}

/// Settings of the SQLite backend.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Default [`Synchronous::Full`].
    pub synchronous: Synchronous,
    /// Connections for reads (key look-ups, settings, listings). Default 4.
    pub read_connections: u32,
    /// How long a statement waits for a lock held by another process (`busy_timeout`).
    /// Default 5 s.
    pub busy_timeout: Duration,
    /// How long a caller waits for the writer before the store is unavailable. Default 30 s.
    pub writer_wait: Duration,
    /// Page cache of the writer in KiB. Default 64 MiB.
    pub writer_cache_kib: u32,
    /// Page size of a new database file (an existing file keeps its own). Default 4096.
    pub page_size_bytes: u32,
    /// WAL size in pages that triggers a checkpoint. Default 16,384 (64 MiB of 4 KiB pages).
    pub wal_autocheckpoint_pages: u32,
    /// Rollup rows whose totals the writer keeps in memory, so that batches add to them without
    /// reading them back (about 1 KiB each). Default 100,000; 0 turns the cache off.
    pub rollup_cache_rows: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Full,
            read_connections: 4,
            busy_timeout: Duration::from_secs(5),
            writer_wait: Duration::from_secs(30),
            writer_cache_kib: 64 * 1024,
            page_size_bytes: 4096,
            wal_autocheckpoint_pages: 16_384,
            rollup_cache_rows: 100_000,
        }
    }
}

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The one connection that writes.
    writer: SqlitePool,
    /// Connections that only read.
    readers: SqlitePool,
    path: PathBuf,
    statements: std::sync::Arc<ingest::Statements>,
    rollup_cache: std::sync::Arc<rollups::RollupCache>,
    /// The `ingested_at` of the last commit (see `ingest.rs`).
    last_ingested_at_us: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

/// Creates the database file readable and writable by this user only (0600), like the key file
/// next to it: it holds every tenant's usage and key hashes. SQLite gives the `-wal` and `-shm`
/// files the database file's permissions. An existing file is left as it is.
fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(StoreError::unavailable(format!("create {}", path.display())).with_source(error)),
    }
}

impl SqliteStore {
    /// Opens (creating it and its directory if needed) the database at `path` with default
    /// options, and applies the migrations it lacks.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        Self::open_with(path, &SqliteOptions::default()).await
    }

    /// Like [`SqliteStore::open`], with options.
    pub async fn open_with(
        path: impl AsRef<Path>,
        options: &SqliteOptions,
    ) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent).await.map_err(|error| {
                StoreError::unavailable(format!("create {}", parent.display())).with_source(error)
            })?;
        }
        create_private(&path)?;
        let synchronous = match options.synchronous {
            Synchronous::Full => SqliteSynchronous::Full,
            Synchronous::Normal => SqliteSynchronous::Normal,
        };
        let common = SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(options.busy_timeout)
            .foreign_keys(true)
            .statement_cache_capacity(256);
        let writer_options = common
            .clone()
            .create_if_missing(true)
            .page_size(options.page_size_bytes)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .pragma("cache_size", format!("-{}", options.writer_cache_kib))
            .pragma("wal_autocheckpoint", options.wal_autocheckpoint_pages.to_string())
            .pragma("journal_size_limit", (256u64 << 20).to_string())
            .pragma("temp_store", "memory");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(options.writer_wait)
            .test_before_acquire(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(writer_options)
            .await
            .map_err(|error| {
                StoreError::unavailable(format!("open {}", path.display())).with_source(error)
            })?;
        let readers = SqlitePoolOptions::new()
            .max_connections(options.read_connections.max(1))
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(common.pragma("query_only", "ON"));
        let store = SqliteStore {
            writer,
            readers,
            path,
            statements: std::sync::Arc::new(ingest::Statements::new()),
            rollup_cache: std::sync::Arc::new(rollups::RollupCache::new(options.rollup_cache_rows)),
            last_ingested_at_us: std::sync::Arc::new(std::sync::atomic::AtomicI64::new(i64::MIN)),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the migrations in `migrations/sqlite` that this database lacks.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("../migrations/sqlite")
            .run(&self.writer)
            .await
            .map_err(|error| StoreError::internal("migrate the database").with_source(error))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The read pool, for callers that inspect the database (tests, tools).
    pub fn readers(&self) -> &SqlitePool {
        &self.readers
    }

    /// Whether the database answers.
    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.readers).await.map_err(classify)?;
        Ok(())
    }

    /// Closes both pools; the WAL is checkpointed when the last connection closes.
    pub async fn close(&self) {
        self.readers.close().await;
        self.writer.close().await;
    }

    pub(crate) async fn maintain(&self, retention: &Retention) -> Result<(), StoreError> {
        let now_us = values::now_us();
        let day_us = 86_400_000_000i64;
        let today_us = now_us.div_euclid(day_us) * day_us;
        let events_before_us = today_us - i64::from(retention.event_retention_days) * day_us;
        let deleted_events = self.delete_per_tenant(Table::Events, events_before_us).await?;
        let mut deleted_rollups = 0;
        if let Some(days) = retention.aggregate_retention_days {
            let rollups_before_us = now_us - i64::from(days) * day_us;
            deleted_rollups = self.delete_per_tenant(Table::Rollups, rollups_before_us).await?;
        }
        tracing::info!(deleted_events, deleted_rollups, "retention maintenance done");
        Ok(())
    }

    /// Deletes rows older than `before_us`, one tenant and at most [`DELETE_CHUNK_ROWS`] rows
    /// per statement (each its own transaction). Tenants are found by walking the primary key,
    /// so rows of tenants no longer in `tenants` go too.
    async fn delete_per_tenant(&self, table: Table, before_us: i64) -> Result<u64, StoreError> {
        let (next_tenant, delete_chunk) = table.statements();
        let mut deleted = 0;
        let mut after = Vec::new();
        loop {
            let tenant: Option<Vec<u8>> = sqlx::query_scalar(next_tenant)
                .bind(&after)
                .fetch_optional(&self.readers)
                .await
                .map_err(classify)?;
            let Some(tenant) = tenant else { return Ok(deleted) };
            loop {
                let mut writer = self.writer.acquire().await.map_err(classify)?;
                let result = sqlx::query(delete_chunk)
                    .bind(&tenant)
                    .bind(before_us)
                    .bind(DELETE_CHUNK_ROWS)
                    .execute(&mut *writer)
                    .await;
                // Cached totals of deleted rollup rows must not be added to; cleared while the
                // writer is still held, so the next batch reads what is left.
                if let Table::Rollups = table {
                    self.rollup_cache.clear();
                }
                drop(writer);
                let result = result.map_err(classify)?;
                deleted += result.rows_affected();
                if result.rows_affected() < u64::from(DELETE_CHUNK_ROWS) {
                    break;
                }
            }
            after = tenant;
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Table {
    Events,
    Rollups,
}

impl Table {
    /// The next tenant id after `?1` with rows, and the chunked delete of one tenant's rows.
    fn statements(self) -> (&'static str, &'static str) {
        match self {
            Table::Events => (
                "SELECT tenant_id FROM usage_events WHERE tenant_id > ?1 ORDER BY tenant_id LIMIT 1",
                "DELETE FROM usage_events WHERE tenant_id = ?1 AND (occurred_at, event_id) IN \
                   (SELECT occurred_at, event_id FROM usage_events WHERE tenant_id = ?1 AND occurred_at < ?2 \
                    ORDER BY occurred_at LIMIT ?3)",
            ),
            Table::Rollups => (
                "SELECT tenant_id FROM usage_rollup_hourly WHERE tenant_id > ?1 ORDER BY tenant_id LIMIT 1",
                "DELETE FROM usage_rollup_hourly WHERE tenant_id = ?1 AND \
                   (hour, service_type, service_provider, model, user_id, event_type) IN \
                   (SELECT hour, service_type, service_provider, model, user_id, event_type FROM usage_rollup_hourly \
                    WHERE tenant_id = ?1 AND hour < ?2 ORDER BY hour LIMIT ?3)",
            ),
        }
    }
}

/// Whether an SQLite error is worth retrying. Decided here for every SQLite call. The error is
/// kept as the source; the message is left for the [`crate::Store`] method, which knows what was
/// being done.
pub(crate) fn classify(error: sqlx::Error) -> StoreError {
    let kind = match &error {
        sqlx::Error::Database(db) => {
            let code: i32 = db.code().and_then(|code| code.parse().ok()).unwrap_or_default();
            match (code, code & 0xff) {
                // SQLITE_BUSY_SNAPSHOT: a read snapshot went stale; retrying at once succeeds.
                // SQLITE_LOCKED: a conflict inside this process.
                (517, _) | (_, 6) => StoreError::conflict(String::new()),
                // SQLITE_BUSY after `busy_timeout`: another process has held the write lock
                // that long, which is an outage, not a conflict worth retrying at once.
                // SQLITE_NOMEM, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN.
                (_, 5 | 7 | 8 | 10 | 13 | 14) => StoreError::unavailable(String::new()),
                _ => StoreError::internal(String::new()),
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::unavailable(String::new()),
        _ => StoreError::internal(String::new()),
    };
    kind.with_source(error)
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::UniqueViolation)
}
