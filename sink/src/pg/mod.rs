//! The PostgreSQL backend: binary `COPY` into `usage_events`, dedup, and rollup upserts, one
//! transaction per batch.

mod citus;
mod control;
mod copy;
mod nodelay;
mod recent;
mod rerate;
mod rerate_jobs;
mod timescale;

use std::collections::HashMap;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

pub use citus::Distribution;
pub use copy::{CopyBuffer, encode_event, encode_numeric, event_columns, write_quantities_json};
pub use nodelay::set_nodelay;

use crate::rollup::{self, LATENCY_BUCKETS};
use crate::row::{EventRow, Outcome};
use crate::store::{ApiKey, FoldReport, NewApiKey, Retention, Scope, StoreError, Tenant};

/// Connection settings of the PostgreSQL backend.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Pool size: sink workers, key look-ups and maintenance share it.
    pub max_connections: u32,
    /// How long a caller waits for a pooled connection before the store is unavailable.
    pub acquire_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions { max_connections: 8, acquire_timeout: Duration::from_secs(5) }
    }
}

/// The PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    copy_events: String,
    copy_staging: String,
    copy_pending: String,
    copy_service_pending: String,
    fold_all: std::sync::Arc<str>,
    fold_tenant: std::sync::Arc<str>,
    recent: std::sync::Arc<recent::RecentKeys>,
    /// Whether the database has Citus, detected once (see `citus`).
    citus: std::sync::Arc<tokio::sync::OnceCell<bool>>,
    citus_fold: std::sync::Arc<citus::FoldStatements>,
}

impl PgStore {
    /// Connects lazily: the pool opens connections on first use, so a server can start while
    /// PostgreSQL is still coming up.
    pub fn connect_lazy(url: &str, options: &PgOptions) -> Result<PgStore, StoreError> {
        let connect: PgConnectOptions = url.parse().map_err(|error| {
            StoreError::invalid(format!("invalid DATABASE_URL: {error}")).with_source(error)
        })?;
        let server_port = connect.get_port();
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    set_nodelay(conn, server_port).await;
                    Ok(())
                })
            })
            .connect_lazy_with(connect.application_name("tally"));
        let columns = event_columns();
        Ok(PgStore {
            pool,
            copy_events: format!("COPY usage_events ({columns}) FROM STDIN (FORMAT binary)"),
            copy_staging: format!("COPY events_staging ({columns}) FROM STDIN (FORMAT binary)"),
            copy_pending: format!(
                "COPY usage_rollup_pending ({}) FROM STDIN (FORMAT binary)",
                copy::pending_columns(true)
            ),
            copy_service_pending: format!(
                "COPY usage_rollup_service_pending ({}) FROM STDIN (FORMAT binary)",
                copy::pending_columns(false)
            ),
            fold_all: fold_sql(false).into(),
            fold_tenant: fold_sql(true).into(),
            recent: Default::default(),
            citus: Default::default(),
            citus_fold: Default::default(),
        })
    }

    /// Applies the migrations in `migrations/postgres` that this database lacks. Safe to run from
    /// several processes at once (sqlx holds an advisory lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("../migrations/postgres")
            .run(&self.pool)
            .await
            .map_err(|error| StoreError::internal("migrate the database").with_source(error))?;
        if self.citus().await.map_err(classify)? {
            tracing::info!("citus detected: commits, resend probes and folds run per tenant");
        }
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(crate) async fn commit_rows(&self, rows: &[EventRow]) -> Result<Vec<Outcome>, StoreError> {
        if self.citus().await.map_err(classify)? {
            return self.commit_by_tenant(rows).await;
        }
        self.commit_together(rows).await
    }

    /// Commits the rows in one transaction (see [`crate::Store::commit`]).
    async fn commit_together(&self, rows: &[EventRow]) -> Result<Vec<Outcome>, StoreError> {
        self.commit_subset(rows, (0..rows.len()).collect()).await
    }

    /// Commits the rows at `subset` (indices into `rows`) in one transaction. Returns an outcome
    /// per row of `rows`; only those of `subset` mean anything.
    async fn commit_subset(
        &self,
        rows: &[EventRow],
        mut order: Vec<usize>,
    ) -> Result<Vec<Outcome>, StoreError> {
        if order.is_empty() {
            return Ok(Vec::new());
        }
        let subset_len = order.len();
        // Checked before any transaction: sums that cannot be stored fail this batch alone, and
        // the worker then isolates the row responsible.
        // They are also the rollups of the batch when every row of it is new, the common case.
        let all = rollup::aggregate_both(order.iter().map(|&index| &rows[index]))
            .map_err(|error| StoreError::invalid(error.to_string()).with_source(error))?;
        let mut outcomes = vec![Outcome::Stored; rows.len()];
        // Rows in dedup-key order: every transaction inserts its keys into the unique index in
        // the one order, so a resend racing its original makes one wait for the other, never a
        // deadlock. A key repeated inside the batch is a duplicate of its first occurrence.
        order.sort_unstable_by_key(|&index| (rows[index].dedup_key(), index));
        order.dedup_by(|later, earlier| {
            let repeated = rows[*later].dedup_key() == rows[*earlier].dedup_key();
            if repeated {
                outcomes[*later] = Outcome::Duplicate;
            }
            repeated
        });
        // Rows whose keys this process committed lately (or is committing in an earlier
        // transaction, which is awaited) are likely resends: look them up first (one probe
        // each), so the rest is copied on the fast path.
        let hashes: Vec<u64> =
            order.iter().map(|&index| self.recent.hash(&rows[index].dedup_key())).collect();
        let mut flight = self.recent.begin(hashes);
        for mut earlier in std::mem::take(&mut flight.earlier) {
            // Ends with that commit, stored or not; a dropped sender ends it too.
            let _ = earlier.wait_for(|done| *done).await;
        }
        let suspects = self.recent.seen(flight.hashes());
        if !suspects.is_empty() {
            let mut suspect_rows: Vec<usize> = suspects.iter().map(|&position| order[position]).collect();
            self.drop_stored(rows, &mut suspect_rows, &mut outcomes).await.map_err(classify)?;
            order.retain(|&index| outcomes[index] != Outcome::Duplicate);
        }
        if self.try_insert(rows, &order, (order.len() == subset_len).then_some(&all)).await? {
            return Ok(outcomes);
        }
        // Rows stored before that the hint did not know: find them all by their keys and insert
        // the rest. Only a row committed by another transaction in between sends the batch
        // through staging.
        metrics::counter!("tally_dedup_path_total").increment(1);
        self.drop_stored(rows, &mut order, &mut outcomes).await.map_err(classify)?;
        if self.try_insert(rows, &order, (order.len() == subset_len).then_some(&all)).await? {
            return Ok(outcomes);
        }
        let inserted = self.insert_new(rows, &order).await.map_err(classify)?;
        for (index, stored) in order.iter().zip(inserted) {
            if !stored {
                outcomes[*index] = Outcome::Duplicate;
            }
        }
        order.retain(|&index| outcomes[index] == Outcome::Stored);
        self.remember(rows, &order);
        Ok(outcomes)
    }

    /// Copies the rows (`insert_rows`) and remembers their keys; `Ok(false)` when some row was
    /// stored already, and then nothing of the batch stays.
    async fn try_insert(
        &self,
        rows: &[EventRow],
        order: &[usize],
        deltas: Option<&Deltas<'_>>,
    ) -> Result<bool, StoreError> {
        match self.insert_rows(rows, order, deltas).await {
            Ok(()) => {
                self.remember(rows, order);
                Ok(true)
            }
            Err(error) if is_unique_violation(&error) => Ok(false),
            Err(error) => Err(classify(error)),
        }
    }

    /// Remembers the keys of committed rows, for the next commits' resend hint.
    fn remember(&self, rows: &[EventRow], committed: &[usize]) {
        self.recent.remember(committed.iter().map(|&index| self.recent.hash(&rows[index].dedup_key())));
    }

    /// Removes from `order` (and marks duplicate) the rows whose keys are stored already: one
    /// index probe per row, never a scan.
    async fn drop_stored(
        &self,
        rows: &[EventRow],
        order: &mut Vec<usize>,
        outcomes: &mut [Outcome],
    ) -> Result<(), sqlx::Error> {
        let stored = if self.citus_detected() {
            citus::find_stored(&self.pool, rows, order).await?
        } else {
            self.find_stored(rows, order).await?
        };
        if stored.is_empty() {
            return Ok(());
        }
        let mut stored_positions: Vec<usize> =
            stored.into_iter().filter_map(|i| usize::try_from(i - 1).ok()).collect();
        stored_positions.sort_unstable();
        let mut next = stored_positions.iter().peekable();
        let mut position = 0;
        order.retain(|&index| {
            let stored = next.next_if_eq(&&position).is_some();
            position += 1;
            if stored {
                outcomes[index] = Outcome::Duplicate;
            }
            !stored
        });
        Ok(())
    }

    /// The rows of `order` whose keys are stored already, as 1-based positions in `order`.
    async fn find_stored(&self, rows: &[EventRow], order: &[usize]) -> Result<Vec<i64>, sqlx::Error> {
        let (mut tenants, mut times, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        for &index in order {
            let (tenant, id, at_us) = rows[index].dedup_key();
            tenants.push(tenant);
            times.push(at_us);
            ids.push(Uuid::from_bytes(id));
        }
        // LATERAL with LIMIT keeps this a nested loop of index probes, each pruned to the
        // partition of its timestamp.
        sqlx::query_scalar(
            "SELECT k.i FROM unnest($1::uuid[], $2::bigint[], $3::uuid[]) WITH ORDINALITY AS k(t, at_us, e, i) \
             CROSS JOIN LATERAL (SELECT 1 FROM usage_events u WHERE u.tenant_id = k.t \
               AND u.occurred_at = tally_timestamptz(k.at_us) AND u.event_id = k.e LIMIT 1) hit",
        )
        .bind(tenants)
        .bind(times)
        .bind(ids)
        .fetch_all(&self.pool)
        .await
    }

    /// One transaction: `COPY` the rows (in `order`) into `usage_events` and append what they
    /// add to the rollups (`deltas` when the caller has them already) to the pending tables.
    /// Fails with a unique violation if any row is stored already, and then nothing of it stays.
    async fn insert_rows(
        &self,
        rows: &[EventRow],
        order: &[usize],
        deltas: Option<&Deltas<'_>>,
    ) -> Result<(), sqlx::Error> {
        if order.is_empty() {
            return Ok(());
        }
        let mut buffer = CopyBuffer::default();
        buffer.start();
        for &index in order {
            encode_event(&mut buffer, &rows[index]);
        }
        let stream = buffer.finish();
        let computed;
        let deltas = match deltas {
            Some(deltas) => deltas,
            None => {
                computed = rollup::aggregate_both(order.iter().map(|&index| &rows[index]))
                    .map_err(overflow_error)?;
                &computed
            }
        };
        let mut tx = self.pool.begin().await?;
        copy_in(&mut tx, &self.copy_events, stream).await?;
        self.append_pending(&mut tx, deltas).await?;
        tx.commit().await
    }

    /// The dedup path for a batch racing another commit of its keys: `COPY` into a staging
    /// table, insert what is new (in key order), and append the rollups of exactly the rows the
    /// insert returned. Returns, for each row of `order`, whether it was new.
    async fn insert_new(&self, rows: &[EventRow], order: &[usize]) -> Result<Vec<bool>, sqlx::Error> {
        let mut buffer = CopyBuffer::default();
        buffer.start();
        for &index in order {
            encode_event(&mut buffer, &rows[index]);
        }
        let stream = buffer.finish();
        let mut tx = self.pool.begin().await?;
        sqlx::query("CREATE TEMP TABLE events_staging (LIKE usage_events INCLUDING DEFAULTS) ON COMMIT DROP")
            .execute(&mut *tx)
            .await?;
        copy_in(&mut tx, &self.copy_staging, stream).await?;
        let inserted: Vec<(Uuid, Uuid, i64)> = sqlx::query_as(
            "INSERT INTO usage_events SELECT * FROM events_staging \
             ORDER BY tenant_id, occurred_at, event_id ON CONFLICT DO NOTHING \
             RETURNING tenant_id, event_id, (EXTRACT(EPOCH FROM occurred_at) * 1000000)::bigint",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut unclaimed: HashMap<(Uuid, [u8; 16], i64), ()> =
            inserted.into_iter().map(|(tenant, event, at)| ((tenant, *event.as_bytes(), at), ())).collect();
        let new: Vec<bool> =
            order.iter().map(|&index| unclaimed.remove(&rows[index].dedup_key()).is_some()).collect();
        let stored = order.iter().zip(&new).filter(|(_, new)| **new).map(|(&index, _)| &rows[index]);
        let deltas = rollup::aggregate_both(stored).map_err(overflow_error)?;
        self.append_pending(&mut tx, &deltas).await?;
        tx.commit().await?;
        Ok(new)
    }

    /// Appends rollup deltas to the pending tables: per user to `usage_rollup_pending`, summed
    /// over users (with the latency histograms) to `usage_rollup_service_pending`. No index, no
    /// conflict: appends.
    async fn append_pending(
        &self,
        conn: &mut PgConnection,
        (users, services): &Deltas<'_>,
    ) -> Result<(), sqlx::Error> {
        if users.is_empty() {
            return Ok(());
        }
        self.append_to(conn, &self.copy_pending, users, RollupTable::PerUser).await?;
        self.append_to(conn, &self.copy_service_pending, services, RollupTable::PerService).await
    }

    async fn append_to(
        &self,
        conn: &mut PgConnection,
        statement: &str,
        deltas: &rollup::Deltas<'_>,
        table: RollupTable,
    ) -> Result<(), sqlx::Error> {
        let mut buffer = CopyBuffer::default();
        buffer.start();
        for (key, delta) in deltas.iter() {
            copy::encode_pending(&mut buffer, key, delta, table == RollupTable::PerUser);
        }
        copy_in(conn, statement, buffer.finish()).await?;
        Ok(())
    }

    /// Folds up to `max_entries` pending rows into both rollup tables and deletes them, in one
    /// transaction. One process folds at a time (a transaction-scoped advisory lock; the others
    /// skip the round), so folds never wait on each other. If the fold of everything fails for
    /// a reason a retry will not cure, each tenant is folded on its own, so one tenant's rows
    /// can only keep that tenant's own rows pending (readers stay exact meanwhile).
    pub(crate) async fn fold(&self, max_entries: usize) -> Result<FoldReport, StoreError> {
        let limit = i64::try_from(max_entries).unwrap_or(i64::MAX);
        if self.citus().await.map_err(classify)? {
            return self.fold_by_tenant(limit).await;
        }
        match self.fold_where(limit, None).await {
            Ok(report) => Ok(report),
            Err(error) if classify_ref(&error).is_retryable() => Err(classify(error)),
            Err(error) => {
                tracing::warn!(%error, "rollup fold failed; folding tenant by tenant");
                let tenants: Vec<Uuid> = sqlx::query_scalar(
                    "SELECT tenant_id FROM usage_rollup_pending \
                         UNION SELECT tenant_id FROM usage_rollup_service_pending",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
                let mut total = FoldReport::default();
                for tenant in tenants {
                    match self.fold_where(limit, Some(tenant)).await {
                        Ok(report) => {
                            total.folded += report.folded;
                            total.pending = report.pending;
                            total.oldest_pending_us = report.oldest_pending_us;
                            total.skipped = report.skipped;
                        }
                        Err(error) => {
                            metrics::counter!("tally_rollup_fold_failures_total").increment(1);
                            tracing::error!(%error, %tenant, "a tenant's rollups cannot be folded; they stay pending");
                        }
                    }
                }
                Ok(total)
            }
        }
    }

    async fn fold_where(&self, limit: i64, tenant: Option<Uuid>) -> Result<FoldReport, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // Room to sort and group a whole window in memory.
        sqlx::query("SET LOCAL work_mem = '64MB'").execute(&mut *tx).await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext('tally_fold'))")
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            // Another process is folding (and reports what waits).
            tx.commit().await?;
            return Ok(FoldReport { skipped: true, ..FoldReport::default() });
        }
        let statement = if tenant.is_some() { &self.fold_tenant } else { &self.fold_all };
        let (users, services): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(statement.clone()))
            .bind(limit)
            .bind(tenant)
            .fetch_one(&mut *tx)
            .await?;
        // A fold of every tenant that took less than its limit from each table took every entry
        // its snapshot saw: nothing it could count is left. Only a backlog (or a fold of one
        // tenant) is counted: a scan of the pending tables, which cost about 0.2 us per event at
        // 150,000 events/s when done every round.
        let everything = tenant.is_none() && users < limit && services < limit;
        let (pending, oldest_us): (i64, Option<i64>) = if everything {
            (0, None)
        } else {
            sqlx::query_as(
                "SELECT count(*), (extract(epoch FROM min(committed_at)) * 1000000)::bigint FROM \
                 (SELECT committed_at FROM usage_rollup_pending UNION ALL \
                  SELECT committed_at FROM usage_rollup_service_pending) p",
            )
            .fetch_one(&mut *tx)
            .await?
        };
        tx.commit().await?;
        Ok(FoldReport {
            folded: u64::try_from(users + services).unwrap_or(0),
            pending: u64::try_from(pending).unwrap_or(0),
            oldest_pending_us: oldest_us,
            skipped: false,
        })
    }
}

/// Streams a complete binary `COPY` and finishes it; aborts it on a send error so the connection
/// stays usable.
async fn copy_in(conn: &mut PgConnection, statement: &str, stream: &[u8]) -> Result<u64, sqlx::Error> {
    let mut copy = conn.copy_in_raw(statement).await?;
    match copy.send(stream).await {
        Ok(_) => copy.finish().await,
        Err(error) => {
            let _ = copy.abort("client failed to send").await;
            Err(error)
        }
    }
}

/// Rollup deltas of a set of rows, per user and per service. Pending rows are appends: no
/// order needed.
type Deltas<'a> = (rollup::Deltas<'a>, rollup::Deltas<'a>);

/// The two rollup tables: per user (without latency histograms), and without the user
/// (`usage_rollup_service_hourly`, with them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RollupTable {
    PerUser,
    PerService,
}

/// The well-known quantity columns, in `QuantityKind` order.
fn quantity_names() -> Vec<&'static str> {
    wire::QuantityKind::ALL.iter().map(|kind| kind.as_str()).collect()
}

/// One fold: deletes up to `$1` rows of each pending table (only tenant `$2`'s when
/// `per_tenant`) and adds their sums, grouped by key, to its rollup table in key order. Returns
/// the rows folded from each table. Pending rows hold NULL for a zero sum (read as zero here).
/// The moved per-user rows also grow `usage_rollup_user_daily`, by UTC day (`per_user_daily`),
/// in the same statement.
///
/// Custom quantities are summed set-wise (each pending object's pairs by `jsonb_each_text`,
/// summed by key and name, then one object per key), not by folding objects pairwise: the
/// pairwise aggregate runs an SQL function per row and cost ~50 us per pending row holding
/// custom quantities, most of a fold's time.
fn fold_sql(per_tenant: bool) -> String {
    let quantity_names = quantity_names();
    let quantities = quantity_names.join(", ");
    let quantity_sums: Vec<String> =
        quantity_names.iter().map(|name| format!("coalesce(sum({name}), 0) AS {name}")).collect();
    let quantity_updates: Vec<String> =
        quantity_names.iter().map(|name| format!("{name} = r.{name} + excluded.{name}")).collect();
    let bucket_sums: Vec<String> =
        (1..=LATENCY_BUCKETS).map(|i| format!("coalesce(sum(latency_buckets[{i}]), 0)::bigint")).collect();
    let bucket_adds: Vec<String> = (1..=LATENCY_BUCKETS)
        .map(|i| format!("r.latency_buckets[{i}] + excluded.latency_buckets[{i}]"))
        .collect();
    // Every sum but the custom quantities, named after their columns.
    let sums = format!(
        "sum(event_count)::bigint AS event_count, coalesce(sum(error_count), 0)::bigint AS error_count, \
         {quantity_sums}, coalesce(sum(cost), 0) AS cost, \
         coalesce(sum(unpriced_count), 0)::bigint AS unpriced_count, \
         coalesce(sum(latency_count), 0)::bigint AS latency_count, \
         coalesce(sum(latency_sum_us), 0)::bigint AS latency_sum_us, \
         coalesce(max(latency_max_us), 0) AS latency_max_us",
        quantity_sums = quantity_sums.join(", "),
    );
    let updates = format!(
        "event_count = r.event_count + excluded.event_count, \
         error_count = r.error_count + excluded.error_count, \
         {quantity_updates}, \
         custom_quantities = CASE WHEN excluded.custom_quantities = '{{}}' THEN r.custom_quantities \
           ELSE tally_add_quantities(r.custom_quantities, excluded.custom_quantities) END, \
         cost = r.cost + excluded.cost, \
         unpriced_count = r.unpriced_count + excluded.unpriced_count, \
         latency_count = r.latency_count + excluded.latency_count, \
         latency_sum_us = r.latency_sum_us + excluded.latency_sum_us, \
         latency_max_us = greatest(r.latency_max_us, excluded.latency_max_us)",
        quantity_updates = quantity_updates.join(", "),
    );
    let values = format!(
        "event_count, error_count, {quantities}, custom_quantities, cost, unpriced_count, latency_count, \
         latency_sum_us, latency_max_us"
    );
    let user_key = "tenant_id, hour, service_type, service_provider, model, user_id, event_type";
    let service_key = "tenant_id, hour, service_type, service_provider, model, event_type";
    let daily_key = "tenant_id, day, service_type, service_provider, model, user_id, event_type";
    // The moved per-user rows by UTC day, for `usage_rollup_user_daily` (migration 0013).
    let moved_days = format!(
        "(SELECT tenant_id, (hour AT TIME ZONE 'UTC')::date AS day, service_type, service_provider, model, \
           user_id, event_type, {values} FROM moved) moved_days"
    );
    let tenant_filter = if per_tenant { "WHERE tenant_id = $2" } else { "WHERE $2::uuid IS NULL" };
    let take = |table: &str| {
        format!(
            "DELETE FROM {table} WHERE ctid = ANY (ARRAY( \
               SELECT ctid FROM {table} {tenant_filter} LIMIT $1)) RETURNING *"
        )
    };
    // Custom quantities of the moved rows that have any, summed per key and name.
    let custom = |table: &str, key: &str| {
        format!(
            "SELECT {key}, jsonb_object_agg(name, total) AS custom_quantities FROM ( \
               SELECT {key}, q.key AS name, sum(q.value::numeric) AS total \
               FROM {table} CROSS JOIN LATERAL jsonb_each_text(custom_quantities) q \
               WHERE custom_quantities <> '{{}}'::jsonb GROUP BY {key}, q.key) named GROUP BY {key}"
        )
    };
    // The rows to add to a rollup table, in its key order.
    let additions = |table: &str, key: &str, extra: &str| {
        format!(
            "SELECT {key}, {values}{extra_column} FROM \
               (SELECT {key}, {sums}{extra} FROM {table} GROUP BY {key}) sums \
               LEFT JOIN ({custom}) custom USING ({key}) ORDER BY {key}",
            values = values.replace("custom_quantities", "coalesce(custom.custom_quantities, '{}'::jsonb)"),
            extra_column = if extra.is_empty() { "" } else { ", latency_buckets" },
            custom = custom(table, key),
        )
    };
    format!(
        "WITH moved AS ({take_users}), \
         moved_services AS ({take_services}), \
         per_user AS ( \
           INSERT INTO usage_rollup_hourly AS r ({user_key}, {values}) {user_additions} \
           ON CONFLICT ({user_key}) DO UPDATE SET {updates} RETURNING 1), \
         per_service AS ( \
           INSERT INTO usage_rollup_service_hourly AS r ({service_key}, {values}, latency_buckets) \
           {service_additions} \
           ON CONFLICT ({service_key}) DO UPDATE SET {updates}, latency_buckets = ARRAY[{bucket_adds}] \
           RETURNING 1), \
         per_user_daily AS ( \
           INSERT INTO usage_rollup_user_daily AS r ({daily_key}, {values}) {daily_additions} \
           ON CONFLICT ({daily_key}) DO UPDATE SET {updates} RETURNING 1) \
         SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM moved_services)",
        take_users = take("usage_rollup_pending"),
        take_services = take("usage_rollup_service_pending"),
        user_additions = additions("moved", user_key, ""),
        daily_additions = additions(&moved_days, daily_key, ""),
        service_additions = additions(
            "moved_services",
            service_key,
            &format!(", ARRAY[{}] AS latency_buckets", bucket_sums.join(", "))
        ),
        bucket_adds = bucket_adds.join(", "),
    )
}

/// A rollup sum out of range inside a transaction, as the error that ends it (classified as
/// not retryable, so the worker isolates the rows responsible).
fn overflow_error(error: rollup::RollupOverflow) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(error))
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => unique_violation(db.code().as_deref(), db.message()),
        _ => false,
    }
}

/// Whether an error's SQLSTATE and message say a unique index refused a row. PostgreSQL says so
/// with `23505`; Citus, when a shard's COPY hits the index, re-raises the shard's error as an
/// internal error (`XX000`) that keeps only the message, so that one is recognised by both.
fn unique_violation(code: Option<&str>, message: &str) -> bool {
    match code {
        Some("23505") => true,
        Some("XX000") => message.contains("duplicate key value violates unique constraint"),
        _ => false,
    }
}

/// Whether a database error is worth retrying. Decided here for every PostgreSQL call. The
/// error is kept as the source; the message is left for the [`crate::Store`] method, which
/// knows what was being done.
pub(crate) fn classify(error: sqlx::Error) -> StoreError {
    classify_ref(&error).with_source(error)
}

/// What [`classify`] makes of an error, without the error.
fn classify_ref(error: &sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|code| code.into_owned()).unwrap_or_default();
            match code.as_str() {
                "40001" | "40P01" => StoreError::conflict(String::new()),
                code if code.starts_with("08") || code.starts_with("57P") || code == "53300" => {
                    StoreError::unavailable(String::new())
                }
                _ => StoreError::internal(String::new()),
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => StoreError::unavailable(String::new()),
        _ => StoreError::internal(String::new()),
    }
}

impl PgStore {
    pub(crate) async fn find_api_key(&self, key_hash: &[u8; 32]) -> Result<Option<ApiKey>, StoreError> {
        let row: Option<ApiKeyRow> = sqlx::query_as(
            "SELECT k.id, k.tenant_id, t.name AS tenant_name, t.disabled_at IS NOT NULL AS tenant_disabled, \
               k.scopes, k.label, (EXTRACT(EPOCH FROM k.expires_at) * 1000000)::bigint AS expires_at_us, \
               k.revoked_at IS NOT NULL AS revoked \
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.key_hash = $1",
        )
        .bind(&key_hash[..])
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        Ok(row.map(ApiKeyRow::into_api_key))
    }

    pub(crate) async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        let id = Uuid::now_v7();
        let result = sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
            .bind(id)
            .bind(name)
            .execute(&self.pool)
            .await;
        match result {
            Ok(_) => Ok(Tenant { id, name: name.to_owned(), disabled: false }),
            Err(error) if is_unique_violation(&error) => {
                Err(StoreError::invalid(format!("a tenant named {name:?} exists already")).with_source(error))
            }
            Err(error) => Err(classify(error)),
        }
    }

    pub(crate) async fn find_tenant(&self, name_or_id: &str) -> Result<Option<Tenant>, StoreError> {
        // A UUID names a tenant by id only, anything else by name only: names never parse as UUIDs.
        let id = Uuid::parse_str(name_or_id).ok();
        let row: Option<(Uuid, String, bool)> = sqlx::query_as(
            "SELECT id, name, disabled_at IS NOT NULL FROM tenants \
             WHERE ($2::uuid IS NULL AND name = $1) OR id = $2",
        )
        .bind(name_or_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        Ok(row.map(|(id, name, disabled)| Tenant { id, name, disabled }))
    }

    pub(crate) async fn create_api_key(&self, key: &NewApiKey) -> Result<ApiKey, StoreError> {
        let id = Uuid::now_v7();
        let scopes: Vec<&str> = key.scopes.iter().map(|scope| scope.as_str()).collect();
        let tenant: Option<(String, bool)> = sqlx::query_as(
            "WITH new_key AS (
               INSERT INTO api_keys (id, tenant_id, key_hash, prefix, scopes, label, expires_at)
               VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7::double precision / 1000000))
             )
             SELECT name, disabled_at IS NOT NULL FROM tenants WHERE id = $2",
        )
        .bind(id)
        .bind(key.tenant_id)
        .bind(&key.key_hash[..])
        .bind(&key.prefix)
        .bind(&scopes)
        .bind(&key.label)
        .bind(key.expires_at_us)
        .fetch_optional(&self.pool)
        .await
        .map_err(|error| match &error {
            // The key's tenant does not exist: the caller's mistake, as on SQLite.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23503") => {
                StoreError::invalid(format!("no tenant with id {}", key.tenant_id)).with_source(error)
            }
            _ => classify(error),
        })?;
        let (tenant_name, tenant_disabled) =
            tenant.ok_or_else(|| StoreError::invalid(format!("no tenant with id {}", key.tenant_id)))?;
        Ok(ApiKey {
            id,
            tenant_id: key.tenant_id,
            tenant_name,
            tenant_disabled,
            scopes: key.scopes.clone(),
            label: key.label.clone(),
            expires_at_us: key.expires_at_us,
            revoked: false,
        })
    }

    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(classify)?;
        Ok(())
    }

    pub(crate) async fn maintain(&self, retention: &Retention) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(classify)?;
        let mut tx = conn.begin().await.map_err(classify)?;
        let created: i32 = sqlx::query_scalar(
            "SELECT tally_ensure_partitions((now() AT TIME ZONE 'UTC')::date - $1::int, \
                                            (now() AT TIME ZONE 'UTC')::date + $2::int)",
        )
        .bind(retention.partitions_behind_days as i32)
        .bind(retention.partitions_ahead_days as i32)
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        // On a hypertable TimescaleDB's own retention policy drops old chunks.
        let hypertable = timescale::set_policies(&mut tx, retention).await.map_err(classify)?;
        let mut dropped: i32 = 0;
        if !hypertable {
            dropped = sqlx::query_scalar(
                "SELECT tally_drop_events_before((now() AT TIME ZONE 'UTC')::date - $1::int)",
            )
            .bind(retention.event_retention_days as i32)
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
        }
        if let Some(days) = retention.aggregate_retention_days {
            // Cut at a UTC midnight, so that the daily per-user rollups and the hourly ones drop
            // the same hours (a day's row sums exactly the hourly rows kept of that day).
            let cutoff = "date_trunc('day', now() - make_interval(days => $1::int), 'UTC')";
            for (table, column) in [
                ("usage_rollup_hourly", "hour"),
                ("usage_rollup_user_daily", "day"),
                ("usage_rollup_service_hourly", "hour"),
                ("usage_rollup_pending", "hour"),
                ("usage_rollup_service_pending", "hour"),
            ] {
                let bound = match column {
                    "day" => format!("({cutoff} AT TIME ZONE 'UTC')::date"),
                    _ => cutoff.to_owned(),
                };
                let statement = format!("DELETE FROM {table} WHERE {column} < {bound}");
                sqlx::query(sqlx::AssertSqlSafe(statement))
                    .bind(days as i32)
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
            }
        }
        tx.commit().await.map_err(classify)?;
        tracing::info!(created, dropped, "partition maintenance done");
        Ok(())
    }
}

#[derive(sqlx::FromRow)]
struct ApiKeyRow {
    id: Uuid,
    tenant_id: Uuid,
    tenant_name: String,
    tenant_disabled: bool,
    scopes: Vec<String>,
    label: Option<String>,
    expires_at_us: Option<i64>,
    revoked: bool,
}

impl ApiKeyRow {
    fn into_api_key(self) -> ApiKey {
        ApiKey {
            id: self.id,
            tenant_id: self.tenant_id,
            tenant_name: self.tenant_name,
            tenant_disabled: self.tenant_disabled,
            scopes: self.scopes.iter().filter_map(|scope| Scope::parse(scope)).collect(),
            label: self.label,
            expires_at_us: self.expires_at_us,
            revoked: self.revoked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::unique_violation;

    #[test]
    fn unique_violations_are_recognised_from_postgres_and_from_citus() {
        let duplicate = "duplicate key value violates unique constraint \"usage_events_pkey_102008\"";
        assert!(unique_violation(Some("23505"), duplicate));
        assert!(unique_violation(Some("23505"), ""));
        // Citus re-raises a shard's error from COPY as an internal error with the shard's message.
        assert!(unique_violation(Some("XX000"), duplicate));
        assert!(!unique_violation(Some("XX000"), "could not connect to worker"));
        assert!(!unique_violation(Some("23503"), duplicate));
        assert!(!unique_violation(None, duplicate));
    }
}
