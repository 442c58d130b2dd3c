use std::str::FromStr;

use wire::{Event, QuantityKind};

use super::*;
use crate::{MICROS_PER_HOUR, Method, Tier};

const HOUR: i64 = MICROS_PER_HOUR;
/// 2026-11-01T00:00:00Z.
const NOV_2026_US: i64 = 1_793_491_200_000_000;

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).expect("decimal literal")
}

/// A tenant rule for `llm_service` input tokens at `rate`, effective from the epoch.
fn rule(id: u128, rate: &str) -> PriceRule {
    PriceRule {
        id: Uuid::from_u128(id),
        service_type: "llm_service".to_owned(),
        service_provider: None,
        model: None,
        event_type: None,
        unit: Unit::Quantity(QuantityKind::InputTokens),
        method: Method::PerUnit { rate: dec(rate) },
        minimum_charge: None,
        effective_from_us: 0,
        effective_until_us: None,
        source: RuleSource::Tenant,
    }
}

fn provider(mut rule: PriceRule, provider: &str) -> PriceRule {
    rule.service_provider = Some(provider.to_owned());
    rule
}

fn model(mut rule: PriceRule, model: &str) -> PriceRule {
    rule.model = Some(model.to_owned());
    rule
}

fn event(provider: &str, model: Option<&str>, input_tokens: f64) -> Event {
    let event = Event::new("user", "llm_service", provider, "completion")
        .at(NOV_2026_US)
        .with_quantity(QuantityKind::InputTokens, input_tokens);
    match model {
        Some(model) => event.with_model(model),
        None => event,
    }
}

fn book(rules: Vec<PriceRule>) -> PriceBook {
    PriceBook::new(rules).expect("valid book")
}

#[test]
fn model_beats_provider_beats_service() {
    let book = book(vec![
        rule(1, "1"),
        provider(rule(2, "2"), "openai"),
        model(provider(rule(3, "3"), "openai"), "gpt-4o"),
        model(rule(4, "4"), "gpt-4.1"),
    ]);
    // 10 tokens × 3 (the gpt-4o rule) = 30
    let price = book.price_event(&event("openai", Some("gpt-4o"), 10.0)).expect("in range");
    assert_eq!((price.cost, price.rule_ids), (Some(dec("30")), vec![Uuid::from_u128(3)]));
    // a model rule without a provider still beats the provider rule: 10 × 4 = 40
    assert_eq!(
        book.price_event(&event("openai", Some("gpt-4.1"), 10.0)).expect("in range").cost,
        Some(dec("40"))
    );
    // another openai model gets the provider rule: 10 × 2 = 20
    assert_eq!(
        book.price_event(&event("openai", Some("gpt-4o-mini"), 10.0)).expect("in range").cost,
        Some(dec("20"))
    );
    // another provider gets the service rule: 10 × 1 = 10
    assert_eq!(
        book.price_event(&event("anthropic", Some("gpt-4o"), 10.0)).expect("in range").cost,
        Some(dec("10"))
    );
}

#[test]
fn event_type_is_more_specific_than_provider() {
    let mut by_event_type = rule(1, "5");
    by_event_type.event_type = Some("completion".to_owned());
    let book = book(vec![by_event_type, provider(rule(2, "7"), "openai")]);
    // (model no, event type yes, provider no) beats (no, no, yes): 2 × 5 = 10
    assert_eq!(book.price_event(&event("openai", None, 2.0)).expect("in range").cost, Some(dec("10")));
    let embedding = Event::new("user", "llm_service", "openai", "embedding")
        .with_quantity(QuantityKind::InputTokens, 2.0);
    // 2 × 7 = 14
    assert_eq!(book.price_event(&embedding).expect("in range").cost, Some(dec("14")));
}

#[test]
fn tenant_beats_catalog_at_equal_specificity_only() {
    let mut catalog = model(provider(rule(1, "3"), "openai"), "gpt-4o");
    catalog.source = RuleSource::Catalog;
    let tenant = model(provider(rule(2, "2"), "openai"), "gpt-4o");
    let tenant_provider_wide = provider(rule(3, "1"), "openai");
    let book = book(vec![catalog.clone(), tenant]);
    // 10 × 2 (tenant) = 20
    assert_eq!(
        book.price_event(&event("openai", Some("gpt-4o"), 10.0)).expect("in range").cost,
        Some(dec("20"))
    );
    // Specificity comes first: the catalog's model rule beats a tenant's provider-wide rule.
    let book = PriceBook::new(vec![catalog, tenant_provider_wide]).expect("book");
    // 10 × 3 (catalog gpt-4o) = 30
    assert_eq!(
        book.price_event(&event("openai", Some("gpt-4o"), 10.0)).expect("in range").cost,
        Some(dec("30"))
    );
}

#[test]
fn a_model_rule_never_prices_another_model_or_none() {
    let book = book(vec![model(rule(1, "3"), "gpt-4o")]);
    assert_eq!(
        book.price_event(&event("openai", Some("gpt-4o-mini"), 10.0)).expect("in range"),
        EventPrice::default()
    );
    assert_eq!(book.price_event(&event("openai", None, 10.0)).expect("in range").cost, None);
    assert_eq!(book.price_event(&event("openai", Some(""), 10.0)).expect("in range").cost, None);
    let other_service = Event::new("user", "document_processor", "openai", "completion")
        .with_model("gpt-4o")
        .with_quantity(QuantityKind::InputTokens, 10.0);
    assert_eq!(book.price_event(&other_service).expect("in range").cost, None);
}

#[test]
fn an_event_with_no_matching_unit_is_unpriced() {
    let book = book(vec![rule(1, "1")]);
    let only_output = Event::new("user", "llm_service", "openai", "completion")
        .with_quantity(QuantityKind::OutputTokens, 10.0);
    let price = book.price_event(&only_output).expect("in range");
    assert_eq!(price.cost, None);
    assert!(price.rule_ids.is_empty());
}

#[test]
fn effective_ranges_switch_versions_on_the_hour() {
    let switch_us = NOV_2026_US + 5 * HOUR;
    let mut old = rule(1, "1");
    old.effective_until_us = Some(switch_us);
    let mut new = rule(2, "2");
    new.effective_from_us = switch_us;
    let mut later_open = rule(3, "4");
    later_open.effective_from_us = switch_us + 24 * HOUR;
    let book = book(vec![old, new, later_open]);
    let at =
        |timestamp_us| book.price_event(&event("openai", None, 1.0).at(timestamp_us)).expect("in range").cost;
    // until is exclusive, from inclusive: the last microsecond before the switch is the old
    // version (1 × 1), the switch itself is the new one (1 × 2)
    assert_eq!(at(switch_us - 1), Some(dec("1")));
    assert_eq!(at(switch_us), Some(dec("2")));
    // two open-ended rules overlap after the later one starts: the later effective_from wins
    assert_eq!(at(switch_us + 24 * HOUR - 1), Some(dec("2")));
    assert_eq!(at(switch_us + 24 * HOUR), Some(dec("4")));
    // before any rule is effective nothing matches
    let mut future = rule(4, "1");
    future.effective_from_us = switch_us;
    let book = PriceBook::new(vec![future]).expect("book");
    assert_eq!(book.price_event(&event("openai", None, 1.0).at(switch_us - 1)).expect("in range").cost, None);
}

#[test]
fn rules_that_tie_are_refused_naming_both() {
    let first = model(rule(1, "1"), "gpt-4o");
    let second = model(rule(2, "2"), "gpt-4o");
    let error = PriceBook::new(vec![first.clone(), second.clone()]).expect_err("ambiguous");
    assert_eq!(error, PricingError::AmbiguousRules { first: Uuid::from_u128(1), second: Uuid::from_u128(2) });
    let message = error.to_string();
    assert!(message.contains("00000000-0000-0000-0000-000000000001"), "{message}");
    assert!(message.contains("00000000-0000-0000-0000-000000000002"), "{message}");
    // The same match fields with another source, start, model or unit do not tie.
    let other_source = PriceRule { source: RuleSource::Catalog, ..second.clone() };
    let later = PriceRule { effective_from_us: HOUR, ..second.clone() };
    let other_model = model(rule(2, "2"), "gpt-4.1");
    let other_unit = PriceRule { unit: Unit::Quantity(QuantityKind::OutputTokens), ..second.clone() };
    for second in [other_source, later, other_model, other_unit] {
        PriceBook::new(vec![first.clone(), second]).expect("no tie");
    }
    // Tying rules need not be given next to each other: the anthropic rule between the two openai
    // rules does not hide their tie.
    let rules = vec![
        provider(rule(5, "1"), "openai"),
        provider(rule(6, "1"), "anthropic"),
        provider(rule(7, "2"), "openai"),
    ];
    assert_eq!(
        PriceBook::new(rules).expect_err("ambiguous"),
        PricingError::AmbiguousRules { first: Uuid::from_u128(5), second: Uuid::from_u128(7) }
    );
}

#[test]
fn invalid_and_duplicate_rules_are_refused() {
    let error = PriceBook::new(vec![rule(1, "1"), rule(1, "2")]).expect_err("duplicate id");
    assert_eq!(error, PricingError::DuplicateRuleId { rule_id: Uuid::from_u128(1) });
    let mut off_hour = rule(2, "1");
    off_hour.effective_from_us = 1;
    assert!(matches!(PriceBook::new(vec![off_hour]), Err(PricingError::InvalidRule { .. })));
}

#[test]
fn custom_quantities_and_events_are_units() {
    let images = PriceRule { unit: Unit::Custom("images".to_owned()), ..rule(1, "0.04") };
    let per_call = PriceRule { unit: Unit::Events, ..rule(2, "0.001") };
    let book = book(vec![images, per_call]);
    let event = Event::new("user", "llm_service", "openai", "image").with_custom_quantity("images", 3.0);
    let price = book.price_event(&event).expect("in range");
    // 3 images × 0.04 + 1 event × 0.001 = 0.12 + 0.001 = 0.121
    assert_eq!(price.cost, Some(dec("0.121")));
    assert_eq!(price.rule_ids, vec![Uuid::from_u128(1), Uuid::from_u128(2)]);
    assert_eq!(price.rule_costs, vec![(Uuid::from_u128(1), dec("0.12")), (Uuid::from_u128(2), dec("0.001"))]);
    // An event with no quantities at all still pays per event: 1 × 0.001
    let bare = Event::new("user", "llm_service", "openai", "ping");
    assert_eq!(book.price_event(&bare).expect("in range").cost, Some(dec("0.001")));
    // A custom quantity without a rule adds nothing
    let other = Event::new("user", "llm_service", "openai", "image").with_custom_quantity("videos", 3.0);
    assert_eq!(book.price_event(&other).expect("in range").rule_ids, vec![Uuid::from_u128(2)]);
}

#[test]
fn decimal_arithmetic_is_exact() {
    let a = PriceRule { unit: Unit::Custom("a".to_owned()), ..rule(1, "1") };
    let b = PriceRule { unit: Unit::Custom("b".to_owned()), ..rule(2, "1") };
    let book = book(vec![a, b, rule(3, "0.1")]);
    let event = Event::new("user", "llm_service", "openai", "x")
        .with_quantity(QuantityKind::InputTokens, 3.0)
        .with_custom_quantity("a", 0.1)
        .with_custom_quantity("b", 0.2);
    // 3 × 0.1 + 0.1 × 1 + 0.2 × 1 = 0.3 + 0.1 + 0.2 = 0.6 exactly (0.30000000000000004 + ... in f64)
    let cost = book.price_event(&event).expect("in range").cost.expect("priced");
    assert_eq!(cost, dec("0.6"));
    assert_eq!(cost.to_string(), "0.6");
}

#[test]
fn each_part_is_rounded_to_twelve_places_bankers_way() {
    let book = book(vec![rule(1, "0.0000000000005")]);
    // 1 × 0.0000000000005 = 5e-13: halfway, rounds to the even 0e-12
    assert_eq!(book.price_event(&event("openai", None, 1.0)).expect("in range").cost, Some(Decimal::ZERO));
    // 3 × 0.0000000000005 = 1.5e-12: halfway, rounds to the even 2e-12
    assert_eq!(
        book.price_event(&event("openai", None, 3.0)).expect("in range").cost,
        Some(dec("0.000000000002"))
    );
    // 5 × 0.0000000000005 = 2.5e-12: halfway, rounds to the even 2e-12
    assert_eq!(
        book.price_event(&event("openai", None, 5.0)).expect("in range").cost,
        Some(dec("0.000000000002"))
    );
}

#[test]
fn period_rules_record_units_and_add_nothing_per_event() {
    let tiers =
        vec![Tier { up_to: Some(dec("100")), rate: dec("1") }, Tier { up_to: None, rate: dec("0.5") }];
    let graduated = PriceRule { method: Method::Graduated { tiers }, ..rule(1, "0") };
    let book = book(vec![graduated]);
    let price = book.price_event(&event("openai", None, 2.5)).expect("in range");
    // priced (a rule matched) but nothing per event: Some(0)
    assert_eq!(price.cost, Some(Decimal::ZERO));
    assert_eq!(price.rule_ids, vec![Uuid::from_u128(1)]);
    assert_eq!(price.period_units, vec![(Uuid::from_u128(1), dec("2.5"))]);
    assert!(price.rule_costs.is_empty());
}

#[test]
fn package_rules_price_each_event_on_its_own() {
    let package =
        PriceRule { method: Method::Package { size: dec("1000"), price: dec("0.02") }, ..rule(1, "0") };
    let book = book(vec![package]);
    // ceil(1500 / 1000) = 2 packages × 0.02 = 0.04
    assert_eq!(book.price_event(&event("openai", None, 1500.0)).expect("in range").cost, Some(dec("0.04")));
    // 0 units: 0 packages, but the event is priced
    assert_eq!(book.price_event(&event("openai", None, 0.0)).expect("in range").cost, Some(Decimal::ZERO));
}

#[test]
fn winning_rule_serves_rollup_rows() {
    let book = book(vec![rule(1, "1"), model(rule(2, "2"), "gpt-4o")]);
    let input = UnitRef::Quantity(QuantityKind::InputTokens);
    let winner = |model| book.winning_rule("llm_service", "openai", model, "completion", input, NOV_2026_US);
    assert_eq!(winner(Some("gpt-4o")).map(|rule| rule.id), Some(Uuid::from_u128(2)));
    // rollups store "no model" as an empty string
    assert_eq!(winner(Some("")).map(|rule| rule.id), Some(Uuid::from_u128(1)));
    assert_eq!(winner(None).map(|rule| rule.id), Some(Uuid::from_u128(1)));
    let output = UnitRef::from_name("output_tokens");
    assert!(book.winning_rule("llm_service", "openai", None, "completion", output, NOV_2026_US).is_none());
    assert!(book.winning_rule("other", "openai", None, "completion", input, NOV_2026_US).is_none());
}

#[test]
fn pricing_into_a_reused_price_keeps_its_capacity() {
    let book = book(vec![rule(1, "1"), PriceRule { unit: Unit::Events, ..rule(2, "1") }]);
    let mut price = EventPrice::default();
    book.price_event_into(&event("openai", None, 1.0), &mut price).expect("in range");
    let capacity = (price.rule_ids.capacity(), price.rule_costs.capacity());
    for tokens in 0..100 {
        book.price_event_into(&event("openai", None, f64::from(tokens)), &mut price).expect("in range");
        // tokens × 1 + 1 event × 1
        assert_eq!(price.cost, Some(Decimal::from(tokens + 1)));
    }
    assert_eq!((price.rule_ids.capacity(), price.rule_costs.capacity()), capacity);
    book.price_event_into(&Event::new("u", "unknown", "p", "e"), &mut price).expect("in range");
    assert_eq!(price.cost, None);
    assert!(price.rule_ids.is_empty() && price.rule_costs.is_empty());
}

/// The hostile-tenant probe's rule: a package of 1e-8 units at 1e6 each. Refused as a rule, and
/// even the largest valid package rule prices a 2^53-token event as an error of that event alone,
/// never as a saturated, wrapped or zero cost.
#[test]
fn absurd_packages_are_refused_and_huge_costs_fail_alone() {
    let tiny = Method::Package { size: dec("0.00000001"), price: dec("1000000") };
    assert!(matches!(tiny.validate(), Err(crate::RuleError::PackageSizeOutOfRange { .. })), "{tiny:?}");
    let sub_atomic = Method::Package { size: dec("0.0000000000000000000000000001"), price: dec("1") };
    assert!(sub_atomic.validate().is_err());

    let mut largest = rule(1, "1");
    largest.method = Method::Package { size: crate::PACKAGE_SIZE_MIN, price: crate::PRICE_MAX };
    let book = book(vec![largest]);
    let huge = event("openai", None, 9_007_199_254_740_992.0);
    assert_eq!(
        book.price_event(&huge),
        Err(EventPriceError::CostTooLarge { rule_id: Uuid::from_u128(1), max: EVENT_COST_MAX })
    );
    // The same book prices a small event exactly: one package of 0.000001 at the highest price.
    assert_eq!(
        book.price_event(&event("openai", None, 0.000001)).expect("in range").cost,
        Some(dec("1000000"))
    );
}

#[test]
fn the_event_cost_bound_holds_for_the_sum_of_parts() {
    let mut output = rule(2, "1000000");
    output.unit = Unit::Quantity(QuantityKind::OutputTokens);
    let book = book(vec![rule(1, "1000000"), output]);
    // Each part is 6e11, under the bound; together 1.2e12, over it.
    let event = event("openai", None, 600_000.0).with_quantity(QuantityKind::OutputTokens, 600_000.0);
    assert!(
        matches!(book.price_event(&event), Err(EventPriceError::CostTooLarge { rule_id, .. }) if rule_id == Uuid::from_u128(2))
    );
    let fine = self::event("openai", None, 500_000.0).with_quantity(QuantityKind::OutputTokens, 500_000.0);
    assert_eq!(book.price_event(&fine).expect("in range").cost, Some(EVENT_COST_MAX));
}

#[test]
fn tier_bounds_are_limited() {
    let tiers = vec![
        Tier { up_to: Some(dec("100000000000000000")), rate: Decimal::ONE },
        Tier { up_to: None, rate: Decimal::ONE },
    ];
    assert!(Method::Graduated { tiers }.validate().is_err());
}

#[test]
fn a_lenient_book_leaves_out_what_a_strict_one_refuses() {
    let mut invalid = rule(4, "1");
    invalid.method = Method::Package { size: dec("0.00000001"), price: dec("1") };
    let rules = vec![rule(1, "1"), rule(2, "2"), invalid, rule(2, "9")];
    assert!(PriceBook::new(rules.clone()).is_err());
    let book = PriceBook::lenient(rules);
    // The tie of 1 and 2 goes to the greater id; the invalid rule and the repeated id are left out.
    assert_eq!(book.price_event(&event("openai", None, 10.0)).expect("in range").cost, Some(dec("20")));
    assert_eq!(book.problems().len(), 3, "{:?}", book.problems());
    assert!(book.rule(Uuid::from_u128(4)).is_none());
}
