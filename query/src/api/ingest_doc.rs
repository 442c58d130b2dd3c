//! The OpenAPI document of the ingest port (`:8000/docs`, as the older gateway had): the ingest
//! endpoints, which the edge serves (their handlers live in `edge`; the functions here only carry
//! the documentation), and the usage listing, which this crate serves there too.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use super::schema::ErrorBody;

/// The ingest port's document.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Tally ingest API",
        description = "Usage events in, over HTTP/JSON (the binary \
        protocol is on port 7000), and the usage listing. Every endpoint needs an API key: \
        `X-API-Key: <key>`, `Authorization: Bearer <key>` or `Authorization: <key>`. The full \
        query API is on the query port (8002)."
    ),
    paths(ingest_event, ingest_batch, super::listing::list_usage),
    components(schemas(ErrorBody, IngestEvent, IngestAnswer, BatchRequest, BatchAnswer, FailedEvent))
)]
pub struct IngestDoc;

/// One usage event, flat (`"model": "gpt-4", "input_tokens": 150`) or nested (`"metadata":
/// {"model": ...}, "metrics": {"input_tokens": ...}`). `null` for any optional field means absent.
#[derive(Debug, Serialize, ToSchema)]
pub struct IngestEvent {
    /// Optional; must be the API key's tenant (by name or id) when given.
    pub tenant_id: Option<String>,
    pub user_id: String,
    /// `llm_service`, `document_processor`, `api_service`, `custom`, a registered type, or any
    /// other name (a custom event, unless the tenant sets `require_registered_services`).
    pub service_type: String,
    pub service_provider: String,
    /// Defaults per built-in type (`completion`, `processing`, `request`); required otherwise.
    pub event_type: Option<String>,
    /// A UUID; send your own so that a retry is stored once.
    pub event_id: Option<String>,
    /// RFC 3339, or without an offset (UTC). Default: now.
    pub timestamp: Option<String>,
    /// Numbers are quantities (`input_tokens`, `pages_processed`, custom names), `latency_ms`
    /// (`response_time_ms`, `processing_time_ms`) a latency; other values are dimensions.
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<BTreeMap<String, serde_json::Value>>,
    /// Free-form; `model` here is the event's model.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<BTreeMap<String, serde_json::Value>>,
    pub tags: Option<Vec<String>>,
    pub session_id: Option<String>,
    pub request_id: Option<String>,
}

/// The answer for one event.
#[derive(Debug, Serialize, ToSchema)]
pub struct IngestAnswer {
    pub success: bool,
    pub event_id: String,
    /// `stored`, `duplicate` (stored before, not counted again) or `accepted` (`?ack=accepted`).
    pub status: String,
    pub message: String,
}

/// A batch of events.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchRequest {
    /// 1 to `MAX_BATCH_SIZE` (default 1,000) events.
    pub events: Vec<IngestEvent>,
}

/// A rejected event of a batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct FailedEvent {
    pub index: usize,
    pub error: String,
    /// The event as sent.
    #[schema(value_type = Object)]
    pub event_data: serde_json::Value,
}

/// The answer for a batch: 200 when at least one event was stored (the others are in
/// `failed_events`), 400 when every event was rejected.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchAnswer {
    pub success: bool,
    pub processed_count: usize,
    pub failed_count: usize,
    pub failed_events: Vec<FailedEvent>,
    /// One entry per event, in order: `index`, `event_id`, `status`, and `error` when rejected.
    #[schema(value_type = Vec<Object>)]
    pub results: Vec<serde_json::Value>,
    pub message: String,
}

/// Stores one event; the answer is sent once it is committed (`?ack=accepted`: once queued, 202).
#[utoipa::path(
    post,
    path = "/api/v1/events",
    tag = "ingest",
    request_body = IngestEvent,
    params(("ack" = Option<String>, Query, description = "`durable` (default) or `accepted`")),
    responses(
        (status = 200, body = IngestAnswer),
        (status = 202, body = IngestAnswer, description = "queued (`ack=accepted`)"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 429, body = ErrorBody, description = "rate limit or quota; see Retry-After"),
        (status = 503, body = ErrorBody, description = "busy or storage down; see Retry-After")
    )
)]
pub async fn ingest_event() {}

/// Stores a batch; each event is checked alone.
#[utoipa::path(
    post,
    path = "/api/v1/events/batch",
    tag = "ingest",
    request_body = BatchRequest,
    params(("ack" = Option<String>, Query, description = "`durable` (default) or `accepted`")),
    responses(
        (status = 200, body = BatchAnswer, description = "stored, wholly or in part"),
        (status = 202, body = BatchAnswer, description = "queued (`ack=accepted`)"),
        (status = 400, body = ErrorBody, description = "every event rejected, an empty batch, or more than MAX_BATCH_SIZE events"),
        (status = 401, body = ErrorBody),
        (status = 413, body = ErrorBody, description = "the body exceeds the byte limit"),
        (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody)
    )
)]
pub async fn ingest_batch() {}

#[cfg(test)]
mod tests {
    #[test]
    fn documents_ingest_and_the_listing() {
        use utoipa::OpenApi;
        let document = super::IngestDoc::openapi();
        for path in ["/api/v1/events", "/api/v1/events/batch", "/api/v1/usage"] {
            assert!(document.paths.paths.contains_key(path), "{path} is not documented");
        }
    }
}
