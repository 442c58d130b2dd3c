//! Durable storage of usage events: bounded queues from the edge, batching, one transaction per
//! batch that inserts with binary `COPY`, deduplicates and grows the hourly rollups, and acks
//! released only after the commit.
//!
//! The storage boundary is [`Store`], an enum over the two backends: [`pg::PgStore`] for
//! PostgreSQL and [`sqlite::SqliteStore`] for an embedded SQLite file. Its methods come in two
//! halves, the event path (commit, fold, ping) and the control plane (everything else).

pub mod fold;
pub mod overflow;
pub mod pg;
mod queue;
pub mod rollup;
mod row;
pub mod sqlite;
mod store;
mod worker;

pub use fold::{FoldLimits, run_folder};
pub use queue::{CommitResult, IngestQueue, QueueLimits, Submission, SubmitError, WhenFull};
pub use row::{
    EventRow, FLAG_OVER_QUOTA, Outcome, QUANTITY_DECIMAL_PLACES, QUANTITY_KINDS, quantity_decimal,
};
pub use store::{
    ApiKey, ApiKeyInfo, ErrorSource, NewApiKey, Repriced, RerateBatch, RerateRequest, RerateRun, Retention,
    Scope, ServiceRecord, Store, StoreError, StoredPriceRule, Tenant, TenantSettings, add_money,
    hash_api_key,
};
pub use store::{FoldReport, RerateRecord, RerateStart, RerateStatus};
pub use worker::{BatchLimits, WorkerHealth, spawn_workers};
