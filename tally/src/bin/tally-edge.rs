//! `tally-edge`: runs the ingest server, migrates the database, and manages tenants and keys.
//!
//! Storage is PostgreSQL when `DATABASE_URL` is set, and otherwise an embedded SQLite file,
//! `tally.db` in the data directory (`--data-dir`, `TALLY_DATA_DIR`, default `./tally-data`).
//!
//! Besides ingest, the HTTP port serves the query service's usage listing (`GET /api/v1/usage`)
//! and `/docs`, as the older gateway did; that is why this binary lives in the `tally` crate,
//! the one crate that depends on both `edge` and `query`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge::EdgeConfig;
use sink::pg::{PgOptions, PgStore};
use sink::sqlite::{DATABASE_FILE_NAME, SqliteStore};
use sink::{NewApiKey, Scope, Store};

#[derive(Debug, Parser)]
#[command(name = "tally-edge", version, about = "Tally's ingest server")]
struct Cli {
    /// PostgreSQL URL, e.g. postgres://tally@127.0.0.1:5432/tally. Without it, data goes into an
    /// embedded SQLite database in --data-dir.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,

    /// Directory of the embedded SQLite database (`tally.db`), used when DATABASE_URL is unset.
    #[arg(long, env = "TALLY_DATA_DIR", global = true, default_value = "./tally-data")]
    data_dir: PathBuf,

    /// Log lines on standard error: `text` (coloured only on a terminal) or `json`.
    #[arg(long, env = "TALLY_LOG_FORMAT", global = true, value_enum, default_value = "text")]
    log_format: telemetry::LogFormat,

    #[command(flatten)]
    serve: ServeArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Applies database migrations and creates partitions, then exits.
    Migrate,
    /// Citus only: migrates, then distributes the tables by tenant over the cluster's workers
    /// (tenants and API keys become reference tables). Tables distributed already are left
    /// alone, so it can run again after an upgrade.
    Distribute,
    /// Tenant administration.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// API key administration.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Creates a tenant.
    Create { name: String },
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Creates an API key and prints it alone on the last line; it is shown only this once.
    Create {
        /// Tenant name or id.
        #[arg(long)]
        tenant: String,
        /// Comma-separated scopes among ingest, query, admin.
        #[arg(long, default_value = "ingest,query", value_delimiter = ',')]
        scopes: Vec<String>,
        /// A note to recognise the key by.
        #[arg(long)]
        label: Option<String>,
        /// When the key expires: an RFC 3339 date-time, or a number of days such as `90d`.
        #[arg(long)]
        expires: Option<String>,
    },
}

/// Server settings. Each has a flag and a `TALLY_` environment variable.
#[derive(Debug, clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    tls: serve::TlsArgs,
    /// Binary protocol listen address.
    #[arg(long, env = "TALLY_WIRE_ADDR", default_value = "0.0.0.0:7000")]
    wire_addr: SocketAddr,
    /// HTTP listen address.
    #[arg(long, env = "TALLY_HTTP_ADDR", default_value = "0.0.0.0:8000")]
    http_addr: SocketAddr,
    /// Events per HTTP batch request (at most 10,000).
    #[arg(long, env = "MAX_BATCH_SIZE", default_value_t = 1000)]
    http_batch_events_max: usize,
    /// Sink workers (and queue shards); each commits its own transactions. Default: 4 on
    /// PostgreSQL (commits overlap their fsyncs), 2 on the embedded SQLite (one writer).
    #[arg(long, env = "TALLY_SINK_WORKERS")]
    sink_workers: Option<usize>,
    /// Events all queues together may hold before producers wait or are refused.
    #[arg(long, env = "TALLY_QUEUE_EVENTS_MAX", default_value_t = 200_000)]
    queue_events_max: usize,
    /// Events per commit at most.
    #[arg(long, env = "TALLY_BATCH_EVENTS_MAX", default_value_t = 10_000)]
    batch_events_max: usize,
    /// Milliseconds between rollup folds while less than a full fold is waiting. Longer folds
    /// sum more commits into each rollup row (fewer upserts per event); readers stay exact either
    /// way, since they add the rows not folded yet.
    #[arg(long, env = "TALLY_FOLD_INTERVAL_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    fold_interval_ms: u64,
    /// Pending rollup entries folded in one transaction at most.
    #[arg(long, env = "TALLY_FOLD_ENTRIES_MAX", default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    fold_entries_max: u64,
    /// Binary protocol connections at once.
    #[arg(long, env = "TALLY_WIRE_CONNECTIONS_MAX", default_value_t = 1024)]
    wire_connections_max: usize,
    /// Unanswered binary batches per connection.
    #[arg(long, env = "TALLY_WIRE_CREDITS", default_value_t = 8)]
    wire_credits: u32,
    /// PostgreSQL connections in the pool.
    #[arg(long, env = "TALLY_PG_POOL_SIZE", default_value_t = 8)]
    pg_pool_size: u32,
    /// Days raw events are kept.
    #[arg(long, env = "EVENT_RETENTION_DAYS", default_value_t = 365)]
    event_retention_days: u32,
    /// Days hourly rollups are kept (default: forever).
    #[arg(long, env = "AGGREGATE_RETENTION_DAYS")]
    aggregate_retention_days: Option<u32>,
    /// TimescaleDB only: days after which raw-event chunks are compressed (0: never). Ignored on
    /// plain PostgreSQL (native partitions) and SQLite.
    #[arg(long, env = "EVENT_COMPRESS_AFTER_DAYS", default_value_t = 7)]
    event_compress_after_days: u32,
    /// Operator key (at least 32 characters): manages all tenants through /api/v1/admin/tenants.
    #[arg(long, env = "TALLY_OPERATOR_KEY", hide_env_values = true)]
    operator_key: Option<String>,
    /// Redis URL of the overflow that takes batches while PostgreSQL is slow or down.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Redis Cluster seed nodes of the overflow, comma-separated (instead of --redis-url).
    #[arg(long, env = "TALLY_REDIS_CLUSTER", value_delimiter = ',', hide_env_values = true)]
    redis_cluster: Vec<String>,
    /// Acknowledge durable events once the overflow holds them; only with Redis AOF on (checked).
    #[arg(long, env = "TALLY_OVERFLOW_DURABLE")]
    overflow_durable: bool,
    /// Bytes the overflow may hold over all its streams.
    #[arg(long, env = "TALLY_OVERFLOW_BYTES_MAX", default_value_t = 1 << 30)]
    overflow_bytes_max: u64,
    /// Seconds a graceful shutdown may take.
    #[arg(long, env = "TALLY_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    shutdown_timeout_secs: u64,
    /// Benchmarks only: skip the service-registry check and pricing of every event, storing
    /// events unpriced. It exists only to measure what validation and pricing cost on the ingest
    /// path (`tally-load ratio --edge-arg=--bench-skip-pricing-and-validation`); never in
    /// production. Hidden, and deliberately without an environment variable.
    #[arg(long, hide = true)]
    bench_skip_pricing_and_validation: bool,
}

impl ServeArgs {
    fn overflow(&self) -> Option<sink::overflow::OverflowConfig> {
        let (urls, cluster) = match (&self.redis_url, self.redis_cluster.is_empty()) {
            (_, false) => (self.redis_cluster.clone(), true),
            (Some(url), true) if !url.is_empty() => (vec![url.clone()], false),
            _ => return None,
        };
        Some(sink::overflow::OverflowConfig {
            urls,
            cluster,
            durable: self.overflow_durable,
            bytes_max: self.overflow_bytes_max,
            ..sink::overflow::OverflowConfig::default()
        })
    }

    fn config(&self) -> EdgeConfig {
        let defaults = EdgeConfig::default();
        EdgeConfig {
            wire_addr: self.wire_addr,
            http_addr: self.http_addr,
            http_batch_events_max: self.http_batch_events_max,
            wire_connections_max: self.wire_connections_max,
            wire_credits: self.wire_credits,
            queue: sink::QueueLimits {
                shards: self.sink_workers.unwrap_or(2),
                events_max: self.queue_events_max,
                ..defaults.queue
            },
            batch: sink::BatchLimits { events_max: self.batch_events_max, ..defaults.batch },
            retention: sink::Retention {
                event_retention_days: self.event_retention_days,
                aggregate_retention_days: self.aggregate_retention_days,
                event_compress_after_days: Some(self.event_compress_after_days).filter(|days| *days > 0),
                ..defaults.retention
            },
            fold: sink::FoldLimits {
                interval: Duration::from_millis(self.fold_interval_ms),
                entries_max: self.fold_entries_max as usize,
            },
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
            operator_key: self.operator_key.clone(),
            overflow: self.overflow(),
            ..defaults
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format, "info,sqlx=warn");
    let storage = Storage::open(&cli).await?;
    let result = run(&cli, &storage).await;
    storage.close().await;
    result
}

async fn run(cli: &Cli, storage: &Storage) -> anyhow::Result<()> {
    match &cli.command {
        None => {
            if cli.serve.bench_skip_pricing_and_validation {
                tracing::warn!(
                    "BENCHMARK MODE (--bench-skip-pricing-and-validation): events are NOT checked \
                     against the service registry and NOT priced; they are stored with cost NULL. \
                     Never run this in production"
                );
                edge::ingest::bench_skip_pricing_and_validation();
            }
            let mut config = EdgeConfig { tls: cli.serve.tls.load()?, ..cli.serve.config() };
            if cli.serve.sink_workers.is_none() && storage.database_url.is_some() {
                config.queue.shards = 4;
            }
            serve(storage, config).await
        }
        Some(Command::Migrate) => {
            storage.migrate().await?;
            storage.store.maintain(&cli.serve.config().retention_with_window()).await?;
            println!("database migrated");
            Ok(())
        }
        Some(Command::Distribute) => {
            storage.migrate().await?;
            let Store::Postgres(store) = &*storage.store else {
                anyhow::bail!("distribute needs PostgreSQL with the citus extension (set DATABASE_URL)");
            };
            let done = store
                .distribute()
                .await
                .with_context(|| format!("failed to distribute {}", storage.location))?;
            storage.store.maintain(&cli.serve.config().retention_with_window()).await?;
            if done.reference.is_empty() && done.distributed.is_empty() {
                println!("every table was distributed already");
            }
            for table in &done.reference {
                println!("{table}: reference table");
            }
            for table in &done.distributed {
                println!("{table}: distributed by tenant_id");
            }
            Ok(())
        }
        Some(Command::Tenant { command: TenantCommand::Create { name } }) => {
            storage.migrate().await?;
            let tenant = storage.store.create_tenant(name).await?;
            println!("tenant {} created with id {}", tenant.name, tenant.id);
            Ok(())
        }
        Some(Command::Key { command: KeyCommand::Create { tenant, scopes, label, expires } }) => {
            storage.migrate().await?;
            create_key(storage.store.as_ref(), tenant, scopes, label.clone(), expires.as_deref()).await
        }
    }
}

/// The storage backend chosen at start-up, and the store the edge uses.
struct Storage {
    /// Where the data is, for messages (never the password).
    location: String,
    store: Arc<Store>,
    database_url: Option<String>,
}

impl Storage {
    /// PostgreSQL with `DATABASE_URL` (connected lazily), else the SQLite file in the data
    /// directory (created and migrated now).
    async fn open(cli: &Cli) -> anyhow::Result<Storage> {
        if let Some(url) = cli.database_url.as_deref() {
            let options = PgOptions { max_connections: cli.serve.pg_pool_size, ..PgOptions::default() };
            let store = Arc::new(Store::from(PgStore::connect_lazy(url, &options)?));
            let location = format!("PostgreSQL {}", telemetry::database_location(url));
            tracing::info!(%location, "storage: postgresql");
            return Ok(Storage { store, database_url: Some(url.to_owned()), location });
        }
        let path = cli.data_dir.join(DATABASE_FILE_NAME);
        let store = SqliteStore::open(&path)
            .await
            .with_context(|| format!("failed to open the embedded database {}", path.display()))?;
        tracing::info!(path = %path.display(), "storage: embedded sqlite (DATABASE_URL is not set)");
        let store = Arc::new(Store::from(store));
        let location = format!("SQLite {}", path.display());
        Ok(Storage { store, database_url: None, location })
    }

    /// Applies the migrations the database lacks.
    async fn migrate(&self) -> anyhow::Result<()> {
        match &*self.store {
            Store::Postgres(store) => store.migrate().await.with_context(|| {
                format!(
                    "failed to migrate the database at {}; check that PostgreSQL is running there and \
                     that DATABASE_URL names the right host, user and password",
                    self.location
                )
            }),
            // Migrated when opened.
            Store::Sqlite(_) => Ok(()),
        }
    }

    /// A query service over the same database, for the listing on the ingest port (a small
    /// pool: the query service proper runs as `tally-query`).
    async fn listing_state(&self, http_addr: SocketAddr) -> anyhow::Result<Arc<query::QueryState>> {
        let (url, backend): (String, Arc<dyn query::backend::Backend>) = match &*self.store {
            Store::Postgres(_) => {
                let url = self.database_url.clone().unwrap_or_default();
                let options = query::pg::PgOptions { max_connections: 4, ..query::pg::PgOptions::default() };
                let backend = query::pg::PgBackend::connect_lazy(&url, &options)?;
                (url, Arc::new(backend))
            }
            Store::Sqlite(store) => {
                let backend = query::sqlite::SqliteBackend::open(store.path())
                    .await
                    .with_context(|| format!("failed to open {} for the listing", store.path().display()))?;
                (String::new(), Arc::new(backend))
            }
        };
        let config = query::QueryConfig { addr: http_addr, ..query::QueryConfig::new(url) };
        Ok(query::QueryState::with_backend(config, backend, None))
    }

    /// Closes the connections; SQLite then checkpoints its WAL into the database file.
    async fn close(&self) {
        match &*self.store {
            Store::Postgres(store) => store.pool().close().await,
            Store::Sqlite(store) => store.close().await,
        }
    }
}

async fn create_key(
    store: &Store,
    tenant: &str,
    scopes: &[String],
    label: Option<String>,
    expires: Option<&str>,
) -> anyhow::Result<()> {
    let tenant = store.find_tenant(tenant).await?.with_context(|| format!("no tenant named {tenant:?}"))?;
    let scopes = scopes
        .iter()
        .map(|scope| {
            Scope::parse(scope.trim())
                .with_context(|| format!("unknown scope {scope:?}: use ingest, query, admin"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let key = edge::auth::generate_api_key();
    let expires_at_us = expires.map(parse_expiry).transpose()?;
    let new_key = NewApiKey {
        tenant_id: tenant.id,
        key_hash: sink::hash_api_key(&key),
        prefix: key[..12].to_owned(),
        scopes,
        label,
        expires_at_us,
    };
    let stored = store.create_api_key(&new_key).await?;
    let scopes: Vec<&str> = stored.scopes.iter().map(|scope| scope.as_str()).collect();
    println!(
        "API key {} for tenant {} with scopes {} (shown once):",
        stored.id,
        tenant.name,
        scopes.join(",")
    );
    println!("{key}");
    Ok(())
}

/// `90d` (days from now) or an RFC 3339 date-time, in microseconds since the Unix epoch.
fn parse_expiry(text: &str) -> anyhow::Result<i64> {
    if let Some(days) = text.strip_suffix('d') {
        let days: i64 = days.parse().with_context(|| format!("--expires {text:?}: expected e.g. 90d"))?;
        anyhow::ensure!(days > 0, "--expires must be in the future");
        return Ok(edge::auth::now_us() + days * 86_400_000_000);
    }
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).with_context(
        || format!("--expires {text:?}: expected an RFC 3339 date-time or a number of days like 90d"),
    )?;
    let at_us = (at.unix_timestamp_nanos() / 1000) as i64;
    anyhow::ensure!(at_us > edge::auth::now_us(), "--expires must be in the future");
    Ok(at_us)
}

async fn serve(storage: &Storage, config: EdgeConfig) -> anyhow::Result<()> {
    config.validate()?;
    storage.migrate().await?;
    let store = storage.store.clone();
    store.maintain(&config.retention_with_window()).await.with_context(|| {
        format!("failed to run storage maintenance (partitions, retention) on {}", storage.location)
    })?;
    let config = EdgeConfig { metrics: Some(telemetry::install_metrics()?), ..config };
    let listing = storage.listing_state(config.http_addr).await?;
    let edge = edge::start_with_routes(config, store, query::usage_routes(listing)).await?;
    println!("tally-edge: binary protocol on {}, HTTP on http://{}", edge.wire_addr, edge.http_addr);
    wait_for_signal().await;
    tracing::info!("shutting down");
    let clean = edge.shutdown().await;
    if !clean {
        anyhow::bail!("shutdown deadline passed with work unfinished");
    }
    Ok(())
}

async fn wait_for_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        Some(()) = async { match terminate.as_mut() { Some(signal) => signal.recv().await, None => None } } => {}
    }
}
