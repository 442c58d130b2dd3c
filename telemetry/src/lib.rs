//! How a Tally process reports: the log format (`--log-format text|json`) and the one
//! process-wide Prometheus recorder, with the process's CPU, memory and file-descriptor series.
//!
//! **Only binaries call [`install_metrics`] and [`init_logging`].** Libraries (`edge`, `sink`,
//! `query`) emit series through the `metrics` macros and render through the
//! [`PrometheusHandle`] they are given; they never install a recorder, so a process that runs
//! several of them (the `tally` binary) renders every series on every `/metrics` it serves.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// How often the process series (CPU, memory, file descriptors) are refreshed, and the
/// recorder's upkeep (histogram draining) runs.
pub const PROCESS_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// Histogram buckets of every `_seconds` series: 1 ms to 10 s.
pub const SECONDS_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Histogram buckets of every `_events` series (batch sizes): 1 to 50,000 events.
pub const EVENTS_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0];

/// Installs the process-wide Prometheus recorder and starts refreshing the process series
/// (`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`, ...)
/// every [`PROCESS_REFRESH_INTERVAL`] on a thread of its own. Call once, from `main`.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|builder| builder.set_buckets_for_metric(Matcher::Suffix("_events".into()), EVENTS_BUCKETS))
        .context("failed to configure the histogram buckets")?
        .install_recorder()
        .context("failed to install the Prometheus recorder (one is installed already)")?;
    let collector = metrics_process::Collector::default();
    collector.describe();
    collector.collect();
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("tally-metrics".into())
        .spawn(move || {
            loop {
                std::thread::sleep(PROCESS_REFRESH_INTERVAL);
                collector.collect();
                upkeep.run_upkeep();
            }
        })
        .context("failed to start the metrics thread")?;
    Ok(handle)
}

/// The shape of log lines on standard error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; coloured only when standard error is a terminal.
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// Logs to standard error in `format`, filtered by `RUST_LOG` or else `default_filter`.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}

/// Where a database URL points, for messages: `host:port/database`, without user or password.
pub fn database_location(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.split_once('?').map_or(rest, |(before, _)| before);
    let (authority, database) = rest.split_once('/').unwrap_or((rest, ""));
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let host = if host.is_empty() { "localhost (default socket)" } else { host };
    if database.is_empty() { host.to_owned() } else { format!("{host}/{database}") }
}

/// A listener that could not be opened, said so that an operator knows which one and what to
/// do: `failed to listen on 0.0.0.0:8000 (ingest HTTP): Address already in use (os error 98);
/// stop the other process or choose another port with --http-addr`.
pub fn listen_error(
    addr: std::net::SocketAddr,
    what: &str,
    flag: &str,
    error: std::io::Error,
) -> anyhow::Error {
    let hint = match error.kind() {
        std::io::ErrorKind::AddrInUse => format!("stop the other process or choose another port with {flag}"),
        std::io::ErrorKind::PermissionDenied => {
            format!("ports below 1024 need privileges; choose another port with {flag}")
        }
        std::io::ErrorKind::AddrNotAvailable => {
            format!("the address is not one of this machine's; choose another with {flag}")
        }
        _ => format!("choose another address with {flag}"),
    };
    anyhow::anyhow!("failed to listen on {addr} ({what}): {error}; {hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_location_names_host_and_database_but_no_password() {
        assert_eq!(
            database_location("postgres://tally:secret@db.internal:5433/tally?sslmode=require"),
            "db.internal:5433/tally"
        );
        assert_eq!(database_location("postgres://db:5432"), "db:5432");
        assert_eq!(database_location("postgres:///tally"), "localhost (default socket)/tally");
    }
}
