//! `tally-query`: serves the query API (listings, aggregates, analytics) on port 8002.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use query::QueryConfig;
use query::pg::PgOptions;

/// Settings; each has a flag and an environment variable.
#[derive(Debug, Parser)]
#[command(name = "tally-query", version, about = "Tally's query service")]
struct Cli {
    /// HTTP listen address.
    #[arg(long, env = "TALLY_QUERY_ADDR", default_value = "0.0.0.0:8002")]
    addr: SocketAddr,
    #[command(flatten)]
    tls: serve::TlsArgs,
    /// PostgreSQL URL, e.g. postgres://tally@127.0.0.1:5432/tally.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Redis URL for a response cache shared by all query servers (optional).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Longest time range a request may cover, in days.
    #[arg(long, env = "TALLY_QUERY_MAX_RANGE_DAYS", default_value_t = 400)]
    max_range_days: u32,
    /// Seconds an answer is served from the cache (the staleness bound); 0 turns it off.
    #[arg(long, env = "TALLY_QUERY_CACHE_TTL_SECS", default_value_t = 15)]
    cache_ttl_secs: u64,
    /// Mebibytes of answers cached in process.
    #[arg(long, env = "TALLY_QUERY_CACHE_MEMORY_MIB", default_value_t = 64)]
    cache_memory_mib: u64,
    /// Seconds a looked-up API key is trusted before it is checked again.
    #[arg(long, env = "TALLY_QUERY_KEY_CACHE_TTL_SECS", default_value_t = 30)]
    key_cache_ttl_secs: u64,
    /// PostgreSQL connections in the pool.
    #[arg(long, env = "TALLY_QUERY_PG_POOL_SIZE", default_value_t = 8)]
    pg_pool_size: u32,
    /// Milliseconds one SQL statement may run.
    #[arg(long, env = "TALLY_QUERY_STATEMENT_TIMEOUT_MS", default_value_t = 10_000)]
    statement_timeout_ms: u64,
    /// Log lines on standard error: `text` (coloured only on a terminal) or `json`.
    #[arg(long, env = "TALLY_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: telemetry::LogFormat,
    /// Always mark the dashboard's session cookie `Secure` (implied by --tls-cert); else only
    /// requests that say they came over HTTPS (`X-Forwarded-Proto: https`) get it marked.
    #[arg(long, env = "TALLY_SECURE_COOKIES")]
    secure_cookies: bool,
}

impl Cli {
    fn config(&self) -> anyhow::Result<QueryConfig> {
        let url = self.database_url.clone().context(
            "DATABASE_URL is not set: point it at PostgreSQL, e.g. DATABASE_URL=postgres://tally@127.0.0.1:5432/tally",
        )?;
        let defaults = QueryConfig::new(url);
        Ok(QueryConfig {
            addr: self.addr,
            redis_url: self.redis_url.clone().filter(|url| !url.is_empty()),
            pg: PgOptions {
                max_connections: self.pg_pool_size,
                statement_timeout: Duration::from_millis(self.statement_timeout_ms),
                ..PgOptions::default()
            },
            max_range_days: self.max_range_days,
            cache_ttl: Duration::from_secs(self.cache_ttl_secs),
            cache_memory_bytes_max: self.cache_memory_mib * 1024 * 1024,
            key_cache_ttl: Duration::from_secs(self.key_cache_ttl_secs),
            secure_cookies: self.secure_cookies || self.tls.tls_cert.is_some(),
            ..defaults
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format, "info,sqlx=warn");
    let tls = cli.tls.load()?;
    let config = cli.config()?;
    config.validate()?;
    let addr = config.addr;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| telemetry::listen_error(addr, "query HTTP", "--addr", error))?;
    let config = QueryConfig { metrics: Some(telemetry::install_metrics()?), ..config };
    let redis = config.redis_url.clone();
    let state = query::QueryState::connect(config).await.with_context(|| match redis {
        Some(url) => format!(
            "failed to start the query service (Redis cache at {}); check that Redis is running there or unset REDIS_URL",
            telemetry::database_location(&url)
        ),
        None => "failed to start the query service".to_owned(),
    })?;
    println!("tally-query: HTTP on http://{}", listener.local_addr()?);
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(serve::serve(
        listener,
        query::router(state),
        serve::HttpLimits::default(),
        tls,
        "query",
        stop.clone(),
    ));
    wait_for_signal().await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), server).await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        Some(()) = async { match terminate.as_mut() { Some(signal) => signal.recv().await, None => None } } => {}
    }
    tracing::info!("shutting down");
}
