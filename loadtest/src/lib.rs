//! `tally-load`: an open-loop load generator for Tally's edge that verifies what was acknowledged
//! against what the database (PostgreSQL, or the embedded SQLite file) stored, and the raw `COPY`
//! ceiling benchmark (`tally-load ratio`).
//!
//! A run ([`run_and_report`]) opens its connections, sends a seeded traffic mix
//! ([`generator`]) on a fixed schedule at `--rate` (latency counted from each batch's intended
//! send time, so a stalled server cannot hide behind a slow sender) or as fast as acks come back,
//! books every answer per tenant ([`ledger`]), and then checks the database ([`verify`]). With
//! `--spawn` it brings its own PostgreSQL (none with `--embedded`) and `tally-edge` ([`spawn`])
//! and reports the CPU each used ([`cpu`]).

pub mod cli;
pub mod cpu;
pub mod generator;
pub mod http;
pub mod json;
pub mod ledger;
pub mod load;
pub mod progress;
pub mod ratio;
pub mod report;
pub mod spawn;
pub mod stats;
pub mod verify;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};

use crate::cli::{Cli, Command, OutputArgs, RatioArgs, RunArgs, TargetArgs};
use crate::cpu::CpuProbe;
use crate::load::{LoadOptions, Target, run_load};
use crate::progress::Progress;
use crate::ratio::{RatioOptions, run_ratio};
use crate::report::RunReport;
use crate::spawn::{Environment, SpawnOptions};
use crate::verify::{Database, Scope};

/// Sending time when neither `--duration` nor `--events` is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// Default shares of resends and invalid events in a run (the ratio benchmark uses none).
const RUN_RESEND_FRACTION: f64 = 0.001;
const RUN_INVALID_FRACTION: f64 = 0.001;

/// The whole program: parses the command line, runs, cleans up (also on Ctrl-C), and says how
/// it went: 0 passed, 1 failed a check, 2 could not run, 130 interrupted.
pub async fn main_entry() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    // `DATABASE_URL` in the environment is not a reason to refuse `--embedded`; the flag is.
    let database_url_on_command_line = matches.value_source("database_url") == Some(ValueSource::CommandLine);
    let work = async move {
        match cli.command {
            Some(Command::Ratio(args)) => ratio_command(args).await,
            None => run_command(cli.run, database_url_on_command_line).await,
        }
    };
    tokio::select! {
        result = work => match result {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(error) => {
                eprintln!("tally-load: {error:#}");
                ExitCode::from(2)
            }
        },
        // Dropping `work` stops the edge child and removes the spawned PostgreSQL.
        _ = tokio::signal::ctrl_c() => {
            eprintln!("tally-load: interrupted; stopping and cleaning up");
            ExitCode::from(130)
        }
    }
}

/// Everything one load run needs.
#[derive(Debug, Clone)]
pub struct RunPlan {
    pub load: LoadOptions,
    pub target: Target,
    /// For verification and the report's description of the server.
    pub database: Option<Database>,
    pub scope: Scope,
    pub verify: bool,
    /// Also check rollups against raw events halfway through a timed run.
    pub midway_check: bool,
    /// The processes whose CPU time the report splits.
    pub cpu: Option<CpuProbe>,
    pub fail_under: Option<f64>,
}

/// A judged run, with the ledgers behind it.
#[derive(Debug)]
pub struct RunResult {
    pub report: RunReport,
    pub ledgers: Vec<ledger::TenantLedger>,
}

/// Runs the load, verifies, and judges the result.
pub async fn run_and_report(plan: &RunPlan, progress: &Progress) -> Result<RunResult> {
    let description = match &plan.database {
        Some(database) => database.describe().await.ok(),
        None => None,
    };
    let mark = plan.cpu.map(|probe| probe.mark());
    // Halfway through a timed run, rollups are checked against raw events while events are
    // still arriving and rows wait to be folded.
    let midway = match (&plan.database, plan.load.duration, plan.verify && plan.midway_check) {
        (Some(database), Some(duration), true) => {
            let (database, keys) = (database.clone(), plan.target.api_keys.clone());
            Some(tokio::spawn(async move {
                tokio::time::sleep(duration / 2).await;
                verify::check_rollups_now(&database, &keys, duration.as_secs_f64() / 2.0).await
            }))
        }
        _ => None,
    };
    let outcome = run_load(&plan.load, &plan.target, progress, None).await;
    progress.finish();
    let outcome = outcome?;
    let mut report = RunReport::new(&plan.load, plan.target.api_keys.len(), &outcome);
    report.cpu = plan.cpu.zip(mark).map(|(probe, mark)| probe.since(&mark));
    report.database = description;
    if let Some(midway) = midway {
        report.verification_midway = Some(midway.await.context("the midway check stopped")??);
    }
    if plan.verify {
        let database = plan.database.as_ref().context("verification needs --database-url")?;
        report.verification =
            Some(verify::verify(database, &plan.target.api_keys, &outcome.ledgers, plan.scope).await?);
    }
    report.judge(plan.fail_under);
    Ok(RunResult { report, ledgers: outcome.ledgers })
}

async fn run_command(args: RunArgs, database_url_on_command_line: bool) -> Result<bool> {
    let generator =
        args.events_shape.generator(RUN_RESEND_FRACTION, RUN_INVALID_FRACTION).map_err(anyhow::Error::msg)?;
    let duration = match (args.duration, args.events) {
        (None, None) => Some(DEFAULT_DURATION),
        (duration, _) => duration,
    };
    if args.rate.is_some_and(|rate| !(rate.is_finite() && rate > 0.0)) {
        bail!("--rate must be a positive number of events per second");
    }
    let load = LoadOptions {
        mode: args.mode,
        connections: args.connections.max(1),
        batch_size: args.batch_size.max(1),
        rate: args.rate,
        duration,
        events: args.events,
        max_in_flight: args.max_in_flight.max(1),
        generator,
    };
    let progress = Progress::new(args.output.quiet);
    check_embedded(&args.target, database_url_on_command_line)?;
    if args.target.spawn {
        let spawn = spawn_options(&args.target);
        check_connections(load.connections, spawn.tenants)?;
        let what = if spawn.embedded { "tally-edge (embedded SQLite)" } else { "PostgreSQL and tally-edge" };
        progress.note(&format!("starting {what} with {} tenants", spawn.tenants));
        let environment = Environment::start(&spawn).await?;
        progress.note(&format!(
            "tally-edge (pid {}) on {} (binary) and http://{} (metrics at /metrics)",
            environment.edge.pid(),
            environment.edge.wire_addr,
            environment.edge.http_addr
        ));
        let plan = RunPlan {
            target: Target {
                wire_addr: environment.edge.wire_addr.clone(),
                http_addr: environment.edge.http_addr.clone(),
                api_keys: environment.api_keys(),
            },
            load,
            database: Some(environment.storage.database()),
            scope: Scope::Exclusive,
            verify: !args.no_verify,
            midway_check: !args.no_midway_check,
            cpu: Some(CpuProbe {
                edge_pid: Some(environment.edge.pid()),
                postmaster_pid: environment.postmaster_pid()?,
            }),
            fail_under: args.fail_under,
        };
        let result = run_and_report(&plan, &progress).await;
        if result.as_ref().map_or(true, |result| !result.report.passed) {
            eprintln!("tally-edge log (last lines):\n{}", environment.edge.log_tail());
        }
        return finish_run(result?.report, &args.output);
    }
    if !args.target.allow_remote {
        ensure_loopback(&args.target).await?;
    }
    if args.target.api_key.is_empty() {
        bail!("give --api-key (one per tenant) for a running edge, or use --spawn");
    }
    check_connections(load.connections, args.target.api_key.len())?;
    let verify = args.verify && !args.no_verify;
    if verify && args.target.database_url.is_none() {
        bail!("--verify needs --database-url (or DATABASE_URL)");
    }
    let plan = RunPlan {
        load,
        target: Target {
            wire_addr: args.target.wire_addr.clone(),
            http_addr: args.target.http_addr.clone(),
            api_keys: args.target.api_key.clone(),
        },
        database: args.target.database_url.clone().map(Database::Postgres),
        scope: Scope::Shared,
        verify,
        midway_check: !args.no_midway_check,
        cpu: None,
        fail_under: args.fail_under,
    };
    let result = run_and_report(&plan, &progress).await?;
    finish_run(result.report, &args.output)
}

fn finish_run(report: RunReport, output: &OutputArgs) -> Result<bool> {
    print!("{}", report.text());
    write_json(output, &report)?;
    Ok(report.passed)
}

async fn ratio_command(args: RatioArgs) -> Result<bool> {
    if !args.spawn {
        bail!("ratio needs --spawn: it creates two fresh databases on a PostgreSQL server of its own");
    }
    check_connections(args.connections.max(1), args.tenants.max(1))?;
    let generator = args.events_shape.generator(0.0, 0.0).map_err(anyhow::Error::msg)?;
    let options = RatioOptions {
        events: args.events.max(1),
        connections: args.connections.max(1),
        batch_size: args.batch_size.max(1),
        max_in_flight: args.max_in_flight.max(1),
        generator,
        spawn: SpawnOptions {
            tenants: args.tenants.max(1),
            edge_bin: args.edge_bin.clone(),
            edge_args: args.edge_arg.clone(),
            pg_durable: !args.pg_fast,
            pg_socket: args.pg_socket,
            embedded: false,
        },
        verify: !args.no_verify,
        statements: args.statements,
    };
    let progress = Progress::new(args.output.quiet);
    let report = run_ratio(&options, &progress).await?;
    print!("{}", report.text());
    write_json(&args.output, &report)?;
    let mut passed = report.verification.as_ref().is_none_or(|verification| verification.passed);
    if let Some(floor) = args.fail_under_ratio
        && report.ratio < floor
    {
        println!("FAIL          ratio {:.3} is below {floor}", report.ratio);
        passed = false;
    }
    Ok(passed)
}

fn spawn_options(target: &TargetArgs) -> SpawnOptions {
    SpawnOptions {
        tenants: target.tenants.max(1),
        edge_bin: target.edge_bin.clone(),
        edge_args: target.edge_arg.clone(),
        pg_durable: target.pg_durable,
        pg_socket: target.pg_socket,
        embedded: target.embedded,
    }
}

/// `--embedded` only with `--spawn`, and without the flags that configure PostgreSQL.
fn check_embedded(target: &TargetArgs, database_url_on_command_line: bool) -> Result<()> {
    if !target.embedded {
        return Ok(());
    }
    if !target.spawn {
        bail!("--embedded needs --spawn: it starts tally-edge on a temporary SQLite data directory");
    }
    let postgres_flags = [
        (target.pg_durable, "--pg-durable"),
        (target.pg_socket, "--pg-socket"),
        (database_url_on_command_line, "--database-url"),
    ];
    if let Some((_, flag)) = postgres_flags.iter().find(|(given, _)| *given) {
        bail!("{flag} configures PostgreSQL and cannot be used with --embedded (which stores into SQLite)");
    }
    Ok(())
}

fn check_connections(connections: usize, tenants: usize) -> Result<()> {
    if connections < tenants {
        bail!(
            "{connections} connections cannot serve {tenants} tenants: give --connections {tenants} or more"
        );
    }
    Ok(())
}

fn write_json(output: &OutputArgs, report: &impl serde::Serialize) -> Result<()> {
    let Some(path) = &output.json else { return Ok(()) };
    let json = serde_json::to_vec_pretty(report)?;
    std::fs::write(path, json).with_context(|| format!("failed to write {}", path.display()))
}

/// Refuses addresses that resolve outside loopback, so a typo cannot load a production edge.
async fn ensure_loopback(target: &TargetArgs) -> Result<()> {
    let mut addresses = vec![target.wire_addr.clone(), target.http_addr.clone()];
    if let Some(url) = &target.database_url {
        let options: sqlx::postgres::PgConnectOptions = url.parse().context("invalid --database-url")?;
        if !options.get_host().starts_with('/') {
            addresses.push(format!("{}:{}", options.get_host(), options.get_port()));
        }
    }
    for address in addresses {
        let resolved =
            tokio::net::lookup_host(&address).await.with_context(|| format!("cannot resolve {address}"))?;
        for socket in resolved {
            if !socket.ip().is_loopback() {
                bail!(
                    "{address} resolves to {}, not a loopback address; pass --allow-remote to load a remote edge",
                    socket.ip()
                );
            }
        }
    }
    Ok(())
}
