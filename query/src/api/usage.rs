//! The older system's aggregate endpoints: `/api/v1/usage/aggregate`, `/by-service`, `/costs`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;

use super::cached;
use super::params::{AggregateParams, ByServiceParams, CostsParams};
use super::schema::{
    AggregateBody, AggregateRowBody, ByServiceBody, CostSlice, CostsBody, ErrorBody, Range, ServiceUsage,
    Totals, UserUsage, custom_of, quantities_of,
};
use super::tenant::Scoped;
use crate::QueryState;
use crate::backend::{AggregateQuery, AggregateRow, Filter, Measures, Scope, Stats};
use crate::error::ApiError;
use crate::question::{Dimension, Period};
use crate::stats;

pub(crate) fn range(scope: &Scope) -> Range {
    Range {
        start_date: scope.requested.0,
        end_date: scope.requested.1,
        effective_start: scope.start,
        effective_end: scope.end,
        edges: scope.edges.as_str(),
        time_zone: scope.time_zone.clone(),
    }
}

/// The row of the grouping set `set`, if any (for the total set, a zero row when empty).
pub(crate) fn rows_of(rows: &[AggregateRow], set: usize) -> impl Iterator<Item = &AggregateRow> {
    rows.iter().filter(move |row| row.set == set)
}

pub(crate) fn total_of(rows: &[AggregateRow], set: usize) -> Stats {
    rows_of(rows, set).next().map(|row| row.stats.clone()).unwrap_or_default()
}

/// Usage per period, grouped by up to three dimensions.
#[utoipa::path(
    get,
    path = "/api/v1/usage/aggregate",
    tag = "usage",
    params(AggregateParams),
    responses(
        (status = 200, body = AggregateBody),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)
    )
)]
pub async fn aggregate(
    State(state): State<Arc<QueryState>>,
    Scoped { caller, scope, filter, params }: Scoped<AggregateParams>,
) -> Result<Response, ApiError> {
    let period = params.period.unwrap_or(Period::Day);
    let dimensions = match params.group_by {
        Some(group_by) => group_by.0,
        None => vec![Dimension::ServiceType, Dimension::ServiceProvider],
    };
    let mut set = vec![Dimension::Period];
    set.extend(&dimensions);
    let query = AggregateQuery {
        scope,
        filter,
        period: Some(period),
        // The second, empty set is the whole range: `total_aggregates`.
        grouping_sets: vec![set, vec![]],
        measures: Measures { unique_users: true, latency_histogram: true, custom_metric: None },
        top: None,
    };
    cached(&state, &caller, "aggregate", &query, || async {
        let mut rows = state.backend.aggregate(&query).await?;
        // Custom quantities need a second pass; most tenants have none.
        let custom = if rows.iter().any(|row| !row.stats.no_custom_quantities) {
            state.backend.custom_quantities(&query).await?
        } else {
            Vec::new()
        };
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        let echo = |dimension: Dimension, value: Option<&str>, filter: &Option<String>| {
            if dimensions.contains(&dimension) { value.map(str::to_owned) } else { filter.clone() }
        };
        let f = &query.filter;
        let total_aggregates = match rows.iter().find(|row| row.set == 1) {
            Some(row) => {
                let metrics = quantities_of(&row.stats, &custom_of(&custom, row.set, &row.key));
                Totals::new(&row.stats, Some(metrics))
            }
            None => Totals::new(&Stats::default(), Some(quantities_of(&Stats::default(), &[]))),
        };
        let aggregates: Vec<AggregateRowBody> = rows
            .iter()
            .filter(|row| row.set == 0)
            .map(|row| {
                let key = &row.key;
                let metrics = quantities_of(&row.stats, &custom_of(&custom, row.set, key));
                AggregateRowBody {
                    period_start: key.period_start,
                    period_end: key.period_end,
                    service_type: echo(Dimension::ServiceType, key.service_type.as_deref(), &f.service_type),
                    service_provider: echo(
                        Dimension::ServiceProvider,
                        key.service_provider.as_deref(),
                        &f.service_provider,
                    ),
                    user_id: echo(Dimension::UserId, key.user_id.as_deref(), &f.user_id),
                    model: echo(Dimension::Model, key.model.as_deref(), &f.model),
                    event_type: echo(Dimension::EventType, key.event_type.as_deref(), &f.event_type),
                    totals: Totals::new(&row.stats, Some(metrics)),
                }
            })
            .collect();
        Ok(AggregateBody {
            period: period.sql_unit().to_owned(),
            group_by: dimensions.iter().map(|d| d.name().to_owned()).collect(),
            range: range(&query.scope),
            aggregations: aggregates.clone(),
            aggregates,
            total_aggregates,
        })
    })
    .await
}

/// Usage per service type and provider, with each service's top users.
#[utoipa::path(
    get,
    path = "/api/v1/usage/by-service",
    tag = "usage",
    params(ByServiceParams),
    responses(
        (status = 200, body = ByServiceBody),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)
    )
)]
pub async fn by_service(
    State(state): State<Arc<QueryState>>,
    Scoped { caller, scope, params, .. }: Scoped<ByServiceParams>,
) -> Result<Response, ApiError> {
    let (limit, top_users) = (params.limit.0 as usize, params.top_users.0 as usize);
    let service = vec![Dimension::ServiceType, Dimension::ServiceProvider];
    // Two questions, asked at once: totals and services (with distinct users), and sums per
    // user of each service for the top users (per-user rows, so kept as lean as possible).
    let query = AggregateQuery {
        scope,
        filter: Filter::default(),
        period: None,
        grouping_sets: vec![vec![], service.clone()],
        measures: Measures { unique_users: true, latency_histogram: false, custom_metric: None },
        top: None,
    };
    let per_user = AggregateQuery {
        grouping_sets: vec![vec![Dimension::ServiceType, Dimension::ServiceProvider, Dimension::UserId]],
        measures: Measures::default(),
        ..query.clone()
    };
    cached(&state, &caller, "by-service", &(&query, limit, top_users), || async {
        let (rows, user_rows) =
            tokio::try_join!(state.backend.aggregate(&query), state.backend.aggregate(&per_user))?;
        let totals = total_of(&rows, 0);
        let mut services: Vec<&AggregateRow> = rows_of(&rows, 1).collect();
        services
            .sort_by(|a, b| b.stats.event_count.cmp(&a.stats.event_count).then_with(|| a.key.cmp(&b.key)));
        let services = services
            .into_iter()
            .take(limit)
            .map(|service| {
                let mut users: Vec<&AggregateRow> = rows_of(&user_rows, 0)
                    .filter(|user| {
                        user.key.service_type == service.key.service_type
                            && user.key.service_provider == service.key.service_provider
                    })
                    .collect();
                users.sort_by(|a, b| {
                    b.stats
                        .cost
                        .cmp(&a.stats.cost)
                        .then_with(|| b.stats.event_count.cmp(&a.stats.event_count))
                        .then_with(|| a.key.user_id.cmp(&b.key.user_id))
                });
                ServiceUsage {
                    service_type: service.key.service_type.clone().unwrap_or_default(),
                    service_provider: service.key.service_provider.clone().unwrap_or_default(),
                    totals: Totals::new(&service.stats, None),
                    share_of_events: share(service.stats.event_count, totals.event_count),
                    top_users: users
                        .into_iter()
                        .take(top_users)
                        .map(|user| UserUsage {
                            user_id: user.key.user_id.clone().unwrap_or_default(),
                            event_count: user.stats.event_count,
                            total_cost: stats::money_number(user.stats.cost),
                            unpriced_event_count: user.stats.unpriced_count,
                        })
                        .collect(),
                }
            })
            .collect();
        Ok(ByServiceBody { range: range(&query.scope), totals: Totals::new(&totals, None), services })
    })
    .await
}

/// `part / whole`, 0 to 1 (0 when `whole` is 0).
pub(crate) fn share(part: i64, whole: i64) -> f64 {
    if whole == 0 { 0.0 } else { stats::round6(part as f64 / whole as f64) }
}

/// Total cost, by service, by model and by period.
#[utoipa::path(
    get,
    path = "/api/v1/usage/costs",
    tag = "usage",
    params(CostsParams),
    responses(
        (status = 200, body = CostsBody),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)
    )
)]
pub async fn costs(
    State(state): State<Arc<QueryState>>,
    Scoped { caller, scope, filter, params }: Scoped<CostsParams>,
) -> Result<Response, ApiError> {
    let period = params.group_by.unwrap_or(Period::Day);
    let query = AggregateQuery {
        scope,
        filter,
        period: Some(period),
        grouping_sets: vec![
            vec![],
            vec![Dimension::ServiceType, Dimension::ServiceProvider],
            vec![Dimension::Model],
            vec![Dimension::Period],
        ],
        measures: Measures::default(),
        top: None,
    };
    cached(&state, &caller, "costs", &query, || async {
        let buckets = query.scope.bucketed();
        let (rows, periods) =
            tokio::try_join!(state.backend.aggregate(&query), state.backend.periods(&buckets, period))?;
        let totals = total_of(&rows, 0);
        let slice = |key: String, stats: &Stats| CostSlice {
            key,
            service_type: None,
            service_provider: None,
            model: None,
            period_start: None,
            period_end: None,
            total_cost: stats::money_number(stats.cost),
            event_count: stats.event_count,
            unpriced_event_count: stats.unpriced_count,
        };
        let by_cost =
            |a: &&AggregateRow, b: &&AggregateRow| b.stats.cost.cmp(&a.stats.cost).then(a.key.cmp(&b.key));
        let mut services: Vec<&AggregateRow> = rows_of(&rows, 1).collect();
        services.sort_by(by_cost);
        let mut models: Vec<&AggregateRow> = rows_of(&rows, 2).collect();
        models.sort_by(by_cost);
        let cost_by_period = periods
            .iter()
            .map(|(start, end)| {
                let found = rows_of(&rows, 3).find(|row| row.key.period_start == Some(*start));
                let stats = found.map(|row| row.stats.clone()).unwrap_or_default();
                CostSlice {
                    period_start: Some(*start),
                    period_end: Some(*end),
                    ..slice(format_time(*start), &stats)
                }
            })
            .collect();
        Ok(CostsBody {
            range: range(&query.scope),
            group_by: period.sql_unit().to_owned(),
            total_cost: stats::money_number(totals.cost),
            event_count: totals.event_count,
            unpriced_event_count: totals.unpriced_count,
            cost_by_service: services
                .into_iter()
                .map(|row| {
                    let (service_type, provider) = (
                        row.key.service_type.clone().unwrap_or_default(),
                        row.key.service_provider.clone().unwrap_or_default(),
                    );
                    CostSlice {
                        service_type: Some(service_type.clone()),
                        service_provider: Some(provider.clone()),
                        ..slice(format!("{service_type}:{provider}"), &row.stats)
                    }
                })
                .collect(),
            cost_by_model: models
                .into_iter()
                .map(|row| {
                    let model = row.key.model.clone().unwrap_or_default();
                    CostSlice { model: Some(model.clone()), ..slice(model, &row.stats) }
                })
                .collect(),
            cost_by_period,
        })
    })
    .await
}

pub(crate) fn format_time(time: time::OffsetDateTime) -> String {
    time.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}
