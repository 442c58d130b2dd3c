//! Events as JSON for the edge's HTTP API (the older system's nested shape: `metadata` and
//! `metrics` objects), and the answers read back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::macros::format_description;
use wire::{Event, Status};

use crate::ledger::Answer;

#[derive(Serialize)]
struct JsonEvent<'a> {
    event_id: uuid::Uuid,
    timestamp: String,
    user_id: &'a str,
    service_type: &'a str,
    service_provider: &'a str,
    event_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    metrics: BTreeMap<&'a str, f64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    tags: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

impl<'a> JsonEvent<'a> {
    fn of(event: &'a Event) -> JsonEvent<'a> {
        let extra = event.extra.as_deref();
        let mut metrics: BTreeMap<&str, f64> =
            event.quantities.iter().map(|quantity| (quantity.kind.as_str(), quantity.value)).collect();
        let mut metadata = BTreeMap::new();
        if let Some(extra) = extra {
            metrics.extend(
                extra.custom_quantities.iter().map(|quantity| (quantity.name.as_str(), quantity.value)),
            );
            metadata.extend(extra.metadata.iter().map(|entry| (entry.key.as_str(), entry.value.as_str())));
        }
        JsonEvent {
            event_id: event.id(),
            timestamp: rfc3339(event.timestamp_us),
            user_id: &event.user_id,
            service_type: &event.service_type,
            service_provider: &event.service_provider,
            event_type: &event.event_type,
            model: event.model.as_deref(),
            status: if event.status == Status::Error { "error" } else { "success" },
            error_code: extra.and_then(|extra| extra.error_code.as_deref()),
            latency_ms: event.latency_ms,
            metadata,
            metrics,
            tags: extra.map_or(&[], |extra| &extra.tags[..]),
            session_id: extra.and_then(|extra| extra.session_id.as_deref()),
            request_id: extra.and_then(|extra| extra.request_id.as_deref()),
        }
    }
}

/// `2026-01-15T10:30:00.123456Z`: microseconds, so the stored timestamp is the event's own.
pub fn rfc3339(timestamp_us: i64) -> String {
    let format = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(timestamp_us) * 1000)
        .ok()
        .and_then(|time| time.format(&format).ok())
        .unwrap_or_default()
}

/// One event, the body of `POST /api/v1/events`.
pub fn write_event(event: &Event, out: &mut Vec<u8>) {
    // Serialising plain strings and finite numbers into a Vec cannot fail.
    let _ = serde_json::to_writer(out, &JsonEvent::of(event));
}

/// `{"events": [...]}`, the body of `POST /api/v1/events/batch`.
pub fn write_batch(events: &[Event], out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"events\":[");
    for (index, event) in events.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        write_event(event, out);
    }
    out.extend_from_slice(b"]}");
}

#[derive(Deserialize)]
struct BatchBody {
    stored_count: u64,
    duplicate_count: u64,
    #[serde(default)]
    accepted_count: u64,
    #[serde(default)]
    failed_events: Vec<FailedEvent>,
}

#[derive(Deserialize)]
struct FailedEvent {
    index: u32,
    error: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    detail: String,
}

#[derive(Deserialize)]
struct SingleBody {
    status: String,
}

/// What a response means for the events sent: a final answer, or a reason to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    Final(Answer),
    /// Busy, unavailable or rate limited: nothing was stored; send the same body again later.
    Retry {
        after_s: u64,
        reason: String,
    },
}

/// Reads a response of `POST /api/v1/events/batch` for `events` events.
pub fn read_batch(status: u16, retry_after_s: Option<u64>, body: &[u8], events: usize) -> Reading {
    match status {
        200 | 207 | 400 => match serde_json::from_slice::<BatchBody>(body) {
            Ok(batch) => {
                let rejected: Vec<(u32, String)> =
                    batch.failed_events.into_iter().map(|failed| (failed.index, failed.error)).collect();
                let accounted = batch.stored_count + batch.duplicate_count + rejected.len() as u64;
                if batch.accepted_count > 0 || accounted != events as u64 {
                    let message = format!(
                        "answer counts {accounted} of {events} events as stored, duplicate or rejected"
                    );
                    return Reading::Final(Answer::Failed(message));
                }
                Reading::Final(Answer::Acked {
                    stored: batch.stored_count,
                    duplicate: batch.duplicate_count,
                    rejected,
                })
            }
            Err(_) => Reading::Final(Answer::Failed(error_text(status, body))),
        },
        _ => not_ok(status, retry_after_s, body),
    }
}

/// Reads a response of `POST /api/v1/events` (one event).
pub fn read_single(status: u16, retry_after_s: Option<u64>, body: &[u8]) -> Reading {
    match status {
        200 => match serde_json::from_slice::<SingleBody>(body).map(|body| body.status) {
            Ok(status) if status == "stored" => {
                Reading::Final(Answer::Acked { stored: 1, duplicate: 0, rejected: Vec::new() })
            }
            Ok(status) if status == "duplicate" => {
                Reading::Final(Answer::Acked { stored: 0, duplicate: 1, rejected: Vec::new() })
            }
            _ => Reading::Final(Answer::Failed(error_text(status, body))),
        },
        400 => match serde_json::from_slice::<ErrorBody>(body) {
            Ok(error) if error.error == "invalid_event" => {
                Reading::Final(Answer::Acked { stored: 0, duplicate: 0, rejected: vec![(0, error.detail)] })
            }
            _ => Reading::Final(Answer::Failed(error_text(status, body))),
        },
        _ => not_ok(status, retry_after_s, body),
    }
}

fn not_ok(status: u16, retry_after_s: Option<u64>, body: &[u8]) -> Reading {
    match status {
        429 | 503 => Reading::Retry { after_s: retry_after_s.unwrap_or(1), reason: error_text(status, body) },
        _ => Reading::Final(Answer::Failed(error_text(status, body))),
    }
}

fn error_text(status: u16, body: &[u8]) -> String {
    let body = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    format!("HTTP {status}: {body}")
}

#[cfg(test)]
mod tests {
    use wire::QuantityKind;

    use super::*;

    #[test]
    fn events_use_the_nested_shape() {
        let event = Event::new("u1", "document_processor", "docai", "processing")
            .at(1_705_314_600_123_456)
            .with_metadata("document_type", "invoice")
            .with_quantity(QuantityKind::Pages, 3.0)
            .with_custom_quantity("images", 2.5)
            .with_error(Some("timeout".into()))
            .with_latency_ms(12.5);
        let mut out = Vec::new();
        write_batch(std::slice::from_ref(&event), &mut out);
        let value: serde_json::Value = serde_json::from_slice(&out).expect("json");
        let json = &value["events"][0];
        assert_eq!(json["event_id"], event.id().to_string());
        assert_eq!(json["timestamp"], "2024-01-15T10:30:00.123456Z");
        assert_eq!(json["metrics"]["pages"], 3.0);
        assert_eq!(json["metrics"]["images"], 2.5);
        assert_eq!(json["metadata"]["document_type"], "invoice");
        assert_eq!((json["status"].as_str(), json["error_code"].as_str()), (Some("error"), Some("timeout")));
        assert!(json.get("model").is_none());
    }

    #[test]
    fn batch_answers_are_checked_for_completeness() {
        let body = br#"{"stored_count":2,"duplicate_count":1,"accepted_count":0,"failed_events":[{"index":3,"error":"pages: negative","event_data":{}}],"results":[]}"#;
        let expected =
            Answer::Acked { stored: 2, duplicate: 1, rejected: vec![(3, "pages: negative".into())] };
        assert_eq!(read_batch(207, None, body, 4), Reading::Final(expected));
        assert!(matches!(read_batch(207, None, body, 5), Reading::Final(Answer::Failed(_))));
        assert!(matches!(read_batch(503, Some(2), b"{}", 5), Reading::Retry { after_s: 2, .. }));
        assert!(matches!(
            read_batch(400, None, br#"{"error":"bad_frame"}"#, 1),
            Reading::Final(Answer::Failed(_))
        ));
    }

    #[test]
    fn single_answers() {
        let stored = read_single(200, None, br#"{"success":true,"status":"stored"}"#);
        assert_eq!(stored, Reading::Final(Answer::Acked { stored: 1, duplicate: 0, rejected: Vec::new() }));
        let rejected = read_single(400, None, br#"{"error":"invalid_event","detail":"model: is required"}"#);
        assert_eq!(
            rejected,
            Reading::Final(Answer::Acked {
                stored: 0,
                duplicate: 0,
                rejected: vec![(0, "model: is required".into())]
            })
        );
        assert!(matches!(
            read_single(401, None, br#"{"error":"invalid_api_key"}"#),
            Reading::Final(Answer::Failed(_))
        ));
    }
}
