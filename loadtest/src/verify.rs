//! After a run: does the database hold exactly what the server acknowledged? Per tenant: every
//! acked event stored once, nothing stored that was not sent, no rejected event stored, ack
//! counts consistent with resends, and hourly rollups equal to sums over the raw events.
//!
//! The checks are made here, the same for every backend; a backend ([`Reader`], `pg`, `sqlite`)
//! only reads rows: key to tenant, stored event ids, raw events and rollup rows. Sums are made
//! in exact decimals in [`rollups`].

mod pg;
pub mod rollups;
mod sqlite;

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection, SqliteConnection};
use uuid::Uuid;

use crate::ledger::TenantLedger;

/// Ids quoted in a problem's description.
const EXAMPLES_MAX: usize = 3;

/// The verdict, with a line per problem.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verification {
    pub passed: bool,
    pub problems: Vec<String>,
    pub tenants: Vec<TenantCheck>,
}

/// What was compared for one tenant.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TenantCheck {
    pub tenant_id: Uuid,
    /// Rows of this run's events in `usage_events`.
    pub stored_rows: u64,
    /// Distinct event ids acknowledged as stored or duplicate.
    pub distinct_acked: u64,
    pub acked_stored: u64,
    pub acked_duplicate: u64,
    pub resends_acked: u64,
    pub invalid_rejected: u64,
    /// Events without a final answer (they may or may not be stored).
    pub unacked: u64,
    /// Rows in the compared time range that this run did not send (only outside `--spawn`).
    pub other_rows: u64,
    pub rollup_rows_compared: u64,
}

/// Whether the run owns every row of its tenants (`--spawn`), or shares them with other writers,
/// in which case only this run's events and the hours they fall in are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Exclusive,
    Shared,
}

/// The database a run is verified against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// A PostgreSQL URL.
    Postgres(String),
    /// The embedded backend's SQLite file (`tally.db`).
    Sqlite(PathBuf),
}

impl Database {
    /// One line for the report: version and settings.
    pub async fn describe(&self) -> Result<String> {
        match self {
            Database::Postgres(url) => crate::spawn::describe_postgres(url).await,
            Database::Sqlite(path) => {
                let mut connection = sqlite::connect(path).await?;
                let version: String =
                    sqlx::query_scalar("SELECT sqlite_version()").fetch_one(&mut connection).await?;
                let journal: String =
                    sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut connection).await?;
                connection.close().await?;
                Ok(format!("SQLite {version} (embedded), journal_mode={journal}, {}", path.display()))
            }
        }
    }
}

/// An open connection to either backend; each method reads one kind of row.
enum Reader {
    Postgres(PgConnection),
    Sqlite(SqliteConnection),
}

impl Reader {
    async fn open(database: &Database) -> Result<Reader> {
        Ok(match database {
            Database::Postgres(url) => {
                let options: PgConnectOptions = url.parse().context("invalid database URL")?;
                // Reading a whole run's raw events is slow by design; sqlx would warn about it.
                let options = options.disable_statement_logging();
                Reader::Postgres(options.connect().await.context("failed to connect for verification")?)
            }
            Database::Sqlite(path) => Reader::Sqlite(sqlite::connect(path).await?),
        })
    }

    async fn tenant_of_key(&mut self, key_hash: &[u8]) -> Result<Option<Uuid>> {
        match self {
            Reader::Postgres(connection) => pg::tenant_of_key(connection, key_hash).await,
            Reader::Sqlite(connection) => sqlite::tenant_of_key(connection, key_hash).await,
        }
    }

    async fn stored_ids(&mut self, tenant_id: Uuid, hours: Option<(i64, i64)>) -> Result<Vec<u128>> {
        match self {
            Reader::Postgres(connection) => pg::stored_ids(connection, tenant_id, hours).await,
            Reader::Sqlite(connection) => sqlite::stored_ids(connection, tenant_id, hours).await,
        }
    }

    async fn raw_sums(&mut self, tenant_id: Uuid, hours: Option<(i64, i64)>) -> Result<rollups::RawSums> {
        match self {
            Reader::Postgres(connection) => pg::raw_sums(connection, tenant_id, hours).await,
            Reader::Sqlite(connection) => sqlite::raw_sums(connection, tenant_id, hours).await,
        }
    }

    async fn rollups(
        &mut self,
        tenant_id: Uuid,
        hours: Option<(i64, i64)>,
    ) -> Result<Vec<rollups::StoredRollup>> {
        match self {
            Reader::Postgres(connection) => pg::rollups(connection, tenant_id, hours, true).await,
            Reader::Sqlite(connection) => sqlite::rollups(connection, tenant_id, hours).await,
        }
    }

    /// PostgreSQL's user-less rollups (SQLite has none).
    async fn service_rollups(
        &mut self,
        tenant_id: Uuid,
        hours: Option<(i64, i64)>,
    ) -> Result<Option<Vec<rollups::StoredRollup>>> {
        match self {
            Reader::Postgres(connection) => Ok(Some(pg::rollups(connection, tenant_id, hours, false).await?)),
            Reader::Sqlite(_) => Ok(None),
        }
    }

    /// Starts one read-only snapshot that the following reads share.
    async fn begin_snapshot(&mut self) -> Result<()> {
        match self {
            Reader::Postgres(connection) => {
                sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(connection).await?;
            }
            Reader::Sqlite(connection) => {
                sqlx::query("BEGIN").execute(connection).await?;
            }
        }
        Ok(())
    }

    async fn end_snapshot(&mut self) -> Result<()> {
        match self {
            Reader::Postgres(connection) => {
                sqlx::query("ROLLBACK").execute(connection).await?;
            }
            Reader::Sqlite(connection) => {
                sqlx::query("ROLLBACK").execute(connection).await?;
            }
        }
        Ok(())
    }

    async fn close(self) -> Result<()> {
        match self {
            Reader::Postgres(connection) => connection.close().await?,
            Reader::Sqlite(connection) => connection.close().await?,
        }
        Ok(())
    }
}

/// Rollups against raw events at one instant of a run, in one snapshot of the database.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InstantCheck {
    /// Seconds into the run at which the snapshot was taken.
    pub at_s: f64,
    /// Raw events in the snapshot, over the run's tenants.
    pub raw_events: u64,
    /// Rollup keys compared.
    pub rollup_rows_compared: u64,
    pub problems: Vec<String>,
}

/// Checks, in one snapshot (a repeatable-read transaction on PostgreSQL, a read transaction on
/// SQLite), that each tenant's rollups as readers see them (folded plus not yet folded) equal
/// the sums of its raw events. Taken while events are still arriving, it shows that the
/// invariant holds at every instant, not only once the materializer has caught up.
pub async fn check_rollups_now(database: &Database, api_keys: &[String], at_s: f64) -> Result<InstantCheck> {
    let mut reader = Reader::open(database).await?;
    reader.begin_snapshot().await?;
    let mut check = InstantCheck { at_s, ..InstantCheck::default() };
    for key in api_keys {
        let tenant_id = reader
            .tenant_of_key(&sink::hash_api_key(key)[..])
            .await?
            .context("an API key of the run is not in this database")?;
        check.raw_events += reader.stored_ids(tenant_id, None).await?.len() as u64;
        let mut problems = Vec::new();
        check.rollup_rows_compared += check_rollups(&mut reader, tenant_id, None, &mut problems).await?;
        check.problems.extend(problems.into_iter().map(|problem| format!("tenant {tenant_id}: {problem}")));
    }
    reader.end_snapshot().await?;
    reader.close().await?;
    Ok(check)
}

/// Checks every tenant's ledger (in the order of `api_keys`) against the database.
pub async fn verify(
    database: &Database,
    api_keys: &[String],
    ledgers: &[TenantLedger],
    scope: Scope,
) -> Result<Verification> {
    let mut reader = Reader::open(database).await?;
    let mut verification = Verification::default();
    for (key, ledger) in api_keys.iter().zip(ledgers) {
        let tenant_id = reader
            .tenant_of_key(&sink::hash_api_key(key)[..])
            .await?
            .context("an API key of the run is not in this database")?;
        let mut problems = Vec::new();
        let check = verify_tenant(&mut reader, tenant_id, ledger, scope, &mut problems).await?;
        verification
            .problems
            .extend(problems.into_iter().map(|problem| format!("tenant {tenant_id}: {problem}")));
        verification.tenants.push(check);
    }
    reader.close().await?;
    verification.passed = verification.problems.is_empty();
    Ok(verification)
}

async fn verify_tenant(
    reader: &mut Reader,
    tenant_id: Uuid,
    ledger: &TenantLedger,
    scope: Scope,
    problems: &mut Vec<String>,
) -> Result<TenantCheck> {
    let hours = match (scope, ledger.timestamp_min_us, ledger.timestamp_max_us) {
        (Scope::Shared, Some(min), Some(max)) => Some((hour_floor(min), hour_floor(max) + HOUR_US)),
        _ => None,
    };
    let mut stored = reader.stored_ids(tenant_id, hours).await?;
    stored.sort_unstable();
    let before = stored.len();
    stored.dedup();
    if stored.len() != before {
        problems.push(format!("{} event ids are stored more than once", before - stored.len()));
    }
    let accepted = sorted_set(&ledger.accepted_ids);
    let unacked = sorted_set(&ledger.unacked_ids);
    let missing = difference(&accepted, &stored);
    report(problems, &missing, "acknowledged events are not stored");
    report(
        problems,
        &intersection(&sorted_set(&ledger.invalid_rejected_ids), &stored),
        "rejected events are stored",
    );
    report(
        problems,
        &sorted_set(&ledger.invalid_accepted_ids),
        "invalid events were accepted instead of rejected",
    );
    if ledger.unexpected_rejections > 0 {
        problems.push(format!(
            "{} valid events were rejected, e.g. {}",
            ledger.unexpected_rejections,
            ledger.rejection_samples.join("; ")
        ));
    }
    let unexplained = difference(&difference(&stored, &accepted), &unacked);
    let other_rows = match scope {
        Scope::Exclusive => {
            report(problems, &unexplained, "stored events were never sent or acknowledged");
            0
        }
        Scope::Shared => unexplained.len() as u64,
    };
    check_ack_counts(ledger, accepted.len() as u64, unacked.is_empty(), problems);
    let rollup_rows_compared = check_rollups(reader, tenant_id, hours, problems).await?;
    Ok(TenantCheck {
        tenant_id,
        stored_rows: stored.len() as u64 - other_rows,
        distinct_acked: accepted.len() as u64,
        acked_stored: ledger.acked_stored,
        acked_duplicate: ledger.acked_duplicate,
        resends_acked: ledger.resends_accepted,
        invalid_rejected: ledger.invalid_rejected_ids.len() as u64,
        unacked: unacked.len() as u64,
        other_rows,
        rollup_rows_compared,
    })
}

/// Every event accepted more than once was a deliberate resend, and the acks' stored and
/// duplicate counts split the accepted events exactly so. Only when every batch was answered:
/// an unanswered batch may have stored events whose resends then came back as duplicates.
fn check_ack_counts(
    ledger: &TenantLedger,
    distinct_acked: u64,
    all_answered: bool,
    problems: &mut Vec<String>,
) {
    let acked_events = ledger.accepted_ids.len() as u64;
    if ledger.acked_stored + ledger.acked_duplicate != acked_events {
        problems.push(format!(
            "acks count {} stored + {} duplicate, but {acked_events} events were accepted",
            ledger.acked_stored, ledger.acked_duplicate
        ));
    }
    if !all_answered {
        if ledger.acked_stored > distinct_acked {
            problems.push(format!(
                "acks count {} stored, more than the {distinct_acked} distinct events",
                ledger.acked_stored
            ));
        }
        return;
    }
    if ledger.acked_stored != distinct_acked {
        problems.push(format!(
            "acks count {} stored, but {distinct_acked} distinct events were acknowledged",
            ledger.acked_stored
        ));
    }
    let repeats = acked_events - distinct_acked;
    if repeats != ledger.resends_accepted {
        problems.push(format!(
            "{repeats} events were acknowledged more than once, but {} resends were sent and acknowledged",
            ledger.resends_accepted
        ));
    }
}

const HOUR_US: i64 = 3_600_000_000;

fn hour_floor(timestamp_us: i64) -> i64 {
    timestamp_us.div_euclid(HOUR_US) * HOUR_US
}

/// Compares every rollup row of the tenant (in the hours) with sums over its raw events.
async fn check_rollups(
    reader: &mut Reader,
    tenant_id: Uuid,
    hours: Option<(i64, i64)>,
    problems: &mut Vec<String>,
) -> Result<u64> {
    let raw = reader.raw_sums(tenant_id, hours).await?;
    if let Some(stored) = reader.service_rollups(tenant_id, hours).await? {
        let comparison = rollups::compare(raw.without_users(), stored);
        let differing = comparison.mismatched + comparison.custom_mismatched + comparison.bad_buckets;
        if differing > 0 {
            problems.push(format!(
                "{differing} differences between the {} user-less rollup rows and their raw events",
                comparison.compared
            ));
        }
    }
    let stored = reader.rollups(tenant_id, hours).await?;
    let comparison = rollups::compare(raw, stored);
    if comparison.mismatched > 0 {
        problems.push(format!(
            "{} of {} rollup rows differ from the sums of their raw events",
            comparison.mismatched, comparison.compared
        ));
    }
    if comparison.custom_mismatched > 0 {
        problems.push(format!(
            "{} custom quantity sums in rollups differ from their raw events",
            comparison.custom_mismatched
        ));
    }
    if comparison.bad_buckets > 0 {
        problems.push(format!(
            "{} rollup rows have latency histograms that do not add up",
            comparison.bad_buckets
        ));
    }
    Ok(comparison.compared)
}

fn sorted_set(ids: &[u128]) -> Vec<u128> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Elements of sorted `a` not in sorted `b`.
fn difference(a: &[u128], b: &[u128]) -> Vec<u128> {
    a.iter().copied().filter(|id| b.binary_search(id).is_err()).collect()
}

fn intersection(a: &[u128], b: &[u128]) -> Vec<u128> {
    a.iter().copied().filter(|id| b.binary_search(id).is_ok()).collect()
}

fn report(problems: &mut Vec<String>, ids: &[u128], what: &str) {
    if ids.is_empty() {
        return;
    }
    let examples: Vec<String> =
        ids.iter().take(EXAMPLES_MAX).map(|id| Uuid::from_u128(*id).to_string()).collect();
    problems.push(format!("{} {what}, e.g. {}", ids.len(), examples.join(", ")));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_helpers() {
        let a = sorted_set(&[5, 1, 3, 3]);
        assert_eq!(a, [1, 3, 5]);
        assert_eq!(difference(&a, &[3]), [1, 5]);
        assert_eq!(intersection(&a, &[3, 4, 5]), [3, 5]);
        assert_eq!(hour_floor(HOUR_US * 5 + 17), HOUR_US * 5);
    }

    #[test]
    fn ack_counts_must_match_resends() {
        let ledger = TenantLedger {
            accepted_ids: vec![1, 2, 2, 3],
            acked_stored: 3,
            acked_duplicate: 1,
            resends_accepted: 1,
            ..TenantLedger::default()
        };
        let mut problems = Vec::new();
        check_ack_counts(&ledger, 3, true, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let wrong = TenantLedger { acked_stored: 4, acked_duplicate: 1, ..ledger.clone() };
        check_ack_counts(&wrong, 3, true, &mut problems);
        assert_eq!(problems.len(), 2, "{problems:?}");
        let mut lenient = Vec::new();
        check_ack_counts(
            &TenantLedger { acked_stored: 2, acked_duplicate: 2, ..ledger },
            3,
            false,
            &mut lenient,
        );
        assert!(
            lenient.is_empty(),
            "with unanswered batches a resend may come back as duplicate: {lenient:?}"
        );
    }
}
