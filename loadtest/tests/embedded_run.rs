//! The embedded (SQLite) backend under load: an in-process edge over a fresh SQLite file, loaded
//! for 3 s at 2,000 events/s, then verified with the same checks as PostgreSQL, reading the file.
//! Also proves verification on SQLite can fail (a lost row, a wrong decimal in a rollup), and that
//! `tally-load` refuses PostgreSQL flags with `--embedded`.
//!
//! The edge runs in this process rather than as the `tally-edge` child `--spawn --embedded`
//! starts: `cargo test -p loadtest` does not build another package's binaries, so a child could
//! be missing or stale. `tally-load --spawn --embedded` itself is what BENCHMARKS.md runs.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use loadtest::generator::GeneratorConfig;
use loadtest::load::{LoadOptions, Mode, Target};
use loadtest::progress::Progress;
use loadtest::spawn::ScratchDir;
use loadtest::verify::{self, Database, Scope};
use loadtest::{RunPlan, run_and_report};
use sink::Store;
use sink::sqlite::{DATABASE_FILE_NAME, SqliteStore};
use sqlx::{ConnectOptions, Connection};

/// An edge on loopback over a fresh SQLite file, and keys for `tenants` tenants.
struct EmbeddedEdge {
    edge: edge::RunningEdge,
    keys: Vec<String>,
    database: Database,
    // Last: the folder goes after the edge has stopped.
    _dir: ScratchDir,
}

impl EmbeddedEdge {
    async fn start(tenants: usize) -> Result<EmbeddedEdge> {
        let dir = ScratchDir::create()?;
        let path = dir.path().join(DATABASE_FILE_NAME);
        let store = Arc::new(Store::from(SqliteStore::open(&path).await?));
        let config = common::loopback_config()?;
        let keys = common::tenants_with_ingest_keys(store.as_ref(), tenants).await?;
        let edge = edge::start(config, store).await?;
        Ok(EmbeddedEdge { edge, keys, database: Database::Sqlite(path), _dir: dir })
    }

    fn plan(&self, mode: Mode, rate: f64, seconds: u64) -> RunPlan {
        RunPlan {
            load: LoadOptions {
                mode,
                connections: self.keys.len(),
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
            database: Some(self.database.clone()),
            scope: Scope::Exclusive,
            verify: true,
            midway_check: true,
            cpu: None,
            fail_under: None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_run_verifies_against_sqlite_and_tampering_is_caught() -> Result<()> {
    let embedded = EmbeddedEdge::start(2).await?;
    let result = run_and_report(&embedded.plan(Mode::Binary, 2000.0, 3), &Progress::hidden()).await?;
    let report = &result.report;
    assert!(report.passed, "the run failed:\n{}", report.text());
    assert_eq!(report.sent, 6000, "{}", report.text());
    assert_eq!(report.errors, 0);
    assert!((report.achieved_events_per_s - 2000.0).abs() < 1.0, "kept the rate: {}", report.text());
    assert!(report.expected_duplicates > 0 && report.acked_duplicate >= report.expected_duplicates);
    assert!(report.expected_rejections > 0 && report.rejected == report.expected_rejections);
    assert!(report.database.as_deref().is_some_and(|text| text.starts_with("SQLite")));
    let verification = report.verification.as_ref().expect("verified");
    let stored: u64 = verification.tenants.iter().map(|tenant| tenant.stored_rows).sum();
    assert_eq!(stored, report.acked_stored, "every stored ack is one row");
    assert!(verification.tenants.iter().all(|tenant| tenant.rollup_rows_compared > 0));

    let shared = verify::verify(&embedded.database, &embedded.keys, &result.ledgers, Scope::Shared).await?;
    assert!(shared.passed, "{:?}", shared.problems);
    embedded.edge.shutdown().await;

    let Database::Sqlite(path) = &embedded.database else { unreachable!("embedded") };
    let mut connection = sqlx::sqlite::SqliteConnectOptions::new().filename(path).connect().await?;
    sqlx::query("DELETE FROM usage_events WHERE event_id = (SELECT event_id FROM usage_events LIMIT 1)")
        .execute(&mut connection)
        .await?;
    // One millionth more tokens in the rollups of one user: exact decimals must notice.
    sqlx::query(
        "UPDATE usage_rollup_hourly SET input_tokens = input_tokens || '.000001' \
         WHERE service_type = 'llm_service' AND instr(input_tokens, '.') = 0 AND user_id = \
           (SELECT user_id FROM usage_rollup_hourly WHERE service_type = 'llm_service' \
            AND instr(input_tokens, '.') = 0 LIMIT 1)",
    )
    .execute(&mut connection)
    .await?;
    connection.close().await?;
    let tampered =
        verify::verify(&embedded.database, &embedded.keys, &result.ledgers, Scope::Exclusive).await?;
    assert!(!tampered.passed);
    let problems = tampered.problems.join("\n");
    assert!(problems.contains("acknowledged events are not stored"), "{problems}");
    assert!(problems.contains("rollup rows differ"), "{problems}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_http_batch_run_verifies() -> Result<()> {
    let embedded = EmbeddedEdge::start(2).await?;
    let result = run_and_report(&embedded.plan(Mode::HttpBatch, 1000.0, 1), &Progress::hidden()).await?;
    assert!(result.report.passed, "the run failed:\n{}", result.report.text());
    assert_eq!(result.report.sent, 1000);
    embedded.edge.shutdown().await;
    Ok(())
}

/// Runs `tally-load` with `args`; it must refuse before starting anything.
fn refused(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_tally-load"))
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .expect("tally-load runs");
    assert_eq!(output.status.code(), Some(2), "{args:?} must be refused: {output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn postgres_flags_are_refused_with_embedded() {
    for flag in ["--pg-durable", "--pg-socket"] {
        let stderr = refused(&["--spawn", "--embedded", flag]);
        assert!(stderr.contains(flag) && stderr.contains("--embedded"), "{stderr}");
    }
    let stderr = refused(&["--spawn", "--embedded", "--database-url", "postgres://tally@127.0.0.1/x"]);
    assert!(stderr.contains("--database-url"), "{stderr}");
    let stderr = refused(&["--embedded"]);
    assert!(stderr.contains("needs --spawn"), "{stderr}");
    let stderr = refused(&["ratio", "--spawn", "--embedded"]);
    assert!(stderr.contains("--embedded"), "{stderr}");
}
