//! `GET /api/v1/billing/summary`: a month's bill from the hourly rollups and the tenant's price
//! book, built exactly as the edge builds it ([`pricing::tenant_price_book_lenient`]).
//!
//! # How a month is billed
//! - The month runs from midnight on its first day to midnight on the next month's first day,
//!   in the tenant's time zone.
//! - Its usage is read from the rollups per UTC hour, service type, provider, model and event
//!   type (hours cut by the month's edges are read from raw events, as every aggregate does).
//!   Price rules start and end on whole UTC hours, so every event of such a group was priced by
//!   the same rule per unit: [`pricing::PriceBook::winning_rule`] at the hour finds it.
//! - Per-event rules (per-unit, package) are charged exactly the costs stored on the events at
//!   ingest (or by the last re-rate): the sum of `usage_cost` is the sum of stored event costs.
//!   When one group holds units of several per-event rules (input and output tokens, say), the
//!   rollup keeps only their sum; each rule's part is recomputed from the group's units and the
//!   largest part absorbs any difference from the stored sum (package rounding or sub-10^-12
//!   rounding per event), so rule lines always add up to the stored cost.
//! - Graduated and volume rules are charged on the month's total units; a rule whose month charge
//!   is below its `minimum_charge` is topped up to it ([`pricing::PriceBook::bill_period`]).
//! - `total_cost = usage_cost + tiered_charges + minimum_top_ups`.
//! - The projection scales the month's units and per-event costs by its length over the part
//!   elapsed, then applies tiers and minimums to the projected totals.
//! - Every figure is computed with checked arithmetic: one beyond what an exact decimal holds
//!   (about 7.9e28) answers 422 `overflow` naming it (`usage_cost`, `projection.total_cost`, ...).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use pricing::{COST_DECIMAL_PLACES, Decimal, MICROS_PER_HOUR, PriceBook, RuledUsage, UnitRef};
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};
use uuid::Uuid;

use super::cached;
use super::params::BillingSummaryParams;
use super::schema::{BillingProjection, BillingRuleLine, BillingServiceLine, BillingSummaryBody, ErrorBody};
use super::tenant::Tenant;
use crate::QueryState;
use crate::auth::Caller;
use crate::backend::{AggregateQuery, AggregateRow, Filter, GroupKey, Measures, QUANTITY_NAMES, Scope};
use crate::error::ApiError;
use crate::question::{Dimension, InvalidValue, Period};
use crate::stats::{self, Quantity};

/// The groups a month is billed in: one rule wins per unit in each.
const BILLING_GROUPING: [Dimension; 5] = [
    Dimension::Period,
    Dimension::ServiceType,
    Dimension::ServiceProvider,
    Dimension::Model,
    Dimension::EventType,
];

/// A month's bill: cost per service and model, tiered and volume pricing and minimums applied to
/// the month's totals, unpriced events, and a projection to the month's end.
#[utoipa::path(
    get,
    path = "/api/v1/billing/summary",
    tag = "billing",
    params(BillingSummaryParams),
    responses(
        (status = 200, body = BillingSummaryBody),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 422, body = ErrorBody, description = "`overflow`: a figure of the bill exceeds an exact decimal")
    )
)]
pub async fn summary(
    State(state): State<Arc<QueryState>>,
    Tenant { caller, params }: Tenant<BillingSummaryParams>,
) -> Result<Response, ApiError> {
    let now = OffsetDateTime::now_utc();
    let (label, start, end) = month_bounds(&state, &caller, params.month, now).await?;
    if start > now {
        return Err(ApiError::parameter("month", format!("{label} has not started yet")));
    }
    // Hours are UTC hours whatever the tenant's zone: rule bounds are on UTC hours.
    // Money is exact: partial hours of a month in a non-whole-hour zone are read from raw events.
    let scope = Scope::exact(caller.tenant_id, start, end, "UTC");
    let query = AggregateQuery {
        scope,
        filter: Filter::default(),
        period: Some(Period::Hour),
        grouping_sets: vec![BILLING_GROUPING.to_vec()],
        measures: Measures::default(),
        top: None,
    };
    cached(&state, &caller, "billing_summary", &query, || async {
        let (rows, custom, rules) = tokio::try_join!(
            state.backend.aggregate(&query),
            state.backend.custom_quantities(&query),
            state.backend.price_rules(caller.tenant_id),
        )?;
        // The same book ingest prices with: it never fails on what a tenant stored.
        let (book, _) = pricing::tenant_price_book_lenient(
            &pricing::catalog::catalog().rules,
            rules.iter().map(|rule| rule.as_stored()),
        );
        let mut custom_by_group: HashMap<&GroupKey, Vec<(&str, Decimal)>> = HashMap::new();
        for row in &custom {
            custom_by_group.entry(&row.key).or_default().push((&row.name, row.value));
        }
        let usage = MonthUsage::collect(&book, &rows, &custom_by_group)?;
        let complete = now >= end;
        let elapsed = (!complete).then(|| elapsed_fraction(start, end, now));
        usage.body(&book, &caller, label, (start, end, now), elapsed)
    })
    .await
}

/// The month a request names (`YYYY-MM`) or the current one, in the tenant's time zone, as its
/// label and instants.
async fn month_bounds(
    state: &QueryState,
    caller: &Caller,
    month: Option<BillingMonth>,
    now: OffsetDateTime,
) -> Result<(String, OffsetDateTime, OffsetDateTime), ApiError> {
    let (year, month) = match month {
        Some(BillingMonth { year, month }) => (year, month),
        None => {
            let scope =
                Scope::exact(caller.tenant_id, now, now + time::Duration::microseconds(1), &caller.time_zone);
            let periods = state.backend.periods(&scope, Period::Month).await?;
            let (start, _) = periods.first().ok_or_else(|| ApiError::Internal("no current month".into()))?;
            // The month's first midnight, seen from any zone, is within a day of the 1st.
            let local = *start + time::Duration::hours(14);
            (local.year(), local.month())
        }
    };
    let first = local_midnight(year, month)?;
    let next = match month {
        Month::December => local_midnight(year + 1, Month::January)?,
        other => local_midnight(year, other.next())?,
    };
    let bounds = state.backend.resolve_local_times(&caller.time_zone, &[first, next]).await?;
    match bounds[..] {
        [start, end] if start < end => Ok((format!("{year:04}-{:02}", month as u8), start, end)),
        _ => Err(ApiError::Internal("the month's bounds did not resolve".into())),
    }
}

/// The `month` parameter: `YYYY-MM`, a year from 1970 to 9998.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BillingMonth {
    pub year: i32,
    pub month: Month,
}

impl FromStr for BillingMonth {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<BillingMonth, InvalidValue> {
        let (year, month) = parse_month(text)?;
        Ok(BillingMonth { year, month })
    }
}

fn parse_month(text: &str) -> Result<(i32, Month), InvalidValue> {
    let invalid = || InvalidValue(format!("{text:?} is not a month as YYYY-MM"));
    let (year, month) = text.split_once('-').ok_or_else(invalid)?;
    if year.len() != 4 || month.len() != 2 {
        return Err(invalid());
    }
    let year: i32 = year.parse().map_err(|_| invalid())?;
    let month: u8 = month.parse().map_err(|_| invalid())?;
    if !(1970..=9998).contains(&year) {
        return Err(InvalidValue(format!("{text:?}: the year must be from 1970 to 9998")));
    }
    Ok((year, Month::try_from(month).map_err(|_| invalid())?))
}

fn local_midnight(year: i32, month: Month) -> Result<PrimitiveDateTime, ApiError> {
    let date = Date::from_calendar_date(year, month, 1)
        .map_err(|error| ApiError::parameter("month", error.to_string()))?;
    Ok(PrimitiveDateTime::new(date, Time::MIDNIGHT))
}

/// How much of `[start, end)` lies before `now`, above 0 and below 1.
fn elapsed_fraction(start: OffsetDateTime, end: OffsetDateTime, now: OffsetDateTime) -> Decimal {
    let elapsed = (now - start).whole_microseconds().max(1);
    let length = (end - start).whole_microseconds().max(elapsed);
    let exact = |us: i128| Decimal::try_from_i128_with_scale(us, 0).ok();
    let fraction =
        exact(elapsed).zip(exact(length)).and_then(|(elapsed, length)| elapsed.checked_div(length));
    fraction.unwrap_or(Decimal::ONE).max(Decimal::new(1, 12))
}

/// `a + b`, or an `overflow` error naming `what`. Every sum of the tenant's money and units in
/// this module is checked: stored costs may be as large as a decimal holds (the edge prices
/// with saturating arithmetic), and no request may panic.
fn add(a: Decimal, b: Decimal, what: &str) -> Result<Decimal, ApiError> {
    a.checked_add(b).ok_or_else(|| ApiError::overflow(what))
}

fn sub(a: Decimal, b: Decimal, what: &str) -> Result<Decimal, ApiError> {
    a.checked_sub(b).ok_or_else(|| ApiError::overflow(what))
}

fn div(a: Decimal, b: Decimal, what: &str) -> Result<Decimal, ApiError> {
    a.checked_div(b).ok_or_else(|| ApiError::overflow(what))
}

fn sum(values: impl IntoIterator<Item = Decimal>, what: &str) -> Result<Decimal, ApiError> {
    values.into_iter().try_fold(Decimal::ZERO, |total, value| add(total, value, what))
}

fn add_count(a: i64, b: i64, what: &str) -> Result<i64, ApiError> {
    a.checked_add(b).ok_or_else(|| ApiError::overflow(what))
}

/// A service type, provider and model.
type ServiceKey = (String, String, String);

/// The month's usage: per group and per rule.
#[derive(Debug, Default)]
struct MonthUsage {
    groups: BTreeMap<ServiceKey, GroupUsage>,
    rules: BTreeMap<Uuid, RuleUsage>,
    /// Stored cost of groups in which no per-event rule of the book wins any unit.
    unattributed: Decimal,
}

#[derive(Debug, Default)]
struct GroupUsage {
    event_count: i64,
    unpriced_count: i64,
    cost: Decimal,
}

#[derive(Debug, Default)]
struct RuleUsage {
    units: Decimal,
    per_event_cost: Decimal,
    groups: BTreeSet<ServiceKey>,
}

/// A per-event rule's part of one rollup group's cost.
struct PerEventPart {
    rule_id: Uuid,
    cost: Decimal,
}

impl MonthUsage {
    fn collect(
        book: &PriceBook,
        rows: &[AggregateRow],
        custom: &HashMap<&GroupKey, Vec<(&str, Decimal)>>,
    ) -> Result<MonthUsage, ApiError> {
        let mut usage = MonthUsage::default();
        let mut parts: Vec<PerEventPart> = Vec::new();
        for row in rows {
            let key = &row.key;
            let text = |value: &Option<String>| value.clone().unwrap_or_default();
            let service: ServiceKey =
                (text(&key.service_type), text(&key.service_provider), text(&key.model));
            let group = usage.groups.entry(service.clone()).or_default();
            group.event_count = add_count(group.event_count, row.stats.event_count, "event_count")?;
            group.unpriced_count =
                add_count(group.unpriced_count, row.stats.unpriced_count, "unpriced_event_count")?;
            group.cost = add(group.cost, row.stats.cost, "usage_cost")?;
            let hour_us = key
                .period_start
                .map(|start| (start.unix_timestamp_nanos() / 1_000) as i64)
                .unwrap_or_default()
                .div_euclid(MICROS_PER_HOUR)
                * MICROS_PER_HOUR;
            let well_known = QUANTITY_NAMES.iter().zip(row.stats.quantities);
            let customs = custom.get(key).into_iter().flatten().copied();
            let events = (pricing::EVENTS_UNIT, Decimal::from(row.stats.event_count));
            parts.clear();
            for (name, units) in well_known.map(|(name, units)| (*name, units)).chain(customs).chain([events])
            {
                if units.is_zero() {
                    continue;
                }
                let winner = book.winning_rule(
                    &service.0,
                    &service.1,
                    Some(&service.2),
                    key.event_type.as_deref().unwrap_or_default(),
                    UnitRef::from_name(name),
                    hour_us,
                );
                let Some(rule) = winner else { continue };
                let rule_usage = usage.rules.entry(rule.id).or_default();
                rule_usage.units = add(rule_usage.units, units, "units")?;
                rule_usage.groups.insert(service.clone());
                if let Ok(Some(charge)) = rule.method.event_charge(units) {
                    let cost = charge.round_dp(COST_DECIMAL_PLACES);
                    parts.push(PerEventPart { rule_id: rule.id, cost });
                }
            }
            usage.attribute(row.stats.cost, &mut parts)?;
        }
        Ok(usage)
    }

    /// Splits a group's stored cost over its per-event rules: each gets its recomputed part and
    /// the largest part absorbs the difference from the stored sum.
    fn attribute(&mut self, stored: Decimal, parts: &mut [PerEventPart]) -> Result<(), ApiError> {
        let Some(largest) =
            parts.iter().enumerate().max_by_key(|(_, part)| part.cost).map(|(index, _)| index)
        else {
            self.unattributed = add(self.unattributed, stored, "unattributed_cost")?;
            return Ok(());
        };
        let recomputed = sum(parts.iter().map(|part| part.cost), "usage_cost")?;
        let difference = sub(stored, recomputed, "usage_cost")?;
        if let Some(part) = parts.get_mut(largest) {
            part.cost = add(part.cost, difference, "usage_cost")?;
        }
        for part in parts.iter() {
            let rule = self.rules.entry(part.rule_id).or_default();
            rule.per_event_cost = add(rule.per_event_cost, part.cost, "usage_cost")?;
        }
        Ok(())
    }

    /// Each rule's units and per-event cost divided by `scale` (the elapsed fraction of the
    /// month for the projection; 1 for the bill).
    fn ruled_usage(&self, scale: Decimal, what: &str) -> Result<Vec<RuledUsage>, ApiError> {
        self.rules
            .iter()
            .map(|(rule_id, usage)| {
                Ok(RuledUsage {
                    rule_id: *rule_id,
                    units: div(usage.units, scale, what)?,
                    per_event_cost: div(usage.per_event_cost, scale, what)?.round_dp(COST_DECIMAL_PLACES),
                })
            })
            .collect()
    }

    fn body(
        &self,
        book: &PriceBook,
        caller: &Caller,
        month: String,
        (start, end, now): (OffsetDateTime, OffsetDateTime, OffsetDateTime),
        elapsed: Option<Decimal>,
    ) -> Result<BillingSummaryBody, ApiError> {
        let bill_error = |error: pricing::PricingError| match error {
            pricing::PricingError::Overflow { .. } => ApiError::overflow("total_cost"),
            other => ApiError::Internal(format!("billing: {other}")),
        };
        let bill = book.bill_period(&self.ruled_usage(Decimal::ONE, "units")?).map_err(bill_error)?;
        let usage_cost = sum(self.groups.values().map(|group| group.cost), "usage_cost")?;
        let mut tiered = Decimal::ZERO;
        let mut top_ups = Decimal::ZERO;
        let mut group_charges: BTreeMap<&ServiceKey, Decimal> = BTreeMap::new();
        let mut shared = Decimal::ZERO;
        let mut rules = Vec::with_capacity(bill.lines.len());
        for line in &bill.lines {
            let vanished = || ApiError::Internal("billed rule vanished".into());
            let usage = self.rules.get(&line.rule_id).ok_or_else(vanished)?;
            let rule = book.rule(line.rule_id).ok_or_else(vanished)?;
            let tiered_charge = sub(line.charge, usage.per_event_cost, "tiered_charges")?;
            tiered = add(tiered, tiered_charge, "tiered_charges")?;
            top_ups = add(top_ups, line.minimum_top_up, "minimum_top_ups")?;
            let period_charge = add(tiered_charge, line.minimum_top_up, "period_charges")?;
            match (usage.groups.len(), usage.groups.first()) {
                (1, Some(group)) => {
                    let charges = group_charges.entry(group).or_default();
                    *charges = add(*charges, period_charge, "period_charges")?;
                }
                _ => shared = add(shared, period_charge, "shared_period_charges")?,
            }
            rules.push(BillingRuleLine {
                rule_id: rule.id.to_string(),
                source: match rule.source {
                    pricing::RuleSource::Tenant => "tenant",
                    pricing::RuleSource::Catalog => "catalog",
                }
                .to_owned(),
                service_type: rule.service_type.clone(),
                service_provider: rule.service_provider.clone(),
                model: rule.model.clone(),
                event_type: rule.event_type.clone(),
                unit: rule.unit.name().to_owned(),
                method: method_name(&rule.method).to_owned(),
                units: Quantity(line.units),
                usage_cost: stats::money_number(usage.per_event_cost),
                tiered_charge: stats::money_number(tiered_charge),
                minimum_charge: rule.minimum_charge.map(stats::money_number),
                minimum_top_up: stats::money_number(line.minimum_top_up),
                total_cost: stats::money_number(add(line.charge, line.minimum_top_up, "total_cost")?),
            });
        }
        // Costliest first, ordered on the decimals before they become text.
        let mut groups: Vec<(&ServiceKey, &GroupUsage, Decimal, Decimal)> = self
            .groups
            .iter()
            .map(|(key, group)| {
                let period_charges = group_charges.get(key).copied().unwrap_or_default();
                Ok((key, group, period_charges, add(group.cost, period_charges, "total_cost")?))
            })
            .collect::<Result<_, ApiError>>()?;
        groups.sort_by_key(|(_, _, _, total)| std::cmp::Reverse(*total));
        let by_service = groups
            .into_iter()
            .map(|(key, group, period_charges, total)| BillingServiceLine {
                service_type: key.0.clone(),
                service_provider: key.1.clone(),
                model: key.2.clone(),
                event_count: group.event_count,
                unpriced_event_count: group.unpriced_count,
                usage_cost: stats::money_number(group.cost),
                period_charges: stats::money_number(period_charges),
                total_cost: stats::money_number(total),
            })
            .collect();
        let projection = match elapsed {
            Some(fraction) => Some(self.projection(book, fraction)?),
            None => None,
        };
        Ok(BillingSummaryBody {
            tenant_id: caller.tenant_id.to_string(),
            month,
            time_zone: caller.time_zone.clone(),
            period_start: start,
            period_end: end,
            as_of: now,
            complete: elapsed.is_none(),
            event_count: self.event_count()?,
            unpriced_event_count: self
                .groups
                .values()
                .try_fold(0, |total, group| add_count(total, group.unpriced_count, "unpriced_event_count"))?,
            usage_cost: stats::money_number(usage_cost),
            tiered_charges: stats::money_number(tiered),
            minimum_top_ups: stats::money_number(top_ups),
            total_cost: stats::money_number(add(
                add(usage_cost, tiered, "total_cost")?,
                top_ups,
                "total_cost",
            )?),
            by_service,
            shared_period_charges: stats::money_number(shared),
            rules,
            unattributed_cost: stats::money_number(self.unattributed),
            projection,
        })
    }

    fn event_count(&self) -> Result<i64, ApiError> {
        self.groups.values().try_fold(0, |total, group| add_count(total, group.event_count, "event_count"))
    }

    fn projection(&self, book: &PriceBook, fraction: Decimal) -> Result<BillingProjection, ApiError> {
        let projected = self.ruled_usage(fraction, "projection.units")?;
        let bill = book.bill_period(&projected).map_err(|error| match error {
            pricing::PricingError::Overflow { .. } => ApiError::overflow("projection.total_cost"),
            other => ApiError::Internal(format!("billing: {other}")),
        })?;
        let per_event = sum(projected.iter().map(|usage| usage.per_event_cost), "projection.usage_cost")?;
        let charges = sum(bill.lines.iter().map(|line| line.charge), "projection.tiered_charges")?;
        let top_ups = sum(bill.lines.iter().map(|line| line.minimum_top_up), "projection.minimum_top_ups")?;
        let unattributed =
            div(self.unattributed, fraction, "projection.usage_cost")?.round_dp(COST_DECIMAL_PLACES);
        let usage_cost = add(per_event, unattributed, "projection.usage_cost")?;
        let tiered = sub(charges, per_event, "projection.tiered_charges")?;
        let projected_events =
            div(Decimal::from(self.event_count()?), fraction, "projection.event_count")?.round();
        let total = add(add(usage_cost, tiered, "projection.total_cost")?, top_ups, "projection.total_cost")?;
        Ok(BillingProjection {
            method: "linear".to_owned(),
            elapsed_fraction: stats::round6(fraction.try_into().unwrap_or(0.0)),
            event_count: projected_events
                .try_into()
                .map_err(|_| ApiError::overflow("projection.event_count"))?,
            usage_cost: stats::money_number(usage_cost),
            tiered_charges: stats::money_number(tiered),
            minimum_top_ups: stats::money_number(top_ups),
            total_cost: stats::money_number(total),
        })
    }
}

fn method_name(method: &pricing::Method) -> &'static str {
    match method {
        pricing::Method::PerUnit { .. } => "per_unit",
        pricing::Method::Package { .. } => "package",
        pricing::Method::Graduated { .. } => "graduated",
        pricing::Method::Volume { .. } => "volume",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_yyyy_mm() {
        assert_eq!(parse_month("2026-11").expect("valid"), (2026, Month::November));
        assert_eq!(parse_month("2026-01").expect("valid"), (2026, Month::January));
        for bad in ["2026-13", "2026-00", "2026-1", "26-11", "2026/11", "2026-11-01", "", "1969-12"] {
            assert!(parse_month(bad).is_err(), "{bad} accepted");
        }
    }

    fn row(hour: OffsetDateTime, cost: Decimal) -> AggregateRow {
        let key = GroupKey {
            period_start: Some(hour),
            service_type: Some("custom".into()),
            service_provider: Some("p".into()),
            model: Some(String::new()),
            event_type: Some("job".into()),
            ..GroupKey::default()
        };
        let stats = crate::backend::Stats { event_count: 1, cost, ..Default::default() };
        AggregateRow { set: 0, key, stats, groups_total: None, metric_total: None, custom_metric: None }
    }

    #[test]
    fn sums_and_projections_beyond_a_decimal_are_overflow_errors() {
        let book = pricing::tenant_price_book(&pricing::catalog::catalog().rules, std::iter::empty())
            .expect("the catalog alone");
        let hour = time::macros::datetime!(2026-11-01 05:00 UTC);
        let caller = Caller {
            key_id: Uuid::nil(),
            tenant_id: Uuid::nil(),
            tenant_name: "acme".into(),
            time_zone: "UTC".into(),
        };
        let bounds = (hour, hour + time::Duration::days(30), hour + time::Duration::days(1));
        let half = Decimal::MAX / Decimal::TWO + Decimal::ONE;
        let two = [row(hour, half), row(hour + time::Duration::hours(1), half)];
        let error = MonthUsage::collect(&book, &two, &HashMap::new()).expect_err("does not fit");
        assert!(matches!(&error, ApiError::Overflow(detail) if detail.starts_with("usage_cost")), "{error}");
        // One fits: billed exactly; projected from a part of the month, it no longer fits.
        let usage = MonthUsage::collect(&book, &two[..1], &HashMap::new()).expect("fits");
        let body = usage.body(&book, &caller, "2026-11".into(), bounds, None).expect("billed");
        assert_eq!(body.total_cost, stats::money_number(half));
        let error =
            usage.body(&book, &caller, "2026-11".into(), bounds, Some(Decimal::new(1, 1))).expect_err("no");
        assert!(matches!(&error, ApiError::Overflow(detail) if detail.starts_with("projection.")), "{error}");
    }

    #[test]
    fn elapsed_fraction_is_the_part_of_the_month_before_now() {
        let start = time::macros::datetime!(2026-11-01 00:00 UTC);
        let end = time::macros::datetime!(2026-12-01 00:00 UTC);
        let fraction = elapsed_fraction(start, end, time::macros::datetime!(2026-11-16 00:00 UTC));
        assert_eq!(fraction, Decimal::new(5, 1));
        assert!(elapsed_fraction(start, end, start) > Decimal::ZERO);
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::api::params::from_query;

    proptest! {
        #[test]
        fn months_are_within_bounds_or_refused_by_name(
            text in prop_oneof![
                any::<String>(),
                (-99_999i32..=99_999, 0u8..=99).prop_map(|(year, month)| format!("{year:04}-{month:02}")),
            ],
        ) {
            // Every byte percent-encoded: the text arrives as sent.
            let encoded: String = text.bytes().map(|byte| format!("%{byte:02X}")).collect();
            match from_query::<BillingSummaryParams>(&format!("month={encoded}")).map(|params| params.month) {
                Ok(None) => prop_assert!(false, "{text:?}: a value was sent"),
                Ok(Some(BillingMonth { year, .. })) => {
                    prop_assert!((1970..=9998).contains(&year));
                    prop_assert!(local_midnight(year, Month::December).is_ok());
                }
                Err(error) => prop_assert!(error.to_string().starts_with("month:"), "{error}"),
            }
        }
    }
}
