//! Citus, when installed for the PostgreSQL the harness runs (it is not packaged for Debian; CI
//! has none, and then the test says so and returns): a coordinator and two workers on loopback,
//! a database migrated and distributed by tenant (`PgStore::distribute`, `tally-edge
//! distribute`), and on it every path of Tally: commits of batches mixing tenants with resends
//! (deduplicated, counted exactly), the rollup fold, a re-rate, control-plane writes, and the
//! query endpoints, each answered by a single task on the tenant's shard.

use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use axum::http::StatusCode;
use serde_json::{Value, json};
use sink::pg::{Distribution, PgOptions, PgStore};
use sink::{EventRow, Outcome, Scope, Store};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::query::{Fixture, Sent};
use crate::support::{Location, OPERATOR_KEY, TestDatabase, TestEdge, create_key};

/// Settings of each node: Citus preloaded; two-phase commit available for the statements that
/// span shards (distributing, maintenance); connections between nodes without TLS (a server
/// started as root's child keeps root's HOME, whose client certificates it may not read).
const CITUS_SETTINGS: &str = "shared_preload_libraries = 'citus'\n\
                              max_prepared_transactions = 100\n\
                              citus.node_conninfo = 'sslmode=disable'\n";

/// Every table Tally keeps per tenant: distributed by `tenant_id`, colocated.
const PER_TENANT_TABLES: [&str; 9] = [
    "usage_events",
    "price_rules",
    "rerate_runs",
    "services",
    "usage_rollup_hourly",
    "usage_rollup_pending",
    "usage_rollup_service_hourly",
    "usage_rollup_service_pending",
    "usage_rollup_user_daily",
];

/// A coordinator and two workers, each a dedicated server.
struct Cluster {
    coordinator: tests::PgServer,
    workers: [tests::PgServer; 2],
}

impl Cluster {
    /// The three servers, or `None` (said on stderr) when Citus is not installed.
    async fn start() -> Result<Option<Cluster>> {
        if !tests::postgres().await.extension_available("citus").await? {
            eprintln!(
                "SKIPPED: the citus extension is not installed for the harness's PostgreSQL \
                 (it is not packaged for Debian; build it from source to run this test)"
            );
            return Ok(None);
        }
        let (coordinator, first, second) = tokio::try_join!(
            tests::dedicated_postgres_with(CITUS_SETTINGS),
            tests::dedicated_postgres_with(CITUS_SETTINGS),
            tests::dedicated_postgres_with(CITUS_SETTINGS),
        )?;
        Ok(Some(Cluster { coordinator, workers: [first, second] }))
    }

    /// A fresh database of the same name on every node, with the extension, and the workers
    /// added to the coordinator's metadata.
    async fn database(&self) -> Result<tests::TestDb> {
        let db = self.coordinator.fresh_database().await?;
        for worker in &self.workers {
            let mut postgres = PgConnection::connect(&worker.url("postgres")).await?;
            postgres.execute(AssertSqlSafe(format!("CREATE DATABASE \"{}\"", db.name))).await?;
            let mut conn = PgConnection::connect(&worker.url(&db.name)).await?;
            conn.execute("CREATE EXTENSION citus").await?;
        }
        let mut conn = db.connect().await?;
        conn.execute("CREATE EXTENSION citus").await?;
        sqlx::query("SELECT citus_set_coordinator_host('127.0.0.1', $1)")
            .bind(i32::from(self.coordinator.port()))
            .execute(&mut conn)
            .await?;
        for worker in &self.workers {
            sqlx::query("SELECT citus_add_node('127.0.0.1', $1)")
                .bind(i32::from(worker.port()))
                .execute(&mut conn)
                .await
                .map_err(|error| anyhow::anyhow!("add worker {}: {error:?}", worker.port()))?;
        }
        Ok(db)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn distributed_by_tenant_every_write_and_query_works_on_one_shard() -> Result<()> {
    let Some(cluster) = Cluster::start().await? else {
        return Ok(());
    };
    let db = cluster.database().await?;
    let store = PgStore::connect_lazy(&db.url, &PgOptions::default())?;
    store.migrate().await?;
    distribute(&store, &mut db.connect().await?).await?;
    let config = edge::EdgeConfig { operator_key: Some(OPERATOR_KEY.into()), ..edge::EdgeConfig::default() };
    let url = db.url.clone();
    let database = TestDatabase { url: url.clone(), location: Location::Postgres(db) };
    let edge = TestEdge::serve(database, Arc::new(Store::from(store)), config).await?;
    let mut conn = edge.connect_db().await?;
    partitions_are_distributed(&mut conn).await?;

    let (globex, _) = edge.other_tenant("globex").await?;
    commit_with_resends(&edge, &url, globex.id, &mut conn).await?;
    http_resends_are_duplicates(&edge).await?;
    fold_everything(&edge, &mut conn).await?;
    control_plane_and_rerate(&edge, &mut conn).await?;
    fold_everything(&edge, &mut conn).await?;
    queries_are_single_task(edge, &url).await
}

/// Distributes, checks the result in Citus's metadata, and distributes again: nothing changes.
async fn distribute(store: &PgStore, conn: &mut PgConnection) -> Result<()> {
    let done = store.distribute().await?;
    ensure!(done.reference == ["tenants", "api_keys"], "{done:?}");
    let mut distributed = done.distributed.clone();
    distributed.sort();
    let mut expected = PER_TENANT_TABLES.map(str::to_owned).to_vec();
    expected.sort();
    ensure!(distributed == expected, "distributed {distributed:?}");
    ensure!(store.distribute().await? == Distribution::default(), "a second run distributes nothing");
    let (tables, colocations): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT colocationid) FROM pg_dist_partition \
         WHERE partmethod = 'h' AND logicalrelid::text = ANY ($1)",
    )
    .bind(&PER_TENANT_TABLES[..])
    .fetch_one(&mut *conn)
    .await?;
    ensure!(
        (tables, colocations) == (PER_TENANT_TABLES.len() as i64, 1),
        "{tables} tables distributed in {colocations} colocation groups"
    );
    Ok(())
}

/// Daily partitions that maintenance created after distribution are distributed with their
/// parent.
async fn partitions_are_distributed(conn: &mut PgConnection) -> Result<()> {
    let (partitions, distributed): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(d.logicalrelid) FROM pg_inherits i \
         LEFT JOIN pg_dist_partition d ON d.logicalrelid = i.inhrelid \
         WHERE i.inhparent = 'usage_events'::regclass",
    )
    .fetch_one(conn)
    .await?;
    ensure!(
        partitions > 0 && distributed == partitions,
        "{distributed} of {partitions} partitions distributed"
    );
    Ok(())
}

fn rows(tenant: Uuid, events: &[Sent]) -> Vec<EventRow> {
    events.iter().map(|sent| EventRow::new(tenant, sent.event(), sent.cost)).collect()
}

fn count(outcomes: &[Outcome], outcome: Outcome) -> usize {
    outcomes.iter().filter(|&&each| each == outcome).count()
}

/// Batches mixing both tenants: new rows, resends the store's hint knows, a key repeated inside
/// a batch, and resends only the unique index finds (from a second store, as another edge
/// process would send them). Every outcome and the stored counts are exact.
async fn commit_with_resends(
    edge: &TestEdge,
    url: &str,
    globex: Uuid,
    conn: &mut PgConnection,
) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    let sent = |from: usize, to: usize| -> Vec<Sent> {
        (from..to).map(|i| Sent::new(i, now - time::Duration::seconds(i as i64 % 3000 + 1))).collect()
    };
    let (acme_events, globex_events) = (sent(0, 300), sent(0, 200));
    let acme = |range: std::ops::Range<usize>| rows(edge.tenant.id, &acme_events[range]);
    let globex_rows = |range: std::ops::Range<usize>| rows(globex, &globex_events[range]);

    let mut first = acme(0..200);
    first.extend(globex_rows(0..150));
    let outcomes = edge.store.commit(&first).await?;
    ensure!(count(&outcomes, Outcome::Stored) == 350, "first batch: {outcomes:?}");

    let mut second = acme(150..300);
    second.extend(globex_rows(100..200));
    second.extend(acme(299..300));
    let outcomes = edge.store.commit(&second).await?;
    let expected_duplicates = [(0..50), (150..200), (250..251)];
    for (index, outcome) in outcomes.iter().enumerate() {
        let duplicate = expected_duplicates.iter().any(|range| range.contains(&index));
        ensure!(
            *outcome == if duplicate { Outcome::Duplicate } else { Outcome::Stored },
            "second batch, row {index}: {outcome:?}"
        );
    }

    let other_process = Store::from(PgStore::connect_lazy(url, &PgOptions::default())?);
    let mut third = acme(0..10);
    third.extend(globex_rows(190..200));
    third.extend(rows(edge.tenant.id, &sent(300, 305)));
    let outcomes = other_process.commit(&third).await?;
    ensure!(
        (count(&outcomes, Outcome::Duplicate), count(&outcomes, Outcome::Stored)) == (20, 5),
        "resends unknown to the hint: {outcomes:?}"
    );
    for (tenant, expected) in [(edge.tenant.id, 305), (globex, 200)] {
        let stored = crate::support::stored_count(conn, tenant).await?;
        ensure!(stored == expected, "tenant {tenant}: {stored} events stored, expected {expected}");
    }
    Ok(())
}

/// Through the edge's HTTP ingest (queues, sink workers): a batch holding an event stored
/// before and a repeat of a new one is answered with exact counts.
async fn http_resends_are_duplicates(edge: &TestEdge) -> Result<()> {
    let at = OffsetDateTime::now_utc() - time::Duration::minutes(5);
    let event = |id: Uuid| {
        json!({"event_id": id, "timestamp": crate::query::rfc3339(at), "user_id": "u",
            "service_type": "llm_service", "service_provider": "prov-a", "model": "model-a",
            "input_tokens": 10, "output_tokens": 1})
    };
    let (old, new) = (Uuid::now_v7(), Uuid::now_v7());
    let post = |events: Vec<Value>| {
        edge.http("POST", "/api/v1/events/batch", Some(&edge.key), json!({"events": events}))
    };
    let (status, body) = post(vec![event(old)]).await?;
    ensure!(status == StatusCode::OK && body["stored_count"] == 1, "{body}");
    let (status, body) = post(vec![event(old), event(new), event(new)]).await?;
    ensure!(status == StatusCode::OK, "{body}");
    ensure!(
        (body["stored_count"].as_i64(), body["duplicate_count"].as_i64()) == (Some(1), Some(2)),
        "{body}"
    );
    Ok(())
}

/// Folds until nothing is pending (the edge's own materializer may be folding a tenant at the
/// same moment; that tenant is then skipped and folded by the next call), then checks that the
/// rollups equal the raw events.
async fn fold_everything(edge: &TestEdge, conn: &mut PgConnection) -> Result<()> {
    let mut pending = u64::MAX;
    for _ in 0..20 {
        pending = edge.store.fold_rollups(1_000_000).await?.pending;
        if pending == 0 {
            break;
        }
    }
    ensure!(pending == 0, "{pending} rollup rows still pending");
    let folded: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "SELECT e.tenant_id, e.events, r.events FROM \
           (SELECT tenant_id, count(*) AS events FROM usage_events GROUP BY tenant_id) e \
         JOIN (SELECT tenant_id, sum(event_count)::bigint AS events FROM usage_rollup_hourly GROUP BY tenant_id) r \
           USING (tenant_id)",
    )
    .fetch_all(&mut *conn)
    .await?;
    ensure!(folded.len() == 2 && folded.iter().all(|(_, raw, rolled)| raw == rolled), "{folded:?}");
    crate::support::assert_rollups_match_raw(conn).await?;
    Ok(())
}

/// Every control-plane write, and a re-rate that moves events and rollups together.
async fn control_plane_and_rerate(edge: &TestEdge, conn: &mut PgConnection) -> Result<()> {
    let admin = create_key(&edge.store, &edge.tenant, vec![Scope::Admin]).await?;
    let call = |method: &'static str, path: String, key: &'static str, body: Value| {
        let key = if key == "admin" { admin.clone() } else { OPERATOR_KEY.to_owned() };
        async move { edge.http(method, &path, Some(&key), body).await }
    };
    let expect = |(status, body): (StatusCode, Value), wanted: StatusCode, what: &str| {
        ensure!(status == wanted, "{what}: {status} {body}");
        Ok(body)
    };
    let service = json!({"service_type": "ml_predictions", "service_name": "Predictions",
        "providers": ["p"], "required_fields": []});
    expect(call("POST", "/api/v1/services".into(), "admin", service).await?, StatusCode::CREATED, "service")?;
    let put = json!({"service_name": "Predictions v2"});
    expect(
        call("PUT", "/api/v1/services/ml_predictions".into(), "admin", put).await?,
        StatusCode::OK,
        "PUT",
    )?;
    let key = expect(
        call("POST", "/api/v1/admin/keys".into(), "admin", json!({"label": "app"})).await?,
        StatusCode::CREATED,
        "key",
    )?;
    let revoke = format!("/api/v1/admin/keys/{}", key["id"].as_str().context("key id")?);
    let (status, body) = call("DELETE", revoke, "admin", Value::Null).await?;
    ensure!(status.is_success(), "revoke: {status} {body}");
    for action in ["disable", "enable"] {
        let path = format!("/api/v1/admin/tenants/globex/{action}");
        let (status, body) = call("POST", path, "operator", Value::Null).await?;
        ensure!(status.is_success(), "{action}: {status} {body}");
    }

    let rule = |rate: &str| json!({"service_type": "custom", "service_provider": "p", "unit": "events", "method": "per_unit", "rate": rate});
    let v1 = expect(
        call("POST", "/api/v1/admin/prices".into(), "admin", rule("0.001")).await?,
        StatusCode::CREATED,
        "price",
    )?;
    // Re-rated from here on: the events committed before keep their costs.
    let start = OffsetDateTime::now_utc() - time::Duration::milliseconds(1);
    let events: Vec<Value> = (0..10)
        .map(|i| json!({"user_id": format!("u{i}"), "service_type": "custom", "service_provider": "p", "event_type": "job"}))
        .collect();
    let (status, body) =
        edge.http("POST", "/api/v1/events/batch", Some(&edge.key), json!({"events": events})).await?;
    ensure!(status == StatusCode::OK && body["stored_count"] == 10, "{body}");
    let mut replacement = rule("0.002");
    replacement["replaces"] = v1["id"].clone();
    let v2 = expect(
        call("POST", "/api/v1/admin/prices".into(), "admin", replacement).await?,
        StatusCode::CREATED,
        "replace",
    )?;
    let end = OffsetDateTime::now_utc() + time::Duration::hours(1);
    let range = json!({"start_date": crate::query::rfc3339(start), "end_date": crate::query::rfc3339(end)});
    let run = crate::rerate::rerate_and_wait(edge, &admin, &range).await?;
    ensure!(
        (run["events_scanned"].as_i64(), run["events_changed"].as_i64()) == (Some(10), Some(10)),
        "{run}"
    );
    let retire = format!("/api/v1/admin/prices/{}", v2["id"].as_str().context("rule id")?);
    let (status, body) = call("DELETE", retire, "admin", Value::Null).await?;
    ensure!(status.is_success(), "retire: {status} {body}");
    let cost: Option<rust_decimal::Decimal> = sqlx::query_scalar(
        "SELECT sum(cost) FROM usage_events WHERE tenant_id = $1 AND service_provider = 'p'",
    )
    .bind(edge.tenant.id)
    .fetch_one(&mut *conn)
    .await?;
    ensure!(cost == Some("0.020".parse()?), "re-rated cost {cost:?}");
    Ok(())
}

/// The query endpoints over a connection on which Citus refuses any statement that needs more
/// than one task (`citus.multi_task_query_log_level = error`): each answers, so each ran on one
/// shard. And the plan of a tenant's rollup read shows one task.
async fn queries_are_single_task(edge: TestEdge, url: &str) -> Result<()> {
    let mut conn = edge.connect_db().await?;
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT hour, sum(event_count) FROM usage_rollup_hourly_live \
         WHERE tenant_id = $1 AND hour >= now() - interval '1 day' GROUP BY hour",
    )
    .bind(edge.tenant.id)
    .fetch_all(&mut conn)
    .await?;
    ensure!(plan.iter().any(|line| line.trim() == "Task Count: 1"), "{}", plan.join("\n"));

    let single_task = format!("{url}?options=-c%20citus.multi_task_query_log_level%3Derror");
    let mut check = PgConnection::connect(&single_task).await?;
    let level: String =
        sqlx::query_scalar("SHOW citus.multi_task_query_log_level").fetch_one(&mut check).await?;
    ensure!(level == "error", "the query service's connections refuse multi-task statements: {level}");
    let config = query::QueryConfig {
        metrics: Some(crate::support::metrics_handle()),
        ..query::QueryConfig::new(single_task)
    };
    let state = query::QueryState::connect(config).await?;
    let fixture = Fixture { edge, state };
    let range = format!(
        "start_date={}&end_date={}",
        crate::query::rfc3339(OffsetDateTime::now_utc() - time::Duration::days(1)),
        crate::query::rfc3339(OffsetDateTime::now_utc() + time::Duration::hours(1))
    );
    for path in [
        "/api/v1/usage?limit=5",
        "/api/v1/usage/aggregate?period=day&group_by=none",
        "/api/v1/usage/aggregate?period=hour&group_by=user_id",
        "/api/v1/usage/by-service",
        "/api/v1/usage/costs",
        "/api/v1/analytics/trends",
        "/api/v1/analytics/top-users",
        "/api/v1/analytics/breakdown",
        "/api/v1/analytics/errors",
    ] {
        let separator = if path.contains('?') { '&' } else { '?' };
        let body = fixture.ok(&format!("{path}{separator}{range}")).await?;
        ensure!(!body.is_null(), "{path}: empty answer");
    }
    let bill = fixture.ok("/api/v1/billing/summary").await?;
    ensure!(!bill.is_null(), "billing summary: empty answer");
    let listing = fixture.ok(&format!("/api/v1/usage?limit=1&{range}")).await?;
    ensure!(listing["total_count"] == 317, "acme's events: {}", listing["total_count"]);
    Ok(())
}
