use std::str::FromStr;

use wire::QuantityKind;

use super::*;

const HOUR: i64 = MICROS_PER_HOUR;
/// 2026-11-01T00:00:00Z in microseconds since the epoch.
const NOV_2026_US: i64 = 1_793_491_200_000_000;

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).expect("decimal literal")
}

fn rule() -> PriceRule {
    PriceRule {
        id: Uuid::from_u128(1),
        service_type: "llm_service".to_owned(),
        service_provider: Some("openai".to_owned()),
        model: Some("gpt-4o".to_owned()),
        event_type: None,
        unit: Unit::Quantity(QuantityKind::InputTokens),
        method: Method::PerUnit { rate: dec("0.0000025") },
        minimum_charge: None,
        effective_from_us: 10 * HOUR,
        effective_until_us: Some(20 * HOUR),
        source: RuleSource::Tenant,
    }
}

fn problem(rule: &PriceRule) -> RuleError {
    match rule.validate() {
        Err(PricingError::InvalidRule { rule_id, problem }) => {
            assert_eq!(rule_id, rule.id);
            problem
        }
        other => panic!("expected an invalid rule, got {other:?}"),
    }
}

#[test]
fn effective_range_is_from_inclusive_until_exclusive() {
    let rule = rule();
    assert!(!rule.is_effective_at(10 * HOUR - 1));
    assert!(rule.is_effective_at(10 * HOUR));
    assert!(rule.is_effective_at(20 * HOUR - 1));
    assert!(!rule.is_effective_at(20 * HOUR));
    let open = PriceRule { effective_until_us: None, ..rule };
    assert!(open.is_effective_at(i64::MAX));
}

#[test]
fn a_model_rule_never_matches_another_model_or_none() {
    let rule = rule();
    let at = 10 * HOUR;
    assert!(rule.matches("openai", Some("gpt-4o"), "completion", at));
    assert!(!rule.matches("openai", Some("gpt-4o-mini"), "completion", at));
    assert!(!rule.matches("openai", None, "completion", at));
    assert!(!rule.matches("openai", Some(""), "completion", at));
    assert!(!rule.matches("azure", Some("gpt-4o"), "completion", at));
    let any_model = PriceRule { model: None, ..rule };
    assert!(any_model.matches("openai", None, "completion", at));
    assert!(any_model.matches("openai", Some("anything"), "completion", at));
}

#[test]
fn bounds_must_be_on_whole_hours_and_ordered() {
    let off_hour = PriceRule { effective_from_us: 10 * HOUR + 1, ..rule() };
    assert_eq!(problem(&off_hour), RuleError::NotOnHour { field: "effective_from", value_us: 10 * HOUR + 1 });
    let off_hour = PriceRule { effective_until_us: Some(20 * HOUR - 1_000_000), ..rule() };
    assert_eq!(
        problem(&off_hour),
        RuleError::NotOnHour { field: "effective_until", value_us: 20 * HOUR - 1_000_000 }
    );
    let empty = PriceRule { effective_until_us: Some(10 * HOUR), ..rule() };
    assert_eq!(problem(&empty), RuleError::EmptyEffectiveRange { from_us: 10 * HOUR, until_us: 10 * HOUR });
    let negative = PriceRule { effective_from_us: -HOUR, ..rule() };
    assert_eq!(problem(&negative), RuleError::OutOfRange { field: "effective_from", value_us: -HOUR });
    assert_eq!(rule().validate(), Ok(()));
}

#[test]
fn names_and_minimums_are_validated() {
    let empty_model = PriceRule { model: Some(String::new()), ..rule() };
    assert_eq!(problem(&empty_model), RuleError::EmptyField { field: "model" });
    let empty_service = PriceRule { service_type: String::new(), ..rule() };
    assert_eq!(problem(&empty_service), RuleError::EmptyField { field: "service_type" });
    let negative_minimum = PriceRule { minimum_charge: Some(dec("-1")), ..rule() };
    assert_eq!(
        problem(&negative_minimum),
        RuleError::NegativeAmount { field: "minimum_charge".to_owned(), value: dec("-1") }
    );
    let zero_package =
        PriceRule { method: Method::Package { size: Decimal::ZERO, price: Decimal::ONE }, ..rule() };
    assert_eq!(problem(&zero_package), RuleError::PackageSizeNotPositive { size: Decimal::ZERO });
    let message = zero_package.validate().expect_err("invalid").to_string();
    assert_eq!(
        message,
        "price rule 00000000-0000-0000-0000-000000000001: package size must be above 0, got 0"
    );
}

#[test]
fn the_admin_shape_becomes_a_rule() {
    let json = r#"{"service_type": "llm_service", "service_provider": "openai", "model": "gpt-4o",
        "unit": "input_tokens", "method": "per_unit", "rate": "0.0000025", "minimum_charge": null,
        "effective_from": "2026-11-01T00:00:00Z", "effective_until": null}"#;
    let spec: PriceRuleSpec = serde_json::from_str(json).expect("spec");
    let id = Uuid::from_u128(7);
    let rule = spec.clone().into_rule(id, RuleSource::Tenant, 0).expect("valid");
    assert_eq!(rule.id, id);
    assert_eq!(rule.unit, Unit::Quantity(QuantityKind::InputTokens));
    assert_eq!(rule.method, Method::PerUnit { rate: dec("0.0000025") });
    assert_eq!(rule.effective_from_us, NOV_2026_US);
    assert_eq!(rule.effective_until_us, None);
    assert_eq!(rule.event_type, None);
    assert_eq!(PriceRuleSpec::from_rule(&rule), spec);
}

#[test]
fn the_admin_shape_takes_numbers_offsets_and_a_default_start() {
    let json = r#"{"service_type": "document_processor", "unit": "pages", "method": "graduated",
        "tiers": [{"up_to": 1000, "rate": 0.01}, {"rate": "0.005"}], "minimum_charge": 5,
        "effective_until": "2026-11-01T02:00:00+01:00"}"#;
    let spec: PriceRuleSpec = serde_json::from_str(json).expect("spec");
    let rule = spec.into_rule(Uuid::from_u128(8), RuleSource::Tenant, 0).expect("valid");
    assert_eq!(rule.effective_from_us, 0);
    // 02:00 at +01:00 is 01:00 UTC
    assert_eq!(rule.effective_until_us, Some(NOV_2026_US + HOUR));
    assert_eq!(rule.minimum_charge, Some(dec("5")));
    let Method::Graduated { tiers } = &rule.method else { panic!("graduated expected") };
    assert_eq!(tiers[0].rate, dec("0.01"));
    assert_eq!(tiers[1].up_to, None);
}

#[test]
fn the_admin_shape_refuses_bad_times_and_unknown_method_fields() {
    let spec = |from: &str| {
        let json = format!(
            r#"{{"service_type": "x", "unit": "events", "method": "per_unit", "rate": "1",
                "effective_from": "{from}"}}"#
        );
        serde_json::from_str::<PriceRuleSpec>(&json).expect("spec")
    };
    let error =
        spec("2026-11-01T00:30:00Z").into_rule(Uuid::nil(), RuleSource::Tenant, 0).expect_err("off hour");
    assert!(error.to_string().contains("effective_from must be on a whole UTC hour"), "{error}");
    let error = spec("yesterday").into_rule(Uuid::nil(), RuleSource::Tenant, 0).expect_err("not a time");
    assert!(matches!(
        error,
        PricingError::InvalidRule {
            problem: RuleError::InvalidTimestamp { field: "effective_from", .. },
            ..
        }
    ));
    let default_off_hour = r#"{"service_type": "x", "unit": "events", "method": "per_unit", "rate": "1"}"#;
    let spec: PriceRuleSpec = serde_json::from_str(default_off_hour).expect("spec");
    assert!(spec.into_rule(Uuid::nil(), RuleSource::Tenant, 5).is_err());
    let typo =
        r#"{"service_type": "x", "unit": "events", "method": "per_unit", "rate": "1", "rate_per_unit": "1"}"#;
    assert!(serde_json::from_str::<PriceRuleSpec>(typo).is_err());
    let typo =
        r#"{"service_type": "x", "modle": "gpt-4o", "unit": "events", "method": "per_unit", "rate": "1"}"#;
    assert!(serde_json::from_str::<PriceRuleSpec>(typo).is_err());
}

#[test]
fn rules_round_trip_through_json() {
    let rule = PriceRule { minimum_charge: Some(dec("2.50")), ..rule() };
    let json = serde_json::to_value(&rule).expect("serialize");
    assert_eq!(json["method"], "per_unit");
    assert_eq!(json["rate"], "0.0000025");
    assert_eq!(json["unit"], "input_tokens");
    assert_eq!(json["source"], "tenant");
    assert_eq!(serde_json::from_value::<PriceRule>(json).expect("deserialize"), rule);
}
