//! Property tests of query parameter parsing: whatever a client sends, parsing never panics and
//! yields either a value within its documented bounds or an `invalid_parameter` error that
//! starts with the parameter's name. `PROPTEST_CASES` sets the number of cases (default 256).

use proptest::prelude::*;
use query::error::ApiError;
use query::params::{
    Dimension, Metric, OFFSET_MAX, Period, TIME_MAX, TIME_MIN, TimeInput, filter, parse_bool, parse_offset,
    parse_status, parse_time, parse_u32,
};
use time::PrimitiveDateTime;

fn names(error: &ApiError, field: &str) -> bool {
    matches!(error, ApiError::InvalidParameter(_)) && error.to_string().starts_with(&format!("{field}:"))
}

/// Date-like text: years far beyond what the types hold, invalid months, days and times,
/// any offset, any separator.
fn date_text() -> impl Strategy<Value = String> {
    (
        -999_999i32..=999_999,
        0u8..=99,
        0u8..=99,
        prop::option::of((0u8..=99, 0u8..=99, prop::option::of(0u8..=99), prop::option::of("[0-9]{1,12}"))),
        prop::sample::select(vec!["", "Z", "z", "+00:00", "-23:59", "+23:59", "+24:00", "-00:00", "ZZZZ"]),
        prop::sample::select(vec!["T", " ", "t", "_"]),
    )
        .prop_map(|(year, month, day, time, offset, separator)| {
            let date = format!("{year:04}-{month:02}-{day:02}");
            match time {
                None => format!("{date}{offset}"),
                Some((h, m, s, fraction)) => {
                    let seconds = s.map(|s| format!(":{s:02}")).unwrap_or_default();
                    let fraction = fraction.map(|f| format!(".{f}")).unwrap_or_default();
                    format!("{date}{separator}{h:02}:{m:02}{seconds}{fraction}{offset}")
                }
            }
        })
}

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "\\PC{0,80}", date_text(), any::<i128>().prop_map(|n| n.to_string())]
}

proptest! {
    #[test]
    fn times_are_within_bounds_or_refused_by_name(text in any_text()) {
        match parse_time("start_date", &text) {
            Ok(TimeInput::Instant(instant)) => {
                let utc = instant.to_offset(time::UtcOffset::UTC);
                let wall_clock = PrimitiveDateTime::new(utc.date(), utc.time());
                prop_assert!((TIME_MIN..=TIME_MAX).contains(&wall_clock), "{text:?}: {instant}");
            }
            Ok(TimeInput::Local(local)) => {
                prop_assert!((TIME_MIN..=TIME_MAX).contains(&local), "{text:?}: {local}");
            }
            Err(error) => prop_assert!(names(&error, "start_date"), "{text:?}: {error}"),
        }
    }

    #[test]
    fn valid_dates_in_bounds_are_read(year in 1970i32..=9998, ordinal in 1u16..=365, seconds in 0u32..86_400) {
        let date = time::Date::from_ordinal_date(year, ordinal).expect("a day of any year");
        let text = format!("{date}T{:02}:{:02}:{:02}Z", seconds / 3600, seconds / 60 % 60, seconds % 60);
        let parsed = parse_time("end_date", &text);
        prop_assert!(matches!(parsed, Ok(TimeInput::Instant(_))), "{text}: {parsed:?}");
        prop_assert!(matches!(parse_time("end_date", &date.to_string()), Ok(TimeInput::Local(_))));
    }

    #[test]
    fn numbers_are_within_bounds_or_refused_by_name(
        text in prop_oneof![any_text(), any::<u64>().prop_map(|n| n.to_string())],
        min in 0u32..10,
        max in 10u32..100_000,
    ) {
        match parse_u32("limit", Some(&text), min, min, max) {
            Ok(value) => prop_assert!((min..=max).contains(&value) && text.trim().parse() == Ok(value)),
            Err(error) => prop_assert!(names(&error, "limit"), "{text:?}: {error}"),
        }
        match parse_offset(Some(&text)) {
            Ok(value) => prop_assert!(value <= OFFSET_MAX && i64::try_from(value).is_ok()),
            Err(error) => prop_assert!(names(&error, "offset"), "{text:?}: {error}"),
        }
    }

    #[test]
    fn every_offset_the_database_holds_is_read(offset in 0..=OFFSET_MAX) {
        prop_assert_eq!(parse_offset(Some(&offset.to_string())).ok(), Some(offset));
        let beyond = u128::from(offset) + u128::from(OFFSET_MAX) + 1;
        prop_assert!(parse_offset(Some(&beyond.to_string())).is_err());
    }

    #[test]
    fn filters_hold_no_control_characters_or_are_refused_by_name(
        values in prop::collection::vec(prop::option::of(any_text()), 5),
    ) {
        let fields = ["service_type", "service_provider", "user_id", "model", "event_type"];
        match filter(&values[0], &values[1], &values[2], &values[3], &values[4]) {
            Ok(filter) => {
                let kept = [
                    &filter.service_type, &filter.service_provider, &filter.user_id, &filter.model,
                    &filter.event_type,
                ];
                for (value, sent) in kept.into_iter().zip(&values) {
                    prop_assert_eq!(value, sent);
                    if let Some(value) = value {
                        prop_assert!(value.len() <= 255 && !value.chars().any(char::is_control));
                    }
                }
            }
            Err(error) => prop_assert!(fields.iter().any(|field| names(&error, field)), "{error}"),
        }
    }

    #[test]
    fn allow_lists_answer_or_refuse_by_name(text in any_text()) {
        if let Err(error) = Period::parse("period", &text) {
            prop_assert!(names(&error, "period"));
        }
        match Metric::parse("metric", &text) {
            Ok(metric) => prop_assert!(!metric.name().is_empty()),
            Err(error) => prop_assert!(names(&error, "metric")),
        }
        match Dimension::parse_list("group_by", &text, 3) {
            Ok(dimensions) => prop_assert!((1..=3).contains(&dimensions.len())),
            Err(error) => prop_assert!(names(&error, "group_by")),
        }
        if let Err(error) = parse_bool("include_billing", Some(&text)) {
            prop_assert!(names(&error, "include_billing"));
        }
        if let Err(error) = parse_status(Some(&text)) {
            prop_assert!(names(&error, "status"));
        }
    }
}
