//! Questions that count or rank users, over ranges of several days: on PostgreSQL their whole
//! UTC days are read from the daily per-user rollups plus the pending rows of those days, the
//! rest from the hourly ones. Every answer is checked against sums of the events sent, with
//! ranges that cut days (and hours) at both ends, in UTC and in a zone whose local midnight
//! falls inside a UTC hour, while some rows are folded and others still pending.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rust_decimal::Decimal;
use serde_json::Value;
use time::{Date, OffsetDateTime, Time, UtcOffset};

use crate::query::{Fixture, Sent, check_totals, money, parse_time, query_state, rfc3339, sums};
use crate::support::{Backend, TestEdge, both_backends, set_time_zone};

both_backends!(
    per_user_answers_over_whole_and_partial_days_in_utc,
    per_user_answers_over_whole_and_partial_days_in_asia_kolkata,
);

async fn per_user_answers_over_whole_and_partial_days_in_utc(backend: Backend) -> Result<()> {
    per_user_answers(backend, "UTC", UtcOffset::UTC).await
}

async fn per_user_answers_over_whole_and_partial_days_in_asia_kolkata(backend: Backend) -> Result<()> {
    per_user_answers(backend, "Asia/Kolkata", UtcOffset::from_hms(5, 30, 0)?).await
}

/// An edge whose materializer stays idle, so the test decides which rows are folded; the
/// response cache is off.
async fn fixture(backend: Backend) -> Result<Fixture> {
    let config = edge::EdgeConfig {
        fold: sink::FoldLimits { interval: Duration::from_secs(3600), ..sink::FoldLimits::default() },
        ..edge::EdgeConfig::default()
    };
    let edge = TestEdge::launch(backend, config).await?;
    let state = query_state(&edge, Duration::ZERO, None).await?;
    Ok(Fixture { edge, state })
}

async fn per_user_answers(backend: Backend, zone: &str, offset: UtcOffset) -> Result<()> {
    let fixture = fixture(backend).await?;
    set_time_zone(&fixture.edge, zone).await?;
    let tenant = fixture.edge.tenant.id;
    let today = OffsetDateTime::now_utc().date().with_time(Time::MIDNIGHT).assume_utc();
    // Events every 47 minutes over six days before today, a different minute in each hour.
    let first = today - time::Duration::days(7);
    let mut sent: Vec<Sent> =
        (0..180).map(|i| Sent::new(i, first + time::Duration::minutes(47 * i as i64 + 3))).collect();
    ensure!(sent.last().is_some_and(|s| s.at < today), "all before today");
    // Half of them folded, the other half pending; then more pending rows in the middle days
    // (in a day read from the daily rollups, a pending row adds to a folded one of its key).
    let (folded, pending): (Vec<Sent>, Vec<Sent>) =
        sent.iter().cloned().partition(|s| s.input_tokens % 2 == 0);
    fixture.commit(tenant, &folded).await?;
    fixture.edge.store.fold_rollups(1_000_000).await?;
    fixture.commit(tenant, &pending).await?;
    let extra: Vec<Sent> = (0..40)
        .map(|i| {
            Sent::new(1000 + i, first + time::Duration::days(3) + time::Duration::minutes(31 * i as i64 + 1))
        })
        .collect();
    fixture.commit(tenant, &extra).await?;
    sent.extend(extra);
    if backend == Backend::Postgres {
        let mut conn = fixture.edge.connect_db().await?;
        let (daily, waiting): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM usage_rollup_user_daily), (SELECT count(*) FROM usage_rollup_pending)",
        )
        .fetch_one(&mut conn)
        .await?;
        ensure!(daily > 0 && waiting > 0, "{daily} daily rows, {waiting} pending rows");
    }

    let ranges = [
        // Cut inside hours and days at both ends: exact edges read those from raw events.
        (
            first + time::Duration::minutes(5 * 60 + 17),
            today - time::Duration::minutes(10 * 60 + 18),
            "exact",
        ),
        // Cut at hours inside days: the default edges, answered from rollups only.
        (first + time::Duration::hours(13), today - time::Duration::hours(20), "hour"),
        // Whole UTC days.
        (first + time::Duration::days(1), today - time::Duration::days(1), "hour"),
    ];
    for (start, end, edges) in ranges {
        let in_range: Vec<Sent> = sent.iter().filter(|s| s.at >= start && s.at < end).cloned().collect();
        let what = format!("{zone} [{start}, {end}) edges={edges}");
        let range = format!("start_date={}&end_date={}&edges={edges}", rfc3339(start), rfc3339(end));
        let all = sums(&in_range);
        ensure!(all.events > 0 && in_range.len() < sent.len(), "{what}: the range cuts the events");

        // Distinct users per local day, week and month, and over the whole range.
        let middle = |s: &Sent| match edges {
            "exact" => s.at,
            _ => s.at.replace_minute(0).expect("hour") + time::Duration::minutes(30),
        };
        let local = |s: &Sent| middle(s).to_offset(offset).date();
        let day = |s: &Sent| local(s);
        let week = |s: &Sent| {
            let date = local(s);
            date - time::Duration::days(i64::from(date.weekday().number_days_from_monday()))
        };
        let month = |s: &Sent| local(s).replace_day(1).expect("day 1");
        for (period, bucket) in [("day", &day as &dyn Fn(&Sent) -> Date), ("week", &week), ("month", &month)]
        {
            let path = format!("/api/v1/usage/aggregate?period={period}&group_by=none&{range}");
            let body = fixture.ok(&path).await?;
            check_totals(&body["total_aggregates"], &all, true, &format!("{what} {period} total"))?;
            ensure!(body["total_aggregates"]["unique_users"] == all.users.len(), "{what}: {body}");
            let rows = body["aggregations"].as_array().context("rows")?;
            let buckets: BTreeSet<Date> = in_range.iter().map(bucket).collect();
            ensure!(
                rows.len() == buckets.len(),
                "{what} {period}: {} rows, {} buckets",
                rows.len(),
                buckets.len()
            );
            for (row, local_start) in rows.iter().zip(&buckets) {
                let starts = local_start.with_time(Time::MIDNIGHT).assume_offset(offset);
                ensure!(parse_time(&row["period_start"])? == starts, "{what} {period}: {row}");
                let expected = sums(in_range.iter().filter(|s| bucket(s) == *local_start));
                ensure!(row["unique_users"] == expected.users.len(), "{what} {period} {local_start}: {row}");
                check_totals(row, &expected, true, &format!("{what} {period} {local_start}"))?;
            }
        }

        // Users ranked by cost, with their sums.
        let top = fixture.ok(&format!("/api/v1/analytics/top-users?limit=10&{range}")).await?;
        let mut per_user: BTreeMap<String, Vec<Sent>> = BTreeMap::new();
        for s in &in_range {
            per_user.entry(s.user.clone()).or_default().push(s.clone());
        }
        let mut ranked: Vec<(Decimal, String)> =
            per_user.iter().map(|(user, of_user)| (sums(of_user).cost, user.clone())).collect();
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let users = top["users"].as_array().context("users")?;
        ensure!(top["total_users"] == per_user.len() && users.len() == per_user.len(), "{what}: {top}");
        for (user, (cost, name)) in users.iter().zip(&ranked) {
            let expected = sums(&per_user[name]);
            ensure!(
                user["user_id"] == name.as_str()
                    && money(&user["total_cost"])? == *cost
                    && user["event_count"] == expected.events
                    && user["unpriced_event_count"] == expected.unpriced,
                "{what}: {user} vs {name} {cost}"
            );
        }

        // Distinct users per model, per service type (this range and the one before), per
        // service with its top users.
        let breakdown = fixture.ok(&format!("/api/v1/analytics/breakdown?group_by=model&{range}")).await?;
        check_totals(&breakdown["totals"], &all, true, &format!("{what} breakdown"))?;
        for row in breakdown["rows"].as_array().context("rows")? {
            let expected = sums(in_range.iter().filter(|s| row["key"]["model"] == s.model.unwrap_or("")));
            ensure!(row["unique_users"] == expected.users.len(), "{what}: {row}");
            check_totals(row, &expected, true, &format!("{what} breakdown"))?;
        }
        let compare = fixture.ok(&format!("/api/v1/analytics/compare?group_by=service_type&{range}")).await?;
        check_totals(&compare["current"]["totals"], &all, true, &format!("{what} compare"))?;
        let previous_start = parse_time(&compare["previous"]["start_date"])?;
        let previous_end = parse_time(&compare["previous"]["end_date"])?;
        let before = sums(sent.iter().filter(|s| s.at >= previous_start && s.at < previous_end));
        check_totals(&compare["previous"]["totals"], &before, true, &format!("{what} compare previous"))?;
        for row in compare["rows"].as_array().context("rows")? {
            let expected = sums(in_range.iter().filter(|s| row["key"]["service_type"] == s.service_type));
            check_totals(&row["current"], &expected, true, &format!("{what} compare row"))?;
        }
        let body = fixture.ok(&format!("/api/v1/usage/by-service?top_users=5&{range}")).await?;
        check_totals(&body["totals"], &all, true, &format!("{what} by-service"))?;
        for service in body["services"].as_array().context("services")? {
            let of_service: Vec<&Sent> = in_range
                .iter()
                .filter(|s| {
                    s.service_type == service["service_type"] && s.provider == service["service_provider"]
                })
                .collect();
            check_totals(service, &sums(of_service.iter().copied()), true, &format!("{what} by-service"))?;
            let mut costs: BTreeMap<&str, Decimal> = BTreeMap::new();
            for s in &of_service {
                *costs.entry(s.user.as_str()).or_default() += s.cost.unwrap_or_default();
            }
            let top_users: &Vec<Value> = service["top_users"].as_array().context("top users")?;
            ensure!(top_users.len() == costs.len(), "{what}: {service}");
            for user in top_users {
                let name = user["user_id"].as_str().context("user")?;
                ensure!(money(&user["total_cost"])? == costs[name], "{what}: {user}");
            }
        }
    }
    Ok(())
}
