//! Response bodies: the older system's field names, documented for the OpenAPI document.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::backend::{CustomQuantityRow, GroupKey, QUANTITY_NAMES, Stats};
use crate::stats::{self, Quantity, Trend};

/// An error: `error` is a stable code, `detail` says what to fix.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// `authentication_required`, `invalid_api_key`, `forbidden`, `invalid_parameter`,
    /// `unavailable` or `internal`.
    pub error: String,
    pub detail: String,
}

/// Sums over a group of events.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Totals {
    pub event_count: i64,
    pub error_count: i64,
    /// Errors per event, 0 to 1.
    pub error_rate: f64,
    /// Distinct `user_id`s (exact).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_users: Option<i64>,
    /// Sum over priced events: a JSON number with the exact decimal digits.
    #[schema(value_type = f64, example = 12.5)]
    pub total_cost: Quantity,
    /// Events without a price (not included in `total_cost`).
    pub unpriced_event_count: i64,
    /// Every well-known quantity, and custom quantities where computed, as exact numbers.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<BTreeMap<String, f64>>)]
    pub aggregated_metrics: Option<BTreeMap<String, Quantity>>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
}

/// Latency of the events that reported one, in milliseconds; percentiles within 19%. Latency
/// histograms are kept per service and hour, not per user: where an answer is grouped or
/// filtered by user, the percentiles are null (count, mean and maximum are exact).
/// The embedded backend keeps them per user too.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Latency {
    pub latency_count: i64,
    pub latency_avg_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

impl Latency {
    pub fn from_stats(stats: &Stats) -> Option<Latency> {
        let buckets = stats.latency_buckets.as_ref()?;
        let max_ms = stats.latency_max_us as f64 / 1000.0;
        let present = stats.latency_count > 0;
        Some(Latency {
            latency_count: stats.latency_count,
            latency_avg_ms: present
                .then(|| stats::round3(stats.latency_sum_us as f64 / stats.latency_count as f64 / 1000.0)),
            latency_max_ms: present.then_some(max_ms),
            latency_p50_ms: stats::percentile_ms(buckets, 0.50, max_ms),
            latency_p95_ms: stats::percentile_ms(buckets, 0.95, max_ms),
            latency_p99_ms: stats::percentile_ms(buckets, 0.99, max_ms),
        })
    }
}

impl Totals {
    /// Totals of `stats`, with quantities when `metrics` is given (custom ones added to it).
    pub fn new(stats: &Stats, metrics: Option<BTreeMap<String, Quantity>>) -> Totals {
        Totals {
            event_count: stats.event_count,
            error_count: stats.error_count,
            error_rate: stats::error_rate(stats.error_count, stats.event_count),
            unique_users: stats.unique_users,
            total_cost: stats::money_number(stats.cost),
            unpriced_event_count: stats.unpriced_count,
            aggregated_metrics: metrics,
            latency: Latency::from_stats(stats),
        }
    }
}

/// The well-known quantity sums of `stats` plus the custom ones of its group.
pub fn quantities_of(stats: &Stats, custom: &[&CustomQuantityRow]) -> BTreeMap<String, Quantity> {
    let mut metrics: BTreeMap<String, Quantity> = QUANTITY_NAMES
        .iter()
        .zip(stats.quantities)
        .map(|(name, sum)| ((*name).to_owned(), Quantity(sum)))
        .collect();
    for row in custom {
        metrics.entry(row.name.clone()).or_insert(Quantity(Decimal::ZERO)).0 += row.value;
    }
    metrics
}

/// Custom quantity rows of a group.
pub fn custom_of<'a>(
    rows: &'a [CustomQuantityRow],
    set: usize,
    key: &GroupKey,
) -> Vec<&'a CustomQuantityRow> {
    rows.iter().filter(|row| row.set == set && row.key == *key).collect()
}

/// One event of a listing.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageEvent {
    #[schema(value_type = String, format = Uuid)]
    pub event_id: uuid::Uuid,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub timestamp: OffsetDateTime,
    pub user_id: String,
    pub service_type: String,
    pub service_provider: String,
    pub event_type: String,
    pub model: Option<String>,
    /// `success` or `error`.
    pub status: &'static str,
    pub error_code: Option<String>,
    /// What the caller sent under `metrics` (or as flat numeric fields), under the caller's
    /// names and JSON types (`pages_processed`, `"model_version": "v2.1"`), beside Tally's
    /// canonical quantities (well-known and custom, as exact numbers) and `latency_ms`.
    #[schema(value_type = BTreeMap<String, Object>)]
    pub metrics: BTreeMap<String, MetricValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub billing_info: Option<BillingInfo>,
    /// The event's price, a JSON number with the exact decimal digits; `null` when no price rule
    /// matched.
    #[schema(value_type = Option<f64>)]
    pub total_cost: Option<Quantity>,
    pub tags: Vec<String>,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    pub session_id: Option<String>,
    pub request_id: Option<String>,
}

/// A value under an event's `metrics`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum MetricValue {
    /// A stored quantity: an exact decimal.
    Exact(Quantity),
    /// A value as the caller sent it.
    Sent(serde_json::Value),
}

/// How an event was priced.
#[derive(Debug, Serialize, ToSchema)]
pub struct BillingInfo {
    #[schema(value_type = Option<f64>)]
    pub total_cost: Option<Quantity>,
    /// False when no price rule matched: the event is unpriced, not free.
    pub priced: bool,
}

/// `GET /api/v1/usage` (JSON). With `format=csv` the same events stream as CSV rows.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageList {
    pub events: Vec<UsageEvent>,
    /// Events matching the filters in the range (as of the first page).
    pub total_count: i64,
    pub limit: u32,
    pub offset: u64,
    pub has_more: bool,
    /// Pass as `cursor` for the next page.
    pub next_cursor: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub start_date: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub end_date: OffsetDateTime,
}

/// The time range an answer covers.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Range {
    /// The range as asked.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub start_date: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub end_date: OffsetDateTime,
    /// The range the answer counts: with `edges` `hour`, the whole UTC hours that the asked
    /// range touches; with `exact`, the range as asked.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub effective_start: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub effective_end: OffsetDateTime,
    /// `hour`: counted at the rollups' grain (an hour that a period boundary cuts counts in the
    /// period holding most of it); `exact`: to the microsecond.
    #[schema(value_type = String)]
    pub edges: &'static str,
    pub time_zone: String,
}

/// One row of `GET /api/v1/usage/aggregate`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AggregateRowBody {
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = String, format = DateTime)]
    pub period_start: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = String, format = DateTime)]
    pub period_end: Option<OffsetDateTime>,
    pub service_type: Option<String>,
    pub service_provider: Option<String>,
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    #[serde(flatten)]
    pub totals: Totals,
}

/// `GET /api/v1/usage/aggregate`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AggregateBody {
    pub period: String,
    pub group_by: Vec<String>,
    #[serde(flatten)]
    pub range: Range,
    /// One row per period and group (the older system's name).
    pub aggregates: Vec<AggregateRowBody>,
    /// The same sums over the whole range and filters (unique users counted once).
    pub total_aggregates: Totals,
    /// The same rows as `aggregates` (Tally's earlier name, kept for its clients).
    pub aggregations: Vec<AggregateRowBody>,
}

/// A user's share of a service or range.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserUsage {
    pub user_id: String,
    pub event_count: i64,
    #[schema(value_type = f64)]
    pub total_cost: Quantity,
    pub unpriced_event_count: i64,
}

/// One service of `GET /api/v1/usage/by-service`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceUsage {
    pub service_type: String,
    pub service_provider: String,
    #[serde(flatten)]
    pub totals: Totals,
    /// This service's events over all events in the range, 0 to 1.
    pub share_of_events: f64,
    /// The users with the highest cost (then most events).
    pub top_users: Vec<UserUsage>,
}

/// `GET /api/v1/usage/by-service`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ByServiceBody {
    #[serde(flatten)]
    pub range: Range,
    pub totals: Totals,
    pub services: Vec<ServiceUsage>,
}

/// Cost of one slice of `GET /api/v1/usage/costs`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CostSlice {
    /// `service_type:service_provider`, the model (`""`: none) or the period start.
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none", default)]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub period_start: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none", default)]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub period_end: Option<OffsetDateTime>,
    #[schema(value_type = f64)]
    pub total_cost: Quantity,
    pub event_count: i64,
    pub unpriced_event_count: i64,
}

/// `GET /api/v1/usage/costs`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CostsBody {
    #[serde(flatten)]
    pub range: Range,
    pub group_by: String,
    #[schema(value_type = f64)]
    pub total_cost: Quantity,
    pub event_count: i64,
    pub unpriced_event_count: i64,
    pub cost_by_service: Vec<CostSlice>,
    pub cost_by_model: Vec<CostSlice>,
    /// Every period of the range, zeros included.
    pub cost_by_period: Vec<CostSlice>,
}

/// A point of a trend.
#[derive(Debug, Serialize, ToSchema)]
pub struct DataPoint {
    /// The period's start.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub period: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub period_end: OffsetDateTime,
    /// `null` where the metric is undefined (a latency without events).
    #[schema(value_type = Option<f64>)]
    pub value: Option<Quantity>,
}

/// `GET /api/v1/analytics/trends`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TrendsBody {
    pub metric: String,
    pub period: String,
    #[serde(flatten)]
    pub range: Range,
    pub service_type: Option<String>,
    pub data_points: Vec<DataPoint>,
    /// `up`, `down` or `stable` (the older system's name).
    pub trend_direction: Trend,
    /// The period unit (the older system's name for `period`).
    pub period_type: String,
    /// Same as `trend_direction`.
    pub trend: Trend,
    /// From the mean of the first half to that of the second, in percent: 100 when the first is
    /// zero and the second is not, 0 when both are zero.
    pub percentage_change: f64,
}

/// A ranked user.
#[derive(Debug, Serialize, ToSchema)]
pub struct RankedUser {
    pub rank: u32,
    pub user_id: String,
    #[schema(value_type = f64)]
    pub value: Quantity,
    /// This user's part of the metric's total, 0 to 1.
    pub share: f64,
    pub event_count: i64,
    #[schema(value_type = f64)]
    pub total_cost: Quantity,
    pub unpriced_event_count: i64,
}

/// `GET /api/v1/analytics/top-users`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TopUsersBody {
    pub by: String,
    #[serde(flatten)]
    pub range: Range,
    /// Users with events in the range and filters.
    pub total_users: i64,
    pub users: Vec<RankedUser>,
}

/// A group of a breakdown, compare or errors answer: its dimension values and numbers.
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupBody {
    /// Dimension name to value (`""` for a missing model).
    pub key: BTreeMap<String, String>,
    #[serde(flatten)]
    pub totals: Totals,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_of_events: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_of_cost: Option<f64>,
}

/// `GET /api/v1/analytics/breakdown`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BreakdownBody {
    pub group_by: Vec<String>,
    #[serde(flatten)]
    pub range: Range,
    pub total_groups: i64,
    pub totals: Totals,
    pub rows: Vec<GroupBody>,
}

/// Changes from the previous period to the current one, in percent (`null`: previous was zero).
#[derive(Debug, Serialize, ToSchema)]
pub struct Change {
    pub event_count_pct: Option<f64>,
    pub total_cost_pct: Option<f64>,
    pub unique_users_pct: Option<f64>,
    /// Difference of the error rates (current minus previous), not a percentage.
    pub error_rate_diff: f64,
    pub latency_p95_pct: Option<f64>,
}

/// One side of a comparison.
#[derive(Debug, Serialize, ToSchema)]
pub struct Side {
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub start_date: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub end_date: OffsetDateTime,
    pub totals: Totals,
}

/// A group compared over both periods.
#[derive(Debug, Serialize, ToSchema)]
pub struct CompareRow {
    pub key: BTreeMap<String, String>,
    pub current: Totals,
    pub previous: Totals,
    pub change: Change,
}

/// `GET /api/v1/analytics/compare`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CompareBody {
    pub group_by: Option<String>,
    pub time_zone: String,
    pub current: Side,
    pub previous: Side,
    pub change: Change,
    pub rows: Vec<CompareRow>,
}

/// `GET /api/v1/analytics/errors`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorsBody {
    pub group_by: Vec<String>,
    #[serde(flatten)]
    pub range: Range,
    pub totals: Totals,
    /// Groups by error count, then event count.
    pub rows: Vec<GroupBody>,
}

/// `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthBody {
    /// `healthy` or `unhealthy`.
    pub status: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub timestamp: OffsetDateTime,
    pub service: String,
    pub version: String,
    /// Each dependency (`database`, `redis`): `healthy`, `unhealthy` or `not_configured`.
    pub services: BTreeMap<String, String>,
}

/// The dimension values of a group as a map, in the order asked for.
pub fn key_map(key: &GroupKey, dimensions: &[crate::question::Dimension]) -> BTreeMap<String, String> {
    dimensions
        .iter()
        .map(|dimension| (dimension.name().to_owned(), key.get(*dimension).unwrap_or_default().to_owned()))
        .collect()
}

/// The change between two totals.
pub fn change(previous: &Totals, current: &Totals, previous_stats: &Stats, current_stats: &Stats) -> Change {
    let p95 = |totals: &Totals| totals.latency.as_ref().and_then(|latency| latency.latency_p95_ms);
    let as_f64 = |value: Decimal| -> f64 { value.try_into().unwrap_or(0.0) };
    Change {
        event_count_pct: stats::percent_change(previous.event_count as f64, current.event_count as f64),
        total_cost_pct: stats::percent_change(as_f64(previous_stats.cost), as_f64(current_stats.cost)),
        unique_users_pct: match (previous.unique_users, current.unique_users) {
            (Some(previous), Some(current)) => stats::percent_change(previous as f64, current as f64),
            _ => None,
        },
        error_rate_diff: stats::round6(current.error_rate - previous.error_rate),
        latency_p95_pct: match (p95(previous), p95(current)) {
            (Some(previous), Some(current)) => stats::percent_change(previous, current),
            _ => None,
        },
    }
}

/// `GET /api/v1/billing/summary`: a month's bill.
#[derive(Debug, Serialize, ToSchema)]
pub struct BillingSummaryBody {
    pub tenant_id: String,
    /// `YYYY-MM`, in the tenant's time zone.
    pub month: String,
    pub time_zone: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub period_start: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub period_end: OffsetDateTime,
    /// When the summary was computed; it covers events stored until then.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub as_of: OffsetDateTime,
    /// True once the month has ended.
    pub complete: bool,
    pub event_count: i64,
    /// Events no price rule matched: stored with no cost, never counted as 0.
    pub unpriced_event_count: i64,
    /// Per-event (per-unit and package) charges, exactly the costs stored on the events.
    #[schema(value_type = f64)]
    pub usage_cost: Quantity,
    /// Graduated and volume charges on the month's total units.
    #[schema(value_type = f64)]
    pub tiered_charges: Quantity,
    /// What minimum charges add to rules that charged less.
    #[schema(value_type = f64)]
    pub minimum_top_ups: Quantity,
    /// `usage_cost + tiered_charges + minimum_top_ups`.
    #[schema(value_type = f64)]
    pub total_cost: Quantity,
    /// Per service type, provider and model, costliest first.
    pub by_service: Vec<BillingServiceLine>,
    /// Tiered charges and top-ups of rules that priced more than one service/provider/model
    /// group (a rule with no model, say), which no single group owns.
    #[schema(value_type = f64)]
    pub shared_period_charges: Quantity,
    /// One line per price rule that priced usage this month.
    pub rules: Vec<BillingRuleLine>,
    /// Stored per-event cost of events whose rule is no longer in the book (deleted before it
    /// ended); part of `usage_cost`.
    #[schema(value_type = f64)]
    pub unattributed_cost: Quantity,
    /// Where the month ends if usage goes on at the month's rate so far; `null` once complete.
    pub projection: Option<BillingProjection>,
}

/// One service type, provider and model in a bill.
#[derive(Debug, Serialize, ToSchema)]
pub struct BillingServiceLine {
    pub service_type: String,
    pub service_provider: String,
    /// `""`: events without a model.
    pub model: String,
    pub event_count: i64,
    pub unpriced_event_count: i64,
    #[schema(value_type = f64)]
    pub usage_cost: Quantity,
    /// Tiered charges and minimum top-ups of rules that priced only this group.
    #[schema(value_type = f64)]
    pub period_charges: Quantity,
    #[schema(value_type = f64)]
    pub total_cost: Quantity,
}

/// One price rule in a bill.
#[derive(Debug, Serialize, ToSchema)]
pub struct BillingRuleLine {
    pub rule_id: String,
    /// `tenant` or `catalog`.
    pub source: String,
    pub service_type: String,
    pub service_provider: Option<String>,
    pub model: Option<String>,
    pub event_type: Option<String>,
    pub unit: String,
    /// `per_unit`, `package`, `graduated` or `volume`.
    pub method: String,
    /// The month's units the rule priced.
    #[schema(value_type = f64)]
    pub units: Quantity,
    /// Per-event charges stored on the events (per-unit and package rules).
    #[schema(value_type = f64)]
    pub usage_cost: Quantity,
    /// The graduated or volume charge on `units` (0 for per-event rules).
    #[schema(value_type = f64)]
    pub tiered_charge: Quantity,
    #[schema(value_type = Option<f64>)]
    pub minimum_charge: Option<Quantity>,
    #[schema(value_type = f64)]
    pub minimum_top_up: Quantity,
    #[schema(value_type = f64)]
    pub total_cost: Quantity,
}

/// A linear projection to the end of the month.
#[derive(Debug, Serialize, ToSchema)]
pub struct BillingProjection {
    /// `linear`: every unit and per-event cost scaled by the month's length over its elapsed part,
    /// then tiers and minimums applied to the projected totals.
    pub method: String,
    /// Elapsed part of the month, 0 to 1.
    pub elapsed_fraction: f64,
    pub event_count: i64,
    #[schema(value_type = f64)]
    pub usage_cost: Quantity,
    #[schema(value_type = f64)]
    pub tiered_charges: Quantity,
    #[schema(value_type = f64)]
    pub minimum_top_ups: Quantity,
    #[schema(value_type = f64)]
    pub total_cost: Quantity,
}
