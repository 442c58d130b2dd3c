//! The invariants both targets check on every JSON event that reaches `event_from_json`.

use edge::json::{CALLER_KEY, event_from_json, tenant_of};
use edge::registry::Registry;
use serde_json::{Value, json};
use wire::{EventError, QuantityKind};

/// The built-in types and one custom type with a provider list and typed required fields, so
/// both halves of `Registry::check` are reached.
pub fn registry() -> Registry {
    let vision = sink::ServiceRecord {
        service_type: "vision".into(),
        service_name: "Vision".into(),
        description: None,
        providers: vec!["p".into(), "q".into()],
        required_fields: json!([{"name": "images", "kind": "number"}, {"name": "resolution", "type": "string"},
            "model", "score"]),
        optional_fields: json!([]),
        billing_config: None,
    };
    Registry::with_custom(&[vision])
}

/// Field names an error may name although the caller did not send them: a missing required
/// field, or the wire name of what a caller's alias or metric became.
const WIRE_FIELDS: &[&str] = &[
    "event",
    "user_id",
    "service_type",
    "service_provider",
    "event_type",
    "model",
    "latency_ms",
    "quantities",
    "custom_quantities",
    "metadata",
    "tags",
    "document_type",
    "processing_type",
    "endpoint",
    "method",
    "images",
    "resolution",
    "score",
];

/// Converts one event and checks what came out: never a panic, an accepted event is valid for
/// the wire and can become a stored row, and an error names a field.
pub fn check_event(value: Value, registry: &Registry) {
    let sent = sent_keys(&value);
    if let Err(error) = tenant_of(&value) {
        assert_eq!(error.field, "tenant_id", "{error:?}");
    }
    match event_from_json(value, registry) {
        Ok(event) => {
            if let Err(error) = event.validate() {
                panic!("an accepted event is invalid: {error:?} {event:?}");
            }
            check_caller_view(&event);
            if let Err(error) = registry.check(&event) {
                check_error(&error, &sent);
            }
            let row = sink::EventRow::new(uuid::Uuid::nil(), event, None);
            assert!(row.latency_us.is_none_or(|latency_us| latency_us >= 0));
        }
        Err(error) => check_error(&error, &sent),
    }
}

/// The reserved entry, when present, is the JSON object `event_from_json` writes.
fn check_caller_view(event: &wire::Event) {
    let Some(extra) = &event.extra else { return };
    let views: Vec<_> = extra.metadata.iter().filter(|entry| entry.key == CALLER_KEY).collect();
    assert!(views.len() <= 1, "{views:?}");
    if let Some(view) = views.first() {
        let Ok(Value::Object(view)) = serde_json::from_str::<Value>(&view.value) else {
            panic!("the caller's view is not a JSON object: {view:?}")
        };
        assert!(!view.is_empty());
        assert!(view.keys().all(|key| ["m", "j", "mm"].contains(&key.as_str())), "{view:?}");
    }
}

/// An error names a field the caller sent, or one of the event's own fields.
pub fn check_error(error: &EventError, sent: &[String]) {
    assert!(!error.reason.is_empty(), "{error:?}");
    let root = error.field.split(['.', '[']).next().unwrap_or_default();
    let named = sent.iter().any(|key| names_key(&error.field, key))
        || WIRE_FIELDS.contains(&root)
        || QuantityKind::from_name(root).is_some();
    assert!(!error.field.is_empty() && named, "the error names no field: {error:?} (sent {sent:?})");
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
