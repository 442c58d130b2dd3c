//! Numbers derived from sums: percentiles from latency histograms, rates, trends, and the exact
//! JSON form of quantities.

use rust_decimal::Decimal;
use serde::{Serialize, Serializer};

use crate::backend::LATENCY_BUCKETS;

/// Bounds of a histogram bucket in milliseconds, as the sink defines them: bucket 0 holds
/// latencies under 1 ms, bucket `i >= 1` holds `[2^((i-1)/2), 2^(i/2))` ms.
pub fn bucket_bounds_ms(bucket: usize) -> (f64, f64) {
    let lower = if bucket == 0 { 0.0 } else { 2f64.powf((bucket as f64 - 1.0) / 2.0) };
    let upper = if bucket + 1 >= LATENCY_BUCKETS { f64::INFINITY } else { 2f64.powf(bucket as f64 / 2.0) };
    (lower, upper)
}

/// The `quantile` (0 < q <= 1) of a summed histogram, in milliseconds, or `None` when it is empty.
///
/// The nearest-rank percentile lies in the bucket holding rank `ceil(q * n)`; the estimate is
/// that bucket's geometric midpoint `sqrt(lower * upper)`. A bucket spans a factor of sqrt(2),
/// so the estimate is within a factor 2^(1/4) of the true value: at most 19% off either way.
/// Under 1 ms the estimate is 0.5 ms (at most 0.5 ms off). The estimate is clamped to the
/// largest latency seen, which only brings it closer.
pub fn percentile_ms(buckets: &[i64], quantile: f64, max_ms: f64) -> Option<f64> {
    // Saturating: counts come from the database, and a sum must not panic a request.
    let total = buckets.iter().fold(0i64, |total, count| total.saturating_add(*count));
    if total <= 0 {
        return None;
    }
    let rank = ((quantile * total as f64).ceil() as i64).clamp(1, total);
    let mut seen = 0;
    for (bucket, count) in buckets.iter().enumerate() {
        seen = count.saturating_add(seen);
        if seen >= rank {
            let (lower, upper) = bucket_bounds_ms(bucket);
            let estimate = if bucket == 0 {
                0.5
            } else if upper.is_finite() {
                (lower * upper).sqrt()
            } else {
                lower
            };
            return Some(round3(estimate.min(max_ms)));
        }
    }
    None
}

/// Errors per event, 0 to 1 (0 when there are no events).
pub fn error_rate(error_count: i64, event_count: i64) -> f64 {
    if event_count == 0 { 0.0 } else { round6(error_count as f64 / event_count as f64) }
}

/// Direction of a series: the mean of its second half against the mean of its first half.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Trend {
    Up,
    Down,
    Stable,
}

/// The trend of `values` (missing values skipped) and the percentage change between the means
/// of the first and second half; an odd middle point belongs to neither half. Changes within
/// ±5% are stable. From a zero mean the change is 100% (up) or -100% (down), as the older
/// system reported it; from nothing to nothing it is 0.
pub fn trend(values: &[Option<f64>]) -> (Trend, f64) {
    let half = values.len() / 2;
    let mean = |part: &[Option<f64>]| {
        let present: Vec<f64> = part.iter().flatten().copied().collect();
        if present.is_empty() { None } else { Some(present.iter().sum::<f64>() / present.len() as f64) }
    };
    let (first, second) = (mean(&values[..half]), mean(&values[values.len() - half..]));
    match (first, second) {
        (Some(first), Some(second)) if first != 0.0 => {
            let change = (second - first) / first.abs() * 100.0;
            let direction = if change > 5.0 {
                Trend::Up
            } else if change < -5.0 {
                Trend::Down
            } else {
                Trend::Stable
            };
            (direction, round3(change))
        }
        (Some(_), Some(second)) if second > 0.0 => (Trend::Up, 100.0),
        (Some(_), Some(second)) if second < 0.0 => (Trend::Down, -100.0),
        _ => (Trend::Stable, 0.0),
    }
}

/// Percentage change from `previous` to `current`; `None` when `previous` is zero.
pub fn percent_change(previous: f64, current: f64) -> Option<f64> {
    if previous == 0.0 { None } else { Some(round3((current - previous) / previous.abs() * 100.0)) }
}

pub fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

pub fn round6(value: f64) -> f64 {
    (value * 1_000_000.0).round() / 1_000_000.0
}

/// An exact decimal written as a JSON number (`1200`, `0.25`), never through a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity(pub Decimal);

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = self.0.normalize().to_string();
        match serde_json::value::RawValue::from_string(text) {
            Ok(raw) => raw.serialize(serializer),
            Err(error) => Err(serde::ser::Error::custom(error)),
        }
    }
}

/// Money as text (`"12.5"`): for CSV cells.
pub fn money(value: Decimal) -> String {
    value.normalize().to_string()
}

/// Money in JSON: a number carrying the exact decimal digits (`12.5`, `0.000375`), written from
/// the decimal's text, never through a float (the older system's callers read money as
/// numbers). A client that parses it into a float rounds it; one that reads the digits does not.
pub fn money_number(value: Decimal) -> Quantity {
    Quantity(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket_of(latency_ms: f64) -> usize {
        if latency_ms < 1.0 {
            return 0;
        }
        ((2.0 * latency_ms.log2()).floor() as usize + 1).min(LATENCY_BUCKETS - 1)
    }

    #[test]
    fn percentiles_are_within_19_percent() {
        let latencies: Vec<f64> = (1..=997).map(|i| 1.0 + (i as f64).powf(1.7) * 0.37).collect();
        let mut buckets = vec![0i64; LATENCY_BUCKETS];
        for latency in &latencies {
            buckets[bucket_of(*latency)] += 1;
        }
        let max = latencies.iter().copied().fold(0.0, f64::max);
        for quantile in [0.01, 0.5, 0.9, 0.95, 0.99, 1.0] {
            let rank = (quantile * latencies.len() as f64).ceil() as usize;
            let exact = latencies[rank - 1];
            let estimate = percentile_ms(&buckets, quantile, max).expect("not empty");
            let ratio = estimate / exact;
            assert!((0.8408..=1.1893).contains(&ratio), "q{quantile}: {estimate} vs {exact}");
        }
        assert_eq!(percentile_ms(&[0; LATENCY_BUCKETS], 0.5, 0.0), None);
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        let mut buckets = vec![i64::MAX; LATENCY_BUCKETS];
        assert_eq!(percentile_ms(&buckets, 0.5, 1e9), Some(0.5));
        buckets[0] = 0;
        assert!(percentile_ms(&buckets, 1.0, 1e9).is_some());
        assert_eq!(error_rate(i64::MAX, i64::MAX), 1.0);
    }

    #[test]
    fn trends_compare_half_means() {
        assert_eq!(trend(&[Some(10.0), Some(10.0), Some(12.0), Some(12.0)]), (Trend::Up, 20.0));
        assert_eq!(trend(&[Some(10.0), Some(99.0), Some(10.4)]), (Trend::Stable, 4.0));
        assert_eq!(trend(&[Some(10.0), Some(5.0)]), (Trend::Down, -50.0));
        assert_eq!(trend(&[Some(0.0), Some(5.0)]), (Trend::Up, 100.0));
        assert_eq!(trend(&[]), (Trend::Stable, 0.0));
        assert_eq!(trend(&[None, Some(1.0)]), (Trend::Stable, 0.0));
    }

    #[test]
    fn quantities_are_exact_json_numbers() {
        let value = Quantity("12345678901234567.000001".parse().expect("decimal"));
        assert_eq!(serde_json::to_string(&value).expect("json"), "12345678901234567.000001");
        assert_eq!(serde_json::to_string(&Quantity(Decimal::new(2500, 2))).expect("json"), "25");
        assert_eq!(money(Decimal::new(12_500, 3)), "12.5");
    }
}
