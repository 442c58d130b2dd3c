//! After a run: does the database hold exactly what the server acknowledged? Per tenant: every
//! acked event stored once, nothing stored that was not sent, no rejected event stored, ack
//! counts consistent with resends, and hourly rollups equal to sums over the raw events.

use anyhow::{Context, Result};
use serde::Serialize;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::ledger::TenantLedger;

/// Ids quoted in a problem's description.
const EXAMPLES_MAX: usize = 3;

/// The verdict, with a line per problem.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verification {
    pub passed: bool,
    pub problems: Vec<String>,
    pub tenants: Vec<TenantCheck>,
}

/// What was compared for one tenant.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TenantCheck {
    pub tenant_id: Uuid,
    /// Rows of this run's events in `usage_events`.
    pub stored_rows: u64,
    /// Distinct event ids acknowledged as stored or duplicate.
    pub distinct_acked: u64,
    pub acked_stored: u64,
    pub acked_duplicate: u64,
    pub resends_acked: u64,
    pub invalid_rejected: u64,
    /// Events without a final answer (they may or may not be stored).
    pub unacked: u64,
    /// Rows in the compared time range that this run did not send (only outside `--spawn`).
    pub other_rows: u64,
    pub rollup_rows_compared: u64,
}

/// Whether the run owns every row of its tenants (`--spawn`), or shares them with other writers,
/// in which case only this run's events and the hours they fall in are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Exclusive,
    Shared,
}

/// Checks every tenant's ledger (in the order of `api_keys`) against the database.
pub async fn verify(
    database_url: &str,
    api_keys: &[String],
    ledgers: &[TenantLedger],
    scope: Scope,
) -> Result<Verification> {
    let mut connection =
        PgConnection::connect(database_url).await.context("failed to connect for verification")?;
    let mut verification = Verification::default();
    for (key, ledger) in api_keys.iter().zip(ledgers) {
        let tenant_id: Uuid = sqlx::query_scalar("SELECT tenant_id FROM api_keys WHERE key_hash = $1")
            .bind(&sink::hash_api_key(key)[..])
            .fetch_optional(&mut connection)
            .await?
            .context("an API key of the run is not in this database")?;
        let mut problems = Vec::new();
        let check = verify_tenant(&mut connection, tenant_id, ledger, scope, &mut problems).await?;
        verification
            .problems
            .extend(problems.into_iter().map(|problem| format!("tenant {tenant_id}: {problem}")));
        verification.tenants.push(check);
    }
    connection.close().await?;
    verification.passed = verification.problems.is_empty();
    Ok(verification)
}

async fn verify_tenant(
    connection: &mut PgConnection,
    tenant_id: Uuid,
    ledger: &TenantLedger,
    scope: Scope,
    problems: &mut Vec<String>,
) -> Result<TenantCheck> {
    let hours = match (scope, ledger.timestamp_min_us, ledger.timestamp_max_us) {
        (Scope::Shared, Some(min), Some(max)) => Some((hour_floor(min), hour_floor(max) + HOUR_US)),
        _ => None,
    };
    let mut stored = stored_ids(connection, tenant_id, hours).await?;
    stored.sort_unstable();
    let before = stored.len();
    stored.dedup();
    if stored.len() != before {
        problems.push(format!("{} event ids are stored more than once", before - stored.len()));
    }
    let accepted = sorted_set(&ledger.accepted_ids);
    let unacked = sorted_set(&ledger.unacked_ids);
    let missing = difference(&accepted, &stored);
    report(problems, &missing, "acknowledged events are not stored");
    report(
        problems,
        &intersection(&sorted_set(&ledger.invalid_rejected_ids), &stored),
        "rejected events are stored",
    );
    report(
        problems,
        &sorted_set(&ledger.invalid_accepted_ids),
        "invalid events were accepted instead of rejected",
    );
    if ledger.unexpected_rejections > 0 {
        problems.push(format!(
            "{} valid events were rejected, e.g. {}",
            ledger.unexpected_rejections,
            ledger.rejection_samples.join("; ")
        ));
    }
    let unexplained = difference(&difference(&stored, &accepted), &unacked);
    let other_rows = match scope {
        Scope::Exclusive => {
            report(problems, &unexplained, "stored events were never sent or acknowledged");
            0
        }
        Scope::Shared => unexplained.len() as u64,
    };
    check_ack_counts(ledger, accepted.len() as u64, unacked.is_empty(), problems);
    let rollup_rows_compared = check_rollups(connection, tenant_id, hours, problems).await?;
    Ok(TenantCheck {
        tenant_id,
        stored_rows: stored.len() as u64 - other_rows,
        distinct_acked: accepted.len() as u64,
        acked_stored: ledger.acked_stored,
        acked_duplicate: ledger.acked_duplicate,
        resends_acked: ledger.resends_accepted,
        invalid_rejected: ledger.invalid_rejected_ids.len() as u64,
        unacked: unacked.len() as u64,
        other_rows,
        rollup_rows_compared,
    })
}

/// Every event accepted more than once was a deliberate resend, and the acks' stored and
/// duplicate counts split the accepted events exactly so. Only when every batch was answered:
/// an unanswered batch may have stored events whose resends then came back as duplicates.
fn check_ack_counts(
    ledger: &TenantLedger,
    distinct_acked: u64,
    all_answered: bool,
    problems: &mut Vec<String>,
) {
    let acked_events = ledger.accepted_ids.len() as u64;
    if ledger.acked_stored + ledger.acked_duplicate != acked_events {
        problems.push(format!(
            "acks count {} stored + {} duplicate, but {acked_events} events were accepted",
            ledger.acked_stored, ledger.acked_duplicate
        ));
    }
    if !all_answered {
        if ledger.acked_stored > distinct_acked {
            problems.push(format!(
                "acks count {} stored, more than the {distinct_acked} distinct events",
                ledger.acked_stored
            ));
        }
        return;
    }
    if ledger.acked_stored != distinct_acked {
        problems.push(format!(
            "acks count {} stored, but {distinct_acked} distinct events were acknowledged",
            ledger.acked_stored
        ));
    }
    let repeats = acked_events - distinct_acked;
    if repeats != ledger.resends_accepted {
        problems.push(format!(
            "{repeats} events were acknowledged more than once, but {} resends were sent and acknowledged",
            ledger.resends_accepted
        ));
    }
}

const HOUR_US: i64 = 3_600_000_000;

fn hour_floor(timestamp_us: i64) -> i64 {
    timestamp_us.div_euclid(HOUR_US) * HOUR_US
}

/// `[from, to)` in microseconds as SQL parameters; both NULL for the whole table.
fn range_params(hours: Option<(i64, i64)>) -> (Option<f64>, Option<f64>) {
    match hours {
        Some((from, to)) => (Some(from as f64 / 1e6), Some(to as f64 / 1e6)),
        None => (None, None),
    }
}

const RANGE: &str =
    "($2::float8 IS NULL OR {col} >= to_timestamp($2)) AND ($3::float8 IS NULL OR {col} < to_timestamp($3))";

async fn stored_ids(
    connection: &mut PgConnection,
    tenant_id: Uuid,
    hours: Option<(i64, i64)>,
) -> Result<Vec<u128>> {
    let (from, to) = range_params(hours);
    let sql = format!(
        "SELECT event_id FROM usage_events WHERE tenant_id = $1 AND {}",
        RANGE.replace("{col}", "occurred_at")
    );
    let ids: Vec<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id)
        .bind(from)
        .bind(to)
        .fetch_all(connection)
        .await
        .context("failed to read stored event ids")?;
    Ok(ids.iter().map(Uuid::as_u128).collect())
}

/// Compares every rollup row of the tenant (in the hours) with sums over its raw events.
async fn check_rollups(
    connection: &mut PgConnection,
    tenant_id: Uuid,
    hours: Option<(i64, i64)>,
    problems: &mut Vec<String>,
) -> Result<u64> {
    let (from, to) = range_params(hours);
    let (mismatched, compared): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(rollup_sql()))
        .bind(tenant_id)
        .bind(from)
        .bind(to)
        .fetch_one(&mut *connection)
        .await
        .context("failed to compare rollups")?;
    if mismatched > 0 {
        problems
            .push(format!("{mismatched} of {compared} rollup rows differ from the sums of their raw events"));
    }
    let custom: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(custom_rollup_sql()))
        .bind(tenant_id)
        .bind(from)
        .bind(to)
        .fetch_one(&mut *connection)
        .await
        .context("failed to compare custom quantity rollups")?;
    if custom > 0 {
        problems.push(format!("{custom} custom quantity sums in rollups differ from their raw events"));
    }
    let buckets = format!(
        "SELECT count(*) FROM usage_rollup_hourly WHERE tenant_id = $1 AND {} \
         AND ((SELECT coalesce(sum(b), 0) FROM unnest(latency_buckets) b) <> latency_count \
              OR cardinality(latency_buckets) <> {})",
        RANGE.replace("{col}", "hour"),
        sink::rollup::LATENCY_BUCKETS
    );
    let bad_buckets: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(buckets))
        .bind(tenant_id)
        .bind(from)
        .bind(to)
        .fetch_one(&mut *connection)
        .await?;
    if bad_buckets > 0 {
        problems.push(format!("{bad_buckets} rollup rows have latency histograms that do not add up"));
    }
    Ok(compared as u64)
}

const ROLLUP_KEY: &str = "hour, service_type, service_provider, model, user_id, event_type";

fn rollup_sql() -> String {
    let quantities: Vec<&str> = wire::QuantityKind::ALL.iter().map(|kind| kind.as_str()).collect();
    let sums: Vec<String> =
        quantities.iter().map(|name| format!("coalesce(sum({name}), 0) AS {name}")).collect();
    let differs: Vec<String> = [
        "event_count",
        "error_count",
        "cost",
        "unpriced_count",
        "latency_count",
        "latency_sum_us",
        "latency_max_us",
    ]
    .iter()
    .chain(&quantities)
    .map(|column| format!("raw.{column} IS DISTINCT FROM r.{column}"))
    .collect();
    format!(
        "WITH raw AS (
           SELECT date_trunc('hour', occurred_at, 'UTC') AS hour, service_type, service_provider,
                  coalesce(model, '') AS model, user_id, event_type,
                  count(*) AS event_count, count(*) FILTER (WHERE status = 1) AS error_count, {sums},
                  coalesce(sum(cost), 0) AS cost, count(*) FILTER (WHERE cost IS NULL) AS unpriced_count,
                  count(latency_us) AS latency_count, coalesce(sum(latency_us), 0) AS latency_sum_us,
                  coalesce(max(latency_us), 0) AS latency_max_us
           FROM usage_events WHERE tenant_id = $1 AND {events_range} GROUP BY 1, 2, 3, 4, 5, 6),
         r AS (SELECT * FROM usage_rollup_hourly WHERE tenant_id = $1 AND {rollup_range})
         SELECT count(*) FILTER (WHERE {differs}), count(*)
         FROM raw FULL JOIN r USING ({ROLLUP_KEY})",
        sums = sums.join(", "),
        events_range = RANGE.replace("{col}", "occurred_at"),
        rollup_range = RANGE.replace("{col}", "hour"),
        differs = differs.join(" OR "),
    )
}

fn custom_rollup_sql() -> String {
    format!(
        "WITH raw AS (
           SELECT date_trunc('hour', e.occurred_at, 'UTC') AS hour, e.service_type, e.service_provider,
                  coalesce(e.model, '') AS model, e.user_id, e.event_type, q.key, sum(q.value::numeric) AS total
           FROM usage_events e CROSS JOIN LATERAL jsonb_each_text(e.custom_quantities) q
           WHERE e.tenant_id = $1 AND {events_range} GROUP BY 1, 2, 3, 4, 5, 6, 7),
         r AS (
           SELECT r.hour, r.service_type, r.service_provider, r.model, r.user_id, r.event_type, q.key,
                  q.value::numeric AS total
           FROM usage_rollup_hourly r CROSS JOIN LATERAL jsonb_each_text(r.custom_quantities) q
           WHERE r.tenant_id = $1 AND {rollup_range})
         SELECT count(*) FROM raw FULL JOIN r USING ({ROLLUP_KEY}, key)
         WHERE raw.total IS DISTINCT FROM r.total",
        events_range = RANGE.replace("{col}", "e.occurred_at"),
        rollup_range = RANGE.replace("{col}", "r.hour"),
    )
}

fn sorted_set(ids: &[u128]) -> Vec<u128> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Elements of sorted `a` not in sorted `b`.
fn difference(a: &[u128], b: &[u128]) -> Vec<u128> {
    a.iter().copied().filter(|id| b.binary_search(id).is_err()).collect()
}

fn intersection(a: &[u128], b: &[u128]) -> Vec<u128> {
    a.iter().copied().filter(|id| b.binary_search(id).is_ok()).collect()
}

fn report(problems: &mut Vec<String>, ids: &[u128], what: &str) {
    if ids.is_empty() {
        return;
    }
    let examples: Vec<String> =
        ids.iter().take(EXAMPLES_MAX).map(|id| Uuid::from_u128(*id).to_string()).collect();
    problems.push(format!("{} {what}, e.g. {}", ids.len(), examples.join(", ")));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_helpers() {
        let a = sorted_set(&[5, 1, 3, 3]);
        assert_eq!(a, [1, 3, 5]);
        assert_eq!(difference(&a, &[3]), [1, 5]);
        assert_eq!(intersection(&a, &[3, 4, 5]), [3, 5]);
        assert_eq!(hour_floor(HOUR_US * 5 + 17), HOUR_US * 5);
    }

    #[test]
    fn ack_counts_must_match_resends() {
        let ledger = TenantLedger {
            accepted_ids: vec![1, 2, 2, 3],
            acked_stored: 3,
            acked_duplicate: 1,
            resends_accepted: 1,
            ..TenantLedger::default()
        };
        let mut problems = Vec::new();
        check_ack_counts(&ledger, 3, true, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let wrong = TenantLedger { acked_stored: 4, acked_duplicate: 1, ..ledger.clone() };
        check_ack_counts(&wrong, 3, true, &mut problems);
        assert_eq!(problems.len(), 2, "{problems:?}");
        let mut lenient = Vec::new();
        check_ack_counts(
            &TenantLedger { acked_stored: 2, acked_duplicate: 2, ..ledger },
            3,
            false,
            &mut lenient,
        );
        assert!(
            lenient.is_empty(),
            "with unanswered batches a resend may come back as duplicate: {lenient:?}"
        );
    }
}
