//! The ingest transaction: multi-row `INSERT ... ON CONFLICT DO NOTHING RETURNING` of a batch,
//! outcomes from the rows SQLite says it inserted, and the rollups of exactly those rows read,
//! added to in Rust and written back, all under one `BEGIN IMMEDIATE`.
//!
//! Statements have a bounded set of shapes: rows go in chunks of [`ROWS_PER_STATEMENT_MAX`] and
//! then powers of two, so a batch of any size uses at most ten prepared statements per table and
//! every one of them stays in the connection's statement cache.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use rust_decimal::Decimal;
use sqlx::sqlite::{SqliteArguments, SqliteConnection, SqliteRow};
use sqlx::{Arguments, AssertSqlSafe, Row};
use uuid::Uuid;

use super::values::{self, buckets_json, decimal, parse_buckets, parse_quantities, quantities_json};
use super::{SqliteStore, classify};
use crate::rollup::{self, RollupDelta, RollupKey};
use crate::row::{EventRow, Outcome, QUANTITY_KINDS};
use crate::store::StoreError;

/// Rows per statement at most. SQLite binds at most 32,766 parameters per statement; an event
/// has 29 columns, a rollup row 25.
pub(super) const ROWS_PER_STATEMENT_MAX: usize = 512;
const CHUNK_SHAPES: usize = ROWS_PER_STATEMENT_MAX.trailing_zeros() as usize + 1;
const EVENT_COLUMNS: usize = 20 + QUANTITY_KINDS;
const ROLLUP_KEY_COLUMNS: usize = 7;
const ROLLUP_COLUMNS: usize = 16 + QUANTITY_KINDS;

const _: () = assert!(ROWS_PER_STATEMENT_MAX.is_power_of_two());
const _: () = assert!(ROWS_PER_STATEMENT_MAX * EVENT_COLUMNS <= 32_766);
const _: () = assert!(ROWS_PER_STATEMENT_MAX * ROLLUP_COLUMNS <= 32_766);

/// The statement texts, one per chunk shape (index `log2(rows)`).
#[derive(Debug)]
pub(super) struct Statements {
    insert_events: Vec<Arc<str>>,
    select_rollups: Vec<Arc<str>>,
    upsert_rollups: Vec<Arc<str>>,
}

impl Statements {
    pub(super) fn new() -> Statements {
        let shapes = || (0..CHUNK_SHAPES).map(|shape| 1usize << shape);
        Statements {
            insert_events: shapes().map(|rows| insert_events_sql(rows).into()).collect(),
            select_rollups: shapes().map(|rows| select_rollups_sql(rows).into()).collect(),
            upsert_rollups: shapes().map(|rows| upsert_rollups_sql(rows).into()).collect(),
        }
    }
}

/// Splits `total` rows into chunk lengths: full chunks, then the binary digits of the rest.
fn chunk_lengths(total: usize) -> impl Iterator<Item = usize> {
    let full = total / ROWS_PER_STATEMENT_MAX;
    let rest = total % ROWS_PER_STATEMENT_MAX;
    std::iter::repeat_n(ROWS_PER_STATEMENT_MAX, full)
        .chain((0..CHUNK_SHAPES).rev().map(|shape| 1usize << shape).filter(move |bit| rest & bit != 0))
}

fn shape(rows: usize) -> usize {
    rows.trailing_zeros() as usize
}

fn placeholders(rows: usize, columns: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(","));
    vec![row; rows].join(",")
}

fn quantity_columns() -> String {
    wire::QuantityKind::ALL.iter().map(|kind| kind.as_str()).collect::<Vec<_>>().join(", ")
}

fn insert_events_sql(rows: usize) -> String {
    format!(
        "INSERT INTO usage_events (tenant_id, event_id, occurred_at, user_id, service_type, service_provider, \
           event_type, model, status, error_code, latency_us, {quantities}, custom_quantities, cost, metadata, tags, \
           session_id, request_id, price_rule_ids, flags, ingested_at) \
         VALUES {values} ON CONFLICT DO NOTHING RETURNING tenant_id, event_id, occurred_at",
        quantities = quantity_columns(),
        values = placeholders(rows, EVENT_COLUMNS),
    )
}

const ROLLUP_KEY: &str = "tenant_id, hour, service_type, service_provider, model, user_id, event_type";

fn rollup_values() -> String {
    format!(
        "event_count, error_count, {}, custom_quantities, cost, unpriced_count, latency_count, latency_sum_us, \
         latency_max_us, latency_buckets",
        quantity_columns()
    )
}

fn select_rollups_sql(keys: usize) -> String {
    format!(
        "SELECT {ROLLUP_KEY}, {values} FROM usage_rollup_hourly WHERE ({ROLLUP_KEY}) IN (VALUES {keys})",
        values = rollup_values(),
        keys = placeholders(keys, ROLLUP_KEY_COLUMNS),
    )
}

fn upsert_rollups_sql(rows: usize) -> String {
    let values = rollup_values();
    let updates: Vec<String> =
        values.split(", ").map(|column| format!("{column} = excluded.{column}")).collect();
    format!(
        "INSERT INTO usage_rollup_hourly ({ROLLUP_KEY}, {values}) VALUES {placeholders} \
         ON CONFLICT ({ROLLUP_KEY}) DO UPDATE SET {updates}",
        placeholders = placeholders(rows, ROLLUP_COLUMNS),
        updates = updates.join(", "),
    )
}

/// Arguments whose encoding cannot fail: the values are integers, text and blobs.
struct Binder(SqliteArguments);

impl Binder {
    fn new(values: usize) -> Binder {
        let mut arguments = SqliteArguments::default();
        arguments.reserve(values, 0);
        Binder(arguments)
    }

    fn add<'q, T: sqlx::Encode<'q, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>>(&mut self, value: T) {
        // Encoding integers, text, blobs and UUIDs into SQLite arguments has no failure path.
        let _ = self.0.add(value);
    }
}

impl SqliteStore {
    pub(super) async fn commit_rows(&self, rows: &[EventRow]) -> Result<Vec<Outcome>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // Encoded before the writer is taken, so another batch's transaction runs meanwhile.
        let ingested_at_us = values::now_us();
        let mut chunks = Vec::new();
        let mut start = 0;
        for length in chunk_lengths(rows.len()) {
            chunks
                .push((start..start + length, event_arguments(&rows[start..start + length], ingested_at_us)));
            start += length;
        }
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        let mut outcomes = Vec::with_capacity(rows.len());
        for (range, arguments) in chunks {
            let sql = self.statements.insert_events[shape(range.len())].clone();
            let inserted: Vec<SqliteRow> = sqlx::query_with(AssertSqlSafe(sql), arguments)
                .fetch_all(&mut *tx)
                .await
                .map_err(classify)?;
            claim(&rows[range], &inserted, &mut outcomes)?;
        }
        let stored = rows.iter().zip(&outcomes).filter(|(_, outcome)| **outcome == Outcome::Stored);
        let deltas = rollup::aggregate(stored.map(|(row, _)| row));
        if outcomes.contains(&Outcome::Duplicate) {
            metrics::counter!("tally_dedup_path_total").increment(1);
        }
        grow_rollups(&mut tx, &self.statements, deltas).await?;
        tx.commit().await.map_err(classify)?;
        Ok(outcomes)
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

/// A rollup key owned, to match rows read back against the batch's deltas.
type OwnedKey = (Uuid, i64, String, String, String, String, String);

fn owned_key(key: &RollupKey<'_>) -> OwnedKey {
    (
        key.tenant_id,
        key.hour_us,
        key.service_type.to_owned(),
        key.service_provider.to_owned(),
        key.model.to_owned(),
        key.user_id.to_owned(),
        key.event_type.to_owned(),
    )
}

/// Reads the stored rollup rows of the touched keys, adds the deltas in Rust, and writes the
/// totals back, in key order.
pub(super) async fn grow_rollups(
    conn: &mut SqliteConnection,
    statements: &Statements,
    deltas: BTreeMap<RollupKey<'_>, RollupDelta>,
) -> Result<(), StoreError> {
    if deltas.is_empty() {
        return Ok(());
    }
    let keys: Vec<&RollupKey<'_>> = deltas.keys().collect();
    let mut stored: HashMap<OwnedKey, RollupDelta> = HashMap::new();
    let mut start = 0;
    for length in chunk_lengths(keys.len()) {
        let mut binder = Binder::new(length * ROLLUP_KEY_COLUMNS);
        for key in &keys[start..start + length] {
            bind_key(&mut binder, key);
        }
        start += length;
        let sql = statements.select_rollups[shape(length)].clone();
        let rows =
            sqlx::query_with(AssertSqlSafe(sql), binder.0).fetch_all(&mut *conn).await.map_err(classify)?;
        for row in &rows {
            let (key, totals) = stored_rollup(row)?;
            stored.insert(key, totals);
        }
    }
    let totals: Vec<(&RollupKey<'_>, RollupDelta)> = deltas
        .iter()
        .map(|(key, delta)| match stored.remove(&owned_key(key)) {
            Some(mut total) => {
                total.merge(delta);
                (key, total)
            }
            None => (key, delta.clone()),
        })
        .collect();
    let mut start = 0;
    for length in chunk_lengths(totals.len()) {
        let mut binder = Binder::new(length * ROLLUP_COLUMNS);
        for (key, total) in &totals[start..start + length] {
            bind_key(&mut binder, key);
            bind_totals(&mut binder, total);
        }
        start += length;
        let sql = statements.upsert_rollups[shape(length)].clone();
        sqlx::query_with(AssertSqlSafe(sql), binder.0).execute(&mut *conn).await.map_err(classify)?;
    }
    Ok(())
}

fn bind_key(binder: &mut Binder, key: &RollupKey<'_>) {
    binder.add(key.tenant_id);
    binder.add(key.hour_us);
    binder.add(key.service_type);
    binder.add(key.service_provider);
    binder.add(key.model);
    binder.add(key.user_id);
    binder.add(key.event_type);
}

fn bind_totals(binder: &mut Binder, total: &RollupDelta) {
    binder.add(total.event_count);
    binder.add(total.error_count);
    for sum in &total.quantities {
        binder.add(sum.to_string());
    }
    binder.add(quantities_json(&total.custom_quantities));
    binder.add(total.cost.to_string());
    binder.add(total.unpriced_count);
    binder.add(total.latency_count);
    binder.add(total.latency_sum_us);
    binder.add(total.latency_max_us);
    binder.add(buckets_json(&total.latency_buckets));
}

/// A stored rollup row: its key, and its sums in the shape of a delta.
fn stored_rollup(row: &SqliteRow) -> Result<(OwnedKey, RollupDelta), StoreError> {
    let text = |index: usize| row.try_get::<String, _>(index).map_err(classify);
    let integer = |index: usize| row.try_get::<i64, _>(index).map_err(classify);
    let key =
        (row.try_get(0).map_err(classify)?, integer(1)?, text(2)?, text(3)?, text(4)?, text(5)?, text(6)?);
    let mut quantities = [Decimal::ZERO; QUANTITY_KINDS];
    for (index, sum) in quantities.iter_mut().enumerate() {
        *sum = decimal(&text(9 + index)?)?;
    }
    let next = 9 + QUANTITY_KINDS;
    let totals = RollupDelta {
        event_count: integer(7)?,
        error_count: integer(8)?,
        quantities,
        custom_quantities: parse_quantities(&text(next)?)?,
        cost: decimal(&text(next + 1)?)?,
        unpriced_count: integer(next + 2)?,
        latency_count: integer(next + 3)?,
        latency_sum_us: integer(next + 4)?,
        latency_max_us: integer(next + 5)?,
        latency_buckets: parse_buckets(&text(next + 6)?)?,
    };
    Ok((key, totals))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn statements_have_one_placeholder_per_value() {
        let statements = Statements::new();
        for shape in 0..CHUNK_SHAPES {
            let rows = 1 << shape;
            assert_eq!(statements.insert_events[shape].matches('?').count(), rows * EVENT_COLUMNS);
            assert_eq!(statements.select_rollups[shape].matches('?').count(), rows * ROLLUP_KEY_COLUMNS);
            assert_eq!(statements.upsert_rollups[shape].matches('?').count(), rows * ROLLUP_COLUMNS);
        }
        let insert = &statements.insert_events[0];
        let columns = insert.split(") VALUES").next().unwrap_or_default().matches(',').count() + 1;
        assert_eq!(columns, EVENT_COLUMNS);
    }
}
