//! Query parameters: one struct per endpoint (unknown names are refused), every field typed.
//! A value is parsed by its type's [`FromStr`] while the query string is read, so a bad one is
//! refused as `invalid_parameter` before a handler runs, its detail prefixed with the
//! parameter's name (axum's `Query` reports the path of the field that failed). Periods,
//! dimensions and metrics are the storage layer's own allow-lists ([`crate::question`]); this
//! module depends on them, never the other way around.

use std::fmt::Display;
use std::str::FromStr;

use axum::extract::Query;
use axum::http::Uri;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};
use utoipa::IntoParams;

use super::billing::BillingMonth;
use super::listing::{Cursor, MetadataFilter};
use crate::backend::{Edges, EventStatus, Filter};
use crate::error::ApiError;
pub use crate::question::{Dimension, InvalidValue, Metric, Period};

/// The earliest time a date parameter may name (an instant, or a wall-clock time).
pub const TIME_MIN: PrimitiveDateTime = time::macros::datetime!(1970-01-01 0:00);
/// The latest time a date parameter may name. The types hold years up to 9999: a range ending
/// here, extended to the week or month that holds its end (and read in any time zone), still
/// fits, as does the period of equal length before one that starts at [`TIME_MIN`].
pub const TIME_MAX: PrimitiveDateTime = time::macros::datetime!(9999-01-01 0:00);
/// The largest `offset` of the listing: what the databases' 64-bit signed `OFFSET` holds.
pub const OFFSET_MAX: u64 = i64::MAX as u64;

/// Reads the parameters of type `T` from a query string (`a=1&b=2`, without the `?`).
pub fn from_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let uri: Uri = format!("/?{query}")
        .parse()
        .map_err(|_| ApiError::parameter("query", "is not a valid query string"))?;
    from_uri(&uri)
}

/// Reads the parameters of type `T` from a request's URI.
pub fn from_uri<T: DeserializeOwned>(uri: &Uri) -> Result<T, ApiError> {
    match Query::<T>::try_from_uri(uri) {
        Ok(Query(params)) => Ok(params),
        Err(rejection) => {
            let text = rejection.body_text();
            let detail = text.strip_prefix("Failed to deserialize query string: ").unwrap_or(&text);
            Err(ApiError::InvalidParameter(detail.to_owned()))
        }
    }
}

/// Parameters of a request for one tenant's data (see [`super::tenant::Tenant`]).
pub trait TenantParams: Sized {
    /// `tenant_id`: where given, it must name the API key's tenant.
    fn tenant_id(&self) -> Option<&str>;

    /// The parameters of a request.
    fn from_uri(uri: &Uri) -> Result<Self, ApiError>;
}

/// Parameters of a request over a time range (see [`super::tenant::Scoped`]).
pub trait RangeParams: TenantParams {
    /// `start_date`, `end_date` and how the edges are answered.
    fn range(&self) -> RangeInput;

    /// The equality filters the endpoint takes (those it lacks stay `None`).
    fn filter(&self) -> Filter;
}

/// A time range as asked, before defaults and the tenant's time zone resolve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeInput {
    pub start: Option<TimeInput>,
    pub end: Option<TimeInput>,
    pub edges: Edges,
}

/// A time as given: with an offset, or wall-clock time in the tenant's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeInput {
    Instant(OffsetDateTime),
    Local(PrimitiveDateTime),
}

/// RFC 3339 (`2024-01-31T12:00:00Z`, `...+02:00`), or without an offset (`2024-01-31T12:00:00`,
/// `2024-01-31`), which is read in the tenant's time zone.
/// Times outside [`TIME_MIN`]..=[`TIME_MAX`] are refused.
impl FromStr for TimeInput {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<TimeInput, InvalidValue> {
        let time = parse_any_time(text)?;
        let wall_clock = match time {
            TimeInput::Instant(instant) => {
                let utc = instant.to_offset(time::UtcOffset::UTC);
                PrimitiveDateTime::new(utc.date(), utc.time())
            }
            TimeInput::Local(local) => local,
        };
        if !(TIME_MIN..=TIME_MAX).contains(&wall_clock) {
            let (min, max) = (TIME_MIN.date(), TIME_MAX.date());
            return Err(InvalidValue(format!("must be from {min} to {max} (UTC)")));
        }
        Ok(time)
    }
}

fn parse_any_time(text: &str) -> Result<TimeInput, InvalidValue> {
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
    Err(InvalidValue(format!("{text:?} is not an RFC 3339 time or a YYYY-MM-DD date")))
}

/// A whole number from `MIN` to `MAX`; `DEFAULT` when absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Limit<const MIN: u32, const MAX: u32, const DEFAULT: u32>(pub u32);

impl<const MIN: u32, const MAX: u32, const DEFAULT: u32> Default for Limit<MIN, MAX, DEFAULT> {
    fn default() -> Self {
        Limit(DEFAULT)
    }
}

impl<const MIN: u32, const MAX: u32, const DEFAULT: u32> FromStr for Limit<MIN, MAX, DEFAULT> {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Self, InvalidValue> {
        let value: u32 = text.trim().parse().map_err(|_| InvalidValue("must be a whole number".into()))?;
        if !(MIN..=MAX).contains(&value) {
            return Err(InvalidValue(format!("must be from {MIN} to {MAX}, got {value}")));
        }
        Ok(Limit(value))
    }
}

/// The listing's `offset`: 0 to [`OFFSET_MAX`], default 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offset(pub u64);

impl FromStr for Offset {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Offset, InvalidValue> {
        let value: u64 = text.trim().parse().map_err(|_| InvalidValue("must be a whole number".into()))?;
        if value > OFFSET_MAX {
            return Err(InvalidValue(format!("must be from 0 to {OFFSET_MAX}, got {value}")));
        }
        Ok(Offset(value))
    }
}

/// A yes/no switch: absent, `false`, `0` or `no` is off; `true`, `1`, `yes` or no value is on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Switch(pub bool);

impl FromStr for Switch {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Switch, InvalidValue> {
        match text.trim() {
            "false" | "0" | "no" => Ok(Switch(false)),
            "true" | "1" | "yes" | "" => Ok(Switch(true)),
            other => Err(InvalidValue(format!("{other:?} is not true or false"))),
        }
    }
}

/// The listing's body: JSON or CSV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
}

impl FromStr for Format {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Format, InvalidValue> {
        match text {
            "json" => Ok(Format::Json),
            "csv" => Ok(Format::Csv),
            other => Err(InvalidValue(format!("{other:?} is not json or csv"))),
        }
    }
}

/// `group_by`: 1 to `MAX` comma-separated dimensions, each once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupBy<const MAX: usize>(pub Vec<Dimension>);

impl<const MAX: usize> FromStr for GroupBy<MAX> {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Self, InvalidValue> {
        let mut dimensions = Vec::new();
        for part in text.split(',').map(str::trim) {
            let dimension: Dimension = part.parse()?;
            if dimensions.contains(&dimension) {
                return Err(InvalidValue(format!("{part:?} is named twice")));
            }
            dimensions.push(dimension);
        }
        if dimensions.len() > MAX {
            return Err(InvalidValue(format!("at most {MAX} dimensions")));
        }
        Ok(GroupBy(dimensions))
    }
}

/// The aggregate's `group_by`: up to three dimensions, or `none` for one row per period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateGroupBy(pub Vec<Dimension>);

impl FromStr for AggregateGroupBy {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<AggregateGroupBy, InvalidValue> {
        match text {
            "none" => Ok(AggregateGroupBy(Vec::new())),
            text => Ok(AggregateGroupBy(text.parse::<GroupBy<3>>()?.0)),
        }
    }
}

/// What users are ranked by: a metric that sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankBy(pub Metric);

impl FromStr for RankBy {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<RankBy, InvalidValue> {
        let metric: Metric = text.parse()?;
        if !metric.is_summable() {
            return Err(InvalidValue("must be total_cost, event_count, error_count or a quantity".into()));
        }
        Ok(RankBy(metric))
    }
}

/// A free-text filter value: 1 to 255 bytes without control characters. No stored value holds
/// one (events are validated so), and PostgreSQL refuses NUL in text outright.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterValue(pub String);

impl FromStr for FilterValue {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<FilterValue, InvalidValue> {
        if text.is_empty() {
            return Err(InvalidValue("is empty".into()));
        }
        Ok(FilterValue(ModelFilter::from_str(text)?.0))
    }
}

/// The `model` filter: as [`FilterValue`], but the empty string matches events without a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFilter(pub String);

impl FromStr for ModelFilter {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<ModelFilter, InvalidValue> {
        if text.len() > 255 {
            return Err(InvalidValue("longer than 255 bytes".into()));
        }
        if let Some(found) = text.chars().find(|c| c.is_control()) {
            let found = u32::from(found);
            return Err(InvalidValue(format!("must not contain control characters (found U+{found:04X})")));
        }
        Ok(ModelFilter(text.to_owned()))
    }
}

impl FromStr for Edges {
    type Err = InvalidValue;

    /// `hour` or `exact`; see [`Edges`].
    fn from_str(text: &str) -> Result<Edges, InvalidValue> {
        match text.trim() {
            "hour" => Ok(Edges::Hour),
            "exact" => Ok(Edges::Exact),
            other => Err(InvalidValue(format!("{other:?} is not hour or exact"))),
        }
    }
}

impl FromStr for EventStatus {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<EventStatus, InvalidValue> {
        match text {
            "success" => Ok(EventStatus::Success),
            "error" => Ok(EventStatus::Error),
            other => Err(InvalidValue(format!("{other:?} is not success or error"))),
        }
    }
}

/// A value read with its [`FromStr`]; its error becomes the parameter's.
fn from_text<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err: Display>,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

/// Implements `Deserialize` by [`from_text`] for parameter types.
macro_rules! deserialize_from_str {
    ($($type:ty $(: <$(const $generic:ident: $kind:ty),*>)?),* $(,)?) => {$(
        impl<'de $($(, const $generic: $kind)*)?> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                from_text(deserializer)
            }
        }
    )*};
}

deserialize_from_str!(
    Period,
    Metric,
    TimeInput,
    Edges,
    EventStatus,
    Offset,
    Switch,
    Format,
    AggregateGroupBy,
    RankBy,
    FilterValue,
    ModelFilter,
    Cursor,
    BillingMonth,
    GroupBy<MAX>: <const MAX: usize>,
    Limit<MIN, MAX, DEFAULT>: <const MIN: u32, const MAX: u32, const DEFAULT: u32>,
);

fn text_of(value: &Option<FilterValue>) -> Option<String> {
    value.as_ref().map(|value| value.0.clone())
}

/// Implements [`TenantParams`] and [`RangeParams`] for structs with `tenant_id`, `start_date`,
/// `end_date`, `edges` and the filters named (`model` is a [`ModelFilter`], the others
/// [`FilterValue`]s).
macro_rules! range_params {
    (@filter $self:ident $($filter:ident),*) => {
        Filter { $($filter: range_params!(@value $self $filter),)* ..Filter::default() }
    };
    (@value $self:ident model) => { $self.model.as_ref().map(|model| model.0.clone()) };
    (@value $self:ident $filter:ident) => { text_of(&$self.$filter) };
    ($($params:ident { $($filter:ident),* })*) => {$(
        impl TenantParams for $params {
            fn tenant_id(&self) -> Option<&str> {
                self.tenant_id.as_deref()
            }

            fn from_uri(uri: &Uri) -> Result<Self, ApiError> {
                from_uri(uri)
            }
        }

        impl RangeParams for $params {
            fn range(&self) -> RangeInput {
                RangeInput { start: self.start_date, end: self.end_date, edges: self.edges.unwrap_or_default() }
            }

            // Endpoints with all five filters name them all: the update is for the others.
            #[allow(clippy::needless_update)]
            fn filter(&self) -> Filter {
                range_params!(@filter self $($filter),*)
            }
        }
    )*};
}

range_params! {
    AggregateParams { service_type, service_provider, user_id, model, event_type }
    ByServiceParams {}
    CostsParams { service_type, service_provider, user_id, model }
    TrendsParams { service_type, service_provider, user_id, model }
    TopUsersParams { service_type, service_provider, model, event_type }
    BreakdownParams { service_type, service_provider, user_id, model, event_type }
    CompareParams { service_type, service_provider, model }
    ErrorsParams { service_type, service_provider, model }
}

impl TenantParams for BillingSummaryParams {
    fn tenant_id(&self) -> Option<&str> {
        self.tenant_id.as_deref()
    }

    fn from_uri(uri: &Uri) -> Result<Self, ApiError> {
        from_uri(uri)
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
    #[param(value_type = Option<String>)]
    pub start_date: Option<TimeInput>,
    /// Exclusive end. Default: now, rounded up to the minute.
    #[param(value_type = Option<String>)]
    pub end_date: Option<TimeInput>,
    #[param(value_type = Option<String>)]
    pub service_type: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub service_provider: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub user_id: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub model: Option<ModelFilter>,
    #[param(value_type = Option<String>)]
    pub event_type: Option<FilterValue>,
    /// `success` or `error`.
    #[param(value_type = Option<String>)]
    pub status: Option<EventStatus>,
    /// Events per page, 1 to 10,000. Default 1,000.
    #[serde(default)]
    #[param(value_type = Option<u32>, minimum = 1, maximum = 10000)]
    pub limit: Limit<1, 10_000, 1000>,
    /// Events to skip (slow at depth: prefer `cursor`). Not with `cursor`.
    #[serde(default)]
    #[param(value_type = Option<u64>)]
    pub offset: Offset,
    /// `next_cursor` of the previous page: keyset pagination, fast at any depth.
    #[param(value_type = Option<String>)]
    pub cursor: Option<Cursor>,
    /// Adds `billing_info` to each event.
    #[serde(default)]
    #[param(value_type = Option<bool>)]
    pub include_billing: Switch,
    /// `json` (default) or `csv` (also chosen by `Accept: text/csv`).
    #[param(value_type = Option<String>)]
    pub format: Option<Format>,
    /// The one `metadata.<key>=<value>` filter, which a struct cannot name (see
    /// [`super::listing`]).
    #[serde(skip)]
    #[param(ignore)]
    pub metadata: Option<MetadataFilter>,
}

/// `GET /api/v1/usage/aggregate`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AggregateParams {
    pub tenant_id: Option<String>,
    /// `hour`, `day` (default), `week` (from Monday) or `month`, in the tenant's time zone.
    #[param(value_type = Option<String>)]
    pub period: Option<Period>,
    #[param(value_type = Option<String>)]
    pub start_date: Option<TimeInput>,
    #[param(value_type = Option<String>)]
    pub end_date: Option<TimeInput>,
    #[param(value_type = Option<String>)]
    pub service_type: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub service_provider: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub user_id: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub model: Option<ModelFilter>,
    #[param(value_type = Option<String>)]
    pub event_type: Option<FilterValue>,
    /// Up to 3 of service_type, service_provider, model, user_id, event_type. Default
    /// `service_type,service_provider`; `none` for one row per period.
    #[param(value_type = Option<String>)]
    pub group_by: Option<AggregateGroupBy>,
    /// `hour` (default): the range is widened to whole UTC hours and answered from rollups
    /// alone (see `effective_start`, `effective_end`); `exact`: partial hours are read from raw
    /// events.
    #[param(value_type = Option<String>)]
    pub edges: Option<Edges>,
}

/// `GET /api/v1/usage/by-service`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ByServiceParams {
    pub tenant_id: Option<String>,
    #[param(value_type = Option<String>)]
    pub start_date: Option<TimeInput>,
    #[param(value_type = Option<String>)]
    pub end_date: Option<TimeInput>,
    /// Services returned, by event count, 1 to 50. Default 50.
    #[serde(default)]
    #[param(value_type = Option<u32>, minimum = 1, maximum = 50)]
    pub limit: Limit<1, 50, 50>,
    /// Top users per service, by cost, 1 to 50. Default 5.
    #[serde(default)]
    #[param(value_type = Option<u32>, minimum = 1, maximum = 50)]
    pub top_users: Limit<1, 50, 5>,
    /// `hour` (default): the range is widened to whole UTC hours and answered from rollups
    /// alone (see `effective_start`, `effective_end`); `exact`: partial hours are read from raw
    /// events.
    #[param(value_type = Option<String>)]
    pub edges: Option<Edges>,
}

/// `GET /api/v1/usage/costs`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CostsParams {
    pub tenant_id: Option<String>,
    #[param(value_type = Option<String>)]
    pub start_date: Option<TimeInput>,
    #[param(value_type = Option<String>)]
    pub end_date: Option<TimeInput>,
    /// Period of `cost_by_period`: hour, day (default), week, month.
    #[param(value_type = Option<String>)]
    pub group_by: Option<Period>,
    #[param(value_type = Option<String>)]
    pub service_type: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub service_provider: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub user_id: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub model: Option<ModelFilter>,
    /// `hour` (default): the range is widened to whole UTC hours and answered from rollups
    /// alone (see `effective_start`, `effective_end`); `exact`: partial hours are read from raw
    /// events.
    #[param(value_type = Option<String>)]
    pub edges: Option<Edges>,
}

/// `GET /api/v1/billing/summary`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BillingSummaryParams {
    pub tenant_id: Option<String>,
    /// `YYYY-MM` in the tenant's time zone; default: the current month.
    #[param(value_type = Option<String>)]
    pub month: Option<BillingMonth>,
}

/// `GET /api/v1/analytics/trends`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TrendsParams {
    pub tenant_id: Option<String>,
    /// event_count (default), total_cost, unique_users, error_count, error_rate, latency_avg,
    /// latency_p50, latency_p95, latency_p99, a quantity name, or custom:<name>.
    #[param(value_type = Option<String>)]
    pub metric: Option<Metric>,
    /// hour, day (default), week, month.
    #[param(value_type = Option<String>)]
    pub period: Option<Period>,
    #[param(value_type = Option<String>)]
    pub start_date: Option<TimeInput>,
    #[param(value_type = Option<String>)]
    pub end_date: Option<TimeInput>,
    #[param(value_type = Option<String>)]
    pub service_type: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub service_provider: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub model: Option<ModelFilter>,
    #[param(value_type = Option<String>)]
    pub user_id: Option<FilterValue>,
    /// `hour` (default): the range is widened to whole UTC hours and answered from rollups
    /// alone (see `effective_start`, `effective_end`); `exact`: partial hours are read from raw
    /// events.
    #[param(value_type = Option<String>)]
    pub edges: Option<Edges>,
}

/// `GET /api/v1/analytics/top-users`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TopUsersParams {
    pub tenant_id: Option<String>,
    #[param(value_type = Option<String>)]
    pub start_date: Option<TimeInput>,
    #[param(value_type = Option<String>)]
    pub end_date: Option<TimeInput>,
    /// total_cost (default), event_count, error_count, a quantity name, or custom:<name>.
    #[param(value_type = Option<String>)]
    pub by: Option<RankBy>,
    /// Users returned, 1 to 1,000. Default 10.
    #[serde(default)]
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub limit: Limit<1, 1000, 10>,
    #[param(value_type = Option<String>)]
    pub service_type: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub service_provider: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub model: Option<ModelFilter>,
    #[param(value_type = Option<String>)]
    pub event_type: Option<FilterValue>,
    /// `hour` (default): the range is widened to whole UTC hours and answered from rollups
    /// alone (see `effective_start`, `effective_end`); `exact`: partial hours are read from raw
    /// events.
    #[param(value_type = Option<String>)]
    pub edges: Option<Edges>,
}

/// `GET /api/v1/analytics/breakdown`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BreakdownParams {
    pub tenant_id: Option<String>,
    #[param(value_type = Option<String>)]
    pub start_date: Option<TimeInput>,
    #[param(value_type = Option<String>)]
    pub end_date: Option<TimeInput>,
    /// One or two of service_type, service_provider, model, user_id, event_type. Default service_type.
    #[param(value_type = Option<String>)]
    pub group_by: Option<GroupBy<2>>,
    /// Rows returned, by event count, 1 to 1,000. Default 100.
    #[serde(default)]
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub limit: Limit<1, 1000, 100>,
    #[param(value_type = Option<String>)]
    pub service_type: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub service_provider: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub user_id: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub model: Option<ModelFilter>,
    #[param(value_type = Option<String>)]
    pub event_type: Option<FilterValue>,
    /// `hour` (default): the range is widened to whole UTC hours and answered from rollups
    /// alone (see `effective_start`, `effective_end`); `exact`: partial hours are read from raw
    /// events.
    #[param(value_type = Option<String>)]
    pub edges: Option<Edges>,
}

/// `GET /api/v1/analytics/compare`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CompareParams {
    pub tenant_id: Option<String>,
    /// Start of the current period; the previous period is the one of equal length before it.
    #[param(value_type = Option<String>)]
    pub start_date: Option<TimeInput>,
    #[param(value_type = Option<String>)]
    pub end_date: Option<TimeInput>,
    /// One of service_type, service_provider, model, user_id, event_type; default: totals only.
    #[param(value_type = Option<String>)]
    pub group_by: Option<GroupBy<1>>,
    /// Rows returned, by current event count, 1 to 1,000. Default 100.
    #[serde(default)]
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub limit: Limit<1, 1000, 100>,
    #[param(value_type = Option<String>)]
    pub service_type: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub service_provider: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub model: Option<ModelFilter>,
    /// `hour` (default): the range is widened to whole UTC hours and answered from rollups
    /// alone (see `effective_start`, `effective_end`); `exact`: partial hours are read from raw
    /// events.
    #[param(value_type = Option<String>)]
    pub edges: Option<Edges>,
}

/// `GET /api/v1/analytics/errors`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ErrorsParams {
    pub tenant_id: Option<String>,
    #[param(value_type = Option<String>)]
    pub start_date: Option<TimeInput>,
    #[param(value_type = Option<String>)]
    pub end_date: Option<TimeInput>,
    /// Up to 3 dimensions. Default service_type,service_provider,model.
    #[param(value_type = Option<String>)]
    pub group_by: Option<GroupBy<3>>,
    #[param(value_type = Option<String>)]
    pub service_type: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub service_provider: Option<FilterValue>,
    #[param(value_type = Option<String>)]
    pub model: Option<ModelFilter>,
    /// `hour` (default): the range is widened to whole UTC hours and answered from rollups
    /// alone (see `effective_start`, `effective_end`); `exact`: partial hours are read from raw
    /// events.
    #[param(value_type = Option<String>)]
    pub edges: Option<Edges>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_with_and_without_offsets() {
        let parse = |text: &str| text.parse::<TimeInput>();
        assert!(matches!(parse("2024-01-31T12:00:00Z"), Ok(TimeInput::Instant(_))));
        assert!(matches!(parse("2024-01-31T12:00:00.25+05:30"), Ok(TimeInput::Instant(_))));
        assert!(matches!(parse("2024-01-31T12:00:00"), Ok(TimeInput::Local(_))));
        assert!(matches!(parse("2024-01-31 12:00"), Ok(TimeInput::Local(_))));
        let Ok(TimeInput::Local(midnight)) = parse("2024-01-31") else { panic!("a date") };
        assert_eq!(midnight.hour(), 0);
        let error = from_query::<TrendsParams>("end_date=yesterday").expect_err("not a time");
        assert!(error.to_string().starts_with("end_date:"), "{error}");
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        for (query, field) in [
            ("period=fortnight", "period"),
            ("metric=revenue", "metric"),
            ("metric=custom:x'--", "metric"),
            ("edges=minute", "edges"),
            ("user_id=", "user_id"),
            ("model=a%00b", "model"),
            ("start_date=0000-01-01", "start_date"),
        ] {
            let error = from_query::<TrendsParams>(query).expect_err(query);
            assert!(error.to_string().starts_with(&format!("{field}: ")), "{query}: {error}");
        }
        for (query, field) in [
            ("group_by=model,model", "group_by"),
            ("group_by=period", "group_by"),
            ("group_by=model,user_id,event_type", "group_by"),
            ("limit=1001", "limit"),
            ("limit=ten", "limit"),
        ] {
            let error = from_query::<BreakdownParams>(query).expect_err(query);
            assert!(error.to_string().starts_with(&format!("{field}: ")), "{query}: {error}");
        }
        let error = from_query::<TopUsersParams>("by=error_rate").expect_err("not a sum");
        assert!(error.to_string().starts_with("by: "), "{error}");
        let error = from_query::<UsageParams>("bogus=1").expect_err("unknown");
        assert!(error.to_string().contains("bogus"), "{error}");
    }

    #[test]
    fn values_and_defaults_are_typed() {
        let params: BreakdownParams =
            from_query("group_by=model,%20user_id&model=&edges=exact").expect("valid");
        assert_eq!(params.group_by, Some(GroupBy(vec![Dimension::Model, Dimension::UserId])));
        assert_eq!(params.limit, Limit(100));
        assert_eq!(params.filter().model.as_deref(), Some(""));
        assert_eq!(params.range().edges, Edges::Exact);
        let params: AggregateParams = from_query("group_by=none").expect("valid");
        assert_eq!(params.group_by, Some(AggregateGroupBy(Vec::new())));
        assert_eq!(params.range().edges, Edges::Hour);
        let params: UsageParams = from_query("include_billing&offset=7").expect("valid");
        assert_eq!(
            (params.include_billing, params.offset, params.limit),
            (Switch(true), Offset(7), Limit(1000))
        );
    }
}
