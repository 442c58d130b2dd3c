//! `/api/v1/analytics/*`: trends, top users, breakdowns, period comparisons and errors.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use rust_decimal::Decimal;
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};

use super::cached;
use super::params::{BreakdownParams, CompareParams, ErrorsParams, TopUsersParams, TrendsParams};
use super::schema::{
    BreakdownBody, CompareBody, CompareRow, DataPoint, ErrorBody, ErrorsBody, GroupBody, RankedUser, Side,
    TopUsersBody, Totals, TrendsBody, change, key_map, quantities_of,
};
use super::tenant::Scoped;
use super::usage::{range, rows_of, share, total_of};
use crate::QueryState;
use crate::backend::{AggregateQuery, AggregateRow, GroupKey, Measures, Stats};
use crate::error::ApiError;
use crate::question::{Dimension, Metric, Period};
use crate::stats::{self, Quantity};

/// The value of `metric` for a group; `None` where it is undefined (rates and latencies of no
/// events).
fn metric_value(metric: &Metric, stats: &Stats, custom: Option<Decimal>) -> Option<Decimal> {
    let ms = |value: Option<f64>| value.and_then(Decimal::from_f64);
    let latency = || super::schema::Latency::from_stats(stats);
    match metric {
        Metric::EventCount => Some(Decimal::from(stats.event_count)),
        Metric::ErrorCount => Some(Decimal::from(stats.error_count)),
        Metric::TotalCost => Some(stats.cost),
        Metric::UniqueUsers => Some(Decimal::from(stats.unique_users.unwrap_or(0))),
        Metric::ErrorRate => (stats.event_count > 0)
            .then(|| Decimal::from_f64(stats::error_rate(stats.error_count, stats.event_count)))?,
        Metric::LatencyAvg => ms(latency().and_then(|latency| latency.latency_avg_ms)),
        Metric::LatencyP50 => ms(latency().and_then(|latency| latency.latency_p50_ms)),
        Metric::LatencyP95 => ms(latency().and_then(|latency| latency.latency_p95_ms)),
        Metric::LatencyP99 => ms(latency().and_then(|latency| latency.latency_p99_ms)),
        Metric::Quantity(index) => Some(stats.quantities[*index]),
        Metric::Custom(_) => Some(custom.unwrap_or_default()),
    }
}

/// What a query must compute for `metric`.
fn measures_for(metric: &Metric) -> Measures {
    Measures {
        unique_users: *metric == Metric::UniqueUsers,
        latency_histogram: matches!(metric, Metric::LatencyP50 | Metric::LatencyP95 | Metric::LatencyP99),
        custom_metric: match metric {
            Metric::Custom(name) => Some(name.clone()),
            _ => None,
        },
    }
}

/// One metric per period, with its direction.
#[utoipa::path(
    get,
    path = "/api/v1/analytics/trends",
    tag = "analytics",
    params(TrendsParams),
    responses(
        (status = 200, body = TrendsBody),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)
    )
)]
pub async fn trends(
    State(state): State<Arc<QueryState>>,
    Scoped { caller, scope, filter, params }: Scoped<TrendsParams>,
) -> Result<Response, ApiError> {
    let metric = params.metric.unwrap_or(Metric::EventCount);
    let period = params.period.unwrap_or(Period::Day);
    // One series, one dimension: every period sums over all services (or the one filtered).
    let query = AggregateQuery {
        scope,
        filter,
        period: Some(period),
        grouping_sets: vec![vec![Dimension::Period]],
        measures: measures_for(&metric),
        top: None,
    };
    cached(&state, &caller, "trends", &(&query, &metric), || async {
        let buckets = query.scope.bucketed();
        let (rows, periods) =
            tokio::try_join!(state.backend.aggregate(&query), state.backend.periods(&buckets, period))?;
        let data_points: Vec<DataPoint> = periods
            .iter()
            .map(|(start, end)| {
                let row = rows.iter().find(|row| row.key.period_start == Some(*start));
                let value = match row {
                    Some(row) => metric_value(&metric, &row.stats, row.custom_metric),
                    None => metric_value(&metric, &Stats::default(), None),
                };
                DataPoint { period: *start, period_end: *end, value: value.map(Quantity) }
            })
            .collect();
        let values: Vec<Option<f64>> =
            data_points.iter().map(|point| point.value.and_then(|value| value.0.to_f64())).collect();
        let (trend, percentage_change) = stats::trend(&values);
        Ok(TrendsBody {
            metric: metric.name(),
            period: period.sql_unit().to_owned(),
            range: range(&query.scope),
            service_type: query.filter.service_type.clone(),
            data_points,
            trend_direction: trend,
            period_type: period.sql_unit().to_owned(),
            trend,
            percentage_change,
        })
    })
    .await
}

/// Users ranked by cost, events or a quantity.
#[utoipa::path(
    get,
    path = "/api/v1/analytics/top-users",
    tag = "analytics",
    params(TopUsersParams),
    responses(
        (status = 200, body = TopUsersBody),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)
    )
)]
pub async fn top_users(
    State(state): State<Arc<QueryState>>,
    Scoped { caller, scope, filter, params }: Scoped<TopUsersParams>,
) -> Result<Response, ApiError> {
    let metric = params.by.map_or(Metric::TotalCost, |by| by.0);
    let limit = params.limit.0;
    let query = AggregateQuery {
        scope,
        filter,
        period: None,
        grouping_sets: vec![vec![Dimension::UserId]],
        measures: measures_for(&metric),
        top: Some((metric.clone(), limit)),
    };
    cached(&state, &caller, "top-users", &query, || async {
        let rows = state.backend.aggregate(&query).await?;
        let total_users = rows.first().and_then(|row| row.groups_total).unwrap_or(0);
        let users = rows
            .iter()
            .enumerate()
            .map(|(index, row)| {
                let value = metric_value(&metric, &row.stats, row.custom_metric).unwrap_or_default();
                let total = row.metric_total.unwrap_or_default();
                let share = value.checked_div(total).and_then(|share| share.to_f64()).unwrap_or(0.0);
                RankedUser {
                    rank: index as u32 + 1,
                    user_id: row.key.user_id.clone().unwrap_or_default(),
                    value: Quantity(value),
                    share: stats::round6(share),
                    event_count: row.stats.event_count,
                    total_cost: stats::money_number(row.stats.cost),
                    unpriced_event_count: row.stats.unpriced_count,
                }
            })
            .collect();
        Ok(TopUsersBody { by: metric.name(), range: range(&query.scope), total_users, users })
    })
    .await
}

/// Usage grouped by one or two dimensions.
#[utoipa::path(
    get,
    path = "/api/v1/analytics/breakdown",
    tag = "analytics",
    params(BreakdownParams),
    responses(
        (status = 200, body = BreakdownBody),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)
    )
)]
pub async fn breakdown(
    State(state): State<Arc<QueryState>>,
    Scoped { caller, scope, filter, params }: Scoped<BreakdownParams>,
) -> Result<Response, ApiError> {
    let dimensions = params.group_by.map_or_else(|| vec![Dimension::ServiceType], |group_by| group_by.0);
    let limit = params.limit.0;
    let measures = Measures { unique_users: true, latency_histogram: false, custom_metric: None };
    let groups = AggregateQuery {
        scope,
        filter,
        period: None,
        grouping_sets: vec![dimensions.clone()],
        measures: measures.clone(),
        top: Some((Metric::EventCount, limit)),
    };
    let totals = AggregateQuery { grouping_sets: vec![vec![]], top: None, ..groups.clone() };
    cached(&state, &caller, "breakdown", &groups, || async {
        let (rows, total_rows) =
            tokio::try_join!(state.backend.aggregate(&groups), state.backend.aggregate(&totals))?;
        let total = total_of(&total_rows, 0);
        let total_cost = total.cost.to_f64().unwrap_or(0.0);
        // The ranked query reports the number of groups before the limit with every row.
        let total_groups = rows.first().and_then(|row| row.groups_total).unwrap_or(0);
        let rows = rows
            .iter()
            .map(|row| GroupBody {
                key: key_map(&row.key, &dimensions),
                totals: Totals::new(&row.stats, Some(quantities_of(&row.stats, &[]))),
                share_of_events: Some(share(row.stats.event_count, total.event_count)),
                share_of_cost: Some(if total_cost == 0.0 {
                    0.0
                } else {
                    stats::round6(row.stats.cost.to_f64().unwrap_or(0.0) / total_cost)
                }),
            })
            .collect();
        Ok(BreakdownBody {
            group_by: dimensions.iter().map(|d| d.name().to_owned()).collect(),
            range: range(&groups.scope),
            total_groups,
            totals: Totals::new(&total, Some(quantities_of(&total, &[]))),
            rows,
        })
    })
    .await
}

/// This period against the previous one of equal length, overall and per dimension.
#[utoipa::path(
    get,
    path = "/api/v1/analytics/compare",
    tag = "analytics",
    params(CompareParams),
    responses(
        (status = 200, body = CompareBody),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)
    )
)]
pub async fn compare(
    State(state): State<Arc<QueryState>>,
    Scoped { caller, scope, filter, params }: Scoped<CompareParams>,
) -> Result<Response, ApiError> {
    let dimension = params.group_by.and_then(|group_by| group_by.0.first().copied());
    let limit = params.limit.0 as usize;
    let length = scope.end - scope.start;
    let mut sets = vec![vec![]];
    sets.extend(dimension.map(|dimension| vec![dimension]));
    let current = AggregateQuery {
        scope,
        filter,
        period: None,
        grouping_sets: sets,
        measures: Measures { unique_users: true, latency_histogram: true, custom_metric: None },
        top: None,
    };
    let mut previous = current.clone();
    previous.scope.end = current.scope.start;
    previous.scope.start = current.scope.start - length;
    previous.scope.requested = (previous.scope.start, previous.scope.end);
    cached(&state, &caller, "compare", &current, || async {
        let (now_rows, before_rows) =
            tokio::try_join!(state.backend.aggregate(&current), state.backend.aggregate(&previous))?;
        let (now_total, before_total) = (total_of(&now_rows, 0), total_of(&before_rows, 0));
        let side = |query: &AggregateQuery, stats: &Stats| Side {
            start_date: query.scope.start,
            end_date: query.scope.end,
            totals: Totals::new(stats, None),
        };
        let (current_side, previous_side) = (side(&current, &now_total), side(&previous, &before_total));
        let overall = change(&previous_side.totals, &current_side.totals, &before_total, &now_total);
        let mut keys: BTreeMap<GroupKey, (Stats, Stats)> = BTreeMap::new();
        for row in rows_of(&now_rows, 1) {
            keys.entry(row.key.clone()).or_insert_with(|| (Stats::default(), Stats::default())).0 =
                row.stats.clone();
        }
        for row in rows_of(&before_rows, 1) {
            keys.entry(row.key.clone()).or_insert_with(|| (Stats::default(), Stats::default())).1 =
                row.stats.clone();
        }
        let mut groups: Vec<(GroupKey, (Stats, Stats))> = keys.into_iter().collect();
        groups.sort_by(|(a_key, (a_now, a_before)), (b_key, (b_now, b_before))| {
            b_now
                .event_count
                .cmp(&a_now.event_count)
                .then(b_before.event_count.cmp(&a_before.event_count))
                .then(a_key.cmp(b_key))
        });
        let dimensions: Vec<Dimension> = dimension.into_iter().collect();
        let rows = groups
            .into_iter()
            .take(limit)
            .map(|(key, (now, before))| {
                let (current, previous) = (Totals::new(&now, None), Totals::new(&before, None));
                let change = change(&previous, &current, &before, &now);
                CompareRow { key: key_map(&key, &dimensions), current, previous, change }
            })
            .collect();
        Ok(CompareBody {
            group_by: dimension.map(|dimension| dimension.name().to_owned()),
            time_zone: current.scope.time_zone.clone(),
            current: current_side,
            previous: previous_side,
            change: overall,
            rows,
        })
    })
    .await
}

/// Error rates and latency percentiles by service, provider and model.
#[utoipa::path(
    get,
    path = "/api/v1/analytics/errors",
    tag = "analytics",
    params(ErrorsParams),
    responses(
        (status = 200, body = ErrorsBody),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)
    )
)]
pub async fn errors(
    State(state): State<Arc<QueryState>>,
    Scoped { caller, scope, filter, params }: Scoped<ErrorsParams>,
) -> Result<Response, ApiError> {
    let dimensions = params.group_by.map_or_else(
        || vec![Dimension::ServiceType, Dimension::ServiceProvider, Dimension::Model],
        |group_by| group_by.0,
    );
    let query = AggregateQuery {
        scope,
        filter,
        period: None,
        grouping_sets: vec![vec![], dimensions.clone()],
        measures: Measures { unique_users: false, latency_histogram: true, custom_metric: None },
        top: None,
    };
    cached(&state, &caller, "errors", &query, || async {
        let rows = state.backend.aggregate(&query).await?;
        let total = total_of(&rows, 0);
        let mut groups: Vec<&AggregateRow> = rows_of(&rows, 1).collect();
        groups.sort_by(|a, b| {
            b.stats
                .error_count
                .cmp(&a.stats.error_count)
                .then(b.stats.event_count.cmp(&a.stats.event_count))
                .then(a.key.cmp(&b.key))
        });
        let rows = groups
            .into_iter()
            .map(|row| GroupBody {
                key: key_map(&row.key, &dimensions),
                totals: Totals::new(&row.stats, None),
                share_of_events: None,
                share_of_cost: None,
            })
            .collect();
        Ok(ErrorsBody {
            group_by: dimensions.iter().map(|d| d.name().to_owned()).collect(),
            range: range(&query.scope),
            totals: Totals::new(&total, None),
            rows,
        })
    })
    .await
}
