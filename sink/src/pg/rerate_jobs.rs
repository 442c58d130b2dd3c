//! Re-rate audit rows on PostgreSQL: written before a run starts, moved after each batch, and
//! read back by the API. A partial unique index keeps one running row per tenant, across every
//! edge process on the database.

use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::{PgStore, classify};
use crate::store::{RerateRecord, RerateRun, RerateStart, RerateStatus, StoreError};

/// What an abandoned running row says once a new run replaces it.
const ABANDONED: &str = "the process running this re-rate stopped; re-rating is idempotent, run it again";

const SELECT_RUN: &str = "SELECT id, tenant_id, (EXTRACT(EPOCH FROM range_start) * 1000000)::bigint,
        (EXTRACT(EPOCH FROM range_end) * 1000000)::bigint, (EXTRACT(EPOCH FROM started_at) * 1000000)::bigint,
        (EXTRACT(EPOCH FROM finished_at) * 1000000)::bigint, (EXTRACT(EPOCH FROM updated_at) * 1000000)::bigint,
        events_scanned, events_changed, cost_before, cost_after, requested_by, status, error
     FROM rerate_runs";

impl PgStore {
    pub(crate) async fn start_rerate(
        &self,
        run: &RerateRun,
        stale_before_us: i64,
    ) -> Result<RerateStart, StoreError> {
        sqlx::query(
            "UPDATE rerate_runs SET status = 'interrupted', error = $3, finished_at = now()
             WHERE tenant_id = $1 AND status = 'running' AND updated_at < tally_timestamptz($2)",
        )
        .bind(run.tenant_id)
        .bind(stale_before_us)
        .bind(ABANDONED)
        .execute(self.pool())
        .await
        .map_err(classify)?;
        let inserted = sqlx::query(
            "INSERT INTO rerate_runs (id, tenant_id, range_start, range_end, started_at, updated_at, status,
                                      requested_by)
             VALUES ($1, $2, tally_timestamptz($3), tally_timestamptz($4), tally_timestamptz($5), now(),
                     'running', $6)
             ON CONFLICT DO NOTHING",
        )
        .bind(run.id)
        .bind(run.tenant_id)
        .bind(run.start_us)
        .bind(run.end_us)
        .bind(run.started_at_us)
        .bind(run.requested_by)
        .execute(self.pool())
        .await
        .map_err(classify)?;
        if inserted.rows_affected() == 1 {
            return Ok(RerateStart::Started);
        }
        let running: Option<Uuid> =
            sqlx::query_scalar("SELECT id FROM rerate_runs WHERE tenant_id = $1 AND status = 'running'")
                .bind(run.tenant_id)
                .fetch_optional(self.pool())
                .await
                .map_err(classify)?;
        match running {
            Some(id) => Ok(RerateStart::AlreadyRunning(id)),
            // The running one ended between the two statements: the caller may simply ask again.
            None => Err(StoreError::conflict("a re-rate of this tenant ended while this one started")),
        }
    }

    pub(crate) async fn update_rerate(
        &self,
        run: &RerateRun,
        status: RerateStatus,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE rerate_runs SET events_scanned = $3, events_changed = $4, cost_before = $5, cost_after = $6,
                    status = $7, error = $8, updated_at = tally_timestamptz($9),
                    finished_at = CASE WHEN $7 = 'running' THEN NULL ELSE tally_timestamptz($9) END
             WHERE id = $1 AND tenant_id = $2",
        )
        .bind(run.id)
        .bind(run.tenant_id)
        .bind(run.events_scanned)
        .bind(run.events_changed)
        .bind(run.cost_before)
        .bind(run.cost_after)
        .bind(status.as_str())
        .bind(error)
        // The time as a parameter, not `now()`: Citus refuses a non-IMMUTABLE function in a CASE.
        .bind(super::control::now_us())
        .execute(self.pool())
        .await
        .map_err(classify)?;
        Ok(())
    }

    pub(crate) async fn find_rerate(
        &self,
        tenant_id: Uuid,
        id: Uuid,
    ) -> Result<Option<RerateRecord>, StoreError> {
        let sql = format!("{SELECT_RUN} WHERE tenant_id = $1 AND id = $2");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(classify)?;
        row.as_ref().map(record_of_row).transpose()
    }

    pub(crate) async fn list_rerates(
        &self,
        tenant_id: Uuid,
        limit: u32,
    ) -> Result<Vec<RerateRecord>, StoreError> {
        let sql = format!("{SELECT_RUN} WHERE tenant_id = $1 ORDER BY started_at DESC, id DESC LIMIT $2");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(tenant_id)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
            .map_err(classify)?;
        rows.iter().map(record_of_row).collect()
    }
}

fn record_of_row(row: &PgRow) -> Result<RerateRecord, StoreError> {
    let get = |index: usize| row.try_get::<i64, _>(index).map_err(classify);
    let status: String = row.try_get(12).map_err(classify)?;
    Ok(RerateRecord {
        run: RerateRun {
            id: row.try_get(0).map_err(classify)?,
            tenant_id: row.try_get(1).map_err(classify)?,
            start_us: get(2)?,
            end_us: get(3)?,
            started_at_us: get(4)?,
            events_scanned: get(7)?,
            events_changed: get(8)?,
            cost_before: row.try_get(9).map_err(classify)?,
            cost_after: row.try_get(10).map_err(classify)?,
            requested_by: row.try_get(11).map_err(classify)?,
        },
        status: RerateStatus::parse(&status)?,
        finished_at_us: row.try_get(5).map_err(classify)?,
        updated_at_us: get(6)?,
        error: row.try_get(13).map_err(classify)?,
    })
}
