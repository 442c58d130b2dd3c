//! The built-in catalog: list prices of common LLM models, versioned, overridden by tenant rules.
//!
//! The data is `pricing/catalog/llm.json`, embedded at build time:
//! `{"version": "2026-11-01", "currency": "USD", "note": "...", "rules": [...]}`. Each rule is a
//! [`crate::PriceRuleSpec`] with a fixed `id`: per-token `per_unit` prices of input, cached input,
//! output and (where the provider reports them) reasoning tokens, as each provider listed them on
//! the version date. Catalog rules are effective from the epoch and have [`RuleSource::Catalog`],
//! so a tenant's rule of the same specificity always beats them. A new price list is a new file
//! version with new ids; ids never change meaning.

use std::sync::LazyLock;

use serde::Deserialize;
use uuid::Uuid;

use crate::rule::{PriceRule, PriceRuleSpec, RuleSource};

/// The catalog file, as embedded.
pub const CATALOG_JSON: &str = include_str!("../catalog/llm.json");

/// The parsed catalog.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// The date the prices were taken, e.g. `2026-11-01`.
    pub version: String,
    /// ISO 4217 code of every price in the catalog.
    pub currency: String,
    pub rules: Vec<PriceRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    version: String,
    currency: String,
    #[serde(rename = "note")]
    _note: String,
    rules: Vec<CatalogEntry>,
}

#[derive(Deserialize)]
struct CatalogEntry {
    id: Uuid,
    #[serde(flatten)]
    spec: PriceRuleSpec,
}

static CATALOG: LazyLock<Catalog> = LazyLock::new(|| parse(CATALOG_JSON));

/// The embedded catalog, parsed and validated once.
pub fn catalog() -> &'static Catalog {
    &CATALOG
}

/// The catalog's rules, to add to a tenant's own when building a [`crate::PriceBook`].
pub fn catalog_rules() -> Vec<PriceRule> {
    CATALOG.rules.clone()
}

/// Parses a catalog file. The embedded file is checked by the tests, so a failure here is a bug
/// in the file, found before release.
fn parse(json: &str) -> Catalog {
    let file: CatalogFile = serde_json::from_str(json).expect("catalog/llm.json is valid");
    let rules = file
        .rules
        .into_iter()
        .map(|entry| entry.spec.into_rule(entry.id, RuleSource::Catalog, 0).expect("catalog rules are valid"))
        .collect();
    Catalog { version: file.version, currency: file.currency, rules }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use rust_decimal::Decimal;
    use wire::{Event, QuantityKind};

    use super::*;
    use crate::{Method, PriceBook, Unit};

    fn dec(text: &str) -> Decimal {
        Decimal::from_str(text).expect("decimal literal")
    }

    #[test]
    fn the_catalog_loads_and_builds_a_book() {
        let catalog = catalog();
        assert_eq!(catalog.version, "2026-11-01");
        assert_eq!(catalog.currency, "USD");
        assert_eq!(catalog.rules.len(), 37);
        assert!(
            catalog
                .rules
                .iter()
                .all(|rule| rule.source == RuleSource::Catalog && rule.effective_from_us == 0)
        );
        assert!(catalog.rules.iter().all(|rule| rule.method.is_per_event() && rule.model.is_some()));
        PriceBook::new(catalog_rules()).expect("the catalog is unambiguous");
    }

    #[test]
    fn catalog_ids_are_fixed() {
        let rule = catalog().rules.iter().find(|rule| {
            rule.model.as_deref() == Some("gpt-4o") && rule.unit == Unit::Quantity(QuantityKind::InputTokens)
        });
        let rule = rule.expect("gpt-4o input");
        assert_eq!(rule.id, Uuid::from_str("4262d5e2-4fe4-5a19-9d49-0e060f371eaa").expect("uuid"));
        assert_eq!(rule.method, Method::PerUnit { rate: dec("0.0000025") });
    }

    #[test]
    fn the_catalog_prices_a_gpt_4o_mini_event() {
        let book = PriceBook::new(catalog_rules()).expect("book");
        let event = Event::new("user", "llm_service", "openai", "completion")
            .with_model("gpt-4o-mini")
            .with_quantity(QuantityKind::InputTokens, 1_000.0)
            .with_quantity(QuantityKind::OutputTokens, 500.0)
            .with_quantity(QuantityKind::CachedInputTokens, 2_000.0);
        let price = book.price_event(&event).expect("in range");
        // input:  1000 × 0.00000015  = 0.00015   ($0.15 per 1M)
        // output:  500 × 0.0000006   = 0.0003    ($0.60 per 1M)
        // cached: 2000 × 0.000000075 = 0.00015   ($0.075 per 1M)
        // total: 0.00015 + 0.0003 + 0.00015 = 0.0006
        assert_eq!(price.cost, Some(dec("0.0006")));
        assert_eq!(price.rule_ids.len(), 3);
        assert!(price.period_units.is_empty());
    }

    #[test]
    fn the_catalog_does_not_price_unknown_models_or_providers() {
        let book = PriceBook::new(catalog_rules()).expect("book");
        let unknown = Event::new("user", "llm_service", "openai", "completion")
            .with_model("gpt-5-imaginary")
            .with_quantity(QuantityKind::InputTokens, 1_000.0);
        assert_eq!(book.price_event(&unknown).expect("in range").cost, None);
        let wrong_provider = Event::new("user", "llm_service", "azure", "completion")
            .with_model("gpt-4o")
            .with_quantity(QuantityKind::InputTokens, 1_000.0);
        assert_eq!(book.price_event(&wrong_provider).expect("in range").cost, None);
    }
}
