//! Property tests of JSON ingest, the always-on companion of the `edge/fuzz` targets: whatever a
//! caller sends, `event_from_json` never panics, an event it accepts passes `Event::validate`, and
//! an error names a field. `PROPTEST_CASES` sets the number of cases (default 128 here).

use std::collections::BTreeMap;

use edge::json::{BodyError, CALLER_KEY, batch_events, event_from_json, tenant_of};
use edge::registry::Registry;
use proptest::prelude::*;
use serde_json::{Map, Number, Value, json};
use wire::QuantityKind;

/// Field names of the older API, so that arbitrary objects reach deep paths.
const FIELDS: &[&str] = &[
    "user_id",
    "service_type",
    "service_provider",
    "event_type",
    "event_id",
    "timestamp",
    "tenant_id",
    "model",
    "status",
    "error_code",
    "session_id",
    "request_id",
    "tags",
    "metadata",
    "metrics",
    "$caller",
    "input_tokens",
    "output_tokens",
    "pages",
    "pages_processed",
    "characters_extracted",
    "request_count",
    "file_size_bytes",
    "total_tokens",
    "payload_size_bytes",
    "latency_ms",
    "response_time_ms",
    "processing_time_ms",
    "temperature",
    "max_tokens",
    "status_code",
    "model_version",
    "document_type",
    "processing_type",
    "endpoint",
    "method",
];

/// What an error may name besides a field the caller sent: a missing required field, or the
/// wire name of what an alias or a metric became.
const WIRE_FIELDS: &[&str] = &["event", "quantities", "custom_quantities", "metadata", "tags", "model"];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(FIELDS).prop_map(str::to_owned),
        1 => "[a-zA-Z_$ ]{0,10}",
        1 => any::<String>(),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", Number::from_f64).prop_map(Value::Number),
        (0.0..3.0f64).prop_filter_map("finite", Number::from_f64).prop_map(Value::Number),
        prop::sample::select(vec![
            "llm_service",
            "document_processor",
            "api_service",
            "custom",
            "success",
            "error",
            "gpt-4",
            "2024-01-15T10:30:00Z",
            "2024-01-15 10:30:00",
            "9999-12-31T23:59:59+23:59",
            "0190b6d8-2f6a-7c3e-9f00-000000000001",
            "00000000-0000-0000-0000-000000000000",
            "a\0b",
            "",
        ])
        .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..5)
                .prop_map(|map| Value::Object(map.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A valid event of a built-in type with arbitrary fields set over it, or any JSON value.
fn event_json() -> impl Strategy<Value = Value> {
    let base = prop::sample::select(vec!["llm_service", "document_processor", "api_service", "custom"])
        .prop_map(|service_type| {
            json!({"user_id": "u", "service_type": service_type, "service_provider": "p", "event_type": "e",
                "model": "m", "input_tokens": 1, "output_tokens": 2, "pages": 3, "document_type": "d",
                "processing_type": "ocr", "endpoint": "/x", "method": "GET"})
        });
    let overrides = prop::collection::btree_map(key(), json_value(), 0..6);
    prop_oneof![
        3 => (base, overrides).prop_map(|(mut event, overrides): (Value, BTreeMap<String, Value>)| {
            let object = event.as_object_mut().expect("an object");
            object.extend(overrides);
            event
        }),
        1 => json_value(),
    ]
}

fn check_event(value: Value) -> Result<(), TestCaseError> {
    let sent = sent_keys(&value);
    if let Err(error) = tenant_of(&value) {
        prop_assert_eq!(error.field, "tenant_id");
    }
    match event_from_json(value, &Registry::built_in()) {
        Ok(event) => {
            prop_assert!(event.validate().is_ok(), "{:?}", event.validate());
            let views = event.extra.iter().flat_map(|extra| &extra.metadata).filter(|e| e.key == CALLER_KEY);
            for view in views {
                let parsed: Result<Value, _> = serde_json::from_str(&view.value);
                prop_assert!(parsed.is_ok_and(|view| view.is_object()), "{view:?}");
            }
        }
        Err(error) => {
            let root = error.field.split(['.', '[']).next().unwrap_or_default();
            let named = sent.iter().any(|key| names_key(&error.field, key))
                || WIRE_FIELDS.contains(&root)
                || QuantityKind::from_name(root).is_some()
                || ["user_id", "service_type", "service_provider", "event_type", "latency_ms"]
                    .contains(&root);
            prop_assert!(
                !error.field.is_empty() && named && !error.reason.is_empty(),
                "{error:?} (sent {sent:?})"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(128)
    ))]

    #[test]
    fn events_are_valid_or_refused_by_field(value in event_json()) {
        check_event(value)?;
    }

    #[test]
    fn batch_bodies_give_their_events_or_one_error(events in prop::collection::vec(event_json(), 0..6)) {
        let body = json!({"events": events}).to_string();
        match batch_events(body.as_bytes(), 4) {
            Ok(parsed) => {
                prop_assert!((1..=4).contains(&events.len()));
                // serde_json's default float parsing may differ from the printed value in the last bit.
                let reparsed: Value = serde_json::from_str(&body).expect("json");
                prop_assert_eq!(&Value::from(parsed.clone()), &reparsed["events"]);
                for event in parsed {
                    check_event(event)?;
                }
            }
            Err(BodyError::EmptyBatch) => prop_assert!(events.is_empty()),
            Err(BodyError::TooManyEvents { events: count, max }) => {
                prop_assert_eq!((count, max), (events.len(), 4));
            }
            Err(error) => prop_assert!(false, "{body}: {error}"),
        }
    }
}

/// `field` is `key` or a path under it (`key.inner`, `key[0]`); keys may contain `.` and `[`.
fn names_key(field: &str, key: &str) -> bool {
    field.strip_prefix(key).is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// The keys a caller sent: at the top level and under `metrics` and `metadata`, whose entries'
/// errors name the entry (`images` for `metrics.images`).
fn sent_keys(value: &Value) -> Vec<String> {
    let Some(object) = value.as_object() else { return Vec::new() };
    let nested = ["metrics", "metadata"].into_iter().filter_map(|key| object.get(key)?.as_object());
    object.keys().chain(nested.flat_map(|inner| inner.keys())).cloned().collect()
}
