//! A tenant's price book from its stored rules: the one construction the edge (pricing at ingest,
//! re-rating) and the query service (billing summaries) share, so both price with the same book.

use uuid::Uuid;

use crate::book::PriceBook;
use crate::error::PricingError;
use crate::rule::{PriceRule, PriceRuleSpec, RuleSource};

/// A tenant's rule as the `price_rules` table holds it: the definition as the admin API accepted
/// it ([`PriceRuleSpec`] JSON) and the stored effective bounds, which win over the definition's.
#[derive(Debug, Clone, Copy)]
pub struct StoredRule<'a> {
    pub id: Uuid,
    pub definition: &'a serde_json::Value,
    pub effective_from_us: i64,
    pub effective_until_us: Option<i64>,
    /// Deleted through the API: applies only within its bounds, and not at all without an end.
    pub retired: bool,
}

/// Why a stored rule could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoredRuleError {
    #[error("price rule {rule_id} is unreadable: {detail}")]
    Unreadable { rule_id: Uuid, detail: String },
    #[error(transparent)]
    Pricing(#[from] PricingError),
}

impl StoredRule<'_> {
    /// The rule as the pricing model's, a tenant rule with the stored bounds.
    pub fn to_rule(&self) -> Result<PriceRule, StoredRuleError> {
        let spec: PriceRuleSpec = serde_json::from_value(self.definition.clone())
            .map_err(|error| StoredRuleError::Unreadable { rule_id: self.id, detail: error.to_string() })?;
        let mut rule = spec.into_rule(self.id, RuleSource::Tenant, self.effective_from_us)?;
        rule.effective_from_us = self.effective_from_us;
        rule.effective_until_us = self.effective_until_us;
        rule.validate()?;
        Ok(rule)
    }

    /// Whether the rule never applies: retired without an end (deleted before it ended).
    pub fn is_void(&self) -> bool {
        self.retired && self.effective_until_us.is_none()
    }
}

/// A tenant's book: the catalog's rules, then the tenant's own (which win at equal specificity);
/// void rules are left out. Strict: any unreadable, invalid or ambiguous rule refuses the book.
/// For checking a change before it is stored.
pub fn tenant_price_book<'a>(
    catalog: &[PriceRule],
    stored: impl IntoIterator<Item = StoredRule<'a>>,
) -> Result<PriceBook, StoredRuleError> {
    let mut rules = catalog.to_vec();
    for rule in stored {
        if !rule.is_void() {
            rules.push(rule.to_rule()?);
        }
    }
    Ok(PriceBook::new(rules)?)
}

/// The book a tenant's stored rules give, always: whatever a tenant's admin stored (however it
/// arose), pricing and billing go on. Unreadable or invalid rules are left out, ties go to the
/// newer rule ([`PriceBook::lenient`]); the second value lists what was left out or decided, to
/// report it. Ingest and the billing summary both use this, so they price alike.
pub fn tenant_price_book_lenient<'a>(
    catalog: &[PriceRule],
    stored: impl IntoIterator<Item = StoredRule<'a>>,
) -> (PriceBook, Vec<String>) {
    let mut rules = catalog.to_vec();
    let mut problems = Vec::new();
    for rule in stored {
        if rule.is_void() {
            continue;
        }
        match rule.to_rule() {
            Ok(rule) => rules.push(rule),
            Err(error) => problems.push(error.to_string()),
        }
    }
    let book = PriceBook::lenient(rules);
    problems.extend(book.problems().iter().map(ToString::to_string));
    (book, problems)
}
