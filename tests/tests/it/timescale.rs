//! TimescaleDB, when installed for the PostgreSQL the harness runs (it is not packaged for
//! Debian; CI has none, and then the test says so and returns): on a dedicated server that
//! preloads it, `usage_events` is a hypertable whose old chunks TimescaleDB compresses and whose
//! retention is TimescaleDB's own policy, both set by maintenance from `Retention`. Dedup of a
//! resend into a compressed chunk, query answers, re-rating and rollups stay exact; retention
//! drops whole old chunks and leaves the rollups.
//!
//! The server runs no background jobs (`timescaledb.max_background_workers = 0`): the test runs
//! each policy's job itself (`CALL run_job`), so nothing happens behind its back.

use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use axum::http::StatusCode;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sink::pg::{PgOptions, PgStore};
use sink::{EventRow, Outcome, Retention, Scope, Store};
use sqlx::PgConnection;
use time::{OffsetDateTime, Time};
use uuid::Uuid;
use wire::Message;

use crate::query::{Fixture, Sent, check_totals, query_state, rfc3339, sums};
use crate::support::{OPERATOR_KEY, RawConnection, TestEdge, assert_rollups_match_raw, create_key};

/// Settings of the dedicated server: TimescaleDB preloaded, no telemetry, no job scheduler.
const TIMESCALE_SETTINGS: &str = "shared_preload_libraries = 'timescaledb'\n\
                                  timescaledb.telemetry_level = off\n\
                                  timescaledb.max_background_workers = 0\n";
/// Events of the acme tenant per old day (and 500 of another tenant's on one of them).
const EVENTS_PER_DAY: usize = 2000;
const COMPRESS_AFTER_DAYS: u32 = 5;

/// A dedicated server with TimescaleDB preloaded, or `None` (said on stderr) when the extension
/// is not installed for the harness's PostgreSQL.
async fn timescale_server() -> Result<Option<tests::PgServer>> {
    if !tests::postgres().await.extension_available("timescaledb").await? {
        eprintln!(
            "SKIPPED: the timescaledb extension is not installed for the harness's PostgreSQL \
             (it is not packaged for Debian; build it from source to run this test)"
        );
        return Ok(None);
    }
    Ok(Some(tests::dedicated_postgres_with(TIMESCALE_SETTINGS).await?))
}

#[tokio::test(flavor = "multi_thread")]
async fn compressed_chunks_keep_dedup_queries_rerating_exact_and_retention_drops_chunks() -> Result<()> {
    let Some(server) = timescale_server().await? else {
        return Ok(());
    };
    let retention =
        Retention { event_compress_after_days: Some(COMPRESS_AFTER_DAYS), ..Retention::default() };
    let config =
        edge::EdgeConfig { operator_key: Some(OPERATOR_KEY.into()), retention, ..Default::default() };
    let edge = TestEdge::start_on(&server, config).await?;
    // The edge's first maintenance round sets the policies; later rounds are an hour away.
    edge.edge.maintenance_rounds(1).await;
    let mut db = edge.connect_db().await?;
    check_schema(&mut db).await?;

    let today = OffsetDateTime::now_utc().date().with_time(Time::MIDNIGHT).assume_utc();
    // `Sent::new`'s latency grows with its index; past 1,500 the edge would refuse a resend.
    let day_events = |days_ago: i64| -> Vec<Sent> {
        let start = today - time::Duration::days(days_ago);
        (0..EVENTS_PER_DAY)
            .map(|i| Sent::new(i % 1500, start + time::Duration::seconds(30 * i as i64)))
            .collect()
    };
    let old = day_events(30);
    let mid = day_events(10);
    let now = OffsetDateTime::now_utc();
    let recent: Vec<Sent> =
        (0..50).map(|i| Sent::new(i, now - time::Duration::minutes(i as i64 + 1))).collect();
    let (other, _) = edge.other_tenant("globex").await?;
    let other_mid: Vec<Sent> = day_events(10).into_iter().take(500).collect();
    commit(&edge.store, edge.tenant.id, old.iter().chain(&mid).chain(&recent)).await?;
    commit(&edge.store, other.id, other_mid.iter()).await?;
    assert_rollups_match_raw(&mut db).await?;

    let compression_job = job(&mut db, "policy_compression").await?.context("a compression policy")?;
    ensure!(compression_job.1 == json!(format!("{COMPRESS_AFTER_DAYS} days")), "{compression_job:?}");
    let retention_job = job(&mut db, "policy_retention").await?.context("a retention policy")?;
    ensure!(retention_job.1 == json!("365 days"), "{retention_job:?}");
    run_job(&mut db, compression_job.0).await?;
    let compressed = compressed_days(&mut db).await?;
    ensure!(compressed.contains(&(today - time::Duration::days(30))), "old day compressed: {compressed:?}");
    ensure!(compressed.contains(&(today - time::Duration::days(10))), "mid day compressed: {compressed:?}");
    ensure!(compressed.iter().all(|day| *day < today - time::Duration::days(4)), "{compressed:?}");
    report_sizes(&mut db).await?;

    let late = resend_into_compressed_chunk(&edge, &mut db, &mid).await?;
    let mut mid_all = mid.clone();
    mid_all.push(late);
    assert_rollups_match_raw(&mut db).await?;

    let fixture = Fixture { state: query_state(&edge, std::time::Duration::ZERO, None).await?, edge };
    check_day(&fixture, today - time::Duration::days(10), &mid_all, true).await?;
    check_day(&fixture, today - time::Duration::days(30), &old, true).await?;
    rerate_compressed_day(&fixture, &mut db, today - time::Duration::days(10), &mid_all).await?;
    // The compression policy compresses again what the late insert and re-rating decompressed.
    run_job(&mut db, compression_job.0).await?;
    ensure!(fully_compressed(&mut db, today - time::Duration::days(10)).await?, "recompressed");

    retention_drops_chunks_through_the_policy(&fixture, &mut db, today, &old).await?;
    Ok(())
}

/// A hypertable with compression by tenant, ordered by time and event id, and no index but the
/// dedup index (migration 0006).
async fn check_schema(db: &mut PgConnection) -> Result<()> {
    let settings: (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT segmentby::text, orderby::text FROM timescaledb_information.hypertable_compression_settings
         WHERE hypertable = 'usage_events'::regclass",
    )
    .fetch_one(&mut *db)
    .await
    .context("usage_events is a hypertable with compression settings")?;
    ensure!(settings.0.as_deref() == Some("tenant_id"), "segmentby {settings:?}");
    ensure!(settings.1.as_deref() == Some("occurred_at,event_id"), "orderby {settings:?}");
    let indexes: Vec<String> =
        sqlx::query_scalar("SELECT indexname::text FROM pg_indexes WHERE tablename = 'usage_events'")
            .fetch_all(&mut *db)
            .await?;
    ensure!(indexes == ["usage_events_dedup"], "indexes {indexes:?}");
    Ok(())
}

async fn commit<'a>(store: &Store, tenant: Uuid, events: impl Iterator<Item = &'a Sent>) -> Result<()> {
    let rows: Vec<EventRow> = events.map(|sent| EventRow::new(tenant, sent.event(), sent.cost)).collect();
    let outcomes = store.commit(&rows).await?;
    ensure!(outcomes.iter().all(|outcome| *outcome == Outcome::Stored), "all stored");
    Ok(())
}

/// The id and config value (`compress_after` or `drop_after`) of the one job of `proc_name`.
async fn job(db: &mut PgConnection, proc_name: &str) -> Result<Option<(i32, Value)>> {
    let jobs: Vec<(i32, Value)> = sqlx::query_as(
        "SELECT job_id, coalesce(config->'compress_after', config->'drop_after')
         FROM timescaledb_information.jobs WHERE proc_name = $1 AND hypertable_name = 'usage_events'",
    )
    .bind(proc_name)
    .fetch_all(&mut *db)
    .await?;
    ensure!(jobs.len() <= 1, "one {proc_name} job at most: {jobs:?}");
    Ok(jobs.into_iter().next())
}

async fn run_job(db: &mut PgConnection, id: i32) -> Result<()> {
    sqlx::query("CALL run_job($1)")
        .bind(id)
        .execute(&mut *db)
        .await
        .with_context(|| format!("run job {id}"))?;
    Ok(())
}

/// Starts of the chunks that are compressed.
async fn compressed_days(db: &mut PgConnection) -> Result<Vec<OffsetDateTime>> {
    Ok(sqlx::query_scalar(
        "SELECT range_start FROM timescaledb_information.chunks
         WHERE hypertable_name = 'usage_events' AND is_compressed ORDER BY range_start",
    )
    .fetch_all(&mut *db)
    .await?)
}

/// Whether the chunk starting at `day` is compressed with no uncompressed rows left.
async fn fully_compressed(db: &mut PgConnection, day: OffsetDateTime) -> Result<bool> {
    let chunk: String = sqlx::query_scalar(
        "SELECT format('%I.%I', chunk_schema, chunk_name) FROM timescaledb_information.chunks
         WHERE hypertable_name = 'usage_events' AND range_start = $1",
    )
    .bind(day)
    .fetch_one(&mut *db)
    .await?;
    let (compressed, uncompressed_rows): (bool, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT (SELECT is_compressed FROM timescaledb_information.chunks
                 WHERE format('%I.%I', chunk_schema, chunk_name) = '{chunk}'),
                (SELECT count(*) FROM ONLY {chunk})"
    )))
    .fetch_one(&mut *db)
    .await?;
    Ok(compressed && uncompressed_rows == 0)
}

/// Prints each compressed chunk's size before and after compression (for the record).
async fn report_sizes(db: &mut PgConnection) -> Result<()> {
    let sizes: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT chunk_name::text, before_compression_total_bytes, after_compression_total_bytes
         FROM chunk_compression_stats('usage_events') WHERE compression_status = 'Compressed'
         ORDER BY chunk_name",
    )
    .fetch_all(&mut *db)
    .await?;
    for (chunk, before, after) in &sizes {
        eprintln!("chunk {chunk}: {before} bytes before compression, {after} after");
        ensure!(after < before, "compression made {chunk} smaller");
    }
    Ok(())
}

/// Resends of events stored in a compressed chunk are duplicates whichever way they come: through
/// the edge (whose store remembers keys it committed lately), through a store that has never seen
/// them (the `COPY` meets the unique index), and as a plain `INSERT`. A new late event lands in
/// the compressed chunk. Returns that event.
async fn resend_into_compressed_chunk(edge: &TestEdge, db: &mut PgConnection, mid: &[Sent]) -> Result<Sent> {
    let before = crate::support::stored_count(db, edge.tenant.id).await?;
    // Priced by the edge, which knows no price for this service: unpriced.
    let late = Sent { cost: None, ..Sent::new(7, mid[0].at + time::Duration::seconds(15)) };
    let mut batch: Vec<wire::Event> = mid[..200].iter().map(Sent::event).collect();
    batch.push(late.event());
    let mut connection = RawConnection::open(edge, &edge.key).await?;
    let Message::Ack(ack) = connection.round_trip(1, batch).await? else {
        anyhow::bail!("expected an ack");
    };
    ensure!((ack.stored, ack.duplicate, ack.rejected.len()) == (1, 200, 0), "{ack:?}");

    let fresh = Store::from(PgStore::connect_lazy(&edge.db.url, &PgOptions::default())?);
    let rows: Vec<EventRow> =
        mid[200..].iter().map(|sent| EventRow::new(edge.tenant.id, sent.event(), sent.cost)).collect();
    let outcomes = fresh.commit(&rows).await?;
    ensure!(outcomes.iter().all(|outcome| *outcome == Outcome::Duplicate), "duplicates through a new store");

    let insert = sqlx::query(
        "INSERT INTO usage_events (tenant_id, event_id, occurred_at, user_id, service_type, service_provider,
                                   event_type, status)
         VALUES ($1, $2, $3, 'u', 'custom', 'p', 'e', 0)",
    )
    .bind(edge.tenant.id)
    .bind(mid[1000].id)
    .bind(mid[1000].at)
    .execute(&mut *db)
    .await;
    let violation =
        insert.as_ref().err().and_then(|error| error.as_database_error()).and_then(|error| error.code());
    ensure!(
        violation.as_deref() == Some("23505"),
        "a plain duplicate INSERT violates the dedup index: {insert:?}"
    );
    ensure!(crate::support::stored_count(db, edge.tenant.id).await? == before + 1, "one new row");
    Ok(late)
}

/// The day's aggregate (from the rollups) and its listing (from raw events) are exact.
async fn check_day(fixture: &Fixture, day: OffsetDateTime, sent: &[Sent], priced: bool) -> Result<()> {
    let range = format!("start_date={}&end_date={}", rfc3339(day), rfc3339(day + time::Duration::days(1)));
    let body = fixture.ok(&format!("/api/v1/usage/aggregate?period=day&group_by=none&{range}")).await?;
    let rows = body["aggregations"].as_array().context("rows")?;
    ensure!(rows.len() == 1, "one day: {body}");
    check_totals(&rows[0], &sums(sent), priced, &format!("day {day}"))?;
    let listing = fixture.ok(&format!("/api/v1/usage?{range}&limit=5")).await?;
    ensure!(listing["total_count"] == sent.len(), "listing of {day}: {}", listing["total_count"]);
    let newest = sent.iter().max_by_key(|sent| (sent.at, sent.id)).context("events")?;
    ensure!(listing["events"][0]["event_id"] == newest.id.to_string(), "newest first: {listing}");
    Ok(())
}

/// A price rule for one service from long ago, then a re-rate of a compressed day: its events
/// are updated in the chunk, rollups follow, answers are exact.
async fn rerate_compressed_day(
    fixture: &Fixture,
    db: &mut PgConnection,
    day: OffsetDateTime,
    sent: &[Sent],
) -> Result<()> {
    let edge = &fixture.edge;
    let admin = create_key(&edge.store, &edge.tenant, vec![Scope::Admin]).await?;
    let rule = json!({"service_type": "custom", "service_provider": "prov-c", "unit": "events",
                      "method": "per_unit", "rate": "0.002", "effective_from": "2020-01-01T00:00:00Z"});
    let (status, body) = edge.http("POST", "/api/v1/admin/prices", Some(&admin), rule).await?;
    ensure!(status == StatusCode::CREATED, "{body}");
    let range = json!({"start_date": rfc3339(day), "end_date": rfc3339(day + time::Duration::days(1))});
    let run = crate::rerate::rerate_and_wait(edge, &admin, &range).await?;
    ensure!(run["events_scanned"] == sent.len(), "{run}");
    let repriced: Vec<Sent> = sent
        .iter()
        .map(|sent| Sent { cost: (sent.provider == "prov-c").then(|| Decimal::new(2, 3)), ..sent.clone() })
        .collect();
    let stored_cost: Option<Decimal> = sqlx::query_scalar(
        "SELECT sum(cost) FROM usage_events WHERE tenant_id = $1 AND occurred_at >= $2 AND occurred_at < $3",
    )
    .bind(edge.tenant.id)
    .bind(day)
    .bind(day + time::Duration::days(1))
    .fetch_one(&mut *db)
    .await?;
    ensure!(stored_cost == Some(sums(&repriced).cost), "stored costs {stored_cost:?}");
    assert_rollups_match_raw(db).await?;
    check_day(fixture, day, &repriced, true).await
}

/// Maintenance with a shorter retention replaces the retention policy (and changes nothing when
/// run again); the policy's job drops the old chunk whole, the rollups keep its day. A
/// compression age of `None` removes the compression policy.
async fn retention_drops_chunks_through_the_policy(
    fixture: &Fixture,
    db: &mut PgConnection,
    today: OffsetDateTime,
    old: &[Sent],
) -> Result<()> {
    let store: &Arc<Store> = &fixture.edge.store;
    let compression_job = job(db, "policy_compression").await?.context("compression policy")?;
    let shorter = Retention {
        event_retention_days: 20,
        event_compress_after_days: Some(COMPRESS_AFTER_DAYS),
        ..Retention::default()
    };
    store.maintain(&shorter).await?;
    let retention_job = job(db, "policy_retention").await?.context("a retention policy")?;
    ensure!(retention_job.1 == json!("20 days"), "{retention_job:?}");
    store.maintain(&shorter).await?;
    ensure!(job(db, "policy_retention").await? == Some(retention_job.clone()), "unchanged when the same");
    ensure!(job(db, "policy_compression").await? == Some(compression_job), "compression policy kept");
    let old_day = today - time::Duration::days(30);
    let count_old =
        "SELECT count(*) FROM usage_events WHERE occurred_at >= $1 AND occurred_at < $1 + interval '1 day'";
    let before: i64 = sqlx::query_scalar(count_old).bind(old_day).fetch_one(&mut *db).await?;
    ensure!(before == old.len() as i64, "maintenance leaves dropping to the policy: {before}");
    run_job(db, retention_job.0).await?;
    let after: i64 = sqlx::query_scalar(count_old).bind(old_day).fetch_one(&mut *db).await?;
    ensure!(after == 0, "the retention policy dropped the old chunk: {after} rows left");
    let chunks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'usage_events'
         AND range_start < now() - interval '20 days'",
    )
    .fetch_one(&mut *db)
    .await?;
    ensure!(chunks == 0, "{chunks} chunks past retention");
    let range =
        format!("start_date={}&end_date={}", rfc3339(old_day), rfc3339(old_day + time::Duration::days(1)));
    let listing = fixture.ok(&format!("/api/v1/usage?{range}")).await?;
    // (`total_count` comes from the rollups, which keep the day.)
    ensure!(listing["events"] == json!([]), "no raw events listed on a dropped day: {listing}");
    let body = fixture.ok(&format!("/api/v1/usage/aggregate?period=day&group_by=none&{range}")).await?;
    check_totals(&body["aggregations"][0], &sums(old), true, "rollups of a dropped day")?;

    store.maintain(&Retention { event_compress_after_days: None, ..shorter }).await?;
    ensure!(job(db, "policy_compression").await?.is_none(), "compression policy removed");
    ensure!(job(db, "policy_retention").await? == Some(retention_job), "retention policy kept");
    Ok(())
}
