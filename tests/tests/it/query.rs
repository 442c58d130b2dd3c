//! The query service end to end, on both backends: events go in through the edge (or, for old
//! timestamps and prices, straight through the sink's `Store::commit`), and every endpoint's
//! numbers are checked against sums computed here from the events sent. The router is driven
//! with `oneshot`, no socket. Time zones, DST changes included, are in `query_time_zones.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use query::{QueryConfig, QueryState};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sink::{EventRow, Retention, Scope};
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime, Time, UtcOffset};
use tower::ServiceExt;
use uuid::Uuid;

use crate::support::{Backend, Location, TestEdge, both_backends, create_key};

both_backends!(
    listing_filters_pages_and_streams_csv,
    aggregates_match_sums_of_the_events_sent,
    days_and_weeks_follow_the_tenant_time_zone,
    every_endpoint_answers_for_its_own_tenant_only,
    cached_answers_are_stale_for_at_most_the_ttl,
    bad_parameters_are_refused_by_name,
    docs_health_and_metrics_are_served,
    range_edges_widen_to_whole_hours_unless_exact,
);

/// One event as sent, and what the query service must make of it.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub(crate) id: Uuid,
    pub(crate) at: OffsetDateTime,
    pub(crate) user: String,
    pub(crate) service_type: &'static str,
    pub(crate) provider: &'static str,
    pub(crate) model: Option<&'static str>,
    pub(crate) error: bool,
    pub(crate) input_tokens: i64,
    pub(crate) latency_ms: Option<f64>,
    pub(crate) cost: Option<Decimal>,
    pub(crate) images: Option<i64>,
}

impl Sent {
    pub(crate) fn new(index: usize, at: OffsetDateTime) -> Sent {
        let services = [
            // Names no price catalog knows: events through the edge stay unpriced.
            ("llm_service", "prov-a", Some("model-a")),
            ("llm_service", "prov-b", Some("model-b")),
            ("custom", "prov-c", None),
        ];
        let (service_type, provider, model) = services[index % 3];
        Sent {
            id: Uuid::now_v7(),
            at,
            user: format!("user-{}", index % 5),
            service_type,
            provider,
            model,
            error: index % 7 == 3,
            input_tokens: 100 + (index as i64 * 37) % 900,
            latency_ms: (index % 6 != 5).then(|| 0.4 + (index as f64 * 7.3).powf(1.6)),
            cost: (index % 5 != 4).then(|| Decimal::new(125 * (1 + index as i64 % 9), 4)),
            images: index.is_multiple_of(4).then_some(2),
        }
    }

    pub(crate) fn event(&self) -> wire::Event {
        let mut event = wire::Event::new(&self.user, self.service_type, self.provider, "completion")
            .with_id(self.id)
            .at((self.at.unix_timestamp_nanos() / 1000) as i64)
            .with_quantity(wire::QuantityKind::InputTokens, self.input_tokens as f64)
            .with_quantity(wire::QuantityKind::OutputTokens, 10.0);
        if let Some(model) = self.model {
            event = event.with_model(model);
        }
        if self.error {
            event = event.with_error(Some("timeout".into()));
        }
        if let Some(latency_ms) = self.latency_ms {
            event = event.with_latency_ms(latency_ms);
        }
        if let Some(images) = self.images {
            event = event.with_custom_quantity("images", images as f64);
        }
        event
    }

    /// The older API's flat JSON shape, for the edge's HTTP ingest (which prices nothing).
    fn json(&self) -> Value {
        let mut event = json!({
            "event_id": self.id, "timestamp": self.at.format(&Rfc3339).expect("time"),
            "user_id": self.user, "service_type": self.service_type, "service_provider": self.provider,
            "event_type": "completion", "input_tokens": self.input_tokens, "output_tokens": 10,
            "status": if self.error { "error" } else { "success" },
            "tags": ["t1"], "metadata": {"region": "eu"}, "session_id": "s-1",
        });
        if let Some(model) = self.model {
            event["model"] = json!(model);
        }
        if let Some(latency_ms) = self.latency_ms {
            event["latency_ms"] = json!(latency_ms);
        }
        if let Some(images) = self.images {
            event["metrics"] = json!({"images": images});
        }
        event
    }

    fn latency_us(&self) -> Option<i64> {
        self.latency_ms.map(|ms| (ms * 1000.0).round() as i64)
    }
}

/// Sums over sent events, computed here.
#[derive(Debug, Default)]
pub(crate) struct Sums {
    pub(crate) events: i64,
    pub(crate) errors: i64,
    pub(crate) users: BTreeSet<String>,
    pub(crate) input_tokens: i64,
    pub(crate) cost: Decimal,
    pub(crate) unpriced: i64,
    pub(crate) images: i64,
    pub(crate) latencies_ms: Vec<f64>,
}

pub(crate) fn sums<'a>(events: impl IntoIterator<Item = &'a Sent>) -> Sums {
    let mut sums = Sums::default();
    for event in events {
        sums.events += 1;
        sums.errors += i64::from(event.error);
        sums.users.insert(event.user.clone());
        sums.input_tokens += event.input_tokens;
        match event.cost {
            Some(cost) => sums.cost += cost,
            None => sums.unpriced += 1,
        }
        sums.images += event.images.unwrap_or(0);
        sums.latencies_ms.extend(event.latency_us().map(|us| us as f64 / 1000.0));
    }
    sums.latencies_ms.sort_by(f64::total_cmp);
    sums
}

/// Checks a row of totals (`Totals` in the API) against sums; `priced` says whether costs
/// were sent (the edge prices nothing, so its events are all unpriced).
pub(crate) fn check_totals(row: &Value, expected: &Sums, priced: bool, what: &str) -> Result<()> {
    ensure!(
        row["event_count"] == expected.events,
        "{what}: event_count {} != {}",
        row["event_count"],
        expected.events
    );
    ensure!(row["error_count"] == expected.errors, "{what}: error_count {}", row["error_count"]);
    let error_rate = if expected.events == 0 { 0.0 } else { expected.errors as f64 / expected.events as f64 };
    ensure!(
        (row["error_rate"].as_f64().context("error_rate")? - error_rate).abs() < 1e-6,
        "{what}: error_rate {}",
        row["error_rate"]
    );
    if !row["unique_users"].is_null() {
        ensure!(row["unique_users"] == expected.users.len(), "{what}: unique_users {}", row["unique_users"]);
    }
    let (cost, unpriced) =
        if priced { (expected.cost, expected.unpriced) } else { (Decimal::ZERO, expected.events) };
    ensure!(money(&row["total_cost"])? == cost, "{what}: total_cost {} != {cost}", row["total_cost"]);
    ensure!(row["unpriced_event_count"] == unpriced, "{what}: unpriced {}", row["unpriced_event_count"]);
    if let Some(metrics) = row.get("aggregated_metrics").filter(|metrics| !metrics.is_null()) {
        ensure!(
            metrics["input_tokens"] == expected.input_tokens,
            "{what}: input_tokens {}",
            metrics["input_tokens"]
        );
        ensure!(metrics["output_tokens"] == expected.events * 10, "{what}: output_tokens");
    }
    if row.get("latency_p95_ms").is_some() {
        check_percentiles(row, &expected.latencies_ms, what)?;
    }
    Ok(())
}

/// Percentiles must be within 19% of the exact nearest-rank value (0.5 ms under 1 ms).
fn check_percentiles(row: &Value, latencies_ms: &[f64], what: &str) -> Result<()> {
    ensure!(row["latency_count"] == latencies_ms.len(), "{what}: latency_count {}", row["latency_count"]);
    for (field, quantile) in [("latency_p50_ms", 0.5), ("latency_p95_ms", 0.95), ("latency_p99_ms", 0.99)] {
        let estimate = row[field].as_f64();
        if latencies_ms.is_empty() {
            ensure!(estimate.is_none(), "{what}: {field} without latencies");
            continue;
        }
        let rank = ((quantile * latencies_ms.len() as f64).ceil() as usize).max(1);
        let exact = latencies_ms[rank - 1];
        let estimate = estimate.with_context(|| format!("{what}: {field} missing"))?;
        let close = if exact < 1.0 {
            (estimate - exact).abs() <= 0.5
        } else {
            (estimate / exact - 1.0).abs() <= 0.19
        };
        ensure!(close, "{what}: {field} {estimate} is not within 19% of {exact}");
    }
    Ok(())
}

/// Money is a JSON number with the exact digits; the digits of a parsed number (short ones here)
/// are read back exactly.
pub(crate) fn money(value: &Value) -> Result<Decimal> {
    ensure!(value.is_number(), "money is a number: {value}");
    Decimal::from_str(&value.to_string())
        .or_else(|_| Decimal::from_scientific(&value.to_string()))
        .context("money is a decimal")
}

pub(crate) fn rfc3339(time: OffsetDateTime) -> String {
    time.format(&Rfc3339).expect("formats")
}

pub(crate) fn parse_time(value: &Value) -> Result<OffsetDateTime> {
    Ok(OffsetDateTime::parse(value.as_str().context("a time")?, &Rfc3339)?)
}

/// An edge, a query state over its database, and the events loaded.
pub(crate) struct Fixture {
    pub(crate) edge: TestEdge,
    pub(crate) state: Arc<QueryState>,
}

impl Fixture {
    pub(crate) async fn start(backend: Backend, cache_ttl: Duration) -> Result<Fixture> {
        let edge = TestEdge::on(backend).await?;
        let state = query_state(&edge, cache_ttl, None).await?;
        Ok(Fixture { edge, state })
    }

    /// Through the edge's HTTP API, as a client would.
    async fn ingest(&self, events: &[Sent], key: &str) -> Result<()> {
        for chunk in events.chunks(500) {
            let body = json!({"events": chunk.iter().map(Sent::json).collect::<Vec<_>>()});
            let (status, answer) = self.edge.http("POST", "/api/v1/events/batch", Some(key), body).await?;
            ensure!(status == StatusCode::OK, "ingest failed: {answer}");
        }
        Ok(())
    }

    /// Straight into storage with prices (old timestamps are past the edge's window).
    pub(crate) async fn commit(&self, tenant: Uuid, events: &[Sent]) -> Result<()> {
        let retention = Retention { partitions_behind_days: 80, ..Retention::default() };
        self.edge.store.maintain(&retention).await?;
        let rows: Vec<EventRow> =
            events.iter().map(|sent| EventRow::new(tenant, sent.event(), sent.cost)).collect();
        self.edge.store.commit(&rows).await?;
        Ok(())
    }

    async fn get(&self, key: Option<&str>, path: &str) -> Result<(StatusCode, Value, HeaderMap)> {
        get(&self.state, key, path).await
    }

    /// A 200 answer's JSON.
    pub(crate) async fn ok(&self, path: &str) -> Result<Value> {
        let (status, body, _) = self.get(Some(&self.edge.key), path).await?;
        ensure!(status == StatusCode::OK, "GET {path}: {status} {body}");
        Ok(body)
    }
}

pub(crate) async fn query_state(
    edge: &TestEdge,
    cache_ttl: Duration,
    redis_url: Option<String>,
) -> Result<Arc<QueryState>> {
    let config = QueryConfig {
        cache_ttl,
        redis_url,
        metrics: Some(crate::support::metrics_handle()),
        ..QueryConfig::new(edge.db.url.clone())
    };
    match &edge.db.location {
        Location::Postgres(_) => Ok(QueryState::connect(config).await?),
        Location::Sqlite(file) => {
            let backend = query::sqlite::SqliteBackend::open(file.path()).await?;
            let redis = match &config.redis_url {
                Some(url) => Some(query::cache::ResponseCache::connect_redis(url).await?),
                None => None,
            };
            Ok(QueryState::with_backend(config, Arc::new(backend), redis))
        }
    }
}

async fn get_raw(
    state: &Arc<QueryState>,
    key: Option<&str>,
    path: &str,
    accept: Option<&str>,
) -> Result<(StatusCode, String, HeaderMap)> {
    let mut request = Request::builder().uri(path);
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = query::router(state.clone()).oneshot(request.body(Body::empty())?).await?;
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 64 << 20).await?;
    Ok((status, String::from_utf8(bytes.to_vec())?, headers))
}

pub(crate) async fn get(
    state: &Arc<QueryState>,
    key: Option<&str>,
    path: &str,
) -> Result<(StatusCode, Value, HeaderMap)> {
    let (status, text, headers) = get_raw(state, key, path, None).await?;
    let body = serde_json::from_str(&text).with_context(|| format!("GET {path}: not JSON: {text}"))?;
    Ok((status, body, headers))
}

fn hours(n: i64) -> time::Duration {
    time::Duration::hours(n)
}

async fn listing_filters_pages_and_streams_csv(backend: Backend) -> Result<()> {
    let fixture = Fixture::start(backend, Duration::from_secs(15)).await?;
    let now = OffsetDateTime::now_utc();
    let sent: Vec<Sent> =
        (0..25).map(|i| Sent::new(i, now - time::Duration::minutes(37 * (i as i64 + 1)))).collect();
    fixture.ingest(&sent, &fixture.edge.key).await?;
    let mut newest_first = sent.clone();
    newest_first.sort_by_key(|sent| std::cmp::Reverse((sent.at, sent.id)));

    let body = fixture.ok("/api/v1/usage?tenant_id=acme").await?;
    ensure!(body["total_count"] == 25 && body["has_more"] == false, "{body}");
    let events = body["events"].as_array().context("events")?;
    let ids: Vec<String> =
        events.iter().map(|event| event["event_id"].as_str().unwrap_or("").to_owned()).collect();
    let expected: Vec<String> = newest_first.iter().map(|sent| sent.id.to_string()).collect();
    ensure!(ids == expected, "newest first");
    let first = &events[0];
    let source = &newest_first[0];
    ensure!(first["user_id"] == source.user.as_str() && first["model"] == json!(source.model), "{first}");
    ensure!(first["metrics"]["input_tokens"] == source.input_tokens, "{first}");
    ensure!(
        first["total_cost"].is_null() && first.get("billing_info").is_none(),
        "unpriced, no billing: {first}"
    );
    ensure!(
        first["tags"] == json!(["t1"]) && first["metadata"]["region"] == "eu" && first["session_id"] == "s-1"
    );
    ensure!(
        parse_time(&first["timestamp"])? == source.at.replace_nanosecond(source.at.microsecond() * 1000)?
    );
    let with_images = events.iter().find(|event| !event["metrics"]["images"].is_null()).context("custom")?;
    ensure!(with_images["metrics"]["images"] == 2, "{with_images}");

    let billed = fixture.ok("/api/v1/usage?include_billing=true&limit=1").await?;
    ensure!(billed["events"][0]["billing_info"] == json!({"total_cost": null, "priced": false}), "{billed}");

    for (filter, keep) in [
        (
            "service_type=custom",
            Box::new(|s: &Sent| s.service_type == "custom") as Box<dyn Fn(&Sent) -> bool>,
        ),
        ("user_id=user-2", Box::new(|s: &Sent| s.user == "user-2")),
        ("status=error", Box::new(|s: &Sent| s.error)),
        ("model=model-b&service_provider=prov-b", Box::new(|s: &Sent| s.model == Some("model-b"))),
    ] {
        let body = fixture.ok(&format!("/api/v1/usage?{filter}")).await?;
        let expected = sent.iter().filter(|s| keep(s)).count();
        ensure!(body["total_count"] == expected, "{filter}: total {}", body["total_count"]);
        ensure!(body["events"].as_array().map(Vec::len) == Some(expected), "{filter}: events");
    }

    // Keyset pages: every event once, in order, with the first page's total.
    let (mut cursor, mut seen) = (None::<String>, Vec::new());
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/api/v1/usage?limit=7&cursor={cursor}"),
            None => "/api/v1/usage?limit=7".to_owned(),
        };
        let page = fixture.ok(&path).await?;
        ensure!(page["total_count"] == 25, "{page}");
        seen.extend(
            page["events"]
                .as_array()
                .context("events")?
                .iter()
                .map(|e| e["event_id"].as_str().unwrap_or("").to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => {
                ensure!(page["has_more"] == true);
                cursor = Some(next.to_owned());
            }
            None => break,
        }
    }
    ensure!(seen == expected, "cursor pages cover every event once, in order");
    let tail = fixture.ok("/api/v1/usage?limit=10&offset=20").await?;
    ensure!(tail["events"].as_array().map(Vec::len) == Some(5) && tail["has_more"] == false, "{tail}");
    let exact_page = fixture.ok("/api/v1/usage?limit=25").await?;
    ensure!(exact_page["has_more"] == false && exact_page["next_cursor"].is_null(), "{exact_page}");

    for (path, accept) in [("/api/v1/usage?format=csv", None), ("/api/v1/usage", Some("text/csv"))] {
        let (status, text, headers) = get_raw(&fixture.state, Some(&fixture.edge.key), path, accept).await?;
        ensure!(status == StatusCode::OK, "{text}");
        ensure!(
            headers["content-type"].to_str()?.starts_with("text/csv") && headers["x-total-count"] == "25"
        );
        let lines: Vec<&str> = text.lines().collect();
        ensure!(lines.len() == 26 && lines[0].starts_with("event_id,timestamp,user_id"), "{text}");
        ensure!(lines[1].starts_with(&newest_first[0].id.to_string()), "csv newest first");
    }
    Ok(())
}

/// By default (`edges=hour`) a range is widened to the whole UTC hours it touches, answered
/// from rollups alone and says so; `edges=exact` counts to the microsecond.
async fn range_edges_widen_to_whole_hours_unless_exact(backend: Backend) -> Result<()> {
    let fixture = Fixture::start(backend, Duration::ZERO).await?;
    let hour =
        OffsetDateTime::now_utc().replace_minute(0)?.replace_second(0)?.replace_nanosecond(0)? - hours(30);
    let sent: Vec<Sent> = [5, 20, 50, 65, 130, 175, 190]
        .iter()
        .enumerate()
        .map(|(index, minutes)| Sent::new(index, hour + time::Duration::minutes(*minutes)))
        .collect();
    fixture.commit(fixture.edge.tenant.id, &sent).await?;
    let (start, end) = (hour + time::Duration::minutes(15), hour + time::Duration::minutes(170));
    let (whole_start, whole_end) = (hour, hour + hours(3));
    for (edges, from, to) in [("hour", whole_start, whole_end), ("exact", start, end)] {
        let path = format!(
            "/api/v1/usage/aggregate?group_by=none&start_date={}&end_date={}&edges={edges}",
            rfc3339(start),
            rfc3339(end)
        );
        let body = fixture.ok(&path).await?;
        ensure!(parse_time(&body["start_date"])? == start && parse_time(&body["end_date"])? == end, "{body}");
        ensure!(
            parse_time(&body["effective_start"])? == from && parse_time(&body["effective_end"])? == to,
            "{edges}: {body}"
        );
        ensure!(body["edges"] == edges, "{body}");
        let expected = sums(sent.iter().filter(|s| s.at >= from && s.at < to));
        check_totals(&body["total_aggregates"], &expected, true, &path)?;
    }
    // Every endpoint of the family says which range it counted.
    for path in ["/api/v1/usage/costs", "/api/v1/analytics/top-users", "/api/v1/analytics/errors"] {
        let body =
            fixture.ok(&format!("{path}?start_date={}&end_date={}", rfc3339(start), rfc3339(end))).await?;
        ensure!(parse_time(&body["effective_start"])? == whole_start, "{path}: {body}");
    }
    let (status, body, _) = fixture.get(Some(&fixture.edge.key), "/api/v1/usage/costs?edges=minute").await?;
    ensure!(status == StatusCode::BAD_REQUEST && body["detail"].to_string().contains("edges"), "{body}");
    Ok(())
}

/// Events every 7 hours at :10 and :50 from 9 days before a month's start to 3 days after it,
/// so the range crosses a month, a week and many days.
fn month_boundary_events(now: OffsetDateTime) -> (OffsetDateTime, Vec<Sent>) {
    let month_start = |date: Date| date.replace_day(1).expect("day 1").with_time(Time::MIDNIGHT).assume_utc();
    let mut anchor = month_start(now.date());
    if now - anchor < time::Duration::days(4) {
        anchor = month_start(anchor.date() - time::Duration::days(1));
    }
    let mut sent = Vec::new();
    let mut at = anchor - time::Duration::days(9);
    let mut index = 0;
    while at < anchor + time::Duration::days(3) {
        for minute in [10, 50] {
            sent.push(Sent::new(index, at + time::Duration::minutes(minute)));
            index += 1;
        }
        at += hours(7);
    }
    (anchor, sent)
}

async fn aggregates_match_sums_of_the_events_sent(backend: Backend) -> Result<()> {
    let fixture = Fixture::start(backend, Duration::from_secs(15)).await?;
    let (anchor, sent) = month_boundary_events(OffsetDateTime::now_utc());
    fixture.commit(fixture.edge.tenant.id, &sent).await?;
    // Range edges inside hours: the partial hours are read from raw events.
    let (start, end) = (
        anchor - time::Duration::days(9) + time::Duration::minutes(30),
        anchor + time::Duration::days(3) - time::Duration::minutes(40),
    );
    let in_range: Vec<Sent> = sent.iter().filter(|s| s.at >= start && s.at < end).cloned().collect();
    ensure!(in_range.len() + 2 <= sent.len(), "the range cuts events at both ends");
    let range = format!("start_date={}&end_date={}&edges=exact", rfc3339(start), rfc3339(end));

    let day = |s: &Sent| s.at.date();
    let week =
        |s: &Sent| s.at.date() - time::Duration::days(i64::from(s.at.weekday().number_days_from_monday()));
    let month = |s: &Sent| s.at.date().replace_day(1).expect("day 1");
    for (period, bucket) in [("day", &day as &dyn Fn(&Sent) -> Date), ("week", &week), ("month", &month)] {
        let body =
            fixture.ok(&format!("/api/v1/usage/aggregate?period={period}&group_by=none&{range}")).await?;
        let rows = body["aggregations"].as_array().context("rows")?;
        let buckets: BTreeSet<Date> = in_range.iter().map(bucket).collect();
        ensure!(rows.len() == buckets.len(), "{period}: {} rows for {} buckets", rows.len(), buckets.len());
        for (row, bucket_start) in rows.iter().zip(&buckets) {
            ensure!(
                parse_time(&row["period_start"])? == bucket_start.with_time(Time::MIDNIGHT).assume_utc(),
                "{period}: {row}"
            );
            let expected = sums(in_range.iter().filter(|s| bucket(s) == *bucket_start));
            check_totals(row, &expected, true, &format!("{period} {bucket_start}"))?;
            ensure!(row["aggregated_metrics"]["images"] == expected.images, "{period}: images {row}");
        }
    }
    let hourly = fixture
        .ok(&format!("/api/v1/usage/aggregate?period=hour&group_by=service_type,model&{range}"))
        .await?;
    let mut groups: BTreeMap<(OffsetDateTime, String, String), Vec<Sent>> = BTreeMap::new();
    for s in &in_range {
        let hour = s.at.replace_minute(0)?.replace_second(0)?.replace_nanosecond(0)?;
        groups
            .entry((hour, s.service_type.to_owned(), s.model.unwrap_or("").to_owned()))
            .or_default()
            .push(s.clone());
    }
    let rows = hourly["aggregations"].as_array().context("rows")?;
    ensure!(rows.len() == groups.len(), "hourly groups {} != {}", rows.len(), groups.len());
    for row in rows {
        let key = (
            parse_time(&row["period_start"])?,
            row["service_type"].as_str().unwrap_or("").to_owned(),
            row["model"].as_str().unwrap_or("").to_owned(),
        );
        let expected = groups.get(&key).with_context(|| format!("unexpected group {row}"))?;
        check_totals(row, &sums(expected), true, "hour")?;
    }

    // Filtered by user: latency count and mean stay exact, and there are no percentiles (latency
    // histograms are kept per service and hour, not per user).
    let user =
        in_range.iter().find(|s| s.latency_ms.is_some()).context("an event with a latency")?.user.clone();
    let body = fixture
        .ok(&format!("/api/v1/usage/aggregate?period=month&group_by=none&user_id={user}&{range}"))
        .await?;
    let rows = body["aggregations"].as_array().context("rows")?;
    ensure!(!rows.is_empty(), "{body}");
    for row in rows {
        let month_start = parse_time(&row["period_start"])?.date();
        let of_user: Vec<&Sent> =
            in_range.iter().filter(|s| s.user == user && month(s) == month_start).collect();
        let expected = sums(of_user.iter().copied());
        ensure!(row["event_count"] == expected.events, "{user}: {row}");
        ensure!(row["latency_count"] == expected.latencies_ms.len(), "{user}: {row}");
        for field in ["latency_p50_ms", "latency_p95_ms", "latency_p99_ms"] {
            ensure!(row[field].is_null(), "{user}: {field} is not kept per user: {row}");
        }
        if !expected.latencies_ms.is_empty() {
            let mean = expected.latencies_ms.iter().sum::<f64>() / expected.latencies_ms.len() as f64;
            let avg = row["latency_avg_ms"].as_f64().context("latency_avg_ms")?;
            ensure!((avg - mean).abs() < 0.001, "{user}: mean {avg} != {mean}");
        }
    }

    let all = sums(&in_range);
    let body = fixture.ok(&format!("/api/v1/usage/by-service?top_users=2&{range}")).await?;
    check_totals(&body["totals"], &all, true, "by-service totals")?;
    let services = body["services"].as_array().context("services")?;
    ensure!(services.len() == 3, "{body}");
    for service in services {
        let of_service: Vec<&Sent> = in_range
            .iter()
            .filter(|s| {
                s.service_type == service["service_type"] && s.provider == service["service_provider"]
            })
            .collect();
        let expected = sums(of_service.iter().copied());
        check_totals(service, &expected, true, "by-service")?;
        let share = service["share_of_events"].as_f64().context("share")?;
        ensure!((share - expected.events as f64 / all.events as f64).abs() < 1e-6);
        let mut per_user: BTreeMap<String, Decimal> = BTreeMap::new();
        for s in &of_service {
            *per_user.entry(s.user.clone()).or_default() += s.cost.unwrap_or_default();
        }
        let best = per_user.values().max().copied().unwrap_or_default();
        let top = &service["top_users"];
        ensure!(top.as_array().map(Vec::len) == Some(2) && money(&top[0]["total_cost"])? == best, "{top}");
    }

    let costs = fixture.ok(&format!("/api/v1/usage/costs?group_by=week&{range}")).await?;
    ensure!(
        money(&costs["total_cost"])? == all.cost && costs["unpriced_event_count"] == all.unpriced,
        "{costs}"
    );
    for slice in costs["cost_by_model"].as_array().context("by model")? {
        let expected = sums(in_range.iter().filter(|s| s.model.unwrap_or("") == slice["model"]));
        ensure!(
            money(&slice["total_cost"])? == expected.cost && slice["event_count"] == expected.events,
            "{slice}"
        );
    }
    for slice in costs["cost_by_service"].as_array().context("by service")? {
        let expected =
            sums(in_range.iter().filter(|s| slice["key"] == format!("{}:{}", s.service_type, s.provider)));
        ensure!(
            money(&slice["total_cost"])? == expected.cost
                && slice["unpriced_event_count"] == expected.unpriced,
            "{slice}"
        );
    }
    let weeks: BTreeSet<Date> = in_range.iter().map(week).collect();
    let by_period = costs["cost_by_period"].as_array().context("by period")?;
    ensure!(by_period.len() == weeks.len(), "{by_period:?}");
    for (slice, week_start) in by_period.iter().zip(&weeks) {
        let expected = sums(in_range.iter().filter(|s| week(s) == *week_start));
        ensure!(money(&slice["total_cost"])? == expected.cost, "week {week_start}: {slice}");
    }

    let trends = fixture
        .ok(&format!(
            "/api/v1/analytics/trends?metric=input_tokens&period=day&service_type=llm_service&{range}"
        ))
        .await?;
    let points = trends["data_points"].as_array().context("points")?;
    let days: Vec<Date> = (0..)
        .map(|d| start.date() + time::Duration::days(d))
        .take_while(|d| d.with_time(Time::MIDNIGHT).assume_utc() < end)
        .collect();
    ensure!(points.len() == days.len(), "every day of the range, zeros included: {}", points.len());
    let mut values = Vec::new();
    for (point, day_date) in points.iter().zip(&days) {
        let expected: i64 = in_range
            .iter()
            .filter(|s| s.service_type == "llm_service" && s.at.date() == *day_date)
            .map(|s| s.input_tokens)
            .sum();
        ensure!(point["value"] == expected, "{day_date}: {point}");
        values.push(expected as f64);
    }
    let half = values.len() / 2;
    let (first, second) = (
        values[..half].iter().sum::<f64>() / half as f64,
        values[values.len() - half..].iter().sum::<f64>() / half as f64,
    );
    let change = (second - first) / first * 100.0;
    ensure!((trends["percentage_change"].as_f64().context("change")? - change).abs() < 0.01, "{trends}");
    let direction = if change > 5.0 {
        "up"
    } else if change < -5.0 {
        "down"
    } else {
        "stable"
    };
    ensure!(trends["trend"] == direction, "{trends}");

    let top = fixture.ok(&format!("/api/v1/analytics/top-users?by=input_tokens&limit=3&{range}")).await?;
    let mut per_user: BTreeMap<String, i64> = BTreeMap::new();
    for s in &in_range {
        *per_user.entry(s.user.clone()).or_default() += s.input_tokens;
    }
    let mut ranked: Vec<(String, i64)> = per_user.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let users = top["users"].as_array().context("users")?;
    ensure!(top["total_users"] == 5 && users.len() == 3, "{top}");
    for (user, (name, tokens)) in users.iter().zip(&ranked) {
        ensure!(user["user_id"] == name.as_str() && user["value"] == *tokens, "{user} vs {name} {tokens}");
    }

    let breakdown =
        fixture.ok(&format!("/api/v1/analytics/breakdown?group_by=model,user_id&{range}")).await?;
    check_totals(&breakdown["totals"], &all, true, "breakdown totals")?;
    let rows = breakdown["rows"].as_array().context("rows")?;
    let pairs: BTreeSet<(&str, &str)> =
        in_range.iter().map(|s| (s.model.unwrap_or(""), s.user.as_str())).collect();
    ensure!(rows.len() == pairs.len() && breakdown["total_groups"] == pairs.len(), "{} groups", rows.len());
    for row in rows {
        let expected = sums(in_range.iter().filter(|s| {
            row["key"]["model"] == s.model.unwrap_or("") && row["key"]["user_id"] == s.user.as_str()
        }));
        check_totals(row, &expected, true, "breakdown")?;
    }

    let errors = fixture.ok(&format!("/api/v1/analytics/errors?group_by=service_type,model&{range}")).await?;
    check_totals(&errors["totals"], &all, true, "errors totals")?;
    for row in errors["rows"].as_array().context("rows")? {
        let expected = sums(in_range.iter().filter(|s| {
            row["key"]["service_type"] == s.service_type && row["key"]["model"] == s.model.unwrap_or("")
        }));
        check_totals(row, &expected, true, "errors")?;
    }

    // The current period is the last 6 days of the events, the previous one the 6 before.
    let split = anchor - time::Duration::days(3);
    let (current_start, current_end) = (split, split + time::Duration::days(6));
    let compare = fixture
        .ok(&format!(
            "/api/v1/analytics/compare?group_by=service_type&start_date={}&end_date={}",
            rfc3339(current_start),
            rfc3339(current_end)
        ))
        .await?;
    let now_sums = sums(sent.iter().filter(|s| s.at >= current_start && s.at < current_end));
    let before_sums =
        sums(sent.iter().filter(|s| s.at >= current_start - time::Duration::days(6) && s.at < current_start));
    check_totals(&compare["current"]["totals"], &now_sums, true, "compare current")?;
    check_totals(&compare["previous"]["totals"], &before_sums, true, "compare previous")?;
    let change = (now_sums.events - before_sums.events) as f64 / before_sums.events as f64 * 100.0;
    ensure!(
        (compare["change"]["event_count_pct"].as_f64().context("pct")? - change).abs() < 0.01,
        "{compare}"
    );
    for row in compare["rows"].as_array().context("rows")? {
        let service = row["key"]["service_type"].clone();
        let current = sums(
            sent.iter().filter(|s| s.at >= current_start && s.at < current_end && service == s.service_type),
        );
        check_totals(&row["current"], &current, true, "compare row")?;
    }
    Ok(())
}

async fn days_and_weeks_follow_the_tenant_time_zone(backend: Backend) -> Result<()> {
    let fixture = Fixture::start(backend, Duration::from_secs(15)).await?;
    // Kolkata is UTC+05:30: local midnight is 18:30 UTC, inside a rollup hour.
    crate::support::set_time_zone(&fixture.edge, "Asia/Kolkata").await?;
    let now = OffsetDateTime::now_utc();
    let today = now.date().with_time(Time::MIDNIGHT).assume_utc();
    let mut sent = Vec::new();
    for days_ago in 2..=12 {
        for (hour, minute) in [(18, 10), (18, 20), (18, 40), (18, 55), (6, 0)] {
            let at = today - time::Duration::days(days_ago) + hours(hour) + time::Duration::minutes(minute);
            sent.push(Sent::new(sent.len(), at));
        }
    }
    fixture.ingest(&sent, &fixture.edge.key).await?;
    let kolkata = UtcOffset::from_hms(5, 30, 0)?;
    let local_day = |s: &Sent| s.at.to_offset(kolkata).date();
    // With `edges=hour` (the default) an hour that local midnight cuts counts in the day
    // holding its middle, here the later one: 18:10 UTC is 23:40 local but counts next day.
    let middle = |s: &Sent| s.at.replace_minute(0).expect("hour") + time::Duration::minutes(30);
    let hour_day = |s: &Sent| middle(s).to_offset(kolkata).date();
    let monday =
        |date: Date| date - time::Duration::days(i64::from(date.weekday().number_days_from_monday()));
    let local_week = |s: &Sent| monday(s.at.to_offset(kolkata).date());
    let hour_week = |s: &Sent| monday(middle(s).to_offset(kolkata).date());
    ensure!(sent.iter().any(|s| local_day(s) != hour_day(s)), "some events are counted differently");
    for (edges, period, bucket) in [
        ("exact", "day", &local_day as &dyn Fn(&Sent) -> Date),
        ("exact", "week", &local_week),
        ("hour", "day", &hour_day),
        ("hour", "week", &hour_week),
    ] {
        let path = format!("/api/v1/usage/aggregate?period={period}&group_by=none&edges={edges}");
        let body = fixture.ok(&path).await?;
        ensure!(body["time_zone"] == "Asia/Kolkata" && body["edges"] == edges, "{body}");
        let rows = body["aggregations"].as_array().context("rows")?;
        let buckets: BTreeSet<Date> = sent.iter().map(bucket).collect();
        ensure!(rows.len() == buckets.len(), "{path}: {} rows, {} buckets", rows.len(), buckets.len());
        for (row, local_start) in rows.iter().zip(&buckets) {
            let utc_start = local_start.with_time(Time::MIDNIGHT).assume_offset(kolkata);
            ensure!(parse_time(&row["period_start"])? == utc_start, "{path}: {row}");
            check_totals(row, &sums(sent.iter().filter(|s| bucket(s) == *local_start)), false, &path)?;
        }
    }
    // Dates without an offset are the tenant's local time.
    let day = local_day(&sent[0]);
    let next = day + time::Duration::days(1);
    let body = fixture.ok(&format!("/api/v1/usage?start_date={day}&end_date={next}")).await?;
    ensure!(body["total_count"] == sent.iter().filter(|s| local_day(s) == day).count(), "{body}");
    for (edges, bucket) in [("exact", &local_day as &dyn Fn(&Sent) -> Date), ("hour", &hour_day)] {
        let path = format!("/api/v1/analytics/trends?metric=event_count&period=day&edges={edges}");
        let trends = fixture.ok(&path).await?;
        let points = trends["data_points"].as_array().context("points")?;
        let mut counted = 0;
        for point in points {
            let start = parse_time(&point["period"])?;
            ensure!(start.to_offset(kolkata).time() == Time::MIDNIGHT, "local midnight: {point}");
            let expected = sent.iter().filter(|s| bucket(s) == start.to_offset(kolkata).date()).count();
            ensure!(point["value"] == expected, "{path}: {point}");
            counted += expected;
        }
        ensure!(counted == sent.len(), "{path}: {counted} of {} events in the points", sent.len());
    }
    Ok(())
}

/// Every data endpoint, with parameters that make each one answer.
const DATA_PATHS: &[&str] = &[
    "/api/v1/usage",
    "/api/v1/usage/aggregate",
    "/api/v1/usage/by-service",
    "/api/v1/usage/costs",
    "/api/v1/analytics/trends",
    "/api/v1/analytics/top-users",
    "/api/v1/analytics/breakdown",
    "/api/v1/analytics/compare",
    "/api/v1/analytics/errors",
    "/api/v1/billing/summary",
];

async fn every_endpoint_answers_for_its_own_tenant_only(backend: Backend) -> Result<()> {
    let fixture = Fixture::start(backend, Duration::from_secs(15)).await?;
    let (globex, globex_ingest_key) = fixture.edge.other_tenant("globex").await?;
    let globex_key = create_key(&fixture.edge.store, &globex, vec![Scope::Query]).await?;
    let now = OffsetDateTime::now_utc();
    let acme_events: Vec<Sent> = (0..12).map(|i| Sent::new(i, now - hours(i as i64 + 1))).collect();
    let globex_events: Vec<Sent> = (0..5).map(|i| Sent::new(i, now - hours(i as i64 + 2))).collect();
    fixture.ingest(&acme_events, &fixture.edge.key).await?;
    fixture.ingest(&globex_events, &globex_ingest_key).await?;

    for path in DATA_PATHS {
        let (acme, acme_body, _) = fixture.get(Some(&fixture.edge.key), path).await?;
        let (globex_status, globex_body, _) = fixture.get(Some(&globex_key), path).await?;
        ensure!(
            acme == StatusCode::OK && globex_status == StatusCode::OK,
            "{path}: {acme_body} / {globex_body}"
        );
        ensure!(acme_body != globex_body, "{path}: two tenants, one answer");
        let (status, body, _) = fixture.get(Some(&globex_key), &format!("{path}?tenant_id=acme")).await?;
        ensure!(status == StatusCode::FORBIDDEN && body["error"] == "forbidden", "{path}: {status} {body}");
        let (status, _, _) =
            fixture.get(Some(&globex_key), &format!("{path}?tenant_id={}", globex.id)).await?;
        ensure!(status == StatusCode::OK, "{path}: own tenant by id");
        let (status, body, _) = fixture.get(None, path).await?;
        ensure!(
            status == StatusCode::UNAUTHORIZED && body["error"] == "authentication_required",
            "{path}: {body}"
        );
        let (status, body, _) = fixture.get(Some("tly_not_a_key"), path).await?;
        ensure!(status == StatusCode::UNAUTHORIZED && body["error"] == "invalid_api_key", "{path}: {body}");
        let (status, body, _) = fixture.get(Some(&globex_ingest_key), path).await?;
        ensure!(
            status == StatusCode::FORBIDDEN && body["detail"].as_str().unwrap_or("").contains("query"),
            "{path}: {body}"
        );
    }
    let acme = fixture.ok("/api/v1/usage/aggregate?group_by=none&period=month").await?;
    let globex_view =
        get(&fixture.state, Some(&globex_key), "/api/v1/usage/aggregate?group_by=none&period=month").await?.1;
    let count = |body: &Value| {
        body["aggregations"]
            .as_array()
            .map(|rows| rows.iter().map(|row| row["event_count"].as_i64().unwrap_or(0)).sum::<i64>())
    };
    ensure!(count(&acme) == Some(12) && count(&globex_view) == Some(5), "{acme} / {globex_view}");
    let listing = get(&fixture.state, Some(&globex_key), "/api/v1/usage").await?.1;
    let ids: BTreeSet<&str> = listing["events"]
        .as_array()
        .context("events")?
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    let expected: BTreeSet<String> = globex_events.iter().map(|s| s.id.to_string()).collect();
    ensure!(ids == expected.iter().map(String::as_str).collect(), "globex lists only its own events");
    Ok(())
}

async fn cached_answers_are_stale_for_at_most_the_ttl(backend: Backend) -> Result<()> {
    let ttl = Duration::from_secs(1);
    let fixture = Fixture::start(backend, ttl).await?;
    let uncached = query_state(&fixture.edge, Duration::ZERO, None).await?;
    let now = OffsetDateTime::now_utc();
    fixture.ingest(&[Sent::new(0, now - hours(1))], &fixture.edge.key).await?;
    let path = "/api/v1/usage/by-service";
    let events = |body: &Value| body["totals"]["event_count"].as_i64();

    let (_, first, headers) = fixture.get(Some(&fixture.edge.key), path).await?;
    ensure!(events(&first) == Some(1) && headers["x-cache"] == "miss", "{first}");
    let as_of = |headers: &HeaderMap| -> Result<OffsetDateTime> {
        let text = headers.get("x-data-as-of").context("x-data-as-of")?.to_str()?;
        Ok(OffsetDateTime::parse(text, &Rfc3339)?)
    };
    let first_as_of = as_of(&headers)?;
    ensure!(first_as_of >= now && headers["age"] == "0", "{headers:?}");
    let (_, again, headers) = fixture.get(Some(&fixture.edge.key), path).await?;
    ensure!(again == first && headers["x-cache"] == "memory");
    ensure!(as_of(&headers)? == first_as_of, "a cached answer keeps the time its data was read");

    fixture.ingest(&[Sent::new(1, now - hours(2))], &fixture.edge.key).await?;
    let arrived = Instant::now();
    let (_, fresh, headers) = get(&uncached, Some(&fixture.edge.key), path).await?;
    ensure!(events(&fresh) == Some(2) && headers["x-cache"] == "miss", "without a cache: at once");
    loop {
        let (_, body, headers) = fixture.get(Some(&fixture.edge.key), path).await?;
        if events(&body) == Some(2) {
            ensure!(headers["x-cache"] == "miss", "a new answer is computed");
            break;
        }
        ensure!(events(&body) == Some(1) && headers["x-cache"] == "memory", "{body}");
        if arrived.elapsed() > ttl + Duration::from_secs(2) {
            bail!("the cached answer outlived its ttl of {ttl:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Redis: a second server (an empty memory cache) gets the first one's answer.
    let redis_url = tests::redis().await.url();
    let long = Duration::from_secs(30);
    let (one, two) = (
        query_state(&fixture.edge, long, Some(redis_url.clone())).await?,
        query_state(&fixture.edge, long, Some(redis_url)).await?,
    );
    let path = "/api/v1/analytics/errors";
    let (_, answer, headers) = get(&one, Some(&fixture.edge.key), path).await?;
    ensure!(headers["x-cache"] == "miss", "first ask");
    let (_, shared, headers) = get(&two, Some(&fixture.edge.key), path).await?;
    ensure!(shared == answer && headers["x-cache"] == "redis", "{headers:?}");
    let (globex, _) = fixture.edge.other_tenant("globex").await?;
    let globex_key = create_key(&fixture.edge.store, &globex, vec![Scope::Query]).await?;
    let (_, other, headers) = get(&two, Some(&globex_key), path).await?;
    ensure!(
        headers["x-cache"] == "miss" && other["totals"]["event_count"] == 0,
        "never another tenant's entry"
    );
    Ok(())
}

async fn bad_parameters_are_refused_by_name(backend: Backend) -> Result<()> {
    let fixture = Fixture::start(backend, Duration::from_secs(15)).await?;
    for path in DATA_PATHS {
        let (status, body, _) = fixture.get(Some(&fixture.edge.key), &format!("{path}?bogus=1")).await?;
        ensure!(status == StatusCode::BAD_REQUEST && body["error"] == "invalid_parameter", "{path}: {body}");
        ensure!(body["detail"].as_str().unwrap_or("").contains("bogus"), "{path}: names the field: {body}");
        if path.starts_with("/api/v1/billing") {
            continue; // A bill covers one month, named by `month`.
        }
        let too_long = format!("{path}?start_date=2020-01-01T00:00:00Z&end_date=2021-06-01T00:00:00Z");
        let (status, body, _) = fixture.get(Some(&fixture.edge.key), &too_long).await?;
        ensure!(
            status == StatusCode::BAD_REQUEST && body["detail"].as_str().unwrap_or("").contains("400 days"),
            "{path}: {body}"
        );
    }
    for (path, field) in [
        ("/api/v1/usage/aggregate?period=fortnight", "period"),
        ("/api/v1/usage/aggregate?group_by=tenant_id", "group_by"),
        ("/api/v1/usage/aggregate?start_date=yesterday", "start_date"),
        ("/api/v1/usage?start_date=2026-01-02T00:00:00Z&end_date=2026-01-01T00:00:00Z", "start_date"),
        ("/api/v1/usage?limit=0", "limit"),
        ("/api/v1/usage?limit=10001", "limit"),
        ("/api/v1/usage?offset=-1", "offset"),
        ("/api/v1/usage?cursor=c1deadbeef", "cursor"),
        ("/api/v1/usage?status=maybe", "status"),
        ("/api/v1/usage?format=xml", "format"),
        ("/api/v1/usage?include_billing=perhaps", "include_billing"),
        ("/api/v1/usage/by-service?limit=51", "limit"),
        ("/api/v1/usage/costs?group_by=quarter", "group_by"),
        ("/api/v1/analytics/trends?metric=revenue", "metric"),
        ("/api/v1/analytics/trends?metric=custom:Robert');DROP", "metric"),
        ("/api/v1/analytics/top-users?by=error_rate", "by"),
        ("/api/v1/analytics/breakdown?group_by=model,user_id,event_type", "group_by"),
        ("/api/v1/analytics/compare?group_by=model,user_id", "group_by"),
        ("/api/v1/billing/summary?month=2026-13", "month"),
    ] {
        let (status, body, _) = fixture.get(Some(&fixture.edge.key), path).await?;
        ensure!(
            status == StatusCode::BAD_REQUEST && body["error"] == "invalid_parameter",
            "{path}: {status} {body}"
        );
        ensure!(
            body["detail"].as_str().unwrap_or("").starts_with(field),
            "{path}: detail names {field}: {body}"
        );
    }
    // User strings are bound parameters: a hostile value is just a value that matches nothing.
    let (status, body, _) =
        fixture.get(Some(&fixture.edge.key), "/api/v1/usage?service_type=x%27%20OR%201%3D1--").await?;
    ensure!(status == StatusCode::OK && body["total_count"] == 0, "{body}");
    Ok(())
}

async fn docs_health_and_metrics_are_served(backend: Backend) -> Result<()> {
    let fixture = Fixture::start(backend, Duration::from_secs(15)).await?;
    let (status, spec, _) = get(&fixture.state, None, "/openapi.json").await?;
    ensure!(status == StatusCode::OK && spec["openapi"].as_str().unwrap_or("").starts_with("3."), "{spec}");
    for path in DATA_PATHS {
        ensure!(spec["paths"][path]["get"].is_object(), "{path} is documented");
    }
    let (status, html, _) = get_raw(&fixture.state, None, "/docs/", None).await?;
    ensure!(status == StatusCode::OK && html.contains("swagger"), "offline docs: {status}");
    let (status, body, _) = get(&fixture.state, None, "/health").await?;
    ensure!(status == StatusCode::OK && body["status"] == "healthy", "{body}");
    ensure!(body["services"]["database"] == "healthy" && body["timestamp"].is_string(), "{body}");
    let (status, body, _) = get(&fixture.state, None, "/ready").await?;
    ensure!(status == StatusCode::OK && body["status"] == "ready", "{body}");
    let (status, _, _) = get_raw(&fixture.state, None, "/metrics", None).await?;
    ensure!(status == StatusCode::OK);
    // The edge mounts the listing alone on its port.
    let request =
        Request::builder().uri("/api/v1/usage").header("x-api-key", &fixture.edge.key).body(Body::empty())?;
    let response = query::usage_routes(fixture.state.clone()).oneshot(request).await?;
    ensure!(response.status() == StatusCode::OK);
    let request = Request::builder()
        .uri("/api/v1/usage/aggregate")
        .header("x-api-key", &fixture.edge.key)
        .body(Body::empty())?;
    ensure!(
        query::usage_routes(fixture.state.clone()).oneshot(request).await?.status() == StatusCode::NOT_FOUND
    );
    Ok(())
}
