//! Prices usage: rules, matching, per-event and per-period methods, exact decimal arithmetic. No IO.
//!
//! Two callers use this crate. The edge builds one [`PriceBook`] per tenant and prices every event
//! at ingest with [`PriceBook::price_event`]; the query service builds the same book and turns a
//! month of rolled-up unit totals into a [`Bill`] with [`PriceBook::bill_period`]. Money is never
//! floating point: every amount is a [`Decimal`].
//!
//! # The model
//!
//! **Unit.** What a rule prices ([`Unit`]): one of the well-known quantities of [`wire::QuantityKind`]
//! (`input_tokens`, `output_tokens`, `cached_input_tokens`, `reasoning_tokens`, `pages`,
//! `characters`, `requests`, `bytes`, `duration_ms`), a custom quantity by name, or `events`
//! (1 per event). In JSON a unit is its name. Quantities are disjoint: each is priced on its own,
//! so `input_tokens` must not include `cached_input_tokens` and `output_tokens` must not include
//! `reasoning_tokens` (OpenAI's `prompt_tokens` and `completion_tokens` do include them: a sender
//! forwarding those subtracts first).
//!
//! **Method.** How a rule turns units into money ([`Method`]):
//! - `per_unit {rate}`: units × rate. Per event.
//! - `package {size, price}`: ceil(units / size) × price; 0 units cost 0. Per event.
//! - `graduated {tiers}`: the period's units are split across the tiers and each slice is charged
//!   at its own tier's rate. Per billing period.
//! - `volume {tiers}`: all of the period's units at the rate of the tier the total falls in. Per
//!   billing period.
//!
//! A tier is `{up_to, rate}`; `up_to` is an inclusive upper bound and the last tier has none
//! (infinity). With tiers `[{up_to: 100}, {up_to: 1000}, {up_to: null}]` units 0 to 100 (inclusive)
//! are the first tier and units above 100 up to 1000 (inclusive) the second: a volume total of
//! exactly 100 is charged at the first tier's rate. Tiers are validated: not empty, at most
//! [`TIERS_MAX`], `up_to` strictly increasing from above 0, only the last tier without `up_to`,
//! rates from 0 to [`PRICE_MAX`].
//!
//! **Rule.** A [`PriceRule`] prices one unit of the events it matches: `service_type` (required),
//! and `service_provider`, `model`, `event_type`, each either given (must equal the event's) or
//! `None` (any). A rule has an optional `minimum_charge` per billing period, an effective range
//! `[effective_from_us, effective_until_us)` (from inclusive, until exclusive, both on whole UTC
//! hours so hourly rollups are priced exactly as their events were), and a [`RuleSource`]: a
//! tenant's own rule or the built-in [`catalog`].
//!
//! **Matching.** For an event and one of its units the candidates are the rules for the event's
//! service type and that unit whose given fields all equal the event's and whose effective range
//! holds the event's timestamp. The most specific candidate wins: specificity is (model given,
//! event type given, provider given) compared in that order, so any rule naming the model beats
//! any rule that does not; then a tenant rule beats a catalog rule; then the later
//! `effective_from_us` wins (a new version of a rule replaces the old one from its start). A rule
//! naming a model never matches an event with another model or with no model: an event of an
//! unknown model is unpriced, never billed at another model's rate. An empty model is treated as no
//! model, so rollup rows, which store "no model" as an empty string, match exactly as events did.
//! Two rules that would tie on all of this match the same events and [`PriceBook::new`] refuses
//! them, naming both.
//!
//! **Per event.** [`PriceBook::price_event`] looks up the winning rule for each unit an event
//! carries: each well-known quantity present, each custom quantity, and `events` = 1. Per-event
//! methods add to the event's cost; period methods add nothing to it but record the rule and the
//! units, which are billed per period from rollups. Each per-event part is rounded to
//! [`COST_DECIMAL_PLACES`] (12) decimal places with banker's rounding (`round_dp`) and the event's
//! cost is the exact sum of its parts, so per-rule parts always add up to the stored cost. The cost
//! is `None` if no unit matched any rule (the event is unpriced) and `Some` otherwise, even if
//! only period rules matched (then it is 0). Quantities arrive as `f64`; [`quantity_decimal`]
//! turns them into decimals exactly as the sink stores them.
//!
//! **Per period.** A [`Bill`] for a billing period has one [`BillingLine`] per rule that priced
//! usage in it. Its charge is the per-event costs as stored at ingest plus, for graduated and
//! volume rules, [`period_charge`] of the period's total units; if a line's charge is below the
//! rule's `minimum_charge` the difference is added as a top-up ([`apply_minimum`]). The two views
//! agree by construction: the per-event part of a bill is exactly the sum of the stored event
//! costs, and tiered charges and minimum top-ups exist only in the bill. A minimum applies to a
//! rule that priced any usage in the period, in full, whatever part of the period the rule was
//! effective.
//!
//! **Arithmetic.** Exact decimals throughout, and every operation on money is checked: nothing
//! saturates, wraps or panics. Rules are bounded (rates, prices and minimums at most
//! [`PRICE_MAX`], package sizes from [`PACKAGE_SIZE_MIN`] to [`PACKAGE_SIZE_MAX`], tier bounds at
//! most [`UNITS_MAX`]) so that no single part of a validated event's price (quantities at most
//! 2^53) leaves the decimal range; an event whose cost would still exceed [`EVENT_COST_MAX`] is
//! refused alone ([`EventPriceError`]). With that bound no month of a tenant's events can
//! overflow a decimal sum (that would take about 7.9 × 10^16 events). The only rounding is to [`COST_DECIMAL_PLACES`] per event part and per period
//! charge; rounding a bill to the currency's minor unit is the invoice's job. Rules carry no
//! currency: a book's rules share one (the catalog is in USD).

mod bill;
mod book;
pub mod catalog;
mod error;
mod method;
mod rule;
mod stored;
mod unit;

pub use bill::{Bill, BillingLine, RuledUsage};
pub use book::{EventPrice, PriceBook};
pub use catalog::catalog_rules;
pub use error::{EventPriceError, MoneyOverflow, PricingError, RuleError};
pub use method::{Method, Tier, apply_minimum, period_charge};
pub use rule::{PriceRule, PriceRuleSpec, RuleSource};
pub use rust_decimal::Decimal;
pub use stored::{StoredRule, StoredRuleError, tenant_price_book, tenant_price_book_lenient};
pub use unit::{EVENTS_UNIT, Unit, UnitRef};

/// Decimal places of a per-event cost part and of a period charge (banker's rounding).
pub const COST_DECIMAL_PLACES: u32 = 12;

/// Decimal places a fractional quantity keeps; the sink stores quantities with the same scale.
pub const QUANTITY_DECIMAL_PLACES: u32 = 6;

/// Largest rate, package price or minimum charge: one million currency units. With quantities of
/// at most 2^53 a per-event part stays below 10^22, far from `Decimal::MAX` (about 7.9 × 10^28).
pub const PRICE_MAX: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

/// Largest cost of one event: one trillion currency units. An event that would cost more is
/// refused alone, so that sums over events (rollups, month-to-date totals, bills) stay far inside
/// the decimal range.
pub const EVENT_COST_MAX: Decimal = Decimal::from_parts(3_567_587_328, 232, 0, false, 0);
/// Smallest package size: the finest quantity stored (10^-[`QUANTITY_DECIMAL_PLACES`]). A smaller
/// size would only make the package count overflow.
pub const PACKAGE_SIZE_MIN: Decimal = Decimal::from_parts(1, 0, 0, false, QUANTITY_DECIMAL_PLACES);
/// Largest package size, and largest tier bound: 10^16 units, above the largest quantity (2^53).
pub const PACKAGE_SIZE_MAX: Decimal = UNITS_MAX;
/// Largest number of units a rule may name (tier bounds, package sizes).
pub const UNITS_MAX: Decimal = Decimal::from_parts(1_874_919_424, 2_328_306, 0, false, 0);
/// Most tiers in a graduated or volume method.
pub const TIERS_MAX: usize = 64;

/// Most rules in one price book, the catalog's included.
pub const RULES_MAX: usize = 100_000;

/// Microseconds in an hour: effective bounds are multiples of it.
pub const MICROS_PER_HOUR: i64 = 3_600_000_000;

/// The exact decimal for a quantity value: integers as they are, fractions rounded to
/// [`QUANTITY_DECIMAL_PLACES`] and normalised. The sink's `quantity_decimal` is the same function;
/// both must agree so stored quantities and priced quantities are the same numbers.
pub fn quantity_decimal(value: f64) -> Decimal {
    if value.fract() == 0.0 {
        return Decimal::from(value as i64);
    }
    Decimal::from_f64_retain(value)
        .map(|exact| exact.round_dp(QUANTITY_DECIMAL_PLACES).normalize())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_become_the_decimals_the_sink_stores() {
        assert_eq!(quantity_decimal(150.0).to_string(), "150");
        assert_eq!(quantity_decimal(0.1).to_string(), "0.1");
        assert_eq!(quantity_decimal(0.25).to_string(), "0.25");
        assert_eq!(quantity_decimal(1.0000004).to_string(), "1");
        assert_eq!(quantity_decimal(2.5e-7).to_string(), "0");
        assert_eq!(quantity_decimal(9_007_199_254_740_992.0).to_string(), "9007199254740992");
    }

    #[test]
    fn price_max_is_one_million() {
        assert_eq!(PRICE_MAX, Decimal::from(1_000_000));
    }

    #[test]
    fn bounds_are_what_they_say() {
        assert_eq!(EVENT_COST_MAX, Decimal::from(1_000_000_000_000i64));
        assert_eq!(UNITS_MAX, Decimal::from(10_000_000_000_000_000i64));
        assert_eq!(PACKAGE_SIZE_MIN.to_string(), "0.000001");
        // The largest part one rule can give one event stays inside the decimal range: the most
        // packages (2^53 units / the smallest size) at the highest price.
        let packages = Decimal::from(1u64 << 53) / PACKAGE_SIZE_MIN;
        assert!(packages.checked_mul(PRICE_MAX).is_some());
    }
}
