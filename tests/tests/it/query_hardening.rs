//! The query service against a hostile or careless client (issue 12): no date, filter, offset or
//! cursor, and no stored number however large, makes a handler panic or answer 500. A bad
//! parameter is a 400 that names it; a sum beyond what an exact decimal holds is a 422
//! `overflow` that names the figure. CSV cells never start a formula, and the listing's
//! `total_count` is counted by the server, never read from the cursor. On both backends.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use query::{QueryConfig, QueryState};
use rust_decimal::Decimal;
use serde_json::Value;
use sink::{EventRow, Retention};
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime, Time};
use tower::ServiceExt;

use crate::support::{Backend, Location, TestEdge, both_backends};

both_backends!(
    dates_beyond_what_the_types_hold_are_refused_by_name,
    control_characters_in_filters_are_refused_by_name,
    offsets_beyond_what_the_database_holds_are_refused,
    csv_cells_never_start_a_formula,
    the_cursor_total_is_counted_not_trusted,
    sums_beyond_the_largest_decimal_are_an_overflow,
    a_projection_beyond_the_largest_decimal_is_an_overflow,
);

/// A query service over the edge's database, whichever backend it is.
pub(crate) async fn query_state(edge: &TestEdge, cache_ttl: Duration) -> Result<Arc<QueryState>> {
    let config = QueryConfig { cache_ttl, ..QueryConfig::new(edge.db.url.clone()) };
    match &edge.db.location {
        Location::Postgres(_) => Ok(QueryState::connect(config).await?),
        Location::Sqlite(file) => {
            let backend = query::sqlite::SqliteBackend::open(file.path()).await?;
            Ok(QueryState::with_backend(config, Arc::new(backend), None))
        }
    }
}

/// The status and the whole body as text (an error while streaming the body is an error here).
pub(crate) async fn get_text(state: &Arc<QueryState>, key: &str, path: &str) -> Result<(StatusCode, String)> {
    let request = Request::builder().uri(path).header("x-api-key", key).body(Body::empty())?;
    let response = query::router(state.clone()).oneshot(request).await?;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
        .await
        .with_context(|| format!("GET {path}: {status}, the body broke off"))?;
    Ok((status, String::from_utf8(bytes.to_vec())?))
}

async fn get(state: &Arc<QueryState>, key: &str, path: &str) -> Result<(StatusCode, Value)> {
    let (status, text) = get_text(state, key, path).await?;
    let body =
        serde_json::from_str(&text).with_context(|| format!("GET {path}: {status}, not JSON: {text}"))?;
    Ok((status, body))
}

/// Asserts a 400 `invalid_parameter` whose detail starts with `field`.
async fn refused(state: &Arc<QueryState>, key: &str, path: &str, field: &str) -> Result<()> {
    let (status, body) = get(state, key, path).await?;
    ensure!(
        status == StatusCode::BAD_REQUEST && body["error"] == "invalid_parameter",
        "GET {path}: want 400 invalid_parameter, got {status} {body}"
    );
    let detail = body["detail"].as_str().unwrap_or_default();
    ensure!(detail.starts_with(field), "GET {path}: the detail names {field}: {body}");
    Ok(())
}

/// Stores events straight through the sink, with the given costs (one commit each, so that no
/// commit sums two of them), with partitions 80 days back.
pub(crate) async fn commit(edge: &TestEdge, events: Vec<(wire::Event, Option<Decimal>)>) -> Result<()> {
    let retention = Retention { partitions_behind_days: 80, ..Retention::default() };
    edge.store.maintain(&retention).await?;
    for (event, cost) in events {
        edge.store.commit(&[EventRow::new(edge.tenant.id, event, cost)]).await?;
    }
    Ok(())
}

pub(crate) fn event_at(user: &str, at: OffsetDateTime) -> wire::Event {
    wire::Event::new(user, "custom", "p", "job")
        .at(i64::try_from(at.unix_timestamp_nanos() / 1000).unwrap_or_default())
        .with_quantity(wire::QuantityKind::Requests, 1.0)
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_default()
}

fn month_start(date: Date) -> OffsetDateTime {
    date.replace_day(1).unwrap_or(date).with_time(Time::MIDNIGHT).assume_utc()
}

async fn dates_beyond_what_the_types_hold_are_refused_by_name(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let state = query_state(&edge, Duration::from_secs(15)).await?;
    let key = &edge.key;
    for (path, field) in [
        (
            "/api/v1/analytics/trends?period=month&start_date=9999-12-01T00:00:00Z&end_date=9999-12-31T00:00:00Z",
            "start_date",
        ),
        ("/api/v1/analytics/trends?period=week&start_date=9999-12-20&end_date=9999-12-31", "start_date"),
        (
            "/api/v1/analytics/trends?metric=total_cost&period=month&end_date=9999-12-31T23:59:59.999999Z",
            "end_date",
        ),
        (
            "/api/v1/usage/costs?group_by=month&start_date=9999-11-01&end_date=9999-12-31T23:59:59Z",
            "start_date",
        ),
        ("/api/v1/usage/costs?group_by=week&end_date=9999-12-31T23:59:59Z", "end_date"),
        ("/api/v1/usage/aggregate?period=month&start_date=9999-12-01&end_date=9999-12-31", "start_date"),
        (
            "/api/v1/analytics/compare?start_date=0000-01-01T00:00:00Z&end_date=0000-12-01T00:00:00Z",
            "start_date",
        ),
        ("/api/v1/analytics/compare?end_date=0000-01-02", "end_date"),
        (
            "/api/v1/analytics/top-users?start_date=0000-01-01T00:00:00%2B23:59&end_date=0000-01-02",
            "start_date",
        ),
        (
            "/api/v1/analytics/breakdown?start_date=9998-12-31T23:00:00-23:59&end_date=9999-01-02",
            "start_date",
        ),
        (
            "/api/v1/analytics/errors?start_date=1969-12-31T00:00:00Z&end_date=1970-01-02T00:00:00Z",
            "start_date",
        ),
        ("/api/v1/usage/by-service?start_date=0001-01-01&end_date=0001-02-01", "start_date"),
        ("/api/v1/usage?start_date=0000-01-01&end_date=0000-01-02", "start_date"),
        ("/api/v1/usage?format=csv&end_date=9999-12-31T23:59:59.999999Z", "end_date"),
    ] {
        refused(&state, key, path, field).await?;
    }
    // The bounds themselves are served, by every period, also where the range is read as
    // the week or month around it and as the period before it.
    for path in [
        "/api/v1/analytics/trends?period=month&start_date=9998-12-01&end_date=9999-01-01",
        "/api/v1/analytics/trends?period=week&start_date=9998-12-01&end_date=9999-01-01T00:00:00Z",
        "/api/v1/usage/costs?group_by=month&start_date=9998-12-15&end_date=9999-01-01",
        "/api/v1/usage/aggregate?period=week&start_date=9998-12-15&end_date=9999-01-01",
        "/api/v1/analytics/compare?start_date=1970-01-01&end_date=1971-02-04",
        "/api/v1/analytics/compare?start_date=9998-01-01&end_date=9999-01-01",
        "/api/v1/usage?start_date=1970-01-01T00:00:00Z&end_date=1970-01-02T00:00:00Z",
        "/api/v1/billing/summary?month=1970-01",
    ] {
        let (status, body) = get(&state, key, path).await?;
        ensure!(status == StatusCode::OK, "GET {path}: {status} {body}");
    }
    Ok(())
}

/// Each data endpoint with the filters it takes.
const FILTERS: &[(&str, &[&str])] = &[
    ("/api/v1/usage", &["service_type", "service_provider", "user_id", "model", "event_type"]),
    ("/api/v1/usage?format=csv", &["service_type", "service_provider", "user_id", "model", "event_type"]),
    ("/api/v1/usage/aggregate", &["service_type", "service_provider", "user_id", "model", "event_type"]),
    ("/api/v1/usage/costs", &["service_type", "service_provider", "user_id", "model"]),
    ("/api/v1/analytics/trends", &["service_type", "service_provider", "user_id", "model"]),
    ("/api/v1/analytics/top-users", &["service_type", "service_provider", "model", "event_type"]),
    ("/api/v1/analytics/breakdown", &["service_type", "service_provider", "user_id", "model", "event_type"]),
    ("/api/v1/analytics/compare", &["service_type", "service_provider", "model"]),
    ("/api/v1/analytics/errors", &["service_type", "service_provider", "model"]),
];

async fn control_characters_in_filters_are_refused_by_name(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    commit(&edge, vec![(event_at("u1", OffsetDateTime::now_utc() - time::Duration::hours(1)), None)]).await?;
    let state = query_state(&edge, Duration::from_secs(15)).await?;
    for (endpoint, fields) in FILTERS {
        let separator = if endpoint.contains('?') { '&' } else { '?' };
        for field in *fields {
            for value in ["a%00b", "%00", "u1%0A", "%1B%5B31m"] {
                let path = format!("{endpoint}{separator}{field}={value}");
                refused(&state, &edge.key, &path, field).await?;
            }
        }
    }
    // Not a cursor this API wrote; another tenant's name: neither reaches the database.
    refused(&state, &edge.key, "/api/v1/usage?cursor=c2%00", "cursor").await?;
    let (status, body) = get(&state, &edge.key, "/api/v1/usage?tenant_id=a%00b").await?;
    ensure!(status == StatusCode::FORBIDDEN, "{status} {body}");
    // A plain filter still matches.
    let (status, body) = get(&state, &edge.key, "/api/v1/usage?user_id=u1").await?;
    ensure!(status == StatusCode::OK && body["total_count"] == 1, "{status} {body}");
    Ok(())
}

async fn offsets_beyond_what_the_database_holds_are_refused(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let now = OffsetDateTime::now_utc();
    let events = (1..=3).map(|hours| (event_at("u1", now - time::Duration::hours(hours)), None)).collect();
    commit(&edge, events).await?;
    let state = query_state(&edge, Duration::from_secs(15)).await?;
    for offset in ["18446744073709551615", "9223372036854775808", "18446744073709551616", "1e3", "-0"] {
        for format in ["json", "csv"] {
            refused(&state, &edge.key, &format!("/api/v1/usage?format={format}&offset={offset}"), "offset")
                .await?;
        }
    }
    for limit in ["0", "10001", "4294967296", "-1"] {
        refused(&state, &edge.key, &format!("/api/v1/usage?limit={limit}"), "limit").await?;
    }
    // The largest offset is served: an empty page, whole, with the true total.
    let (status, body) = get(&state, &edge.key, "/api/v1/usage?offset=9223372036854775807").await?;
    ensure!(status == StatusCode::OK, "{status} {body}");
    ensure!(body["total_count"] == 3 && body["events"] == serde_json::json!([]), "{body}");
    ensure!(body["has_more"] == false && body["offset"] == 9_223_372_036_854_775_807_u64, "{body}");
    let (status, body) = get(&state, &edge.key, "/api/v1/usage?offset=2&limit=10000").await?;
    ensure!(status == StatusCode::OK && body["events"].as_array().map(Vec::len) == Some(1), "{body}");
    Ok(())
}

/// Splits RFC 4180 CSV into records of fields (quoted fields may hold commas, quotes, breaks).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let (mut records, mut record, mut field) = (Vec::new(), Vec::new(), String::new());
    let (mut quoted, mut chars) = (false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') if chars.peek() == Some(&'\n') => {
                chars.next();
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    records
}

async fn csv_cells_never_start_a_formula(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let now = OffsetDateTime::now_utc();
    let users = [
        "=cmd|' /C calc'!A0",
        "@SUM(1+1)*cmd|' /C calc'!A0",
        "+1+1",
        "-2+3",
        "=HYPERLINK(\"http://evil\",\"x\")",
        "-42",
        "plain",
    ];
    let events = users
        .iter()
        .enumerate()
        .map(|(index, user)| {
            let event = event_at(user, now - time::Duration::minutes(index as i64 + 1))
                .with_tag("=1+1")
                .with_session_id("-s")
                .with_request_id("@r");
            (event, Some(Decimal::new(-125, 2)))
        })
        .collect();
    commit(&edge, events).await?;
    let state = query_state(&edge, Duration::from_secs(15)).await?;
    let (status, text) = get_text(&state, &edge.key, "/api/v1/usage?format=csv").await?;
    ensure!(status == StatusCode::OK, "{status} {text}");
    let records = parse_csv(&text);
    ensure!(records.len() == users.len() + 1, "a header and one row per event: {text}");
    let column = |name: &str| records[0].iter().position(|column| column == name).context("column");
    let (user, tags, session, request, cost) = (
        column("user_id")?,
        column("tags")?,
        column("session_id")?,
        column("request_id")?,
        column("total_cost")?,
    );
    for record in &records[1..] {
        for field in record {
            let dangerous = field.starts_with(['=', '+', '-', '@', '\t', '\r']);
            ensure!(
                !dangerous || field.parse::<Decimal>().is_ok(),
                "a formula cell: {field:?} in {record:?}"
            );
        }
        let sent = record[user].strip_prefix('\'').unwrap_or(&record[user]);
        ensure!(users.contains(&sent), "the user id, behind one quote at most: {record:?}");
        let escaped = !matches!(sent, "-42" | "plain");
        ensure!(record[user].starts_with('\'') == escaped, "{record:?}");
        ensure!(
            record[tags] == "'=1+1" && record[session] == "'-s" && record[request] == "'@r",
            "{record:?}"
        );
        // A negative amount is a number, written as one.
        ensure!(record[cost] == "-1.25", "{record:?}");
    }
    Ok(())
}

/// The listing's cursor after `limit` events, rewritten as a cursor of the older format that
/// claims `total` events.
fn forged(cursor: &str, total: i64) -> String {
    format!("c1{}{total:016x}", &cursor[2..50])
}

async fn the_cursor_total_is_counted_not_trusted(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let now = OffsetDateTime::now_utc();
    let events = (1..=3).map(|hours| (event_at("u1", now - time::Duration::hours(hours)), None)).collect();
    commit(&edge, events).await?;
    // Without a response cache, every page counts afresh.
    let state = query_state(&edge, Duration::ZERO).await?;
    let (status, first) = get(&state, &edge.key, "/api/v1/usage?limit=1").await?;
    ensure!(status == StatusCode::OK && first["total_count"] == 3, "{status} {first}");
    let cursor = first["next_cursor"].as_str().context("a next page")?.to_owned();
    for total in [999_999, -5, 0] {
        let path = format!("/api/v1/usage?limit=1&cursor={}", forged(&cursor, total));
        let (status, page) = get(&state, &edge.key, &path).await?;
        ensure!(status == StatusCode::OK && page["total_count"] == 3, "claimed {total}: {status} {page}");
        let (status, text) = get_text(&state, &edge.key, &format!("{path}&format=csv")).await?;
        ensure!(status == StatusCode::OK && text.lines().count() == 2, "claimed {total}: {status} {text}");
    }
    let (_, page) = get(&state, &edge.key, &format!("/api/v1/usage?limit=1&cursor={cursor}")).await?;
    ensure!(page["total_count"] == 3 && page["events"].as_array().map(Vec::len) == Some(1), "{page}");
    // A new event counts on the next page: the total is the server's, not the first page's.
    commit(&edge, vec![(event_at("u2", now - time::Duration::minutes(5)), None)]).await?;
    let (_, page) = get(&state, &edge.key, &format!("/api/v1/usage?limit=1&cursor={cursor}")).await?;
    ensure!(page["total_count"] == 4, "{page}");
    // With a response cache, later pages may reuse the first page's count: still the server's.
    let cached = query_state(&edge, Duration::from_secs(60)).await?;
    let (_, first) = get(&cached, &edge.key, "/api/v1/usage?limit=1").await?;
    let cursor = first["next_cursor"].as_str().context("a next page")?.to_owned();
    let (_, page) =
        get(&cached, &edge.key, &format!("/api/v1/usage?limit=1&cursor={}", forged(&cursor, 7))).await?;
    ensure!(first["total_count"] == 4 && page["total_count"] == 4, "{first} {page}");
    Ok(())
}

/// Half the largest decimal: one fits, two do not.
fn half_of_the_largest_decimal() -> Decimal {
    Decimal::MAX / Decimal::TWO
}

async fn sums_beyond_the_largest_decimal_are_an_overflow(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let this_month = month_start(OffsetDateTime::now_utc().date());
    let last_month = month_start((this_month - time::Duration::days(1)).date());
    let huge = half_of_the_largest_decimal() + Decimal::ONE;
    let events = vec![
        (event_at("u1", last_month + time::Duration::minutes(90)), Some(huge)),
        (event_at("u2", last_month + time::Duration::hours(25)), Some(huge)),
    ];
    commit(&edge, events).await?;
    let state = query_state(&edge, Duration::from_secs(15)).await?;
    let range = format!(
        "start_date={}&end_date={}",
        rfc3339(last_month),
        rfc3339(last_month + time::Duration::days(3))
    );
    let month = format!("{}-{:02}", last_month.year(), last_month.month() as u8);
    for (path, figure) in [
        (format!("/api/v1/billing/summary?month={month}"), "usage_cost"),
        (format!("/api/v1/usage/costs?{range}"), "cost"),
        (format!("/api/v1/analytics/breakdown?{range}"), "cost"),
        (format!("/api/v1/analytics/compare?{range}"), "cost"),
        (format!("/api/v1/analytics/top-users?{range}"), ""),
        // The listing's total is counted with the same sums.
        (format!("/api/v1/usage?{range}"), "cost"),
    ] {
        let (status, body) = get(&state, &edge.key, &path).await?;
        ensure!(
            status == StatusCode::UNPROCESSABLE_ENTITY && body["error"] == "overflow",
            "GET {path}: want 422 overflow, got {status} {body}"
        );
        let detail = body["detail"].as_str().unwrap_or_default();
        ensure!(detail.starts_with(figure), "GET {path}: names {figure}: {body}");
    }
    // A range that holds one of them is served, exactly (money is compared as text: it may be
    // a JSON string or number, and a float would not hold these digits).
    let one_day = format!(
        "start_date={}&end_date={}",
        rfc3339(last_month),
        rfc3339(last_month + time::Duration::days(1))
    );
    for path in [format!("/api/v1/usage/costs?{one_day}"), format!("/api/v1/usage?{one_day}")] {
        let (status, text) = get_text(&state, &edge.key, &path).await?;
        ensure!(status == StatusCode::OK && text.contains(&huge.to_string()), "GET {path}: {status} {text}");
    }
    Ok(())
}

async fn a_projection_beyond_the_largest_decimal_is_an_overflow(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    let this_month = month_start(OffsetDateTime::now_utc().date());
    commit(&edge, vec![(event_at("u1", this_month), Some(Decimal::MAX))]).await?;
    let state = query_state(&edge, Duration::from_secs(15)).await?;
    let month = format!("{}-{:02}", this_month.year(), this_month.month() as u8);
    let (status, body) = get(&state, &edge.key, &format!("/api/v1/billing/summary?month={month}")).await?;
    // The month so far is billed exactly; its projection to the month's end does not fit.
    ensure!(
        status == StatusCode::UNPROCESSABLE_ENTITY && body["error"] == "overflow",
        "want 422 overflow, got {status} {body}"
    );
    ensure!(body["detail"].as_str().unwrap_or_default().starts_with("projection."), "{body}");
    Ok(())
}
