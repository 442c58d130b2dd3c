//! `tally-load ratio`: the raw `COPY` ceiling of this machine and the full ingest path, measured
//! in one run on one PostgreSQL server with the same events, and their ratio.
//!
//! 1. Raw: the events as `EventRow`s, pre-encoded with the sink's own binary `COPY` encoder in
//!    10,000-row batches, loaded by two concurrent writers (a transaction per batch) into an empty
//!    `usage_events` of a separate fresh database migrated exactly like the edge's.
//! 2. Full: the same events through the client, the binary protocol, the edge, the sink's
//!    transaction (dedup, rollups) and its commit, to the durable ack.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use sink::EventRow;
use sink::pg::{CopyBuffer, encode_event, event_columns};
use sqlx::{Connection, Executor, PgConnection};

use crate::cpu::{CpuProbe, CpuSplit};
use crate::generator::{Batch, Generator, GeneratorConfig};
use crate::load::{LoadOptions, Mode, Target, run_load};
use crate::progress::Progress;
use crate::spawn::{self, EdgeChild, EdgeStorage, SpawnOptions};
use crate::stats::{LatencySummary, rate};
use crate::verify::{self, Scope, Verification};

/// Rows per raw `COPY` transaction.
pub const COPY_BATCH_ROWS: usize = 10_000;
/// Concurrent raw `COPY` writers (the edge runs two sink workers by default).
pub const COPY_WRITERS: usize = 2;

/// What the ratio run does.
#[derive(Debug, Clone)]
pub struct RatioOptions {
    pub events: u64,
    pub connections: usize,
    pub batch_size: usize,
    pub max_in_flight: usize,
    pub generator: GeneratorConfig,
    pub spawn: SpawnOptions,
    pub verify: bool,
    /// Load `pg_stat_statements` and report the full path's statements.
    pub statements: bool,
}

/// The results, for people and machines.
#[derive(Debug, Clone, Serialize)]
pub struct RatioReport {
    pub events: u64,
    pub postgres: String,
    pub raw_copy: Phase,
    pub full_path: Phase,
    /// Full path events/s over raw `COPY` events/s.
    pub ratio: f64,
    pub ack_latency: LatencySummary,
    /// On-disk bytes of `usage_events` (every partition, indexes and TOAST included) per row.
    pub bytes_per_event_full_path: f64,
    pub bytes_per_event_raw_copy: f64,
    pub rollup_table_bytes: u64,
    pub rollup_rows: u64,
    /// Seconds from the last ack until the materializer had folded every pending rollup row.
    pub fold_caught_up_s: Option<f64>,
    /// The full path's statements by total execution time (with `--statements`).
    pub statements: Vec<Statement>,
    pub verification: Option<Verification>,
}

/// One statement of the full path, from `pg_stat_statements`.
#[derive(Debug, Clone, Serialize)]
pub struct Statement {
    pub query: String,
    pub calls: i64,
    pub rows: i64,
    pub total_ms: f64,
    /// Execution time per event of the run, in microseconds.
    pub us_per_event: f64,
}

/// One measured phase.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub elapsed_s: f64,
    pub events_per_s: f64,
    pub rows_stored: u64,
    pub cpu: CpuSplit,
}

/// Runs both phases on a spawned server and returns the report.
pub async fn run_ratio(options: &RatioOptions, progress: &Progress) -> Result<RatioReport> {
    let edge_bin = spawn::edge_binary(options.spawn.edge_bin.as_deref())?;
    let postgres = spawn::start_postgres(options.spawn.pg_durable).await?;
    if options.statements {
        load_statement_stats(&postgres).await?;
    }
    let mut copy_db = postgres.fresh_database().await?;
    let mut edge_db = postgres.fresh_database().await?;
    copy_db.url = spawn::database_url(&postgres, &copy_db, options.spawn.pg_socket);
    edge_db.url = spawn::database_url(&postgres, &edge_db, options.spawn.pg_socket);
    let edge_storage = EdgeStorage::Postgres(edge_db.url.clone());
    spawn::migrate(&edge_bin, &EdgeStorage::Postgres(copy_db.url.clone())).await?;
    spawn::migrate(&edge_bin, &edge_storage).await?;
    let tenants =
        spawn::create_tenants(&edge_bin, &edge_storage, options.spawn.tenants.max(1), "ratio").await?;
    let description = spawn::describe_postgres(&edge_db.url).await?;
    let postmaster_pid = spawn::cpu_postmaster(&postgres)?;

    progress.note(&format!("generating {} events", options.events));
    let batches = prepare_batches(options);
    let tenant_ids: Vec<uuid::Uuid> = tenants.iter().map(|tenant| tenant.id).collect();
    let buffers = encode_copy_batches(&batches, &tenant_ids);
    progress.note(&format!(
        "raw COPY: {} batches of up to {COPY_BATCH_ROWS} rows, {COPY_WRITERS} writers",
        buffers.len()
    ));
    let raw_probe = CpuProbe { edge_pid: None, postmaster_pid: Some(postmaster_pid) };
    let raw_copy = copy_phase(&copy_db.url, buffers, &raw_probe).await?;
    checkpoint(&edge_db.url).await?;
    if options.statements {
        reset_statement_stats(&edge_db.url).await?;
    }

    let edge = EdgeChild::start(&edge_bin, &edge_storage, &options.spawn.edge_args).await?;
    progress.note(&format!(
        "full path: {} binary connections, batches of {}",
        options.connections, options.batch_size
    ));
    let target = Target {
        wire_addr: edge.wire_addr.clone(),
        http_addr: edge.http_addr.clone(),
        api_keys: tenants.iter().map(|tenant| tenant.api_key.clone()).collect(),
    };
    let load = LoadOptions {
        mode: Mode::Binary,
        connections: options.connections,
        batch_size: options.batch_size,
        rate: None,
        duration: None,
        events: Some(options.events),
        max_in_flight: options.max_in_flight,
        generator: options.generator.clone(),
    };
    let probe = CpuProbe { edge_pid: Some(edge.pid()), postmaster_pid: Some(postmaster_pid) };
    let mark = probe.mark();
    let outcome = run_load(&load, &target, progress, Some(batches)).await?;
    let cpu = probe.since(&mark);
    let fold_caught_up_s = wait_for_fold(&edge_db.url).await?;
    let statements = match options.statements {
        true => statement_stats(&edge_db.url, outcome.stats.answered()).await?,
        false => Vec::new(),
    };
    progress.finish();
    let elapsed = outcome.stats.last_answer();
    let (ack_latency, _) = outcome.stats.latencies();
    let verification = match options.verify {
        true => Some(
            verify::verify(&edge_storage.database(), &target.api_keys, &outcome.ledgers, Scope::Exclusive)
                .await?,
        ),
        false => None,
    };
    drop(edge);
    let full_sizes = table_sizes(&edge_db.url).await?;
    let raw_sizes = table_sizes(&copy_db.url).await?;
    let full_path = Phase {
        elapsed_s: elapsed.as_secs_f64(),
        events_per_s: rate(outcome.stats.answered(), elapsed),
        rows_stored: full_sizes.event_rows,
        cpu,
    };
    Ok(RatioReport {
        events: options.events,
        postgres: description,
        ratio: full_path.events_per_s / raw_copy.events_per_s.max(f64::EPSILON),
        raw_copy: Phase { rows_stored: raw_sizes.event_rows, ..raw_copy },
        full_path,
        ack_latency,
        bytes_per_event_full_path: full_sizes.bytes_per_event(),
        bytes_per_event_raw_copy: raw_sizes.bytes_per_event(),
        rollup_table_bytes: full_sizes.rollup_bytes,
        rollup_rows: full_sizes.rollup_rows,
        fold_caught_up_s,
        statements,
        verification,
    })
}

/// The run's events, generated once: connection `i`'s batches from generator stream `i`, the
/// stream the load command would use.
fn prepare_batches(options: &RatioOptions) -> Vec<Vec<Batch>> {
    let connections = options.connections.max(1);
    let batch_size = options.batch_size.max(1) as u64;
    let mut generators: Vec<Generator> =
        (0..connections).map(|index| Generator::new(options.generator.clone(), index as u64)).collect();
    let mut lists: Vec<Vec<Batch>> = (0..connections).map(|_| Vec::new()).collect();
    let now_us = crate::load::now_us();
    let mut remaining = options.events;
    let mut index = 0;
    while remaining > 0 {
        let size = remaining.min(batch_size);
        lists[index % connections].push(generators[index % connections].batch(size as usize, now_us));
        remaining -= size;
        index += 1;
    }
    lists
}

/// The same events as rows of the tenant their connection uses, encoded with the sink's
/// encoder into complete binary `COPY` streams.
fn encode_copy_batches(lists: &[Vec<Batch>], tenant_ids: &[uuid::Uuid]) -> Vec<Vec<u8>> {
    let mut buffers = Vec::new();
    let mut buffer = CopyBuffer::default();
    let mut rows_in_buffer = 0;
    buffer.start();
    for (connection, batches) in lists.iter().enumerate() {
        let tenant_id = tenant_ids[connection % tenant_ids.len()];
        for event in batches.iter().flat_map(|batch| &batch.events) {
            encode_event(&mut buffer, &EventRow::new(tenant_id, event.clone(), None));
            rows_in_buffer += 1;
            if rows_in_buffer == COPY_BATCH_ROWS {
                buffers.push(buffer.finish().to_vec());
                buffer.start();
                rows_in_buffer = 0;
            }
        }
    }
    if rows_in_buffer > 0 {
        buffers.push(buffer.finish().to_vec());
    }
    buffers
}

/// Loads every buffer with [`COPY_WRITERS`] connections, a transaction per buffer.
async fn copy_phase(url: &str, buffers: Vec<Vec<u8>>, probe: &CpuProbe) -> Result<Phase> {
    let statement = Arc::new(format!("COPY usage_events ({}) FROM STDIN (FORMAT binary)", event_columns()));
    let buffers = Arc::new(buffers);
    let next = Arc::new(AtomicUsize::new(0));
    let mut connections = Vec::new();
    let server_port = url.parse::<sqlx::postgres::PgConnectOptions>()?.get_port();
    for _ in 0..COPY_WRITERS {
        let mut connection = PgConnection::connect(url).await?;
        // As the sink's connections: without it, every COPY over TCP stalls at its end.
        sink::pg::set_nodelay(&mut connection, server_port).await;
        connections.push(connection);
    }
    let mark = probe.mark();
    let started = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for mut connection in connections {
        let (statement, buffers, next) = (statement.clone(), buffers.clone(), next.clone());
        writers.spawn(async move {
            let mut rows = 0u64;
            while let Some(buffer) = buffers.get(next.fetch_add(1, Ordering::Relaxed)) {
                let mut transaction = connection.begin().await?;
                let mut copy = transaction.copy_in_raw(&statement).await?;
                copy.send(buffer.as_slice()).await?;
                rows += copy.finish().await?;
                transaction.commit().await?;
            }
            connection.close().await?;
            Ok::<u64, sqlx::Error>(rows)
        });
    }
    let mut rows = 0;
    while let Some(joined) = writers.join_next().await {
        rows += joined.context("a COPY writer failed")?.context("raw COPY failed")?;
    }
    let elapsed = started.elapsed();
    let cpu = probe.since(&mark);
    Ok(Phase { elapsed_s: elapsed.as_secs_f64(), events_per_s: rate(rows, elapsed), rows_stored: rows, cpu })
}

/// How long after the last ack the materializer took to fold every pending rollup row (`None`
/// if it had not within two minutes). The full path's rate stops at the last ack; this says
/// how much rollup work was still to do then.
async fn wait_for_fold(url: &str) -> Result<Option<f64>> {
    let started = Instant::now();
    let mut connection = PgConnection::connect(url).await?;
    while started.elapsed() < std::time::Duration::from_secs(120) {
        let pending: i64 = sqlx::query_scalar(
            "SELECT /* tally-load */ (SELECT count(*) FROM usage_rollup_pending) \
             + (SELECT count(*) FROM usage_rollup_service_pending)",
        )
        .fetch_one(&mut connection)
        .await?;
        if pending == 0 {
            connection.close().await?;
            return Ok(Some(started.elapsed().as_secs_f64()));
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    connection.close().await?;
    Ok(None)
}

/// Restarts the (dedicated) server with `pg_stat_statements` loaded.
async fn load_statement_stats(server: &tests::PgServer) -> Result<()> {
    let mut connection = PgConnection::connect(&server.url("postgres")).await?;
    connection.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'").await?;
    connection.close().await?;
    server.stop().await.context("failed to stop PostgreSQL to load pg_stat_statements")?;
    server.start().await.context("failed to restart PostgreSQL with pg_stat_statements")
}

async fn reset_statement_stats(url: &str) -> Result<()> {
    let mut connection = PgConnection::connect(url).await?;
    connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").await?;
    connection.execute("SELECT pg_stat_statements_reset()").await?;
    connection.close().await?;
    Ok(())
}

/// The full path's statements in its database, by total execution time (which includes time
/// waiting for locks and WAL flushes, not only CPU).
async fn statement_stats(url: &str, events: u64) -> Result<Vec<Statement>> {
    let mut connection = PgConnection::connect(url).await?;
    let rows: Vec<(String, i64, i64, f64)> = sqlx::query_as(
        "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls, rows, total_exec_time \
         FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND query NOT LIKE '%pg_stat_statements%' AND query NOT LIKE '%tally-load%' \
         ORDER BY total_exec_time DESC LIMIT 12",
    )
    .fetch_all(&mut connection)
    .await?;
    connection.close().await?;
    Ok(rows
        .into_iter()
        .map(|(query, calls, rows, total_ms)| Statement {
            query,
            calls,
            rows,
            total_ms,
            us_per_event: total_ms * 1000.0 / events.max(1) as f64,
        })
        .collect())
}

/// Writes the raw phase's dirty pages out, so the full path does not pay for them.
async fn checkpoint(url: &str) -> Result<()> {
    let mut connection = PgConnection::connect(url).await?;
    connection.execute("CHECKPOINT").await.context("CHECKPOINT failed")?;
    connection.close().await?;
    Ok(())
}

struct Sizes {
    event_rows: u64,
    event_bytes: u64,
    rollup_rows: u64,
    rollup_bytes: u64,
}

impl Sizes {
    fn bytes_per_event(&self) -> f64 {
        self.event_bytes as f64 / (self.event_rows.max(1)) as f64
    }
}

async fn table_sizes(url: &str) -> Result<Sizes> {
    let mut connection = PgConnection::connect(url).await?;
    let event_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM usage_events").fetch_one(&mut connection).await?;
    let event_bytes: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)::bigint FROM pg_inherits \
         WHERE inhparent = 'usage_events'::regclass",
    )
    .fetch_one(&mut connection)
    .await?;
    let rollup_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM usage_rollup_hourly").fetch_one(&mut connection).await?;
    let rollup_bytes: i64 = sqlx::query_scalar("SELECT pg_total_relation_size('usage_rollup_hourly')")
        .fetch_one(&mut connection)
        .await?;
    connection.close().await?;
    Ok(Sizes {
        event_rows: event_rows as u64,
        event_bytes: event_bytes as u64,
        rollup_rows: rollup_rows as u64,
        rollup_bytes: rollup_bytes as u64,
    })
}

impl RatioReport {
    /// The human-readable report.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let phase = |name: &str, phase: &Phase| {
            format!(
                "{name:<10} {:>10.0} events/s  ({} rows in {:.2} s)\n           CPU: {}\n",
                phase.events_per_s,
                phase.rows_stored,
                phase.elapsed_s,
                phase.cpu.line()
            )
        };
        out.push_str(&format!("tally-load ratio: {} events on {}\n", self.events, self.postgres));
        out.push_str(&phase("raw COPY", &self.raw_copy));
        out.push_str(&phase("full path", &self.full_path));
        out.push_str(&format!("ratio      {:.3} (full path / raw COPY; goal >= 0.75)\n", self.ratio));
        out.push_str(&format!("ack latency {}\n", self.ack_latency.line()));
        out.push_str(&format!(
            "disk       {:.0} bytes/event full path, {:.0} bytes/event raw COPY (usage_events with indexes)\n",
            self.bytes_per_event_full_path, self.bytes_per_event_raw_copy
        ));
        out.push_str(&format!(
            "rollups    {} rows, {:.1} MiB\n",
            self.rollup_rows,
            self.rollup_table_bytes as f64 / 1_048_576.0
        ));
        match self.fold_caught_up_s {
            Some(seconds) => out
                .push_str(&format!("fold       every rollup row folded {seconds:.2} s after the last ack\n")),
            None => out.push_str("fold       rollup rows still pending 120 s after the last ack\n"),
        }
        if !self.statements.is_empty() {
            out.push_str("statements (full path, pg_stat_statements: execution time incl. waits)\n");
            for statement in &self.statements {
                let query: String = statement.query.chars().take(90).collect();
                out.push_str(&format!(
                    "  {:>9.1} ms {:>6.2} us/event {:>7} calls {:>9} rows  {query}\n",
                    statement.total_ms, statement.us_per_event, statement.calls, statement.rows
                ));
            }
        }
        if let Some(verification) = &self.verification {
            out.push_str(&crate::report::verification_text(verification));
        }
        out
    }
}
