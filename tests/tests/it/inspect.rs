//! Backend-neutral checks of what an edge stored: raw events and rollup rows are read back into
//! plain Rust values (decimals exact, JSON parsed), with one query per backend, so a test states
//! its expectations once and they hold on PostgreSQL and on SQLite alike.

use std::collections::BTreeMap;
use std::str::FromStr;

use anyhow::{Context, Result, bail, ensure};
use rust_decimal::Decimal;
use sqlx::sqlite::{SqliteConnectOptions, SqliteRow};
use sqlx::{Connection, Row, SqliteConnection};
use uuid::Uuid;

use crate::support::{Location, TestEdge};

/// The nine well-known quantity columns, in schema order.
const QUANTITIES: [&str; 9] = [
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "pages",
    "characters",
    "requests",
    "bytes",
    "duration_ms",
];

/// One stored raw event.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub tenant_id: Uuid,
    pub event_id: Uuid,
    pub occurred_at_us: i64,
    pub user_id: String,
    pub service_type: String,
    pub service_provider: String,
    pub event_type: String,
    pub model: Option<String>,
    pub status: i64,
    pub latency_us: Option<i64>,
    /// The well-known quantities the event has, by column name.
    pub quantities: BTreeMap<String, Decimal>,
    /// `None` when the column is NULL.
    pub custom_quantities: Option<BTreeMap<String, Decimal>>,
    pub cost: Option<Decimal>,
    pub metadata: Option<serde_json::Value>,
    pub tags: Option<Vec<String>>,
    pub session_id: Option<String>,
    pub price_rule_ids: Option<Vec<Uuid>>,
    pub flags: i64,
}

impl StoredEvent {
    /// A well-known quantity, as the decimal's text (`"0.25"`).
    pub fn quantity(&self, name: &str) -> Option<String> {
        self.quantities.get(name).map(Decimal::to_string)
    }
}

/// The key of a rollup row: tenant, hour (µs), service type, provider, model, user, event type.
pub type RollupKey = (Uuid, i64, String, String, String, String, String);

/// One stored hourly rollup row.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoredRollup {
    pub event_count: i64,
    pub error_count: i64,
    /// Every well-known quantity, by column name.
    pub quantities: BTreeMap<String, Decimal>,
    pub custom_quantities: BTreeMap<String, Decimal>,
    pub cost: Decimal,
    pub unpriced_count: i64,
    pub latency_count: i64,
    pub latency_sum_us: i64,
    pub latency_max_us: i64,
    /// `None` where the table keeps no histogram (PostgreSQL's per-user rollups).
    pub latency_buckets: Option<Vec<i64>>,
}

/// A re-rate audit row: events scanned and changed, oldest first.
pub type RerateAudit = (i64, i64);

impl TestEdge {
    /// Every stored event, ordered by user, time and event id.
    pub async fn events(&self) -> Result<Vec<StoredEvent>> {
        match &self.db.location {
            Location::Postgres(_) => {
                let mut db = self.connect_db().await?;
                let rows = sqlx::query(POSTGRES_EVENTS).fetch_all(&mut db).await?;
                rows.iter().map(postgres_event).collect()
            }
            Location::Sqlite(file) => {
                let mut db = sqlite(file.path()).await?;
                let rows = sqlx::query(SQLITE_EVENTS).fetch_all(&mut db).await?;
                rows.iter().map(sqlite_event).collect()
            }
        }
    }

    /// Events stored for a tenant.
    pub async fn stored_count(&self, tenant: Uuid) -> Result<usize> {
        Ok(self.events().await?.iter().filter(|event| event.tenant_id == tenant).count())
    }

    /// Every rollup row by key.
    pub async fn rollups(&self) -> Result<BTreeMap<RollupKey, StoredRollup>> {
        match &self.db.location {
            Location::Postgres(_) => {
                let mut db = self.connect_db().await?;
                let rows = sqlx::query(POSTGRES_ROLLUPS).fetch_all(&mut db).await?;
                rows.iter().map(postgres_rollup).collect()
            }
            Location::Sqlite(file) => {
                let mut db = sqlite(file.path()).await?;
                let rows = sqlx::query(SQLITE_ROLLUPS).fetch_all(&mut db).await?;
                rows.iter().map(sqlite_rollup).collect()
            }
        }
    }

    /// Re-rate audit rows, oldest first.
    pub async fn rerate_runs(&self) -> Result<Vec<RerateAudit>> {
        let sql = "SELECT events_scanned, events_changed FROM rerate_runs ORDER BY started_at";
        Ok(match &self.db.location {
            Location::Postgres(_) => sqlx::query_as(sql).fetch_all(&mut self.connect_db().await?).await?,
            Location::Sqlite(file) => sqlx::query_as(sql).fetch_all(&mut sqlite(file.path()).await?).await?,
        })
    }

    /// Checks that every rollup row equals the sums of the raw events of its key (counts, every
    /// quantity, custom quantities, cost, unpriced count, latency count, sum, maximum and
    /// histogram), and that every key with events has its row. Returns the rows compared.
    pub async fn assert_rollups_match_raw(&self) -> Result<usize> {
        let expected = sums_of(&self.events().await?);
        let stored = self.rollups().await?;
        for (key, sums) in &expected {
            let row = stored.get(key).with_context(|| format!("no rollup row for {key:?}"))?;
            let mut sums = sums.clone();
            if row.latency_buckets.is_none() {
                sums.latency_buckets = None;
            }
            ensure!(
                *row == sums,
                "rollup {key:?} differs from the sums of its raw events:\n{row:?}\n{sums:?}"
            );
            if let Some(buckets) = &row.latency_buckets {
                ensure!(buckets.iter().sum::<i64>() == row.latency_count, "{key:?}: histogram sum");
            }
        }
        if let Some(extra) = stored.keys().find(|key| !expected.contains_key(*key)) {
            bail!("rollup row {extra:?} has no raw events");
        }
        // PostgreSQL also keeps user-less rollups: checked there in SQL, every column.
        if let Location::Postgres(_) = &self.db.location {
            crate::support::assert_rollups_match_raw(&mut self.connect_db().await?).await?;
        }
        Ok(stored.len())
    }
}

/// Rollup rows computed here from raw events, independently of the sink.
fn sums_of(events: &[StoredEvent]) -> BTreeMap<RollupKey, StoredRollup> {
    let mut sums: BTreeMap<RollupKey, StoredRollup> = BTreeMap::new();
    for event in events {
        let hour_us = event.occurred_at_us.div_euclid(3_600_000_000) * 3_600_000_000;
        let key = (
            event.tenant_id,
            hour_us,
            event.service_type.clone(),
            event.service_provider.clone(),
            event.model.clone().unwrap_or_default(),
            event.user_id.clone(),
            event.event_type.clone(),
        );
        let sum = sums.entry(key).or_insert_with(|| StoredRollup {
            quantities: QUANTITIES.iter().map(|name| (name.to_string(), Decimal::ZERO)).collect(),
            latency_buckets: Some(vec![0; sink::rollup::LATENCY_BUCKETS]),
            ..StoredRollup::default()
        });
        sum.event_count += 1;
        sum.error_count += i64::from(event.status == 1);
        for (name, value) in &event.quantities {
            *sum.quantities.entry(name.clone()).or_default() += value;
        }
        for (name, value) in event.custom_quantities.iter().flatten() {
            *sum.custom_quantities.entry(name.clone()).or_default() += value;
        }
        match event.cost {
            Some(cost) => sum.cost += cost,
            None => sum.unpriced_count += 1,
        }
        if let Some(latency_us) = event.latency_us {
            sum.latency_count += 1;
            sum.latency_sum_us += latency_us;
            sum.latency_max_us = sum.latency_max_us.max(latency_us);
            if let Some(buckets) = sum.latency_buckets.as_mut() {
                buckets[sink::rollup::latency_bucket(latency_us)] += 1;
            }
        }
    }
    sums
}

const POSTGRES_EVENTS: &str =
    "SELECT tenant_id, event_id, (EXTRACT(EPOCH FROM occurred_at) * 1000000)::bigint AS occurred_at,
       user_id, service_type, service_provider, event_type, model, status::bigint AS status, latency_us,
       input_tokens::text AS input_tokens, output_tokens::text AS output_tokens,
       cached_input_tokens::text AS cached_input_tokens, reasoning_tokens::text AS reasoning_tokens,
       pages::text AS pages, characters::text AS characters, requests::text AS requests, bytes::text AS bytes,
       duration_ms::text AS duration_ms, custom_quantities::text AS custom_quantities, cost::text AS cost,
       metadata::text AS metadata, tags, session_id, price_rule_ids, flags::bigint AS flags
FROM usage_events ORDER BY user_id, occurred_at, event_id";

const SQLITE_EVENTS: &str = "SELECT tenant_id, event_id, occurred_at, user_id, service_type, service_provider,
       event_type, model, status, latency_us, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens,
       pages, characters, requests, bytes, duration_ms, custom_quantities, cost, metadata, tags, session_id,
       price_rule_ids, flags
FROM usage_events ORDER BY user_id, occurred_at, event_id";

/// The rollups as readers see them: folded and pending rows summed per key (per user, PostgreSQL
/// keeps no latency histogram: `support::assert_rollups_match_raw` checks the user-less ones').
const POSTGRES_ROLLUPS: &str =
    "SELECT tenant_id, (EXTRACT(EPOCH FROM hour) * 1000000)::bigint AS hour, service_type,
       service_provider, model, user_id, event_type, sum(event_count)::bigint AS event_count,
       sum(error_count)::bigint AS error_count,
       sum(input_tokens)::text AS input_tokens, sum(output_tokens)::text AS output_tokens,
       sum(cached_input_tokens)::text AS cached_input_tokens, sum(reasoning_tokens)::text AS reasoning_tokens,
       sum(pages)::text AS pages, sum(characters)::text AS characters, sum(requests)::text AS requests,
       sum(bytes)::text AS bytes, sum(duration_ms)::text AS duration_ms,
       tally_sum_quantities(custom_quantities)::text AS custom_quantities, sum(cost)::text AS cost,
       sum(unpriced_count)::bigint AS unpriced_count, sum(latency_count)::bigint AS latency_count,
       sum(latency_sum_us)::bigint AS latency_sum_us, max(latency_max_us) AS latency_max_us
FROM usage_rollup_hourly_live GROUP BY tenant_id, hour, service_type, service_provider, model, user_id, event_type";

const SQLITE_ROLLUPS: &str = "SELECT * FROM usage_rollup_hourly";

/// A read-only connection to an SQLite database the edge has open.
async fn sqlite(path: &std::path::Path) -> Result<SqliteConnection> {
    let options = SqliteConnectOptions::new().filename(path).read_only(true);
    Ok(SqliteConnection::connect_with(&options).await?)
}

fn decimal(text: &str) -> Result<Decimal> {
    Decimal::from_str(text).with_context(|| format!("{text:?} is not a decimal"))
}

/// `{"name": number, ...}` with exact decimals (names are `[a-z0-9_]`).
fn quantities(text: &str) -> Result<BTreeMap<String, Decimal>> {
    let inner = text.trim().strip_prefix('{').and_then(|rest| rest.strip_suffix('}')).context("an object")?;
    let mut map = BTreeMap::new();
    for entry in inner.split(',').filter(|entry| !entry.trim().is_empty()) {
        let (name, value) = entry.split_once(':').context("name: value")?;
        map.insert(name.trim().trim_matches('"').to_owned(), decimal(value.trim())?);
    }
    Ok(map)
}

fn quantity_columns<R: Row>(row: &R) -> Result<BTreeMap<String, Option<Decimal>>>
where
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'n> &'n str: sqlx::ColumnIndex<R>,
{
    QUANTITIES
        .iter()
        .map(|name| {
            let text: Option<String> = row.try_get(*name)?;
            Ok((name.to_string(), text.as_deref().map(decimal).transpose()?))
        })
        .collect()
}

fn postgres_event(row: &sqlx::postgres::PgRow) -> Result<StoredEvent> {
    let text = |name: &str| -> Result<Option<String>> { Ok(row.try_get(name)?) };
    Ok(StoredEvent {
        tenant_id: row.try_get("tenant_id")?,
        event_id: row.try_get("event_id")?,
        occurred_at_us: row.try_get("occurred_at")?,
        user_id: row.try_get("user_id")?,
        service_type: row.try_get("service_type")?,
        service_provider: row.try_get("service_provider")?,
        event_type: row.try_get("event_type")?,
        model: row.try_get("model")?,
        status: row.try_get("status")?,
        latency_us: row.try_get("latency_us")?,
        quantities: present(quantity_columns(row)?),
        custom_quantities: text("custom_quantities")?.as_deref().map(quantities).transpose()?,
        cost: text("cost")?.as_deref().map(decimal).transpose()?,
        metadata: text("metadata")?.as_deref().map(serde_json::from_str).transpose()?,
        tags: row.try_get("tags")?,
        session_id: row.try_get("session_id")?,
        price_rule_ids: row.try_get("price_rule_ids")?,
        flags: row.try_get("flags")?,
    })
}

fn sqlite_event(row: &SqliteRow) -> Result<StoredEvent> {
    let text = |name: &str| -> Result<Option<String>> { Ok(row.try_get(name)?) };
    let rule_ids: Option<Vec<String>> =
        text("price_rule_ids")?.as_deref().map(serde_json::from_str).transpose()?;
    Ok(StoredEvent {
        tenant_id: row.try_get("tenant_id")?,
        event_id: row.try_get("event_id")?,
        occurred_at_us: row.try_get("occurred_at")?,
        user_id: row.try_get("user_id")?,
        service_type: row.try_get("service_type")?,
        service_provider: row.try_get("service_provider")?,
        event_type: row.try_get("event_type")?,
        model: row.try_get("model")?,
        status: row.try_get("status")?,
        latency_us: row.try_get("latency_us")?,
        quantities: present(quantity_columns(row)?),
        custom_quantities: text("custom_quantities")?.as_deref().map(quantities).transpose()?,
        cost: text("cost")?.as_deref().map(decimal).transpose()?,
        metadata: text("metadata")?.as_deref().map(serde_json::from_str).transpose()?,
        tags: text("tags")?.as_deref().map(serde_json::from_str).transpose()?,
        session_id: row.try_get("session_id")?,
        price_rule_ids: rule_ids
            .map(|ids| ids.iter().map(|id| Uuid::parse_str(id)).collect::<Result<Vec<_>, _>>())
            .transpose()?,
        flags: row.try_get("flags")?,
    })
}

fn present(columns: BTreeMap<String, Option<Decimal>>) -> BTreeMap<String, Decimal> {
    columns.into_iter().filter_map(|(name, value)| Some((name, value?))).collect()
}

fn postgres_rollup(row: &sqlx::postgres::PgRow) -> Result<(RollupKey, StoredRollup)> {
    let text: String = row.try_get("custom_quantities")?;
    let cost: String = row.try_get("cost")?;
    rollup_of(row, quantities(&text)?, decimal(&cost)?, None)
}

fn sqlite_rollup(row: &SqliteRow) -> Result<(RollupKey, StoredRollup)> {
    let text: String = row.try_get("custom_quantities")?;
    let cost: String = row.try_get("cost")?;
    let buckets: String = row.try_get("latency_buckets")?;
    rollup_of(row, quantities(&text)?, decimal(&cost)?, Some(serde_json::from_str(&buckets)?))
}

fn rollup_of<R: Row>(
    row: &R,
    custom_quantities: BTreeMap<String, Decimal>,
    cost: Decimal,
    latency_buckets: Option<Vec<i64>>,
) -> Result<(RollupKey, StoredRollup)>
where
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Uuid: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'n> &'n str: sqlx::ColumnIndex<R>,
{
    let text = |name: &str| -> Result<String> { Ok(row.try_get(name)?) };
    let integer = |name: &str| -> Result<i64> { Ok(row.try_get(name)?) };
    let key = (
        row.try_get("tenant_id")?,
        integer("hour")?,
        text("service_type")?,
        text("service_provider")?,
        text("model")?,
        text("user_id")?,
        text("event_type")?,
    );
    let quantities = quantity_columns(row)?
        .into_iter()
        .map(|(name, value)| Ok((name.clone(), value.with_context(|| format!("rollup {name} is NULL"))?)))
        .collect::<Result<_>>()?;
    let rollup = StoredRollup {
        event_count: integer("event_count")?,
        error_count: integer("error_count")?,
        quantities,
        custom_quantities,
        cost,
        unpriced_count: integer("unpriced_count")?,
        latency_count: integer("latency_count")?,
        latency_sum_us: integer("latency_sum_us")?,
        latency_max_us: integer("latency_max_us")?,
        latency_buckets,
    };
    Ok((key, rollup))
}
