//! How a rule turns units into money: per unit, per package, graduated and volume tiers.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::error::RuleError;
use crate::{PRICE_MAX, TIERS_MAX};

/// A pricing method. In JSON it is tagged by `method`:
/// `{"method": "per_unit", "rate": "0.0000025"}`, `{"method": "package", "size": "1000",
/// "price": "0.5"}`, `{"method": "graduated", "tiers": [{"up_to": "100", "rate": "1"},
/// {"up_to": null, "rate": "0.5"}]}`, `{"method": "volume", "tiers": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Method {
    /// units × rate, per event.
    PerUnit { rate: Decimal },
    /// ceil(units / size) × price, per event; 0 units cost 0.
    Package { size: Decimal, price: Decimal },
    /// The period's units split across the tiers, each slice at its own tier's rate.
    Graduated { tiers: Vec<Tier> },
    /// All of the period's units at the rate of the tier their total falls in.
    Volume { tiers: Vec<Tier> },
}

/// One tier of a graduated or volume method.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Inclusive upper bound of the tier's units; `None` (only for the last tier) is infinity.
    #[serde(default)]
    pub up_to: Option<Decimal>,
    /// Price of one unit in this tier.
    pub rate: Decimal,
}

impl Method {
    /// Whether the method prices each event on its own (per unit, package) rather than the
    /// period's total (graduated, volume).
    pub fn is_per_event(&self) -> bool {
        matches!(self, Method::PerUnit { .. } | Method::Package { .. })
    }

    /// Checks amounts and tiers against the model.
    pub fn validate(&self) -> Result<(), RuleError> {
        match self {
            Method::PerUnit { rate } => check_amount("rate", *rate),
            Method::Package { size, price } => {
                if *size <= Decimal::ZERO {
                    return Err(RuleError::PackageSizeNotPositive { size: *size });
                }
                check_amount("price", *price)
            }
            Method::Graduated { tiers } | Method::Volume { tiers } => validate_tiers(tiers),
        }
    }

    /// The charge for one event's units under a per-event method, unrounded; `None` for period
    /// methods, which charge nothing per event.
    pub fn event_charge(&self, units: Decimal) -> Option<Decimal> {
        match self {
            Method::PerUnit { rate } => Some(units.saturating_mul(*rate)),
            Method::Package { size, price } => Some(packages(units, *size).saturating_mul(*price)),
            Method::Graduated { .. } | Method::Volume { .. } => None,
        }
    }
}

/// The charge for a total of units under any method, unrounded: graduated and volume as over a
/// billing period; per-unit and package as if the total were one event. Expects a validated
/// method; a package size that is not positive charges 0.
pub fn period_charge(method: &Method, units: Decimal) -> Decimal {
    match method {
        Method::PerUnit { .. } | Method::Package { .. } => method.event_charge(units).unwrap_or_default(),
        Method::Graduated { tiers } => graduated_charge(tiers, units),
        Method::Volume { tiers } => volume_charge(tiers, units),
    }
}

/// The charge raised to the minimum, if there is one and the charge is below it.
pub fn apply_minimum(charge: Decimal, minimum: Option<Decimal>) -> Decimal {
    match minimum {
        Some(minimum) if charge < minimum => minimum,
        _ => charge,
    }
}

/// Checks a rate, price or minimum charge: 0 to [`PRICE_MAX`].
pub(crate) fn check_amount(field: &str, value: Decimal) -> Result<(), RuleError> {
    if value.is_sign_negative() && !value.is_zero() {
        return Err(RuleError::NegativeAmount { field: field.to_owned(), value });
    }
    if value > PRICE_MAX {
        return Err(RuleError::AmountTooLarge { field: field.to_owned(), value, max: PRICE_MAX });
    }
    Ok(())
}

fn validate_tiers(tiers: &[Tier]) -> Result<(), RuleError> {
    let Some(last) = tiers.last() else {
        return Err(RuleError::EmptyTiers);
    };
    if tiers.len() > TIERS_MAX {
        return Err(RuleError::TooManyTiers { count: tiers.len(), max: TIERS_MAX });
    }
    let mut previous = Decimal::ZERO;
    for (index, tier) in tiers.iter().enumerate() {
        check_amount(&format!("tiers[{index}].rate"), tier.rate)?;
        match tier.up_to {
            Some(up_to) if up_to <= previous => {
                return Err(RuleError::TiersNotIncreasing { index, up_to, previous });
            }
            Some(up_to) => previous = up_to,
            None if index + 1 < tiers.len() => return Err(RuleError::UnboundedTierNotLast { index }),
            None => {}
        }
    }
    match last.up_to {
        Some(up_to) => Err(RuleError::LastTierBounded { up_to }),
        None => Ok(()),
    }
}

/// Whole packages needed for the units: ceil(units / size), 0 for no units. The remainder is
/// computed exactly, so a total that is an exact multiple of the size never rounds up.
fn packages(units: Decimal, size: Decimal) -> Decimal {
    if units <= Decimal::ZERO || size <= Decimal::ZERO {
        return Decimal::ZERO;
    }
    let remainder = units.checked_rem(size).unwrap_or_default();
    let whole = (units - remainder).checked_div(size).unwrap_or_default().round();
    if remainder.is_zero() { whole } else { whole.saturating_add(Decimal::ONE) }
}

fn graduated_charge(tiers: &[Tier], units: Decimal) -> Decimal {
    let mut charge = Decimal::ZERO;
    let mut lower = Decimal::ZERO;
    for tier in tiers {
        if units <= lower {
            break;
        }
        let upper = tier.up_to.map_or(units, |up_to| up_to.min(units));
        charge = charge.saturating_add((upper - lower).saturating_mul(tier.rate));
        match tier.up_to {
            Some(up_to) => lower = up_to,
            None => break,
        }
    }
    charge
}

fn volume_charge(tiers: &[Tier], units: Decimal) -> Decimal {
    let tier = tiers.iter().find(|tier| tier.up_to.is_none_or(|up_to| units <= up_to)).or(tiers.last());
    tier.map_or(Decimal::ZERO, |tier| units.max(Decimal::ZERO).saturating_mul(tier.rate))
}

#[cfg(test)]
mod tests;
