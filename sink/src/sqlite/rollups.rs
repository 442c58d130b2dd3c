//! Hourly rollups on SQLite. Sums are exact decimals, and SQLite has no decimal arithmetic, so a
//! batch reads the stored totals of the keys it touches, adds its deltas in Rust and writes the
//! new totals back, in key order, inside the ingest transaction.
//!
//! Reading back is most of the cost when a batch touches thousands of keys, so the writer keeps
//! the totals it last committed in a [`RollupCache`]. The cache is right only while no other
//! connection has committed to the file; SQLite's `PRAGMA data_version` changes exactly when
//! one has, and is checked at the start of every batch: then the cache is dropped and the rows
//! are read again. In-process changes of rollups outside ingest (re-rating, retention) clear it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use rust_decimal::Decimal;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use uuid::Uuid;

use super::classify;
use super::ingest::{Binder, Statements, chunks, placeholders, quantity_columns, shape};
use super::values::{buckets_json, decimal, parse_buckets, parse_quantities, quantities_json};
use crate::rollup::{RollupDelta, RollupKey};
use crate::row::QUANTITY_KINDS;
use crate::store::StoreError;

pub(super) const ROLLUP_KEY_COLUMNS: usize = 7;
pub(super) const ROLLUP_COLUMNS: usize = 16 + QUANTITY_KINDS;

const KEY_COLUMNS: &str = "tenant_id, hour, service_type, service_provider, model, user_id, event_type";
const HOUR_US: i64 = 3_600_000_000;

fn value_columns() -> String {
    format!(
        "event_count, error_count, {}, custom_quantities, cost, unpriced_count, latency_count, latency_sum_us, \
         latency_max_us, latency_buckets",
        quantity_columns()
    )
}

/// The stored rows of a list of keys. `CROSS JOIN` makes SQLite loop over the listed keys and
/// look each up by primary key; `(key) IN (VALUES ...)` would scan the whole table.
pub(super) fn select_sql(keys: usize) -> String {
    let values: Vec<String> = value_columns().split(", ").map(|column| format!("r.{column}")).collect();
    format!(
        "SELECT r.tenant_id, r.hour, r.service_type, r.service_provider, r.model, r.user_id, r.event_type, {values} \
         FROM (VALUES {keys}) AS k CROSS JOIN usage_rollup_hourly AS r \
         ON r.tenant_id = k.column1 AND r.hour = k.column2 AND r.service_type = k.column3 \
           AND r.service_provider = k.column4 AND r.model = k.column5 AND r.user_id = k.column6 \
           AND r.event_type = k.column7",
        values = values.join(", "),
        keys = placeholders(keys, ROLLUP_KEY_COLUMNS),
    )
}

/// Writes whole rows of totals.
pub(super) fn upsert_sql(rows: usize) -> String {
    let values = value_columns();
    let updates: Vec<String> =
        values.split(", ").map(|column| format!("{column} = excluded.{column}")).collect();
    format!(
        "INSERT INTO usage_rollup_hourly ({KEY_COLUMNS}, {values}) VALUES {placeholders} \
         ON CONFLICT ({KEY_COLUMNS}) DO UPDATE SET {updates}",
        placeholders = placeholders(rows, ROLLUP_COLUMNS),
        updates = updates.join(", "),
    )
}

/// A rollup key owned, to match rows read back and cached against a batch's deltas.
pub(super) type OwnedKey = (Uuid, i64, String, String, String, String, String);

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

/// New totals of one batch, in key order, and the `data_version` they were computed under.
#[derive(Debug)]
pub(super) struct Grown {
    data_version: i64,
    totals: Vec<(OwnedKey, RollupDelta)>,
}

/// Totals of rollup rows as last committed by this store's writer, bounded in rows.
#[derive(Debug)]
pub(super) struct RollupCache {
    inner: Mutex<CacheState>,
    rows_max: usize,
}

#[derive(Debug, Default)]
struct CacheState {
    /// The writer connection's `data_version` when the cache was last right.
    data_version: Option<i64>,
    /// A transaction looked rows up and has not yet remembered its totals or cleared the cache.
    writing: bool,
    rows: HashMap<OwnedKey, RollupDelta>,
}

impl RollupCache {
    pub(super) fn new(rows_max: usize) -> RollupCache {
        RollupCache { inner: Mutex::new(CacheState::default()), rows_max }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets everything (another change of rollups, or a failed transaction).
    pub(super) fn clear(&self) {
        let mut state = self.state();
        state.rows.clear();
        state.data_version = None;
        state.writing = false;
    }

    /// Keeps a committed batch's totals. Over the bound, rows of hours before the previous one
    /// go first, then everything.
    /// A batch that looked nothing up (`None`) leaves the cache as it is, also when an earlier
    /// one still counts as writing.
    pub(super) fn remember(&self, grown: Option<Grown>) {
        let Some(grown) = grown else { return };
        let mut state = self.state();
        state.writing = false;
        if state.data_version != Some(grown.data_version) {
            state.rows.clear();
            state.data_version = Some(grown.data_version);
        }
        let newest_hour_us = grown.totals.iter().map(|(key, _)| key.1).max().unwrap_or_default();
        state.rows.extend(grown.totals);
        if state.rows.len() > self.rows_max {
            state.rows.retain(|key, _| key.1 >= newest_hour_us - HOUR_US);
        }
        if state.rows.len() > self.rows_max {
            state.rows.clear();
        }
    }

    /// The cached totals of `keys` (cloned), or `None` for a key not cached. The cache is
    /// dropped first if another connection has committed since it was filled.
    ///
    /// From then until [`RollupCache::remember`] or [`RollupCache::clear`] the cache counts as
    /// being written: if neither comes (the batch's future was dropped, perhaps right after its
    /// transaction committed, as `commit_timeout` can), the cached totals may be older than the
    /// stored ones, and the next look-up drops the cache rather than trust it.
    fn lookup(&self, data_version: i64, keys: &[OwnedKey]) -> Vec<Option<RollupDelta>> {
        let mut state = self.state();
        let was_writing = std::mem::replace(&mut state.writing, true);
        if state.data_version != Some(data_version) || was_writing {
            state.rows.clear();
            state.data_version = None;
            return vec![None; keys.len()];
        }
        keys.iter().map(|key| state.rows.get(key).cloned()).collect()
    }
}

/// Adds a batch's deltas to the stored totals and writes them. Returns the totals, for the
/// cache once the transaction has committed (`None` when the batch stored nothing).
pub(super) async fn grow(
    conn: &mut SqliteConnection,
    statements: &Statements,
    cache: &RollupCache,
    deltas: BTreeMap<RollupKey<'_>, RollupDelta>,
) -> Result<Option<Grown>, StoreError> {
    if deltas.is_empty() {
        return Ok(None);
    }
    let data_version: i64 =
        sqlx::query_scalar("PRAGMA data_version").fetch_one(&mut *conn).await.map_err(classify)?;
    let keys: Vec<OwnedKey> = deltas.keys().map(owned_key).collect();
    let cached = cache.lookup(data_version, &keys);
    let mut totals: Vec<(OwnedKey, RollupDelta)> = keys.into_iter().zip(deltas.into_values()).collect();
    let mut misses: HashMap<OwnedKey, usize> = HashMap::new();
    for (index, (slot, cached)) in totals.iter_mut().zip(cached).enumerate() {
        match cached {
            Some(mut total) => {
                total.merge(&slot.1).map_err(overflow)?;
                slot.1 = total;
            }
            None => {
                misses.insert(slot.0.clone(), index);
            }
        }
    }
    read_misses(conn, statements, &mut totals, &misses).await?;
    for range in chunks(totals.len()) {
        let mut binder = Binder::new(range.len() * ROLLUP_COLUMNS);
        for (key, total) in &totals[range.clone()] {
            bind_key(&mut binder, key);
            bind_totals(&mut binder, total);
        }
        let sql = statements.upsert_rollups[shape(range.len())].clone();
        sqlx::query_with(sqlx::AssertSqlSafe(sql), binder.0).execute(&mut *conn).await.map_err(classify)?;
    }
    Ok(Some(Grown { data_version, totals }))
}

/// Adds the stored totals of the keys the cache did not have (`misses`: key to index).
async fn read_misses(
    conn: &mut SqliteConnection,
    statements: &Statements,
    totals: &mut [(OwnedKey, RollupDelta)],
    misses: &HashMap<OwnedKey, usize>,
) -> Result<(), StoreError> {
    let mut indexes: Vec<usize> = misses.values().copied().collect();
    indexes.sort_unstable();
    for range in chunks(indexes.len()) {
        let mut binder = Binder::new(range.len() * ROLLUP_KEY_COLUMNS);
        for index in &indexes[range.clone()] {
            bind_key(&mut binder, &totals[*index].0);
        }
        let sql = statements.select_rollups[shape(range.len())].clone();
        let rows = sqlx::query_with(sqlx::AssertSqlSafe(sql), binder.0)
            .fetch_all(&mut *conn)
            .await
            .map_err(classify)?;
        for row in &rows {
            let (key, mut stored) = stored_rollup(row)?;
            let Some(index) = misses.get(&key) else { continue };
            stored.merge(&totals[*index].1).map_err(overflow)?;
            totals[*index].1 = stored;
        }
    }
    Ok(())
}

/// A stored total that would leave its type's range: this batch is refused (and its rows
/// isolated by the worker), the stored row stays as it was.
pub(super) fn overflow(error: crate::rollup::RollupOverflow) -> StoreError {
    StoreError::invalid(error.to_string()).with_source(error)
}

fn bind_key(binder: &mut Binder, key: &OwnedKey) {
    binder.add(key.0);
    binder.add(key.1);
    for text in [&key.2, &key.3, &key.4, &key.5, &key.6] {
        binder.add(text.as_str());
    }
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

    fn key(hour: i64, user: &str) -> OwnedKey {
        (Uuid::nil(), hour * HOUR_US, "s".into(), "p".into(), String::new(), user.into(), "e".into())
    }

    fn grown(data_version: i64, keys: &[OwnedKey]) -> Option<Grown> {
        let totals =
            keys.iter().map(|key| (key.clone(), RollupDelta { event_count: 1, ..Default::default() }));
        Some(Grown { data_version, totals: totals.collect() })
    }

    #[test]
    fn a_batch_that_never_remembered_drops_the_cache() {
        let cache = RollupCache::new(10);
        cache.remember(grown(3, &[key(1, "a")]));
        assert!(cache.lookup(3, &[key(1, "a")])[0].is_some());
        // No remember and no clear: the batch's future was dropped, perhaps after its commit,
        // so the cached total may be older than the stored one. A later batch that looked
        // nothing up does not make it right again.
        cache.remember(None);
        assert!(cache.lookup(3, &[key(1, "a")])[0].is_none());
    }

    #[test]
    fn the_cache_is_dropped_when_another_connection_committed() {
        let cache = RollupCache::new(10);
        cache.remember(grown(7, &[key(1, "a")]));
        assert!(cache.lookup(7, &[key(1, "a")])[0].is_some());
        assert!(cache.lookup(8, &[key(1, "a")])[0].is_none(), "data_version moved on");
        assert!(cache.lookup(7, &[key(1, "a")])[0].is_none(), "and the rows are gone for good");
        cache.remember(grown(8, &[key(1, "b")]));
        cache.clear();
        assert!(cache.lookup(8, &[key(1, "b")])[0].is_none());
    }

    #[test]
    fn over_the_bound_old_hours_go_first_then_everything() {
        let cache = RollupCache::new(3);
        cache.remember(grown(1, &[key(1, "a"), key(1, "b")]));
        cache.remember(grown(1, &[key(5, "a"), key(5, "b")]));
        let found = cache.lookup(1, &[key(1, "a"), key(5, "a"), key(5, "b")]);
        assert_eq!(found.iter().map(Option::is_some).collect::<Vec<_>>(), [false, true, true]);
        cache.remember(grown(1, &[key(5, "c"), key(5, "d")]));
        assert!(cache.lookup(1, &[key(5, "a")])[0].is_none(), "still over: cleared");
    }
}
