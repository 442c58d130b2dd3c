//! The ingest transaction, under one `BEGIN IMMEDIATE`: the batch is inserted with multi-row
//! `INSERT ... ON CONFLICT DO NOTHING`, outcomes come from the rows SQLite inserted, and the
//! rollups grow by exactly those rows (`rollups.rs`).
//!
//! Everything that can be done without the writer is done before taking it: arguments encoded,
//! repeats inside the batch found (the first is inserted, the others are `Duplicate`), and the
//! rollup deltas summed as if every row were new. While the writer is held, each statement is a
//! round trip to SQLite's thread, so there are few: one insert per chunk of up to
//! [`ROWS_PER_STATEMENT_MAX`] rows and no savepoints. A chunk that inserts every row is done.
//! One that inserts fewer (a resend of a stored event) is asked which of its keys were stored
//! before this commit: every commit stamps its rows with its own `ingested_at` (strictly
//! increasing per store, see `SqliteStore::ingested_at_us`), and the batch holds no repeats,
//! so a key of the chunk whose stored `ingested_at` differs is a duplicate and every other key
//! was inserted by this chunk. Only the rollup keys of duplicates are summed again.
//!
//! Statements have a bounded set of shapes: rows go in chunks of [`ROWS_PER_STATEMENT_MAX`] and
//! then powers of two, so a batch of any size uses at most eleven prepared statements per kind and
//! every one of them stays in the connection's statement cache.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use sqlx::sqlite::{SqliteArguments, SqliteConnection, SqliteRow};
use sqlx::{Arguments, AssertSqlSafe, Connection, Row};
use uuid::Uuid;

use super::rollups::{self, ROLLUP_COLUMNS};
use super::values::{self, quantities_json};
use super::{SqliteStore, classify};
use crate::rollup::{self, RollupDelta, RollupKey};
use crate::row::{EventRow, Outcome, QUANTITY_KINDS};
use crate::store::StoreError;

/// Rows per statement at most. SQLite binds at most 32,766 parameters per statement; an event
/// has 29 columns, a rollup row 25.
pub(super) const ROWS_PER_STATEMENT_MAX: usize = 1024;
const CHUNK_SHAPES: usize = ROWS_PER_STATEMENT_MAX.trailing_zeros() as usize + 1;
const EVENT_COLUMNS: usize = 20 + QUANTITY_KINDS;

const _: () = assert!(ROWS_PER_STATEMENT_MAX.is_power_of_two());
const _: () = assert!(ROWS_PER_STATEMENT_MAX * EVENT_COLUMNS <= 32_766);
const _: () = assert!(ROWS_PER_STATEMENT_MAX * ROLLUP_COLUMNS <= 32_766);
const _: () = assert!(ROWS_PER_STATEMENT_MAX * 3 < 32_766);

/// The statement texts, one per chunk shape (index `log2(rows)`).
#[derive(Debug)]
pub(super) struct Statements {
    insert_events: Vec<Arc<str>>,
    select_stored_before: Vec<Arc<str>>,
    pub(super) select_rollups: Vec<Arc<str>>,
    pub(super) upsert_rollups: Vec<Arc<str>>,
}

impl Statements {
    pub(super) fn new() -> Statements {
        let shapes = || (0..CHUNK_SHAPES).map(|shape| 1usize << shape);
        Statements {
            insert_events: shapes().map(|rows| insert_events_sql(rows).into()).collect(),
            select_stored_before: shapes().map(|rows| select_stored_before_sql(rows).into()).collect(),
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

/// The keys of a chunk that were stored before this commit: stored with another `ingested_at`
/// than the last parameter. `CROSS JOIN` makes SQLite look each key up by primary key.
fn select_stored_before_sql(rows: usize) -> String {
    format!(
        "SELECT e.tenant_id, e.event_id, e.occurred_at FROM (VALUES {keys}) AS k CROSS JOIN usage_events AS e \
         ON e.tenant_id = k.column1 AND e.occurred_at = k.column2 AND e.event_id = k.column3 \
         WHERE e.ingested_at <> ?",
        keys = placeholders(rows, 3),
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
        let ingested_at_us = self.ingested_at_us();
        let inserted = first_occurrences(rows);
        let arguments: Vec<(Range<usize>, SqliteArguments)> = chunks(inserted.len())
            .map(|range| {
                let chunk = inserted[range.clone()].iter().map(|&index| &rows[index]);
                (range.clone(), event_arguments(chunk, range.len(), ingested_at_us))
            })
            .collect();
        // Rolled up as if every inserted row were new, also before the writer is taken; the keys
        // of rows stored before are summed again only if there are some.
        let all_new =
            rollup::aggregate(inserted.iter().map(|&index| &rows[index])).map_err(rollups::overflow)?;
        let mut outcomes = vec![Outcome::Duplicate; rows.len()];
        for &index in &inserted {
            outcomes[index] = Outcome::Stored;
        }
        // The connection is held until the cache is updated, so that the cache changes in the
        // order the transactions commit.
        let mut writer = self.writer.acquire().await.map_err(classify)?;
        let mut tx = writer.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        let mut stored_before = false;
        for (range, arguments) in arguments {
            let chunk = &inserted[range];
            stored_before |=
                self.insert_chunk(&mut tx, rows, chunk, arguments, ingested_at_us, &mut outcomes).await?;
        }
        let deltas = if stored_before {
            metrics::counter!("tally_dedup_path_total").increment(1);
            without_duplicates(all_new, rows, &outcomes)?
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

    /// Inserts one chunk (`chunk`: indexes into `rows`, no key twice in the batch). When it
    /// inserted fewer rows than it has, the rows whose keys were stored before this commit are
    /// marked `Duplicate` and `true` is returned.
    async fn insert_chunk(
        &self,
        conn: &mut SqliteConnection,
        rows: &[EventRow],
        chunk: &[usize],
        arguments: SqliteArguments,
        ingested_at_us: i64,
        outcomes: &mut [Outcome],
    ) -> Result<bool, StoreError> {
        let sql = self.statements.insert_events[shape(chunk.len())].clone();
        let result =
            sqlx::query_with(AssertSqlSafe(sql), arguments).execute(&mut *conn).await.map_err(classify)?;
        if result.rows_affected() == chunk.len() as u64 {
            return Ok(false);
        }
        let mut binder = Binder::new(chunk.len() * 3 + 1);
        for &index in chunk {
            let (tenant_id, event_id, occurred_at_us) = rows[index].dedup_key();
            binder.add(tenant_id);
            binder.add(occurred_at_us);
            binder.add(Uuid::from_bytes(event_id));
        }
        binder.add(ingested_at_us);
        let sql = self.statements.select_stored_before[shape(chunk.len())].clone();
        let stored: Vec<SqliteRow> =
            sqlx::query_with(AssertSqlSafe(sql), binder.0).fetch_all(&mut *conn).await.map_err(classify)?;
        let mut before: HashSet<(Uuid, [u8; 16], i64)> = HashSet::with_capacity(stored.len());
        for row in &stored {
            let tenant: Uuid = row.try_get(0).map_err(classify)?;
            let event: Uuid = row.try_get(1).map_err(classify)?;
            before.insert((tenant, *event.as_bytes(), row.try_get(2).map_err(classify)?));
        }
        let inserted = chunk.iter().filter(|&&index| !before.contains(&rows[index].dedup_key())).count();
        if inserted as u64 != result.rows_affected() {
            // Only possible if another writer stamped rows with this commit's `ingested_at`: the
            // batch is refused (and retried with a new stamp) rather than counted wrong.
            return Err(StoreError::conflict(format!(
                "a chunk inserted {} rows but {inserted} keys are new",
                result.rows_affected()
            )));
        }
        for &index in chunk {
            if before.contains(&rows[index].dedup_key()) {
                outcomes[index] = Outcome::Duplicate;
            }
        }
        Ok(true)
    }

    /// This commit's `ingested_at`: now, but strictly after the previous commit's, so that no
    /// two commits of this store stamp their rows alike (a chunk tells the rows it inserted from
    /// rows stored before by this stamp).
    fn ingested_at_us(&self) -> i64 {
        let now_us = values::now_us();
        let previous = self
            .last_ingested_at_us
            .fetch_update(std::sync::atomic::Ordering::AcqRel, std::sync::atomic::Ordering::Acquire, |last| {
                Some(now_us.max(last + 1))
            })
            .unwrap_or(now_us);
        now_us.max(previous + 1)
    }
}

/// The indexes of the rows to insert: every row but repeats of a key earlier in the batch.
fn first_occurrences(rows: &[EventRow]) -> Vec<usize> {
    let mut seen: HashSet<(Uuid, [u8; 16], i64)> = HashSet::with_capacity(rows.len());
    (0..rows.len()).filter(|&index| seen.insert(rows[index].dedup_key())).collect()
}

/// Deltas of the rows stored, from the deltas of all rows: only the keys of duplicate rows are
/// summed again (from their stored rows), so a batch with a few resends does little more work
/// while it holds the writer than one without.
fn without_duplicates<'a>(
    mut deltas: BTreeMap<RollupKey<'a>, RollupDelta>,
    rows: &'a [EventRow],
    outcomes: &[Outcome],
) -> Result<BTreeMap<RollupKey<'a>, RollupDelta>, StoreError> {
    let rows_and_outcomes = || rows.iter().zip(outcomes);
    let touched: HashSet<RollupKey<'a>> = rows_and_outcomes()
        .filter(|(_, outcome)| **outcome != Outcome::Stored)
        .map(|(row, _)| rollup::RollupKey::of(row))
        .collect();
    for key in &touched {
        deltas.remove(key);
    }
    let stored = rows_and_outcomes().filter(|(row, outcome)| {
        **outcome == Outcome::Stored && touched.contains(&rollup::RollupKey::of(row))
    });
    deltas.extend(rollup::aggregate(stored.map(|(row, _)| row)).map_err(rollups::overflow)?);
    Ok(deltas)
}

/// One chunk's insert arguments, in the column order of [`insert_events_sql`].
fn event_arguments<'a>(
    rows: impl Iterator<Item = &'a EventRow>,
    count: usize,
    ingested_at_us: i64,
) -> SqliteArguments {
    let mut binder = Binder::new(count * EVENT_COLUMNS);
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
        assert_eq!(chunk_lengths(2500).collect::<Vec<_>>(), vec![1024, 1024, 256, 128, 64, 4]);
    }

    #[test]
    fn statements_have_one_placeholder_per_value() {
        let statements = Statements::new();
        for shape in 0..CHUNK_SHAPES {
            let rows = 1 << shape;
            assert_eq!(statements.insert_events[shape].matches('?').count(), rows * EVENT_COLUMNS);
            assert_eq!(statements.select_stored_before[shape].matches('?').count(), rows * 3 + 1);
            assert_eq!(statements.select_rollups[shape].matches('?').count(), rows * ROLLUP_KEY_COLUMNS);
            assert_eq!(statements.upsert_rollups[shape].matches('?').count(), rows * ROLLUP_COLUMNS);
        }
        let insert = &statements.insert_events[0];
        let columns = insert.split(") VALUES").next().unwrap_or_default().matches(',').count() + 1;
        assert_eq!(columns, EVENT_COLUMNS);
    }
}
