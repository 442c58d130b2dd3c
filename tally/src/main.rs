//! `tally`: the main job in one process. Ingest (binary protocol and HTTP) and the query service,
//! on an embedded SQLite file unless `DATABASE_URL` points at PostgreSQL. On first run it creates a
//! demo tenant and key and prints how to use them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use sink::{NewApiKey, Scope, Store};

#[derive(Debug, Parser)]
#[command(name = "tally", version, about = "Tally: usage metering, ingest and query in one process")]
struct Cli {
    /// Where the embedded database and the demo key live.
    #[arg(long, env = "TALLY_DATA_DIR", default_value = "./tally-data")]
    data_dir: PathBuf,
    /// PostgreSQL URL; without it Tally runs on the embedded database in --data-dir.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Binary protocol listen address.
    #[arg(long, env = "TALLY_WIRE_ADDR", default_value = "127.0.0.1:7000")]
    wire_addr: SocketAddr,
    /// Ingest HTTP listen address.
    #[arg(long, env = "TALLY_HTTP_ADDR", default_value = "127.0.0.1:8000")]
    http_addr: SocketAddr,
    /// Query HTTP listen address.
    #[arg(long, env = "TALLY_QUERY_ADDR", default_value = "127.0.0.1:8002")]
    query_addr: SocketAddr,
    #[command(flatten)]
    tls: serve::TlsArgs,
    /// Log lines on standard error: `text` (coloured only on a terminal) or `json`.
    #[arg(long, env = "TALLY_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: telemetry::LogFormat,
    /// Always mark the dashboard's session cookie `Secure` (implied by --tls-cert); else only
    /// requests that say they came over HTTPS (`X-Forwarded-Proto: https`) get it marked.
    #[arg(long, env = "TALLY_SECURE_COOKIES")]
    secure_cookies: bool,
}

/// The demo tenant created on first run.
const DEMO_TENANT: &str = "demo";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format, "warn,edge=info,query=info");
    // One recorder for the process: the edge's and the query service's `/metrics` both render
    // every series (ingest, storage, queries, process).
    let metrics = telemetry::install_metrics()?;
    let (store, backend, described) = open(&cli).await?;
    let key = demo_key(store.as_ref(), &cli.data_dir).await?;

    let query_config = query::QueryConfig {
        addr: cli.query_addr,
        metrics: Some(metrics.clone()),
        secure_cookies: cli.secure_cookies || cli.tls.tls_cert.is_some(),
        ..query::QueryConfig::new(cli.database_url.clone().unwrap_or_default())
    };
    let query_state = query::QueryState::with_backend(query_config, backend, None);
    let tls = cli.tls.load()?;
    let edge_config = edge::EdgeConfig {
        tls: tls.clone(),
        wire_addr: cli.wire_addr,
        http_addr: cli.http_addr,
        metrics: Some(metrics),
        ..edge::EdgeConfig::default()
    };
    let edge = edge::start_with_routes(edge_config, store, query::usage_routes(query_state.clone())).await?;
    let query_listener = tokio::net::TcpListener::bind(cli.query_addr)
        .await
        .map_err(|error| telemetry::listen_error(cli.query_addr, "query HTTP", "--query-addr", error))?;
    let query_addr = query_listener.local_addr()?;
    let stop = edge.shutdown_token();
    let query_server = tokio::spawn(serve::serve(
        query_listener,
        query::router(query_state),
        serve::HttpLimits::default(),
        tls,
        "query",
        stop,
    ));
    print_banner(&described, edge.http_addr, edge.wire_addr, query_addr, &key);

    wait_for_signal().await;
    eprintln!("shutting down");
    let clean = edge.shutdown().await;
    let _ = query_server.await;
    anyhow::ensure!(clean, "shutdown deadline passed with work unfinished");
    Ok(())
}

type Opened = (Arc<Store>, Arc<dyn query::backend::Backend>, String);

async fn open(cli: &Cli) -> anyhow::Result<Opened> {
    if let Some(url) = &cli.database_url {
        let location = telemetry::database_location(url);
        let store = sink::pg::PgStore::connect_lazy(url, &sink::pg::PgOptions::default())?;
        store.migrate().await.with_context(|| {
            format!(
                "failed to migrate PostgreSQL at {location}; check that it is running there and that \
                 DATABASE_URL names the right host, user and password"
            )
        })?;
        let store = Store::from(store);
        store
            .maintain(&sink::Retention::default())
            .await
            .with_context(|| format!("failed to create partitions in PostgreSQL at {location}"))?;
        let backend = query::pg::PgBackend::connect_lazy(url, &query::pg::PgOptions::default())?;
        return Ok((Arc::new(store), Arc::new(backend), "PostgreSQL (DATABASE_URL)".into()));
    }
    let path = cli.data_dir.join("tally.db");
    let store = sink::sqlite::SqliteStore::open(&path)
        .await
        .with_context(|| format!("failed to open the embedded database {}", path.display()))?;
    let backend = query::sqlite::SqliteBackend::open(&path)
        .await
        .with_context(|| format!("failed to open {} for queries", path.display()))?;
    Ok((Arc::new(Store::from(store)), Arc::new(backend), format!("embedded SQLite at {}", path.display())))
}

/// The demo tenant's key: created with the tenant on first run and kept in the data directory
/// (readable by this user only), since storage holds only its hash.
async fn demo_key(store: &Store, data_dir: &Path) -> anyhow::Result<String> {
    let file = data_dir.join("demo-api-key");
    let tenant = match store.find_tenant(DEMO_TENANT).await? {
        Some(tenant) => tenant,
        None => store.create_tenant(DEMO_TENANT).await?,
    };
    if let Ok(key) = std::fs::read_to_string(&file) {
        let key = key.trim().to_owned();
        if store
            .find_api_key(&sink::hash_api_key(&key))
            .await?
            .is_some_and(|found| found.tenant_id == tenant.id)
        {
            return Ok(key);
        }
    }
    let key = edge::auth::generate_api_key();
    let new_key = NewApiKey {
        tenant_id: tenant.id,
        key_hash: sink::hash_api_key(&key),
        prefix: key[..12].to_owned(),
        scopes: vec![Scope::Ingest, Scope::Query, Scope::Admin],
        label: Some("demo".into()),
        expires_at_us: None,
    };
    store.create_api_key(&new_key).await?;
    std::fs::create_dir_all(data_dir)?;
    write_private(&file, &key)?;
    Ok(key)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file =
        std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(path)?;
    writeln!(file, "{text}")?;
    Ok(())
}

fn print_banner(storage: &str, http: SocketAddr, wire: SocketAddr, query: SocketAddr, key: &str) {
    println!(
        "\nTally is running on {storage}.\n\n  ingest HTTP   http://{http}\n  ingest binary {wire}\n  query         http://{query}   (API docs: http://{query}/docs)\n\nDemo tenant \"{DEMO_TENANT}\", API key:\n  {key}\n\nStore an event:\n  curl -s http://{http}/api/v1/events -H 'X-API-Key: {key}' -H 'Content-Type: application/json' \\\n    -d '{{\"user_id\":\"user-1\",\"service_type\":\"llm_service\",\"service_provider\":\"openai\",\"model\":\"gpt-4o\",\"input_tokens\":150,\"output_tokens\":75}}'\n\nList it:\n  curl -s 'http://{query}/api/v1/usage' -H 'X-API-Key: {key}'\n\nThis month's bill:\n  curl -s 'http://{query}/api/v1/billing/summary' -H 'X-API-Key: {key}'\n\nCtrl-C stops Tally; data stays for the next start.\n"
    );
}

async fn wait_for_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        Some(()) = async { match terminate.as_mut() { Some(signal) => signal.recv().await, None => None } } => {}
    }
}
