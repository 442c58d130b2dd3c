//! Reading what verification compares from PostgreSQL (`migrations/postgres`).

use anyhow::{Context, Result};
use futures_util::TryStreamExt;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::rollups::{
    RawEvent, RawSums, RollupKey, StoredRollup, Totals, parse_quantities, quantity_columns,
};

/// `[from, to)` in microseconds as SQL parameters; both NULL for the whole table.
fn range_params(hours: Option<(i64, i64)>) -> (Option<f64>, Option<f64>) {
    match hours {
        Some((from, to)) => (Some(from as f64 / 1e6), Some(to as f64 / 1e6)),
        None => (None, None),
    }
}

fn range(column: &str) -> String {
    format!(
        "($2::float8 IS NULL OR {column} >= to_timestamp($2)) AND ($3::float8 IS NULL OR {column} < to_timestamp($3))"
    )
}

/// Microseconds since the epoch of a `timestamptz` column (exact: `extract` returns numeric).
fn micros(column: &str) -> String {
    format!("(extract(epoch FROM {column}) * 1000000)::int8")
}

pub async fn tenant_of_key(connection: &mut PgConnection, key_hash: &[u8]) -> Result<Option<Uuid>> {
    Ok(sqlx::query_scalar("SELECT tenant_id FROM api_keys WHERE key_hash = $1")
        .bind(key_hash)
        .fetch_optional(connection)
        .await?)
}

pub async fn stored_ids(
    connection: &mut PgConnection,
    tenant_id: Uuid,
    hours: Option<(i64, i64)>,
) -> Result<Vec<u128>> {
    let (from, to) = range_params(hours);
    let sql = format!("SELECT event_id FROM usage_events WHERE tenant_id = $1 AND {}", range("occurred_at"));
    let ids: Vec<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id)
        .bind(from)
        .bind(to)
        .fetch_all(connection)
        .await
        .context("failed to read stored event ids")?;
    Ok(ids.iter().map(Uuid::as_u128).collect())
}

/// Streams the tenant's raw events (in the hours) into `sums`.
pub async fn raw_sums(
    connection: &mut PgConnection,
    tenant_id: Uuid,
    hours: Option<(i64, i64)>,
) -> Result<RawSums> {
    let (from, to) = range_params(hours);
    let sql = format!(
        "SELECT {hour}, service_type, service_provider, coalesce(model, ''), user_id, event_type,
                status::int8, {quantities}, custom_quantities::text, cost, latency_us
         FROM usage_events WHERE tenant_id = $1 AND {range}",
        hour = micros("date_trunc('hour', occurred_at, 'UTC')"),
        quantities = quantity_columns().join(", "),
        range = range("occurred_at"),
    );
    let quantity_count = quantity_columns().len();
    let mut sums = RawSums::default();
    let mut rows =
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(from).bind(to).fetch(connection);
    while let Some(row) = rows.try_next().await.context("failed to read raw events")? {
        let quantities =
            (0..quantity_count).map(|index| row.try_get(7 + index)).collect::<Result<Vec<_>, _>>()?;
        let after = 7 + quantity_count;
        sums.add(RawEvent {
            key: key(&row)?,
            error: row.try_get::<i64, _>(6)? == 1,
            quantities,
            custom_quantities: row.try_get(after)?,
            cost: row.try_get(after + 1)?,
            latency_us: row.try_get(after + 2)?,
        })?;
    }
    Ok(sums)
}

/// The per-user rollups, or (`per_user` false) the user-less ones with an empty `user_id`.
pub async fn rollups(
    connection: &mut PgConnection,
    tenant_id: Uuid,
    hours: Option<(i64, i64)>,
    per_user: bool,
) -> Result<Vec<StoredRollup>> {
    let (from, to) = range_params(hours);
    let (user, table) = match per_user {
        true => ("user_id", "usage_rollup_hourly_live"),
        false => ("''::text", "usage_rollup_service_hourly_live"),
    };
    // The views hold folded rollup rows and pending ones: a key's sums are the sum over both.
    let quantity_sums: Vec<String> = quantity_columns().iter().map(|name| format!("sum({name})")).collect();
    // Latency histograms are kept per service only.
    let buckets = if per_user { "NULL::int8[]" } else { "tally_sum_buckets(latency_buckets)" };
    let sql = format!(
        "SELECT {hour}, service_type, service_provider, model, {user}, event_type,
                sum(event_count)::int8, sum(error_count)::int8, {quantities},
                tally_sum_quantities(custom_quantities)::text, sum(cost), sum(unpriced_count)::int8,
                sum(latency_count)::int8, sum(latency_sum_us)::int8, max(latency_max_us), {buckets}
         FROM {table} WHERE tenant_id = $1 AND {range} GROUP BY 1, 2, 3, 4, 5, 6",
        hour = micros("hour"),
        quantities = quantity_sums.join(", "),
        range = range("hour"),
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id)
        .bind(from)
        .bind(to)
        .fetch_all(connection)
        .await
        .context("failed to read rollups")?;
    let quantity_count = quantity_columns().len();
    rows.iter()
        .map(|row| {
            let quantities =
                (0..quantity_count).map(|index| row.try_get(8 + index)).collect::<Result<Vec<_>, _>>()?;
            let after = 8 + quantity_count;
            let custom: String = row.try_get(after)?;
            Ok(StoredRollup {
                key: key(row)?,
                totals: Totals {
                    event_count: row.try_get(6)?,
                    error_count: row.try_get(7)?,
                    quantities,
                    cost: row.try_get(after + 1)?,
                    unpriced_count: row.try_get(after + 2)?,
                    latency_count: row.try_get(after + 3)?,
                    latency_sum_us: row.try_get(after + 4)?,
                    latency_max_us: row.try_get(after + 5)?,
                },
                custom_quantities: parse_quantities(&custom)?,
                latency_buckets: row.try_get(after + 6)?,
            })
        })
        .collect()
}

/// Columns 0-5: hour in microseconds, then the text key columns.
fn key(row: &sqlx::postgres::PgRow) -> Result<RollupKey> {
    Ok(RollupKey {
        hour_us: row.try_get(0)?,
        service_type: row.try_get(1)?,
        service_provider: row.try_get(2)?,
        model: row.try_get(3)?,
        user_id: row.try_get(4)?,
        event_type: row.try_get(5)?,
    })
}
