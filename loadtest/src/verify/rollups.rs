//! Hourly rollups against sums over raw events, computed here in exact decimals for every
//! backend: the backends only read rows ([`RawEvent`], [`StoredRollup`]).

use std::collections::BTreeMap;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use rust_decimal::Decimal;

/// The quantity columns, in the order of `wire::QuantityKind::ALL`.
pub fn quantity_columns() -> Vec<&'static str> {
    wire::QuantityKind::ALL.iter().map(|kind| kind.as_str()).collect()
}

/// The primary key of a rollup row without the tenant; `model` is `""` for events without one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RollupKey {
    pub hour_us: i64,
    pub service_type: String,
    pub service_provider: String,
    pub model: String,
    pub user_id: String,
    pub event_type: String,
}

/// What a rollup row sums (everything but the histogram).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub event_count: i64,
    pub error_count: i64,
    /// In the order of [`quantity_columns`].
    pub quantities: Vec<Decimal>,
    pub cost: Decimal,
    pub unpriced_count: i64,
    pub latency_count: i64,
    pub latency_sum_us: i64,
    pub latency_max_us: i64,
}

/// The columns of one raw event that rollups sum.
#[derive(Debug, Clone)]
pub struct RawEvent {
    pub key: RollupKey,
    pub error: bool,
    /// In the order of [`quantity_columns`]; `None` is NULL.
    pub quantities: Vec<Option<Decimal>>,
    /// `{"name": number}` text, or NULL.
    pub custom_quantities: Option<String>,
    pub cost: Option<Decimal>,
    pub latency_us: Option<i64>,
}

/// One stored rollup row.
#[derive(Debug, Clone)]
pub struct StoredRollup {
    pub key: RollupKey,
    pub totals: Totals,
    pub custom_quantities: BTreeMap<String, Decimal>,
    /// `None` where the table keeps no histogram (PostgreSQL's per-user rollups).
    pub latency_buckets: Option<Vec<i64>>,
}

/// Sums over raw events per rollup key, grown one event at a time (rows are streamed).
#[derive(Debug, Default)]
pub struct RawSums {
    sums: BTreeMap<RollupKey, (Totals, BTreeMap<String, Decimal>)>,
}

impl RawSums {
    pub fn add(&mut self, event: RawEvent) -> Result<()> {
        let (totals, custom) = self.sums.entry(event.key).or_insert_with(|| {
            (
                Totals { quantities: vec![Decimal::ZERO; event.quantities.len()], ..Totals::default() },
                BTreeMap::new(),
            )
        });
        totals.event_count += 1;
        totals.error_count += i64::from(event.error);
        for (sum, value) in totals.quantities.iter_mut().zip(&event.quantities) {
            *sum += value.unwrap_or(Decimal::ZERO);
        }
        match event.cost {
            Some(cost) => totals.cost += cost,
            None => totals.unpriced_count += 1,
        }
        if let Some(latency_us) = event.latency_us {
            totals.latency_count += 1;
            totals.latency_sum_us += latency_us;
            totals.latency_max_us = totals.latency_max_us.max(latency_us);
        }
        if let Some(text) = &event.custom_quantities {
            for (name, value) in parse_quantities(text)? {
                *custom.entry(name).or_default() += value;
            }
        }
        Ok(())
    }
}

impl RawSums {
    /// The same sums keyed without the user (`user_id` empty), as the user-less rollups hold them.
    pub fn without_users(&self) -> RawSums {
        let mut sums: BTreeMap<RollupKey, (Totals, BTreeMap<String, Decimal>)> = BTreeMap::new();
        for (key, (totals, custom)) in &self.sums {
            let key = RollupKey { user_id: String::new(), ..key.clone() };
            let (sum, sum_custom) = sums.entry(key).or_insert_with(|| {
                (
                    Totals { quantities: vec![Decimal::ZERO; totals.quantities.len()], ..Totals::default() },
                    BTreeMap::new(),
                )
            });
            sum.event_count += totals.event_count;
            sum.error_count += totals.error_count;
            for (total, value) in sum.quantities.iter_mut().zip(&totals.quantities) {
                *total += value;
            }
            sum.cost += totals.cost;
            sum.unpriced_count += totals.unpriced_count;
            sum.latency_count += totals.latency_count;
            sum.latency_sum_us += totals.latency_sum_us;
            sum.latency_max_us = sum.latency_max_us.max(totals.latency_max_us);
            for (name, value) in custom {
                *sum_custom.entry(name.clone()).or_default() += value;
            }
        }
        RawSums { sums }
    }
}

/// How the stored rollups compare with the raw sums.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RollupComparison {
    /// Keys in either the raw sums or the rollups.
    pub compared: u64,
    /// Keys whose counts, quantities, cost or latency differ, or that exist on one side only.
    pub mismatched: u64,
    /// Custom quantity sums (per key and name) that differ.
    pub custom_mismatched: u64,
    /// Rollup rows whose histogram does not add up to `latency_count` or has the wrong length.
    pub bad_buckets: u64,
}

/// Compares every stored rollup with the raw sums of its key.
pub fn compare(raw: RawSums, stored: Vec<StoredRollup>) -> RollupComparison {
    let mut raw = raw.sums;
    let mut comparison = RollupComparison::default();
    let no_custom = BTreeMap::new();
    for row in stored {
        comparison.compared += 1;
        if let Some(buckets) = &row.latency_buckets
            && (buckets.len() != sink::rollup::LATENCY_BUCKETS
                || buckets.iter().sum::<i64>() != row.totals.latency_count)
        {
            comparison.bad_buckets += 1;
        }
        let (totals, custom) = match raw.remove(&row.key) {
            Some((totals, custom)) => (Some(totals), custom),
            None => (None, BTreeMap::new()),
        };
        if totals.as_ref() != Some(&row.totals) {
            comparison.mismatched += 1;
        }
        comparison.custom_mismatched += custom_differences(&custom, &row.custom_quantities);
    }
    for (_, (_, custom)) in raw {
        comparison.compared += 1;
        comparison.mismatched += 1;
        comparison.custom_mismatched += custom_differences(&custom, &no_custom);
    }
    comparison
}

/// Names whose sums differ between two `{name: sum}` maps (a name on one side only differs).
fn custom_differences(raw: &BTreeMap<String, Decimal>, stored: &BTreeMap<String, Decimal>) -> u64 {
    let differing_raw = raw.iter().filter(|(name, sum)| stored.get(*name) != Some(sum)).count();
    let stored_only = stored.keys().filter(|name| !raw.contains_key(*name)).count();
    (differing_raw + stored_only) as u64
}

/// A `{"name": number, ...}` object as both backends print it (PostgreSQL's `jsonb::text`, the
/// SQLite store's text), into exact decimals. Names are `[a-z0-9_]`, so a plain split is exact.
pub fn parse_quantities(text: &str) -> Result<BTreeMap<String, Decimal>> {
    let inner = text
        .trim()
        .strip_prefix('{')
        .and_then(|rest| rest.strip_suffix('}'))
        .with_context(|| format!("custom quantities {text:?} are not a JSON object"))?;
    let mut quantities = BTreeMap::new();
    for entry in inner.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
        let Some((name, value)) = entry.split_once(':') else {
            bail!("custom quantities {text:?} are malformed")
        };
        let name = name.trim().trim_matches('"').to_owned();
        let value = value.trim();
        let value = Decimal::from_str(value)
            .or_else(|_| Decimal::from_scientific(value))
            .with_context(|| format!("custom quantity {value:?} in {text:?} is not a decimal"))?;
        quantities.insert(name, value);
    }
    Ok(quantities)
}

/// A stored decimal as text (SQLite) into an exact decimal.
pub fn decimal(text: &str) -> Result<Decimal> {
    Decimal::from_str(text).with_context(|| format!("stored value {text:?} is not a decimal"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(user: &str) -> RollupKey {
        RollupKey {
            hour_us: 0,
            service_type: "llm_service".into(),
            service_provider: "openai".into(),
            model: "gpt".into(),
            user_id: user.into(),
            event_type: "completion".into(),
        }
    }

    fn event(user: &str, tokens: &str, custom: Option<&str>) -> RawEvent {
        let mut quantities = vec![None; quantity_columns().len()];
        quantities[0] = Some(decimal(tokens).expect("decimal"));
        RawEvent {
            key: key(user),
            error: false,
            quantities,
            custom_quantities: custom.map(str::to_owned),
            cost: Some(decimal("0.5").expect("decimal")),
            latency_us: Some(1000),
        }
    }

    fn rollup_of(raw: &RawSums, user: &str) -> StoredRollup {
        let (totals, custom) = raw.sums[&key(user)].clone();
        let mut latency_buckets = vec![0; sink::rollup::LATENCY_BUCKETS];
        latency_buckets[0] = totals.latency_count;
        StoredRollup {
            key: key(user),
            totals,
            custom_quantities: custom,
            latency_buckets: Some(latency_buckets),
        }
    }

    #[test]
    fn equal_sums_pass_and_every_kind_of_difference_is_counted() {
        let mut raw = RawSums::default();
        raw.add(event("a", "1.5", Some(r#"{"gpu_seconds": 2.25, "calls": 1}"#))).expect("adds");
        raw.add(event("a", "0.500000", Some(r#"{"gpu_seconds":0.75}"#))).expect("adds");
        raw.add(event("b", "3", None)).expect("adds");
        let stored = vec![rollup_of(&raw, "a"), rollup_of(&raw, "b")];
        assert_eq!(stored[0].totals.quantities[0], decimal("2").expect("decimal"), "exact, scale ignored");
        assert_eq!(stored[0].custom_quantities["gpu_seconds"], decimal("3").expect("decimal"));
        let clean = compare(std::mem::take(&mut raw), stored.clone());
        assert_eq!(clean, RollupComparison { compared: 2, ..RollupComparison::default() });

        let mut raw = RawSums::default();
        raw.add(event("a", "1.5", Some(r#"{"gpu_seconds": 2.25}"#))).expect("adds");
        raw.add(event("b", "3", None)).expect("adds");
        raw.add(event("c", "3", None)).expect("adds");
        let mut tampered = rollup_of(&raw, "a");
        tampered.totals.quantities[0] += Decimal::new(1, 6);
        tampered.custom_quantities.insert("extra".into(), Decimal::ONE);
        if let Some(buckets) = tampered.latency_buckets.as_mut() {
            buckets[1] = 1;
        }
        let extra = StoredRollup { key: key("z"), ..rollup_of(&raw, "b") };
        let comparison = compare(raw, vec![tampered, extra]);
        assert_eq!(
            comparison,
            RollupComparison { compared: 4, mismatched: 4, custom_mismatched: 1, bad_buckets: 1 }
        );
    }

    #[test]
    fn sums_without_users_add_over_users() {
        let mut raw = RawSums::default();
        raw.add(event("a", "1.5", Some(r#"{"gpu_seconds": 2.25}"#))).expect("adds");
        raw.add(event("b", "3", Some(r#"{"gpu_seconds": 1}"#))).expect("adds");
        let services = raw.without_users();
        let (totals, custom) = &services.sums[&key("")];
        assert_eq!(services.sums.len(), 1);
        assert_eq!((totals.event_count, totals.quantities[0]), (2, decimal("4.5").expect("decimal")));
        assert_eq!(totals.cost, Decimal::ONE);
        assert_eq!(custom["gpu_seconds"], decimal("3.25").expect("decimal"));
    }

    #[test]
    fn quantity_objects_parse_exactly() {
        let parsed = parse_quantities(r#"{"a": 0.000375, "b_2": 1200, "c": 1e3}"#).expect("parses");
        assert_eq!(parsed["a"], decimal("0.000375").expect("decimal"));
        assert_eq!(parsed["b_2"], Decimal::from(1200));
        assert_eq!(parsed["c"], Decimal::from(1000));
        assert!(parse_quantities("{}").expect("parses").is_empty());
        assert!(parse_quantities("[1]").is_err());
        assert!(parse_quantities(r#"{"a": x}"#).is_err());
    }
}
