use std::collections::BTreeMap;
use std::str::FromStr;

use wire::{Event, QuantityKind};

use super::*;
use crate::{PriceRule, RuleSource, Tier, Unit, UnitRef};

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).expect("decimal literal")
}

fn rule(id: u128, unit: QuantityKind, method: Method, minimum: Option<&str>) -> PriceRule {
    PriceRule {
        id: Uuid::from_u128(id),
        service_type: "document_processor".to_owned(),
        service_provider: None,
        model: None,
        event_type: None,
        unit: Unit::Quantity(unit),
        method,
        minimum_charge: minimum.map(dec),
        effective_from_us: 0,
        effective_until_us: None,
        source: RuleSource::Tenant,
    }
}

/// 0 < pages <= 1000 at 0.01, above 1000 at 0.005.
fn page_tiers() -> Vec<Tier> {
    vec![Tier { up_to: Some(dec("1000")), rate: dec("0.01") }, Tier { up_to: None, rate: dec("0.005") }]
}

/// Rule 1: characters per unit at 0.00001, minimum 5. Rule 2: pages graduated, minimum 20.
/// Rule 3: bytes volume, no minimum.
fn book() -> PriceBook {
    PriceBook::new(vec![
        rule(1, QuantityKind::Characters, Method::PerUnit { rate: dec("0.00001") }, Some("5")),
        rule(2, QuantityKind::Pages, Method::Graduated { tiers: page_tiers() }, Some("20")),
        rule(3, QuantityKind::Bytes, Method::Volume { tiers: page_tiers() }, None),
    ])
    .expect("book")
}

fn usage(rule_id: u128, units: &str, per_event_cost: &str) -> RuledUsage {
    RuledUsage { rule_id: Uuid::from_u128(rule_id), units: dec(units), per_event_cost: dec(per_event_cost) }
}

#[test]
fn a_bill_adds_stored_costs_tiered_charges_and_minimum_top_ups() {
    let bill = book()
        .bill_period(&[
            usage(1, "300000", "3.00"),
            usage(2, "1000", "0"),
            usage(2, "500", "0"),
            usage(3, "1500", "0"),
        ])
        .expect("bill");
    let line = |id: u128| bill.lines.iter().find(|line| line.rule_id == Uuid::from_u128(id)).expect("line");
    // Rule 1: the stored 3.00, below the minimum 5: top-up 2.00
    assert_eq!((line(1).charge, line(1).minimum_top_up), (dec("3.00"), dec("2.00")));
    // Rule 2: 1000 + 500 = 1500 pages, graduated over the period (not per entry):
    // 1000 × 0.01 + 500 × 0.005 = 10 + 2.5 = 12.5; below 20: top-up 7.5
    assert_eq!(
        (line(2).units, line(2).charge, line(2).minimum_top_up),
        (dec("1500"), dec("12.5"), dec("7.5"))
    );
    // Rule 3: volume, 1500 is above 1000: 1500 × 0.005 = 7.5, no minimum
    assert_eq!((line(3).charge, line(3).minimum_top_up), (dec("7.5"), Decimal::ZERO));
    // 3.00 + 2.00 + 12.5 + 7.5 + 7.5 = 32.5
    assert_eq!(bill.total, dec("32.5"));
    let lines = bill.lines.iter().map(|line| line.rule_id.as_u128()).collect::<Vec<_>>();
    assert_eq!(lines, vec![1, 2, 3]);
}

#[test]
fn minimums_below_at_and_above() {
    let book = book();
    let top_up = |cost: &str| book.bill_period(&[usage(1, "1", cost)]).expect("bill").lines[0].minimum_top_up;
    // 4.99 is below 5: top-up 0.01
    assert_eq!(top_up("4.99"), dec("0.01"));
    // exactly 5: none
    assert_eq!(top_up("5"), Decimal::ZERO);
    // 5.01 is above: none
    assert_eq!(top_up("5.01"), Decimal::ZERO);
}

#[test]
fn an_empty_period_is_an_empty_bill() {
    assert_eq!(book().bill_period(&[]).expect("bill"), Bill::default());
}

#[test]
fn usage_of_an_unknown_rule_is_refused() {
    let error = book().bill_period(&[usage(9, "1", "1")]).expect_err("unknown rule");
    assert_eq!(error, PricingError::UnknownRule { rule_id: Uuid::from_u128(9) });
}

/// The query service's side, simulated: events are priced at ingest and their costs stored; the
/// bill is computed from the units per winning rule, found again with `winning_rule`.
#[test]
fn the_bill_agrees_with_stored_event_costs() {
    let book = book();
    let events = (1..=40).map(|index| {
        Event::new("user", "document_processor", "acme", "processing")
            .with_quantity(QuantityKind::Characters, f64::from(index) * 1234.5)
            .with_quantity(QuantityKind::Pages, f64::from(index))
    });
    let mut stored_total = Decimal::ZERO;
    let mut by_rule: BTreeMap<Uuid, RuledUsage> = BTreeMap::new();
    for event in events {
        let price = book.price_event(&event).expect("in range");
        stored_total += price.cost.expect("priced");
        for (kind, value) in event.quantities.iter().map(|quantity| (quantity.kind, quantity.value)) {
            let unit = UnitRef::Quantity(kind);
            let winner = book
                .winning_rule("document_processor", "acme", None, "processing", unit, event.timestamp_us)
                .expect("winner");
            let entry = by_rule.entry(winner.id).or_insert_with(|| usage(winner.id.as_u128(), "0", "0"));
            entry.units += crate::quantity_decimal(value);
        }
        for (rule_id, cost) in price.rule_costs {
            by_rule.get_mut(&rule_id).expect("rule seen").per_event_cost += cost;
        }
    }
    let usage = by_rule.into_values().collect::<Vec<_>>();
    let bill = book.bill_period(&usage).expect("bill");
    let characters = &bill.lines[0];
    // Per-event charges in the bill are exactly the stored event costs: pages cost nothing per event.
    assert_eq!(characters.charge, stored_total);
    // characters: 1234.5 × (1 + ... + 40) = 1234.5 × 820 = 1012290 × 0.00001 = 10.1229
    assert_eq!(characters.units, dec("1012290"));
    assert_eq!(characters.charge, dec("10.1229"));
    // pages: 820 in the period, graduated: 820 × 0.01 = 8.2 (per event each is under 1000 anyway);
    // below the minimum 20: top-up 11.8
    assert_eq!((bill.lines[1].units, bill.lines[1].charge), (dec("820"), dec("8.2")));
    assert_eq!(bill.lines[1].minimum_top_up, dec("11.8"));
    // characters' 10.1229 is above their minimum 5: no top-up. Total: 10.1229 + 8.2 + 11.8 = 30.1229
    assert_eq!(characters.minimum_top_up, Decimal::ZERO);
    assert_eq!(bill.total, dec("30.1229"));
}
