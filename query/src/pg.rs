//! The PostgreSQL backend: every SQL statement of the query service lives in this file.
//!
//! Aggregates read the hourly rollups, which are keyed by UTC hour. A range edge inside an hour,
//! or a period boundary inside an hour (a time zone such as Asia/Kolkata, +05:30, puts day
//! boundaries at :30), would make a rollup row straddle two buckets. Under [`Edges::Hour`] (the
//! default) the scope is whole hours and a straddled hour counts in the bucket holding its
//! middle, so only rollups are read. Under [`Edges::Exact`] those hours are read from raw events
//! instead, so every sum is exact to the microsecond: rows come from the rollups for whole hours
//! that fall inside one bucket, and from `usage_events` for the rest (at most two partial hours
//! at the range's ends plus one hour per straddled boundary). SQL text is assembled only from
//! fixed fragments chosen by allow-listed enums; every user value is a bound parameter.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::str::FromStr;
use std::time::Duration;

use futures_util::StreamExt;
use rust_decimal::Decimal;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row};
use time::{OffsetDateTime, PrimitiveDateTime};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::backend::{
    AggregateQuery, AggregateRow, Backend, BackendError, BoxFuture, CustomQuantityRow, Edges, EventRecord,
    EventStatus, GroupKey, KeyRecord, LATENCY_BUCKETS, ListQuery, PriceRuleRecord, QUANTITY_NAMES, Scope,
    Stats,
};
use crate::question::{Dimension, Metric, Period};

/// Connection settings.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Pool size. Default 8.
    pub max_connections: u32,
    /// How long a request waits for a pooled connection. Default 5 s.
    pub acquire_timeout: Duration,
    /// Server-side limit on one statement. Default 10 s.
    pub statement_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(10),
        }
    }
}

/// Rows buffered between a listing's database task and the HTTP body.
const LISTING_CHANNEL_ROWS: usize = 256;

/// The PostgreSQL backend.
#[derive(Debug, Clone)]
pub struct PgBackend {
    pool: PgPool,
}

impl PgBackend {
    /// Connects lazily: connections open on first use.
    pub fn connect_lazy(url: &str, options: &PgOptions) -> Result<PgBackend, BackendError> {
        let connect = PgConnectOptions::from_str(url)
            .map_err(|error| BackendError::Internal(format!("invalid DATABASE_URL: {error}")))?
            .application_name("tally-query")
            // Custom plans prune partitions and drop unused filters at plan time; a generic plan
            // of these parameterised statements could scan every partition of a tenant.
            .options([
                ("statement_timeout", format!("{}ms", options.statement_timeout.as_millis())),
                ("plan_cache_mode", "force_custom_plan".to_owned()),
                // Grouping a month of a busy tenant's rollups sorts ~100 MB of rows: in memory,
                // not on disk (per sort, per connection of the pool).
                ("work_mem", "64MB".to_owned()),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect);
        Ok(PgBackend { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The whole hours of the scope that a period boundary cuts (none in a time zone whose
    /// offsets are whole hours). They are read from raw events; asking first keeps the main
    /// statement free of that branch in the common case.
    async fn straddled_hours(&self, query: &AggregateQuery) -> Result<Vec<OffsetDateTime>, BackendError> {
        let Some(period) = query.period else { return Ok(Vec::new()) };
        if query.scope.edges == Edges::Hour {
            return Ok(Vec::new());
        }
        let (whole_start, whole_end) = whole_hours(query.scope.start, query.scope.end);
        if whole_start >= whole_end {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT DISTINCT date_trunc('hour', b) AS hour FROM ({series}) s(b) \
             WHERE b > $4::timestamptz AND b < $5::timestamptz AND date_trunc('hour', b) <> b ORDER BY 1",
            series = boundary_series_sql(period),
        );
        sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(query.scope.tenant_id)
            .bind(query.scope.start)
            .bind(query.scope.end)
            .bind(whole_start)
            .bind(whole_end)
            .bind(&query.scope.time_zone)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)
    }
}

impl PgBackend {
    /// How a per-user question reads its whole hours ([`DaySplit`]). Whole UTC days of the scope
    /// come from the daily rollups when every hour of the day falls in one bucket: always without
    /// periods; for days, weeks and months when no local boundary lies inside the day (asked of
    /// PostgreSQL, which bounds the buckets, unless the zone is UTC); never for hours.
    async fn day_split(&self, query: &AggregateQuery) -> Result<DaySplit, BackendError> {
        let (whole_start, whole_end) = whole_hours(query.scope.start, query.scope.end);
        if whole_start >= whole_end {
            return Ok(DaySplit::default());
        }
        let (first_day, end_day) = whole_days(whole_start, whole_end);
        let by_period = query.grouping_sets.iter().flatten().any(|dimension| *dimension == Dimension::Period);
        let days: Vec<OffsetDateTime> = match query.period.filter(|_| by_period) {
            _ if first_day >= end_day => Vec::new(),
            Some(Period::Hour) => Vec::new(),
            Some(period) if !matches!(query.scope.time_zone.as_str(), "UTC" | "Etc/UTC") => {
                // The hours of a day are bucketed by their middle (`Edges::Hour`) or their start
                // (`Edges::Exact`, where a cut hour is read from raw events): the day fits one
                // bucket when its first and last instants so placed share it.
                let (first, last) = match query.scope.edges {
                    Edges::Hour => ("interval '30 minutes'", "interval '23 hours 30 minutes'"),
                    Edges::Exact => ("interval '0'", "interval '23:59:59.999999'"),
                };
                let sql = format!(
                    "SELECT d FROM generate_series($1::timestamptz, $2::timestamptz - interval '24 hours', \
                       interval '24 hours') AS s(d) \
                     WHERE date_trunc('{unit}', d + {first}, $3::text) = date_trunc('{unit}', d + {last}, $3::text) \
                     ORDER BY d",
                    unit = period.sql_unit(),
                );
                sqlx::query_scalar(AssertSqlSafe(sql))
                    .bind(first_day)
                    .bind(end_day)
                    .bind(&query.scope.time_zone)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(classify)?
            }
            _ => {
                let count = (end_day - first_day).whole_days();
                (0..count).map(|day| first_day + time::Duration::days(day)).collect()
            }
        };
        Ok(DaySplit::new(whole_start, whole_end, &days))
    }
}

/// The whole UTC days inside `[start, end)`, as `[first, end)` (empty when `first >= end`).
fn whole_days(start: OffsetDateTime, end: OffsetDateTime) -> (OffsetDateTime, OffsetDateTime) {
    let midnight = |t: OffsetDateTime| t.replace_time(time::Time::MIDNIGHT);
    let start = start.to_offset(time::UtcOffset::UTC);
    let end = end.to_offset(time::UtcOffset::UTC);
    let first = if midnight(start) == start { start } else { midnight(start) + time::Duration::days(1) };
    (first, midnight(end))
}

/// The whole hours `[whole_start, whole_end)` of a per-user question, split into ranges read
/// from `usage_rollup_hourly_live` and whole UTC days read from `usage_rollup_user_daily` plus
/// their pending rows. Together they cover the whole hours exactly once. Each range is its own
/// branch of the statement with its bounds as scalar parameters (`$15` on: the hourly ranges,
/// then the daily ones), so that the planner sees each range's size and reads it by index
/// (over `unnest` of arrays it guessed, and scanned a tenant's whole hourly rollups).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct DaySplit {
    hour_starts: Vec<OffsetDateTime>,
    hour_ends: Vec<OffsetDateTime>,
    day_starts: Vec<OffsetDateTime>,
    day_ends: Vec<OffsetDateTime>,
}

/// The parameter numbers of a range's start and end.
type Bounds = (usize, usize);

impl DaySplit {
    /// The parameter numbers of the hourly and the daily ranges' bounds, `(start, end)`.
    fn parameters(&self) -> (Vec<Bounds>, Vec<Bounds>) {
        let hourly = self.hour_starts.len();
        let pair = |i: usize| (15 + 2 * i, 16 + 2 * i);
        ((0..hourly).map(pair).collect(), (hourly..hourly + self.day_starts.len()).map(pair).collect())
    }

    /// From the UTC midnights (ascending, inside the whole hours) of the days to read daily.
    fn new(whole_start: OffsetDateTime, whole_end: OffsetDateTime, days: &[OffsetDateTime]) -> DaySplit {
        let mut split = DaySplit::default();
        for &day in days {
            match split.day_ends.last_mut() {
                Some(end) if *end == day => *end = day + time::Duration::days(1),
                _ => {
                    split.day_starts.push(day);
                    split.day_ends.push(day + time::Duration::days(1));
                }
            }
        }
        let mut at = whole_start;
        for (&start, &end) in split.day_starts.iter().zip(&split.day_ends) {
            if at < start {
                split.hour_starts.push(at);
                split.hour_ends.push(start);
            }
            at = end;
        }
        if at < whole_end {
            split.hour_starts.push(at);
            split.hour_ends.push(whole_end);
        }
        split
    }
}

/// Whether a database error is worth retrying, decided here for every statement.
fn classify(error: sqlx::Error) -> BackendError {
    match &error {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|code| code.into_owned()).unwrap_or_default();
            if code.starts_with("08") || code.starts_with("57") || code == "53300" {
                BackendError::Unavailable(error.to_string())
            } else {
                BackendError::Internal(error.to_string())
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => BackendError::Unavailable(error.to_string()),
        // A numeric sum beyond what `Decimal` holds (sqlx's decoder says so in these words).
        sqlx::Error::ColumnDecode { index, source } if source.to_string().contains("not representable") => {
            BackendError::Overflow(index.trim_matches('"').to_owned())
        }
        _ => BackendError::Internal(error.to_string()),
    }
}

impl Backend for PgBackend {
    fn find_api_key<'a>(
        &'a self,
        key_hash: &'a [u8; 32],
    ) -> BoxFuture<'a, Result<Option<KeyRecord>, BackendError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT k.id, k.tenant_id, t.name, t.disabled_at IS NOT NULL AS disabled, t.time_zone, k.scopes, \
                   (EXTRACT(EPOCH FROM k.expires_at) * 1000000)::bigint AS expires_at_us, \
                   k.revoked_at IS NOT NULL AS revoked \
                 FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.key_hash = $1",
            )
            .bind(&key_hash[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
            row.map(|row| {
                Ok(KeyRecord {
                    key_id: row.try_get("id")?,
                    tenant_id: row.try_get("tenant_id")?,
                    tenant_name: row.try_get("name")?,
                    tenant_disabled: row.try_get("disabled")?,
                    time_zone: row.try_get("time_zone")?,
                    scopes: row.try_get("scopes")?,
                    expires_at_us: row.try_get("expires_at_us")?,
                    revoked: row.try_get("revoked")?,
                })
            })
            .transpose()
            .map_err(classify)
        })
    }

    fn price_rules(&self, tenant_id: Uuid) -> BoxFuture<'_, Result<Vec<PriceRuleRecord>, BackendError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT id, definition, (EXTRACT(EPOCH FROM effective_from) * 1000000)::bigint AS from_us, \
                   (EXTRACT(EPOCH FROM effective_until) * 1000000)::bigint AS until_us, \
                   retired_at IS NOT NULL AS retired \
                 FROM price_rules WHERE tenant_id = $1 ORDER BY effective_from, id",
            )
            .bind(tenant_id)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
            rows.iter()
                .map(|row| {
                    Ok(PriceRuleRecord {
                        id: row.try_get("id")?,
                        definition: row.try_get("definition")?,
                        effective_from_us: row.try_get("from_us")?,
                        effective_until_us: row.try_get("until_us")?,
                        retired: row.try_get("retired")?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(classify)
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
        Box::pin(async move {
            sqlx::query_scalar(
                "SELECT t AT TIME ZONE $1 FROM unnest($2::timestamp[]) WITH ORDINALITY AS u(t, i) ORDER BY i",
            )
            .bind(time_zone)
            .bind(times)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)
        })
    }

    fn periods<'a>(
        &'a self,
        scope: &'a Scope,
        period: Period,
    ) -> BoxFuture<'a, Result<Vec<(OffsetDateTime, OffsetDateTime)>, BackendError>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT b AS period_start, {end} AS period_end FROM ({series}) s(b) WHERE b < $3 ORDER BY b",
                end = period_end_sql(period, "b"),
                series = boundary_series_sql(period),
            );
            // The series uses the aggregate statements' numbering: `$2`/`$3` range, `$6` zone.
            let rows: Vec<(OffsetDateTime, OffsetDateTime)> = sqlx::query_as(AssertSqlSafe(sql))
                .bind(scope.tenant_id)
                .bind(scope.start)
                .bind(scope.end)
                .bind(scope.start)
                .bind(scope.end)
                .bind(&scope.time_zone)
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
            Ok(rows)
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
            let mut rows = bind_listing(sqlx::query(AssertSqlSafe(sql)), &query, end).fetch(&pool);
            while let Some(row) = rows.next().await {
                let record = row.and_then(|row| event_record(&row)).map_err(classify);
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
            let row = bind_listing(sqlx::query(AssertSqlSafe(sql)), &whole, whole.scope.end)
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
            let plan = GroupingPlan::new(query);
            let straddled = self.straddled_hours(query).await?;
            let count_apart = query.measures.unique_users && !groups_by_users(query);
            let split = match groups_by_users(query) || count_apart {
                true => self.day_split(query).await?,
                false => DaySplit::default(),
            };
            // A statement binds the split's ranges only if it reads per-user rows: the others'
            // text does not change with the split, and sqlx prepares each text once, with the
            // parameter count of its first use.
            let no_split = DaySplit::default();
            let sums_split = if groups_by_users(query) { &split } else { &no_split };
            let sql = aggregate_sql(query, &plan, !straddled.is_empty(), sums_split);
            let sums = bind_scope(sqlx::query(AssertSqlSafe(sql)), query, &straddled, sums_split)
                .fetch_all(&self.pool);
            let (rows, user_counts) = if count_apart {
                let sql = unique_users_sql(query, &plan, !straddled.is_empty(), &split);
                let counts = bind_scope(sqlx::query(AssertSqlSafe(sql)), query, &straddled, &split)
                    .fetch_all(&self.pool);
                tokio::try_join!(sums, counts).map_err(classify)?
            } else {
                (sums.await.map_err(classify)?, Vec::new())
            };
            let mut unique_users = HashMap::with_capacity(user_counts.len());
            for row in &user_counts {
                let count: i64 = row.try_get("unique_users").map_err(classify)?;
                unique_users.insert(group_key(row, &plan).map_err(classify)?, count);
            }
            rows.iter()
                .map(|row| {
                    let mut row = aggregate_row(row, query, &plan)?;
                    if count_apart {
                        let count = unique_users.get(&(row.set, row.key.clone())).copied().unwrap_or(0);
                        row.stats.unique_users = Some(count);
                    }
                    Ok(row)
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(classify)
        })
    }

    fn custom_quantities<'a>(
        &'a self,
        query: &'a AggregateQuery,
    ) -> BoxFuture<'a, Result<Vec<CustomQuantityRow>, BackendError>> {
        Box::pin(async move {
            let plan = GroupingPlan::new(query);
            let straddled = self.straddled_hours(query).await?;
            let split = match groups_by_users(query) {
                true => self.day_split(query).await?,
                false => DaySplit::default(),
            };
            let sql = custom_sql(query, &plan, !straddled.is_empty(), &split);
            let rows = bind_scope(sqlx::query(AssertSqlSafe(sql)), query, &straddled, &split)
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
            rows.iter()
                .map(|row| {
                    let (set, key) = group_key(row, &plan)?;
                    Ok(CustomQuantityRow {
                        set,
                        key,
                        name: row.try_get("name")?,
                        value: row.try_get("value")?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(classify)
        })
    }
}

/// Binds `$1`..`$14`, the parameters every aggregate statement declares (see [`source_sql`]),
/// then the bounds of each range of the per-user split (`$15` on, [`DaySplit::ranges_sql`]).
fn bind_scope<'q>(
    statement: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    query: &'q AggregateQuery,
    straddled: &'q [OffsetDateTime],
    split: &'q DaySplit,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let (whole_start, whole_end) = whole_hours(query.scope.start, query.scope.end);
    let filter = &query.filter;
    let statement = statement
        .bind(query.scope.tenant_id)
        .bind(query.scope.start)
        .bind(query.scope.end)
        .bind(whole_start)
        .bind(whole_end)
        .bind(&query.scope.time_zone)
        .bind(&filter.service_type)
        .bind(&filter.service_provider)
        .bind(&filter.user_id)
        .bind(&filter.model)
        .bind(&filter.event_type)
        .bind(&query.measures.custom_metric)
        .bind(query.top.as_ref().map(|(_, limit)| i64::from(*limit)))
        .bind(straddled);
    let ranges =
        split.hour_starts.iter().zip(&split.hour_ends).chain(split.day_starts.iter().zip(&split.day_ends));
    ranges.fold(statement, |statement, (start, end)| statement.bind(*start).bind(*end))
}

/// The whole UTC hours inside `[start, end)`, as `[whole_start, whole_end)`; empty (both `end`)
/// when there is none.
pub fn whole_hours(start: OffsetDateTime, end: OffsetDateTime) -> (OffsetDateTime, OffsetDateTime) {
    const HOUR_US: i128 = 3_600_000_000;
    let to_us = |t: OffsetDateTime| t.unix_timestamp_nanos() / 1000;
    let from_us =
        |us: i128| OffsetDateTime::from_unix_timestamp_nanos(us * 1000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let ceil = (to_us(start) + HOUR_US - 1).div_euclid(HOUR_US) * HOUR_US;
    let floor = to_us(end).div_euclid(HOUR_US) * HOUR_US;
    if floor <= ceil { (end, end) } else { (from_us(ceil), from_us(floor)) }
}

/// Period starts from the one holding `$2` up to `$3`, stepping in local time for days, weeks
/// and months (so DST days are 23 or 25 hours long) and in real time for hours.
fn boundary_series_sql(period: Period) -> String {
    match period {
        Period::Hour => {
            "SELECT generate_series(date_trunc('hour', $2::timestamptz, $6::text), $3::timestamptz, interval '1 hour')"
                .to_owned()
        }
        _ => format!(
            "SELECT generate_series(date_trunc('{unit}', $2::timestamptz, $6::text) AT TIME ZONE $6::text, \
               $3::timestamptz AT TIME ZONE $6::text, interval '{step}') AT TIME ZONE $6::text",
            unit = period.sql_unit(),
            step = period.sql_step(),
        ),
    }
}

/// The end of the period starting at `start` (an SQL expression).
fn period_end_sql(period: Period, start: &str) -> String {
    match period {
        Period::Hour => format!("({start} + interval '1 hour')"),
        _ => format!(
            "((({start}) AT TIME ZONE $6::text + interval '{step}') AT TIME ZONE $6::text)",
            step = period.sql_step()
        ),
    }
}

/// The raw-event bucket index (0-based) of `latency_us`, as the sink computes it.
const RAW_BUCKET_SQL: &str = "CASE WHEN e.latency_us IS NULL THEN NULL WHEN e.latency_us < 1000 THEN 0 \
    ELSE least(floor(2 * log(2.0, e.latency_us / 1000.0))::int + 1, 45) END";

/// `WITH ... src AS (...)`: the rows to aggregate, from rollups for whole unstraddled hours and
/// from raw events for the rest (the partial hours before `$4` and after `$5`, and straddled
/// hours), in one shape. Parameters: `$1` tenant, `$2`/`$3` range,
/// `$4`/`$5` whole hours, `$6` time zone, `$7`..`$11` filters, `$12` custom metric name,
/// `$13` limit, `$14` straddled hours, `$15`..`$18` the per-user split of the whole hours
/// ([`DaySplit`]; per-user sources only). [`Source::UserKeys`] selects only the key columns, so
/// the per-user rollups are read by index-only scans of their primary keys.
fn source_sql(histogram: bool, straddled: bool, source: Source, edges: Edges, split: &DaySplit) -> String {
    let users = source != Source::PerService;
    let quantities = QUANTITY_NAMES.join(", ");
    let raw_quantities: Vec<String> =
        QUANTITY_NAMES.iter().map(|name| format!("coalesce(e.{name}, 0) AS {name}")).collect();
    let (rollup_buckets, raw_buckets) = if histogram {
        (
            ", latency_buckets".to_owned(),
            format!(
                ", CASE WHEN lb.b IS NULL THEN array_fill(0::bigint, ARRAY[{n}]) \
                 ELSE array_fill(0::bigint, ARRAY[lb.b]) || 1::bigint || array_fill(0::bigint, ARRAY[{last} - lb.b]) END",
                n = LATENCY_BUCKETS,
                last = LATENCY_BUCKETS - 1,
            ),
        )
    } else {
        (String::new(), String::new())
    };
    let mut sql = String::from("WITH ");
    let mut raw_select = format!(
        "SELECT e.occurred_at, e.service_type, e.service_provider, coalesce(e.model, ''), e.user_id, e.event_type, \
           1::bigint, (e.status = 1)::int::bigint, {raw_quantities}, coalesce(e.custom_quantities, '{{}}'::jsonb), \
           coalesce(e.cost, 0), (e.cost IS NULL)::int::bigint, (e.latency_us IS NOT NULL)::int::bigint, \
           coalesce(e.latency_us, 0), coalesce(e.latency_us, 0){raw_buckets}",
        raw_quantities = raw_quantities.join(", "),
    );
    let raw_filter = "($7::text IS NULL OR e.service_type = $7::text) AND ($8::text IS NULL OR e.service_provider = $8::text) \
        AND ($9::text IS NULL OR e.user_id = $9::text) AND ($10::text IS NULL OR coalesce(e.model, '') = $10::text) \
        AND ($11::text IS NULL OR e.event_type = $11::text)";
    let mut raw_bucket = format!("CROSS JOIN LATERAL (SELECT {RAW_BUCKET_SQL} AS b) lb");
    let mut rollup_values = format!(
        ", event_count, error_count, {quantities}, custom_quantities, cost, unpriced_count, latency_count, \
         latency_sum_us, latency_max_us{rollup_buckets}"
    );
    if source == Source::UserKeys {
        raw_select =
            "SELECT e.occurred_at, e.service_type, e.service_provider, coalesce(e.model, ''), e.user_id, \
            e.event_type"
                .to_owned();
        raw_bucket = String::new();
        rollup_values = String::new();
    }
    // Under `Edges::Hour` the scope is whole hours and no raw event is read; a rollup hour is
    // bucketed by its middle. Each raw part is its own range scan of the (tenant_id,
    // occurred_at) index, so only the partitions of those hours are read.
    let (rollup_at, raw_parts) = match edges {
        Edges::Hour => ("r.hour + interval '30 minutes'", String::new()),
        Edges::Exact => (
            "r.hour",
            format!(
                " UNION ALL {raw_select} FROM usage_events e {raw_bucket} \
                 WHERE e.tenant_id = $1 AND e.occurred_at >= $2::timestamptz AND e.occurred_at < $4::timestamptz AND {raw_filter} \
                 UNION ALL {raw_select} FROM usage_events e {raw_bucket} \
                 WHERE e.tenant_id = $1 AND e.occurred_at >= $5::timestamptz AND e.occurred_at < $3::timestamptz AND {raw_filter}"
            ),
        ),
    };
    let rollup_filter = |alias: &str, user: &str| {
        format!(
            "($7::text IS NULL OR {alias}.service_type = $7::text) AND ($8::text IS NULL OR {alias}.service_provider = $8::text) \
             AND ($9::text IS NULL OR {user} = $9::text) AND ($10::text IS NULL OR {alias}.model = $10::text) \
             AND ($11::text IS NULL OR {alias}.event_type = $11::text)"
        )
    };
    let straddle_filter = if straddled { " AND NOT (r.hour = ANY ($14::timestamptz[]))" } else { "" };
    // Per user, whole hours are read by ranges (`DaySplit`): the hourly ranges from the hourly
    // rollups, the whole UTC days from the daily ones plus the pending rows of those days (read
    // through `usage_rollup_pending_sums`: the daily table holds only folded rows). A day's
    // rows are placed at its first hour, in the bucket every hour of it falls in.
    let rollup_part = if users {
        let day_at = match edges {
            Edges::Hour => "(d.day::timestamp AT TIME ZONE 'UTC') + interval '30 minutes'",
            Edges::Exact => "(d.day::timestamp AT TIME ZONE 'UTC')",
        };
        let (hourly, daily) = split.parameters();
        let mut parts: Vec<String> = hourly
            .iter()
            .map(|(lo, hi)| {
                format!(
                    "SELECT {rollup_at} AS at, service_type, service_provider, model, user_id, event_type{rollup_values} \
                     FROM usage_rollup_hourly_live r \
                     WHERE r.tenant_id = $1 AND r.hour >= ${lo}::timestamptz AND r.hour < ${hi}::timestamptz\
                       {straddle_filter} AND {filter}",
                    filter = rollup_filter("r", "r.user_id"),
                )
            })
            .collect();
        for (lo, hi) in daily {
            parts.push(format!(
                "SELECT {day_at} AS at, service_type, service_provider, model, user_id, event_type{rollup_values} \
                 FROM usage_rollup_user_daily d \
                 WHERE d.tenant_id = $1 AND d.day >= (${lo}::timestamptz AT TIME ZONE 'UTC')::date \
                   AND d.day < (${hi}::timestamptz AT TIME ZONE 'UTC')::date AND {filter}",
                filter = rollup_filter("d", "d.user_id"),
            ));
            parts.push(format!(
                "SELECT {rollup_at} AS at, service_type, service_provider, model, user_id, event_type{rollup_values} \
                 FROM usage_rollup_pending_sums r \
                 WHERE r.tenant_id = $1 AND r.hour >= ${lo}::timestamptz AND r.hour < ${hi}::timestamptz AND {filter}",
                filter = rollup_filter("r", "r.user_id"),
            ));
        }
        if parts.is_empty() {
            // No whole hour: the same columns, no row.
            parts.push(format!(
                "SELECT {rollup_at} AS at, service_type, service_provider, model, user_id, event_type{rollup_values} \
                 FROM usage_rollup_hourly_live r WHERE false"
            ));
        }
        parts.join(" UNION ALL ")
    } else {
        format!(
            "SELECT {rollup_at} AS at, service_type, service_provider, model, ''::text AS user_id, event_type{rollup_values} \
             FROM usage_rollup_service_hourly_live r \
             WHERE r.tenant_id = $1 AND r.hour >= $4::timestamptz AND r.hour < $5::timestamptz{straddle_filter} AND {filter}",
            filter = rollup_filter("r", "''::text"),
        )
    };
    let _ = write!(
        sql,
        "src AS ({rollup_part}{raw_parts}{straddle_part}) ",
        // LATERAL makes each straddled hour drive its own index range scan.
        straddle_part = if straddled {
            format!(
                " UNION ALL SELECT x.* FROM unnest($14::timestamptz[]) AS h(hour) CROSS JOIN LATERAL ( \
                  {raw_select} FROM usage_events e {raw_bucket} WHERE e.tenant_id = $1 AND e.occurred_at >= h.hour \
                    AND e.occurred_at < h.hour + interval '1 hour' AND {raw_filter}) x"
            )
        } else {
            String::new()
        },
    );
    sql
}

/// What `src` reads its whole hours from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// `usage_rollup_hourly`, every column.
    PerUser,
    /// `usage_rollup_service_hourly`: the same sums without the user.
    PerService,
    /// `usage_rollup_hourly`, only the key columns (for counting distinct users).
    UserKeys,
}

/// Whether a query's groups depend on users: it groups by, filters on or ranks by them. Such a
/// query reads the per-user rollups for everything. Any other query reads its sums from
/// `usage_rollup_service_hourly` (one row per hour and service instead of one per user too) and,
/// if it counts distinct users, counts them in a second statement over the per-user rollups'
/// keys only ([`Source::UserKeys`]).
pub(crate) fn groups_by_users(query: &AggregateQuery) -> bool {
    query.filter.user_id.is_some()
        || query.grouping_sets.iter().flatten().any(|dimension| *dimension == Dimension::UserId)
        || matches!(query.top, Some((Metric::UniqueUsers, _)))
}

/// Whether the answer carries latency histograms (for percentiles). They are kept per service
/// and hour, not per user: a query whose groups depend on users gets none (its percentiles are
/// null; counts, sums, mean and maximum latency are there).
fn reads_histogram(query: &AggregateQuery) -> bool {
    query.measures.latency_histogram && !groups_by_users(query)
}

/// The dimension columns of a statement grouping `src` directly, with `period_end` when it
/// groups by period.
fn group_columns_sql(query: &AggregateQuery, plan: &GroupingPlan) -> String {
    let mut sql = dimension_columns_sql(query, plan);
    if let (Some(period), true) = (query.period, plan.dimensions.contains(&Dimension::Period)) {
        let start = dimension_sql(Dimension::Period, query.period);
        let _ = write!(sql, "{} AS period_end, ", period_end_sql(period, &start));
    }
    sql
}

/// `count(DISTINCT user_id)` per group, over the per-user rollups' keys and raw events.
fn unique_users_sql(
    query: &AggregateQuery,
    plan: &GroupingPlan,
    straddled: bool,
    split: &DaySplit,
) -> String {
    let mut sql = source_sql(false, straddled, Source::UserKeys, query.scope.edges, split);
    sql.push_str("SELECT ");
    sql.push_str(&group_columns_sql(query, plan));
    sql.push_str("count(DISTINCT user_id) AS unique_users FROM src");
    sql.push_str(&group_by_sql(query, plan, None));
    sql
}

/// Which dimensions a statement groups on, and how rows map back to grouping sets.
struct GroupingPlan {
    /// Every dimension of any set, in a fixed order.
    dimensions: Vec<Dimension>,
    /// The `GROUPING(...)` bit mask of each set (bit set: dimension not grouped).
    masks: Vec<i32>,
}

impl GroupingPlan {
    fn new(query: &AggregateQuery) -> GroupingPlan {
        let mut dimensions: Vec<Dimension> = query.grouping_sets.iter().flatten().copied().collect();
        dimensions.sort();
        dimensions.dedup();
        let masks = query
            .grouping_sets
            .iter()
            .map(|set| {
                dimensions.iter().fold(0, |mask, dimension| (mask << 1) | i32::from(!set.contains(dimension)))
            })
            .collect();
        GroupingPlan { dimensions, masks }
    }

    fn multiple_sets(&self) -> bool {
        self.masks.len() > 1
    }
}

/// The SQL expression of a dimension over `src`.
fn dimension_sql(dimension: Dimension, period: Option<Period>) -> String {
    match dimension {
        Dimension::Period => {
            let unit = period.map_or("day", Period::sql_unit);
            format!("date_trunc('{unit}', at, $6::text)")
        }
        other => other.name().to_owned(),
    }
}

/// `GROUP BY ...` for the plan, with `extra` appended to every set.
fn group_by_sql(query: &AggregateQuery, plan: &GroupingPlan, extra: Option<&str>) -> String {
    let set_sql = |set: &Vec<Dimension>| {
        let mut parts: Vec<String> = set.iter().map(|d| dimension_sql(*d, query.period)).collect();
        parts.extend(extra.map(str::to_owned));
        parts.join(", ")
    };
    if plan.multiple_sets() {
        let sets: Vec<String> = query.grouping_sets.iter().map(|set| format!("({})", set_sql(set))).collect();
        format!(" GROUP BY GROUPING SETS ({})", sets.join(", "))
    } else {
        let only = query.grouping_sets.first().map(set_sql).unwrap_or_else(|| extra.unwrap_or("").to_owned());
        if only.is_empty() { String::new() } else { format!(" GROUP BY {only}") }
    }
}

/// The select list naming each dimension of the plan (NULL where a row's set lacks it).
fn dimension_columns_sql(query: &AggregateQuery, plan: &GroupingPlan) -> String {
    let mut sql = String::new();
    for dimension in &plan.dimensions {
        let _ = write!(sql, "{} AS {}, ", dimension_sql(*dimension, query.period), column_name(*dimension));
    }
    if plan.multiple_sets() {
        let all: Vec<String> = plan.dimensions.iter().map(|d| dimension_sql(*d, query.period)).collect();
        let _ = write!(sql, "GROUPING({}) AS grouping_mask, ", all.join(", "));
    }
    sql
}

fn column_name(dimension: Dimension) -> &'static str {
    match dimension {
        Dimension::Period => "period_start",
        other => other.name(),
    }
}

/// The sort column of a ranked metric (only sums are ranked).
fn metric_column(metric: &Metric) -> String {
    match metric {
        Metric::ErrorCount => "error_count".into(),
        Metric::TotalCost => "cost".into(),
        Metric::Quantity(index) => QUANTITY_NAMES[*index].into(),
        Metric::Custom(_) => "custom_metric".into(),
        _ => "event_count".into(),
    }
}

fn aggregate_sql(query: &AggregateQuery, plan: &GroupingPlan, straddled: bool, split: &DaySplit) -> String {
    let measures = &query.measures;
    let source = if groups_by_users(query) { Source::PerUser } else { Source::PerService };
    let histogram = reads_histogram(query);
    let mut sql = source_sql(histogram, straddled, source, query.scope.edges, split);
    sql.push_str("SELECT g.*");
    if let (Some(period), true) = (query.period, plan.dimensions.contains(&Dimension::Period)) {
        let _ = write!(sql, ", {} AS period_end", period_end_sql(period, "g.period_start"));
    }
    if let Some((metric, _)) = &query.top {
        let _ = write!(
            sql,
            ", count(*) OVER () AS groups_total, sum({}) OVER () AS metric_total",
            metric_column(metric)
        );
    }
    sql.push_str(" FROM (SELECT ");
    sql.push_str(&dimension_columns_sql(query, plan));
    sql.push_str(
        "coalesce(sum(event_count), 0)::bigint AS event_count, coalesce(sum(error_count), 0)::bigint AS error_count, ",
    );
    for name in QUANTITY_NAMES {
        let _ = write!(sql, "coalesce(sum({name}), 0) AS {name}, ");
    }
    sql.push_str(
        "coalesce(sum(cost), 0) AS cost, coalesce(sum(unpriced_count), 0)::bigint AS unpriced_count, \
         coalesce(sum(latency_count), 0)::bigint AS latency_count, \
         coalesce(sum(latency_sum_us), 0)::bigint AS latency_sum_us, \
         coalesce(max(latency_max_us), 0)::bigint AS latency_max_us, \
         NOT coalesce(bool_or(custom_quantities <> '{}'::jsonb), false) AS no_custom_quantities",
    );
    if measures.unique_users && source == Source::PerUser {
        sql.push_str(", count(DISTINCT user_id) AS unique_users");
    }
    if histogram {
        let sums: Vec<String> = (1..=LATENCY_BUCKETS)
            .map(|i| format!("coalesce(sum(latency_buckets[{i}]), 0)::bigint"))
            .collect();
        let _ = write!(sql, ", ARRAY[{}] AS latency_buckets", sums.join(", "));
    }
    if measures.custom_metric.is_some() {
        sql.push_str(", coalesce(sum((custom_quantities ->> $12::text)::numeric), 0) AS custom_metric");
    }
    sql.push_str(" FROM src");
    sql.push_str(&group_by_sql(query, plan, None));
    sql.push_str(") g");
    if let Some((metric, _)) = &query.top {
        let _ = write!(sql, " ORDER BY {} DESC", metric_column(metric));
        for dimension in &plan.dimensions {
            let _ = write!(sql, ", {} ASC", column_name(*dimension));
        }
        sql.push_str(" LIMIT $13::bigint");
    }
    sql
}

fn custom_sql(query: &AggregateQuery, plan: &GroupingPlan, straddled: bool, split: &DaySplit) -> String {
    let source = if groups_by_users(query) { Source::PerUser } else { Source::PerService };
    let mut sql = source_sql(false, straddled, source, query.scope.edges, split);
    sql.push_str("SELECT ");
    sql.push_str(&group_columns_sql(query, plan));
    sql.push_str("kv.key AS name, sum(kv.value::numeric) AS value ");
    sql.push_str("FROM src CROSS JOIN LATERAL jsonb_each_text(src.custom_quantities) AS kv ");
    sql.push_str("WHERE src.custom_quantities <> '{}'::jsonb");
    sql.push_str(&group_by_sql(query, plan, Some("kv.key")));
    sql
}

fn group_key(row: &PgRow, plan: &GroupingPlan) -> Result<(usize, GroupKey), sqlx::Error> {
    let set = if plan.multiple_sets() {
        let mask: i32 = row.try_get("grouping_mask")?;
        plan.masks.iter().position(|m| *m == mask).unwrap_or(0)
    } else {
        0
    };
    let mut key = GroupKey::default();
    for dimension in &plan.dimensions {
        match dimension {
            Dimension::Period => {
                key.period_start = row.try_get("period_start")?;
                key.period_end = row.try_get("period_end")?;
            }
            Dimension::ServiceType => key.service_type = row.try_get("service_type")?,
            Dimension::ServiceProvider => key.service_provider = row.try_get("service_provider")?,
            Dimension::Model => key.model = row.try_get("model")?,
            Dimension::UserId => key.user_id = row.try_get("user_id")?,
            Dimension::EventType => key.event_type = row.try_get("event_type")?,
        }
    }
    Ok((set, key))
}

fn aggregate_row(
    row: &PgRow,
    query: &AggregateQuery,
    plan: &GroupingPlan,
) -> Result<AggregateRow, sqlx::Error> {
    let (set, key) = group_key(row, plan)?;
    let mut quantities = [Decimal::ZERO; 9];
    for (slot, name) in quantities.iter_mut().zip(QUANTITY_NAMES) {
        *slot = row.try_get(name)?;
    }
    let stats = Stats {
        event_count: row.try_get("event_count")?,
        error_count: row.try_get("error_count")?,
        unique_users: match query.measures.unique_users && groups_by_users(query) {
            true => Some(row.try_get("unique_users")?),
            false => None,
        },
        quantities,
        cost: row.try_get("cost")?,
        unpriced_count: row.try_get("unpriced_count")?,
        latency_count: row.try_get("latency_count")?,
        latency_sum_us: row.try_get("latency_sum_us")?,
        latency_max_us: row.try_get("latency_max_us")?,
        // Asked for but not kept (groups by user): no percentiles, the other latency figures stay.
        latency_buckets: match (query.measures.latency_histogram, reads_histogram(query)) {
            (_, true) => Some(row.try_get("latency_buckets")?),
            (true, false) => Some(Vec::new()),
            (false, false) => None,
        },
        no_custom_quantities: row.try_get("no_custom_quantities")?,
    };
    Ok(AggregateRow {
        set,
        key,
        stats,
        groups_total: if query.top.is_some() { Some(row.try_get("groups_total")?) } else { None },
        metric_total: if query.top.is_some() { Some(row.try_get("metric_total")?) } else { None },
        custom_metric: if query.measures.custom_metric.is_some() {
            Some(row.try_get("custom_metric")?)
        } else {
            None
        },
    })
}

/// The listing: `$1` tenant, `$2`/`$3` range, `$4`/`$5` keyset position, `$6`..`$10` filters,
/// `$11` status, `$12` limit, `$13` offset, `$14`/`$15` a metadata key and value. Served by the `(tenant_id, occurred_at, event_id)`
/// index, read backwards; with a cursor the scan starts at the position.
fn listing_sql() -> String {
    format!(
        "SELECT event_id, occurred_at, user_id, service_type, service_provider, event_type, model, status, \
           error_code, latency_us, {quantities}, custom_quantities::text AS custom_quantities, cost, metadata, \
           tags, session_id, request_id \
         FROM usage_events \
         WHERE tenant_id = $1 AND occurred_at >= $2 AND occurred_at < $3 \
           AND ($4::timestamptz IS NULL OR occurred_at < $4::timestamptz OR event_id < $5::uuid) \
           AND ($6::text IS NULL OR service_type = $6::text) AND ($7::text IS NULL OR service_provider = $7::text) \
           AND ($8::text IS NULL OR user_id = $8::text) AND ($9::text IS NULL OR coalesce(model, '') = $9::text) \
           AND ($10::text IS NULL OR event_type = $10::text) AND ($11::smallint IS NULL OR status = $11::smallint) \
           AND ($14::text IS NULL OR metadata ->> $14::text = $15::text) \
         ORDER BY occurred_at DESC, event_id DESC LIMIT $12 OFFSET $13",
        quantities = QUANTITY_NAMES.join(", "),
    )
}

/// Binds [`listing_sql`]'s parameters, the range ending at `end`.
fn bind_listing<'q>(
    statement: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    query: &'q ListQuery,
    end: OffsetDateTime,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let filter = &query.filter;
    statement
        .bind(query.scope.tenant_id)
        .bind(query.scope.start)
        .bind(end)
        .bind(query.after.map(|(at, _)| at))
        .bind(query.after.map(|(_, id)| id))
        .bind(&filter.service_type)
        .bind(&filter.service_provider)
        .bind(&filter.user_id)
        .bind(&filter.model)
        .bind(&filter.event_type)
        .bind(query.status.map(|status| status as i16))
        .bind(i64::from(query.limit))
        .bind(i64::try_from(query.offset).unwrap_or(i64::MAX))
        .bind(query.metadata.as_ref().map(|(key, _)| key.as_str()))
        .bind(query.metadata.as_ref().map(|(_, value)| value.as_str()))
}

fn event_record(row: &PgRow) -> Result<EventRecord, sqlx::Error> {
    let mut quantities: [Option<Decimal>; 9] = [None; 9];
    for (slot, name) in quantities.iter_mut().zip(QUANTITY_NAMES) {
        *slot = row.try_get(name)?;
    }
    let status: i16 = row.try_get("status")?;
    Ok(EventRecord {
        event_id: row.try_get("event_id")?,
        occurred_at: row.try_get("occurred_at")?,
        user_id: row.try_get("user_id")?,
        service_type: row.try_get("service_type")?,
        service_provider: row.try_get("service_provider")?,
        event_type: row.try_get("event_type")?,
        model: row.try_get("model")?,
        status: if status == 1 { EventStatus::Error } else { EventStatus::Success },
        error_code: row.try_get("error_code")?,
        latency_us: row.try_get("latency_us")?,
        quantities,
        custom_quantities: row.try_get("custom_quantities")?,
        cost: row.try_get("cost")?,
        metadata: row.try_get("metadata")?,
        tags: row.try_get::<Option<Vec<String>>, _>("tags")?.unwrap_or_default(),
        session_id: row.try_get("session_id")?,
        request_id: row.try_get("request_id")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;
    use uuid::Uuid;

    #[test]
    fn whole_hours_inside_a_range() {
        let (a, b) = whole_hours(datetime!(2024-01-01 10:15 UTC), datetime!(2024-01-01 13:00 UTC));
        assert_eq!((a, b), (datetime!(2024-01-01 11:00 UTC), datetime!(2024-01-01 13:00 UTC)));
        let (a, b) = whole_hours(datetime!(2024-01-01 10:15 UTC), datetime!(2024-01-01 10:45 UTC));
        assert_eq!((a, b), (datetime!(2024-01-01 10:45 UTC), datetime!(2024-01-01 10:45 UTC)));
        let (a, b) = whole_hours(datetime!(2024-01-01 10:00 UTC), datetime!(2024-01-01 11:00 UTC));
        assert_eq!((a, b), (datetime!(2024-01-01 10:00 UTC), datetime!(2024-01-01 11:00 UTC)));
    }

    #[test]
    fn grouping_masks_follow_postgres() {
        let scope = Scope::exact(Uuid::nil(), OffsetDateTime::UNIX_EPOCH, OffsetDateTime::UNIX_EPOCH, "UTC");
        let query = AggregateQuery {
            scope,
            filter: Default::default(),
            period: None,
            grouping_sets: vec![
                vec![],
                vec![Dimension::ServiceType, Dimension::ServiceProvider],
                vec![Dimension::Model],
            ],
            measures: Default::default(),
            top: None,
        };
        let plan = GroupingPlan::new(&query);
        assert_eq!(
            plan.dimensions,
            vec![Dimension::ServiceType, Dimension::ServiceProvider, Dimension::Model]
        );
        assert_eq!(plan.masks, vec![0b111, 0b001, 0b110]);
    }
}
