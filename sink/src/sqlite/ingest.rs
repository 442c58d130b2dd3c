//! The ingest transaction, under one `BEGIN IMMEDIATE`: the batch is inserted with multi-row
//! `INSERT ... ON CONFLICT DO NOTHING`, outcomes come from the rows SQLite inserted, and the
//! rollups grow by exactly those rows (`rollups.rs`).
//!
//! Like `PgStore`, two paths, but per chunk of rows. The fast path inserts a chunk and checks
//! the count of rows inserted: when all are new, all are `Stored` and nothing is read back. When
//! the chunk inserted fewer rows than it has (a resend), it is rolled back to a savepoint taken
//! before it and inserted again with `RETURNING`, to learn which rows are new.
//!
//! Statements have a bounded set of shapes: rows go in chunks of [`ROWS_PER_STATEMENT_MAX`] and
//! then powers of two, so a batch of any size uses at most ten prepared statements per kind and
//! every one of them stays in the connection's statement cache.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;

use sqlx::sqlite::{SqliteArguments, SqliteConnection, SqliteRow};
use sqlx::{Arguments, AssertSqlSafe, Connection, Row};
use uuid::Uuid;

use super::rollups::{self, ROLLUP_COLUMNS};
use super::values::{self, quantities_json};
use super::{SqliteStore, classify};
use crate::rollup;
use crate::row::{EventRow, Outcome, QUANTITY_KINDS};
use crate::store::StoreError;

/// Rows per statement at most. SQLite binds at most 32,766 parameters per statement; an event
/// has 29 columns, a rollup row 25.
pub(super) const ROWS_PER_STATEMENT_MAX: usize = 512;
const CHUNK_SHAPES: usize = ROWS_PER_STATEMENT_MAX.trailing_zeros() as usize + 1;
const EVENT_COLUMNS: usize = 20 + QUANTITY_KINDS;

const _: () = assert!(ROWS_PER_STATEMENT_MAX.is_power_of_two());
const _: () = assert!(ROWS_PER_STATEMENT_MAX * EVENT_COLUMNS <= 32_766);
const _: () = assert!(ROWS_PER_STATEMENT_MAX * ROLLUP_COLUMNS <= 32_766);

/// The statement texts, one per chunk shape (index `log2(rows)`).
#[derive(Debug)]
pub(super) struct Statements {
    insert_events: Vec<Arc<str>>,
    insert_events_returning: Vec<Arc<str>>,
    pub(super) select_rollups: Vec<Arc<str>>,
    pub(super) upsert_rollups: Vec<Arc<str>>,
}

impl Statements {
    pub(super) fn new() -> Statements {
        let shapes = || (0..CHUNK_SHAPES).map(|shape| 1usize << shape);
        let returning = " RETURNING tenant_id, event_id, occurred_at";
        Statements {
            insert_events: shapes().map(|rows| insert_events_sql(rows).into()).collect(),
            insert_events_returning: shapes()
                .map(|rows| (insert_events_sql(rows) + returning).into())
                .collect(),
            select_rollups: shapes().map(|rows| rollups::select_sql(rows).into()).collect(),
            upsert_rollups: shapes().map(|rows| rollups::upsert_sql(rows).into()).collect(),
        }
    }
}

/// Splits `total` rows into chunk lengths: full chunks, then the binary digits of the rest.
pub(super) fn chunk_lengths(total: usize) -> impl Iterator<Item = usize> {
    let full = total / ROWS_PER_STATEMENT_MAX;
    let rest = total % ROWS_PER_STATEMENT_MAX;
    std::iter::repeat_n(ROWS_PER_STATEMENT_MAX, full)
        .chain((0..CHUNK_SHAPES).rev().map(|shape| 1usize << shape).filter(move |bit| rest & bit != 0))
}

/// Consecutive ranges of `total` rows, one per statement.
pub(super) fn chunks(total: usize) -> impl Iterator<Item = Range<usize>> {
    chunk_lengths(total).scan(0, |start, length| {
        let range = *start..*start + length;
        *start += length;
        Some(range)
    })
}

pub(super) fn shape(rows: usize) -> usize {
    rows.trailing_zeros() as usize
}

pub(super) fn placeholders(rows: usize, columns: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(","));
    vec![row; rows].join(",")
}

pub(super) fn quantity_columns() -> String {
    wire::QuantityKind::ALL.iter().map(|kind| kind.as_str()).collect::<Vec<_>>().join(", ")
}

fn insert_events_sql(rows: usize) -> String {
    format!(
        "INSERT INTO usage_events (tenant_id, event_id, occurred_at, user_id, service_type, service_provider, \
           event_type, model, status, error_code, latency_us, {quantities}, custom_quantities, cost, metadata, tags, \
           session_id, request_id, price_rule_ids, flags, ingested_at) \
         VALUES {values} ON CONFLICT DO NOTHING",
        quantities = quantity_columns(),
        values = placeholders(rows, EVENT_COLUMNS),
    )
}

/// Arguments whose encoding cannot fail: the values are integers, text and blobs.
pub(super) struct Binder(pub(super) SqliteArguments);

impl Binder {
    pub(super) fn new(values: usize) -> Binder {
        let mut arguments = SqliteArguments::default();
        arguments.reserve(values, 0);
        Binder(arguments)
    }

    pub(super) fn add<'q, T: sqlx::Encode<'q, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>>(&mut self, value: T) {
        // Encoding integers, text, blobs and UUIDs into SQLite arguments has no failure path.
        let _ = self.0.add(value);
    }
}

impl SqliteStore {
    pub(crate) async fn commit_rows(&self, rows: &[EventRow]) -> Result<Vec<Outcome>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // Encoded before the writer is taken, so another batch's transaction runs meanwhile.
        let ingested_at_us = values::now_us();
        let arguments: Vec<(Range<usize>, SqliteArguments)> = chunks(rows.len())
            .map(|range| (range.clone(), event_arguments(&rows[range], ingested_at_us)))
            .collect();
        // Rolled up as if every row were new, also before the writer is taken; recomputed from
        // the stored rows only if some turn out to be duplicates.
        let all_new = rollup::aggregate(rows).map_err(rollups::overflow)?;
        // The connection is held until the cache is updated, so that the cache changes in the
        // order the transactions commit.
        let mut writer = self.writer.acquire().await.map_err(classify)?;
        let mut tx = writer.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        let mut outcomes = Vec::with_capacity(rows.len());
        for (range, arguments) in arguments {
            self.insert_chunk(&mut tx, &rows[range], arguments, ingested_at_us, &mut outcomes).await?;
        }
        let deltas = if outcomes.contains(&Outcome::Duplicate) {
            metrics::counter!("tally_dedup_path_total").increment(1);
            let stored = rows.iter().zip(&outcomes).filter(|(_, outcome)| **outcome == Outcome::Stored);
            rollup::aggregate(stored.map(|(row, _)| row)).map_err(rollups::overflow)?
        } else {
            all_new
        };
        let grown = rollups::grow(&mut tx, &self.statements, &self.rollup_cache, deltas).await;
        let committed = match grown {
            Ok(grown) => tx.commit().await.map(|()| grown).map_err(classify),
            Err(error) => Err(error),
        };
        // Only committed totals enter the cache; after a failure nothing in it is trusted.
        match committed {
            Ok(grown) => self.rollup_cache.remember(grown),
            Err(error) => {
                self.rollup_cache.clear();
                return Err(error);
            }
        }
        Ok(outcomes)
    }

    /// Inserts one chunk. The fast path checks only the count of rows inserted; when a row was
    /// not new, the chunk is rolled back to a savepoint and inserted again with `RETURNING`, to
    /// learn which rows are new. A resend thus costs one chunk twice, not the batch.
    async fn insert_chunk(
        &self,
        conn: &mut SqliteConnection,
        rows: &[EventRow],
        arguments: SqliteArguments,
        ingested_at_us: i64,
        outcomes: &mut Vec<Outcome>,
    ) -> Result<(), StoreError> {
        sqlx::query("SAVEPOINT tally_chunk").execute(&mut *conn).await.map_err(classify)?;
        let sql = self.statements.insert_events[shape(rows.len())].clone();
        let result =
            sqlx::query_with(AssertSqlSafe(sql), arguments).execute(&mut *conn).await.map_err(classify)?;
        if result.rows_affected() == rows.len() as u64 {
            outcomes.extend(std::iter::repeat_n(Outcome::Stored, rows.len()));
        } else {
            sqlx::query("ROLLBACK TO tally_chunk").execute(&mut *conn).await.map_err(classify)?;
            let sql = self.statements.insert_events_returning[shape(rows.len())].clone();
            let arguments = event_arguments(rows, ingested_at_us);
            let inserted: Vec<SqliteRow> = sqlx::query_with(AssertSqlSafe(sql), arguments)
                .fetch_all(&mut *conn)
                .await
                .map_err(classify)?;
            claim(rows, &inserted, outcomes)?;
        }
        sqlx::query("RELEASE tally_chunk").execute(&mut *conn).await.map_err(classify)?;
        Ok(())
    }
}

/// The outcome of each row of a chunk, given the rows the insert returned: when every row came
/// back, all are new; otherwise the first row with a returned key is `Stored` and every other
/// row (a repeat within the batch, or a key stored before) is `Duplicate`, as on PostgreSQL.
fn claim(rows: &[EventRow], inserted: &[SqliteRow], outcomes: &mut Vec<Outcome>) -> Result<(), StoreError> {
    if inserted.len() == rows.len() {
        outcomes.extend(std::iter::repeat_n(Outcome::Stored, rows.len()));
        return Ok(());
    }
    let mut unclaimed: HashSet<(Uuid, [u8; 16], i64)> = HashSet::with_capacity(inserted.len());
    for row in inserted {
        let tenant: Uuid = row.try_get(0).map_err(classify)?;
        let event: Uuid = row.try_get(1).map_err(classify)?;
        unclaimed.insert((tenant, *event.as_bytes(), row.try_get(2).map_err(classify)?));
    }
    outcomes
        .extend(rows.iter().map(|row| {
            if unclaimed.remove(&row.dedup_key()) { Outcome::Stored } else { Outcome::Duplicate }
        }));
    Ok(())
}

/// One chunk's insert arguments, in the column order of [`insert_events_sql`].
fn event_arguments(rows: &[EventRow], ingested_at_us: i64) -> SqliteArguments {
    let mut binder = Binder::new(rows.len() * EVENT_COLUMNS);
    for row in rows {
        let event = &row.event;
        let extra = event.extra.as_deref();
        binder.add(row.tenant_id);
        binder.add(Uuid::from_bytes(event.event_id));
        binder.add(event.timestamp_us);
        binder.add(event.user_id.as_str());
        binder.add(event.service_type.as_str());
        binder.add(event.service_provider.as_str());
        binder.add(event.event_type.as_str());
        binder.add(event.model.as_deref());
        binder.add(event.status as i64);
        binder.add(extra.and_then(|extra| extra.error_code.as_deref()));
        binder.add(row.latency_us);
        for quantity in &row.quantities {
            binder.add(quantity.map(|value| value.to_string()));
        }
        binder.add(
            (!row.custom_quantities.is_empty())
                .then(|| quantities_json(row.custom_quantities.iter().map(|(name, value)| (name, value)))),
        );
        binder.add(row.cost.map(|cost| cost.to_string()));
        binder.add(
            extra
                .filter(|extra| !extra.metadata.is_empty())
                .map(|extra| values::metadata_json(&extra.metadata)),
        );
        binder
            .add(extra.filter(|extra| !extra.tags.is_empty()).map(|extra| values::strings_json(&extra.tags)));
        binder.add(extra.and_then(|extra| extra.session_id.as_deref()));
        binder.add(extra.and_then(|extra| extra.request_id.as_deref()));
        binder.add(values::uuids_json(&row.price_rule_ids));
        binder.add(i64::from(row.flags));
        binder.add(ingested_at_us);
    }
    binder.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::rollups::ROLLUP_KEY_COLUMNS;

    #[test]
    fn chunks_cover_every_row_with_few_shapes() {
        for total in [0usize, 1, 2, 3, 511, 512, 513, 1000, 10_000, 10_001] {
            let lengths: Vec<usize> = chunk_lengths(total).collect();
            assert_eq!(lengths.iter().sum::<usize>(), total, "{total}");
            assert!(
                lengths.iter().all(|length| length.is_power_of_two() && *length <= ROWS_PER_STATEMENT_MAX)
            );
        }
        assert_eq!(chunk_lengths(1000).collect::<Vec<_>>(), vec![512, 256, 128, 64, 32, 8]);
        assert_eq!(chunks(1000).last(), Some(992..1000));
    }

    #[test]
    fn statements_have_one_placeholder_per_value() {
        let statements = Statements::new();
        for shape in 0..CHUNK_SHAPES {
            let rows = 1 << shape;
            assert_eq!(statements.insert_events[shape].matches('?').count(), rows * EVENT_COLUMNS);
            assert_eq!(statements.insert_events_returning[shape].matches('?').count(), rows * EVENT_COLUMNS);
            assert_eq!(statements.select_rollups[shape].matches('?').count(), rows * ROLLUP_KEY_COLUMNS);
            assert_eq!(statements.upsert_rollups[shape].matches('?').count(), rows * ROLLUP_COLUMNS);
        }
        let insert = &statements.insert_events[0];
        let columns = insert.split(") VALUES").next().unwrap_or_default().matches(',').count() + 1;
        assert_eq!(columns, EVENT_COLUMNS);
    }
}
