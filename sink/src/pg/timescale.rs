//! TimescaleDB, when `usage_events` is a hypertable: the compression and retention policies,
//! kept equal to the configured ages (migration 0010, `tally_timescaledb_policies`), and the row
//! lock re-rating can take. This is the only TimescaleDB-specific Rust code; on native partitions
//! it changes nothing.

use sqlx::PgConnection;

use crate::store::Retention;

/// The row lock a re-rate batch takes on the events it reads: `FOR UPDATE` on native
/// partitions; none on a hypertable, where TimescaleDB refuses to lock rows of a compressed chunk
/// ("locking compressed tuples is not supported"). Either way `Changes::apply` updates a row only
/// if it is still as read.
pub(super) async fn rerate_row_lock(conn: &mut PgConnection) -> Result<&'static str, sqlx::Error> {
    let native: bool =
        sqlx::query_scalar("SELECT tally_events_natively_partitioned()").fetch_one(conn).await?;
    Ok(if native { "FOR UPDATE" } else { "" })
}

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
