//! `tally-query-bench`: loads generated events through the sink and measures each query
//! endpoint's latency for the busiest tenant over the last 30 days.
//!
//! ```text
//! cargo run --release -p query --example tally-query-bench -- --events 10000000
//! cargo run --release -p query --example tally-query-bench -- --database-url postgres://... --skip-load
//! ```
//!
//! Without `--database-url` it starts a private PostgreSQL through the `tests` harness (removed
//! at exit). Events are spread over `--days` days for `--tenants` tenants whose volumes follow
//! a Zipf law (the busiest has ~19% of all events with 100 tenants); users within a tenant are
//! Zipf-distributed too. Rows go through `Store::commit` (COPY, dedup, pending rollup rows), two
//! committers at a time, 10,000 events per transaction; then the pending rows are folded, as the
//! edges' materializers do. `--current-hour-events` adds events to the busiest tenant's current
//! hour (as a high ingest rate leaves it); `--no-vacuum` measures without `VACUUM ANALYZE`. Requests are sent to the router in
//! process (`oneshot`, no socket), one at a time, with the response cache off (every request
//! reaches PostgreSQL) and then on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use clap::Parser;
use query::{QueryConfig, QueryState};
use rust_decimal::Decimal;
use sink::pg::{PgOptions, PgStore};
use sink::{EventRow, NewApiKey, Retention, Scope, Store};
use tower::ServiceExt;

#[derive(Debug, Parser)]
#[command(about = "Load events through the sink, then time every query endpoint")]
struct Args {
    /// Events to load.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Tenants sharing them.
    #[arg(long, default_value_t = 100)]
    tenants: usize,
    /// Days the events span, ending now.
    #[arg(long, default_value_t = 90)]
    days: u32,
    /// Users of the busiest tenant (others have fewer, down to 20).
    #[arg(long, default_value_t = 500)]
    users_max: usize,
    /// Timed requests per endpoint.
    #[arg(long, default_value_t = 40)]
    samples: usize,
    /// Use this database instead of starting one.
    #[arg(long)]
    database_url: Option<String>,
    /// Measure only (the database holds a previous load).
    #[arg(long)]
    skip_load: bool,
    /// Events loaded into the busiest tenant's current hour after the spread-out ones, as a
    /// high ingest rate leaves it.
    #[arg(long, default_value_t = 0)]
    current_hour_events: u64,
    /// Measure right after loading, without `VACUUM ANALYZE` (as a live system sees new data).
    #[arg(long)]
    no_vacuum: bool,
}

/// A small deterministic generator (SplitMix64): no dependency, same data every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An index from cumulative weights.
    fn pick(&mut self, cumulative: &[f64]) -> usize {
        let total = cumulative.last().copied().unwrap_or(1.0);
        let x = self.unit() * total;
        cumulative.partition_point(|c| *c <= x).min(cumulative.len() - 1)
    }
}

fn zipf_cumulative(n: usize, s: f64) -> Vec<f64> {
    let mut total = 0.0;
    (1..=n)
        .map(|rank| {
            total += 1.0 / (rank as f64).powf(s);
            total
        })
        .collect()
}

const SERVICES: [(&str, &str, Option<&str>, &str, f64); 5] = [
    ("llm_service", "openai", Some("gpt-4o"), "completion", 0.40),
    ("llm_service", "openai", Some("gpt-4o-mini"), "completion", 0.25),
    ("llm_service", "anthropic", Some("claude-sonnet"), "completion", 0.15),
    ("api_service", "internal", None, "request", 0.12),
    ("document_processor", "docai", None, "processing", 0.08),
];

fn event(
    rng: &mut Rng,
    user: usize,
    timestamp_us: i64,
    service_weights: &[f64],
) -> (wire::Event, Option<Decimal>) {
    let (service_type, provider, model, event_type, _) = SERVICES[rng.pick(service_weights)];
    let mut event =
        wire::Event::new(format!("user-{user}"), service_type, provider, event_type).at(timestamp_us);
    if let Some(model) = model {
        event = event.with_model(model);
    }
    let input = 50.0 + (rng.unit() * 4000.0).floor();
    let output = 10.0 + (rng.unit() * 800.0).floor();
    event = match service_type {
        "llm_service" => event
            .with_quantity(wire::QuantityKind::InputTokens, input)
            .with_quantity(wire::QuantityKind::OutputTokens, output),
        "document_processor" => {
            event.with_quantity(wire::QuantityKind::Pages, 1.0 + (rng.unit() * 20.0).floor())
        }
        _ => event.with_quantity(wire::QuantityKind::Requests, 1.0),
    };
    // Log-normal-ish latency around 300 ms.
    let normal: f64 = (0..6).map(|_| rng.unit()).sum::<f64>() - 3.0;
    event = event.with_latency_ms((300.0 * (normal * 0.8).exp()).min(3_000_000.0));
    if rng.unit() < 0.02 {
        event = event.with_error(Some("upstream_error".into()));
    }
    let cost = (rng.unit() >= 0.05).then(|| Decimal::new((input as i64) * 25 + (output as i64) * 100, 7));
    (event, cost)
}

/// Which events [`load`] generates: `events` over the `span_us` before `end_us`, for all
/// tenants (Zipf) or for the busiest one only.
struct Spread {
    events: u64,
    end_us: i64,
    span_us: i64,
    busiest_only: bool,
    seed: u64,
}

async fn load(store: Arc<Store>, tenants: &[sink::Tenant], args: &Args, spread: Spread) -> Result<()> {
    let Spread { events, end_us: now_us, span_us, busiest_only, seed } = spread;
    let tenant_weights = if busiest_only { vec![1.0] } else { zipf_cumulative(tenants.len(), 1.0) };
    let service_weights: Vec<f64> = SERVICES
        .iter()
        .scan(0.0, |total, service| {
            *total += service.4;
            Some(*total)
        })
        .collect();
    let user_weights: Vec<Vec<f64>> =
        (0..tenants.len()).map(|rank| zipf_cumulative((args.users_max / (rank + 1)).max(20), 1.1)).collect();
    const BATCH: usize = 10_000;
    let batches = events.div_ceil(BATCH as u64);
    let started = Instant::now();
    let (sender, receiver) = tokio::sync::mpsc::channel::<Vec<EventRow>>(4);
    let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
    let committers: Vec<_> = (0..2)
        .map(|_| {
            let (store, receiver) = (store.clone(), receiver.clone());
            tokio::spawn(async move {
                loop {
                    let Some(rows) = receiver.lock().await.recv().await else {
                        return Ok::<_, anyhow::Error>(());
                    };
                    store.commit(&rows).await?;
                }
            })
        })
        .collect();
    let mut rng = Rng(seed);
    for batch in 0..batches {
        let mut rows = Vec::with_capacity(BATCH);
        for _ in 0..BATCH.min((events - batch * BATCH as u64) as usize) {
            let tenant = rng.pick(&tenant_weights);
            let user = rng.pick(&user_weights[tenant]);
            let timestamp_us = now_us - (rng.unit() * span_us as f64) as i64;
            let (event, cost) = event(&mut rng, user, timestamp_us, &service_weights);
            rows.push(EventRow::new(tenants[tenant].id, event, cost));
        }
        sender.send(rows).await.context("committers stopped")?;
        if batch % 50 == 49 {
            let loaded = (batch + 1) * BATCH as u64;
            let rate = loaded as f64 / started.elapsed().as_secs_f64();
            eprintln!("loaded {loaded} events, {rate:.0}/s");
        }
    }
    drop(sender);
    for committer in committers {
        committer.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!("loaded {events} events in {elapsed:.0} s ({:.0}/s)", events as f64 / elapsed);
    Ok(())
}

/// Folds every pending rollup entry, as the edges' materializers would.
async fn fold_all(store: &Store) -> Result<()> {
    let started = Instant::now();
    let mut folded = 0;
    loop {
        let report = store.fold_rollups(300_000).await?;
        folded += report.folded;
        if report.pending == 0 {
            break;
        }
    }
    eprintln!("folded {folded} pending rollup entries in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Percentile (nearest rank) of sorted durations, in milliseconds.
fn percentile(sorted: &[Duration], quantile: f64) -> f64 {
    let rank = ((quantile * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

async fn time_endpoint(
    router: &axum::Router,
    key: &str,
    path: &str,
    samples: usize,
) -> Result<(f64, f64, usize)> {
    let mut durations = Vec::with_capacity(samples);
    let mut bytes = 0;
    for _ in 0..samples + 2 {
        let request = Request::builder().uri(path).header("x-api-key", key).body(Body::empty())?;
        let started = Instant::now();
        let response = router.clone().oneshot(request).await?;
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 256 << 20).await?;
        let elapsed = started.elapsed();
        anyhow::ensure!(status == StatusCode::OK, "{path}: {status} {}", String::from_utf8_lossy(&body));
        bytes = body.len();
        durations.push(elapsed);
    }
    durations.drain(..2); // warm-up
    durations.sort();
    Ok((percentile(&durations, 0.5), percentile(&durations, 0.99), bytes))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _server; // a private server lives as long as the run
    let url = match &args.database_url {
        Some(url) => url.clone(),
        None => {
            let server = tests::dedicated_postgres().await?;
            let url = server.fresh_database().await?.url;
            _server = server;
            url
        }
    };
    let pg = PgStore::connect_lazy(&url, &PgOptions { max_connections: 4, ..PgOptions::default() })?;
    pg.migrate().await?;
    let store = Arc::new(Store::from(pg.clone()));
    let retention = Retention { partitions_behind_days: args.days + 2, ..Retention::default() };
    store.maintain(&retention).await?;
    let mut tenants = store.list_tenants().await?;
    tenants.sort_by(|a, b| a.name.cmp(&b.name));
    if !args.skip_load {
        if tenants.is_empty() {
            for index in 0..args.tenants {
                tenants.push(store.create_tenant(&format!("tenant-{index:03}")).await?);
            }
        }
        let now = time::OffsetDateTime::now_utc();
        let now_us = now.unix_timestamp() * 1_000_000 - 60_000_000;
        let spread = Spread {
            events: args.events,
            end_us: now_us,
            span_us: i64::from(args.days) * 86_400_000_000,
            busiest_only: false,
            seed: 42,
        };
        load(store.clone(), &tenants, &args, spread).await?;
        if args.current_hour_events > 0 {
            let into_hour_us = i64::from(now.minute()) * 60_000_000 + i64::from(now.second()) * 1_000_000;
            let spread = Spread {
                events: args.current_hour_events,
                end_us: now.unix_timestamp() * 1_000_000,
                span_us: into_hour_us.max(1),
                busiest_only: true,
                seed: 7,
            };
            load(store.clone(), &tenants, &args, spread).await?;
        }
        fold_all(&store).await?;
        if !args.no_vacuum {
            // The pending tables too: the fold above deleted every row they held, and readers
            // visit their index (autovacuum keeps them small on a live system, by dead rows).
            for table in [
                "usage_rollup_hourly",
                "usage_rollup_user_daily",
                "usage_rollup_service_hourly",
                "usage_rollup_pending",
                "usage_rollup_service_pending",
                "usage_events",
            ] {
                sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
                    .execute(pg.pool())
                    .await?;
            }
        }
    }
    let busiest = tenants.first().context("no tenants: run without --skip-load first")?;
    let key = format!("bench-{}", uuid::Uuid::new_v4());
    let new_key = NewApiKey {
        tenant_id: busiest.id,
        key_hash: sink::hash_api_key(&key),
        prefix: key[..10].to_owned(),
        scopes: vec![Scope::Query],
        label: Some("bench".into()),
        expires_at_us: None,
    };
    store.create_api_key(&new_key).await?;
    let (events_30d, rollup_rows_30d): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM usage_events WHERE tenant_id = $1 AND occurred_at > now() - interval '30 days'),
                (SELECT count(*) FROM usage_rollup_hourly WHERE tenant_id = $1 AND hour > now() - interval '30 days')",
    )
    .bind(busiest.id)
    .fetch_one(pg.pool())
    .await?;
    println!(
        "busiest tenant {}: {events_30d} events and {rollup_rows_30d} rollup rows in the last 30 days",
        busiest.name
    );

    // A cursor deep into the range: the listing resumes after (time, id), as a client paging would.
    let deep = time::OffsetDateTime::now_utc() - time::Duration::days(20);
    let cursor = query::api::listing::Cursor { occurred_at: deep, event_id: uuid::Uuid::max() }.encode();
    let paths = [
        "/api/v1/usage?limit=100".to_owned(),
        format!("/api/v1/usage?limit=100&cursor={cursor}"),
        format!("/api/v1/usage?limit=1000&cursor={cursor}"),
        "/api/v1/usage/aggregate?period=day".to_owned(),
        "/api/v1/usage/aggregate?period=day&edges=exact".to_owned(),
        "/api/v1/usage/by-service".to_owned(),
        "/api/v1/usage/costs".to_owned(),
        "/api/v1/analytics/trends?metric=event_count".to_owned(),
        "/api/v1/analytics/trends?metric=latency_p95".to_owned(),
        "/api/v1/analytics/top-users".to_owned(),
        "/api/v1/analytics/breakdown?group_by=model".to_owned(),
        "/api/v1/analytics/compare?group_by=service_type".to_owned(),
        "/api/v1/analytics/errors".to_owned(),
    ];
    for (label, ttl) in [("cache off", Duration::ZERO), ("cache on (15 s)", Duration::from_secs(15))] {
        let config = QueryConfig { cache_ttl: ttl, ..QueryConfig::new(url.clone()) };
        let router = query::router(QueryState::connect(config).await?);
        println!("\n{label}: {} requests per endpoint, one at a time", args.samples);
        println!(
            "{:<62} {:>9} {:>9} {:>9}",
            "endpoint (busiest tenant, last 30 days)", "p50 ms", "p99 ms", "bytes"
        );
        for path in &paths {
            let shown = if path.len() > 62 { format!("{}...", &path[..59]) } else { path.clone() };
            match time_endpoint(&router, &key, path, args.samples).await {
                Ok((p50, p99, bytes)) => println!("{shown:<62} {p50:>9.1} {p99:>9.1} {bytes:>9}"),
                Err(error) => println!("{shown:<62} failed: {error:#}"),
            }
        }
    }
    Ok(())
}
