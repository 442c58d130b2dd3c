use std::str::FromStr;

use proptest::prelude::*;

use super::*;

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).expect("decimal literal")
}

fn tier(up_to: Option<&str>, rate: &str) -> Tier {
    Tier { up_to: up_to.map(dec), rate: dec(rate) }
}

/// 0 < units <= 100 at 1.00, 100 < units <= 1000 at 0.50, above 1000 at 0.25.
fn three_tiers() -> Vec<Tier> {
    vec![tier(Some("100"), "1.00"), tier(Some("1000"), "0.50"), tier(None, "0.25")]
}

#[test]
fn per_unit_multiplies_exactly_with_fractional_rates() {
    let method = Method::PerUnit { rate: dec("0.0000025") };
    // 150 × 0.0000025 = 0.000375
    assert_eq!(method.event_charge(dec("150")).expect("in range"), Some(dec("0.000375")));
    // 1 × 0.0000025 = 0.0000025
    assert_eq!(method.event_charge(Decimal::ONE).expect("in range"), Some(dec("0.0000025")));
    // 0.1 × 0.3 = 0.03, exactly (in f64 it is 0.030000000000000002)
    let method = Method::PerUnit { rate: dec("0.3") };
    assert_eq!(method.event_charge(dec("0.1")).expect("in range"), Some(dec("0.03")));
    assert_eq!(method.event_charge(Decimal::ZERO).expect("in range"), Some(Decimal::ZERO));
}

#[test]
fn package_rounds_up_to_whole_packages() {
    let method = Method::Package { size: dec("1000"), price: dec("0.50") };
    // 0 units: 0 packages
    assert_eq!(method.event_charge(Decimal::ZERO).expect("in range"), Some(Decimal::ZERO));
    // 1 unit: ceil(1/1000) = 1 package = 0.50
    assert_eq!(method.event_charge(Decimal::ONE).expect("in range"), Some(dec("0.50")));
    // 999 units: ceil(0.999) = 1 package = 0.50
    assert_eq!(method.event_charge(dec("999")).expect("in range"), Some(dec("0.50")));
    // exactly 1000 units: 1 package = 0.50
    assert_eq!(method.event_charge(dec("1000")).expect("in range"), Some(dec("0.50")));
    // 1001 units: ceil(1.001) = 2 packages = 1.00
    assert_eq!(method.event_charge(dec("1001")).expect("in range"), Some(dec("1.00")));
    // exactly 3000 units: 3 packages = 1.50
    assert_eq!(method.event_charge(dec("3000")).expect("in range"), Some(dec("1.50")));
    // fractional units just above a multiple: 2000.000001 -> 3 packages = 1.50
    assert_eq!(method.event_charge(dec("2000.000001")).expect("in range"), Some(dec("1.50")));
}

#[test]
fn package_with_a_fractional_size() {
    let method = Method::Package { size: dec("0.1"), price: dec("2") };
    // 0.3 / 0.1 = 3 exactly: 3 packages = 6 (floating point would say 2.9999999999999996 -> 3
    // or 3.0000000000000004 -> 4)
    assert_eq!(method.event_charge(dec("0.3")).expect("in range"), Some(dec("6")));
    // 0.31 / 0.1 = 3.1 -> 4 packages = 8
    assert_eq!(method.event_charge(dec("0.31")).expect("in range"), Some(dec("8")));
}

#[test]
fn graduated_splits_the_total_across_tiers() {
    let method = Method::Graduated { tiers: three_tiers() };
    // 0 units: nothing
    assert_eq!(period_charge(&method, Decimal::ZERO).expect("in range"), Decimal::ZERO);
    // 99 units, all in tier 1: 99 × 1.00 = 99
    assert_eq!(period_charge(&method, dec("99")).expect("in range"), dec("99"));
    // exactly 100 units, the boundary is inclusive: 100 × 1.00 = 100
    assert_eq!(period_charge(&method, dec("100")).expect("in range"), dec("100"));
    // 101 units: 100 × 1.00 + 1 × 0.50 = 100.50
    assert_eq!(period_charge(&method, dec("101")).expect("in range"), dec("100.50"));
    // exactly 1000: 100 × 1.00 + 900 × 0.50 = 100 + 450 = 550
    assert_eq!(period_charge(&method, dec("1000")).expect("in range"), dec("550"));
    // 1500 spans three tiers: 100 × 1.00 + 900 × 0.50 + 500 × 0.25 = 100 + 450 + 125 = 675
    assert_eq!(period_charge(&method, dec("1500")).expect("in range"), dec("675"));
    // 100.5: 100 × 1.00 + 0.5 × 0.50 = 100.25
    assert_eq!(period_charge(&method, dec("100.5")).expect("in range"), dec("100.25"));
}

#[test]
fn volume_prices_the_whole_total_at_one_tier() {
    let method = Method::Volume { tiers: three_tiers() };
    assert_eq!(period_charge(&method, Decimal::ZERO).expect("in range"), Decimal::ZERO);
    // 99 units, tier 1: 99 × 1.00 = 99
    assert_eq!(period_charge(&method, dec("99")).expect("in range"), dec("99"));
    // exactly 100 is still tier 1 (inclusive): 100 × 1.00 = 100
    assert_eq!(period_charge(&method, dec("100")).expect("in range"), dec("100"));
    // 101 is tier 2, for every unit: 101 × 0.50 = 50.50
    assert_eq!(period_charge(&method, dec("101")).expect("in range"), dec("50.50"));
    // 100.000001 is just above the bound: 100.000001 × 0.50 = 50.0000005
    assert_eq!(period_charge(&method, dec("100.000001")).expect("in range"), dec("50.0000005"));
    // exactly 1000 is tier 2: 1000 × 0.50 = 500
    assert_eq!(period_charge(&method, dec("1000")).expect("in range"), dec("500"));
    // 1001 is tier 3: 1001 × 0.25 = 250.25
    assert_eq!(period_charge(&method, dec("1001")).expect("in range"), dec("250.25"));
}

#[test]
fn period_charge_of_per_event_methods_treats_the_total_as_one_event() {
    // 3 × 0.1 = 0.3
    assert_eq!(period_charge(&Method::PerUnit { rate: dec("0.1") }, dec("3")).expect("in range"), dec("0.3"));
    // ceil(2500 / 1000) = 3 packages × 2 = 6
    let package = Method::Package { size: dec("1000"), price: dec("2") };
    assert_eq!(period_charge(&package, dec("2500")).expect("in range"), dec("6"));
    assert_eq!(Method::Graduated { tiers: three_tiers() }.event_charge(dec("5")).expect("in range"), None);
}

#[test]
fn minimum_charge_below_at_and_above() {
    let minimum = Some(dec("10.00"));
    // 7.50 is below 10.00: raised to 10.00 (a top-up of 2.50)
    assert_eq!(apply_minimum(dec("7.50"), minimum), dec("10.00"));
    // exactly 10.00: unchanged
    assert_eq!(apply_minimum(dec("10.00"), minimum), dec("10.00"));
    // 12.25 is above: unchanged
    assert_eq!(apply_minimum(dec("12.25"), minimum), dec("12.25"));
    // no minimum: unchanged, even at 0
    assert_eq!(apply_minimum(Decimal::ZERO, None), Decimal::ZERO);
}

#[test]
fn tiers_are_validated() {
    let valid = Method::Graduated { tiers: three_tiers() };
    assert_eq!(valid.validate(), Ok(()));
    let cases = [
        (vec![], RuleError::EmptyTiers),
        (
            vec![tier(Some("100"), "1"), tier(Some("100"), "1"), tier(None, "1")],
            RuleError::TiersNotIncreasing { index: 1, up_to: dec("100"), previous: dec("100") },
        ),
        (
            vec![tier(Some("0"), "1"), tier(None, "1")],
            RuleError::TiersNotIncreasing { index: 0, up_to: dec("0"), previous: dec("0") },
        ),
        (vec![tier(None, "1"), tier(None, "1")], RuleError::UnboundedTierNotLast { index: 0 }),
        (vec![tier(Some("100"), "1")], RuleError::LastTierBounded { up_to: dec("100") }),
        (
            vec![tier(Some("100"), "1"), tier(None, "-0.5")],
            RuleError::NegativeAmount { field: "tiers[1].rate".to_owned(), value: dec("-0.5") },
        ),
    ];
    for (tiers, expected) in cases {
        assert_eq!(Method::Volume { tiers: tiers.clone() }.validate(), Err(expected.clone()));
        assert_eq!(Method::Graduated { tiers }.validate(), Err(expected));
    }
    let many = (1..=65).map(|bound| tier(Some(&bound.to_string()), "1")).collect::<Vec<_>>();
    assert_eq!(
        Method::Volume { tiers: many }.validate(),
        Err(RuleError::TooManyTiers { count: 65, max: TIERS_MAX })
    );
}

#[test]
fn rates_sizes_and_prices_are_validated() {
    assert_eq!(
        Method::PerUnit { rate: dec("-0.01") }.validate(),
        Err(RuleError::NegativeAmount { field: "rate".to_owned(), value: dec("-0.01") })
    );
    assert_eq!(Method::PerUnit { rate: Decimal::ZERO }.validate(), Ok(()));
    assert_eq!(Method::PerUnit { rate: PRICE_MAX }.validate(), Ok(()));
    assert!(matches!(
        Method::PerUnit { rate: dec("1000000.01") }.validate(),
        Err(RuleError::AmountTooLarge { .. })
    ));
    assert_eq!(
        Method::Package { size: Decimal::ZERO, price: Decimal::ONE }.validate(),
        Err(RuleError::PackageSizeNotPositive { size: Decimal::ZERO })
    );
    assert_eq!(
        Method::Package { size: dec("-5"), price: Decimal::ONE }.validate(),
        Err(RuleError::PackageSizeNotPositive { size: dec("-5") })
    );
    assert_eq!(
        Method::Package { size: Decimal::TEN, price: dec("-1") }.validate(),
        Err(RuleError::NegativeAmount { field: "price".to_owned(), value: dec("-1") })
    );
}

#[test]
fn methods_are_tagged_in_json() {
    let json = r#"{"method": "per_unit", "rate": "0.0000025"}"#;
    let method: Method = serde_json::from_str(json).expect("per_unit");
    assert_eq!(method, Method::PerUnit { rate: dec("0.0000025") });
    assert_eq!(
        serde_json::to_value(&method).expect("serialize"),
        serde_json::json!({"method": "per_unit", "rate": "0.0000025"})
    );
    // A number is read through its shortest decimal form, so 0.0000025 stays exact.
    let method: Method =
        serde_json::from_str(r#"{"method": "per_unit", "rate": 0.0000025}"#).expect("number");
    assert_eq!(method, Method::PerUnit { rate: dec("0.0000025") });
    let json =
        r#"{"method": "graduated", "tiers": [{"up_to": "100", "rate": "1"}, {"up_to": null, "rate": 0.5}]}"#;
    let method: Method = serde_json::from_str(json).expect("graduated");
    assert_eq!(method, Method::Graduated { tiers: vec![tier(Some("100"), "1"), tier(None, "0.5")] });
    let json = r#"{"method": "package", "size": 1000, "price": "0.5"}"#;
    assert_eq!(
        serde_json::from_str::<Method>(json).expect("package"),
        Method::Package { size: dec("1000"), price: dec("0.5") }
    );
    assert!(serde_json::from_str::<Method>(r#"{"method": "per_unit", "rate_per_unit": "1"}"#).is_err());
    assert!(serde_json::from_str::<Method>(r#"{"method": "multiply", "rate": "1"}"#).is_err());
}

/// Tiers with increasing bounds from a list of positive widths and rates.
fn graduated_tiers() -> impl Strategy<Value = Vec<Tier>> {
    prop::collection::vec((1u32..10_000, 0u32..1_000_000), 1..6).prop_map(|widths_and_rates| {
        let count = widths_and_rates.len();
        let mut bound = Decimal::ZERO;
        widths_and_rates
            .into_iter()
            .enumerate()
            .map(|(index, (width, rate_millionths))| {
                bound += Decimal::from(width);
                let up_to = (index + 1 < count).then_some(bound);
                Tier { up_to, rate: Decimal::new(i64::from(rate_millionths), 6) }
            })
            .collect()
    })
}

/// The graduated charge computed the slow way: one slice per tier.
fn sum_of_slices(tiers: &[Tier], units: Decimal) -> Decimal {
    let mut lower = Decimal::ZERO;
    let mut sum = Decimal::ZERO;
    for tier in tiers {
        let upper = tier.up_to.unwrap_or(Decimal::MAX);
        let slice = (units.min(upper) - lower).max(Decimal::ZERO);
        sum += slice * tier.rate;
        lower = upper;
    }
    sum
}

proptest! {
    #[test]
    fn graduated_is_monotone_and_the_sum_of_its_slices(
        tiers in graduated_tiers(),
        units_millionths in 0i64..100_000_000_000,
        more_millionths in 0i64..10_000_000_000,
    ) {
        let method = Method::Graduated { tiers: tiers.clone() };
        prop_assert_eq!(method.validate(), Ok(()));
        let units = Decimal::new(units_millionths, 6);
        let more = units + Decimal::new(more_millionths, 6);
        let charge = period_charge(&method, units).expect("in range");
        prop_assert_eq!(charge, sum_of_slices(&tiers, units));
        prop_assert!(period_charge(&method, more).expect("in range") >= charge);
    }
}
