//! Re-rating as a background job, on PostgreSQL and on SQLite: the audit row is written before
//! the job starts and follows it (status, progress, end), one run per tenant at a time, runs are
//! visible to their tenant only, a failed run says so, and a run left by a stopped process stops
//! blocking once stale.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sink::Scope;
use tower::ServiceExt;
use uuid::Uuid;

use crate::support::{Backend, TestEdge, both_backends, create_key};

both_backends!(
    a_running_rerate_is_audited_blocks_a_second_and_is_hidden_from_other_tenants,
    a_failed_rerate_is_reported_as_failed,
    a_rerate_left_running_by_a_stopped_process_stops_blocking_once_stale,
);

const PATH: &str = "/api/v1/admin/rerate";
/// How long a test waits for a re-rate of a few events to end.
const RERATE_DEADLINE: Duration = Duration::from_secs(60);

fn format_time(unix_us: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_us) * 1000).expect("a time");
    at.format(&time::format_description::well_known::Rfc3339).expect("formats")
}

/// From a day ago to an hour ahead: every event the tests ingest.
pub fn recent_range() -> Value {
    let now_us = edge::auth::now_us();
    json!({"start_date": format_time(now_us - 86_400_000_000), "end_date": format_time(now_us + 3_600_000_000)})
}

fn money(value: &Value) -> Decimal {
    value.to_string().replace('"', "").parse().expect("an amount")
}

/// Posts a re-rate. A 202 must name the run, say it is running and point at it in `Location`
/// and `links.self`.
pub async fn start(edge: &TestEdge, admin: &str, range: &Value) -> Result<(StatusCode, Value)> {
    let request = Request::builder()
        .method("POST")
        .uri(PATH)
        .header("content-type", "application/json")
        .header("x-api-key", admin)
        .body(Body::from(range.to_string()))?;
    let response = edge::http::router(edge.edge.state.clone()).oneshot(request).await?;
    let status = response.status();
    let location = response.headers().get("location").map(|value| value.to_str().map(str::to_owned));
    let body: Value = serde_json::from_slice(&axum::body::to_bytes(response.into_body(), 1 << 20).await?)?;
    if status == StatusCode::ACCEPTED {
        let id = body["id"].as_str().context("a run id")?;
        let expected = format!("{PATH}/{id}");
        ensure!(location.transpose()?.as_deref() == Some(expected.as_str()), "Location of {body}");
        ensure!(body["links"]["self"] == expected.as_str() && body["status"] == "running", "{body}");
    }
    Ok((status, body))
}

/// Polls a run until it is no longer running, up to [`RERATE_DEADLINE`].
pub async fn wait_until_ended(edge: &TestEdge, admin: &str, id: &str) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + RERATE_DEADLINE;
    loop {
        let (status, run) = edge.http("GET", &format!("{PATH}/{id}"), Some(admin), Value::Null).await?;
        ensure!(status == StatusCode::OK, "GET re-rate {id}: {status} {run}");
        if run["status"] != "running" {
            return Ok(run);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("re-rate {id} still running after {RERATE_DEADLINE:?}: {run}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a re-rate and waits for its end; it must finish.
pub async fn rerate_and_wait(edge: &TestEdge, admin: &str, range: &Value) -> Result<Value> {
    let (status, started) = start(edge, admin, range).await?;
    ensure!(status == StatusCode::ACCEPTED, "re-rate: {status} {started}");
    let run = wait_until_ended(edge, admin, started["id"].as_str().unwrap_or_default()).await?;
    ensure!(run["status"] == "finished" && run["error"].is_null() && run["finished_at"].is_string(), "{run}");
    Ok(run)
}

/// Ten events priced 0.001 each, then a rule version at 0.002: a re-rate changes all ten.
async fn ten_events_to_reprice(edge: &TestEdge, admin: &str) -> Result<()> {
    let rule = |rate: &str| json!({"service_type": "custom", "service_provider": "p", "unit": "events", "method": "per_unit", "rate": rate});
    let (status, v1) = edge.http("POST", "/api/v1/admin/prices", Some(admin), rule("0.001")).await?;
    ensure!(status == StatusCode::CREATED, "{v1}");
    let events: Vec<Value> = (0..10)
        .map(|i| json!({"user_id": format!("u{i}"), "service_type": "custom", "service_provider": "p", "event_type": "job"}))
        .collect();
    let (status, body) =
        edge.http("POST", "/api/v1/events/batch", Some(&edge.key), json!({"events": events})).await?;
    ensure!(status == StatusCode::OK, "{body}");
    let mut replacement = rule("0.002");
    replacement["replaces"] = v1["id"].clone();
    let (status, v2) = edge.http("POST", "/api/v1/admin/prices", Some(admin), replacement).await?;
    ensure!(status == StatusCode::CREATED, "{v2}");
    Ok(())
}

/// The figures of a run over [`ten_events_to_reprice`].
fn assert_ten_repriced(run: &Value, changed: i64) {
    assert_eq!(
        (run["events_scanned"].as_i64(), run["events_changed"].as_i64()),
        (Some(10), Some(changed)),
        "{run}"
    );
    assert_eq!(
        (money(&run["cost_before"]), money(&run["cost_after"])),
        (Decimal::new(1, 2), Decimal::new(2, 2))
    );
}

async fn total_cost(edge: &TestEdge) -> Result<Decimal> {
    Ok(edge.events().await?.iter().filter_map(|event| event.cost).sum())
}

/// Writes a running run as another edge process would, with its last progress `age_s` ago.
async fn insert_running_run(edge: &TestEdge, age_s: i64) -> Result<Uuid> {
    let id = Uuid::now_v7();
    let at_us = edge::auth::now_us() - age_s * 1_000_000;
    if let Ok(mut db) = edge.connect_db().await {
        sqlx::query(
            "INSERT INTO rerate_runs (id, tenant_id, range_start, range_end, started_at, updated_at, status)
             VALUES ($1, $2, tally_timestamptz($3), tally_timestamptz($4), tally_timestamptz($3),
                     tally_timestamptz($3), 'running')",
        )
        .bind(id)
        .bind(edge.tenant.id)
        .bind(at_us)
        .bind(at_us + 3_600_000_000)
        .execute(&mut db)
        .await?;
    } else {
        sqlx::query(
            "INSERT INTO rerate_runs (id, tenant_id, range_start, range_end, started_at, updated_at, status)
             VALUES (?1, ?2, ?3, ?4, ?3, ?3, 'running')",
        )
        .bind(id)
        .bind(edge.tenant.id)
        .bind(at_us)
        .bind(at_us + 3_600_000_000)
        .execute(&mut edge.connect_sqlite().await?)
        .await?;
    }
    Ok(id)
}

/// Ends a run written by [`insert_running_run`], as its process would.
async fn finish_run(edge: &TestEdge, id: Uuid) -> Result<()> {
    match edge.connect_db().await {
        Ok(mut db) => {
            sqlx::query("UPDATE rerate_runs SET status = 'finished', finished_at = now() WHERE id = $1")
                .bind(id)
                .execute(&mut db)
                .await?;
        }
        Err(_) => {
            sqlx::query("UPDATE rerate_runs SET status = 'finished', finished_at = updated_at WHERE id = ?1")
                .bind(id)
                .execute(&mut edge.connect_sqlite().await?)
                .await?;
        }
    }
    Ok(())
}

/// Runs `sql` on the edge's database (the same text on both backends).
async fn execute(edge: &TestEdge, sql: &str) -> Result<()> {
    match edge.connect_db().await {
        Ok(mut db) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut db).await.map(drop)?,
        Err(_) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut edge.connect_sqlite().await?)
            .await
            .map(drop)?,
    }
    Ok(())
}

/// On PostgreSQL a real job is held: the test locks the tenant's events, so the job's first batch
/// waits. On SQLite (one writer per database, which a lock would take from the edge too) the
/// running run is another edge process's, written on the database. Either way, while it runs: its
/// audit row says running, a second re-rate gets 409 naming it, and another tenant sees nothing.
async fn a_running_rerate_is_audited_blocks_a_second_and_is_hidden_from_other_tenants(
    backend: Backend,
) -> Result<()> {
    let (edge, admin) = TestEdge::with_admin(backend).await?;
    ten_events_to_reprice(&edge, &admin).await?;
    let range = recent_range();
    let mut lock = match backend {
        Backend::Postgres => Some(edge.connect_db().await?),
        Backend::Sqlite => None,
    };
    let running = match lock.as_mut() {
        Some(lock) => {
            sqlx::raw_sql("BEGIN").execute(&mut *lock).await?;
            sqlx::query("SELECT 1 FROM usage_events WHERE tenant_id = $1 FOR UPDATE")
                .bind(edge.tenant.id)
                .fetch_all(&mut *lock)
                .await?;
            let (status, started) = start(&edge, &admin, &range).await?;
            assert_eq!(status, StatusCode::ACCEPTED, "{started}");
            started["id"].as_str().context("an id")?.parse()?
        }
        None => insert_running_run(&edge, 0).await?,
    };

    let (status, run) = edge.http("GET", &format!("{PATH}/{running}"), Some(&admin), Value::Null).await?;
    assert_eq!(status, StatusCode::OK, "{run}");
    assert_eq!((run["status"].as_str(), run["events_scanned"].as_i64()), (Some("running"), Some(0)), "{run}");
    assert!(run["finished_at"].is_null() && run["error"].is_null(), "{run}");
    let (status, refused) = start(&edge, &admin, &range).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(refused["detail"].as_str().unwrap_or_default().contains(&running.to_string()), "{refused}");

    let (other, _) = edge.other_tenant("globex").await?;
    let other_admin = create_key(&edge.store, &other, vec![Scope::Admin]).await?;
    let (status, _) = edge.http("GET", &format!("{PATH}/{running}"), Some(&other_admin), Value::Null).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, listed) = edge.http("GET", PATH, Some(&other_admin), Value::Null).await?;
    assert_eq!((status, listed["runs"].as_array().map(Vec::len)), (StatusCode::OK, Some(0)), "{listed}");
    let (_, listed) = edge.http("GET", PATH, Some(&admin), Value::Null).await?;
    assert_eq!(listed["runs"][0]["id"], running.to_string().as_str(), "{listed}");
    assert_eq!(total_cost(&edge).await?, Decimal::new(1, 2), "nothing re-rated while held");

    // Released: the held job (PostgreSQL), or a new one once the other process's run ended.
    let finished = match lock {
        Some(mut lock) => {
            sqlx::raw_sql("ROLLBACK").execute(&mut lock).await?;
            let run = wait_until_ended(&edge, &admin, &running.to_string()).await?;
            assert_eq!(run["status"], "finished", "{run}");
            run
        }
        None => {
            finish_run(&edge, running).await?;
            rerate_and_wait(&edge, &admin, &range).await?
        }
    };
    assert_ten_repriced(&finished, 10);
    assert_eq!(total_cost(&edge).await?, Decimal::new(2, 2));
    let (_, listed) = edge.http("GET", PATH, Some(&admin), Value::Null).await?;
    assert_eq!(listed["runs"][0], finished, "newest first, as GET shows it");
    edge.assert_rollups_match_raw().await?;
    Ok(())
}

/// A batch that the database refuses (a trigger, standing in for any storage failure) ends the
/// run as failed, with a public message; nothing was changed, and the run may be run again.
async fn a_failed_rerate_is_reported_as_failed(backend: Backend) -> Result<()> {
    let (edge, admin) = TestEdge::with_admin(backend).await?;
    ten_events_to_reprice(&edge, &admin).await?;
    let refuse = match backend {
        Backend::Postgres => {
            "CREATE FUNCTION refuse_update() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'internal detail from the test trigger'; END $$;
             CREATE TRIGGER refuse_update AFTER UPDATE ON usage_events
                 FOR EACH ROW EXECUTE FUNCTION refuse_update();"
        }
        Backend::Sqlite => {
            "CREATE TRIGGER refuse_update BEFORE UPDATE ON usage_events
                 BEGIN SELECT RAISE(ABORT, 'internal detail from the test trigger'); END;"
        }
    };
    execute(&edge, refuse).await?;
    let range = recent_range();
    let (status, started) = start(&edge, &admin, &range).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    let run = wait_until_ended(&edge, &admin, started["id"].as_str().unwrap_or_default()).await?;
    assert_eq!((run["status"].as_str(), run["events_changed"].as_i64()), (Some("failed"), Some(0)), "{run}");
    let error = run["error"].as_str().unwrap_or_default();
    assert!(error.contains("storage failed") && !error.contains("trigger"), "a public message: {run}");
    assert!(run["finished_at"].is_string(), "{run}");
    assert_eq!(total_cost(&edge).await?, Decimal::new(1, 2), "the failed batch changed nothing");
    edge.assert_rollups_match_raw().await?;

    // A failed run does not block the next one, which re-rates everything.
    let drop_trigger = match backend {
        Backend::Postgres => "DROP TRIGGER refuse_update ON usage_events",
        Backend::Sqlite => "DROP TRIGGER refuse_update",
    };
    execute(&edge, drop_trigger).await?;
    let run = rerate_and_wait(&edge, &admin, &range).await?;
    assert_ten_repriced(&run, 10);
    assert_eq!(total_cost(&edge).await?, Decimal::new(2, 2));
    edge.assert_rollups_match_raw().await?;
    Ok(())
}

/// A process that crashed leaves its run running. Until its progress is older than
/// `RERATE_STALE_SECONDS` it blocks a new run; after that a new run marks it interrupted and
/// goes ahead (re-rating is idempotent).
async fn a_rerate_left_running_by_a_stopped_process_stops_blocking_once_stale(
    backend: Backend,
) -> Result<()> {
    let (edge, admin) = TestEdge::with_admin(backend).await?;
    ten_events_to_reprice(&edge, &admin).await?;
    let stale_s = edge::rerate::RERATE_STALE_SECONDS;
    let recent = insert_running_run(&edge, stale_s - 60).await?;
    let (status, refused) = start(&edge, &admin, &recent_range()).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(refused["detail"].as_str().unwrap_or_default().contains(&recent.to_string()), "{refused}");
    finish_run(&edge, recent).await?;

    let abandoned = insert_running_run(&edge, stale_s + 60).await?;
    let run = rerate_and_wait(&edge, &admin, &recent_range()).await?;
    assert_ten_repriced(&run, 10);
    let (status, old) = edge.http("GET", &format!("{PATH}/{abandoned}"), Some(&admin), Value::Null).await?;
    assert_eq!((status, old["status"].as_str()), (StatusCode::OK, Some("interrupted")), "{old}");
    assert!(old["error"].as_str().unwrap_or_default().contains("run it again"), "{old}");
    let (_, listed) = edge.http("GET", PATH, Some(&admin), Value::Null).await?;
    let statuses: Vec<_> =
        listed["runs"].as_array().into_iter().flatten().map(|run| run["status"].clone()).collect();
    assert_eq!(
        statuses,
        [json!("finished"), json!("finished"), json!("interrupted")],
        "newest first: {listed}"
    );
    Ok(())
}

/// Shutdown stops a job after the batch in hand and records it as interrupted, with its figures
/// so far. PostgreSQL only: the job is held in its first batch by a row lock the test takes.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_records_a_running_rerate_as_interrupted() -> Result<()> {
    use std::future::Future;
    use std::task::Poll;

    let (edge, admin) = TestEdge::with_admin(Backend::Postgres).await?;
    let batch = edge::rerate::RERATE_BATCH_EVENTS as usize;
    for chunk in 0..=batch / 1000 {
        let events: Vec<Value> = (0..1000)
            .map(|i| json!({"user_id": format!("u{chunk}-{i}"), "service_type": "custom", "service_provider": "p", "event_type": "job"}))
            .collect();
        let (status, body) =
            edge.http("POST", "/api/v1/events/batch", Some(&edge.key), json!({"events": events})).await?;
        ensure!(status == StatusCode::OK, "{body}");
    }
    let mut lock = edge.connect_db().await?;
    sqlx::raw_sql("BEGIN").execute(&mut lock).await?;
    sqlx::query("SELECT 1 FROM usage_events WHERE tenant_id = $1 FOR UPDATE")
        .bind(edge.tenant.id)
        .fetch_all(&mut lock)
        .await?;
    let (status, started) = start(&edge, &admin, &recent_range()).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    let id: Uuid = started["id"].as_str().context("an id")?.parse()?;
    // Wait (bounded) until the job is in its first batch, waiting for the row lock.
    let mut observer = edge.connect_db().await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut observer)
        .await?;
        if waiting > 0 {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "the re-rate never reached its first batch");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // The first poll asks the jobs to stop; the job is still in its first batch.
    let mut stop = Box::pin(edge.edge.state.rerates.stop(RERATE_DEADLINE));
    let first = std::future::poll_fn(|cx| Poll::Ready(stop.as_mut().poll(cx))).await;
    assert!(first.is_pending(), "the held job cannot have ended");
    sqlx::raw_sql("ROLLBACK").execute(&mut lock).await?;
    assert!(stop.await, "the job ended after its batch");

    let record = edge.store.find_rerate(edge.tenant.id, id).await?.context("the run")?;
    assert_eq!(record.status, sink::RerateStatus::Interrupted, "{record:?}");
    assert_eq!(record.run.events_scanned, batch as i64, "{record:?}");
    assert!(
        record.finished_at_us.is_some() && record.error.as_deref().unwrap_or_default().contains("shut down")
    );
    Ok(())
}
