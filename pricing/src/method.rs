//! How a rule turns units into money: per unit, per package, graduated and volume tiers.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::error::{MoneyOverflow, RuleError};
use crate::{PACKAGE_SIZE_MAX, PACKAGE_SIZE_MIN, PRICE_MAX, TIERS_MAX, UNITS_MAX};

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
                if *size < PACKAGE_SIZE_MIN || *size > PACKAGE_SIZE_MAX {
                    return Err(RuleError::PackageSizeOutOfRange {
                        size: *size,
                        min: PACKAGE_SIZE_MIN,
                        max: PACKAGE_SIZE_MAX,
                    });
                }
                check_amount("price", *price)
            }
            Method::Graduated { tiers } | Method::Volume { tiers } => validate_tiers(tiers),
        }
    }

    /// The charge for one event's units under a per-event method, unrounded; `Ok(None)` for
    /// period methods, which charge nothing per event. Checked: an amount past what a decimal
    /// holds is an error, never a wrapped, saturated or zero charge.
    pub fn event_charge(&self, units: Decimal) -> Result<Option<Decimal>, MoneyOverflow> {
        match self {
            Method::PerUnit { rate } => units.checked_mul(*rate).map(Some).ok_or(MoneyOverflow),
            Method::Package { size, price } => {
                packages(units, *size)?.checked_mul(*price).map(Some).ok_or(MoneyOverflow)
            }
            Method::Graduated { .. } | Method::Volume { .. } => Ok(None),
        }
    }
}

/// The charge for a total of units under any method, unrounded: graduated and volume as over a
/// billing period; per-unit and package as if the total were one event. Expects a validated
/// method; a package size that is not positive charges 0. Checked like
/// [`Method::event_charge`].
pub fn period_charge(method: &Method, units: Decimal) -> Result<Decimal, MoneyOverflow> {
    match method {
        Method::PerUnit { .. } | Method::Package { .. } => {
            Ok(method.event_charge(units)?.unwrap_or_default())
        }
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
            Some(up_to) if up_to > UNITS_MAX => {
                return Err(RuleError::AmountTooLarge {
                    field: format!("tiers[{index}].up_to"),
                    value: up_to,
                    max: UNITS_MAX,
                });
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
fn packages(units: Decimal, size: Decimal) -> Result<Decimal, MoneyOverflow> {
    if units <= Decimal::ZERO || size <= Decimal::ZERO {
        return Ok(Decimal::ZERO);
    }
    let remainder = units.checked_rem(size).ok_or(MoneyOverflow)?;
    let whole =
        units.checked_sub(remainder).and_then(|exact| exact.checked_div(size)).ok_or(MoneyOverflow)?;
    let whole = whole.round();
    if remainder.is_zero() { Ok(whole) } else { whole.checked_add(Decimal::ONE).ok_or(MoneyOverflow) }
}

fn graduated_charge(tiers: &[Tier], units: Decimal) -> Result<Decimal, MoneyOverflow> {
    let mut charge = Decimal::ZERO;
    let mut lower = Decimal::ZERO;
    for tier in tiers {
        if units <= lower {
            break;
        }
        let upper = tier.up_to.map_or(units, |up_to| up_to.min(units));
        let slice = upper.checked_sub(lower).and_then(|width| width.checked_mul(tier.rate));
        charge = slice.and_then(|slice| charge.checked_add(slice)).ok_or(MoneyOverflow)?;
        match tier.up_to {
            Some(up_to) => lower = up_to,
            None => break,
        }
    }
    Ok(charge)
}

fn volume_charge(tiers: &[Tier], units: Decimal) -> Result<Decimal, MoneyOverflow> {
    let tier = tiers.iter().find(|tier| tier.up_to.is_none_or(|up_to| units <= up_to)).or(tiers.last());
    match tier {
        Some(tier) => units.max(Decimal::ZERO).checked_mul(tier.rate).ok_or(MoneyOverflow),
        None => Ok(Decimal::ZERO),
    }
}

#[cfg(test)]
mod tests;
