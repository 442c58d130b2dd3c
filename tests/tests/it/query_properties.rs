//! The query router against arbitrary parameters (issue 12): any names, any values, on every
//! endpoint, answer whole or are refused with a 400 that names a parameter of the request;
//! never a panic, a 5xx or a body that breaks off. Small by default (48 cases per backend);
//! `PROPTEST_CASES=250000` for a long run.

use std::time::Duration;

use anyhow::Result;
use axum::http::StatusCode;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::Value;
use time::OffsetDateTime;

use crate::query_hardening::{commit, event_at, get_text, query_state};
use crate::support::{Backend, TestEdge};

#[test]
fn arbitrary_parameters_are_answered_or_refused_by_name_on_postgres() -> Result<()> {
    arbitrary_parameters_are_answered_or_refused_by_name(Backend::Postgres)
}

#[test]
fn arbitrary_parameters_are_answered_or_refused_by_name_on_sqlite() -> Result<()> {
    arbitrary_parameters_are_answered_or_refused_by_name(Backend::Sqlite)
}

/// Every endpoint and the parameters it takes.
const ENDPOINTS: &[(&str, &[&str])] = &[
    (
        "/api/v1/usage",
        &[
            "tenant_id",
            "start_date",
            "end_date",
            "service_type",
            "service_provider",
            "user_id",
            "model",
            "event_type",
            "status",
            "limit",
            "offset",
            "cursor",
            "include_billing",
            "format",
        ],
    ),
    (
        "/api/v1/usage/aggregate",
        &[
            "tenant_id",
            "period",
            "start_date",
            "end_date",
            "service_type",
            "service_provider",
            "user_id",
            "model",
            "event_type",
            "group_by",
        ],
    ),
    ("/api/v1/usage/by-service", &["tenant_id", "start_date", "end_date", "limit", "top_users"]),
    (
        "/api/v1/usage/costs",
        &[
            "tenant_id",
            "start_date",
            "end_date",
            "group_by",
            "service_type",
            "service_provider",
            "user_id",
            "model",
        ],
    ),
    ("/api/v1/billing/summary", &["tenant_id", "month"]),
    (
        "/api/v1/analytics/trends",
        &[
            "tenant_id",
            "metric",
            "period",
            "start_date",
            "end_date",
            "service_type",
            "service_provider",
            "model",
            "user_id",
        ],
    ),
    (
        "/api/v1/analytics/top-users",
        &[
            "tenant_id",
            "start_date",
            "end_date",
            "by",
            "limit",
            "service_type",
            "service_provider",
            "model",
            "event_type",
        ],
    ),
    (
        "/api/v1/analytics/breakdown",
        &[
            "tenant_id",
            "start_date",
            "end_date",
            "group_by",
            "limit",
            "service_type",
            "service_provider",
            "user_id",
            "model",
            "event_type",
        ],
    ),
    (
        "/api/v1/analytics/compare",
        &[
            "tenant_id",
            "start_date",
            "end_date",
            "group_by",
            "limit",
            "service_type",
            "service_provider",
            "model",
        ],
    ),
    (
        "/api/v1/analytics/errors",
        &["tenant_id", "start_date", "end_date", "group_by", "service_type", "service_provider", "model"],
    ),
];

/// Values worth trying for any parameter: the valid ones of each, near misses, numbers at the
/// edges of every integer type, dates from year -99999 to 99999 in every shape, and anything.
fn value() -> impl Strategy<Value = String> {
    let words = prop::sample::select(vec![
        "",
        "day",
        "week",
        "month",
        "hour",
        "daily",
        "none",
        "csv",
        "json",
        "true",
        "false",
        "success",
        "error",
        "event_count",
        "total_cost",
        "unique_users",
        "latency_p95",
        "input_tokens",
        "custom:images",
        "custom:",
        "service_type",
        "model,user_id",
        "service_type,service_provider,model,user_id",
        "acme",
        "c2",
        "c1",
        "2026-13",
        "2026-02",
        "9999-12",
        "0000-01",
        "1970-01",
        "-1",
        "+1",
        " 7 ",
        "NaN",
        "1e3",
    ])
    .prop_map(str::to_owned);
    let numbers = prop_oneof![
        any::<i128>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        (0u64..20_000).prop_map(|n| n.to_string()),
        Just(u64::MAX.to_string()),
        Just(i64::MAX.to_string()),
        Just((i64::MAX as u64 + 1).to_string()),
    ];
    let dates = (
        -99_999i32..=99_999,
        0u8..=13,
        0u8..=32,
        prop::option::of((0u8..=25, 0u8..=61, 0u8..=61, prop::option::of(0u32..=1_000_000))),
        prop::sample::select(vec!["", "Z", "+00:00", "-23:59", "+23:59", "+24:00", "z"]),
        prop::sample::select(vec!["T", " ", "t"]),
    )
        .prop_map(|(year, month, day, time, offset, separator)| {
            let date = format!("{year:04}-{month:02}-{day:02}");
            match time {
                None => date,
                Some((h, m, s, None)) => format!("{date}{separator}{h:02}:{m:02}:{s:02}{offset}"),
                Some((h, m, s, Some(f))) => format!("{date}{separator}{h:02}:{m:02}:{s:02}.{f}{offset}"),
            }
        });
    let cursors = (any::<i64>(), any::<u128>(), prop::option::of(any::<i64>())).prop_map(
        |(at, id, total)| match total {
            Some(total) => format!("c1{at:016x}{id:032x}{total:016x}"),
            None => format!("c2{at:016x}{id:032x}"),
        },
    );
    prop_oneof![3 => words, 2 => numbers, 3 => dates, 1 => cursors, 2 => any::<String>(), 1 => "\\PC{0,300}"]
}

/// `name=value` pairs for one endpoint: known names mostly, sometimes an unknown one.
fn request() -> impl Strategy<Value = (usize, Vec<(String, String)>)> {
    (0..ENDPOINTS.len()).prop_flat_map(|endpoint| {
        let names = ENDPOINTS[endpoint].1;
        let name = prop_oneof![
            9 => prop::sample::select(names).prop_map(str::to_owned),
            1 => "[a-z_]{1,12}",
        ];
        (Just(endpoint), prop::collection::vec((name, value()), 0..6))
    })
}

/// Percent-encodes every byte but unreserved ASCII.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn arbitrary_parameters_are_answered_or_refused_by_name(backend: Backend) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (edge, state) = runtime.block_on(async {
        let edge = TestEdge::on(backend).await?;
        let now = OffsetDateTime::now_utc();
        let events =
            (1..=5).map(|hours| (event_at("u1", now - time::Duration::hours(hours)), None)).collect();
        commit(&edge, events).await?;
        let state = query_state(&edge, Duration::ZERO).await?;
        anyhow::Ok((edge, state))
    })?;
    // Small by default, for CI; `PROPTEST_CASES=100000` for a long run.
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(48);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let started = std::time::Instant::now();
    // Answers by status (200, 400, 403), to show that the cases reach past parsing.
    let answered = [std::cell::Cell::new(0u64), std::cell::Cell::new(0), std::cell::Cell::new(0)];
    let outcome = runner.run(&request(), |(endpoint, pairs)| {
        let (path, names) = ENDPOINTS[endpoint];
        let query: Vec<String> =
            pairs.iter().map(|(name, value)| format!("{name}={}", encode(value))).collect();
        let uri = format!("{path}?{}", query.join("&"));
        let answer = runtime.block_on(get_text(&state, &edge.key, &uri));
        let (status, text) = answer.map_err(|error| TestCaseError::fail(format!("{uri}: {error:#}")))?;
        match status {
            StatusCode::OK => {
                answered[0].set(answered[0].get() + 1);
                let csv = text.starts_with("event_id,");
                prop_assert!(csv || serde_json::from_str::<Value>(&text).is_ok(), "{uri}: not whole: {text}");
            }
            StatusCode::BAD_REQUEST => {
                answered[1].set(answered[1].get() + 1);
                let body: Value =
                    serde_json::from_str(&text).map_err(|_| TestCaseError::fail(text.clone()))?;
                let detail = body["detail"].as_str().unwrap_or_default();
                let named = pairs.iter().any(|(name, _)| detail.contains(name.as_str()))
                    || names.iter().any(|name| detail.starts_with(name));
                prop_assert!(body["error"] == "invalid_parameter" && named, "{uri}: {text}");
            }
            // Another tenant's name or id.
            StatusCode::FORBIDDEN => {
                answered[2].set(answered[2].get() + 1);
                prop_assert!(pairs.iter().any(|(name, _)| name == "tenant_id"), "{uri}: {text}");
            }
            other => prop_assert!(false, "{uri}: {other} {text}"),
        }
        Ok(())
    });
    let [ok, bad, forbidden] = answered.map(|count| count.get());
    eprintln!(
        "{backend:?}: {cases} cases in {:.1} s: {ok} answered 200, {bad} 400, {forbidden} 403",
        started.elapsed().as_secs_f64()
    );
    runtime.block_on(async move { drop((state, edge)) });
    outcome.map_err(|error| anyhow::anyhow!("{error}"))
}
