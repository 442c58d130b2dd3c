//! The words of a question to storage: time buckets ([`Period`]), what groups are keyed by
//! ([`Dimension`]) and what is computed per group ([`Metric`]). Each is a closed set that maps
//! to fixed SQL fragments, so user text reaches SQL only through [`FromStr`], which refuses
//! everything else; anything free-form (filter values, custom quantity names) is a bound
//! parameter.
//!
//! Architecture Invariant: this module and the storage layer ([`crate::backend`], [`crate::pg`],
//! [`crate::sqlite`]) know nothing of HTTP; the API's parameters ([`crate::api::params`]) are
//! built from these types, never the other way around.

use std::fmt;
use std::str::FromStr;

use crate::backend::QUANTITY_NAMES;

/// Text that is not one of the values a type allows; says why, without naming the parameter
/// (the API prefixes the parameter's name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

/// A time bucket. Days, weeks (from Monday) and months follow the tenant's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Hour,
    Day,
    Week,
    Month,
}

impl FromStr for Period {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Period, InvalidValue> {
        match text {
            "hour" | "hourly" => Ok(Period::Hour),
            "day" | "daily" => Ok(Period::Day),
            "week" | "weekly" => Ok(Period::Week),
            "month" | "monthly" => Ok(Period::Month),
            other => Err(InvalidValue(format!("{other:?} is not one of hour, day, week, month"))),
        }
    }
}

impl Period {
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
}

/// One of [`Dimension::CHOOSABLE`], by name (`period` is not a caller's choice).
impl FromStr for Dimension {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Dimension, InvalidValue> {
        Dimension::CHOOSABLE.into_iter().find(|dimension| dimension.name() == text).ok_or_else(|| {
            InvalidValue(format!(
                "{text:?} is not one of service_type, service_provider, model, user_id, event_type"
            ))
        })
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

impl FromStr for Metric {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Metric, InvalidValue> {
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
                        return Err(InvalidValue("custom quantity names are [a-z0-9_]{1,64}".into()));
                    }
                    Metric::Custom(name.to_owned())
                } else {
                    return Err(InvalidValue(format!(
                        "{other:?} is not a metric: use event_count, error_count, total_cost, unique_users, \
                         error_rate, latency_avg, latency_p50, latency_p95, latency_p99, a quantity ({}), \
                         or custom:<name>",
                        QUANTITY_NAMES.join(", ")
                    )));
                }
            }
        };
        Ok(metric)
    }
}

impl Metric {
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
        self.to_string()
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Metric::EventCount => f.write_str("event_count"),
            Metric::ErrorCount => f.write_str("error_count"),
            Metric::TotalCost => f.write_str("total_cost"),
            Metric::UniqueUsers => f.write_str("unique_users"),
            Metric::ErrorRate => f.write_str("error_rate"),
            Metric::LatencyAvg => f.write_str("latency_avg_ms"),
            Metric::LatencyP50 => f.write_str("latency_p50_ms"),
            Metric::LatencyP95 => f.write_str("latency_p95_ms"),
            Metric::LatencyP99 => f.write_str("latency_p99_ms"),
            Metric::Quantity(index) => f.write_str(QUANTITY_NAMES[*index]),
            Metric::Custom(name) => write!(f, "custom:{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_lists_refuse_everything_else() {
        assert_eq!("week".parse::<Period>().ok(), Some(Period::Week));
        assert!("day; DROP TABLE tenants".parse::<Period>().is_err());
        assert_eq!("input_tokens".parse::<Metric>().ok(), Some(Metric::Quantity(0)));
        assert_eq!("custom:images".parse::<Metric>().ok(), Some(Metric::Custom("images".into())));
        assert!("custom:x'--".parse::<Metric>().is_err());
        assert!("images".parse::<Metric>().is_err());
        assert_eq!("user_id".parse::<Dimension>().ok(), Some(Dimension::UserId));
        assert!("period".parse::<Dimension>().is_err(), "the period is not a caller's choice");
    }

    #[test]
    fn metric_names_read_back() {
        for text in ["event_count", "total_cost", "latency_p99_ms", "requests", "custom:images"] {
            let metric: Metric = text.parse().expect("a metric");
            assert_eq!(metric.name(), text);
        }
    }
}
