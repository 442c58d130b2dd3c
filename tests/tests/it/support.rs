//! What the integration tests share: an edge on a fresh database of either backend, a raw
//! protocol connection, HTTP requests without a socket, and checks of what was stored (backend
//! neutral ones in `inspect.rs`, PostgreSQL SQL ones here).

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures_util::{SinkExt, StreamExt};
use sink::pg::{PgOptions, PgStore};
use sink::sqlite::{SqliteOptions, SqliteStore};
use sink::{NewApiKey, Scope, Store};
use sqlx::PgConnection;
use tests::{TestDb, TestSqlite};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use tower::ServiceExt;
use wire::{AckMode, EventBatch, Hello, Message, Welcome, WireCodec};

/// The operator key of edges started with [`TestEdge::with_admin`].
pub const OPERATOR_KEY: &str = "operator-key-for-tests-0123456789abcdef";

/// The test process's Prometheus recorder, installed once (as a binary does at start) and handed
/// to every edge and query service the tests start, so their `/metrics` render every series.
pub fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| telemetry::install_metrics().expect("the only recorder of the test process"))
        .clone()
}

/// The storage backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A fresh database on the shared PostgreSQL server.
    Postgres,
    /// A fresh SQLite file in a temporary directory.
    Sqlite,
}

/// Defines each `async fn name(backend: Backend) -> Result<()>` as two tests, `name::postgres`
/// and `name::sqlite`, so one body checks both backends.
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread")]
            async fn postgres() -> anyhow::Result<()> {
                super::$name(crate::support::Backend::Postgres).await
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn sqlite() -> anyhow::Result<()> {
                super::$name(crate::support::Backend::Sqlite).await
            }
        }
    )+};
}
pub(crate) use both_backends;

/// A test's database: its URL (`postgres://...` or `sqlite://<path>`) and what keeps it alive.
pub struct TestDatabase {
    pub url: String,
    pub(crate) location: Location,
}

pub(crate) enum Location {
    Postgres(TestDb),
    Sqlite(TestSqlite),
}

/// An edge listening on loopback ports over a fresh, migrated database.
pub struct TestEdge {
    pub db: TestDatabase,
    pub store: Arc<Store>,
    pub edge: edge::RunningEdge,
    pub tenant: sink::Tenant,
    pub key: String,
}

impl TestEdge {
    /// On the shared PostgreSQL server.
    pub async fn start() -> Result<TestEdge> {
        Self::on(Backend::Postgres).await
    }

    /// On a fresh database of `backend`.
    pub async fn on(backend: Backend) -> Result<TestEdge> {
        Self::launch(backend, edge::EdgeConfig::default()).await
    }

    /// On `backend`, with an operator key and an admin key for tenant "acme" (returned).
    pub async fn with_admin(backend: Backend) -> Result<(TestEdge, String)> {
        let config =
            edge::EdgeConfig { operator_key: Some(OPERATOR_KEY.into()), ..edge::EdgeConfig::default() };
        let edge = Self::launch(backend, config).await?;
        let admin = create_key(&edge.store, &edge.tenant, vec![Scope::Admin]).await?;
        Ok((edge, admin))
    }

    /// On a fresh database of `backend` (PostgreSQL: on the shared server).
    pub async fn launch(backend: Backend, config: edge::EdgeConfig) -> Result<TestEdge> {
        match backend {
            Backend::Postgres => Self::start_on(tests::postgres().await, config).await,
            Backend::Sqlite => Self::launch_sqlite(SqliteOptions::default(), config).await,
        }
    }

    /// On a fresh SQLite file opened with `options`.
    pub async fn launch_sqlite(options: SqliteOptions, config: edge::EdgeConfig) -> Result<TestEdge> {
        let file = tests::fresh_sqlite()?;
        let store = Arc::new(Store::from(SqliteStore::open_with(file.path(), &options).await?));
        let db = TestDatabase { url: file.url(), location: Location::Sqlite(file) };
        Self::serve(db, store, config).await
    }

    /// On a fresh database of a given PostgreSQL server.
    pub async fn start_on(server: &tests::PgServer, config: edge::EdgeConfig) -> Result<TestEdge> {
        let db = server.fresh_database().await?;
        let store = PgStore::connect_lazy(&db.url, &PgOptions::default())?;
        store.migrate().await?;
        let db = TestDatabase { url: db.url.clone(), location: Location::Postgres(db) };
        Self::serve(db, Arc::new(Store::from(store)), config).await
    }

    pub(crate) async fn serve(
        db: TestDatabase,
        store: Arc<Store>,
        mut config: edge::EdgeConfig,
    ) -> Result<TestEdge> {
        config.wire_addr = "127.0.0.1:0".parse()?;
        config.http_addr = "127.0.0.1:0".parse()?;
        config.metrics = Some(metrics_handle());
        store.maintain(&config.retention_with_window()).await?;
        let tenant = store.create_tenant("acme").await?;
        let key = create_key(&store, &tenant, vec![Scope::Ingest, Scope::Query]).await?;
        let edge = edge::start(config, store.clone()).await?;
        Ok(TestEdge { db, store, edge, tenant, key })
    }

    /// A second tenant with its own key.
    pub async fn other_tenant(&self, name: &str) -> Result<(sink::Tenant, String)> {
        let tenant = self.store.create_tenant(name).await?;
        let key = create_key(&self.store, &tenant, vec![Scope::Ingest]).await?;
        Ok((tenant, key))
    }

    /// A connection to the PostgreSQL database; an error on SQLite (use the checks in
    /// `inspect.rs`, which work on both).
    pub async fn connect_db(&self) -> Result<PgConnection> {
        match &self.db.location {
            Location::Postgres(db) => db.connect().await,
            Location::Sqlite(_) => bail!("connect_db is for PostgreSQL; this edge runs on SQLite"),
        }
    }

    /// A connection of its own to the SQLite database, as another process would open it; an
    /// error on PostgreSQL.
    pub async fn connect_sqlite(&self) -> Result<sqlx::SqliteConnection> {
        use sqlx::Connection;
        match &self.db.location {
            Location::Sqlite(file) => Ok(sqlx::SqliteConnection::connect(&file.url()).await?),
            Location::Postgres(_) => bail!("connect_sqlite is for SQLite; this edge runs on PostgreSQL"),
        }
    }

    /// Sends an HTTP request through the edge's router (no socket).
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: serde_json::Value,
    ) -> Result<(StatusCode, serde_json::Value)> {
        let mut request =
            Request::builder().method(method).uri(path).header("content-type", "application/json");
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        let request = request.body(Body::from(body.to_string()))?;
        let response = edge::http::router(self.edge.state.clone()).oneshot(request).await?;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 16 << 20).await?;
        let json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).context("json body")?
        };
        Ok((status, json))
    }
}

/// Sets the tenant's time zone through the store, on either backend.
pub async fn set_time_zone(edge: &TestEdge, time_zone: &str) -> Result<()> {
    let mut settings = edge.store.tenant_settings(edge.tenant.id).await?.context("the tenant's settings")?;
    settings.time_zone = time_zone.to_owned();
    edge.store.update_tenant_settings(edge.tenant.id, &settings).await?;
    Ok(())
}

pub async fn create_key(store: &Arc<Store>, tenant: &sink::Tenant, scopes: Vec<Scope>) -> Result<String> {
    let key = edge::auth::generate_api_key();
    let new_key = NewApiKey {
        tenant_id: tenant.id,
        key_hash: sink::hash_api_key(&key),
        prefix: key[..12].to_owned(),
        scopes,
        label: None,
        expires_at_us: None,
    };
    store.create_api_key(&new_key).await?;
    Ok(key)
}

/// A protocol connection driven frame by frame.
pub struct RawConnection {
    pub framed: Framed<TcpStream, WireCodec>,
    pub welcome: Welcome,
}

impl RawConnection {
    pub async fn open(edge: &TestEdge, key: &str) -> Result<RawConnection> {
        match Self::try_open(edge, key).await? {
            Ok(connection) => Ok(connection),
            Err(message) => bail!("handshake refused: {message:?}"),
        }
    }

    /// The connection, or the message the server refused the handshake with.
    pub async fn try_open(edge: &TestEdge, key: &str) -> Result<std::result::Result<RawConnection, Message>> {
        Self::try_open_at(edge.edge.wire_addr, key).await
    }

    /// The same, to any address.
    pub async fn try_open_at(
        addr: std::net::SocketAddr,
        key: &str,
    ) -> Result<std::result::Result<RawConnection, Message>> {
        let stream = TcpStream::connect(addr).await?;
        let mut framed = Framed::new(stream, WireCodec::new());
        let hello = Hello {
            protocol_version: wire::PROTOCOL_VERSION,
            api_key: key.to_owned(),
            client_name: "it".into(),
            ack_mode: AckMode::Durable,
        };
        framed.send(Message::Hello(hello)).await?;
        let reply = next_message(&mut framed).await?;
        let Message::Welcome(welcome) = reply else { return Ok(Err(reply)) };
        framed.codec_mut().set_limits(welcome.max_frame_bytes, welcome.max_frame_bytes);
        Ok(Ok(RawConnection { framed, welcome }))
    }

    pub async fn send(&mut self, sequence: u64, events: Vec<wire::Event>) -> Result<()> {
        self.framed.send(Message::Events(EventBatch { sequence, events })).await?;
        Ok(())
    }

    pub async fn next(&mut self) -> Result<Message> {
        next_message(&mut self.framed).await
    }

    /// Sends a batch and waits for its answer.
    pub async fn round_trip(&mut self, sequence: u64, events: Vec<wire::Event>) -> Result<Message> {
        self.send(sequence, events).await?;
        self.next().await
    }
}

async fn next_message(framed: &mut Framed<TcpStream, WireCodec>) -> Result<Message> {
    let frame = tokio::time::timeout(std::time::Duration::from_secs(20), framed.next())
        .await
        .context("no answer within 20 s")?
        .context("connection closed")??;
    Ok(frame.message()?)
}

/// A valid LLM event at a fixed recent time.
pub fn llm_event(user: &str, input_tokens: f64, output_tokens: f64) -> wire::Event {
    wire::Event::new(user, "llm_service", "openai", "completion")
        .with_model("gpt-4o")
        .with_quantity(wire::QuantityKind::InputTokens, input_tokens)
        .with_quantity(wire::QuantityKind::OutputTokens, output_tokens)
        .with_latency_ms(120.5)
}

/// Rows stored for a tenant (PostgreSQL; `TestEdge::stored_count` works on both backends).
pub async fn stored_count(conn: &mut PgConnection, tenant: uuid::Uuid) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(conn)
        .await?)
}

/// The sums of a rollup view (folded rows plus pending ones) per key: what every reader sees.
fn live_rollups(view: &str, key: &str, buckets: bool) -> String {
    let buckets = if buckets { ", tally_sum_buckets(latency_buckets) AS latency_buckets" } else { "" };
    format!(
        "(SELECT {key}, sum(event_count) AS event_count, sum(error_count) AS error_count,
                 sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
                 sum(cached_input_tokens) AS cached_input_tokens, sum(reasoning_tokens) AS reasoning_tokens,
                 sum(pages) AS pages, sum(characters) AS characters, sum(requests) AS requests,
                 sum(bytes) AS bytes, sum(duration_ms) AS duration_ms,
                 tally_sum_quantities(custom_quantities) AS custom_quantities, sum(cost) AS cost,
                 sum(unpriced_count) AS unpriced_count, sum(latency_count) AS latency_count,
                 sum(latency_sum_us) AS latency_sum_us, max(latency_max_us) AS latency_max_us{buckets}
          FROM {view} GROUP BY {key})"
    )
}

const USER_KEY: &str = "tenant_id, hour, service_type, service_provider, model, user_id, event_type";
const DAILY_KEY: &str = "tenant_id, day, service_type, service_provider, model, user_id, event_type";
const SERVICE_KEY: &str = "tenant_id, hour, service_type, service_provider, model, event_type";

/// Checks that for every rollup key, the rollups as readers see them (folded plus pending rows)
/// equal sums computed from raw events, and that no raw event lacks its rollup, in
/// PostgreSQL's own arithmetic; each comparison is one statement, so one snapshot. Returns the
/// number of rollup keys compared. `TestEdge::assert_rollups_match_raw` does the same on both
/// backends.
pub async fn assert_rollups_match_raw(conn: &mut PgConnection) -> Result<i64> {
    let per_user = live_rollups("usage_rollup_hourly_live", USER_KEY, false);
    let per_service = live_rollups("usage_rollup_service_hourly_live", SERVICE_KEY, true);
    let statement = format!(
        "WITH raw AS (
           SELECT tenant_id, date_trunc('hour', occurred_at, 'UTC') AS hour, service_type, service_provider,
                  coalesce(model, '') AS model, user_id, event_type,
                  count(*) AS event_count, count(*) FILTER (WHERE status = 1) AS error_count,
                  coalesce(sum(input_tokens), 0) AS input_tokens, coalesce(sum(output_tokens), 0) AS output_tokens,
                  coalesce(sum(pages), 0) AS pages, coalesce(sum(requests), 0) AS requests,
                  coalesce(sum(cost), 0) AS cost, count(*) FILTER (WHERE cost IS NULL) AS unpriced_count,
                  count(latency_us) AS latency_count, coalesce(sum(latency_us), 0) AS latency_sum_us,
                  coalesce(max(latency_us), 0) AS latency_max_us
           FROM usage_events GROUP BY 1, 2, 3, 4, 5, 6, 7)
         SELECT count(*) FROM raw FULL JOIN {per_user} r USING
           (tenant_id, hour, service_type, service_provider, model, user_id, event_type)
         WHERE raw.event_count IS DISTINCT FROM r.event_count
            OR raw.error_count IS DISTINCT FROM r.error_count
            OR raw.input_tokens IS DISTINCT FROM r.input_tokens
            OR raw.output_tokens IS DISTINCT FROM r.output_tokens
            OR raw.pages IS DISTINCT FROM r.pages
            OR raw.requests IS DISTINCT FROM r.requests
            OR raw.cost IS DISTINCT FROM r.cost
            OR raw.unpriced_count IS DISTINCT FROM r.unpriced_count
            OR raw.latency_count IS DISTINCT FROM r.latency_count
            OR raw.latency_sum_us IS DISTINCT FROM r.latency_sum_us
            OR raw.latency_max_us IS DISTINCT FROM r.latency_max_us"
    );
    let mismatches: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(statement)).fetch_one(&mut *conn).await?;
    if mismatches != 0 {
        bail!("{mismatches} rollup rows differ from the sums of raw events");
    }
    let statement = format!(
        "SELECT count(*) FROM {per_service} u
         WHERE (SELECT sum(b) FROM unnest(latency_buckets) b) <> latency_count
            OR cardinality(latency_buckets) <> 46"
    );
    let bucket_mismatch: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(statement)).fetch_one(&mut *conn).await?;
    if bucket_mismatch != 0 {
        bail!("{bucket_mismatch} rollup rows have histograms that do not add up to their latency count");
    }
    // The user-less rollups equal the per-user rollups (just checked against raw) summed over users.
    let statement = format!(
        "WITH s AS (
           SELECT tenant_id, hour, service_type, service_provider, model, event_type,
                  sum(event_count) AS event_count, sum(error_count) AS error_count,
                  sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
                  sum(cached_input_tokens) AS cached_input_tokens, sum(reasoning_tokens) AS reasoning_tokens,
                  sum(pages) AS pages, sum(characters) AS characters, sum(requests) AS requests,
                  sum(bytes) AS bytes, sum(duration_ms) AS duration_ms,
                  tally_sum_quantities(custom_quantities) AS custom_quantities, sum(cost) AS cost,
                  sum(unpriced_count) AS unpriced_count, sum(latency_count) AS latency_count,
                  sum(latency_sum_us) AS latency_sum_us, max(latency_max_us) AS latency_max_us
           FROM {per_user} u GROUP BY 1, 2, 3, 4, 5, 6)
         SELECT count(*) FROM s FULL JOIN {per_service} r USING
           (tenant_id, hour, service_type, service_provider, model, event_type)
         WHERE {differ}",
        differ = sums_differ("s", "r"),
    );
    let service_mismatches: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(statement)).fetch_one(&mut *conn).await?;
    if service_mismatches != 0 {
        bail!(
            "{service_mismatches} user-less rollup rows differ from the per-user rollups summed over users"
        );
    }
    // The daily per-user rollups (folded rows only) equal the folded hourly ones summed by UTC day.
    let daily = live_rollups(
        "(SELECT (hour AT TIME ZONE 'UTC')::date AS day, * FROM usage_rollup_hourly) h",
        DAILY_KEY,
        false,
    );
    let statement = format!(
        "SELECT count(*) FROM {daily} h FULL JOIN usage_rollup_user_daily d USING ({DAILY_KEY})
         WHERE {differ}",
        differ = sums_differ("h", "d"),
    );
    let daily_mismatches: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(statement)).fetch_one(&mut *conn).await?;
    if daily_mismatches != 0 {
        bail!("{daily_mismatches} daily per-user rollup rows differ from the hourly ones summed by UTC day");
    }
    // The user-less histograms (the only ones) against the raw latencies, bucket by bucket, with
    // the sink's bucket rule.
    let statement = format!(
        "WITH raw AS (
           SELECT tenant_id, date_trunc('hour', occurred_at, 'UTC') AS hour, service_type, service_provider,
                  coalesce(model, '') AS model, event_type,
                  CASE WHEN latency_us < 1000 THEN 1
                       ELSE least(floor(2 * log(2.0, latency_us / 1000.0))::int + 1, 45) + 1 END AS bucket,
                  count(*) AS n
           FROM usage_events WHERE latency_us IS NOT NULL GROUP BY 1, 2, 3, 4, 5, 6, 7),
         stored AS (
           SELECT tenant_id, hour, service_type, service_provider, model, event_type, b.bucket, b.n
           FROM {per_service} r CROSS JOIN LATERAL unnest(r.latency_buckets) WITH ORDINALITY AS b(n, bucket)
           WHERE b.n <> 0)
         SELECT count(*) FROM raw FULL JOIN stored
           USING (tenant_id, hour, service_type, service_provider, model, event_type, bucket)
         WHERE raw.n IS DISTINCT FROM stored.n"
    );
    let histogram_mismatches: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(statement)).fetch_one(&mut *conn).await?;
    if histogram_mismatches != 0 {
        bail!(
            "{histogram_mismatches} latency buckets of the user-less rollups differ from the raw latencies"
        );
    }
    let statement = format!("SELECT count(*) FROM {per_user} u");
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(statement)).fetch_one(&mut *conn).await?)
}

/// `tally_events_lost_total` as an edge's recorder renders it (0 when absent). The recorder is
/// shared by every in-process edge of this test binary; only the tests that lose `accepted`
/// events on purpose move it.
pub fn events_lost(edge: &TestEdge) -> f64 {
    let Some(metrics) = edge.edge.state.config.metrics.as_ref() else { return 0.0 };
    metrics
        .render()
        .lines()
        .find_map(|line| line.strip_prefix("tally_events_lost_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// An SQL condition: rollup rows `left` and `right` differ in any sum (custom quantities
/// included).
fn sums_differ(left: &str, right: &str) -> String {
    const SUMS: [&str; 17] = [
        "event_count",
        "error_count",
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "reasoning_tokens",
        "pages",
        "characters",
        "requests",
        "bytes",
        "duration_ms",
        "cost",
        "unpriced_count",
        "latency_count",
        "latency_sum_us",
        "latency_max_us",
        "custom_quantities",
    ];
    SUMS.iter()
        .map(|sum| format!("{left}.{sum} IS DISTINCT FROM {right}.{sum}"))
        .collect::<Vec<_>>()
        .join(" OR ")
}
