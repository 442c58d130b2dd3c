//! The HTTP API of the edge, with the older system's paths, fields and error bodies.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use sink::{Scope, WhenFull};
use wire::{AckMode, ErrorCode};

use crate::EdgeState;
use crate::auth::{AuthError, Caller};
use crate::ingest::{EventStatus, IngestError};
use crate::json::{BodyError, batch_events, body_value, event_from_json, tenant_of};

/// The router, with its state. Tests drive it with `oneshot` and no socket.
pub fn router(state: Arc<EdgeState>) -> Router {
    let body_limit = state.config.http_body_bytes_max;
    Router::new()
        .route("/api/v1/events", post(ingest_one))
        .route("/api/v1/events/batch", post(ingest_batch))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(crate::series::metrics_text))
        .merge(crate::admin::routes())
        .layer(axum::middleware::from_fn(crate::series::record_request))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .layer(axum::middleware::from_fn(|request, next| serve::json_errors(request, next, plain_error)))
        .with_state(state)
}

/// The error code and detail of a plain answer (see `serve::json_errors`); server errors never
/// show their text.
fn plain_error(status: StatusCode, text: String) -> (&'static str, String) {
    let error = match status.as_u16() {
        400 | 422 => "invalid_request",
        401 => "authentication_required",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "timeout",
        413 => "too_large",
        415 => "unsupported_media_type",
        429 => "rate_limited",
        503 => "unavailable",
        _ if status.is_server_error() => "internal",
        _ => "invalid_request",
    };
    let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
    let detail = match status.as_u16() {
        _ if status.is_server_error() => reason,
        413 => format!("the request body is too large: {}", if text.is_empty() { reason } else { text }),
        _ if text.is_empty() => reason,
        _ => text,
    };
    (error, detail)
}

/// An error answer: the status from the code, and a JSON body in the older system's shape.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    body: Value,
    retry_after_s: Option<u32>,
    status: Option<StatusCode>,
}

impl ApiError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> ApiError {
        ApiError {
            code,
            body: json!({"error": code.as_str(), "detail": detail.into()}),
            retry_after_s: None,
            status: None,
        }
    }

    /// An answer whose status is not one of an error code's (404, 409).
    pub fn with_status(status: StatusCode, error: &str, detail: impl Into<String>) -> ApiError {
        ApiError { status: Some(status), ..ApiError::new(ErrorCode::InvalidEvent, detail) }.named(error)
    }

    fn named(mut self, error: &str) -> ApiError {
        self.body["error"] = json!(error);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status.unwrap_or_else(|| {
            StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        });
        let mut response = (status, Json(self.body)).into_response();
        if let Some(seconds) = self.retry_after_s {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> ApiError {
        metrics::counter!("tally_auth_failures_total", "transport" => "http").increment(1);
        match error {
            // The older system's exact bodies, which callers match on.
            AuthError::Missing => ApiError {
                code: ErrorCode::Unauthorized,
                body: json!({"error": "authentication_required", "detail": error.to_string()}),
                retry_after_s: None,
                status: None,
            },
            AuthError::Invalid => ApiError {
                code: ErrorCode::Unauthorized,
                body: json!({"error": "invalid_api_key", "detail": error.to_string()}),
                retry_after_s: None,
                status: None,
            },
            AuthError::Unavailable(store) => {
                tracing::warn!(error = %store, "failed to look up an API key");
                ApiError::new(ErrorCode::Unavailable, "cannot check the API key now; retry later")
            }
            other => ApiError::new(other.code(), other.to_string()),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(error: IngestError) -> ApiError {
        let retry_after_s = match &error {
            IngestError::Busy { retry_after_ms } | IngestError::RateLimited { retry_after_ms } => {
                Some(retry_after_ms.div_ceil(1000))
            }
            IngestError::QuotaExceeded(_) => None,
            IngestError::ShuttingDown | IngestError::Storage(_) => Some(1),
        };
        ApiError { retry_after_s, ..ApiError::new(error.code(), error.public_message()) }
    }
}

/// The API key from `X-API-Key`, or `Authorization: <key>` / `Authorization: Bearer <key>`.
pub fn api_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("x-api-key").and_then(|value| value.to_str().ok()) {
        return Some(key);
    }
    let authorization = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    Some(strip_bearer(authorization))
}

/// `<key>` of `Bearer <key>`, the scheme in any case (RFC 9110 §11.1); other values unchanged.
pub fn strip_bearer(authorization: &str) -> &str {
    match authorization.split_once(' ') {
        Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim_start(),
        _ => authorization,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestParams {
    /// `durable` (default): answer after commit. `accepted`: answer after queueing.
    ack: Option<String>,
}

impl IngestParams {
    fn ack_mode(&self) -> Result<AckMode, ApiError> {
        match self.ack.as_deref() {
            None | Some("durable") => Ok(AckMode::Durable),
            Some("accepted") => Ok(AckMode::Accepted),
            Some(other) => Err(ApiError::new(
                ErrorCode::InvalidEvent,
                format!("ack: {other:?} is not one of durable, accepted"),
            )),
        }
    }
}

impl From<BodyError> for ApiError {
    fn from(error: BodyError) -> ApiError {
        ApiError::new(error.code(), error.to_string())
    }
}

/// A body's `tenant_id`, where given, must be the key's tenant (by id or name).
fn check_tenant(caller: &Caller, events: &[Value]) -> Result<(), ApiError> {
    for (index, event) in events.iter().enumerate() {
        let tenant = tenant_of(event).map_err(|error| {
            ApiError::new(
                ErrorCode::InvalidEvent,
                format!("events[{index}].{}: {}", error.field, error.reason),
            )
        })?;
        if let Some(tenant) = tenant
            && tenant != caller.tenant_name
            && tenant != caller.tenant_id.to_string()
        {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("events[{index}].tenant_id {tenant:?} is not the tenant of this API key"),
            ));
        }
    }
    Ok(())
}

async fn ingest(
    state: &EdgeState,
    headers: &HeaderMap,
    params: &IngestParams,
    events: Vec<Value>,
) -> Result<(Vec<Option<uuid::Uuid>>, Vec<EventStatus>), ApiError> {
    let started = std::time::Instant::now();
    let ack_mode = params.ack_mode()?;
    let caller = state.auth.authenticate(api_key(headers), Scope::Ingest).await?;
    check_tenant(&caller, &events)?;
    let (context, over_quota) = state.ingestor.admit(&caller, events.len()).await?;
    let registry = &context.registry;
    let converted: Vec<_> = events.into_iter().map(|event| event_from_json(event, registry)).collect();
    let ids = converted.iter().map(|event| event.as_ref().ok().map(wire::Event::id)).collect();
    let prepared = state.ingestor.prepare(&context, over_quota, converted);
    metrics::counter!("tally_events_received_total", "protocol" => "http").increment(prepared.len() as u64);
    let shard_hint = state.next_shard();
    let when_full = if state.config.overflow.is_some() { WhenFull::Overflow } else { WhenFull::Reject };
    let statuses = state.ingestor.submit(prepared, ack_mode, when_full, shard_hint).await?;
    crate::series::record_ack("http", ack_mode, started);
    Ok((ids, statuses))
}

async fn ingest_one(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Query(params): Query<IngestParams>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let event = body_value(&body)?;
    let (ids, mut statuses) = ingest(&state, &headers, &params, vec![event]).await?;
    let event_id = ids.into_iter().next().flatten().map(|id| id.to_string());
    let (status, message, result) = match statuses.pop() {
        Some(EventStatus::Stored) => (StatusCode::OK, "event stored", "stored"),
        Some(EventStatus::Duplicate) => {
            (StatusCode::OK, "event was stored before; not counted again", "duplicate")
        }
        Some(EventStatus::Accepted) => (StatusCode::ACCEPTED, "event accepted for storage", "accepted"),
        Some(EventStatus::Rejected { code, message }) => return Err(ApiError::new(code, message)),
        None => return Err(ApiError::new(ErrorCode::Internal, "no result for the event")),
    };
    let body = json!({"success": true, "event_id": event_id, "status": result, "message": message});
    Ok((status, Json(body)).into_response())
}

async fn ingest_batch(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Query(params): Query<IngestParams>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let events = batch_events(&body, state.config.http_batch_events_max)?;
    let originals: Vec<Value> = events.clone();
    let (ids, statuses) = ingest(&state, &headers, &params, events).await?;
    Ok(batch_response(originals, ids, statuses))
}

fn batch_response(
    originals: Vec<Value>,
    ids: Vec<Option<uuid::Uuid>>,
    statuses: Vec<EventStatus>,
) -> Response {
    let (mut stored, mut duplicate, mut accepted) = (0, 0, 0);
    let mut results = Vec::with_capacity(statuses.len());
    let mut failed = Vec::new();
    for (index, ((status, id), original)) in statuses.into_iter().zip(ids).zip(originals).enumerate() {
        let id = id.map(|id| id.to_string());
        match status {
            EventStatus::Stored => stored += 1,
            EventStatus::Duplicate => duplicate += 1,
            EventStatus::Accepted => accepted += 1,
            EventStatus::Rejected { code, message } => {
                results.push(json!({"index": index, "event_id": id, "status": "rejected", "error": message, "code": code.as_str()}));
                failed.push(json!({"index": index, "error": message, "event_data": original}));
                continue;
            }
        }
        results.push(json!({"index": index, "event_id": id, "status": status_name(&status)}));
    }
    let processed = stored + duplicate + accepted;
    // A partly rejected batch is 200 (the older SDK retries the whole batch on anything else);
    // `failed_events` says which events to fix. Only a batch rejected whole is 400.
    let status = match (processed, failed.len()) {
        (_, 0) if accepted > 0 => StatusCode::ACCEPTED,
        (0, _) => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    };
    let message =
        format!("{stored} stored, {duplicate} duplicate, {accepted} accepted, {} rejected", failed.len());
    let body = json!({
        "success": failed.is_empty(),
        "processed_count": processed,
        "stored_count": stored,
        "duplicate_count": duplicate,
        "accepted_count": accepted,
        "failed_count": failed.len(),
        "failed_events": failed,
        "results": results,
        "message": message,
    });
    (status, Json(body)).into_response()
}

fn status_name(status: &EventStatus) -> &'static str {
    match status {
        EventStatus::Stored => "stored",
        EventStatus::Duplicate => "duplicate",
        EventStatus::Accepted => "accepted",
        EventStatus::Rejected { .. } => "rejected",
    }
}

/// Liveness, in the older system's shape: `status` `healthy` (or `unhealthy` when a dependency
/// is down), `timestamp`, and each dependency's state under `services`. Always 200: whether to
/// send traffic here is `/ready`'s answer.
async fn health(State(state): State<Arc<EdgeState>>) -> Json<Value> {
    let database = match tokio::time::timeout(Duration::from_secs(1), state.store.ping()).await {
        Ok(Ok(())) => "healthy",
        _ => "unhealthy",
    };
    let queue = if state.ingestor.queue().is_saturated() { "saturated" } else { "healthy" };
    let redis = if state.config.overflow.is_some() { "configured" } else { "not_configured" };
    let status = if database == "healthy" { "healthy" } else { "unhealthy" };
    Json(json!({
        "status": status,
        "timestamp": now_rfc3339(),
        "service": "tally-edge",
        "version": env!("CARGO_PKG_VERSION"),
        "services": {"database": database, "queue": queue, "redis": redis},
    }))
}

/// Now, as RFC 3339 in UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Ready when storage answers within a second and the queues are not saturated.
async fn ready(State(state): State<Arc<EdgeState>>) -> Response {
    let storage = match tokio::time::timeout(Duration::from_secs(1), state.store.ping()).await {
        Ok(Ok(())) => json!({"status": "ok"}),
        Ok(Err(error)) => json!({"status": "down", "detail": error.to_string()}),
        Err(_) => json!({"status": "down", "detail": "no answer within 1 s"}),
    };
    let queue = state.ingestor.queue();
    let saturated = queue.is_saturated();
    let queue_status = json!({
        "status": if saturated { "saturated" } else { "ok" },
        "events_queued": queue.events_queued(),
        "events_max": queue.events_max(),
    });
    // A worker whose commit has run for half the commit deadline is as good as down.
    let (down, stalled) =
        (state.workers.workers_down(), state.workers.workers_stalled(state.config.batch.commit_timeout / 2));
    let workers = json!({
        "status": if down + stalled == 0 { "ok" } else { "down" },
        "workers": state.config.queue.shards,
        "down": down,
        "stalled": stalled,
    });
    let is_ready = storage["status"] == "ok" && !saturated && down + stalled == 0;
    let status = if is_ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({"status": if is_ready { "ready" } else { "not_ready" },
        "components": {"storage": storage, "queue": queue_status, "sink_workers": workers}});
    (status, Json(body)).into_response()
}
