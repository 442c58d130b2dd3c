//! Events as the older system's callers send them over HTTP: flat (`"model": "gpt-4",
//! "input_tokens": 150`) or nested (`"metadata": {"model": ...}, "metrics": {"input_tokens": ...}`).
//! Both become the one [`wire::Event`], checked by the same rules as the binary protocol.
//!
//! # What the caller sent, kept for the listing
//! `null` for an optional field means absent. A non-numeric value under `metrics` (`"model_version":
//! "v2.1"`) is a dimension of the event: a metadata entry, not a quantity. So that a listing can
//! return what the caller sent under the caller's names and JSON types, without growing the binary
//! event, one reserved metadata entry [`CALLER_KEY`] holds a small JSON object (only when needed):
//! - `"m"`: the caller's metric names whose listing would otherwise differ: aliases of a
//!   well-known quantity (`pages_processed` for `pages`, `response_time_ms` for the latency) and
//!   numbers that became metadata (`temperature`) with the value as sent; dimensions with `null`
//!   (their value is the metadata entry of the same name);
//! - `"j"`: metadata keys whose value was not a JSON string (numbers, booleans, objects, lists):
//!   the entry holds the value's JSON text, and the listing parses it back;
//! - `"mm"`: `true` when the model was sent as `metadata.model` (listed there too).

use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use wire::{ErrorCode, Event, EventError, QuantityKind, Status};

use crate::registry::Registry;

/// Where a numeric field of the older API goes.
enum Target {
    Quantity(QuantityKind),
    Custom,
    Latency,
    Metadata,
}

/// Numeric fields the older API accepted at the top level or under `metrics`.
fn numeric_target(name: &str) -> Option<Target> {
    if let Some(kind) = QuantityKind::from_name(name) {
        return Some(Target::Quantity(kind));
    }
    Some(match name {
        "pages_processed" => Target::Quantity(QuantityKind::Pages),
        "characters_extracted" => Target::Quantity(QuantityKind::Characters),
        "request_count" => Target::Quantity(QuantityKind::Requests),
        "file_size_bytes" => Target::Quantity(QuantityKind::Bytes),
        "total_tokens" | "payload_size_bytes" | "response_size_bytes" => Target::Custom,
        "latency_ms" | "response_time_ms" | "processing_time_ms" => Target::Latency,
        "temperature" | "max_tokens" | "status_code" => Target::Metadata,
        _ => return None,
    })
}

/// Text fields of the older API's typed services, kept as metadata.
const TEXT_FIELDS: &[&str] = &[
    "model_version",
    "document_type",
    "processing_type",
    "file_format",
    "endpoint",
    "method",
    "api_version",
];

/// The reserved metadata key of what the caller sent (see the module documentation). Callers may
/// not use it.
pub const CALLER_KEY: &str = "$caller";

/// The tenant named in a body, if any: `tenant_id` must then be the caller's tenant. A
/// `tenant_id` that is neither a string nor `null` is an error.
pub fn tenant_of(value: &Value) -> Result<Option<&str>, EventError> {
    match value.get("tenant_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(tenant)) => Ok(Some(tenant)),
        Some(_) => Err(EventError::new("tenant_id", "must be a string")),
    }
}

/// Why a body was refused as a whole, before any event in it was looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("invalid JSON body: {0}")]
    Json(String),
    #[error("body must be {{\"events\": [...]}}: {0}")]
    NotABatch(String),
    #[error("events: the batch is empty")]
    EmptyBatch,
    // 400 as in the older system (its MAX_BATCH_SIZE); 413 is for bodies over the byte limit.
    #[error("events: {events} events exceed the batch limit of {max} (MAX_BATCH_SIZE); split the batch")]
    TooManyEvents { events: usize, max: usize },
}

impl BodyError {
    pub fn code(&self) -> ErrorCode {
        match self {
            BodyError::Json(_) | BodyError::NotABatch(_) => ErrorCode::BadFrame,
            BodyError::EmptyBatch | BodyError::TooManyEvents { .. } => ErrorCode::InvalidEvent,
        }
    }
}

/// The JSON value of a request body.
pub fn body_value(body: &[u8]) -> Result<Value, BodyError> {
    serde_json::from_slice(body).map_err(|error| BodyError::Json(error.to_string()))
}

/// The events of a batch body, `{"events": [...]}`, with 1 to `events_max` of them. Each is then
/// checked alone: [`tenant_of`], then [`event_from_json`].
pub fn batch_events(body: &[u8], events_max: usize) -> Result<Vec<Value>, BodyError> {
    #[derive(serde::Deserialize)]
    struct BatchBody {
        events: Vec<Value>,
    }
    let body: BatchBody =
        serde_json::from_value(body_value(body)?).map_err(|error| BodyError::NotABatch(error.to_string()))?;
    if body.events.is_empty() {
        return Err(BodyError::EmptyBatch);
    }
    if body.events.len() > events_max {
        return Err(BodyError::TooManyEvents { events: body.events.len(), max: events_max });
    }
    Ok(body.events)
}

/// What [`event_from_json`] records of the caller's own names and JSON types.
#[derive(Default)]
struct CallerView {
    metrics: Map<String, Value>,
    json_keys: Vec<String>,
    model_in_metadata: bool,
}

impl CallerView {
    fn entry(self) -> Option<wire::MetadataEntry> {
        if self.metrics.is_empty() && self.json_keys.is_empty() && !self.model_in_metadata {
            return None;
        }
        let mut view = Map::new();
        if self.model_in_metadata {
            view.insert("mm".into(), Value::Bool(true));
        }
        if !self.metrics.is_empty() {
            view.insert("m".into(), Value::Object(self.metrics));
        }
        if !self.json_keys.is_empty() {
            view.insert("j".into(), Value::from(self.json_keys));
        }
        Some(wire::MetadataEntry { key: CALLER_KEY.to_owned(), value: Value::Object(view).to_string() })
    }
}

/// Converts one JSON event. Every error names the field.
pub fn event_from_json(value: Value, registry: &Registry) -> Result<Event, EventError> {
    let Value::Object(mut object) = value else {
        return Err(EventError::new("event", "must be a JSON object"));
    };
    if object.contains_key("") {
        // An error must name a field, and "" names none (nor can a path under it).
        return Err(EventError::new("event", "has a field with an empty name"));
    }
    check_no_nul(&object, "")?;
    let user_id = take_string(&mut object, "user_id")?.ok_or_else(|| missing("user_id"))?;
    let service_type = take_string(&mut object, "service_type")?.ok_or_else(|| missing("service_type"))?;
    let service_provider =
        take_string(&mut object, "service_provider")?.ok_or_else(|| missing("service_provider"))?;
    let default_event_type = registry.default_event_type(&service_type);
    let event_type = match take_string(&mut object, "event_type")? {
        Some(event_type) => event_type,
        None => default_event_type.map(str::to_owned).ok_or_else(|| missing("event_type"))?,
    };
    let mut event = Event::new(user_id, service_type, service_provider, event_type);
    object.remove("tenant_id");
    if let Some(id) = take_string(&mut object, "event_id")? {
        let id = uuid::Uuid::parse_str(&id).map_err(|_| EventError::new("event_id", "must be a UUID"))?;
        event = event.with_id(id);
    }
    if let Some(timestamp) = take_string(&mut object, "timestamp")? {
        event = event.at(parse_timestamp(&timestamp)?);
    }
    event.model = take_string(&mut object, "model")?;
    if let Some(status) = take_string(&mut object, "status")? {
        event.status = match status.as_str() {
            "success" | "ok" => Status::Success,
            "error" | "failed" | "failure" => Status::Error,
            _ => return Err(EventError::new("status", "must be \"success\" or \"error\"")),
        };
    }
    let error_code = take_string(&mut object, "error_code")?;
    for field in ["session_id", "request_id"] {
        if let Some(text) = take_string(&mut object, field)? {
            let extra = event.extra_mut();
            *(if field == "session_id" { &mut extra.session_id } else { &mut extra.request_id }) = Some(text);
        }
    }
    let mut view = CallerView::default();
    match object.remove("tags") {
        None | Some(Value::Null) => {}
        Some(tags) => take_tags(&mut event, tags)?,
    }
    match object.remove("metadata") {
        None | Some(Value::Null) => {}
        Some(metadata) => take_metadata(&mut event, &mut view, metadata)?,
    }
    match object.remove("metrics") {
        None | Some(Value::Null) => {}
        Some(Value::Object(metrics)) => {
            for (name, value) in metrics {
                apply_metric(&mut event, &mut view, &format!("metrics.{name}"), name, value)?;
            }
        }
        Some(_) => return Err(EventError::new("metrics", "must be an object")),
    }
    for field in TEXT_FIELDS {
        if let Some(text) = take_string(&mut object, field)? {
            event = event.with_metadata(*field, text);
        }
    }
    for (name, value) in object {
        if numeric_target(&name).is_none() {
            return Err(EventError::new(name, "is not a field of an event"));
        }
        if value.is_null() {
            continue;
        }
        apply_numeric(&mut event, &mut view, &name.clone(), &name, value, false)?;
    }
    if let Some(entry) = view.entry() {
        event.extra_mut().metadata.push(entry);
    }
    finish(event, error_code)
}

fn finish(mut event: Event, error_code: Option<String>) -> Result<Event, EventError> {
    if let Some(code) = error_code {
        event.status = Status::Error;
        event.extra_mut().error_code = Some(code);
    }
    if event.service_type == "api_service" && event.quantity(QuantityKind::Requests).is_none() {
        event = event.with_quantity(QuantityKind::Requests, 1.0);
    }
    if let Some(extra) = &event.extra
        && extra.metadata.is_empty()
        && extra.tags.is_empty()
        && extra.custom_quantities.is_empty()
        && extra.session_id.is_none()
        && extra.request_id.is_none()
        && extra.error_code.is_none()
    {
        event.extra = None;
    }
    event.validate()?;
    Ok(event)
}

/// One entry of `metrics`: `null` is absent, a number is a quantity (or latency, or typed
/// metadata), anything else under a name that is not a numeric field is a dimension.
fn apply_metric(
    event: &mut Event,
    view: &mut CallerView,
    field: &str,
    name: String,
    value: Value,
) -> Result<(), EventError> {
    match value {
        Value::Null => Ok(()),
        Value::Number(_) => apply_numeric(event, view, field, &name, value, true),
        _ if numeric_target(&name).is_some() => Err(EventError::new(field, "must be a number")),
        other => {
            check_metadata_key(field, &name)?;
            if !other.is_string() {
                view.json_keys.push(name.clone());
            }
            view.metrics.insert(name.clone(), Value::Null);
            let text = match other {
                Value::String(text) => text,
                other => other.to_string(),
            };
            event.extra_mut().metadata.push(wire::MetadataEntry { key: name, value: text });
            Ok(())
        }
    }
}

/// One numeric field, from the top level or from `metrics` (where unknown names are custom
/// quantities).
fn apply_numeric(
    event: &mut Event,
    view: &mut CallerView,
    field: &str,
    name: &str,
    value: Value,
    in_metrics: bool,
) -> Result<(), EventError> {
    let number = value.as_f64().ok_or_else(|| EventError::new(field, "must be a number"))?;
    let target = numeric_target(name).unwrap_or(if in_metrics { Target::Custom } else { Target::Metadata });
    // Listed back under the caller's name: aliases always, typed metadata when sent as a metric.
    let listed_as_sent = match target {
        Target::Quantity(kind) => kind.as_str() == name,
        Target::Latency => name == "latency_ms",
        Target::Custom => true,
        Target::Metadata => !in_metrics,
    };
    if !listed_as_sent {
        view.metrics.insert(name.to_owned(), value.clone());
    }
    match target {
        Target::Quantity(kind) => {
            if event.quantity(kind).is_some() {
                return Err(EventError::new(field, format!("{} is given twice", kind.as_str())));
            }
            event.quantities.push(wire::Quantity { kind, value: number });
        }
        Target::Custom => event
            .extra_mut()
            .custom_quantities
            .push(wire::CustomQuantity { name: name.to_owned(), value: number }),
        Target::Latency => {
            if event.latency_ms.is_some() {
                return Err(EventError::new(field, "latency is given twice"));
            }
            event.latency_ms = Some(number);
        }
        Target::Metadata => {
            check_typed_metadata(field, name, number, event)?;
            view.json_keys.push(name.to_owned());
            event
                .extra_mut()
                .metadata
                .push(wire::MetadataEntry { key: name.to_owned(), value: value.to_string() });
        }
    }
    Ok(())
}

/// The older API's range rules for its typed numeric parameters.
fn check_typed_metadata(field: &str, name: &str, number: f64, event: &mut Event) -> Result<(), EventError> {
    match name {
        "temperature" if !(0.0..=2.0).contains(&number) => Err(EventError::new(field, "must be from 0 to 2")),
        "status_code" => {
            if number.fract() != 0.0 || !(100.0..=599.0).contains(&number) {
                return Err(EventError::new(field, "must be an HTTP status from 100 to 599"));
            }
            // A failed call counts as an error in error rates.
            if number >= 400.0 {
                event.status = Status::Error;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn check_metadata_key(field: &str, key: &str) -> Result<(), EventError> {
    if key == CALLER_KEY {
        return Err(EventError::new(field, "is reserved for Tally"));
    }
    Ok(())
}

fn take_metadata(event: &mut Event, view: &mut CallerView, metadata: Value) -> Result<(), EventError> {
    let Value::Object(metadata) = metadata else {
        return Err(EventError::new("metadata", "must be an object"));
    };
    for (key, value) in metadata {
        if key == "model" && event.model.is_none() && !value.is_null() {
            let model =
                value.as_str().ok_or_else(|| EventError::new("metadata.model", "must be a string"))?;
            event.model = Some(model.to_owned());
            view.model_in_metadata = true;
            continue;
        }
        check_metadata_key(&format!("metadata.{key}"), &key)?;
        let text = match value {
            Value::String(text) => text,
            Value::Null => continue,
            other => {
                view.json_keys.push(key.clone());
                other.to_string()
            }
        };
        event.extra_mut().metadata.push(wire::MetadataEntry { key, value: text });
    }
    Ok(())
}

/// A NUL byte anywhere in the event (a key or a string, at any depth) is refused with the path
/// of the field: storage refuses it, and it must never reach a commit.
fn check_no_nul(object: &Map<String, Value>, prefix: &str) -> Result<(), EventError> {
    for (key, value) in object {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        if key.contains('\0') {
            let parent = if prefix.is_empty() { "event" } else { prefix };
            return Err(EventError::new(parent, "a field name contains a NUL byte"));
        }
        check_value_no_nul(value, &path)?;
    }
    Ok(())
}

fn check_value_no_nul(value: &Value, path: &str) -> Result<(), EventError> {
    match value {
        Value::String(text) if text.contains('\0') => Err(EventError::new(path, "contains a NUL byte")),
        Value::Object(object) => check_no_nul(object, path),
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                check_value_no_nul(item, &format!("{path}[{index}]"))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn take_tags(event: &mut Event, tags: Value) -> Result<(), EventError> {
    let Value::Array(tags) = tags else {
        return Err(EventError::new("tags", "must be a list of strings"));
    };
    for (index, tag) in tags.into_iter().enumerate() {
        let Value::String(tag) = tag else {
            return Err(EventError::new(format!("tags[{index}]"), "must be a string"));
        };
        event.extra_mut().tags.push(tag);
    }
    Ok(())
}

fn take_string(object: &mut Map<String, Value>, field: &str) -> Result<Option<String>, EventError> {
    match object.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(EventError::new(field, "must be a string")),
    }
}

fn missing(field: &str) -> EventError {
    EventError::new(field, "is required")
}

/// RFC 3339 (strictly), or a date-time without an offset, taken as UTC (Python's `isoformat()` of
/// a naive datetime, with a `T` or a space between date and time).
fn parse_timestamp(text: &str) -> Result<i64, EventError> {
    let parsed = OffsetDateTime::parse(text, &Rfc3339).or_else(|error| {
        let normalized = text.replacen(' ', "T", 1);
        // Without an offset: no `Z` and no sign after the date. Anything else must have parsed.
        let has_offset =
            normalized.split_once('T').is_none_or(|(_, time)| time.contains(['Z', 'z', '+', '-']));
        if has_offset {
            return Err(error);
        }
        OffsetDateTime::parse(&format!("{normalized}Z"), &Rfc3339)
    });
    parsed.map(|timestamp| (timestamp.unix_timestamp_nanos() / 1000) as i64).map_err(|_| {
        EventError::new("timestamp", format!("{text:?} is not an RFC 3339 / ISO 8601 date-time"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn convert(value: Value) -> Result<Event, EventError> {
        event_from_json(value, &Registry::built_in())
    }

    #[test]
    fn flat_and_nested_shapes_give_the_same_event() {
        let id = "0190b6d8-2f6a-7c3e-9f00-000000000001";
        let flat = json!({"user_id": "u1", "service_type": "llm_service", "service_provider": "openai",
            "event_id": id, "timestamp": "2024-01-15T10:30:00Z", "model": "gpt-4",
            "input_tokens": 150, "output_tokens": 75, "latency_ms": 2500, "temperature": 0.7});
        let nested = json!({"user_id": "u1", "service_type": "llm_service", "service_provider": "openai",
            "event_id": id, "timestamp": "2024-01-15T10:30:00", "event_type": "completion",
            "metadata": {"model": "gpt-4", "temperature": 0.7},
            "metrics": {"input_tokens": 150, "output_tokens": 75, "latency_ms": 2500}});
        let (flat, mut nested) = (convert(flat).expect("flat"), convert(nested).expect("nested"));
        // Only what the caller sent differs: the nested one named the model in `metadata`.
        assert_eq!(caller_view(&nested), json!({"j": ["temperature"], "mm": true}));
        assert_eq!(caller_view(&flat), json!({"j": ["temperature"]}));
        let mut flat = flat;
        for event in [&mut flat, &mut nested] {
            event.extra.as_mut().expect("extra").metadata.retain(|entry| entry.key != CALLER_KEY);
        }
        assert_eq!(flat, nested);
        assert_eq!(flat.model.as_deref(), Some("gpt-4"));
        assert_eq!(flat.quantity(QuantityKind::InputTokens), Some(150.0));
        assert_eq!(flat.latency_ms, Some(2500.0));
        assert_eq!(flat.event_type, "completion");
        assert_eq!(flat.timestamp_us, 1_705_314_600_000_000);
    }

    fn caller_view(event: &Event) -> Value {
        let extra = event.extra.as_ref().expect("extra");
        let entry = extra.metadata.iter().find(|entry| entry.key == CALLER_KEY).expect("the caller's view");
        serde_json::from_str(&entry.value).expect("json")
    }

    #[test]
    fn nulls_are_absent_and_text_metrics_are_dimensions() {
        let event = convert(json!({"user_id": "u", "service_type": "document_processor",
            "service_provider": "docai", "tenant_id": null, "tags": null, "session_id": null,
            "metadata": {"document_type": "invoice", "processing_type": "ocr", "file_format": null, "accuracy": 0.98},
            "metrics": {"pages_processed": 5, "characters_extracted": null, "processing_time_ms": 250,
                "model_version": "v2.1", "flags": [1, 2], "latency_ms": null},
            "file_size_bytes": null}))
        .expect("nulls are absent");
        assert_eq!(event.quantity(QuantityKind::Pages), Some(5.0));
        assert_eq!(event.quantity(QuantityKind::Characters), None);
        assert_eq!(event.latency_ms, Some(250.0));
        let extra = event.extra.as_ref().expect("extra");
        let value = |key: &str| extra.metadata.iter().find(|e| e.key == key).map(|e| e.value.as_str());
        assert_eq!(value("model_version"), Some("v2.1"));
        assert_eq!(value("flags"), Some("[1,2]"));
        assert_eq!(value("accuracy"), Some("0.98"));
        assert_eq!(value("file_format"), None);
        assert_eq!(
            caller_view(&event),
            json!({"m": {"pages_processed": 5, "processing_time_ms": 250, "model_version": null, "flags": null},
                "j": ["accuracy", "flags"]})
        );
        let reserved = convert(json!({"user_id": "u", "service_type": "custom", "service_provider": "p",
            "event_type": "e", "metadata": {"$caller": "x"}}));
        assert_eq!(reserved.expect_err("reserved").field, "metadata.$caller");
        let typed = convert(json!({"user_id": "u", "service_type": "custom", "service_provider": "p",
            "event_type": "e", "metrics": {"input_tokens": "12"}}));
        assert_eq!(typed.expect_err("a quantity must be a number").field, "metrics.input_tokens");
    }

    #[test]
    fn timestamps_are_rfc3339_or_without_an_offset() {
        for good in [
            "2024-01-15T10:30:00Z",
            "2024-01-15T10:30:00.5+02:00",
            "2024-01-15T10:30:00",
            "2024-01-15 10:30:00.123456",
        ] {
            assert!(parse_timestamp(good).is_ok(), "{good}");
        }
        for bad in [
            "2024-01-15T10:30:00ZZZZ",
            "2024-01-15T10:30:00ZZ",
            "2024-01-15T10:30:00+02",
            "2024-01-15",
            "2024-01-15T10:30:00Zjunk",
            "soon",
        ] {
            assert!(parse_timestamp(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn typed_fields_map_to_quantities_and_metadata() {
        let event = convert(json!({"user_id": "u", "service_type": "document_processor",
            "service_provider": "docai", "document_type": "invoice", "processing_type": "ocr",
            "pages_processed": 5, "file_size_bytes": 1024}))
        .expect("document event");
        assert_eq!(event.quantity(QuantityKind::Pages), Some(5.0));
        assert_eq!(event.quantity(QuantityKind::Bytes), Some(1024.0));
        assert_eq!(event.event_type, "processing");
        let api = convert(json!({"user_id": "u", "service_type": "api_service", "service_provider": "p",
            "endpoint": "/v1/x", "method": "GET", "status_code": 503}))
        .expect("api event");
        assert_eq!(api.quantity(QuantityKind::Requests), Some(1.0));
        assert_eq!(api.status, Status::Error);
    }

    #[test]
    fn errors_name_the_field() {
        let base =
            || json!({"user_id": "u", "service_type": "custom", "service_provider": "p", "event_type": "e"});
        let mut unknown = base();
        unknown["input_token"] = json!(3);
        assert_eq!(convert(unknown).expect_err("typo").field, "input_token");
        // Found by the event_json fuzz target: the error for an empty key named no field.
        let mut empty_key = base();
        empty_key[""] = json!({"images": 3});
        let error = convert(empty_key).expect_err("empty key");
        assert_eq!(
            (error.field.as_str(), error.reason.as_str()),
            ("event", "has a field with an empty name")
        );
        // Found by the property test: a NUL under the empty key was reported as `event_id`.
        let mut nul_under_empty_key = base();
        nul_under_empty_key[""] = json!({"event_id": "a\0b"});
        assert_eq!(convert(nul_under_empty_key).expect_err("empty key").field, "event");
        let mut negative = base();
        negative["metrics"] = json!({"images": -1});
        assert_eq!(convert(negative).expect_err("negative").field, "images");
        let mut bad_time = base();
        bad_time["timestamp"] = json!("yesterday");
        assert_eq!(convert(bad_time).expect_err("time").field, "timestamp");
        let mut no_user = base();
        no_user.as_object_mut().expect("object").remove("user_id");
        assert_eq!(convert(no_user).expect_err("user").field, "user_id");
        let mut bad_text = base();
        bad_text["user_id"] = json!(42);
        assert_eq!(convert(bad_text).expect_err("type").field, "user_id");
    }
}
