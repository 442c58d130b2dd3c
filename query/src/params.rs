//! Query parameters: one struct per endpoint (unknown names are refused), and allow-lists that
//! turn user strings into the only values SQL may see: periods, dimensions and metrics map to
//! fixed fragments; everything else is a bound parameter.

use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};
use utoipa::IntoParams;

use crate::backend::{Edges, EventStatus, Filter, QUANTITY_NAMES};
use crate::error::ApiError;

/// A time bucket. Days, weeks (from Monday) and months follow the tenant's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Hour,
    Day,
    Week,
    Month,
}

impl Period {
    pub fn parse(field: &str, text: &str) -> Result<Period, ApiError> {
        match text {
            "hour" | "hourly" => Ok(Period::Hour),
            "day" | "daily" => Ok(Period::Day),
            "week" | "weekly" => Ok(Period::Week),
            "month" | "monthly" => Ok(Period::Month),
            other => {
                Err(ApiError::parameter(field, format!("{other:?} is not one of hour, day, week, month")))
            }
        }
    }

    /// The `date_trunc` unit, a fixed SQL fragment.
    pub fn sql_unit(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// One period as an SQL interval literal.
    pub fn sql_step(self) -> &'static str {
        match self {
            Period::Hour => "1 hour",
            Period::Day => "1 day",
            Period::Week => "1 week",
            Period::Month => "1 month",
        }
    }
}

/// What results can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    /// The time bucket of [`crate::backend::AggregateQuery::period`]; not a user choice.
    Period,
    ServiceType,
    ServiceProvider,
    Model,
    UserId,
    EventType,
}

impl Dimension {
    /// Dimensions a caller may name in `group_by`.
    pub const CHOOSABLE: [Dimension; 5] = [
        Dimension::ServiceType,
        Dimension::ServiceProvider,
        Dimension::Model,
        Dimension::UserId,
        Dimension::EventType,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Dimension::Period => "period",
            Dimension::ServiceType => "service_type",
            Dimension::ServiceProvider => "service_provider",
            Dimension::Model => "model",
            Dimension::UserId => "user_id",
            Dimension::EventType => "event_type",
        }
    }

    /// Comma-separated dimensions, `1..=max` of them, each once.
    pub fn parse_list(field: &str, text: &str, max: usize) -> Result<Vec<Dimension>, ApiError> {
        let mut dimensions = Vec::new();
        for part in text.split(',').map(str::trim) {
            let dimension = Dimension::CHOOSABLE.into_iter().find(|d| d.name() == part).ok_or_else(|| {
                ApiError::parameter(
                    field,
                    format!(
                        "{part:?} is not one of service_type, service_provider, model, user_id, event_type"
                    ),
                )
            })?;
            if dimensions.contains(&dimension) {
                return Err(ApiError::parameter(field, format!("{part:?} is named twice")));
            }
            dimensions.push(dimension);
        }
        if dimensions.len() > max {
            return Err(ApiError::parameter(field, format!("at most {max} dimensions")));
        }
        Ok(dimensions)
    }
}

/// A number computed per group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    EventCount,
    ErrorCount,
    TotalCost,
    UniqueUsers,
    ErrorRate,
    LatencyAvg,
    LatencyP50,
    LatencyP95,
    LatencyP99,
    /// A well-known quantity, by index into [`QUANTITY_NAMES`].
    Quantity(usize),
    /// A custom quantity (`custom:<name>`); the name is only ever a bound parameter.
    Custom(String),
}

impl Metric {
    pub fn parse(field: &str, text: &str) -> Result<Metric, ApiError> {
        let metric = match text {
            "event_count" | "events" => Metric::EventCount,
            "error_count" | "errors" => Metric::ErrorCount,
            "total_cost" | "cost" => Metric::TotalCost,
            "unique_users" | "users" => Metric::UniqueUsers,
            "error_rate" => Metric::ErrorRate,
            "latency_avg" | "latency_avg_ms" => Metric::LatencyAvg,
            "latency_p50" | "latency_p50_ms" => Metric::LatencyP50,
            "latency_p95" | "latency_p95_ms" => Metric::LatencyP95,
            "latency_p99" | "latency_p99_ms" => Metric::LatencyP99,
            other => {
                if let Some(index) = QUANTITY_NAMES.iter().position(|name| *name == other) {
                    Metric::Quantity(index)
                } else if let Some(name) = other.strip_prefix("custom:") {
                    let valid = !name.is_empty()
                        && name.len() <= 64
                        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                    if !valid {
                        return Err(ApiError::parameter(field, "custom quantity names are [a-z0-9_]{1,64}"));
                    }
                    Metric::Custom(name.to_owned())
                } else {
                    return Err(ApiError::parameter(
                        field,
                        format!(
                            "{other:?} is not a metric: use event_count, error_count, total_cost, unique_users, \
                             error_rate, latency_avg, latency_p50, latency_p95, latency_p99, a quantity ({}), \
                             or custom:<name>",
                            QUANTITY_NAMES.join(", ")
                        ),
                    ));
                }
            }
        };
        Ok(metric)
    }

    /// Whether the metric is a sum that groups can be ranked by in SQL.
    pub fn is_summable(&self) -> bool {
        matches!(
            self,
            Metric::EventCount
                | Metric::ErrorCount
                | Metric::TotalCost
                | Metric::Quantity(_)
                | Metric::Custom(_)
        )
    }

    /// The name in responses.
    pub fn name(&self) -> String {
        match self {
            Metric::EventCount => "event_count".into(),
            Metric::ErrorCount => "error_count".into(),
            Metric::TotalCost => "total_cost".into(),
            Metric::UniqueUsers => "unique_users".into(),
            Metric::ErrorRate => "error_rate".into(),
            Metric::LatencyAvg => "latency_avg_ms".into(),
            Metric::LatencyP50 => "latency_p50_ms".into(),
            Metric::LatencyP95 => "latency_p95_ms".into(),
            Metric::LatencyP99 => "latency_p99_ms".into(),
            Metric::Quantity(index) => QUANTITY_NAMES[*index].into(),
            Metric::Custom(name) => format!("custom:{name}"),
        }
    }
}

/// The earliest time a date parameter may name (an instant, or a wall-clock time).
pub const TIME_MIN: PrimitiveDateTime = time::macros::datetime!(1970-01-01 0:00);
/// The latest time a date parameter may name. The types hold years up to 9999: a range ending
/// here, extended to the week or month that holds its end (and read in any time zone), still
/// fits, as does the period of equal length before one that starts at [`TIME_MIN`].
pub const TIME_MAX: PrimitiveDateTime = time::macros::datetime!(9999-01-01 0:00);
/// The largest `offset` of the listing: what the databases' 64-bit signed `OFFSET` holds.
pub const OFFSET_MAX: u64 = i64::MAX as u64;

/// A time as given: with an offset, or wall-clock time in the tenant's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeInput {
    Instant(OffsetDateTime),
    Local(PrimitiveDateTime),
}

/// RFC 3339 (`2024-01-31T12:00:00Z`, `...+02:00`), or without an offset (`2024-01-31T12:00:00`,
/// `2024-01-31`), which is read in the tenant's time zone.
/// Times outside [`TIME_MIN`]..=[`TIME_MAX`] are refused.
pub fn parse_time(field: &str, text: &str) -> Result<TimeInput, ApiError> {
    let time = parse_any_time(field, text)?;
    let wall_clock = match time {
        TimeInput::Instant(instant) => {
            let utc = instant.to_offset(time::UtcOffset::UTC);
            PrimitiveDateTime::new(utc.date(), utc.time())
        }
        TimeInput::Local(local) => local,
    };
    if !(TIME_MIN..=TIME_MAX).contains(&wall_clock) {
        return Err(ApiError::parameter(
            field,
            format!("must be from {} to {} (UTC)", TIME_MIN.date(), TIME_MAX.date()),
        ));
    }
    Ok(time)
}

fn parse_any_time(field: &str, text: &str) -> Result<TimeInput, ApiError> {
    let text = text.trim();
    if let Ok(instant) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(TimeInput::Instant(instant));
    }
    let local = format_description!(
        version = 2,
        "[year]-[month]-[day][first [T] [ ]][hour]:[minute][optional [:[second][optional [.[subsecond]]]]]"
    );
    if let Ok(local) = PrimitiveDateTime::parse(text, &local) {
        return Ok(TimeInput::Local(local));
    }
    if let Ok(date) = time::Date::parse(text, &format_description!("[year]-[month]-[day]")) {
        return Ok(TimeInput::Local(date.midnight()));
    }
    Err(ApiError::parameter(field, format!("{text:?} is not an RFC 3339 time or a YYYY-MM-DD date")))
}

pub fn parse_u32(field: &str, text: Option<&str>, default: u32, min: u32, max: u32) -> Result<u32, ApiError> {
    let Some(text) = text else { return Ok(default) };
    let value: u32 = text.trim().parse().map_err(|_| ApiError::parameter(field, "must be a whole number"))?;
    if value < min || value > max {
        return Err(ApiError::parameter(field, format!("must be from {min} to {max}, got {value}")));
    }
    Ok(value)
}

/// The listing's `offset`: 0 to [`OFFSET_MAX`], default 0.
pub fn parse_offset(text: Option<&str>) -> Result<u64, ApiError> {
    let Some(text) = text else { return Ok(0) };
    let value: u64 =
        text.trim().parse().map_err(|_| ApiError::parameter("offset", "must be a whole number"))?;
    if value > OFFSET_MAX {
        return Err(ApiError::parameter("offset", format!("must be from 0 to {OFFSET_MAX}, got {value}")));
    }
    Ok(value)
}

/// `edges`: `hour` (the default) or `exact`; see [`Edges`].
pub fn parse_edges(text: Option<&str>) -> Result<Edges, ApiError> {
    match text.map(str::trim) {
        None | Some("hour") => Ok(Edges::Hour),
        Some("exact") => Ok(Edges::Exact),
        Some(other) => Err(ApiError::parameter("edges", format!("{other:?} is not hour or exact"))),
    }
}

pub fn parse_bool(field: &str, text: Option<&str>) -> Result<bool, ApiError> {
    match text.map(str::trim) {
        None | Some("false" | "0" | "no") => Ok(false),
        Some("true" | "1" | "yes" | "") => Ok(true),
        Some(other) => Err(ApiError::parameter(field, format!("{other:?} is not true or false"))),
    }
}

/// A free-text filter value: 1 to 255 bytes without control characters. No stored value holds
/// one (events are validated so), and PostgreSQL refuses NUL in text outright.
fn filter_value(field: &str, value: &Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(text) if text.len() > 255 => Err(ApiError::parameter(field, "longer than 255 bytes")),
        Some(text) if text.is_empty() && field != "model" => Err(ApiError::parameter(field, "is empty")),
        Some(text) if text.chars().any(char::is_control) => {
            let found = text.chars().find(|c| c.is_control()).map_or(0, u32::from);
            Err(ApiError::parameter(
                field,
                format!("must not contain control characters (found U+{found:04X})"),
            ))
        }
        other => Ok(other.clone()),
    }
}

/// The equality filters every data endpoint accepts (those a struct lacks stay `None`).
pub fn filter(
    service_type: &Option<String>,
    service_provider: &Option<String>,
    user_id: &Option<String>,
    model: &Option<String>,
    event_type: &Option<String>,
) -> Result<Filter, ApiError> {
    Ok(Filter {
        service_type: filter_value("service_type", service_type)?,
        service_provider: filter_value("service_provider", service_provider)?,
        user_id: filter_value("user_id", user_id)?,
        model: filter_value("model", model)?,
        event_type: filter_value("event_type", event_type)?,
    })
}

pub fn parse_status(text: Option<&str>) -> Result<Option<EventStatus>, ApiError> {
    match text {
        None => Ok(None),
        Some("success") => Ok(Some(EventStatus::Success)),
        Some("error") => Ok(Some(EventStatus::Error)),
        Some(other) => Err(ApiError::parameter("status", format!("{other:?} is not success or error"))),
    }
}

/// `GET /api/v1/usage`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// The key's tenant, by name or id (optional; any other tenant is refused with 403).
    pub tenant_id: Option<String>,
    /// Inclusive start: RFC 3339, or a time without offset in the tenant's time zone. Default: 30 days before `end_date`.
    pub start_date: Option<String>,
    /// Exclusive end. Default: now, rounded up to the minute.
    pub end_date: Option<String>,
    pub service_type: Option<String>,
    pub service_provider: Option<String>,
    pub user_id: Option<String>,
    pub model: Option<String>,
    pub event_type: Option<String>,
    /// `success` or `error`.
    pub status: Option<String>,
    /// Events per page, 1 to 10,000. Default 1,000.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 10000)]
    pub limit: Option<String>,
    /// Events to skip (slow at depth: prefer `cursor`). Not with `cursor`.
    #[param(value_type = Option<u64>)]
    pub offset: Option<String>,
    /// `next_cursor` of the previous page: keyset pagination, fast at any depth.
    pub cursor: Option<String>,
    /// Adds `billing_info` to each event.
    #[param(value_type = Option<bool>)]
    pub include_billing: Option<String>,
    /// `json` (default) or `csv` (also chosen by `Accept: text/csv`).
    pub format: Option<String>,
}

/// `GET /api/v1/usage/aggregate`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AggregateParams {
    pub tenant_id: Option<String>,
    /// `hour`, `day` (default), `week` (from Monday) or `month`, in the tenant's time zone.
    pub period: Option<String>,
    pub start_date: Option<String>,
    pub end_date: Option<String>,
    pub service_type: Option<String>,
    pub service_provider: Option<String>,
    pub user_id: Option<String>,
    pub model: Option<String>,
    pub event_type: Option<String>,
    /// Up to 3 of service_type, service_provider, model, user_id, event_type. Default
    /// `service_type,service_provider`; `none` for one row per period.
    pub group_by: Option<String>,
    /// `hour` (default): the range is widened to whole UTC hours and answered from rollups
    /// alone (see `effective_start`, `effective_end`); `exact`: partial hours are read from raw
    /// events.
    pub edges: Option<String>,
}

/// `GET /api/v1/usage/by-service`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ByServiceParams {
    pub tenant_id: Option<String>,
    pub start_date: Option<String>,
    pub end_date: Option<String>,
    /// Services returned, by event count, 1 to 50. Default 50.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 50)]
    pub limit: Option<String>,
    /// Top users per service, by cost, 1 to 50. Default 5.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 50)]
    pub top_users: Option<String>,
    /// `hour` (default): the range is widened to whole UTC hours and answered from rollups
    /// alone (see `effective_start`, `effective_end`); `exact`: partial hours are read from raw
    /// events.
    pub edges: Option<String>,
}

/// `GET /api/v1/usage/costs`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CostsParams {
    pub tenant_id: Option<String>,
    pub start_date: Option<String>,
    pub end_date: Option<String>,
    /// Period of `cost_by_period`: hour, day (default), week, month.
    pub group_by: Option<String>,
    pub service_type: Option<String>,
    pub service_provider: Option<String>,
    pub user_id: Option<String>,
    pub model: Option<String>,
    /// `hour` (default): the range is widened to whole UTC hours and answered from rollups
    /// alone (see `effective_start`, `effective_end`); `exact`: partial hours are read from raw
    /// events.
    pub edges: Option<String>,
}

/// `GET /api/v1/billing/summary`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BillingSummaryParams {
    pub tenant_id: Option<String>,
    /// `YYYY-MM` in the tenant's time zone; default: the current month.
    pub month: Option<String>,
}

/// `GET /api/v1/analytics/trends`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TrendsParams {
    pub tenant_id: Option<String>,
    /// event_count (default), total_cost, unique_users, error_count, error_rate, latency_avg,
    /// latency_p50, latency_p95, latency_p99, a quantity name, or custom:<name>.
    pub metric: Option<String>,
    /// hour, day (default), week, month.
    pub period: Option<String>,
    pub start_date: Option<String>,
    pub end_date: Option<String>,
    pub service_type: Option<String>,
    pub service_provider: Option<String>,
    pub model: Option<String>,
    pub user_id: Option<String>,
    /// `hour` (default): the range is widened to whole UTC hours and answered from rollups
    /// alone (see `effective_start`, `effective_end`); `exact`: partial hours are read from raw
    /// events.
    pub edges: Option<String>,
}

/// `GET /api/v1/analytics/top-users`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TopUsersParams {
    pub tenant_id: Option<String>,
    pub start_date: Option<String>,
    pub end_date: Option<String>,
    /// total_cost (default), event_count, error_count, a quantity name, or custom:<name>.
    pub by: Option<String>,
    /// Users returned, 1 to 1,000. Default 10.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
    pub service_type: Option<String>,
    pub service_provider: Option<String>,
    pub model: Option<String>,
    pub event_type: Option<String>,
    /// `hour` (default): the range is widened to whole UTC hours and answered from rollups
    /// alone (see `effective_start`, `effective_end`); `exact`: partial hours are read from raw
    /// events.
    pub edges: Option<String>,
}

/// `GET /api/v1/analytics/breakdown`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BreakdownParams {
    pub tenant_id: Option<String>,
    pub start_date: Option<String>,
    pub end_date: Option<String>,
    /// One or two of service_type, service_provider, model, user_id, event_type. Default service_type.
    pub group_by: Option<String>,
    /// Rows returned, by event count, 1 to 1,000. Default 100.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
    pub service_type: Option<String>,
    pub service_provider: Option<String>,
    pub user_id: Option<String>,
    pub model: Option<String>,
    pub event_type: Option<String>,
    /// `hour` (default): the range is widened to whole UTC hours and answered from rollups
    /// alone (see `effective_start`, `effective_end`); `exact`: partial hours are read from raw
    /// events.
    pub edges: Option<String>,
}

/// `GET /api/v1/analytics/compare`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CompareParams {
    pub tenant_id: Option<String>,
    /// Start of the current period; the previous period is the one of equal length before it.
    pub start_date: Option<String>,
    pub end_date: Option<String>,
    /// One of service_type, service_provider, model, user_id, event_type; default: totals only.
    pub group_by: Option<String>,
    /// Rows returned, by current event count, 1 to 1,000. Default 100.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
    pub service_type: Option<String>,
    pub service_provider: Option<String>,
    pub model: Option<String>,
    /// `hour` (default): the range is widened to whole UTC hours and answered from rollups
    /// alone (see `effective_start`, `effective_end`); `exact`: partial hours are read from raw
    /// events.
    pub edges: Option<String>,
}

/// `GET /api/v1/analytics/errors`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ErrorsParams {
    pub tenant_id: Option<String>,
    pub start_date: Option<String>,
    pub end_date: Option<String>,
    /// Up to 3 dimensions. Default service_type,service_provider,model.
    pub group_by: Option<String>,
    pub service_type: Option<String>,
    pub service_provider: Option<String>,
    pub model: Option<String>,
    /// `hour` (default): the range is widened to whole UTC hours and answered from rollups
    /// alone (see `effective_start`, `effective_end`); `exact`: partial hours are read from raw
    /// events.
    pub edges: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_with_and_without_offsets() {
        assert!(matches!(parse_time("start_date", "2024-01-31T12:00:00Z"), Ok(TimeInput::Instant(_))));
        assert!(matches!(
            parse_time("start_date", "2024-01-31T12:00:00.25+05:30"),
            Ok(TimeInput::Instant(_))
        ));
        assert!(matches!(parse_time("start_date", "2024-01-31T12:00:00"), Ok(TimeInput::Local(_))));
        assert!(matches!(parse_time("start_date", "2024-01-31 12:00"), Ok(TimeInput::Local(_))));
        let Ok(TimeInput::Local(midnight)) = parse_time("start_date", "2024-01-31") else { panic!("a date") };
        assert_eq!(midnight.hour(), 0);
        let error = parse_time("end_date", "yesterday").expect_err("not a time");
        assert!(error.to_string().starts_with("end_date:"));
    }

    #[test]
    fn allow_lists_refuse_everything_else() {
        assert_eq!(Period::parse("period", "week").ok(), Some(Period::Week));
        assert!(Period::parse("period", "day; DROP TABLE tenants").is_err());
        assert_eq!(Metric::parse("metric", "input_tokens").ok(), Some(Metric::Quantity(0)));
        assert_eq!(Metric::parse("metric", "custom:images").ok(), Some(Metric::Custom("images".into())));
        assert!(Metric::parse("metric", "custom:x'--").is_err());
        assert!(Metric::parse("metric", "images").is_err());
        assert_eq!(
            Dimension::parse_list("group_by", "model, user_id", 2).ok(),
            Some(vec![Dimension::Model, Dimension::UserId])
        );
        assert!(Dimension::parse_list("group_by", "model,model", 2).is_err());
        assert!(Dimension::parse_list("group_by", "period", 2).is_err());
        assert!(Dimension::parse_list("group_by", "model,user_id,event_type", 2).is_err());
        assert_eq!(parse_u32("limit", Some("10001"), 1000, 1, 10_000).ok(), None);
    }
}
