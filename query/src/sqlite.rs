//! The embedded backend: the same answers as [`crate::pg`], read from the SQLite file that
//! `sink`'s SQLite store writes (schema in `migrations/sqlite`).
//!
//! SQLite stores times as INTEGER microseconds, UUIDs as 16-byte BLOBs and decimals as TEXT, so
//! statements here only select and filter rows; every sum is made in Rust with `rust_decimal`
//! (never with SQLite's floating point). Like [`crate::pg`], an aggregate reads the hourly
//! rollups for the whole UTC hours of the range and raw events for the partial hours at its
//! ends and for the hours that a period boundary cuts, in one statement (one snapshot). What
//! differs:
//!
//! - **Time zones in Rust.** Days, weeks and months in the tenant's time zone are bounded by
//!   [`crate::calendar`] (the IANA database compiled in) with PostgreSQL's rules, not in SQL, so
//!   both backends put every boundary at the same instant, DST changes and zones such as
//!   Asia/Kolkata (+05:30) included. A boundary inside a UTC hour makes that hour's rollup rows
//!   straddle two periods: as on PostgreSQL, such hours are read from raw events under
//!   [`crate::backend::Edges::Exact`], and counted in the period holding their middle under
//!   `Edges::Hour` (the default), which reads rollups only.
//! - **Grouping in Rust.** Source rows are folded into groups in memory: ranges are bounded by
//!   the service's `max_range_days`, and an embedded deployment is small.
//! - **Ordering of text.** Groups ranked by `top` break ties by byte order of their dimension
//!   values; PostgreSQL uses the database collation.
//!
//! The pool only reads (`query_only`): WAL lets its readers run beside the store's one writer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use futures_util::StreamExt;
use rust_decimal::Decimal;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow};
use time::{OffsetDateTime, PrimitiveDateTime};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::backend::{
    AggregateQuery, AggregateRow, Backend, BackendError, BoxFuture, CustomQuantityRow, Edges, EventRecord,
    EventStatus, GroupKey, KeyRecord, LATENCY_BUCKETS, ListQuery, PriceRuleRecord, QUANTITY_NAMES, Scope,
    Stats,
};
use crate::calendar::{self, Calendar, MICROS_PER_HOUR};
use crate::pg::groups_by_users;
use crate::question::{Dimension, Metric, Period};

/// Rows buffered between a listing's database task and the HTTP body.
const LISTING_CHANNEL_ROWS: usize = 256;

/// Settings of the read pool.
#[derive(Debug, Clone)]
pub struct SqliteBackendOptions {
    /// Reading connections. Default 4.
    pub max_connections: u32,
    /// How long a request waits for a pooled connection. Default 5 s.
    pub acquire_timeout: Duration,
    /// How long a statement waits for a lock held by another connection. Default 5 s.
    pub busy_timeout: Duration,
}

impl Default for SqliteBackendOptions {
    fn default() -> Self {
        SqliteBackendOptions {
            max_connections: 4,
            acquire_timeout: Duration::from_secs(5),
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// The SQLite backend.
#[derive(Debug, Clone)]
pub struct SqliteBackend {
    pool: SqlitePool,
}

impl SqliteBackend {
    /// Opens the database file at `path` for reading, with default options. The file must exist
    /// and carry the schema (the sink's store creates and migrates it).
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteBackend, BackendError> {
        Self::open_with(path, &SqliteBackendOptions::default()).await
    }

    /// Like [`SqliteBackend::open`], with options.
    pub async fn open_with(
        path: impl AsRef<Path>,
        options: &SqliteBackendOptions,
    ) -> Result<SqliteBackend, BackendError> {
        let path = path.as_ref();
        // `query_only` rather than a read-only open: a read-only connection cannot create the
        // WAL index when it is the first to open the file.
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(false)
            .busy_timeout(options.busy_timeout)
            .statement_cache_capacity(64)
            .pragma("query_only", "ON");
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(|error| {
                BackendError::Unavailable(format!("failed to open {}: {error}", path.display()))
            })?;
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' \
               AND name IN ('tenants', 'api_keys', 'usage_events', 'usage_rollup_hourly')",
        )
        .fetch_one(&pool)
        .await
        .map_err(classify)?;
        if tables != 4 {
            return Err(BackendError::Internal(format!(
                "{} has no Tally schema: open it with the sink's SQLite store first",
                path.display()
            )));
        }
        Ok(SqliteBackend { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// Whether an SQLite error is worth retrying, decided here for every statement.
fn classify(error: sqlx::Error) -> BackendError {
    match &error {
        sqlx::Error::Database(db) => {
            let code: i32 = db.code().and_then(|code| code.parse().ok()).unwrap_or_default();
            // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_NOMEM, SQLITE_IOERR, SQLITE_CANTOPEN (primary codes).
            if matches!(code & 0xff, 5 | 6 | 7 | 10 | 14) {
                BackendError::Unavailable(error.to_string())
            } else {
                BackendError::Internal(error.to_string())
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => BackendError::Unavailable(error.to_string()),
        _ => BackendError::Internal(error.to_string()),
    }
}

fn corrupt(what: &str, text: &str) -> BackendError {
    BackendError::Internal(format!("stored {what} {text:?} is invalid"))
}

fn to_us(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos().div_euclid(1000)).unwrap_or(i64::MAX)
}

fn from_us(us: i64) -> Result<OffsetDateTime, BackendError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .map_err(|_| BackendError::Internal(format!("stored time {us} is out of range")))
}

/// The whole UTC hours inside `[start, end)`, as `[whole_start, whole_end)`; empty (both `end`)
/// when there is none. [`crate::pg::whole_hours`] in microseconds.
fn whole_hours_us(start: i64, end: i64) -> (i64, i64) {
    let ceil = (start + MICROS_PER_HOUR - 1).div_euclid(MICROS_PER_HOUR) * MICROS_PER_HOUR;
    let floor = end.div_euclid(MICROS_PER_HOUR) * MICROS_PER_HOUR;
    if floor <= ceil { (end, end) } else { (ceil, floor) }
}

/// The bucket of a latency, as `sink::rollup::latency_bucket` (and [`crate::pg`]'s raw-event
/// SQL) compute it.
fn latency_bucket(latency_us: i64) -> usize {
    if latency_us < 1000 {
        return 0;
    }
    let latency_ms = latency_us as f64 / 1000.0;
    ((2.0 * latency_ms.log2()).floor() as usize + 1).min(LATENCY_BUCKETS - 1)
}

fn parse_decimal(what: &str, text: &str) -> Result<Decimal, BackendError> {
    Decimal::from_str(text).or_else(|_| Decimal::from_scientific(text)).map_err(|_| corrupt(what, text))
}

/// A stored `{"name": number}` object, with exact decimals.
fn parse_quantities(text: &str) -> Result<BTreeMap<String, Decimal>, BackendError> {
    let raw: BTreeMap<String, Box<serde_json::value::RawValue>> =
        serde_json::from_str(text).map_err(|_| corrupt("custom quantities", text))?;
    raw.into_iter().map(|(name, value)| Ok((name, parse_decimal("custom quantity", value.get())?))).collect()
}

/// A stored histogram: a JSON array of [`LATENCY_BUCKETS`] counts.
fn parse_buckets(text: &str) -> Result<[i64; LATENCY_BUCKETS], BackendError> {
    let counts: Vec<i64> = serde_json::from_str(text).map_err(|_| corrupt("latency histogram", text))?;
    counts.try_into().map_err(|_| corrupt("latency histogram", text))
}

fn checked_add(sum: &mut Decimal, value: Decimal, what: &str) -> Result<(), BackendError> {
    *sum = sum.checked_add(value).ok_or_else(|| BackendError::Overflow(what.to_owned()))?;
    Ok(())
}

impl Backend for SqliteBackend {
    fn find_api_key<'a>(
        &'a self,
        key_hash: &'a [u8; 32],
    ) -> BoxFuture<'a, Result<Option<KeyRecord>, BackendError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT k.id, k.tenant_id, t.name, t.disabled_at IS NOT NULL, t.time_zone, k.scopes, \
                   k.expires_at, k.revoked_at IS NOT NULL \
                 FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.key_hash = ?1",
            )
            .bind(&key_hash[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
            let Some(row) = row else { return Ok(None) };
            let scopes: String = row.try_get(5).map_err(classify)?;
            Ok(Some(KeyRecord {
                key_id: row.try_get(0).map_err(classify)?,
                tenant_id: row.try_get(1).map_err(classify)?,
                tenant_name: row.try_get(2).map_err(classify)?,
                tenant_disabled: row.try_get(3).map_err(classify)?,
                time_zone: row.try_get(4).map_err(classify)?,
                scopes: serde_json::from_str(&scopes).map_err(|_| corrupt("scopes", &scopes))?,
                expires_at_us: row.try_get(6).map_err(classify)?,
                revoked: row.try_get(7).map_err(classify)?,
            }))
        })
    }

    fn price_rules(&self, tenant_id: Uuid) -> BoxFuture<'_, Result<Vec<PriceRuleRecord>, BackendError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT id, definition, effective_from, effective_until, retired_at IS NOT NULL \
                 FROM price_rules WHERE tenant_id = ?1 ORDER BY effective_from, id",
            )
            .bind(tenant_id)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
            rows.iter()
                .map(|row| {
                    let definition: String = row.try_get(1).map_err(classify)?;
                    Ok(PriceRuleRecord {
                        id: row.try_get(0).map_err(classify)?,
                        definition: serde_json::from_str(&definition)
                            .map_err(|_| corrupt("price_rules.definition", &definition))?,
                        effective_from_us: row.try_get(2).map_err(classify)?,
                        effective_until_us: row.try_get(3).map_err(classify)?,
                        retired: row.try_get(4).map_err(classify)?,
                    })
                })
                .collect()
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&self.pool).await.map_err(classify)?;
            Ok(())
        })
    }

    fn resolve_local_times<'a>(
        &'a self,
        time_zone: &'a str,
        times: &'a [PrimitiveDateTime],
    ) -> BoxFuture<'a, Result<Vec<OffsetDateTime>, BackendError>> {
        Box::pin(async move { calendar::resolve_local_times(time_zone, times) })
    }

    fn periods<'a>(
        &'a self,
        scope: &'a Scope,
        period: Period,
    ) -> BoxFuture<'a, Result<Vec<(OffsetDateTime, OffsetDateTime)>, BackendError>> {
        Box::pin(async move {
            let calendar = Calendar::new(&scope.time_zone, period)?;
            calendar
                .periods(to_us(scope.start), to_us(scope.end))?
                .into_iter()
                .map(|(start, end)| Ok((from_us(start)?, from_us(end)?)))
                .collect()
        })
    }

    fn list_events(&self, query: ListQuery) -> mpsc::Receiver<Result<EventRecord, BackendError>> {
        let (sender, receiver) = mpsc::channel(LISTING_CHANNEL_ROWS);
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let end = match query.after {
                Some((at, _)) => query.scope.end.min(at + time::Duration::microseconds(1)),
                None => query.scope.end,
            };
            let sql = listing_sql();
            let mut rows =
                bind_listing(sqlx::query(sqlx::AssertSqlSafe(sql.as_str())), &query, end).fetch(&pool);
            while let Some(row) = rows.next().await {
                let record = row.map_err(classify).and_then(|row| event_record(&row));
                let failed = record.is_err();
                if sender.send(record).await.is_err() || failed {
                    break;
                }
            }
        });
        receiver
    }

    fn count_events<'a>(&'a self, query: &'a ListQuery) -> BoxFuture<'a, Result<i64, BackendError>> {
        Box::pin(async move {
            let whole = ListQuery { after: None, offset: 0, limit: u32::MAX, ..query.clone() };
            let sql = format!("SELECT count(*) FROM ({}) AS listed", listing_sql());
            let row = bind_listing(sqlx::query(sqlx::AssertSqlSafe(sql.as_str())), &whole, whole.scope.end)
                .fetch_one(&self.pool)
                .await
                .map_err(classify)?;
            row.try_get::<i64, _>(0).map_err(classify)
        })
    }

    fn aggregate<'a>(
        &'a self,
        query: &'a AggregateQuery,
    ) -> BoxFuture<'a, Result<Vec<AggregateRow>, BackendError>> {
        Box::pin(async move {
            let mut groups = Groups::new(query, Want::Stats)?;
            self.fold_sources(query, &mut groups).await?;
            groups.aggregate_rows()
        })
    }

    fn custom_quantities<'a>(
        &'a self,
        query: &'a AggregateQuery,
    ) -> BoxFuture<'a, Result<Vec<CustomQuantityRow>, BackendError>> {
        Box::pin(async move {
            let mut groups = Groups::new(query, Want::Custom)?;
            self.fold_sources(query, &mut groups).await?;
            groups.custom_rows()
        })
    }
}

impl SqliteBackend {
    /// Streams the rows of the range (rollups for whole hours, raw events for the partial hours
    /// at the ends and for hours that a period boundary cuts) into `groups`, in one statement so
    /// that they come from one snapshot.
    async fn fold_sources(
        &self,
        query: &AggregateQuery,
        groups: &mut Groups<'_>,
    ) -> Result<(), BackendError> {
        let start = to_us(query.scope.start);
        let end = to_us(query.scope.end);
        let (whole_start, whole_end) = whole_hours_us(start, end);
        // Under `Edges::Hour` the scope is whole hours, so no raw event is read, and a rollup
        // hour counts in the period holding its middle (as in `crate::pg`).
        let hour_edges = query.scope.edges == Edges::Hour;
        let straddled = match &groups.calendar {
            Some(calendar) if !hour_edges => {
                calendar.straddled_hours((start, end), (whole_start, whole_end))?
            }
            _ => Vec::new(),
        };
        let straddled = serde_json::to_string(&straddled)
            .map_err(|error| BackendError::Internal(format!("failed to encode hours: {error}")))?;
        let filter = &query.filter;
        let sql = source_sql();
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(query.scope.tenant_id)
            .bind(start)
            .bind(end)
            .bind(whole_start)
            .bind(whole_end)
            .bind(&filter.service_type)
            .bind(&filter.service_provider)
            .bind(&filter.user_id)
            .bind(&filter.model)
            .bind(&filter.event_type)
            .bind(straddled)
            .fetch(&self.pool);
        while let Some(row) = rows.next().await {
            let row = row.map_err(classify)?;
            let mut source = Source::read(&row, groups)?;
            if hour_edges {
                source.at_us += MICROS_PER_HOUR / 2;
            }
            groups.add(&source)?;
        }
        Ok(())
    }
}

/// The rows to aggregate, in one shape: `?1` tenant, `?2`/`?3` range, `?4`/`?5` whole hours,
/// `?6`..`?10` filters, `?11` the straddled hours (a JSON array of hour starts, read from raw
/// events instead of rollups). Quantities, cost and histograms are TEXT, summed by the caller.
fn source_sql() -> String {
    let quantities = QUANTITY_NAMES.join(", ");
    let raw_quantities: Vec<String> =
        QUANTITY_NAMES.iter().map(|name| format!("coalesce({name}, '0')")).collect();
    let filter = |model: &str| {
        format!(
            "(?6 IS NULL OR service_type = ?6) AND (?7 IS NULL OR service_provider = ?7) \
             AND (?8 IS NULL OR user_id = ?8) AND (?9 IS NULL OR {model} = ?9) AND (?10 IS NULL OR event_type = ?10)"
        )
    };
    let raw_columns = format!(
        "SELECT occurred_at, service_type, service_provider, coalesce(model, ''), user_id, event_type, 1, \
           status = 1, {raw_quantities}, custom_quantities, coalesce(cost, '0'), cost IS NULL, \
           latency_us IS NOT NULL, coalesce(latency_us, 0), coalesce(latency_us, 0), NULL, latency_us",
        raw_quantities = raw_quantities.join(", "),
    );
    let raw_select = format!("{raw_columns} FROM usage_events WHERE tenant_id = ?1");
    let raw_filter = filter("coalesce(model, '')");
    format!(
        "SELECT hour, service_type, service_provider, model, user_id, event_type, event_count, error_count, \
           {quantities}, custom_quantities, cost, unpriced_count, latency_count, latency_sum_us, latency_max_us, \
           latency_buckets, NULL \
         FROM usage_rollup_hourly WHERE tenant_id = ?1 AND hour >= ?4 AND hour < ?5 AND {rollup_filter} \
           AND hour NOT IN (SELECT value FROM json_each(?11)) \
         UNION ALL {raw_select} AND occurred_at >= ?2 AND occurred_at < ?4 AND {raw_filter} \
         UNION ALL {raw_select} AND occurred_at >= ?5 AND occurred_at < ?3 AND {raw_filter} \
         UNION ALL {raw_columns} FROM json_each(?11) AS h CROSS JOIN usage_events \
           WHERE tenant_id = ?1 AND occurred_at >= h.value AND occurred_at < h.value + {MICROS_PER_HOUR} \
             AND {raw_filter}",
        rollup_filter = filter("model"),
    )
}

/// Columns of [`source_sql`] after the time (0), the five [`DIMENSIONS`] and the two counts.
const SOURCE_QUANTITIES: usize = 8;
const SOURCE_CUSTOM: usize = SOURCE_QUANTITIES + QUANTITY_NAMES.len();
const SOURCE_COST: usize = SOURCE_CUSTOM + 1;
const SOURCE_UNPRICED: usize = SOURCE_CUSTOM + 2;
const SOURCE_LATENCY_COUNT: usize = SOURCE_CUSTOM + 3;
const SOURCE_LATENCY_SUM: usize = SOURCE_CUSTOM + 4;
const SOURCE_LATENCY_MAX: usize = SOURCE_CUSTOM + 5;
/// The stored histogram of a rollup row (NULL for a raw event).
const SOURCE_BUCKETS: usize = SOURCE_CUSTOM + 6;
/// The latency of a raw event (NULL for a rollup row).
const SOURCE_LATENCY: usize = SOURCE_CUSTOM + 7;

/// One rollup row or raw event of [`source_sql`].
struct Source {
    at_us: i64,
    /// Indexed like [`DIMENSIONS`].
    dimensions: [String; 5],
    event_count: i64,
    error_count: i64,
    quantities: [Decimal; 9],
    /// Whether the row holds custom quantities (`custom` is parsed only when needed).
    has_custom: bool,
    custom: BTreeMap<String, Decimal>,
    cost: Decimal,
    unpriced_count: i64,
    latency_count: i64,
    latency_sum_us: i64,
    latency_max_us: i64,
    buckets: Option<[i64; LATENCY_BUCKETS]>,
}

/// The text dimensions in [`source_sql`]'s column order (columns 1..=5).
const DIMENSIONS: [Dimension; 5] = [
    Dimension::ServiceType,
    Dimension::ServiceProvider,
    Dimension::Model,
    Dimension::UserId,
    Dimension::EventType,
];

impl Source {
    fn read(row: &SqliteRow, groups: &Groups<'_>) -> Result<Source, BackendError> {
        let text = |index: usize| row.try_get::<String, _>(index).map_err(classify);
        let integer = |index: usize| row.try_get::<i64, _>(index).map_err(classify);
        let mut quantities = [Decimal::ZERO; 9];
        for (index, slot) in quantities.iter_mut().enumerate() {
            *slot = parse_decimal("quantity", &text(SOURCE_QUANTITIES + index)?)?;
        }
        let custom_text = row.try_get::<Option<&str>, _>(SOURCE_CUSTOM).map_err(classify)?;
        // The store writes an empty object as `{}` (rollups) or NULL (events).
        let has_custom = custom_text.is_some_and(|text| text.trim() != "{}");
        let custom = match custom_text {
            Some(text) if has_custom && groups.needs_custom() => parse_quantities(text)?,
            _ => BTreeMap::new(),
        };
        let buckets = if groups.needs_histogram() {
            match row.try_get::<Option<String>, _>(SOURCE_BUCKETS).map_err(classify)? {
                Some(text) => Some(parse_buckets(&text)?),
                None => {
                    let mut buckets = [0; LATENCY_BUCKETS];
                    if let Some(latency_us) =
                        row.try_get::<Option<i64>, _>(SOURCE_LATENCY).map_err(classify)?
                    {
                        buckets[latency_bucket(latency_us)] = 1;
                    }
                    Some(buckets)
                }
            }
        } else {
            None
        };
        Ok(Source {
            at_us: integer(0)?,
            dimensions: [text(1)?, text(2)?, text(3)?, text(4)?, text(5)?],
            event_count: integer(6)?,
            error_count: integer(7)?,
            quantities,
            has_custom,
            custom,
            cost: parse_decimal("cost", &text(SOURCE_COST)?)?,
            unpriced_count: integer(SOURCE_UNPRICED)?,
            latency_count: integer(SOURCE_LATENCY_COUNT)?,
            latency_sum_us: integer(SOURCE_LATENCY_SUM)?,
            latency_max_us: integer(SOURCE_LATENCY_MAX)?,
            buckets,
        })
    }
}

/// The period a query's groups are bounded by, if a grouping set holds [`Dimension::Period`]
/// (a day when the query names none, as in [`crate::pg`]).
fn by_period(query: &AggregateQuery) -> Option<Period> {
    let grouped = query.grouping_sets.iter().flatten().any(|dimension| *dimension == Dimension::Period);
    grouped.then(|| query.period.unwrap_or(Period::Day))
}

/// What a fold computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Stats,
    Custom,
}

/// The sums of one group.
#[derive(Default)]
struct Group {
    stats: Stats,
    users: HashSet<String>,
    buckets: Option<[i64; LATENCY_BUCKETS]>,
    custom_metric: Decimal,
    has_custom: bool,
}

/// The groups of every grouping set, filled row by row.
struct Groups<'q> {
    query: &'q AggregateQuery,
    want: Want,
    /// The grouping sets; a query with none has one empty set (a single total row).
    sets: Vec<Vec<Dimension>>,
    /// The periods of the scope's time zone, when a set groups by period.
    calendar: Option<Calendar>,
    stats: Vec<HashMap<GroupKey, Group>>,
    custom: Vec<HashMap<(GroupKey, String), Decimal>>,
}

impl<'q> Groups<'q> {
    fn new(query: &'q AggregateQuery, want: Want) -> Result<Groups<'q>, BackendError> {
        let sets =
            if query.grouping_sets.is_empty() { vec![Vec::new()] } else { query.grouping_sets.clone() };
        let calendar = match by_period(query) {
            // As `crate::pg`: a period dimension without a period is a day.
            Some(period) => Some(Calendar::new(&query.scope.time_zone, period)?),
            None => None,
        };
        let mut stats: Vec<HashMap<GroupKey, Group>> = sets.iter().map(|_| HashMap::new()).collect();
        if want == Want::Stats {
            // An empty grouping set has its total row even without any input, as in SQL.
            for (set, groups) in sets.iter().zip(&mut stats) {
                if set.is_empty() {
                    groups.insert(GroupKey::default(), Group::default());
                }
            }
        }
        Ok(Groups {
            query,
            want,
            calendar,
            custom: sets.iter().map(|_| HashMap::new()).collect(),
            stats,
            sets,
        })
    }

    fn needs_custom(&self) -> bool {
        self.want == Want::Custom || self.query.measures.custom_metric.is_some()
    }

    /// As [`crate::pg`]: histograms are kept per service and hour, not per user, so a query
    /// whose groups depend on users gets none (null percentiles; the other latency figures stay).
    fn needs_histogram(&self) -> bool {
        self.want == Want::Stats && self.query.measures.latency_histogram && !groups_by_users(self.query)
    }

    /// `period` is the period holding the source row, when a set groups by period.
    fn key(set: &[Dimension], source: &Source, period: Option<(i64, i64)>) -> Result<GroupKey, BackendError> {
        let mut key = GroupKey::default();
        for dimension in set {
            let value = |d: Dimension| {
                DIMENSIONS.iter().position(|candidate| *candidate == d).map(|i| source.dimensions[i].clone())
            };
            match dimension {
                Dimension::Period => {
                    if let Some((start, end)) = period {
                        key.period_start = Some(from_us(start)?);
                        key.period_end = Some(from_us(end)?);
                    }
                }
                Dimension::ServiceType => key.service_type = value(*dimension),
                Dimension::ServiceProvider => key.service_provider = value(*dimension),
                Dimension::Model => key.model = value(*dimension),
                Dimension::UserId => key.user_id = value(*dimension),
                Dimension::EventType => key.event_type = value(*dimension),
            }
        }
        Ok(key)
    }

    fn add(&mut self, source: &Source) -> Result<(), BackendError> {
        let period = match &mut self.calendar {
            Some(calendar) => Some(calendar.period_of(source.at_us)?),
            None => None,
        };
        for set in 0..self.sets.len() {
            let key = Self::key(&self.sets[set], source, period)?;
            match self.want {
                Want::Custom => {
                    for (name, value) in &source.custom {
                        let sum = self.custom[set].entry((key.clone(), name.clone())).or_default();
                        checked_add(sum, *value, name)?;
                    }
                }
                Want::Stats => {
                    let measures = &self.query.measures;
                    let group = self.stats[set].entry(key).or_default();
                    let stats = &mut group.stats;
                    stats.event_count = stats.event_count.saturating_add(source.event_count);
                    stats.error_count = stats.error_count.saturating_add(source.error_count);
                    for ((sum, value), name) in
                        stats.quantities.iter_mut().zip(&source.quantities).zip(QUANTITY_NAMES)
                    {
                        checked_add(sum, *value, name)?;
                    }
                    checked_add(&mut stats.cost, source.cost, "cost")?;
                    stats.unpriced_count = stats.unpriced_count.saturating_add(source.unpriced_count);
                    stats.latency_count = stats.latency_count.saturating_add(source.latency_count);
                    stats.latency_sum_us = stats.latency_sum_us.saturating_add(source.latency_sum_us);
                    stats.latency_max_us = stats.latency_max_us.max(source.latency_max_us);
                    group.has_custom |= source.has_custom;
                    if measures.unique_users && !group.users.contains(&source.dimensions[3]) {
                        group.users.insert(source.dimensions[3].clone());
                    }
                    if let Some(buckets) = &source.buckets {
                        let sums = group.buckets.get_or_insert([0; LATENCY_BUCKETS]);
                        for (sum, count) in sums.iter_mut().zip(buckets) {
                            *sum = sum.saturating_add(*count);
                        }
                    }
                    if let Some(name) = &measures.custom_metric
                        && let Some(value) = source.custom.get(name)
                    {
                        checked_add(&mut group.custom_metric, *value, name)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn aggregate_rows(self) -> Result<Vec<AggregateRow>, BackendError> {
        let measures = &self.query.measures;
        let histogram = self.needs_histogram();
        let mut rows = Vec::new();
        for (set, groups) in self.stats.into_iter().enumerate() {
            for (key, group) in groups {
                let mut stats = group.stats;
                stats.no_custom_quantities = !group.has_custom;
                stats.unique_users = measures.unique_users.then_some(group.users.len() as i64);
                stats.latency_buckets = match (measures.latency_histogram, histogram) {
                    (_, true) => Some(group.buckets.unwrap_or([0; LATENCY_BUCKETS]).to_vec()),
                    (true, false) => Some(Vec::new()),
                    (false, false) => None,
                };
                rows.push(AggregateRow {
                    set,
                    key,
                    stats,
                    groups_total: None,
                    metric_total: None,
                    custom_metric: measures.custom_metric.is_some().then_some(group.custom_metric),
                });
            }
        }
        let Some((metric, limit)) = &self.query.top else {
            rows.sort_by(|a, b| (a.set, &a.key).cmp(&(b.set, &b.key)));
            return Ok(rows);
        };
        // As `crate::pg`: the metric descending, then the dimensions ascending; counted and
        // summed before the cut.
        let mut metric_total = Decimal::ZERO;
        for row in &rows {
            checked_add(&mut metric_total, ranked_value(metric, row), &metric.name())?;
        }
        let groups_total = rows.len() as i64;
        rows.sort_by(|a, b| {
            ranked_value(metric, b).cmp(&ranked_value(metric, a)).then_with(|| a.key.cmp(&b.key))
        });
        rows.truncate(*limit as usize);
        for row in &mut rows {
            row.groups_total = Some(groups_total);
            row.metric_total = Some(metric_total);
        }
        Ok(rows)
    }

    fn custom_rows(self) -> Result<Vec<CustomQuantityRow>, BackendError> {
        let mut rows: Vec<CustomQuantityRow> = self
            .custom
            .into_iter()
            .enumerate()
            .flat_map(|(set, sums)| {
                sums.into_iter().map(move |((key, name), value)| CustomQuantityRow { set, key, name, value })
            })
            .collect();
        rows.sort_by(|a, b| (a.set, &a.key, &a.name).cmp(&(b.set, &b.key, &b.name)));
        Ok(rows)
    }
}

/// The value a ranked metric sorts by (only sums are ranked; others rank by event count), as
/// `crate::pg`'s `metric_column`.
fn ranked_value(metric: &Metric, row: &AggregateRow) -> Decimal {
    match metric {
        Metric::ErrorCount => Decimal::from(row.stats.error_count),
        Metric::TotalCost => row.stats.cost,
        Metric::Quantity(index) => row.stats.quantities.get(*index).copied().unwrap_or_default(),
        Metric::Custom(_) => row.custom_metric.unwrap_or_default(),
        _ => Decimal::from(row.stats.event_count),
    }
}

/// The listing: `?1` tenant, `?2`/`?3` range, `?4`/`?5` keyset position, `?6`..`?10` filters,
/// `?11` status, `?12` limit, `?13` offset. Served by the `(tenant_id, occurred_at, event_id)`
/// primary key, read backwards. UUID blobs compare bytewise, as PostgreSQL compares `uuid`.
fn listing_sql() -> String {
    format!(
        "SELECT event_id, occurred_at, user_id, service_type, service_provider, event_type, model, status, \
           error_code, latency_us, {quantities}, custom_quantities, cost, metadata, tags, session_id, request_id \
         FROM usage_events \
         WHERE tenant_id = ?1 AND occurred_at >= ?2 AND occurred_at < ?3 \
           AND (?4 IS NULL OR occurred_at < ?4 OR event_id < ?5) \
           AND (?6 IS NULL OR service_type = ?6) AND (?7 IS NULL OR service_provider = ?7) \
           AND (?8 IS NULL OR user_id = ?8) AND (?9 IS NULL OR coalesce(model, '') = ?9) \
           AND (?10 IS NULL OR event_type = ?10) AND (?11 IS NULL OR status = ?11) \
           AND (?14 IS NULL OR json_extract(metadata, '$.\"' || ?14 || '\"') = ?15) \
         ORDER BY occurred_at DESC, event_id DESC LIMIT ?12 OFFSET ?13",
        quantities = QUANTITY_NAMES.join(", "),
    )
}

/// Binds [`listing_sql`]'s parameters, the range ending at `end`. A metadata key is a name of
/// `A-Z a-z 0-9 _ . -` (checked by the handler), so it is safe inside a JSON path.
fn bind_listing<'q>(
    statement: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    query: &'q ListQuery,
    end: OffsetDateTime,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    let filter = &query.filter;
    statement
        .bind(query.scope.tenant_id)
        .bind(to_us(query.scope.start))
        .bind(to_us(end))
        .bind(query.after.map(|(at, _)| to_us(at)))
        .bind(query.after.map(|(_, id)| id))
        .bind(&filter.service_type)
        .bind(&filter.service_provider)
        .bind(&filter.user_id)
        .bind(&filter.model)
        .bind(&filter.event_type)
        .bind(query.status.map(|status| status as i64))
        .bind(i64::from(query.limit))
        .bind(i64::try_from(query.offset).unwrap_or(i64::MAX))
        .bind(query.metadata.as_ref().map(|(key, _)| key.as_str()))
        .bind(query.metadata.as_ref().map(|(_, value)| value.as_str()))
}

fn event_record(row: &SqliteRow) -> Result<EventRecord, BackendError> {
    let get_text = |name: &str| row.try_get::<Option<String>, _>(name).map_err(classify);
    let mut quantities: [Option<Decimal>; 9] = [None; 9];
    for (slot, name) in quantities.iter_mut().zip(QUANTITY_NAMES) {
        *slot = get_text(name)?.map(|text| parse_decimal(name, &text)).transpose()?;
    }
    let status: i64 = row.try_get("status").map_err(classify)?;
    let metadata = get_text("metadata")?
        .map(|text| serde_json::from_str(&text).map_err(|_| corrupt("metadata", &text)))
        .transpose()?;
    let tags = get_text("tags")?
        .map(|text| serde_json::from_str(&text).map_err(|_| corrupt("tags", &text)))
        .transpose()?;
    Ok(EventRecord {
        event_id: row.try_get("event_id").map_err(classify)?,
        occurred_at: from_us(row.try_get("occurred_at").map_err(classify)?)?,
        user_id: row.try_get("user_id").map_err(classify)?,
        service_type: row.try_get("service_type").map_err(classify)?,
        service_provider: row.try_get("service_provider").map_err(classify)?,
        event_type: row.try_get("event_type").map_err(classify)?,
        model: get_text("model")?,
        status: if status == 1 { EventStatus::Error } else { EventStatus::Success },
        error_code: get_text("error_code")?,
        latency_us: row.try_get("latency_us").map_err(classify)?,
        quantities,
        custom_quantities: get_text("custom_quantities")?,
        cost: get_text("cost")?.map(|text| parse_decimal("cost", &text)).transpose()?,
        metadata,
        tags: tags.unwrap_or_default(),
        session_id: get_text("session_id")?,
        request_id: get_text("request_id")?,
    })
}

#[cfg(test)]
mod tests {
    //! Events go in through the sink's SQLite store; answers are checked against sums made here
    //! from the events sent.

    use std::collections::BTreeSet;

    use sink::sqlite::SqliteStore;
    use sink::{EventRow, Store};
    use time::macros::datetime;
    use uuid::Uuid;

    use super::*;
    use crate::backend::{Filter, Measures};

    /// A database file in the temp directory, removed (with its WAL files) on drop.
    struct TempDb(std::path::PathBuf);

    impl TempDb {
        fn new() -> TempDb {
            TempDb(std::env::temp_dir().join(format!("tally-query-sqlite-{}.db", Uuid::now_v7())))
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
            }
        }
    }

    /// One event as sent, with everything the expected answers need.
    #[derive(Debug, Clone)]
    struct Sent {
        id: Uuid,
        at: OffsetDateTime,
        user: String,
        service_type: &'static str,
        model: Option<&'static str>,
        error: bool,
        input_tokens: Decimal,
        latency_us: Option<i64>,
        cost: Option<Decimal>,
        images: Option<Decimal>,
    }

    /// Base: Sunday 2024-03-10 22:00 UTC; events every 37 minutes and 11 seconds, so they cross
    /// a day, a week (Monday 03-11) and many hour edges.
    fn sent(count: usize) -> Vec<Sent> {
        let base = datetime!(2024-03-10 22:00 UTC);
        (0..count)
            .map(|index| {
                let i = index as i64;
                Sent {
                    id: Uuid::now_v7(),
                    at: base + time::Duration::seconds(i * (37 * 60 + 11)),
                    user: format!("user-{}", index % 4),
                    service_type: ["llm", "ocr", "tts"][index % 3],
                    model: [Some("m-a"), None, Some("m-b"), Some("m-a")][index % 4],
                    error: index % 7 == 3,
                    // Quarter steps: exact in f64 and as decimals.
                    input_tokens: Decimal::new(100 + i * 25, 2),
                    latency_us: (index % 5 != 4).then_some(300 + i * i * 977),
                    cost: (index % 6 != 5).then(|| Decimal::new(125 * (1 + i % 9), 5)),
                    images: (index % 4 == 0).then(|| Decimal::from(1 + i % 3)),
                }
            })
            .collect()
    }

    fn row(tenant: Uuid, sent: &Sent) -> EventRow {
        let mut event = wire::Event::new(&sent.user, sent.service_type, "prov", "completion")
            .with_id(sent.id)
            .at(to_us(sent.at))
            .with_quantity(wire::QuantityKind::InputTokens, f64::try_from(sent.input_tokens).unwrap_or(0.0));
        if let Some(model) = sent.model {
            event = event.with_model(model);
        }
        if sent.error {
            event = event.with_error(Some("timeout".into()));
        }
        if let Some(latency_us) = sent.latency_us {
            event = event.with_latency_ms(latency_us as f64 / 1000.0);
        }
        if let Some(images) = sent.images {
            event = event.with_custom_quantity("images", f64::try_from(images).unwrap_or(0.0));
        }
        EventRow::new(tenant, event, sent.cost)
    }

    /// A store with `events` committed for a new tenant (in two batches plus a repeat, so that
    /// rollups are grown and duplicates ignored), and noise for another tenant.
    async fn setup(events: &[Sent]) -> (TempDb, Store, SqliteBackend, Uuid) {
        let db = TempDb::new();
        let store = Store::from(SqliteStore::open(&db.0).await.expect("store opens"));
        let tenant = store.create_tenant("acme").await.expect("tenant").id;
        let other = store.create_tenant("other").await.expect("tenant").id;
        let rows: Vec<EventRow> = events.iter().map(|sent| row(tenant, sent)).collect();
        let (first, second) = rows.split_at(rows.len() / 2);
        store.commit(first).await.expect("commit");
        store.commit(second).await.expect("commit");
        store.commit(&rows[..rows.len().min(5)]).await.expect("repeat commit");
        let noise: Vec<EventRow> = events.iter().map(|sent| row(other, sent)).collect();
        store.commit(&noise).await.expect("commit");
        let backend = SqliteBackend::open(&db.0).await.expect("backend opens");
        (db, store, backend, tenant)
    }

    fn scope(tenant: Uuid) -> Scope {
        // Both edges cut an hour, so partial hours come from raw events.
        Scope::exact(tenant, datetime!(2024-03-10 22:17:30 UTC), datetime!(2024-03-12 04:05 UTC), "UTC")
    }

    /// Expected sums of a group of sent events, made without the backend's code.
    fn expected(events: &[&Sent]) -> Stats {
        let mut stats = Stats { event_count: events.len() as i64, ..Stats::default() };
        let mut buckets = vec![0i64; LATENCY_BUCKETS];
        let users: BTreeSet<&str> = events.iter().map(|sent| sent.user.as_str()).collect();
        for sent in events {
            stats.error_count += i64::from(sent.error);
            stats.quantities[0] += sent.input_tokens;
            match sent.cost {
                Some(cost) => stats.cost += cost,
                None => stats.unpriced_count += 1,
            }
            if let Some(latency_us) = sent.latency_us {
                stats.latency_count += 1;
                stats.latency_sum_us += latency_us;
                stats.latency_max_us = stats.latency_max_us.max(latency_us);
                buckets[sink::rollup::latency_bucket(latency_us)] += 1;
            }
        }
        stats.unique_users = Some(users.len() as i64);
        stats.no_custom_quantities = events.iter().all(|sent| sent.images.is_none());
        stats.latency_buckets = Some(buckets);
        stats
    }

    fn images(events: &[&Sent]) -> Decimal {
        events.iter().filter_map(|sent| sent.images).sum()
    }

    #[tokio::test]
    async fn aggregates_match_sums_of_the_events() {
        let events = sent(80);
        let (_db, _store, backend, tenant) = setup(&events).await;
        let scope = scope(tenant);
        let in_range: Vec<&Sent> =
            events.iter().filter(|sent| sent.at >= scope.start && sent.at < scope.end).collect();
        assert!(in_range.len() > 40 && in_range.len() < events.len(), "{}", in_range.len());
        let query = AggregateQuery {
            scope: scope.clone(),
            filter: Filter::default(),
            period: Some(Period::Day),
            grouping_sets: vec![vec![], vec![Dimension::Period, Dimension::ServiceType]],
            measures: Measures {
                unique_users: true,
                latency_histogram: true,
                custom_metric: Some("images".into()),
            },
            top: None,
        };
        let rows = backend.aggregate(&query).await.expect("aggregate");

        let total: Vec<&AggregateRow> = rows.iter().filter(|row| row.set == 0).collect();
        assert_eq!(total.len(), 1);
        assert_eq!(total[0].key, GroupKey::default());
        assert_eq!(total[0].stats, expected(&in_range));
        assert_eq!(total[0].custom_metric, Some(images(&in_range)));
        assert!(!total[0].stats.no_custom_quantities);

        let days =
            [datetime!(2024-03-10 0:00 UTC), datetime!(2024-03-11 0:00 UTC), datetime!(2024-03-12 0:00 UTC)];
        let mut seen = 0;
        for day in days {
            for service_type in ["llm", "ocr", "tts"] {
                let group: Vec<&Sent> = in_range
                    .iter()
                    .copied()
                    .filter(|sent| sent.service_type == service_type)
                    .filter(|sent| sent.at >= day && sent.at < day + time::Duration::days(1))
                    .collect();
                let row = rows.iter().find(|row| {
                    row.set == 1
                        && row.key.period_start == Some(day)
                        && row.key.service_type.as_deref() == Some(service_type)
                });
                let Some(row) = row else {
                    assert!(group.is_empty(), "{day} {service_type} missing");
                    continue;
                };
                seen += 1;
                assert_eq!(row.key.period_end, Some(day + time::Duration::days(1)));
                assert_eq!(row.stats, expected(&group), "{day} {service_type}");
                assert_eq!(row.custom_metric, Some(images(&group)));
            }
        }
        assert_eq!(rows.len(), 1 + seen);

        // A filter, and `top` ranking groups by cost.
        let query = AggregateQuery {
            filter: Filter { model: Some(String::new()), ..Filter::default() },
            period: None,
            grouping_sets: vec![vec![Dimension::UserId]],
            measures: Measures::default(),
            top: Some((Metric::TotalCost, 1)),
            ..query
        };
        let rows = backend.aggregate(&query).await.expect("aggregate");
        let no_model: Vec<&Sent> = in_range.iter().copied().filter(|sent| sent.model.is_none()).collect();
        let mut per_user: BTreeMap<&str, Vec<&Sent>> = BTreeMap::new();
        for sent in &no_model {
            per_user.entry(sent.user.as_str()).or_default().push(sent);
        }
        let cost = |group: &[&Sent]| group.iter().filter_map(|sent| sent.cost).sum::<Decimal>();
        let (best_user, best) =
            per_user.iter().max_by(|a, b| cost(a.1).cmp(&cost(b.1)).then(b.0.cmp(a.0))).expect("a user");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].key.user_id.as_deref(), Some(*best_user));
        assert_eq!(rows[0].stats.cost, cost(best));
        assert_eq!(rows[0].stats.event_count, best.len() as i64);
        assert_eq!(rows[0].groups_total, Some(per_user.len() as i64));
        assert_eq!(rows[0].metric_total, Some(cost(&no_model)));

        // Custom quantities per service type.
        let query = AggregateQuery {
            filter: Filter::default(),
            grouping_sets: vec![vec![Dimension::ServiceType]],
            top: None,
            ..query
        };
        let custom = backend.custom_quantities(&query).await.expect("custom quantities");
        for service_type in ["llm", "ocr", "tts"] {
            let group: Vec<&Sent> =
                in_range.iter().copied().filter(|sent| sent.service_type == service_type).collect();
            let row = custom.iter().find(|row| row.key.service_type.as_deref() == Some(service_type));
            match row {
                Some(row) => {
                    assert_eq!(row.name, "images");
                    assert_eq!(row.value, images(&group));
                }
                None => assert_eq!(images(&group), Decimal::ZERO),
            }
        }
    }

    #[tokio::test]
    async fn local_days_and_hours_in_non_whole_hour_zones_match_sums_of_the_events() {
        let events = sent(80);
        let (_db, _store, backend, tenant) = setup(&events).await;
        // Zones without DST, so fixed offsets give the expected buckets. Local midnights fall at
        // 18:30, 18:15 and 14:30 UTC: those hours' rollup rows straddle two days.
        for (zone, hours, minutes) in
            [("Asia/Kolkata", 5, 30), ("Asia/Kathmandu", 5, 45), ("Australia/Darwin", 9, 30)]
        {
            let offset = time::UtcOffset::from_hms(hours, minutes, 0).expect("offset");
            let scope = Scope { time_zone: zone.into(), ..scope(tenant) };
            let in_range: Vec<&Sent> =
                events.iter().filter(|sent| sent.at >= scope.start && sent.at < scope.end).collect();
            for (period, length) in [(Period::Day, time::Duration::DAY), (Period::Hour, time::Duration::HOUR)]
            {
                let bucket = |at: OffsetDateTime| {
                    let local = at.to_offset(offset);
                    let start = match period {
                        Period::Day => local.replace_time(time::Time::MIDNIGHT),
                        _ => local.replace_time(time::Time::from_hms(local.hour(), 0, 0).expect("hour")),
                    };
                    start.to_offset(time::UtcOffset::UTC)
                };
                let mut groups: BTreeMap<(OffsetDateTime, &str), Vec<&Sent>> = BTreeMap::new();
                for sent in &in_range {
                    groups.entry((bucket(sent.at), sent.service_type)).or_default().push(sent);
                }
                let query = AggregateQuery {
                    scope: scope.clone(),
                    filter: Filter::default(),
                    period: Some(period),
                    grouping_sets: vec![vec![Dimension::Period, Dimension::ServiceType]],
                    measures: Measures { unique_users: true, latency_histogram: true, custom_metric: None },
                    top: None,
                };
                let rows = backend.aggregate(&query).await.expect("aggregate");
                assert_eq!(rows.len(), groups.len(), "{zone} {period:?}");
                for row in &rows {
                    let start = row.key.period_start.expect("period");
                    assert_eq!(row.key.period_end, Some(start + length), "{zone} {period:?}");
                    let service = row.key.service_type.as_deref().expect("service");
                    let group = groups.get(&(start, service)).expect("a group of events");
                    assert_eq!(row.stats, expected(group), "{zone} {period:?} {start} {service}");
                }
            }
        }
    }

    #[tokio::test]
    async fn listing_pages_newest_first_with_a_keyset_cursor() {
        let mut events = sent(50);
        // Two events at the same instant: the id breaks the tie.
        events[11].at = events[10].at;
        let (_db, _store, backend, tenant) = setup(&events).await;
        let scope = scope(tenant);
        let mut expected: Vec<&Sent> =
            events.iter().filter(|sent| sent.at >= scope.start && sent.at < scope.end).collect();
        expected.sort_by_key(|sent| std::cmp::Reverse((sent.at, sent.id)));

        let mut listed = Vec::new();
        let mut after = None;
        loop {
            let query = ListQuery {
                scope: scope.clone(),
                filter: Filter::default(),
                status: None,
                after,
                offset: 0,
                limit: 7,
                metadata: None,
            };
            let mut receiver = backend.list_events(query);
            let mut page = Vec::new();
            while let Some(record) = receiver.recv().await {
                page.push(record.expect("record"));
            }
            let Some(last) = page.last() else { break };
            after = Some((last.occurred_at, last.event_id));
            listed.extend(page);
        }
        let ids: Vec<Uuid> = listed.iter().map(|record| record.event_id).collect();
        assert_eq!(ids, expected.iter().map(|sent| sent.id).collect::<Vec<_>>());
        for (record, sent) in listed.iter().zip(&expected) {
            assert_eq!(record.occurred_at, sent.at);
            assert_eq!(record.user_id, sent.user);
            assert_eq!(record.model.as_deref(), sent.model);
            assert_eq!(record.status == EventStatus::Error, sent.error);
            assert_eq!(record.latency_us, sent.latency_us);
            assert_eq!(record.quantities[0], Some(sent.input_tokens));
            assert_eq!(record.quantities[1], None);
            assert_eq!(record.cost, sent.cost);
            let custom =
                record.custom_quantities.as_deref().map(|text| parse_quantities(text).expect("json"));
            assert_eq!(custom.and_then(|custom| custom.get("images").copied()), sent.images);
        }

        // Filters and offset.
        let query = ListQuery {
            scope: scope.clone(),
            filter: Filter { model: Some(String::new()), ..Filter::default() },
            status: Some(EventStatus::Error),
            after: None,
            offset: 1,
            limit: 100,
            metadata: None,
        };
        let mut receiver = backend.list_events(query);
        let mut ids = Vec::new();
        while let Some(record) = receiver.recv().await {
            ids.push(record.expect("record").event_id);
        }
        let filtered: Vec<Uuid> = expected
            .iter()
            .filter(|sent| sent.model.is_none() && sent.error)
            .map(|sent| sent.id)
            .skip(1)
            .collect();
        assert_eq!(ids, filtered);
    }

    #[tokio::test]
    async fn keys_periods_and_time_zones() {
        let (_db, store, backend, tenant) = setup(&sent(3)).await;
        let hash = sink::hash_api_key("tally_test_key");
        let key = store
            .create_api_key(&sink::NewApiKey {
                tenant_id: tenant,
                key_hash: hash,
                prefix: "tally_te".into(),
                scopes: vec![sink::Scope::Query, sink::Scope::Ingest],
                label: None,
                expires_at_us: Some(1_900_000_000_000_000),
            })
            .await
            .expect("key");
        let record = backend.find_api_key(&hash).await.expect("look-up").expect("found");
        assert_eq!(
            record,
            KeyRecord {
                key_id: key.id,
                tenant_id: tenant,
                tenant_name: "acme".into(),
                tenant_disabled: false,
                time_zone: "UTC".into(),
                scopes: vec!["query".into(), "ingest".into()],
                expires_at_us: Some(1_900_000_000_000_000),
                revoked: false,
            }
        );
        assert!(backend.revoke_and_find(&store, tenant, key.id, &hash).await);
        assert_eq!(backend.find_api_key(&[7; 32]).await.expect("look-up"), None);
        backend.ping().await.expect("ping");

        // Weeks start on Monday; months are calendar months; the range's end is exclusive.
        let scope =
            Scope::exact(tenant, datetime!(2024-02-28 13:30 UTC), datetime!(2024-03-11 0:00 UTC), "UTC");
        let weeks = backend.periods(&scope, Period::Week).await.expect("weeks");
        assert_eq!(
            weeks,
            vec![
                (datetime!(2024-02-26 0:00 UTC), datetime!(2024-03-04 0:00 UTC)),
                (datetime!(2024-03-04 0:00 UTC), datetime!(2024-03-11 0:00 UTC)),
            ]
        );
        let months = backend.periods(&scope, Period::Month).await.expect("months");
        assert_eq!(
            months,
            vec![
                (datetime!(2024-02-01 0:00 UTC), datetime!(2024-03-01 0:00 UTC)),
                (datetime!(2024-03-01 0:00 UTC), datetime!(2024-04-01 0:00 UTC)),
            ]
        );
        assert_eq!(backend.periods(&scope, Period::Day).await.expect("days").len(), 12);
        assert_eq!(backend.periods(&scope, Period::Hour).await.expect("hours").len(), 11 * 24 + 11);
        let december = Scope {
            start: datetime!(2023-12-31 23:00 UTC),
            end: datetime!(2024-01-01 0:00:01 UTC),
            ..scope.clone()
        };
        assert_eq!(
            backend.periods(&december, Period::Month).await.expect("months"),
            vec![
                (datetime!(2023-12-01 0:00 UTC), datetime!(2024-01-01 0:00 UTC)),
                (datetime!(2024-01-01 0:00 UTC), datetime!(2024-02-01 0:00 UTC)),
            ]
        );

        let local = [datetime!(2024-03-10 12:00)];
        assert_eq!(
            backend.resolve_local_times("UTC", &local).await.expect("utc"),
            vec![datetime!(2024-03-10 12:00 UTC)]
        );
        // Any IANA zone: days from local midnight (Berlin is UTC+01:00 in winter).
        assert_eq!(
            backend.resolve_local_times("Europe/Berlin", &local).await.expect("berlin"),
            vec![datetime!(2024-03-10 11:00 UTC)]
        );
        let berlin = Scope { time_zone: "Europe/Berlin".into(), ..scope };
        let days = backend.periods(&berlin, Period::Day).await.expect("days");
        assert_eq!(days.len(), 13);
        assert_eq!(days[0], (datetime!(2024-02-27 23:00 UTC), datetime!(2024-02-28 23:00 UTC)));
        assert_eq!(days[12], (datetime!(2024-03-10 23:00 UTC), datetime!(2024-03-11 23:00 UTC)));
        let unknown = Scope { time_zone: "Mars/Olympus_Mons".into(), ..berlin.clone() };
        assert!(matches!(backend.periods(&unknown, Period::Day).await, Err(BackendError::Unsupported(_))));
        // The three events (22:00, 22:37 and 23:14 UTC on 03-10) fall on two Berlin days.
        let query = AggregateQuery {
            scope: berlin,
            filter: Filter::default(),
            period: Some(Period::Day),
            grouping_sets: vec![vec![Dimension::Period]],
            measures: Measures::default(),
            top: None,
        };
        let rows = backend.aggregate(&query).await.expect("aggregate");
        let counts: Vec<(Option<OffsetDateTime>, i64)> =
            rows.iter().map(|row| (row.key.period_start, row.stats.event_count)).collect();
        assert_eq!(
            counts,
            vec![(Some(datetime!(2024-03-09 23:00 UTC)), 2), (Some(datetime!(2024-03-10 23:00 UTC)), 1)]
        );
    }

    impl SqliteBackend {
        /// Revokes a key through the store and says whether this backend sees it revoked.
        async fn revoke_and_find(&self, store: &Store, tenant: Uuid, key: Uuid, hash: &[u8; 32]) -> bool {
            store.revoke_api_key(tenant, key).await.expect("revoke");
            self.find_api_key(hash).await.expect("look-up").is_some_and(|record| record.revoked)
        }
    }
}
