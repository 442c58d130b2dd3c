//! Re-rate audit rows on SQLite: written before a run starts, moved after each batch, and read
//! back by the API. A partial unique index keeps one running row per tenant.

use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use uuid::Uuid;

use super::values::{self, now_us};
use super::{SqliteStore, classify};
use crate::store::{RerateRecord, RerateRun, RerateStart, RerateStatus, StoreError};

/// What an abandoned running row says once a new run replaces it.
const ABANDONED: &str = "the process running this re-rate stopped; re-rating is idempotent, run it again";

const SELECT_RUN: &str = "SELECT id, tenant_id, range_start, range_end, started_at, finished_at, updated_at,
        events_scanned, events_changed, cost_before, cost_after, requested_by, status, error
     FROM rerate_runs";

impl SqliteStore {
    pub(crate) async fn start_rerate(
        &self,
        run: &RerateRun,
        stale_before_us: i64,
    ) -> Result<RerateStart, StoreError> {
        // One writer: the three statements cannot interleave with another start.
        let mut writer = self.writer.acquire().await.map_err(classify)?;
        sqlx::query(
            "UPDATE rerate_runs SET status = 'interrupted', error = ?3, finished_at = ?4
             WHERE tenant_id = ?1 AND status = 'running' AND updated_at < ?2",
        )
        .bind(run.tenant_id)
        .bind(stale_before_us)
        .bind(ABANDONED)
        .bind(now_us())
        .execute(&mut *writer)
        .await
        .map_err(classify)?;
        let inserted = sqlx::query(
            "INSERT INTO rerate_runs (id, tenant_id, range_start, range_end, started_at, updated_at, status,
                                      requested_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', ?7)
             ON CONFLICT DO NOTHING",
        )
        .bind(run.id)
        .bind(run.tenant_id)
        .bind(run.start_us)
        .bind(run.end_us)
        .bind(run.started_at_us)
        .bind(now_us())
        .bind(run.requested_by)
        .execute(&mut *writer)
        .await
        .map_err(classify)?;
        if inserted.rows_affected() == 1 {
            return Ok(RerateStart::Started);
        }
        let running: Option<Uuid> =
            sqlx::query_scalar("SELECT id FROM rerate_runs WHERE tenant_id = ?1 AND status = 'running'")
                .bind(run.tenant_id)
                .fetch_optional(&mut *writer)
                .await
                .map_err(classify)?;
        running
            .map(RerateStart::AlreadyRunning)
            .ok_or_else(|| StoreError::internal("a re-rate insert was refused with no run running"))
    }

    pub(crate) async fn update_rerate(
        &self,
        run: &RerateRun,
        status: RerateStatus,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let now = now_us();
        let finished_at = (status != RerateStatus::Running).then_some(now);
        sqlx::query(
            "UPDATE rerate_runs SET events_scanned = ?3, events_changed = ?4, cost_before = ?5, cost_after = ?6,
                    status = ?7, error = ?8, updated_at = ?9, finished_at = ?10
             WHERE id = ?1 AND tenant_id = ?2",
        )
        .bind(run.id)
        .bind(run.tenant_id)
        .bind(run.events_scanned)
        .bind(run.events_changed)
        .bind(run.cost_before.to_string())
        .bind(run.cost_after.to_string())
        .bind(status.as_str())
        .bind(error)
        .bind(now)
        .bind(finished_at)
        .execute(&self.writer)
        .await
        .map_err(classify)?;
        Ok(())
    }

    pub(crate) async fn find_rerate(
        &self,
        tenant_id: Uuid,
        id: Uuid,
    ) -> Result<Option<RerateRecord>, StoreError> {
        let sql = format!("{SELECT_RUN} WHERE tenant_id = ?1 AND id = ?2");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(&self.readers)
            .await
            .map_err(classify)?;
        row.as_ref().map(record_of_row).transpose()
    }

    pub(crate) async fn list_rerates(
        &self,
        tenant_id: Uuid,
        limit: u32,
    ) -> Result<Vec<RerateRecord>, StoreError> {
        let sql = format!("{SELECT_RUN} WHERE tenant_id = ?1 ORDER BY started_at DESC, id DESC LIMIT ?2");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(tenant_id)
            .bind(i64::from(limit))
            .fetch_all(&self.readers)
            .await
            .map_err(classify)?;
        rows.iter().map(record_of_row).collect()
    }
}

fn record_of_row(row: &SqliteRow) -> Result<RerateRecord, StoreError> {
    let get = |index: usize| row.try_get::<i64, _>(index).map_err(classify);
    let text = |index: usize| row.try_get::<String, _>(index).map_err(classify);
    Ok(RerateRecord {
        run: RerateRun {
            id: row.try_get(0).map_err(classify)?,
            tenant_id: row.try_get(1).map_err(classify)?,
            start_us: get(2)?,
            end_us: get(3)?,
            started_at_us: get(4)?,
            events_scanned: get(7)?,
            events_changed: get(8)?,
            cost_before: values::decimal(&text(9)?)?,
            cost_after: values::decimal(&text(10)?)?,
            requested_by: row.try_get(11).map_err(classify)?,
        },
        status: RerateStatus::parse(&text(12)?)?,
        finished_at_us: row.try_get(5).map_err(classify)?,
        updated_at_us: get(6)?,
        error: row.try_get(13).map_err(classify)?,
    })
}
