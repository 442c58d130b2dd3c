//! Callers of the older Python system keep working (issue 15): the older SDK's call shapes
//! (`track_llm`, `track_document`, `track_api`, `track_custom`, with every optional field `null`),
//! the older README's curl examples and every endpoint of the older API, against an edge and a
//! query service on both backends. Each answer has the older status codes and field names, money
//! as JSON numbers with the exact digits, and the values back under the names sent. Also the
//! hardening of issue 12 that lives in the same code (12.9, 12.12).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use query::{QueryConfig, QueryState};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sink::Scope;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tower::ServiceExt;

use crate::support::{Backend, Location, TestEdge, both_backends, create_key};

/// An edge and a query service over one fresh database, with both HTTP ports as the binaries
/// compose them: the ingest port is the edge's router with the query service's usage routes
/// (`edge::start_with_routes(.., query::usage_routes(..))`), the query port `query::router`.
struct Stack {
    edge: TestEdge,
    query: Arc<QueryState>,
    admin: String,
}

#[derive(Debug, Clone, Copy)]
enum Port {
    Ingest,
    Query,
}

/// An answer: status, content type, body text, and the body as JSON (`Null` if it is not).
struct Answer {
    status: StatusCode,
    content_type: String,
    text: String,
    json: Value,
}

impl Stack {
    async fn start(backend: Backend) -> Result<Stack> {
        Self::with_config(backend, edge::EdgeConfig::default()).await
    }

    async fn with_config(backend: Backend, config: edge::EdgeConfig) -> Result<Stack> {
        let edge = TestEdge::launch(backend, config).await?;
        let config = QueryConfig {
            cache_ttl: Duration::from_millis(1),
            metrics: Some(crate::support::metrics_handle()),
            ..QueryConfig::new(edge.db.url.clone())
        };
        let query = match &edge.db.location {
            Location::Postgres(_) => QueryState::connect(config).await?,
            Location::Sqlite(file) => {
                let backend = query::sqlite::SqliteBackend::open(file.path()).await?;
                QueryState::with_backend(config, Arc::new(backend), None)
            }
        };
        let admin = create_key(&edge.store, &edge.tenant, vec![Scope::Admin]).await?;
        Ok(Stack { edge, query, admin })
    }

    fn router(&self, port: Port) -> Router {
        match port {
            Port::Ingest => edge::http::router(self.edge.edge.state.clone())
                .merge(query::usage_routes(self.query.clone())),
            Port::Query => query::router(self.query.clone()),
        }
    }

    async fn send(
        &self,
        port: Port,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Result<Answer> {
        let mut request = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(body.map_or_else(Body::empty, Body::from))?;
        let response = self.router(port).oneshot(request).await?;
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = axum::body::to_bytes(response.into_body(), 64 << 20).await?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Answer { status, content_type, text, json })
    }

    /// POST JSON to the ingest port with the tenant's key.
    async fn post(&self, path: &str, body: &Value) -> Result<Answer> {
        let key = self.edge.key.clone();
        let headers = [("x-api-key", key.as_str()), ("content-type", "application/json")];
        self.send(Port::Ingest, "POST", path, &headers, Some(body.to_string())).await
    }

    /// GET with the tenant's key.
    async fn get(&self, port: Port, path: &str) -> Result<Answer> {
        let key = self.edge.key.clone();
        self.send(port, "GET", path, &[("x-api-key", key.as_str())], None).await
    }

    /// GET that must answer 200 with JSON.
    async fn ok(&self, port: Port, path: &str) -> Result<Value> {
        let answer = self.get(port, path).await?;
        ensure!(answer.status == StatusCode::OK, "GET {path} on {port:?}: {} {}", answer.status, answer.text);
        Ok(answer.json)
    }
}

/// Python's `datetime.utcnow().isoformat()`: no offset, microseconds.
fn python_iso(time: OffsetDateTime) -> String {
    let text = time.format(&Rfc3339).expect("formats");
    let text = text.trim_end_matches('Z');
    if text.contains('.') { text.to_owned() } else { format!("{text}.000000") }
}

fn uuid4() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// `UsageTracker.track_llm(user_id, model, input_tokens, output_tokens)` with every optional
/// argument left at its default, as the older SDK sends it (nested, nulls included).
fn track_llm(tenant: &str, id: &str, at: &str) -> Value {
    json!({
        "tenant_id": tenant, "user_id": "user-123", "service_type": "llm_service",
        "service_provider": "openai", "event_type": "completion", "event_id": id, "timestamp": at,
        "session_id": null, "request_id": null, "tags": null,
        "metadata": {"model": "gpt-4o", "temperature": 0.7, "max_tokens": null, "model_version": null,
            "session_id": "chat-session-456"},
        "metrics": {"input_tokens": 100, "output_tokens": 50, "latency_ms": null}
    })
}

fn track_document(tenant: &str, id: &str, at: &str) -> Value {
    json!({
        "tenant_id": tenant, "user_id": "user-123", "service_type": "document_processor",
        "service_provider": "document_ai", "event_type": "processing", "event_id": id, "timestamp": at,
        "session_id": null, "request_id": null, "tags": ["invoices"],
        "metadata": {"document_type": "invoice", "processing_type": "data_extraction", "file_format": null,
            "accuracy": 0.98},
        "metrics": {"pages_processed": 5, "characters_extracted": 1200, "processing_time_ms": null,
            "file_size_bytes": 20480}
    })
}

fn track_api(tenant: &str, id: &str, at: &str) -> Value {
    json!({
        "tenant_id": tenant, "user_id": "user-456", "service_type": "api_service",
        "service_provider": "internal", "event_type": "request", "event_id": id, "timestamp": at,
        "session_id": null, "request_id": "req-1", "tags": null,
        "metadata": {"endpoint": "/v1/search", "method": "GET", "api_version": null, "status_code": 200},
        "metrics": {"request_count": 1, "response_time_ms": 120, "payload_size_bytes": null,
            "response_size_bytes": 512}
    })
}

/// `track_custom` of a service type nobody registered, with a text value among the metrics.
fn track_custom(tenant: &str, id: &str, at: &str) -> Value {
    json!({
        "tenant_id": tenant, "user_id": "user-789", "service_type": "ml_model",
        "service_provider": "in_house", "event_type": "prediction", "event_id": id, "timestamp": at,
        "session_id": null, "request_id": null, "tags": null,
        "metadata": {"region": "eu", "batch": 3},
        "metrics": {"predictions": 10, "model_version": "v2.1", "gpu_seconds": null}
    })
}

/// The listed event with this id.
fn listed<'a>(listing: &'a Value, id: &str) -> Result<&'a Value> {
    listing["events"]
        .as_array()
        .and_then(|events| events.iter().find(|event| event["event_id"] == id))
        .with_context(|| format!("event {id} is not listed: {listing}"))
}

both_backends!(
    sdk_calls_are_stored_and_listed_back_as_sent,
    readme_examples_work,
    every_endpoint_answers_in_the_older_shape,
    money_is_an_exact_json_number,
    unregistered_service_types_are_custom_unless_the_tenant_requires_registration,
    error_bodies_are_json_on_both_ports,
    api_key_schemes_and_tenant_ids,
    timestamps_are_strict,
    nul_bytes_are_refused_with_the_field,
);

async fn sdk_calls_are_stored_and_listed_back_as_sent(backend: Backend) -> Result<()> {
    let stack = Stack::start(backend).await?;
    let tenant = stack.edge.tenant.name.clone();
    let at = python_iso(OffsetDateTime::now_utc() - time::Duration::hours(1));
    let ids: Vec<String> = (0..4).map(|_| uuid4()).collect();

    // `track_llm` alone (no batching): 200, the older body.
    let one = stack.post("/api/v1/events", &track_llm(&tenant, &ids[0], &at)).await?;
    ensure!(one.status == StatusCode::OK, "track_llm: {} {}", one.status, one.text);
    ensure!(one.json["success"] == true && one.json["event_id"] == ids[0], "{}", one.text);
    ensure!(one.json["message"].is_string(), "{}", one.text);

    // The others through `flush_events`: one batch, 200.
    let batch = json!({"events": [track_document(&tenant, &ids[1], &at), track_api(&tenant, &ids[2], &at),
        track_custom(&tenant, &ids[3], &at)]});
    let answer = stack.post("/api/v1/events/batch", &batch).await?;
    ensure!(answer.status == StatusCode::OK, "flush_events: {} {}", answer.status, answer.text);
    ensure!(answer.json["processed_count"] == 3 && answer.json["failed_count"] == 0, "{}", answer.text);
    ensure!(answer.json["success"] == true && answer.json["failed_events"] == json!([]), "{}", answer.text);

    // A retry of the same batch (same ids and timestamps) is stored once.
    let retry = stack.post("/api/v1/events/batch", &batch).await?;
    ensure!(retry.status == StatusCode::OK && retry.json["processed_count"] == 3, "{}", retry.text);
    ensure!(stack.edge.events().await?.len() == 4, "a retry is not stored twice");

    // `get_usage` calls the ingest port; the query port answers the same.
    for port in [Port::Ingest, Port::Query] {
        let listing = stack.ok(port, &format!("/api/v1/usage?tenant_id={tenant}&limit=100")).await?;
        ensure!(listing["total_count"] == 4 && listing["has_more"] == false, "{port:?}: {listing}");

        let llm = listed(&listing, &ids[0])?;
        ensure!(llm["metrics"]["input_tokens"] == 100 && llm["metrics"]["output_tokens"] == 50, "{llm}");
        ensure!(llm["metrics"].get("latency_ms").is_none(), "a null latency is absent: {llm}");
        ensure!(llm["metadata"]["temperature"] == 0.7, "metadata numbers stay numbers: {llm}");
        ensure!(llm["metadata"]["model"] == "gpt-4o" && llm["model"] == "gpt-4o", "{llm}");
        ensure!(llm["metadata"]["session_id"] == "chat-session-456", "{llm}");
        ensure!(llm["metadata"].get("max_tokens").is_none(), "null metadata is absent: {llm}");
        ensure!(llm["total_cost"].is_number(), "gpt-4o is priced by the catalog, as a number: {llm}");

        let document = listed(&listing, &ids[1])?;
        let metrics = &document["metrics"];
        ensure!(metrics["pages_processed"] == 5 && metrics["characters_extracted"] == 1200, "{document}");
        ensure!(metrics["file_size_bytes"] == 20480, "{document}");
        ensure!(metrics["pages"] == 5, "the canonical quantity may stand beside: {document}");
        ensure!(document["metadata"]["accuracy"] == 0.98, "{document}");
        ensure!(document["metadata"]["document_type"] == "invoice", "{document}");
        ensure!(document["tags"] == json!(["invoices"]), "{document}");

        let api = listed(&listing, &ids[2])?;
        let metrics = &api["metrics"];
        ensure!(metrics["request_count"] == 1 && metrics["response_time_ms"] == 120, "{api}");
        ensure!(metrics["response_size_bytes"] == 512, "{api}");
        ensure!(api["metadata"]["status_code"] == 200 && api["request_id"] == "req-1", "{api}");

        let custom = listed(&listing, &ids[3])?;
        ensure!(custom["service_type"] == "ml_model", "{custom}");
        ensure!(custom["metrics"]["predictions"] == 10, "{custom}");
        ensure!(custom["metrics"]["model_version"] == "v2.1", "a text metric is kept as sent: {custom}");
        ensure!(custom["metadata"] == json!({"region": "eu", "batch": 3}), "{custom}");
        ensure!(!listing.to_string().contains("$caller"), "the reserved entry is not listed: {listing}");
    }

    // The text metric is a dimension of the event: stored, and filterable.
    let stored = stack.edge.events().await?;
    let custom = stored.iter().find(|event| event.service_type == "ml_model").context("stored")?;
    ensure!(custom.metadata.as_ref().is_some_and(|m| m["model_version"] == "v2.1"), "{:?}", custom.metadata);
    ensure!(
        custom.custom_quantities.as_ref().is_some_and(|q| q.len() == 1),
        "{:?}",
        custom.custom_quantities
    );
    let filtered = stack.ok(Port::Query, "/api/v1/usage?metadata.model_version=v2.1").await?;
    ensure!(filtered["total_count"] == 1 && filtered["events"][0]["event_id"] == ids[3], "{filtered}");
    let none = stack.ok(Port::Query, "/api/v1/usage?metadata.model_version=v9").await?;
    ensure!(none["events"] == json!([]), "{none}");

    // Flat callers send nulls too.
    let flat = json!({"user_id": "u", "service_type": "llm_service", "service_provider": "openai",
        "model": "gpt-4o", "input_tokens": 10, "output_tokens": 5, "latency_ms": null, "temperature": null});
    let answer = stack.post("/api/v1/events", &flat).await?;
    ensure!(answer.status == StatusCode::OK, "flat with nulls: {}", answer.text);
    Ok(())
}

async fn readme_examples_work(backend: Backend) -> Result<()> {
    let stack = Stack::start(backend).await?;
    let tenant = stack.edge.tenant.name.clone();
    // "Track an LLM event" (its tenant_id must now be the key's tenant).
    let event = json!({"tenant_id": tenant, "user_id": "user-456", "service_type": "llm_service",
        "service_provider": "openai", "event_type": "completion",
        "metadata": {"model": "gpt-4", "temperature": 0.7},
        "metrics": {"input_tokens": 150, "output_tokens": 75, "latency_ms": 2500}});
    let answer = stack.post("/api/v1/events", &event).await?;
    ensure!(answer.status == StatusCode::OK && answer.json["success"] == true, "{}", answer.text);
    let mut other = event.clone();
    other["tenant_id"] = json!("tenant-123");
    let answer = stack.post("/api/v1/events", &other).await?;
    ensure!(answer.status == StatusCode::FORBIDDEN && answer.json["error"] == "forbidden", "{}", answer.text);

    // "Query usage data" and "Get analytics" on the query port.
    let usage = stack
        .ok(Port::Query, &format!("/api/v1/usage?tenant_id={tenant}&service_type=llm_service&limit=100"))
        .await?;
    let listed = &usage["events"][0];
    ensure!(usage["total_count"] == 1 && listed["metrics"]["latency_ms"] == 2500, "{usage}");
    ensure!(listed["metadata"] == json!({"model": "gpt-4", "temperature": 0.7}), "{usage}");
    let trends = stack
        .ok(
            Port::Query,
            &format!("/api/v1/analytics/trends?tenant_id={tenant}&metric=event_count&period=day"),
        )
        .await?;
    ensure!(trends["trend_direction"].is_string() && trends["period_type"] == "day", "{trends}");
    ensure!(trends["percentage_change"].is_number() && trends["data_points"].is_array(), "{trends}");

    // "Service Registry": register a type, then send it.
    let admin = stack.admin.clone();
    let service = json!({"service_type": "custom_ml_service", "service_name": "Custom ML Service",
        "providers": ["provider_a", "provider_b"], "required_fields": ["model_version", "predictions"],
        "billing_config": {"unit": "predictions", "calculation_method": "multiply", "rates": {"standard": 0.001}}});
    let headers = [("x-api-key", admin.as_str()), ("content-type", "application/json")];
    let answer =
        stack.send(Port::Ingest, "POST", "/api/v1/services", &headers, Some(service.to_string())).await?;
    ensure!(answer.status.is_success(), "register: {} {}", answer.status, answer.text);
    let event = json!({"user_id": "u", "service_type": "custom_ml_service", "service_provider": "provider_a",
        "event_type": "predict", "metrics": {"predictions": 250, "model_version": "v3"}});
    let answer = stack.post("/api/v1/events", &event).await?;
    ensure!(answer.status == StatusCode::OK, "{}", answer.text);
    let costs: Vec<Option<Decimal>> = stack
        .edge
        .events()
        .await?
        .into_iter()
        .filter(|event| event.service_type == "custom_ml_service")
        .map(|event| event.cost)
        .collect();
    ensure!(costs == vec![Some(Decimal::new(25, 2))], "250 predictions at 0.001: {costs:?}");
    Ok(())
}

async fn every_endpoint_answers_in_the_older_shape(backend: Backend) -> Result<()> {
    let stack = Stack::start(backend).await?;
    let tenant = stack.edge.tenant.name.clone();
    let now = OffsetDateTime::now_utc();
    for hours_ago in [30, 5, 1] {
        let at = python_iso(now - time::Duration::hours(hours_ago));
        let batch = json!({"events": [track_llm(&tenant, &uuid4(), &at), track_api(&tenant, &uuid4(), &at)]});
        let answer = stack.post("/api/v1/events/batch", &batch).await?;
        ensure!(answer.status == StatusCode::OK, "{}", answer.text);
    }

    // Health on both ports: the older shape, each dependency's state.
    for port in [Port::Ingest, Port::Query] {
        let health = stack.send(port, "GET", "/health", &[], None).await?;
        ensure!(health.status == StatusCode::OK && health.json["status"] == "healthy", "{}", health.text);
        ensure!(health.json["timestamp"].is_string(), "{}", health.text);
        ensure!(health.json["services"]["database"] == "healthy", "{}", health.text);
        for path in ["/docs/", "/openapi.json", "/metrics"] {
            let answer = stack.send(port, "GET", path, &[], None).await?;
            ensure!(answer.status == StatusCode::OK, "{path} on {port:?} is public: {}", answer.status);
        }
    }
    let spec = stack.send(Port::Ingest, "GET", "/openapi.json", &[], None).await?;
    for path in ["/api/v1/events", "/api/v1/events/batch", "/api/v1/usage"] {
        ensure!(spec.json["paths"][path].is_object(), "the ingest port documents {path}");
    }

    // Auth: the older error codes.
    for port in [Port::Ingest, Port::Query] {
        let missing = stack.send(port, "GET", "/api/v1/usage", &[], None).await?;
        ensure!(missing.status == StatusCode::UNAUTHORIZED, "{}", missing.text);
        ensure!(missing.json["error"] == "authentication_required", "{}", missing.text);
        let wrong = stack.send(port, "GET", "/api/v1/usage", &[("x-api-key", "tly_nope")], None).await?;
        ensure!(
            wrong.status == StatusCode::UNAUTHORIZED && wrong.json["error"] == "invalid_api_key",
            "{}",
            wrong.text
        );
    }

    // The listing with every parameter of the older API.
    let start = python_iso(now - time::Duration::days(2));
    let end = python_iso(now + time::Duration::minutes(1));
    let path = format!(
        "/api/v1/usage?tenant_id={tenant}&start_date={start}&end_date={end}&service_type=llm_service\
         &service_provider=openai&user_id=user-123&limit=2&offset=1&include_billing=true"
    );
    let usage = stack.ok(Port::Ingest, &path).await?;
    ensure!(usage["total_count"] == 3 && usage["limit"] == 2 && usage["offset"] == 1, "{usage}");
    ensure!(usage["has_more"] == false && usage["events"].as_array().map(Vec::len) == Some(2), "{usage}");
    for field in [
        "event_id",
        "timestamp",
        "user_id",
        "service_type",
        "service_provider",
        "event_type",
        "metrics",
        "billing_info",
        "total_cost",
        "tags",
    ] {
        ensure!(usage["events"][0].get(field).is_some(), "events[].{field}: {usage}");
    }
    ensure!(usage["events"][0]["billing_info"]["total_cost"].is_number(), "{usage}");

    // Aggregates: `aggregates` rows with the older fields, and `total_aggregates`.
    let aggregate =
        stack.ok(Port::Query, &format!("/api/v1/usage/aggregate?tenant_id={tenant}&period=hour")).await?;
    let rows = aggregate["aggregates"].as_array().context("aggregates")?;
    ensure!(rows.len() == 6, "3 hours x 2 services: {aggregate}");
    for field in [
        "period_start",
        "period_end",
        "service_type",
        "service_provider",
        "user_id",
        "event_count",
        "unique_users",
        "total_cost",
        "aggregated_metrics",
        "error_rate",
    ] {
        ensure!(rows[0].get(field).is_some(), "aggregates[].{field}: {aggregate}");
    }
    let total = &aggregate["total_aggregates"];
    ensure!(
        total["event_count"] == 6 && total["unique_users"] == 2 && total["total_cost"].is_number(),
        "{total}"
    );
    ensure!(total["aggregated_metrics"]["input_tokens"] == 300, "{total}");

    let by_service =
        stack.ok(Port::Query, &format!("/api/v1/usage/by-service?tenant_id={tenant}&limit=10")).await?;
    let services = by_service["services"].as_array().context("services")?;
    ensure!(services.len() == 2 && services[0]["total_cost"].is_number(), "{by_service}");
    ensure!(
        services.iter().all(|s| s["top_users"].is_array() && s["share_of_events"].is_number()),
        "{by_service}"
    );

    let costs =
        stack.ok(Port::Query, &format!("/api/v1/usage/costs?tenant_id={tenant}&group_by=day")).await?;
    ensure!(costs["total_cost"].is_number() && costs["cost_by_service"].is_array(), "{costs}");
    ensure!(
        costs["cost_by_period"].as_array().is_some_and(|p| p.iter().all(|s| s["total_cost"].is_number())),
        "{costs}"
    );

    for metric in ["event_count", "total_cost", "unique_users"] {
        let trends = stack
            .ok(
                Port::Query,
                &format!("/api/v1/analytics/trends?tenant_id={tenant}&metric={metric}&period=hour"),
            )
            .await?;
        let points = trends["data_points"].as_array().context("data_points")?;
        ensure!(points.iter().all(|p| p["period"].is_string() && p.get("value").is_some()), "{trends}");
        ensure!(
            ["up", "down", "stable"].contains(&trends["trend_direction"].as_str().unwrap_or("")),
            "{trends}"
        );
        ensure!(trends["percentage_change"].is_number() && trends["period_type"] == "hour", "{trends}");
    }
    for path in [
        "/api/v1/analytics/top-users",
        "/api/v1/analytics/breakdown",
        "/api/v1/analytics/compare",
        "/api/v1/analytics/errors",
    ] {
        stack.ok(Port::Query, &format!("{path}?tenant_id={tenant}")).await?;
    }
    let bill = stack.ok(Port::Query, "/api/v1/billing/summary").await?;
    for field in ["total_cost", "usage_cost", "tiered_charges", "minimum_top_ups"] {
        ensure!(bill[field].is_number(), "billing {field} is a number: {bill}");
    }

    // Batches: partly rejected 200, all rejected 400, empty 400, over MAX_BATCH_SIZE 400.
    let bad = json!({"user_id": "u", "service_type": "llm_service", "service_provider": "openai",
        "metrics": {"input_tokens": 1}});
    let partly = json!({"events": [track_api(&tenant, &uuid4(), &python_iso(now)), bad.clone()]});
    let answer = stack.post("/api/v1/events/batch", &partly).await?;
    ensure!(answer.status == StatusCode::OK, "partly rejected: {} {}", answer.status, answer.text);
    ensure!(answer.json["processed_count"] == 1 && answer.json["failed_count"] == 1, "{}", answer.text);
    let failed = &answer.json["failed_events"][0];
    ensure!(
        failed["index"] == 1 && failed["error"].is_string() && failed["event_data"] == bad,
        "{}",
        answer.text
    );
    ensure!(answer.json["results"].as_array().map(Vec::len) == Some(2), "{}", answer.text);
    let all_bad = stack.post("/api/v1/events/batch", &json!({"events": [bad.clone(), bad]})).await?;
    ensure!(
        all_bad.status == StatusCode::BAD_REQUEST && all_bad.json["failed_count"] == 2,
        "{}",
        all_bad.text
    );
    let empty = stack.post("/api/v1/events/batch", &json!({"events": []})).await?;
    ensure!(empty.status == StatusCode::BAD_REQUEST && empty.json["detail"].is_string(), "{}", empty.text);
    let many: Vec<Value> = (0..1001).map(|_| json!({})).collect();
    let too_many = stack.post("/api/v1/events/batch", &json!({"events": many})).await?;
    ensure!(too_many.status == StatusCode::BAD_REQUEST, "over MAX_BATCH_SIZE: {}", too_many.status);
    ensure!(
        too_many.json["detail"].as_str().unwrap_or("").contains("1000"),
        "names the limit: {}",
        too_many.text
    );

    // One event with a validation error: 400 with a detail naming the field.
    let invalid =
        stack.post("/api/v1/events", &json!({"user_id": "u", "service_type": "llm_service"})).await?;
    ensure!(invalid.status == StatusCode::BAD_REQUEST, "{}", invalid.text);
    ensure!(
        invalid.json["detail"].as_str().unwrap_or("").starts_with("service_provider"),
        "{}",
        invalid.text
    );
    Ok(())
}

async fn money_is_an_exact_json_number(backend: Backend) -> Result<()> {
    let stack = Stack::start(backend).await?;
    // A price whose costs have more significant digits than a float holds (17).
    let admin = stack.admin.clone();
    let rule = json!({"service_type": "custom", "service_provider": "p", "unit": "input_tokens",
        "method": "per_unit", "rate": "999999.123456789012"});
    let headers = [("x-api-key", admin.as_str()), ("content-type", "application/json")];
    let answer =
        stack.send(Port::Ingest, "POST", "/api/v1/admin/prices", &headers, Some(rule.to_string())).await?;
    ensure!(answer.status.is_success(), "price rule: {} {}", answer.status, answer.text);
    let event = json!({"user_id": "u", "service_type": "custom", "service_provider": "p", "event_type": "e",
        "metrics": {"input_tokens": 3}});
    let answer = stack.post("/api/v1/events", &event).await?;
    ensure!(answer.status == StatusCode::OK, "{}", answer.text);
    let cost = stack.edge.events().await?[0].cost.context("priced")?.normalize();
    let digits = cost.to_string().chars().filter(char::is_ascii_digit).count();
    ensure!(digits > 17 && cost > Decimal::new(2_999_997, 0), "{cost} needs more digits than a float has");
    let exact = format!("\"total_cost\":{cost}");
    for (port, path) in [
        (Port::Ingest, "/api/v1/usage"),
        (Port::Query, "/api/v1/usage?include_billing=true"),
        (Port::Query, "/api/v1/usage/aggregate"),
        (Port::Query, "/api/v1/usage/by-service"),
        (Port::Query, "/api/v1/usage/costs"),
        (Port::Query, "/api/v1/billing/summary"),
    ] {
        let answer = stack.get(port, path).await?;
        ensure!(answer.status == StatusCode::OK, "{path}: {}", answer.text);
        ensure!(answer.text.contains(&exact), "{path} carries {exact}: {}", answer.text);
        ensure!(
            !answer.text.contains("\"total_cost\":\""),
            "{path}: money is never a string: {}",
            answer.text
        );
    }
    Ok(())
}

async fn unregistered_service_types_are_custom_unless_the_tenant_requires_registration(
    backend: Backend,
) -> Result<()> {
    let stack = Stack::start(backend).await?;
    let event = json!({"user_id": "u", "service_type": "ml_model", "service_provider": "p",
        "event_type": "predict", "metrics": {"predictions": 2}});
    let answer = stack.post("/api/v1/events", &event).await?;
    ensure!(answer.status == StatusCode::OK, "accepted as a custom event by default: {}", answer.text);

    let admin = stack.admin.clone();
    let headers = [("x-api-key", admin.as_str()), ("content-type", "application/json")];
    let settings = stack.send(Port::Ingest, "GET", "/api/v1/admin/settings", &headers, None).await?;
    ensure!(settings.json["require_registered_services"] == false, "{}", settings.text);
    let mut changed = settings.json.clone();
    changed["require_registered_services"] = json!(true);
    let answer = stack
        .send(Port::Ingest, "PUT", "/api/v1/admin/settings", &headers, Some(changed.to_string()))
        .await?;
    ensure!(
        answer.status == StatusCode::OK && answer.json["require_registered_services"] == true,
        "{}",
        answer.text
    );
    let stored = stack.edge.store.tenant_settings(stack.edge.tenant.id).await?.context("tenant")?;
    ensure!(stored.require_registered_services, "the setting is stored");

    let answer = stack.post("/api/v1/events", &event).await?;
    ensure!(answer.status == StatusCode::BAD_REQUEST, "refused once required: {}", answer.text);
    let detail = answer.json["detail"].as_str().unwrap_or("");
    ensure!(detail.starts_with("service_type: unknown service type \"ml_model\""), "{}", answer.text);
    let builtin =
        json!({"user_id": "u", "service_type": "custom", "service_provider": "p", "event_type": "e"});
    ensure!(
        stack.post("/api/v1/events", &builtin).await?.status == StatusCode::OK,
        "built-in types still pass"
    );
    ensure!(stack.edge.events().await?.len() == 2);
    Ok(())
}

/// 12.12: every error body is `{error, detail}` JSON, including axum's own rejections.
async fn error_bodies_are_json_on_both_ports(backend: Backend) -> Result<()> {
    let config = edge::EdgeConfig { http_body_bytes_max: 4096, ..edge::EdgeConfig::default() };
    let stack = Stack::with_config(backend, config).await?;
    let key = stack.edge.key.clone();
    let auth = ("x-api-key", key.as_str());
    let json_type = ("content-type", "application/json");
    let big = json!({"events": [{"user_id": "x".repeat(8000)}]}).to_string();
    let cases = [
        (Port::Ingest, "POST", "/api/v1/events/batch", Some(big), StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        (
            Port::Ingest,
            "POST",
            "/api/v1/events?ack=bogus&x=1",
            Some("{}".into()),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Port::Ingest,
            "POST",
            "/api/v1/events",
            Some("{not json".into()),
            StatusCode::BAD_REQUEST,
            "bad_frame",
        ),
        (Port::Ingest, "GET", "/api/v1/nothing", None, StatusCode::NOT_FOUND, "not_found"),
        (Port::Ingest, "GET", "/api/v1/events", None, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        (Port::Query, "GET", "/api/v1/nothing", None, StatusCode::NOT_FOUND, "not_found"),
        (Port::Query, "POST", "/api/v1/usage", None, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        (Port::Query, "GET", "/api/v1/usage?bogus=1", None, StatusCode::BAD_REQUEST, "invalid_parameter"),
    ];
    for (port, method, path, body, status, error) in cases {
        let answer = stack.send(port, method, path, &[auth, json_type], body).await?;
        ensure!(answer.status == status, "{method} {path}: {} {}", answer.status, answer.text);
        ensure!(
            answer.content_type.starts_with("application/json"),
            "{method} {path}: {}",
            answer.content_type
        );
        ensure!(answer.json["error"] == error, "{method} {path}: {}", answer.text);
        ensure!(
            answer.json["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{method} {path}: {}",
            answer.text
        );
    }
    Ok(())
}

/// 12.12: `Authorization: BEARER` (any case) and a `tenant_id` that is not a string.
async fn api_key_schemes_and_tenant_ids(backend: Backend) -> Result<()> {
    let stack = Stack::start(backend).await?;
    let key = stack.edge.key.clone();
    let event = json!({"user_id": "u", "service_type": "custom", "service_provider": "p", "event_type": "e"});
    for scheme in ["Bearer", "BEARER", "bearer", "BeArEr"] {
        let value = format!("{scheme} {key}");
        let headers = [("authorization", value.as_str()), ("content-type", "application/json")];
        let answer =
            stack.send(Port::Ingest, "POST", "/api/v1/events", &headers, Some(event.to_string())).await?;
        ensure!(answer.status == StatusCode::OK, "ingest with {scheme}: {} {}", answer.status, answer.text);
        let answer = stack
            .send(Port::Query, "GET", "/api/v1/usage", &[("authorization", value.as_str())], None)
            .await?;
        ensure!(answer.status == StatusCode::OK, "query with {scheme}: {} {}", answer.status, answer.text);
    }
    let headers = [("authorization", key.as_str()), ("content-type", "application/json")];
    let answer =
        stack.send(Port::Ingest, "POST", "/api/v1/events", &headers, Some(event.to_string())).await?;
    ensure!(answer.status == StatusCode::OK, "a bare key: {}", answer.text);

    for tenant in [json!(42), json!(["acme"]), json!({"id": "acme"}), json!(true)] {
        let mut wrong = event.clone();
        wrong["tenant_id"] = tenant.clone();
        let answer = stack.post("/api/v1/events", &wrong).await?;
        ensure!(
            answer.status == StatusCode::BAD_REQUEST,
            "tenant_id {tenant}: {} {}",
            answer.status,
            answer.text
        );
        ensure!(
            answer.json["detail"].as_str().unwrap_or("").contains("tenant_id: must be a string"),
            "{}",
            answer.text
        );
        let answer = stack.post("/api/v1/events/batch", &json!({"events": [wrong]})).await?;
        ensure!(answer.status == StatusCode::BAD_REQUEST, "batch tenant_id {tenant}: {}", answer.text);
    }
    let mut null = event.clone();
    null["tenant_id"] = Value::Null;
    ensure!(
        stack.post("/api/v1/events", &null).await?.status == StatusCode::OK,
        "a null tenant_id is absent"
    );
    ensure!(stack.edge.events().await?.len() == 6);
    Ok(())
}

/// 12.12: timestamps are RFC 3339 (or without an offset, as UTC), strictly.
async fn timestamps_are_strict(backend: Backend) -> Result<()> {
    let stack = Stack::start(backend).await?;
    let now = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let rfc = now.format(&Rfc3339)?;
    let naive = python_iso(now);
    let event = |timestamp: &str| {
        json!({"user_id": "u", "service_type": "custom", "service_provider": "p", "event_type": "e",
            "timestamp": timestamp, "event_id": uuid4()})
    };
    let good = [rfc.clone(), naive.clone(), naive.replacen('T', " ", 1), format!("{naive}+00:00")];
    for timestamp in &good {
        let answer = stack.post("/api/v1/events", &event(timestamp)).await?;
        ensure!(answer.status == StatusCode::OK, "{timestamp:?}: {}", answer.text);
    }
    let bad = [
        format!("{rfc}ZZZZ"),
        format!("{naive}ZZ"),
        format!("{naive}Zjunk"),
        "2024-01-15".into(),
        "yesterday".into(),
    ];
    for timestamp in &bad {
        let answer = stack.post("/api/v1/events", &event(timestamp)).await?;
        ensure!(answer.status == StatusCode::BAD_REQUEST, "{timestamp:?} is refused: {}", answer.text);
        ensure!(answer.json["detail"].as_str().unwrap_or("").starts_with("timestamp:"), "{}", answer.text);
    }
    ensure!(stack.edge.events().await?.len() == good.len());
    Ok(())
}

/// 12.9: a NUL byte in any string of an event is a 400 naming the field, never a 500.
async fn nul_bytes_are_refused_with_the_field(backend: Backend) -> Result<()> {
    let stack = Stack::start(backend).await?;
    let base =
        || json!({"user_id": "u", "service_type": "custom", "service_provider": "p", "event_type": "e"});
    let cases = [
        ("user_id", json!("a\u{0}b"), "user_id"),
        ("event_type", json!("e\u{0}"), "event_type"),
        ("model", json!("gpt\u{0}"), "model"),
        ("session_id", json!("s\u{0}"), "session_id"),
        ("tags", json!(["ok", "t\u{0}"]), "tags[1]"),
        ("metadata", json!({"note": "x\u{0}y"}), "metadata.note"),
        ("metadata", json!({"deep": {"list": ["\u{0}"]}}), "metadata.deep.list[0]"),
        ("metadata", json!({"k\u{0}": "v"}), "metadata"),
        ("metrics", json!({"model_version": "v\u{0}"}), "metrics.model_version"),
    ];
    for (field, value, named) in cases {
        let mut event = base();
        event[field] = value.clone();
        let answer = stack.post("/api/v1/events", &event).await?;
        ensure!(
            answer.status == StatusCode::BAD_REQUEST,
            "{field}: {value}: {} {}",
            answer.status,
            answer.text
        );
        let detail = answer.json["detail"].as_str().unwrap_or("");
        ensure!(
            detail.starts_with(&format!("{named}: ")) && detail.contains("NUL"),
            "{field}: {}",
            answer.text
        );
        let batch = json!({"events": [event, base()]});
        let answer = stack.post("/api/v1/events/batch", &batch).await?;
        ensure!(
            answer.status == StatusCode::OK && answer.json["failed_count"] == 1,
            "{field}: {}",
            answer.text
        );
    }
    Ok(())
}

/// 12.12: the embedded database is private to its user, with its WAL and shared-memory files.
#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_database_file_is_private() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let file = tests::fresh_sqlite()?;
    let sqlite = sink::sqlite::SqliteStore::open(file.path()).await?;
    let store = sink::Store::from(sqlite.clone());
    store.create_tenant("acme").await?;
    let path = file.path().to_path_buf();
    for suffix in ["", "-wal", "-shm"] {
        let path = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        let mode =
            std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?.permissions().mode();
        ensure!(mode & 0o777 == 0o600, "{} is {:o}", path.display(), mode & 0o777);
    }
    sqlite.close().await;
    Ok(())
}
