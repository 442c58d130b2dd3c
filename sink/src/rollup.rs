//! Hourly rollups, computed from exactly the rows a transaction inserted.

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;
use uuid::Uuid;

use crate::row::{EventRow, QUANTITY_KINDS};

/// Buckets of the latency histogram. Bucket 0 holds latencies under 1 ms; bucket `i >= 1` holds
/// latencies in `[2^((i-1)/2), 2^(i/2))` ms, so neighbouring bounds differ by a factor of
/// sqrt(2) and a percentile read from the histogram is within about 19% of the true value. The
/// last bucket is open-ended; 2^22 ms is above the largest latency the protocol allows.
pub const LATENCY_BUCKETS: usize = 46;

const _: () =
    assert!((1u64 << ((LATENCY_BUCKETS - 2) / 2)) as f64 * 1000.0 > wire::limits::LATENCY_US_MAX as f64);

const MICROS_PER_HOUR: i64 = 3_600_000_000;

/// The bucket of a latency in microseconds.
pub fn latency_bucket(latency_us: i64) -> usize {
    if latency_us < 1000 {
        return 0;
    }
    let latency_ms = latency_us as f64 / 1000.0;
    ((2.0 * latency_ms.log2()).floor() as usize + 1).min(LATENCY_BUCKETS - 1)
}

/// Lower and upper bound of a bucket in milliseconds (the last bucket's upper bound is infinite).
pub fn latency_bucket_bounds_ms(bucket: usize) -> (f64, f64) {
    let lower = if bucket == 0 { 0.0 } else { 2f64.powf((bucket as f64 - 1.0) / 2.0) };
    let upper = if bucket + 1 >= LATENCY_BUCKETS { f64::INFINITY } else { 2f64.powf(bucket as f64 / 2.0) };
    (lower, upper)
}

/// The start of the UTC hour holding a timestamp.
pub fn hour_start_us(timestamp_us: i64) -> i64 {
    timestamp_us.div_euclid(MICROS_PER_HOUR) * MICROS_PER_HOUR
}

/// The key of one rollup row. Ordered, so rows are written in one order by every writer and
/// concurrent transactions cannot deadlock on them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RollupKey<'a> {
    pub tenant_id: Uuid,
    pub hour_us: i64,
    pub service_type: &'a str,
    pub service_provider: &'a str,
    /// Empty when the event has no model.
    pub model: &'a str,
    pub user_id: &'a str,
    pub event_type: &'a str,
}

/// What a set of rows adds to one rollup row.
#[derive(Debug, Clone, PartialEq)]
pub struct RollupDelta {
    pub event_count: i64,
    pub error_count: i64,
    pub quantities: [Decimal; QUANTITY_KINDS],
    pub custom_quantities: BTreeMap<String, Decimal>,
    /// Sum of the cost of priced events.
    pub cost: Decimal,
    pub unpriced_count: i64,
    pub latency_count: i64,
    pub latency_sum_us: i64,
    pub latency_max_us: i64,
    pub latency_buckets: [i64; LATENCY_BUCKETS],
}

impl Default for RollupDelta {
    fn default() -> Self {
        RollupDelta {
            event_count: 0,
            error_count: 0,
            quantities: [Decimal::ZERO; QUANTITY_KINDS],
            custom_quantities: BTreeMap::new(),
            cost: Decimal::ZERO,
            unpriced_count: 0,
            latency_count: 0,
            latency_sum_us: 0,
            latency_max_us: 0,
            latency_buckets: [0; LATENCY_BUCKETS],
        }
    }
}

/// A rollup sum past the range of its type. Events are bounded (quantities at most 2^53, a cost
/// at most `pricing::EVENT_COST_MAX`), so a batch cannot reach it; it is checked all the same, and a
/// batch that did would be refused and its rows isolated, never wrapped or panicked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rollup sums out of range")]
pub struct RollupOverflow;

fn add_to(sum: &mut Decimal, value: Decimal) -> Result<(), RollupOverflow> {
    *sum = sum.checked_add(value).ok_or(RollupOverflow)?;
    Ok(())
}

fn add_count(sum: &mut i64, value: i64) -> Result<(), RollupOverflow> {
    *sum = sum.checked_add(value).ok_or(RollupOverflow)?;
    Ok(())
}

impl RollupDelta {
    fn add(&mut self, row: &EventRow) -> Result<(), RollupOverflow> {
        add_count(&mut self.event_count, 1)?;
        add_count(&mut self.error_count, i64::from(row.is_error()))?;
        for (sum, value) in self.quantities.iter_mut().zip(&row.quantities) {
            if let Some(value) = value {
                add_to(sum, *value)?;
            }
        }
        for (name, value) in &row.custom_quantities {
            add_to(self.custom_quantities.entry(name.clone()).or_default(), *value)?;
        }
        match row.cost {
            Some(cost) => add_to(&mut self.cost, cost)?,
            None => add_count(&mut self.unpriced_count, 1)?,
        }
        if let Some(latency_us) = row.latency_us {
            add_count(&mut self.latency_count, 1)?;
            add_count(&mut self.latency_sum_us, latency_us)?;
            self.latency_max_us = self.latency_max_us.max(latency_us);
            add_count(&mut self.latency_buckets[latency_bucket(latency_us)], 1)?;
        }
        Ok(())
    }

    /// Adds another delta (or a stored row's sums) to this one. On error this delta is left
    /// partly added and must be dropped.
    pub fn merge(&mut self, other: &RollupDelta) -> Result<(), RollupOverflow> {
        add_count(&mut self.event_count, other.event_count)?;
        add_count(&mut self.error_count, other.error_count)?;
        for (sum, value) in self.quantities.iter_mut().zip(&other.quantities) {
            add_to(sum, *value)?;
        }
        for (name, value) in &other.custom_quantities {
            add_to(self.custom_quantities.entry(name.clone()).or_default(), *value)?;
        }
        add_to(&mut self.cost, other.cost)?;
        add_count(&mut self.unpriced_count, other.unpriced_count)?;
        add_count(&mut self.latency_count, other.latency_count)?;
        add_count(&mut self.latency_sum_us, other.latency_sum_us)?;
        self.latency_max_us = self.latency_max_us.max(other.latency_max_us);
        for (sum, count) in self.latency_buckets.iter_mut().zip(&other.latency_buckets) {
            add_count(sum, *count)?;
        }
        Ok(())
    }
}

impl<'a> RollupKey<'a> {
    /// The per-user rollup key of a row.
    pub fn of(row: &'a EventRow) -> RollupKey<'a> {
        let event = &row.event;
        RollupKey {
            tenant_id: row.tenant_id,
            hour_us: hour_start_us(event.timestamp_us),
            service_type: &event.service_type,
            service_provider: &event.service_provider,
            model: event.model.as_deref().unwrap_or(""),
            user_id: &event.user_id,
            event_type: &event.event_type,
        }
    }
}

/// Rollup deltas by key, in the order their keys first appeared: for appends, which need no
/// order. Each delta (~600 bytes) stays in one place from its first row on.
#[derive(Debug, Default)]
pub struct Deltas<'a> {
    slots: HashMap<RollupKey<'a>, usize, foldhash::quality::RandomState>,
    keys: Vec<RollupKey<'a>>,
    deltas: Vec<RollupDelta>,
}

impl<'a> Deltas<'a> {
    fn with_capacity(keys: usize) -> Self {
        Deltas {
            slots: HashMap::with_capacity_and_hasher(keys, Default::default()),
            keys: Vec::with_capacity(keys),
            deltas: Vec::with_capacity(keys),
        }
    }

    fn delta(&mut self, key: RollupKey<'a>) -> &mut RollupDelta {
        let next = self.keys.len();
        let slot = *self.slots.entry(key.clone()).or_insert(next);
        if slot == next {
            self.keys.push(key);
            self.deltas.push(RollupDelta::default());
        }
        &mut self.deltas[slot]
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&RollupKey<'a>, &RollupDelta)> {
        self.keys.iter().zip(&self.deltas)
    }
}

/// Sums rows into rollup deltas, one per key, in no particular order.
fn aggregate_unordered<'a>(
    rows: impl IntoIterator<Item = &'a EventRow>,
) -> Result<Deltas<'a>, RollupOverflow> {
    let rows = rows.into_iter();
    let mut deltas = Deltas::with_capacity(rows.size_hint().0);
    for row in rows {
        deltas.delta(RollupKey::of(row)).add(row)?;
    }
    Ok(deltas)
}

/// Per-user deltas and, summed over users, per-service deltas of the same rows: both in one
/// pass, each service delta summed from rows rather than merged from per-user deltas.
pub fn aggregate_both<'a>(
    rows: impl IntoIterator<Item = &'a EventRow>,
) -> Result<(Deltas<'a>, Deltas<'a>), RollupOverflow> {
    let rows = rows.into_iter();
    let mut users = Deltas::with_capacity(rows.size_hint().0);
    let mut services = Deltas::default();
    for row in rows {
        let key = RollupKey::of(row);
        services.delta(RollupKey { user_id: "", ..key.clone() }).add(row)?;
        users.delta(key).add(row)?;
    }
    Ok((users, services))
}

/// Sums rows into rollup deltas, one per key, in key order (the order of every rollup upsert).
pub fn aggregate<'a>(
    rows: impl IntoIterator<Item = &'a EventRow>,
) -> Result<BTreeMap<RollupKey<'a>, RollupDelta>, RollupOverflow> {
    let Deltas { keys, deltas, .. } = aggregate_unordered(rows)?;
    Ok(keys.into_iter().zip(deltas).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_cover_the_range() {
        let mut previous = 0;
        for latency_us in (0..4_000_000_000i64).step_by(997_331) {
            let bucket = latency_bucket(latency_us);
            assert!(bucket >= previous);
            let (lower, upper) = latency_bucket_bounds_ms(bucket);
            let latency_ms = latency_us as f64 / 1000.0;
            assert!(lower <= latency_ms && latency_ms < upper, "{latency_ms} not in bucket {bucket}");
            previous = bucket;
        }
        assert!(latency_bucket(i64::from(wire::limits::LATENCY_US_MAX)) < LATENCY_BUCKETS - 1);
    }

    #[test]
    fn hours_start_on_the_hour_before_the_epoch_too() {
        assert_eq!(hour_start_us(MICROS_PER_HOUR + 5), MICROS_PER_HOUR);
        assert_eq!(hour_start_us(-5), -MICROS_PER_HOUR);
    }

    #[test]
    fn aggregate_sums_per_key() {
        let tenant = Uuid::from_u128(7);
        let event = wire::Event::new("u1", "llm_service", "openai", "completion")
            .at(1_700_000_000_000_000)
            .with_model("gpt-4o")
            .with_quantity(wire::QuantityKind::InputTokens, 10.0)
            .with_latency_ms(2.5);
        let rows = vec![
            EventRow::new(tenant, event.clone(), Some(Decimal::new(15, 1))),
            EventRow::new(tenant, event.clone().with_error(None), None),
            EventRow::new(tenant, event.with_model("other"), None),
        ];
        let deltas = aggregate(&rows).expect("in range");
        assert_eq!(deltas.len(), 2);
        let first = deltas.values().next().expect("a delta");
        assert_eq!(first.event_count, 2);
        assert_eq!(first.error_count, 1);
        assert_eq!(first.quantities[0], Decimal::from(20));
        assert_eq!(first.cost, Decimal::new(15, 1));
        assert_eq!(first.unpriced_count, 1);
        assert_eq!(first.latency_sum_us, 5000);
        assert_eq!(first.latency_buckets[latency_bucket(2500)], 2);
    }

    #[test]
    fn merging_deltas_equals_aggregating_all_rows() {
        let tenant = Uuid::from_u128(7);
        let event = |tokens: f64, latency_ms: f64| {
            wire::Event::new("u1", "custom", "p", "e")
                .at(1_700_000_000_000_000)
                .with_quantity(wire::QuantityKind::InputTokens, tokens)
                .with_custom_quantity("images", tokens)
                .with_latency_ms(latency_ms)
        };
        let rows = vec![
            EventRow::new(tenant, event(0.1, 1.0), Some(Decimal::new(1, 2))),
            EventRow::new(tenant, event(0.2, 900.0), None),
            EventRow::new(tenant, event(0.3, 0.5), Some(Decimal::new(3, 3))),
        ];
        let all = aggregate(&rows).expect("in range").into_values().next().expect("one key");
        let mut merged = aggregate(&rows[..1]).expect("in range").into_values().next().expect("one key");
        merged
            .merge(&aggregate(&rows[1..]).expect("in range").into_values().next().expect("one key"))
            .expect("in range");
        assert_eq!(merged, all);
        assert_eq!(merged.quantities[0].to_string(), "0.6");
        assert_eq!(merged.custom_quantities["images"].to_string(), "0.6");
        assert_eq!(merged.latency_max_us, 900_000);
    }

    #[test]
    fn sums_past_the_decimal_range_are_errors_not_panics() {
        let tenant = Uuid::from_u128(7);
        let event = wire::Event::new("u1", "custom", "p", "e").at(1_700_000_000_000_000);
        let rows = vec![
            EventRow::new(tenant, event.clone(), Some(Decimal::MAX)),
            EventRow::new(tenant, event, Some(Decimal::MAX)),
        ];
        assert_eq!(aggregate(&rows), Err(RollupOverflow));
        let mut big = RollupDelta { latency_sum_us: i64::MAX, ..RollupDelta::default() };
        let one = RollupDelta { latency_sum_us: 1, ..RollupDelta::default() };
        assert_eq!(big.merge(&one), Err(RollupOverflow));
    }

    #[test]
    fn service_deltas_sum_over_users() {
        let tenant = Uuid::from_u128(7);
        let event = |user: &str, model: &str| {
            wire::Event::new(user, "llm_service", "openai", "completion")
                .at(1_700_000_000_000_000)
                .with_model(model)
                .with_quantity(wire::QuantityKind::InputTokens, 10.0)
        };
        let rows = vec![
            EventRow::new(tenant, event("u1", "a"), Some(Decimal::ONE)),
            EventRow::new(tenant, event("u2", "a"), None),
            EventRow::new(tenant, event("u2", "b"), Some(Decimal::TWO)),
        ];
        let (users, services) = aggregate_both(&rows).expect("in range");
        assert_eq!(users.len(), 3);
        assert_eq!(services.len(), 2);
        let (key, a) = services.iter().next().expect("model a");
        assert_eq!((key.user_id, key.model), ("", "a"));
        assert_eq!((a.event_count, a.cost, a.unpriced_count), (2, Decimal::ONE, 1));
        assert_eq!(a.quantities[0], Decimal::from(20));
    }
}
