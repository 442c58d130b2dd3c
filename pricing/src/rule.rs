//! A price rule: which events it matches, which unit it prices, how, and when.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::error::{PricingError, RuleError};
use crate::method::{Method, check_amount};
use crate::unit::Unit;
use crate::{MICROS_PER_HOUR, UnitRef};

/// First microsecond after the last representable effective bound: 10000-01-01T00:00:00Z, so
/// every bound can be written as RFC 3339.
const EFFECTIVE_US_END: i64 = 253_402_300_800_000_000;

/// Where a rule comes from. A tenant's rule beats a catalog rule of the same specificity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleSource {
    Tenant,
    Catalog,
}

/// One rule: the price of one unit of the events it matches during its effective range.
/// In JSON the method's fields sit beside the rule's (`"method": "per_unit", "rate": "..."`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceRule {
    pub id: Uuid,
    /// Must equal the event's service type.
    pub service_type: String,
    /// `None` matches any provider.
    pub service_provider: Option<String>,
    /// `None` matches any model, including none; `Some` matches only that model.
    pub model: Option<String>,
    /// `None` matches any event type.
    pub event_type: Option<String>,
    pub unit: Unit,
    #[serde(flatten)]
    pub method: Method,
    /// Least the rule charges in a billing period in which it priced any usage.
    pub minimum_charge: Option<Decimal>,
    /// First microsecond the rule applies (inclusive), on a whole hour.
    pub effective_from_us: i64,
    /// First microsecond the rule no longer applies (exclusive), on a whole hour; `None` is never.
    pub effective_until_us: Option<i64>,
    pub source: RuleSource,
}

/// A rule as the admin API accepts it: times in RFC 3339, decimals as strings or numbers, the
/// method's fields beside the rule's:
///
/// ```json
/// {"service_type": "llm_service", "service_provider": "openai", "model": "gpt-4o",
///  "unit": "input_tokens", "method": "per_unit", "rate": "0.0000025", "minimum_charge": null,
///  "effective_from": "2026-11-01T00:00:00Z", "effective_until": null}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceRuleSpec {
    pub service_type: String,
    #[serde(default)]
    pub service_provider: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub event_type: Option<String>,
    pub unit: Unit,
    #[serde(flatten)]
    pub method: Method,
    #[serde(default)]
    pub minimum_charge: Option<Decimal>,
    /// RFC 3339; when absent the caller's default applies.
    #[serde(default)]
    pub effective_from: Option<String>,
    /// RFC 3339; absent or null is never.
    #[serde(default)]
    pub effective_until: Option<String>,
}

impl PriceRule {
    /// Checks the rule against the model: names not empty, method valid, minimum charge from 0 to
    /// [`crate::PRICE_MAX`], effective bounds on whole hours, in range and in order.
    pub fn validate(&self) -> Result<(), PricingError> {
        self.check().map_err(|problem| PricingError::InvalidRule { rule_id: self.id, problem })
    }

    /// Whether the rule applies at this time: from inclusive, until exclusive.
    pub fn is_effective_at(&self, timestamp_us: i64) -> bool {
        self.effective_from_us <= timestamp_us
            && self.effective_until_us.is_none_or(|until| timestamp_us < until)
    }

    /// Whether the rule matches an event with these fields at this time. The service type and unit
    /// are not checked here: the price book indexes rules by them. An empty model is no model.
    pub fn matches(&self, provider: &str, model: Option<&str>, event_type: &str, timestamp_us: i64) -> bool {
        let model = model.filter(|model| !model.is_empty());
        self.model.as_deref().is_none_or(|wanted| model == Some(wanted))
            && self.service_provider.as_deref().is_none_or(|wanted| wanted == provider)
            && self.event_type.as_deref().is_none_or(|wanted| wanted == event_type)
            && self.is_effective_at(timestamp_us)
    }

    /// (model given, event type given, provider given): compared in this order, more is more specific.
    pub fn specificity(&self) -> (bool, bool, bool) {
        (self.model.is_some(), self.event_type.is_some(), self.service_provider.is_some())
    }

    /// Whether the rule prices this unit.
    pub fn prices(&self, unit: UnitRef<'_>) -> bool {
        self.unit.as_unit_ref() == unit
    }

    fn check(&self) -> Result<(), RuleError> {
        non_empty("service_type", Some(&self.service_type))?;
        non_empty("service_provider", self.service_provider.as_deref())?;
        non_empty("model", self.model.as_deref())?;
        non_empty("event_type", self.event_type.as_deref())?;
        self.method.validate()?;
        if let Some(minimum) = self.minimum_charge {
            check_amount("minimum_charge", minimum)?;
        }
        check_bound("effective_from", self.effective_from_us)?;
        if let Some(until_us) = self.effective_until_us {
            check_bound("effective_until", until_us)?;
            if until_us <= self.effective_from_us {
                return Err(RuleError::EmptyEffectiveRange { from_us: self.effective_from_us, until_us });
            }
        }
        Ok(())
    }
}

impl PriceRuleSpec {
    /// The validated rule. `default_effective_from_us` applies when the spec has no
    /// `effective_from` (the admin API passes the current time truncated to the hour); it is
    /// validated like any other bound.
    pub fn into_rule(
        self,
        id: Uuid,
        source: RuleSource,
        default_effective_from_us: i64,
    ) -> Result<PriceRule, PricingError> {
        let invalid = |problem| PricingError::InvalidRule { rule_id: id, problem };
        let effective_from_us = match &self.effective_from {
            Some(text) => parse_timestamp_us("effective_from", text).map_err(invalid)?,
            None => default_effective_from_us,
        };
        let effective_until_us = match &self.effective_until {
            Some(text) => Some(parse_timestamp_us("effective_until", text).map_err(invalid)?),
            None => None,
        };
        let rule = PriceRule {
            id,
            service_type: self.service_type,
            service_provider: self.service_provider,
            model: self.model,
            event_type: self.event_type,
            unit: self.unit,
            method: self.method,
            minimum_charge: self.minimum_charge,
            effective_from_us,
            effective_until_us,
            source,
        };
        rule.validate()?;
        Ok(rule)
    }

    /// The spec of a validated rule, with times in RFC 3339 (`2026-11-01T00:00:00Z`). Bounds
    /// outside what RFC 3339 can write (only in unvalidated rules) come out empty.
    pub fn from_rule(rule: &PriceRule) -> PriceRuleSpec {
        PriceRuleSpec {
            service_type: rule.service_type.clone(),
            service_provider: rule.service_provider.clone(),
            model: rule.model.clone(),
            event_type: rule.event_type.clone(),
            unit: rule.unit.clone(),
            method: rule.method.clone(),
            minimum_charge: rule.minimum_charge,
            effective_from: Some(format_timestamp_us(rule.effective_from_us)),
            effective_until: rule.effective_until_us.map(format_timestamp_us),
        }
    }
}

fn non_empty(field: &'static str, value: Option<&str>) -> Result<(), RuleError> {
    match value {
        Some("") => Err(RuleError::EmptyField { field }),
        _ => Ok(()),
    }
}

fn check_bound(field: &'static str, value_us: i64) -> Result<(), RuleError> {
    if !(0..EFFECTIVE_US_END).contains(&value_us) {
        return Err(RuleError::OutOfRange { field, value_us });
    }
    if value_us % MICROS_PER_HOUR != 0 {
        return Err(RuleError::NotOnHour { field, value_us });
    }
    Ok(())
}

fn parse_timestamp_us(field: &'static str, text: &str) -> Result<i64, RuleError> {
    let invalid = || RuleError::InvalidTimestamp { field, value: text.to_owned() };
    let parsed = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| invalid())?;
    i64::try_from(parsed.unix_timestamp_nanos().div_euclid(1000)).map_err(|_| invalid())
}

fn format_timestamp_us(value_us: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(value_us) * 1000)
        .ok()
        .and_then(|time| time.format(&Rfc3339).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
