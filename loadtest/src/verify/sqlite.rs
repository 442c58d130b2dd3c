//! Reading what verification compares from the embedded SQLite file (`migrations/sqlite`):
//! UUIDs are 16-byte BLOBs, times INTEGER microseconds, decimals TEXT (parsed exactly here),
//! histograms and custom quantities JSON TEXT.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::TryStreamExt;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteRow};
use sqlx::{ConnectOptions, Row};
use uuid::Uuid;

use super::rollups::{
    RawEvent, RawSums, RollupKey, StoredRollup, Totals, decimal, parse_quantities, quantity_columns,
};

const RANGE: &str = "(?2 IS NULL OR {col} >= ?2) AND (?3 IS NULL OR {col} < ?3)";

/// Opens the file read-only; WAL mode lets this read while the edge is still writing.
pub async fn connect(path: &Path) -> Result<SqliteConnection> {
    SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .busy_timeout(Duration::from_secs(10))
        // Reading a whole run's raw events is slow by design; sqlx would warn about it.
        .disable_statement_logging()
        .connect()
        .await
        .with_context(|| format!("failed to open {} for verification", path.display()))
}

pub async fn tenant_of_key(connection: &mut SqliteConnection, key_hash: &[u8]) -> Result<Option<Uuid>> {
    let id: Option<Vec<u8>> = sqlx::query_scalar("SELECT tenant_id FROM api_keys WHERE key_hash = ?1")
        .bind(key_hash)
        .fetch_optional(connection)
        .await?;
    id.map(|bytes| Uuid::from_slice(&bytes).context("a stored tenant id is not 16 bytes")).transpose()
}

pub async fn stored_ids(
    connection: &mut SqliteConnection,
    tenant_id: Uuid,
    hours: Option<(i64, i64)>,
) -> Result<Vec<u128>> {
    let sql = format!(
        "SELECT event_id FROM usage_events WHERE tenant_id = ?1 AND {}",
        RANGE.replace("{col}", "occurred_at")
    );
    let ids: Vec<Vec<u8>> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(&tenant_id.as_bytes()[..])
        .bind(hours.map(|(from, _)| from))
        .bind(hours.map(|(_, to)| to))
        .fetch_all(connection)
        .await
        .context("failed to read stored event ids")?;
    ids.iter()
        .map(|bytes| Ok(Uuid::from_slice(bytes).context("a stored event id is not 16 bytes")?.as_u128()))
        .collect()
}

/// Streams the tenant's raw events (in the hours) into sums.
pub async fn raw_sums(
    connection: &mut SqliteConnection,
    tenant_id: Uuid,
    hours: Option<(i64, i64)>,
) -> Result<RawSums> {
    let sql = format!(
        "SELECT occurred_at - (occurred_at % 3600000000), service_type, service_provider, coalesce(model, ''),
                user_id, event_type, status, {quantities}, custom_quantities, cost, latency_us
         FROM usage_events WHERE tenant_id = ?1 AND {range}",
        quantities = quantity_columns().join(", "),
        range = RANGE.replace("{col}", "occurred_at"),
    );
    let quantity_count = quantity_columns().len();
    let mut sums = RawSums::default();
    let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&tenant_id.as_bytes()[..])
        .bind(hours.map(|(from, _)| from))
        .bind(hours.map(|(_, to)| to))
        .fetch(connection);
    while let Some(row) = rows.try_next().await.context("failed to read raw events")? {
        let quantities = (0..quantity_count)
            .map(|index| row.try_get::<Option<String>, _>(7 + index)?.as_deref().map(decimal).transpose())
            .collect::<Result<Vec<_>>>()?;
        let after = 7 + quantity_count;
        let cost: Option<String> = row.try_get(after + 1)?;
        sums.add(RawEvent {
            key: key(&row)?,
            error: row.try_get::<i64, _>(6)? == 1,
            quantities,
            custom_quantities: row.try_get(after)?,
            cost: cost.as_deref().map(decimal).transpose()?,
            latency_us: row.try_get(after + 2)?,
        })?;
    }
    Ok(sums)
}

pub async fn rollups(
    connection: &mut SqliteConnection,
    tenant_id: Uuid,
    hours: Option<(i64, i64)>,
) -> Result<Vec<StoredRollup>> {
    let sql = format!(
        "SELECT hour, service_type, service_provider, model, user_id, event_type,
                event_count, error_count, {quantities}, custom_quantities, cost, unpriced_count,
                latency_count, latency_sum_us, latency_max_us, latency_buckets
         FROM usage_rollup_hourly WHERE tenant_id = ?1 AND {range}",
        quantities = quantity_columns().join(", "),
        range = RANGE.replace("{col}", "hour"),
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&tenant_id.as_bytes()[..])
        .bind(hours.map(|(from, _)| from))
        .bind(hours.map(|(_, to)| to))
        .fetch_all(connection)
        .await
        .context("failed to read rollups")?;
    let quantity_count = quantity_columns().len();
    rows.iter()
        .map(|row| {
            let quantities = (0..quantity_count)
                .map(|index| decimal(&row.try_get::<String, _>(8 + index)?))
                .collect::<Result<Vec<_>>>()?;
            let after = 8 + quantity_count;
            let custom: String = row.try_get(after)?;
            let buckets: String = row.try_get(after + 6)?;
            Ok(StoredRollup {
                key: key(row)?,
                totals: Totals {
                    event_count: row.try_get(6)?,
                    error_count: row.try_get(7)?,
                    quantities,
                    cost: decimal(&row.try_get::<String, _>(after + 1)?)?,
                    unpriced_count: row.try_get(after + 2)?,
                    latency_count: row.try_get(after + 3)?,
                    latency_sum_us: row.try_get(after + 4)?,
                    latency_max_us: row.try_get(after + 5)?,
                },
                custom_quantities: parse_quantities(&custom)?,
                latency_buckets: Some(
                    serde_json::from_str(&buckets)
                        .with_context(|| format!("latency histogram {buckets:?} is not a JSON array"))?,
                ),
            })
        })
        .collect()
}

/// Columns 0-5: hour in microseconds, then the text key columns.
fn key(row: &SqliteRow) -> Result<RollupKey> {
    Ok(RollupKey {
        hour_us: row.try_get(0)?,
        service_type: row.try_get(1)?,
        service_provider: row.try_get(2)?,
        model: row.try_get(3)?,
        user_id: row.try_get(4)?,
        event_type: row.try_get(5)?,
    })
}
