//! TimescaleDB, when `usage_events` is a hypertable: the compression and retention policies,
//! kept equal to the configured ages (migration 0010, `tally_timescaledb_policies`). This is the
//! only TimescaleDB-specific Rust code; on native partitions it does nothing.

use sqlx::PgConnection;

use crate::store::Retention;

/// Sets TimescaleDB's compression and retention policies of `usage_events` to `retention`'s
/// ages, changing only what differs. Returns `false` when `usage_events` uses native partitions
/// (the caller then drops old partitions itself); `true` when TimescaleDB's retention policy
/// drops old chunks.
pub(super) async fn set_policies(
    conn: &mut PgConnection,
    retention: &Retention,
) -> Result<bool, sqlx::Error> {
    let changed: Option<i32> = sqlx::query_scalar("SELECT tally_timescaledb_policies($1, $2)")
        .bind(retention.event_compress_after_days.map(|days| days as i32))
        .bind(retention.event_retention_days as i32)
        .fetch_one(conn)
        .await?;
    let Some(changed) = changed else {
        return Ok(false);
    };
    if changed > 0 {
        tracing::info!(
            compress_after_days = retention.event_compress_after_days,
            retention_days = retention.event_retention_days,
            "timescaledb policies of usage_events set"
        );
    }
    Ok(true)
}
