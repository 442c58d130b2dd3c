//! Short `--spawn`-like runs: an in-process edge on a fresh database of the harness's
//! PostgreSQL, loaded for a second or two, then verified end to end. Also proves verification
//! can fail: a lost row and a wrong rollup are caught.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use loadtest::generator::GeneratorConfig;
use loadtest::load::{LoadOptions, Mode, Target};
use loadtest::progress::Progress;
use loadtest::verify::{self, Database, Scope};
use loadtest::{RunPlan, RunResult, run_and_report};
use sink::Store;
use sink::pg::{PgOptions, PgStore};

/// An edge on loopback over a fresh, migrated database, and keys for `tenants` tenants.
struct InProcessEdge {
    database: tests::TestDb,
    edge: edge::RunningEdge,
    keys: Vec<String>,
}

impl InProcessEdge {
    async fn start(tenants: usize) -> Result<InProcessEdge> {
        let database = tests::postgres().await.fresh_database().await?;
        let store = PgStore::connect_lazy(&database.url, &PgOptions::default())?;
        store.migrate().await?;
        let store = Arc::new(Store::from(store));
        let config = common::loopback_config()?;
        store.maintain(&config.retention_with_window()).await?;
        let keys = common::tenants_with_ingest_keys(store.as_ref(), tenants).await?;
        let edge = edge::start(config, store).await?;
        Ok(InProcessEdge { database, edge, keys })
    }

    fn plan(&self, mode: Mode, connections: usize, rate: f64, seconds: u64) -> RunPlan {
        RunPlan {
            load: LoadOptions {
                mode,
                connections,
                batch_size: 200,
                rate: Some(rate),
                duration: Some(Duration::from_secs(seconds)),
                events: None,
                max_in_flight: 8,
                generator: GeneratorConfig {
                    resend_fraction: 0.01,
                    invalid_fraction: 0.01,
                    users: 50,
                    ..GeneratorConfig::default()
                },
            },
            target: Target {
                wire_addr: self.edge.wire_addr.to_string(),
                http_addr: self.edge.http_addr.to_string(),
                api_keys: self.keys.clone(),
            },
            database: Some(Database::Postgres(self.database.url.clone())),
            scope: Scope::Exclusive,
            verify: true,
            midway_check: true,
            cpu: None,
            fail_under: None,
        }
    }
}

fn assert_passed(result: &RunResult, expected_events: u64) {
    let report = &result.report;
    assert!(report.passed, "the run failed:\n{}", report.text());
    assert_eq!(report.sent, expected_events, "{}", report.text());
    assert_eq!(report.acked_stored + report.acked_duplicate + report.rejected, expected_events);
    assert_eq!(report.errors, 0);
    assert!(report.expected_duplicates > 0 && report.acked_duplicate >= report.expected_duplicates);
    assert!(report.expected_rejections > 0 && report.rejected == report.expected_rejections);
    let verification = report.verification.as_ref().expect("verified");
    let stored: u64 = verification.tenants.iter().map(|tenant| tenant.stored_rows).sum();
    assert_eq!(stored, report.acked_stored, "every stored ack is one row");
    assert!(verification.tenants.iter().all(|tenant| tenant.rollup_rows_compared > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_run_verifies_and_tampering_is_caught() -> Result<()> {
    let edge = InProcessEdge::start(2).await?;
    let plan = edge.plan(Mode::Binary, 2, 2000.0, 2);
    let result = run_and_report(&plan, &Progress::hidden()).await?;
    assert_passed(&result, 4000);
    let report = &result.report;
    assert!((report.achieved_events_per_s - 2000.0).abs() < 1.0, "kept the rate: {}", report.text());

    let shared = verify::verify(
        &Database::Postgres(edge.database.url.clone()),
        &edge.keys,
        &result.ledgers,
        Scope::Shared,
    )
    .await?;
    assert!(shared.passed, "{:?}", shared.problems);
    assert!(shared.tenants.iter().all(|tenant| tenant.other_rows == 0));

    let mut connection = edge.database.connect().await?;
    sqlx::query("DELETE FROM usage_events WHERE event_id = (SELECT event_id FROM usage_events LIMIT 1)")
        .execute(&mut connection)
        .await?;
    sqlx::query(
        "UPDATE usage_rollup_hourly SET input_tokens = input_tokens + 1 \
         WHERE ctid = (SELECT ctid FROM usage_rollup_hourly WHERE service_type = 'llm_service' LIMIT 1)",
    )
    .execute(&mut connection)
    .await?;
    let tampered = verify::verify(
        &Database::Postgres(edge.database.url.clone()),
        &edge.keys,
        &result.ledgers,
        Scope::Exclusive,
    )
    .await?;
    assert!(!tampered.passed);
    let problems = tampered.problems.join("\n");
    assert!(problems.contains("acknowledged events are not stored"), "{problems}");
    assert!(problems.contains("rollup rows differ"), "{problems}");
    edge.edge.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_batch_and_single_runs_verify() -> Result<()> {
    let batch_edge = InProcessEdge::start(2).await?;
    let result = run_and_report(&batch_edge.plan(Mode::HttpBatch, 2, 1000.0, 1), &Progress::hidden()).await?;
    assert_passed(&result, 1000);
    batch_edge.edge.shutdown().await;

    let single_edge = InProcessEdge::start(1).await?;
    let mut plan = single_edge.plan(Mode::HttpSingle, 8, 400.0, 1);
    plan.load.generator.resend_fraction = 0.05;
    plan.load.generator.invalid_fraction = 0.05;
    let result = run_and_report(&plan, &Progress::hidden()).await?;
    assert_passed(&result, 400);
    single_edge.edge.shutdown().await;
    Ok(())
}
