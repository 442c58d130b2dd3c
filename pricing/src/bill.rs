//! Billing a period: stored per-event costs, tiered charges on the period's units, minimums.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use uuid::Uuid;

use crate::book::PriceBook;
use crate::error::{MoneyOverflow, PricingError};
use crate::method::{apply_minimum, period_charge};
use crate::{COST_DECIMAL_PLACES, Method};

/// What one rule priced in a billing period, as the query service reads it from rollups: the
/// units the rule won (found with [`PriceBook::winning_rule`] per rollup row, unit and hour) and
/// the per-event cost stored for them at ingest (zero for graduated and volume rules). Several
/// entries for one rule are added together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuledUsage {
    pub rule_id: Uuid,
    pub units: Decimal,
    pub per_event_cost: Decimal,
}

/// One rule's part of a bill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingLine {
    pub rule_id: Uuid,
    /// The period's units priced by the rule.
    pub units: Decimal,
    /// Stored per-event costs, plus [`period_charge`] of `units` for graduated and volume rules.
    pub charge: Decimal,
    /// What the rule's minimum charge adds: `minimum - charge` when the charge is below it, else 0.
    pub minimum_top_up: Decimal,
}

/// The charges of one billing period, one line per rule, in rule id order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bill {
    pub lines: Vec<BillingLine>,
    /// Sum of every line's charge and top-up.
    pub total: Decimal,
}

impl BillingLine {
    /// The charge with its top-up; `None` past the decimal range.
    pub fn total(&self) -> Option<Decimal> {
        self.charge.checked_add(self.minimum_top_up)
    }
}

impl PriceBook {
    /// Bills a period from its usage per rule. Per-event rules are charged exactly the costs
    /// stored at ingest; graduated and volume rules are charged on the period's total units, rounded
    /// to [`COST_DECIMAL_PLACES`]; a rule whose charge is below its minimum gets the difference as a
    /// top-up. Fails if the usage names a rule this book does not hold, or if a sum leaves the
    /// decimal range ([`PricingError::Overflow`]): checked, never saturated.
    pub fn bill_period(&self, usage: &[RuledUsage]) -> Result<Bill, PricingError> {
        let mut by_rule: BTreeMap<Uuid, (Decimal, Decimal)> = BTreeMap::new();
        for entry in usage {
            let rule_id = entry.rule_id;
            let overflow = |source| PricingError::Overflow { rule_id, source };
            let (units, per_event_cost) = by_rule.entry(rule_id).or_default();
            *units = units.checked_add(entry.units).ok_or(overflow(MoneyOverflow))?;
            *per_event_cost =
                per_event_cost.checked_add(entry.per_event_cost).ok_or(overflow(MoneyOverflow))?;
        }
        let mut bill = Bill { lines: Vec::with_capacity(by_rule.len()), total: Decimal::ZERO };
        for (rule_id, (units, per_event_cost)) in by_rule {
            let overflow = |source| PricingError::Overflow { rule_id, source };
            let rule = self.rule(rule_id).ok_or(PricingError::UnknownRule { rule_id })?;
            let tiered = match &rule.method {
                Method::Graduated { .. } | Method::Volume { .. } => period_charge(&rule.method, units)
                    .map_err(overflow)?
                    .round_dp(COST_DECIMAL_PLACES)
                    .normalize(),
                Method::PerUnit { .. } | Method::Package { .. } => Decimal::ZERO,
            };
            let charge = per_event_cost.checked_add(tiered).ok_or(overflow(MoneyOverflow))?;
            let minimum_top_up = apply_minimum(charge, rule.minimum_charge) - charge;
            let line = BillingLine { rule_id, units, charge, minimum_top_up };
            let line_total = line.total().ok_or(overflow(MoneyOverflow))?;
            bill.total = bill.total.checked_add(line_total).ok_or(overflow(MoneyOverflow))?;
            bill.lines.push(line);
        }
        Ok(bill)
    }
}

#[cfg(test)]
mod tests;
