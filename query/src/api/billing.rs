//! `GET /api/v1/billing/summary`: a month's bill from the hourly rollups and the tenant's price
//! book, built exactly as the edge builds it ([`pricing::tenant_price_book`]).
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use pricing::{COST_DECIMAL_PLACES, Decimal, MICROS_PER_HOUR, PriceBook, RuledUsage, UnitRef};
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};
use uuid::Uuid;

use super::schema::{BillingProjection, BillingRuleLine, BillingServiceLine, BillingSummaryBody, ErrorBody};
use super::{Params, cached, caller};
use crate::QueryState;
use crate::auth::Caller;
use crate::backend::{AggregateQuery, AggregateRow, Filter, GroupKey, Measures, QUANTITY_NAMES, Scope};
use crate::error::ApiError;
use crate::params::{BillingSummaryParams, Dimension, Period};
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
        (status = 403, body = ErrorBody)
    )
)]
pub async fn summary(
    State(state): State<Arc<QueryState>>,
    headers: HeaderMap,
    Params(params): Params<BillingSummaryParams>,
) -> Result<Response, ApiError> {
    let caller = caller(&state, &headers, params.tenant_id.as_deref()).await?;
    let now = OffsetDateTime::now_utc();
    let (label, start, end) = month_bounds(&state, &caller, params.month.as_deref(), now).await?;
    if start > now {
        return Err(ApiError::parameter("month", format!("{label} has not started yet")));
    }
    // Hours are UTC hours whatever the tenant's zone: rule bounds are on UTC hours.
    let scope = Scope { tenant_id: caller.tenant_id, start, end, time_zone: "UTC".to_owned() };
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
        let book = pricing::tenant_price_book(
            &pricing::catalog::catalog().rules,
            rules.iter().map(|rule| rule.as_stored()),
        )
        .map_err(|error| ApiError::Internal(format!("the tenant's price book: {error}")))?;
        let mut custom_by_group: HashMap<&GroupKey, Vec<(&str, Decimal)>> = HashMap::new();
        for row in &custom {
            custom_by_group.entry(&row.key).or_default().push((&row.name, row.value));
        }
        let usage = MonthUsage::collect(&book, &rows, &custom_by_group);
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
    month: Option<&str>,
    now: OffsetDateTime,
) -> Result<(String, OffsetDateTime, OffsetDateTime), ApiError> {
    let (year, month) = match month {
        Some(text) => parse_month(text)?,
        None => {
            let scope = Scope {
                tenant_id: caller.tenant_id,
                start: now,
                end: now + time::Duration::microseconds(1),
                time_zone: caller.time_zone.clone(),
            };
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

fn parse_month(text: &str) -> Result<(i32, Month), ApiError> {
    let invalid = || ApiError::parameter("month", format!("{text:?} is not a month as YYYY-MM"));
    let (year, month) = text.split_once('-').ok_or_else(invalid)?;
    if year.len() != 4 || month.len() != 2 {
        return Err(invalid());
    }
    let year: i32 = year.parse().map_err(|_| invalid())?;
    let month: u8 = month.parse().map_err(|_| invalid())?;
    if !(1970..=9998).contains(&year) {
        return Err(ApiError::parameter("month", format!("{text:?}: the year must be from 1970 to 9998")));
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
    let fraction = Decimal::from_i128_with_scale(elapsed, 0) / Decimal::from_i128_with_scale(length, 0);
    fraction.max(Decimal::new(1, 12))
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
    ) -> MonthUsage {
        let mut usage = MonthUsage::default();
        let mut parts: Vec<PerEventPart> = Vec::new();
        for row in rows {
            let key = &row.key;
            let text = |value: &Option<String>| value.clone().unwrap_or_default();
            let service: ServiceKey =
                (text(&key.service_type), text(&key.service_provider), text(&key.model));
            let group = usage.groups.entry(service.clone()).or_default();
            group.event_count += row.stats.event_count;
            group.unpriced_count += row.stats.unpriced_count;
            group.cost += row.stats.cost;
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
                rule_usage.units += units;
                rule_usage.groups.insert(service.clone());
                if let Some(charge) = rule.method.event_charge(units) {
                    let cost = charge.round_dp(COST_DECIMAL_PLACES);
                    parts.push(PerEventPart { rule_id: rule.id, cost });
                }
            }
            usage.attribute(row.stats.cost, &mut parts);
        }
        usage
    }

    /// Splits a group's stored cost over its per-event rules: each gets its recomputed part and
    /// the largest part absorbs the difference from the stored sum.
    fn attribute(&mut self, stored: Decimal, parts: &mut [PerEventPart]) {
        let Some(largest) =
            parts.iter().enumerate().max_by_key(|(_, part)| part.cost).map(|(index, _)| index)
        else {
            self.unattributed += stored;
            return;
        };
        let recomputed: Decimal = parts.iter().map(|part| part.cost).sum();
        parts[largest].cost += stored - recomputed;
        for part in parts.iter() {
            self.rules.entry(part.rule_id).or_default().per_event_cost += part.cost;
        }
    }

    fn ruled_usage(&self, scale: Decimal) -> Vec<RuledUsage> {
        self.rules
            .iter()
            .map(|(rule_id, usage)| RuledUsage {
                rule_id: *rule_id,
                units: usage.units / scale,
                per_event_cost: (usage.per_event_cost / scale).round_dp(COST_DECIMAL_PLACES),
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
        let bill_error = |error: pricing::PricingError| ApiError::Internal(format!("billing: {error}"));
        let bill = book.bill_period(&self.ruled_usage(Decimal::ONE)).map_err(bill_error)?;
        let usage_cost: Decimal = self.groups.values().map(|group| group.cost).sum();
        let mut tiered = Decimal::ZERO;
        let mut top_ups = Decimal::ZERO;
        let mut group_charges: BTreeMap<&ServiceKey, Decimal> = BTreeMap::new();
        let mut shared = Decimal::ZERO;
        let mut rules = Vec::with_capacity(bill.lines.len());
        for line in &bill.lines {
            let usage = &self.rules[&line.rule_id];
            let rule =
                book.rule(line.rule_id).ok_or_else(|| ApiError::Internal("billed rule vanished".into()))?;
            let tiered_charge = line.charge - usage.per_event_cost;
            tiered += tiered_charge;
            top_ups += line.minimum_top_up;
            let period_charge = tiered_charge + line.minimum_top_up;
            match (usage.groups.len(), usage.groups.first()) {
                (1, Some(group)) => *group_charges.entry(group).or_default() += period_charge,
                _ => shared += period_charge,
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
                total_cost: stats::money_number(line.total()),
            });
        }
        // Costliest first, ordered on the decimals before they become text.
        let mut groups: Vec<(&ServiceKey, &GroupUsage, Decimal)> = self
            .groups
            .iter()
            .map(|(key, group)| (key, group, group_charges.get(key).copied().unwrap_or_default()))
            .collect();
        groups.sort_by_key(|(_, group, period_charges)| std::cmp::Reverse(group.cost + period_charges));
        let by_service = groups
            .into_iter()
            .map(|(key, group, period_charges)| BillingServiceLine {
                service_type: key.0.clone(),
                service_provider: key.1.clone(),
                model: key.2.clone(),
                event_count: group.event_count,
                unpriced_event_count: group.unpriced_count,
                usage_cost: stats::money_number(group.cost),
                period_charges: stats::money_number(period_charges),
                total_cost: stats::money_number(group.cost + period_charges),
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
            event_count: self.groups.values().map(|group| group.event_count).sum(),
            unpriced_event_count: self.groups.values().map(|group| group.unpriced_count).sum(),
            usage_cost: stats::money_number(usage_cost),
            tiered_charges: stats::money_number(tiered),
            minimum_top_ups: stats::money_number(top_ups),
            total_cost: stats::money_number(usage_cost + tiered + top_ups),
            by_service,
            shared_period_charges: stats::money_number(shared),
            rules,
            unattributed_cost: stats::money_number(self.unattributed),
            projection,
        })
    }

    fn projection(&self, book: &PriceBook, fraction: Decimal) -> Result<BillingProjection, ApiError> {
        let projected = self.ruled_usage(fraction);
        let bill =
            book.bill_period(&projected).map_err(|error| ApiError::Internal(format!("billing: {error}")))?;
        let per_event: Decimal = projected.iter().map(|usage| usage.per_event_cost).sum();
        let charges: Decimal = bill.lines.iter().map(|line| line.charge).sum();
        let top_ups: Decimal = bill.lines.iter().map(|line| line.minimum_top_up).sum();
        let usage_cost = per_event + (self.unattributed / fraction).round_dp(COST_DECIMAL_PLACES);
        let tiered = charges - per_event;
        let events: i64 = self.groups.values().map(|group| group.event_count).sum();
        let projected_events = (Decimal::from(events) / fraction).round();
        Ok(BillingProjection {
            method: "linear".to_owned(),
            elapsed_fraction: stats::round6(fraction.try_into().unwrap_or(0.0)),
            event_count: projected_events.try_into().unwrap_or(i64::MAX),
            usage_cost: stats::money_number(usage_cost),
            tiered_charges: stats::money_number(tiered),
            minimum_top_ups: stats::money_number(top_ups),
            total_cost: stats::money_number(usage_cost + tiered + top_ups),
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

    #[test]
    fn elapsed_fraction_is_the_part_of_the_month_before_now() {
        let start = time::macros::datetime!(2026-11-01 00:00 UTC);
        let end = time::macros::datetime!(2026-12-01 00:00 UTC);
        let fraction = elapsed_fraction(start, end, time::macros::datetime!(2026-11-16 00:00 UTC));
        assert_eq!(fraction, Decimal::new(5, 1));
        assert!(elapsed_fraction(start, end, start) > Decimal::ZERO);
    }
}
