//! The control plane over HTTP: tenants (operator key), API keys, settings, the service registry,
//! price rules and re-rating (admin-scoped keys, each for its own tenant).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sink::{
    NewApiKey, Repriced, RerateRecord, RerateRun, RerateStart, Scope, ServiceRecord, StoredPriceRule,
    TenantSettings,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;
use wire::ErrorCode;

use crate::EdgeState;
use crate::auth::{Caller, generate_api_key, now_us};
use crate::http::{ApiError, api_key};
use crate::registry::{FieldSpec, Registry};
use crate::rerate::{RERATE_LIST_MAX, RERATE_RANGE_DAYS_MAX, RERATE_STALE_SECONDS};

const MICROS_PER_HOUR: i64 = 3_600_000_000;

pub fn routes() -> Router<Arc<EdgeState>> {
    Router::new()
        .route("/api/v1/admin/tenants", post(create_tenant).get(list_tenants))
        .route("/api/v1/admin/tenants/{tenant}/disable", post(disable_tenant))
        .route("/api/v1/admin/tenants/{tenant}/enable", post(enable_tenant))
        .route("/api/v1/admin/tenants/{tenant}/keys", post(operator_create_key))
        .route("/api/v1/admin/keys", get(list_keys).post(create_key))
        .route("/api/v1/admin/keys/{id}", delete(revoke_key))
        .route("/api/v1/admin/settings", get(get_settings).put(put_settings))
        .route("/api/v1/admin/prices", get(list_prices).post(create_price))
        .route("/api/v1/admin/prices/{id}", delete(retire_price))
        .route("/api/v1/admin/rerate", post(rerate).get(list_rerates))
        .route("/api/v1/admin/rerate/{id}", get(get_rerate))
        .route("/api/v1/services", get(list_services).post(create_service))
        .route("/api/v1/services/{service_type}", get(get_service).put(put_service).delete(delete_service))
}

fn invalid(detail: impl Into<String>) -> ApiError {
    ApiError::with_status(StatusCode::BAD_REQUEST, "invalid_request", detail)
}

fn not_found(detail: impl Into<String>) -> ApiError {
    ApiError::with_status(StatusCode::NOT_FOUND, "not_found", detail)
}

fn storage(error: sink::StoreError) -> ApiError {
    match error {
        sink::StoreError::Invalid { message, .. } => invalid(message),
        other => {
            tracing::warn!(error = %other, "control plane storage call failed");
            ApiError::new(other.code(), "storage failed; nothing was changed")
        }
    }
}

/// Refuses text that storage cannot hold or that would confuse a reader: NUL and other control
/// characters (PostgreSQL refuses NUL outright).
fn check_text(field: &str, text: &str) -> Result<(), ApiError> {
    if text.chars().any(char::is_control) {
        return Err(invalid(format!("{field}: must not contain control characters (such as NUL)")));
    }
    Ok(())
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| invalid(format!("invalid body: {error}")))
}

/// The operator: the configured operator key, compared by hash.
fn operator(state: &EdgeState, headers: &HeaderMap) -> Result<(), ApiError> {
    let expected = state.config.operator_key.as_deref().map(sink::hash_api_key);
    let given = api_key(headers).map(sink::hash_api_key);
    match (expected, given) {
        (Some(expected), Some(given)) if expected == given => Ok(()),
        (_, None) => Err(crate::auth::AuthError::Missing.into()),
        _ => Err(ApiError::new(ErrorCode::Forbidden, "this endpoint needs the operator key")),
    }
}

async fn admin(state: &EdgeState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    Ok(state.auth.authenticate(api_key(headers), Scope::Admin).await?)
}

/// Any valid key of the tenant, whatever its scopes (reading the registry).
async fn member(state: &EdgeState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    for scope in [Scope::Query, Scope::Ingest, Scope::Admin] {
        match state.auth.authenticate(api_key(headers), scope).await {
            Ok(caller) => return Ok(caller),
            Err(crate::auth::AuthError::MissingScope(_)) => continue,
            Err(error) => return Err(error.into()),
        }
    }
    Err(ApiError::new(ErrorCode::Forbidden, "this API key has no scope"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    name: String,
}

async fn create_tenant(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    operator(&state, &headers)?;
    let request: NewTenant = parse(&body)?;
    let name = request.name.trim();
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(invalid("name: must be 1 to 64 characters without control characters"));
    }
    // Tenants are found by name or id; a name that reads as an id would make that ambiguous.
    if Uuid::parse_str(name).is_ok() {
        return Err(invalid("name: must not be a UUID (tenants are also found by id)"));
    }
    let tenant = state.store.create_tenant(name).await.map_err(storage)?;
    Ok((StatusCode::CREATED, Json(json!({"id": tenant.id, "name": tenant.name, "disabled": false})))
        .into_response())
}

async fn list_tenants(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    operator(&state, &headers)?;
    let tenants = state.store.list_tenants().await.map_err(storage)?;
    let tenants: Vec<Value> =
        tenants.into_iter().map(|t| json!({"id": t.id, "name": t.name, "disabled": t.disabled})).collect();
    Ok(Json(json!({"tenants": tenants})))
}

async fn tenant_by_path(state: &EdgeState, tenant: &str) -> Result<sink::Tenant, ApiError> {
    state
        .store
        .find_tenant(tenant)
        .await
        .map_err(storage)?
        .ok_or_else(|| not_found(format!("no tenant {tenant:?}")))
}

async fn set_disabled(
    state: &EdgeState,
    headers: &HeaderMap,
    tenant: &str,
    disabled: bool,
) -> Result<Json<Value>, ApiError> {
    operator(state, headers)?;
    let tenant = tenant_by_path(state, tenant).await?;
    state.store.set_tenant_disabled(tenant.id, disabled).await.map_err(storage)?;
    state.ingestor.tenants().invalidate(tenant.id);
    state.auth.forget_tenant(tenant.id);
    Ok(Json(json!({"id": tenant.id, "name": tenant.name, "disabled": disabled})))
}

async fn disable_tenant(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_disabled(&state, &headers, &tenant, true).await
}

async fn enable_tenant(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_disabled(&state, &headers, &tenant, false).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KeyRequest {
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    label: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    expires_at: Option<String>,
}

/// Creates a key; the plaintext is in this answer only.
async fn new_key(state: &EdgeState, tenant_id: Uuid, request: KeyRequest) -> Result<Response, ApiError> {
    let scopes = match request.scopes {
        None => vec![Scope::Ingest, Scope::Query],
        Some(scopes) if scopes.is_empty() => {
            return Err(invalid("scopes: give at least one of ingest, query, admin"));
        }
        Some(scopes) => scopes
            .iter()
            .map(|scope| {
                Scope::parse(scope)
                    .ok_or_else(|| invalid(format!("scopes: {scope:?} is not one of ingest, query, admin")))
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let expires_at_us =
        request.expires_at.as_deref().map(|text| parse_time("expires_at", text)).transpose()?;
    if expires_at_us.is_some_and(|expires| expires <= now_us()) {
        return Err(invalid("expires_at: must be in the future"));
    }
    if request.label.as_ref().is_some_and(|label| label.len() > 200) {
        return Err(invalid("label: at most 200 bytes"));
    }
    if let Some(label) = &request.label {
        check_text("label", label)?;
    }
    let key = generate_api_key();
    let new_key = NewApiKey {
        tenant_id,
        key_hash: sink::hash_api_key(&key),
        prefix: key[..12].to_owned(),
        scopes,
        label: request.label,
        expires_at_us,
    };
    let stored = state.store.create_api_key(&new_key).await.map_err(storage)?;
    let scopes: Vec<&str> = stored.scopes.iter().map(|scope| scope.as_str()).collect();
    let body = json!({"id": stored.id, "key": key, "prefix": new_key.prefix, "scopes": scopes,
        "label": stored.label, "expires_at": expires_at_us.map(format_time)});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn operator_create_key(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    operator(&state, &headers)?;
    let tenant = tenant_by_path(&state, &tenant).await?;
    let request = if body.is_empty() { KeyRequest::default() } else { parse(&body)? };
    new_key(&state, tenant.id, request).await
}

async fn create_key(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = admin(&state, &headers).await?;
    let request = if body.is_empty() { KeyRequest::default() } else { parse(&body)? };
    new_key(&state, caller.tenant_id, request).await
}

async fn list_keys(State(state): State<Arc<EdgeState>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let caller = admin(&state, &headers).await?;
    let keys = state.store.list_api_keys(caller.tenant_id).await.map_err(storage)?;
    let keys: Vec<Value> = keys
        .into_iter()
        .map(|key| {
            let scopes: Vec<&str> = key.scopes.iter().map(|scope| scope.as_str()).collect();
            json!({"id": key.id, "prefix": key.prefix, "scopes": scopes, "label": key.label,
                "created_at": format_time(key.created_at_us), "expires_at": key.expires_at_us.map(format_time),
                "revoked": key.revoked})
        })
        .collect();
    Ok(Json(json!({"keys": keys})))
}

async fn revoke_key(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Path(id): Path<Uuid>,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&state, &headers).await?;
    if !state.store.revoke_api_key(caller.tenant_id, id).await.map_err(storage)? {
        return Err(not_found(format!("no key {id}")));
    }
    state.auth.forget_key(id);
    Ok(Json(json!({"id": id, "revoked": true})))
}

async fn get_settings(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
) -> Result<Json<TenantSettings>, ApiError> {
    let caller = admin(&state, &headers).await?;
    let settings = state.store.tenant_settings(caller.tenant_id).await.map_err(storage)?;
    settings.map(Json).ok_or_else(|| not_found("no such tenant"))
}

async fn put_settings(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<TenantSettings>, ApiError> {
    let caller = admin(&state, &headers).await?;
    let settings: TenantSettings = parse(&body)?;
    if !matches!(settings.quota_policy.as_str(), "reject" | "flag") {
        return Err(invalid("quota_policy: must be reject or flag"));
    }
    if settings.rate_limit_burst.is_some() && settings.rate_limit_per_second.is_none() {
        return Err(invalid("rate_limit_burst: needs rate_limit_per_second"));
    }
    // Storage keeps partitions for the edge's widest window only: a wider tenant window would
    // accept events that could never be stored.
    let window_max = state.ingestor.window_max();
    if u64::from(settings.late_window_seconds) > window_max.late.as_secs() {
        return Err(invalid(format!(
            "late_window_seconds: at most {} (the edge's late-event window)",
            window_max.late.as_secs()
        )));
    }
    if u64::from(settings.future_window_seconds) > window_max.ahead.as_secs() {
        return Err(invalid(format!(
            "future_window_seconds: at most {} (the edge's early-event window)",
            window_max.ahead.as_secs()
        )));
    }
    check_text("time_zone", &settings.time_zone)?;
    if settings.time_zone.is_empty() || settings.time_zone.len() > 64 {
        return Err(invalid("time_zone: must be an IANA time zone name such as Europe/Paris"));
    }
    if settings.monthly_cost_quota.is_some_and(|quota| quota.is_sign_negative()) {
        return Err(invalid("monthly_cost_quota: must not be negative"));
    }
    state.store.update_tenant_settings(caller.tenant_id, &settings).await.map_err(storage)?;
    state.ingestor.tenants().invalidate(caller.tenant_id);
    Ok(Json(settings))
}

async fn list_prices(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&state, &headers).await?;
    let stored = state.store.list_price_rules(caller.tenant_id).await.map_err(storage)?;
    let (_, problems) = crate::tenants::price_book(state.ingestor.tenants().catalog(), &stored);
    let rules: Vec<Value> = stored.iter().map(price_json).collect();
    let catalog: Vec<Value> = state
        .ingestor
        .tenants()
        .catalog()
        .iter()
        .map(|rule| json!({"id": rule.id, "source": "catalog", "rule": pricing::PriceRuleSpec::from_rule(rule)}))
        .collect();
    // Rules left out of the book, or ties decided by it: retire the rules named to repair them.
    Ok(Json(json!({"rules": rules, "catalog": catalog, "problems": problems})))
}

fn price_json(rule: &StoredPriceRule) -> Value {
    json!({"id": rule.id, "source": "tenant", "rule": rule.definition,
        "effective_from": format_time(rule.effective_from_us),
        "effective_until": rule.effective_until_us.map(format_time), "retired": rule.retired})
}

#[derive(Deserialize)]
struct NewPrice {
    /// A rule this one replaces: it ends where the new one starts.
    #[serde(default)]
    replaces: Option<Uuid>,
    #[serde(flatten)]
    rule: pricing::PriceRuleSpec,
}

async fn create_price(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = admin(&state, &headers).await?;
    let request: NewPrice = parse(&body)?;
    let id = Uuid::now_v7();
    let current_hour_us = now_us().div_euclid(MICROS_PER_HOUR) * MICROS_PER_HOUR;
    let rule = request
        .rule
        .clone()
        .into_rule(id, pricing::RuleSource::Tenant, current_hour_us)
        .map_err(|error| invalid(error.to_string()))?;
    let mut definition = serde_json::to_value(pricing::PriceRuleSpec::from_rule(&rule))
        .map_err(|error| ApiError::new(ErrorCode::Internal, error.to_string()))?;
    if let Some(object) = definition.as_object_mut() {
        object.remove("effective_until");
    }
    let stored = StoredPriceRule {
        id,
        tenant_id: caller.tenant_id,
        definition,
        effective_from_us: rule.effective_from_us,
        effective_until_us: rule.effective_until_us,
        retired: false,
    };
    // The new book must be consistent before anything is written.
    let mut existing = state.store.list_price_rules(caller.tenant_id).await.map_err(storage)?;
    if let Some(replaced) = request.replaces {
        let old = existing
            .iter_mut()
            .find(|old| old.id == replaced)
            .ok_or_else(|| not_found(format!("no price rule {replaced}")))?;
        old.retired = true;
        old.effective_until_us =
            (rule.effective_from_us > old.effective_from_us).then_some(rule.effective_from_us);
    }
    existing.push(stored.clone());
    crate::tenants::check_price_change(state.ingestor.tenants().catalog(), &existing, &[id])
        .map_err(invalid)?;
    let retire: Vec<(Uuid, i64)> =
        request.replaces.map(|replaced| (replaced, rule.effective_from_us)).into_iter().collect();
    state
        .store
        .change_price_rules(caller.tenant_id, &retire, std::slice::from_ref(&stored))
        .await
        .map_err(storage)?;
    state.ingestor.tenants().invalidate(caller.tenant_id);
    Ok((StatusCode::CREATED, Json(price_json(&stored))).into_response())
}

/// Ends a rule at the start of the next hour (rules change on hour boundaries, so hourly rollups
/// price exactly); a rule that has not started yet never applies.
async fn retire_price(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Path(id): Path<Uuid>,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&state, &headers).await?;
    let next_hour_us = (now_us().div_euclid(MICROS_PER_HOUR) + 1) * MICROS_PER_HOUR;
    if !state.store.retire_price_rule(caller.tenant_id, id, next_hour_us).await.map_err(storage)? {
        return Err(not_found(format!("no price rule {id}")));
    }
    state.ingestor.tenants().invalidate(caller.tenant_id);
    Ok(Json(json!({"id": id, "retired": true, "effective_until": format_time(next_hour_us)})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RerateBody {
    start_date: String,
    end_date: String,
}

/// Starts re-pricing a tenant's events in a range with its current rules, as a background job
/// ([`crate::rerate`]): the audit row is written first (status running), then the answer is 202
/// with the run's id and where to follow it. One run per tenant at a time: while one runs, 409
/// names it. Running it twice changes nothing more.
async fn rerate(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = admin(&state, &headers).await?;
    let request: RerateBody = parse(&body)?;
    let (start_us, end_us) =
        (parse_time("start_date", &request.start_date)?, parse_time("end_date", &request.end_date)?);
    if end_us <= start_us {
        return Err(invalid("end_date: must be after start_date"));
    }
    if end_us - start_us > RERATE_RANGE_DAYS_MAX * 86_400_000_000 {
        return Err(invalid(format!("end_date: a re-rate covers at most {RERATE_RANGE_DAYS_MAX} days")));
    }
    let stored = state.store.list_price_rules(caller.tenant_id).await.map_err(storage)?;
    let (book, _) = crate::tenants::price_book(state.ingestor.tenants().catalog(), &stored);
    let reprice = move |event: &wire::Event| match book.price_event(event) {
        Ok(price) => Repriced { cost: price.cost, rule_ids: price.rule_ids },
        // Its cost under today's rules is past the bound of one event: stored unpriced (and so
        // counted as unpriced in bills), never as a wrong amount.
        Err(error) => {
            tracing::warn!(event_id = %event.id(), %error, "re-rated event left unpriced");
            Repriced { cost: None, rule_ids: Vec::new() }
        }
    };
    let run = RerateRun {
        id: Uuid::now_v7(),
        tenant_id: caller.tenant_id,
        start_us,
        end_us,
        started_at_us: now_us(),
        events_scanned: 0,
        events_changed: 0,
        cost_before: Default::default(),
        cost_after: Default::default(),
        requested_by: Some(caller.key_id),
    };
    let stale_before_us = run.started_at_us - RERATE_STALE_SECONDS * 1_000_000;
    if let RerateStart::AlreadyRunning(running) =
        state.store.start_rerate(&run, stale_before_us).await.map_err(storage)?
    {
        return Err(ApiError::with_status(
            StatusCode::CONFLICT,
            "rerate_running",
            format!("re-rate {running} of this tenant is running; follow it at {}", rerate_path(running)),
        ));
    }
    let location = rerate_path(run.id);
    state.rerates.spawn(state.clone(), run.clone(), Box::new(reprice));
    let body = json!({"id": run.id, "status": "running", "start_date": format_time(start_us),
        "end_date": format_time(end_us), "started_at": format_time(run.started_at_us),
        "links": {"self": location}});
    Ok((StatusCode::ACCEPTED, [(axum::http::header::LOCATION, location)], Json(body)).into_response())
}

/// One of the caller's tenant's re-rates; another tenant's is not found.
async fn get_rerate(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Path(id): Path<Uuid>,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&state, &headers).await?;
    match state.store.find_rerate(caller.tenant_id, id).await.map_err(storage)? {
        Some(record) => Ok(Json(rerate_json(&record))),
        None => Err(not_found(format!("no re-rate {id}"))),
    }
}

/// The caller's tenant's latest re-rates, newest first.
async fn list_rerates(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&state, &headers).await?;
    let records = state.store.list_rerates(caller.tenant_id, RERATE_LIST_MAX).await.map_err(storage)?;
    Ok(Json(json!({"runs": records.iter().map(rerate_json).collect::<Vec<_>>()})))
}

fn rerate_path(id: Uuid) -> String {
    format!("/api/v1/admin/rerate/{id}")
}

fn rerate_json(record: &RerateRecord) -> Value {
    let run = &record.run;
    json!({"id": run.id, "status": record.status.as_str(), "start_date": format_time(run.start_us),
        "end_date": format_time(run.end_us), "events_scanned": run.events_scanned,
        "events_changed": run.events_changed, "cost_before": run.cost_before, "cost_after": run.cost_after,
        "started_at": format_time(run.started_at_us), "updated_at": format_time(record.updated_at_us),
        "finished_at": record.finished_at_us.map(format_time), "error": record.error,
        "requested_by": run.requested_by, "links": {"self": rerate_path(run.id)}})
}

/// A service type in the older system's shape.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceBody {
    service_type: Option<String>,
    service_name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    providers: Vec<String>,
    #[serde(default)]
    required_fields: Vec<FieldSpec>,
    #[serde(default)]
    optional_fields: Vec<FieldSpec>,
    #[serde(default)]
    billing_config: Option<Value>,
}

fn service_json(service: &ServiceRecord) -> Value {
    json!({"service_type": service.service_type, "service_name": service.service_name,
        "description": service.description, "providers": service.providers,
        "required_fields": service.required_fields, "optional_fields": service.optional_fields,
        "billing_config": service.billing_config, "built_in": false})
}

fn built_in_json(service: &crate::registry::BuiltIn) -> Value {
    let required: Vec<String> = service
        .required
        .iter()
        .map(|field| match field {
            crate::registry::Required::Model => "model".to_owned(),
            crate::registry::Required::Quantity(kind) => kind.as_str().to_owned(),
            crate::registry::Required::Metadata(key) => (*key).to_owned(),
        })
        .collect();
    json!({"service_type": service.name, "service_name": service.name, "description": service.description,
        "providers": [], "required_fields": required, "optional_fields": [], "billing_config": null, "built_in": true})
}

async fn list_services(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let caller = member(&state, &headers).await?;
    let custom = state.store.list_services(caller.tenant_id).await.map_err(storage)?;
    let mut services: Vec<Value> = crate::registry::BUILT_IN.iter().map(built_in_json).collect();
    services.extend(custom.iter().map(service_json));
    Ok(Json(json!({"services": services})))
}

async fn get_service(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Path(service_type): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = member(&state, &headers).await?;
    if let Some(service) = Registry::built_in_type(&service_type) {
        return Ok(Json(built_in_json(service)));
    }
    let custom = state.store.list_services(caller.tenant_id).await.map_err(storage)?;
    let service = custom.iter().find(|service| service.service_type == service_type);
    service
        .map(|service| Json(service_json(service)))
        .ok_or_else(|| not_found(format!("no service type {service_type:?}")))
}

async fn create_service(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: ServiceBody = parse(&body)?;
    let service_type = body.service_type.clone().ok_or_else(|| invalid("service_type: is required"))?;
    save_service(&state, &headers, service_type, body, true).await
}

async fn put_service(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Path(service_type): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: ServiceBody = parse(&body)?;
    if body.service_type.as_ref().is_some_and(|named| *named != service_type) {
        return Err(invalid("service_type: differs from the path"));
    }
    save_service(&state, &headers, service_type, body, false).await
}

async fn save_service(
    state: &EdgeState,
    headers: &HeaderMap,
    service_type: String,
    body: ServiceBody,
    create: bool,
) -> Result<Response, ApiError> {
    let caller = admin(state, headers).await?;
    if Registry::built_in_type(&service_type).is_some() {
        return Err(ApiError::with_status(
            StatusCode::CONFLICT,
            "conflict",
            format!("{service_type} is built in and cannot be changed"),
        ));
    }
    let probe = wire::Event::new("u", service_type.clone(), "p", "e");
    if let Err(error) = probe.validate() {
        return Err(invalid(format!("service_type: {}", error.reason)));
    }
    for (index, provider) in body.providers.iter().enumerate() {
        if wire::Event::new("u", "s", provider.clone(), "e").validate().is_err() {
            return Err(invalid(format!("providers[{index}]: {provider:?} is not a valid provider name")));
        }
    }
    for (index, field) in body.required_fields.iter().chain(&body.optional_fields).enumerate() {
        if field.name().is_empty() || field.name().len() > 64 {
            return Err(invalid(format!("fields[{index}]: names are 1 to 64 bytes")));
        }
        check_text(&format!("fields[{index}]"), field.name())?;
    }
    check_text("service_name", &body.service_name)?;
    if let Some(description) = &body.description {
        check_text("description", description)?;
    }
    let services = state.store.list_services(caller.tenant_id).await.map_err(storage)?;
    let previous = services.iter().find(|service| service.service_type == service_type);
    if create && previous.is_some() {
        return Err(ApiError::with_status(
            StatusCode::CONFLICT,
            "conflict",
            format!("{service_type} exists; use PUT to change it"),
        ));
    }
    // Everything is checked before anything is written: a refused billing_config saves nothing.
    let current_hour_us = now_us().div_euclid(MICROS_PER_HOUR) * MICROS_PER_HOUR;
    let inserts = match &body.billing_config {
        Some(config) => billing_config_rules(&service_type, config)?
            .into_iter()
            .map(|spec| stored_rule(caller.tenant_id, spec, current_hour_us))
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let stored = state.store.list_price_rules(caller.tenant_id).await.map_err(storage)?;
    let previous_config = previous.and_then(|service| service.billing_config.as_ref());
    let retire =
        owned_rules(&service_type, previous_config, body.billing_config.as_ref(), &stored, current_hour_us);
    let after = rules_after(stored, &retire, &inserts);
    let inserted: Vec<Uuid> = inserts.iter().map(|rule| rule.id).collect();
    crate::tenants::check_price_change(state.ingestor.tenants().catalog(), &after, &inserted)
        .map_err(|problem| invalid(format!("billing_config: {problem}")))?;
    let record = ServiceRecord {
        service_type: service_type.clone(),
        service_name: body.service_name,
        description: body.description,
        providers: body.providers,
        required_fields: serde_json::to_value(&body.required_fields).unwrap_or_default(),
        optional_fields: serde_json::to_value(&body.optional_fields).unwrap_or_default(),
        billing_config: body.billing_config,
    };
    let created = state.store.put_service(caller.tenant_id, &record).await.map_err(storage)?;
    // The service's own rules change in one transaction: the previous ones end where the new
    // ones start (a rule that started this hour is voided), so repeated PUTs never pile up rules
    // that tie.
    state.store.change_price_rules(caller.tenant_id, &retire, &inserts).await.map_err(storage)?;
    state.ingestor.tenants().invalidate(caller.tenant_id);
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(service_json(&record))).into_response())
}

/// A price rule from the admin shape, starting this hour.
fn stored_rule(
    tenant_id: Uuid,
    spec: pricing::PriceRuleSpec,
    current_hour_us: i64,
) -> Result<StoredPriceRule, ApiError> {
    let id = Uuid::now_v7();
    let rule = spec
        .into_rule(id, pricing::RuleSource::Tenant, current_hour_us)
        .map_err(|error| invalid(format!("billing_config: {error}")))?;
    let definition = serde_json::to_value(pricing::PriceRuleSpec::from_rule(&rule))
        .map_err(|error| invalid(format!("billing_config: {error}")))?;
    Ok(StoredPriceRule {
        id,
        tenant_id,
        definition,
        effective_from_us: rule.effective_from_us,
        effective_until_us: None,
        retired: false,
    })
}

/// The rules a service's `billing_config` owns and a change of it retires: the tenant's rules
/// still in force for the service type, per unit, with no provider or event type, whose (unit,
/// model) the previous or the new configuration names. Each ends at `at_us`.
fn owned_rules(
    service_type: &str,
    previous: Option<&Value>,
    next: Option<&Value>,
    stored: &[StoredPriceRule],
    at_us: i64,
) -> Vec<(Uuid, i64)> {
    let slot = |spec: &pricing::PriceRuleSpec| (spec.unit.name().to_owned(), spec.model.clone());
    let slots: Vec<(String, Option<String>)> = [previous, next]
        .into_iter()
        .flatten()
        .filter_map(|config| billing_config_rules(service_type, config).ok())
        .flatten()
        .map(|spec| slot(&spec))
        .collect();
    stored
        .iter()
        .filter(|rule| !(rule.retired && rule.effective_until_us.is_none()))
        .filter(|rule| rule.effective_until_us.is_none_or(|until| until > at_us))
        .filter(|rule| {
            serde_json::from_value::<pricing::PriceRuleSpec>(rule.definition.clone()).is_ok_and(|spec| {
                spec.service_type == service_type
                    && spec.service_provider.is_none()
                    && spec.event_type.is_none()
                    && matches!(spec.method, pricing::Method::PerUnit { .. })
                    && slots.contains(&slot(&spec))
            })
        })
        .map(|rule| (rule.id, at_us))
        .collect()
}

/// The stored rules as they will be once `retire` and `insert` are applied, as the store applies
/// them ([`sink::Store::retire_price_rule`]).
fn rules_after(
    mut stored: Vec<StoredPriceRule>,
    retire: &[(Uuid, i64)],
    insert: &[StoredPriceRule],
) -> Vec<StoredPriceRule> {
    for rule in &mut stored {
        if let Some((_, at_us)) = retire.iter().find(|(id, _)| *id == rule.id) {
            rule.retired = true;
            rule.effective_until_us = (*at_us > rule.effective_from_us)
                .then(|| rule.effective_until_us.map_or(*at_us, |until| until.min(*at_us)));
        }
    }
    stored.extend_from_slice(insert);
    stored
}

/// The older system's `billing_config {unit, calculation_method, rates}` as per-unit price rules:
/// a rate named `standard` or `default` applies to any model, any other name to that model.
fn billing_config_rules(service_type: &str, config: &Value) -> Result<Vec<pricing::PriceRuleSpec>, ApiError> {
    let unit = config
        .get("unit")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("billing_config.unit: is required"))?;
    let method = config.get("calculation_method").and_then(Value::as_str).unwrap_or("multiply");
    if method != "multiply" {
        return Err(invalid(format!(
            "billing_config.calculation_method: {method:?} is not supported here; use multiply or POST /api/v1/admin/prices"
        )));
    }
    let rates = config
        .get("rates")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("billing_config.rates: must be an object"))?;
    rates
        .iter()
        .map(|(name, rate)| {
            let model = (!matches!(name.as_str(), "standard" | "default")).then(|| name.clone());
            let spec = json!({"service_type": service_type, "model": model, "unit": unit, "method": "per_unit", "rate": rate});
            serde_json::from_value(spec).map_err(|error| invalid(format!("billing_config.rates.{name}: {error}")))
        })
        .collect()
}

async fn delete_service(
    State(state): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Path(service_type): Path<String>,
) -> Result<StatusCode, ApiError> {
    let caller = admin(&state, &headers).await?;
    if Registry::built_in_type(&service_type).is_some() {
        return Err(ApiError::with_status(
            StatusCode::CONFLICT,
            "conflict",
            format!("{service_type} is built in and cannot be deleted"),
        ));
    }
    if !state.store.delete_service(caller.tenant_id, &service_type).await.map_err(storage)? {
        return Err(not_found(format!("no service type {service_type:?}")));
    }
    state.ingestor.tenants().invalidate(caller.tenant_id);
    Ok(StatusCode::NO_CONTENT)
}

fn parse_time(field: &str, text: &str) -> Result<i64, ApiError> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map(|at| (at.unix_timestamp_nanos() / 1000) as i64)
        .map_err(|_| invalid(format!("{field}: {text:?} is not an RFC 3339 date-time")))
}

fn format_time(unix_us: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_us) * 1000)
        .ok()
        .and_then(|at| at.format(&Rfc3339).ok())
        .unwrap_or_default()
}
