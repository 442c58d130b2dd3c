//! The HTTP API: routes, the OpenAPI document, and what every handler shares: typed parameters
//! ([`params`]), authentication and the time range ([`tenant`]), the response cache.
//!
//! Areas: [`usage`] (the older `/api/v1/usage*` endpoints), [`listing`] (the raw event listing
//! and its JSON/CSV streaming), [`analytics`] (`/api/v1/analytics/*`), [`billing`]
//! (`/api/v1/billing/summary`).

pub mod analytics;
pub mod billing;
pub mod ingest_doc;
pub mod listing;
pub mod params;
pub mod schema;
pub mod tenant;
pub mod usage;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, State};
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::OpenApi;

use crate::QueryState;
use crate::auth::Caller;
use crate::cache::{CacheLevel, ResponseCache};
use crate::error::ApiError;

/// Every endpoint: data, documentation, operations, and the dashboard ([`crate::ui`]) at
/// `/ui/` (with `/` redirecting there).
pub fn router(state: Arc<QueryState>) -> Router {
    let docs = utoipa_swagger_ui::SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi());
    data_routes()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .layer(axum::middleware::from_fn(record_request))
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .with_state(state.clone())
        .merge(docs)
        // Explicit, so that the merged router keeps this fallback, with the JSON errors layer.
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(axum::middleware::from_fn(|request, next| {
            serve::json_errors(request, next, crate::error::plain_error)
        }))
        .merge(crate::ui::routes(state))
}

/// The data endpoints alone, as [`router`] serves them: what the dashboard asks in process.
pub(crate) fn data_router(state: Arc<QueryState>) -> Router {
    data_routes()
        .layer(axum::middleware::from_fn(record_request))
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .with_state(state)
}

fn data_routes() -> Router<Arc<QueryState>> {
    Router::new()
        .route("/api/v1/usage", get(listing::list_usage))
        .route("/api/v1/usage/aggregate", get(usage::aggregate))
        .route("/api/v1/usage/by-service", get(usage::by_service))
        .route("/api/v1/usage/costs", get(usage::costs))
        .route("/api/v1/analytics/trends", get(analytics::trends))
        .route("/api/v1/analytics/top-users", get(analytics::top_users))
        .route("/api/v1/analytics/breakdown", get(analytics::breakdown))
        .route("/api/v1/analytics/compare", get(analytics::compare))
        .route("/api/v1/analytics/errors", get(analytics::errors))
        .route("/api/v1/billing/summary", get(billing::summary))
}

/// What the older gateway served on the ingest port besides ingest, for the edge to mount there:
/// `GET /api/v1/usage` (the older SDK's `get_usage` calls the ingest port), and `/docs` with
/// `/openapi.json` documenting that port (ingest and the listing).
pub fn usage_routes(state: Arc<QueryState>) -> Router {
    let docs =
        utoipa_swagger_ui::SwaggerUi::new("/docs").url("/openapi.json", ingest_doc::IngestDoc::openapi());
    Router::new()
        .route("/api/v1/usage", get(listing::list_usage))
        .layer(axum::middleware::from_fn(record_request))
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .with_state(state)
        .merge(docs)
        .layer(axum::middleware::from_fn(|request, next| {
            serve::json_errors(request, next, crate::error::plain_error)
        }))
}

/// The OpenAPI 3 document, generated from the handlers and types.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Tally query API", description = "Usage listings, aggregates and analytics. Every data \
        endpoint needs an API key with the `query` scope (X-API-Key or Authorization) and answers for that \
        key's tenant only."),
    paths(
        listing::list_usage,
        usage::aggregate,
        usage::by_service,
        usage::costs,
        analytics::trends,
        analytics::top_users,
        analytics::breakdown,
        analytics::compare,
        analytics::errors,
        billing::summary,
        health,
        ready,
    ),
    components(schemas(schema::ErrorBody)),
    modifiers(&ApiKeySecurity),
    security(("api_key" = []))
)]
pub struct ApiDoc;

#[derive(Debug)]
struct ApiKeySecurity;

impl utoipa::Modify for ApiKeySecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// The start of the UTC hour holding `at`.
pub fn hour_floor(at: OffsetDateTime) -> OffsetDateTime {
    let at = at.to_offset(time::UtcOffset::UTC);
    at - time::Duration::minutes(i64::from(at.minute()))
        - time::Duration::seconds(i64::from(at.second()))
        - time::Duration::nanoseconds(i64::from(at.nanosecond()))
}

/// The first whole UTC hour at or after `at`; `None` past the last representable instant.
pub fn hour_ceil(at: OffsetDateTime) -> Option<OffsetDateTime> {
    let floor = hour_floor(at);
    if floor == at { Some(at) } else { floor.checked_add(time::Duration::HOUR) }
}

/// Serves `question` of `endpoint` from the cache, or computes, stores and serves it.
pub async fn cached<Q, T, F, Fut>(
    state: &QueryState,
    caller: &Caller,
    endpoint: &str,
    question: &Q,
    compute: F,
) -> Result<Response, ApiError>
where
    Q: Serialize,
    T: Serialize,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let key = ResponseCache::key(caller.tenant_id, endpoint, &(&caller.time_zone, question));
    if let Some(cached) = state.cache.get(&key).await {
        metrics::counter!("tally_query_cache_total", "result" => cached.level.as_str()).increment(1);
        return Ok(json_response(cached.body, cached.level, cached.computed_at_us));
    }
    metrics::counter!("tally_query_cache_total", "result" => "miss").increment(1);
    let computed_at_us = now_us();
    let answer = compute().await?;
    let body =
        Bytes::from(serde_json::to_vec(&answer).map_err(|error| ApiError::Internal(error.to_string()))?);
    state.cache.put(&key, computed_at_us, &body).await;
    Ok(json_response(body, CacheLevel::Miss, computed_at_us))
}

/// Now, in microseconds since the Unix epoch.
pub(crate) fn now_us() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

/// A JSON answer with its freshness: `X-Cache` (where it came from), `X-Data-As-Of` (when its
/// computation started: everything acknowledged before then is counted) and `Age` (seconds since
/// then, as HTTP caches report it).
fn json_response(body: Bytes, level: CacheLevel, computed_at_us: i64) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("x-cache", HeaderValue::from_static(level.as_str()));
    let age_s = (now_us() - computed_at_us).max(0) / 1_000_000;
    headers.insert(header::AGE, HeaderValue::from(age_s));
    let as_of = OffsetDateTime::from_unix_timestamp_nanos(i128::from(computed_at_us) * 1000)
        .ok()
        .and_then(|at| at.format(&time::format_description::well_known::Rfc3339).ok());
    if let Some(value) = as_of.and_then(|text| HeaderValue::from_str(&text).ok()) {
        headers.insert("x-data-as-of", value);
    }
    response
}

/// Counts requests and times them per route.
async fn record_request(request: Request<Body>, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!("tally_query_seconds", "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("tally_query_requests_total", "route" => route, "status" => status).increment(1);
    response
}

/// Liveness, in the older system's shape: `status` `healthy` (`unhealthy` when the database
/// does not answer within a second), `timestamp`, and each dependency's state under `services`.
/// Always 200: whether to send traffic here is `/ready`'s answer.
#[utoipa::path(get, path = "/health", security(()), responses((status = 200, body = schema::HealthBody)))]
pub async fn health(State(state): State<Arc<QueryState>>) -> Json<schema::HealthBody> {
    let database = match tokio::time::timeout(Duration::from_secs(1), state.backend.ping()).await {
        Ok(Ok(())) => "healthy",
        _ => "unhealthy",
    };
    let cache = state.cache.redis_state().await;
    Json(schema::HealthBody {
        status: if database == "healthy" { "healthy" } else { "unhealthy" }.into(),
        timestamp: OffsetDateTime::now_utc(),
        service: "tally-query".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        services: [("database".to_owned(), database.to_owned()), ("redis".to_owned(), cache.to_owned())]
            .into_iter()
            .collect(),
    })
}

/// Readiness: the database answers within a second.
#[utoipa::path(get, path = "/ready", security(()), responses((status = 200), (status = 503)))]
pub async fn ready(State(state): State<Arc<QueryState>>) -> Response {
    let storage = match tokio::time::timeout(Duration::from_secs(1), state.backend.ping()).await {
        Ok(Ok(())) => serde_json::json!({"status": "ok"}),
        Ok(Err(error)) => serde_json::json!({"status": "down", "detail": error.to_string()}),
        Err(_) => serde_json::json!({"status": "down", "detail": "no answer within 1 s"}),
    };
    let is_ready = storage["status"] == "ok";
    let status = if is_ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "status": if is_ready { "ready" } else { "not_ready" },
        "components": {"storage": storage},
    });
    (status, Json(body)).into_response()
}

async fn metrics_text(State(state): State<Arc<QueryState>>) -> Response {
    match &state.config.metrics {
        Some(handle) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            "this process exports no metrics
",
        )
            .into_response(),
    }
}
