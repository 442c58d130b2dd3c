//! The rollup materializer on PostgreSQL: readers are exact while committed rows wait to be
//! folded, and a fold is all or nothing, so every committed row is folded exactly once, whether
//! folds are partial, killed midway, or run by several processes at once.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, ensure};
use sink::pg::{PgOptions, PgStore};
use sink::{EventRow, FoldLimits, Store};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::support::{Backend, TestEdge, assert_rollups_match_raw, llm_event};

const HOUR_US: i64 = 3_600_000_000;

/// An edge whose own materializer stays idle after its first (empty) fold, so the test decides
/// when rows are folded.
async fn edge_without_folding() -> Result<TestEdge> {
    let config = edge::EdgeConfig {
        fold: FoldLimits { interval: Duration::from_secs(3600), ..FoldLimits::default() },
        ..edge::EdgeConfig::default()
    };
    TestEdge::launch(Backend::Postgres, config).await
}

/// `count` events of three users over two hours, with quantities and latencies that vary, so
/// batches share rollup keys, from `base_us` on.
fn batch(tenant: Uuid, base_us: i64, seed: i64, count: i64) -> Vec<EventRow> {
    (0..count)
        .map(|i| {
            let n = seed * 10_000 + i;
            // Ids follow the seed, so a batch built again is a resend.
            let mut event = llm_event(&format!("user-{}", n % 3), (n % 7) as f64 + 0.5, (n % 5) as f64)
                .with_id(Uuid::from_u128(n as u128 + 1))
                .at(base_us + (n % 2) * HOUR_US + n);
            event.latency_ms = Some((n % 900) as f64 + 0.25);
            // Custom quantities on some events, under two names: the fold sums them by name,
            // into rollup rows that may hold either, both or none already.
            match n % 4 {
                0 => event = event.with_custom_quantity("images", (n % 3) as f64 + 0.25),
                1 => {
                    event = event
                        .with_custom_quantity("images", 1.5)
                        .with_custom_quantity("gpu_seconds", (n % 13) as f64 / 8.0)
                }
                _ => {}
            }
            EventRow::new(tenant, event, Some(rust_decimal::Decimal::new(n % 11, 3)))
        })
        .collect()
}

async fn pending_rows(conn: &mut PgConnection) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM usage_rollup_pending").fetch_one(conn).await?)
}

/// Once nothing is pending, the rollup tables alone hold every event exactly once.
async fn assert_folded_exactly_once(conn: &mut PgConnection) -> Result<()> {
    ensure!(pending_rows(conn).await? == 0, "rows still pending");
    let (raw, folded): (i64, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM usage_events), (SELECT sum(event_count)::bigint FROM usage_rollup_hourly)",
    )
    .fetch_one(&mut *conn)
    .await?;
    ensure!(Some(raw) == folded, "{raw} events, {folded:?} in the folded rollups");
    assert_rollups_match_raw(conn).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn readers_are_exact_while_rows_wait_and_partial_folds_take_each_row_once() -> Result<()> {
    let edge = edge_without_folding().await?;
    let base_us = edge::auth::now_us() - 2 * HOUR_US;
    let (other, _) = edge.other_tenant("globex").await?;
    let mut conn = edge.connect_db().await?;
    for seed in 0..4 {
        edge.store.commit(&batch(edge.tenant.id, base_us, seed, 150)).await?;
        edge.store.commit(&batch(other.id, base_us, seed, 40)).await?;
    }
    // A resent batch adds nothing, pending or folded.
    edge.store.commit(&batch(edge.tenant.id, base_us, 1, 150)).await?;
    ensure!(pending_rows(&mut conn).await? > 0);
    // Zero sums wait as NULL (no errors and no pages here), others as they are; the exact
    // reads and folds below read NULL as zero.
    let (rows, errors, pages, latencies): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(error_count), count(pages), count(latency_count) FROM usage_rollup_pending",
    )
    .fetch_one(&mut conn)
    .await?;
    ensure!(errors == 0 && pages == 0, "zero sums are NULL: {errors} error counts, {pages} page sums");
    ensure!(latencies == rows, "{latencies} of {rows} rows keep their latency count");
    let folded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM usage_rollup_hourly").fetch_one(&mut conn).await?;
    ensure!(folded == 0, "nothing folded yet");
    // Every reader sees rollups plus pending rows: exact before any fold.
    assert_rollups_match_raw(&mut conn).await?;
    let (month_events, month_cost) = edge.store.month_usage(edge.tenant.id).await?;
    let (raw_events, raw_cost): (i64, rust_decimal::Decimal) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(cost), 0) FROM usage_events
         WHERE tenant_id = $1 AND occurred_at >= date_trunc('month', now(), 'UTC')",
    )
    .bind(edge.tenant.id)
    .fetch_one(&mut conn)
    .await?;
    ensure!((month_events, month_cost) == (raw_events, raw_cost), "month usage reads pending rows too");

    // Small folds: exact after each, and nothing folded twice.
    let mut folds = 0;
    loop {
        let report = edge.store.fold_rollups(7).await?;
        assert_rollups_match_raw(&mut conn).await?;
        folds += 1;
        if report.pending == 0 {
            break;
        }
        // Up to 7 rows of each of the two pending tables.
        ensure!((1..=14).contains(&report.folded) && folds < 1_000, "{report:?}");
    }
    ensure!(folds > 1, "folded in several steps");
    assert_folded_exactly_once(&mut conn).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fold_killed_midway_leaves_every_row_pending_once() -> Result<()> {
    let edge = edge_without_folding().await?;
    let base_us = edge::auth::now_us() - 2 * HOUR_US;
    let mut conn = edge.connect_db().await?;
    edge.store.commit(&batch(edge.tenant.id, base_us, 0, 300)).await?;
    edge.store.fold_rollups(100_000).await?;
    edge.store.commit(&batch(edge.tenant.id, base_us, 1, 300)).await?;
    let pending_before = pending_rows(&mut conn).await?;

    // Another session holds one user-less rollup row the fold must grow: the fold deletes its
    // pending rows and writes the per-user rollups, then waits there. Its backend is then killed,
    // as a crash of the edge or of PostgreSQL's session would end it.
    let mut blocker = edge.connect_db().await?;
    sqlx::query("BEGIN").execute(&mut blocker).await?;
    sqlx::query("SELECT 1 FROM usage_rollup_service_hourly FOR UPDATE").execute(&mut blocker).await?;
    let store = edge.store.clone();
    let fold = tokio::spawn(async move { store.fold_rollups(100_000).await });
    let mut killed = false;
    for _ in 0..200 {
        killed = sqlx::query_scalar(
            "SELECT coalesce(bool_or(pg_terminate_backend(pid)), false) FROM pg_stat_activity
             WHERE wait_event_type = 'Lock' AND query LIKE '%usage_rollup_pending%'",
        )
        .fetch_one(&mut conn)
        .await?;
        if killed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    ensure!(killed, "the fold never waited on the held row");
    ensure!(fold.await?.is_err(), "the killed fold reports an error");
    sqlx::query("ROLLBACK").execute(&mut blocker).await?;

    ensure!(pending_rows(&mut conn).await? == pending_before, "the killed fold removed nothing");
    assert_rollups_match_raw(&mut conn).await?;
    edge.store.fold_rollups(100_000).await?;
    assert_folded_exactly_once(&mut conn).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn several_materializers_and_concurrent_commits_fold_each_row_once() -> Result<()> {
    // The edge folds every 500 ms; a second process's materializer folds small windows often.
    let edge = TestEdge::on(Backend::Postgres).await?;
    let base_us = edge::auth::now_us() - 2 * HOUR_US;
    let second = Arc::new(Store::from(PgStore::connect_lazy(&edge.db.url, &PgOptions::default())?));
    let folder = tokio::spawn(sink::run_folder(
        second.clone(),
        FoldLimits { interval: Duration::from_millis(5), entries_max: 50 },
    ));
    let writers: Vec<_> = (0..2)
        .map(|writer| {
            let store = edge.store.clone();
            let tenant = edge.tenant.id;
            tokio::spawn(async move {
                for seed in 0..15 {
                    // Both writers send some of the same batches: resends racing their originals.
                    store.commit(&batch(tenant, base_us, seed % 10 + writer, 120)).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    let mut conn = edge.connect_db().await?;
    for writer in writers {
        writer.await??;
        assert_rollups_match_raw(&mut conn).await?;
    }
    for _ in 0..400 {
        if pending_rows(&mut conn).await? == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    folder.abort();
    let raw: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events").fetch_one(&mut conn).await?;
    ensure!(raw == 11 * 120, "each distinct batch stored once: {raw}");
    assert_folded_exactly_once(&mut conn).await?;
    Ok(())
}
