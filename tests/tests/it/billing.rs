//! The billing summary, on PostgreSQL and on SQLite: events priced at ingest through the edge,
//! graduated, volume and minimum charges applied to the month's totals, every figure computed by
//! hand; and month bounds in the tenant's time zone.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use query::{QueryConfig, QueryState};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sink::{EventRow, Retention};
use time::{Date, OffsetDateTime, Time, UtcOffset};
use tower::ServiceExt;
use uuid::Uuid;

use crate::support::{Backend, Location, TestEdge, both_backends};

both_backends!(
    a_month_is_billed_with_tiers_minimums_and_unpriced_events,
    months_are_bounded_in_the_tenant_time_zone,
);

fn decimal(text: &str) -> Decimal {
    text.parse().expect("a decimal")
}

/// Money is a JSON number with the exact digits (short ones here, read back exactly).
fn money(value: &Value) -> Decimal {
    assert!(value.is_number(), "money is a number: {value}");
    let text = value.to_string();
    text.parse().or_else(|_| Decimal::from_scientific(&text)).unwrap_or_else(|_| panic!("not money: {value}"))
}

/// A query service over the edge's database, whichever backend it is.
async fn query_state(edge: &TestEdge) -> Result<Arc<QueryState>> {
    let config = QueryConfig {
        cache_ttl: Duration::from_millis(1),
        metrics: Some(crate::support::metrics_handle()),
        ..QueryConfig::new(edge.db.url.clone())
    };
    match &edge.db.location {
        Location::Postgres(_) => Ok(QueryState::connect(config).await?),
        Location::Sqlite(file) => {
            let backend = query::sqlite::SqliteBackend::open(file.path()).await?;
            Ok(QueryState::with_backend(config, Arc::new(backend), None))
        }
    }
}

async fn get(state: &Arc<QueryState>, key: &str, path: &str) -> Result<(StatusCode, Value)> {
    let request = Request::builder().uri(path).header("x-api-key", key).body(Body::empty())?;
    let response = query::router(state.clone()).oneshot(request).await?;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 16 << 20).await?;
    let body = serde_json::from_slice(&bytes).with_context(|| format!("GET {path}: not JSON"))?;
    Ok((status, body))
}

fn llm(user: &str, model: &str, input: f64, output: f64) -> Value {
    json!({"user_id": user, "service_type": "llm_service", "service_provider": "openai", "model": model,
        "input_tokens": input, "output_tokens": output})
}

async fn a_month_is_billed_with_tiers_minimums_and_unpriced_events(backend: Backend) -> Result<()> {
    let (edge, admin) = TestEdge::with_admin(backend).await?;
    let rules = [
        // g1 input: graduated, 1000 at 0.001 then 0.0005.
        json!({"service_type": "llm_service", "service_provider": "openai", "model": "g1",
            "unit": "input_tokens", "method": "graduated",
            "tiers": [{"up_to": "1000", "rate": "0.001"}, {"up_to": null, "rate": "0.0005"}]}),
        // g1 output: volume, up to 100 (inclusive) at 0.01, above at 0.005.
        json!({"service_type": "llm_service", "model": "g1", "unit": "output_tokens", "method": "volume",
            "tiers": [{"up_to": "100", "rate": "0.01"}, {"up_to": null, "rate": "0.005"}]}),
        // m1: per-unit input and package output, both per event.
        json!({"service_type": "llm_service", "service_provider": "openai", "model": "m1",
            "unit": "input_tokens", "method": "per_unit", "rate": "0.000003"}),
        json!({"service_type": "llm_service", "model": "m1", "unit": "output_tokens",
            "method": "package", "size": "1000", "price": "0.01"}),
        // Jobs: 0.25 each, at least 5 a month.
        json!({"service_type": "custom", "service_provider": "p", "unit": "events", "method": "per_unit",
            "rate": "0.25", "minimum_charge": "5"}),
    ];
    let mut rule_ids = Vec::new();
    for rule in rules {
        let (status, body) = edge.http("POST", "/api/v1/admin/prices", Some(&admin), rule).await?;
        ensure!(status == StatusCode::CREATED, "{body}");
        rule_ids.push(body["id"].as_str().context("rule id")?.to_owned());
    }
    let job = json!({"user_id": "u", "service_type": "custom", "service_provider": "p", "event_type": "job"});
    let events = json!({"events": [
        llm("a", "g1", 600.0, 50.0), llm("b", "g1", 500.0, 50.0), llm("c", "g1", 100.0, 0.0),
        llm("a", "m1", 1500.0, 1000.0), llm("b", "m1", 1.0, 1001.0), llm("c", "m1", 1.0, 1.0),
        job.clone(), job.clone(), job.clone(), job,
        llm("a", "zz-unknown", 10.0, 10.0), llm("b", "zz-unknown", 20.0, 20.0),
    ]});
    let (status, body) = edge.http("POST", "/api/v1/events/batch", Some(&edge.key), events).await?;
    ensure!(status == StatusCode::OK, "{body}");

    let state = query_state(&edge).await?;
    let (status, bill) = get(&state, &edge.key, "/api/v1/billing/summary").await?;
    ensure!(status == StatusCode::OK, "{bill}");
    // Per event: g1 0 (period rules only); m1 0.0045 + 0.01, 0.000003 + 0.02, 0.000003 + 0.01;
    // jobs 4 × 0.25. Period: g1 input 1200 = 1000 × 0.001 + 200 × 0.0005 = 1.1; g1 output 100,
    // exactly the first volume tier's bound: 100 × 0.01 = 1. Jobs charge 1 < 5: top-up 4.
    assert_eq!(bill["event_count"], 12);
    assert_eq!(bill["unpriced_event_count"], 2);
    assert_eq!(money(&bill["usage_cost"]), decimal("1.044506"));
    assert_eq!(money(&bill["tiered_charges"]), decimal("2.1"));
    assert_eq!(money(&bill["minimum_top_ups"]), decimal("4"));
    assert_eq!(money(&bill["total_cost"]), decimal("7.144506"));
    assert_eq!(bill["complete"], false);
    assert_eq!(money(&bill["unattributed_cost"]), Decimal::ZERO);
    assert_eq!(money(&bill["shared_period_charges"]), Decimal::ZERO);

    let services = bill["by_service"].as_array().context("by_service")?;
    let service = |model: &str| {
        services.iter().find(|line| line["model"] == model).unwrap_or_else(|| panic!("no {model} line"))
    };
    let cases =
        [("g1", "0", "2.1", "2.1", 0), ("m1", "0.044506", "0", "0.044506", 0), ("", "1", "4", "5", 0)];
    for (model, usage, period, total, unpriced) in cases {
        let line = service(model);
        assert_eq!(money(&line["usage_cost"]), decimal(usage), "{line}");
        assert_eq!(money(&line["period_charges"]), decimal(period), "{line}");
        assert_eq!(money(&line["total_cost"]), decimal(total), "{line}");
        assert_eq!(line["unpriced_event_count"], unpriced, "{line}");
    }
    assert_eq!(service("zz-unknown")["unpriced_event_count"], 2);
    assert_eq!(services[0]["model"], "", "costliest first: {services:?}");

    let lines = bill["rules"].as_array().context("rules")?;
    let line = |index: usize| {
        lines.iter().find(|line| line["rule_id"] == rule_ids[index].as_str()).expect("a line per rule")
    };
    assert_eq!(lines.len(), 5, "{lines:?}");
    // (units, per-event cost, tiered charge, top-up, total). The package rule's part is 3
    // packages (1 + 2 + 1), not ceil(2002 / 1000) = 3 by coincidence: its events' own packages.
    let expected = [
        ("1200", "0", "1.1", "0", "1.1"),
        ("100", "0", "1", "0", "1"),
        ("1502", "0.004506", "0", "0", "0.004506"),
        ("2002", "0.04", "0", "0", "0.04"),
        ("4", "1", "0", "4", "5"),
    ];
    for (index, (units, usage, tiered, top_up, total)) in expected.into_iter().enumerate() {
        let line = line(index);
        assert_eq!(line["units"].to_string().parse::<Decimal>()?, decimal(units), "{line}");
        assert_eq!(money(&line["usage_cost"]), decimal(usage), "{line}");
        assert_eq!(money(&line["tiered_charge"]), decimal(tiered), "{line}");
        assert_eq!(money(&line["minimum_top_up"]), decimal(top_up), "{line}");
        assert_eq!(money(&line["total_cost"]), decimal(total), "{line}");
    }
    assert_eq!(line(0)["method"], "graduated");
    assert_eq!(line(4)["minimum_charge"], 5);

    // The month so far projected to its end: units and per-event costs scaled by 1 / elapsed,
    // then tiers and minimums on the projected totals (so a volume tier can lower the total).
    let projection = &bill["projection"];
    let fraction = projection["elapsed_fraction"].as_f64().context("fraction")?;
    ensure!(fraction > 0.0 && fraction < 1.0, "{projection}");
    let scale = 1.0 / fraction;
    let graduated = 1.0 + (1200.0 * scale - 1000.0) * 0.0005;
    let volume = 100.0 * scale * if 100.0 * scale > 100.0 { 0.005 } else { 0.01 };
    let jobs = scale;
    let expected = [
        ("usage_cost", (0.044506 + 1.0) * scale),
        ("tiered_charges", graduated + volume),
        ("minimum_top_ups", (5.0 - jobs).max(0.0)),
        ("total_cost", (0.044506 * scale) + jobs.max(5.0) + graduated + volume),
    ];
    for (field, value) in expected {
        let projected: f64 = money(&projection[field]).try_into()?;
        ensure!(
            (projected - value).abs() <= 1e-4 * value.max(1.0),
            "{field}: {value} expected, {projection}"
        );
    }
    ensure!(projection["event_count"].as_i64().unwrap_or(0) >= 12, "{projection}");

    // The month before: nothing, complete, no projection.
    let month: Date = OffsetDateTime::now_utc().date().replace_day(1)?;
    let previous = month - time::Duration::days(1);
    let path = format!("/api/v1/billing/summary?month={:04}-{:02}", previous.year(), previous.month() as u8);
    let (status, before) = get(&state, &edge.key, &path).await?;
    ensure!(status == StatusCode::OK, "{before}");
    assert_eq!((before["event_count"].as_i64(), before["complete"].as_bool()), (Some(0), Some(true)));
    assert_eq!(money(&before["total_cost"]), Decimal::ZERO);
    assert!(before["projection"].is_null());

    // Bad months are refused by name.
    let next = month + time::Duration::days(40);
    let future = format!("{:04}-{:02}", next.year(), next.month() as u8);
    for bad in ["2026-13", "November", future.as_str()] {
        let (status, body) = get(&state, &edge.key, &format!("/api/v1/billing/summary?month={bad}")).await?;
        ensure!(status == StatusCode::BAD_REQUEST, "{bad}: {status} {body}");
        ensure!(body["detail"].as_str().unwrap_or("").contains("month"), "{bad}: {body}");
    }
    let (status, body) = get(&state, &edge.key, "/api/v1/billing/summary?months=2026-11").await?;
    ensure!(status == StatusCode::BAD_REQUEST, "{body}");
    Ok(())
}

/// A month starts at local midnight: in Kolkata (UTC+05:30) that is 18:30 UTC the day before,
/// inside a rollup hour.
async fn months_are_bounded_in_the_tenant_time_zone(backend: Backend) -> Result<()> {
    let edge = TestEdge::on(backend).await?;
    crate::support::set_time_zone(&edge, "Asia/Kolkata").await?;
    let kolkata = UtcOffset::from_hms(5, 30, 0)?;
    // The start of the previous month, local time.
    let today = OffsetDateTime::now_utc().to_offset(kolkata).date();
    let this_month = today.replace_day(1)?;
    let last_month = (this_month - time::Duration::days(1)).replace_day(1)?;
    let boundary = last_month.with_time(Time::MIDNIGHT).assume_offset(kolkata).to_offset(UtcOffset::UTC);
    let row = |minutes: i64, cost: &str| {
        let at = boundary + time::Duration::minutes(minutes);
        let event = wire::Event::new("u", "custom", "p", "job")
            .with_id(Uuid::now_v7())
            .at((at.unix_timestamp_nanos() / 1000) as i64);
        EventRow::new(edge.tenant.id, event, Some(decimal(cost)))
    };
    // 18:20 and 18:29 UTC belong to the month before; 18:30 and 18:40 to `last_month`.
    let rows = vec![row(-10, "1"), row(-1, "2"), row(0, "4"), row(10, "8")];
    let retention = Retention { partitions_behind_days: 80, ..Retention::default() };
    edge.store.maintain(&retention).await?;
    edge.store.commit(&rows).await?;

    let state = query_state(&edge).await?;
    let key = crate::support::create_key(&edge.store, &edge.tenant, vec![sink::Scope::Query]).await?;
    let label = |date: Date| format!("{:04}-{:02}", date.year(), date.month() as u8);
    let (status, bill) =
        get(&state, &key, &format!("/api/v1/billing/summary?month={}", label(last_month))).await?;
    ensure!(status == StatusCode::OK, "{bill}");
    assert_eq!(bill["time_zone"], "Asia/Kolkata");
    assert_eq!(bill["event_count"], 2);
    assert_eq!(money(&bill["usage_cost"]), decimal("12"));
    assert_eq!(bill["period_start"], boundary.format(&time::format_description::well_known::Rfc3339)?);
    let before = last_month - time::Duration::days(1);
    let (_, earlier) = get(&state, &key, &format!("/api/v1/billing/summary?month={}", label(before))).await?;
    assert_eq!((earlier["event_count"].as_i64(), money(&earlier["usage_cost"])), (Some(2), decimal("3")));
    Ok(())
}
