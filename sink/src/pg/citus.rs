//! Citus: Tally spread over several PostgreSQL servers, distributed by `tenant_id` (issue 18).
//!
//! The store learns once (when it migrates, or at its first commit or fold) whether the
//! database has the `citus` extension, and keeps the answer. Without it nothing here runs: the
//! plain PostgreSQL and TimescaleDB paths only read that flag. With it:
//!
//! - [`PgStore::distribute`] (`tally-edge distribute`) makes `tenants` and `api_keys` reference
//!   tables and distributes every other table holding a `tenant_id` by it, colocated with
//!   `usage_events`, so one tenant's events, rollups, pending rows, services, price rules and
//!   re-rate runs live on one shard group;
//! - a commit is split by tenant, one transaction per tenant, so each is single-shard (no
//!   two-phase commit);
//! - the resend probe runs one statement per tenant (`tenant_id = $1`), which Citus routes to
//!   the tenant's shard; the probe over several tenants at once cannot be pushed down;
//! - the rollup fold runs per tenant, four routed statements in one transaction, instead of the
//!   one statement (`DELETE ... RETURNING` feeding two upserts) Citus cannot plan.

use std::collections::HashMap;

use sqlx::PgPool;
use uuid::Uuid;

use super::{PgStore, RollupTable, classify, classify_ref, quantity_names};
use crate::rollup::LATENCY_BUCKETS;
use crate::row::{EventRow, Outcome};
use crate::store::{FoldReport, StoreError};

/// Tables shared by every tenant, copied whole to every node: a tenant's name and a key's hash
/// are unique over all tenants, and a key is looked up before its tenant is known.
const REFERENCE_TABLES: [&str; 2] = ["tenants", "api_keys"];
/// The distributed table every other one is colocated with.
const COLOCATION_ANCHOR: &str = "usage_events";

/// What [`PgStore::distribute`] changed; empty when everything was distributed already.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Distribution {
    /// Tables made reference tables.
    pub reference: Vec<String>,
    /// Tables distributed by `tenant_id`.
    pub distributed: Vec<String>,
}

/// Whether the database has the `citus` extension.
pub(super) async fn detect(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')")
        .fetch_one(pool)
        .await
}

impl PgStore {
    /// Distributes a migrated database over its Citus workers: `tenants` and `api_keys` become
    /// reference tables; `usage_events` (its partitions with it) and every other table of the
    /// schema with a `tenant_id` column are distributed by `tenant_id`, colocated. Tables that are
    /// distributed already are left alone, so running it again (after a migration that added a
    /// table, say) distributes only what is new. Fails as invalid without the extension.
    pub async fn distribute(&self) -> Result<Distribution, StoreError> {
        if !self.citus().await.map_err(classify)? {
            return Err(StoreError::invalid(
                "the citus extension is not installed in this database: run CREATE EXTENSION citus \
                 and add the workers (citus_add_node) first",
            ));
        }
        let mut done = Distribution::default();
        for table in REFERENCE_TABLES {
            if citus_table_kind(&self.pool, table).await.map_err(classify)? != Some(CitusKind::Reference) {
                let statement = sqlx::query("SELECT create_reference_table($1::regclass)").bind(table);
                run_function(&self.pool, statement, table).await?;
                done.reference.push(table.to_owned());
            }
        }
        let mut tables = vec![COLOCATION_ANCHOR.to_owned()];
        tables.extend(per_tenant_tables(&self.pool).await.map_err(classify)?);
        for table in tables {
            if citus_table_kind(&self.pool, &table).await.map_err(classify)? == Some(CitusKind::Distributed) {
                continue;
            }
            let anchor = if table == COLOCATION_ANCHOR { "default" } else { COLOCATION_ANCHOR };
            let statement = sqlx::query(
                "SELECT create_distributed_table($1::regclass, 'tenant_id', colocate_with => $2)",
            )
            .bind(&table)
            .bind(anchor);
            run_function(&self.pool, statement, &table).await?;
            done.distributed.push(table);
        }
        Ok(done)
    }

    /// Whether the database has Citus: detected once, then read from the flag.
    pub(super) async fn citus(&self) -> Result<bool, sqlx::Error> {
        self.citus.get_or_try_init(|| detect(&self.pool)).await.copied()
    }

    /// The flag as detected, without detecting it (false until then).
    pub(super) fn citus_detected(&self) -> bool {
        self.citus.get().copied().unwrap_or(false)
    }

    /// Commits each tenant's rows of a batch in a transaction of its own, so every transaction
    /// touches one shard group. Tenants commit one after another; if one fails, the tenants
    /// before it stay committed and the error is returned: a retry of the batch finds their rows
    /// stored and answers them as duplicates (stored once either way).
    pub(super) async fn commit_by_tenant(&self, rows: &[EventRow]) -> Result<Vec<Outcome>, StoreError> {
        let mut groups: Vec<(Uuid, Vec<usize>)> = Vec::new();
        let mut group_of: HashMap<Uuid, usize> = HashMap::new();
        for (index, row) in rows.iter().enumerate() {
            let group = *group_of.entry(row.tenant_id).or_insert_with(|| {
                groups.push((row.tenant_id, Vec::new()));
                groups.len() - 1
            });
            groups[group].1.push(index);
        }
        if groups.len() <= 1 {
            return self.commit_together(rows).await;
        }
        let mut outcomes = vec![Outcome::Stored; rows.len()];
        for (_, indices) in groups {
            let group_outcomes = self.commit_subset(rows, indices.clone()).await?;
            for index in indices {
                outcomes[index] = group_outcomes[index];
            }
        }
        Ok(outcomes)
    }

    /// Folds pending rollup rows tenant by tenant (see [`fold_tenant`]) until `limit` rows were
    /// folded or every tenant's were. A tenant whose fold fails for a reason a retry will not
    /// cure keeps its rows pending (readers stay exact) and the others go on.
    pub(super) async fn fold_by_tenant(&self, limit: i64) -> Result<FoldReport, StoreError> {
        let tenants: Vec<Uuid> = sqlx::query_scalar(
            "SELECT tenant_id FROM usage_rollup_pending UNION SELECT tenant_id FROM usage_rollup_service_pending",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        let mut folded: i64 = 0;
        for tenant in tenants {
            if folded >= limit {
                break;
            }
            match self.fold_tenant(tenant).await {
                Ok(count) => folded += count,
                Err(error) if classify_ref(&error).is_retryable() => return Err(classify(error)),
                Err(error) => {
                    metrics::counter!("tally_rollup_fold_failures_total").increment(1);
                    tracing::error!(%error, %tenant, "a tenant's rollups cannot be folded; they stay pending");
                }
            }
        }
        let (pending, oldest_us): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*), (extract(epoch FROM min(committed_at)) * 1000000)::bigint FROM \
             (SELECT committed_at FROM usage_rollup_pending UNION ALL \
              SELECT committed_at FROM usage_rollup_service_pending) p",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(classify)?;
        Ok(FoldReport {
            folded: u64::try_from(folded).unwrap_or(0),
            pending: u64::try_from(pending).unwrap_or(0),
            oldest_pending_us: oldest_us,
            skipped: false,
        })
    }

    /// One tenant's fold, in one REPEATABLE READ transaction on the tenant's shard group: for
    /// each rollup table, add the tenant's pending rows summed by key ([`fold_insert`]; the
    /// per-user ones by UTC day too, [`fold_daily_insert`]), then delete the tenant's pending rows. Both statements see the one snapshot, so the delete
    /// removes exactly the rows added, never one committed meanwhile. A per-tenant advisory lock
    /// (on the coordinator) keeps two processes from folding one tenant at once; a tenant locked
    /// by another process is skipped (0 rows). Returns the pending rows folded.
    async fn fold_tenant(&self, tenant: Uuid) -> Result<i64, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut *tx).await?;
        let locked: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_xact_lock(hashtext('tally_fold'), hashtext($1::text))",
        )
        .bind(tenant)
        .fetch_one(&mut *tx)
        .await?;
        if !locked {
            return Ok(0);
        }
        // The daily per-user rollups from the per-user pending rows, before they are deleted.
        sqlx::query(sqlx::AssertSqlSafe(self.citus_fold.per_user_daily.as_str()))
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        let mut folded = 0;
        for (insert, delete) in [&self.citus_fold.per_user, &self.citus_fold.per_service] {
            sqlx::query(sqlx::AssertSqlSafe(insert.as_str())).bind(tenant).execute(&mut *tx).await?;
            let deleted =
                sqlx::query(sqlx::AssertSqlSafe(delete.as_str())).bind(tenant).execute(&mut *tx).await?;
            folded += i64::try_from(deleted.rows_affected()).unwrap_or(i64::MAX);
        }
        tx.commit().await?;
        Ok(folded)
    }
}

/// The resend probe for Citus: which rows of `order` are stored already, as 1-based positions in
/// `order` (like the single-statement probe). One statement per tenant, each with
/// `tenant_id = $1` so that Citus routes it to the tenant's shard, where it is the same nested
/// loop of index probes as on one server.
pub(super) async fn find_stored(
    pool: &PgPool,
    rows: &[EventRow],
    order: &[usize],
) -> Result<Vec<i64>, sqlx::Error> {
    /// One tenant's keys: positions in `order`, timestamps, event ids.
    #[derive(Default)]
    struct Keys {
        positions: Vec<i64>,
        times: Vec<i64>,
        ids: Vec<Uuid>,
    }
    let mut by_tenant: HashMap<Uuid, Keys> = HashMap::new();
    for (position, &index) in (1_i64..).zip(order) {
        let (tenant, id, at_us) = rows[index].dedup_key();
        let keys = by_tenant.entry(tenant).or_default();
        keys.positions.push(position);
        keys.times.push(at_us);
        keys.ids.push(Uuid::from_bytes(id));
    }
    let mut stored = Vec::new();
    for (tenant, Keys { positions, times, ids }) in by_tenant {
        let found: Vec<i64> = sqlx::query_scalar(
            "SELECT k.i FROM unnest($2::bigint[], $3::uuid[]) WITH ORDINALITY AS k(at_us, e, i) \
             CROSS JOIN LATERAL (SELECT 1 FROM usage_events u WHERE u.tenant_id = $1 \
               AND u.occurred_at = tally_timestamptz(k.at_us) AND u.event_id = k.e LIMIT 1) hit",
        )
        .bind(tenant)
        .bind(times)
        .bind(ids)
        .fetch_all(pool)
        .await?;
        stored.extend(found.into_iter().filter_map(|i| usize::try_from(i - 1).ok()).map(|i| positions[i]));
    }
    Ok(stored)
}

/// The statements of a tenant's fold, built once per store: for each rollup table, the insert
/// of [`fold_insert`] and the delete of the tenant's pending rows.
#[derive(Debug)]
pub(super) struct FoldStatements {
    per_user: (String, String),
    per_service: (String, String),
    per_user_daily: String,
}

impl Default for FoldStatements {
    fn default() -> Self {
        let delete = |table: &str| format!("DELETE FROM {table} WHERE tenant_id = $1");
        FoldStatements {
            per_user: (fold_insert(RollupTable::PerUser), delete("usage_rollup_pending")),
            per_service: (fold_insert(RollupTable::PerService), delete("usage_rollup_service_pending")),
            per_user_daily: fold_daily_insert(),
        }
    }
}

/// Adds tenant `$1`'s pending rows of one rollup table, summed by key, to that table (in key
/// order). Every table it reads or writes is filtered on `tenant_id = $1` and they are
/// colocated, so Citus runs it as one task on the tenant's shard group. Custom quantities are
/// summed set-wise, per key and name, as in the single-statement fold.
fn fold_insert(table: RollupTable) -> String {
    match table {
        RollupTable::PerUser => fold_insert_into(
            "usage_rollup_hourly",
            "usage_rollup_pending",
            "tenant_id, hour, service_type, service_provider, model, user_id, event_type",
            table,
        ),
        RollupTable::PerService => fold_insert_into(
            "usage_rollup_service_hourly",
            "usage_rollup_service_pending",
            "tenant_id, hour, service_type, service_provider, model, event_type",
            table,
        ),
    }
}

/// The same for the per-user daily rollups (migration 0013): tenant `$1`'s per-user pending
/// rows summed by UTC day, run before they are deleted, in the same snapshot.
fn fold_daily_insert() -> String {
    let quantities = quantity_names().join(", ");
    let pending = format!(
        "(SELECT tenant_id, (hour AT TIME ZONE 'UTC')::date AS day, service_type, service_provider, model, \
           user_id, event_type, event_count, error_count, {quantities}, custom_quantities, cost, \
           unpriced_count, latency_count, latency_sum_us, latency_max_us \
         FROM usage_rollup_pending WHERE tenant_id = $1) p"
    );
    fold_insert_into(
        "usage_rollup_user_daily",
        &pending,
        "tenant_id, day, service_type, service_provider, model, user_id, event_type",
        RollupTable::PerUser,
    )
}

fn fold_insert_into(target: &str, pending: &str, key: &str, table: RollupTable) -> String {
    let add = |column: &str| format!("{column} = r.{column} + excluded.{column}");
    // (column, its sum over pending rows, its update on conflict); custom quantities apart.
    let mut columns: Vec<(String, String, String)> = Vec::new();
    // Pending rows hold NULL for a zero sum (migration 0011): read as zero.
    columns.push(("event_count".into(), "sum(event_count)::bigint".into(), add("event_count")));
    columns.push(("error_count".into(), "coalesce(sum(error_count), 0)::bigint".into(), add("error_count")));
    for column in quantity_names() {
        columns.push((column.into(), format!("coalesce(sum({column}), 0)"), add(column)));
    }
    columns.push(("cost".into(), "coalesce(sum(cost), 0)".into(), add("cost")));
    for column in ["unpriced_count", "latency_count", "latency_sum_us"] {
        columns.push((column.into(), format!("coalesce(sum({column}), 0)::bigint"), add(column)));
    }
    columns.push((
        "latency_max_us".into(),
        "coalesce(max(latency_max_us), 0)".into(),
        "latency_max_us = greatest(r.latency_max_us, excluded.latency_max_us)".into(),
    ));
    if table == RollupTable::PerService {
        let sums: Vec<String> = (1..=LATENCY_BUCKETS)
            .map(|i| format!("coalesce(sum(latency_buckets[{i}]), 0)::bigint"))
            .collect();
        let adds: Vec<String> = (1..=LATENCY_BUCKETS)
            .map(|i| format!("r.latency_buckets[{i}] + excluded.latency_buckets[{i}]"))
            .collect();
        columns.push((
            "latency_buckets".into(),
            format!("ARRAY[{}]", sums.join(", ")),
            format!("latency_buckets = ARRAY[{}]", adds.join(", ")),
        ));
    }
    let names: Vec<&str> = columns.iter().map(|(name, _, _)| name.as_str()).collect();
    let sums: Vec<String> = columns.iter().map(|(name, sum, _)| format!("{sum} AS {name}")).collect();
    let updates: Vec<&str> = columns.iter().map(|(_, _, update)| update.as_str()).collect();
    format!(
        "INSERT INTO {target} AS r ({key}, {names}, custom_quantities) \
         SELECT {key}, {names}, coalesce(c.custom_quantities, '{{}}'::jsonb) FROM \
           (SELECT {key}, {sums} FROM {pending} WHERE tenant_id = $1 GROUP BY {key}) s \
           LEFT JOIN (SELECT {key}, jsonb_object_agg(name, total) AS custom_quantities FROM ( \
               SELECT {key}, q.key AS name, sum(q.value::numeric) AS total \
               FROM {pending} CROSS JOIN LATERAL jsonb_each_text(custom_quantities) q \
               WHERE tenant_id = $1 AND custom_quantities <> '{{}}'::jsonb GROUP BY {key}, q.key) named \
             GROUP BY {key}) c USING ({key}) \
         ORDER BY {key} \
         ON CONFLICT ({key}) DO UPDATE SET {updates}, \
           custom_quantities = CASE WHEN excluded.custom_quantities = '{{}}' THEN r.custom_quantities \
             ELSE tally_add_quantities(r.custom_quantities, excluded.custom_quantities) END",
        names = names.join(", "),
        sums = sums.join(", "),
        updates = updates.join(", "),
    )
}

/// How Citus holds a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CitusKind {
    Reference,
    Distributed,
    /// A table Citus knows but keeps on the coordinator (a "Citus local table").
    Local,
}

async fn citus_table_kind(pool: &PgPool, table: &str) -> Result<Option<CitusKind>, sqlx::Error> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT partmethod::text, repmodel::text FROM pg_dist_partition WHERE logicalrelid = $1::regclass",
    )
    .bind(table)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(method, replication)| match (method.as_str(), replication.as_str()) {
        ("h", _) => CitusKind::Distributed,
        (_, "t") => CitusKind::Reference,
        _ => CitusKind::Local,
    }))
}

/// Tables of the current schema with a `tenant_id` column, other than the reference tables and
/// the anchor: plain and partitioned tables, not partitions (they follow their parent).
async fn per_tenant_tables(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped \
         WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p') \
           AND NOT c.relispartition AND c.relname::text <> ALL ($1) ORDER BY c.relname",
    )
    .bind(vec![REFERENCE_TABLES[0], REFERENCE_TABLES[1], COLOCATION_ANCHOR])
    .fetch_all(pool)
    .await
}

/// Runs one of Citus's table functions, saying which table failed.
async fn run_function(
    pool: &PgPool,
    statement: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    table: &str,
) -> Result<(), StoreError> {
    statement.execute(pool).await.map_err(|error| classify(error).doing(&format!("distribute {table}")))?;
    tracing::info!(table, "distributed by citus");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{RollupTable, fold_insert};

    #[test]
    fn the_tenant_fold_reads_and_writes_only_the_tenant_named_by_its_parameter() {
        for table in [RollupTable::PerUser, RollupTable::PerService] {
            let statement = fold_insert(table);
            // Both reads of the pending table are filtered on the tenant, which is what lets
            // Citus route the statement to one shard group.
            assert_eq!(statement.matches("WHERE tenant_id = $1").count(), 2, "{statement}");
            assert!(!statement.contains("$2"));
            assert_eq!(statement.contains("latency_buckets"), table == RollupTable::PerService);
        }
    }
}
