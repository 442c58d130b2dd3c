//! Property tests of query parameter parsing: whatever a client sends, reading the query string
//! never panics and yields either a value within its documented bounds or an
//! `invalid_parameter` error that starts with the parameter's name. `PROPTEST_CASES` sets the
//! number of cases (default 256).

use proptest::prelude::*;
use query::api::params::{
    BreakdownParams, OFFSET_MAX, RangeParams, TIME_MAX, TIME_MIN, TimeInput, TrendsParams, UsageParams,
    from_query,
};
use query::error::ApiError;
use time::PrimitiveDateTime;

fn names(error: &ApiError, field: &str) -> bool {
    matches!(error, ApiError::InvalidParameter(_)) && error.to_string().starts_with(&format!("{field}:"))
}

/// `field=<text>`, every byte of the text percent-encoded: the server reads the text as sent.
fn pair(field: &str, text: &str) -> String {
    let encoded: String = text.bytes().map(|byte| format!("%{byte:02X}")).collect();
    format!("{field}={encoded}")
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
        match from_query::<TrendsParams>(&pair("start_date", &text)).map(|params| params.range().start) {
            Ok(Some(TimeInput::Instant(instant))) => {
                let utc = instant.to_offset(time::UtcOffset::UTC);
                let wall_clock = PrimitiveDateTime::new(utc.date(), utc.time());
                prop_assert!((TIME_MIN..=TIME_MAX).contains(&wall_clock), "{text:?}: {instant}");
            }
            Ok(Some(TimeInput::Local(local))) => {
                prop_assert!((TIME_MIN..=TIME_MAX).contains(&local), "{text:?}: {local}");
            }
            Ok(None) => prop_assert!(false, "{text:?}: a value was sent"),
            Err(error) => prop_assert!(names(&error, "start_date"), "{text:?}: {error}"),
        }
    }

    #[test]
    fn valid_dates_in_bounds_are_read(year in 1970i32..=9998, ordinal in 1u16..=365, seconds in 0u32..86_400) {
        let date = time::Date::from_ordinal_date(year, ordinal).expect("a day of any year");
        let text = format!("{date}T{:02}:{:02}:{:02}Z", seconds / 3600, seconds / 60 % 60, seconds % 60);
        let parsed = from_query::<TrendsParams>(&pair("end_date", &text)).map(|params| params.range().end);
        prop_assert!(matches!(parsed, Ok(Some(TimeInput::Instant(_)))), "{text}: {parsed:?}");
        let parsed = from_query::<TrendsParams>(&pair("end_date", &date.to_string()));
        prop_assert!(matches!(parsed.map(|params| params.range().end), Ok(Some(TimeInput::Local(_)))));
    }

    #[test]
    fn numbers_are_within_bounds_or_refused_by_name(
        text in prop_oneof![any_text(), any::<u64>().prop_map(|n| n.to_string())],
    ) {
        match from_query::<UsageParams>(&pair("limit", &text)) {
            Ok(params) => {
                prop_assert!((1..=10_000).contains(&params.limit.0));
                prop_assert_eq!(text.trim().parse(), Ok(params.limit.0));
            }
            Err(error) => prop_assert!(names(&error, "limit"), "{text:?}: {error}"),
        }
        match from_query::<UsageParams>(&pair("offset", &text)) {
            Ok(params) => prop_assert!(params.offset.0 <= OFFSET_MAX && i64::try_from(params.offset.0).is_ok()),
            Err(error) => prop_assert!(names(&error, "offset"), "{text:?}: {error}"),
        }
    }

    #[test]
    fn every_offset_the_database_holds_is_read(offset in 0..=OFFSET_MAX) {
        let params = from_query::<UsageParams>(&format!("offset={offset}"));
        prop_assert_eq!(params.ok().map(|params| params.offset.0), Some(offset));
        let beyond = u128::from(offset) + u128::from(OFFSET_MAX) + 1;
        let beyond = format!("offset={beyond}");
        prop_assert!(from_query::<UsageParams>(&beyond).is_err());
    }

    #[test]
    fn filters_hold_no_control_characters_or_are_refused_by_name(
        values in prop::collection::vec(prop::option::of(any_text()), 5),
    ) {
        let fields = ["service_type", "service_provider", "user_id", "model", "event_type"];
        let query: Vec<String> = fields
            .iter()
            .zip(&values)
            .filter_map(|(field, value)| value.as_ref().map(|value| pair(field, value)))
            .collect();
        match from_query::<BreakdownParams>(&query.join("&")).map(|params| params.filter()) {
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
        if let Err(error) = from_query::<TrendsParams>(&pair("period", &text)) {
            prop_assert!(names(&error, "period"), "{error}");
        }
        match from_query::<TrendsParams>(&pair("metric", &text)) {
            Ok(params) => prop_assert!(params.metric.is_some_and(|metric| !metric.name().is_empty())),
            Err(error) => prop_assert!(names(&error, "metric"), "{error}"),
        }
        match from_query::<BreakdownParams>(&pair("group_by", &text)) {
            Ok(params) => prop_assert!(params.group_by.is_some_and(|group_by| (1..=2).contains(&group_by.0.len()))),
            Err(error) => prop_assert!(names(&error, "group_by"), "{error}"),
        }
        for field in ["include_billing", "status", "format", "cursor"] {
            if let Err(error) = from_query::<UsageParams>(&pair(field, &text)) {
                prop_assert!(names(&error, field), "{error}");
            }
        }
    }
}
