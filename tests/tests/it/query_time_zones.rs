//! Local days, weeks and months on both backends (issue 14): across the most recent DST change
//! of Europe/Berlin, America/New_York and America/St_Johns (-03:30/-02:30), and in Asia/Kolkata
//! (+05:30), whose midnights fall inside UTC hours. Expected buckets come from each zone's rules
//! written out here (not from any time zone database); expected sums from the events sent. Then
//! the same events on PostgreSQL and SQLite must give the same JSON, in more zones still.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use query::backend::Scope;
use query::question::Period;
use serde_json::Value;
use sink::EventRow;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset, Weekday};

use crate::query::{Fixture, Sent, check_totals, money, parse_time, rfc3339, sums};
use crate::support::{Backend, Location, TestEdge, both_backends, set_time_zone};

both_backends!(
    local_periods_in_europe_berlin_across_its_last_dst_change,
    local_periods_in_america_new_york_across_its_last_dst_change,
    local_periods_in_america_st_johns_across_its_last_dst_change,
    local_periods_in_asia_kolkata,
);

/// When a zone observes daylight time, as its law says (for the years the tests use).
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// No daylight time.
    Fixed,
    /// The EU: from the last Sunday of March to the last Sunday of October, at 01:00 UTC.
    European,
    /// The US and Canada: from the second Sunday of March at 02:00 local standard time to the
    /// first Sunday of November at 02:00 local daylight time.
    NorthAmerican,
}

/// A time zone, by its rules.
#[derive(Debug, Clone, Copy)]
struct Zone {
    name: &'static str,
    standard: UtcOffset,
    daylight: UtcOffset,
    rule: Rule,
}

const fn offset(hours: i8, minutes: i8) -> UtcOffset {
    match UtcOffset::from_hms(hours, minutes, 0) {
        Ok(offset) => offset,
        Err(_) => panic!("a valid offset"),
    }
}

const BERLIN: Zone =
    Zone { name: "Europe/Berlin", standard: offset(1, 0), daylight: offset(2, 0), rule: Rule::European };
const NEW_YORK: Zone = Zone {
    name: "America/New_York",
    standard: offset(-5, 0),
    daylight: offset(-4, 0),
    rule: Rule::NorthAmerican,
};
const ST_JOHNS: Zone = Zone {
    name: "America/St_Johns",
    standard: offset(-3, -30),
    daylight: offset(-2, -30),
    rule: Rule::NorthAmerican,
};
const KOLKATA: Zone =
    Zone { name: "Asia/Kolkata", standard: offset(5, 30), daylight: offset(5, 30), rule: Rule::Fixed };

/// The `nth` (1-based) `weekday` of a month, or its last one with `nth == 0`.
fn nth_weekday(year: i32, month: Month, weekday: Weekday, nth: u8) -> Date {
    let first = Date::from_calendar_date(year, month, 1).expect("a date");
    if nth == 0 {
        let next_month = first + time::Duration::days(31);
        let last = next_month.replace_day(1).expect("day 1") - time::Duration::days(1);
        let back = (7 + last.weekday().number_days_from_monday() - weekday.number_days_from_monday()) % 7;
        return last - time::Duration::days(i64::from(back));
    }
    let ahead = (7 + weekday.number_days_from_monday() - first.weekday().number_days_from_monday()) % 7;
    first + time::Duration::days(i64::from(ahead) + 7 * i64::from(nth - 1))
}

impl Zone {
    /// The instants at which daylight time begins and ends in `year`.
    fn daylight_span(&self, year: i32) -> Option<(OffsetDateTime, OffsetDateTime)> {
        let two = Time::from_hms(2, 0, 0).expect("02:00");
        match self.rule {
            Rule::Fixed => None,
            Rule::European => {
                let one_utc =
                    |date: Date| date.with_time(Time::from_hms(1, 0, 0).expect("01:00")).assume_utc();
                Some((
                    one_utc(nth_weekday(year, Month::March, Weekday::Sunday, 0)),
                    one_utc(nth_weekday(year, Month::October, Weekday::Sunday, 0)),
                ))
            }
            Rule::NorthAmerican => Some((
                nth_weekday(year, Month::March, Weekday::Sunday, 2)
                    .with_time(two)
                    .assume_offset(self.standard),
                nth_weekday(year, Month::November, Weekday::Sunday, 1)
                    .with_time(two)
                    .assume_offset(self.daylight),
            )),
        }
    }

    fn offset_at(&self, at: OffsetDateTime) -> UtcOffset {
        match self.daylight_span(at.to_offset(UtcOffset::UTC).year()) {
            Some((begins, ends)) if at >= begins && at < ends => self.daylight,
            _ => self.standard,
        }
    }

    fn local_date(&self, at: OffsetDateTime) -> Date {
        at.to_offset(self.offset_at(at)).date()
    }

    /// The instant of a local time that exists exactly once (every midnight of these zones).
    fn instant(&self, local: PrimitiveDateTime) -> OffsetDateTime {
        [self.standard, self.daylight]
            .into_iter()
            .map(|offset| local.assume_offset(offset))
            .find(|at| self.offset_at(*at) == at.offset())
            .expect("the local time exists")
            .to_offset(UtcOffset::UTC)
    }

    /// The local day, week (from Monday) or month holding `at`, as instants.
    fn bucket(&self, period: &str, at: OffsetDateTime) -> (OffsetDateTime, OffsetDateTime) {
        let date = self.local_date(at);
        let (first, next) = match period {
            "day" => (date, date + time::Duration::days(1)),
            "week" => {
                let monday = date - time::Duration::days(i64::from(date.weekday().number_days_from_monday()));
                (monday, monday + time::Duration::days(7))
            }
            _ => {
                let first = date.replace_day(1).expect("day 1");
                (first, (first + time::Duration::days(31)).replace_day(1).expect("day 1"))
            }
        };
        (self.instant(first.midnight()), self.instant(next.midnight()))
    }

    /// The buckets overlapping `[start, end)`, in order.
    fn buckets(
        &self,
        period: &str,
        start: OffsetDateTime,
        end: OffsetDateTime,
    ) -> Vec<(OffsetDateTime, OffsetDateTime)> {
        let mut buckets = vec![self.bucket(period, start)];
        while let Some(&(_, next)) = buckets.last().filter(|(_, next)| *next < end) {
            buckets.push(self.bucket(period, next));
        }
        buckets
    }

    /// The most recent change of offset at least a day before `now` (for a zone with daylight
    /// time), or a day 10 days ago.
    fn recent_change(&self, now: OffsetDateTime) -> OffsetDateTime {
        let year = now.year();
        let mut changes: Vec<OffsetDateTime> = [year - 1, year]
            .into_iter()
            .filter_map(|year| self.daylight_span(year))
            .flat_map(|(begins, ends)| [begins, ends])
            .filter(|at| *at < now - time::Duration::days(1))
            .collect();
        changes.sort();
        changes.pop().unwrap_or(now - time::Duration::days(10))
    }
}

/// Events every 23 minutes from 4 days before the zone's last change of offset to 9 days after
/// it (or an hour ago), so both halves of every hour hold events.
fn events_around_the_last_change(zone: &Zone, now: OffsetDateTime) -> Vec<Sent> {
    let change = zone.recent_change(now);
    let first = change - time::Duration::days(4);
    let last = (change + time::Duration::days(9)).min(now - time::Duration::hours(1));
    (0..)
        .map(|index| (index, first + time::Duration::minutes(23 * index as i64)))
        .take_while(|(_, at)| *at < last)
        .map(|(index, at)| Sent::new(index, at))
        .collect()
}

/// Stores priced events through the sink, with the partitions they need.
async fn store_events(edge: &TestEdge, sent: &[Sent]) -> Result<()> {
    let (first, last) = (sent.first().context("events")?.at, sent.last().context("events")?.at);
    ensure_partitions(edge, first.date() - time::Duration::days(1), last.date() + time::Duration::days(1))
        .await?;
    let rows: Vec<EventRow> =
        sent.iter().map(|sent| EventRow::new(edge.tenant.id, sent.event(), sent.cost)).collect();
    edge.store.commit(&rows).await?;
    Ok(())
}

/// PostgreSQL stores events in daily partitions: create the ones of `first..=last`.
async fn ensure_partitions(edge: &TestEdge, first: Date, last: Date) -> Result<()> {
    if let Location::Postgres(_) = &edge.db.location {
        let mut db = edge.connect_db().await?;
        sqlx::query("SELECT tally_ensure_partitions($1, $2)").bind(first).bind(last).execute(&mut db).await?;
    }
    Ok(())
}

async fn local_periods_in_europe_berlin_across_its_last_dst_change(backend: Backend) -> Result<()> {
    local_periods_follow_the_zone(backend, BERLIN).await
}

async fn local_periods_in_america_new_york_across_its_last_dst_change(backend: Backend) -> Result<()> {
    local_periods_follow_the_zone(backend, NEW_YORK).await
}

async fn local_periods_in_america_st_johns_across_its_last_dst_change(backend: Backend) -> Result<()> {
    local_periods_follow_the_zone(backend, ST_JOHNS).await
}

async fn local_periods_in_asia_kolkata(backend: Backend) -> Result<()> {
    local_periods_follow_the_zone(backend, KOLKATA).await
}

/// Day, week and month buckets (aggregate, trends, costs) bounded at the zone's local midnights,
/// with per-bucket counts and costs equal to sums of the events sent.
async fn local_periods_follow_the_zone(backend: Backend, zone: Zone) -> Result<()> {
    let fixture = Fixture::start(backend, Duration::from_secs(15)).await?;
    set_time_zone(&fixture.edge, zone.name).await?;
    let sent = events_around_the_last_change(&zone, OffsetDateTime::now_utc());
    store_events(&fixture.edge, &sent).await?;
    // Both range edges cut an hour and a bucket.
    let first = sent.first().context("events")?.at;
    let last = sent.last().context("events")?.at;
    let (start, end) = (first + time::Duration::minutes(17), last - time::Duration::minutes(43));
    let in_range: Vec<&Sent> = sent.iter().filter(|s| s.at >= start && s.at < end).collect();
    let range = format!("start_date={}&end_date={}&edges=exact", rfc3339(start), rfc3339(end));
    if let Some(span) = zone.daylight_span(start.year()) {
        ensure!([span.0, span.1].iter().any(|change| *change > start && *change < end), "{span:?}");
    }

    for period in ["day", "week", "month"] {
        let expected = zone.buckets(period, start, end);
        let by_bucket = |bucket: &(OffsetDateTime, OffsetDateTime)| {
            sums(in_range.iter().copied().filter(|s| zone.bucket(period, s.at) == *bucket))
        };
        let what = format!("{} {period}", zone.name);
        let body =
            fixture.ok(&format!("/api/v1/usage/aggregate?period={period}&group_by=none&{range}")).await?;
        ensure!(body["time_zone"] == zone.name, "{body}");
        let rows: Vec<&Value> = body["aggregations"].as_array().context("rows")?.iter().collect();
        let filled: Vec<_> = expected.iter().filter(|bucket| by_bucket(bucket).events > 0).collect();
        ensure!(rows.len() == filled.len(), "{what}: {} rows for {} buckets", rows.len(), filled.len());
        for (row, bucket) in rows.iter().zip(&filled) {
            ensure!(parse_time(&row["period_start"])? == bucket.0, "{what}: {row} vs {bucket:?}");
            ensure!(parse_time(&row["period_end"])? == bucket.1, "{what}: {row} vs {bucket:?}");
            check_totals(row, &by_bucket(bucket), true, &format!("{what} {}", bucket.0))?;
        }

        // Every bucket of the range, empty ones included.
        let trends = fixture
            .ok(&format!("/api/v1/analytics/trends?metric=total_cost&period={period}&{range}"))
            .await?;
        let points = trends["data_points"].as_array().context("points")?;
        ensure!(points.len() == expected.len(), "{what}: {} points for {:?}", points.len(), expected);
        for (point, bucket) in points.iter().zip(&expected) {
            ensure!(parse_time(&point["period"])? == bucket.0, "{what}: {point}");
            ensure!(parse_time(&point["period_end"])? == bucket.1, "{what}: {point}");
            ensure!(money(&point["value"])? == by_bucket(bucket).cost, "{what}: {point}");
        }

        // Per bucket and service type.
        let body = fixture
            .ok(&format!("/api/v1/usage/aggregate?period={period}&group_by=service_type&{range}"))
            .await?;
        let mut groups: BTreeMap<(OffsetDateTime, &str), Vec<&Sent>> = BTreeMap::new();
        for s in &in_range {
            groups.entry((zone.bucket(period, s.at).0, s.service_type)).or_default().push(s);
        }
        let rows = body["aggregations"].as_array().context("rows")?;
        ensure!(rows.len() == groups.len(), "{what}: {} groups, {} expected", rows.len(), groups.len());
        for row in rows {
            let key = (parse_time(&row["period_start"])?, row["service_type"].as_str().unwrap_or(""));
            let group = groups.get(&key).with_context(|| format!("{what}: unexpected {row}"))?;
            check_totals(row, &sums(group.iter().copied()), true, &what)?;
        }
    }
    Ok(())
}

/// Removes the fields that name the tenant (each backend has its own).
fn without_tenant(mut value: Value) -> Value {
    match &mut value {
        Value::Object(map) => {
            map.remove("tenant_id");
            for (_, field) in map.iter_mut() {
                *field = without_tenant(field.take());
            }
        }
        Value::Array(items) => {
            for item in items.iter_mut() {
                *item = without_tenant(item.take());
            }
        }
        _ => {}
    }
    value
}

/// The first place where two JSON values differ: its path and both values there.
fn first_difference(path: &str, a: &Value, b: &Value) -> Option<(String, Value, Value)> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|key| {
                let (left, right) = (x.get(key).unwrap_or(&Value::Null), y.get(key).unwrap_or(&Value::Null));
                first_difference(&format!("{path}.{key}"), left, right)
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (left, right))| first_difference(&format!("{path}[{i}]"), left, right)),
        _ if a == b => None,
        _ => Some((path.to_owned(), a.clone(), b.clone())),
    }
}

/// Zones for the comparison: DST on both hemispheres, non-whole-hour offsets, a 30-minute DST
/// shift (Lord Howe), +05:45 (Kathmandu), +12:45/+13:45 (Chatham) and negative DST (Dublin).
const COMPARED_ZONES: &[&str] = &[
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "America/St_Johns",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "Europe/Dublin",
    "America/Santiago",
];

/// The same events on PostgreSQL and on SQLite give the same JSON for every period-grouped
/// answer, in every zone of [`COMPARED_ZONES`].
#[tokio::test(flavor = "multi_thread")]
async fn both_backends_give_the_same_period_answers_in_every_zone() -> Result<()> {
    let now = OffsetDateTime::now_utc();
    let postgres = Fixture::start(Backend::Postgres, Duration::ZERO).await?;
    let sqlite = Fixture::start(Backend::Sqlite, Duration::ZERO).await?;
    let sent = events_around_the_last_change(&NEW_YORK, now);
    store_events(&postgres.edge, &sent).await?;
    store_events(&sqlite.edge, &sent).await?;
    let (first, last) = (sent.first().context("events")?.at, sent.last().context("events")?.at);
    let range = format!(
        "start_date={}&end_date={}",
        rfc3339(first + time::Duration::minutes(17)),
        rfc3339(last - time::Duration::minutes(43))
    );
    let mut paths = Vec::new();
    for period in ["hour", "day", "week", "month"] {
        for group_by in ["none", "service_type,model", "user_id"] {
            paths.push(format!("/api/v1/usage/aggregate?period={period}&group_by={group_by}&{range}"));
        }
        paths.push(format!("/api/v1/analytics/trends?metric=event_count&period={period}&{range}"));
    }
    for group_by in ["day", "week", "month"] {
        paths.push(format!("/api/v1/usage/costs?group_by={group_by}&{range}"));
    }
    // Local dates without an offset, read in the tenant's zone.
    let (from, to) = (first.date() + time::Duration::days(1), last.date());
    paths.push(format!("/api/v1/usage/aggregate?period=day&group_by=none&start_date={from}&end_date={to}"));
    // Each answer both at the rollups' grain (the default) and exact to the microsecond.
    let paths: Vec<String> = paths
        .into_iter()
        .flat_map(|path| [format!("{path}&edges=hour"), format!("{path}&edges=exact")])
        .collect();
    for zone in COMPARED_ZONES {
        let mut answers = Vec::new();
        for fixture in [&postgres, &sqlite] {
            set_time_zone(&fixture.edge, zone).await?;
            // A new state: the key cache holds the tenant's zone.
            let state = crate::query::query_state(&fixture.edge, Duration::ZERO, None).await?;
            let mut bodies = Vec::new();
            for path in &paths {
                let (status, body, _) = crate::query::get(&state, Some(&fixture.edge.key), path).await?;
                ensure!(status == axum::http::StatusCode::OK, "{zone} {path}: {status} {body}");
                bodies.push(without_tenant(body));
            }
            answers.push(bodies);
        }
        for ((path, on_postgres), on_sqlite) in paths.iter().zip(&answers[0]).zip(&answers[1]) {
            ensure!(
                on_postgres["time_zone"] == *zone || on_postgres.get("time_zone").is_none(),
                "{on_postgres}"
            );
            if let Some((at, a, b)) = first_difference("", on_postgres, on_sqlite) {
                anyhow::bail!("{zone} {path}: at {at}: postgres {a}, sqlite {b}");
            }
        }
    }
    Ok(())
}

/// Period boundaries and local times straight from both backends, over 13 months of years with
/// odd transitions: midnight skipped (Sao Paulo 2018, Havana), midnight twice (Havana), a day
/// skipped (Apia, 2011-12-30), two-hour DST (Troll), and the zones above.
#[tokio::test(flavor = "multi_thread")]
async fn both_backends_bound_periods_and_resolve_local_times_alike() -> Result<()> {
    let postgres = Fixture::start(Backend::Postgres, Duration::ZERO).await?;
    let sqlite = Fixture::start(Backend::Sqlite, Duration::ZERO).await?;
    let unusual = [
        ("America/Sao_Paulo", 2018),
        ("America/Havana", 2018),
        ("Pacific/Apia", 2011),
        ("Antarctica/Troll", 2019),
        ("Europe/Moscow", 2014),
    ];
    let zones = COMPARED_ZONES.iter().map(|zone| (*zone, 2024)).chain(unusual);
    for (zone, year) in zones {
        let start = Date::from_calendar_date(year, Month::January, 1)?.midnight().assume_utc()
            + time::Duration::minutes(7);
        let scope = Scope::exact(postgres.edge.tenant.id, start, start + time::Duration::days(396), zone);
        for period in [Period::Hour, Period::Day, Period::Week, Period::Month] {
            let on_postgres = postgres.state.backend.periods(&scope, period).await?;
            let on_sqlite = sqlite.state.backend.periods(&scope, period).await?;
            ensure!(
                on_postgres.len() == on_sqlite.len(),
                "{zone} {period:?}: {} vs {}",
                on_postgres.len(),
                on_sqlite.len()
            );
            for (a, b) in on_postgres.iter().zip(&on_sqlite) {
                ensure!(a == b, "{zone} {period:?}: postgres {a:?}, sqlite {b:?}");
            }
        }
        // Every half hour of the year's local times, skipped and repeated ones included.
        let local: Vec<PrimitiveDateTime> = (0..396 * 48)
            .map(|i| {
                Date::from_calendar_date(year, Month::January, 1)
                    .map(|d| d.midnight() + time::Duration::minutes(30 * i))
            })
            .collect::<Result<_, _>>()?;
        let on_postgres = postgres.state.backend.resolve_local_times(zone, &local).await?;
        let on_sqlite = sqlite.state.backend.resolve_local_times(zone, &local).await?;
        for ((time, a), b) in local.iter().zip(&on_postgres).zip(&on_sqlite) {
            ensure!(a == b, "{zone} {time}: postgres {a}, sqlite {b}");
        }
    }
    Ok(())
}
