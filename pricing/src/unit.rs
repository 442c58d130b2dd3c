//! What a rule prices: a well-known quantity, a custom quantity, or the event itself.

use std::fmt;

use serde::{Deserialize, Serialize};
use wire::QuantityKind;

use crate::error::RuleError;

/// The name of the unit that counts events (1 per event).
pub const EVENTS_UNIT: &str = "events";

/// Longest custom unit name; the same limit as a custom quantity's name in the protocol.
const CUSTOM_NAME_BYTES_MAX: usize = wire::limits::NAME_BYTES_MAX;

/// What a rule prices. In JSON it is its name: `"input_tokens"`, `"events"`, `"images"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Unit {
    /// A well-known quantity of the event.
    Quantity(QuantityKind),
    /// A custom quantity of the event, by name (1 to 64 bytes of a-z, 0-9 and _, not a
    /// well-known name and not `events`).
    Custom(String),
    /// One per event.
    Events,
}

/// A borrowed [`Unit`], for look-ups that must not allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitRef<'a> {
    Quantity(QuantityKind),
    Custom(&'a str),
    Events,
}

impl Unit {
    /// The unit with this name; a name that is neither `events` nor well known is a custom
    /// quantity and must be a valid quantity name.
    pub fn from_name(name: &str) -> Result<Unit, RuleError> {
        match UnitRef::from_name(name) {
            UnitRef::Quantity(kind) => Ok(Unit::Quantity(kind)),
            UnitRef::Events => Ok(Unit::Events),
            UnitRef::Custom(custom) if is_custom_name(custom) => Ok(Unit::Custom(custom.to_owned())),
            UnitRef::Custom(custom) => Err(RuleError::InvalidUnit { name: custom.to_owned() }),
        }
    }

    /// The unit's name, as in JSON and in storage.
    pub fn name(&self) -> &str {
        match self {
            Unit::Quantity(kind) => kind.as_str(),
            Unit::Custom(name) => name,
            Unit::Events => EVENTS_UNIT,
        }
    }

    /// The borrowed form, for [`crate::PriceBook::winning_rule`].
    pub fn as_unit_ref(&self) -> UnitRef<'_> {
        match self {
            Unit::Quantity(kind) => UnitRef::Quantity(*kind),
            Unit::Custom(name) => UnitRef::Custom(name),
            Unit::Events => UnitRef::Events,
        }
    }
}

impl<'a> UnitRef<'a> {
    /// The unit with this name, without validation: an invalid custom name simply matches no rule.
    /// Useful for rollup columns and custom-quantity keys.
    pub fn from_name(name: &'a str) -> UnitRef<'a> {
        if name == EVENTS_UNIT {
            UnitRef::Events
        } else if let Some(kind) = QuantityKind::from_name(name) {
            UnitRef::Quantity(kind)
        } else {
            UnitRef::Custom(name)
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

impl TryFrom<String> for Unit {
    type Error = RuleError;

    fn try_from(name: String) -> Result<Unit, RuleError> {
        Unit::from_name(&name)
    }
}

impl From<Unit> for String {
    fn from(unit: Unit) -> String {
        match unit {
            Unit::Custom(name) => name,
            other => other.name().to_owned(),
        }
    }
}

fn is_custom_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= CUSTOM_NAME_BYTES_MAX
        && name.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_their_names_in_json() {
        let units = [
            (Unit::Quantity(QuantityKind::InputTokens), "\"input_tokens\""),
            (Unit::Quantity(QuantityKind::DurationMs), "\"duration_ms\""),
            (Unit::Custom("images".to_owned()), "\"images\""),
            (Unit::Events, "\"events\""),
        ];
        for (unit, json) in units {
            assert_eq!(serde_json::to_string(&unit).expect("serialize"), json);
            assert_eq!(serde_json::from_str::<Unit>(json).expect("deserialize"), unit);
        }
    }

    #[test]
    fn every_well_known_quantity_is_a_unit() {
        for kind in QuantityKind::ALL {
            assert_eq!(Unit::from_name(kind.as_str()).expect("well known"), Unit::Quantity(kind));
        }
    }

    #[test]
    fn invalid_custom_names_are_refused() {
        for name in ["", "Images", "page count", "ü", &"x".repeat(65)] {
            let error = Unit::from_name(name).expect_err("invalid name");
            assert!(matches!(error, RuleError::InvalidUnit { .. }), "{name:?}: {error}");
        }
        assert!(serde_json::from_str::<Unit>("\"Bad Name\"").is_err());
        assert_eq!(Unit::from_name(&"x".repeat(64)).expect("64 bytes").name().len(), 64);
    }

    #[test]
    fn borrowed_units_match_owned_ones() {
        let custom = Unit::Custom("images".to_owned());
        assert_eq!(custom.as_unit_ref(), UnitRef::from_name("images"));
        assert_eq!(Unit::Events.as_unit_ref(), UnitRef::from_name("events"));
        assert_eq!(UnitRef::from_name("pages"), UnitRef::Quantity(QuantityKind::Pages));
    }
}
